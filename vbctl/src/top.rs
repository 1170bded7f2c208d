//! `vbctl top`: a xentop for vback's daemons. Batch mode (`-b`) prints plain-text iterations for
//! scripts: one row per domain with its devices folded in, then one per device, rates computed
//! between two samples, 80 columns; without it a full-screen view (ratatui) redraws the same
//! rows with xentop's keys.
//!
//! Everything here reads the typed API's uniform counters and histograms, so a row needs no
//! knowledge of a device kind beyond which counters to show.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use thiserror::Error;
use vback_api::{ClientError, ControlClient, Counter, Histogram, Stats, Status};

/// The width `top` keeps to.
pub const WIDTH: usize = 80;

/// Where `top` looks when given no paths.
pub const DEFAULT_DIR: &str = "/run/vback";

/// Errors of `vbctl top`.
#[derive(Debug, Error)]
pub enum TopError {
    /// A path given on the command line is neither a control socket nor a directory.
    #[error(
        "{0} is neither a directory nor a control socket; give daemons' --control sockets or \
         directories holding them (*.ctl)"
    )]
    NotControl(PathBuf),
    /// The terminal could not be set up or drawn on.
    #[error("the terminal: {0} (use batch mode, -b, without a terminal)")]
    Terminal(std::io::Error),
    /// A directory could not be read.
    #[error("cannot list {path}: {source}")]
    ReadDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The control sockets to watch, with the name each row shows: the paths given (a socket as
/// it is, named by its file name; a directory searched for `*.ctl` up to one level down, as in
/// `/run/vback/<domain>/<vdev>.ctl`, each named by its path below the directory: `alice/xvda`).
pub fn discover(paths: &[PathBuf]) -> Result<BTreeMap<PathBuf, String>, TopError> {
    let mut out = BTreeMap::new();
    for p in paths {
        if p.is_dir() {
            let mut found = Vec::new();
            scan(p, 1, &mut found)?;
            for f in found {
                let name = device_name(f.strip_prefix(p).unwrap_or(&f));
                out.insert(f, name);
            }
        } else if is_socket(p) {
            let name = device_name(p.file_name().map_or(p.as_path(), Path::new));
            out.insert(p.clone(), name);
        } else {
            return Err(TopError::NotControl(p.clone()));
        }
    }
    Ok(out)
}

fn is_socket(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

fn scan(dir: &Path, depth: u32, out: &mut Vec<PathBuf>) -> Result<(), TopError> {
    let rd = std::fs::read_dir(dir).map_err(|source| TopError::ReadDir {
        path: dir.to_owned(),
        source,
    })?;
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() && depth > 0 {
            // A domain's directory that vanishes meanwhile is just skipped.
            let _ = scan(&p, depth - 1, out);
        } else if p.extension().is_some_and(|x| x == "ctl") && is_socket(&p) {
            out.push(p);
        }
    }
    Ok(())
}

/// One daemon's sample.
#[derive(Debug, Clone)]
pub struct Sample {
    /// When it was taken.
    pub at: Instant,
    /// The daemon's kind (`blkback`, `netback`, `cdrom`, ...).
    pub kind: String,
    /// Its pid.
    pub pid: u32,
    /// Its device state (tray and medium for a CD).
    pub device: Value,
    /// Its counters and histograms.
    pub stats: Stats,
}

/// Takes one sample of the daemon behind `ctl`; the error is a short reason for the row.
pub fn sample(ctl: &Path, timeout: Duration) -> Result<Sample, String> {
    let short = |e: ClientError| match e {
        ClientError::Connect { source, .. } => format!("gone ({source})"),
        ClientError::Timeout { .. } => "no reply".to_owned(),
        other => other.to_string(),
    };
    let mut c = ControlClient::connect_timeout(ctl, timeout).map_err(short)?;
    let status: Status = vback_api::decode("status", c.call("status", Value::Null).map_err(short)?)
        .map_err(|e| e.to_string())?;
    let stats: Stats = vback_api::decode("stats", c.call("stats", Value::Null).map_err(short)?)
        .map_err(|e| e.to_string())?;
    Ok(Sample {
        at: Instant::now(),
        kind: status.daemon.name,
        pid: status.daemon.pid,
        device: status.device,
        stats,
    })
}

/// A counter's device-wide value: its unlabelled total when the device reports one (netback's
/// `rx_packets`), else the sum over its labels (blkback's per-queue `reads`).
pub fn total(counters: &[Counter], name: &str) -> u64 {
    let mut sum = 0u64;
    for c in counters.iter().filter(|c| c.name == name) {
        if c.labels.is_empty() {
            return c.value;
        }
        sum = sum.saturating_add(c.value);
    }
    sum
}

/// The rate per second of a counter between two samples; 0 when it went backwards (a
/// restarted daemon) or no time passed.
pub fn rate(prev: &[Counter], cur: &[Counter], name: &str, secs: f64) -> f64 {
    let (a, b) = (total(prev, name), total(cur, name));
    if b < a || secs <= 0.0 {
        0.0
    } else {
        (b - a) as f64 / secs
    }
}

/// Every latency histogram of a sample (not netback's burst sizes), by name and labels.
fn merged(stats: &Stats) -> BTreeMap<String, Histogram> {
    let mut by_key: BTreeMap<String, Histogram> = BTreeMap::new();
    for h in stats.histograms.iter().filter(|h| h.name == "latency_ns") {
        let key = format!("{}{:?}", h.name, h.labels);
        by_key.entry(key).or_default().merge(&h.histogram);
    }
    by_key
}

/// The latency histogram of the interval between two samples, over all queues and operations.
pub fn interval_latency(prev: &Stats, cur: &Stats) -> Histogram {
    let before = merged(prev);
    let mut out = Histogram::default();
    for (k, h) in merged(cur) {
        let d = match before.get(&k) {
            Some(b) => h.since(b),
            None => h,
        };
        out.merge(&d);
    }
    out
}

/// A duration in nanoseconds, in 6 characters or fewer (`850ns`, `12.3us`, `4.1ms`, `2.0s`).
pub fn format_ns(ns: Option<u64>) -> String {
    let Some(ns) = ns else { return "-".into() };
    let f = ns as f64;
    if ns < 1_000 {
        format!("{ns}ns")
    } else if ns < 100_000 {
        format!("{:.1}us", f / 1e3)
    } else if ns < 1_000_000 {
        format!("{:.0}us", f / 1e3)
    } else if ns < 100_000_000 {
        format!("{:.1}ms", f / 1e6)
    } else if ns < 1_000_000_000 {
        format!("{:.0}ms", f / 1e6)
    } else {
        format!("{:.1}s", f / 1e9)
    }
}

/// A rate in 6 characters or fewer (`999`, `12.5k`, `3.2M`; `99999M` at most).
pub fn format_rate(r: f64) -> String {
    if r < 999.5 {
        format!("{r:.0}")
    } else if r < 99_950.0 {
        format!("{:.1}k", r / 1e3)
    } else if r < 999_500.0 {
        format!("{:.0}k", r / 1e3)
    } else if r < 99_950_000.0 {
        format!("{:.1}M", r / 1e6)
    } else {
        format!("{:.0}M", (r / 1e6).min(99_999.0))
    }
}

/// The header line.
pub fn header() -> String {
    format!(
        "{:<14} {:<4} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>4} {:>4}",
        "DEVICE", "KIND", "PID", "RD/s", "WR/s", "RDMB/s", "WRMB/s", "P50", "P99", "INFL", "ERR"
    )
}

fn short_kind(kind: &str) -> &str {
    match kind {
        "blkback" => "blk",
        "netback" => "net",
        "cdrom" => "cd",
        "usbback" => "usb",
        other => other,
    }
}

/// A device's name from its control socket's relative path: without `.ctl` (rows cut it to 14
/// characters).
pub fn device_name(rel: &Path) -> String {
    let s = rel.to_string_lossy();
    s.strip_suffix(".ctl").unwrap_or(&s).to_owned()
}

/// What a row shows: rates over one interval and gauges, for one device or summed over a
/// domain's.
#[derive(Debug, Default)]
struct Totals {
    reads: f64,
    writes: f64,
    read_bytes: f64,
    write_bytes: f64,
    latency: Histogram,
    in_flight: u64,
    errors: u64,
    rx_packets: f64,
    rx_bytes: f64,
    tx_packets: f64,
    tx_bytes: f64,
    drops: f64,
    stalls: u64,
}

impl Totals {
    /// Adds a device: its gauges from `cur`, its rates if `prev` is an earlier sample of the
    /// same process.
    fn add(&mut self, prev: Option<&Sample>, cur: &Sample) {
        let cc = &cur.stats.counters;
        self.in_flight += total(cc, "in_flight");
        self.errors += total(cc, "errors");
        self.stalls += total(cc, "rx_rate_limited_stalls") + total(cc, "tx_rate_limited_stalls");
        let Some(p) = prev.filter(|p| p.pid == cur.pid) else {
            return;
        };
        let secs = cur.at.duration_since(p.at).as_secs_f64();
        let r = |n: &str| rate(&p.stats.counters, cc, n, secs);
        self.reads += if short_kind(&cur.kind) == "cd" {
            r("read")
        } else {
            r("reads")
        };
        self.writes += r("writes");
        self.read_bytes += r("read_bytes");
        self.write_bytes += r("write_bytes");
        self.latency.merge(&interval_latency(&p.stats, &cur.stats));
        self.rx_packets += r("rx_packets");
        self.rx_bytes += r("rx_bytes");
        self.tx_packets += r("tx_packets");
        self.tx_bytes += r("tx_bytes");
        self.drops += r("rx_drops") + r("tx_drops");
    }

    /// The block and CD columns.
    fn block_cols(&self) -> String {
        format!(
            "{:>6} {:>6} {:>6.1} {:>6.1} {:>6} {:>6} {:>4} {:>4}",
            format_rate(self.reads),
            format_rate(self.writes),
            self.read_bytes / 1e6,
            self.write_bytes / 1e6,
            format_ns(self.latency.quantile(0.5)),
            format_ns(self.latency.quantile(0.99)),
            self.in_flight,
            self.errors,
        )
    }

    /// The net columns.
    fn net_cols(&self) -> String {
        format!(
            "rx {}pps {:.1}Mb/s tx {}pps {:.1}Mb/s drop/s {} stall {}",
            format_rate(self.rx_packets),
            self.rx_bytes * 8.0 / 1e6,
            format_rate(self.tx_packets),
            self.tx_bytes * 8.0 / 1e6,
            format_rate(self.drops),
            self.stalls,
        )
    }
}

/// One device's row: rates between `prev` and `cur`, or why there is none.
pub fn row(name: &str, prev: Option<&Sample>, cur: &Result<Sample, String>) -> String {
    let name: String = name.chars().take(14).collect();
    let mut line = String::new();
    match cur {
        Err(why) => {
            let _ = write!(line, "{name:<14} {:<4} {:>6} {why}", "-", "-");
        }
        Ok(s) => {
            let kind = short_kind(&s.kind);
            let _ = write!(line, "{name:<14} {kind:<4} {:>6} ", s.pid);
            if prev.is_none_or(|p| p.pid != s.pid) {
                line.push_str("(new: rates from the next sample)");
                return fit(line);
            }
            let mut t = Totals::default();
            t.add(prev, s);
            if kind == "net" {
                line.push_str(&t.net_cols());
            } else {
                line.push_str(&t.block_cols());
                if kind == "cd" {
                    let tray = s.device["tray"].as_str().unwrap_or("?");
                    let _ = write!(line, " tray {tray}");
                }
            }
        }
    }
    fit(line)
}

/// A domain's row: its devices folded in, `KIND` `dom` and the number of devices in the `PID`
/// column. The block columns sum its block and CD devices (latency percentiles over all their
/// requests; devices that did not answer or restarted add no rates); a domain with network
/// devices only shows their summed net columns instead.
pub fn domain_row(domain: &str, devices: &[(Option<&Sample>, &Result<Sample, String>)]) -> String {
    let name: String = domain.chars().take(14).collect();
    let (mut blk, mut net) = (Totals::default(), Totals::default());
    let (mut has_blk, mut has_net) = (false, false);
    for (p, s) in devices {
        let Ok(s) = s else { continue };
        if short_kind(&s.kind) == "net" {
            has_net = true;
            net.add(*p, s);
        } else {
            has_blk = true;
            blk.add(*p, s);
        }
    }
    let cols = if has_net && !has_blk {
        net.net_cols()
    } else {
        blk.block_cols()
    };
    fit(format!(
        "{name:<14} {:<4} {:>6} {cols}",
        "dom",
        format!("{}dev", devices.len())
    ))
}

/// A row's name split into its domain and device (`alice/xvda`), or no domain.
fn split_name(name: &str) -> (Option<&str>, &str) {
    match name.split_once('/') {
        Some((d, v)) => (Some(d), v),
        None => (None, name),
    }
}

/// Cuts a line to [`WIDTH`] characters.
fn fit(line: String) -> String {
    if line.chars().count() <= WIDTH {
        line
    } else {
        line.chars().take(WIDTH).collect()
    }
}

/// Batch mode: `iterations` reports, `delay` apart, each with rates over the delay before it.
/// Daemons that appear are picked up at the next sample; those that vanish stay as `gone`.
pub fn batch(
    paths: &[PathBuf],
    iterations: u32,
    delay: Duration,
    timeout: Duration,
    out: &mut dyn std::io::Write,
) -> Result<(), TopError> {
    // Every socket seen so far, with its name: one that vanishes stays, as gone.
    let mut names: BTreeMap<PathBuf, String> = BTreeMap::new();
    let mut prev = take(paths, &mut names, timeout)?;
    for i in 0..iterations {
        std::thread::sleep(delay);
        let cur = take(paths, &mut names, timeout)?;
        let now = chrono_like_now();
        let mut text = format!(
            "vbctl top - {now}  {} daemons  iteration {}/{iterations}  interval {:.1} s\n{}\n",
            cur.len(),
            i + 1,
            delay.as_secs_f64(),
            header()
        );
        let all = View {
            delay,
            block: true,
            net: true,
            by_rate: false,
        };
        for r in screen_rows(&all, &names, &prev, &cur) {
            text.push_str(&r);
            text.push('\n');
        }
        text.push('\n');
        // A closed pipe (`| head`) ends the run quietly.
        if out
            .write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            return Ok(());
        }
        prev = cur;
    }
    Ok(())
}

