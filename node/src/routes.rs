//! Per-request routing of HTTP services, sans-IO: which rule of a service's
//! `routes` document a request matches, which subset of instances it goes
//! to, what it does to the request's headers and where a copy is mirrored.
//! The random rolls are arguments, so every decision is reproducible in
//! tests; the shell (`crate::http`) draws them.

use std::collections::HashMap;
use std::sync::Arc;

use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use serde::Serialize;

use crate::policy::schema::{self, Body, Document, Route, ValueMatch};
use crate::policy::PolicyStore;

/// The instances a request may go to: those whose tags include the string
/// (`version=v2`, or a plain tag), or any instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub enum Subset {
    Any,
    Tag(String),
}

impl Subset {
    pub fn parse(s: &str) -> Self {
        if s == "*" {
            Subset::Any
        } else {
            Subset::Tag(s.to_string())
        }
    }

    pub fn matches(&self, tags: &[String]) -> bool {
        match self {
            Subset::Any => true,
            Subset::Tag(t) => tags.iter().any(|x| x == t),
        }
    }

    /// As a tunnel header carries it (`None`: any instance).
    pub fn as_header(&self) -> Option<String> {
        match self {
            Subset::Any => None,
            Subset::Tag(t) => Some(t.clone()),
        }
    }
}

impl From<Subset> for String {
    fn from(s: Subset) -> String {
        match s {
            Subset::Any => "*".into(),
            Subset::Tag(t) => t,
        }
    }
}

/// What a rule reads of a request.
pub struct RequestView<'a> {
    pub method: &'a str,
    pub path: &'a str,
    /// The raw query string (after `?`), compared as sent (not percent-decoded).
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

enum PathMatch {
    Any,
    Exact(String),
    Prefix(String),
    Regex(Pattern),
}

enum Value {
    Exact(String),
    Regex(Pattern),
    Present(bool),
}

/// An anchored regular expression with the literal text every match starts
/// with, checked first: most rules of a table fail on it for a few
/// instructions, without entering the regex engine.
struct Pattern {
    prefix: String,
    re: regex::Regex,
}

impl Pattern {
    fn compile(re: &str) -> Result<Self, String> {
        Ok(Pattern {
            prefix: literal_prefix(re).to_string(),
            re: schema::compile_regex(re)?,
        })
    }

    fn is_match(&self, s: &str) -> bool {
        s.starts_with(&self.prefix) && self.re.is_match(s)
    }
}

/// The plain text at the start of a pattern that every (anchored) match must
/// begin with; conservative: empty when an alternation appears anywhere,
/// stops at the first character with a meaning, and leaves out the
/// character any quantifier follows (`ab?`, `ab*`, `ab{0,1}`, and `ab+*`,
/// where a stacked quantifier makes even `+` optional).
fn literal_prefix(re: &str) -> &str {
    const SPECIAL: &[char] = &[
        '\\', '.', '+', '*', '?', '(', ')', '[', ']', '{', '}', '^', '$', '|',
    ];
    if re.contains('|') {
        return "";
    }
    let end = re.find(SPECIAL).unwrap_or(re.len());
    let run = &re[..end];
    match re[end..].chars().next() {
        Some('?' | '*' | '{' | '+') => match run.char_indices().next_back() {
            Some((last, _)) => &run[..last],
            None => "",
        },
        _ => run,
    }
}

struct Rule {
    path: PathMatch,
    method: Option<String>,
    /// By index into the table's header names.
    headers: Vec<(usize, Value)>,
    query: Vec<(String, Value)>,
    /// Cumulative weights (ending at 100) and their subsets.
    split: Vec<(u32, Subset)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
    mirror: Option<(Subset, f64)>,
    resilience: RouteResilience,
}

/// The compiled `routes` document of one service: its rules in order.
pub struct Table {
    rules: Vec<Rule>,
    /// Every header name a rule reads, each looked up once per request.
    names: Vec<HeaderName>,
    /// The rules as written (for `explain`).
    source: Vec<Route>,
}

/// Where one request goes.
#[derive(Debug, PartialEq)]
pub struct Selection<'a> {
    /// The index of the rule that matched.
    pub rule: usize,
    pub subset: &'a Subset,
    /// A copy goes to this subset too.
    pub mirror: Option<&'a Subset>,
    /// The rule's own timeouts and retries, over the service's document.
    pub resilience: &'a RouteResilience,
}

