//! Outlier detection: instances that keep failing are ejected for a while.
//! Always on. Pure: the caller passes `now`.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

/// Consecutive connect failures that eject an instance.
pub const CONSECUTIVE_FAILURES: u32 = 3;
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
    ejections: u32,
    ejected_until: Option<Instant>,
}

// === impl Outliers ===

impl Outliers {
    pub fn is_ejected(&self, key: &Key, now: Instant) -> bool {
        self.states
            .get(key)
            .and_then(|s| s.ejected_until)
            .is_some_and(|until| now < until)
    }

    /// Drops the state of instances whose ejection ended more than
    /// [`MAX_EJECTION`] ago and that failed no more since (gone or healed
    /// without a success seen here).
    pub fn prune(&mut self, now: Instant) {
        self.states.retain(|_, s| {
            s.failures > 0 || s.ejected_until.is_some_and(|u| now < u + MAX_EJECTION)
        });
    }

    pub fn len(&self) -> usize {
        self.states.len()
    }

    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }

    pub fn handle_success(&mut self, key: &Key) {
        self.states.remove(key);
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
        s.ejections += 1;
        let period = BASE_EJECTION
            .saturating_mul(1 << (s.ejections - 1).min(16))
            .min(MAX_EJECTION);
        s.ejected_until = Some(now + period);
        Some(period)
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
