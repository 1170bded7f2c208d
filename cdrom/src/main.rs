//! cdrom: serve a CD/DVD drive to a guest over vhost-user-scsi.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vback_common::spec::{DiskArg, DiskMode, DiskUname};
use vback_common::{CommonArgs, init_logging};

/// Serve a CD-ROM drive (an ISO image or a host drive) to a guest over vhost-user-scsi, with
/// media change, guest eject and tray lock.
///
/// QEMU attaches it with (vhost-user needs the guest's memory shared: size= as -m):
///   -object memory-backend-memfd,id=mem,size=1G,share=on -machine q35,memory-backend=mem
///   -chardev socket,id=c0,path=SOCK -device vhost-user-scsi-pci,chardev=c0,num_queues=1
/// The guest sees /dev/sr0 (a removable MMC device).
#[derive(Debug, Parser)]
#[command(version, verbatim_doc_comment, after_help = AFTER_HELP)]
struct Args {
    /// The medium: tap:cdrom:/path/to.iso, tap:cdrom:/dev/sr0, or a Xen entry such as
    /// tap:cdrom:/dev/sr0,xvdc:cdrom,r.
    #[arg(long, value_name = "SPEC", value_parser = parse_cd, conflicts_with = "empty", required_unless_present_any = ["empty", "print_capabilities"])]
    disk: Option<PathBuf>,

    /// Start with an empty drive (tray closed, no medium); insert one later with media-insert.
    #[arg(long)]
    empty: bool,

    /// Share media with other cdrom daemons that also pass --shared (read-only media can be
    /// shared safely). Without it, an image or drive serves one guest at a time.
    #[arg(long)]
    shared: bool,

    /// Be a live migration's destination: the guest has been using this drive on the source,
    /// so it raises no power-on unit attention (which would fail the guest's read in progress
    /// with an I/O error), and the medium is opened without its lock, taken when the front end
    /// starts the device (the source's cdrom releases it when its front end stops the device
    /// while logging dirty pages).
    #[arg(long)]
    incoming: bool,

    /// Let media-insert take images and drives from DIR (repeatable). A path is taken only if,
    /// symlinks resolved, it lies under one of these directories and is a regular file or a
    /// block device (not a FIFO, a character device, or a file of /proc or /sys). Default: the
    /// directory of the --disk medium; with --empty and no --media-dir, media-insert is
    /// refused.
    #[arg(long = "media-dir", value_name = "DIR")]
    media_dirs: Vec<PathBuf>,

    /// Tests: do not offer in-flight tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), so the
    /// requests in flight when the daemon dies are not resubmitted by its successor.
    #[arg(long, hide = true)]
    no_inflight: bool,

    #[command(flatten)]
    common: CommonArgs,
}

const AFTER_HELP: &str = "\
Control commands (--control PATH, or `vbctl`):
  status                      tray, guest lock, medium
  media-insert path=PATH      put a disc in (the guest sees a media change); PATH must lie
                              under a --media-dir (by default the --disk medium's directory)
  media-eject [force=true]    take it out; refused while the guest locks the tray unless forced

Example:
  cdrom --socket /run/vback/alice-cd.sock --control /run/vback/alice-cd.ctl \\
        --disk tap:cdrom:/var/lib/isos/install.iso
  vbctl call /run/vback/alice-cd.ctl media-insert path=/var/lib/isos/disc2.iso
  cdrom --socket /run/vback/bob-cd.sock --control /run/vback/bob-cd.ctl \\
        --empty --media-dir /var/lib/isos --media-dir /srv/bob/isos";

fn parse_cd(s: &str) -> Result<PathBuf, String> {
    // A bare path: the only prefix cdrom takes is tap:cdrom: (the generic uname error would
    // suggest file:, tap:qcow: or phy:, which are disks, not CDs).
    let first = s.split(',').next().unwrap_or(s);
    if !first.contains(':') {
        return Err(format!(
            "`{first}` has no prefix: write tap:cdrom:{first} (an ISO image or a host drive)"
        ));
    }
    let arg = DiskArg::parse(s).map_err(|e| e.to_string())?;
    if arg.mode.is_some_and(DiskMode::writable) {
        return Err(format!(
            "`{s}` asks for a writable CD-ROM; a CD is read-only: give mode r (for example \
             tap:cdrom:/path/disc.iso,xvdc:cdrom,r)"
        ));
    }
    match arg.uname {
        DiskUname::Cdrom(p) => Ok(p),
        other => Err(format!(
            "`{other}` is not a CD: use tap:cdrom:/path/to.iso or tap:cdrom:/dev/sr0"
        )),
    }
}

fn main() -> ExitCode {
    let args: Args = vback_common::docgen::parse("8");
    if args.common.print_capabilities {
        println!("{}", cdrom::INFO.capabilities_json());
        return ExitCode::SUCCESS;
    }
    init_logging(args.common.log_level);
    let config = cdrom::Config {
        medium: args.disk,
        shared: args.shared,
        incoming: args.incoming,
        media_dirs: args.media_dirs,
        inflight: !args.no_inflight,
        common: args.common,
    };
    match cdrom::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => vback_common::fatal("cdrom", &e),
    }
}
