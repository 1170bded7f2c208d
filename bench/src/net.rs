//! The vhost-user-net benchmark: DPDK's virtio-user PMD in dpdk-testpmd is the front end (no
//! VM), and the backends are netback with its null host side, netback with a kernel tap (in a
//! network namespace the benchmark creates), and DPDK's own vhost PMD (`net_vhost`) in a
//! second testpmd as the reference. Each backend runs on CPU 0, the front end on CPU 1.
//!
//! Directions, named from the guest's side as in virtio:
//! - `tx` (guest → host): the front end runs txonly; the backend drops the frames (null),
//!   writes them to the tap where the kernel drops them (no listener; counted with the tap's
//!   receive statistics), or runs rxonly (DPDK);
//! - `rx` (host → guest): the front end runs rxonly; the backend generates frames (null),
//!   reads them from the tap, which an AF_PACKET source in the namespace fills, or runs
//!   txonly (DPDK).

use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vback_tests::process::{which, workspace_bin};

use crate::afpacket;
use crate::testpmd::{self, PortStats, StatsParser};

/// Options of `vback-bench net`.
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct Args {
    /// Seconds measured per run, after the warm-up (testpmd prints its counters about every
    /// 2 s here, so the measured window is rounded up to its next report).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=600))]
    seconds: u64,

    /// Seconds of each run not counted (connection, ring setup, first bursts).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(0..=60))]
    warmup: u64,

    /// Measure each workload this many times, alternating the backends (netback-null,
    /// dpdk-vhost, netback-tap, netback-tap-writev, netback-null, ...), and report the median of each: this
    /// machine's numbers drift, and alternating spreads the drift over all backends.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    repeat: u32,

    /// Run only these backends (comma separated).
    #[arg(long, value_delimiter = ',', value_enum)]
    only: Vec<Backend>,

    /// Directions: tx (guest → host: the front end transmits) and rx (host → guest).
    #[arg(long, value_delimiter = ',', value_enum, default_values = ["tx", "rx"])]
    directions: Vec<Direction>,

    /// Ethernet frame sizes in bytes without FCS (testpmd's --txpkts, netback's
    /// --null-frame-len; 60 to 1514).
    #[arg(long, value_delimiter = ',', default_values_t = [64u16, 1500],
          value_parser = clap::value_parser!(u16).range(60..=1514))]
    frame_sizes: Vec<u16>,

    /// Also write every run and the medians as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,

    /// Where scripts/bench-setup.sh installed dpdk-testpmd (binary and lib/).
    #[arg(long, env = "DPDK_DIR", default_value = "/var/tmp/vback-dpdk")]
    dpdk_dir: PathBuf,

    /// Extra keys for the tap row's vif string, which is
    /// 'vifname=vbtNNNNN,mac=00:16:3e:00:be:01,script=none' (e.g. --tap-vif-extra 'mtu=9000').
    #[arg(long, value_name = "KEYS")]
    tap_vif_extra: Option<String>,

    /// The netback binary (default: the one built next to vback-bench).
    #[arg(long, value_name = "PATH")]
    netback: Option<PathBuf>,

    /// Keep the work directory with every process's log (printed at the start; removed
    /// otherwise).
    #[arg(long)]
    keep_logs: bool,

    /// An extra netback argument (repeatable), e.g. --netback-arg=--log-level=info.
    #[arg(long = "netback-arg", value_name = "ARG", allow_hyphen_values = true)]
    netback_args: Vec<String>,

    /// An extra argument for the front end's testpmd (repeatable, after its `--`), e.g.
    /// --client-arg=--enable-lro (the front end then accepts TSO frames: GUEST_TSO4/6, so a
    /// backend must be ready for 64 KiB frames in every receive).
    #[arg(long = "client-arg", value_name = "ARG", allow_hyphen_values = true)]
    client_args: Vec<String>,
}

const AFTER_HELP: &str = "\
Each run starts the backend on CPU 0 and dpdk-testpmd with a virtio-user port (the front end,
forwarding core on CPU 1) on a fresh socket, skips --warmup seconds, then measures --seconds:
  Mpps, Gbit/s   the front end's transmitted (tx) or received (rx) frame counter over the window
                 (tx through the tap: the tap's receive counter, i.e. what reached the kernel);
                 Gbit/s counts Ethernet frames without FCS
  CPU ns/packet  the backend process's utime+stime (/proc/PID/stat) per packet
  backend CPU, client CPU   the share of one CPU each process got (less than 100% for a busy
                 poller means other work took the CPU: compare such runs with care); \"waited\":
                 the backend's time runnable but off the CPU (/proc/PID/task/*/schedstat)
Needs root (network namespace, taps), dpdk-testpmd (scripts/bench-setup.sh) and a release build:
  cargo build --release -p netback -p vback-bench

Examples:
  vback-bench net --repeat 3                   # the full table, medians of 3 (about 10 minutes)
  vback-bench net --only netback-null,dpdk-vhost --directions tx --frame-sizes 64 --seconds 3
  vback-bench net --only netback-tap --json tap.json
  vback-bench net --netback-arg=--log-level=debug --keep-logs  # netback's logs, kept";

/// A backend under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// netback --host null: transmitted frames counted and dropped (--null-rx off); for rx,
    /// a frame of the measured size in every posted buffer (--null-rx flood).
    NetbackNull,
    /// DPDK's vhost PMD (net_vhost) in a second dpdk-testpmd: the reference.
    DpdkVhost,
    /// netback --host tap in a network namespace; the kernel is the sink (tx) and an
    /// AF_PACKET socket on the tap the source (rx).
    NetbackTap,
    /// The same with --tap-io writev: one system call per transmitted frame, the I/O pattern of
    /// cloud-hypervisor's vhost_user_net (the reference for the tap rows).
    NetbackTapWritev,
}

