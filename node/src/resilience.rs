//! `resilience` documents as the HTTP data path applies them (pure: the
//! shell in `http` draws the rolls and reads the clock).
//!
//! Enforced so far, at the caller's node: `timeout` (per request, until
//! the response head), `fault` (abort with a status, fixed delay, each for
//! a percentage of requests, optionally only for requests carrying a
//! header) and `retries` (conditions, attempts, per-try timeout, back-off
//! with jitter, and a budget: [`Budget`]); and at each destination
//! instance's node `rate_limit` ([`TokenBucket`], 429 with `Retry-After`);
//! and at the caller's node `circuit_breaker` ([`Breaker`]: concurrency
//! limits per service, 503 naming the limit).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::header::HeaderMap;

use crate::policy::schema::{
    Body, CircuitBreaker, Document, Fault, RateLimit, Resilience, Retries,
};
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
    /// `fault.header`, parsed once (not per request).
    fault_header: Option<hyper::header::HeaderName>,
    pub retries: Option<Retries>,
    /// Per destination instance, enforced at its node.
    pub rate_limit: Option<RateLimit>,
    /// At the caller's node, per service.
    pub circuit_breaker: Option<CircuitBreaker>,
    /// The document as written, and its version (what `explain` shows:
    /// the settings the data path applies, not merely the store's).
    pub settings: Resilience,
    pub version: u64,
}

/// Why an attempt failed, as `retries.on` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// No instance could be reached or none accepted (`connect-failure`,
    /// `refused-stream`).
    Connect,
    /// The exchange broke after the instance took it, or its per-try
    /// timeout passed (`reset`).
    Reset,
    /// The instance answered with this status.
    Status(u16),
}

impl Failure {
    pub fn label(self) -> &'static str {
        match self {
            Failure::Connect => "connect_failure",
            Failure::Reset => "reset",
            Failure::Status(_) => "status",
        }
    }
}

impl Policy {
    pub fn compile(r: &Resilience) -> Self {
        Policy {
            timeout: r.timeout,
            fault: r.fault.clone(),
            // Validated as a header name by the schema; one that did not
            // parse would make the fault never fire.
            fault_header: r
                .fault
                .as_ref()
                .and_then(|f| f.header.as_deref())
                .and_then(|h| hyper::header::HeaderName::from_bytes(h.as_bytes()).ok()),
            retries: r.retries.clone(),
            rate_limit: r.rate_limit.clone(),
            circuit_breaker: r.circuit_breaker.clone(),
            settings: r.clone(),
            version: 0,
        }
    }

    /// [`retryable`] under this service's own `retries`.
    pub fn retryable(&self, method: &str, failure: Failure, attempts_made: u32) -> bool {
        self.retries
            .as_ref()
            .is_some_and(|r| retryable(r, method, failure, attempts_made))
    }

