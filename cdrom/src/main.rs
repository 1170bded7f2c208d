//! cdrom: a virtual CD/DVD drive with media change and guest eject, over vhost-user-scsi.
//!
//! This is the skeleton: it parses and validates its configuration, answers
//! `--print-capabilities`, and says that serving is not implemented yet.

use std::process::ExitCode;

use clap::Parser;
use vback_common::spec::{DiskEntry, DiskUname};
use vback_common::{CommonArgs, DeviceInfo, not_implemented};

const INFO: DeviceInfo = DeviceInfo {
    name: "cdrom",
    vhost_type: "scsi",
    features: &[],
};

/// Serve a CD-ROM drive (an ISO image or a host drive) to a guest over vhost-user-scsi.
///
/// QEMU attaches it with:
///   -chardev socket,id=c0,path=SOCK -device vhost-user-scsi-pci,chardev=c0,num_queues=1
#[derive(Debug, Parser)]
#[command(version, verbatim_doc_comment, after_help = AFTER_HELP)]
struct Args {
    /// The medium: tap:cdrom:/path/to.iso, tap:cdrom:/dev/sr0, or a Xen entry such as
    /// tap:cdrom:/dev/sr0,xvdc:cdrom,r.
    #[arg(long, value_name = "SPEC", value_parser = parse_cd, conflicts_with = "empty", required_unless_present_any = ["empty", "print_capabilities"])]
    disk: Option<DiskUname>,

    /// Start with an empty drive (tray closed, no medium).
    #[arg(long)]
    empty: bool,

    /// Let other cdrom daemons that also pass --shared use the same medium (read-only media
    /// can be shared safely).
    #[arg(long)]
    shared: bool,

    #[command(flatten)]
    common: CommonArgs,
}

const AFTER_HELP: &str = "\
Example:
  cdrom --socket /run/vback/alice-cd.sock --disk tap:cdrom:/var/lib/isos/install.iso";

fn parse_cd(s: &str) -> Result<DiskUname, String> {
    let uname = if s.contains(',') {
        DiskEntry::parse(s).map_err(|e| e.to_string())?.uname
    } else {
        DiskUname::parse(s).map_err(|e| e.to_string())?
    };
    match uname {
        DiskUname::Cdrom(_) => Ok(uname),
        other => Err(format!(
            "`{other}` is not a CD: use tap:cdrom:/path/to.iso or tap:cdrom:/dev/sr0"
        )),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.common.print_capabilities {
        println!("{}", INFO.capabilities_json());
        return ExitCode::SUCCESS;
    }
    match &args.disk {
        Some(d) => eprintln!(
            "cdrom: medium {d}{}",
            if args.shared { " (shared)" } else { "" }
        ),
        None => eprintln!("cdrom: empty drive"),
    }
    not_implemented(
        "cdrom",
        "serving vhost-user-scsi with an MMC device",
        Some(6),
    )
}
