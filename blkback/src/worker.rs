//! A queue worker: knows virtio-blk and nothing about storage. It parses each chain, hands
//! the request to its queue object ([`BlockQueue`], one per virtqueue, opened from the disk's
//! [`vback_block::BlockBackend`]), writes the status byte when the request completes, publishes
//! the used ring, counts, and polls. One worker per queue, each on its own thread.
//!
//! On a kick the worker pops every available chain, parses it into a preallocated slot (the
//! slot's iovecs point straight into guest memory: no copies, no allocation), queues the
//! request and submits it to the storage at once (not batched per pass: see `pop_all`).
//! Completions arrive on the queue object's eventfd; the worker writes each status byte,
//! returns the chains on the used ring and interrupts the guest once per batch (or not at all,
//! when EVENT_IDX says the guest is still busy). A slot keeps a reference to the guest memory
//! map it points into, so a memory-table change while I/O is in flight cannot unmap buffers
//! under the kernel.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use vback_block::{
    BlockBackend, BlockError, BlockQueue, ErrorKind, QueueCompletion, Request as Io, SECTOR,
};
use vback_common::sync::lock;
use vback_common::vhost_user::driver::{self, Chain};
use vback_common::vhost_user::{VringRwLock, VringT};
use virtio_bindings::virtio_blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

use crate::stats::QueueStats;
use crate::virtio::{self, Limits, Parsed, Request, Status};

/// Polling only pays at low queue depth: above this many requests in flight the worker sleeps on
/// the completion eventfd, where completions arrive in batches.
const POLL_MAX_IN_FLIGHT: usize = 2;

/// With deeper queues, how long to wait for the driver's next requests to batch them.
const DEEP_POLL: std::time::Duration = std::time::Duration::from_micros(4);

/// Guest memory as the vhost-user framework hands it to us.
pub type Mem = GuestMemoryMmap<()>;
/// The vring type the workers drive.
pub type Vring = VringRwLock<GuestMemoryAtomic<Mem>>;

/// The last storage error, for `status`.
#[derive(Debug, Clone)]
pub struct LastError {
    /// Its stable kind.
    pub kind: ErrorKind,
    /// The message (operation, path, offset, cause).
    pub message: String,
    /// The queue that saw it.
    pub queue: usize,
    /// When (seconds since the epoch).
    pub time: u64,
}

/// Device-wide state every worker reads.
#[derive(Debug)]
pub struct Device {
    /// The backing storage.
    pub disk: Arc<dyn BlockBackend>,
    /// Write-back cache on (the guest may turn it off through the config space's WCE byte;
    /// writes are then durable on completion).
    pub writeback: AtomicBool,
    /// The 20-byte ID GET_ID returns (NUL padded).
    pub serial: [u8; 20],
    /// Per-queue counters.
    pub stats: Vec<QueueStats>,
    /// Parser limits.
    pub limits: Limits,
    /// Largest discard / write-zeroes, in sectors.
    pub max_discard_sectors: u32,
    /// The last storage error any queue saw.
    pub last_error: Mutex<Option<LastError>>,
}

/// A request's type; `kind as usize` indexes [`QueueStats::latency`] (the order of
/// [`crate::stats::OPS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

/// One request in flight.
struct Slot {
    head: u16,
    status: GuestAddress,
    kind: Kind,
    /// Data bytes (reads and writes).
    len: u64,
    iov: Vec<libc::iovec>,
    mem: Option<Arc<Mem>>,
    /// When its chain was popped (the pass's clock reading).
    popped: Instant,
}

/// A queue's worker.
pub struct Worker {
    queue: usize,
    dev: Arc<Device>,
    io: Option<Box<dyn BlockQueue>>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    done: Vec<QueueCompletion>,
    mem: Option<Arc<Mem>>,
    /// Chains were left on the avail ring because every slot was busy.
    starved: bool,
    /// The vring of the current connection (for completing in-flight requests when the front
    /// end stops the ring).
    vring: Option<Vring>,
    needs_signal: bool,
    poll: std::time::Duration,
    /// The clock read once per pop pass (for the chains it pops) and once per reap pass (for
    /// the completions it publishes): latency costs two clock reads per batch, not per request.
    now: Instant,
    /// Tests: run once in a pass, between its last pop and its re-enabling of notifications
    /// (where a driver publishing at the same time lands in a real run).
    #[cfg(test)]
    between_pop_and_enable: Option<Box<dyn FnOnce() + Send>>,
}

