//! Tracks open streams so shutdown can wait for them, up to a deadline.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

#[derive(Clone, Default)]
pub struct Drain {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    active: AtomicUsize,
    draining: AtomicBool,
    idle: Notify,
}

/// Held for the life of one stream.
pub struct Guard {
    inner: Arc<Inner>,
}

impl Drain {
    pub fn enter(&self) -> Guard {
        self.inner.active.fetch_add(1, Ordering::SeqCst);
        Guard {
            inner: self.inner.clone(),
        }
    }

    pub fn active(&self) -> usize {
        self.inner.active.load(Ordering::SeqCst)
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    /// Refuses new streams from now on and waits for open ones to finish.
    /// Returns how many were still open at the deadline.
    pub async fn drain(&self, deadline: Duration) -> usize {
        self.inner.draining.store(true, Ordering::SeqCst);
        let wait = async {
            loop {
                let idle = self.inner.idle.notified();
                if self.active() == 0 {
                    return;
                }
                idle.await;
            }
        };
        let _ = tokio::time::timeout(deadline, wait).await;
        self.active()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.inner.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.inner.idle.notify_waiters();
        }
    }
}
