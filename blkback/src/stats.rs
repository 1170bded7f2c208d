//! Per-queue counters, updated by the queue's worker and read by the control socket.

use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Value, json};

/// Counters of one queue. Relaxed atomics: each is written by one worker thread.
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Requests completed (any type, any status).
    pub requests: AtomicU64,
    /// Reads completed successfully.
    pub reads: AtomicU64,
    /// Bytes read.
    pub read_bytes: AtomicU64,
    /// Writes completed successfully.
    pub writes: AtomicU64,
    /// Bytes written.
    pub write_bytes: AtomicU64,
    /// Flushes completed successfully.
    pub flushes: AtomicU64,
    /// Discards completed successfully.
    pub discards: AtomicU64,
    /// Write-zeroes completed successfully.
    pub write_zeroes: AtomicU64,
    /// Requests answered IOERR.
    pub errors: AtomicU64,
    /// Requests answered UNSUPP.
    pub unsupported: AtomicU64,
    /// Requests in flight now.
    pub in_flight: AtomicU64,
    /// Requests resubmitted after a restart (left in flight by a crashed predecessor).
    pub resubmitted: AtomicU64,
}

impl QueueStats {
    /// Adds `n` to a counter.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// The counters as JSON.
    pub fn to_json(&self) -> Value {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "requests": g(&self.requests),
            "reads": g(&self.reads),
            "read_bytes": g(&self.read_bytes),
            "writes": g(&self.writes),
            "write_bytes": g(&self.write_bytes),
            "flushes": g(&self.flushes),
            "discards": g(&self.discards),
            "write_zeroes": g(&self.write_zeroes),
            "errors": g(&self.errors),
            "unsupported": g(&self.unsupported),
            "in_flight": g(&self.in_flight),
            "resubmitted": g(&self.resubmitted),
        })
    }
}
