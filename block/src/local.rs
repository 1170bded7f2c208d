//! The local backends: raw files, host block devices and qcow2 images on the I/O engine
//! (io_uring, or its thread-pool fallback), and the null device.
//!
//! [`LocalBackend`] wraps an open [`Disk`]; its queues are:
//! - [`NullQueue`] for the null device: every request succeeds at once, no I/O, no eventfd;
//! - [`LocalQueue`] for the rest: reads, writes and flushes go to the queue's own engine, in one
//!   submit per batch. Short transfers are resubmitted, buffers O_DIRECT refuses go through the
//!   page cache, discard and write-zeroes are `fallocate` (files) or `BLKDISCARD`/`BLKZEROOUT`
//!   (devices, synchronous). qcow2: requests on allocated data clusters go to the engine like
//!   raw ones (one host extent, or up to [`MAX_PIECES`] one after the other), mapped through the
//!   image's [`DataPath`] (a lookup under a short lock, no I/O); everything else (allocation,
//!   backing, compressed and zero reads, flush, discard, write-zeroes) goes to the image's
//!   metadata worker ([`meta`]), which completes it through the queue's eventfd: a queue never
//!   waits for metadata, nor for another queue's.

mod meta;

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use vback_common::sync::lock;

use crate::backend::{
    BackendInfo, BlockBackend, BlockQueue, Capabilities, FormatInfo, QueueCompletion, QueueFull,
    Request, Topology, path_of,
};
use crate::disk::{Disk, DiskKind};
use crate::engine::{Completion, Engine, EngineChoice, Op, Submit, open_engine};
use crate::error::{BlockError, ErrorKind, Operation};
use crate::qcow2::DataPath;
use meta::{Job, JobKind, MetaPort, MetaWorker};

/// Most host pieces a qcow2 request is split into on the engine (more: the metadata worker).
pub const MAX_PIECES: usize = 16;

/// A disk on this host, served through the I/O engine.
#[derive(Debug)]
pub struct LocalBackend {
    disk: Arc<Disk>,
    engine: EngineChoice,
    /// qcow2: the data path's mapping, and the metadata worker (started with the first queue).
    qcow2: Option<(Arc<DataPath>, SharedWorker)>,
    /// qcow2: the format details `info()` last read (shown while the image is busy).
    last_info: Mutex<Option<FormatInfo>>,
}

/// The metadata worker of a qcow2 disk, once started.
type SharedWorker = Mutex<Option<Arc<MetaWorker>>>;

impl LocalBackend {
    /// Serves `disk`, with queues on `engine`.
    pub fn new(disk: Disk, engine: EngineChoice) -> LocalBackend {
        let qcow2 = disk
            .qcow2
            .as_ref()
            .map(|img| (Arc::new(lock(img).data_path()), Mutex::new(None)));
        let last_info = Mutex::new(disk.qcow2.as_ref().map(|img| {
            let g = lock(img);
            FormatInfo::Qcow2 {
                info: g.info(),
                cached_tables: g.cached_tables(),
            }
        }));
        LocalBackend {
            disk: Arc::new(disk),
            engine,
            qcow2,
            last_info,
        }
    }

    /// The qcow2 data path's mapping (qcow2 disks).
    pub fn data_path(&self) -> Option<&DataPath> {
        self.qcow2.as_ref().map(|q| &*q.0)
    }

    /// The disk.
    pub fn disk(&self) -> &Disk {
        &self.disk
    }
}

impl BlockBackend for LocalBackend {
    fn capacity(&self) -> u64 {
        self.disk.capacity()
    }

    fn topology(&self) -> Topology {
        Topology {
            logical_block: 512,
            physical_block: self.disk.physical_block,
        }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            discard: self.disk.discard,
            write_zeroes: true,
            flush: true,
            fua: true,
            resize: self.disk.kind != DiskKind::Block,
        }
    }

    fn read_only(&self) -> bool {
        self.disk.read_only
    }

    fn info(&self) -> BackendInfo {
        BackendInfo {
            kind: self.disk.kind.name(),
            uname: self.disk.uname.to_string(),
            read_only: self.disk.read_only,
            direct: self.disk.direct,
            warning: self.disk.format_warning.clone(),
            format: self.disk.qcow2.as_ref().map(|img| {
                // The metadata worker may hold the image for a while (a slow backing file):
                // status then shows what it last saw rather than waiting.
                let mut last = lock(&self.last_info);
                let now = match img.try_lock() {
                    Ok(g) => Some(g),
                    Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
                    Err(std::sync::TryLockError::WouldBlock) => None,
                };
                if let Some(g) = now {
                    *last = Some(FormatInfo::Qcow2 {
                        info: g.info(),
                        cached_tables: g.cached_tables(),
                    });
                }
                match &*last {
                    Some(f) => f.clone(),
                    None => {
                        drop(last);
                        let g = lock(img);
                        FormatInfo::Qcow2 {
                            info: g.info(),
                            cached_tables: g.cached_tables(),
                        }
                    }
                }
            }),
        }
    }

    fn default_serial(&self) -> String {
        self.disk.default_serial()
    }

    fn resize(&self, size: Option<u64>) -> Result<u64, BlockError> {
        self.disk
            .resize(size)
            .map_err(|e| BlockError::disk(Operation::Resize, e))
    }

    fn close(&self) -> Result<(), BlockError> {
        self.disk
            .close()
            .map_err(|e| BlockError::disk(Operation::Flush, e))
    }

    fn release_lock(&self) -> Result<(), BlockError> {
        self.disk
            .release_lock()
            .map_err(|e| BlockError::disk(Operation::Flush, e))
    }

    fn take_lock(&self, mode: crate::lock::LockMode) -> Result<bool, BlockError> {
        let changed = self
            .disk
            .take_lock(mode)
            .map_err(|e| BlockError::disk(Operation::Open, e))?;
        if changed && let (Some(img), Some((dp, _))) = (&self.disk.qcow2, &self.qcow2) {
            // The image was read anew: no lookup may use the old mapping. No request is in
            // flight (the device is starting), so nothing races this.
            lock(img).reset_data_path(dp);
        }
        Ok(changed)
    }

    fn lock_held(&self) -> Option<bool> {
        self.disk.files.as_ref().map(|_| self.disk.lock_held())
    }

    fn open_queue(&self, depth: u32) -> Result<Box<dyn BlockQueue>, BlockError> {
        let Some(files) = &self.disk.files else {
            return Ok(Box::new(NullQueue::new(depth)));
        };
        let open_err = |e: std::io::Error| {
            BlockError::io(Operation::Open, e).at_path(path_of(&self.disk.uname))
        };
        let engine =
            open_engine(files, depth.saturating_mul(2).max(2), self.engine).map_err(open_err)?;
        let mut q = LocalQueue::new(self.disk.clone(), engine, depth);
        if let Some((dp, worker)) = &self.qcow2 {
            let mut w = lock(worker);
            let worker = match &*w {
                Some(w) => w.clone(),
                None => {
                    let started = Arc::new(
                        MetaWorker::start(self.disk.clone(), dp.clone(), self.engine)
                            .map_err(open_err)?,
                    );
                    *w = Some(started.clone());
                    started
                }
            };
            let port = Arc::new(MetaPort::new(q.engine.notify_fd()).map_err(open_err)?);
            q.qcow2 = Some(Qcow2Route {
                dp: dp.clone(),
                worker,
                port,
                in_flight: 0,
            });
        }
        Ok(Box::new(q))
    }
}

