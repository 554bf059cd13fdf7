//! `resilience` documents as the HTTP data path applies them (pure: the
//! shell in `http` draws the rolls and reads the clock).
//!
//! Enforced so far: `timeout` (per request, until the response head) and
//! `fault` (abort with a status, fixed delay, each for a percentage of
//! requests, optionally only for requests carrying a header), applied at
//! the caller's node. `retries`, `circuit_breaker` and `rate_limit` are
//! validated and stored, and not enforced yet (`pending_keys` names them,
//! so `policy apply` and `explain` can say so).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hyper::header::HeaderMap;

use crate::policy::schema::{Body, Document, Fault, Resilience};
use crate::policy::PolicyStore;

/// What one request gets from its service's document.
#[derive(Debug, Default, PartialEq)]
pub struct Faults {
    /// Wait this long before the request goes out.
    pub delay: Option<Duration>,
    /// Answer with this status instead of sending the request.
    pub abort: Option<u16>,
}

/// The compiled resilience settings of one service.
#[derive(Debug, Default, PartialEq)]
pub struct Policy {
    /// Until the response head; the mesh answers 504 after it.
    pub timeout: Option<Duration>,
    fault: Option<Fault>,
}

impl Policy {
    pub fn compile(r: &Resilience) -> Self {
        Policy {
            timeout: r.timeout,
            fault: r.fault.clone(),
        }
    }

    /// The faults for one request; `abort_roll` and `delay_roll` are
    /// uniform in 0..100 (each fault fires when its roll is below its
    /// percentage, so a percentage is exactly its share of the rolls).
    pub fn faults(&self, headers: &HeaderMap, abort_roll: f64, delay_roll: f64) -> Faults {
        let Some(f) = &self.fault else {
            return Faults::default();
        };
        if f.header
            .as_deref()
            .is_some_and(|h| !headers.contains_key(h))
        {
            return Faults::default();
        }
        Faults {
            abort: f
                .abort
                .as_ref()
                .filter(|a| abort_roll < a.percent)
                .map(|a| a.status),
            delay: f
                .delay
                .as_ref()
                .filter(|d| delay_roll < d.percent)
                .map(|d| d.duration),
        }
    }
}

/// The keys of a document this version validates but does not enforce yet.
pub fn pending_keys(r: &Resilience) -> Vec<&'static str> {
    let mut keys = Vec::new();
    if r.retries.is_some() {
        keys.push("retries");
    }
    if r.circuit_breaker.is_some() {
        keys.push("circuit_breaker");
    }
    if r.rate_limit.is_some() {
        keys.push("rate_limit");
    }
    keys
}

/// Every service's policy, rebuilt on each adopted document.
#[derive(Default)]
pub struct Policies {
    by_service: HashMap<String, Arc<Policy>>,
}

impl Policies {
    pub fn from_documents(docs: impl IntoIterator<Item = Document>) -> Self {
        let by_service = docs
            .into_iter()
            .filter_map(|d| match &d.body {
                Body::Resilience(r) => Some((d.name.clone(), Arc::new(Policy::compile(r)))),
                _ => None,
            })
            .collect();
        Policies { by_service }
    }

    pub fn from_store(store: &PolicyStore) -> Self {
        Self::from_documents(store.all().into_iter().filter_map(|h| h.parsed))
    }

    pub fn get(&self, service: &str) -> Option<Arc<Policy>> {
        self.by_service.get(service).cloned()
    }
}

#[cfg(test)]
mod tests {
    use hyper::header::HeaderValue;
    use proptest::prelude::*;

    use super::*;
    use crate::policy::schema;

    fn policy(text: &str) -> Policy {
        let doc = schema::parse(text).unwrap_or_else(|e| panic!("{e:?}"));
        let Body::Resilience(r) = doc.body else {
            panic!("not resilience")
        };
        Policy::compile(&r)
    }

    #[test]
    fn faults_fire_below_their_percentage_and_only_with_the_header() {
        let p = policy(
            r#"
kind = "resilience"
name = "api"
timeout = "250ms"
fault = { abort = { status = 503, percent = 25 }, delay = { duration = "100ms", percent = 50 }, header = "x-chaos" }
"#,
        );
        assert_eq!(p.timeout, Some(Duration::from_millis(250)));
        let none = HeaderMap::new();
        assert_eq!(p.faults(&none, 0.0, 0.0), Faults::default());
        let mut h = HeaderMap::new();
        h.insert("x-chaos", HeaderValue::from_static("1"));
        assert_eq!(
            p.faults(&h, 24.9, 49.9),
            Faults {
                abort: Some(503),
                delay: Some(Duration::from_millis(100))
            }
        );
        assert_eq!(p.faults(&h, 25.0, 50.0), Faults::default());
        let all = policy(
            "kind = \"resilience\"\nname = \"api\"\nfault = { abort = { status = 500, percent = 100 } }",
        );
        assert_eq!(all.faults(&none, 99.99, 0.0).abort, Some(500));
        assert_eq!(all.timeout, None);
    }

    #[test]
    fn keys_not_enforced_yet_are_named() {
        let doc = schema::parse(
            "kind = \"resilience\"\nname = \"api\"\ntimeout = \"1s\"\nrate_limit = { rps = 10 }\nretries = { attempts = 2 }",
        )
        .unwrap();
        let Body::Resilience(r) = &doc.body else {
            panic!()
        };
        assert_eq!(pending_keys(r), vec!["retries", "rate_limit"]);
        let p = Policies::from_documents([doc]);
        assert!(p.get("api").is_some() && p.get("web").is_none());
    }

    proptest! {
        /// Over the 10,000 rolls 0.00..99.99, a fault fires for exactly
        /// its percentage of them.
        #[test]
        fn a_percentage_is_its_share_of_the_rolls(hundredths in 0u32..=10_000) {
            let pct = hundredths as f64 / 100.0;
            let p = policy(&format!(
                "kind = \"resilience\"\nname = \"api\"\nfault = {{ abort = {{ status = 503, percent = {pct} }} }}"
            ));
            let h = HeaderMap::new();
            let fired = (0..10_000)
                .filter(|i| p.faults(&h, *i as f64 / 100.0, 0.0).abort.is_some())
                .count();
            prop_assert_eq!(fired, hundredths as usize);
        }
    }
}
