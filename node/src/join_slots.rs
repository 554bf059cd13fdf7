//! Admission of anonymous join connections (sans-IO): machines without a
//! certificate reach the join protocol, so what they can hold is bounded.
//!
//! - At most `per_source` connections per source IP: a flood from one
//!   address is refused at once.
//! - At most `total` connections overall. When full, the *oldest idle*
//!   connection (one that has not started a request) is evicted to make room:
//!   a newcomer is always admitted, so a flood from many addresses cannot lock
//!   out a real joiner, which sends its request within milliseconds of its
//!   handshake; a flooder's idle connections are the ones that go.
//! - A connection that has started a request is not evicted; requests have
//!   their own deadline.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

/// What to do with a new anonymous connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    Yes,
    /// Admit it and close this older idle connection.
    Evict(u64),
    /// Refuse it: its source holds too many.
    PerSource,
    /// Refuse it: full of busy connections.
    Full,
}

#[derive(Debug)]
pub struct Slots {
    per_source: usize,
    total: usize,
    next: u64,
    /// id -> (source, busy); ids grow with arrival, so the map is oldest first.
    conns: BTreeMap<u64, (IpAddr, bool)>,
    by_source: HashMap<IpAddr, usize>,
}

impl Slots {
    pub fn new(per_source: usize, total: usize) -> Self {
        Self {
            per_source,
            total,
            next: 0,
            conns: BTreeMap::new(),
            by_source: HashMap::new(),
        }
    }

    /// Decides on a connection from `source`; on `Yes` or `Evict` it is
    /// admitted under the returned id (the evicted one is already removed).
    pub fn admit(&mut self, source: IpAddr) -> (Admit, Option<u64>) {
        if self.by_source.get(&source).copied().unwrap_or(0) >= self.per_source {
            return (Admit::PerSource, None);
        }
        let mut verdict = Admit::Yes;
        if self.conns.len() >= self.total {
            let oldest_idle = self
                .conns
                .iter()
                .find(|(_, (_, busy))| !busy)
                .map(|(id, _)| *id);
            match oldest_idle {
                Some(id) => {
                    self.remove(id);
                    verdict = Admit::Evict(id);
                }
                None => return (Admit::Full, None),
            }
        }
        let id = self.next;
        self.next += 1;
        self.conns.insert(id, (source, false));
        *self.by_source.entry(source).or_default() += 1;
        (verdict, Some(id))
    }

    /// The connection started a request: it is no longer evictable.
    pub fn busy(&mut self, id: u64) {
        if let Some((_, busy)) = self.conns.get_mut(&id) {
            *busy = true;
        }
    }

    /// The connection is gone (closed, evicted or finished).
    pub fn remove(&mut self, id: u64) {
        if let Some((source, _)) = self.conns.remove(&id) {
            if let Some(n) = self.by_source.get_mut(&source) {
                *n -= 1;
                if *n == 0 {
                    self.by_source.remove(&source);
                }
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.conns.len()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    #[test]
    fn one_source_is_capped_and_frees_its_slots() {
        let mut s = Slots::new(2, 100);
        let (_, a) = s.admit(ip(1));
        let (_, _b) = s.admit(ip(1));
        assert_eq!(s.admit(ip(1)), (Admit::PerSource, None));
        assert_eq!(s.admit(ip(2)).0, Admit::Yes, "other sources unaffected");
        s.remove(a.unwrap());
        assert_eq!(s.admit(ip(1)).0, Admit::Yes);
    }

    #[test]
    fn when_full_the_oldest_idle_connection_makes_room() {
        let mut s = Slots::new(10, 3);
        let ids: Vec<u64> = (1..=3).map(|n| s.admit(ip(n)).1.unwrap()).collect();
        s.busy(ids[0]);
        // Full: the oldest *idle* one (ids[1]) goes, the newcomer is in.
        assert_eq!(s.admit(ip(9)).0, Admit::Evict(ids[1]));
        assert_eq!(s.len(), 3);
        s.busy(ids[2]);
        let (v, newest) = s.admit(ip(8));
        assert!(matches!(v, Admit::Evict(_)));
        s.busy(newest.unwrap());
        // All busy: refused.
        assert_eq!(s.admit(ip(7)), (Admit::Full, None));
    }

    proptest! {
        /// Whatever happens, the caps hold and a newcomer from a fresh source
        /// is admitted unless every connection is busy.
        #[test]
        fn caps_hold(ops in proptest::collection::vec((0u8..6, 0u8..3), 1..300)) {
            let mut s = Slots::new(3, 8);
            let mut live: Vec<u64> = Vec::new();
            for (src, op) in ops {
                match op {
                    0 => {
                        let (v, id) = s.admit(ip(src));
                        if let Admit::Evict(old) = v { live.retain(|x| *x != old); }
                        if let Some(id) = id { live.push(id); }
                    }
                    1 => if let Some(id) = live.first().copied() { s.busy(id) },
                    _ => if let Some(id) = live.pop() { s.remove(id) },
                }
                prop_assert!(s.len() <= 8);
                prop_assert_eq!(s.len(), live.len());
                for n in s.by_source.values() { prop_assert!(*n <= 3); }
            }
            let all_busy = s.conns.values().all(|(_, b)| *b);
            let (v, _) = s.admit(ip(200));
            prop_assert!(v != Admit::PerSource);
            prop_assert_eq!(v == Admit::Full, all_busy && s.len() >= 8);
        }
    }
}
