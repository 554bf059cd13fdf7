//! Commands that talk to a running agent's admin API.

use anyhow::Context;
use meshnode_node::admin::client;
use serde_json::Value;

use super::AdminArgs;
use crate::output::{cell, table};
use crate::Failure;

/// The admin secret from `MESHNODE_ADMIN_SECRET`, for an agent whose admin
/// address is remote (`admin_allow_remote`): its reads need the secret.
pub(super) fn secret_from_env() -> Option<String> {
    std::env::var("MESHNODE_ADMIN_SECRET")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

pub(super) async fn get(a: &AdminArgs, path: &str) -> Result<Value, Failure> {
    let secret = secret_from_env();
    let body = client::get_with(a.admin, path, secret.as_deref())
        .await
        .map_err(Failure::runtime)?;
    serde_json::from_str(&body)
        .with_context(|| format!("the admin API answered {path} with invalid JSON"))
        .map_err(Failure::runtime)
}

pub(super) fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn field(v: &Value, k: &str) -> String {
    cell(v.get(k).unwrap_or(&Value::Null))
}

pub async fn members(a: &AdminArgs, wan: bool) -> Result<(), Failure> {
    let v = get(
        a,
        if wan {
            "/v1/members?pool=wan"
        } else {
            "/v1/members"
        },
    )
    .await?;
    if a.json {
        print_json(&v);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = v
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| {
                    let role = if m.get("gateway").and_then(Value::as_bool).unwrap_or(false) {
                        "gateway"
                    } else {
                        "node"
                    };
                    vec![
                        field(m, "node"),
                        field(m, "cluster"),
                        field(m, "addr"),
                        field(m, "state"),
                        role.into(),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    println!(
        "{}",
        table(&["NODE", "CLUSTER", "ADDRESS", "STATE", "ROLE"], &rows)
    );
    Ok(())
}

pub async fn services(a: &AdminArgs) -> Result<(), Failure> {
    let v = get(a, "/v1/services").await?;
    if a.json {
        print_json(&v);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = v
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(name, insts)| {
                    let list = insts.as_array().cloned().unwrap_or_default();
                    let (remote, local): (Vec<Value>, Vec<Value>) = list
                        .into_iter()
                        .partition(|i| i.get("remote").and_then(Value::as_bool) == Some(true));
                    let passing = local
                        .iter()
                        .filter(|i| i.get("health").and_then(Value::as_str) == Some("passing"))
                        .count();
                    let mut clusters: Vec<String> =
                        local.iter().map(|i| field(i, "cluster")).collect();
                    clusters.sort();
                    clusters.dedup();
                    for r in &remote {
                        let healthy = r.get("healthy").and_then(Value::as_u64).unwrap_or(0);
                        let state = if r.get("reachable").and_then(Value::as_bool) == Some(true) {
                            format!("{healthy} healthy")
                        } else {
                            "unreachable".to_string()
                        };
                        clusters.push(format!("{} ({state}, via gateway)", field(r, "cluster")));
                    }
                    vec![
                        name.clone(),
                        local.len().to_string(),
                        passing.to_string(),
                        clusters.join(", "),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    println!(
        "{}",
        table(&["SERVICE", "INSTANCES", "PASSING", "CLUSTERS"], &rows)
    );
    Ok(())
}

/// `explain --path/--method/--header`: an HTTP request to route.
pub struct RequestArgs {
    pub path: Option<String>,
    pub method: Option<String>,
    pub headers: Vec<String>,
}

/// Percent-encodes all but unreserved characters (RFC 3986).
fn percent(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub async fn explain(
    a: &AdminArgs,
    service: &str,
    from: Option<&str>,
    request: &RequestArgs,
) -> Result<(), Failure> {
    meshnode_transport::pki::check_name("service", service)
        .map_err(|e| Failure::usage(anyhow::anyhow!("{e}")))?;
    if let Some(f) = from {
        if !f.bytes().all(|b| b.is_ascii_graphic()) || f.contains(['&', '#', '?', '%']) {
            return Err(Failure::usage(anyhow::anyhow!(
                "--from {f:?}: give service:NAME, node:NAME, a SPIFFE ID or a name"
            )));
        }
    }
    let enc = |v: &str| v.replace(':', "%3A").replace('/', "%2F");
    let mut path = format!("/v1/explain?service={}", enc(service));
    if let Some(f) = from {
        path.push_str(&format!("&from={}", enc(f)));
    }
    for h in &request.headers {
        if !h.contains('=') {
            return Err(Failure::usage(anyhow::anyhow!(
                "--header {h:?}: give NAME=VALUE"
            )));
        }
        path.push_str(&format!("&header={}", percent(h)));
    }
    if let Some(p) = &request.path {
        if !p.starts_with('/') {
            return Err(Failure::usage(anyhow::anyhow!(
                "--path {p:?}: a path starts with '/'"
            )));
        }
        path.push_str(&format!("&path={}", percent(p)));
    }
    if let Some(m) = &request.method {
        path.push_str(&format!("&method={}", percent(&m.to_ascii_uppercase())));
    }
    let secret = secret_from_env();
    let body = client::get_with(a.admin, &path, secret.as_deref())
        .await
        .map_err(super::ca::admin_failure)?;
    let v: Value = serde_json::from_str(&body)
        .context("the admin API answered /v1/explain with invalid JSON")
        .map_err(Failure::runtime)?;
    if a.json {
        print_json(&v);
        return Ok(());
    }
    let auth = v.get("authorization").cloned().unwrap_or(Value::Null);
    let action = field(&auth, "action");
    let why = match auth.get("by").and_then(Value::as_str) {
        Some("rule") => format!(
            "intention {service}, rule {} (source {})",
            auth.get("index")
                .and_then(Value::as_u64)
                .map_or("?".into(), |i| (i + 1).to_string()),
            field(&auth, "source")
        ),
        Some("default") if auth.get("explicit").and_then(Value::as_bool) == Some(true) => {
            "no rule matches: the mesh default (defaults/mesh)".to_string()
        }
        Some("default") => {
            "no rule matches and no defaults document: allowed (the built-in default)".to_string()
        }
        Some("policy_pending") => {
            "policy not loaded yet on this node, and the mesh default is not an explicit allow"
                .to_string()
        }
        _ => "?".to_string(),
    };
    let from = v.get("from").cloned().unwrap_or(Value::Null);
    println!("{service}: {action} ({why})");
    println!(
        "  from {}{} ({})",
        field(&from, "identity"),
        from.get("service")
            .and_then(Value::as_str)
            .map(|s| format!(" as {s}"))
            .unwrap_or_default(),
        field(&from, "how"),
    );
    if from.get("certificate_allows").and_then(Value::as_bool) == Some(false) {
        println!("  warning: the caller's certificate does not name that service: the destination refuses it");
    }
    if v.get("policy_loaded").and_then(Value::as_bool) != Some(true) {
        println!("  warning: this node has not loaded the mesh's policy yet");
    }
    let rows: Vec<Vec<String>> = v
        .get("clusters")
        .and_then(Value::as_array)
        .map(|l| {
            l.iter()
                .map(|c| {
                    let mut inst = format!("{} healthy", field(c, "healthy"));
                    for k in ["critical", "ejected"] {
                        if c.get(k).and_then(Value::as_u64).unwrap_or(0) > 0 {
                            inst.push_str(&format!(", {} {k}", field(c, k)));
                        }
                    }
                    vec![
                        c.get("order")
                            .and_then(Value::as_u64)
                            .map_or("-".into(), |o| o.to_string()),
                        field(c, "cluster"),
                        inst,
                        field(c, "via"),
                        field(c, "why"),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    if rows.is_empty() {
        println!("no cluster has {service:?} in this node's catalog");
    } else {
        println!("clusters, in the order a new connection tries them:");
        println!(
            "{}",
            table(&["ORDER", "CLUSTER", "INSTANCES", "VIA", "WHY"], &rows)
        );
    }
    let attempts: Vec<String> = v
        .get("attempts")
        .and_then(Value::as_array)
        .map(|l| {
            l.iter()
                .map(|t| match t.get("kind").and_then(Value::as_str) {
                    Some("gateway") => format!(
                        "cluster {} via gateway {} ({})",
                        field(t, "cluster"),
                        field(t, "node"),
                        field(t, "addr")
                    ),
                    _ => format!(
                        "{} of cluster {} ({}, port {})",
                        field(t, "node"),
                        field(t, "cluster"),
                        field(t, "addr"),
                        field(t, "port")
                    ),
                })
                .collect()
        })
        .unwrap_or_default();
    match attempts.split_first() {
        None => println!("a new connection now: no instance to try"),
        Some((first, rest)) => {
            println!("a new connection now: {first}");
            for r in rest {
                println!("  then, if that fails: {r}");
            }
        }
    }
    if let Some(r) = v.get("resilience").filter(|r| !r.is_null()) {
        let mut settings = r.clone();
        let version = field(r, "version");
        if let Some(o) = settings.as_object_mut() {
            o.remove("version");
        }
        println!("resilience (version {version}): {settings}");
    }
    if let Some(r) = v.get("request").filter(|r| !r.is_null()) {
        println!(
            "HTTP request {} {}: {}",
            field(r, "method"),
            field(r, "path"),
            field(r, "note")
        );
        if let Some(route) = r.get("route").filter(|x| !x.is_null()) {
            println!("  rule: {route}");
        }
        for s in r
            .get("subsets")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let first = s
                .get("attempts")
                .and_then(Value::as_array)
                .and_then(|a| a.first())
                .map(|t| match t.get("kind").and_then(Value::as_str) {
                    Some("gateway") => format!(
                        "cluster {} via gateway {}",
                        field(t, "cluster"),
                        field(t, "node")
                    ),
                    _ => format!(
                        "{} of cluster {} (port {})",
                        field(t, "node"),
                        field(t, "cluster"),
                        field(t, "port")
                    ),
                })
                .unwrap_or_else(|| "no instance of this subset".to_string());
            println!(
                "  subset {} weight {}%: a request now goes to {first}",
                field(s, "subset"),
                field(s, "weight")
            );
        }
    }
    Ok(())
}

pub async fn endpoints(a: &AdminArgs, service: &str) -> Result<(), Failure> {
    let v = get(a, "/v1/services").await?;
    let Some(list) = v.get(service) else {
        return Err(Failure::runtime(anyhow::anyhow!(
            "no service {service:?} in the catalog (run `meshnode services` to list them)"
        )));
    };
    if a.json {
        print_json(list);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = list
        .as_array()
        .map(|l| {
            l.iter()
                .map(|i| {
                    if i.get("remote").and_then(Value::as_bool) == Some(true) {
                        let reachable = i.get("reachable").and_then(Value::as_bool) == Some(true);
                        return vec![
                            format!("via {}", field(i, "via")),
                            field(i, "cluster"),
                            format!("gateways {}", field(i, "gateways")),
                            format!("{} healthy", field(i, "healthy")),
                            field(i, "tags"),
                            if reachable {
                                field(i, "health")
                            } else {
                                "unreachable".into()
                            },
                        ];
                    }
                    vec![
                        field(i, "node"),
                        field(i, "cluster"),
                        field(i, "node_addr"),
                        format!("{}:{}", field(i, "addr"), field(i, "port")),
                        field(i, "tags"),
                        field(i, "health"),
                        i.pointer("/check/output")
                            .and_then(Value::as_str)
                            .map(|o| {
                                let o: String = o.chars().take(60).collect();
                                o
                            })
                            .unwrap_or_default(),
                        i.pointer("/check/since")
                            .and_then(Value::as_i64)
                            .map(|t| {
                                let ago = (meshnode_transport::pki::unix_now() - t).max(0) as u64;
                                format!(
                                    "{} ago",
                                    crate::output::duration(std::time::Duration::from_secs(ago))
                                )
                            })
                            .unwrap_or_default(),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    println!(
        "{}",
        table(
            &[
                "NODE",
                "CLUSTER",
                "NODE ADDRESS",
                "INSTANCE",
                "TAGS",
                "HEALTH",
                "CHECK",
                "SINCE"
            ],
            &rows
        )
    );
    Ok(())
}

/// Exit code of `status --check` when the node reports warnings.
pub const EXIT_WARNINGS: u8 = 2;

pub async fn status(a: &AdminArgs, check: bool) -> Result<(), Failure> {
    let v = get(a, "/v1/status").await?;
    let warnings = v
        .get("warnings")
        .and_then(Value::as_array)
        .map(Vec::len)
        .unwrap_or(0);
    let verdict = || {
        if check && warnings > 0 {
            Err(Failure {
                code: EXIT_WARNINGS,
                error: Some(anyhow::anyhow!("{warnings} warning(s) (status --check)")),
            })
        } else {
            Ok(())
        }
    };
    if a.json {
        print_json(&v);
        return verdict();
    }
    let lan = v.pointer("/pools/lan").cloned().unwrap_or(Value::Null);
    let expires = v
        .get("cert_expires_in_seconds")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let rows = vec![
        vec!["identity".into(), field(&v, "identity")],
        vec!["role".into(), {
            let flag = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(false);
            let role = if flag("gateway") { "gateway" } else { "node" };
            if flag("ca") {
                format!("{role}, CA (signs joins and renewals)")
            } else {
                role.to_string()
            }
        }],
        vec!["revocations".into(), field(&v, "revocations")],
        vec!["policy".into(), {
            let n = v
                .pointer("/policy/documents")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            if v.pointer("/policy/loaded").and_then(Value::as_bool) == Some(true) {
                format!("{n} document(s), loaded")
            } else {
                format!("{n} document(s), NOT YET LOADED (no full state exchange yet)")
            }
        }],
        vec![
            "cert expires in".into(),
            crate::output::duration(std::time::Duration::from_secs(expires.max(0) as u64)),
        ],
        vec![
            "CA expires in".into(),
            match v.get("ca_expires_in_seconds").and_then(Value::as_i64) {
                Some(s) => crate::output::duration(std::time::Duration::from_secs(s.max(0) as u64)),
                None => "unknown".into(),
            },
        ],
        vec![
            "lan pool".into(),
            format!(
                "{} alive, {} dead, {} left",
                field(&lan, "alive"),
                field(&lan, "dead"),
                field(&lan, "left")
            ),
        ],
        vec![
            "wan pool".into(),
            match v.pointer("/pools/wan") {
                Some(wan) => format!(
                    "{} alive, {} dead, {} left",
                    field(wan, "alive"),
                    field(wan, "dead"),
                    field(wan, "left")
                ),
                None => "not a gateway".into(),
            },
        ],
        vec!["local services".into(), field(&v, "local_services")],
        vec![
            "catalog".into(),
            format!(
                "{} services, {} instances",
                field(&v, "catalog_services"),
                field(&v, "catalog_instances")
            ),
        ],
        vec!["upstreams".into(), field(&v, "upstreams")],
        vec!["active streams".into(), field(&v, "active_streams")],
    ];
    println!("{}", table(&["KEY", "VALUE"], &rows));
    for w in v
        .get("warnings")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        println!("warning: {}", cell(w));
    }
    verdict()
}

pub async fn leave(a: &AdminArgs, data_dir: &std::path::Path) -> Result<(), Failure> {
    let secret = super::ca::admin_secret(data_dir)?;
    let answer = client::post(a.admin, "/v1/leave", &secret)
        .await
        .map_err(Failure::runtime)?;
    if a.json {
        println!("{}", answer.trim());
    } else {
        println!("leaving: the node withdraws its instances now, drains open streams and exits");
    }
    Ok(())
}

/// `meshnode reload`: the agent re-reads its config file. A refused config
/// exits 64 with the agent's reasons; the running config stays.
pub async fn reload(a: &AdminArgs, data_dir: &std::path::Path) -> Result<(), Failure> {
    let secret = super::ca::admin_secret(data_dir)?;
    let answer = match client::post(a.admin, "/v1/reload", &secret).await {
        Ok(body) => body,
        Err(client::ClientError::Status {
            status: 422, body, ..
        }) => {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let msg = v["error"].as_str().unwrap_or(body.as_str()).to_string();
            return Err(Failure::usage(anyhow::anyhow!(msg)));
        }
        Err(e) => return Err(Failure::runtime(e)),
    };
    if a.json {
        println!("{}", answer.trim());
        return Ok(());
    }
    let r: serde_json::Value = serde_json::from_str(&answer)
        .map_err(|e| Failure::runtime(anyhow::anyhow!("unexpected answer from the agent: {e}")))?;
    let list = |v: &serde_json::Value| {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    };
    let applied = list(&r["applied"]);
    println!(
        "reloaded {}: {} ({} service instance(s), {} upstream(s))",
        r["config"].as_str().unwrap_or("the config"),
        if applied.is_empty() {
            "nothing changed".to_string()
        } else {
            format!("applied {applied}")
        },
        r["services"],
        r["upstream_count"]
    );
    for u in r["upstreams"].as_array().into_iter().flatten() {
        println!(
            "  upstream {} {}",
            u["listen"].as_str().unwrap_or("?"),
            u["change"].as_str().unwrap_or("?")
        );
    }
    for k in r["kept"].as_array().into_iter().flatten() {
        println!(
            "  kept {}: {} (the running value stays)",
            k["key"].as_str().unwrap_or("?"),
            k["reason"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}