const BACKENDS: [Backend; 4] = [
    Backend::NetbackNull,
    Backend::DpdkVhost,
    Backend::NetbackTap,
    Backend::NetbackTapWritev,
];

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::NetbackNull => "netback-null",
            Backend::DpdkVhost => "dpdk-vhost",
            Backend::NetbackTap => "netback-tap",
            Backend::NetbackTapWritev => "netback-tap-writev",
        }
    }

    fn is_tap(self) -> bool {
        matches!(self, Backend::NetbackTap | Backend::NetbackTapWritev)
    }
}

/// A direction, named from the guest's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Direction {
    /// Guest → host: the front end runs txonly.
    Tx,
    /// Host → guest: the front end runs rxonly.
    Rx,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Direction::Tx => "tx",
            Direction::Rx => "rx",
        }
    }
    fn arrow(self) -> &'static str {
        match self {
            Direction::Tx => "guest→host",
            Direction::Rx => "host→guest",
        }
    }
}

/// The CPU the backend runs on, and the front end's forwarding core.
const BACKEND_CPU: usize = 0;
const CLIENT_CPU: usize = 1;
/// The MAC netback-tap gives the guest (the AF_PACKET source sends to it).
const GUEST_MAC: [u8; 6] = [0x00, 0x16, 0x3e, 0x00, 0xbe, 0x01];

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A process could not be started.
    #[error("cannot start {what}: {err}")]
    Spawn {
        /// The program.
        what: String,
        /// The OS error.
        err: std::io::Error,
    },
    /// The backend refused to run (exited before listening, or did not create its interface).
    #[error("not available: {0}")]
    NotAvailable(String),
    /// The backend died during the run.
    #[error("{name} exited during the run ({status}): {log}")]
    Died {
        /// The backend.
        name: String,
        /// Its exit status.
        status: String,
        /// The end of its log.
        log: String,
    },
    /// testpmd said its device did not come up.
    #[error("{who}: {line} (log: {log})")]
    DeviceFailed {
        /// Front end or backend.
        who: String,
        /// testpmd's message.
        line: String,
        /// The log file.
        log: String,
    },
    /// The front end printed no (or too few) statistics.
    #[error("{0}")]
    NoStats(String),
    /// Setting up the network namespace or the tap failed.
    #[error("{0}")]
    Net(String),
    /// The AF_PACKET source failed.
    #[error("packet source: {0}")]
    Source(#[from] afpacket::SourceError),
    /// A file could not be written or read.
    #[error("{path}: {err}")]
    Io {
        /// The path.
        path: String,
        /// The OS error.
        err: std::io::Error,
    },
}

/// Sets this thread's CPU affinity to one CPU.
fn pin_self(cpu: usize) {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes one bit inside the set we own (cpu < CPU_SETSIZE).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: sched_setaffinity reads the set for the duration of the call.
    unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// utime + stime of a process, in clock ticks, from /proc/PID/stat.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start with the state (field 3);
    // utime and stime are fields 14 and 15.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Nanoseconds the threads of a process spent runnable but waiting for a CPU (the second
/// field of /proc/PID/task/TID/schedstat, summed): how much other work kept it off its CPU.
fn run_delay_ns(pid: u32) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut sum = 0u64;
    for t in tasks.flatten() {
        let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) else {
            continue;
        };
        sum += s
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Some(sum)
}

/// Counters of one interface as seen from a process's network namespace
/// (/proc/PID/net/dev).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct DevStats {
    rx_packets: u64,
    rx_bytes: u64,
    rx_dropped: u64,
    tx_packets: u64,
    tx_dropped: u64,
}

fn parse_net_dev(table: &str, ifname: &str) -> Option<DevStats> {
    table.lines().find_map(|l| {
        let (name, rest) = l.split_once(':')?;
        if name.trim() != ifname {
            return None;
        }
        let v: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        // Receive: bytes packets errs drop fifo frame compressed multicast;
        // transmit: bytes packets errs drop ...
        Some(DevStats {
            rx_bytes: *v.first()?,
            rx_packets: *v.get(1)?,
            rx_dropped: *v.get(3)?,
            tx_packets: *v.get(9)?,
            tx_dropped: *v.get(11)?,
        })
    })
}

fn dev_stats(pid: u32, ifname: &str) -> Option<DevStats> {
    parse_net_dev(
        &std::fs::read_to_string(format!("/proc/{pid}/net/dev")).ok()?,
        ifname,
    )
}

/// A program run under `timeout` (so that it dies even if the benchmark is killed), in the
/// process group `timeout` creates; its output (stdout and stderr) is copied to a log file
/// and sent line by line, with the time each line arrived, to [`Proc::lines`].
struct Proc {
    name: String,
    /// The `timeout` process.
    child: Child,
    /// The program's own pid (timeout's child), once known.
    pid: Option<u32>,
    log: PathBuf,
    lines: Receiver<(Instant, String)>,
}

