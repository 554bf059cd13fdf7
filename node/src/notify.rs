//! systemd's service notification protocol (`Type=notify`, `WatchdogSec=`),
//! spoken directly: one datagram per message to `$NOTIFY_SOCKET`.
//!
//! `READY=1` goes out once the node has joined its pool; `WATCHDOG=1` every half
//! `$WATCHDOG_USEC` while gossip answers; `STOPPING=1` when shutdown begins.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use tracing::{debug, warn};

pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace);
    /// `None` when not started by systemd (or the variable is unusable).
    pub fn from_env() -> Option<Notifier> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        let path = path.to_str()?;
        let addr = if let Some(name) = path.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name.as_bytes()).ok()?
        } else {
            SocketAddr::from_pathname(path).ok()?
        };
        let socket = UnixDatagram::unbound()
            .map_err(|e| warn!(error = %e, "NOTIFY_SOCKET is set but no socket can be made"))
            .ok()?;
        Some(Notifier { socket, addr })
    }

    pub fn send(&self, message: &str) {
        if let Err(e) = self.socket.send_to_addr(message.as_bytes(), &self.addr) {
            debug!(error = %e, message, "sd_notify failed");
        }
    }
}

/// Half the watchdog period systemd asks for, if it asks us (and not another pid).
pub fn watchdog_interval() -> Option<Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}
