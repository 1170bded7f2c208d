//! Per-queue counters and latency histograms, updated by the queue's worker and read by the
//! control socket (merged there; no lock on the data path).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::Value;
use vback_api::{AtomicHistogram, BlockQueueStats, LabeledHistogram};
use vback_block::ErrorKind;

/// The request types latency is recorded for, in [`QueueStats::latency`]'s order, by their
/// `op` label.
pub const OPS: [&str; 5] = ["read", "write", "flush", "discard", "write-zeroes"];

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
    /// Requests the storage failed, by the error's kind (indexed by `ErrorKind as usize`).
    pub errors_by_kind: [AtomicU64; ErrorKind::ALL.len()],
    /// Latency from pop to used-ring publish of the requests the storage carried out
    /// (successful or not), in nanoseconds, by type ([`OPS`]).
    pub latency: [AtomicHistogram; OPS.len()],
}

impl QueueStats {
    /// Adds `n` to a counter.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// The counters, typed.
    pub fn snapshot(&self) -> BlockQueueStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let errors_by_kind: BTreeMap<String, u64> = ErrorKind::ALL
            .iter()
            .zip(&self.errors_by_kind)
            .filter_map(|(k, c)| Some((k.name().to_owned(), g(c))).filter(|(_, n)| *n > 0))
            .collect();
        BlockQueueStats {
            requests: g(&self.requests),
            reads: g(&self.reads),
            read_bytes: g(&self.read_bytes),
            writes: g(&self.writes),
            write_bytes: g(&self.write_bytes),
            flushes: g(&self.flushes),
            discards: g(&self.discards),
            write_zeroes: g(&self.write_zeroes),
            errors: g(&self.errors),
            unsupported: g(&self.unsupported),
            in_flight: g(&self.in_flight),
            resubmitted: g(&self.resubmitted),
            errors_by_kind,
        }
    }

    /// The counters as JSON.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self.snapshot()).unwrap_or(Value::Null)
    }

    /// The queue's non-empty latency histograms, labelled with `queue` and `op`.
    pub fn histograms(&self, queue: usize) -> Vec<LabeledHistogram> {
        OPS.iter()
            .zip(&self.latency)
            .filter_map(|(op, h)| {
                let histogram = h.snapshot();
                (histogram.count > 0).then(|| LabeledHistogram {
                    name: "latency_ns".into(),
                    labels: BTreeMap::from([
                        ("queue".to_owned(), queue.to_string()),
                        ("op".to_owned(), (*op).to_owned()),
                    ]),
                    histogram,
                })
            })
            .collect()
    }
}