impl Proc {
    fn spawn(
        name: &str,
        limit: Duration,
        argv: &[OsString],
        env: &[(&str, OsString)],
        log: PathBuf,
    ) -> Result<Proc, NetError> {
        let (reader, writer) = std::io::pipe().map_err(|err| NetError::Spawn {
            what: name.into(),
            err,
        })?;
        let writer2 = writer.try_clone().map_err(|err| NetError::Spawn {
            what: name.into(),
            err,
        })?;
        let mut cmd = Command::new("timeout");
        cmd.args(["-s", "INT", "-k", "5"])
            .arg(limit.as_secs().max(1).to_string())
            .args(argv)
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(writer2);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().map_err(|err| NetError::Spawn {
            what: format!("{name} ({cmd:?})"),
            err,
        })?;
        drop(cmd); // closes our copies of the pipe's write end
        let mut file = std::fs::File::create(&log).map_err(|err| NetError::Io {
            path: log.display().to_string(),
            err,
        })?;
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(reader);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let t = Instant::now();
                        let _ = file.write_all(&buf);
                        let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
                        let _ = tx.send((t, line));
                    }
                }
            }
        });
        let mut p = Proc {
            name: name.into(),
            child,
            pid: None,
            log,
            lines: rx,
        };
        p.find_pid(Duration::from_secs(3));
        Ok(p)
    }

    /// Waits for `timeout` to have forked the program.
    fn find_pid(&mut self, wait: Duration) {
        let t = self.child.id();
        let deadline = Instant::now() + wait;
        while self.pid.is_none() && Instant::now() < deadline {
            self.pid = std::fs::read_to_string(format!("/proc/{t}/task/{t}/children"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse().ok());
            if self.pid.is_none() {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last lines of the log (what a failing program said).
    fn tail(&self, n: usize) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(n)..].join(" | ")
    }

    /// SIGINT through `timeout` (which passes it on), then SIGKILL to the whole group.
    fn stop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        let Ok(pgid) = libc::pid_t::try_from(self.child.id()) else {
            return;
        };
        // SAFETY: kill(2) on our own child `timeout`; no memory is involved.
        unsafe { libc::kill(pgid, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "   {} did not stop on SIGINT within 5 s: killing it",
            self.name
        );
        // SAFETY: kill(2) of the process group that `timeout` (our child) leads.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = self.child.wait();
    }

    /// Waits until the program listens on `socket`, or says why it will not.
    fn wait_listening(&mut self, socket: &Path, wait: Duration) -> Result<(), NetError> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(pid) = self.pid
                && vback_tests::process::is_listening_for(socket, pid)
            {
                return Ok(());
            }
            if let Some(st) = self.exited() {
                // The program's last line is its error message.
                return Err(NetError::NotAvailable(format!(
                    "{} exited ({st}) before listening: {}",
                    self.name,
                    self.tail(1)
                )));
            }
            if let Some(line) = self
                .lines
                .try_iter()
                .find_map(|(_, l)| testpmd::failure(&l).map(str::to_owned))
            {
                return Err(NetError::DeviceFailed {
                    who: self.name.clone(),
                    line,
                    log: self.log.display().to_string(),
                });
            }
            if Instant::now() > deadline {
                return Err(NetError::NotAvailable(format!(
                    "{} did not listen on {} within {wait:?}: {}",
                    self.name,
                    socket.display(),
                    self.tail(3)
                )));
            }
            if self.pid.is_none() {
                self.find_pid(Duration::from_millis(10));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A network namespace created for the run and deleted afterwards.
struct Netns {
    name: String,
}

impl Netns {
    fn create(name: String) -> Result<Netns, NetError> {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        // No IPv6 autoconfiguration: the kernel then sends nothing of its own through the tap,
        // so its counters hold only the benchmark's frames.
        let out = Command::new("ip")
            .args(["netns", "exec", &ns.name, "sysctl", "-qw"])
            .args([
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ])
            .output()
            .map_err(|err| NetError::Spawn {
                what: "sysctl (procps)".into(),
                err,
            })?;
        if !out.status.success() {
            return Err(NetError::Net(format!(
                "disabling IPv6 in namespace {}: {}",
                ns.name,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn ip(args: &[&str]) -> Result<(), NetError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|err| NetError::Spawn {
            what: "ip (iproute2)".into(),
            err,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetError::Net(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// testpmd's runtime directory (/var/run/dpdk/PREFIX), removed after the run.
struct DpdkPrefix(String);

impl Drop for DpdkPrefix {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(Path::new("/var/run/dpdk").join(&self.0));
    }
}

/// What the benchmark needs from the machine, found once.
struct Ctx<'a> {
    args: &'a Args,
    dir: PathBuf,
    testpmd: PathBuf,
    netback: PathBuf,
    netns: Option<Netns>,
    ifname: String,
    runs: u32,
}

impl Ctx<'_> {
    fn testpmd_env(&self) -> Vec<(&'static str, OsString)> {
        vec![("LD_LIBRARY_PATH", self.args.dpdk_dir.join("lib").into())]
    }

    /// testpmd's arguments for one side: `vdev` and its forwarding mode, pinned like dpdk.md
    /// (main lcore floating over both CPUs, the forwarding lcore on `cpu`).
    fn testpmd_argv(
        &self,
        cpu: usize,
        prefix: &str,
        vdev: String,
        mode: &str,
        size: u16,
    ) -> Vec<OsString> {
        let mut v: Vec<OsString> = vec!["stdbuf".into(), "-oL".into(), self.testpmd.clone().into()];
        for a in [
            format!("--lcores=0@(0-1),1@{cpu}"),
            "--no-pci".into(),
            "--no-huge".into(),
            "-m".into(),
            "512".into(),
            format!("--file-prefix={prefix}"),
            "--vdev".into(),
            vdev,
            "--".into(),
            format!("--forward-mode={mode}"),
            format!("--txpkts={size}"),
            "--total-num-mbufs=32768".into(),
            "--stats-period".into(),
            "1".into(),
            "--auto-start".into(),
        ] {
            v.push(a.into());
        }
        v
    }

    fn limit(&self) -> Duration {
        Duration::from_secs(self.args.warmup + self.args.seconds + 60)
    }
}

/// One run's numbers.
#[derive(Debug, Clone)]
struct Run {
    mpps: f64,
    gbps: f64,
    ns_per_packet: Option<f64>,
    backend_cpu: Option<f64>,
    backend_wait: Option<f64>,
    client_cpu: Option<f64>,
    packets: u64,
    seconds: f64,
    testpmd_pps: f64,
    extra: Value,
}

impl Run {
    fn to_json(&self) -> Value {
        json!({
            "mpps": self.mpps, "gbit_per_s": self.gbps, "backend_cpu_ns_per_packet": self.ns_per_packet,
            "backend_cpu": self.backend_cpu, "backend_wait": self.backend_wait, "client_cpu": self.client_cpu, "packets": self.packets,
            "seconds": self.seconds, "testpmd_reported_pps": self.testpmd_pps, "extra": self.extra,
        })
    }
}

/// One statistics report of the front end, with the backend's state at the same moment.
#[derive(Debug, Clone, Copy)]
struct Sample {
    t: Instant,
    stats: PortStats,
    backend_ticks: Option<u64>,
    backend_wait_ns: Option<u64>,
    client_ticks: Option<u64>,
    tap: Option<DevStats>,
}

/// Starts the backend and waits until it listens on `sock`.
fn start_backend(
    ctx: &mut Ctx<'_>,
    backend: Backend,
    dir: Direction,
    size: u16,
    sock: &Path,
) -> Result<Proc, NetError> {
    let log = ctx.dir.join(format!("{}-{}.log", backend.name(), ctx.runs));
    let cpu = BACKEND_CPU.to_string();
    let mut p = match backend {
        Backend::NetbackNull => {
            let mut argv: Vec<OsString> = vec!["taskset".into(), "-c".into(), cpu.into()];
            argv.push(ctx.netback.clone().into());
            // Guest → host: nothing for the guest (only the transmit path runs); host → guest:
            // a frame of the measured size in every buffer the front end posts.
            let null_rx = match dir {
                Direction::Tx => "off",
                Direction::Rx => "flood",
            };
            let len = size.to_string();
            argv.extend(
                [
                    "--socket",
                    &sock.to_string_lossy(),
                    "--host",
                    "null",
                    "--vif",
                    "",
                    "--null-rx",
                    null_rx,
                    "--null-frame-len",
                    &len,
                ]
                .map(OsString::from),
            );
            argv.extend(ctx.args.netback_args.iter().map(OsString::from));
            Proc::spawn("netback", ctx.limit(), &argv, &[], log)?
        }
        Backend::NetbackTap | Backend::NetbackTapWritev => {
            if ctx.netns.is_none() {
                ctx.netns = Some(Netns::create(format!(
                    "vback-bench-{}",
                    std::process::id()
                ))?);
            }
            let ns = ctx
                .netns
                .as_ref()
                .map(|n| n.name.clone())
                .unwrap_or_default();
            // No hotplug script: the tap stays alone in the namespace, brought up below.
            let mut vif = format!("vifname={},mac=00:16:3e:00:be:01,script=none", ctx.ifname);
            if let Some(extra) = &ctx.args.tap_vif_extra {
                vif.push(',');
                vif.push_str(extra);
            }
            let mut argv: Vec<OsString> = ["ip", "netns", "exec", &ns, "taskset", "-c", &cpu]
                .map(OsString::from)
                .to_vec();
            argv.push(ctx.netback.clone().into());
            argv.extend(
                [
                    "--socket",
                    &sock.to_string_lossy(),
                    "--host",
                    "tap",
                    "--vif",
                    &vif,
                ]
                .map(OsString::from),
            );
            if backend == Backend::NetbackTapWritev {
                argv.extend(["--tap-io", "writev"].map(OsString::from));
            }
            argv.extend(ctx.args.netback_args.iter().map(OsString::from));
            Proc::spawn("netback", ctx.limit(), &argv, &[], log)?
        }
        Backend::DpdkVhost => {
            let mode = match dir {
                Direction::Tx => "rxonly",
                Direction::Rx => "txonly",
            };
            let prefix = format!("vback-bench-be-{}-{}", std::process::id(), ctx.runs);
            let argv = ctx.testpmd_argv(
                BACKEND_CPU,
                &prefix,
                format!("net_vhost0,iface={},queues=1", sock.display()),
                mode,
                size,
            );
            Proc::spawn(
                "dpdk-testpmd (net_vhost)",
                ctx.limit(),
                &argv,
                &ctx.testpmd_env(),
                log,
            )?
        }
    };
    p.wait_listening(sock, Duration::from_secs(15))?;
    Ok(p)
}

/// For the tap row: waits until netback created the tap in the namespace and brings it up.
fn tap_up(ctx: &Ctx<'_>, be: &mut Proc) -> Result<(), NetError> {
    let ns = ctx
        .netns
        .as_ref()
        .map(|n| n.name.as_str())
        .unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if be
            .pid
            .is_some_and(|pid| dev_stats(pid, &ctx.ifname).is_some())
        {
            return ip(&["-n", ns, "link", "set", "dev", &ctx.ifname, "up"]);
        }
        if let Some(st) = be.exited() {
            return Err(NetError::Died {
                name: "netback".into(),
                status: st.to_string(),
                log: be.tail(3),
            });
        }
        if Instant::now() > deadline {
            return Err(NetError::NotAvailable(format!(
                "netback did not create the tap {} within 10 s after the front end connected",
                ctx.ifname
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One measurement: a fresh backend, a fresh front end, warm-up, then `seconds` measured.
fn measure(
    ctx: &mut Ctx<'_>,
    backend: Backend,
    dir: Direction,
    size: u16,
) -> Result<Run, NetError> {
    ctx.runs += 1;
    let _prefixes = [
        DpdkPrefix(format!(
            "vback-bench-be-{}-{}",
            std::process::id(),
            ctx.runs
        )),
        DpdkPrefix(format!(
            "vback-bench-fe-{}-{}",
            std::process::id(),
            ctx.runs
        )),
    ];
    let sock = ctx.dir.join(format!("{}.sock", backend.name()));
    let _ = std::fs::remove_file(&sock);
    let mut be = start_backend(ctx, backend, dir, size, &sock)?;
    let be_pid = be.pid;

    let prefix = format!("vback-bench-fe-{}-{}", std::process::id(), ctx.runs);
    let mode = match dir {
        Direction::Tx => "txonly",
        Direction::Rx => "rxonly",
    };
    let mut argv = ctx.testpmd_argv(
        CLIENT_CPU,
        &prefix,
        format!("net_virtio_user0,path={},queues=1", sock.display()),
        mode,
        size,
    );
    argv.extend(ctx.args.client_args.iter().map(OsString::from));
    let fe_log = ctx.dir.join(format!("client-{}.log", ctx.runs));
    let mut fe = Proc::spawn(
        "dpdk-testpmd (virtio_user)",
        ctx.limit(),
        &argv,
        &ctx.testpmd_env(),
        fe_log,
    )?;

    let tap = backend.is_tap();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let mut source = None;
    if tap {
        tap_up(ctx, &mut be)?;
        if dir == Direction::Rx {
            let ns = ctx
                .netns
                .as_ref()
                .map(|n| n.name.clone())
                .unwrap_or_default();
            let ifname = ctx.ifname.clone();
            let (stop2, sent2) = (stop.clone(), sent.clone());
            let frame = afpacket::udp_frame(usize::from(size), GUEST_MAC);
            let (ready_tx, ready_rx) = channel();
            source = Some(std::thread::spawn(move || {
                pin_self(CLIENT_CPU);
                match afpacket::open(&ns, &ifname) {
                    Ok(fd) => {
                        let _ = ready_tx.send(Ok(()));
                        afpacket::send_until(&fd, &ifname, &frame, &stop2, &sent2)
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        let _ = ready_tx.send(Err(e));
                        Err(afpacket::SourceError::NoInterface(msg))
                    }
                }
            }));
            match ready_rx.recv_timeout(Duration::from_secs(5)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => return Err(NetError::Net("the packet source did not start".into())),
            }
        }
    }

    let result = collect(ctx, &mut be, &mut fe, backend, dir, size, be_pid);

    stop.store(true, Ordering::Relaxed);
    let source_result = source.map(|h| h.join());
    fe.stop();
    let be_status = be.exited();
    be.stop();
    let mut run = result?;
    if let Some(st) = be_status {
        return Err(NetError::Died {
            name: backend.name().into(),
            status: st.to_string(),
            log: be.tail(3),
        });
    }
    match source_result {
        Some(Ok(Err(e))) => return Err(e.into()),
        Some(Err(_)) => return Err(NetError::Net("the packet source thread panicked".into())),
        _ => {}
    }
    if tap && dir == Direction::Rx {
        run.extra["source_frames_sent"] = json!(sent.load(Ordering::Relaxed));
    }
    Ok(run)
}

/// Reads the front end's reports until the warm-up and the measured window have passed.
#[allow(clippy::too_many_arguments)]
fn collect(
    ctx: &Ctx<'_>,
    be: &mut Proc,
    fe: &mut Proc,
    backend: Backend,
    dir: Direction,
    size: u16,
    be_pid: Option<u32>,
) -> Result<Run, NetError> {
    let args = ctx.args;
    let hard = Instant::now() + Duration::from_secs(args.warmup + args.seconds + 30);
    let mut parser = StatsParser::new();
    let mut samples: Vec<Sample> = Vec::new();
    let mut start: Option<usize> = None;
    let tap_dev = |pid: Option<u32>| {
        backend
            .is_tap()
            .then(|| pid.and_then(|p| dev_stats(p, &ctx.ifname)))
            .flatten()
    };
    let end = loop {
        let now = Instant::now();
        if now > hard {
            return Err(NetError::NoStats(format!(
                "the front end printed {} statistics report(s) in {} s; log: {}",
                samples.len(),
                args.warmup + args.seconds + 30,
                fe.log.display()
            )));
        }
        match fe.lines.recv_timeout(Duration::from_millis(500)) {
            Ok((t, line)) => {
                if let Some(f) = testpmd::failure(&line) {
                    return Err(NetError::DeviceFailed {
                        who: "front end (virtio_user)".into(),
                        line: f.to_owned(),
                        log: fe.log.display().to_string(),
                    });
                }
                let Some(stats) = parser.feed(&line) else {
                    continue;
                };
                samples.push(Sample {
                    t,
                    stats,
                    backend_ticks: be_pid.and_then(cpu_ticks),
                    backend_wait_ns: be_pid.and_then(run_delay_ns),
                    client_ticks: fe.pid.and_then(cpu_ticks),
                    tap: tap_dev(be_pid),
                });
                let last = samples.len() - 1;
                match start {
                    None if samples.len() > 1
                        && t >= samples[0].t + Duration::from_secs(args.warmup) =>
                    {
                        start = Some(last);
                    }
                    Some(s) if t >= samples[s].t + Duration::from_secs(args.seconds) => {
                        break last;
                    }
                    _ => {}
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                return Err(NetError::NoStats(format!(
                    "the front end exited after {} statistics report(s): {}",
                    samples.len(),
                    fe.tail(3)
                )));
            }
        }
        if let Some(st) = be.exited() {
            return Err(NetError::Died {
                name: backend.name().into(),
                status: st.to_string(),
                log: be.tail(3),
            });
        }
        if let Some(line) = be
            .lines
            .try_iter()
            .find_map(|(_, l)| testpmd::failure(&l).map(str::to_owned))
        {
            return Err(NetError::DeviceFailed {
                who: backend.name().into(),
                line,
                log: be.log.display().to_string(),
            });
        }
    };
    let (a, b) = (&samples[start.unwrap_or(0)], &samples[end]);
    Ok(compute(
        a,
        b,
        &samples[start.unwrap_or(0) + 1..=end],
        backend,
        dir,
        size,
    ))
}

/// The rates between two reports.
fn compute(
    a: &Sample,
    b: &Sample,
    window: &[Sample],
    backend: Backend,
    dir: Direction,
    size: u16,
) -> Run {
    let secs = b.t.duration_since(a.t).as_secs_f64().max(1e-9);
    let client = |s: &Sample| match dir {
        Direction::Tx => s.stats.tx_packets,
        Direction::Rx => s.stats.rx_packets,
    };
    // Guest → host through the tap: what the kernel received from netback, not what the
    // front end handed to the ring.
    let packets = match (backend, dir, a.tap, b.tap) {
        (Backend::NetbackTap | Backend::NetbackTapWritev, Direction::Tx, Some(x), Some(y)) => {
            y.rx_packets - x.rx_packets
        }
        _ => client(b).saturating_sub(client(a)),
    };
    let tck = clock_ticks_per_second();
    let cpu_s = |x: Option<u64>, y: Option<u64>| Some(y?.checked_sub(x?)? as f64 / tck);
    let be_cpu = cpu_s(a.backend_ticks, b.backend_ticks);
    let fe_cpu = cpu_s(a.client_ticks, b.client_ticks);
    let pps = packets as f64 / secs;
    let reported: Vec<u64> = window
        .iter()
        .map(|s| match dir {
            Direction::Tx => s.stats.tx_pps,
            Direction::Rx => s.stats.rx_pps,
        })
        .collect();
    let testpmd_pps = reported.iter().sum::<u64>() as f64 / reported.len().max(1) as f64;
    let mut extra = json!({
        "client_packets": client(b).saturating_sub(client(a)),
        "client_rx_nombuf": b.stats.rx_nombuf.saturating_sub(a.stats.rx_nombuf),
    });
    if let (Some(x), Some(y)) = (a.tap, b.tap) {
        extra["tap"] = json!({
            "rx_packets": y.rx_packets - x.rx_packets, "rx_bytes": y.rx_bytes - x.rx_bytes,
            "rx_dropped": y.rx_dropped - x.rx_dropped, "tx_packets": y.tx_packets - x.tx_packets,
            "tx_dropped": y.tx_dropped - x.tx_dropped,
        });
    }
    Run {
        mpps: pps / 1e6,
        gbps: pps * f64::from(size) * 8.0 / 1e9,
        ns_per_packet: be_cpu
            .filter(|_| packets > 0)
            .map(|c| c * 1e9 / packets as f64),
        backend_cpu: be_cpu.map(|c| c / secs),
        backend_wait: b
            .backend_wait_ns
            .zip(a.backend_wait_ns)
            .map(|(y, x)| y.saturating_sub(x) as f64 / 1e9 / secs),
        client_cpu: fe_cpu.map(|c| c / secs),
        packets,
        seconds: secs,
        testpmd_pps,
        extra,
    }
}

/// The runs of one backend on one workload, summed up.
#[derive(Debug, Clone)]
struct Summary {
    /// The median run by packet rate.
    median: Run,
    /// The highest packet rate of all runs (the run the machine disturbed least).
    best_mpps: f64,
    /// Runs that failed, and the first error.
    failed: usize,
    first_err: Option<String>,
}

/// Sums up runs; all failed: the first error.
fn summarize(runs: &[Result<Run, NetError>]) -> Result<Summary, String> {
    let mut ok: Vec<&Run> = runs.iter().filter_map(|r| r.as_ref().ok()).collect();
    let first_err = runs
        .iter()
        .find_map(|r| r.as_ref().err().map(ToString::to_string));
    if ok.is_empty() {
        return Err(first_err.unwrap_or_else(|| "no run".into()));
    }
    ok.sort_by(|a, b| a.mpps.total_cmp(&b.mpps));
    Ok(Summary {
        median: (*ok[ok.len() / 2]).clone(),
        best_mpps: ok.last().map_or(0.0, |r| r.mpps),
        failed: runs.len() - ok.len(),
        first_err,
    })
}

/// Mpps with three decimals, or more digits for a trickle (the null host side's generator).
fn show_mpps(mpps: f64) -> String {
    if mpps > 0.0 && mpps < 0.01 {
        format!("{mpps:.6}")
    } else {
        format!("{mpps:.3}")
    }
}

/// Runs the benchmark and prints the table.
pub fn run(args: &Args) -> Result<(), String> {
    let testpmd = args.dpdk_dir.join("dpdk-testpmd");
    if !testpmd.is_file() {
        return Err(format!(
            "{} not found: run scripts/bench-setup.sh (or pass --dpdk-dir)",
            testpmd.display()
        ));
    }
    for tool in ["timeout", "taskset", "stdbuf", "ip"] {
        if which(tool).is_none() {
            return Err(format!(
                "{tool} not found on PATH (coreutils, util-linux, iproute2)"
            ));
        }
    }
    let netback = match &args.netback {
        Some(p) if p.is_file() => p.clone(),
        Some(p) => return Err(format!("{}: no such netback binary", p.display())),
        None => workspace_bin("netback").map_err(|e| e.to_string())?,
    };
    let backends: Vec<Backend> = BACKENDS
        .into_iter()
        .filter(|b| args.only.is_empty() || args.only.contains(b))
        .collect();
    pin_self(CLIENT_CPU);
    let tmp = tempfile::Builder::new()
        .prefix("vback-bench-net.")
        .tempdir_in("/var/tmp")
        .map_err(|e| format!("cannot create a work directory under /var/tmp: {e}"))?;
    let mut ctx = Ctx {
        args,
        dir: tmp.path().to_owned(),
        testpmd,
        netback,
        netns: None,
        ifname: format!("vbt{}", std::process::id() % 100_000),
        runs: 0,
    };
    eprintln!("logs in {}", ctx.dir.display());

    let mut table = String::new();
    let _ = writeln!(
        table,
        "| workload | backend | Mpps | best Mpps | Gbit/s | backend CPU ns/packet | backend CPU | client CPU | vs reference |"
    );
    let _ = writeln!(table, "|---|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut rows = Vec::new();
    for &dir in &args.directions {
        for &size in &args.frame_sizes {
            let workload = format!("{}-{size}", dir.name());
            eprintln!(
                "== {workload} ({} {size} B; {}+{} s per run, {} time(s))",
                dir.arrow(),
                args.warmup,
                args.seconds,
                args.repeat
            );
            let mut runs: Vec<Vec<Result<Run, NetError>>> =
                backends.iter().map(|_| Vec::new()).collect();
            for i in 0..args.repeat {
                for (k, &b) in backends.iter().enumerate() {
                    let r = measure(&mut ctx, b, dir, size);
                    match &r {
                        Ok(r) => eprintln!(
                            "   {} run {}: {:.3} Mpps, backend CPU {}",
                            b.name(),
                            i + 1,
                            r.mpps,
                            r.backend_cpu
                                .map_or("?".into(), |c| format!("{:.0}%", c * 100.0))
                        ),
                        Err(e) => eprintln!("   {} run {}: {e}", b.name(), i + 1),
                    }
                    runs[k].push(r);
                }
            }
            let medians: Vec<_> = runs.iter().map(|r| summarize(r)).collect();
            // netback-null against DPDK's vhost PMD; netback-tap against one write per frame.
            let median_of = |want: Backend| {
                backends
                    .iter()
                    .position(|&b| b == want)
                    .and_then(|k| medians[k].as_ref().ok().map(|sum| sum.median.mpps))
            };
            let reference = |b: Backend| match b {
                Backend::NetbackNull => median_of(Backend::DpdkVhost).map(|r| (r, "dpdk-vhost")),
                Backend::NetbackTap => {
                    median_of(Backend::NetbackTapWritev).map(|r| (r, "tap-writev"))
                }
                _ => None,
            };
            for (k, &b) in backends.iter().enumerate() {
                let label = format!("{} {size} B ({})", dir.name(), dir.arrow());
                match &medians[k] {
                    Ok(sum) => {
                        let m = &sum.median;
                        let note = if sum.failed > 0 {
                            format!(
                                " ({} of {} runs failed: {})",
                                sum.failed,
                                args.repeat,
                                sum.first_err.as_deref().unwrap_or("")
                            )
                        } else {
                            String::new()
                        };
                        let _ = writeln!(
                            table,
                            "| {label} | {} | {}{note} | {} | {:.2} | {} | {} | {} | {} |",
                            b.name(),
                            show_mpps(m.mpps),
                            show_mpps(sum.best_mpps),
                            m.gbps,
                            m.ns_per_packet.map_or("-".into(), |n| format!("{n:.0}")),
                            match (m.backend_cpu, m.backend_wait) {
                                (Some(c), Some(w)) =>
                                    format!("{:.0}% (waited {:.0}%)", c * 100.0, w * 100.0),
                                (Some(c), None) => format!("{:.0}%", c * 100.0),
                                _ => "-".into(),
                            },
                            m.client_cpu
                                .map_or("-".into(), |c| format!("{:.0}%", c * 100.0)),
                            match reference(b) {
                                Some((r, name)) if r > 0.0 => format!("{:.2}× {name}", m.mpps / r),
                                _ => "-".into(),
                            }
                        );
                    }
                    Err(e) => {
                        let _ = writeln!(
                            table,
                            "| {label} | {} | {} | - | - | - | - | - | - |",
                            b.name(),
                            e.replace('|', "/")
                        );
                    }
                }
                rows.push(json!({
                    "workload": workload, "direction": dir.name(), "frame_size": size, "backend": b.name(),
                    "median": match &medians[k] { Ok(sum) => sum.median.to_json(), Err(e) => json!({"error": e}) },
                    "best_mpps": medians[k].as_ref().ok().map(|sum| sum.best_mpps),
                    "runs": runs[k].iter().map(|r| match r { Ok(r) => r.to_json(), Err(e) => json!({"error": e.to_string()}) }).collect::<Vec<_>>(),
                }));
            }
        }
    }
    println!("{table}");
    if args.keep_logs {
        let kept = tmp.keep();
        eprintln!("logs kept in {}", kept.display());
    }
    if let Some(p) = &args.json {
        let doc = json!({
            "seconds": args.seconds, "warmup": args.warmup, "repeat": args.repeat,
            "backend_cpu": BACKEND_CPU, "client_cpu": CLIENT_CPU, "results": rows,
        });
        std::fs::write(p, serde_json::to_string_pretty(&doc).unwrap_or_default())
            .map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_an_interface_from_proc_net_dev() {
        let table = "\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0
vbt123: 6400 100    0    7    0     0          0         0     1500      25    0    3    0     0       0          0
";
        assert_eq!(
            parse_net_dev(table, "vbt123"),
            Some(DevStats {
                rx_packets: 100,
                rx_bytes: 6400,
                rx_dropped: 7,
                tx_packets: 25,
                tx_dropped: 3,
            })
        );
        assert_eq!(parse_net_dev(table, "vbt12"), None);
    }

    #[test]
    fn summary_takes_the_median_and_the_best_run_and_counts_failures() {
        let run = |mpps: f64| Run {
            mpps,
            gbps: 0.0,
            ns_per_packet: None,
            backend_cpu: None,
            backend_wait: None,
            client_cpu: None,
            packets: 0,
            seconds: 1.0,
            testpmd_pps: 0.0,
            extra: Value::Null,
        };
        let runs = vec![
            Ok(run(1.0)),
            Err(NetError::NoStats("no report".into())),
            Ok(run(3.0)),
            Ok(run(2.0)),
        ];
        let s = summarize(&runs).unwrap();
        assert_eq!(s.median.mpps, 2.0);
        assert_eq!(s.best_mpps, 3.0);
        assert_eq!(s.failed, 1);
        assert_eq!(s.first_err.as_deref(), Some("no report"));
        let all_failed = vec![Err(NetError::NotAvailable("netback: no tap".into()))];
        assert_eq!(
            summarize(&all_failed).unwrap_err(),
            "not available: netback: no tap"
        );
    }

    #[test]
    fn reads_cpu_time_of_this_process() {
        // This test's own process has run for a while: utime + stime are readable.
        assert!(cpu_ticks(std::process::id()).is_some());
        assert_eq!(cpu_ticks(u32::MAX), None);
        assert!(run_delay_ns(std::process::id()).is_some());
        assert_eq!(run_delay_ns(u32::MAX), None);
    }

    #[test]
    fn rates_come_from_counter_deltas_and_cpu_time() {
        let t0 = Instant::now();
        let s = |secs: u64, tx: u64, ticks: u64| Sample {
            t: t0 + Duration::from_secs(secs),
            stats: PortStats {
                tx_packets: tx,
                tx_pps: tx / 2,
                ..PortStats::default()
            },
            backend_ticks: Some(ticks),
            backend_wait_ns: Some(secs * 100_000_000),
            client_ticks: None,
            tap: None,
        };
        let (a, b) = (s(2, 1_000_000, 100), s(6, 9_000_000, 500));
        let r = compute(&a, &b, &[b], Backend::NetbackNull, Direction::Tx, 64);
        assert!((r.mpps - 2.0).abs() < 1e-9, "{r:?}");
        assert!((r.gbps - 2e6 * 64.0 * 8.0 / 1e9).abs() < 1e-9);
        let tck = clock_ticks_per_second();
        let cpu = 400.0 / tck;
        assert!((r.backend_cpu.unwrap() - cpu / 4.0).abs() < 1e-9);
        assert!((r.ns_per_packet.unwrap() - cpu * 1e9 / 8e6).abs() < 1e-6);
        assert_eq!(r.packets, 8_000_000);
        // 0.1 s of waiting per second of the window.
        assert!((r.backend_wait.unwrap() - 0.1).abs() < 1e-9);
    }
}
