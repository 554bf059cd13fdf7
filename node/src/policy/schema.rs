//! The schema of policy documents: one TOML file per `(kind, name)`.
//! Every kind is validated here, whether or not the agent acts on it yet;
//! unknown keys are errors that name the key, as in the config.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{parse_toml, ConfigError};

/// `name` of the `defaults` document.
pub const DEFAULTS_NAME: &str = "mesh";
/// Retry conditions a `resilience` document may name.
pub const RETRY_ON: [&str; 5] = [
    "connect-failure",
    "refused-stream",
    "reset",
    "5xx",
    "gateway-error",
];

/// A validated document.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Document {
    pub kind: String,
    pub name: String,
    #[serde(flatten)]
    pub body: Body,
}

// A document's body is built once per adopted document and held once per
// kind and name: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Body {
    Intentions { rule: Vec<Rule> },
    Routes { route: Vec<Route> },
    Resilience(Resilience),
    Defaults { default_intention: Action },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

/// Who a rule is about.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub enum Source {
    Any,
    Service(String),
    Cluster(String),
    /// A node SPIFFE ID pattern: the cluster and node segments are names,
    /// `*`, or a prefix followed by `*` (`vm-*`).
    Spiffe {
        mesh: String,
        cluster: Pattern,
        node: Pattern,
    },
}

/// One segment of a SPIFFE ID pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern {
    /// The name, or the part before the `*`.
    pub prefix: String,
    /// Ends in `*`: any name starting with `prefix`.
    pub wildcard: bool,
}

impl Pattern {
    pub fn any() -> Self {
        Pattern {
            prefix: String::new(),
            wildcard: true,
        }
    }

    pub fn exact(name: &str) -> Self {
        Pattern {
            prefix: name.to_string(),
            wildcard: false,
        }
    }

    pub fn matches(&self, name: &str) -> bool {
        if self.wildcard {
            name.starts_with(&self.prefix)
        } else {
            name == self.prefix
        }
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.prefix)?;
        if self.wildcard {
            f.write_str("*")?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rule {
    pub source: Source,
    pub action: Action,
    /// HTTP conditions: the rule matches only requests that meet them.
    #[serde(flatten)]
    pub http: HttpCondition,
}

/// An intention rule's conditions on an HTTP request (L7): every one given
/// must hold. Empty: the rule is about the caller alone.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HttpCondition {
    /// Upper-case method names, one of which the request's must be.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_exact: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
}

impl HttpCondition {
    pub fn is_empty(&self) -> bool {
        self.methods.is_none() && self.path_exact.is_none() && self.path_prefix.is_none()
    }

    /// Whether a request with `method` and `path` meets every condition.
    pub fn holds(&self, method: &str, path: &str) -> bool {
        self.methods
            .as_ref()
            .is_none_or(|m| m.iter().any(|x| x == method))
            && self.path_exact.as_ref().is_none_or(|p| p == path)
            && self
                .path_prefix
                .as_ref()
                .is_none_or(|p| path.starts_with(p.as_str()))
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Match {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_exact: Option<String>,
    /// A regular expression (Rust `regex` syntax) the whole path must match.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_regex: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, ValueMatch>,
    /// Query parameters, by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub query: BTreeMap<String, ValueMatch>,
}

/// How a header or query parameter must look: a string is an exact value,
/// a table `{ regex = "..." }` a regular expression the whole value must
/// match, `{ present = true | false }` only whether it is there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ValueMatch {
    Exact(String),
    Regex(String),
    Present(bool),
}

impl Serialize for ValueMatch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self {
            ValueMatch::Exact(v) => s.serialize_str(v),
            ValueMatch::Regex(r) => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("regex", r)?;
                m.end()
            }
            ValueMatch::Present(p) => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("present", p)?;
                m.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for ValueMatch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = ValueMatch;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "a string (the exact value) or one of { regex = \"...\" }, { present = true }",
                )
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ValueMatch, E> {
                Ok(ValueMatch::Exact(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<ValueMatch, A::Error> {
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct R {
                    exact: Option<String>,
                    regex: Option<String>,
                    present: Option<bool>,
                }
                let r = R::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                match (r.exact, r.regex, r.present) {
                    (Some(e), None, None) => Ok(ValueMatch::Exact(e)),
                    (None, Some(re), None) => Ok(ValueMatch::Regex(re)),
                    (None, None, Some(p)) => Ok(ValueMatch::Present(p)),
                    _ => Err(serde::de::Error::custom(
                        "exactly one of exact, regex, present",
                    )),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// Header changes a route makes to the requests it sends.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderOps {
    /// Set (replacing any value the request had).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub add: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

/// A copy of a share of the requests, sent to another subset; its
/// responses are dropped.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mirror {
    pub subset: String,
    pub percent: f64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    /// `key=value` (a service tag of that form), a plain tag, or `*`.
    pub subset: String,
    pub weight: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Route {
    #[serde(rename = "match")]
    pub matches: Match,
    pub split: Vec<Split>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<HeaderOps>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,
    /// The route's own `timeout`, `idle_timeout` and `retries`: they take
    /// the place of the service's resilience document's for its requests.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "ser_duration_opt"
    )]
    pub timeout: Option<Duration>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "ser_duration_opt"
    )]
    pub idle_timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Resilience {
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "ser_duration_opt"
    )]
    pub timeout: Option<Duration>,
    /// A response body that brings nothing for this long is cut.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "ser_duration_opt"
    )]
    pub idle_timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Retries {
    pub attempts: u32,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "ser_duration_opt"
    )]
    pub per_try_timeout: Option<Duration>,
    pub on: Vec<String>,
    /// Retries may add at most this fraction of the requests.
    pub budget: f64,
    /// Methods retried besides the idempotent ones (GET, HEAD, OPTIONS,
    /// PUT, DELETE, TRACE): the service says a POST may go twice.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreaker {
    /// Requests waiting for their response head.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_pending: Option<u32>,
    /// Requests in flight, until their response body ends.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    /// Tunnel streams open to the service's instances, idle ones included.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Retries in flight at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RateLimit {
    pub rps: f64,
    pub burst: u32,
    /// One bucket per caller identity (node, and the service it acts as)
    /// at each instance, instead of one per instance.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub per_source: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Fault {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abort: Option<Abort>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delay: Option<Delay>,
    /// Only requests carrying this header (any value) get faults.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Abort {
    pub status: u16,
    pub percent: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Delay {
    #[serde(serialize_with = "ser_duration")]
    pub duration: Duration,
    pub percent: f64,
}

fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_duration(*d))
}

fn ser_duration_opt<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => ser_duration(d, s),
        None => s.serialize_none(),
    }
}

impl From<Source> for String {
    fn from(s: Source) -> String {
        match s {
            Source::Any => "*".into(),
            Source::Service(n) => format!("service:{n}"),
            Source::Cluster(c) => format!("cluster:{c}"),
            Source::Spiffe {
                mesh,
                cluster,
                node,
            } => format!("spiffe://{mesh}/cluster/{cluster}/node/{node}"),
        }
    }
}

// What the TOML may hold, for every kind at once; `validate` checks which
// keys belong to the document's kind.
#[derive(Deserialize)]
struct Raw {
    kind: Option<String>,
    name: Option<String>,
    rule: Option<Vec<RawRule>>,
    route: Option<Vec<RawRoute>>,
    timeout: Option<String>,
    idle_timeout: Option<String>,
    retries: Option<RawRetries>,
    circuit_breaker: Option<CircuitBreaker>,
    rate_limit: Option<RawRateLimit>,
    fault: Option<RawFault>,
    default_intention: Option<Action>,
}

#[derive(Deserialize)]
struct RawRule {
    source: String,
    action: Action,
    methods: Option<Vec<String>>,
    path_exact: Option<String>,
    path_prefix: Option<String>,
}

#[derive(Deserialize)]
struct RawRoute {
    #[serde(rename = "match", default)]
    matches: Match,
    split: Vec<Split>,
    request_headers: Option<HeaderOps>,
    mirror: Option<Mirror>,
    timeout: Option<String>,
    idle_timeout: Option<String>,
    retries: Option<RawRetries>,
}

#[derive(Deserialize)]
struct RawRetries {
    attempts: u32,
    per_try_timeout: Option<String>,
    #[serde(default)]
    on: Vec<String>,
    budget: Option<f64>,
    #[serde(default)]
    methods: Vec<String>,
}

#[derive(Deserialize)]
struct RawRateLimit {
    rps: f64,
    burst: Option<u32>,
    #[serde(default)]
    per_source: bool,
}

#[derive(Deserialize)]
struct RawFault {
    abort: Option<Abort>,
    delay: Option<RawDelay>,
    header: Option<String>,
}

#[derive(Deserialize)]
struct RawDelay {
    duration: String,
    percent: f64,
}

impl<'de> Deserialize<'de> for Abort {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct A {
            status: u16,
            percent: f64,
        }
        let a = A::deserialize(d)?;
        Ok(Abort {
            status: a.status,
            percent: a.percent,
        })
    }
}

#[derive(Default)]
struct Errors(Vec<ConfigError>);

impl Errors {
    fn push(&mut self, key: impl Into<String>, msg: impl Into<String>) {
        self.0.push(ConfigError::new(key, msg));
    }
}