/// The null device's queue: every request succeeds when taken.
#[derive(Debug)]
pub struct NullQueue {
    ready: Vec<QueueCompletion>,
    depth: usize,
}

impl NullQueue {
    /// A queue with room for `depth` requests.
    pub fn new(depth: u32) -> NullQueue {
        let depth = depth.max(1) as usize;
        NullQueue {
            ready: Vec::with_capacity(depth),
            depth,
        }
    }
}

impl BlockQueue for NullQueue {
    fn engine_name(&self) -> &'static str {
        "none (null device)"
    }

    unsafe fn queue(
        &mut self,
        tag: u64,
        request: Request,
        iov: &[libc::iovec],
    ) -> Result<(), QueueFull> {
        if self.ready.len() >= self.depth {
            return Err(QueueFull);
        }
        let n = match request {
            Request::Read { .. } | Request::Write { .. } => {
                iov.iter().map(|v| v.iov_len as u64).sum()
            }
            _ => 0,
        };
        self.ready.push(QueueCompletion { tag, result: Ok(n) });
        Ok(())
    }

    fn submit(&mut self) -> Result<(), BlockError> {
        Ok(())
    }

    fn reap(&mut self, f: &mut dyn FnMut(QueueCompletion)) {
        for c in self.ready.drain(..) {
            f(c);
        }
    }

    fn notify_fd(&self) -> Option<RawFd> {
        None
    }

    fn clear_notify(&self) {}

    fn in_flight(&self) -> usize {
        self.ready.len()
    }

    fn drain(&mut self, f: &mut dyn FnMut(QueueCompletion)) {
        self.reap(f);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

/// One request taken by a [`LocalQueue`].
struct Slot {
    tag: u64,
    kind: Kind,
    /// The current engine operation's iovecs.
    iov: Vec<libc::iovec>,
    /// First iovec not yet transferred (partial transfers are resubmitted).
    iov_start: usize,
    /// The request's offset on the disk (for errors).
    guest_offset: u64,
    /// Host offset of the current operation.
    offset: u64,
    remaining: u64,
    total: u64,
    buffered: bool,
    fua: bool,
    fallocate: (u64, u64, i32),
    /// qcow2: the request's host pieces (offset, length) when its clusters are not consecutive
    /// in the image; `piece` is the one in flight. Empty otherwise.
    pieces: Vec<(u64, u64)>,
    piece: usize,
    /// qcow2 pieces: the request's whole iovec list (`iov` holds the current piece's part).
    all_iov: Vec<libc::iovec>,
    /// qcow2: the metadata worker handed this request back once already (mapped).
    remapped: bool,
}

/// A qcow2 queue's routes: the data path's mapping, and the metadata worker with the queue's
/// mailbox.
struct Qcow2Route {
    dp: Arc<DataPath>,
    worker: Arc<MetaWorker>,
    port: Arc<MetaPort>,
    /// Jobs sent to the worker whose results were not taken yet.
    in_flight: usize,
}

/// A queue on a raw file, a block device or a qcow2 image: its own engine and request slots.
pub struct LocalQueue {
    disk: Arc<Disk>,
    engine: Box<dyn Engine>,
    qcow2: Option<Qcow2Route>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Finished without the engine (synchronous paths, errors), not yet reaped: slot, result.
    ready: Vec<(u32, Result<u64, BlockError>)>,
    done: Vec<Completion>,
    /// Slots the metadata worker handed back (scratch).
    remap: Vec<u32>,
}

// SAFETY: the raw pointers inside a LocalQueue (the slots' iovecs) point into memory the caller
// keeps mapped until the request's completion is reaped (the contract of `BlockQueue::queue`);
// they are only dereferenced by the kernel, the engine's pool threads while the operation is in
// flight, or this queue's synchronous paths on the thread that owns it.
unsafe impl Send for LocalQueue {}

impl std::fmt::Debug for LocalQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalQueue")
            .field("engine", &self.engine.name())
            .field("slots", &self.slots.len())
            .field("free", &self.free.len())
            .finish_non_exhaustive()
    }
}

impl LocalQueue {
    /// A queue on `disk` through `engine`, with room for `depth` requests.
    pub fn new(disk: Arc<Disk>, engine: Box<dyn Engine>, depth: u32) -> LocalQueue {
        let depth = depth.max(1);
        LocalQueue {
            disk,
            engine,
            qcow2: None,
            slots: (0..depth)
                .map(|_| Slot {
                    tag: 0,
                    kind: Kind::Flush,
                    iov: Vec::new(),
                    iov_start: 0,
                    guest_offset: 0,
                    offset: 0,
                    remaining: 0,
                    total: 0,
                    buffered: false,
                    fua: false,
                    fallocate: (0, 0, 0),
                    pieces: Vec::new(),
                    piece: 0,
                    all_iov: Vec::new(),
                    remapped: false,
                })
                .collect(),
            free: (0..depth).rev().collect(),
            ready: Vec::with_capacity(depth as usize),
            done: Vec::with_capacity(depth as usize),
            remap: Vec::new(),
        }
    }

    /// Adds the disk's path (unless the error names a file) and the request's offset.
    fn err(&self, e: BlockError, offset: u64) -> BlockError {
        if e.path.is_some() {
            e.at(offset)
        } else {
            e.at_path(path_of(&self.disk.uname)).at(offset)
        }
    }

    fn finish(&mut self, idx: u32, result: Result<u64, BlockError>) {
        self.ready.push((idx, result));
    }

