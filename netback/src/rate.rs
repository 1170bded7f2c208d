//! Xen's transmit credit scheduler (`rate=RATE@WINDOW`), exactly as xen-netback implements it,
//! with the clock passed in so that it can be tested without waiting.
//!
//! - Each queue has `credit_bytes` per window. When a window has passed since
//!   `window_start`, the credit is topped up in one step — by `credit_bytes`, capped at
//!   `max(credit_bytes, 128 KiB)` so that one maximal (GSO) frame always fits — and the
//!   window restarts *now*.
//! - A frame that does not fit stalls the queue: a timer is armed for the end of the current
//!   window (`window_start + window`), and the window is moved there. When the timer fires the
//!   credit is topped up and the queue resumes. Frames are never split or partly charged.
//! - While the timer is pending every frame is refused.
//!
//! (xen-netback: `tx_credit_exceeded`, `tx_add_credit`, `xenvif_tx_credit_callback`.)
//!
//! A consequence worth knowing, inherited from Xen: when one window's credit is 128 KiB or more,
//! the top-up is capped at that credit, so whatever a window could not use is lost. With large
//! GSO frames that costs throughput: 65000-byte frames under `100Mb/s@20ms` get 3 frames per
//! 250000-byte window, 78 Mbit/s (the unit tests pin this down).

use std::time::Duration;

use vback_common::spec::Rate;

/// The burst every limiter allows at least: one 128 KiB frame.
pub const MIN_BURST: u64 = 128 * 1024;

/// Time in nanoseconds on a monotonic clock (the caller's; tests use a fake one).
pub type Nanos = u64;

/// One queue's credit.
#[derive(Debug, Clone)]
pub struct CreditLimiter {
    credit_bytes: u64,
    window: Nanos,
    remaining: u64,
    window_start: Nanos,
    timer: Option<Nanos>,
    stalls: u64,
}

/// What the queue may do with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send it (and charge it with [`CreditLimiter::charge`]).
    Send,
    /// Hold it (and everything behind it) until this time; the caller arms a timer
    /// (timerfd) and calls [`CreditLimiter::timer_fired`] when it expires.
    StallUntil(Nanos),
}

