//! One queue pair's data path: the transmit loop (guest → host), the receive loop (host →
//! guest) and the rate limits of both directions. Each pair is served by its own thread.
//!
//! Transmit: chains are validated ([`check_tx`]), charged to the `rate=` credit and written to
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
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::timerfd::TimerFd;

use crate::device::{HDR_LEN, check_tx, fill_rx};
use crate::rate::{CreditLimiter, Nanos, Verdict};
use vback_common::chain::collect_iovecs;

pub(crate) type Mem = GuestMemoryMmap<()>;
pub(crate) type Vring = VringRwLock<vm_memory::GuestMemoryAtomic<Mem>>;

/// Frames per transmit batch (one io_uring submission).
const TX_BATCH: usize = 64;
/// Segments of one frame's chain (Linux sends at most MAX_SKB_FRAGS + 2, 19 by default).
const MAX_SEGS: usize = 128;
/// Receive chains one frame may span (64 KiB in buffers of at least 1 KiB, as Linux posts).
const MAX_RX_CHAINS: usize = 80;

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
    slots: Vec<TxSlot>,
    rx_iov: Vec<libc::iovec>,
    rx_chains: Vec<(u16, u64)>,
    held: Option<HeldRx>,
    /// The largest frame the guest may be handed (with the header).
    pub rx_max: u64,
    /// MRG_RXBUF negotiated.
    pub mergeable: bool,
    /// Host segmentation offload negotiated (GSO frames from the guest are acceptable).
    pub gso_ok: bool,
    last_drop: Option<&'static str>,
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

// SAFETY: the raw iovec pointers in `rx_iov` are scratch space, rebuilt before every use and only
// used by the pair's own thread (the pair sits in a Mutex).
unsafe impl Send for Pair {}

fn now() -> Nanos {
    crate::vhost::now()
}

