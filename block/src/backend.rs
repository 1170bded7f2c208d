//! The line between a device (virtio-blk today, virtio-scsi later) and the storage under it.
//!
//! - [`BlockBackend`]: one per disk, shared by the device's queues: capacity, topology,
//!   capabilities, resize, [`BackendInfo`] for `status`, and [`BlockBackend::open_queue`],
//!   called **once per virtio queue**;
//! - [`BlockQueue`]: owned by one queue's thread. The device hands it tagged [`Request`]s on
//!   guest iovecs ([`BlockQueue::queue`]), then the whole batch ([`BlockQueue::submit`]), and
//!   collects [`QueueCompletion`]s ([`BlockQueue::reap`]) when the queue's eventfd
//!   ([`BlockQueue::notify_fd`], registered in the worker's epoll) says so. The queue knows
//!   its in-flight count and can [`drain`](BlockQueue::drain).
//!
//! What was taken from where:
//! - cloud-hypervisor's `block` crate: the device-facing disk (`AsyncDiskFile`: size,
//!   topology, sparse/zero capabilities, resize) that creates one `AsyncIo` per queue
//!   (`create_async_io(ring_depth)`); `AsyncIo`'s per-queue shape (requests tagged with the
//!   caller's `user_data`, a `notifier()` eventfd, `next_completed_request()`, batch submission);
//!   and `BlockError { kind, ctx, source }` (see [`crate::error`]).
//! - crosvm's `disk` crate: one asynchronous disk interface (`AsyncDisk`: read/write on guest
//!   memory, flush, punch_hole, write_zeroes_at) that both its virtio-blk and virtio-scsi serve,
//!   so a second device type needs no storage code of its own.
//!
//! What is ours: requests are queued and submitted separately (`submit` is where a batch reaches
//! the kernel, or where a remote backend writes its socket); the iovecs are raw `iovec`s into
//! mapped guest memory (no copies, no per-request allocation), copied into the queue's own slot
//! so the queue can resubmit a short transfer or split a request; FUA is a flag on writes (the
//! guest's write-cache setting is the device's business, not the disk's); a completion carries a
//! [`BlockError`] whose kind the device maps to its status. A remote protocol (NBD) fits the
//! same shape: `queue` encodes the request into a send buffer, `submit` writes the socket, its
//! event loop (a thread, or the socket itself as `notify_fd`) turns replies into completions.
//!
//! Completions may be ready as soon as `submit` returns (the null device, synchronous paths):
//! callers reap after every submit; the eventfd signals those that become ready later. A queue
//! without an eventfd ([`BlockQueue::notify_fd`] is `None`) completes everything by then.

use std::os::fd::RawFd;
use std::path::PathBuf;

use crate::error::BlockError;
use crate::qcow2;

/// The queue has no free slot: reap before queuing more.
pub use crate::engine::QueueFull;

/// What the disk can do beyond reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// Discard (punch holes, BLKDISCARD, qcow2 cluster discard) does something.
    pub discard: bool,
    /// Write-zeroes is carried out (efficiently or not).
    pub write_zeroes: bool,
    /// Flush makes completed writes durable.
    pub flush: bool,
    /// Writes can be made durable on completion ([`Request::Write`]'s `fua`).
    pub fua: bool,
    /// `resize` with a size grows the disk (else only a re-read of the storage's size).
    pub resize: bool,
}

/// Block sizes, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    /// The unit of addressing (512).
    pub logical_block: u32,
    /// The block the storage writes without read-modify-write (a power of two).
    pub physical_block: u32,
}

/// The disk, for `status`.
#[derive(Debug, Clone)]
pub struct BackendInfo {
    /// `file`, `block-device`, `null`, `qcow2`.
    pub kind: &'static str,
    /// What it was opened from (the spec's uname).
    pub uname: String,
    /// Read-only.
    pub read_only: bool,
    /// O_DIRECT in use.
    pub direct: bool,
    /// A warning about the disk (a raw disk starting with an image header).
    pub warning: Option<String>,
    /// Format details.
    pub format: Option<FormatInfo>,
}

/// Details of an image format.
#[derive(Debug, Clone)]
pub enum FormatInfo {
    /// A qcow2 image.
    Qcow2 {
        /// What the header says.
        info: qcow2::Info,
        /// L2 tables cached now.
        cached_tables: usize,
    },
}

/// A request on a queue. Offsets and lengths are in bytes on the disk as the guest sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Read into the iovecs.
    Read {
        /// Where.
        offset: u64,
    },
    /// Write from the iovecs; with `fua`, durable on completion.
    Write {
        /// Where.
        offset: u64,
        /// Force unit access (write-through).
        fua: bool,
    },
    /// Make every completed write durable.
    Flush,
    /// The range's data is no longer needed (a hint: storage that cannot discard succeeds).
    Discard {
        /// Where.
        offset: u64,
        /// How much.
        len: u64,
        /// Durable on completion (metadata formats flush after deallocating).
        fua: bool,
    },
    /// The range reads back as zeroes; `unmap` lets the storage deallocate it.
    WriteZeroes {
        /// Where.
        offset: u64,
        /// How much.
        len: u64,
        /// May deallocate.
        unmap: bool,
        /// Durable on completion.
        fua: bool,
    },
}

