//! `vbctl host-metrics`: host metrics for guests in vhostmd's metrics disk format, so a guest
//! given the file as a read-only disk (`tap:aio:/dev/shm/vhostmd0,xvdb,r`) reads the host's
//! metrics and its own devices' counters with vhostmd's tools (`vm-dump-metrics`, libmetrics).
//!
//! The disk, as vhostmd (`vhostmd/vhostmd.c`) writes it and libmetrics reads it:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | signature `mvbd` (0x6d766264), big endian |
//! | 4 | 4 | busy: 1 while the writer updates the disk, else 0, big endian |
//! | 8 | 4 | checksum of the content: the sum of its bytes, each as a signed char, modulo 2^32, big endian |
//! | 12 | 4 | length of the content in bytes, big endian |
//! | 16 | length | the content: `<metrics>` XML |
//!
//! The rest of the disk is zeros. A reader (libmetrics' `read_mdisk`) reads the header, retries
//! while busy is set, reads the content, then reads the header again and retries if busy is set
//! or the checksum changed. So the disk is updated in place as vhostmd does (busy set, content,
//! checksum and length, busy cleared): a block device backend that has the file open keeps
//! seeing it (a new file renamed over it would not be seen by a backend that opened the old
//! one).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::top::{self, Sample};

/// The disk's signature, `mvbd`.
pub const SIGNATURE: u32 = 0x6d76_6264;
/// The header's size: signature, busy, checksum, length.
pub const HEADER_SIZE: u64 = 16;
/// The smallest disk vhostmd accepts.
pub const MIN_SIZE: u64 = 1024;
/// The largest disk vhostmd accepts.
pub const MAX_SIZE: u64 = 256 * 1024 * 1024;
/// vhostmd's default disk path.
pub const DEFAULT_OUTPUT: &str = "/dev/shm/vhostmd0";
/// Clock ticks per second in `/proc/stat` (`USER_HZ`, 100 on Linux whatever the kernel's HZ).
const USER_HZ: f64 = 100.0;

/// Errors of `vbctl host-metrics`.
#[derive(Debug, Error)]
pub enum HostMetricsError {
    /// `--size` is not a size vhostmd (and a block device) accepts.
    #[error(
        "metrics disk size {0} bytes: give a multiple of 512 between 1024 and 256M (vhostmd's \
         limits), e.g. --size 256K"
    )]
    BadSize(u64),
    /// `--size` does not parse.
    #[error("metrics disk size `{0}`: give bytes, or a number with K or M (256K, 1M)")]
    SizeSyntax(String),
    /// The output exists with another size (a guest may have it attached: not resized).
    #[error(
        "{path} exists with {found} bytes, not {want}: remove it (after detaching it from guests) \
         or pass --size {found}"
    )]
    SizeMismatch {
        /// The file.
        path: PathBuf,
        /// Its size.
        found: u64,
        /// The size asked for.
        want: u64,
    },
    /// The output exists and is not a regular file.
    #[error("{0} is not a regular file: give a file path, e.g. /dev/shm/vhostmd0")]
    NotAFile(PathBuf),
    /// The metrics do not fit the disk.
    #[error(
        "the metrics ({len} bytes of XML) do not fit a {size}-byte disk: pass a larger --size \
         (a new file) or fewer domains (--domain)"
    )]
    TooLarge {
        /// The XML's length.
        len: usize,
        /// The disk's size.
        size: u64,
    },
    /// The file could not be created, read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The daemons could not be listed.
    #[error(transparent)]
    Discover(#[from] top::TopError),
}

/// Parses a disk size: bytes, or a number with `K`/`k` (KiB) or `M`/`m` (MiB) as vhostmd's
/// `<size unit=...>`; checks vhostmd's limits and that it is whole sectors.
pub fn parse_size(s: &str) -> Result<u64, HostMetricsError> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1024),
        Some((i, 'm' | 'M')) => (&t[..i], 1024 * 1024),
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| HostMetricsError::SizeSyntax(s.to_owned()))?;
    let size = n
        .checked_mul(mult)
        .ok_or_else(|| HostMetricsError::SizeSyntax(s.to_owned()))?;
    if !(MIN_SIZE..=MAX_SIZE).contains(&size) || size % 512 != 0 {
        return Err(HostMetricsError::BadSize(size));
    }
    Ok(size)
}

