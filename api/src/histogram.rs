//! Fixed log-linear latency histograms.
//!
//! Values (nanoseconds) fall into buckets laid out like HDR histograms with 3 bits of
//! precision: values below 8 have a bucket each; above, every power of two is split into 8
//! equal buckets, so a bucket is at most 12.5% wide relative to its lower bound. The layout is
//! fixed (the same in every daemon and client), which makes merging a matter of adding counts.
//! Values of 2^40 ns (about 18 minutes) and more share the last bucket.
//!
//! [`AtomicHistogram`] is the recording side: one per queue and operation, written by the
//! queue's worker with relaxed atomic adds (no lock; any number of writers is safe, one is the
//! cheap case), read by the control thread. [`Histogram`] is a snapshot as it travels in
//! `stats`: only the non-empty buckets, each as `[upper_bound_ns, count]`.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// Bits of precision below each power of two.
const SUB_BITS: u32 = 3;
/// Buckets per power of two.
const SUB: usize = 1 << SUB_BITS;
/// The first power of two past the last bucket's range.
const MAX_EXP: usize = 40;
/// How many buckets there are.
pub const BUCKETS: usize = SUB + (MAX_EXP - SUB_BITS as usize) * SUB;

/// The bucket a value falls into.
pub fn bucket_of(v: u64) -> usize {
    if v < SUB as u64 {
        // Lossless: v < 8.
        return v as usize;
    }
    let e = 63 - v.leading_zeros(); // >= SUB_BITS
    let sub = ((v >> (e - SUB_BITS)) as usize) & (SUB - 1);
    let i = SUB + (e - SUB_BITS) as usize * SUB + sub;
    i.min(BUCKETS - 1)
}

/// The smallest value in bucket `i`.
pub fn bucket_lower(i: usize) -> u64 {
    if i < SUB {
        return i as u64;
    }
    let e = (i - SUB) / SUB + SUB_BITS as usize;
    let sub = ((i - SUB) % SUB) as u64;
    (SUB as u64 + sub) << (e - SUB_BITS as usize)
}

/// The largest value in bucket `i` (`u64::MAX` for the last one).
pub fn bucket_upper(i: usize) -> u64 {
    if i + 1 >= BUCKETS {
        u64::MAX
    } else {
        bucket_lower(i + 1) - 1
    }
}

/// The recording side: a histogram of atomic bucket counters.
#[derive(Debug)]
pub struct AtomicHistogram {
    buckets: Box<[AtomicU64]>,
    sum: AtomicU64,
}

impl Default for AtomicHistogram {
    fn default() -> Self {
        AtomicHistogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
        }
    }
}

impl AtomicHistogram {
    /// Records one value (nanoseconds).
    #[inline]
    pub fn record(&self, v: u64) {
        self.buckets[bucket_of(v)].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(v, Ordering::Relaxed);
    }

    /// A snapshot. Taken while values are recorded, the sum may lag or lead the buckets by the
    /// values in flight; each count is exact as of its read.
    pub fn snapshot(&self) -> Histogram {
        let mut h = Histogram::default();
        for (i, b) in self.buckets.iter().enumerate() {
            let n = b.load(Ordering::Relaxed);
            if n > 0 {
                h.buckets.push((bucket_upper(i), n));
                h.count += n;
            }
        }
        h.sum = self.sum.load(Ordering::Relaxed);
        h
    }
}

/// A histogram snapshot: the non-empty buckets in increasing order.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Histogram {
    /// Values recorded.
    pub count: u64,
    /// Their sum (nanoseconds).
    pub sum: u64,
    /// `[upper_bound, count]` of each non-empty bucket, by increasing bound (the bounds of
    /// [`bucket_upper`]).
    pub buckets: Vec<(u64, u64)>,
}

impl Histogram {
    /// Adds another histogram's counts (queues merged into a device, or samples over time).
    pub fn merge(&mut self, other: &Histogram) {
        let mut out = Vec::with_capacity(self.buckets.len() + other.buckets.len());
        let (mut a, mut b) = (
            self.buckets.iter().peekable(),
            other.buckets.iter().peekable(),
        );
        loop {
            match (a.peek(), b.peek()) {
                (Some(&&(ua, na)), Some(&&(ub, nb))) => {
                    if ua == ub {
                        out.push((ua, na + nb));
                        a.next();
                        b.next();
                    } else if ua < ub {
                        out.push((ua, na));
                        a.next();
                    } else {
                        out.push((ub, nb));
                        b.next();
                    }
                }
                (Some(&&x), None) => {
                    out.push(x);
                    a.next();
                }
                (None, Some(&&x)) => {
                    out.push(x);
                    b.next();
                }
                (None, None) => break,
            }
        }
        self.buckets = out;
        self.count += other.count;
        self.sum = self.sum.saturating_add(other.sum);
    }

