//! The per-request cost of HTTP routing, for `bench/http.sh` (which runs it
//! under callgrind and compares it with a whole proxied request).
//!
//! `meshnode-route-bench MODE N`: MODE is `route` (what an upstream does for
//! every request: fetch the service's table, match a 100-rule document whose
//! last rule matches, apply the rule's header changes) or `none` (the table
//! lookup for a service without a routes document).
//! The 99 rules before the match mix the kinds a real document has: path
//! prefixes and regexes, methods, exact and regex header matches, queries.
// A measuring crate: it reads wall and virtual clocks itself (the
// disallowed-methods rule of clippy.toml is for the mesh's own code).
#![allow(clippy::disallowed_methods)]

use std::hint::black_box;

use anyhow::{bail, Context};
use hyper::header::{HeaderMap, HeaderValue};
use meshnode_node::policy::schema;
use meshnode_node::routes::{RequestView, Routes};

const RULES: usize = 100;

fn document() -> String {
    let mut doc = String::from("kind = \"routes\"\nname = \"api\"\n");
    for r in 0..RULES - 1 {
        let m = match r % 4 {
            0 => format!("path_prefix = \"/v{r}/\""),
            1 => format!("path_regex = \"/items/[0-9]+/r{r}\", method = \"POST\""),
            2 => format!("headers = {{ \"x-tenant\" = \"t{r}\" }}"),
            _ => format!(
                "headers = {{ \"user-agent\" = {{ regex = \"bot-{r}.*\" }} }}, query = {{ \"r\" = \"{r}\" }}"
            ),
        };
        doc.push_str(&format!(
            "[[route]]\nmatch = {{ {m} }}\nsplit = [{{ subset = \"version=v1\", weight = 100 }}]\n"
        ));
    }
    doc.push_str(
        "[[route]]\nmatch = { path_prefix = \"/\" }\nsplit = [{ subset = \"version=v1\", weight = 90 }, { subset = \"version=v2\", weight = 10 }]\nrequest_headers = { add = { \"x-routed\" = \"yes\" } }\n",
    );
    doc
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (mode, n) = match args.as_slice() {
        [_, mode, n] => (mode.as_str(), n.parse::<u64>().context("N")?),
        _ => bail!("usage: meshnode-route-bench route|none N"),
    };
    let doc = schema::parse(&document()).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let routes = Routes::from_documents([doc]);
    let mut headers = HeaderMap::new();
    headers.insert("user-agent", HeaderValue::from_static("curl/8.5.0"));
    headers.insert("x-tenant", HeaderValue::from_static("acme"));
    headers.insert("accept", HeaderValue::from_static("*/*"));
    let service = match mode {
        "route" => "api",
        "none" => "other",
        _ => bail!("usage: meshnode-route-bench route|none N"),
    };
    let mut picked = 0u64;
    // Rewritten in place, as the upstream does with the request's own headers.
    let mut h = headers.clone();
    for i in 0..n {
        let Some(table) = routes.table(black_box(service)) else {
            continue;
        };
        let view = RequestView {
            method: "GET",
            path: black_box("/orders/123"),
            query: Some("page=2"),
            headers: &headers,
        };
        if let Some(sel) = table.select(&view, (i % 100) as u32, 50.0) {
            picked += sel.rule as u64;
            let rule = sel.rule;
            table.rewrite(rule, &mut h);
            black_box(&h);
        }
    }
    black_box(picked);
    Ok(())
}
