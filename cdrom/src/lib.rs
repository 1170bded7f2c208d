//! cdrom: a virtual CD/DVD drive served over vhost-user-scsi (Xen's `tap:cdrom`).
//!
//! - [`mmc`]: the SCSI/MMC logical unit (transport-free): commands, tray, lock, media events;
//! - [`virtio_scsi`]: the virtio-scsi request formats;
//! - [`vhost`]: the only module that knows vhost-user;
//! - [`control`]: `media-insert`, `media-eject`, `status` on the control socket;
//! - [`media`]: opening media, and the media directories `media-insert` is confined to.

pub mod control;
pub mod media;
pub mod mmc;
pub mod vhost;
pub mod virtio_scsi;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use thiserror::Error;
use vback_common::{CommonArgs, Daemon, DaemonError, DeviceInfo};

use crate::control::CdControl;
use crate::mmc::Cdrom;
use crate::vhost::CdBackend;

pub use crate::media::{MediaDirs, open_medium};

/// What `--print-capabilities` reports.
pub const INFO: DeviceInfo = DeviceInfo {
    name: "cdrom",
    vhost_type: "scsi",
    features: &[],
};

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The medium at start (None: empty drive).
    pub medium: Option<PathBuf>,
    /// Share media with other cdrom daemons that also pass --shared.
    pub shared: bool,
    /// A live migration's destination (`--incoming`): no power-on unit attention, and the
    /// medium's lock taken when the front end starts the device.
    pub incoming: bool,
    /// `--media-dir`: where `media-insert` may take media from (empty: the directory of
    /// `medium`, or nowhere without one).
    pub media_dirs: Vec<PathBuf>,
    /// Offer in-flight tracking (on unless a test turns it off).
    pub inflight: bool,
    /// Daemon options.
    pub common: CommonArgs,
}

/// Why a medium could not be used.
#[derive(Debug, Error)]
pub enum MediumError {
    /// Opening or sizing failed.
    #[error("cannot {op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// vback-block could not serve the opened medium (its I/O engine, its size).
    #[error("cannot serve {path}: {source}")]
    Backend {
        /// The path.
        path: PathBuf,
        /// Why.
        source: vback_block::BlockError,
    },
    /// Not a file or block device.
    #[error("{path} is {kind}, not an image file or a block device")]
    WrongKind {
        /// The path.
        path: PathBuf,
        /// What it is ("a FIFO", "a character device", ...).
        kind: &'static str,
    },
    /// A file of /proc, /sys and the like.
    #[error("{path} is a file of the kernel's {fs} file system, not an image file or a drive")]
    PseudoFile {
        /// The path.
        path: PathBuf,
        /// The file system.
        fs: &'static str,
    },
    /// `media-insert` of a path that resolves outside the media directories.
    #[error(
        "refused {path}: it resolves to {resolved}, outside the media directories ({dirs}); media-insert only takes images and drives under the directories given with cdrom's --media-dir DIR option"
    )]
    OutsideMediaDirs {
        /// The path asked for.
        path: PathBuf,
        /// Where it leads.
        resolved: PathBuf,
        /// The media directories.
        dirs: MediaDirs,
    },
    /// `media-insert` with no media directory at all.
    #[error(
        "no media directory: cdrom started with neither a medium nor --media-dir, so media-insert takes nothing; start cdrom with --media-dir DIR to take media from DIR"
    )]
    NoMediaDirs,
    /// The last component became a symlink between resolving and opening.
    #[error(
        "{0} changed while it was being opened (a symlink or a rename on its way); it was not taken"
    )]
    Changed(PathBuf),
    /// A `--media-dir` that cannot be resolved.
    #[error("--media-dir {dir}: {source}")]
    MediaDir {
        /// The directory as given.
        dir: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A `--media-dir` that is not a directory.
    #[error("--media-dir {0} is not a directory")]
    MediaDirNotDir(PathBuf),
    /// Another daemon or QEMU has it (cdrom itself only reads media).
    #[error(
        "{path} is in use{holder}: {}",
        if *shared {
            "that process does not share it (a cdrom daemon started without --shared, or a \
             writer); stop it, or restart that cdrom daemon with --shared"
        } else {
            "each CD image or drive serves one guest at a time; stop that user, or, to share \
             the medium read-only, start every cdrom daemon using it with --shared"
        }
    )]
    Locked {
        /// The medium.
        path: PathBuf,
        /// " by pid N (name)" when the holder could be found, else empty.
        holder: String,
        /// Whether this daemon was started with --shared.
        shared: bool,
    },
    /// The lock could not be taken for another reason.
    #[error(transparent)]
    Lock(vback_block::lock::LockError),
}

/// Why the cdrom daemon could not run.
#[derive(Debug, Error)]
pub enum Error {
    /// The medium could not be opened.
    #[error(transparent)]
    Medium(#[from] MediumError),
    /// The daemon failed.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
}

/// Serves the drive until SIGTERM/SIGINT.
pub fn run(config: Config) -> Result<(), Error> {
    let media_dirs = MediaDirs::new(&config.media_dirs, config.medium.as_deref())?;
    let medium = config
        .medium
        .as_deref()
        .map(|p| crate::media::open_medium_as(p, config.shared, config.incoming))
        .transpose()?;
    let serial = format!("vback-cd-{}", std::process::id());
    match &medium {
        Some(m) => log::info!("medium {} ({} bytes)", m.path.display(), m.size),
        None => log::info!("empty drive"),
    }
    if media_dirs.dirs().is_empty() {
        log::info!("media-insert is off (no --media-dir)");
    } else {
        log::info!("media-insert takes media from {media_dirs}");
    }
    let mut drive = Cdrom::new(medium, &serial);
    if config.incoming {
        log::info!(
            "--incoming: the guest has been using this drive (no power-on attention); the \
             medium's lock is taken when the front end starts the device"
        );
        drive.take_over();
    }
    let cd = Arc::new(Mutex::new(drive));
    let control = Arc::new(CdControl::new(cd.clone(), config.shared, media_dirs));
    let daemon = Daemon::new(INFO, config.common.clone(), control)?;
    daemon.run(CdBackend::new(cd, config.inflight))?;
    Ok(())
}
