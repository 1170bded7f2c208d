//! The vhost-user side of the cdrom daemon: the only module that knows vhost-user. Queues:
//! 0 control, 1 event, 2 requests; all served by one thread (a CD needs no more).

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use vback_common::sync::lock;
use vback_common::vhost_user::driver;
use vback_common::vhost_user::{VhostUserBackend, VringRwLock, VringT};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_bindings::virtio_scsi::{VIRTIO_SCSI_F_CHANGE, VIRTIO_SCSI_F_HOTPLUG};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::mmc::Cdrom;
use crate::virtio_scsi::{handle_command, handle_control};

type Mem = GuestMemoryMmap<()>;
type Vring = VringRwLock<GuestMemoryAtomic<Mem>>;

const CONTROL_QUEUE: usize = 0;
const EVENT_QUEUE: usize = 1;

/// The backend, cloned into every connection.
#[derive(Clone, Debug)]
pub struct CdBackend {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    cd: Arc<Mutex<Cdrom>>,
    mem: Mutex<Option<Arc<Mem>>>,
    /// Offer in-flight tracking.
    inflight: bool,
    #[cfg(test)]
    between_pop_and_enable: tests::Hook,
}

impl CdBackend {
    /// A backend serving `cd`; `inflight` offers in-flight tracking.
    pub fn new(cd: Arc<Mutex<Cdrom>>, inflight: bool) -> CdBackend {
        CdBackend {
            inner: Arc::new(Inner {
                cd,
                mem: Mutex::new(None),
                inflight,
                #[cfg(test)]
                between_pop_and_enable: tests::Hook::default(),
            }),
        }
    }

    fn process(&self, queue: usize, vring: &Vring) {
        let Some(mem) = lock(&self.inner.mem).clone() else {
            return;
        };
        if queue == EVENT_QUEUE {
            // Event buffers stay with us: no events are ever sent (see virtio_scsi.rs).
            return;
        }
        let mut used_any = false;
        // The last check after re-enabling notifications saw the avail index ahead of what had
        // been popped.
        let mut more = false;
        loop {
            let _ = vring.disable_notification();
            let mut popped = 0;
            // Requests a crashed back end left in flight come first (in-flight tracking).
            while let Some(chain) = driver::pop(vring, &*mem) {
                popped += 1;
                let head = chain.head_index();
                // A READ's latency, from here to its publication on the used ring.
                let mut read_since = None;
                let len = if queue == CONTROL_QUEUE {
                    handle_control(&*mem, chain)
                } else {
                    let popped = Instant::now();
                    let mut cd = lock(&self.inner.cd);
                    let reads = cd.reads();
                    let len = handle_command(&*mem, chain, &mut cd);
                    read_since = (cd.reads() != reads).then_some(popped);
                    len
                };
                if let Err(e) = driver::complete(vring, head, len) {
                    vback_common::warn_limited!("queue {queue}: cannot return request {head}: {e}");
                }
                if let Some(popped) = read_since {
                    lock(&self.inner.cd).record_read_latency(popped.elapsed());
                }
                used_any = true;
            }
            if popped == 0 && more {
                // The driver only moves the avail index forward and it was ahead when we last
                // looked, yet nothing could be popped: a broken ring. Wait for the next kick
                // rather than spin.
                vback_common::warn_limited!(
                    "queue {queue}: the driver's avail ring is broken (an index more than a \
                     queue ahead, or an unreadable entry); the queue waits for the next kick \
                     (a driver bug: resetting the device recovers)"
                );
                break;
            }
            #[cfg(test)]
            self.inner.between_pop_and_enable.run();
            // Chains published after the last pop (even when this pass popped none: its kick
            // may have been for chains an earlier pass took) get no kick when the driver saw
            // notifications off: serve them now.
            match vring.enable_notification() {
                Ok(true) => more = true,
                Ok(false) => break,
                Err(e) => {
                    vback_common::warn_limited!("queue {queue}: cannot read the avail ring: {e}");
                    break;
                }
            }
        }
        if used_any && vring.needs_notification().unwrap_or(true) {
            let _ = vring.signal_used_queue();
        }
    }
}

