//! The vhost-user-blk benchmark.

use std::fmt::Write as _;
use std::io::Write as _;
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use blkio::{Blkio, Completion, ReqFlags};
use serde_json::{Value, json};
use vback_tests::process::{Daemon, which, workspace_bin};

/// Options of `vback-bench blk`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,

    /// Size of the test file (written in full first, so reads hit real data).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    size: u64,

    /// Directory for the test file (default: a temporary directory under /var/tmp, on disk
    /// rather than tmpfs: O_DIRECT needs a real file system).
    #[arg(long)]
    dir: Option<PathBuf>,

    /// Run only these workloads (comma separated, e.g. file-randread-qd32,null-randread-qd1).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,

    /// Also write the measurements as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,

    /// An extra blkback argument (repeatable), e.g. --blkback-arg=--poll-us=0.
    #[arg(long = "blkback-arg", value_name = "ARG", allow_hyphen_values = true)]
    blkback_args: Vec<String>,

    /// Let the client sleep on its completion eventfd instead of polling its queue.
    #[arg(long)]
    client_irq: bool,

    /// Measure each workload this many times, alternating blkback, qsd and fio, and report
    /// the median of each (this machine's numbers drift; alternating spreads the drift).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    repeat: u32,
}

fn parse_size(s: &str) -> Result<u64, String> {
    vback_common_size(s)
}