impl Request {
    /// The operation, for errors.
    pub fn operation(&self) -> crate::error::Operation {
        use crate::error::Operation as O;
        match self {
            Request::Read { .. } => O::Read,
            Request::Write { .. } => O::Write,
            Request::Flush => O::Flush,
            Request::Discard { .. } => O::Discard,
            Request::WriteZeroes { .. } => O::WriteZeroes,
        }
    }
}

/// A finished request: the caller's tag and the bytes transferred (reads, writes; 0 otherwise),
/// or why it failed.
#[derive(Debug)]
pub struct QueueCompletion {
    /// The tag given to [`BlockQueue::queue`].
    pub tag: u64,
    /// Bytes transferred, or the error.
    pub result: Result<u64, BlockError>,
}

/// A disk as a device sees it. Shared by the device's queues (`Send + Sync`).
pub trait BlockBackend: Send + Sync + std::fmt::Debug {
    /// Capacity in bytes (a multiple of 512); changes on resize.
    fn capacity(&self) -> u64;

    /// Capacity in 512-byte sectors.
    fn sectors(&self) -> u64 {
        self.capacity() / crate::SECTOR
    }

    /// Block sizes.
    fn topology(&self) -> Topology;

    /// What the disk can do.
    fn capabilities(&self) -> Capabilities;

    /// The guest may not write.
    fn read_only(&self) -> bool;

    /// What the disk is, for `status`.
    fn info(&self) -> BackendInfo;

    /// A stable serial for the disk (20 bytes at most).
    fn default_serial(&self) -> String;

    /// Grows the disk to `size` bytes, or with `None` re-reads the storage's size. Returns the
    /// new capacity.
    fn resize(&self, size: Option<u64>) -> Result<u64, BlockError>;

    /// Opens the queue object of one device queue, with room for `depth` requests in flight.
    fn open_queue(&self, depth: u32) -> Result<Box<dyn BlockQueue>, BlockError>;

    /// At exit, after every queue was drained or dropped: makes everything durable, closes
    /// the format (a qcow2 image gives back the clusters it reserved) and releases the disk's
    /// lock, even if other holders of the backend remain. Later writes may be refused.
    fn close(&self) -> Result<(), BlockError> {
        Ok(())
    }

    /// Live migration's handoff on the source, after every queue was drained: makes
    /// everything durable and releases the disk's lock (the disk stays open; see
    /// [`BlockBackend::take_lock`]).
    fn release_lock(&self) -> Result<(), BlockError> {
        Ok(())
    }

    /// Locks the disk for `mode` if it is not locked (a migration's destination opened it
    /// without the lock; a source that released it resumes), and reads a format's metadata
    /// anew if the other side may have changed it: an error while another process holds a
    /// conflicting lock. True if it took the lock or reread the metadata now.
    fn take_lock(&self, _mode: crate::lock::LockMode) -> Result<bool, BlockError> {
        Ok(false)
    }

    /// Whether the disk holds its image lock now (`None`: nothing to lock, the null device).
    fn lock_held(&self) -> Option<bool> {
        None
    }
}

/// One device queue's access to the disk. Used by one thread at a time.
pub trait BlockQueue: Send {
    /// What carries the I/O (`io_uring`, `thread-pool`, `none`), for `status`.
    fn engine_name(&self) -> &'static str;

    /// Takes a request. Nothing need reach the storage before [`BlockQueue::submit`].
    /// Returns [`QueueFull`] when `depth` requests are in flight already.
    ///
    /// # Safety
    ///
    /// For reads and writes, `iov` describes memory that stays mapped, and is not otherwise
    /// accessed in conflicting ways by the host, until this request's completion has been
    /// returned by [`BlockQueue::reap`] or [`BlockQueue::drain`] (the queue copies the iovec
    /// array itself). `iov` is ignored for other requests.
    unsafe fn queue(
        &mut self,
        tag: u64,
        request: Request,
        iov: &[libc::iovec],
    ) -> Result<(), QueueFull>;

    /// Hands every queued request to the storage.
    fn submit(&mut self) -> Result<(), BlockError>;

    /// Calls `f` for each finished request, without blocking. Call after every submit.
    fn reap(&mut self, f: &mut dyn FnMut(QueueCompletion));

    /// An eventfd that becomes readable when completions are ready, for the worker's epoll;
    /// `None` when every request completes within [`BlockQueue::submit`].
    fn notify_fd(&self) -> Option<RawFd>;

    /// Resets the eventfd; call before reaping.
    fn clear_notify(&self);

    /// Requests taken and not yet returned by reap.
    fn in_flight(&self) -> usize;

    /// Waits for every request taken and calls `f` for each.
    fn drain(&mut self, f: &mut dyn FnMut(QueueCompletion));
}

/// The path of a disk, for error context.
pub(crate) fn path_of(uname: &vback_common::spec::DiskUname) -> Option<PathBuf> {
    uname.path().map(std::path::Path::to_path_buf)
}