    /// The faults for one request; `abort_roll` and `delay_roll` are
    /// uniform in 0..100 (each fault fires when its roll is below its
    /// percentage, so a percentage is exactly its share of the rolls).
    pub fn faults(&self, headers: &HeaderMap, abort_roll: f64, delay_roll: f64) -> Faults {
        let Some(f) = &self.fault else {
            return Faults::default();
        };
        if f.header.is_some()
            && self
                .fault_header
                .as_ref()
                .is_none_or(|h| !headers.contains_key(h))
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

/// Whether a failed attempt of a request with `method` may go again
/// under `r`: it lists the condition, the method is idempotent (or one `r`
/// adds), and the attempts are not used up (`attempts` counts the first
/// try).
pub fn retryable(r: &Retries, method: &str, failure: Failure, attempts_made: u32) -> bool {
    let idempotent = matches!(
        method,
        "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE" | "TRACE"
    ) || r.methods.iter().any(|m| m == method);
    let listed = r.on.iter().any(|on| match (on.as_str(), failure) {
        ("connect-failure" | "refused-stream", Failure::Connect) => true,
        ("reset", Failure::Reset) => true,
        ("5xx", Failure::Status(s)) => (500..600).contains(&s),
        ("gateway-error", Failure::Status(s)) => matches!(s, 502..=504),
        _ => false,
    });
    idempotent && listed && attempts_made < r.attempts
}

/// The wait before retry number `n` (1, 2, ...): exponential from 25 ms,
/// capped at 250 ms, with full jitter (`jitter` uniform in 0..1), as
/// Envoy's default back-off.
pub fn backoff(n: u32, jitter: f64) -> Duration {
    let base = Duration::from_millis(25)
        .saturating_mul(1 << n.saturating_sub(1).min(4))
        .min(Duration::from_millis(250));
    base.mul_f64(jitter.clamp(0.0, 1.0))
}

/// A retry budget (as linkerd2-proxy's and Finagle's): over the last
/// [`Budget::WINDOW`], retries may add `ratio` of the requests plus
/// [`Budget::FLOOR_PER_SEC`] per second, so when every instance fails
/// the extra load stays bounded. Time is an argument (seconds since any
/// fixed origin).
#[derive(Debug)]
pub struct Budget {
    ratio: f64,
    /// (second, requests, retries), newest last, within the window.
    buckets: std::collections::VecDeque<(u64, u64, u64)>,
}

impl Budget {
    pub const WINDOW: u64 = 10;
    pub const FLOOR_PER_SEC: u64 = 10;

    pub fn new(ratio: f64) -> Self {
        Budget {
            ratio,
            buckets: std::collections::VecDeque::new(),
        }
    }

    pub fn set_ratio(&mut self, ratio: f64) {
        self.ratio = ratio;
    }

    fn bucket(&mut self, now: u64) -> &mut (u64, u64, u64) {
        while self
            .buckets
            .front()
            .is_some_and(|b| b.0 + Self::WINDOW <= now)
        {
            self.buckets.pop_front();
        }
        if self.buckets.back().is_none_or(|b| b.0 != now) {
            self.buckets.push_back((now, 0, 0));
        }
        // Just pushed or already there.
        let last = self.buckets.len() - 1;
        &mut self.buckets[last]
    }

    /// A request (its first attempt).
    pub fn request(&mut self, now: u64) {
        self.bucket(now).1 += 1;
    }

    /// Takes one retry from the budget if there is one left.
    pub fn try_retry(&mut self, now: u64) -> bool {
        self.bucket(now);
        let (requests, retries) = self
            .buckets
            .iter()
            .fold((0, 0), |(q, r), b| (q + b.1, r + b.2));
        let allowed = self.ratio * requests as f64 + (Self::FLOOR_PER_SEC * Self::WINDOW) as f64;
        if (retries + 1) as f64 > allowed {
            return false;
        }
        self.bucket(now).2 += 1;
        true
    }
}

/// A token bucket (Envoy's local rate limit): `burst` requests at once,
/// refilled at `rps`; time is an argument (since any fixed origin).
#[derive(Debug)]
pub struct TokenBucket {
    rps: f64,
    burst: f64,
    tokens: f64,
    last: Duration,
}

impl TokenBucket {
    pub fn new(limit: &RateLimit, now: Duration) -> Self {
        TokenBucket {
            rps: limit.rps,
            burst: f64::from(limit.burst),
            tokens: f64::from(limit.burst),
            last: now,
        }
    }

    /// Whether the bucket was made for `limit` (a new document resets it).
    pub fn is_for(&self, limit: &RateLimit) -> bool {
        self.rps == limit.rps && self.burst == f64::from(limit.burst)
    }

    /// Whether the bucket would be full at `now`: forgetting it changes
    /// nothing (a new one starts full).
    pub fn is_full(&self, now: Duration) -> bool {
        let elapsed = now.saturating_sub(self.last).as_secs_f64();
        self.tokens + elapsed * self.rps >= self.burst
    }

    /// Takes a token, or says how long until one is there.
    pub fn try_take(&mut self, now: Duration) -> Result<(), Duration> {
        let elapsed = now.saturating_sub(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rps).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rps))
    }
}

/// What a caller node keeps per service across requests and documents:
/// retry budgets and circuit-breaker counts (kept across documents, so a
/// new document's limits and ratio apply to what is already counted).
/// `now`: whole seconds since any fixed origin.
#[derive(Default)]
pub struct Ledger {
    budgets: Mutex<HashMap<String, Budget>>,
    breakers: Mutex<HashMap<String, Arc<Breaker>>>,
}

