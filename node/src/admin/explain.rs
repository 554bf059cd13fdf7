//! `GET /v1/explain?service=S[&from=X]`: for a new connection from this node
//! (or from the named source) to `S`: the authorization decision and the
//! rule that made it, the clusters in the order they are tried and why, and
//! the instance a new connection would pick.

use meshnode_gossip::signed::{decode_cert, CERT_KEY};
use meshnode_transport::pki::check_name;
use meshnode_transport::{Identity, PeerCert};
use serde::Serialize;

use super::AdminState;
use crate::authz::{Caller, Decision};
use crate::config::UpstreamConfig;
use crate::upstream::Target;

/// The caller an explanation is for.
#[derive(Debug, Serialize)]
pub struct Source {
    pub identity: Identity,
    /// The service it acts as (none: the node alone).
    pub service: Option<String>,
    /// How the source was found.
    pub how: String,
    /// Whether the caller's certificate names `service` (unknown: `None`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate_allows: Option<bool>,
}

#[derive(Debug, Serialize)]
pub struct Attempt {
    /// `instance`, or `gateway` for another cluster through a local gateway.
    pub kind: &'static str,
    pub node: String,
    pub cluster: String,
    pub addr: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

#[derive(Debug, Serialize)]
pub struct Authorization {
    #[serde(flatten)]
    pub decision: Decision,
    /// The deciding rule's source, as written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Explanation {
    pub service: String,
    pub from: Source,
    /// This node's copy of the mesh policy decides the same as the
    /// destination's once both have loaded it.
    pub policy_loaded: bool,
    pub authorization: Authorization,
    /// The upstream of this node for the service, if it has one (its
    /// failover order or cluster pin apply).
    pub upstream: Option<String>,
    pub clusters: Vec<crate::explain::ClusterRow>,
    /// What a new connection would try, in order (the first is the pick).
    pub attempts: Vec<Attempt>,
    /// For an HTTP request (`path`, `method`, `header` given): its route.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request: Option<RequestRoute>,
    /// The service's `resilience` document, if this node holds one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resilience: Option<ResilienceView>,
}

/// A `resilience` document as this node applies it.
#[derive(Debug, Serialize)]
pub struct ResilienceView {
    pub version: u64,
    #[serde(flatten)]
    pub settings: crate::policy::schema::Resilience,
}

/// Parses `key=value&...`; values are percent-decoded (`%XX`), and one
/// that does not decode to UTF-8 is absent.
fn param<'a>(query: &'a str, key: &'a str) -> Option<std::borrow::Cow<'a, str>> {
    params(query, key).next()
}

/// Every value of `key`, in order.
fn params<'a>(query: &'a str, key: &'a str) -> impl Iterator<Item = std::borrow::Cow<'a, str>> {
    query.split('&').filter_map(move |kv| {
        let (k, v) = kv.split_once('=')?;
        if k != key {
            return None;
        }
        if !v.contains('%') {
            return Some(std::borrow::Cow::Borrowed(v));
        }
        let b = v.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            match (
                b[i],
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) {
                (b'%', Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                }
                (c, _, _) => {
                    out.push(c);
                    i += 1;
                }
            }
        }
        String::from_utf8(out).ok().map(std::borrow::Cow::Owned)
    })
}

/// Where one HTTP request would go (`explain --path/--method/--header`).
#[derive(Debug, Serialize)]
pub struct RequestRoute {
    pub method: String,
    pub path: String,
    /// The rule of the service's routes document that matches (0-based),
    /// and the rule as written.
    pub rule: Option<usize>,
    pub route: Option<crate::policy::schema::Route>,
    /// Why the request goes where it goes, in words.
    pub note: String,
    /// Each subset the rule splits to, its weight, and what a request
    /// sent there would try.
    pub subsets: Vec<SubsetRoute>,
}

#[derive(Debug, Serialize)]
pub struct SubsetRoute {
    pub subset: crate::routes::Subset,
    pub weight: u32,
    pub attempts: Vec<Attempt>,
}

fn attempts(targets: Vec<Target>) -> Vec<Attempt> {
    targets
        .into_iter()
        .map(|t| match t {
            Target::Local(i) => Attempt {
                kind: "instance",
                node: i.node,
                cluster: i.cluster,
                addr: i.node_addr.to_string(),
                port: Some(i.port),
            },
            Target::Remote(r) => Attempt {
                kind: "gateway",
                node: r.via,
                cluster: r.cluster,
                addr: r.via_addr.to_string(),
                port: None,
            },
        })
        .collect()
}