    /// What was recorded since `earlier` (a snapshot of the same histogram taken before): the
    /// histogram of an interval, for rates and interval percentiles. Counts that went down
    /// (the daemon restarted between the samples) give an empty histogram.
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        if earlier.count > self.count {
            return Histogram::default();
        }
        let mut h = Histogram {
            count: 0,
            sum: self.sum.saturating_sub(earlier.sum),
            buckets: Vec::new(),
        };
        for &(u, n) in &self.buckets {
            let before = earlier
                .buckets
                .iter()
                .find(|(ue, _)| *ue == u)
                .map_or(0, |(_, n)| *n);
            if n > before {
                h.buckets.push((u, n - before));
                h.count += n - before;
            }
        }
        h
    }

    /// The value below which a fraction `q` (0..=1) of the recorded values lie, as the upper
    /// bound of the bucket that holds it (within 12.5% above the true value); `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let q = q.clamp(0.0, 1.0);
        // The rank of the value, 1-based: at least the first value.
        let rank = ((q * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for &(u, n) in &self.buckets {
            seen += n;
            if seen >= rank {
                return Some(u);
            }
        }
        self.buckets.last().map(|b| b.0)
    }

    /// The mean, in the recorded unit; `None` when empty.
    pub fn mean(&self) -> Option<u64> {
        (self.count > 0).then(|| self.sum / self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_tile_the_range_without_gaps() {
        assert_eq!(bucket_lower(0), 0);
        for i in 0..BUCKETS - 1 {
            let (lo, hi) = (bucket_lower(i), bucket_upper(i));
            assert!(lo <= hi, "bucket {i}: {lo}..={hi}");
            assert_eq!(bucket_of(lo), i, "lower bound of {i}");
            assert_eq!(bucket_of(hi), i, "upper bound of {i}");
            assert_eq!(bucket_lower(i + 1), hi + 1);
            // Log-linear: a bucket is at most 1/8 of its lower bound wide (past the exact ones).
            if lo >= 8 {
                assert!((hi - lo + 1) * 8 <= lo, "bucket {i} too wide: {lo}..={hi}");
            }
        }
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        assert_eq!(bucket_of(1 << 40), BUCKETS - 1);
        assert_eq!(bucket_of((1 << 40) - 1), BUCKETS - 1);
        assert_eq!(bucket_of((15 << 36) - 1), BUCKETS - 2);
    }

    #[test]
    fn quantiles_land_in_the_right_bucket() {
        let h = AtomicHistogram::default();
        for v in 1..=1000u64 {
            h.record(v * 1000); // 1 µs .. 1 ms
        }
        let s = h.snapshot();
        assert_eq!(s.count, 1000);
        assert_eq!(s.sum, (1..=1000u64).map(|v| v * 1000).sum::<u64>());
        let p50 = s.quantile(0.5).unwrap();
        assert!((500_000..=500_000 * 9 / 8).contains(&p50), "p50 {p50}");
        let p99 = s.quantile(0.99).unwrap();
        assert!((990_000..=990_000 * 9 / 8).contains(&p99), "p99 {p99}");
        assert_eq!(s.quantile(1.0).unwrap(), bucket_upper(bucket_of(1_000_000)));
        assert_eq!(s.quantile(0.0).unwrap(), bucket_upper(bucket_of(1000)));
        assert_eq!(Histogram::default().quantile(0.5), None);
        assert_eq!(s.mean(), Some(500_500));
    }

    #[test]
    fn merge_and_since_are_inverse() {
        let (a, b) = (AtomicHistogram::default(), AtomicHistogram::default());
        for v in [5, 100, 100, 7000, 1 << 45] {
            a.record(v);
        }
        for v in [3, 100, 9000] {
            b.record(v);
        }
        let (sa, sb) = (a.snapshot(), b.snapshot());
        let mut m = sa.clone();
        m.merge(&sb);
        assert_eq!(m.count, 8);
        assert_eq!(m.sum, sa.sum + sb.sum);
        let bounds: Vec<u64> = m.buckets.iter().map(|b| b.0).collect();
        let mut sorted = bounds.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(bounds, sorted, "buckets stay sorted and unique");
        assert_eq!(m.since(&sa), sb);
        // A counter that went backwards (a restarted daemon) gives an empty interval.
        assert_eq!(sa.since(&m), Histogram::default());
    }

    #[test]
    fn snapshot_round_trips_through_json() {
        let a = AtomicHistogram::default();
        a.record(42);
        a.record(123_456);
        let s = a.snapshot();
        let j = serde_json::to_string(&s).unwrap();
        assert!(
            j.starts_with(r#"{"count":2,"sum":123498,"buckets":[["#),
            "{j}"
        );
        assert_eq!(serde_json::from_str::<Histogram>(&j).unwrap(), s);
    }
}
