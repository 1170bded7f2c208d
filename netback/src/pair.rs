//! One queue pair's data path: the transmit loop (guest → host), the receive loop (host →
//! guest) and the rate limits of both directions. Each pair is served by its own thread.
//!
//! The rings are served through [`SplitRing`]: direct pointers into guest memory, the used
//! index published once per batch, and the driver's notification suppression honoured.
//!
//! Transmit: chains are validated ([`tx_frame`]), charged to the `rate=` credit and written to
//! the tap as they are (the guest's `virtio_net_hdr_v1` is the tap's vnet header), up to 64 per
//! batch through one io_uring submission: one system call per batch, no copy in netback.
//! Receive: the tap's next frame is read straight into the guest's buffers (several with
//! MRG_RXBUF when the frame may be larger than one buffer), then the header's `num_buffers` is
//! set. A frame held back by `rate_rx=` stays in the guest's buffers unpublished until the
//! window ends.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use io_uring::{IoUring, opcode, types};
use serde_json::{Value, json};
use vback_api::AtomicHistogram;
use vback_common::vhost_user::{VringRwLock, VringT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::timerfd::TimerFd;

use crate::device::{HDR_LEN, fill_rx, tx_frame};
use crate::rate::{CreditLimiter, Nanos, Verdict};
use vback_common::ring::{RingError, SplitRing, iov_write};

pub(crate) type Mem = GuestMemoryMmap<()>;
pub(crate) type Vring = VringRwLock<vm_memory::GuestMemoryAtomic<Mem>>;
type VringState = vback_common::vhost_user::VringState<vm_memory::GuestMemoryAtomic<Mem>>;

/// Frames per transmit batch (one io_uring submission).
const TX_BATCH: usize = 64;
/// Segments of one frame's chain (Linux sends at most MAX_SKB_FRAGS + 2, 19 by default).
const MAX_SEGS: usize = 128;
/// Receive chains one frame may span (64 KiB in buffers of at least 1 KiB, as Linux posts).
const MAX_RX_CHAINS: usize = 80;
/// Buffers one received frame may fill (readv's limit).
const MAX_RX_IOV: usize = 1024;

/// Counters of one direction of one queue pair.
#[derive(Debug, Default)]
pub struct Counters {
    /// Frames.
    pub packets: AtomicU64,
    /// Bytes (frames without virtio headers).
    pub bytes: AtomicU64,
    /// Frames dropped (malformed, refused by the host, or no room).
    pub drops: AtomicU64,
    /// Times the rate limit stalled the queue.
    pub stalls: AtomicU64,
}

impl Counters {
    pub(crate) fn to_json(&self) -> Value {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({"packets": g(&self.packets), "bytes": g(&self.bytes), "drops": g(&self.drops), "rate_limited_stalls": g(&self.stalls)})
    }

    pub(crate) fn add(&self, other: &Counters) {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        self.packets.fetch_add(g(&other.packets), Ordering::Relaxed);
        self.bytes.fetch_add(g(&other.bytes), Ordering::Relaxed);
        self.drops.fetch_add(g(&other.drops), Ordering::Relaxed);
        self.stalls.fetch_add(g(&other.stalls), Ordering::Relaxed);
    }
}

/// Both directions' counters of one pair, shared with the control socket.
#[derive(Debug, Default)]
pub struct PairStats {
    /// Host → guest.
    pub rx: Counters,
    /// Guest → host.
    pub tx: Counters,
    /// Frames received into the guest per receive pass (bursts of at least one).
    pub rx_burst: AtomicHistogram,
    /// Chains taken from the transmit ring per transmit pass (bursts of at least one).
    pub tx_burst: AtomicHistogram,
}

/// Where a pair's frames go and come from.
#[derive(Debug)]
pub enum HostIo {
    /// A tap queue's file.
    Tap(RawFd),
    /// Nothing: transmitted frames are counted and dropped; `frame` is what the guest receives.
    Null {
        /// The generated frame.
        frame: Vec<u8>,
        /// Fill every receive buffer the guest posts (for benchmarks) instead of one frame per
        /// generator tick.
        flood: bool,
    },
}

#[derive(Debug)]
struct TxSlot {
    iov: Vec<libc::iovec>,
    head: u16,
    len: u64,
}

// SAFETY: the iovecs point into guest memory that the pair's `Arc<Mem>` keeps mapped while they
// are in use; they are only touched by the pair's own thread.
unsafe impl Send for TxSlot {}

/// A frame received but held back by the receive rate limit.
#[derive(Debug)]
struct HeldRx {
    used: Vec<(u16, u32)>,
    len: u64,
}

/// One queue pair.
pub struct Pair {
    index: usize,
    io: HostIo,
    stats: Arc<PairStats>,
    tx_limit: Option<CreditLimiter>,
    rx_limit: Option<CreditLimiter>,
    /// Fires when the transmit window ends.
    pub tx_timer: TimerFd,
    /// Fires when the receive window ends.
    pub rx_timer: TimerFd,
    ring: Option<IoUring>,
    /// The tap is registered with the ring as fixed file 0.
    fixed: bool,
    slots: Vec<TxSlot>,
    /// Receive chains taken from the ring for the next frames and not used yet (head, bytes,
    /// iovecs), and their iovecs in `rx_iov`: kept across the frames of one burst, so a guest
    /// posting small buffers for large frames (mergeable buffers with TSO) does not have every
    /// chain walked again per frame; given back to the ring when the burst ends.
    rx_chains: Vec<(u16, u64, usize)>,
    rx_iov: Vec<libc::iovec>,
    /// Bytes the chains in `rx_chains` hold.
    rx_cap: u64,
    descs: Vec<virtio_queue::desc::split::Descriptor>,
    /// How long to watch an empty transmit ring before turning notifications back on.
    pub poll: Duration,
    held: Option<HeldRx>,
    /// The largest frame the guest may be handed (with the header).
    pub rx_max: u64,
    /// MRG_RXBUF negotiated.
    pub mergeable: bool,
    /// Host segmentation offload negotiated (GSO frames from the guest are acceptable).
    pub gso_ok: bool,
    last_drop: Option<&'static str>,
    /// Why the rings could not be served (logged once).
    broken: Option<RingError>,
    /// The last broken avail index logged.
    broken_idx: Option<u16>,
}

impl Drop for Pair {
    fn drop(&mut self) {
        // Let go of the registered tap file now: a ring's files are otherwise released
        // asynchronously after it closes, and the tap would outlive netback for a moment (a
        // restarted netback would find its interface busy).
        if let Some(r) = self.ring.as_ref()
            && self.fixed
        {
            let _ = r.submitter().unregister_files();
        }
    }
}

impl std::fmt::Debug for Pair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pair")
            .field("index", &self.index)
            .field("io", &self.io)
            .field("uring", &self.ring.is_some())
            .finish_non_exhaustive()
    }
}