/// Samples every socket seen so far (`names`, grown by what [`discover`] finds now).
fn take(
    paths: &[PathBuf],
    names: &mut BTreeMap<PathBuf, String>,
    timeout: Duration,
) -> Result<BTreeMap<PathBuf, Result<Sample, String>>, TopError> {
    names.extend(discover(paths)?);
    Ok(names
        .keys()
        .map(|p| (p.clone(), sample(p, timeout)))
        .collect())
}

/// The wall-clock time of day (UTC) as HH:MM:SS.
fn chrono_like_now() -> String {
    let s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("{:02}:{:02}:{:02}", (s / 3600) % 24, (s / 60) % 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vback_api::{AtomicHistogram, LabeledHistogram, counters_from_device};

    fn blk(at: Instant, reads: u64, read_bytes: u64, lat: &[u64]) -> Sample {
        let device = serde_json::json!({"queues": [
            {"reads": reads / 2, "read_bytes": read_bytes / 2, "writes": 0, "write_bytes": 0,
             "errors": 0, "in_flight": 1},
            {"reads": reads - reads / 2, "read_bytes": read_bytes - read_bytes / 2, "writes": 0,
             "write_bytes": 0, "errors": 1, "in_flight": 2},
        ]});
        let h = AtomicHistogram::default();
        for &v in lat {
            h.record(v);
        }
        Sample {
            at,
            kind: "blkback".into(),
            pid: 42,
            device: Value::Null,
            stats: Stats {
                counters: counters_from_device(&device),
                histograms: vec![LabeledHistogram {
                    name: "latency_ns".into(),
                    labels: BTreeMap::from([("op".into(), "read".into())]),
                    histogram: h.snapshot(),
                }],
                device,
            },
        }
    }

    #[test]
    fn block_rows_show_rates_latency_and_gauges() {
        let t0 = Instant::now();
        let a = blk(t0, 100, 409_600, &[1000; 100]);
        let b = blk(
            t0 + Duration::from_secs(2),
            2100,
            409_600 + 8_192_000,
            &[&[1000; 100][..], &[50_000; 1970], &[2_000_000; 30]].concat(),
        );
        let line = row("alice/xvda", Some(&a), &Ok(b));
        assert!(line.len() <= WIDTH, "{line}");
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(&cols[..4], ["alice/xvda", "blk", "42", "1.0k"], "{line}");
        assert_eq!(cols[5], "4.1", "read MB/s: {line}");
        // The interval's p50 is the 50 µs bucket's bound, not the earlier 1 µs samples; p99
        // reaches the 2 ms ones.
        assert!(
            cols[7].starts_with('5') && cols[7].ends_with("us"),
            "{line}"
        );
        assert!(cols[8].ends_with("ms"), "{line}");
        assert_eq!(&cols[9..], ["3", "1"], "in flight, errors: {line}");
    }

    #[test]
    fn a_restarted_or_vanished_daemon_gets_no_bogus_rates() {
        let t0 = Instant::now();
        let a = blk(t0, 1000, 4096, &[]);
        let mut b = blk(t0 + Duration::from_secs(1), 10, 4096, &[]);
        b.pid = 43;
        let line = row("d", Some(&a), &Ok(b));
        assert!(line.contains("(new: rates"), "{line}");
        let line = row("d", Some(&a), &Err("gone (Connection refused)".into()));
        assert!(line.ends_with("gone (Connection refused)"), "{line}");
        assert_eq!(rate(&[], &a.stats.counters, "reads", 0.0), 0.0);
    }

    #[test]
    fn totals_prefer_the_unlabelled_counter() {
        let dev = serde_json::json!({"rx": {"packets": 10}, "queues": [{"rx": {"packets": 4}},
            {"rx": {"packets": 6}}]});
        let c = counters_from_device(&dev);
        assert_eq!(total(&c, "rx_packets"), 10);
        let dev = serde_json::json!({"queues": [{"reads": 4}, {"reads": 6}]});
        assert_eq!(total(&counters_from_device(&dev), "reads"), 10);
    }

    #[test]
    fn keys_change_the_view_like_xentops() {
        let v = View {
            delay: Duration::from_secs(1),
            block: true,
            net: true,
            by_rate: false,
        };
        assert_eq!(key(&v, 'q'), None);
        let d = key(&v, 'd').unwrap();
        assert_eq!(d.delay, Duration::from_secs(2));
        let ten = View {
            delay: Duration::from_secs(10),
            ..v.clone()
        };
        assert_eq!(key(&ten, 'd').unwrap().delay, Duration::from_secs(1));
        assert!(!key(&v, 'b').unwrap().block);
        assert!(!key(&v, 'n').unwrap().net);
        assert!(key(&v, 's').unwrap().by_rate);
        assert_eq!(key(&v, 'x').unwrap(), v);
    }

    #[test]
    fn screen_rows_filter_by_kind_and_sort_by_rate() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(1);
        let names: BTreeMap<PathBuf, String> = [("a", "a-idle"), ("b", "b-busy"), ("c", "c-net")]
            .iter()
            .map(|(p, n)| (PathBuf::from(p), (*n).to_owned()))
            .collect();
        let mut net = blk(t0, 0, 0, &[]);
        net.kind = "netback".into();
        let prev = BTreeMap::from([
            (PathBuf::from("a"), Ok(blk(t0, 10, 0, &[]))),
            (PathBuf::from("b"), Ok(blk(t0, 10, 0, &[]))),
            (PathBuf::from("c"), Ok(net.clone())),
        ]);
        net.at = t1;
        let cur = BTreeMap::from([
            (PathBuf::from("a"), Ok(blk(t1, 10, 0, &[]))),
            (PathBuf::from("b"), Ok(blk(t1, 500, 0, &[]))),
            (PathBuf::from("c"), Ok(net)),
        ]);
        let mut v = View {
            delay: Duration::from_secs(1),
            block: true,
            net: true,
            by_rate: false,
        };
        let first = |rows: Vec<String>| -> Vec<String> {
            rows.iter()
                .map(|r| r.split_whitespace().next().unwrap().to_owned())
                .collect()
        };
        assert_eq!(
            first(screen_rows(&v, &names, &prev, &cur)),
            ["a-idle", "b-busy", "c-net"]
        );
        v.by_rate = true;
        assert_eq!(
            first(screen_rows(&v, &names, &prev, &cur)),
            ["b-busy", "a-idle", "c-net"]
        );
        v.block = false;
        assert_eq!(first(screen_rows(&v, &names, &prev, &cur)), ["c-net"]);
        v.block = true;
        v.net = false;
        assert_eq!(
            first(screen_rows(&v, &names, &prev, &cur)),
            ["b-busy", "a-idle"]
        );
    }

    #[test]
    fn domains_fold_their_devices_then_list_them() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(1);
        let mut net0 = blk(t0, 0, 0, &[]);
        net0.kind = "netback".into();
        net0.stats.counters = counters_from_device(&serde_json::json!({"rx_packets": 100,
            "rx_bytes": 150_000, "tx_packets": 0, "tx_bytes": 0}));
        let mut net1 = net0.clone();
        net1.at = t1;
        net1.stats.counters = counters_from_device(&serde_json::json!({"rx_packets": 1100,
            "rx_bytes": 1_650_000, "tx_packets": 0, "tx_bytes": 0}));
        let p = |s: &str| PathBuf::from(s);
        let paths = [
            "aaron/xvda",
            "alice/xvda",
            "alice/xvdb",
            "alice/vif0",
            "bob/vif0",
            "lone",
        ];
        let names: BTreeMap<PathBuf, String> =
            paths.iter().map(|k| (p(k), (*k).to_owned())).collect();
        // Reads per second: aaron's disk 0, alice's 300 and 900; alice's and bob's NICs
        // receive 1000 packets per second.
        let prev = BTreeMap::from([
            (p(paths[0]), Ok(blk(t0, 5, 0, &[]))),
            (p(paths[1]), Ok(blk(t0, 100, 0, &[]))),
            (p(paths[2]), Ok(blk(t0, 100, 0, &[]))),
            (p(paths[3]), Ok(net0.clone())),
            (p(paths[4]), Ok(net0)),
            (p(paths[5]), Ok(blk(t0, 0, 0, &[]))),
        ]);
        let cur = BTreeMap::from([
            (p(paths[0]), Ok(blk(t1, 5, 0, &[]))),
            (p(paths[1]), Ok(blk(t1, 400, 0, &[]))),
            (p(paths[2]), Ok(blk(t1, 1000, 0, &[]))),
            (p(paths[3]), Ok(net1.clone())),
            (p(paths[4]), Ok(net1)),
            (p(paths[5]), Err("no reply".to_owned())),
        ]);
        let mut v = View {
            delay: Duration::from_secs(1),
            block: true,
            net: true,
            by_rate: false,
        };
        let first = |rows: &[String]| -> Vec<String> {
            rows.iter()
                .map(|r| r.split_whitespace().next().unwrap().to_owned())
                .collect()
        };
        let rows = screen_rows(&v, &names, &prev, &cur);
        for r in &rows {
            assert!(r.chars().count() <= WIDTH, "{r}");
        }
        assert_eq!(
            first(&rows),
            [
                "aaron", "xvda", "alice", "vif0", "xvda", "xvdb", "bob", "vif0", "lone"
            ],
            "{rows:#?}"
        );
        let cols: Vec<Vec<&str>> = rows
            .iter()
            .map(|r| r.split_whitespace().collect())
            .collect();
        // alice: 3 devices, its two disks' reads summed (300 + 900 per second), in flight 3 +
        // 3, errors 1 + 1; its devices indented below.
        assert_eq!(&cols[2][1..4], ["dom", "3dev", "1.2k"], "{rows:#?}");
        assert_eq!(&cols[2][9..], ["6", "2"], "{rows:#?}");
        assert!(rows[4].starts_with("  xvda "), "{rows:#?}");
        assert_eq!(cols[4][3], "300", "{rows:#?}");
        // bob has a NIC only: his row shows the net columns.
        assert_eq!(
            &cols[6][1..6],
            ["dom", "1dev", "rx", "1.0kpps", "12.0Mb/s"],
            "{rows:#?}"
        );
        assert_eq!(&cols[8][1..], ["-", "-", "no", "reply"], "{rows:#?}");
        // `b` hides block devices' rows, not their domains' (nor a daemon of unknown kind).
        v.block = false;
        let rows = screen_rows(&v, &names, &prev, &cur);
        assert_eq!(
            first(&rows),
            ["aaron", "alice", "vif0", "bob", "vif0", "lone"],
            "{rows:#?}"
        );
        // Sorted by rate: the busiest domain first, and its busiest device.
        v.block = true;
        v.by_rate = true;
        let rows = screen_rows(&v, &names, &prev, &cur);
        assert_eq!(
            first(&rows),
            [
                "alice", "vif0", "xvdb", "xvda", "bob", "vif0", "aaron", "xvda", "lone"
            ],
            "{rows:#?}"
        );
    }

    #[test]
    fn formats_fit_their_columns() {
        assert_eq!(format_ns(Some(850)), "850ns");
        assert_eq!(format_ns(Some(12_345)), "12.3us");
        assert_eq!(format_ns(Some(450_000)), "450us");
        assert_eq!(format_ns(Some(4_100_000)), "4.1ms");
        assert_eq!(format_ns(Some(2_000_000_000)), "2.0s");
        assert_eq!(format_ns(None), "-");
        assert_eq!(format_rate(999.0), "999");
        assert_eq!(format_rate(12_500.0), "12.5k");
        assert_eq!(format_rate(3_200_000.0), "3.2M");
        for r in [0.0, 999.4, 99_949.0, 999_499.0, 1e12] {
            assert!(format_rate(r).len() <= 6, "{r}");
        }
        assert!(header().len() <= WIDTH);
        assert_eq!(device_name(Path::new("alice/xvda.ctl")), "alice/xvda");
        assert_eq!(device_name(Path::new("alice-xvda.ctl")), "alice-xvda");
    }
}