/// A route's `timeout`, `idle_timeout` and `retries`, each `None` when the
/// route leaves it to the service's resilience document.
#[derive(Debug, Default, PartialEq)]
pub struct RouteResilience {
    pub timeout: Option<std::time::Duration>,
    pub idle_timeout: Option<std::time::Duration>,
    pub retries: Option<schema::Retries>,
}

fn value(v: &ValueMatch) -> Result<Value, String> {
    Ok(match v {
        ValueMatch::Exact(s) => Value::Exact(s.clone()),
        ValueMatch::Regex(r) => Value::Regex(Pattern::compile(r)?),
        ValueMatch::Present(p) => Value::Present(*p),
    })
}

fn header_name(h: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(h.as_bytes()).map_err(|e| format!("header {h:?}: {e}"))
}

impl Value {
    /// Whether the values found (none: the header or parameter is absent) match.
    fn matches<'a>(&self, mut found: impl Iterator<Item = &'a str>) -> bool {
        match self {
            Value::Present(p) => found.next().is_some() == *p,
            Value::Exact(v) => found.any(|f| f == v),
            Value::Regex(r) => found.any(|f| r.is_match(f)),
        }
    }
}

/// A request's headers as the rules read them: each name looked up once
/// (its first value, and whether there are more).
struct Found<'a> {
    map: &'a HeaderMap,
    names: &'a [HeaderName],
    seen: Vec<Option<(Option<&'a str>, bool)>>,
}

impl Found<'_> {
    fn matches(&mut self, i: usize, v: &Value) -> bool {
        let (Some(name), Some(slot)) = (self.names.get(i), self.seen.get_mut(i)) else {
            return false;
        };
        let (first, more) = *slot.get_or_insert_with(|| {
            let mut all = self.map.get_all(name).iter();
            let first = all.next().and_then(|x| x.to_str().ok());
            (first, all.next().is_some())
        });
        if !more {
            return v.matches(first.into_iter());
        }
        // Several values (rare): any of them may match.
        v.matches(
            self.map
                .get_all(name)
                .iter()
                .filter_map(|x| x.to_str().ok()),
        )
    }
}

impl Rule {
    fn compile(r: &Route, names: &mut Vec<HeaderName>) -> Result<Self, String> {
        let m = &r.matches;
        let path = match (&m.path_exact, &m.path_prefix, &m.path_regex) {
            (Some(p), _, _) => PathMatch::Exact(p.clone()),
            (_, Some(p), _) => PathMatch::Prefix(p.clone()),
            (_, _, Some(re)) => PathMatch::Regex(Pattern::compile(re)?),
            _ => PathMatch::Any,
        };
        let mut cum = 0;
        let split = r
            .split
            .iter()
            .map(|s| {
                cum += s.weight;
                (cum, Subset::parse(&s.subset))
            })
            .collect();
        let ops = r.request_headers.clone().unwrap_or_default();
        Ok(Rule {
            path,
            method: m.method.clone(),
            headers: m
                .headers
                .iter()
                .map(|(h, v)| {
                    let name = header_name(h)?;
                    let i = match names.iter().position(|n| *n == name) {
                        Some(i) => i,
                        None => {
                            names.push(name);
                            names.len() - 1
                        }
                    };
                    Ok((i, value(v)?))
                })
                .collect::<Result<_, String>>()?,
            query: m
                .query
                .iter()
                .map(|(q, v)| Ok((q.clone(), value(v)?)))
                .collect::<Result<_, String>>()?,
            split,
            add: ops
                .add
                .iter()
                .map(|(h, v)| {
                    let value = HeaderValue::from_str(v).map_err(|e| format!("{h}: {e}"))?;
                    Ok((header_name(h)?, value))
                })
                .collect::<Result<_, String>>()?,
            remove: ops
                .remove
                .iter()
                .map(|h| header_name(h))
                .collect::<Result<_, String>>()?,
            mirror: r
                .mirror
                .as_ref()
                .map(|m| (Subset::parse(&m.subset), m.percent)),
            resilience: RouteResilience {
                timeout: r.timeout,
                idle_timeout: r.idle_timeout,
                retries: r.retries.clone(),
            },
        })
    }

    /// Cheapest conditions first.
    fn matches(&self, req: &RequestView<'_>, found: &mut Found<'_>) -> bool {
        if self.method.as_deref().is_some_and(|m| m != req.method) {
            return false;
        }
        let path_ok = match &self.path {
            PathMatch::Any => true,
            PathMatch::Exact(p) => req.path == p,
            PathMatch::Prefix(p) => req.path.starts_with(p.as_str()),
            PathMatch::Regex(r) => r.is_match(req.path),
        };
        path_ok
            && self.headers.iter().all(|(i, v)| found.matches(*i, v))
            && self.query.iter().all(|(name, v)| {
                v.matches(req.query.unwrap_or("").split('&').filter_map(|kv| {
                    let (k, val) = kv.split_once('=').unwrap_or((kv, ""));
                    (k == name && !kv.is_empty()).then_some(val)
                }))
            })
    }
}