    /// Hands the slot's request to the qcow2 metadata worker.
    fn send_to_worker(&mut self, idx: u32, kind: JobKind, offset: u64) {
        let Some(q) = &mut self.qcow2 else {
            return self.finish(idx, Err(BlockError::os(kind_op(kind), libc::EINVAL)));
        };
        let job = Job {
            slot: idx,
            kind,
            offset,
            iov: self.slots[idx as usize].iov.clone(),
            remap: !self.slots[idx as usize].remapped,
            port: q.port.clone(),
        };
        match q.worker.send(job) {
            Ok(()) => q.in_flight += 1,
            Err(_) => {
                let e = BlockError::new(
                    ErrorKind::Io,
                    kind_op(kind),
                    "the qcow2 metadata worker has stopped (see the log for why)",
                );
                let e = self.err(e, offset);
                self.finish(idx, Err(e));
            }
        }
    }

    /// Moves the metadata worker's results to the ready list, and sends the requests it handed
    /// back (their clusters are mapped now) to the engine; with `wait`, waits for one first if
    /// none is there.
    fn reap_worker(&mut self, wait: bool) {
        let mut remap = std::mem::take(&mut self.remap);
        if let Some(q) = &mut self.qcow2
            && q.in_flight > 0
        {
            if wait {
                q.port.wait();
            }
            q.in_flight -= q.port.take(&mut self.ready, &mut remap);
        }
        let again = !remap.is_empty();
        for idx in remap.drain(..) {
            let slot = &mut self.slots[idx as usize];
            slot.remapped = true;
            let (write, offset, fua) = (slot.kind == Kind::Write, slot.guest_offset, slot.fua);
            self.start_rw(idx, write, offset, fua);
        }
        self.remap = remap;
        if again && let Err(e) = self.engine.submit() {
            vback_common::error_limited!("submitting I/O failed: {e}");
        }
    }

    /// Starts a read or write.
    fn start_rw(&mut self, idx: u32, write: bool, offset: u64, fua: bool) {
        let slot = &mut self.slots[idx as usize];
        let len: u64 = slot.iov.iter().map(|v| v.iov_len as u64).sum();
        slot.kind = if write { Kind::Write } else { Kind::Read };
        slot.guest_offset = offset;
        slot.total = len;
        slot.fua = fua;
        slot.iov_start = 0;
        slot.buffered = !self.disk.direct;
        slot.pieces.clear();
        let mut host = offset;
        if let Some(q) = &self.qcow2 {
            // Data clusters go to the engine like raw requests (zero copy), in one piece or
            // (clusters not consecutive in the image) a few, one after the other; everything
            // else goes to the metadata worker.
            if !q.dp.map(offset, len, write, MAX_PIECES, &mut slot.pieces) {
                slot.pieces.clear();
                let kind = if write {
                    JobKind::Write { fua }
                } else {
                    JobKind::Read
                };
                return self.send_to_worker(idx, kind, offset);
            }
            if slot.pieces.len() == 1 {
                host = slot.pieces[0].0;
                slot.pieces.clear();
            } else {
                slot.all_iov.clone_from(&slot.iov);
                slot.piece = 0;
                let (h, n) = slot.pieces[0];
                select_iov(&slot.all_iov, 0, n as usize, &mut slot.iov);
                host = h;
            }
        }
        let slot = &mut self.slots[idx as usize];
        slot.offset = host;
        slot.remaining = slot.pieces.first().map_or(len, |p| p.1);
        self.queue_io(idx);
    }

    /// Discard or write-zeroes.
    fn start_discard(
        &mut self,
        idx: u32,
        zero: bool,
        offset: u64,
        len: u64,
        unmap: bool,
        fua: bool,
    ) {
        let op = if zero {
            Operation::WriteZeroes
        } else {
            Operation::Discard
        };
        let slot = &mut self.slots[idx as usize];
        slot.kind = if zero {
            Kind::WriteZeroes
        } else {
            Kind::Discard
        };
        slot.guest_offset = offset;
        slot.iov.clear();
        match self.disk.kind {
            DiskKind::Null => self.finish(idx, Ok(0)),
            DiskKind::Qcow2 => {
                let kind = if zero {
                    JobKind::WriteZeroes { len, fua }
                } else {
                    JobKind::Discard { len, fua }
                };
                self.send_to_worker(idx, kind, offset);
            }
            DiskKind::Block => {
                // Block-device ioctls are synchronous; they run on the queue's thread.
                let r = if zero {
                    self.disk.block_zeroout(offset, len)
                } else {
                    self.disk.block_discard(offset, len)
                };
                let r = match r {
                    Ok(()) => Ok(0),
                    // A device that cannot discard may ignore a discard.
                    Err(e) if !zero && e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(0),
                    Err(e) => Err(self.err(BlockError::io(op, e), offset)),
                };
                self.finish(idx, r);
            }
            DiskKind::File => {
                let mode = libc::FALLOC_FL_KEEP_SIZE
                    | if unmap {
                        libc::FALLOC_FL_PUNCH_HOLE
                    } else {
                        libc::FALLOC_FL_ZERO_RANGE
                    };
                self.slots[idx as usize].fallocate = (offset, len, mode);
                self.queue_io(idx);
            }
        }
    }

    /// Queues the slot's (remaining) operation on the engine.
    fn queue_io(&mut self, idx: u32) {
        let slot = &self.slots[idx as usize];
        let op = match slot.kind {
            Kind::Read => Op::Read {
                offset: slot.offset,
            },
            Kind::Write => Op::Write {
                offset: slot.offset,
                dsync: slot.fua,
            },
            Kind::Flush => Op::Flush,
            Kind::Discard | Kind::WriteZeroes => {
                let (offset, len, mode) = slot.fallocate;
                Op::Fallocate { offset, len, mode }
            }
        };
        let iov = &slot.iov[slot.iov_start.min(slot.iov.len())..];
        let how = Submit {
            buffered: slot.buffered,
        };
        let iovcnt = u32::try_from(iov.len()).unwrap_or(u32::MAX);
        // SAFETY: the iovecs live in the slot, which is not touched again until this operation
        // completes; they point into memory the caller keeps mapped until the request's
        // completion is reaped (BlockQueue::queue's contract).
        let mut r = unsafe {
            self.engine
                .queue(u64::from(idx), op, iov.as_ptr(), iovcnt, how)
        };
        if r.is_err() {
            // The ring is full: push what is queued and try once more.
            let _ = self.engine.submit();
            // SAFETY: as above.
            r = unsafe {
                self.engine
                    .queue(u64::from(idx), op, iov.as_ptr(), iovcnt, how)
            };
        }
        if r.is_err() {
            let e = BlockError::new(ErrorKind::Busy, op_of(slot.kind), QueueFull);
            self.finish(idx, Err(e));
        }
    }

