//! The per-request cost of telemetry, for `bench/http.sh` (which runs it
//! under callgrind and compares it with a whole proxied request).
//!
//! `meshnode-telemetry-bench MODE N`: MODE is `record` (what both ends of
//! an HTTP request add: at the caller, the pair's lookup by destination
//! service, cluster and `as`; the result read from the response's
//! headers; the record (counters, bucket, histogram); the access log's
//! sampler at the default `sampled` with the rate spent; at the
//! destination, the record and the sampler again, its pair resolved once
//! per stream as there) or `none` (the same loop without them). A real
//! Prometheus recorder is installed, as in `meshnode run`.
// A measuring crate: it reads clocks itself.
#![allow(clippy::disallowed_methods)]

use std::hint::black_box;
use std::time::Duration;

use anyhow::{bail, Context};
use hyper::header::{HeaderMap, HeaderValue};
use meshnode_node::telemetry::{AccessMode, Kind, Telemetry};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (mode, n) = match args.as_slice() {
        [_, mode, n] => (mode.as_str(), n.parse::<u64>().context("N")?),
        _ => bail!("usage: meshnode-telemetry-bench record|none N"),
    };
    let record = match mode {
        "record" => true,
        "none" => false,
        _ => bail!("usage: meshnode-telemetry-bench record|none N"),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    let _guard = rt.enter();
    meshnode_node::metrics::install("bench").map_err(anyhow::Error::msg)?;
    let caller = Telemetry::new("web-1", "east", AccessMode::Sampled, 100);
    let callee = Telemetry::new("api-1", "east", AccessMode::Sampled, 100);
    // Other services and clusters the caller sends to, so the lookup is
    // not the only entry.
    for s in ["db", "cache", "search"] {
        for c in ["east", "west"] {
            caller.out_pair(Kind::Http, Some("web"), s, c);
        }
    }
    let stream_pair = callee.in_pair(Kind::Http, (Some("web"), "east"), "api");
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("text/plain"));
    headers.insert("content-length", HeaderValue::from_static("64"));
    let mut errors = 0u64;
    for i in 0..n {
        let took = Duration::from_micros(200 + (i % 1000));
        if !record {
            black_box(took);
            continue;
        }
        let error = black_box(&headers).contains_key("x-meshnode-error")
            || black_box(&headers).contains_key("x-meshnode-fault");
        let result = if error { "other" } else { "2xx" };
        caller
            .out_pair(
                Kind::Http,
                black_box(Some("web")),
                black_box("api"),
                black_box("east"),
            )
            .record(result, error, took, None);
        caller.access.log(error, line);
        stream_pair.record(result, error, took, None);
        callee.access.log(error, line);
        errors += u64::from(error);
    }
    black_box(errors);
    Ok(())
}

/// A line the sampler admits (the first second's burst of 100): built as
/// the data path builds it.
fn line() -> meshnode_node::telemetry::Access {
    meshnode_node::telemetry::Access {
        direction: "out",
        kind: "http",
        service: "api".into(),
        ..Default::default()
    }
}