/// What the full-screen view shows, changed by keys.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    /// Seconds between samples (`d` cycles 1, 2, 5, 10).
    pub delay: Duration,
    /// Block and CD rows shown (`b`).
    pub block: bool,
    /// Net rows shown (`n`).
    pub net: bool,
    /// Sort by reads (or received packets) per second, busiest first, instead of by name (`s`).
    pub by_rate: bool,
}

/// What a key does to the view; `None` means quit.
pub fn key(view: &View, c: char) -> Option<View> {
    let mut v = view.clone();
    match c {
        'q' | 'Q' => return None,
        'd' | 'D' => {
            let steps = [1, 2, 5, 10].map(Duration::from_secs);
            v.delay = steps
                .iter()
                .copied()
                .find(|s| *s > view.delay)
                .unwrap_or(steps[0]);
        }
        'b' | 'B' => v.block = !v.block,
        'n' | 'N' => v.net = !v.net,
        's' | 'S' => v.by_rate = !v.by_rate,
        _ => {}
    }
    Some(v)
}

/// The rows of one screen (and of a batch report), in the view's order and filter: each
/// domain's row (`<dir>/<domain>/<vdev>.ctl`) followed by its devices' rows, named `  vdev`;
/// a socket outside a domain's directory has its own row, unindented. `b` and `n` hide device
/// rows, not domains; sorting by rate orders domains (and devices within them) by reads plus
/// received packets per second.
pub fn screen_rows(
    view: &View,
    names: &BTreeMap<PathBuf, String>,
    prev: &BTreeMap<PathBuf, Result<Sample, String>>,
    cur: &BTreeMap<PathBuf, Result<Sample, String>>,
) -> Vec<String> {
    struct Dev<'a> {
        busy: f64,
        name: &'a str,
        prev: Option<&'a Sample>,
        cur: &'a Result<Sample, String>,
        shown: bool,
    }
    // By domain (or, for a socket outside one, by its name: `None` marks it).
    let mut groups: BTreeMap<&str, (Option<&str>, Vec<Dev>)> = BTreeMap::new();
    for (p, s) in cur {
        let name = names.get(p).map_or("?", String::as_str);
        let before = prev.get(p).and_then(|r| r.as_ref().ok());
        let kind = s.as_ref().map_or("", |s| short_kind(&s.kind));
        let shown =
            !((kind == "net" && !view.net) || ((kind == "blk" || kind == "cd") && !view.block));
        let busy = match (before, s) {
            (Some(b), Ok(s)) if b.pid == s.pid => {
                let secs = s.at.duration_since(b.at).as_secs_f64();
                let (pc, cc) = (&b.stats.counters, &s.stats.counters);
                ["reads", "read", "rx_packets"]
                    .iter()
                    .map(|n| rate(pc, cc, n, secs))
                    .sum()
            }
            _ => 0.0,
        };
        let (domain, vdev) = split_name(name);
        let g = groups
            .entry(domain.unwrap_or(name))
            .or_insert((domain, Vec::new()));
        g.1.push(Dev {
            busy,
            name: vdev,
            prev: before,
            cur: s,
            shown,
        });
    }
    let mut ordered: Vec<(f64, &str, Option<&str>, Vec<Dev>)> = groups
        .into_iter()
        .map(|(key, (domain, devs))| (devs.iter().map(|d| d.busy).sum(), key, domain, devs))
        .collect();
    if view.by_rate {
        ordered.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    }
    let mut rows = Vec::new();
    for (_, key, domain, mut devs) in ordered {
        let Some(domain) = domain else {
            // A socket of its own: one row, if its kind is shown.
            for d in devs.iter().filter(|d| d.shown) {
                rows.push(row(key, d.prev, d.cur));
            }
            continue;
        };
        let all: Vec<_> = devs.iter().map(|d| (d.prev, d.cur)).collect();
        rows.push(domain_row(domain, &all));
        if view.by_rate {
            devs.sort_by(|a, b| b.busy.total_cmp(&a.busy).then_with(|| a.name.cmp(b.name)));
        }
        for d in devs.iter().filter(|d| d.shown) {
            rows.push(row(&format!("  {}", d.name), d.prev, d.cur));
        }
    }
    rows
}

