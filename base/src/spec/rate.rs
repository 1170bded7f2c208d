//! Xen's `rate=RATE[@INTERVAL]` for network interfaces.
//!
//! - RATE: `^[0-9]+[GMK]?[Bb]/s$`. K, M and G are decimal (10^3, 10^6, 10^9); a lower-case `b`
//!   counts bits (divided by 8), an upper-case `B` bytes.
//! - INTERVAL: `^[0-9]+[mu]?s?$`: `20ms` or `20m` is milliseconds, `500us` or `500u`
//!   microseconds, `1s` or a bare `1` seconds. The default window is 50 ms.
//!
//! The limit is stored as Xen stores it: credit bytes per window,
//! `bytes_per_second * window_us / 1_000_000` (so `100Mb/s@20ms` is 250000 bytes every 20000 µs).
//! Xen logs a warning for a malformed rate and runs unlimited; vback refuses it.

use std::fmt;
use std::time::Duration;

use super::SpecError;

/// Xen's default credit window.
pub const DEFAULT_WINDOW: Duration = Duration::from_millis(50);

/// A transmit (or receive) limit: `credit_bytes` may pass in each `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// The rate the operator asked for, in bytes per second.
    pub bytes_per_second: u64,
    /// Credit granted at each window boundary.
    pub credit_bytes: u64,
    /// The window (Xen's "interval").
    pub window: Duration,
}

impl Rate {
    /// Parses `RATE[@INTERVAL]`.
    pub fn parse(input: &str) -> Result<Rate, SpecError> {
        let (rate, interval) = match input.split_once('@') {
            Some((r, i)) => (r, Some(i)),
            None => (input, None),
        };
        let bytes_per_second = parse_bytes_per_second(input, rate)?;
        let window = match interval {
            Some(i) => parse_interval(input, i)?,
            None => DEFAULT_WINDOW,
        };
        let window_us = u64::try_from(window.as_micros()).unwrap_or(u64::MAX);
        let credit = u128::from(bytes_per_second) * u128::from(window_us) / 1_000_000;
        let credit_bytes = u64::try_from(credit).map_err(|_| {
            SpecError::new(
                "rate",
                input,
                input,
                "the credit per window does not fit in 64 bits",
            )
        })?;
        if credit_bytes == 0 {
            return Err(SpecError::new(
                "rate",
                input,
                input,
                "this rate grants less than one byte per window: use a larger rate or a longer interval",
            ));
        }
        Ok(Rate {
            bytes_per_second,
            credit_bytes,
            window,
        })
    }

    /// The window in microseconds, as Xen reports it.
    pub fn window_us(&self) -> u64 {
        u64::try_from(self.window.as_micros()).unwrap_or(u64::MAX)
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}B/s@{}us", self.bytes_per_second, self.window_us())
    }
}