    /// Handles one engine completion: resubmits, or records the request's result.
    fn complete_io(&mut self, c: Completion) {
        let Ok(idx) = u32::try_from(c.tag) else {
            return;
        };
        let direct = self.disk.direct;
        let Some(slot) = self.slots.get_mut(idx as usize) else {
            return;
        };
        let res = c.result;
        let kind = slot.kind;
        let result = match kind {
            Kind::Read | Kind::Write => {
                if res == -libc::EINVAL && !slot.buffered && direct {
                    // The buffers do not meet O_DIRECT's alignment: go through the page cache.
                    slot.buffered = true;
                    return self.queue_io(idx);
                }
                if res < 0 {
                    Err(BlockError::os(op_of(kind), -res))
                } else if res == 0 && slot.remaining > 0 {
                    Err(BlockError::new(
                        ErrorKind::OutOfBounds,
                        op_of(kind),
                        "end of file",
                    ))
                } else if (res as u64) < slot.remaining {
                    // Short transfer: skip what was done and resubmit the rest.
                    let mut n = res as usize;
                    slot.offset += n as u64;
                    slot.remaining -= n as u64;
                    while n > 0 && slot.iov_start < slot.iov.len() {
                        let v = &mut slot.iov[slot.iov_start];
                        if n >= v.iov_len {
                            n -= v.iov_len;
                            slot.iov_start += 1;
                        } else {
                            // SAFETY: advancing within the same buffer by less than its length
                            // keeps the pointer inside the mapped region.
                            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                            v.iov_len -= n;
                            n = 0;
                        }
                    }
                    return self.queue_io(idx);
                } else if slot.piece + 1 < slot.pieces.len() {
                    // The next piece of a qcow2 request whose clusters are not consecutive.
                    slot.piece += 1;
                    let skip: u64 = slot.pieces[..slot.piece].iter().map(|p| p.1).sum();
                    let (host, n) = slot.pieces[slot.piece];
                    select_iov(&slot.all_iov, skip as usize, n as usize, &mut slot.iov);
                    slot.iov_start = 0;
                    slot.offset = host;
                    slot.remaining = n;
                    return self.queue_io(idx);
                } else {
                    Ok(slot.total)
                }
            }
            Kind::Flush => {
                if res < 0 {
                    Err(BlockError::os(Operation::Flush, -res))
                } else {
                    Ok(0)
                }
            }
            Kind::Discard | Kind::WriteZeroes => {
                let zero = kind == Kind::WriteZeroes;
                let (o, l, mode) = slot.fallocate;
                if res == -libc::EOPNOTSUPP && zero && mode & libc::FALLOC_FL_ZERO_RANGE != 0 {
                    // No ZERO_RANGE on this file system: punching a hole also reads back zeroes.
                    slot.fallocate = (o, l, libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE);
                    return self.queue_io(idx);
                }
                // A discard the file system cannot do is simply not done (discard is a hint).
                if res < 0 && (zero || res != -libc::EOPNOTSUPP) {
                    Err(BlockError::os(op_of(kind), -res))
                } else {
                    Ok(0)
                }
            }
        };
        let offset = slot.guest_offset;
        let result = result.map_err(|e| self.err(e, offset));
        self.finish(idx, result);
    }

    fn deliver(&mut self, f: &mut dyn FnMut(QueueCompletion)) {
        for (idx, result) in self.ready.drain(..) {
            let slot = &mut self.slots[idx as usize];
            slot.iov.clear();
            slot.pieces.clear();
            self.free.push(idx);
            f(QueueCompletion {
                tag: slot.tag,
                result,
            });
        }
    }

    fn reap_engine(&mut self, wait: bool) {
        let mut done = std::mem::take(&mut self.done);
        if wait {
            self.engine.drain(&mut |c| done.push(c));
        } else {
            self.engine.reap(&mut |c| done.push(c));
        }
        let resubmit = !done.is_empty();
        for c in done.drain(..) {
            self.complete_io(c);
        }
        self.done = done;
        if resubmit && let Err(e) = self.engine.submit() {
            vback_common::error_limited!("submitting I/O failed: {e}");
        }
    }
}

fn kind_op(kind: JobKind) -> Operation {
    match kind {
        JobKind::Read => Operation::Read,
        JobKind::Write { .. } => Operation::Write,
        JobKind::Flush => Operation::Flush,
        JobKind::Discard { .. } => Operation::Discard,
        JobKind::WriteZeroes { .. } => Operation::WriteZeroes,
    }
}

fn op_of(kind: Kind) -> Operation {
    match kind {
        Kind::Read => Operation::Read,
        Kind::Write => Operation::Write,
        Kind::Flush => Operation::Flush,
        Kind::Discard => Operation::Discard,
        Kind::WriteZeroes => Operation::WriteZeroes,
    }
}

impl BlockQueue for LocalQueue {
    fn engine_name(&self) -> &'static str {
        self.engine.name()
    }

    unsafe fn queue(
        &mut self,
        tag: u64,
        request: Request,
        iov: &[libc::iovec],
    ) -> Result<(), QueueFull> {
        let Some(idx) = self.free.pop() else {
            return Err(QueueFull);
        };
        let slot = &mut self.slots[idx as usize];
        slot.tag = tag;
        slot.remapped = false;
        slot.iov.clear();
        match request {
            Request::Read { offset } => {
                slot.iov.extend_from_slice(iov);
                self.start_rw(idx, false, offset, false);
            }
            Request::Write { offset, fua } => {
                slot.iov.extend_from_slice(iov);
                self.start_rw(idx, true, offset, fua);
            }
            Request::Flush => {
                slot.kind = Kind::Flush;
                slot.guest_offset = 0;
                if self.qcow2.is_some() {
                    self.send_to_worker(idx, JobKind::Flush, 0);
                } else {
                    self.queue_io(idx);
                }
            }
            Request::Discard { offset, len, fua } => {
                self.start_discard(idx, false, offset, len, true, fua);
            }
            Request::WriteZeroes {
                offset,
                len,
                unmap,
                fua,
            } => self.start_discard(idx, true, offset, len, unmap, fua),
        }
        Ok(())
    }

    fn submit(&mut self) -> Result<(), BlockError> {
        self.engine
            .submit()
            .map_err(|e| BlockError::io(Operation::Submit, e).at_path(path_of(&self.disk.uname)))
    }

    fn reap(&mut self, f: &mut dyn FnMut(QueueCompletion)) {
        self.reap_engine(false);
        self.reap_worker(false);
        self.deliver(f);
    }

    fn notify_fd(&self) -> Option<RawFd> {
        Some(self.engine.notify_fd())
    }

    fn clear_notify(&self) {
        self.engine.clear_notify();
    }

    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn drain(&mut self, f: &mut dyn FnMut(QueueCompletion)) {
        // Completing may resubmit (short transfers, O_DIRECT fallback, pieces): loop until idle.
        loop {
            self.deliver(f);
            if self.engine.in_flight() > 0 {
                self.reap_engine(true);
            } else if self.qcow2.as_ref().is_some_and(|q| q.in_flight > 0) {
                self.reap_worker(true);
            } else {
                break;
            }
        }
        self.deliver(f);
    }
}