// SAFETY: the raw iovec pointers in `rx_iov` are scratch space, valid during one `process_rx`
// (emptied before it returns, while the caller still holds the memory) and only used by the
// pair's own thread (the pair sits in a Mutex).
unsafe impl Send for Pair {}

fn now() -> Nanos {
    crate::vhost::now()
}

impl Pair {
    /// A pair. With `batch`, an io_uring is created for a tap's transmit batches; without it,
    /// or if io_uring is unavailable, frames are written one `writev` at a time.
    pub fn new(
        index: usize,
        io: HostIo,
        stats: Arc<PairStats>,
        tx_limit: Option<CreditLimiter>,
        rx_limit: Option<CreditLimiter>,
        batch: bool,
    ) -> io::Result<Pair> {
        let mut fixed = false;
        let ring = match io {
            HostIo::Tap(_) if !batch => None,
            HostIo::Tap(fd) => match IoUring::new(TX_BATCH as u32) {
                Ok(r) => {
                    // A registered file saves a file-table lookup per write.
                    fixed = r.submitter().register_files(&[fd]).is_ok();
                    Some(r)
                }
                Err(e) => {
                    vback_common::warn_limited!(
                        "queue pair {index}: io_uring unavailable ({e}); writing frames one at a time"
                    );
                    None
                }
            },
            HostIo::Null { .. } => None,
        };
        Ok(Pair {
            index,
            io,
            stats,
            tx_limit,
            rx_limit,
            tx_timer: TimerFd::new()?,
            rx_timer: TimerFd::new()?,
            ring,
            fixed,
            slots: (0..TX_BATCH)
                .map(|_| TxSlot {
                    iov: Vec::with_capacity(MAX_SEGS),
                    head: 0,
                    len: 0,
                })
                .collect(),
            rx_iov: Vec::with_capacity(256),
            rx_chains: Vec::with_capacity(MAX_RX_CHAINS),
            rx_cap: 0,
            descs: Vec::with_capacity(MAX_SEGS),
            poll: Duration::ZERO,
            held: None,
            rx_max: HDR_LEN + 1514 + 4,
            mergeable: true,
            gso_ok: false,
            last_drop: None,
            broken: None,
            broken_idx: None,
        })
    }

    /// The pair's number.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The tap file, if any.
    pub fn tap_fd(&self) -> Option<RawFd> {
        match self.io {
            HostIo::Tap(fd) => Some(fd),
            HostIo::Null { .. } => None,
        }
    }

    /// Whether the null side floods receive buffers.
    pub fn floods(&self) -> bool {
        matches!(self.io, HostIo::Null { flood: true, .. })
    }