/// The full-screen view: like the batch mode, redrawn every delay until `q`, with xentop's
/// keys.
pub fn interactive(paths: &[PathBuf], delay: Duration, timeout: Duration) -> Result<(), TopError> {
    use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind};
    use ratatui::text::Line;
    use ratatui::widgets::Paragraph;

    let mut names: BTreeMap<PathBuf, String> = BTreeMap::new();
    let mut prev = take(paths, &mut names, timeout)?;
    let mut cur = prev.clone();
    let mut view = View {
        delay,
        block: true,
        net: true,
        by_rate: false,
    };
    let mut terminal = ratatui::try_init().map_err(TopError::Terminal)?;
    let mut next = Instant::now() + view.delay;
    let result = loop {
        let rows = screen_rows(&view, &names, &prev, &cur);
        let title = format!(
            "vbctl top - {}  {} daemons  delay {} s  sort: {}",
            chrono_like_now(),
            cur.len(),
            view.delay.as_secs(),
            if view.by_rate { "busiest" } else { "name" }
        );
        let mut lines = vec![Line::from(title), Line::from(header())];
        lines.extend(rows.into_iter().map(Line::from));
        let keys = "d delay  b block  n network  s sort  q quit";
        let drawn = terminal.draw(|f| {
            let area = f.area();
            let mut l = lines.clone();
            let room = usize::from(area.height).saturating_sub(1);
            l.truncate(room);
            while l.len() < room {
                l.push(Line::from(""));
            }
            l.push(Line::from(keys));
            f.render_widget(Paragraph::new(l), area);
        });
        if let Err(e) = drawn {
            break Err(TopError::Terminal(e));
        }
        let wait = next.saturating_duration_since(Instant::now());
        match event::poll(wait) {
            Ok(true) => {
                if let Ok(Event::Key(k)) = event::read()
                    && k.kind == KeyEventKind::Press
                {
                    let c = match k.code {
                        KeyCode::Char(c) => c,
                        KeyCode::Esc => 'q',
                        _ => continue,
                    };
                    match key(&view, c) {
                        None => break Ok(()),
                        Some(v) => {
                            if v.delay != view.delay {
                                next = Instant::now() + v.delay;
                            }
                            view = v;
                        }
                    }
                }
            }
            Ok(false) => {
                match take(paths, &mut names, timeout) {
                    Ok(s) => prev = std::mem::replace(&mut cur, s),
                    Err(e) => break Err(e),
                }
                next = Instant::now() + view.delay;
            }
            Err(e) => break Err(TopError::Terminal(e)),
        }
    };
    ratatui::restore();
    result
}