impl Table {
    /// Compiles a validated document's rules (an error only if the
    /// document did not pass `schema::parse` on this build).
    pub fn compile(routes: &[Route]) -> Result<Self, String> {
        let mut names = Vec::new();
        let rules = routes
            .iter()
            .map(|r| Rule::compile(r, &mut names))
            .collect::<Result<_, _>>()?;
        Ok(Table {
            rules,
            names,
            source: routes.to_vec(),
        })
    }

    fn first_match(&self, req: &RequestView<'_>) -> Option<(usize, &Rule)> {
        let mut found = Found {
            map: req.headers,
            names: &self.names,
            seen: vec![None; self.names.len()],
        };
        self.rules
            .iter()
            .enumerate()
            .find(|(_, r)| r.matches(req, &mut found))
    }

    /// The first rule `req` matches, as written, with its index.
    pub fn matching(&self, req: &RequestView<'_>) -> Option<(usize, &Route)> {
        let (i, _) = self.first_match(req)?;
        Some((i, self.source.get(i)?))
    }

    /// The first rule `req` matches, and where it sends it. `split_roll` is
    /// uniform in 0..100 (picks the weighted subset), `mirror_roll` uniform
    /// in [0, 100) (mirrors when below the rule's percent). `None`: no rule
    /// matches, and the request goes to any instance.
    pub fn select(
        &self,
        req: &RequestView<'_>,
        split_roll: u32,
        mirror_roll: f64,
    ) -> Option<Selection<'_>> {
        let (index, rule) = self.first_match(req)?;
        let subset = rule
            .split
            .iter()
            .find(|(cum, _)| split_roll < *cum)
            .or(rule.split.last())
            .map(|(_, s)| s)?;
        let mirror = rule
            .mirror
            .as_ref()
            .filter(|(_, pct)| mirror_roll < *pct)
            .map(|(s, _)| s);
        Some(Selection {
            rule: index,
            subset,
            mirror,
            resilience: &rule.resilience,
        })
    }

    /// Applies rule `index`'s header changes to a request's headers.
    pub fn rewrite(&self, index: usize, headers: &mut HeaderMap) {
        let Some(rule) = self.rules.get(index) else {
            return;
        };
        for name in &rule.remove {
            headers.remove(name);
        }
        for (name, value) in &rule.add {
            headers.insert(name.clone(), value.clone());
        }
    }
}

/// The route tables of every service that has a `routes` document.
#[derive(Default)]
pub struct Routes {
    tables: HashMap<String, Arc<Table>>,
}

impl Routes {
    pub fn from_documents(docs: impl IntoIterator<Item = Document>) -> Self {
        let mut tables = HashMap::new();
        for d in docs {
            if let Body::Routes { route } = &d.body {
                match Table::compile(route) {
                    Ok(t) => {
                        tables.insert(d.name.clone(), Arc::new(t));
                    }
                    Err(e) => {
                        tracing::warn!(service = %d.name, error = %e, "routes document does not compile; ignored");
                    }
                }
            }
        }
        Routes { tables }
    }

    pub fn from_store(store: &PolicyStore) -> Self {
        Self::from_documents(store.all().into_iter().filter_map(|h| h.parsed))
    }

    pub fn table(&self, service: &str) -> Option<Arc<Table>> {
        self.tables.get(service).cloned()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn table(text: &str) -> Table {
        let doc = schema::parse(text).unwrap_or_else(|e| panic!("{e:?}"));
        let Body::Routes { route } = doc.body else {
            panic!("not routes")
        };
        Table::compile(&route).unwrap()
    }

    fn req<'a>(method: &'a str, uri: &'a str, headers: &'a HeaderMap) -> RequestView<'a> {
        let (path, query) = match uri.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (uri, None),
        };
        RequestView {
            method,
            path,
            query,
            headers,
        }
    }

    const DOC: &str = r#"