fn vback_common_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.chars().last() {
        Some('K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .map(|n| n * mult)
        .map_err(|_| format!("`{s}` is not a size like 1G"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pattern {
    RandRead,
    RandWrite,
    SeqRead,
    SeqWrite,
}

/// What the backends serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// No storage (blkback null:, qsd null-co).
    Null,
    /// The raw test file.
    File,
    /// A fully allocated qcow2 image converted from the test file (blkback tap:qcow2:, qsd's
    /// qcow2 driver over a file node with O_DIRECT and io_uring).
    Qcow2,
    /// A new, empty qcow2 image of [`FRESH_SIZE`] for each run: every write allocates.
    Qcow2Fresh,
}

/// Virtual size of the fresh qcow2 image (large enough that a run never wraps around).
const FRESH_SIZE: u64 = 64 << 30;

#[derive(Debug, Clone, Copy)]
struct Workload {
    name: &'static str,
    target: Target,
    pattern: Pattern,
    bs: usize,
    /// Requests in flight in all, spread over `queues` client queues (each backend serves as
    /// many device queues).
    qd: usize,
    queues: usize,
}

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "null-randread-qd1",
        target: Target::Null,
        pattern: Pattern::RandRead,
        bs: 4096,
        qd: 1,
        queues: 1,
    },
    Workload {
        name: "null-randread-qd32",
        target: Target::Null,
        pattern: Pattern::RandRead,
        bs: 4096,
        qd: 32,
        queues: 1,
    },
    Workload {
        name: "file-randread-qd1",
        target: Target::File,
        pattern: Pattern::RandRead,
        bs: 4096,
        qd: 1,
        queues: 1,
    },
    Workload {
        name: "file-randread-qd32",
        target: Target::File,
        pattern: Pattern::RandRead,
        bs: 4096,
        qd: 32,
        queues: 1,
    },
    Workload {
        name: "file-randwrite-qd1",
        target: Target::File,
        pattern: Pattern::RandWrite,
        bs: 4096,
        qd: 1,
        queues: 1,
    },
    Workload {
        name: "file-randwrite-qd32",
        target: Target::File,
        pattern: Pattern::RandWrite,
        bs: 4096,
        qd: 32,
        queues: 1,
    },
    Workload {
        name: "file-seqread-128k-qd8",
        target: Target::File,
        pattern: Pattern::SeqRead,
        bs: 128 << 10,
        qd: 8,
        queues: 1,
    },
    Workload {
        name: "qcow2-randread-qd1",
        target: Target::Qcow2,
        pattern: Pattern::RandRead,
        bs: 4096,
        qd: 1,
        queues: 1,
    },
    Workload {
        name: "qcow2-randread-qd32",
        target: Target::Qcow2,
        pattern: Pattern::RandRead,
        bs: 4096,
        qd: 32,
        queues: 1,
    },
    Workload {
        name: "qcow2-randwrite-qd32",
        target: Target::Qcow2,
        pattern: Pattern::RandWrite,
        bs: 4096,
        qd: 32,
        queues: 1,
    },
    Workload {
        name: "qcow2-firstwrite-64k-qd8",
        target: Target::Qcow2Fresh,
        pattern: Pattern::SeqWrite,
        bs: 64 << 10,
        qd: 8,
        queues: 1,
    },
    Workload {
        name: "qcow2-firstwrite-64k-qd8-4q",
        target: Target::Qcow2Fresh,
        pattern: Pattern::SeqWrite,
        bs: 64 << 10,
        qd: 8,
        queues: 4,
    },
];

/// One measurement.
#[derive(Debug, Clone, Copy)]
struct Result1 {
    iops: f64,
    mbps: f64,
    errors: u64,
}

fn pin_self(cpu: usize) {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes one bit inside the set we own (cpu < CPU_SETSIZE).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: sched_setaffinity reads the set for the duration of the call.
    unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
}

/// A command pinned to CPU 0 with taskset.
fn pinned(program: &Path) -> Command {
    let mut c = Command::new("taskset");
    c.args(["-c", "0"]).arg(program);
    c
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Drives a vhost-user-blk socket with libblkio for `secs`.
fn drive(
    socket: &Path,
    w: &Workload,
    capacity: u64,
    secs: u64,
    client_poll: bool,
) -> Result<Result1, String> {
    let e = |what: &str, err: blkio::Error| format!("libblkio {what}: {}", err.message());
    let mut b = Blkio::new("virtio-blk-vhost-user").map_err(|x| e("new", x))?;
    b.set_str("path", &socket.to_string_lossy())
        .map_err(|x| e("path", x))?;
    b.connect().map_err(|x| e("connect", x))?;
    // Poll queues: the client busy-waits for completions (as fio's --hipri would), so what is
    // measured is the backend, not the client's own wake-up latency.
    let n = w.queues as i32;
    let (nq, npq) = if client_poll { (0, n) } else { (n, 0) };
    b.set_i32("num-queues", nq)
        .map_err(|x| e("num-queues", x))?;
    b.set_i32("num-poll-queues", npq)
        .map_err(|x| e("num-poll-queues", x))?;
    let started = b.start().map_err(|x| e("start", x))?;
    let mut queues = if client_poll {
        started.poll_queues
    } else {
        started.queues
    };
    // Slot `s` (a buffer) belongs to queue `s % queues`.
    let nqueues = queues.len().max(1);
    let region = b.alloc_mem_region(w.bs * w.qd).map_err(|x| e("alloc", x))?;
    b.map_mem_region(&region).map_err(|x| e("map", x))?;
    let base = region.addr as *mut u8;
    // Fill write buffers with something other than zeroes.
    // SAFETY: the region is `bs * qd` bytes of mapped memory owned by `b`.
    unsafe { std::ptr::write_bytes(base, 0x5a, w.bs * w.qd) };
    let blocks = capacity / w.bs as u64;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut seq = 0u64;
    let mut next_offset = |rng: &mut Rng| -> u64 {
        match w.pattern {
            Pattern::SeqRead | Pattern::SeqWrite => {
                let o = (seq % blocks) * w.bs as u64;
                seq += 1;
                o
            }
            _ => (rng.next() % blocks) * w.bs as u64,
        }
    };
    let submit = |q: &mut blkio::Blkioq, slot: usize, off: u64| {
        // SAFETY: slot < qd, so the buffer lies inside the mapped region.
        let buf = unsafe { base.add(slot * w.bs) };
        match w.pattern {
            Pattern::RandWrite | Pattern::SeqWrite => {
                q.write(off, buf, w.bs, slot, ReqFlags::empty())
            }
            _ => q.read(off, buf, w.bs, slot, ReqFlags::empty()),
        }
    };
    for slot in 0..w.qd {
        let off = next_offset(&mut rng);
        submit(&mut queues[slot % nqueues], slot, off);
    }
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..w.qd).map(|_| MaybeUninit::uninit()).collect();
    let (mut done, mut errors) = (0u64, 0u64);
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(secs);
    // Warm-up: the first 10% is not counted.
    let warm = t0 + Duration::from_millis(secs * 100);
    let mut counted_from = None;
    let mut in_flight = w.qd;
    // One queue: wait in do_io. Several: look at each in turn without waiting.
    let min = usize::from(nqueues == 1);
    let mut turn = 0;
    while in_flight > 0 {
        let qi = turn % nqueues;
        turn += 1;
        let n = queues[qi]
            .do_io(&mut completions, min, None, None)
            .map_err(|x| e("do_io", x))?;
        let now = Instant::now();
        if counted_from.is_none() && now >= warm {
            counted_from = Some((now, done));
        }
        for c in &completions[..n] {
            // SAFETY: do_io initialised the first `n` completions.
            let c = unsafe { c.assume_init_ref() };
            if c.ret != 0 {
                errors += 1;
            }
            done += 1;
            if now < deadline {
                let off = next_offset(&mut rng);
                submit(&mut queues[qi], c.user_data, off);
            } else {
                in_flight -= 1;
            }
        }
    }
    let (from, done_before) = counted_from.unwrap_or((t0, 0));
    let elapsed = Instant::now().duration_since(from).as_secs_f64();
    let n = (done - done_before) as f64;
    let iops = n / elapsed;
    drop(queues);
    drop(b);
    Ok(Result1 {
        iops,
        mbps: iops * w.bs as f64 / 1e6,
        errors,
    })
}

fn host_fio(file: &Path, w: &Workload, secs: u64) -> Result<Result1, String> {
    let rw = match w.pattern {
        Pattern::RandRead => "randread",
        Pattern::RandWrite => "randwrite",
        Pattern::SeqRead => "read",
        Pattern::SeqWrite => "write",
    };
    let out = pinned(&which("fio").ok_or("fio not found (scripts/setup.sh installs it)")?)
        .args([
            "--name=host",
            "--direct=1",
            "--ioengine=io_uring",
            "--time_based",
            "--output-format=json",
        ])
        .arg(format!("--filename={}", file.display()))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={}", w.bs))
        .arg(format!("--iodepth={}", w.qd))
        .arg(format!("--runtime={secs}"))
        .arg(format!("--ramp_time={}", (secs / 10).max(1)))
        .output()
        .map_err(|e| format!("fio: {e}"))?;
    let v: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("fio output: {e}: {}", String::from_utf8_lossy(&out.stderr)))?;
    let job = &v["jobs"][0];
    let side = if matches!(w.pattern, Pattern::RandWrite | Pattern::SeqWrite) {
        &job["write"]
    } else {
        &job["read"]
    };
    let iops = side["iops"].as_f64().unwrap_or(0.0);
    Ok(Result1 {
        iops,
        mbps: iops * w.bs as f64 / 1e6,
        errors: job["error"].as_u64().unwrap_or(0),
    })
}