/// Parses and validates a document; every problem found is returned.
pub fn parse(text: &str) -> Result<Document, Vec<ConfigError>> {
    let raw: Raw = parse_toml(text)?;
    let mut e = Errors::default();
    let kind = raw.kind.clone().unwrap_or_default();
    let name = raw.name.clone().unwrap_or_default();
    if raw.kind.is_none() {
        e.push(
            "kind",
            "missing: one of intentions, routes, resilience, defaults",
        );
    }
    if raw.name.is_none() {
        e.push(
            "name",
            "missing: the destination service (or \"mesh\" for defaults)",
        );
    } else if kind == "defaults" {
        if name != DEFAULTS_NAME {
            e.push(
                "name",
                format!("a defaults document is named {DEFAULTS_NAME:?}"),
            );
        }
    } else if let Err(err) = meshnode_transport::pki::check_name("service", &name) {
        e.push("name", err.to_string());
    }
    let present = |k: &str| match k {
        "rule" => raw.rule.is_some(),
        "route" => raw.route.is_some(),
        "timeout" => raw.timeout.is_some(),
        "idle_timeout" => raw.idle_timeout.is_some(),
        "retries" => raw.retries.is_some(),
        "circuit_breaker" => raw.circuit_breaker.is_some(),
        "rate_limit" => raw.rate_limit.is_some(),
        "fault" => raw.fault.is_some(),
        "default_intention" => raw.default_intention.is_some(),
        _ => false,
    };
    let allowed: &[&str] = match kind.as_str() {
        "intentions" => &["rule"],
        "routes" => &["route"],
        "resilience" => &[
            "timeout",
            "idle_timeout",
            "retries",
            "circuit_breaker",
            "rate_limit",
            "fault",
        ],
        "defaults" => &["default_intention"],
        "" => &[],
        other => {
            e.push(
                "kind",
                format!("unknown kind {other:?}: one of intentions, routes, resilience, defaults"),
            );
            &[]
        }
    };
    if !allowed.is_empty() {
        for k in [
            "rule",
            "route",
            "timeout",
            "idle_timeout",
            "retries",
            "circuit_breaker",
            "rate_limit",
            "fault",
            "default_intention",
        ] {
            if present(k) && !allowed.contains(&k) {
                e.push(k, format!("not a key of a {kind} document"));
            }
        }
    }
    let body = match kind.as_str() {
        "intentions" => {
            let rules = raw.rule.unwrap_or_default();
            if rules.is_empty() {
                e.push("rule", "missing: at least one [[rule]]");
            }
            let rule = rules
                .into_iter()
                .enumerate()
                .filter_map(|(i, r)| {
                    let http = check_condition(&mut e, i, &r);
                    match parse_source(&r.source) {
                        Ok(source) => Some(Rule {
                            source,
                            action: r.action,
                            http,
                        }),
                        Err(m) => {
                            e.push(format!("rule[{i}].source"), m);
                            None
                        }
                    }
                })
                .collect();
            Some(Body::Intentions { rule })
        }
        "routes" => {
            let routes = raw.route.unwrap_or_default();
            if routes.is_empty() {
                e.push("route", "missing: at least one [[route]]");
            }
            let route = routes
                .into_iter()
                .enumerate()
                .map(|(i, r)| {
                    check_match(&mut e, &format!("route[{i}].match"), &r.matches);
                    check_split(&mut e, &format!("route[{i}].split"), &r.split);
                    if let Some(ops) = &r.request_headers {
                        check_header_ops(&mut e, &format!("route[{i}].request_headers"), ops);
                    }
                    if let Some(m) = &r.mirror {
                        if !is_subset(&m.subset) {
                            e.push(format!("route[{i}].mirror.subset"), not_a_subset(&m.subset));
                        }
                        percent(&mut e, &format!("route[{i}].mirror.percent"), m.percent);
                    }
                    let timeout = r
                        .timeout
                        .as_deref()
                        .and_then(|t| duration(&mut e, &format!("route[{i}].timeout"), t));
                    let idle_timeout = r
                        .idle_timeout
                        .as_deref()
                        .and_then(|t| duration(&mut e, &format!("route[{i}].idle_timeout"), t));
                    let retries = r
                        .retries
                        .as_ref()
                        .map(|rt| parse_retries(&mut e, &format!("route[{i}].retries"), rt));
                    Route {
                        matches: r.matches,
                        split: r.split,
                        request_headers: r.request_headers,
                        mirror: r.mirror,
                        timeout,
                        idle_timeout,
                        retries,
                    }
                })
                .collect();
            Some(Body::Routes { route })
        }
        "resilience" => Some(Body::Resilience(resilience(&mut e, &raw))),
        "defaults" => match raw.default_intention {
            Some(a) => Some(Body::Defaults {
                default_intention: a,
            }),
            None => {
                e.push("default_intention", "missing: \"allow\" or \"deny\"");
                None
            }
        },
        _ => None,
    };
    match body {
        Some(body) if e.0.is_empty() => Ok(Document { kind, name, body }),
        _ => Err(e.0),
    }
}

