//! The vhost-user side of netback: the only module that knows vhost-user. Queue pair `i` is
//! vrings `2i` (receive, host → guest) and `2i + 1` (transmit, guest → host), served by worker
//! thread `i`; the control queue (vring `2 × pairs`) is served by thread 0. Besides its vrings,
//! each thread waits on its tap queue (edge-triggered) and its two rate-limit timers; thread 0
//! also runs the null host side's frame generator.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vback_common::spec::MacAddr;
use vback_common::sync::lock;
use vback_common::vhost_user::{VhostUserBackend, VringEpollHandler, VringT};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_config::{VIRTIO_F_IN_ORDER, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use crate::ctrl::{self, Command, CtrlError};
use crate::device::HDR_LEN;
use crate::pair::{Counters, HostIo, Mem, Pair, PairStats, Vring};
use crate::rate::{CreditLimiter, Nanos};
use crate::tap::{Tap, offload_flags};

/// Monotonic nanoseconds for the rate limiters.
pub fn now() -> Nanos {
    static START: OnceLock<Instant> = OnceLock::new();
    u64::try_from(START.get_or_init(Instant::now).elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Where the frames go.
#[derive(Debug, Clone)]
pub enum HostSide {
    /// A kernel tap with one queue per pair.
    Tap(Arc<Tap>),
    /// Nothing (see [`HostIo::Null`]). `tick`: send the guest one frame per tick; `flood`: fill
    /// every receive buffer.
    Null {
        /// The frame the guest receives.
        frame: Vec<u8>,
        /// One frame per tick.
        tick: Option<Duration>,
        /// Fill every buffer.
        flood: bool,
    },
}

/// The device's settings.
#[derive(Debug, Clone)]
pub struct NetOptions {
    /// Queue pairs (1 to 16).
    pub pairs: usize,
    /// The guest's MAC (config space).
    pub mac: MacAddr,
    /// MTU offered to the guest.
    pub mtu: Option<u16>,
    /// Guest transmit limit.
    pub tx_rate: Option<vback_common::spec::Rate>,
    /// Guest receive limit.
    pub rx_rate: Option<vback_common::spec::Rate>,
    /// Busy-poll window of an empty ring.
    pub poll: Duration,
    /// Write transmitted frames to the tap in io_uring batches (else one `writev` each).
    pub tap_batch: bool,
}

/// The backend, cloned into every connection.
#[derive(Clone, Debug)]
pub struct NetBackend {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    opts: NetOptions,
    host: HostSide,
    pairs: Vec<Mutex<Pair>>,
    stats: Vec<Arc<PairStats>>,
    gen_timer: Mutex<TimerFd>,
    mem: Mutex<Option<Arc<Mem>>>,
    acked: AtomicU64,
    active_pairs: AtomicUsize,
    attached: Vec<std::sync::atomic::AtomicBool>,
    ctrl_errors: AtomicU64,
}

impl NetBackend {
    /// A backend over `host`.
    pub fn new(opts: NetOptions, host: HostSide) -> io::Result<NetBackend> {
        let pairs = opts.pairs.clamp(1, 16);
        let stats: Vec<Arc<PairStats>> = (0..pairs).map(|_| Arc::default()).collect();
        let mut list = Vec::with_capacity(pairs);
        for (i, s) in stats.iter().enumerate() {
            let io = match &host {
                HostSide::Tap(t) => HostIo::Tap(t.queue_fd(i).ok_or_else(|| {
                    io::Error::other(format!("the tap has no queue {i} (it has {})", t.queues()))
                })?),
                HostSide::Null { frame, flood, .. } => HostIo::Null {
                    frame: frame.clone(),
                    flood: *flood,
                },
            };
            let tx = opts.tx_rate.map(|r| CreditLimiter::new(&r, now()));
            let rx = opts.rx_rate.map(|r| CreditLimiter::new(&r, now()));
            let mut p = Pair::new(i, io, s.clone(), tx, rx, opts.tap_batch)?;
            p.rx_max = rx_max(opts.mtu, false);
            p.poll = opts.poll;
            list.push(Mutex::new(p));
        }
        if let HostSide::Tap(t) = &host {
            for q in 1..pairs {
                if let Err(e) = t.set_queue_attached(q, false) {
                    vback_common::warn_limited!("{e}");
                }
            }
        }
        Ok(NetBackend {
            inner: Arc::new(Inner {
                opts: NetOptions { pairs, ..opts },
                host,
                pairs: list.into_iter().collect(),
                stats,
                gen_timer: Mutex::new(TimerFd::new()?),
                mem: Mutex::new(None),
                acked: AtomicU64::new(0),
                active_pairs: AtomicUsize::new(1),
                attached: (0..pairs)
                    .map(|i| std::sync::atomic::AtomicBool::new(i == 0))
                    .collect(),
                ctrl_errors: AtomicU64::new(0),
            }),
        })
    }

    fn pairs(&self) -> usize {
        self.inner.pairs.len()
    }

    fn ctrl_index(&self) -> usize {
        2 * self.pairs()
    }

    fn token(&self, k: u16) -> u16 {
        // Tokens 0..=num_queues belong to the vrings and the worker's wake-up event.
        self.num_queues() as u16 + k
    }

    /// Burst-size histograms for the control socket, per queue pair and direction.
    pub fn histograms(&self) -> Vec<vback_api::LabeledHistogram> {
        let mut out = Vec::new();
        for (i, s) in self.inner.stats.iter().enumerate() {
            for (dir, h) in [("rx", &s.rx_burst), ("tx", &s.tx_burst)] {
                let histogram = h.snapshot();
                if histogram.count > 0 {
                    out.push(vback_api::LabeledHistogram {
                        name: "burst_frames".into(),
                        labels: [("queue", i.to_string()), ("dir", dir.to_owned())]
                            .into_iter()
                            .map(|(k, v)| (k.to_owned(), v))
                            .collect(),
                        histogram,
                    });
                }
            }
        }
        out
    }

    /// Stats for the control socket: totals and per queue pair.
    pub fn stats(&self) -> Value {
        let (rx, tx) = (Counters::default(), Counters::default());
        let mut queues = Vec::new();
        for s in &self.inner.stats {
            rx.add(&s.rx);
            tx.add(&s.tx);
            queues.push(json!({"rx": s.rx.to_json(), "tx": s.tx.to_json()}));
        }
        let last = self.inner.pairs.iter().find_map(|p| lock(p).last_drop());
        json!({
            "rx": rx.to_json(),
            "tx": tx.to_json(),
            "queues": queues,
            "active_pairs": self.inner.active_pairs.load(Ordering::Relaxed),
            "control_errors": self.inner.ctrl_errors.load(Ordering::Relaxed),
            "last_drop_reason": last,
        })
    }

    /// Registers the tap queues and timers with a new connection's worker threads and starts
    /// the generator.
    pub fn register(&self, handlers: &[Arc<VringEpollHandler<NetBackend>>]) -> io::Result<()> {
        for (i, h) in handlers.iter().enumerate() {
            let Some(p) = self.inner.pairs.get(i) else {
                break;
            };
            let p = lock(p);
            if let Some(fd) = p.tap_fd() {
                h.register_listener(
                    fd,
                    EventSet::IN | EventSet::EDGE_TRIGGERED,
                    u64::from(self.token(TAP)),
                )?;
            }
            h.register_listener(
                p.tx_timer.as_raw_fd(),
                EventSet::IN,
                u64::from(self.token(TX_TIMER)),
            )?;
            h.register_listener(
                p.rx_timer.as_raw_fd(),
                EventSet::IN,
                u64::from(self.token(RX_TIMER)),
            )?;
        }
        if let (HostSide::Null { tick: Some(t), .. }, Some(h)) =
            (&self.inner.host, handlers.first())
        {
            let mut timer = lock(&self.inner.gen_timer);
            h.register_listener(
                timer.as_raw_fd(),
                EventSet::IN,
                u64::from(self.token(GEN_TIMER)),
            )?;
            timer
                .reset(*t, Some(*t))
                .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        }
        Ok(())
    }

    /// The front end went away: forget its state; the host link loses its carrier.
    pub fn disconnected(&self) {
        for p in &self.inner.pairs {
            lock(p).reset();
        }
        *lock(&self.inner.mem) = None;
        if let HostSide::Tap(t) = &self.inner.host {
            for q in 1..self.pairs() {
                let _ = t.set_queue_attached(q, false);
                self.inner.attached[q].store(false, Ordering::Relaxed);
            }
            if let Err(e) = t.set_carrier(false) {
                vback_common::warn_limited!("{e}");
            }
        }
        self.inner.active_pairs.store(1, Ordering::Relaxed);
    }

    fn mem(&self) -> Option<Arc<Mem>> {
        lock(&self.inner.mem).clone()
    }

    /// A pair is in use: its tap queue gets frames.
    fn attach(&self, pair: usize) {
        if self.inner.attached[pair].swap(true, Ordering::Relaxed) {
            return;
        }
        if pair >= self.inner.active_pairs.load(Ordering::Relaxed) && pair > 0 {
            self.inner
                .active_pairs
                .fetch_max(pair + 1, Ordering::Relaxed);
        }
        if let HostSide::Tap(t) = &self.inner.host
            && let Err(e) = t.set_queue_attached(pair, true)
        {
            vback_common::warn_limited!("{e}");
        }
    }

    fn set_pairs(&self, n: usize) {
        self.inner.active_pairs.store(n, Ordering::Relaxed);
        for q in 1..self.pairs() {
            let on = q < n;
            self.inner.attached[q].store(on, Ordering::Relaxed);
            if let HostSide::Tap(t) = &self.inner.host
                && let Err(e) = t.set_queue_attached(q, on)
            {
                vback_common::warn_limited!("{e}");
            }
        }
    }

    fn process_ctrl(&self, vring: &Vring, mem: &Arc<Mem>) {
        let mut st = vring.get_mut();
        if !st.get_queue().ready() {
            return;
        }
        let mut any = false;
        while let Some(chain) = st.get_queue_mut().pop_descriptor_chain(&**mem) {
            let head = chain.head_index();
            let status = match ctrl::parse(&**mem, chain.clone()) {
                Ok(Command::QueuePairs(n)) if (1..=self.pairs()).contains(&usize::from(n)) => {
                    self.set_pairs(usize::from(n));
                    ctrl::ACK_OK
                }
                Ok(Command::QueuePairs(n)) => {
                    vback_common::warn_limited!(
                        "the guest asked for {n} queue pairs; this interface has {}",
                        self.pairs()
                    );
                    ctrl::ACK_ERR
                }
                Ok(Command::GuestOffloads(f)) => {
                    if let HostSide::Tap(t) = &self.inner.host {
                        let acked = self.inner.acked.load(Ordering::Relaxed);
                        match t.set_offload(offload_flags(f & acked)) {
                            Ok(()) => ctrl::ACK_OK,
                            Err(e) => {
                                vback_common::warn_limited!("{e}");
                                ctrl::ACK_ERR
                            }
                        }
                    } else {
                        ctrl::ACK_OK
                    }
                }
                Ok(Command::Accepted) => ctrl::ACK_OK,
                Err(e) => {
                    self.inner.ctrl_errors.fetch_add(1, Ordering::Relaxed);
                    match e {
                        CtrlError::Malformed(why) => {
                            vback_common::warn_limited!("a malformed control request: {why}")
                        }
                        CtrlError::Unsupported(c, k) => {
                            log::debug!("control class {c} command {k} is not supported")
                        }
                    }
                    ctrl::ACK_ERR
                }
            };
            let len = ctrl::ack(&**mem, chain, status).unwrap_or(0);
            let _ = st.add_used(head, len);
            any = true;
        }
        if any && st.needs_notification().unwrap_or(true) {
            let _ = st.signal_used_queue();
        }
    }

    fn config_space(&self) -> Vec<u8> {
        let mut c = Vec::with_capacity(12);
        c.extend_from_slice(&self.inner.opts.mac.0);
        c.extend_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c.extend_from_slice(&(self.pairs() as u16).to_le_bytes());
        c.extend_from_slice(&self.inner.opts.mtu.unwrap_or(1500).to_le_bytes());
        c
    }
}

/// Token offsets above the vrings and the worker's wake-up event.
const TAP: u16 = 1;
const TX_TIMER: u16 = 2;
const RX_TIMER: u16 = 3;
const GEN_TIMER: u16 = 4;

/// The largest frame a receive may need room for, with the header.
fn rx_max(mtu: Option<u16>, large: bool) -> u64 {
    if large {
        HDR_LEN + 65_550
    } else {
        HDR_LEN + u64::from(mtu.unwrap_or(1500)) + 14 + 4
    }
}

impl VhostUserBackend for NetBackend {
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        2 * self.pairs() + 1
    }

    fn max_queue_size(&self) -> usize {
        1024
    }

    fn features(&self) -> u64 {
        let mut f = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_F_IN_ORDER
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_NET_F_MAC
            | 1 << VIRTIO_NET_F_STATUS
            | 1 << VIRTIO_NET_F_MRG_RXBUF
            | 1 << VIRTIO_NET_F_CTRL_VQ
            | 1 << VIRTIO_NET_F_CTRL_RX
            // After a live migration QEMU asks the guest to announce itself (gratuitous ARP,
            // IPv6 neighbour advertisements) through the config status; without it the
            // switches would keep sending the guest's frames to the source host's port.
            | 1 << VIRTIO_NET_F_GUEST_ANNOUNCE
            | 1 << VIRTIO_NET_F_CSUM
            | 1 << VIRTIO_NET_F_HOST_TSO4
            | 1 << VIRTIO_NET_F_HOST_TSO6
            | 1 << VIRTIO_NET_F_HOST_ECN
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if matches!(self.inner.host, HostSide::Tap(_)) {
            f |= 1 << VIRTIO_NET_F_GUEST_CSUM
                | 1 << VIRTIO_NET_F_GUEST_TSO4
                | 1 << VIRTIO_NET_F_GUEST_TSO6
                | 1 << VIRTIO_NET_F_GUEST_ECN
                | 1 << VIRTIO_NET_F_CTRL_GUEST_OFFLOADS;
        }
        if self.pairs() > 1 {
            f |= 1 << VIRTIO_NET_F_MQ;
        }
        if self.inner.opts.mtu.is_some() {
            f |= 1 << VIRTIO_NET_F_MTU;
        }
        f
    }

    fn acked_features(&self, features: u64) {
        self.inner.acked.store(features, Ordering::Release);
        let has = |b: u32| features & (1 << b) != 0;
        let offloads = offload_flags(features);
        let large = offloads
            & (crate::tap::TUN_F_TSO4 | crate::tap::TUN_F_TSO6 | crate::tap::TUN_F_UFO)
            != 0;
        for p in &self.inner.pairs {
            let mut p = lock(p);
            p.mergeable = has(VIRTIO_NET_F_MRG_RXBUF);
            p.gso_ok = has(VIRTIO_NET_F_HOST_TSO4)
                || has(VIRTIO_NET_F_HOST_TSO6)
                || has(VIRTIO_NET_F_HOST_UFO);
            p.rx_max = rx_max(self.inner.opts.mtu, large);
        }
        if let HostSide::Tap(t) = &self.inner.host {
            if let Err(e) = t.set_offload(offloads) {
                vback_common::warn_limited!("{e}");
            }
            if let Err(e) = t.set_carrier(true) {
                vback_common::warn_limited!("{e}");
            }
        }
        if !has(VIRTIO_F_VERSION_1) {
            vback_common::warn_limited!(
                "the front end did not accept VIRTIO_F_VERSION_1; netback speaks only the 12-byte virtio-net header"
            );
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        let mut p = VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::CONFIG;
        if self.pairs() > 1 {
            p |= VhostUserProtocolFeatures::MQ;
        }
        p
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let c = self.config_space();
        let start = (offset as usize).min(c.len());
        let end = start.saturating_add(size as usize).min(c.len());
        let mut out = c[start..end].to_vec();
        out.resize(size as usize, 0);
        out
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn update_memory(&self, mem: GuestMemoryAtomic<Mem>) -> io::Result<()> {
        *lock(&self.inner.mem) = Some(mem.memory().into_inner());
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.pairs())
            .map(|i| {
                let mut m = 0b11u64 << (2 * i);
                if i == 0 {
                    m |= 1 << self.ctrl_index();
                }
                m
            })
            .collect()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread: usize,
    ) -> io::Result<()> {
        if !evset.contains(EventSet::IN) {
            return Ok(());
        }
        let Some(mem) = self.mem() else {
            return Ok(());
        };
        // The handler numbers a thread's vrings from 0 in the order of its mask, and
        // hands it only those: [rx, tx] for pair `thread`, then the control queue on thread 0.
        let Some(p) = self.inner.pairs.get(thread) else {
            return Ok(());
        };
        let (rxv, txv) = (vrings.first(), vrings.get(1));
        match usize::from(device_event) {
            0 => {
                if let Some(v) = rxv {
                    self.attach(thread);
                    lock(p).process_rx(v, &mem);
                }
                return Ok(());
            }
            1 => {
                if let Some(v) = txv {
                    lock(p).process_tx(v, &mem);
                }
                return Ok(());
            }
            2 if thread == 0 => {
                if let Some(v) = vrings.get(2) {
                    self.process_ctrl(v, &mem);
                }
                return Ok(());
            }
            _ => {}
        }
        let mut p = lock(p);
        match device_event.wrapping_sub(self.num_queues() as u16) {
            TAP => {
                if let Some(v) = rxv {
                    p.process_rx(v, &mem);
                }
            }
            TX_TIMER => {
                p.tx_timer_fired();
                if let Some(v) = txv {
                    p.process_tx(v, &mem);
                }
            }
            RX_TIMER => {
                if let Some(v) = rxv {
                    p.rx_timer_fired(v, &mem);
                    p.process_rx(v, &mem);
                }
            }
            GEN_TIMER => {
                let _ = lock(&self.inner.gen_timer).wait();
                if let Some(v) = rxv {
                    p.generate(v, &mem);
                }
            }
            _ => {}
        }
        Ok(())
    }
}