/// The `path` parameter (a path with an optional query) with its path in
/// the canonical form requests get ([`crate::uri_path`]), or why a
/// request with it would be refused.
fn canonical_target(query: &str) -> Result<Option<String>, String> {
    let Some(target) = param(query, "path") else {
        return Ok(None);
    };
    if target.chars().any(|c| c.is_control() || c == ' ') {
        return Err(format!(
            "path {target:?}: starts with '/' and has no spaces"
        ));
    }
    let (path, q) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target.as_ref(), None),
    };
    let path = crate::uri_path::normalize(path).map_err(|e| {
        format!("path {target:?}: a request with it is refused (400 bad_path): {e}")
    })?;
    Ok(Some(match q {
        Some(q) => format!("{path}?{q}"),
        None => path.into_owned(),
    }))
}

/// The route an HTTP request to `up` takes, from the query's `method`,
/// `path` and `header=K=V` parameters; `None` when none is given.
fn request_route(
    s: &AdminState,
    up: &UpstreamConfig,
    query: &str,
    path: Option<&str>,
) -> Result<Option<RequestRoute>, String> {
    use hyper::header::{HeaderMap, HeaderName, HeaderValue};
    let method = param(query, "method");
    let headers: Vec<_> = params(query, "header").collect();
    if method.is_none() && path.is_none() && headers.is_empty() {
        return Ok(None);
    }
    let method = method
        .map(|m| m.to_string())
        .unwrap_or_else(|| "GET".into());
    if !method.bytes().all(|b| b.is_ascii_uppercase()) || method.is_empty() || method.len() > 32 {
        return Err(format!(
            "method {method:?}: an HTTP method in upper case, e.g. GET"
        ));
    }
    let target = path.unwrap_or("/").to_string();
    let mut map = HeaderMap::new();
    for h in &headers {
        let (k, v) = h
            .split_once('=')
            .ok_or_else(|| format!("header {h:?}: give NAME=VALUE"))?;
        let name = HeaderName::from_bytes(k.trim().to_ascii_lowercase().as_bytes())
            .map_err(|_| format!("header {k:?}: not an HTTP header name"))?;
        let value = HeaderValue::from_str(v.trim())
            .map_err(|_| format!("header {k}: not a valid value"))?;
        map.append(name, value);
    }
    let (path, q) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target.as_str(), None),
    };
    let view = crate::routes::RequestView {
        method: &method,
        path,
        query: q,
        headers: &map,
    };
    let table = s.dialer.routes().table(&up.service);
    let (rule, route, note, split) = match table.as_ref().and_then(|t| t.matching(&view)) {
        Some((i, r)) => (
            Some(i),
            Some(r.clone()),
            format!("rule {} of routes/{} matches", i + 1, up.service),
            r.split
                .iter()
                .map(|x| (crate::routes::Subset::parse(&x.subset), x.weight))
                .collect(),
        ),
        None => (
            None,
            None,
            match table {
                Some(_) => format!("no rule of routes/{} matches: any instance", up.service),
                None => format!("no routes document for {}: any instance", up.service),
            },
            vec![(crate::routes::Subset::Any, 100)],
        ),
    };
    let subsets = split
        .into_iter()
        .map(|(subset, weight)| SubsetRoute {
            attempts: attempts(s.dialer.plan_subset(up, &subset)),
            subset,
            weight,
        })
        .collect();
    Ok(Some(RequestRoute {
        method,
        path: target,
        rule,
        route,
        note,
        subsets,
    }))
}

