//! The per-stream cost of authorization, for `bench/authz.sh` (which runs it
//! under callgrind and reports instructions per decision).
//!
//! `meshnode-authz-bench MODE N`: MODE is `authz` (what the destination does
//! for every stream: fetch the current snapshot, decide, count the decision
//! in the Prometheus recorder), `decide` (the same without the counter), or
//! `header` (decoding a tunnel header, the per-stream work that was there
//! before: the baseline of the same run).
//! The policy is sized like a large mesh: 500 services with 10 rules each,
//! default deny, and the caller matches the last rule of its destination.
// A measuring crate: it reads wall and virtual clocks itself (the
// disallowed-methods rule of clippy.toml is for the mesh's own code).
#![allow(clippy::disallowed_methods)]

use std::hint::black_box;
use std::time::Instant;

use anyhow::{bail, Context};
use meshnode_node::authz::{self, Authorizer, Caller, Snapshot};
use meshnode_node::policy::schema;
use meshnode_transport::tunnel::{decode_frame, encode_header, Header};
use meshnode_transport::Identity;

const SERVICES: usize = 500;
const RULES: usize = 10;

fn intentions(service: usize) -> String {
    let mut doc = format!("kind = \"intentions\"\nname = \"svc-{service}\"\n");
    for r in 0..RULES - 1 {
        let source = match r % 3 {
            0 => format!("service:caller-{r}"),
            1 => format!("cluster:zone-{r}"),
            _ => format!("spiffe://acme/cluster/zone-{r}/node/vm-{r}*"),
        };
        doc.push_str(&format!(
            "[[rule]]\nsource = \"{source}\"\naction = \"deny\"\n"
        ));
    }
    doc.push_str("[[rule]]\nsource = \"service:web\"\naction = \"allow\"\n");
    doc
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (mode, n) = match args.as_slice() {
        [_, mode, n] => (mode.as_str(), n.parse::<u64>().context("N")?),
        _ => bail!("usage: meshnode-authz-bench authz|decide|header N"),
    };
    // The recorder's upkeep task needs a runtime; the loop below runs on this thread.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let _guard = rt.enter();
    let _metrics = meshnode_node::metrics::install("bench").map_err(anyhow::Error::msg)?;
    let mut docs = Vec::new();
    for s in 0..SERVICES {
        docs.push(schema::parse(&intentions(s)).map_err(|e| anyhow::anyhow!("{e:?}"))?);
    }
    docs.push(
        schema::parse("kind = \"defaults\"\nname = \"mesh\"\ndefault_intention = \"deny\"\n")
            .map_err(|e| anyhow::anyhow!("{e:?}"))?,
    );
    let authorizer = Authorizer::fixed(Snapshot::from_documents(docs));
    let caller = Identity::new("acme", "east", "web-1")?;
    let service = "svc-250";
    let frame = encode_header(&Header::new(service, 8080))?;
    let started = Instant::now();
    match mode {
        "authz" => {
            for _ in 0..n {
                let snapshot = authorizer.snapshot();
                let d = snapshot.decide(
                    black_box(service),
                    Caller {
                        identity: &caller,
                        service: Some(black_box("web")),
                    },
                    true,
                );
                authz::count(service, &d);
                black_box(d);
            }
        }
        "decide" => {
            for _ in 0..n {
                let snapshot = authorizer.snapshot();
                black_box(snapshot.decide(
                    black_box(service),
                    Caller {
                        identity: &caller,
                        service: Some(black_box("web")),
                    },
                    true,
                ));
            }
        }
        "header" => {
            for _ in 0..n {
                black_box(decode_frame(black_box(&frame))?);
            }
        }
        other => bail!("unknown mode {other:?}"),
    }
    let per = started.elapsed().as_nanos() as f64 / n.max(1) as f64;
    eprintln!("{mode}: {n} iterations, {per:.0} ns each (wall clock)");
    Ok(())
}