fn parse_source(s: &str) -> Result<Source, String> {
    let check = |what: &'static str, v: &str| {
        meshnode_transport::pki::check_name(what, v)
            .map(|()| v.to_string())
            .map_err(|e| e.to_string())
    };
    if s == "*" {
        return Ok(Source::Any);
    }
    if let Some(n) = s.strip_prefix("service:") {
        return check("service", n).map(Source::Service);
    }
    if let Some(c) = s.strip_prefix("cluster:") {
        return check("cluster", c).map(Source::Cluster);
    }
    if let Some(rest) = s.strip_prefix("spiffe://") {
        let parts: Vec<&str> = rest.split('/').collect();
        if let [mesh, "cluster", cluster, "node", node] = parts.as_slice() {
            let pattern = |what: &'static str, seg: &str| match seg.strip_suffix('*') {
                Some("") => Ok(Pattern::any()),
                Some(prefix) => check(what, prefix).map(|prefix| Pattern {
                    prefix,
                    wildcard: true,
                }),
                None => check(what, seg).map(|n| Pattern::exact(&n)),
            };
            return Ok(Source::Spiffe {
                mesh: check("mesh", mesh)?,
                cluster: pattern("cluster", cluster)?,
                node: pattern("node", node)?,
            });
        }
    }
    Err(format!(
        "{s:?} is not a source: use \"*\", \"service:<name>\", \"cluster:<name>\" or \"spiffe://<mesh>/cluster/<cluster>/node/<node>\" (cluster and node may be *, or end in *)"
    ))
}

fn check_path(e: &mut Errors, key: String, p: &str) {
    if !p.starts_with('/') || p.len() > 1024 || p.chars().any(|c| c.is_control() || c == ' ') {
        e.push(
            key,
            format!("{p:?} is not a path: it starts with '/' and has no spaces"),
        );
    } else {
        check_canonical(e, key, p);
    }
}

/// Requests are matched by their canonical path ([`crate::uri_path`]):
/// a rule path in another form could never match, so it is an error
/// that names the form to write.
fn check_canonical(e: &mut Errors, key: String, p: &str) {
    match crate::uri_path::normalize(p) {
        Ok(n) if n == p => {}
        Ok(n) => e.push(
            key,
            format!("{p:?} is not a canonical path (requests are matched as {n:?}: write that)"),
        ),
        Err(why) => e.push(
            key,
            format!("{p:?} can never match: requests with {why} are refused"),
        ),
    }
}

