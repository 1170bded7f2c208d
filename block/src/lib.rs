//! vback-block: the storage under vback's backends.
//!
//! - [`engine`]: the asynchronous I/O engine (io_uring, with a thread-pool fallback);
//! - [`lock`]: image locks compatible with QEMU's ([`lock::ImageLock`]);
//! - [`qcow2`]: the qcow2 format layer (metadata, allocation, backing chains);
//! - [`disk`]: opening what backs a disk (raw files, block devices, the null device, qcow2
//!   images) with its locks, and resizing it;
//! - [`device_size`]: the size of an open file or host block device.
//!
//! blkback serves disks opened here, cdrom reads its media through the engine, and vbimg works
//! on qcow2 images with the same format layer.

pub mod disk;
pub mod engine;
pub mod lock;
pub mod qcow2;

pub use disk::{Disk, DiskError, DiskKind, DiskOptions, SECTOR, device_size, format_warning};