    /// The last reason a frame was dropped.
    pub fn last_drop(&self) -> Option<&'static str> {
        self.last_drop
    }

    /// Forgets a connection's state (a frame held by the receive limit belongs to the old
    /// rings).
    pub fn reset(&mut self) {
        self.held = None;
        self.broken = None;
        self.broken_idx = None;
        let _ = self.tx_timer.clear();
        let _ = self.rx_timer.clear();
    }

    fn drop_frame(&mut self, dir: Dir, reason: &'static str) {
        let c = match dir {
            Dir::Rx => &self.stats.rx,
            Dir::Tx => &self.stats.tx,
        };
        c.drops.fetch_add(1, Ordering::Relaxed);
        self.last_drop = Some(reason);
        log::debug!("queue pair {}: dropped a frame: {reason}", self.index);
    }

    fn arm(timer: &mut TimerFd, until: Nanos) {
        let wait = Duration::from_nanos(until.saturating_sub(now()).max(1000));
        if let Err(e) = timer.reset(wait, None) {
            vback_common::error_limited!("cannot arm a rate timer: {e}");
        }
    }

    /// The transmit window ended.
    pub fn tx_timer_fired(&mut self) {
        let _ = self.tx_timer.wait();
        if let Some(l) = self.tx_limit.as_mut() {
            l.timer_fired(now());
        }
    }

    /// A ring for one burst on `st`'s queue, or `None` if the queue is not served now (not
    /// started, reset by a front end that went away, or broken: then it is logged).
    fn ring<'m>(&mut self, st: &VringState, mem: &'m Mem, dir: Dir) -> Option<SplitRing<'m>> {
        match SplitRing::new(st.get_queue(), mem) {
            Ok(r) => Some(r.with_log(st.dirty_log())),
            Err(RingError::NotReady) => None,
            Err(e) => {
                if self.broken != Some(e) {
                    vback_common::error_limited!(
                        "queue pair {}: the {} queue cannot be served: {e}",
                        self.index,
                        dir.name()
                    );
                    self.broken = Some(e);
                }
                None
            }
        }
    }

    /// Interrupts the guest for what the burst returned (if it asks for that), puts the ring's
    /// indices back into the queue, and logs a driver that broke its avail index (once).
    fn end_burst(&mut self, st: &mut VringState, mut ring: SplitRing<'_>, dir: Dir) {
        notify_guest(st, &mut ring);
        if let Some(idx) = ring.broken_avail()
            && self.broken_idx != Some(idx)
        {
            vback_common::error_limited!(
                "queue pair {}: the driver's {} avail index {idx} is more than a queue ahead of netback; the queue is not served until the driver resets it",
                self.index,
                dir.name()
            );
            self.broken_idx = Some(idx);
        }
        ring.finish(st.get_queue_mut());
    }

    /// Serves the transmit queue until it is empty or the rate limit stalls it. The vring lock is
    /// taken once per call, each chain is walked once, the used index is published and the
    /// guest interrupted (if it asks to be) once per batch, and with a poll window the queue is
    /// watched for that long before notifications go back on.
    pub fn process_tx(&mut self, vring: &Vring, mem: &Arc<Mem>) {
        let stats = self.stats.clone();
        let tx = &stats.tx;
        let (mut packets, mut bytes) = (0u64, 0u64);
        // Chains taken in this pass: its burst.
        let mut burst = 0u64;
        let mut st = vring.get_mut();
        let Some(mut ring) = self.ring(&st, mem, Dir::Tx) else {
            return;
        };
        ring.disable_notification();
        loop {
            let mut n = 0;
            let mut handled = 0;
            let mut stalled = false;
            while n < TX_BATCH && handled < 4 * TX_BATCH {
                let Some((head, walked)) = ring.pop(&mut self.descs, MAX_SEGS) else {
                    break;
                };
                handled += 1;
                burst += 1;
                let checked = walked.map_err(|e| e.what()).and_then(|()| {
                    tx_frame(
                        ring.map(),
                        &self.descs,
                        self.gso_ok,
                        &mut self.slots[n].iov,
                        MAX_SEGS,
                    )
                });
                let frame = match checked {
                    Ok(f) => f,
                    Err(reason) => {
                        // Returned empty, after the frames before it (chains are used in the
                        // order they came: VIRTIO_F_IN_ORDER).
                        self.flush_tx(&mut ring, n);
                        n = 0;
                        self.drop_frame(Dir::Tx, reason);
                        ring.push_used(head, 0);
                        continue;
                    }
                };
                if let Some(l) = self.tx_limit.as_mut() {
                    match l.check(now(), frame.len) {
                        Verdict::Send => l.charge(frame.len),
                        Verdict::StallUntil(t) => {
                            ring.unpop(1);
                            burst -= 1;
                            tx.stalls.fetch_add(1, Ordering::Relaxed);
                            Self::arm(&mut self.tx_timer, t);
                            stalled = true;
                            break;
                        }
                    }
                }
                match self.io {
                    HostIo::Null { .. } => {
                        packets += 1;
                        bytes += frame.len;
                        ring.push_used(head, 0);
                    }
                    HostIo::Tap(_) => {
                        let slot = &mut self.slots[n];
                        slot.head = head;
                        slot.len = frame.len;
                        n += 1;
                    }
                }
            }
            let full = n == TX_BATCH;
            self.flush_tx(&mut ring, n);
            if stalled {
                break;
            }
            if full || handled == 4 * TX_BATCH {
                notify_guest(&st, &mut ring);
                continue;
            }
            // Empty: watch the ring for the poll window, then turn notifications back on and
            // look once more (the driver may have added chains before it saw them on).
            if self.more_soon(&st, &mut ring) {
                continue;
            }
            break;
        }
        self.end_burst(&mut st, ring, Dir::Tx);
        drop(st);
        if packets > 0 {
            tx.packets.fetch_add(packets, Ordering::Relaxed);
            tx.bytes.fetch_add(bytes, Ordering::Relaxed);
        }
        if burst > 0 {
            stats.tx_burst.record(burst);
        }
    }

    /// Writes the frames in slots `0..n` to the host and returns their chains.
    fn flush_tx(&mut self, ring: &mut SplitRing<'_>, n: usize) {
        if n == 0 {
            return;
        }
        self.write_batch(n);
        for slot in &self.slots[..n] {
            ring.push_used(slot.head, 0);
        }
    }

    /// The ring ran dry: interrupt the guest for what is done, watch the ring for the poll
    /// window, then turn the driver's notifications back on. True if chains arrived meanwhile
    /// (serve them instead of sleeping).
    fn more_soon(&self, st: &VringState, ring: &mut SplitRing<'_>) -> bool {
        if !self.poll.is_zero() {
            notify_guest(st, ring);
            if self.poll_avail(ring) {
                return true;
            }
        }
        if ring.enable_notification() {
            ring.disable_notification();
            return true;
        }
        false
    }

    /// Spins up to the poll window for new chains on the avail ring.
    fn poll_avail(&self, ring: &mut SplitRing<'_>) -> bool {
        let start = std::time::Instant::now();
        loop {
            if ring.refresh() != 0 {
                return true;
            }
            if start.elapsed() >= self.poll {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    /// Writes slots `0..n` to the tap and counts them.
    fn write_batch(&mut self, n: usize) {
        let HostIo::Tap(fd) = self.io else { return };
        let stats = self.stats.clone();
        let tx = &stats.tx;
        let mut results = [0i32; TX_BATCH];
        let queued = if let Some(ring) = self.ring.as_mut() {
            let mut q = 0;
            {
                let mut sq = ring.submission();
                for (i, slot) in self.slots[..n].iter().enumerate() {
                    let e = match (slot.iov.as_slice(), self.fixed) {
                        // A frame in one buffer (header and data together, as DPDK and
                        // Linux usually send them): a plain write, no iovec to import.
                        ([one], true) => opcode::Write::new(
                            types::Fixed(0),
                            one.iov_base.cast(),
                            one.iov_len as u32,
                        )
                        .build(),
                        ([one], false) => opcode::Write::new(
                            types::Fd(fd),
                            one.iov_base.cast(),
                            one.iov_len as u32,
                        )
                        .build(),
                        (v, true) => {
                            opcode::Writev::new(types::Fixed(0), v.as_ptr(), v.len() as u32).build()
                        }
                        (v, false) => {
                            opcode::Writev::new(types::Fd(fd), v.as_ptr(), v.len() as u32).build()
                        }
                    }
                    .user_data(i as u64);
                    // SAFETY: the iovecs point into guest memory kept mapped by the caller's
                    // `Arc<Mem>` and live in `self.slots`, untouched until the completions are
                    // reaped below, before this function returns.
                    if unsafe { sq.push(&e) }.is_err() {
                        break;
                    }
                    q += 1;
                }
            }
            let mut done = 0;
            while done < q {
                if let Err(e) = ring.submit_and_wait(q - done) {
                    if e.raw_os_error() == Some(libc::EINTR) {
                        continue;
                    }
                    vback_common::error_limited!("io_uring submit failed: {e}");
                    break;
                }
                for c in ring.completion() {
                    if let Some(r) = results.get_mut(c.user_data() as usize) {
                        *r = c.result();
                    }
                    done += 1;
                }
            }
            if done < q {
                // Completions that never came: the frames are counted as dropped below.
                for r in results.iter_mut().take(q).skip(done) {
                    *r = -libc::EIO;
                }
            }
            q
        } else {
            0
        };
        for (i, slot) in self.slots[..n].iter().enumerate() {
            if i >= queued {
                // SAFETY: `slot.iov` describes readable guest memory kept mapped by the caller.
                let r = unsafe { libc::writev(fd, slot.iov.as_ptr(), slot.iov.len() as i32) };
                results[i] = if r < 0 {
                    -io::Error::last_os_error()
                        .raw_os_error()
                        .unwrap_or(libc::EIO)
                } else {
                    r as i32
                };
            }
        }
        for (i, r) in results.iter().enumerate().take(n) {
            if *r >= 0 {
                tx.packets.fetch_add(1, Ordering::Relaxed);
                tx.bytes.fetch_add(self.slots[i].len, Ordering::Relaxed);
            } else {
                let reason = match -*r {
                    libc::EINVAL => "the host refused the frame (a bad virtio-net header)",
                    libc::EIO => "the host interface is down",
                    libc::EAGAIN | libc::ENOBUFS => "the host interface's queue is full",
                    _ => "the host interface refused the frame",
                };
                self.drop_frame(Dir::Tx, reason);
            }
        }
    }

    /// The receive window ended: publishes a held frame.
    pub fn rx_timer_fired(&mut self, vring: &Vring, mem: &Arc<Mem>) {
        let _ = self.rx_timer.wait();
        if let Some(l) = self.rx_limit.as_mut() {
            l.timer_fired(now());
        }
        let Some(h) = self.held.take() else {
            return;
        };
        if let Some(l) = self.rx_limit.as_mut() {
            l.charge(h.len);
        }
        let mut st = vring.get_mut();
        let Some(mut ring) = self.ring(&st, mem, Dir::Rx) else {
            return;
        };
        for (head, len) in h.used {
            ring.push_used(head, len);
        }
        self.stats.rx.packets.fetch_add(1, Ordering::Relaxed);
        self.stats.rx.bytes.fetch_add(h.len, Ordering::Relaxed);
        self.end_burst(&mut st, ring, Dir::Rx);
    }

    /// Moves frames from the host into the receive queue until the host has none, the guest has
    /// no buffers or the receive limit stalls.
    pub fn process_rx(&mut self, vring: &Vring, mem: &Arc<Mem>) {
        if self.held.is_some() {
            return;
        }
        let mut st = vring.get_mut();
        // Frames wait in the tap until a front end starts the ring.
        let Some(mut ring) = self.ring(&st, mem, Dir::Rx) else {
            return;
        };
        ring.disable_notification();
        let (mut packets, mut bytes) = (0u64, 0u64);
        loop {
            match self.receive_one(&mut ring) {
                Rx::Done(n) => {
                    packets += 1;
                    bytes += n;
                    // Let the guest start on a long burst.
                    if ring.unnotified() >= 64 {
                        notify_guest(&st, &mut ring);
                    }
                }
                Rx::Dropped => {}
                Rx::Held => {
                    self.return_chains(&mut ring);
                    ring.enable_notification();
                    break;
                }
                Rx::HostEmpty => {
                    // A new frame wakes us (the tap is edge-triggered); new buffers too.
                    self.return_chains(&mut ring);
                    ring.enable_notification();
                    break;
                }
                Rx::NoBuffers => {
                    // The guest has no buffers: the same wait as an empty transmit ring.
                    if self.more_soon(&st, &mut ring) {
                        continue;
                    }
                    break;
                }
            }
        }
        self.return_chains(&mut ring);
        self.end_burst(&mut st, ring, Dir::Rx);
        drop(st);
        if packets > 0 {
            self.stats.rx.packets.fetch_add(packets, Ordering::Relaxed);
            self.stats.rx.bytes.fetch_add(bytes, Ordering::Relaxed);
            self.stats.rx_burst.record(packets);
        }
    }

    fn receive_one(&mut self, ring: &mut SplitRing<'_>) -> Rx {
        let fd = match &self.io {
            HostIo::Null { flood: true, .. } => return self.null_one(ring),
            HostIo::Null { flood: false, .. } => return Rx::HostEmpty,
            HostIo::Tap(fd) => *fd,
        };
        while self.rx_cap < self.rx_max && self.rx_chains.len() < MAX_RX_CHAINS {
            if !self.rx_chains.is_empty() && !self.mergeable {
                break;
            }
            let Some((head, walked)) = ring.pop(&mut self.descs, MAX_SEGS) else {
                break;
            };
            let before = self.rx_iov.len();
            let room = walked.map_err(|e| e.what()).and_then(|()| {
                ring.map()
                    .iovecs(&self.descs, true, &mut self.rx_iov, MAX_RX_IOV)
            });
            match room {
                Ok(room) if room >= HDR_LEN => {
                    self.rx_chains
                        .push((head, room, self.rx_iov.len() - before));
                    self.rx_cap += room;
                }
                bad => {
                    self.rx_iov.truncate(before);
                    if !self.rx_chains.is_empty() {
                        // Chains are used in the order they came (VIRTIO_F_IN_ORDER): this one
                        // waits until the frame in the ones before it is done.
                        ring.unpop(1);
                        break;
                    }
                    // A chain we cannot use: return it empty so the guest gets it back.
                    self.drop_frame(
                        Dir::Rx,
                        bad.err()
                            .unwrap_or("a receive chain with no room for a virtio-net header"),
                    );
                    ring.push_used(head, 0);
                }
            }
        }
        if self.rx_chains.is_empty() {
            return Rx::NoBuffers;
        }
        // SAFETY: every iovec describes writable guest memory (checked by `HostMap::iovecs`)
        // that the ring's borrow of the memory keeps mapped during the call.
        let r = unsafe {
            libc::readv(
                fd,
                self.rx_iov.as_ptr(),
                self.rx_iov.len().min(MAX_RX_IOV) as i32,
            )
        };
        if r <= 0 {
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EAGAIN) {
                    vback_common::warn_limited!("queue pair {}: reading the tap: {e}", self.index);
                }
            }
            return Rx::HostEmpty;
        }
        let n = r as u64;
        // Which chains hold the frame; the rest stay for the next one.
        let (mut left, mut used, mut iovs) = (n, 0, 0);
        for &(_, room, niov) in &self.rx_chains {
            if left == 0 {
                break;
            }
            left -= left.min(room);
            used += 1;
            iovs += niov;
            self.rx_cap -= room;
        }
        // num_buffers, in the first chain's header (the tap leaves it alone).
        // SAFETY: as for the readv above.
        unsafe { iov_write(&self.rx_iov, 10, &(used as u16).to_le_bytes()) };
        // Each chain's share of the frame: full chains, then the rest in the last one.
        let lens = self.rx_chains[..used]
            .iter()
            .scan(n, |left, &(head, room, _)| {
                let take = (*left).min(room);
                *left -= take;
                Some((head, take as u32))
            });
        let frame_len = n.saturating_sub(HDR_LEN);
        let verdict = match self.rx_limit.as_mut() {
            Some(l) => l.check(now(), frame_len),
            None => Verdict::Send,
        };
        let out = match verdict {
            Verdict::Send => {
                if let Some(l) = self.rx_limit.as_mut() {
                    l.charge(frame_len);
                }
                for (head, len) in lens {
                    ring.push_used(head, len);
                }
                Rx::Done(frame_len)
            }
            Verdict::StallUntil(t) => {
                self.held = Some(HeldRx {
                    used: lens.collect(),
                    len: frame_len,
                });
                self.stats.rx.stalls.fetch_add(1, Ordering::Relaxed);
                Self::arm(&mut self.rx_timer, t);
                Rx::Held
            }
        };
        self.rx_chains.drain(..used);
        self.rx_iov.drain(..iovs);
        out
    }

    /// Gives the receive chains taken for frames that did not come back to the ring (they are
    /// the last ones taken, so the ring's position just moves back).
    fn return_chains(&mut self, ring: &mut SplitRing<'_>) {
        ring.unpop(self.rx_chains.len() as u16);
        self.rx_chains.clear();
        self.rx_iov.clear();
        self.rx_cap = 0;
    }

    /// The null side's generator tick: one frame into the receive queue.
    pub fn generate(&mut self, vring: &Vring, mem: &Arc<Mem>) {
        let mut st = vring.get_mut();
        let Some(mut ring) = self.ring(&st, mem, Dir::Rx) else {
            return;
        };
        if let Rx::Done(n) = self.null_one(&mut ring) {
            self.stats.rx.packets.fetch_add(1, Ordering::Relaxed);
            self.stats.rx.bytes.fetch_add(n, Ordering::Relaxed);
        }
        self.end_burst(&mut st, ring, Dir::Rx);
    }

    /// One generated frame into the next receive buffer.
    fn null_one(&mut self, ring: &mut SplitRing<'_>) -> Rx {
        let HostIo::Null { frame, .. } = &self.io else {
            return Rx::HostEmpty;
        };
        let Some((head, walked)) = ring.pop(&mut self.descs, MAX_SEGS) else {
            return Rx::NoBuffers; // no buffer: the frame is not generated
        };
        let flen = frame.len() as u64;
        let filled = match walked {
            Ok(()) => fill_rx(ring.map(), &self.descs, frame, &mut self.rx_iov)
                .ok_or("a receive buffer too small for the frame, or outside guest memory"),
            Err(e) => Err(e.what()),
        };
        ring.push_used(head, filled.unwrap_or(0));
        match filled {
            Ok(_) => Rx::Done(flen),
            Err(reason) => {
                self.drop_frame(Dir::Rx, reason);
                Rx::Dropped
            }
        }
    }
}