/// An upper-case HTTP method name, as requests carry them (`GET`,
/// `POST`, ...): what intention conditions and `retries.methods` compare.
fn is_method(m: &str) -> bool {
    !m.is_empty()
        && m.len() <= 32
        && m.bytes()
            .all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_')
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn check_match(e: &mut Errors, key: &str, m: &Match) {
    let paths = [&m.path_prefix, &m.path_exact, &m.path_regex]
        .iter()
        .filter(|p| p.is_some())
        .count();
    if paths > 1 {
        e.push(
            key.to_string(),
            "path_prefix, path_exact and path_regex exclude each other",
        );
    }
    if let Some(re) = &m.path_regex {
        check_regex(e, format!("{key}.path_regex"), re);
    }
    if let Some(p) = &m.path_prefix {
        check_path(e, format!("{key}.path_prefix"), p);
    }
    if let Some(p) = &m.path_exact {
        check_path(e, format!("{key}.path_exact"), p);
    }
    if let Some(method) = &m.method {
        if !is_token(method) || method.bytes().any(|b| b.is_ascii_lowercase()) {
            e.push(
                format!("{key}.method"),
                format!("{method:?} is not an HTTP method (upper case, e.g. GET)"),
            );
        }
    }
    for (h, v) in &m.headers {
        check_header_name(e, format!("{key}.headers.{h}"), h);
        check_value_match(e, format!("{key}.headers.{h}"), v);
    }
    for (q, v) in &m.query {
        if q.is_empty() || q.len() > 128 || q.chars().any(|c| c.is_control() || "&=#".contains(c)) {
            e.push(
                format!("{key}.query.{q}"),
                "a query parameter name is 1-128 printable characters without & = #",
            );
        }
        check_value_match(e, format!("{key}.query.{q}"), v);
    }
}

fn check_header_name(e: &mut Errors, key: String, h: &str) {
    if !is_token(h) || h.bytes().any(|b| b.is_ascii_uppercase()) {
        e.push(key, "header names are lower-case HTTP tokens");
    }
}

fn check_header_value(e: &mut Errors, key: String, v: &str) {
    if v.len() > 1024 || v.chars().any(|c| c.is_control()) {
        e.push(key, "a header value is printable and at most 1024 bytes");
    }
}

fn check_value_match(e: &mut Errors, key: String, v: &ValueMatch) {
    match v {
        ValueMatch::Exact(v) => check_header_value(e, key, v),
        ValueMatch::Regex(re) => check_regex(e, key, re),
        ValueMatch::Present(_) => {}
    }
}

/// Compiled like the data path compiles it (`routes`), so a document that
/// validates also compiles there.
/// A rule's HTTP conditions, checked: methods are HTTP tokens (kept upper
/// case, as requests carry them), paths start with `/`.
fn check_condition(e: &mut Errors, i: usize, r: &RawRule) -> HttpCondition {
    if let Some(methods) = &r.methods {
        if methods.is_empty() {
            e.push(format!("rule[{i}].methods"), "at least one method");
        }
        for m in methods {
            if !is_method(m) {
                e.push(
                    format!("rule[{i}].methods"),
                    format!("{m:?} is not an upper-case HTTP method (GET, POST, ...)"),
                );
            }
        }
    }
    for (k, p) in [
        ("path_exact", &r.path_exact),
        ("path_prefix", &r.path_prefix),
    ] {
        if let Some(p) = p {
            if !p.starts_with('/') || p.len() > 1024 || p.chars().any(char::is_control) {
                e.push(
                    format!("rule[{i}].{k}"),
                    "a path starting with / (at most 1,024 bytes, no control characters)",
                );
            } else {
                check_canonical(e, format!("rule[{i}].{k}"), p);
            }
        }
    }
    HttpCondition {
        methods: r.methods.clone(),
        path_exact: r.path_exact.clone(),
        path_prefix: r.path_prefix.clone(),
    }
}

pub(crate) fn compile_regex(re: &str) -> Result<regex::Regex, String> {
    if re.len() > 1024 {
        return Err("a regular expression is at most 1024 bytes".into());
    }
    // The pattern must stand on its own before it is wrapped: `a)|(.*`
    // would otherwise close the wrapping group and escape the anchors.
    regex::RegexBuilder::new(re)
        .size_limit(1 << 20)
        .dfa_size_limit(1 << 20)
        .build()
        .map_err(|err| format!("{re:?} is not a regular expression: {err}"))?;
    // Anchored: the whole path or value must match, as in Envoy's safe_regex.
    regex::RegexBuilder::new(&format!("^(?:{re})$"))
        .size_limit(1 << 20)
        .dfa_size_limit(1 << 20)
        .build()
        .map_err(|err| format!("{re:?} is not a regular expression: {err}"))
}

fn check_regex(e: &mut Errors, key: String, re: &str) {
    if let Err(msg) = compile_regex(re) {
        e.push(key, msg);
    }
}

fn check_header_ops(e: &mut Errors, key: &str, ops: &HeaderOps) {
    for (h, v) in &ops.add {
        check_header_name(e, format!("{key}.add.{h}"), h);
        check_header_value(e, format!("{key}.add.{h}"), v);
        if HOP_BY_HOP.contains(&h.as_str()) || h == "host" {
            e.push(format!("{key}.add.{h}"), "the mesh sets this header itself");
        }
    }
    for (i, h) in ops.remove.iter().enumerate() {
        check_header_name(e, format!("{key}.remove[{i}]"), h);
    }
}

/// Headers of one hop only (RFC 9110, 7.6.1), never forwarded or set by a route.
pub const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "transfer-encoding",
    "upgrade",
];

fn is_subset(s: &str) -> bool {
    s == "*"
        || match s.split_once('=') {
            Some((k, v)) => {
                is_token(k)
                    && !v.is_empty()
                    && v.len() <= 128
                    && v.bytes().all(|b| b.is_ascii_graphic())
            }
            None => is_token(s),
        }
}

fn not_a_subset(s: &str) -> String {
    format!("{s:?} is not a subset: \"key=value\" or a tag of the instances, or \"*\"")
}

fn check_split(e: &mut Errors, key: &str, split: &[Split]) {
    if split.is_empty() {
        e.push(key.to_string(), "missing: at least one { subset, weight }");
        return;
    }
    let mut total = 0u64;
    for (i, s) in split.iter().enumerate() {
        if !is_subset(&s.subset) {
            e.push(format!("{key}[{i}].subset"), not_a_subset(&s.subset));
        }
        if s.weight > 100 {
            e.push(format!("{key}[{i}].weight"), "a weight is 0-100");
        }
        total += u64::from(s.weight);
    }
    if total != 100 {
        e.push(
            key.to_string(),
            format!("the weights add up to {total}, not 100"),
        );
    }
}

