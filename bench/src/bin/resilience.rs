//! The per-request cost of a `resilience` document at the caller node, for
//! `bench/http.sh` (which runs it under callgrind and compares it with a
//! whole proxied request).
//!
//! `meshnode-resilience-bench MODE N`: MODE is `document` (what
//! `http::forward` and `http::exchange` do for a request of a service with
//! a document holding every caller-side key: the policy lookup, the fault
//! check, two circuit-breaker units, the retry budget's deposit, and the
//! request's timeout and one try's timeout around an exchange that waits
//! once, as a real one waits for the network) or `none` (the lookup for a
//! service without a document, and the same exchange without timers).
// A measuring crate: it reads wall and virtual clocks itself (the
// disallowed-methods rule of clippy.toml is for the mesh's own code).
#![allow(clippy::disallowed_methods)]

use std::hint::black_box;
use std::time::Duration;

use anyhow::{bail, Context};
use hyper::header::{HeaderMap, HeaderValue};
use meshnode_node::policy::schema;
use meshnode_node::resilience::{Ledger, Limit, Policies};

const DOCUMENT: &str = r#"
kind = "resilience"
name = "web"
timeout = "5s"
retries = { attempts = 2, per_try_timeout = "2s", on = ["connect-failure", "5xx"], budget = 0.2 }
circuit_breaker = { max_requests = 10000, max_pending = 10000, max_connections = 1000, max_retries = 100 }
fault = { abort = { status = 503, percent = 50 }, delay = { duration = "1s", percent = 50 }, header = "x-chaos" }
"#;

/// Stands for the exchange: it waits once (so the timers around it are
/// registered, as around a real one), then answers.
async fn exchange() -> u64 {
    tokio::task::yield_now().await;
    1
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (mode, n) = match args.as_slice() {
        [_, mode, n] => (mode.as_str(), n.parse::<u64>().context("N")?),
        _ => bail!("usage: meshnode-resilience-bench document|none N"),
    };
    let service = match mode {
        "document" => "web",
        "none" => "other",
        _ => bail!("usage: meshnode-resilience-bench document|none N"),
    };
    let doc = schema::parse(DOCUMENT).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let policies = Policies::from_documents([(1, doc)]);
    let ledger = Ledger::default();
    let mut headers = HeaderMap::new();
    headers.insert(
        "user-agent",
        HeaderValue::from_static("h2load nghttp2/1.52.0"),
    );
    headers.insert("accept", HeaderValue::from_static("*/*"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    let answered = rt.block_on(async {
        let mut answered = 0u64;
        for i in 0..n {
            let Some(p) = policies.get(black_box(service)) else {
                answered += exchange().await;
                continue;
            };
            let roll = (i % 100) as f64;
            black_box(p.faults(&headers, roll, roll));
            let breaker = ledger.breaker(service);
            let cb = p.circuit_breaker.as_ref();
            let requests = cb.map(|cb| breaker.try_enter(Limit::Requests, cb.max_requests));
            let pending = cb.map(|cb| breaker.try_enter(Limit::Pending, cb.max_pending));
            if let Some(r) = &p.retries {
                ledger.request(service, r.budget, i / 10_000);
            }
            let per_try = p.retries.as_ref().and_then(|r| r.per_try_timeout);
            let tried = async {
                match per_try {
                    Some(t) => tokio::time::timeout(t, exchange()).await.unwrap_or(0),
                    None => exchange().await,
                }
            };
            answered += match p.timeout {
                Some(t) => tokio::time::timeout(t, tried).await.unwrap_or(0),
                None => tried.await,
            };
            drop((pending, requests));
            black_box(Duration::ZERO);
        }
        answered
    });
    black_box(answered);
    Ok(())
}
