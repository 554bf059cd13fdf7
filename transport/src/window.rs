//! Connection receive windows sized to the path.
//!
//! Everything between two nodes shares one QUIC connection, and everything
//! that reaches a node shares its one UDP socket. A connection receive window
//! far above the path's bandwidth-delay product lets a bulk stream keep that
//! much data in flight: on a LAN it piles up in the receiver's socket queue
//! (208 KB by default on Linux), overflows it, and every other stream of the
//! pair waits behind it or behind the loss recovery that follows. Measured on
//! loopback, a 64-byte round trip beside one bulk stream took 0.6-1.0 ms at
//! p50 with a 16 MiB window and 0.09-0.12 ms with 512 KiB, and bulk
//! throughput went up, not down (BENCHMARKS.md, "Mixed traffic").
//!
//! A WAN path needs the large window, so each connection starts at
//! [`MIN_RECEIVE_WINDOW`] and is retuned every [`RETUNE_EVERY`] to the
//! bandwidth-delay product of its minimum RTT at [`TARGET_RATE`], within
//! [`MIN_RECEIVE_WINDOW`]..=[`MAX_RECEIVE_WINDOW`]. The minimum RTT, not the
//! smoothed one: queueing inflates the smoothed RTT, and a window that grows
//! with it grows the queue that inflated it.

use std::time::Duration;

use quinn::VarInt;
use tracing::debug;

/// The floor: enough for full speed on loopback and LANs with some
/// scheduling slack (0.4 ms of data at 10 Gbit/s).
pub const MIN_RECEIVE_WINDOW: u32 = 512 * 1024;
/// The ceiling, which bounds the unread data a peer can make us hold on one
/// connection: 10 Gbit/s up to 13 ms RTT, 1.3 Gbit/s at 100 ms.
pub const MAX_RECEIVE_WINDOW: u32 = 16 * 1024 * 1024;
/// The rate, in bytes per second, a connection's window is sized for: 10 Gbit/s.
pub const TARGET_RATE: u64 = 1_250_000_000;
/// How often a connection's window follows its minimum RTT (the endpoint's
/// once-a-second sweep of its connections). A connection is first retuned
/// when at least this old: its handshake's RTT samples include the signature
/// work on both sides.
pub const RETUNE_EVERY: Duration = Duration::from_secs(1);

/// The connection receive window for a path whose minimum RTT is `min_rtt`.
pub fn receive_window(min_rtt: Duration) -> u32 {
    let bdp = min_rtt.as_nanos().saturating_mul(u128::from(TARGET_RATE)) / 1_000_000_000;
    let clamped = bdp.clamp(
        u128::from(MIN_RECEIVE_WINDOW),
        u128::from(MAX_RECEIVE_WINDOW),
    );
    u32::try_from(clamped).unwrap_or(MAX_RECEIVE_WINDOW)
}

/// Sets `conn`'s receive window to [`receive_window`] of its minimum RTT when
/// that differs from `applied`, the window it has; returns the window it has now.
pub(crate) fn retune(conn: &quinn::Connection, applied: u32) -> u32 {
    let min_rtt = conn.stats().path.min_rtt;
    let want = receive_window(min_rtt);
    if want != applied {
        debug!(remote = %conn.remote_address(), ?min_rtt, window = want, "connection receive window");
        conn.set_receive_window(VarInt::from_u32(want));
    }
    want
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_lan_paths_get_the_floor() {
        assert_eq!(receive_window(Duration::ZERO), MIN_RECEIVE_WINDOW);
        assert_eq!(
            receive_window(Duration::from_micros(50)),
            MIN_RECEIVE_WINDOW
        );
        assert_eq!(
            receive_window(Duration::from_micros(400)),
            MIN_RECEIVE_WINDOW
        );
    }

    #[test]
    fn the_window_follows_the_bandwidth_delay_product_in_between() {
        assert_eq!(receive_window(Duration::from_millis(1)), 1_250_000);
        assert_eq!(receive_window(Duration::from_millis(10)), 12_500_000);
    }

    #[test]
    fn wan_paths_stop_at_the_ceiling() {
        assert_eq!(
            receive_window(Duration::from_millis(14)),
            MAX_RECEIVE_WINDOW
        );
        assert_eq!(receive_window(Duration::from_secs(3)), MAX_RECEIVE_WINDOW);
        assert_eq!(receive_window(Duration::MAX), MAX_RECEIVE_WINDOW);
    }

    #[test]
    fn the_window_never_shrinks_as_the_rtt_grows() {
        let mut last = 0;
        for us in (0..20_000).step_by(37) {
            let w = receive_window(Duration::from_micros(us));
            assert!(w >= last, "{us} us: {w} < {last}");
            last = w;
        }
    }
}