fn duration(e: &mut Errors, key: &str, v: &str) -> Option<Duration> {
    match humantime::parse_duration(v) {
        Ok(d) if !d.is_zero() && d <= Duration::from_secs(3600) => Some(d),
        Ok(_) => {
            e.push(key, "a duration between 1ms and 1h");
            None
        }
        Err(err) => {
            e.push(
                key,
                format!("{v:?} is not a duration ({err}); e.g. \"2s\" or \"500ms\""),
            );
            None
        }
    }
}

fn percent(e: &mut Errors, key: &str, p: f64) {
    if !(0.0..=100.0).contains(&p) {
        e.push(key, "a percentage is 0-100");
    }
}

/// A `retries` table (of a resilience document, or of a route), checked;
/// `key` names it in errors.
fn parse_retries(e: &mut Errors, key: &str, rt: &RawRetries) -> Retries {
    if !(1..=10).contains(&rt.attempts) {
        e.push(
            format!("{key}.attempts"),
            "1-10 attempts (the first try counts)",
        );
    }
    for (i, on) in rt.on.iter().enumerate() {
        if !RETRY_ON.contains(&on.as_str()) {
            e.push(
                format!("{key}.on[{i}]"),
                format!(
                    "{on:?} is not a retry condition: one of {}",
                    RETRY_ON.join(", ")
                ),
            );
        }
    }
    let budget = rt.budget.unwrap_or(0.2);
    if !(0.0..=1.0).contains(&budget) {
        e.push(
            format!("{key}.budget"),
            "a fraction 0.0-1.0 of the requests",
        );
    }
    for (i, m) in rt.methods.iter().enumerate() {
        if !is_method(m) {
            e.push(
                format!("{key}.methods[{i}]"),
                format!("{m:?} is not an upper-case HTTP method (POST, PATCH, ...)"),
            );
        }
    }
    Retries {
        attempts: rt.attempts,
        per_try_timeout: rt
            .per_try_timeout
            .as_deref()
            .and_then(|t| duration(e, &format!("{key}.per_try_timeout"), t)),
        on: if rt.on.is_empty() {
            vec!["connect-failure".into()]
        } else {
            rt.on.clone()
        },
        budget,
        methods: rt.methods.clone(),
    }
}

