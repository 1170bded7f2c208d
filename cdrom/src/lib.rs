//! cdrom: a virtual CD/DVD drive served over vhost-user-scsi (Xen's `tap:cdrom`).
//!
//! - [`mmc`]: the SCSI/MMC logical unit (transport-free): commands, tray, lock, media events;
//! - [`virtio_scsi`]: the virtio-scsi request formats;
//! - [`vhost`]: the only module that knows vhost-user;
//! - [`control`]: `media-insert`, `media-eject`, `status` on the control socket.

pub mod control;
pub mod mmc;
pub mod vhost;
pub mod virtio_scsi;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use thiserror::Error;
use vback_common::lock::{ImageLock, LockError, LockMode};
use vback_common::{CommonArgs, Daemon, DaemonError, DeviceInfo};

use crate::control::CdControl;
use crate::mmc::{Cdrom, Medium};
use crate::vhost::CdBackend;

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
    /// Not a file or block device.
    #[error("{0} is neither an image file nor a block device")]
    WrongKind(PathBuf),
    /// Another daemon or QEMU has it.
    #[error(
        "{0} (each CD image or drive serves one guest at a time; start both daemons with --shared to share read-only media)"
    )]
    Locked(LockError),
}

/// Opens an ISO image or a host CD drive read-only and locks it: exclusively, or shared with
/// other `--shared` users.
pub fn open_medium(path: &Path, shared: bool) -> Result<Medium, MediumError> {
    let io = |op, source| MediumError::Io {
        op,
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(|e| io("open", e))?;
    let meta = file.metadata().map_err(|e| io("inspect", e))?;
    let size = if meta.file_type().is_block_device() {
        let mut v: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 into `v`, which lives for the call.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), 0x8008_1272, &mut v) };
        if r < 0 {
            return Err(io("read the size of", std::io::Error::last_os_error()));
        }
        v
    } else if meta.is_file() {
        meta.len()
    } else {
        return Err(MediumError::WrongKind(path.to_owned()));
    };
    let mode = if shared {
        LockMode::Shared
    } else {
        LockMode::Exclusive
    };
    // Not on `file`, which the engine registers with io_uring (see ImageLock).
    let lock = ImageLock::acquire(&file, path, mode, std::time::Duration::from_secs(3))
        .map_err(MediumError::Locked)?;
    Ok(Medium::new(path.to_owned(), file, size)
        .map_err(|e| io("set up the I/O engine for", e))?
        .with_lock(lock))
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
    let medium = config
        .medium
        .as_deref()
        .map(|p| open_medium(p, config.shared))
        .transpose()?;
    let serial = format!("vback-cd-{}", std::process::id());
    match &medium {
        Some(m) => log::info!("medium {} ({} bytes)", m.path.display(), m.size),
        None => log::info!("empty drive"),
    }
    let cd = Arc::new(Mutex::new(Cdrom::new(medium, &serial)));
    let control = Arc::new(CdControl::new(cd.clone(), config.shared));
    let daemon = Daemon::new(INFO, config.common.clone(), control)?;
    daemon.run(CdBackend::new(cd))?;
    Ok(())
}