fn start_blkback(
    dir: &Path,
    disk: &str,
    queues: usize,
    extra: &[String],
) -> Result<Daemon, String> {
    let sock = dir.join("blkback.sock");
    let mut cmd = pinned(&workspace_bin("blkback").map_err(|e| e.to_string())?);
    cmd.arg("--socket")
        .arg(&sock)
        .args(["--disk", disk, "--log-level", "warn"])
        .args(["--queues", &queues.to_string()])
        .args(extra);
    let mut d =
        Daemon::spawn("blkback", cmd, &dir.join("blkback.log")).map_err(|e| e.to_string())?;
    d.wait_for_socket(&sock, Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    Ok(d)
}

fn start_qsd(
    dir: &Path,
    target: Target,
    file: &Path,
    size: u64,
    queues: usize,
) -> Result<Daemon, String> {
    let sock = dir.join("qsd.sock");
    let qsd = which("qemu-storage-daemon").ok_or("qemu-storage-daemon not found (qemu-utils)")?;
    let mut cmd = pinned(&qsd);
    let file_node = |node: &str| {
        format!(
            "driver=file,node-name={node},filename={},cache.direct=on,aio=io_uring",
            file.display()
        )
    };
    match target {
        Target::File => cmd.arg("--blockdev").arg(file_node("d0")),
        Target::Qcow2 | Target::Qcow2Fresh => cmd
            .arg("--blockdev")
            .arg(file_node("f0"))
            .arg("--blockdev")
            .arg("driver=qcow2,node-name=d0,file=f0"),
        Target::Null => cmd.arg("--blockdev").arg(format!(
            "driver=null-co,node-name=d0,size={size},read-zeroes=off"
        )),
    };
    cmd.arg("--export").arg(format!(
        "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
        sock.display()
    ));
    let mut d = Daemon::spawn("qemu-storage-daemon", cmd, &dir.join("qsd.log"))
        .map_err(|e| e.to_string())?;
    d.wait_for_socket(&sock, Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    Ok(d)
}

fn fill(file: &Path, size: u64) -> Result<(), String> {
    let mut f = std::fs::File::create(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let chunk: Vec<u8> = (0..(1 << 20))
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    for _ in 0..size.div_ceil(1 << 20) {
        f.write_all(&chunk).map_err(|e| e.to_string())?;
    }
    f.sync_all().map_err(|e| e.to_string())
}

/// The one-minute load average (/proc/loadavg).
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The run with the median IOPS (the first error if any run failed).
fn median(mut runs: Vec<Result<Result1, String>>) -> Result<Result1, String> {
    if let Some(e) = runs.iter().find_map(|r| r.as_ref().err()) {
        return Err(e.clone());
    }
    runs.sort_by(|a, b| {
        let (a, b) = (
            a.as_ref().map_or(0.0, |r| r.iops),
            b.as_ref().map_or(0.0, |r| r.iops),
        );
        a.total_cmp(&b)
    });
    let mid = runs.len() / 2;
    runs.swap_remove(mid)
}

/// Runs the benchmark and prints the table.
pub fn run(args: &Args) -> Result<(), String> {
    // A ratio taken while other work loads the machine is not a result: record the load, here
    // before this run's own setup (writing the test file) raises it.
    let load = load_average();
    pin_self(1);
    let tmp = match &args.dir {
        Some(d) => tempfile::Builder::new()
            .prefix("vback-bench.")
            .tempdir_in(d),
        None => tempfile::Builder::new()
            .prefix("vback-bench.")
            .tempdir_in("/var/tmp"),
    }
    .map_err(|e| format!("cannot create a work directory: {e}"))?;
    let dir = tmp.path();
    let file = dir.join("bench.raw");
    eprintln!(
        "writing a {} MiB test file at {} ...",
        args.size >> 20,
        file.display()
    );
    fill(&file, args.size)?;
    let file_disk = format!("file:{}", file.display());
    let null_disk = format!("null:{}", args.size);
    let qcow2 = dir.join("bench.qcow2");
    let qcow2_disk = format!("tap:qcow2:{}", qcow2.display());
    let fresh = dir.join("fresh.qcow2");
    let fresh_disk = format!("tap:qcow2:{}", fresh.display());
    let qemu_img = |a: &[&str]| -> Result<(), String> {
        let out = Command::new("qemu-img")
            .args(a)
            .output()
            .map_err(|e| format!("qemu-img (qemu-utils): {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "qemu-img {a:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    };
    let selected: Vec<&Workload> = WORKLOADS
        .iter()
        .filter(|w| args.only.is_empty() || args.only.iter().any(|o| o == w.name))
        .collect();
    if selected.is_empty() {
        let names: Vec<&str> = WORKLOADS.iter().map(|w| w.name).collect();
        return Err(format!("no such workload; known: {}", names.join(", ")));
    }
    if selected.iter().any(|w| w.target == Target::Qcow2) {
        eprintln!("converting it to a fully allocated qcow2 image ...");
        qemu_img(&[
            "convert",
            "-O",
            "qcow2",
            &file.to_string_lossy(),
            &qcow2.to_string_lossy(),
        ])?;
        // qemu-img writes through the page cache: write it back now, or the first backend's
        // O_DIRECT reads pay for it.
        std::fs::File::open(&qcow2)
            .and_then(|f| f.sync_all())
            .map_err(|e| format!("{}: {e}", qcow2.display()))?;
    }

    // Idle RSS of blkback with a file disk and one front end connected then gone.
    let mut idle = start_blkback(dir, &file_disk, 1, &args.blkback_args)?;
    std::thread::sleep(Duration::from_millis(300));
    let idle_rss = idle.pid().and_then(rss_kib);
    idle.terminate(Duration::from_secs(5));

    match load {
        Some(l) if l >= 1.0 => eprintln!(
            "warning: load average {l:.2} at the start (1 or more): other work is running, and \
             the ratios below will not hold on a quiet machine"
        ),
        _ => {}
    }
    let mut rows = Vec::new();
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| workload | blkback IOPS | qsd IOPS | blkback/qsd min / median / max | host fio IOPS | blkback/fio |"
    );
    let _ = writeln!(table, "|---|---:|---:|---:|---:|---:|");
    for w in selected {
        eprintln!(
            "== {} ({}s each, {} time(s))",
            w.name, args.seconds, args.repeat
        );
        let client_poll = !args.client_irq;
        // The same workload against each backend in turn, each started fresh.
        let capacity = if w.target == Target::Qcow2Fresh {
            FRESH_SIZE
        } else {
            args.size
        };
        let measure = |daemon: &dyn Fn() -> Result<Daemon, String>, sock: &str| {
            if w.target == Target::Qcow2Fresh {
                let _ = std::fs::remove_file(&fresh);
                qemu_img(&[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    &fresh.to_string_lossy(),
                    &FRESH_SIZE.to_string(),
                ])?;
            }
            let mut d = daemon()?;
            let r = drive(&dir.join(sock), w, capacity, args.seconds, client_poll);
            d.terminate(Duration::from_secs(5));
            r
        };
        let (bb_disk, qsd_file) = match w.target {
            Target::Null => (&null_disk, file.as_path()),
            Target::File => (&file_disk, file.as_path()),
            Target::Qcow2 => (&qcow2_disk, qcow2.as_path()),
            Target::Qcow2Fresh => (&fresh_disk, fresh.as_path()),
        };
        let (mut bbs, mut qss, mut fios) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..args.repeat {
            bbs.push(measure(
                &|| start_blkback(dir, bb_disk, w.queues, &args.blkback_args),
                "blkback.sock",
            ));
            qss.push(measure(
                &|| start_qsd(dir, w.target, qsd_file, args.size, w.queues),
                "qsd.sock",
            ));
            // Host fio measures the raw file only (the limit of the raw rows).
            fios.push(match w.target {
                Target::File => host_fio(&file, w, args.seconds),
                _ => Err("-".to_string()),
            });
        }
        // The ratio of each round (blkback and qsd measured back to back), then its spread.
        let mut ratios: Vec<f64> = bbs
            .iter()
            .zip(&qss)
            .filter_map(|(a, b)| match (a, b) {
                (Ok(a), Ok(b)) if b.iops > 0.0 => Some(a.iops / b.iops),
                _ => None,
            })
            .collect();
        ratios.sort_by(f64::total_cmp);
        let spread = (!ratios.is_empty()).then(|| {
            (
                ratios[0],
                ratios[ratios.len() / 2],
                ratios[ratios.len() - 1],
            )
        });
        let (bb, qs, fio) = (median(bbs), median(qss), median(fios));
        let show = |r: &Result<Result1, String>| match r {
            Ok(r) if r.errors > 0 => format!("{:.0} ({} errors)", r.iops, r.errors),
            Ok(r) => format!("{:.0}", r.iops),
            Err(e) => e.clone(),
        };
        let ratio = |a: &Result<Result1, String>, b: &Result<Result1, String>| match (a, b) {
            (Ok(a), Ok(b)) if b.iops > 0.0 => format!("{:.2}×", a.iops / b.iops),
            _ => "-".into(),
        };
        let _ = writeln!(
            table,
            "| {} | {} | {} | {} | {} | {} |",
            w.name,
            show(&bb),
            show(&qs),
            spread.map_or_else(
                || "-".into(),
                |(lo, mid, hi)| format!("{lo:.2}× / {mid:.2}× / {hi:.2}×")
            ),
            show(&fio),
            ratio(&bb, &fio)
        );
        eprintln!(
            "   blkback {}  qsd {}  fio {}",
            show(&bb),
            show(&qs),
            show(&fio)
        );
        let j = |r: &Result<Result1, String>| match r {
            Ok(r) => json!({"iops": r.iops, "mb_per_s": r.mbps, "errors": r.errors}),
            Err(e) => json!({"error": e}),
        };
        rows.push(
            json!({"workload": w.name, "blkback": j(&bb), "qsd": j(&qs), "host_fio": j(&fio),
                   "blkback_per_qsd": spread.map(|(lo, mid, hi)| json!({"min": lo, "median": mid, "max": hi}))}),
        );
    }
    println!("{table}");
    match load {
        Some(l) => println!("load average at the start: {l:.2}"),
        None => println!("load average at the start: unknown"),
    }
    match idle_rss {
        Some(k) => println!(
            "blkback idle RSS (file disk, 1 queue): {:.1} MiB",
            k as f64 / 1024.0
        ),
        None => println!("blkback idle RSS: unknown"),
    }
    if let Some(p) = &args.json {
        let doc = json!({"seconds": args.seconds, "size": args.size, "repeat": args.repeat, "load_average": load, "results": rows, "blkback_idle_rss_kib": idle_rss});
        std::fs::write(p, serde_json::to_string_pretty(&doc).unwrap_or_default())
            .map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok(())
}