impl Ledger {
    fn budget<T>(&self, service: &str, ratio: f64, f: impl FnOnce(&mut Budget) -> T) -> T {
        let mut budgets = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
        // No key allocation per request once the service has a budget.
        if let Some(b) = budgets.get_mut(service) {
            b.set_ratio(ratio);
            return f(b);
        }
        f(budgets
            .entry(service.to_string())
            .or_insert_with(|| Budget::new(ratio)))
    }

    /// A request of `service` deposits into its retry budget.
    pub fn request(&self, service: &str, ratio: f64, now: u64) {
        self.budget(service, ratio, |b| b.request(now));
    }

    /// Takes a retry from `service`'s budget, if one is left.
    pub fn try_retry(&self, service: &str, ratio: f64, now: u64) -> bool {
        self.budget(service, ratio, |b| b.try_retry(now))
    }

    /// `service`'s circuit-breaker counts.
    pub fn breaker(&self, service: &str) -> Arc<Breaker> {
        let mut all = self.breakers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = all.get(service) {
            return b.clone();
        }
        all.entry(service.to_string()).or_default().clone()
    }
}

/// One of a circuit breaker's limits (Envoy's thresholds): each bounds a
/// count of things in flight from one caller node to one service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// Tunnel streams open to the service's instances, idle ones included.
    Connections,
    /// Requests waiting for their response head.
    Pending,
    /// Requests in flight, until their response body ends.
    Requests,
    /// Retries in flight.
    Retries,
}

impl Limit {
    /// The document's key, the `limit` label and the response header's value.
    pub fn name(self) -> &'static str {
        match self {
            Limit::Connections => "max_connections",
            Limit::Pending => "max_pending",
            Limit::Requests => "max_requests",
            Limit::Retries => "max_retries",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// This limit's value in `cb`.
    pub fn of(self, cb: &CircuitBreaker) -> Option<u32> {
        match self {
            Limit::Connections => cb.max_connections,
            Limit::Pending => cb.max_pending,
            Limit::Requests => cb.max_requests,
            Limit::Retries => cb.max_retries,
        }
    }
}

/// A circuit breaker's counts for one service at one caller node. Nothing
/// opens or closes on a timer: a limit admits again as soon as what it
/// counts drops below it (so the breaker recovers with the load).
#[derive(Debug, Default)]
pub struct Breaker {
    counts: [AtomicU32; 4],
}

/// One admitted unit of a [`Limit`]; its count drops with it.
#[derive(Debug)]
pub struct Admitted {
    breaker: Arc<Breaker>,
    limit: Limit,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.breaker.counts[self.limit.index()].fetch_sub(1, Ordering::AcqRel);
    }
}

impl Breaker {
    /// Counts one more of `limit` if that stays within `max`; `Ok(None)`
    /// when the document sets no such limit (nothing is counted then).
    pub fn try_enter(
        self: &Arc<Self>,
        limit: Limit,
        max: Option<u32>,
    ) -> Result<Option<Admitted>, Limit> {
        let Some(max) = max else {
            return Ok(None);
        };
        let count = &self.counts[limit.index()];
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(|_| limit)?;
        Ok(Some(Admitted {
            breaker: self.clone(),
            limit,
        }))
    }

    /// How many of `limit` are in flight (counted only while it is set).
    pub fn count(&self, limit: Limit) -> u32 {
        self.counts[limit.index()].load(Ordering::Acquire)
    }
}

/// Every service's policy, rebuilt on each adopted document.
#[derive(Default)]
pub struct Policies {
    by_service: HashMap<String, Arc<Policy>>,
}

impl Policies {
    /// Every service's policy from `(version, document)` pairs.
    pub fn from_documents(docs: impl IntoIterator<Item = (u64, Document)>) -> Self {
        let by_service = docs
            .into_iter()
            .filter_map(|(version, d)| match &d.body {
                Body::Resilience(r) => {
                    let mut p = Policy::compile(r);
                    p.version = version;
                    Some((d.name.clone(), Arc::new(p)))
                }
                _ => None,
            })
            .collect();
        Policies { by_service }
    }

