//! blkback: a vhost-user-blk backend (Xen's blkback for KVM guests).
//!
//! This is the skeleton: it parses and validates its configuration, answers
//! `--print-capabilities`, and says that serving is not implemented yet.

use std::process::ExitCode;

use clap::Parser;
use vback_common::spec::{DiskMode, DiskUname};
use vback_common::{CommonArgs, DeviceInfo, not_implemented};

const INFO: DeviceInfo = DeviceInfo {
    name: "blkback",
    vhost_type: "block",
    features: &[],
};

/// Serve a disk image or host block device to a guest over vhost-user-blk.
///
/// QEMU attaches it with:
///   -chardev socket,id=d0,path=SOCK -device vhost-user-blk-pci,chardev=d0,num-queues=N
/// (guest memory must be shared: -object memory-backend-memfd,share=on).
#[derive(Debug, Parser)]
#[command(version, verbatim_doc_comment, after_help = AFTER_HELP)]
struct Args {
    /// What backs the disk, in Xen's uname syntax: phy:/dev/DEVICE, file:/PATH, tap:aio:/PATH,
    /// tap:qcow:/PATH, tap:vmdk:/PATH, iscsi:IQN,LUN, nbd:HOST:PORT or null:SIZE. The format
    /// always comes from the prefix; a bare path is refused.
    #[arg(long, value_name = "UNAME", value_parser = DiskUname::parse, required_unless_present = "print_capabilities")]
    disk: Option<DiskUname>,

    /// Access mode: r (read-only) or w (writable).
    #[arg(long, default_value = "w", value_parser = parse_mode)]
    mode: DiskMode,

    /// Number of virtqueues (the guest's hardware queues).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    queues: u16,

    /// Maximum virtqueue size.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u16).range(2..=32768))]
    queue_size: u16,

    /// Serial number the guest reads (GET_ID; up to 20 bytes).
    #[arg(long, value_name = "ID")]
    serial: Option<String>,

    #[command(flatten)]
    common: CommonArgs,
}

const AFTER_HELP: &str = "\
Examples:
  blkback --socket /run/vback/alice-xvda.sock --disk tap:aio:/var/lib/xen/images/alice/disk0
  blkback --socket /run/vback/bench.sock --disk null:1G --queues 2";

fn parse_mode(s: &str) -> Result<DiskMode, String> {
    DiskMode::parse(s).ok_or_else(|| format!("mode `{s}` is not r (read-only) or w (writable)"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.common.print_capabilities {
        println!("{}", INFO.capabilities_json());
        return ExitCode::SUCCESS;
    }
    if let Some(s) = &args.serial
        && s.len() > 20
    {
        eprintln!("blkback: --serial `{s}` is longer than 20 bytes (virtio-blk's limit)");
        return ExitCode::from(2);
    }
    if let Some(disk) = &args.disk {
        eprintln!(
            "blkback: disk {disk} mode {} queues {}x{}",
            args.mode, args.queues, args.queue_size
        );
    }
    not_implemented("blkback", "serving vhost-user-blk", Some(3))
}
