//! Outlier detection: instances that keep failing are ejected for a while.
//! Always on. Pure: the caller passes `now`.
//!
//! Three causes (`Cause`): consecutive connect failures (any attempt,
//! TCP or HTTP), and for HTTP responses consecutive 5xx and consecutive
//! slow responses. The two response causes are bounded: they never eject
//! more than [`MAX_EJECTED_SHARE`] of a cluster's instances of a service
//! (at least one), so a bad deploy or a slow dependency shared by every
//! instance cannot empty the cluster. Connect failures are not bounded:
//! an instance that cannot be reached takes nothing anyway.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

/// Consecutive connect failures that eject an instance.
pub const CONSECUTIVE_FAILURES: u32 = 3;
/// Consecutive 5xx responses that eject an instance (Envoy's default).
pub const CONSECUTIVE_5XX: u32 = 5;
/// Consecutive slow responses that eject an instance.
pub const CONSECUTIVE_SLOW: u32 = 5;
/// A response is slow when it took at least this long...
pub const SLOW_FLOOR: Duration = Duration::from_millis(100);
/// ...and this many times the median latency estimate of the instance's
/// peers (those with an estimate).
pub const SLOW_FACTOR: f64 = 5.0;
/// The largest share of a cluster's instances of a service that 5xx and
/// latency may hold ejected at once (at least one instance).
pub const MAX_EJECTED_SHARE: f64 = 0.5;
/// First ejection; each further ejection in a row doubles it.
pub const BASE_EJECTION: Duration = Duration::from_secs(5);
pub const MAX_EJECTION: Duration = Duration::from_secs(60);

/// Instances are named by (node, port).
pub type Key = (String, u16);

#[derive(Default)]
pub struct Outliers {
    states: HashMap<Key, State>,
}

#[derive(Default)]
struct State {
    failures: u32,
    server_errors: u32,
    slow: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
    /// The ejection is for bad responses, which a reachable instance can
    /// still give: reaching it does not end the ejection.
    by_responses: bool,
}

/// Why an instance was ejected (the `cause` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    Connect,
    ServerErrors,
    Latency,
}

impl Cause {
    pub fn label(self) -> &'static str {
        match self {
            Cause::Connect => "connect",
            Cause::ServerErrors => "5xx",
            Cause::Latency => "latency",
        }
    }
}

/// Whether a response that took `rtt` is slow beside `peers`, the latency
/// estimates (nanoseconds) of the other instances: never alone, or with
/// no estimate to compare.
pub fn is_slow(rtt: Duration, peers: &mut [f64]) -> bool {
    if rtt < SLOW_FLOOR || peers.is_empty() {
        return false;
    }
    peers.sort_by(f64::total_cmp);
    let median = peers[peers.len() / 2];
    rtt.as_nanos() as f64 > SLOW_FACTOR * median
}

impl State {
    /// Ejects now, for a period that doubles with each ejection in a row.
    fn eject(&mut self, now: Instant) -> Duration {
        self.ejections += 1;
        let period = BASE_EJECTION
            .saturating_mul(1 << (self.ejections - 1).min(16))
            .min(MAX_EJECTION);
        self.ejected_until = Some(now + period);
        period
    }
}

// === impl Outliers ===

impl Outliers {
    pub fn is_ejected(&self, key: &Key, now: Instant) -> bool {
        self.states
            .get(key)
            .and_then(|s| s.ejected_until)
            .is_some_and(|until| now < until)
    }

    /// Ejected for connect failures: only such an ejection sends traffic
    /// to another cluster before the instance (bad answers only move it
    /// after its own cluster's other instances).
    pub fn is_unreachable(&self, key: &Key, now: Instant) -> bool {
        self.states
            .get(key)
            .is_some_and(|s| !s.by_responses && s.ejected_until.is_some_and(|until| now < until))
    }

    /// Drops the state of instances whose ejection ended more than
    /// [`MAX_EJECTION`] ago and that failed no more since (gone or healed
    /// without a success seen here).
    pub fn prune(&mut self, now: Instant) {
        self.states.retain(|_, s| {
            s.failures > 0
                || s.server_errors > 0
                || s.slow > 0
                || s.ejected_until.is_some_and(|u| now < u + MAX_EJECTION)
        });
    }

