//! vback-block: the storage under vback's backends.
//!
//! - [`backend`]: the device-facing interface: a [`BlockBackend`] per disk (capacity,
//!   topology, capabilities, resize, status) that opens one [`BlockQueue`] per device queue
//!   (tagged requests on guest iovecs, batched submission, completions on an eventfd);
//! - [`local`]: its implementations for this host: raw files, block devices and qcow2 images
//!   on the engine, and the null device;
//! - [`error`]: [`BlockError`], a stable [`ErrorKind`] with context;
//! - [`engine`]: the asynchronous I/O engine (io_uring, with a thread-pool fallback);
//! - [`lock`]: image locks compatible with QEMU's ([`lock::ImageLock`]);
//! - [`qcow2`]: the qcow2 format layer (metadata, allocation, backing chains);
//! - [`disk`]: opening what backs a disk (raw files, block devices, the null device, qcow2
//!   images) with its locks, and resizing it;
//! - [`virtio_blk`]: the virtio-blk request format (feature bits, configuration space, parsing a
//!   hostile descriptor chain into a request on guest iovecs) that blkback's worker turns into
//!   [`Request`]s;
//! - [`device_size`]: the size of an open file or host block device.
//!
//! blkback serves disks through [`open_backend`]; cdrom reads its media through
//! [`open_backend_from_file`] (it opens and checks them itself); vbimg works on qcow2 images
//! with the same format layer.

pub mod backend;
pub mod disk;
pub mod engine;
pub mod error;
pub mod local;
pub mod lock;
pub mod qcow2;
pub mod virtio_blk;

pub use backend::{
    BackendInfo, BlockBackend, BlockQueue, Capabilities, FormatInfo, QueueCompletion, Request,
    Topology,
};
pub use disk::{Disk, DiskError, DiskKind, DiskOptions, SECTOR, device_size, format_warning};
pub use error::{BlockError, ErrorKind, Operation};
pub use local::LocalBackend;

/// Opens the disk `uname` names (the format from the spec, never probed) as a backend whose
/// queues use `engine`.
pub fn open_backend(
    uname: &vback_common::spec::DiskUname,
    opts: DiskOptions,
    engine: engine::EngineChoice,
) -> Result<std::sync::Arc<dyn BlockBackend>, DiskError> {
    Ok(std::sync::Arc::new(LocalBackend::new(
        Disk::open(uname, opts)?,
        engine,
    )))
}

/// Serves `file`, already opened and checked by the caller, as a raw disk (a regular file or a
/// host block device) whose queues use `engine`, holding `lock` as long as the backend lives.
/// For callers with their own rules on what may be opened (cdrom's media directories): the
/// path is not opened again, only named in errors and `status`.
pub fn open_backend_from_file(
    path: &std::path::Path,
    file: std::fs::File,
    lock: Option<lock::ImageLock>,
    read_only: bool,
    engine: engine::EngineChoice,
) -> Result<std::sync::Arc<dyn BlockBackend>, DiskError> {
    Ok(std::sync::Arc::new(LocalBackend::new(
        Disk::from_file(path, file, lock, read_only)?,
        engine,
    )))
}
