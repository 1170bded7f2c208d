//! vmm-min: the smallest KVM VMM that boots a Linux guest and plugs in vback's backends over
//! vhost-user. main.rs parses and validates the arguments; lib.rs runs the VM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vback_common::spec::parse_size;
use vmm_min::config::{self, Config};

/// Boot a Linux kernel under KVM with every virtio device served by a vhost-user backend.
///
/// vmm-min emulates a 16550 serial port (0x3f8, IRQ 4), the i8042 reset line and the virtio-mmio
/// transport; each --blk/--net/--scsi device is a vhost-user socket served by its own daemon
/// (blkback, netback, cdrom, or any vhost-user backend). Devices are placed at 0xd0000000 +
/// 4 KiB * N with IRQ 5 + N and announced on the kernel command line (virtio_mmio.device=)
/// and in ACPI tables (DSDT; the MADT lists the vCPUs). Guest memory is one shared memfd handed
/// to every backend. The kernel is entered directly in 64-bit mode with boot_params (e820 map,
/// command line, initrd, RSDP).
///
/// vmm-min exits 0 when the guest resets the machine (Linux `reboot -f`, or a write of 0xfe to
/// port 0x64) or on `shutdown` from the API socket, and 1 with the reason on a triple fault,
/// a halt with interrupts off or a KVM error. A backend that dies is reported; vmm-min keeps
/// running and reconnects when the socket accepts connections again.
#[derive(Debug, Parser)]
#[command(version, verbatim_doc_comment, after_help = AFTER_HELP)]
struct Args {
    /// The kernel: an uncompressed ELF vmlinux (or any x86-64 ELF, entered at its entry point in
    /// 64-bit mode) or a bzImage.
    #[arg(long, value_name = "FILE")]
    kernel: PathBuf,

    /// An initramfs, loaded at the top of guest memory.
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,

    /// The kernel command line (the virtio_mmio.device= arguments are appended).
    #[arg(long, value_name = "CMDLINE", default_value = "console=ttyS0")]
    cmdline: String,

    /// Guest memory (e.g. 512M); at least 16M, at most 3G.
    #[arg(long, default_value = "512M", value_parser = parse_mem)]
    mem: u64,

    /// vCPUs (1 to 32). The guest learns about the others from the ACPI MADT and starts them
    /// itself (INIT/SIPI through KVM's in-kernel local APICs).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=32))]
    cpus: u8,

    /// Do not write ACPI tables. By default vmm-min writes an RSDP, XSDT, FADT (hardware-reduced),
    /// MADT (the vCPUs, the IOAPIC) and a DSDT describing each virtio-mmio device as LNRO0005,
    /// which is how kernels without CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES (Debian's) find them.
    #[arg(long)]
    no_acpi: bool,

    /// Serial console output: stdio or file:PATH. Input always comes from standard input.
    #[arg(long, default_value = "stdio", value_parser = config::parse_serial)]
    serial: config::SerialOut,

    /// A vhost-user-blk socket (append ,ro to offer the disk read-only). Repeatable.
    #[arg(long = "blk", value_name = "SOCK[,ro]", value_parser = config::parse_blk)]
    blk: Vec<(vmm_min::mmio::Kind, PathBuf)>,

    /// A vhost-user-net socket (append ,mac=XX:XX:XX:XX:XX:XX to set the MAC the guest sees when
    /// the backend serves no config space). Repeatable.
    #[arg(long = "net", value_name = "SOCK[,mac=..]", value_parser = config::parse_net)]
    net: Vec<(vmm_min::mmio::Kind, PathBuf)>,

    /// A vhost-user-scsi socket. Repeatable.
    #[arg(long = "scsi", value_name = "SOCK", value_parser = config::parse_scsi)]
    scsi: Vec<(vmm_min::mmio::Kind, PathBuf)>,

    /// Answer control commands (help, status, stats, shutdown) on this unix socket, one JSON
    /// object per line (like the backends' --control).
    #[arg(long, value_name = "SOCK")]
    api: Option<PathBuf>,

    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides.
    #[arg(long, default_value = "info", value_name = "LEVEL")]
    log_level: String,
}

const AFTER_HELP: &str = "\
Devices are placed in the order blk, net, scsi.

Examples:
  vmm-min --kernel vmlinux --initrd initrd.cpio --mem 512M \\
      --cmdline 'console=ttyS0 earlyprintk=serial' --blk /run/vback/alice-xvda.sock
  vmm-min --kernel guest.elf --serial file:/tmp/console --blk /tmp/blk.sock --api /tmp/vmm.sock
  echo '{\"cmd\":\"status\"}' | socat - UNIX-CONNECT:/tmp/vmm.sock

Exit status: 0 guest reset or API shutdown, 1 guest or KVM failure, 2 bad arguments.";

fn parse_mem(s: &str) -> Result<u64, String> {
    let m = parse_size(s).map_err(|e| e.to_string())?;
    if m < (16 << 20) {
        return Err(format!("guest memory `{s}` is below the 16M minimum"));
    }
    if m > vmm_min::memory::MMIO_START {
        return Err(format!(
            "guest memory `{s}` is above the 3G maximum (the MMIO window starts there)"
        ));
    }
    Ok(m)
}

fn main() -> ExitCode {
    let args: Args = vback_common::docgen::parse("1");
    let env = env_logger::Env::default().default_filter_or(&args.log_level);
    env_logger::Builder::from_env(env)
        .format_target(false)
        .init();
    let mut devices = args.blk;
    devices.extend(args.net);
    devices.extend(args.scsi);
    if let Err(e) = config::check_devices(&devices) {
        eprintln!("vmm-min: {e}");
        return ExitCode::from(2);
    }
    let cfg = Config {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        mem: args.mem,
        cpus: args.cpus,
        acpi: !args.no_acpi,
        serial: args.serial,
        devices,
        api: args.api,
    };
    match vmm_min::run(cfg) {
        Ok(reason) => {
            eprintln!("vmm-min: guest stopped: {reason}");
            // The vCPU thread may be blocked in KVM_RUN: leave without joining it.
            std::process::exit(i32::from(reason.code()));
        }
        Err(e) => {
            eprintln!("vmm-min: {e}");
            ExitCode::from(1)
        }
    }
}