impl Pair {
    /// A pair. The transmit ring is created for a tap; if io_uring is unavailable, frames are
    /// written one `writev` at a time.
    pub fn new(
        index: usize,
        io: HostIo,
        stats: Arc<PairStats>,
        tx_limit: Option<CreditLimiter>,
        rx_limit: Option<CreditLimiter>,
    ) -> io::Result<Pair> {
        let ring = match io {
            HostIo::Tap(_) => match IoUring::new(TX_BATCH as u32) {
                Ok(r) => Some(r),
                Err(e) => {
                    log::warn!(
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
            slots: (0..TX_BATCH)
                .map(|_| TxSlot {
                    iov: Vec::with_capacity(MAX_SEGS),
                    head: 0,
                    len: 0,
                })
                .collect(),
            rx_iov: Vec::with_capacity(256),
            rx_chains: Vec::with_capacity(MAX_RX_CHAINS),
            held: None,
            rx_max: HDR_LEN + 1514 + 4,
            mergeable: true,
            gso_ok: false,
            last_drop: None,
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
        let _ = self.tx_timer.clear();
        let _ = self.rx_timer.clear();
    }

    fn drop_frame(&mut self, c: &Counters, reason: &'static str) {
        c.drops.fetch_add(1, Ordering::Relaxed);
        self.last_drop = Some(reason);
        log::debug!("queue pair {}: dropped a frame: {reason}", self.index);
    }

    fn arm(timer: &mut TimerFd, until: Nanos) {
        let wait = Duration::from_nanos(until.saturating_sub(now()).max(1000));
        if let Err(e) = timer.reset(wait, None) {
            log::error!("cannot arm a rate timer: {e}");
        }
    }

    /// The transmit window ended.
    pub fn tx_timer_fired(&mut self) {
        let _ = self.tx_timer.wait();
        if let Some(l) = self.tx_limit.as_mut() {
            l.timer_fired(now());
        }
    }

    /// Serves the transmit queue until it is empty or the rate limit stalls it.
    pub fn process_tx(&mut self, vring: &Vring, mem: &Arc<Mem>) {
        let stats = self.stats.clone();
        let tx = &stats.tx;
        let mut signal = false;
        loop {
            let mut st = vring.get_mut();
            let _ = st.disable_notification();
            let mut n = 0;
            let mut stalled = false;
            let mut popped_any = false;
            while n < TX_BATCH {
                let Some(chain) = st.get_queue_mut().pop_descriptor_chain(&**mem) else {
                    break;
                };
                popped_any = true;
                let head = chain.head_index();
                let frame = match check_tx(&**mem, chain.clone(), self.gso_ok) {
                    Ok(f) => f,
                    Err(reason) => {
                        self.drop_frame(tx, reason);
                        let _ = st.add_used(head, 0);
                        signal = true;
                        continue;
                    }
                };
                if let Some(l) = self.tx_limit.as_mut() {
                    match l.check(now(), frame.len) {
                        Verdict::Send => l.charge(frame.len),
                        Verdict::StallUntil(t) => {
                            st.get_queue_mut().go_to_previous_position();
                            tx.stalls.fetch_add(1, Ordering::Relaxed);
                            Self::arm(&mut self.tx_timer, t);
                            stalled = true;
                            break;
                        }
                    }
                }
                match self.io {
                    HostIo::Null { .. } => {
                        tx.packets.fetch_add(1, Ordering::Relaxed);
                        tx.bytes.fetch_add(frame.len, Ordering::Relaxed);
                        let _ = st.add_used(head, 0);
                        signal = true;
                    }
                    HostIo::Tap(_) => {
                        let slot = &mut self.slots[n];
                        slot.iov.clear();
                        if !collect_iovecs(
                            &**mem,
                            chain,
                            false,
                            0,
                            HDR_LEN + frame.len,
                            &mut slot.iov,
                            MAX_SEGS,
                        ) {
                            self.drop_frame(tx, "a transmit chain of more than 128 segments");
                            let _ = st.add_used(head, 0);
                            signal = true;
                            continue;
                        }
                        slot.head = head;
                        slot.len = frame.len;
                        n += 1;
                    }
                }
            }
            if n > 0 {
                self.write_batch(n);
                for i in 0..n {
                    let _ = st.add_used(self.slots[i].head, 0);
                }
                signal = true;
            }
            if stalled {
                break;
            }
            if n == TX_BATCH {
                continue;
            }
            match st.enable_notification() {
                Ok(true) if popped_any => continue,
                _ => break,
            }
        }
        if signal {
            let mut st = vring.get_mut();
            if st.needs_notification().unwrap_or(true) {
                let _ = st.signal_used_queue();
            }
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
                    let e = opcode::Writev::new(
                        types::Fd(fd),
                        slot.iov.as_ptr(),
                        slot.iov.len() as u32,
                    )
                    .build()
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
                    log::error!("io_uring submit failed: {e}");
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
                self.drop_frame(tx, reason);
            }
        }
    }

    /// The receive window ended: publishes a held frame.
    pub fn rx_timer_fired(&mut self, vring: &Vring) {
        let _ = self.rx_timer.wait();
        if let Some(l) = self.rx_limit.as_mut() {
            l.timer_fired(now());
        }
        if let Some(h) = self.held.take() {
            if let Some(l) = self.rx_limit.as_mut() {
                l.charge(h.len);
            }
            let mut st = vring.get_mut();
            for (head, len) in h.used {
                let _ = st.add_used(head, len);
            }
            self.stats.rx.packets.fetch_add(1, Ordering::Relaxed);
            self.stats.rx.bytes.fetch_add(h.len, Ordering::Relaxed);
            if st.needs_notification().unwrap_or(true) {
                let _ = st.signal_used_queue();
            }
        }
    }

    /// Moves frames from the host into the receive queue until the host has none, the guest has
    /// no buffers or the receive limit stalls.
    pub fn process_rx(&mut self, vring: &Vring, mem: &Arc<Mem>) {
        if self.held.is_some() {
            return;
        }
        let mut signal = false;
        loop {
            let mut st = vring.get_mut();
            let _ = st.disable_notification();
            let mut out_of_buffers = false;
            loop {
                match self.receive_one(&mut st, mem) {
                    Rx::Done => signal = true,
                    Rx::HostEmpty => break,
                    Rx::NoBuffers => {
                        out_of_buffers = true;
                        break;
                    }
                    Rx::Held => {
                        signal = true;
                        out_of_buffers = false;
                        break;
                    }
                }
                if self.held.is_some() {
                    break;
                }
            }
            if !out_of_buffers || self.held.is_some() {
                // The host is empty (a new frame wakes us) or the limit holds us.
                let _ = st.enable_notification();
                break;
            }
            // No buffers: ask the guest to kick when it adds some, then look again (it may have
            // added them before notifications were on).
            match st.enable_notification() {
                Ok(true) => continue,
                _ => break,
            }
        }
        if signal {
            let mut st = vring.get_mut();
            if st.needs_notification().unwrap_or(true) {
                let _ = st.signal_used_queue();
            }
        }
    }

    fn receive_one(
        &mut self,
        st: &mut vhost_user_backend::VringState<vm_memory::GuestMemoryAtomic<Mem>>,
        mem: &Arc<Mem>,
    ) -> Rx {
        let stats = self.stats.clone();
        let rx = &stats.rx;
        match &self.io {
            HostIo::Null { frame, flood } => {
                if !*flood {
                    return Rx::HostEmpty;
                }
                let frame = frame.clone();
                let Some(chain) = st.get_queue_mut().pop_descriptor_chain(&**mem) else {
                    return Rx::NoBuffers;
                };
                let head = chain.head_index();
                let len = match fill_rx(&**mem, chain, &frame) {
                    Some(n) => {
                        rx.packets.fetch_add(1, Ordering::Relaxed);
                        rx.bytes.fetch_add(frame.len() as u64, Ordering::Relaxed);
                        n
                    }
                    None => {
                        self.drop_frame(rx, "a receive buffer too small for the frame");
                        0
                    }
                };
                let _ = st.add_used(head, len);
                Rx::Done
            }
            HostIo::Tap(fd) => {
                let fd = *fd;
                self.rx_iov.clear();
                self.rx_chains.clear();
                let mut cap = 0u64;
                while cap < self.rx_max && self.rx_chains.len() < MAX_RX_CHAINS {
                    if !self.rx_chains.is_empty() && !self.mergeable {
                        break;
                    }
                    let Some(chain) = st.get_queue_mut().pop_descriptor_chain(&**mem) else {
                        break;
                    };
                    let head = chain.head_index();
                    let before = self.rx_iov.len();
                    let room: u64 = chain
                        .clone()
                        .filter(|d| d.is_write_only())
                        .map(|d| u64::from(d.len()))
                        .sum();
                    if room < HDR_LEN
                        || !collect_iovecs(&**mem, chain, true, 0, room, &mut self.rx_iov, 1024)
                    {
                        // A chain we cannot use: return it empty so the guest gets it back.
                        self.rx_iov.truncate(before);
                        self.drop_frame(
                            rx,
                            "a receive chain with no room for a header, or outside guest memory",
                        );
                        let _ = st.add_used(head, 0);
                        continue;
                    }
                    self.rx_chains.push((head, room));
                    cap += room;
                }
                if self.rx_chains.is_empty() {
                    return Rx::NoBuffers;
                }
                // SAFETY: every iovec describes writable guest memory (checked by
                // collect_iovecs) that `mem` keeps mapped during the call.
                let r = unsafe {
                    libc::readv(fd, self.rx_iov.as_ptr(), self.rx_iov.len().min(1024) as i32)
                };
                if r <= 0 {
                    for _ in 0..self.rx_chains.len() {
                        st.get_queue_mut().go_to_previous_position();
                    }
                    if r < 0 {
                        let e = io::Error::last_os_error();
                        if e.raw_os_error() != Some(libc::EAGAIN) {
                            log::warn!("queue pair {}: reading the tap: {e}", self.index);
                        }
                    }
                    return Rx::HostEmpty;
                }
                let n = r as u64;
                // Which chains hold the frame; return the rest to the ring.
                let mut left = n;
                let mut used = 0;
                let mut lens: Vec<(u16, u32)> = Vec::new();
                for &(head, room) in &self.rx_chains {
                    if left == 0 {
                        break;
                    }
                    let take = left.min(room);
                    lens.push((head, take as u32));
                    left -= take;
                    used += 1;
                }
                for _ in used..self.rx_chains.len() {
                    st.get_queue_mut().go_to_previous_position();
                }
                // num_buffers, in the first chain's header (the tap leaves it alone).
                write_num_buffers(&self.rx_iov, used as u16);
                let frame_len = n.saturating_sub(HDR_LEN);
                if let Some(l) = self.rx_limit.as_mut() {
                    match l.check(now(), frame_len) {
                        Verdict::Send => l.charge(frame_len),
                        Verdict::StallUntil(t) => {
                            rx.stalls.fetch_add(1, Ordering::Relaxed);
                            Self::arm(&mut self.rx_timer, t);
                            self.held = Some(HeldRx {
                                used: lens,
                                len: frame_len,
                            });
                            return Rx::Held;
                        }
                    }
                }
                for (head, len) in lens {
                    let _ = st.add_used(head, len);
                }
                rx.packets.fetch_add(1, Ordering::Relaxed);
                rx.bytes.fetch_add(frame_len, Ordering::Relaxed);
                Rx::Done
            }
        }
    }

    /// The null side's generator tick: one frame into the receive queue.
    pub fn generate(&mut self, vring: &Vring, mem: &Arc<Mem>) {
        let HostIo::Null { frame, .. } = &self.io else {
            return;
        };
        let frame = frame.clone();
        let mut st = vring.get_mut();
        let Some(chain) = st.get_queue_mut().pop_descriptor_chain(&**mem) else {
            return; // no buffer: the frame is not generated
        };
        let head = chain.head_index();
        let len = match fill_rx(&**mem, chain, &frame) {
            Some(n) => {
                self.stats.rx.packets.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .rx
                    .bytes
                    .fetch_add(frame.len() as u64, Ordering::Relaxed);
                n
            }
            None => {
                self.stats.rx.drops.fetch_add(1, Ordering::Relaxed);
                0
            }
        };
        let _ = st.add_used(head, len);
        if st.needs_notification().unwrap_or(true) {
            let _ = st.signal_used_queue();
        }
    }
}

/// Writes `num_buffers` (bytes 10 and 11 of the header, which starts the first chain) through
/// the receive iovecs.
fn write_num_buffers(iovs: &[libc::iovec], n: u16) {
    for (i, b) in n.to_le_bytes().into_iter().enumerate() {
        let mut off = 10 + i;
        for v in iovs {
            if off < v.iov_len {
                // `v` is a writable guest-memory iovec (from collect_iovecs) kept mapped by the
                // caller, and `off` lies inside it.
                let p = v.iov_base.cast::<u8>().wrapping_add(off);
                // SAFETY: `p` points at a byte of a writable guest-memory iovec that the caller keeps mapped.
                unsafe { p.write_volatile(b) };
                break;
            }
            off -= v.iov_len;
        }
    }
}

enum Rx {
    Done,
    HostEmpty,
    NoBuffers,
    Held,
}