impl Drop for LocalQueue {
    fn drop(&mut self) {
        // The metadata worker and the engine may still use requests' buffers: wait for
        // both (a job the worker hands back goes to the engine, so drain waits for it too).
        if self.in_flight() > 0 {
            self.drain(&mut |_| {});
        }
    }
}

/// Calls `f(address, length, offset)` for each piece of the iovec list `all` that covers `len`
/// bytes from `skip` (`offset`: where the piece starts within those `len` bytes).
fn for_each_piece(
    all: &[libc::iovec],
    mut skip: usize,
    mut len: usize,
    mut f: impl FnMut(*mut u8, usize, usize),
) {
    let mut done = 0;
    for v in all {
        if len == 0 {
            break;
        }
        if skip >= v.iov_len {
            skip -= v.iov_len;
            continue;
        }
        let n = (v.iov_len - skip).min(len);
        f(v.iov_base.cast::<u8>().wrapping_add(skip), n, done);
        done += n;
        len -= n;
        skip = 0;
    }
}

/// Fills `out` with the part of the iovec list `all` that covers `len` bytes from `skip`.
fn select_iov(all: &[libc::iovec], skip: usize, len: usize, out: &mut Vec<libc::iovec>) {
    out.clear();
    for_each_piece(all, skip, len, |p, n, _| {
        out.push(libc::iovec {
            iov_base: p.cast(),
            iov_len: n,
        });
    });
}

/// Copies `dst.len()` bytes from the iovecs' data, starting `skip` bytes in.
fn gather(iov: &[libc::iovec], skip: usize, dst: &mut [u8]) {
    for_each_piece(iov, skip, dst.len(), |src, n, at| {
        // SAFETY: the iovecs describe memory the caller keeps mapped until the request
        // completes (BlockQueue::queue's contract), and `src..src + n` lies inside one of them;
        // `dst` is a separate host buffer of at least `at + n` bytes. A guest writing the same
        // memory meanwhile only changes which bytes are copied (plain bytes, no invariants).
        unsafe { std::ptr::copy_nonoverlapping(src.cast_const(), dst[at..].as_mut_ptr(), n) };
    });
}

/// Copies `src` into the iovecs' data, starting `skip` bytes in.
fn scatter(iov: &[libc::iovec], skip: usize, src: &[u8]) {
    for_each_piece(iov, skip, src.len(), |dst, n, at| {
        // SAFETY: as in `gather`: mapped memory the request may write, written at
        // `dst..dst + n`, from a separate host buffer of at least `at + n` bytes.
        unsafe { std::ptr::copy_nonoverlapping(src[at..].as_ptr(), dst, n) };
    });
}