pub(super) async fn explain(s: &AdminState, query: &str) -> Result<Explanation, String> {
    let service = param(query, "service").ok_or("give ?service=NAME")?;
    check_name("service", &service).map_err(|e| e.to_string())?;
    let me = s.tls.me();
    let upstreams = s.reloader.upstreams();
    let upstream = upstreams.iter().find(|u| u.service == *service);
    let up = match upstream {
        Some(u) => u.clone(),
        None => UpstreamConfig {
            service: service.to_string(),
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            failover: Vec::new(),
            cluster: None,
            as_service: None,
            protocol: None,
        },
    };
    let from = match param(query, "from") {
        None => {
            let service = up
                .as_service
                .clone()
                .or_else(|| match me.services.as_slice() {
                    [only] => Some(only.clone()),
                    _ => None,
                });
            Source {
                certificate_allows: service.as_deref().map(|s| me.may_act_as(s)),
                identity: me.identity.clone(),
                how: match upstream {
                    Some(_) => "this node, as its upstream acts".to_string(),
                    None => "this node (it has no upstream for the service)".to_string(),
                },
                service,
            }
        }
        Some(from) => resolve(s, &me, &from).await?,
    };
    let loaded = s.policy.loaded();
    let snapshot = s.authz.snapshot();
    // With --method or --path, the decision for that request (L7 rules);
    // else for a stream, HTTP when the service is. The path as the data
    // path sees it: in its canonical form.
    let (method, path) = (param(query, "method"), canonical_target(query)?);
    let path_only = path.as_deref().map(|p| p.split('?').next().unwrap_or(p));
    let request = if method.is_some() || path.is_some() {
        crate::authz::Request::Http {
            method: method.as_deref().unwrap_or("GET"),
            path: path_only.unwrap_or("/"),
        }
    } else if s.dialer.is_http(&up) {
        crate::authz::Request::HttpStream
    } else {
        crate::authz::Request::Stream
    };
    let decision = snapshot.decide_for(
        &service,
        Caller {
            identity: &from.identity,
            service: from.service.as_deref(),
        },
        loaded,
        request,
    );
    let source = match decision.reason {
        crate::authz::Reason::Rule { index } => snapshot.rule_source(&service, index),
        _ => None,
    };
    let authorization = Authorization { decision, source };
    let request = request_route(s, &up, query, path.as_deref())?;
    let attempts = attempts(s.dialer.plan(&up));
    // As the data path holds it (it follows the store a moment later).
    let resilience = s.dialer.resilience(&service).map(|p| ResilienceView {
        version: p.version,
        settings: p.settings.clone(),
    });
    Ok(Explanation {
        resilience,
        request,
        service: service.to_string(),
        from,
        policy_loaded: loaded,
        authorization,
        upstream: upstream.map(|u| u.listen.to_string()),
        clusters: s.dialer.explain(&up),
        attempts,
    })
}

/// `--from`: `service:NAME`, `node:NAME`, a SPIFFE ID, or a bare name (a
/// node of this cluster's pool if one has it, else a service).
async fn resolve(s: &AdminState, me: &PeerCert, from: &str) -> Result<Source, String> {
    if from.starts_with("spiffe://") {
        let identity: Identity = from.parse().map_err(|e| format!("from: {e}"))?;
        return Ok(Source {
            identity,
            service: None,
            how: "the SPIFFE ID given, acting as no service".to_string(),
            certificate_allows: None,
        });
    }
    let (kind, name) = match from.split_once(':') {
        Some((k @ ("service" | "node"), n)) => (Some(k), n),
        Some(_) => {
            return Err(format!(
                "from: {from:?} is not service:NAME, node:NAME, a SPIFFE ID or a name"
            ))
        }
        None => (None, from),
    };
    check_name("from", name).map_err(|e| e.to_string())?;
    if kind != Some("service") {
        let member = s
            .gossip
            .snapshot()
            .await
            .into_iter()
            .filter_map(|n| n.kvs.get(CERT_KEY).and_then(|c| decode_cert(c)))
            .filter_map(|der| PeerCert::from_der(&der).ok())
            .find(|p| p.identity.node() == name);
        match member {
            Some(p) => {
                let service = match p.services.as_slice() {
                    [only] => Some(only.clone()),
                    _ => None,
                };
                return Ok(Source {
                    identity: p.identity.clone(),
                    how: format!(
                        "node {name} of this cluster's pool, acting as {} (its upstreams may say otherwise)",
                        match &service {
                            Some(s) => format!("its certificate's only service {s}"),
                            None => "no service (its certificate names none or several)".into(),
                        }
                    ),
                    certificate_allows: service.as_ref().map(|_| true),
                    service,
                });
            }
            None if kind == Some("node") => {
                return Err(format!("from: no node {name:?} in this cluster's pool"))
            }
            None => {}
        }
    }
    Ok(Source {
        identity: me.identity.clone(),
        service: Some(name.to_string()),
        how: format!("this node acting as service {name}"),
        certificate_allows: Some(me.may_act_as(name)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_may_escape_colons_and_slashes() {
        let q = "service=api&from=spiffe%3A%2F%2Facme%2Fcluster%2Feast%2Fnode%2Fa";
        assert_eq!(param(q, "service").as_deref(), Some("api"));
        assert_eq!(
            param(q, "from").as_deref(),
            Some("spiffe://acme/cluster/east/node/a")
        );
        assert_eq!(param("service=api", "from"), None);
        let q = "path=%2Fv2%3Fa%3D1&header=x-canary%3D1&header=x-b%3D2&bad=%FF";
        assert_eq!(param(q, "path").as_deref(), Some("/v2?a=1"));
        let h: Vec<_> = params(q, "header").collect();
        assert_eq!(h, ["x-canary=1", "x-b=2"]);
        assert_eq!(param(q, "bad"), None, "not UTF-8");
    }
}