fn parse_bytes_per_second(input: &str, rate: &str) -> Result<u64, SpecError> {
    let bad = |problem: &str| SpecError::new("rate", input, rate, problem);
    let Some(body) = rate.strip_suffix("/s") else {
        return Err(bad(
            "the rate must end in b/s (bits) or B/s (bytes), for example 100Mb/s or 10MB/s",
        ));
    };
    let (body, bits) = if let Some(b) = body.strip_suffix('b') {
        (b, true)
    } else if let Some(b) = body.strip_suffix('B') {
        (b, false)
    } else {
        return Err(bad(
            "the rate must end in b/s (bits) or B/s (bytes), for example 100Mb/s or 10MB/s",
        ));
    };
    let (digits, multiplier) = match body.chars().last() {
        Some('K') => (&body[..body.len() - 1], 1_000u64),
        Some('M') => (&body[..body.len() - 1], 1_000_000),
        Some('G') => (&body[..body.len() - 1], 1_000_000_000),
        _ => (body, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return Err(bad(
            "expected digits, an optional K, M or G (decimal) and b/s or B/s, for example 100Mb/s",
        ));
    }
    let n: u64 = digits.parse().map_err(|_| bad("the number is too large"))?;
    let per_second = n
        .checked_mul(multiplier)
        .ok_or_else(|| bad("the rate does not fit in 64 bits"))?;
    let bytes = if bits { per_second / 8 } else { per_second };
    if bytes == 0 {
        return Err(bad(
            "a rate of zero bytes per second would block all traffic; leave out rate= for no limit",
        ));
    }
    Ok(bytes)
}

fn parse_interval(input: &str, interval: &str) -> Result<Duration, SpecError> {
    let bad = |problem: &str| SpecError::new("rate", input, interval, problem);
    let digits_end = interval
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(interval.len());
    let (digits, unit) = interval.split_at(digits_end);
    if digits.is_empty() {
        return Err(bad(
            "the interval after @ must be a number with an optional unit s, ms (or m), us (or u), for example @20ms",
        ));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| bad("the interval is too large"))?;
    let us_per_unit: u64 = match unit {
        "" | "s" => 1_000_000,
        "ms" | "m" => 1_000,
        "us" | "u" => 1,
        _ => {
            return Err(bad(
                "unknown interval unit; use s, ms (or m), us (or u), for example @20ms",
            ));
        }
    };
    let us = n
        .checked_mul(us_per_unit)
        .filter(|us| *us <= u64::from(u32::MAX))
        .ok_or_else(|| bad("the interval is too long (at most 4294 s)"))?;
    if us == 0 {
        return Err(bad("the interval must be longer than zero"));
    }
    Ok(Duration::from_micros(us))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xen_examples() {
        let r = Rate::parse("100Mb/s@20ms").unwrap();
        assert_eq!(r.bytes_per_second, 12_500_000);
        assert_eq!(r.credit_bytes, 250_000);
        assert_eq!(r.window_us(), 20_000);

        let r = Rate::parse("10Mb/s").unwrap();
        assert_eq!(r.credit_bytes, 62_500);
        assert_eq!(r.window, DEFAULT_WINDOW);
    }

    #[test]
    fn units() {
        assert_eq!(Rate::parse("1KB/s@1s").unwrap().credit_bytes, 1000);
        assert_eq!(Rate::parse("1GB/s@1ms").unwrap().credit_bytes, 1_000_000);
        assert_eq!(Rate::parse("8b/s@1").unwrap().credit_bytes, 1);
        assert_eq!(Rate::parse("1MB/s@500us").unwrap().credit_bytes, 500);
        assert_eq!(Rate::parse("1MB/s@500u").unwrap().credit_bytes, 500);
        assert_eq!(Rate::parse("1MB/s@20m").unwrap().credit_bytes, 20_000);
        assert_eq!(Rate::parse("1MB/s@2s").unwrap().credit_bytes, 2_000_000);
    }

    #[test]
    fn malformed_rates_name_the_bad_part() {
        for (input, part) in [
            ("100Mbit/s", "100Mbit/s"),
            ("100Mb", "100Mb"),
            ("Mb/s", "Mb/s"),
            ("100kb/s", "100kb/s"),
            ("-5Mb/s", "-5Mb/s"),
            ("0Mb/s", "0Mb/s"),
            ("100Mb/s@", ""),
            ("100Mb/s@20h", "20h"),
            ("100Mb/s@0ms", "0ms"),
            ("100Mb/s@ms", "ms"),
            ("100Mb/s@99999999999s", "99999999999s"),
            ("99999999999999999999Gb/s", "99999999999999999999Gb/s"),
        ] {
            let e = Rate::parse(input).unwrap_err();
            assert_eq!(e.part, part, "{input}: {e}");
            assert!(e.to_string().starts_with(&format!("rate `{input}`")), "{e}");
        }
        // Seven bits per second round down to nothing.
        assert!(Rate::parse("7b/s").is_err());
        // 1 byte/s over 50 ms grants nothing.
        let e = Rate::parse("1B/s").unwrap_err();
        assert!(e.problem.contains("less than one byte"), "{e}");
    }
}
