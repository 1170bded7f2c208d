//! Rate-limited log lines for what a guest or a client can trigger at will.
//!
//! A guest that fills its disk makes every request fail; a hostile front end can send malformed
//! requests as fast as the daemon reads them. One log line per event would let it flood the
//! journal (1.2 million lines in 13 s were seen). Each call site of [`warn_limited!`] and
//! [`error_limited!`] logs its first [`BURST`] lines per [`INTERVAL`], then stays quiet; the
//! first line it logs in a later interval says how many it held back.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines a call site logs per interval before it holds back.
pub const BURST: u64 = 10;
/// The length of an interval.
pub const INTERVAL: Duration = Duration::from_secs(10);

#[doc(hidden)]
pub use log as __log;

/// The state of one call site.
#[derive(Debug)]
pub struct Limit {
    state: Mutex<Option<Window>>,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    logged: u64,
    held: u64,
}

impl Default for Limit {
    fn default() -> Self {
        Self::new()
    }
}

impl Limit {
    /// A call site that has logged nothing yet.
    pub const fn new() -> Limit {
        Limit {
            state: Mutex::new(None),
        }
    }

    /// Whether to log this line now; `Some(n)` means log it and mention the `n` lines held
    /// back since the last one logged.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut st = crate::sync::lock(&self.state);
        let w = st.get_or_insert(Window {
            start: now,
            logged: 0,
            held: 0,
        });
        if now.duration_since(w.start) >= INTERVAL {
            let held = w.held;
            *w = Window {
                start: now,
                logged: 1,
                held: 0,
            };
            return Some(held);
        }
        if w.logged < BURST {
            w.logged += 1;
            Some(0)
        } else {
            w.held += 1;
            None
        }
    }
}

/// Logs at `level` through a per-call-site [`Limit`].
#[macro_export]
macro_rules! log_limited {
    ($level:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::logging::Limit = $crate::logging::Limit::new();
        if $crate::logging::__log::log_enabled!($level) {
            match LIMIT.admit() {
                Some(0) => $crate::logging::__log::log!($level, $($arg)+),
                Some(held) => $crate::logging::__log::log!(
                    $level,
                    "{} ({held} more like this were not logged in the last {} s)",
                    format_args!($($arg)+),
                    $crate::logging::INTERVAL.as_secs()
                ),
                None => {}
            }
        }
    }};
}

/// `log::warn!`, at most [`BURST`] lines per [`INTERVAL`] from this call site.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => { $crate::log_limited!($crate::logging::__log::Level::Warn, $($arg)+) };
}

/// `log::error!`, at most [`BURST`] lines per [`INTERVAL`] from this call site.
#[macro_export]
macro_rules! error_limited {
    ($($arg:tt)+) => { $crate::log_limited!($crate::logging::__log::Level::Error, $($arg)+) };
}

/// `log::debug!`, at most [`BURST`] lines per [`INTERVAL`] from this call site.
#[macro_export]
macro_rules! debug_limited {
    ($($arg:tt)+) => { $crate::log_limited!($crate::logging::__log::Level::Debug, $($arg)+) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_quiet_then_a_count() {
        let l = Limit::new();
        let t0 = Instant::now();
        for i in 0..BURST {
            assert_eq!(l.admit_at(t0), Some(0), "line {i} of the burst");
        }
        for _ in 0..1000 {
            assert_eq!(l.admit_at(t0 + Duration::from_secs(1)), None);
        }
        assert_eq!(
            l.admit_at(t0 + INTERVAL),
            Some(1000),
            "the count of held lines"
        );
        for _ in 1..BURST {
            assert_eq!(l.admit_at(t0 + INTERVAL), Some(0));
        }
        assert_eq!(l.admit_at(t0 + INTERVAL), None);
        assert_eq!(l.admit_at(t0 + INTERVAL * 3), Some(1));
    }
}
