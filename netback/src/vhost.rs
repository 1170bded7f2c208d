//! The vhost-user side of netback: the only module that knows vhost-user. Queue 0 receives
//! (host → guest), queue 1 transmits (guest → host); one thread serves both, plus two timers:
//! the rate limiter's stall timer and the null host side's frame generator.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use vback_common::sync::lock;

use serde_json::{Value, json};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};
use vmm_sys_util::timerfd::TimerFd;

use crate::device::{check_tx, fill_rx, null_frame};
use crate::rate::{CreditLimiter, Nanos, Verdict};

type Mem = GuestMemoryMmap<()>;
type Vring = VringRwLock<GuestMemoryAtomic<Mem>>;

const RX: usize = 0;
const TX: usize = 1;
/// Epoll tokens of the two timers (0 and 1 are the queues, 2 the exit event).
const RATE_TIMER: u16 = 3;
const GEN_TIMER: u16 = 4;

fn now() -> Nanos {
    static START: OnceLock<Instant> = OnceLock::new();
    u64::try_from(START.get_or_init(Instant::now).elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Counters of one direction.
#[derive(Debug, Default)]
pub struct Counters {
    /// Frames.
    pub packets: AtomicU64,
    /// Bytes (without virtio headers).
    pub bytes: AtomicU64,
    /// Frames dropped (malformed, or no room).
    pub drops: AtomicU64,
    /// Times the rate limit stalled the queue.
    pub stalls: AtomicU64,
}

impl Counters {
    fn to_json(&self) -> Value {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({"packets": g(&self.packets), "bytes": g(&self.bytes), "drops": g(&self.drops), "rate_limited_stalls": g(&self.stalls)})
    }
}

/// The backend, cloned into every connection.
#[derive(Clone, Debug)]
pub struct NetBackend {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    mtu: Option<u16>,
    rx: Counters,
    tx: Counters,
    tx_limit: Mutex<Option<CreditLimiter>>,
    rate_timer: Mutex<TimerFd>,
    gen_timer: Mutex<TimerFd>,
    gen_interval: Duration,
    mem: Mutex<Option<Arc<Mem>>>,
    acked: AtomicU64,
    last_error: Mutex<Option<&'static str>>,
}

impl NetBackend {
    /// A backend with the null host side: transmitted frames are counted and dropped, and one
    /// frame is sent to the guest every `gen_interval`.
    pub fn new_null(
        tx_limit: Option<CreditLimiter>,
        mtu: Option<u16>,
        gen_interval: Duration,
    ) -> io::Result<NetBackend> {
        Ok(NetBackend {
            inner: Arc::new(Inner {
                mtu,
                rx: Counters::default(),
                tx: Counters::default(),
                tx_limit: Mutex::new(tx_limit),
                rate_timer: Mutex::new(TimerFd::new()?),
                gen_timer: Mutex::new(TimerFd::new()?),
                gen_interval,
                mem: Mutex::new(None),
                acked: AtomicU64::new(0),
                last_error: Mutex::new(None),
            }),
        })
    }

    /// Stats for the control socket.
    pub fn stats(&self) -> Value {
        json!({
            "rx": self.inner.rx.to_json(),
            "tx": self.inner.tx.to_json(),
            "last_drop_reason": *lock(&self.inner.last_error),
        })
    }

    /// Registers the timers with the connection's worker thread and starts the generator.
    pub fn register_timers(
        &self,
        handlers: &[Arc<VringEpollHandler<NetBackend>>],
    ) -> io::Result<()> {
        let Some(h) = handlers.first() else {
            return Ok(());
        };
        h.register_listener(
            lock(&self.inner.rate_timer).as_raw_fd(),
            EventSet::IN,
            u64::from(RATE_TIMER),
        )?;
        h.register_listener(
            lock(&self.inner.gen_timer).as_raw_fd(),
            EventSet::IN,
            u64::from(GEN_TIMER),
        )?;
        lock(&self.inner.gen_timer)
            .reset(self.inner.gen_interval, Some(self.inner.gen_interval))
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }

    fn mem(&self) -> Option<Arc<Mem>> {
        lock(&self.inner.mem).clone()
    }

    fn process_tx(&self, vring: &Vring) {
        let Some(mem) = self.mem() else { return };
        let mut used_any = false;
        loop {
            let _ = vring.disable_notification();
            let mut popped = 0;
            loop {
                let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(&*mem);
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                match check_tx(&*mem, chain, false) {
                    Ok(frame) => {
                        let mut limit = lock(&self.inner.tx_limit);
                        if let Some(l) = limit.as_mut() {
                            match l.check(now(), frame.len) {
                                Verdict::Send => l.charge(frame.len),
                                Verdict::StallUntil(t) => {
                                    // Hold the frame (and the queue) until the window ends.
                                    vring.get_mut().get_queue_mut().go_to_previous_position();
                                    self.inner.tx.stalls.fetch_add(1, Ordering::Relaxed);
                                    let wait =
                                        Duration::from_nanos(t.saturating_sub(now()).max(1000));
                                    if let Err(e) = lock(&self.inner.rate_timer).reset(wait, None) {
                                        log::error!("cannot arm the rate timer: {e}");
                                    }
                                    drop(limit);
                                    if used_any {
                                        let _ = vring.signal_used_queue();
                                    }
                                    return;
                                }
                            }
                        }
                        self.inner.tx.packets.fetch_add(1, Ordering::Relaxed);
                        self.inner.tx.bytes.fetch_add(frame.len, Ordering::Relaxed);
                    }
                    Err(reason) => {
                        self.inner.tx.drops.fetch_add(1, Ordering::Relaxed);
                        *lock(&self.inner.last_error) = Some(reason);
                        log::debug!("dropped a transmit frame: {reason}");
                    }
                }
                popped += 1;
                let _ = vring.add_used(head, 0);
                used_any = true;
            }
            match vring.enable_notification() {
                Ok(true) if popped > 0 => continue,
                _ => break,
            }
        }
        if used_any && vring.needs_notification().unwrap_or(true) {
            let _ = vring.signal_used_queue();
        }
    }

    fn generate_rx(&self, vring: &Vring) {
        let Some(mem) = self.mem() else { return };
        let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(&*mem);
        let Some(chain) = chain else { return }; // no buffer: the frame is not generated
        let head = chain.head_index();
        let frame = null_frame();
        let len = match fill_rx(&*mem, chain, &frame) {
            Some(n) => {
                self.inner.rx.packets.fetch_add(1, Ordering::Relaxed);
                self.inner
                    .rx
                    .bytes
                    .fetch_add(frame.len() as u64, Ordering::Relaxed);
                n
            }
            None => {
                self.inner.rx.drops.fetch_add(1, Ordering::Relaxed);
                0
            }
        };
        let _ = vring.add_used(head, len);
        if vring.needs_notification().unwrap_or(true) {
            let _ = vring.signal_used_queue();
        }
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        2
    }

    fn max_queue_size(&self) -> usize {
        256
    }

    fn features(&self) -> u64 {
        let mut f = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_NET_F_MAC
            | 1 << VIRTIO_NET_F_STATUS
            | 1 << VIRTIO_NET_F_MRG_RXBUF
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.inner.mtu.is_some() {
            f |= 1 << VIRTIO_NET_F_MTU;
        }
        f
    }

    fn acked_features(&self, features: u64) {
        self.inner.acked.store(features, Ordering::Release);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn update_memory(&self, mem: GuestMemoryAtomic<Mem>) -> io::Result<()> {
        *lock(&self.inner.mem) = Some(mem.memory().into_inner());
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        vec![0b11]
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        _thread: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Ok(());
        }
        match device_event {
            e if usize::from(e) == TX => {
                if let Some(v) = vrings.get(TX) {
                    self.process_tx(v);
                }
            }
            e if usize::from(e) == RX => {} // new receive buffers: used when frames come
            RATE_TIMER => {
                let _ = lock(&self.inner.rate_timer).wait();
                if let Some(l) = lock(&self.inner.tx_limit).as_mut() {
                    l.timer_fired(now());
                }
                if let Some(v) = vrings.get(TX) {
                    self.process_tx(v);
                }
            }
            GEN_TIMER => {
                let _ = lock(&self.inner.gen_timer).wait();
                if let Some(v) = vrings.get(RX) {
                    self.generate_rx(v);
                }
            }
            _ => {}
        }
        Ok(())
    }
}
