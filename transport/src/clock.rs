//! The one module that reads the process's clocks. Everything else gets the
//! time from here (clippy's `disallowed-methods`, in `clippy.toml`, refuses
//! `Instant::now`, `SystemTime::now` and `elapsed` elsewhere), so decisions
//! take `now` as an argument and their tests pass any time they like; the
//! async shells read the clock here and hand it on.
#![allow(clippy::disallowed_methods)]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The monotonic clock.
pub fn now() -> Instant {
    Instant::now()
}

/// Time since `t` on the monotonic clock (zero if `t` is in the future).
pub fn since(t: Instant) -> Duration {
    Instant::now().saturating_duration_since(t)
}

/// tokio's monotonic clock (the one its timers and a paused test runtime use).
pub fn tokio_now() -> tokio::time::Instant {
    tokio::time::Instant::now()
}

/// Time since `t` on tokio's clock (zero if `t` is in the future).
pub fn tokio_since(t: tokio::time::Instant) -> Duration {
    tokio::time::Instant::now().saturating_duration_since(t)
}

/// The wall clock.
pub fn wall() -> SystemTime {
    SystemTime::now()
}

/// Unix seconds now (0 before 1970).
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clocks_move_forward() {
        let t = now();
        assert!(since(t) < Duration::from_secs(60));
        assert_eq!(since(t + Duration::from_secs(3600)), Duration::ZERO);
        assert!(unix_now() > 1_700_000_000);
        assert!(wall() >= UNIX_EPOCH);
    }
}