impl VhostUserBackend for CdBackend {
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        3
    }

    fn max_queue_size(&self) -> usize {
        128
    }

    fn features(&self) -> u64 {
        // HOTPLUG and CHANGE are offered because QEMU's virtio-scsi acks CHANGE by default
        // (param_change=on) without masking it by what the backend offers; no such events are
        // ever sent.
        1 << VIRTIO_SCSI_F_HOTPLUG
            | 1 << VIRTIO_SCSI_F_CHANGE
            | 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        let f = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
        if self.inner.inflight {
            f | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        } else {
            f
        }
    }

    fn inflight_replayed(&self, _queue: usize, requests: usize) {
        lock(&self.inner.cd).note_resubmitted(requests);
    }

    fn inflight_handover(&self) {
        // The guest has been using this drive: a new daemon taking over is no power-on.
        lock(&self.inner.cd).take_over();
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn update_memory(&self, mem: GuestMemoryAtomic<Mem>) -> io::Result<()> {
        *lock(&self.inner.mem) = Some(mem.memory().into_inner());
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        vec![0b111]
    }

    fn device_starting(&self) -> io::Result<()> {
        let cd = lock(&self.inner.cd);
        let Some(m) = cd.medium() else {
            return Ok(());
        };
        match m.take_lock() {
            Ok(true) => {
                log::info!(
                    "the device starts: took the medium's lock (it was opened without it, as \
                     a migration's destination, or a migration released it)"
                );
                Ok(())
            }
            Ok(false) => Ok(()),
            Err(e) => {
                let e = format!(
                    "the device cannot start: the medium's lock cannot be taken ({e}); is the \
                     migration's source still running the device?"
                );
                log::error!("{e}");
                Err(io::Error::other(e))
            }
        }
    }

    fn device_stopped(&self, migrating: bool) -> io::Result<()> {
        if !migrating {
            return Ok(());
        }
        let cd = lock(&self.inner.cd);
        if let Some(m) = cd.medium() {
            m.release_lock().map_err(io::Error::other)?;
            log::info!(
                "the front end stopped the device while logging dirty pages (a live \
                 migration's source): the medium's lock is released for the destination"
            );
        }
        Ok(())
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
        let q = usize::from(device_event);
        if let Some(v) = vrings.get(q) {
            self.process(q, v);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use vback_common::testing::{MockQueue, WRITE};
    use vm_memory::{Bytes, GuestAddress};

    /// Test code run once in a pass, between its last pop and its re-enabling of notifications.
    #[derive(Default)]
    pub(super) struct Hook(Mutex<Option<Box<dyn FnOnce() + Send>>>);

    impl std::fmt::Debug for Hook {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Hook")
        }
    }

    impl Hook {
        pub(super) fn run(&self) {
            let h = lock(&self.0).take();
            if let Some(h) = h {
                h();
            }
        }
    }

    /// As blkback's worker test of the same name: a kick whose chains an earlier pass took
    /// finds the control queue empty, and the driver publishes a chain right then, after the
    /// last pop and before notifications come back on. Returns whether the driver kicked and
    /// how many chains were used once the pass is over.
    fn publish_during_an_empty_pass(event_idx: bool) -> (bool, u16) {
        let mem = GuestMemoryAtomic::new(
            Mem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("guest memory"),
        );
        let mut q = MockQueue::new(&mem, 16, 0x8_0000);
        q.vring.set_queue_event_idx(event_idx);
        let be = CdBackend::new(Arc::new(Mutex::new(Cdrom::new(None, "test"))), true);
        be.update_memory(mem.clone()).expect("memory");
        // A task management request (type 0): 4 bytes in, a response byte out.
        let req = [(0x1000, 4, 0), (0x2000, 1, WRITE)];
        q.publish(&req);
        be.process(CONTROL_QUEUE, &q.vring);
        assert_eq!(q.used_idx(), 1);

        q.stage(&req);
        let publish = q.publisher(event_idx);
        let kicked = Arc::new(AtomicBool::new(false));
        let k = kicked.clone();
        *lock(&be.inner.between_pop_and_enable.0) =
            Some(Box::new(move || k.store(publish(), Ordering::SeqCst)));
        be.process(CONTROL_QUEUE, &q.vring);
        assert!(
            lock(&be.inner.between_pop_and_enable.0).is_none(),
            "the driver ran"
        );
        (kicked.load(Ordering::SeqCst), q.used_idx())
    }

    #[test]
    fn a_chain_published_as_notifications_come_back_on_is_not_lost() {
        // Without EVENT_IDX the driver saw VRING_USED_F_NO_NOTIFY and sends no kick.
        let (kicked, used) = publish_during_an_empty_pass(false);
        assert!(!kicked, "the driver saw notifications off");
        assert_eq!(used, 2, "the chain published during the pass was served");
    }

    #[test]
    fn an_avail_index_beyond_the_ring_does_not_spin() {
        let mem = GuestMemoryAtomic::new(
            Mem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("guest memory"),
        );
        let q = MockQueue::new(&mem, 16, 0x8_0000);
        let be = CdBackend::new(Arc::new(Mutex::new(Cdrom::new(None, "test"))), true);
        be.update_memory(mem.clone()).expect("memory");
        mem.memory()
            .write_obj(200u16, GuestAddress(q.avail_addr() + 2))
            .expect("avail ring");
        be.process(CONTROL_QUEUE, &q.vring);
        assert_eq!(q.used_idx(), 0);
    }

    #[test]
    fn with_event_idx_the_same_race_also_serves_the_chain_in_the_pass() {
        let (kicked, used) = publish_during_an_empty_pass(true);
        assert!(kicked, "avail_event asked for a kick");
        assert_eq!(used, 2, "the chain published during the pass was served");
    }
}
