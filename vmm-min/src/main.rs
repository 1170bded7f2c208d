//! vmm-min: the smallest KVM VMM that boots a Linux guest and plugs in vback's backends over
//! vhost-user.
//!
//! This is the skeleton: it parses and validates its configuration and says that booting is not
//! implemented yet.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vback_common::not_implemented;
use vback_common::spec::parse_size;

/// Boot a Linux kernel under KVM with every virtio device served by a vhost-user backend.
#[derive(Debug, Parser)]
#[command(version, verbatim_doc_comment, after_help = AFTER_HELP)]
struct Args {
    /// The kernel: an ELF vmlinux (PVH entry) or a bzImage.
    #[arg(long, value_name = "FILE")]
    kernel: PathBuf,

    /// An initramfs.
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,

    /// The kernel command line.
    #[arg(long, value_name = "CMDLINE", default_value = "console=ttyS0")]
    cmdline: String,

    /// Guest memory (e.g. 512M).
    #[arg(long, default_value = "512M", value_parser = parse_mem)]
    mem: u64,

    /// vCPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=64))]
    cpus: u8,

    /// Serial console: stdio or file:PATH.
    #[arg(long, default_value = "stdio")]
    serial: String,

    /// A vhost-user-blk socket (append ,ro for read-only). Repeatable.
    #[arg(long = "blk", value_name = "SOCK[,ro]")]
    blk: Vec<String>,

    /// A vhost-user-net socket (append ,mac=.. to set the MAC). Repeatable.
    #[arg(long = "net", value_name = "SOCK[,mac=..]")]
    net: Vec<String>,

    /// A vhost-user-scsi socket. Repeatable.
    #[arg(long = "scsi", value_name = "SOCK")]
    scsi: Vec<PathBuf>,

    /// Answer control commands (status, shutdown) on this unix socket.
    #[arg(long, value_name = "SOCK")]
    api: Option<PathBuf>,
}

const AFTER_HELP: &str = "\
Example:
  vmm-min --kernel vmlinux --initrd initrd.cpio --mem 512M --blk /run/vback/alice-xvda.sock";

fn parse_mem(s: &str) -> Result<u64, String> {
    let m = parse_size(s).map_err(|e| e.to_string())?;
    if m < (16 << 20) {
        return Err(format!("guest memory `{s}` is below the 16M minimum"));
    }
    Ok(m)
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(bad) = args.serial.strip_prefix("file:").map(str::is_empty)
        && bad
    {
        eprintln!("vmm-min: --serial file: needs a path");
        return ExitCode::from(2);
    }
    if args.serial != "stdio" && !args.serial.starts_with("file:") {
        eprintln!(
            "vmm-min: --serial `{}` is not stdio or file:PATH",
            args.serial
        );
        return ExitCode::from(2);
    }
    eprintln!(
        "vmm-min: kernel {} mem {} MiB cpus {}, {} blk, {} net, {} scsi",
        args.kernel.display(),
        args.mem >> 20,
        args.cpus,
        args.blk.len(),
        args.net.len(),
        args.scsi.len()
    );
    not_implemented("vmm-min", "booting a guest", Some(7))
}
