//! `vbctl exporter --listen ADDR`: every daemon's counters and latency histograms in the
//! OpenMetrics text format (the `prometheus-client` crate's encoder), sampled at each scrape.
//!
//! - Each uniform counter becomes `vback_<name>_total` (a counter) or `vback_<name>` (a gauge:
//!   `in_flight`, `active_pairs`), labelled `domain` and `device` (from the control socket's
//!   path, `<domain>/<vdev>.ctl`; no `domain` for a socket outside a domain's directory), `kind`
//!   (the daemon) and the counter's own labels (`queue`, ...).
//! - Each latency histogram becomes `vback_latency_seconds` with `op` and `queue` labels, on
//!   fixed buckets at powers of two nanoseconds from 1.024 µs to 17.2 s (the daemons' finer
//!   buckets add up into them exactly: each power of two starts a fine bucket).
//! - `vback_up{domain,device,kind}` is 1 for a daemon that answered, 0 for one that did not.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use thiserror::Error;
use vback_api::Histogram;

use crate::top::{self, Sample};

/// The Content-Type of the reply (OpenMetrics 1.0, which Prometheus 3 negotiates).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Counters that are gauges (they go down).
const GAUGES: &[&str] = &["in_flight", "active_pairs"];

/// Errors of `vbctl exporter`.
#[derive(Debug, Error)]
pub enum ExporterError {
    /// The listening address could not be bound.
    #[error("cannot listen on {addr}: {source} (is another exporter running there?)")]
    Bind {
        /// The address.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
}

type Labels = Vec<(String, String)>;

/// One metric family's series, sampled at this scrape.
#[derive(Debug)]
enum Series {
    Counter(Vec<(Labels, u64)>),
    Gauge(Vec<(Labels, i64)>),
    /// Latency in nanoseconds, exported in seconds on [`coarse_buckets`].
    Latency(Vec<(Labels, Histogram)>),
    /// Another histogram (netback's burst sizes), in its own unit on [`count_buckets`].
    Counts(Vec<(Labels, Histogram)>),
}

impl EncodeMetric for Series {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        match self {
            Series::Counter(v) => {
                for (l, x) in v {
                    encoder
                        .encode_family(l)?
                        .encode_counter::<NoLabelSet, u64, u64>(x, None)?;
                }
            }
            Series::Gauge(v) => {
                for (l, x) in v {
                    encoder.encode_family(l)?.encode_gauge(x)?;
                }
            }
            Series::Latency(v) => {
                for (l, h) in v {
                    let buckets = coarse_buckets(h);
                    encoder.encode_family(l)?.encode_histogram::<NoLabelSet>(
                        h.sum as f64 / 1e9,
                        h.count,
                        &buckets,
                        None,
                    )?;
                }
            }
            Series::Counts(v) => {
                for (l, h) in v {
                    let buckets = count_buckets(h);
                    encoder.encode_family(l)?.encode_histogram::<NoLabelSet>(
                        h.sum as f64,
                        h.count,
                        &buckets,
                        None,
                    )?;
                }
            }
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        match self {
            Series::Counter(_) => MetricType::Counter,
            Series::Gauge(_) => MetricType::Gauge,
            Series::Latency(_) | Series::Counts(_) => MetricType::Histogram,
        }
    }
}

/// A histogram's counts on the exporter's fixed buckets: `(upper bound in seconds, count)` per
/// bucket (not cumulative), the last one `+Inf`. A fine bucket below `2^k` ns belongs to the
/// coarse bucket `2^k`: its upper bound is `2^k - 1`.
fn coarse_buckets(h: &Histogram) -> Vec<(f64, u64)> {
    let mut out: Vec<(f64, u64)> = (10..=34)
        .map(|k| ((1u64 << k) as f64 / 1e9, 0))
        .chain(std::iter::once((f64::INFINITY, 0)))
        .collect();
    for &(upper, n) in &h.buckets {
        let i = (10..=34)
            .position(|k| upper < (1u64 << k))
            .unwrap_or(out.len() - 1);
        out[i].1 += n;
    }
    out
}

/// A count histogram (burst sizes) on buckets 1, 3, 7, ... 1023 (`2^k - 1`: where the fine
/// buckets end, so the counts are exact) and `+Inf`, not cumulative.
fn count_buckets(h: &Histogram) -> Vec<(f64, u64)> {
    let bound = |k: u32| (1u64 << k) - 1;
    let mut out: Vec<(f64, u64)> = (1..=10)
        .map(|k| (bound(k) as f64, 0))
        .chain(std::iter::once((f64::INFINITY, 0)))
        .collect();
    for &(upper, n) in &h.buckets {
        let i = (1..=10)
            .position(|k| upper <= bound(k))
            .unwrap_or(out.len() - 1);
        out[i].1 += n;
    }
    out
}

/// A metric name's part made of what OpenMetrics allows.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// The OpenMetrics text for the samples, by control socket's row name.
pub fn render(samples: &[(String, Result<Sample, String>)]) -> String {
    let mut counters: BTreeMap<String, Vec<(Labels, u64)>> = BTreeMap::new();
    let mut up = Vec::new();
    let mut hists = Vec::new();
    let mut bursts = Vec::new();
    for (name, s) in samples {
        // `domain/vdev` (a domain's directory under the one given) or just the device.
        let (domain, device) = match name.split_once('/') {
            Some((d, v)) => (Some(d), v),
            None => (None, name.as_str()),
        };
        let base = |kind: &str| -> Labels {
            let mut l = Vec::with_capacity(3);
            if let Some(d) = domain {
                l.push(("domain".to_owned(), d.to_owned()));
            }
            l.push(("device".to_owned(), device.to_owned()));
            l.push(("kind".to_owned(), kind.to_owned()));
            l
        };
        let s = match s {
            Ok(s) => s,
            Err(_) => {
                up.push((base("unknown"), 0));
                continue;
            }
        };
        up.push((base(&s.kind), 1));
        for c in &s.stats.counters {
            let mut l = base(&s.kind);
            l.extend(c.labels.iter().map(|(k, v)| (sanitize(k), v.clone())));
            counters
                .entry(sanitize(&c.name))
                .or_default()
                .push((l, c.value));
        }
        for h in &s.stats.histograms {
            let mut l = base(&s.kind);
            l.extend(h.labels.iter().map(|(k, v)| (sanitize(k), v.clone())));
            match h.name.as_str() {
                "latency_ns" => hists.push((l, h.histogram.clone())),
                "burst_frames" => bursts.push((l, h.histogram.clone())),
                // A histogram this vbctl does not know is left out rather than mislabelled.
                _ => {}
            }
        }
    }
    let mut registry = Registry::with_prefix("vback");
    registry.register(
        "up",
        "Whether the daemon answered its control socket at this scrape",
        Series::Gauge(up),
    );
    for (name, series) in counters {
        if GAUGES.contains(&name.as_str()) {
            let v = series
                .into_iter()
                .map(|(l, x)| (l, i64::try_from(x).unwrap_or(i64::MAX)))
                .collect();
            registry.register(
                name.clone(),
                format!("The daemons' `{name}` (stats, a gauge)"),
                Series::Gauge(v),
            );
        } else {
            registry.register(
                name.clone(),
                format!("The daemons' `{name}` counter (stats)"),
                Series::Counter(series),
            );
        }
    }
    registry.register_with_unit(
        "latency",
        "Request latency from pop to used-ring publish, by operation and queue",
        prometheus_client::registry::Unit::Seconds,
        Series::Latency(hists),
    );
    registry.register(
        "burst_frames",
        "Frames per receive (dir=rx) or transmit (dir=tx) pass of a netback queue pair",
        Series::Counts(bursts),
    );
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
        out = "# EOF\n".into();
    }
    out
}