fn resilience(e: &mut Errors, raw: &Raw) -> Resilience {
    let mut r = Resilience {
        timeout: raw
            .timeout
            .as_deref()
            .and_then(|t| duration(e, "timeout", t)),
        idle_timeout: raw
            .idle_timeout
            .as_deref()
            .and_then(|t| duration(e, "idle_timeout", t)),
        circuit_breaker: raw.circuit_breaker.clone(),
        ..Resilience::default()
    };
    if let Some(rt) = &raw.retries {
        r.retries = Some(parse_retries(e, "retries", rt));
    }
    if let Some(cb) = &raw.circuit_breaker {
        for (k, v) in [
            ("max_pending", cb.max_pending),
            ("max_requests", cb.max_requests),
            ("max_connections", cb.max_connections),
            ("max_retries", cb.max_retries),
        ] {
            if v == Some(0) {
                e.push(format!("circuit_breaker.{k}"), "at least 1");
            }
        }
    }
    if let Some(rl) = &raw.rate_limit {
        if !(rl.rps > 0.0 && rl.rps <= 1e7) {
            e.push("rate_limit.rps", "requests per second above 0");
        }
        let burst = rl
            .burst
            .unwrap_or_else(|| rl.rps.ceil().clamp(1.0, 1e7) as u32);
        if burst == 0 {
            e.push("rate_limit.burst", "at least 1");
        }
        r.rate_limit = Some(RateLimit {
            rps: rl.rps,
            burst,
            per_source: rl.per_source,
        });
    }
    if let Some(f) = &raw.fault {
        let mut fault = Fault::default();
        if let Some(a) = &f.abort {
            if !(100..=599).contains(&a.status) {
                e.push("fault.abort.status", "an HTTP status 100-599");
            }
            percent(e, "fault.abort.percent", a.percent);
            fault.abort = Some(a.clone());
        }
        if let Some(d) = &f.delay {
            percent(e, "fault.delay.percent", d.percent);
            if let Some(duration) = duration(e, "fault.delay.duration", &d.duration) {
                fault.delay = Some(Delay {
                    duration,
                    percent: d.percent,
                });
            }
        }
        if let Some(h) = &f.header {
            check_header_name(e, "fault.header".into(), h);
            fault.header = Some(h.to_ascii_lowercase());
        }
        r.fault = Some(fault);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        parse(text)
            .unwrap_err()
            .into_iter()
            .map(|e| format!("{}: {}", e.key, e.message))
            .collect()
    }

    #[test]
    fn a_route_takes_its_own_checked_timeouts_and_retries() {
        let doc = parse(
            "kind = \"routes\"\nname = \"api\"\n[[route]]\nsplit = [{ subset = \"*\", weight = 100 }]\ntimeout = \"250ms\"\nretries = { attempts = 2, on = [\"5xx\"] }\n",
        )
        .unwrap_or_else(|e| panic!("{e:?}"));
        let Body::Routes { route } = &doc.body else {
            panic!("not routes")
        };
        assert_eq!(route[0].timeout, Some(Duration::from_millis(250)));
        assert_eq!(route[0].retries.as_ref().map(|r| r.attempts), Some(2));
        let errs = parse(
            "kind = \"routes\"\nname = \"api\"\n[[route]]\nsplit = [{ subset = \"*\", weight = 100 }]\ntimeout = \"soon\"\nretries = { attempts = 0, on = [\"sometimes\"] }\n",
        )
        .expect_err("bad values");
        let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
        for want in [
            "route[0].timeout",
            "route[0].retries.attempts",
            "route[0].retries.on[0]",
        ] {
            assert!(keys.contains(&want), "{want}: {keys:?}");
        }
    }

    #[test]
    fn intention_rules_take_checked_http_conditions() {
        let ok = parse(
            "kind = \"intentions\"\nname = \"api\"\n[[rule]]\nsource = \"*\"\naction = \"allow\"\nmethods = [\"GET\"]\npath_prefix = \"/v1/\"\n",
        )
        .unwrap_or_else(|e| panic!("{e:?}"));
        let Body::Intentions { rule } = &ok.body else {
            panic!("not intentions")
        };
        assert!(rule[0].http.holds("GET", "/v1/x") && !rule[0].http.holds("PUT", "/v1/x"));
        for (bad, key) in [
            ("methods = [\"get\"]", "rule[0].methods"),
            ("methods = []", "rule[0].methods"),
            ("path_exact = \"admin\"", "rule[0].path_exact"),
            ("path_prefix = \"/a\\u0000\"", "rule[0].path_prefix"),
            // Requests are matched in their canonical form: these never would.
            ("path_prefix = \"//admin\"", "rule[0].path_prefix"),
            ("path_exact = \"/%61dmin\"", "rule[0].path_exact"),
            ("path_prefix = \"/a%2Fb\"", "rule[0].path_prefix"),
        ] {
            let text = format!(
                "kind = \"intentions\"\nname = \"api\"\n[[rule]]\nsource = \"*\"\naction = \"allow\"\n{bad}\n"
            );
            let errs = parse(&text).expect_err(bad);
            assert!(errs.iter().any(|e| e.key == key), "{bad}: {errs:?}");
        }
        // A key this version does not know is an error, never ignored (an
        // ignored condition would widen an allow).
        let unknown = "kind = \"intentions\"\nname = \"api\"\n[[rule]]\nsource = \"*\"\naction = \"allow\"\nheaders = { x = \"1\" }\n";
        assert!(parse(unknown).is_err());
    }

    #[test]
    fn the_design_examples_parse() {
        let i = parse(
            r#"
kind = "intentions"
name = "api"
[[rule]]
source = "service:web"
action = "allow"
[[rule]]
source = "spiffe://acme/cluster/east/node/*"
action = "allow"
[[rule]]
source = "*"
action = "deny"
"#,
        )
        .unwrap();
        assert_eq!(i.name, "api");
        let Body::Intentions { rule } = &i.body else {
            panic!("{i:?}")
        };
        assert_eq!(rule[0].source, Source::Service("web".into()));
        assert_eq!(
            rule[1].source,
            Source::Spiffe {
                mesh: "acme".into(),
                cluster: Pattern::exact("east"),
                node: Pattern::any(),
            }
        );
        assert_eq!(rule[2].action, Action::Deny);
        let r = parse(
            r#"
kind = "routes"
name = "api"
[[route]]
match = { path_prefix = "/v2", headers = { "x-canary" = "1" } }
split = [{ subset = "version=v2", weight = 100 }]
[[route]]
match = { path_prefix = "/" }
split = [{ subset = "version=v1", weight = 90 }, { subset = "version=v2", weight = 10 }]
"#,
        )
        .unwrap();
        assert!(matches!(r.body, Body::Routes { ref route } if route.len() == 2));
        let s = parse(
            r#"
kind = "resilience"
name = "api"
timeout = "2s"
retries = { attempts = 3, per_try_timeout = "500ms", on = ["connect-failure", "5xx"], budget = 0.2 }
circuit_breaker = { max_pending = 100, max_requests = 1000 }
rate_limit = { rps = 500, burst = 100 }
fault = { abort = { status = 503, percent = 1.0 } }
"#,
        )
        .unwrap();
        let Body::Resilience(res) = &s.body else {
            panic!()
        };
        assert_eq!(res.timeout, Some(Duration::from_secs(2)));
        assert_eq!(res.retries.as_ref().unwrap().attempts, 3);
        let d =
            parse("kind = \"defaults\"\nname = \"mesh\"\ndefault_intention = \"deny\"").unwrap();
        assert_eq!(
            d.body,
            Body::Defaults {
                default_intention: Action::Deny
            }
        );
        // JSON for `policy get --json`.
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["timeout"], "2s");
        assert_eq!(json["kind"], "resilience");
    }

    #[test]
    fn unknown_and_misplaced_keys_are_named() {
        let e = errors("kind = \"intentions\"\nname = \"api\"\n[[rule]]\nsource = \"*\"\naction = \"deny\"\nactoin = \"x\"");
        assert_eq!(
            e,
            ["rule[0].actoin: unknown key (check its spelling and section)"]
        );
        let e = errors("kind = \"intentions\"\nname = \"api\"\ntimeout = \"1s\"\n[[rule]]\nsource = \"*\"\naction = \"deny\"");
        assert_eq!(e, ["timeout: not a key of a intentions document"]);
        let e = errors("kind = \"firewall\"\nname = \"api\"");
        assert!(e[0].starts_with("kind: unknown kind \"firewall\""), "{e:?}");
        let e = errors("name = \"api\"");
        assert!(e[0].starts_with("kind: missing"), "{e:?}");
        let e = errors("kind = \"defaults\"\nname = \"api\"\ndefault_intention = \"allow\"");
        assert!(e[0].starts_with("name: a defaults document"), "{e:?}");
        let e = errors(
            "kind = \"intentions\"\nname = \"api\"\n[[rule]]\nsource = \"*\"\naction = \"maybe\"",
        );
        assert!(e[0].starts_with("rule[0].action"), "{e:?}");
        let e = errors("kind = [\nbroken");
        assert_eq!(e.len(), 1);
    }

    #[test]
    fn route_paths_are_written_in_the_canonical_form_requests_are_matched_in() {
        let e = errors(
            "kind = \"routes\"\nname = \"api\"\n[[route]]\nmatch = { path_exact = \"/x/../y\" }\nsplit = [{ subset = \"*\", weight = 100 }]\n",
        );
        assert!(
            e.iter()
                .any(|m| m.starts_with("route[0].match.path_exact") && m.contains("\"/y\"")),
            "{e:?}"
        );
    }

    #[test]
    fn values_are_checked() {
        let e = errors(
            r#"
kind = "routes"
name = "api"
[[route]]
match = { path_prefix = "v2", path_exact = "/x", method = "get", headers = { "X-Up" = "1" } }
split = [{ subset = "version=v2", weight = 60 }, { subset = "bad subset", weight = 30 }]
"#,
        );
        let keys: Vec<&str> = e.iter().map(|s| s.split(':').next().unwrap()).collect();
        assert_eq!(
            keys,
            [
                "route[0].match",
                "route[0].match.path_prefix",
                "route[0].match.method",
                "route[0].match.headers.X-Up",
                "route[0].split[1].subset",
                "route[0].split"
            ],
            "{e:?}"
        );
        let e = errors(
            r#"
kind = "resilience"
name = "api"
timeout = "forever"
retries = { attempts = 0, on = ["sometimes"], budget = 2.0 }
rate_limit = { rps = 0 }
fault = { abort = { status = 42, percent = 101.0 } }
circuit_breaker = { max_pending = 0 }
"#,
        );
        let keys: Vec<&str> = e.iter().map(|s| s.split(':').next().unwrap()).collect();
        assert_eq!(
            keys,
            [
                "timeout",
                "retries.attempts",
                "retries.on[0]",
                "retries.budget",
                "circuit_breaker.max_pending",
                "rate_limit.rps",
                "fault.abort.status",
                "fault.abort.percent"
            ],
            "{e:?}"
        );
        let e = errors("kind = \"intentions\"\nname = \"api\"\n[[rule]]\nsource = \"node:x\"\naction = \"deny\"");
        assert!(
            e[0].starts_with("rule[0].source: \"node:x\" is not a source"),
            "{e:?}"
        );
    }

    proptest::proptest! {
        #[test]
        fn garbage_never_panics(s in "\\PC{0,300}") {
            let _ = parse(&s);
        }
    }
}
