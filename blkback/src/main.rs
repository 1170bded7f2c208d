//! blkback: serve a disk to a guest over vhost-user-blk.

use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use vback_block::engine::EngineChoice;
use vback_common::spec::{DiskArg, DiskMode};
use vback_common::{CommonArgs, init_logging};

/// Serve a disk image or host block device to a guest over vhost-user-blk.
///
/// QEMU attaches it with (vhost-user needs the guest's memory shared: size= as -m):
///   -object memory-backend-memfd,id=mem,size=1G,share=on -machine q35,memory-backend=mem
///   -chardev socket,id=d0,path=SOCK -device vhost-user-blk-pci,chardev=d0,num-queues=N
#[derive(Debug, Parser)]
#[command(version, verbatim_doc_comment, after_help = AFTER_HELP)]
struct Args {
    /// What backs the disk, in Xen's uname syntax: phy:/dev/DEVICE (a host block device),
    /// file:/PATH or tap:aio:/PATH (a raw image), tap:qcow:/PATH (also tap:qcow2:, qcow2:; a
    /// qcow2 v2/v3 image, with its backing chain), or null:SIZE (no storage: requests complete
    /// without I/O, for measuring the backend); or a whole Xen disk entry UNAME,VDEV,MODE (such
    /// as tap:aio:/img,xvda,r), whose mode is used. The format always comes from the prefix; a
    /// bare path is refused. (tap:vmdk:, iscsi:, nbd: are parsed but not served yet.)
    /// A disk entry may end in xl's `script=NAME`: the vbd hotplug script run with `add` before
    /// the disk is opened and `remove` after it is closed (see below).
    #[arg(long, value_name = "UNAME", value_parser = DiskArg::parse, required_unless_present_any = ["print_capabilities", "blk_file"], conflicts_with = "blk_file")]
    disk: Option<DiskArg>,

    /// A raw image or host block device to serve: the same as --disk file:PATH, or --disk
    /// phy:PATH for a block device (QEMU's vhost-user.json convention, for management tools
    /// that start vhost-user-blk backends).
    #[arg(long, value_name = "PATH")]
    blk_file: Option<std::path::PathBuf>,

    /// Serve the disk read-only: the same as --mode r (QEMU's vhost-user.json convention).
    #[arg(long, conflicts_with = "mode")]
    read_only: bool,

    /// Where hotplug scripts named in `script=` are found (`script=/path` is used as is).
    #[arg(long, value_name = "DIR", env = "VBACK_SCRIPT_DIR", default_value = vback_common::hotplug::DEFAULT_SCRIPT_DIR)]
    script_dir: std::path::PathBuf,

    /// The guest's domain name or number, passed to the hotplug script as $domain.
    #[arg(long, value_name = "NAME|ID")]
    domain: Option<String>,

    /// Access mode: r (read-only: the guest sees a read-only disk, other readers may share the
    /// image), w (writable, exclusive: a second writer, blkback or QEMU, is refused), or w!
    /// (writable without locking: only if you know the image is not used elsewhere). Default: the
    /// mode of a --disk entry, else w.
    #[arg(long, value_parser = parse_mode)]
    mode: Option<DiskMode>,

    /// Number of request queues (QEMU: num-queues=N must not exceed it). One worker thread and
    /// one io_uring per queue.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    queues: u16,

    /// Maximum virtqueue size (a power of two).
    #[arg(long, default_value_t = 256, value_parser = parse_queue_size)]
    queue_size: u16,

    /// Tests: do not offer in-flight tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), so the
    /// requests in flight when the daemon dies are not resubmitted by its successor.
    #[arg(long, hide = true)]
    no_inflight: bool,

    /// Be a live migration's destination: open the image without its lock and take the lock
    /// only when the front end starts the device, after the source's blkback released it (it
    /// does when its front end stops the device while logging dirty pages). If the lock cannot
    /// be taken then, the device does not start. A qcow2 image's metadata is only read until
    /// then, and read again when the lock is taken (the source wrote it meanwhile).
    #[arg(long)]
    incoming: bool,

    /// Serial number the guest reads (/sys/block/vdX/serial; up to 20 bytes). Default: "vback-"
    /// and a hash of the image path, stable across restarts.
    #[arg(long, value_name = "ID")]
    serial: Option<String>,

    /// Go through the host page cache instead of O_DIRECT (default: O_DIRECT for images and
    /// devices, which avoids double caching).
    #[arg(long)]
    page_cache: bool,

    /// I/O engine: auto (io_uring, falling back to a thread pool if io_uring is unavailable),
    /// io-uring, or thread-pool.
    #[arg(long, value_enum, default_value_t = Engine::Auto)]
    engine: Engine,

    /// Busy-poll each queue for this many microseconds after the last request or completion
    /// (four times as long while I/O is in flight) before sleeping again, like QEMU's iothread
    /// polling: lower latency at low queue depth for some CPU time. 0 disables polling.
    /// Default: 32, or 0 when there are more queues than CPUs blkback may run on (a polling
    /// queue would take the CPU another queue needs).
    #[arg(long, value_name = "MICROSECONDS")]
    poll_us: Option<u64>,

    /// qcow2: memory for cached L2 tables (the metadata mapping guest to host clusters), shared
    /// by the images of the chain; at least two tables per image are kept whatever this says.
    /// Each 8 bytes of L2 table map one cluster: 4M covers 32 GiB of a 64 KiB-cluster image.
    #[arg(long, value_name = "SIZE", default_value = "4M", value_parser = parse_size)]
    qcow2_cache_size: u64,