// SAFETY: the raw pointers inside a Worker (the slots' iovecs) point into guest memory that the
// slot keeps mapped through its `mem` reference; they are only dereferenced by the storage
// (the kernel, an engine's pool threads, a synchronous path of the queue object) while the
// slot's request is in flight. A Worker is used by one thread at a time (it lives behind a
// Mutex).
unsafe impl Send for Worker {}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("queue", &self.queue)
            .field("free_slots", &self.free.len())
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// A worker for queue `queue` with room for `slots` requests in flight, serving them on
    /// `io` (the queue object the disk opened for this queue; `None`: every request fails).
    pub fn new(
        queue: usize,
        dev: Arc<Device>,
        io: Option<Box<dyn BlockQueue>>,
        slots: usize,
    ) -> Worker {
        let max_iov = dev.limits.max_iov;
        Worker {
            queue,
            dev,
            io,
            slots: (0..slots)
                .map(|_| Slot {
                    head: 0,
                    status: GuestAddress(0),
                    kind: Kind::Flush,
                    len: 0,
                    iov: Vec::with_capacity(max_iov),
                    mem: None,
                    popped: Instant::now(),
                })
                .collect(),
            free: (0..slots as u32).rev().collect(),
            done: Vec::with_capacity(slots),
            mem: None,
            starved: false,
            vring: None,
            needs_signal: false,
            poll: std::time::Duration::ZERO,
            now: Instant::now(),
            #[cfg(test)]
            between_pop_and_enable: None,
        }
    }

    /// The queue object's completion eventfd, to register with the worker thread's epoll.
    pub fn notify_fd(&self) -> Option<std::os::fd::RawFd> {
        self.io.as_ref().and_then(|q| q.notify_fd())
    }

    /// What carries the queue's I/O.
    pub fn engine_name(&self) -> &'static str {
        self.io.as_ref().map_or("none", |q| q.engine_name())
    }

    /// Drops the queue object (after [`Worker::drain`]); the worker serves nothing afterwards.
    pub fn close_engine(&mut self) {
        self.io = None;
    }
    /// Uses a new guest memory map for requests popped from now on.
    pub fn set_memory(&mut self, mem: Arc<Mem>) {
        self.mem = Some(mem);
    }

    fn stats(&self) -> &QueueStats {
        &self.dev.stats[self.queue]
    }

    /// Handles a kick: pops and starts every available request, submits them in one batch,
    /// then polls for a while (see [`Worker::set_poll`]).
    pub fn process_queue(&mut self, vring: &Vring) {
        self.run_queue(vring);
        self.poll(vring);
    }

    /// Handles the queue object's completion eventfd.
    pub fn handle_completions(&mut self, vring: &Vring) {
        if let Some(q) = &self.io {
            q.clear_notify();
        }
        self.reap(vring);
        if self.starved && !self.free.is_empty() {
            self.run_queue(vring);
        } else {
            self.signal(vring);
        }
        self.poll(vring);
    }

    /// Busy-polls for completions and new requests for up to `poll` after the last activity
    /// (four times that while I/O is in flight), with guest notifications off: at low queue
    /// depth this saves a thread wake-up per completion and the guest's kick per request, the
    /// way QEMU's adaptive iothread polling does. Zero disables polling.
    pub fn set_poll(&mut self, poll: std::time::Duration) {
        self.poll = poll;
    }

    /// Pops every available chain (while slots are free) and starts it. Returns how many.
    fn pop_all(&mut self, vring: &Vring, mem: &Arc<Mem>) -> usize {
        let mut popped = 0usize;
        loop {
            if self.free.is_empty() {
                self.starved = true;
                break;
            }
            // Requests a crashed back end left in flight come first (in-flight tracking).
            let Some(chain) = driver::pop(vring, &**mem) else {
                break;
            };
            if popped == 0 {
                self.now = Instant::now();
            }
            popped += 1;
            self.start(chain, mem, vring);
            // Each request goes to the kernel as soon as it is parsed, not in one batch at the
            // end of the pass: the first requests of a pass reach the device a batch earlier,
            // which at depth is worth more than the system calls saved. Measured side by side
            // with qemu-storage-daemon (docs/performance.md, 2026-12-05): file randread QD32
            // 0.88x -> 1.08x, randwrite QD32 0.82x -> 1.02x, seqread 128k QD8 0.93x -> 1.08x.
            self.submit();
        }
        popped
    }

    /// One pass over the queue: pop, start and submit everything, reap, signal.
    fn run_queue(&mut self, vring: &Vring) {
        if self.vring.is_none() {
            self.vring = Some(vring.clone());
        }
        let Some(mem) = self.mem.clone() else {
            vback_common::warn_limited!(
                "queue {}: kicked before the memory table was set",
                self.queue
            );
            return;
        };
        self.starved = false;
        // The last check after re-enabling notifications saw the avail index ahead of what had
        // been popped.
        let mut more = false;
        loop {
            if let Err(e) = vring.disable_notification() {
                vback_common::warn_limited!(
                    "queue {}: cannot update the used ring flags: {e}",
                    self.queue
                );
                return;
            }
            let popped = self.pop_all(vring, &mem);
            if self.starved {
                break;
            }
            if popped == 0 && more {
                // The driver only moves the avail index forward, and it was ahead of us when
                // we last looked; yet nothing could be popped: the index is more than a queue
                // ahead, or the ring entry is unreadable. Wait for the next kick rather than
                // spin.
                self.warn_inconsistent(vring, &mem);
                break;
            }
            #[cfg(test)]
            if let Some(driver) = self.between_pop_and_enable.take() {
                driver();
            }
            // Chains published after the last pop (even when this pass popped none: its kick
            // may have been for chains an earlier pass took) get no kick when the driver saw
            // notifications off: serve them now.
            match vring.enable_notification() {
                Ok(true) => more = true,
                Ok(false) => break,
                Err(e) => {
                    vback_common::warn_limited!(
                        "queue {}: cannot read the avail ring: {e}",
                        self.queue
                    );
                    break;
                }
            }
        }
        self.reap(vring);
        self.signal(vring);
    }

    #[cold]
    fn warn_inconsistent(&self, vring: &Vring, mem: &Mem) {
        let st = vring.get_ref();
        let q = st.get_queue();
        let idx = q.avail_idx(mem, Ordering::Acquire).map(|i| i.0);
        vback_common::warn_limited!(
            "queue {}: the driver's avail ring is broken (avail index {}, device at {}, queue \
             size {}): nothing can be taken from it; the queue waits for the next kick (a \
             driver bug: resetting the device recovers)",
            self.queue,
            idx.map_or_else(|e| format!("unreadable: {e}"), |i| i.to_string()),
            q.next_avail(),
            q.size(),
        );
    }

    fn avail_pending(&self, vring: &Vring, mem: &Mem) -> bool {
        let st = vring.get_ref();
        let q = st.get_queue();
        q.ready()
            && q.avail_idx(mem, std::sync::atomic::Ordering::Acquire)
                .is_ok_and(|idx| idx.0 != q.next_avail())
    }

    fn poll(&mut self, vring: &Vring) {
        if self.poll.is_zero() || self.starved {
            return;
        }
        let Some(mem) = self.mem.clone() else { return };
        let t0 = std::time::Instant::now();
        let mut last = t0;
        if vring.disable_notification().is_err() {
            return;
        }
        loop {
            let mut progress = false;
            let in_flight = self.io.as_ref().map_or(0, |q| q.in_flight());
            // Deep queues: completions batch better on the eventfd, so only linger a moment
            // for the driver's next requests (it refills as soon as it sees completions).
            let deep = in_flight > POLL_MAX_IN_FLIGHT;
            if in_flight > 0 && !deep {
                let before = self.free.len();
                // Entering the kernel runs the ring's pending completion work (a task spinning
                // in user space would otherwise only see its completions after an interrupt).
                self.submit();
                self.reap(vring);
                progress |= self.free.len() != before;
            }
            if !self.free.is_empty() && self.avail_pending(vring, &mem) {
                progress |= self.pop_all(vring, &mem) > 0;
                // Requests may complete within their submit (the null device, synchronous
                // paths): they have no eventfd wake-up to wait for.
                self.reap(vring);
            }
            self.signal(vring);
            let now = std::time::Instant::now();
            if progress {
                last = now;
            }
            let window = if deep {
                self.poll.min(DEEP_POLL)
            } else if in_flight > 0 {
                self.poll * 4
            } else {
                self.poll
            };
            // Never hold the thread for long: the epoll loop must see other events (exit).
            if now - last >= window
                || now - t0 >= std::time::Duration::from_millis(5)
                || self.starved
            {
                break;
            }
            std::hint::spin_loop();
        }
        // Back to notifications; anything that slipped in meanwhile gets a normal pass.
        if matches!(vring.enable_notification(), Ok(true)) && !self.starved {
            self.run_queue(vring);
        }
    }

    fn submit(&mut self) {
        if let Some(q) = self.io.as_mut()
            && let Err(err) = q.submit()
        {
            vback_common::error_limited!("queue {}: submitting I/O failed: {err}", self.queue);
        }
    }

    fn reap(&mut self, vring: &Vring) {
        let Some(q) = self.io.as_mut() else {
            return;
        };
        let mut done = std::mem::take(&mut self.done);
        q.reap(&mut |c| done.push(c));
        if !done.is_empty() {
            self.now = Instant::now();
        }
        for c in done.drain(..) {
            self.complete(c, Some(vring));
        }
        self.done = done;
    }

    fn signal(&mut self, vring: &Vring) {
        if !self.needs_signal {
            return;
        }
        self.needs_signal = false;
        match vring.needs_notification() {
            Ok(true) => {
                if let Err(e) = vring.signal_used_queue() {
                    vback_common::warn_limited!(
                        "queue {}: cannot interrupt the guest: {e}",
                        self.queue
                    );
                }
            }
            Ok(false) => {}
            Err(e) => {
                vback_common::warn_limited!("queue {}: cannot read the used event: {e}", self.queue)
            }
        }
    }

    fn start(&mut self, chain: Chain<'_, Mem>, mem: &Arc<Mem>, vring: &Vring) {
        let head = chain.head_index();
        let Some(idx) = self.free.pop() else { return };
        let limits = self.dev.limits;
        let slot = &mut self.slots[idx as usize];
        let parsed: Parsed = virtio::parse_chain(&**mem, chain.clone(), &mut slot.iov, limits);
        let Some(status) = parsed.status else {
            // Nowhere to put a status: return the chain untouched so the ring keeps moving.
            vback_common::warn_limited!(
                "queue {}: request {head} has no status byte; returned it unanswered",
                self.queue
            );
            self.free.push(idx);
            QueueStats::add(&self.dev.stats[self.queue].errors, 1);
            self.add_used(vring, head, 0);
            return;
        };
        slot.head = head;
        slot.status = status;
        slot.popped = self.now;
        let request = match parsed.request {
            Ok(r) => r,
            Err(st) => {
                return self.refuse(
                    idx,
                    st,
                    "request",
                    None,
                    "malformed or unsupported (header, type, descriptor layout or length)",
                    vring,
                );
            }
        };
        let dev = self.dev.clone();
        let capacity = dev.disk.sectors();
        let fua = !dev.writeback.load(Ordering::Relaxed);
        match request {
            Request::Read { sector, len } | Request::Write { sector, len } => {
                let write = matches!(request, Request::Write { .. });
                let what = if write { "write" } else { "read" };
                if write && dev.disk.read_only() {
                    return self.refuse(
                        idx,
                        Status::IoErr,
                        what,
                        Some(sector),
                        "the disk is read-only",
                        vring,
                    );
                }
                if len % SECTOR != 0 || !virtio::range_ok(sector, len, capacity) {
                    return self.refuse(
                        idx,
                        Status::IoErr,
                        what,
                        Some(sector),
                        "the length is not a multiple of 512 or the range ends past the disk",
                        vring,
                    );
                }
                if len == 0 {
                    self.count_rw(write, 0);
                    return self.finish_now(idx, Status::Ok, 0, vring);
                }
                let offset = sector * SECTOR;
                let slot = &mut self.slots[idx as usize];
                slot.kind = if write { Kind::Write } else { Kind::Read };
                slot.len = len;
                slot.mem = Some(mem.clone());
                let io = if write {
                    Io::Write { offset, fua }
                } else {
                    Io::Read { offset }
                };
                self.hand_over(idx, io, vring);
            }
            Request::Flush => {
                let slot = &mut self.slots[idx as usize];
                slot.kind = Kind::Flush;
                slot.len = 0;
                slot.iov.clear();
                slot.mem = None;
                self.hand_over(idx, Io::Flush, vring);
            }
            Request::GetId { len } => {
                let n = len.min(20) as usize;
                let ok = virtio::write_stream(&**mem, chain, 0, &dev.serial[..n]);
                let st = if ok { Status::Ok } else { Status::IoErr };
                self.finish_now(idx, st, if ok { n as u64 } else { 0 }, vring);
            }
            Request::Discard(seg) | Request::WriteZeroes(seg) => {
                let zero = matches!(request, Request::WriteZeroes(_));
                let allowed = if zero {
                    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                } else {
                    0
                };
                let what = if zero { "write-zeroes" } else { "discard" };
                if seg.flags & !allowed != 0 {
                    return self.refuse(
                        idx,
                        Status::Unsupp,
                        what,
                        Some(seg.sector),
                        "unknown flags",
                        vring,
                    );
                }
                let len = u64::from(seg.num_sectors) * SECTOR;
                let why = if dev.disk.read_only() {
                    Some("the disk is read-only")
                } else if seg.num_sectors > dev.max_discard_sectors {
                    Some("more sectors than the device's maximum")
                } else if !virtio::range_ok(seg.sector, len, capacity) {
                    Some("the range ends past the disk")
                } else {
                    None
                };
                if let Some(why) = why {
                    return self.refuse(idx, Status::IoErr, what, Some(seg.sector), why, vring);
                }
                let offset = seg.sector * SECTOR;
                let slot = &mut self.slots[idx as usize];
                slot.kind = if zero {
                    Kind::WriteZeroes
                } else {
                    Kind::Discard
                };
                slot.len = 0;
                slot.iov.clear();
                slot.mem = None;
                let io = if zero {
                    Io::WriteZeroes {
                        offset,
                        len,
                        unmap: seg.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
                        fua,
                    }
                } else {
                    Io::Discard { offset, len, fua }
                };
                self.hand_over(idx, io, vring);
            }
        }
    }

    /// Gives the slot's request to the queue object.
    fn hand_over(&mut self, idx: u32, io: Io, vring: &Vring) {
        let Some(q) = self.io.as_mut() else {
            return self.finish_now(idx, Status::IoErr, 0, vring);
        };
        let slot = &self.slots[idx as usize];
        // SAFETY: the iovecs point into guest memory that the slot's `mem` keeps mapped until
        // the request's completion is reaped (the slot is not reused before); the guest may
        // write the same memory meanwhile, which only changes the bytes transferred.
        match unsafe { q.queue(u64::from(idx), io, &slot.iov) } {
            Ok(()) => QueueStats::add(&self.stats().in_flight, 1),
            Err(_) => {
                vback_common::error_limited!(
                    "queue {}: the disk's queue is full; failing request",
                    self.queue
                );
                self.finish_now(idx, Status::IoErr, 0, vring);
            }
        }
    }

    fn count_rw(&self, write: bool, len: u64) {
        let s = self.stats();
        if write {
            QueueStats::add(&s.writes, 1);
            QueueStats::add(&s.write_bytes, len);
        } else {
            QueueStats::add(&s.reads, 1);
            QueueStats::add(&s.read_bytes, len);
        }
    }

    fn count_discard(&self, zero: bool) {
        let s = self.stats();
        QueueStats::add(if zero { &s.write_zeroes } else { &s.discards }, 1);
    }

    /// Remembers a storage error for `status` and logs it (rate-limited: a guest decides how
    /// often).
    #[cold]
    fn storage_error(&self, kind: Kind, e: &BlockError) {
        if kind == Kind::Flush {
            vback_common::error_limited!("queue {}: {e}", self.queue);
        } else {
            vback_common::warn_limited!("queue {}: {e}", self.queue);
        }
        let time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        *lock(&self.dev.last_error) = Some(LastError {
            kind: e.kind,
            message: e.to_string(),
            queue: self.queue,
            time,
        });
    }

    /// Handles one completion from the queue object.
    fn complete(&mut self, c: QueueCompletion, vring: Option<&Vring>) {
        let Some(idx) = u32::try_from(c.tag)
            .ok()
            .filter(|&i| (i as usize) < self.slots.len())
        else {
            return;
        };
        self.dev.stats[self.queue]
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
        let slot = &self.slots[idx as usize];
        let (kind, len) = (slot.kind, slot.len);
        let stats = &self.dev.stats[self.queue];
        stats.latency[kind as usize].record(
            u64::try_from(self.now.saturating_duration_since(slot.popped).as_nanos())
                .unwrap_or(u64::MAX),
        );
        let (status, data) = match c.result {
            Ok(_) => {
                match kind {
                    Kind::Read | Kind::Write => self.count_rw(kind == Kind::Write, len),
                    Kind::Flush => QueueStats::add(&self.stats().flushes, 1),
                    Kind::Discard | Kind::WriteZeroes => {
                        self.count_discard(kind == Kind::WriteZeroes)
                    }
                }
                (Status::Ok, if kind == Kind::Read { len } else { 0 })
            }
            Err(e) => {
                QueueStats::add(&stats.errors_by_kind[e.kind as usize], 1);
                self.storage_error(kind, &e);
                let st = if e.kind == ErrorKind::Unsupported {
                    Status::Unsupp
                } else {
                    Status::IoErr
                };
                (st, 0)
            }
        };
        match vring {
            Some(v) => self.finish_now(idx, status, data, v),
            None => self.release(idx),
        }
    }
    /// Answers a request the device does not carry out with an error status, saying why at
    /// debug level (rate-limited: a guest decides how often).
    fn refuse(
        &mut self,
        idx: u32,
        status: Status,
        what: &str,
        sector: Option<u64>,
        why: &str,
        vring: &Vring,
    ) {
        let head = self.slots[idx as usize].head;
        let at = sector
            .map(|s| format!(" at sector {s}"))
            .unwrap_or_default();
        vback_common::debug_limited!(
            "queue {}: request {head} ({what}{at}) answered {status:?}: {why}",
            self.queue
        );
        self.finish_now(idx, status, 0, vring);
    }

    /// Writes the status, returns the chain on the used ring and frees the slot.
    fn finish_now(&mut self, idx: u32, status: Status, data_len: u64, vring: &Vring) {
        let slot = &self.slots[idx as usize];
        let (head, addr) = (slot.head, slot.status);
        let written = match slot.mem.as_ref().or(self.mem.as_ref()) {
            Some(mem) => mem.write_obj(status as u8, addr).is_ok(),
            None => false,
        };
        let s = self.stats();
        QueueStats::add(&s.requests, 1);
        match status {
            Status::Ok => {}
            Status::IoErr => QueueStats::add(&s.errors, 1),
            Status::Unsupp => QueueStats::add(&s.unsupported, 1),
        }
        let used = if written {
            u32::try_from(data_len + 1).unwrap_or(u32::MAX)
        } else {
            0
        };
        self.release(idx);
        self.add_used(vring, head, used);
    }

    fn release(&mut self, idx: u32) {
        let slot = &mut self.slots[idx as usize];
        slot.mem = None;
        slot.iov.clear();
        self.free.push(idx);
    }

    fn add_used(&mut self, vring: &Vring, head: u16, len: u32) {
        if let Err(e) = driver::complete(vring, head, len) {
            vback_common::warn_limited!(
                "queue {}: cannot return request {head} on the used ring: {e}",
                self.queue
            );
        }
        self.needs_signal = true;
    }

    /// Waits for every request in flight. With `complete`, they are returned to the guest on the
    /// current vring (the front end is stopping the ring); without, they are dropped (the front
    /// end is gone).
    pub fn drain(&mut self, complete: bool) {
        let vring = if complete { self.vring.clone() } else { None };
        if let Some(q) = self.io.as_mut() {
            let mut done = std::mem::take(&mut self.done);
            q.drain(&mut |c| done.push(c));
            self.now = Instant::now();
            for c in done.drain(..) {
                self.complete(c, vring.as_ref());
            }
            self.done = done;
        }
        if let Some(v) = vring.as_ref() {
            self.signal(v);
        }
        if !complete {
            // Slots of requests that had not reached the storage (none normally) are freed too.
            for idx in 0..self.slots.len() as u32 {
                if self.slots[idx as usize].mem.is_some() {
                    self.release(idx);
                }
            }
            self.free.sort_unstable_by(|a, b| b.cmp(a));
            self.free.dedup();
            self.vring = None;
            self.starved = false;
            self.dev.stats[self.queue]
                .in_flight
                .store(0, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::Limits;
    use std::os::unix::fs::FileExt;
    use vback_block::disk::DiskOptions;
    use vback_block::engine::EngineChoice;
    use vback_block::lock::LockMode;
    use vback_common::spec::DiskUname;
    use vback_common::testing::MockQueue;
    use virtio_bindings::virtio_blk::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use vm_memory::GuestAddressSpace;

    const W: u16 = VRING_DESC_F_WRITE as u16;
    const QSIZE: u16 = 16;
    const STATUS: u64 = 0x3000;

    struct Rig {
        mem: GuestMemoryAtomic<Mem>,
        q: MockQueue,
        worker: Worker,
        _dir: tempfile::TempDir,
        image: std::path::PathBuf,
    }

    fn rig(uname: Option<&str>, read_only: bool) -> Rig {
        rig_with(uname, read_only, EngineChoice::IoUring)
    }

    fn rig_with(uname: Option<&str>, read_only: bool, engine: EngineChoice) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.raw");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let u = uname.map_or_else(|| format!("file:{}", image.display()), str::to_owned);
        let disk = vback_block::open_backend(
            &DiskUname::parse(&u).unwrap(),
            DiskOptions {
                read_only,
                direct: true,
                lock: LockMode::None,
                ..DiskOptions::default()
            },
            engine,
        )
        .unwrap();
        let io = disk.open_queue(u32::from(QSIZE)).unwrap();
        let dev = Arc::new(Device {
            disk,
            writeback: AtomicBool::new(true),
            serial: *b"vback-test-serial\0\0\0",
            stats: vec![QueueStats::default()],
            limits: Limits {
                max_iov: 8,
                max_segments: 1,
            },
            max_discard_sectors: 64,
            last_error: Mutex::new(None),
        });
        let mem =
            GuestMemoryAtomic::new(Mem::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap());
        // Rings well away from the buffers the tests use (fresh memory reads as zero).
        let q = MockQueue::new(&mem, QSIZE, 0x10_0000);
        let mut worker = Worker::new(0, dev, Some(io), usize::from(QSIZE));
        worker.set_memory(mem.memory().into_inner());
        Rig {
            mem,
            q,
            worker,
            _dir: dir,
            image,
        }
    }

    impl Rig {
        fn m(&self) -> Arc<Mem> {
            self.mem.memory().into_inner()
        }

        fn header(&self, at: u64, kind: u32, sector: u64) {
            let m = self.m();
            m.write_obj(kind, GuestAddress(at)).unwrap();
            m.write_obj(0u32, GuestAddress(at + 4)).unwrap();
            m.write_obj(sector, GuestAddress(at + 8)).unwrap();
        }

        /// Writes a chain into the descriptor table and publishes its head on the avail ring,
        /// as a driver would.
        fn publish(&mut self, descs: &[(u64, u32, u16)]) {
            self.q.publish(descs);
        }

        fn used_idx(&self) -> u16 {
            self.q.used_idx()
        }

        /// Kicks the worker and runs it until the used index reaches `target`.
        fn run_until(&mut self, target: u16) {
            self.worker.process_queue(&self.q.vring);
            for _ in 0..2000 {
                if self.used_idx() == target {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
                self.worker.handle_completions(&self.q.vring);
            }
            panic!(
                "requests never completed (used index {} of {target})",
                self.used_idx()
            );
        }

        /// Puts a chain on the avail ring, runs the worker until it is used, and returns the
        /// status byte and the used length.
        fn submit(&mut self, descs: &[(u64, u32, u16)]) -> (u8, u32) {
            let m = self.m();
            m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let before = self.used_idx();
            self.publish(descs);
            self.run_until(before.wrapping_add(1));
            let (_, len) = self.q.used(before);
            (m.read_obj(GuestAddress(STATUS)).unwrap(), len)
        }
    }

    #[test]
    fn writes_and_reads_reach_the_image() {
        writes_and_reads(rig(None, false));
    }

    #[test]
    fn the_thread_pool_engine_serves_the_same_requests() {
        writes_and_reads(rig_with(None, false, EngineChoice::ThreadPool));
    }

    fn writes_and_reads(mut r: Rig) {
        let m = r.m();
        m.write_slice(&[0xab; 4096], GuestAddress(0x10000)).unwrap();
        r.header(0x1000, VIRTIO_BLK_T_OUT, 8);
        let (st, len) = r.submit(&[(0x1000, 16, 0), (0x10000, 4096, 0), (STATUS, 1, W)]);
        assert_eq!((st, len), (0, 1));
        let mut back = vec![0u8; 4096];
        std::fs::File::open(&r.image)
            .unwrap()
            .read_exact_at(&mut back, 8 * 512)
            .unwrap();
        assert!(back.iter().all(|&b| b == 0xab));

        r.header(0x1000, VIRTIO_BLK_T_IN, 8);
        let (st, len) = r.submit(&[
            (0x1000, 16, 0),
            (0x20000, 2048, W),
            (0x21000, 2048, W),
            (STATUS, 1, W),
        ]);
        assert_eq!((st, len), (0, 4097));
        let mut got = vec![0u8; 2048];
        m.read_slice(&mut got, GuestAddress(0x21000)).unwrap();
        assert!(got.iter().all(|&b| b == 0xab));

        r.header(0x1000, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(r.submit(&[(0x1000, 16, 0), (STATUS, 1, W)]).0, 0);

        r.header(0x1000, VIRTIO_BLK_T_GET_ID, 0);
        assert_eq!(
            r.submit(&[(0x1000, 16, 0), (0x30000, 20, W), (STATUS, 1, W)]),
            (0, 21)
        );
        let mut id = [0u8; 20];
        m.read_slice(&mut id, GuestAddress(0x30000)).unwrap();
        assert_eq!(&id[..17], b"vback-test-serial");

        let s = &r.worker.dev.stats[0];
        assert_eq!(s.writes.load(Ordering::Relaxed), 1);
        assert_eq!(s.read_bytes.load(Ordering::Relaxed), 4096);
        assert_eq!(s.flushes.load(Ordering::Relaxed), 1);
        assert_eq!(s.in_flight.load(Ordering::Relaxed), 0);
        // One latency sample per request the storage carried out, under its type; GET_ID
        // never reaches the storage and has none.
        let reads = s.reads.load(Ordering::Relaxed);
        let h: Vec<(String, u64)> = s
            .histograms(0)
            .into_iter()
            .map(|h| (h.labels["op"].clone(), h.histogram.count))
            .collect();
        assert_eq!(
            h,
            [
                ("read".to_owned(), reads),
                ("write".to_owned(), 1),
                ("flush".to_owned(), 1)
            ]
        );
        let read = s.latency[0].snapshot();
        assert!(read.sum > 0 && read.quantile(0.5).is_some(), "{read:?}");
    }

    #[test]
    fn misaligned_buffers_fall_back_to_the_page_cache() {
        let mut r = rig(None, false);
        let m = r.m();
        m.write_slice(&[0x5a; 512], GuestAddress(0x10001)).unwrap();
        r.header(0x1000, VIRTIO_BLK_T_OUT, 0);
        // A buffer at an odd address: O_DIRECT refuses it with EINVAL.
        assert_eq!(
            r.submit(&[(0x1000, 16, 0), (0x10001, 512, 0), (STATUS, 1, W)])
                .0,
            0
        );
        let mut back = vec![0u8; 512];
        std::fs::File::open(&r.image)
            .unwrap()
            .read_exact_at(&mut back, 0)
            .unwrap();
        assert!(back.iter().all(|&b| b == 0x5a));
    }

    #[test]
    fn discard_and_write_zeroes_punch_the_file() {
        let mut r = rig(None, false);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&r.image)
            .unwrap()
            .write_all_at(&[1u8; 65536], 0)
            .unwrap();
        let m = r.m();
        let seg = |sector: u64, n: u32, flags: u32| {
            m.write_obj(sector, GuestAddress(0x1010)).unwrap();
            m.write_obj(n, GuestAddress(0x1018)).unwrap();
            m.write_obj(flags, GuestAddress(0x101c)).unwrap();
        };
        r.header(0x1000, VIRTIO_BLK_T_DISCARD, 0);
        seg(0, 16, 0);
        assert_eq!(r.submit(&[(0x1000, 32, 0), (STATUS, 1, W)]).0, 0);
        r.header(0x1000, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        seg(16, 16, 0);
        assert_eq!(r.submit(&[(0x1000, 32, 0), (STATUS, 1, W)]).0, 0);
        seg(32, 16, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        assert_eq!(r.submit(&[(0x1000, 32, 0), (STATUS, 1, W)]).0, 0);
        let mut back = vec![9u8; 65536];
        std::fs::File::open(&r.image)
            .unwrap()
            .read_exact_at(&mut back, 0)
            .unwrap();
        assert!(
            back[..24576].iter().all(|&b| b == 0),
            "zeroed and discarded ranges read as zero"
        );
        assert!(
            back[24576..].iter().all(|&b| b == 1),
            "nothing past the ranges changed"
        );

        // Oversize (more than max_discard_sectors = 64), past the end, unknown flags.
        r.header(0x1000, VIRTIO_BLK_T_DISCARD, 0);
        seg(0, 65, 0);
        assert_eq!(r.submit(&[(0x1000, 32, 0), (STATUS, 1, W)]).0, 1);
        seg(2047, 2, 0);
        assert_eq!(r.submit(&[(0x1000, 32, 0), (STATUS, 1, W)]).0, 1);
        seg(0, 1, 0x2);
        assert_eq!(r.submit(&[(0x1000, 32, 0), (STATUS, 1, W)]).0, 2);
        r.header(0x1000, VIRTIO_BLK_T_DISCARD, 0);
        seg(0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        assert_eq!(
            r.submit(&[(0x1000, 32, 0), (STATUS, 1, W)]).0,
            2,
            "UNMAP is not a discard flag"
        );
    }

    #[test]
    fn hostile_requests_get_errors_and_never_touch_the_image_outside_range() {
        let mut r = rig(None, false);
        type Case = (&'static str, u32, u64, Vec<(u64, u32, u16)>, u8);
        let cases: Vec<Case> = vec![
            (
                "read past the end",
                VIRTIO_BLK_T_IN,
                2048,
                vec![(0x1000, 16, 0), (0x20000, 512, W), (STATUS, 1, W)],
                1,
            ),
            (
                "read straddling the end",
                VIRTIO_BLK_T_IN,
                2047,
                vec![(0x1000, 16, 0), (0x20000, 1024, W), (STATUS, 1, W)],
                1,
            ),
            (
                "write at an overflowing sector",
                VIRTIO_BLK_T_OUT,
                u64::MAX / 256,
                vec![(0x1000, 16, 0), (0x20000, 512, 0), (STATUS, 1, W)],
                1,
            ),
            (
                "partial sector",
                VIRTIO_BLK_T_OUT,
                0,
                vec![(0x1000, 16, 0), (0x20000, 100, 0), (STATUS, 1, W)],
                1,
            ),
            (
                "data outside guest memory",
                VIRTIO_BLK_T_IN,
                0,
                vec![(0x1000, 16, 0), (0x1000_0000, 512, W), (STATUS, 1, W)],
                1,
            ),
            (
                "wrong direction",
                VIRTIO_BLK_T_IN,
                0,
                vec![(0x1000, 16, 0), (0x20000, 512, 0), (STATUS, 1, W)],
                1,
            ),
            (
                "short header",
                VIRTIO_BLK_T_IN,
                0,
                vec![(0x1000, 8, 0), (STATUS, 1, W)],
                1,
            ),
            (
                "unknown type",
                0x77,
                0,
                vec![(0x1000, 16, 0), (STATUS, 1, W)],
                2,
            ),
            (
                "SCSI passthrough",
                VIRTIO_BLK_T_SCSI_CMD,
                0,
                vec![(0x1000, 16, 0), (STATUS, 1, W)],
                2,
            ),
        ];
        for (what, kind, sector, descs, want) in cases {
            r.header(0x1000, kind, sector);
            let nd = r.q.next_desc();
            let (st, _) = r.submit(&descs);
            assert_eq!(st, want, "{what} (descriptors from {nd})");
        }
        // A chain with no writable byte is returned with length 0.
        r.header(0x1000, VIRTIO_BLK_T_IN, 0);
        let m = r.m();
        m.write_obj(0x42u8, GuestAddress(STATUS)).unwrap();
        let (_, len) = r.submit(&[(0x1000, 16, 0), (0x20000, 512, 0)]);
        assert_eq!(len, 0);
        assert_eq!(
            std::fs::metadata(&r.image).unwrap().len(),
            1 << 20,
            "the image did not grow"
        );
        let s = &r.worker.dev.stats[0];
        assert_eq!(s.errors.load(Ordering::Relaxed), 8);
        assert_eq!(s.unsupported.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn storage_errors_answer_ioerr_and_are_kept_for_status() {
        let mut r = rig(None, false);
        assert!(lock(&r.worker.dev.last_error).is_none());
        // The file shrinks under the disk: a read inside the capacity finds its end.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&r.image)
            .unwrap()
            .set_len(4096)
            .unwrap();
        r.header(0x1000, VIRTIO_BLK_T_IN, 16);
        assert_eq!(
            r.submit(&[(0x1000, 16, 0), (0x20000, 512, W), (STATUS, 1, W)]),
            (1, 1)
        );
        let e = lock(&r.worker.dev.last_error).clone().unwrap();
        assert_eq!(e.kind, ErrorKind::OutOfBounds);
        assert_eq!(e.queue, 0);
        assert!(e.message.contains("offset 8192"), "{}", e.message);
        let s = &r.worker.dev.stats[0];
        assert_eq!(s.errors.load(Ordering::Relaxed), 1);
        assert_eq!(s.in_flight.load(Ordering::Relaxed), 0);
        // Counted by kind, and the failed read still has its latency sample.
        let snap = s.snapshot();
        assert_eq!(
            snap.errors_by_kind.into_iter().collect::<Vec<_>>(),
            [("out-of-bounds".to_owned(), 1)]
        );
        assert_eq!(s.latency[0].snapshot().count, 1);
    }

    #[test]
    fn read_only_disks_refuse_writes() {
        let mut r = rig(None, true);
        r.header(0x1000, VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            r.submit(&[(0x1000, 16, 0), (0x20000, 512, 0), (STATUS, 1, W)])
                .0,
            1
        );
        r.header(0x1000, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        assert_eq!(r.submit(&[(0x1000, 32, 0), (STATUS, 1, W)]).0, 1);
        r.header(0x1000, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            r.submit(&[(0x1000, 16, 0), (0x20000, 512, W), (STATUS, 1, W)])
                .0,
            0
        );
    }

    #[test]
    fn null_device_completes_without_io() {
        let mut r = rig(Some("null:1M"), false);
        r.header(0x1000, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            r.submit(&[(0x1000, 16, 0), (0x20000, 4096, W), (STATUS, 1, W)]),
            (0, 4097)
        );
        r.header(0x1000, VIRTIO_BLK_T_OUT, 2047);
        assert_eq!(
            r.submit(&[(0x1000, 16, 0), (0x20000, 1024, 0), (STATUS, 1, W)])
                .0,
            1,
            "range still checked"
        );
    }

    #[test]
    fn a_full_ring_of_requests_and_then_some() {
        // More requests than free slots in one kick: the worker leaves the rest on the ring and
        // resumes as slots free up.
        let mut r = rig(None, false);
        r.worker.free.truncate(3);
        let m = r.m();
        for i in 0..QSIZE / 2 {
            let hdr = 0x1000 + u64::from(i) * 0x100;
            m.write_obj(VIRTIO_BLK_T_IN, GuestAddress(hdr)).unwrap();
            m.write_obj(u64::from(i), GuestAddress(hdr + 8)).unwrap();
            r.publish(&[(hdr, 16, 0), (0x40000 + u64::from(i) * 0x1000, 513, W)]);
        }
        r.run_until(QSIZE / 2);
        assert_eq!(
            r.worker.dev.stats[0].reads.load(Ordering::Relaxed),
            u64::from(QSIZE / 2)
        );
    }

    /// A kick whose chains an earlier pass already took (the normal case under load: the
    /// driver kicks while the worker is still popping) starts a pass that finds the ring empty;
    /// the driver publishes a chain right then, after the worker's last look at the avail index
    /// and before it turns notifications back on. Returns whether the driver kicked for that
    /// chain (it reads the device's suppression the way Linux's virtqueue_kick_prepare does) and
    /// how many chains were used once the pass is over. The worker does not poll
    /// (`--poll-us 0`).
    fn publish_during_an_empty_pass(event_idx: bool) -> (bool, u16) {
        let mut r = rig(Some("null:1M"), false);
        r.q.vring.set_queue_event_idx(event_idx);
        r.header(0x1000, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(r.submit(&[(0x1000, 16, 0), (STATUS, 1, W)]).0, 0);

        r.q.stage(&[(0x1000, 16, 0), (STATUS, 1, W)]);
        let publish = r.q.publisher(event_idx);
        let kicked = Arc::new(AtomicBool::new(false));
        let k = kicked.clone();
        r.worker.between_pop_and_enable =
            Some(Box::new(move || k.store(publish(), Ordering::SeqCst)));
        r.worker.process_queue(&r.q.vring);
        assert!(r.worker.between_pop_and_enable.is_none(), "the driver ran");
        (kicked.load(Ordering::SeqCst), r.used_idx())
    }

    #[test]
    fn a_chain_published_as_notifications_come_back_on_is_not_lost() {
        // Without EVENT_IDX the driver saw VRING_USED_F_NO_NOTIFY and sends no kick: the pass
        // that saw the chain arrive must serve it, or it waits forever.
        let (kicked, used) = publish_during_an_empty_pass(false);
        assert!(!kicked, "the driver saw notifications off");
        assert_eq!(used, 2, "the chain published during the pass was served");
    }

    #[test]
    fn with_event_idx_the_same_race_also_serves_the_chain_in_the_pass() {
        // With EVENT_IDX the driver does kick (avail_event still names the index it
        // published at), so nothing would be lost; the chain is still served right away.
        let (kicked, used) = publish_during_an_empty_pass(true);
        assert!(kicked, "avail_event asked for a kick");
        assert_eq!(used, 2, "the chain published during the pass was served");
    }

    #[test]
    fn bogus_avail_rings_do_not_hang_the_worker() {
        let mut r = rig(None, false);
        let m = r.m();
        // An avail index far beyond the ring: nothing can be popped; the worker returns.
        m.write_obj(200u16, GuestAddress(r.q.avail_addr() + 2))
            .unwrap();
        r.worker.process_queue(&r.q.vring);
        assert_eq!(r.used_idx(), 0);

        // A head index beyond the queue: the chain is empty, returned unanswered.
        let mut r = rig(None, false);
        let m = r.m();
        m.write_obj(999u16, GuestAddress(r.q.avail_addr() + 4))
            .unwrap();
        m.write_obj(1u16, GuestAddress(r.q.avail_addr() + 2))
            .unwrap();
        r.worker.process_queue(&r.q.vring);
        assert_eq!(r.worker.free.len(), usize::from(QSIZE), "no slot leaked");
        // The queue still works afterwards.
        r.q.set_next_desc(0);
        r.header(0x1000, VIRTIO_BLK_T_FLUSH, 0);
        let before = r.used_idx();
        r.publish(&[(0x1000, 16, 0), (STATUS, 1, W)]);
        r.run_until(before.wrapping_add(1));
    }
}
