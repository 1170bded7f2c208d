//! The vhost-user side of the cdrom daemon: the only module that knows vhost-user. Queues:
//! 0 control, 1 event, 2 requests; all served by one thread (a CD needs no more).

use std::io;
use std::sync::{Arc, Mutex};
use vback_common::exit::ExitEvents;
use vback_common::sync::lock;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_bindings::virtio_scsi::{VIRTIO_SCSI_F_CHANGE, VIRTIO_SCSI_F_HOTPLUG};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

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
    /// The worker thread's exit eventfd, reused across connections.
    exit: ExitEvents,
}

impl CdBackend {
    /// A backend serving `cd`.
    pub fn new(cd: Arc<Mutex<Cdrom>>) -> CdBackend {
        CdBackend {
            inner: Arc::new(Inner {
                cd,
                mem: Mutex::new(None),
                exit: ExitEvents::new(),
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
        loop {
            let _ = vring.disable_notification();
            let mut popped = 0;
            loop {
                // (The vring's lock must be released before add_used takes it again.)
                let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(&*mem);
                let Some(chain) = chain else { break };
                popped += 1;
                let head = chain.head_index();
                let len = if queue == CONTROL_QUEUE {
                    handle_control(&*mem, chain)
                } else {
                    handle_command(&*mem, chain, &mut lock(&self.inner.cd))
                };
                if let Err(e) = vring.add_used(head, len) {
                    vback_common::warn_limited!("queue {queue}: cannot return request {head}: {e}");
                }
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
}

impl VhostUserBackend for CdBackend {
    type Bitmap = ();
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
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn update_memory(&self, mem: GuestMemoryAtomic<Mem>) -> io::Result<()> {
        *lock(&self.inner.mem) = Some(mem.memory().into_inner());
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        vec![0b111]
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.inner.exit.get(thread_index)
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