/// vhostmd's content checksum (`vu_buffer_checksum`): the sum of the bytes, each as a C
/// `char` (signed on x86, so bytes from 0x80 count negative), modulo 2^32.
pub fn checksum(content: &[u8]) -> u32 {
    content
        .iter()
        .fold(0u32, |s, &b| s.wrapping_add(i32::from(b as i8) as u32))
}

/// The 16-byte header, big endian.
pub fn header(busy: bool, sum: u32, len: u32) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&SIGNATURE.to_be_bytes());
    h[4..8].copy_from_slice(&u32::from(busy).to_be_bytes());
    h[8..12].copy_from_slice(&sum.to_be_bytes());
    h[12..16].copy_from_slice(&len.to_be_bytes());
    h
}

/// Text for XML content or a single-quoted attribute: `& < > ' "` escaped, and characters XML
/// 1.0 does not allow at all (control characters but tab, newline and carriage return) shown as
/// `?`.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{fffe}' || c == '\u{ffff}' => out.push('?'),
            c => out.push(c),
        }
    }
    out
}

/// One metric: vhostmd's `type` (`string`, `uint32`, `uint64`, `real64`), name, value and
/// unit.
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    /// vhostmd's type name.
    pub ty: &'static str,
    /// The metric's name.
    pub name: String,
    /// Its value, as text.
    pub value: String,
    /// Its unit, if any.
    pub unit: Option<&'static str>,
}

impl Metric {
    fn new(ty: &'static str, name: impl Into<String>, value: impl ToString) -> Metric {
        Metric {
            ty,
            name: name.into(),
            value: value.to_string(),
            unit: None,
        }
    }
    fn unit(mut self, unit: &'static str) -> Metric {
        self.unit = Some(unit);
        self
    }
}

/// The host's metrics, with the names of vhostmd's default configuration, from `/proc`
/// (`proc` is the directory read, `/proc` but in tests). A metric `/proc` does not give is left
/// out.
pub fn host_metrics(proc: &Path) -> Vec<Metric> {
    let read = |p: &str| std::fs::read_to_string(proc.join(p)).ok();
    let mut out = Vec::new();
    if let Some(h) = read("sys/kernel/hostname") {
        out.push(Metric::new("string", "HostName", h.trim()));
    }
    out.push(Metric::new("string", "VirtualizationVendor", "vback"));
    out.push(Metric::new(
        "string",
        "VirtualizationProductInfo",
        concat!("vback ", env!("CARGO_PKG_VERSION")),
    ));
    let stat = read("stat").unwrap_or_default();
    let cpus = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count();
    if cpus > 0 {
        out.push(Metric::new("uint32", "TotalPhyCPUs", cpus));
        out.push(Metric::new("uint32", "NumCPUs", cpus));
    }
    let meminfo = read("meminfo").unwrap_or_default();
    let kib = |key: &str| -> Option<u64> {
        meminfo.lines().find_map(|l| {
            let rest = l.strip_prefix(key)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse().ok()
        })
    };
    if let Some(total) = kib("MemTotal") {
        out.push(Metric::new("uint64", "TotalPhyMem", total / 1024).unit("MiB"));
        if let Some(avail) = kib("MemAvailable") {
            out.push(
                Metric::new("uint64", "UsedMem", total.saturating_sub(avail) / 1024).unit("MiB"),
            );
            out.push(Metric::new("uint64", "FreeMem", avail / 1024).unit("MiB"));
        }
    }
    let vmstat = read("vmstat").unwrap_or_default();
    let vm = |key: &str| -> Option<u64> {
        vmstat.lines().find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            if k == key {
                v.trim().parse().ok()
            } else {
                None
            }
        })
    };
    // `vmstat -s`'s "K paged in/out", vhostmd's source of these.
    if let Some(v) = vm("pgpgin") {
        out.push(Metric::new("uint64", "PagedInMemory", v).unit("KiB"));
    }
    if let Some(v) = vm("pgpgout") {
        out.push(Metric::new("uint64", "PagedOutMemory", v).unit("KiB"));
    }
    // vhostmd's TotalCPUTime: user + nice + system of the `cpu` line, in seconds.
    if let Some(l) = stat.lines().find(|l| l.starts_with("cpu ")) {
        let f: Vec<u64> = l
            .split_whitespace()
            .skip(1)
            .take(3)
            .filter_map(|x| x.parse().ok())
            .collect();
        if f.len() == 3 {
            let secs = (f[0] + f[1] + f[2]) as f64 / USER_HZ;
            out.push(Metric::new("real64", "TotalCPUTime", format!("{secs:.6}")).unit("s"));
        }
    }
    out
}