    pub fn len(&self) -> usize {
        self.states.len()
    }

    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }

    /// An attempt reached the instance: its connect failures are
    /// forgotten, and so is an ejection for them (it is taking requests
    /// again); an ejection for bad responses runs its course.
    pub fn handle_success(&mut self, key: &Key) {
        if let Some(s) = self.states.get_mut(key) {
            s.failures = 0;
            if !s.by_responses {
                s.ejected_until = None;
                if s.server_errors == 0 && s.slow == 0 {
                    self.states.remove(key);
                }
            }
        }
    }

    /// Returns the ejection period when this failure ejects the instance.
    pub fn handle_failure(&mut self, key: &Key, now: Instant) -> Option<Duration> {
        let s = self.states.entry(key.clone()).or_default();
        if s.ejected_until.is_some_and(|until| now < until) {
            return None;
        }
        s.failures += 1;
        if s.failures < CONSECUTIVE_FAILURES {
            return None;
        }
        s.failures = 0;
        s.by_responses = false;
        Some(s.eject(now))
    }

    /// One HTTP response of an instance of this cluster: `server_error`
    /// (5xx) and `slow` ([`is_slow`]) count towards their ejections, any
    /// other response resets its count. `peers`: the cluster's instances
    /// of the service, this one included (asked only when an ejection is
    /// due, for the [`MAX_EJECTED_SHARE`] bound). Returns the period and
    /// cause when this response ejects the instance.
    pub fn handle_response(
        &mut self,
        key: &Key,
        server_error: bool,
        slow: bool,
        now: Instant,
        peers: impl FnOnce() -> Vec<Key>,
    ) -> Option<(Duration, Cause)> {
        if !server_error && !slow {
            // The common case: no entry, nothing to do.
            if let Some(s) = self.states.get_mut(key) {
                s.server_errors = 0;
                s.slow = 0;
                if s.failures == 0 && s.ejected_until.is_none() && s.ejections == 0 {
                    self.states.remove(key);
                }
            }
            return None;
        }
        let s = self.states.entry(key.clone()).or_default();
        if s.ejected_until.is_some_and(|until| now < until) {
            return None;
        }
        s.server_errors = if server_error { s.server_errors + 1 } else { 0 };
        s.slow = if slow { s.slow + 1 } else { 0 };
        let cause = if s.server_errors >= CONSECUTIVE_5XX {
            Cause::ServerErrors
        } else if s.slow >= CONSECUTIVE_SLOW {
            Cause::Latency
        } else {
            return None;
        };
        let peers = peers();
        let allowed = ((peers.len() as f64 * MAX_EJECTED_SHARE) as usize).max(1);
        let ejected = peers
            .iter()
            .filter(|p| *p != key && self.is_ejected(p, now))
            .count();
        if ejected + 1 > allowed {
            // The bound holds: the count stays at its threshold, so the
            // next bad response asks again.
            return None;
        }
        let s = self.states.entry(key.clone()).or_default();
        s.server_errors = 0;
        s.slow = 0;
        s.by_responses = true;
        Some((s.eject(now), cause))
    }

    /// Forgets instances that are no longer in the catalog.
    pub fn retain(&mut self, keep: impl Fn(&Key) -> bool) {
        self.states.retain(|k, _| keep(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejects_after_consecutive_failures_with_growing_backoff() {
        let mut o = Outliers::default();
        let k: Key = ("a".into(), 1);
        let t0 = meshnode_transport::clock::tokio_now();
        assert_eq!(o.handle_failure(&k, t0), None);
        assert_eq!(o.handle_failure(&k, t0), None);
        assert_eq!(o.handle_failure(&k, t0), Some(BASE_EJECTION));
        assert!(o.is_ejected(&k, t0 + Duration::from_secs(4)));
        assert!(!o.is_ejected(&k, t0 + BASE_EJECTION));
        let t1 = t0 + BASE_EJECTION;
        for _ in 0..2 {
            assert_eq!(o.handle_failure(&k, t1), None);
        }
        assert_eq!(o.handle_failure(&k, t1), Some(BASE_EJECTION * 2));
        // Backoff is capped.
        let mut t = t1;
        for _ in 0..10 {
            t += MAX_EJECTION;
            for _ in 0..3 {
                o.handle_failure(&k, t);
            }
        }
        assert!(!o.is_ejected(&k, t + MAX_EJECTION));
    }

    #[test]
    fn state_of_instances_long_past_their_ejection_is_pruned() {
        let mut o = Outliers::default();
        let t0 = meshnode_transport::clock::tokio_now();
        let (gone, failing): (Key, Key) = (("gone".into(), 1), ("failing".into(), 1));
        for _ in 0..CONSECUTIVE_FAILURES {
            o.handle_failure(&gone, t0);
        }
        o.handle_failure(&failing, t0);
        o.prune(t0 + BASE_EJECTION);
        assert_eq!(o.len(), 2, "within the window: kept");
        o.prune(t0 + BASE_EJECTION + MAX_EJECTION);
        assert_eq!(
            o.len(),
            1,
            "the ejected one is forgotten, the counting one kept"
        );
        assert!(!o.is_ejected(&gone, t0 + BASE_EJECTION + MAX_EJECTION));
    }

    fn keys(n: usize) -> Vec<Key> {
        (0..n).map(|i| (format!("n{i}"), 80)).collect()
    }

    #[test]
    fn consecutive_5xx_eject_and_a_good_response_resets_the_count() {
        let mut o = Outliers::default();
        let peers = keys(3);
        let t0 = meshnode_transport::clock::tokio_now();
        let k = &peers[0];
        for _ in 0..CONSECUTIVE_5XX - 1 {
            assert_eq!(
                o.handle_response(k, true, false, t0, || peers.clone()),
                None
            );
        }
        assert_eq!(
            o.handle_response(k, false, false, t0, || peers.clone()),
            None
        );
        for _ in 0..CONSECUTIVE_5XX - 1 {
            assert_eq!(
                o.handle_response(k, true, false, t0, || peers.clone()),
                None
            );
        }
        assert!(!o.is_ejected(k, t0));
        assert_eq!(
            o.handle_response(k, true, false, t0, || peers.clone()),
            Some((BASE_EJECTION, Cause::ServerErrors))
        );
        assert!(o.is_ejected(k, t0));
        o.handle_success(k);
        assert!(o.is_ejected(k, t0), "reaching it does not end the ejection");
        // Slow responses eject the same way.
        let slow = &peers[1];
        let t1 = t0 + BASE_EJECTION;
        for _ in 0..CONSECUTIVE_SLOW - 1 {
            assert_eq!(
                o.handle_response(slow, false, true, t1, || peers.clone()),
                None
            );
        }
        assert_eq!(
            o.handle_response(slow, false, true, t1, || peers.clone()),
            Some((BASE_EJECTION, Cause::Latency))
        );
    }

    #[test]
    fn responses_never_eject_more_than_the_share_of_a_cluster() {
        let t0 = meshnode_transport::clock::tokio_now();
        for (n, bound) in [(1, 1), (2, 1), (3, 1), (4, 2), (10, 5)] {
            let mut o = Outliers::default();
            let peers = keys(n);
            // Every instance fails: only `bound` of them are ejected.
            for _ in 0..3 * CONSECUTIVE_5XX {
                for k in &peers {
                    o.handle_response(k, true, false, t0, || peers.clone());
                }
            }
            let ejected = peers.iter().filter(|k| o.is_ejected(k, t0)).count();
            assert_eq!(ejected, bound, "{n} instances");
            // Connect failures are not bounded.
            for k in &peers {
                for _ in 0..CONSECUTIVE_FAILURES {
                    o.handle_failure(k, t0);
                }
            }
            assert!(peers.iter().all(|k| o.is_ejected(k, t0)));
        }
    }

    #[test]
    fn a_response_is_slow_only_against_faster_peers() {
        let ms = |m: f64| m * 1e6;
        assert!(!is_slow(Duration::from_millis(300), &mut []));
        assert!(is_slow(Duration::from_millis(300), &mut [ms(2.0), ms(3.0)]));
        assert!(!is_slow(
            Duration::from_millis(300),
            &mut [ms(2.0), ms(100.0), ms(70.0)]
        ));
        // Below the floor nothing is slow.
        assert!(!is_slow(Duration::from_millis(50), &mut [ms(0.1)]));
    }

    #[test]
    fn a_success_resets_the_count() {
        let mut o = Outliers::default();
        let k: Key = ("a".into(), 1);
        let t0 = meshnode_transport::clock::tokio_now();
        o.handle_failure(&k, t0);
        o.handle_failure(&k, t0);
        o.handle_success(&k);
        assert_eq!(o.handle_failure(&k, t0), None);
        assert!(!o.is_ejected(&k, t0));
    }
}