/// Serves scrapes on `addr` until killed; says where it listens on standard error.
pub fn serve(addr: &str, paths: &[PathBuf], timeout: Duration) -> Result<(), ExporterError> {
    let listener = TcpListener::bind(addr).map_err(|source| ExporterError::Bind {
        addr: addr.to_owned(),
        source,
    })?;
    if let Ok(a) = listener.local_addr() {
        eprintln!("vbctl exporter: listening on http://{a}/metrics");
    }
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        // One scrape at a time; a client that says nothing is dropped after the timeout.
        if let Err(e) = answer(conn, paths, timeout) {
            eprintln!("vbctl exporter: a scrape failed: {e}");
        }
    }
    Ok(())
}

fn answer(conn: TcpStream, paths: &[PathBuf], timeout: Duration) -> std::io::Result<()> {
    conn.set_read_timeout(Some(timeout))?;
    conn.set_write_timeout(Some(timeout))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request = String::new();
    reader.by_ref().take(8192).read_line(&mut request)?;
    // The headers: read and ignored (bounded).
    let mut seen = request.len();
    loop {
        let mut h = String::new();
        let n = reader.by_ref().take(8192).read_line(&mut h)?;
        seen += n;
        if n == 0 || h == "\r\n" || h == "\n" || seen > 65536 {
            break;
        }
    }
    let mut words = request.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, ctype, body) = if method != "GET" && method != "HEAD" {
        (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_owned(),
        )
    } else if path != "/metrics" {
        (
            "404 Not Found",
            "text/plain",
            "metrics are at /metrics\n".to_owned(),
        )
    } else {
        let samples = scrape(paths, timeout);
        ("200 OK", CONTENT_TYPE, render(&samples))
    };
    let mut w = conn;
    write!(
        w,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    if method != "HEAD" {
        w.write_all(body.as_bytes())?;
    }
    w.flush()
}