kind = "routes"
name = "api"
[[route]]
match = { path_prefix = "/v2", headers = { "x-canary" = "1" } }
split = [{ subset = "version=v2", weight = 100 }]
request_headers = { add = { "x-routed" = "canary" }, remove = ["x-internal"] }
[[route]]
match = { path_regex = "/users/[0-9]+", method = "DELETE" }
split = [{ subset = "admin", weight = 100 }]
[[route]]
match = { path_exact = "/search", query = { "debug" = { present = true } }, headers = { "user-agent" = { regex = "curl/.*" } } }
split = [{ subset = "version=v3", weight = 100 }]
mirror = { subset = "version=v4", percent = 25 }
[[route]]
match = { path_prefix = "/" }
split = [{ subset = "version=v1", weight = 90 }, { subset = "version=v2", weight = 10 }]
"#;

    #[test]
    fn rules_match_in_order_by_path_method_headers_and_query() {
        let t = table(DOC);
        let mut h = HeaderMap::new();
        let pick = |m: &str, u: &str, h: &HeaderMap| {
            t.select(&req(m, u, h), 0, 99.0)
                .map(|s| (s.rule, s.subset.clone()))
        };
        assert_eq!(
            pick("GET", "/v2/x", &h),
            Some((3, Subset::parse("version=v1")))
        );
        h.insert("x-canary", HeaderValue::from_static("1"));
        assert_eq!(
            pick("GET", "/v2/x", &h),
            Some((0, Subset::parse("version=v2")))
        );
        assert_eq!(pick("DELETE", "/users/42", &h).map(|p| p.0), Some(1));
        // Regexes are anchored: the whole path must match.
        assert_eq!(pick("DELETE", "/users/42/x", &h).map(|p| p.0), Some(3));
        assert_eq!(pick("GET", "/users/42", &h).map(|p| p.0), Some(3));
        assert_eq!(pick("GET", "/search?debug", &h).map(|p| p.0), Some(3));
        h.insert("user-agent", HeaderValue::from_static("curl/8.0"));
        assert_eq!(
            pick("GET", "/search?a=1&debug=yes", &h).map(|p| p.0),
            Some(2)
        );
        assert_eq!(pick("GET", "/search?a=1", &h).map(|p| p.0), Some(3));
        assert_eq!(pick("GET", "/searchx?debug", &h).map(|p| p.0), Some(3));
        // Nothing matches a path that is not under "/": any instance.
        assert!(t.select(&req("GET", "*", &h), 0, 0.0).is_none());
    }

    #[test]
    fn headers_read_by_several_rules_and_repeated_values() {
        let t = table(
            r#"
kind = "routes"
name = "api"
[[route]]
match = { headers = { "x-env" = "prod", "x-team" = { present = false } } }
split = [{ subset = "a", weight = 100 }]
[[route]]
match = { headers = { "x-env" = { regex = "st.*" } } }
split = [{ subset = "b", weight = 100 }]
[[route]]
match = { headers = { "x-env" = "dev" } }
split = [{ subset = "c", weight = 100 }]
"#,
        );
        let rule = |h: &HeaderMap| t.select(&req("GET", "/", h), 0, 99.0).map(|s| s.rule);
        let mut h = HeaderMap::new();
        assert_eq!(rule(&h), None);
        h.insert("x-env", HeaderValue::from_static("prod"));
        assert_eq!(rule(&h), Some(0));
        h.insert("x-team", HeaderValue::from_static("x"));
        assert_eq!(rule(&h), None, "x-team must be absent for rule 0");
        h.insert("x-env", HeaderValue::from_static("staging"));
        assert_eq!(rule(&h), Some(1));
        // Any of several values may match, for every rule reading the name.
        h.insert("x-env", HeaderValue::from_static("qa"));
        h.append("x-env", HeaderValue::from_static("dev"));
        assert_eq!(rule(&h), Some(2));
        h.append("x-env", HeaderValue::from_static("stage"));
        assert_eq!(rule(&h), Some(1));
        // A value that is not text matches no exact or regex condition.
        let mut h = HeaderMap::new();
        h.insert("x-env", HeaderValue::from_bytes(b"d\xffv").unwrap());
        assert_eq!(rule(&h), None);
    }

    #[test]
    fn mirror_and_header_changes() {
        let t = table(DOC);
        let mut h = HeaderMap::new();
        h.insert("user-agent", HeaderValue::from_static("curl/8.0"));
        let s = t
            .select(&req("GET", "/search?debug=1", &h), 0, 24.9)
            .unwrap();
        assert_eq!(s.mirror, Some(&Subset::parse("version=v4")));
        let s = t
            .select(&req("GET", "/search?debug=1", &h), 0, 25.0)
            .unwrap();
        assert_eq!(s.mirror, None);
        let mut headers = HeaderMap::new();
        headers.insert("x-internal", HeaderValue::from_static("secret"));
        headers.insert("x-routed", HeaderValue::from_static("old"));
        t.rewrite(0, &mut headers);
        assert_eq!(headers.get("x-internal"), None);
        assert_eq!(headers.get("x-routed").unwrap(), "canary");
    }

    #[test]
    fn subsets_select_instances_by_tag() {
        let tags = vec!["version=v2".to_string(), "blue".to_string()];
        assert!(Subset::parse("version=v2").matches(&tags));
        assert!(Subset::parse("blue").matches(&tags));
        assert!(!Subset::parse("version=v1").matches(&tags));
        assert!(Subset::parse("*").matches(&[]));
        assert_eq!(Subset::parse("*").as_header(), None);
    }

    #[test]
    fn literal_prefixes() {
        assert_eq!(literal_prefix("/items/[0-9]+"), "/items/");
        assert_eq!(literal_prefix("/api/v2?"), "/api/v");
        assert_eq!(literal_prefix("/api/v2{0,1}"), "/api/v");
        assert_eq!(literal_prefix("/api/v2+"), "/api/v");
        assert_eq!(literal_prefix("ab+*"), "a");
        // A pattern that would close the anchoring group is refused.
        for escape in ["a)|(.*", "x)?(", "a)(b"] {
            assert!(Pattern::compile(escape).is_err(), "{escape}");
        }
        assert!(Pattern::compile("(a)|(b)").is_ok());
        assert_eq!(literal_prefix("/a|/b"), "");
        assert_eq!(literal_prefix("(?i)/items"), "");
        assert_eq!(literal_prefix("é?"), "");
        assert_eq!(literal_prefix("/ü.*"), "/ü");
    }

    proptest! {
        // Patterns are tiny: many cases are cheap, and stacked quantifiers
        // (`a+*`) are rare in a small sample.
        #![proptest_config(ProptestConfig::with_cases(4096))]

        /// The prefix check never rejects a string the regex matches.
        #[test]
        fn literal_prefix_is_implied_by_every_match(
            parts in proptest::collection::vec(prop::sample::select(vec![
                "a", "b", "é", "/", "|", "?", "*", "+", ".", "(", ")", "\\d", "{0,2}", "[ab]", "(?i)",
            ]), 0..8),
            inputs in proptest::collection::vec("[abAB/é1]{0,6}", 1..20),
        ) {
            let re = parts.concat();
            if let Ok(p) = Pattern::compile(&re) {
                for s in &inputs {
                    if p.re.is_match(s) {
                        prop_assert!(s.starts_with(&p.prefix), "{re:?} matches {s:?} but prefix {:?}", p.prefix);
                    }
                }
            }
        }

        /// Every roll picks a subset, and each subset gets exactly its
        /// weight's share of the 100 rolls (0 never).
        #[test]
        fn weights_are_exact_shares_of_the_rolls(w in proptest::collection::vec(0u32..=100, 1..5)) {
            let total: u32 = w.iter().sum();
            prop_assume!(total > 0);
            // Scale to 100 as the schema demands.
            let mut scaled: Vec<u32> = w.iter().map(|x| x * 100 / total).collect();
            let rest = 100 - scaled.iter().sum::<u32>();
            scaled[0] += rest;
            let split: Vec<String> = scaled
                .iter()
                .enumerate()
                .map(|(i, x)| format!("{{ subset = \"v={i}\", weight = {x} }}"))
                .collect();
            let t = table(&format!(
                "kind = \"routes\"\nname = \"api\"\n[[route]]\nsplit = [{}]\n",
                split.join(", ")
            ));
            let h = HeaderMap::new();
            let mut counts = vec![0u32; scaled.len()];
            for roll in 0..100 {
                let s = t.select(&req("GET", "/", &h), roll, 0.0).unwrap();
                let Subset::Tag(tag) = s.subset else { panic!() };
                let i: usize = tag[2..].parse().unwrap();
                counts[i] += 1;
            }
            prop_assert_eq!(counts, scaled);
        }

        /// Any request against any table: a decision or none, never a panic.
        #[test]
        fn any_request_gets_a_decision_or_none(
            method in "[A-Z]{1,8}",
            path in "/[ -~]{0,40}",
            query in proptest::option::of("[ -~]{0,40}"),
            roll in 0u32..100,
        ) {
            let t = table(DOC);
            let h = HeaderMap::new();
            let v = RequestView { method: &method, path: &path, query: query.as_deref(), headers: &h };
            let _ = t.select(&v, roll, 50.0);
        }
    }
}