    pub fn from_store(store: &PolicyStore) -> Self {
        Self::from_documents(
            store
                .all()
                .into_iter()
                .filter_map(|h| Some((h.doc.header.version, h.parsed?))),
        )
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
    fn a_breaker_admits_up_to_its_limit_and_again_as_soon_as_one_ends() {
        let b = Arc::new(Breaker::default());
        assert!(matches!(b.try_enter(Limit::Requests, None), Ok(None)));
        assert_eq!(b.count(Limit::Requests), 0, "no limit: nothing counted");
        let first = b.try_enter(Limit::Requests, Some(2));
        let second = b.try_enter(Limit::Requests, Some(2));
        assert!(matches!((&first, &second), (Ok(Some(_)), Ok(Some(_)))));
        assert_eq!(
            b.try_enter(Limit::Requests, Some(2)).err(),
            Some(Limit::Requests)
        );
        // The limits count apart.
        let pending = b.try_enter(Limit::Pending, Some(1));
        assert!(matches!(pending, Ok(Some(_))));
        assert_eq!(
            b.try_enter(Limit::Pending, Some(1)).err(),
            Some(Limit::Pending)
        );
        drop(first);
        assert_eq!(b.count(Limit::Requests), 1);
        assert!(matches!(b.try_enter(Limit::Requests, Some(2)), Ok(Some(_))));
        drop((second, pending));
        assert_eq!((b.count(Limit::Requests), b.count(Limit::Pending)), (0, 0));
        assert_eq!(Limit::Retries.name(), "max_retries");
    }

    #[test]
    fn a_breaker_never_admits_more_than_its_limit_from_many_threads() {
        let b = Arc::new(Breaker::default());
        let peak = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (b, peak) = (b.clone(), peak.clone());
                std::thread::spawn(move || {
                    for _ in 0..2_000 {
                        if let Ok(Some(_held)) = b.try_enter(Limit::Connections, Some(3)) {
                            peak.fetch_max(b.count(Limit::Connections), Ordering::AcqRel);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert!(peak.load(Ordering::Acquire) <= 3);
        assert_eq!(b.count(Limit::Connections), 0);
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
    fn policies_are_kept_by_service() {
        let doc = schema::parse(
            "kind = \"resilience\"\nname = \"api\"\ntimeout = \"1s\"\nrate_limit = { rps = 10 }\nretries = { attempts = 2 }",
        )
        .unwrap();
        let Body::Resilience(r) = &doc.body else {
            panic!()
        };
        assert!(r.rate_limit.is_some());
        let p = Policies::from_documents([(1, doc)]);
        assert!(p.get("api").is_some() && p.get("web").is_none());
    }

    #[test]
    fn retries_need_a_listed_condition_an_idempotent_method_and_attempts_left() {
        let p = policy(
            "kind = \"resilience\"\nname = \"api\"\nretries = { attempts = 3, on = [\"5xx\", \"reset\"] }",
        );
        assert!(p.retryable("GET", Failure::Status(503), 1));
        assert!(p.retryable("PUT", Failure::Reset, 2));
        assert!(
            !p.retryable("GET", Failure::Status(503), 3),
            "3 attempts made"
        );
        assert!(
            !p.retryable("POST", Failure::Status(503), 1),
            "not idempotent"
        );
        assert!(!p.retryable("GET", Failure::Status(404), 1));
        assert!(!p.retryable("GET", Failure::Connect, 1), "not listed");
        let gw = policy(
            "kind = \"resilience\"\nname = \"api\"\nretries = { attempts = 2, on = [\"gateway-error\", \"connect-failure\"] }",
        );
        assert!(gw.retryable("GET", Failure::Status(504), 1));
        assert!(!gw.retryable("GET", Failure::Status(500), 1));
        assert!(gw.retryable("GET", Failure::Connect, 1));
        assert!(
            !policy("kind = \"resilience\"\nname = \"api\"\ntimeout = \"1s\"").retryable(
                "GET",
                Failure::Connect,
                1
            )
        );
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_jitters_below_it() {
        assert_eq!(backoff(1, 1.0), Duration::from_millis(25));
        assert_eq!(backoff(2, 1.0), Duration::from_millis(50));
        assert_eq!(backoff(4, 1.0), Duration::from_millis(200));
        assert_eq!(backoff(9, 1.0), Duration::from_millis(250));
        assert_eq!(backoff(3, 0.5), Duration::from_millis(50));
        assert_eq!(backoff(3, 0.0), Duration::ZERO);
    }

    #[test]
    fn the_budget_holds_retries_to_the_ratio_plus_the_floor() {
        let mut b = Budget::new(0.2);
        // 1,000 requests a second for 30 s, every one wanting a retry.
        let mut granted = 0u64;
        for sec in 0..30 {
            for _ in 0..1000 {
                b.request(sec);
                if b.try_retry(sec) {
                    granted += 1;
                }
            }
        }
        // Per 10 s window: 20 % of 10,000 requests + 100 (the floor).
        assert!(granted <= 3 * 2100, "{granted}");
        assert!(granted >= 3 * 2000, "{granted}");
        // With no requests, the floor alone: 100 per window.
        let mut idle = Budget::new(0.2);
        let n = (0..1000).filter(|_| idle.try_retry(100)).count();
        assert_eq!(n, 100);
        // Old requests age out of the window.
        let mut old = Budget::new(0.5);
        for _ in 0..1000 {
            old.request(0);
        }
        assert_eq!((0..1000).filter(|_| old.try_retry(9)).count(), 600);
        assert_eq!((0..1000).filter(|_| old.try_retry(20)).count(), 100);
    }

    #[test]
    fn the_bucket_gives_its_burst_then_its_rate() {
        let limit = RateLimit {
            per_source: false,
            rps: 50.0,
            burst: 10,
        };
        let mut b = TokenBucket::new(&limit, Duration::ZERO);
        let burst = (0..100)
            .filter(|_| b.try_take(Duration::ZERO).is_ok())
            .count();
        assert_eq!(burst, 10);
        assert_eq!(
            b.try_take(Duration::ZERO),
            Err(Duration::from_millis(20)),
            "one token takes 1/50 s"
        );
        // Asked 1,000 times a second for 10 s: 500 more.
        let mut granted = 0;
        for ms in 1..=10_000u64 {
            if b.try_take(Duration::from_millis(ms)).is_ok() {
                granted += 1;
            }
        }
        assert_eq!(granted, 500);
        // A clock that steps back takes nothing and gives nothing.
        assert!(b.try_take(Duration::from_millis(5)).is_err());
        assert!(
            b.is_for(&limit)
                && !b.is_for(&RateLimit {
                    per_source: false,
                    rps: 50.0,
                    burst: 11
                })
        );
    }

    proptest! {
        /// Over any run, a bucket grants at most burst + rps x elapsed.
        #[test]
        fn a_bucket_never_grants_more_than_burst_plus_rate(
            rps in 0.5f64..1000.0,
            burst in 1u32..100,
            gaps in proptest::collection::vec(0u64..50, 1..300),
        ) {
            let limit = RateLimit { rps, burst, per_source: false };
            let mut b = TokenBucket::new(&limit, Duration::ZERO);
            let mut now = Duration::ZERO;
            let mut granted = 0u64;
            for g in gaps {
                now += Duration::from_millis(g);
                if b.try_take(now).is_ok() {
                    granted += 1;
                }
            }
            prop_assert!(granted as f64 <= f64::from(burst) + rps * now.as_secs_f64() + 1e-6);
        }

        /// Whatever the pattern of requests and retry wishes over time,
        /// the retries granted in any window stay within the floor plus
        /// ratio x the requests of that window and the one before (a retry
        /// granted late in a window was backed by requests that have aged
        /// out since).
        #[test]
        fn granted_retries_never_pass_the_budget(
            steps in proptest::collection::vec((0u64..3, 0u32..50, 0u32..50), 1..100),
            ratio in 0.0f64..1.0,
        ) {
            let mut b = Budget::new(ratio);
            let mut now = 0u64;
            let mut log: Vec<(u64, u64, u64)> = Vec::new(); // (second, requests, granted)
            for (advance, requests, wishes) in steps {
                now += advance;
                let mut granted = 0;
                for _ in 0..requests {
                    b.request(now);
                }
                for _ in 0..wishes {
                    if b.try_retry(now) {
                        granted += 1;
                    }
                }
                log.push((now, requests as u64, granted));
                let r: u64 = log
                    .iter()
                    .filter(|e| e.0 + Budget::WINDOW > now)
                    .map(|e| e.2)
                    .sum();
                let q: u64 = log
                    .iter()
                    .filter(|e| e.0 + 2 * Budget::WINDOW > now + 1)
                    .map(|e| e.1)
                    .sum();
                prop_assert!(r as f64 <= ratio * q as f64 + 100.0 + 1e-9, "{r} retries for {q} requests");
            }
        }

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