/// A domain's and its devices' metrics: for each device (by name), `<device>.up` (1 if its
/// daemon answered) and, if it did, `<device>.kind` and every uniform counter as
/// `<device>.<counter>`, summed over its labels (queues).
pub fn vm_metrics(devices: &BTreeMap<String, Result<Sample, String>>) -> Vec<Metric> {
    let mut out = Vec::new();
    for (dev, s) in devices {
        out.push(Metric::new(
            "uint32",
            format!("{dev}.up"),
            u32::from(s.is_ok()),
        ));
        let Ok(s) = s else { continue };
        out.push(Metric::new("string", format!("{dev}.kind"), &s.kind));
        let mut names: Vec<&str> = s.stats.counters.iter().map(|c| c.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        for n in names {
            out.push(Metric::new(
                "uint64",
                format!("{dev}.{n}"),
                top::total(&s.stats.counters, n),
            ));
        }
    }
    out
}

fn metric_xml(out: &mut String, m: &Metric, context: &str, domain: Option<&str>) {
    let _ = write!(out, "  <metric type='{}' context='{context}'", m.ty);
    if let Some(d) = domain {
        let _ = write!(out, " domain='{}'", escape(d));
    }
    if let Some(u) = m.unit {
        let _ = write!(out, " unit='{u}'");
    }
    let _ = write!(
        out,
        ">\n    <name>{}</name>\n    <value>{}</value>\n  </metric>\n",
        escape(&m.name),
        escape(&m.value)
    );
}

/// The disk's content: `<metrics>` with the host's metrics (`context='host'`) and each
/// domain's (`context='vm' domain='NAME'`), in vhostmd's layout.
pub fn render(host: &[Metric], domains: &BTreeMap<String, Vec<Metric>>) -> String {
    let mut out = String::from("<metrics>\n");
    for m in host {
        metric_xml(&mut out, m, "host", None);
    }
    for (d, ms) in domains {
        for m in ms {
            metric_xml(&mut out, m, "vm", Some(d));
        }
    }
    out.push_str("</metrics>\n");
    out
}

/// The metrics disk, open for updates in place.
#[derive(Debug)]
pub struct Disk {
    path: PathBuf,
    file: File,
    size: u64,
    /// The content length written last (the bytes past the new content that need zeroing).
    written: u64,
}

impl Disk {
    /// Opens `path` for updates, or creates it: a new file is made beside it at the full size
    /// (zeros: no signature, which readers skip) and renamed into place, so no reader sees a
    /// short file. An existing file must be a regular file of `size` bytes (one a guest may
    /// have attached is not resized).
    pub fn open(path: &Path, size: u64) -> Result<Disk, HostMetricsError> {
        let io = |source| HostMetricsError::Io {
            path: path.to_owned(),
            source,
        };
        match std::fs::metadata(path) {
            Ok(m) if !m.is_file() => return Err(HostMetricsError::NotAFile(path.to_owned())),
            Ok(m) if m.len() != size => {
                return Err(HostMetricsError::SizeMismatch {
                    path: path.to_owned(),
                    found: m.len(),
                    want: size,
                });
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let name = path
                    .file_name()
                    .map_or_else(|| "vhostmd".into(), |n| n.to_string_lossy().into_owned());
                let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
                let made = File::create(&tmp)
                    .and_then(|f| f.set_len(size))
                    .and_then(|()| std::fs::rename(&tmp, path));
                if let Err(e) = made {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(io(e));
                }
            }
            Err(e) => return Err(io(e)),
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io)?;
        // What an earlier writer left: zero up to its length at the next update.
        let mut h = [0u8; 16];
        let written = match file.read_exact_at(&mut h, 0) {
            Ok(()) if h[0..4] == SIGNATURE.to_be_bytes() => {
                u64::from(u32::from_be_bytes([h[12], h[13], h[14], h[15]])).min(size - HEADER_SIZE)
            }
            _ => size - HEADER_SIZE,
        };
        Ok(Disk {
            path: path.to_owned(),
            file,
            size,
            written,
        })
    }

    /// Writes `content` as vhostmd does: busy set (with the signature), the content (and zeros
    /// over the rest of the previous one), the checksum and length, busy cleared.
    pub fn update(&mut self, content: &[u8]) -> Result<(), HostMetricsError> {
        let len = content.len();
        if len as u64 > self.size - HEADER_SIZE {
            return Err(HostMetricsError::TooLarge {
                len,
                size: self.size,
            });
        }
        let io = |source| HostMetricsError::Io {
            path: self.path.clone(),
            source,
        };
        let f = &self.file;
        let old = header(true, 0, 0);
        f.write_all_at(&old[0..8], 0).map_err(io)?;
        f.write_all_at(content, HEADER_SIZE).map_err(io)?;
        if self.written > len as u64 {
            let zeros = vec![0u8; (self.written - len as u64) as usize];
            f.write_all_at(&zeros, HEADER_SIZE + len as u64)
                .map_err(io)?;
        }
        let h = header(true, checksum(content), len as u32);
        f.write_all_at(&h[8..16], 8).map_err(io)?;
        f.write_all_at(&0u32.to_be_bytes(), 4).map_err(io)?;
        self.written = len as u64;
        Ok(())
    }
}

/// One update's content: the host's metrics and every domain's found under `paths` (only
/// `only`'s, if given). A device's domain is its directory below the one given
/// (`/run/vback/alice/xvda.ctl` is device `xvda` of `alice`); a socket given directly or lying
/// directly in the directory is a domain of its own, named like the socket.
pub fn collect(
    paths: &[PathBuf],
    only: &[String],
    timeout: Duration,
) -> Result<String, HostMetricsError> {
    let mut domains: BTreeMap<String, BTreeMap<String, Result<Sample, String>>> = BTreeMap::new();
    for (ctl, name) in top::discover(paths)? {
        let (domain, device) = match name.split_once('/') {
            Some((d, v)) => (d.to_owned(), v.to_owned()),
            None => (name.clone(), name.clone()),
        };
        if !only.is_empty() && !only.contains(&domain) {
            continue;
        }
        domains
            .entry(domain)
            .or_default()
            .insert(device, top::sample(&ctl, timeout));
    }
    let vms = domains
        .iter()
        .map(|(d, devs)| (d.clone(), vm_metrics(devs)))
        .collect();
    Ok(render(&host_metrics(Path::new("/proc")), &vms))
}

/// `vbctl host-metrics`: updates the disk at `output` every `interval` (once with `once`).
pub fn run(
    output: &Path,
    size: u64,
    interval: Duration,
    once: bool,
    paths: &[PathBuf],
    only: &[String],
    timeout: Duration,
) -> Result<(), HostMetricsError> {
    let mut disk = Disk::open(output, size)?;
    loop {
        let start = Instant::now();
        let xml = collect(paths, only, timeout)?;
        disk.update(xml.as_bytes())?;
        if once {
            return Ok(());
        }
        std::thread::sleep(interval.saturating_sub(start.elapsed()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vback_api::{Stats, counters_from_device};

    #[test]
    fn checksum_is_vhostmds_signed_byte_sum() {
        assert_eq!(checksum(b""), 0);
        assert_eq!(checksum(b"ab"), 97 + 98);
        // 0xc3 0xa9 (é) are -61 and -87 as signed chars.
        assert_eq!(checksum("é".as_bytes()), (-148i32) as u32);
        assert_eq!(checksum(&[0xff; 3]), (-3i32) as u32);
    }

    #[test]
    fn header_is_big_endian_mvbd() {
        let h = header(false, 0x0102_0304, 0x0000_0a0b);
        assert_eq!(&h[0..4], b"mvbd");
        assert_eq!(&h[4..8], &[0, 0, 0, 0]);
        assert_eq!(&h[8..12], &[1, 2, 3, 4]);
        assert_eq!(&h[12..16], &[0, 0, 0x0a, 0x0b]);
        assert_eq!(&header(true, 0, 0)[4..8], &[0, 0, 0, 1]);
    }

    #[test]
    fn names_and_values_are_escaped() {
        assert_eq!(
            escape("a&b<c>'d\"e\u{1}f\tg"),
            "a&amp;b&lt;c&gt;&apos;d&quot;e?f\tg"
        );
        let vm = BTreeMap::from([(
            "o'brien<&>".to_owned(),
            vec![Metric::new("string", "x&y", "<v>")],
        )]);
        let xml = render(&[], &vm);
        assert_eq!(
            xml,
            "<metrics>\n  <metric type='string' context='vm' domain='o&apos;brien&lt;&amp;&gt;'>\n    \
             <name>x&amp;y</name>\n    <value>&lt;v&gt;</value>\n  </metric>\n</metrics>\n"
        );
    }

    #[test]
    fn sizes_follow_vhostmds_limits() {
        assert_eq!(parse_size("256K").unwrap(), 262_144);
        assert_eq!(parse_size("1m").unwrap(), 1_048_576);
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert!(matches!(
            parse_size("512"),
            Err(HostMetricsError::BadSize(512))
        ));
        assert!(matches!(
            parse_size("1000"),
            Err(HostMetricsError::BadSize(_))
        ));
        assert!(matches!(
            parse_size("257M"),
            Err(HostMetricsError::BadSize(_))
        ));
        assert!(matches!(
            parse_size("12G"),
            Err(HostMetricsError::SizeSyntax(_))
        ));
    }

    #[test]
    fn host_metrics_come_from_proc() {
        let d = tempfile_dir();
        std::fs::create_dir_all(d.join("sys/kernel")).unwrap();
        std::fs::write(d.join("sys/kernel/hostname"), "dom0\n").unwrap();
        std::fs::write(
            d.join("stat"),
            "cpu  100 50 250 9999 0 0 0\ncpu0 50 25 125 0\ncpu1 50 25 125 0\nintr 1\n",
        )
        .unwrap();
        std::fs::write(
            d.join("meminfo"),
            "MemTotal:  2097152 kB\nMemFree: 1 kB\nMemAvailable:  1048576 kB\n",
        )
        .unwrap();
        std::fs::write(
            d.join("vmstat"),
            "nr_free_pages 1\npgpgin 123\npgpgout 456\n",
        )
        .unwrap();
        let m = host_metrics(&d);
        let get = |n: &str| m.iter().find(|m| m.name == n).map(|m| m.value.as_str());
        assert_eq!(get("HostName"), Some("dom0"));
        assert_eq!(get("TotalPhyCPUs"), Some("2"));
        assert_eq!(get("TotalPhyMem"), Some("2048"));
        assert_eq!(get("UsedMem"), Some("1024"));
        assert_eq!(get("FreeMem"), Some("1024"));
        assert_eq!(get("PagedInMemory"), Some("123"));
        assert_eq!(get("PagedOutMemory"), Some("456"));
        assert_eq!(get("TotalCPUTime"), Some("4.000000"));
        std::fs::remove_dir_all(&d).unwrap();
        // Nothing readable: only what needs no /proc.
        let none = host_metrics(Path::new("/nonexistent"));
        assert!(none.iter().all(|m| m.name.starts_with("Virtualization")));
    }

    fn tempfile_dir() -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "vbctl-hm-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn vm_metrics_sum_counters_over_queues() {
        let device = serde_json::json!({"queues": [{"reads": 3, "writes": 1}, {"reads": 4,
            "writes": 0}]});
        let s = Sample {
            at: Instant::now(),
            kind: "blkback".into(),
            pid: 1,
            device: serde_json::Value::Null,
            stats: Stats {
                counters: counters_from_device(&device),
                histograms: vec![],
                device,
            },
        };
        let devs = BTreeMap::from([
            ("xvda".to_owned(), Ok(s)),
            ("xvdb".to_owned(), Err("gone".to_owned())),
        ]);
        let m = vm_metrics(&devs);
        let get = |n: &str| m.iter().find(|m| m.name == n).map(|m| m.value.as_str());
        assert_eq!(get("xvda.up"), Some("1"));
        assert_eq!(get("xvda.kind"), Some("blkback"));
        assert_eq!(get("xvda.reads"), Some("7"));
        assert_eq!(get("xvda.writes"), Some("1"));
        assert_eq!(get("xvdb.up"), Some("0"));
        assert_eq!(get("xvdb.reads"), None);
    }

    /// Reads the disk as libmetrics does: signature, busy clear, the content by the header's
    /// length, its checksum.
    fn read_disk(p: &Path) -> Option<String> {
        let b = std::fs::read(p).unwrap();
        let word = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().unwrap());
        if word(0) != SIGNATURE || word(4) != 0 {
            return None;
        }
        let len = word(12) as usize;
        let content = &b[16..16 + len];
        assert_eq!(checksum(content), word(8));
        assert!(
            b[16 + len..].iter().all(|&x| x == 0),
            "zeros after the content"
        );
        Some(String::from_utf8(content.to_vec()).unwrap())
    }

    #[test]
    fn the_disk_is_created_full_size_and_updated_in_place() {
        let d = tempfile_dir();
        let p = d.join("vhostmd0");
        let mut disk = Disk::open(&p, 4096).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 4096);
        assert_eq!(read_disk(&p), None, "no signature before the first update");
        let long = "<metrics>\n".to_owned() + &"x".repeat(1000) + "</metrics>\n";
        disk.update(long.as_bytes()).unwrap();
        assert_eq!(read_disk(&p).as_deref(), Some(long.as_str()));
        use std::os::unix::fs::MetadataExt;
        let ino = std::fs::metadata(&p).unwrap().ino();
        // A shorter update: the old tail is zeroed, the file is the same.
        disk.update(b"<metrics>\n</metrics>\n").unwrap();
        assert_eq!(read_disk(&p).as_deref(), Some("<metrics>\n</metrics>\n"));
        assert_eq!(
            std::fs::metadata(&p).unwrap().ino(),
            ino,
            "updated in place"
        );
        // Too much for the disk.
        assert!(matches!(
            disk.update(&[b'x'; 4081]),
            Err(HostMetricsError::TooLarge { len: 4081, .. })
        ));
        drop(disk);
        // Reopened: a long first write after a long earlier one zeroes correctly too.
        let mut disk = Disk::open(&p, 4096).unwrap();
        disk.update(long.as_bytes()).unwrap();
        disk.update(b"<metrics/>").unwrap();
        assert_eq!(read_disk(&p).as_deref(), Some("<metrics/>"));
        // Another size is refused, not resized.
        assert!(matches!(
            Disk::open(&p, 8192),
            Err(HostMetricsError::SizeMismatch { found: 4096, .. })
        ));
        assert!(matches!(
            Disk::open(&d, 4096),
            Err(HostMetricsError::NotAFile(_))
        ));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
