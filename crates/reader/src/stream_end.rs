//! The stream's last position, as far as a reader needs it: to answer at once a read that
//! waits for a position the stream does not hold (yet), instead of holding it for the whole
//! `min_position` bound.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use eventlog::EventLog;
use tokio::sync::Mutex;

const REFRESH_TIMEOUT: Duration = Duration::from_secs(1);

pub struct StreamEnd {
    log: EventLog,
    last: AtomicU64,
    /// When the last *successful* lookup started: reads that asked before it share its answer.
    looked_up: Mutex<Option<Instant>>,
}

impl StreamEnd {
    pub fn new(log: EventLog) -> Self {
        Self {
            log,
            last: AtomicU64::new(0),
            looked_up: Mutex::new(None),
        }
    }

    /// The stream's last position if `position` lies beyond it, from a lookup that started
    /// after this call (so any position acknowledged before the call is within it: a false
    /// "beyond" would break read-your-writes). Concurrent calls share one lookup. `None` when
    /// it does not lie beyond, or when the stream's end is unknown (NATS down since the start).
    pub async fn beyond(&self, position: u64) -> Option<u64> {
        if position <= self.last.load(Ordering::Acquire) {
            return None;
        }
        let asked = Instant::now();
        let mut looked_up = self.looked_up.lock().await;
        if looked_up.is_none_or(|started| started < asked) {
            let started = Instant::now();
            if let Ok(Ok(last)) =
                tokio::time::timeout(REFRESH_TIMEOUT, self.log.last_position()).await
            {
                self.last.fetch_max(last, Ordering::AcqRel);
                *looked_up = Some(started);
            }
        }
        // Only a lookup that started after the question answers it: a failed one (NATS
        // unreachable) leaves the read to wait as usual.
        let fresh = looked_up.is_some_and(|started| started >= asked);
        let last = self.last.load(Ordering::Acquire);
        (fresh && position > last).then_some(last)
    }
}