impl CreditLimiter {
    /// A limiter for `rate`, starting with a full window of credit at `now`.
    pub fn new(rate: &Rate, now: Nanos) -> CreditLimiter {
        let window = u64::try_from(rate.window.as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        CreditLimiter {
            credit_bytes: rate.credit_bytes,
            window,
            remaining: rate.credit_bytes,
            window_start: now,
            timer: None,
            stalls: 0,
        }
    }

    /// The window.
    pub fn window(&self) -> Duration {
        Duration::from_nanos(self.window)
    }

    /// Credit left in this window.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// How many times a frame had to wait.
    pub fn stalls(&self) -> u64 {
        self.stalls
    }

    fn add_credit(&mut self) {
        let max_burst = self.credit_bytes.max(MIN_BURST);
        let max_credit = self.remaining.saturating_add(self.credit_bytes);
        self.remaining = max_credit.min(max_burst);
    }

    /// May a frame of `size` bytes go now?
    pub fn check(&mut self, now: Nanos, size: u64) -> Verdict {
        if let Some(t) = self.timer {
            return Verdict::StallUntil(t);
        }
        let next_credit = self.window_start.saturating_add(self.window);
        if now >= next_credit {
            self.window_start = now;
            self.add_credit();
        }
        if size > self.remaining {
            let next_credit = self.window_start.saturating_add(self.window);
            self.timer = Some(next_credit);
            self.window_start = next_credit;
            self.stalls += 1;
            return Verdict::StallUntil(next_credit);
        }
        Verdict::Send
    }

    /// Charges a frame that [`CreditLimiter::check`] let through.
    pub fn charge(&mut self, size: u64) {
        self.remaining = self.remaining.saturating_sub(size);
    }

    /// The stall timer expired: top the credit up. Returns whether the limiter had a timer
    /// pending (a stray expiry is ignored).
    pub fn timer_fired(&mut self, now: Nanos) -> bool {
        match self.timer {
            Some(t) if now >= t => {
                self.timer = None;
                self.add_credit();
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Nanos = 1_000_000;

    /// Sends `frame`-byte frames as fast as the limiter allows from `start` to `end` (the
    /// timer fires exactly on time); returns the bytes sent.
    fn saturate(l: &mut CreditLimiter, frame: u64, start: Nanos, end: Nanos) -> u64 {
        let (mut now, mut sent) = (start, 0);
        while now < end {
            match l.check(now, frame) {
                Verdict::Send => {
                    l.charge(frame);
                    sent += frame;
                }
                Verdict::StallUntil(t) => {
                    now = t;
                    assert!(l.timer_fired(now));
                }
            }
        }
        sent
    }

    #[test]
    fn a_window_holds_its_credit_and_no_more() {
        let rate = Rate::parse("100Mb/s@20ms").unwrap();
        let mut l = CreditLimiter::new(&rate, 0);
        // 166 frames of 1500 bytes fit in 250000 bytes; the 167th stalls until 20 ms.
        for _ in 0..166 {
            assert_eq!(l.check(0, 1500), Verdict::Send);
            l.charge(1500);
        }
        assert_eq!(l.remaining(), 1000);
        assert_eq!(l.check(MS, 1500), Verdict::StallUntil(20 * MS));
        assert_eq!(
            l.check(5 * MS, 60),
            Verdict::StallUntil(20 * MS),
            "everything waits while the timer is pending"
        );
        assert!(!l.timer_fired(19 * MS), "an early expiry is ignored");
        assert!(l.timer_fired(20 * MS));
        // Topped up by one window's credit, capped at max(credit, 128 KiB) = 250000.
        assert_eq!(l.remaining(), 250_000);
        assert_eq!(l.check(20 * MS, 1500), Verdict::Send);
        assert_eq!(l.stalls(), 1);
    }

    #[test]
    fn long_runs_match_xens_arithmetic() {
        // Expected rates follow from the rules: when credit >= 128 KiB the top-up is capped at
        // one window's credit, so what a window cannot use is lost and each window carries
        // floor(credit / frame) frames; below 128 KiB the leftover banks up to 128 KiB.
        for (spec, frame, expected_bps) in [
            ("100Mb/s@20ms", 1514, 165.0 * 1514.0 * 8.0 / 0.020), // 99.9 Mbit/s
            ("10Mb/s", 1514, 10_000_000.0),
            ("1Gb/s@5ms", 9000, 69.0 * 9000.0 * 8.0 / 0.005), // 993.6 Mbit/s
            // 64 KiB GSO frames at 100Mb/s@20ms: 3 per 250000-byte window = 78 Mbit/s. Xen
            // behaves the same (its cap drops the 55000 bytes the fourth frame could not use).
            ("100Mb/s@20ms", 65_000, 3.0 * 65_000.0 * 8.0 / 0.020),
        ] {
            let rate = Rate::parse(spec).unwrap();
            let mut l = CreditLimiter::new(&rate, 0);
            let secs = 10;
            let sent = saturate(&mut l, frame, 0, secs * 1000 * MS);
            let bps = sent as f64 * 8.0 / secs as f64;
            assert!(
                (bps - expected_bps).abs() <= expected_bps * 0.005,
                "{spec} with {frame}-byte frames: {bps} bit/s, expected {expected_bps}"
            );
            assert!(
                bps <= rate.bytes_per_second as f64 * 8.0 * 1.003,
                "never above the rate (beyond the first window)"
            );
        }
    }

    #[test]
    fn a_gso_frame_larger_than_the_credit_still_passes() {
        // 10Mb/s over 50 ms is 62500 bytes of credit; a 64 KiB frame needs two windows of
        // credit, which the 128 KiB burst allowance can hold. It is never split.
        let rate = Rate::parse("10Mb/s").unwrap();
        let mut l = CreditLimiter::new(&rate, 0);
        let frame = 65_536;
        let Verdict::StallUntil(t) = l.check(0, frame) else {
            panic!("the first window cannot hold it")
        };
        assert_eq!(t, 50 * MS);
        assert!(l.timer_fired(t));
        assert_eq!(l.remaining(), 125_000);
        assert_eq!(l.check(t, frame), Verdict::Send);
        l.charge(frame);
        assert_eq!(l.remaining(), 125_000 - 65_536);
    }

    #[test]
    fn credit_never_exceeds_the_burst_and_idle_time_does_not_bank() {
        let rate = Rate::parse("1MB/s@10ms").unwrap(); // 10000 bytes per window
        let mut l = CreditLimiter::new(&rate, 0);
        // Long idle: the next check tops up once, capped at max(10000, 128 KiB).
        assert_eq!(l.check(10_000 * MS, 1), Verdict::Send);
        assert_eq!(
            l.remaining(),
            20_000,
            "one top-up, however long the idle time"
        );
        for i in 1..100 {
            l.check((10_000 + 10 * i) * MS, 1);
        }
        assert_eq!(l.remaining(), MIN_BURST, "capped at 128 KiB");
    }
}