/// Interrupts the guest for what the ring returned, unless it asked not to be.
fn notify_guest(st: &VringState, ring: &mut SplitRing<'_>) {
    if ring.needs_notification() {
        let _ = st.signal_used_queue();
    }
}

#[derive(Clone, Copy)]
enum Dir {
    Rx,
    Tx,
}

impl Dir {
    fn name(self) -> &'static str {
        match self {
            Dir::Rx => "receive",
            Dir::Tx => "transmit",
        }
    }
}

enum Rx {
    /// A frame of this many bytes (without the header) reached the guest.
    Done(u64),
    /// A chain went back to the guest empty (counted as a drop).
    Dropped,
    HostEmpty,
    NoBuffers,
    Held,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use vback_common::spec::Rate;
    use vback_common::testing::{MockQueue, WRITE};
    use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};

    /// A SOCK_SEQPACKET pair stands in for the tap: one frame per read and write, as a tap.
    fn seqpacket() -> (OwnedFd, OwnedFd) {
        let mut fds = [-1; 2];
        // SAFETY: socketpair writes two descriptors into `fds`, which has room for them.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0);
        // SAFETY: a fresh descriptor owned by nobody else.
        let a = unsafe { OwnedFd::from_raw_fd(fds[0]) };
        // SAFETY: likewise.
        let b = unsafe { OwnedFd::from_raw_fd(fds[1]) };
        (a, b)
    }

    struct Rig {
        mem: GuestMemoryAtomic<Mem>,
        rx: MockQueue,
        tx: MockQueue,
        pair: Pair,
        stats: Arc<PairStats>,
        peer: OwnedFd,
        _tap: OwnedFd,
    }

    fn rig(rx_rate: Option<&str>) -> Rig {
        rig_with(rx_rate, true)
    }

    fn rig_with(rx_rate: Option<&str>, batch: bool) -> Rig {
        let mem =
            GuestMemoryAtomic::new(Mem::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap());
        let (tap, peer) = seqpacket();
        let stats = Arc::new(PairStats::default());
        let rx_limit = rx_rate.map(|r| CreditLimiter::new(&Rate::parse(r).unwrap(), now()));
        let pair = Pair::new(
            0,
            HostIo::Tap(tap.as_raw_fd()),
            stats.clone(),
            None,
            rx_limit,
            batch,
        )
        .unwrap();
        Rig {
            rx: MockQueue::new(&mem, 256, 0x30_0000),
            tx: MockQueue::new(&mem, 256, 0x38_0000),
            mem,
            pair,
            stats,
            peer,
            _tap: tap,
        }
    }

    impl Rig {
        fn m(&self) -> Arc<Mem> {
            self.mem.memory().into_inner()
        }

        fn header(&self, at: u64, gso_type: u8, gso_size: u16) {
            let mut h = [0u8; 12];
            h[1] = gso_type;
            h[4..6].copy_from_slice(&gso_size.to_le_bytes());
            self.m().write_slice(&h, GuestAddress(at)).unwrap();
        }

        fn peer_recv(&self) -> Option<Vec<u8>> {
            let mut buf = vec![0u8; 70_000];
            // SAFETY: reads into `buf`, which is as long as the length passed.
            let n = unsafe {
                libc::recv(
                    self.peer.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            (n >= 0).then(|| {
                buf.truncate(n as usize);
                buf
            })
        }

        fn peer_send(&self, data: &[u8]) {
            // SAFETY: sends `data`, which is as long as the length passed.
            let n =
                unsafe { libc::send(self.peer.as_raw_fd(), data.as_ptr().cast(), data.len(), 0) };
            assert_eq!(n, data.len() as isize);
        }

        fn run_tx(&mut self) {
            let m = self.m();
            self.pair.process_tx(&self.tx.vring, &m);
        }

        fn run_rx(&mut self) {
            let m = self.m();
            self.pair.process_rx(&self.rx.vring, &m);
        }
    }

    fn frame(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
    }

    #[test]
    fn transmitted_frames_reach_the_host_as_they_are() {
        let mut r = rig(None);
        r.header(0x1000, 0, 0);
        let f = frame(60, 1);
        r.m().write_slice(&f, GuestAddress(0x2000)).unwrap();
        r.tx.publish(&[(0x1000, 12, 0), (0x2000, 60, 0)]);
        r.run_tx();
        assert_eq!(r.tx.used_idx(), 1);
        let got = r.peer_recv().expect("a frame on the tap");
        assert_eq!(got.len(), 72);
        assert_eq!(&got[12..], &f[..]);
        assert_eq!(r.stats.tx.packets.load(Ordering::Relaxed), 1);
        assert_eq!(r.stats.tx.bytes.load(Ordering::Relaxed), 60);
        // One pass took one chain: a burst of one.
        let b = r.stats.tx_burst.snapshot();
        assert_eq!((b.count, b.sum), (1, 1));
        // Header and frame in one buffer: one plain write.
        let mut one = vec![0u8; 12];
        one.extend(frame(100, 2));
        r.m().write_slice(&one, GuestAddress(0x4000)).unwrap();
        r.tx.publish(&[(0x4000, 112, 0)]);
        r.run_tx();
        assert_eq!(r.tx.used_idx(), 2);
        assert_eq!(r.peer_recv(), Some(one));
    }

    #[test]
    fn hostile_transmit_chains_are_dropped_and_counted() {
        let mut r = rig(None);
        r.pair.gso_ok = true;
        r.header(0x1000, 1, 0); // TCPv4 GSO with gso_size 0
        r.tx.publish(&[(0x1000, 12, 0), (0x2000, 60, 0)]);
        r.header(0x1100, 0, 0);
        r.tx.publish(&[(0x1100, 12, 0), (0x3f_ff00, 0x1000, 0)]); // past the end of memory
        r.tx.publish(&[(0x1100, 12, 0), (0x2000, 60, WRITE)]); // device-writable
        r.tx.publish(&[(0x1100, 8, 0)]); // shorter than a header
        r.header(0x1200, 0x33, 1400); // unknown GSO type
        r.tx.publish(&[(0x1200, 12, 0), (0x2000, 60, 0)]);
        r.header(0x1300, 0, 0);
        r.tx.publish(&[(0x1300, 12, 0), (0x2000, 60, 0)]); // a good one after them
        r.run_tx();
        assert_eq!(r.tx.used_idx(), 6, "every chain is returned");
        for i in 0..5 {
            assert_eq!(r.tx.used(i).1, 0);
        }
        assert_eq!(r.stats.tx.drops.load(Ordering::Relaxed), 5);
        assert_eq!(
            r.peer_recv().map(|f| f.len()),
            Some(72),
            "only the good frame"
        );
        assert_eq!(r.peer_recv(), None);
        assert!(r.pair.last_drop().is_some());
    }

    #[test]
    fn one_writev_per_frame_without_io_uring() {
        let mut r = rig_with(None, false);
        r.header(0x1000, 0, 0);
        for i in 0..3u8 {
            let f = frame(60 + usize::from(i), i);
            r.m()
                .write_slice(&f, GuestAddress(0x2000 + 0x100 * u64::from(i)))
                .unwrap();
            r.tx.publish(&[
                (0x1000, 12, 0),
                (0x2000 + 0x100 * u64::from(i), 60 + u32::from(i), 0),
            ]);
        }
        r.run_tx();
        assert_eq!(r.tx.used_idx(), 3);
        for i in 0..3 {
            assert_eq!(r.peer_recv().map(|f| f.len()), Some(72 + i));
        }
        assert_eq!(r.stats.tx.packets.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn chains_are_used_in_the_order_they_came_even_around_a_bad_one() {
        let mut r = rig(None);
        r.header(0x1000, 0, 0);
        let good = r.tx.publish(&[(0x1000, 12, 0), (0x2000, 60, 0)]);
        let bad = r.tx.publish(&[(0x1000, 12, 0), (0x2000, 60, WRITE)]);
        let good2 = r.tx.publish(&[(0x1000, 12, 0), (0x2000, 60, 0)]);
        r.run_tx();
        let ids: Vec<u32> = (0..3).map(|i| r.tx.used(i).0).collect();
        assert_eq!(ids, [good, bad, good2].map(u32::from));
        assert!(r.peer_recv().is_some() && r.peer_recv().is_some());
    }

    #[test]
    fn a_broken_avail_index_is_not_served_and_does_not_spin() {
        let mut r = rig(None);
        r.header(0x1000, 0, 0);
        r.tx.publish(&[(0x1000, 12, 0), (0x2000, 60, 0)]);
        r.rx.publish(&[(0x10000, 1526, WRITE)]);
        r.peer_send(&[0u8; 80]);
        for q in [&r.tx, &r.rx] {
            r.m()
                .write_obj(300u16, GuestAddress(q.avail_addr() + 2))
                .unwrap();
        }
        r.run_tx();
        r.run_rx();
        assert_eq!((r.tx.used_idx(), r.rx.used_idx()), (0, 0));
        assert_eq!(r.peer_recv(), None);
    }

    #[test]
    fn a_full_batch_and_more_in_one_kick() {
        let mut r = rig(None);
        r.header(0x1000, 0, 0);
        for _ in 0..(TX_BATCH + 10) {
            r.tx.publish(&[(0x1000, 12, 0), (0x2000, 100, 0)]);
        }
        r.run_tx();
        assert_eq!(usize::from(r.tx.used_idx()), TX_BATCH + 10);
        let mut n = 0;
        while r.peer_recv().is_some() {
            n += 1;
        }
        assert_eq!(n, TX_BATCH + 10);
    }

    #[test]
    fn received_frames_land_in_guest_buffers() {
        let mut r = rig(None);
        let mut pkt = vec![0u8; 12];
        pkt.extend(frame(100, 2));
        r.peer_send(&pkt);
        r.rx.publish(&[(0x10000, 1526, WRITE)]);
        r.run_rx();
        assert_eq!(r.rx.used_idx(), 1);
        assert_eq!(r.rx.used(0), (0, 112));
        let mut got = vec![0u8; 112];
        r.m().read_slice(&mut got, GuestAddress(0x10000)).unwrap();
        assert_eq!(&got[12..], &pkt[12..]);
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
        assert_eq!(r.stats.rx.bytes.load(Ordering::Relaxed), 100);
        let b = r.stats.rx_burst.snapshot();
        assert_eq!((b.count, b.sum), (1, 1), "one pass received one frame");
        assert!(
            r.stats.tx_burst.snapshot().count == 0,
            "no transmit pass took a chain"
        );
    }

    #[test]
    fn a_large_frame_spans_mergeable_buffers_and_unused_ones_go_back() {
        let mut r = rig(None);
        r.pair.rx_max = HDR_LEN + 65_550;
        let mut pkt = vec![0u8; 12];
        pkt.extend(frame(2500, 3));
        r.peer_send(&pkt);
        for i in 0..4u64 {
            r.rx.publish(&[(0x10000 + i * 0x1000, 1000, WRITE)]);
        }
        r.run_rx();
        assert_eq!(r.rx.used_idx(), 3);
        assert_eq!(r.rx.used(0).1, 1000);
        assert_eq!(r.rx.used(1).1, 1000);
        assert_eq!(r.rx.used(2).1, 512);
        let mut got = Vec::new();
        for (i, n) in [(0u64, 1000usize), (1, 1000), (2, 512)] {
            let mut b = vec![0u8; n];
            r.m()
                .read_slice(&mut b, GuestAddress(0x10000 + i * 0x1000))
                .unwrap();
            got.extend(b);
        }
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
        assert_eq!(&got[12..], &pkt[12..]);
        // The fourth buffer went back to the ring: the next frame uses it.
        r.peer_send(&pkt[..112]);
        r.run_rx();
        assert_eq!(r.rx.used_idx(), 4);
        assert_eq!(r.rx.used(3), (3, 112));
    }

    #[test]
    fn frames_of_one_burst_share_the_chains_taken_and_the_rest_go_back() {
        let mut r = rig(None);
        r.pair.rx_max = HDR_LEN + 65_550;
        let mut sent = Vec::new();
        for (len, seed) in [(1500usize, 1u8), (60, 2), (2100, 3)] {
            let mut pkt = vec![0u8; 12];
            pkt.extend(frame(len, seed));
            r.peer_send(&pkt);
            sent.push(pkt);
        }
        for i in 0..12u64 {
            r.rx.publish(&[(0x10000 + i * 0x1000, 1024, WRITE)]);
        }
        r.run_rx();
        // 1512 bytes in 2 buffers, 72 in 1, 2112 in 3: six used, in order, six left.
        assert_eq!(r.rx.used_idx(), 6);
        let lens: Vec<u32> = (0..6).map(|i| r.rx.used(i).1).collect();
        assert_eq!(lens, [1024, 488, 72, 1024, 1024, 64]);
        let ids: Vec<u32> = (0..6).map(|i| r.rx.used(i).0).collect();
        assert_eq!(ids, [0, 1, 2, 3, 4, 5]);
        let read = |first: u64, lens: &[u32]| {
            let mut out = Vec::new();
            for (k, &n) in lens.iter().enumerate() {
                let mut b = vec![0u8; n as usize];
                r.m()
                    .read_slice(&mut b, GuestAddress(0x10000 + (first + k as u64) * 0x1000))
                    .unwrap();
                out.extend(b);
            }
            out
        };
        for (first, lens, pkt, bufs) in [
            (0u64, &lens[0..2], &sent[0], 2u16),
            (2, &lens[2..3], &sent[1], 1),
            (3, &lens[3..6], &sent[2], 3),
        ] {
            let got = read(first, lens);
            assert_eq!(u16::from_le_bytes([got[10], got[11]]), bufs, "num_buffers");
            assert_eq!(&got[12..], &pkt[12..]);
        }
        // The six chains taken but not used went back: the next frame starts at buffer 6.
        r.peer_send(&sent[1]);
        r.run_rx();
        assert_eq!(r.rx.used_idx(), 7);
        assert_eq!(r.rx.used(6), (6, 72));
    }

    #[test]
    fn without_buffers_frames_wait_on_the_host_and_bad_buffers_are_skipped() {
        let mut r = rig(None);
        let mut pkt = vec![0u8; 12];
        pkt.extend(frame(200, 4));
        r.peer_send(&pkt);
        r.run_rx();
        assert_eq!(r.rx.used_idx(), 0, "no buffers: nothing happens");
        r.rx.publish(&[(0x3f_ff00, 0x1000, WRITE)]); // outside guest memory
        r.rx.publish(&[(0x10000, 8, WRITE)]); // no room for a header
        r.rx.publish(&[(0x20000, 1526, WRITE)]);
        r.run_rx();
        assert_eq!(r.rx.used_idx(), 3);
        assert_eq!(r.rx.used(0).1, 0);
        assert_eq!(r.rx.used(1).1, 0);
        assert_eq!(r.rx.used(2).1, 212);
        assert_eq!(r.stats.rx.drops.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn the_receive_limit_holds_a_frame_until_the_window_ends() {
        // 1 Mbit/s in 10 ms windows: 1250 bytes of credit per window.
        let mut r = rig(Some("1Mb/s@10ms"));
        let mut pkt = vec![0u8; 12];
        pkt.extend(frame(1000, 5));
        r.peer_send(&pkt);
        r.peer_send(&pkt);
        for i in 0..2u64 {
            r.rx.publish(&[(0x10000 + i * 0x1000, 1526, WRITE)]);
        }
        r.run_rx();
        assert_eq!(
            r.rx.used_idx(),
            1,
            "the second frame waits for the next window"
        );
        assert_eq!(r.stats.rx.stalls.load(Ordering::Relaxed), 1);
        std::thread::sleep(Duration::from_millis(12));
        let m = r.m();
        r.pair.rx_timer_fired(&r.rx.vring, &m);
        assert_eq!(r.rx.used_idx(), 2);
        assert_eq!(r.stats.rx.packets.load(Ordering::Relaxed), 2);
    }
}