#[cfg(test)]
mod stall_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::DiskOptions;
    use crate::lock::LockMode;
    use std::os::unix::fs::FileExt;
    use vback_common::spec::DiskUname;

    pub(super) fn open(uname: &str, read_only: bool, engine: EngineChoice) -> LocalBackend {
        let disk = Disk::open(
            &DiskUname::parse(uname).unwrap(),
            DiskOptions {
                read_only,
                lock: LockMode::None,
                ..DiskOptions::default()
            },
        )
        .unwrap();
        LocalBackend::new(disk, engine)
    }

    pub(super) fn iov(buf: &[u8]) -> libc::iovec {
        libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        }
    }

    /// Queues one request, submits it and waits for its completion.
    pub(super) fn run(
        q: &mut dyn BlockQueue,
        req: Request,
        bufs: &[&[u8]],
    ) -> Result<u64, BlockError> {
        let v: Vec<libc::iovec> = bufs.iter().map(|b| iov(b)).collect();
        // SAFETY: the buffers outlive the completion awaited below; the test writes into
        // buffers it only reads after the completion.
        unsafe { q.queue(7, req, &v) }.unwrap();
        q.submit().unwrap();
        for _ in 0..30000 {
            let mut got = None;
            q.reap(&mut |c| got = Some(c));
            if let Some(c) = got {
                assert_eq!(c.tag, 7);
                assert_eq!(q.in_flight(), 0);
                return c.result;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("no completion");
    }

    #[test]
    fn a_file_opened_by_the_caller_is_served_read_only_with_its_lock() {
        use crate::lock::ImageLock;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disc.iso");
        let data: Vec<u8> = (0..(64 << 10) + 100).map(|i| (i / 512) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let file = std::fs::File::open(&p).unwrap();
        let patience = std::time::Duration::from_millis(10);
        let lock = ImageLock::acquire(&file, &p, LockMode::Exclusive, patience).unwrap();
        let b =
            crate::open_backend_from_file(&p, file, Some(lock), true, EngineChoice::Auto).unwrap();
        assert_eq!(b.capacity(), 64 << 10, "rounded down to whole sectors");
        assert!(b.read_only());
        let info = b.info();
        assert_eq!((info.kind, info.direct), ("file", false));
        assert!(info.uname.contains(&p.display().to_string()), "{info:?}");
        let mut q = b.open_queue(1).unwrap();
        let got = vec![0u8; 2048];
        assert_eq!(
            run(&mut *q, Request::Read { offset: 4096 }, &[&got]).unwrap(),
            2048
        );
        assert_eq!(got[..], data[4096..6144]);
        // The partial last sector is still in the file; past its end is out of bounds.
        let tail = vec![0u8; 100];
        run(&mut *q, Request::Read { offset: 64 << 10 }, &[&tail]).unwrap();
        assert_eq!(tail[..], data[64 << 10..]);
        let e = run(&mut *q, Request::Read { offset: 128 << 10 }, &[&got]).unwrap_err();
        assert_eq!(e.kind, ErrorKind::OutOfBounds, "{e}");
        assert!(e.to_string().contains(&p.display().to_string()), "{e}");
        // The backend holds the caller's lock until it is dropped.
        let other = std::fs::File::open(&p).unwrap();
        assert!(ImageLock::acquire(&other, &p, LockMode::Shared, patience).is_err());
        drop(q);
        drop(b);
        crate::lock::until_released(|| {
            ImageLock::acquire(&other, &p, LockMode::Exclusive, patience)
        });
        // Neither a file nor a device.
        let e = crate::open_backend_from_file(
            dir.path(),
            std::fs::File::open(dir.path()).unwrap(),
            None,
            true,
            EngineChoice::Auto,
        )
        .unwrap_err();
        assert!(e.to_string().contains("neither a regular file"), "{e}");
    }

    fn raw_requests(engine: EngineChoice) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.raw");
        std::fs::write(&p, vec![1u8; 1 << 20]).unwrap();
        let b = open(&format!("file:{}", p.display()), false, engine);
        assert_eq!(b.capacity(), 1 << 20);
        assert!(b.capabilities().discard && b.capabilities().resize);
        let mut q = b.open_queue(8).unwrap();
        assert!(q.notify_fd().is_some());

        // A write from two buffers, one at an odd address (O_DIRECT refuses it: page cache).
        let a = vec![0xabu8; 4096];
        let mut odd = vec![0u8; 513];
        odd[1..].fill(0xcd);
        assert_eq!(
            run(
                &mut *q,
                Request::Write {
                    offset: 8192,
                    fua: true
                },
                &[&a, &odd[1..]]
            )
            .unwrap(),
            4608
        );
        let mut back = vec![0u8; 4608];
        std::fs::File::open(&p)
            .unwrap()
            .read_exact_at(&mut back, 8192)
            .unwrap();
        assert!(back[..4096].iter().all(|&x| x == 0xab));
        assert!(back[4096..].iter().all(|&x| x == 0xcd));
        let r = vec![0u8; 8192];
        assert_eq!(
            run(&mut *q, Request::Read { offset: 4096 }, &[&r]).unwrap(),
            8192
        );
        assert!(r[..4096].iter().all(|&x| x == 1));
        assert!(r[4096..].iter().all(|&x| x == 0xab));
        assert_eq!(run(&mut *q, Request::Flush, &[]).unwrap(), 0);

        // Discard and write-zeroes (with and without unmap) read back as zeroes.
        let d = Request::Discard {
            offset: 0,
            len: 4096,
            fua: false,
        };
        assert_eq!(run(&mut *q, d, &[]).unwrap(), 0);
        for (offset, unmap) in [(65536, false), (131072, true)] {
            let z = Request::WriteZeroes {
                offset,
                len: 4096,
                unmap,
                fua: false,
            };
            assert_eq!(run(&mut *q, z, &[]).unwrap(), 0);
        }
        let all = std::fs::read(&p).unwrap();
        assert_eq!(all.len(), 1 << 20);
        for (i, &x) in all.iter().enumerate() {
            let zero = matches!(i, 0..4096 | 65536..69632 | 131072..135168);
            let data = matches!(i, 8192..12800);
            assert!(zero && x == 0 || data || !zero && x == 1, "byte {i}: {x}");
        }

        // Past the end of the file: an out-of-bounds error with the path and offset.
        let e = run(&mut *q, Request::Read { offset: 2 << 20 }, &[&r]).unwrap_err();
        assert_eq!(e.kind, ErrorKind::OutOfBounds);
        let s = e.to_string();
        assert!(
            s.contains(&p.display().to_string()) && s.contains("offset 2097152"),
            "{s}"
        );
    }

    #[test]
    fn raw_files_on_io_uring() {
        raw_requests(EngineChoice::IoUring);
    }

    #[test]
    fn raw_files_on_the_thread_pool() {
        raw_requests(EngineChoice::ThreadPool);
    }

    #[test]
    fn a_batch_completes_on_the_eventfd_and_drains() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.raw");
        std::fs::write(&p, vec![3u8; 1 << 20]).unwrap();
        let b = open(
            &format!("file:{}", p.display()),
            true,
            EngineChoice::IoUring,
        );
        let mut q = b.open_queue(4).unwrap();
        let bufs: Vec<Vec<u8>> = (0..4).map(|_| vec![0u8; 4096]).collect();
        for (i, buf) in bufs.iter().enumerate() {
            // SAFETY: the buffers outlive the drain below.
            unsafe {
                q.queue(
                    i as u64,
                    Request::Read {
                        offset: i as u64 * 4096,
                    },
                    &[iov(buf)],
                )
            }
            .unwrap();
        }
        let extra = vec![0u8; 512];
        // SAFETY: never queued (the queue is full).
        assert!(unsafe { q.queue(9, Request::Read { offset: 0 }, &[iov(&extra)]) }.is_err());
        q.submit().unwrap();
        assert_eq!(q.in_flight(), 4);
        // The eventfd becomes readable.
        let mut pfd = libc::pollfd {
            fd: q.notify_fd().unwrap(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the call.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 5000) }, 1);
        let mut tags = Vec::new();
        q.drain(&mut |c| {
            assert_eq!(c.result.unwrap(), 4096);
            tags.push(c.tag);
        });
        tags.sort_unstable();
        assert_eq!(tags, [0, 1, 2, 3]);
        assert_eq!(q.in_flight(), 0);
        assert!(bufs.iter().flatten().all(|&x| x == 3));
    }

    #[test]
    fn the_null_device_completes_within_submit() {
        let b = open("null:1M", false, EngineChoice::Auto);
        let mut q = b.open_queue(2).unwrap();
        assert!(q.notify_fd().is_none());
        assert_eq!(q.engine_name(), "none (null device)");
        let buf = vec![0u8; 4096];
        assert_eq!(
            run(&mut *q, Request::Read { offset: 0 }, &[&buf]).unwrap(),
            4096
        );
        assert_eq!(run(&mut *q, Request::Flush, &[]).unwrap(), 0);
        assert!(b.info().format.is_none());
        assert_eq!(b.info().kind, "null");
    }

    /// `qemu-img ARGS PATH` (the qcow2 tests' runner, which fails loudly).
    fn qemu_img(args: &[&str], path: &std::path::Path) {
        let mut all = args.to_vec();
        all.push(path.to_str().expect("a UTF-8 test path"));
        crate::qcow2::tests::qemu_img(&all);
    }

    #[test]
    fn qcow2_requests_take_the_fast_path_and_the_metadata_worker() {
        qcow2_requests(EngineChoice::IoUring);
    }

    #[test]
    fn qcow2_requests_on_the_thread_pool_engine() {
        // The worker's completions wake the queue through the pool's eventfd too.
        qcow2_requests(EngineChoice::ThreadPool);
    }

    fn qcow2_requests(engine: EngineChoice) {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0x11u8; 1 << 20]).unwrap();
        let top = dir.path().join("top.qcow2");
        let backing = base.display().to_string();
        qemu_img(
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=4096",
                "-F",
                "raw",
                "-b",
                &backing,
            ],
            &top,
        );
        let b = open(&format!("tap:qcow2:{}", top.display()), false, engine);
        assert_eq!(b.capacity(), 1 << 20);
        assert!(matches!(b.info().format, Some(FormatInfo::Qcow2 { .. })));
        let mut q = b.open_queue(8).unwrap();
        // An allocating write of 2 KiB into the middle of a cluster (copy-on-write from base),
        // from two buffers.
        let (x, y) = (vec![0xabu8; 1024], vec![0xcdu8; 1024]);
        let w = Request::Write {
            offset: 9 * 512,
            fua: false,
        };
        assert_eq!(run(&mut *q, w, &[&x, &y]).unwrap(), 2048);
        {
            let mut img = lock(b.disk().qcow2.as_ref().unwrap());
            assert!(
                img.map_direct(4096, 4096, false).unwrap().is_some(),
                "cluster 1 is now data in the image: reads go to the engine"
            );
            assert!(img.map_direct(0, 512, false).unwrap().is_none());
        }
        // The worker published the new cluster: the queues map it without the image's lock.
        let dp = b.data_path().unwrap();
        let mut pieces = Vec::new();
        assert!(dp.map(4096, 4096, true, MAX_PIECES, &mut pieces));
        assert_eq!(pieces.len(), 1);
        assert!(
            !dp.map(0, 512, false, MAX_PIECES, &mut pieces),
            "backing data"
        );
        let expect = |abs: usize, first: u8| match abs {
            0..4096 => first,
            4096..4608 => 0x11,
            4608..5632 => 0xab,
            5632..6656 => 0xcd,
            _ => 0x11,
        };
        // Cluster 1 alone (one engine read), then clusters 0 and 1 (synchronous).
        for (offset, len) in [(4096u64, 4096usize), (0, 8192)] {
            let got = vec![0u8; len];
            assert_eq!(
                run(&mut *q, Request::Read { offset }, &[&got]).unwrap(),
                len as u64
            );
            for (i, v) in got.iter().enumerate() {
                let abs = offset as usize + i;
                assert_eq!(*v, expect(abs, 0x11), "byte {abs}");
            }
        }
        // An in-place overwrite through the engine, write-zeroes over cluster 0 (hiding the
        // backing data), a flush.
        let z = vec![0x77u8; 512];
        let w = Request::Write {
            offset: 4096,
            fua: true,
        };
        run(&mut *q, w, &[&z]).unwrap();
        let wz = Request::WriteZeroes {
            offset: 0,
            len: 4096,
            unmap: false,
            fua: false,
        };
        run(&mut *q, wz, &[]).unwrap();
        run(&mut *q, Request::Flush, &[]).unwrap();
        let got = vec![0u8; 8192];
        run(&mut *q, Request::Read { offset: 0 }, &[&got]).unwrap();
        for (abs, v) in got.iter().enumerate() {
            let want = if (4096..4608).contains(&abs) {
                0x77
            } else {
                expect(abs, 0)
            };
            assert_eq!(*v, want, "byte {abs}");
        }
        drop(q);
        drop(b);
        qemu_img(&["check"], &top);
        assert!(
            std::fs::read(&base).unwrap().iter().all(|&v| v == 0x11),
            "the backing file is unchanged"
        );
    }

    #[test]
    fn clusters_the_data_path_has_not_seen_yet_go_back_to_the_engine() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("m.qcow2");
        let ps = img.to_str().unwrap();
        crate::qcow2::tests::qemu_img(&["create", "-q", "-f", "qcow2", ps, "4M"]);
        let out = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 0x33 0 1M", ps])
            .output()
            .unwrap();
        assert!(out.status.success());
        let b = open(&format!("qcow2:{ps}"), false, EngineChoice::IoUring);
        let dp = b.data_path().unwrap();
        assert_eq!(dp.tables(), 0, "nothing published at open");
        let mut q = b.open_queue(4).unwrap();
        // The first read misses the data path; the worker loads the L2 table, publishes it and
        // hands the request back for the engine.
        let got = vec![0u8; 65536];
        let r = run(&mut *q, Request::Read { offset: 65536 }, &[&got]);
        assert_eq!(r.unwrap(), 65536);
        assert!(got.iter().all(|&v| v == 0x33));
        assert_eq!(dp.tables(), 1);
        let mut pieces = Vec::new();
        assert!(dp.map(0, 1 << 20, true, MAX_PIECES, &mut pieces));
        // An in-place write and a read back through the engine.
        let w = Request::Write {
            offset: 4096,
            fua: true,
        };
        assert_eq!(run(&mut *q, w, &[&[0x44u8; 512]]).unwrap(), 512);
        let r = run(&mut *q, Request::Read { offset: 0 }, &[&got]);
        assert_eq!(r.unwrap(), 65536);
        assert!(got[4096..4608].iter().all(|&v| v == 0x44));
        assert!(got[..4096].iter().all(|&v| v == 0x33));
    }

    #[test]
    fn qcow2_clusters_out_of_order_go_to_the_engine_in_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("p.qcow2");
        let out = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096"])
            .arg(&img)
            .arg("1M")
            .output()
            .unwrap();
        assert!(out.status.success());
        let b = open(
            &format!("qcow2:{}", img.display()),
            false,
            EngineChoice::IoUring,
        );
        let mut q = b.open_queue(8).unwrap();
        // Cluster 2, then cluster 1: the image holds them in the opposite order.
        for (offset, byte) in [(8192u64, 0x22u8), (4096, 0x11)] {
            let d = vec![byte; 4096];
            let w = Request::Write { offset, fua: false };
            run(&mut *q, w, &[&d]).unwrap();
        }
        {
            let mut g = lock(b.disk().qcow2.as_ref().unwrap());
            assert_eq!(g.map_direct(4096, 8192, false).unwrap(), None);
            let mut pieces = Vec::new();
            assert!(g.map_extents(4096, 8192, true, 16, &mut pieces).unwrap());
            assert_eq!(pieces.len(), 2, "{pieces:?}");
            assert!(pieces[0].0 > pieces[1].0, "{pieces:?}");
            assert!(!g.map_extents(4096, 8192, true, 1, &mut pieces).unwrap());
        }
        // An in-place write over both clusters from three buffers (pieces split inside a
        // buffer), then a read of both into two buffers.
        let (a, m, c) = (vec![0x33u8; 1024], vec![0x44u8; 6144], vec![0x55u8; 1024]);
        let w = Request::Write {
            offset: 4096,
            fua: false,
        };
        assert_eq!(run(&mut *q, w, &[&a, &m, &c]).unwrap(), 8192);
        let (r1, r2) = (vec![0u8; 2048], vec![0u8; 6144]);
        assert_eq!(
            run(&mut *q, Request::Read { offset: 4096 }, &[&r1, &r2]).unwrap(),
            8192
        );
        let got: Vec<u8> = r1.iter().chain(&r2).copied().collect();
        assert!(got[..1024].iter().all(|&v| v == 0x33));
        assert!(got[1024..7168].iter().all(|&v| v == 0x44));
        assert!(got[7168..].iter().all(|&v| v == 0x55));
        drop(q);
        drop(b);
        qemu_img(&["check"], &img);
        let raw = dir.path().join("p.raw");
        let out = std::process::Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&img)
            .arg(&raw)
            .output()
            .unwrap();
        assert!(out.status.success());
        let all = std::fs::read(&raw).unwrap();
        assert!(
            all[4096..12288] == got[..],
            "qemu-img reads what was written"
        );
    }

    /// First writes of whole clusters, 16 in flight at a time on two queues (the metadata
    /// worker splits them: clusters allocated, data written on its engine, mapped when
    /// written), mixed with rewrites of clusters whose first write is still in flight and
    /// with partial-cluster writes: every byte reads back as the last write put it, the image
    /// is clean, and `qemu-img` reads the same.
    #[test]
    fn first_writes_of_whole_clusters_in_flight_together() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fresh.qcow2");
        let ps = p.to_str().unwrap().to_owned();
        crate::qcow2::tests::qemu_img(&["create", "-q", "-f", "qcow2", &ps, "16M"]);
        const CS: usize = 64 << 10;
        let b = open(&format!("qcow2:{ps}"), false, EngineChoice::IoUring);
        let mut queues = [b.open_queue(32).unwrap(), b.open_queue(32).unwrap()];
        let mut model = vec![0u8; 16 << 20];
        // (offset, length, fill): whole clusters (1, 2 or 3), some again while in flight, and
        // a few partial ones.
        let mut x = 0x1234_5678_9abc_def1u64;
        let mut rand = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        // Batches of 16 in flight together. Writes in flight together may land in any order
        // when they overlap (as on any disk), except where the worker orders them: so within
        // a batch they do not overlap, but for a rewrite of the cluster the write before it
        // is allocating (fresh before the batch): the worker must finish that one first.
        let mut writes: Vec<(usize, usize, u8)> = Vec::new();
        let mut written = std::collections::HashSet::new();
        for b in 0..10u64 {
            let mut used = std::collections::HashSet::new();
            for i in 0..16u64 {
                let fill = ((b * 16 + i) % 251) as u8 + 1;
                let prev = writes.last().copied().filter(|_| i > 0);
                let fresh_prev = prev.is_some_and(|(o, l, _)| {
                    (o / CS..(o + l).div_ceil(CS)).all(|c| !written.contains(&c))
                });
                let (off, len) = if i % 8 == 3 && fresh_prev {
                    let (o, _, _) = prev.unwrap_or_default();
                    (o, CS)
                } else {
                    loop {
                        let c = (rand() % 250) as usize;
                        let (off, len) = if i % 8 == 7 {
                            (c * CS + 4096, 8192)
                        } else {
                            (c * CS, CS * (1 + (rand() % 3) as usize))
                        };
                        if (off / CS..(off + len).div_ceil(CS)).all(|c| !used.contains(&c)) {
                            break (off, len);
                        }
                    }
                };
                used.extend(off / CS..(off + len).div_ceil(CS));
                writes.push((off, len, fill));
            }
            written.extend(used);
        }
        let bufs: Vec<Vec<u8>> = writes
            .iter()
            .map(|&(_, len, fill)| vec![fill; len])
            .collect();
        for batch in writes.chunks(16).zip(bufs.chunks(16)) {
            let (ws, bs) = batch;
            let iovs: Vec<libc::iovec> = bs.iter().map(|b| iov(b)).collect();
            for (k, &(off, _, _)) in ws.iter().enumerate() {
                let q = &mut queues[k % 2];
                let req = Request::Write {
                    offset: off as u64,
                    fua: false,
                };
                // SAFETY: the buffers live until the completions below are reaped.
                unsafe { q.queue(k as u64, req, std::slice::from_ref(&iovs[k])) }.unwrap();
            }
            for q in queues.iter_mut() {
                q.submit().unwrap();
            }
            let mut left = ws.len();
            for _ in 0..30000 {
                for q in queues.iter_mut() {
                    q.reap(&mut |c| {
                        assert_eq!(c.result.as_ref().ok(), Some(&(ws[c.tag as usize].1 as u64)));
                        left -= 1;
                    });
                }
                if left == 0 {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            assert_eq!(left, 0, "every write completed");
            // The one overlap left in a batch is ordered by the worker: the later wins.
            for &(off, len, fill) in ws {
                model[off..off + len].fill(fill);
            }
        }
        let mut got = vec![0u8; 1 << 20];
        for off in (0..model.len()).step_by(got.len()) {
            run(
                &mut *queues[0],
                Request::Read { offset: off as u64 },
                &[&got],
            )
            .unwrap();
            assert!(got == model[off..off + got.len()], "bytes at {off}");
            got.fill(0);
        }
        drop(queues);
        drop(b);
        crate::qcow2::tests::qemu_img(&["check", "-q", &ps]);
        let raw = dir.path().join("now.raw");
        let rs = raw.to_str().unwrap();
        crate::qcow2::tests::qemu_img(&["convert", "-f", "qcow2", "-O", "raw", &ps, rs]);
        assert!(
            std::fs::read(&raw).unwrap() == model,
            "qemu-img reads the same"
        );
    }
}
