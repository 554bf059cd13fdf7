//! Admission of incoming QUIC handshakes (sans-IO: time is an argument).
//!
//! Every Initial costs the server a TLS handshake's state and CPU, and the
//! source address of an Initial is not proven. Three rules, in order:
//!
//! 1. At most `max_in_flight` handshakes at once: beyond, Initials are
//!    ignored (the client retries; a flood just loses its packets).
//! 2. Once more than `retry_above` handshakes are in flight, an Initial from
//!    an address that has not proven it receives our packets gets a
//!    stateless Retry instead of a handshake: spoofed floods cost one packet
//!    each and no state.
//! 3. Each source IP gets a token bucket of handshakes (`burst`, refilled at
//!    `per_second`): a single (validated) source cannot take every slot.
//!    The table of sources is bounded; when full, the stalest goes.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_in_flight: usize,
    pub retry_above: usize,
    pub per_second: f64,
    pub burst: f64,
    pub max_sources: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_in_flight: 512,
            retry_above: 32,
            per_second: 50.0,
            burst: 100.0,
            max_sources: 4096,
        }
    }
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Decision {
    Accept,
    Retry,
    /// Too many handshakes in flight.
    IgnoreBusy,
    /// This source is over its rate.
    IgnoreRate,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Accept => "accept",
            Decision::Retry => "retry",
            Decision::IgnoreBusy => "busy",
            Decision::IgnoreRate => "rate",
        }
    }
}

#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    in_flight: usize,
    /// ip -> (tokens, last refill)
    sources: HashMap<IpAddr, (f64, Duration)>,
}

impl Admission {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            in_flight: 0,
            sources: HashMap::new(),
        }
    }

    /// Decides on an Initial from `source`; `validated` when the client has
    /// proven its address (it answered our Retry). `now` is any monotonic
    /// clock. On `Accept` the caller must call [`Admission::done`] once the
    /// handshake ends, however it ends.
    pub fn decide(&mut self, source: IpAddr, validated: bool, now: Duration) -> Decision {
        if self.in_flight >= self.limits.max_in_flight {
            return Decision::IgnoreBusy;
        }
        if !validated && self.in_flight >= self.limits.retry_above {
            return Decision::Retry;
        }
        if !self.take_token(source, now) {
            return Decision::IgnoreRate;
        }
        self.in_flight += 1;
        Decision::Accept
    }

    pub fn done(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn take_token(&mut self, source: IpAddr, now: Duration) -> bool {
        let Limits {
            per_second,
            burst,
            max_sources,
            ..
        } = self.limits;
        if !self.sources.contains_key(&source) && self.sources.len() >= max_sources {
            // Forget the source that was refilled longest ago (a full bucket
            // by now, most likely, so forgetting it changes nothing).
            if let Some(stale) = self
                .sources
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(ip, _)| *ip)
            {
                self.sources.remove(&stale);
            }
        }
        let (tokens, last) = self.sources.entry(source).or_insert((burst, now));
        let elapsed = now.saturating_sub(*last).as_secs_f64();
        *tokens = (*tokens + elapsed * per_second).min(burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    fn small() -> Limits {
        Limits {
            max_in_flight: 4,
            retry_above: 2,
            per_second: 10.0,
            burst: 3.0,
            max_sources: 3,
        }
    }

    #[test]
    fn unvalidated_sources_get_a_retry_once_busy_and_everyone_waits_when_full() {
        let mut a = Admission::new(small());
        let t = Duration::ZERO;
        assert_eq!(a.decide(ip(1), false, t), Decision::Accept);
        assert_eq!(a.decide(ip(2), false, t), Decision::Accept);
        assert_eq!(a.decide(ip(3), false, t), Decision::Retry);
        assert_eq!(a.decide(ip(3), true, t), Decision::Accept);
        assert_eq!(a.decide(ip(4), true, t), Decision::Accept);
        assert_eq!(a.decide(ip(5), true, t), Decision::IgnoreBusy);
        a.done();
        assert_eq!(a.decide(ip(5), true, t), Decision::Accept);
        assert_eq!(a.in_flight(), 4);
    }

    #[test]
    fn one_source_is_rate_limited_and_refills_over_time() {
        let mut a = Admission::new(Limits {
            retry_above: 100,
            max_in_flight: 100,
            ..small()
        });
        let t = Duration::ZERO;
        for _ in 0..3 {
            assert_eq!(a.decide(ip(1), true, t), Decision::Accept);
        }
        assert_eq!(a.decide(ip(1), true, t), Decision::IgnoreRate);
        assert_eq!(
            a.decide(ip(2), true, t),
            Decision::Accept,
            "others unaffected"
        );
        // 10/s: one token after 100 ms.
        assert_eq!(
            a.decide(ip(1), true, Duration::from_millis(100)),
            Decision::Accept
        );
        assert_eq!(
            a.decide(ip(1), true, Duration::from_millis(100)),
            Decision::IgnoreRate
        );
    }

    proptest! {
        #[test]
        fn bounds_hold_under_any_sequence(
            ops in proptest::collection::vec((0u8..20, any::<bool>(), 0u64..50, any::<bool>()), 1..400)
        ) {
            let mut a = Admission::new(small());
            let mut t = Duration::ZERO;
            let mut accepted = 0usize;
            for (src, validated, dt, finish) in ops {
                t += Duration::from_millis(dt);
                if finish && accepted > 0 {
                    a.done();
                    accepted -= 1;
                    continue;
                }
                let d = a.decide(ip(src), validated, t);
                if d == Decision::Accept { accepted += 1; }
                if d == Decision::Accept && !validated {
                    prop_assert!(a.in_flight() <= small().retry_above);
                }
                prop_assert!(a.in_flight() <= small().max_in_flight);
                prop_assert!(a.sources.len() <= small().max_sources);
                prop_assert_eq!(a.in_flight(), accepted);
            }
        }
    }
}