    /// qcow2 backing files: strict (default) opens a backing file only if the image's header
    /// names its format (raw or qcow2; formats are never probed) and it lies in the top image's
    /// directory or a --backing-dir; relaxed also opens backing files anywhere and treats one
    /// without a format as raw. Backing files are always opened read-only.
    #[arg(long, value_enum, default_value_t = BackingPolicyArg::Strict)]
    backing_policy: BackingPolicyArg,

    /// A directory qcow2 backing files may be in (besides the image's own); repeatable.
    #[arg(long, value_name = "DIR")]
    backing_dir: Vec<std::path::PathBuf>,

    /// The longest qcow2 backing chain accepted (images below the top one).
    #[arg(long, value_name = "N", default_value_t = vback_block::qcow2::DEFAULT_MAX_DEPTH)]
    backing_depth: usize,

    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum BackingPolicyArg {
    Strict,
    Relaxed,
}

fn parse_size(s: &str) -> Result<u64, String> {
    vback_common::spec::parse_size(s).map_err(|e| e.to_string())
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Engine {
    Auto,
    IoUring,
    ThreadPool,
}

const AFTER_HELP: &str = "\
Control commands (--control PATH, or `vbctl`): status, stats, resize [size=SIZE].

Hotplug scripts (a disk entry ending in script=NAME, e.g. phy:/dev/vg0/alice,xvda,w,script=block):
blkback runs `SCRIPT add` before it opens the disk and `SCRIPT remove` after it closes it (also
when it stops on SIGTERM), with params, type, uname, mode, vdev and domain in the environment.
Exit status 0 means connected; otherwise, or when the script prints hotplug-status=busy or
hotplug-status=error on stdout, blkback does not start and reports the script's last stderr line.

Examples:
  blkback --socket /run/vback/alice-xvda.sock --control /run/vback/alice-xvda.ctl \\
          --disk tap:aio:/var/lib/xen/images/alice/disk0
  blkback --socket /run/vback/bench.sock --disk null:1G --queues 2
  # a qcow2 overlay over a base image in another directory:
  blkback --socket /run/vback/bob.sock --disk tap:qcow:/var/lib/vback/bob.qcow2 \\
          --backing-dir /var/lib/vback/base
  # grow the image online; the guest sees the new size at once:
  vbctl call /run/vback/alice-xvda.ctl resize size=20G";

fn parse_mode(s: &str) -> Result<DiskMode, String> {
    DiskMode::parse(s).ok_or_else(|| {
        format!("mode `{s}` is not r (read-only), w (writable) or w! (writable, unlocked)")
    })
}

fn parse_queue_size(s: &str) -> Result<u16, String> {
    let n: u16 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
    if !(8..=32768).contains(&n) || !n.is_power_of_two() {
        return Err(format!(
            "queue size {n} must be a power of two from 8 to 32768"
        ));
    }
    Ok(n)
}

fn main() -> ExitCode {
    let args: Args = vback_common::docgen::parse("8");
    if args.common.print_capabilities {
        println!("{}", blkback::INFO.capabilities_json());
        return ExitCode::SUCCESS;
    }
    init_logging(args.common.log_level);
    let disk = match (args.disk, args.blk_file) {
        (Some(d), _) => d,
        (None, Some(path)) => DiskArg {
            // A host block device is phy:, anything else a raw image (file:).
            uname: if std::fs::metadata(&path)
                .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
            {
                vback_common::spec::DiskUname::Phy(path)
            } else {
                vback_common::spec::DiskUname::Image {
                    format: vback_common::spec::ImageFormat::Raw,
                    path,
                }
            },
            vdev: None,
            mode: None,
            script: None,
        },
        (None, None) => {
            eprintln!("blkback: --disk or --blk-file is required");
            return ExitCode::from(2);
        }
    };
    let option_mode = if args.read_only {
        Some(DiskMode::ReadOnly)
    } else {
        args.mode
    };
    let mode = match disk.mode_with(option_mode, DiskMode::ReadWrite) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("blkback: {e}");
            return ExitCode::from(2);
        }
    };
    let script = disk.script.as_deref().map(|name| {
        let vdev = disk.vdev.as_ref().map(ToString::to_string);
        vback_common::hotplug::Hotplug {
            path: vback_common::hotplug::Hotplug::resolve(name, &args.script_dir),
            env: blkback::script_env(&disk.uname, mode, vdev.as_deref(), args.domain.as_deref()),
        }
    });
    let config = blkback::Config {
        script,
        disk: disk.uname,
        mode,
        queues: args.queues,
        queue_size: args.queue_size,
        serial: args.serial,
        page_cache: args.page_cache,
        engine: match args.engine {
            Engine::Auto => EngineChoice::Auto,
            Engine::IoUring => EngineChoice::IoUring,
            Engine::ThreadPool => EngineChoice::ThreadPool,
        },
        poll: args.poll_us.map(std::time::Duration::from_micros),
        inflight: !args.no_inflight,
        incoming: args.incoming,
        qcow2: vback_block::qcow2::OpenOptions {
            writable: false,
            cache_bytes: args.qcow2_cache_size,
            backing: vback_block::qcow2::BackingPolicy {
                max_depth: args.backing_depth,
                allowed_dirs: args.backing_dir,
                any_dir: matches!(args.backing_policy, BackingPolicyArg::Relaxed),
                raw_without_format: matches!(args.backing_policy, BackingPolicyArg::Relaxed),
            },
            lock_backing: true,
        },
        common: args.common,
    };
    match blkback::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => vback_common::fatal("blkback", &e),
    }
}
