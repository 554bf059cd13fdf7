//! Peak-EWMA of response latency per instance, the balancer cost of
//! linkerd2-proxy (and Finagle): a slow response raises the estimate at
//! once, fast ones bring it down with a 10 s decay. Pure: time is an
//! argument.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::outlier::Key;

/// How fast old samples fade: the weight of a sample `dt` old is `e^(-dt/DECAY)`.
pub const DECAY: Duration = Duration::from_secs(10);
/// The estimate of an instance with no sample yet: low, so new instances
/// are tried (and measured) soon.
pub const DEFAULT_RTT: Duration = Duration::from_millis(1);
/// Estimates not updated for this long are dropped.
pub const FORGET_AFTER: Duration = Duration::from_secs(60);

#[derive(Default)]
pub struct Latencies {
    map: HashMap<Key, Entry>,
}

struct Entry {
    /// Nanoseconds.
    ewma: f64,
    at: Instant,
}

impl Latencies {
    /// One response's latency.
    pub fn observe(&mut self, key: &Key, rtt: Duration, now: Instant) {
        let sample = rtt.as_nanos() as f64;
        match self.map.get_mut(key) {
            Some(e) => {
                if sample > e.ewma {
                    e.ewma = sample;
                } else {
                    let dt = now.saturating_duration_since(e.at).as_secs_f64();
                    let w = (-dt / DECAY.as_secs_f64()).exp();
                    e.ewma = e.ewma * w + sample * (1.0 - w);
                }
                e.at = now;
            }
            None => {
                self.map.insert(
                    key.clone(),
                    Entry {
                        ewma: sample,
                        at: now,
                    },
                );
            }
        }
    }

    /// The estimate for `key` in nanoseconds.
    pub fn estimate(&self, key: &Key) -> f64 {
        self.map
            .get(key)
            .map_or(DEFAULT_RTT.as_nanos() as f64, |e| e.ewma)
    }

    /// The estimate for `key` at `now`, if it has one: it decays towards
    /// zero while no sample comes (as tower's and Finagle's peak-EWMA), so
    /// an instance the balancer stopped choosing after a slow answer is
    /// tried again, instead of waiting for [`FORGET_AFTER`].
    pub fn known(&self, key: &Key, now: Instant) -> Option<f64> {
        self.map.get(key).map(|e| {
            let idle = now.saturating_duration_since(e.at).as_secs_f64();
            e.ewma * (-idle / DECAY.as_secs_f64()).exp()
        })
    }

    /// The balancer's cost at `now` of sending one more request: the
    /// decayed estimate ([`Latencies::known`], else [`DEFAULT_RTT`]) times
    /// the requests in flight plus this one.
    pub fn cost(&self, key: &Key, outstanding: u64, now: Instant) -> u64 {
        let estimate = self
            .known(key, now)
            .unwrap_or(DEFAULT_RTT.as_nanos() as f64);
        (estimate * (outstanding + 1) as f64).min(u64::MAX as f64) as u64
    }

    /// Drops estimates not updated for [`FORGET_AFTER`] (instances gone).
    pub fn prune(&mut self, now: Instant) {
        self.map
            .retain(|_, e| now.saturating_duration_since(e.at) < FORGET_AFTER);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn key(n: &str) -> Key {
        (n.to_string(), 80)
    }

    #[test]
    fn a_slow_response_counts_at_once_and_fades_with_fast_ones() {
        let t0 = meshnode_transport::clock::tokio_now();
        let mut l = Latencies::default();
        let k = key("a");
        assert_eq!(l.estimate(&k), 1e6, "unknown: the default");
        l.observe(&k, Duration::from_millis(2), t0);
        l.observe(
            &k,
            Duration::from_millis(50),
            t0 + Duration::from_millis(10),
        );
        assert_eq!(l.estimate(&k), 50e6, "peak: at once");
        let t1 = t0 + Duration::from_millis(10);
        l.observe(&k, Duration::from_millis(2), t1 + DECAY);
        let e = l.estimate(&k);
        // One decay constant later, the old peak keeps weight 1/e.
        assert!(
            (e - (50e6 / std::f64::consts::E + 2e6 * (1.0 - 1.0 / std::f64::consts::E))).abs()
                < 1e3,
            "{e}"
        );
        for i in 0..100 {
            l.observe(
                &k,
                Duration::from_millis(2),
                t0 + Duration::from_secs(11 + i),
            );
        }
        assert!(l.estimate(&k) < 2.1e6);
    }

    #[test]
    fn cost_grows_with_requests_in_flight_and_old_estimates_are_forgotten() {
        let t0 = meshnode_transport::clock::tokio_now();
        let mut l = Latencies::default();
        l.observe(&key("fast"), Duration::from_millis(1), t0);
        l.observe(&key("slow"), Duration::from_millis(10), t0);
        assert!(l.cost(&key("fast"), 0, t0) < l.cost(&key("slow"), 0, t0));
        // Nine requests waiting on the fast one make it as costly as the slow one.
        assert_eq!(l.cost(&key("fast"), 9, t0), l.cost(&key("slow"), 0, t0));
        // Left alone, the slow one's estimate decays: after 3 decay
        // constants without a sample it costs less than the fast one did.
        let later = t0 + DECAY * 3;
        assert!(l.cost(&key("slow"), 0, later) < l.cost(&key("fast"), 0, t0));
        l.observe(
            &key("fast"),
            Duration::from_millis(1),
            t0 + Duration::from_secs(59),
        );
        l.prune(t0 + Duration::from_secs(61));
        assert_eq!(l.len(), 1);
        assert_eq!(l.estimate(&key("slow")), 1e6);
    }

    proptest! {
        /// The estimate always lies between the smallest and largest sample.
        #[test]
        fn the_estimate_stays_within_the_samples(samples in proptest::collection::vec((1u64..1_000_000, 0u64..20_000), 1..50)) {
            let mut l = Latencies::default();
            let k = key("a");
            let mut now = meshnode_transport::clock::tokio_now();
            for (us, gap) in &samples {
                now += Duration::from_millis(*gap);
                l.observe(&k, Duration::from_micros(*us), now);
            }
            let lo = samples.iter().map(|s| s.0).min().unwrap_or(0) as f64 * 1e3;
            let hi = samples.iter().map(|s| s.0).max().unwrap_or(0) as f64 * 1e3;
            let e = l.estimate(&k);
            prop_assert!(e >= lo - 1.0 && e <= hi + 1.0);
        }
    }
}