/// One sample of every daemon under `paths`, by row name.
fn scrape(paths: &[PathBuf], timeout: Duration) -> Vec<(String, Result<Sample, String>)> {
    match top::discover(paths) {
        Ok(found) => found
            .into_iter()
            .map(|(p, name)| (name, top::sample(&p, timeout)))
            .collect(),
        Err(e) => {
            eprintln!("vbctl exporter: {e}");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use vback_api::{AtomicHistogram, LabeledHistogram, Stats, counters_from_device};

    #[test]
    fn counters_gauges_and_histograms_in_openmetrics() {
        let device = serde_json::json!({"queues": [{"reads": 5, "in_flight": 2}]});
        let h = AtomicHistogram::default();
        for v in [500, 1500, 3000, 1 << 40] {
            h.record(v);
        }
        let s = Sample {
            at: Instant::now(),
            kind: "blkback".into(),
            pid: 1,
            device: serde_json::Value::Null,
            stats: Stats {
                counters: counters_from_device(&device),
                histograms: vec![LabeledHistogram {
                    name: "latency_ns".into(),
                    labels: BTreeMap::from([
                        ("queue".into(), "0".into()),
                        ("op".into(), "read".into()),
                    ]),
                    histogram: h.snapshot(),
                }],
                device,
            },
        };
        let text = render(&[
            ("alice/xvda".into(), Ok(s)),
            ("alice/gone".into(), Err("gone".into())),
        ]);
        let has = |l: &str| text.lines().any(|x| x == l);
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(has("# TYPE vback_reads counter"), "{text}");
        assert!(
            has(r#"vback_reads_total{domain="alice",device="xvda",kind="blkback",queue="0"} 5"#),
            "{text}"
        );
        assert!(has("# TYPE vback_in_flight gauge"), "{text}");
        assert!(
            has(r#"vback_in_flight{domain="alice",device="xvda",kind="blkback",queue="0"} 2"#),
            "{text}"
        );
        assert!(
            has(r#"vback_up{domain="alice",device="gone",kind="unknown"} 0"#),
            "{text}"
        );
        assert!(has("# TYPE vback_latency_seconds histogram"), "{text}");
        let l = r#"domain="alice",device="xvda",kind="blkback",op="read",queue="0""#;
        assert!(
            has(&format!("vback_latency_seconds_count{{{l}}} 4")),
            "{text}"
        );
        // 500 ns is under the first bound (1.024 µs); 1500 and 3000 under 4.096 µs; 2^40 ns
        // only under +Inf. Buckets are cumulative.
        assert!(
            has(&format!(
                "vback_latency_seconds_bucket{{le=\"0.000001024\",{l}}} 1"
            )),
            "{text}"
        );
        assert!(
            has(&format!(
                "vback_latency_seconds_bucket{{le=\"0.000004096\",{l}}} 3"
            )),
            "{text}"
        );
        assert!(
            has(&format!(
                "vback_latency_seconds_bucket{{le=\"+Inf\",{l}}} 4"
            )),
            "{text}"
        );
    }

    #[test]
    fn burst_histograms_are_exported_on_exact_count_buckets() {
        let h = AtomicHistogram::default();
        for v in [1, 3, 4, 7, 8, 64, 2000] {
            h.record(v);
        }
        let b = count_buckets(&h.snapshot());
        let le = |x: f64| b.iter().find(|(u, _)| *u == x).unwrap().1;
        assert_eq!((le(1.0), le(3.0), le(7.0), le(15.0)), (1, 1, 2, 1));
        assert_eq!((le(127.0), le(f64::INFINITY)), (1, 1));
        let s = Sample {
            at: Instant::now(),
            kind: "netback".into(),
            pid: 1,
            device: serde_json::Value::Null,
            stats: Stats {
                histograms: vec![LabeledHistogram {
                    name: "burst_frames".into(),
                    labels: BTreeMap::from([("dir".into(), "rx".into())]),
                    histogram: h.snapshot(),
                }],
                ..Stats::default()
            },
        };
        let text = render(&[("vif".into(), Ok(s))]);
        assert!(
            text.lines().any(|l| l
                == r#"vback_burst_frames_bucket{le="7.0",device="vif",kind="netback",dir="rx"} 4"#),
            "{text}"
        );
        assert!(
            !text.contains("vback_latency_seconds_count"),
            "bursts are not latencies: {text}"
        );
    }

    #[test]
    fn coarse_buckets_add_up_exactly() {
        let h = AtomicHistogram::default();
        // Just below and at each power of two.
        for k in 10..=34u32 {
            h.record((1u64 << k) - 1);
            h.record(1u64 << k);
        }
        let b = coarse_buckets(&h.snapshot());
        assert_eq!(b.iter().map(|x| x.1).sum::<u64>(), 50);
        assert_eq!(b[0].1, 1, "2^10 - 1 ns is under the first bound");
        assert_eq!(b.last().unwrap().1, 1, "2^34 ns is past the last bound");
        assert!(b[1..b.len() - 1].iter().all(|x| x.1 == 2));
    }
}
