//! The vhost-user side of blkback: the only module that knows about vhost-user. It implements
//! `VhostUserBackend` by handing queue events to the workers, answers feature negotiation and
//! config-space reads, and sends the config-change message when the disk is resized.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use vback_common::sync::lock;
use vback_common::vhost_user::{BackendChannel, VhostUserBackend, VringEpollHandler};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;

use crate::virtio::{BlkConfig, CONFIG_WCE_OFFSET};
use crate::worker::{Device, Mem, Vring, Worker};
use vback_block::lock::LockMode;

/// The vhost-user-blk backend: cloned into every connection, state shared.
#[derive(Clone)]
pub struct BlkBackend {
    inner: Arc<Inner>,
}

struct Inner {
    dev: Arc<Device>,
    workers: Vec<Mutex<Worker>>,
    queue_size: u16,
    /// Offer in-flight tracking.
    inflight: bool,
    acked: AtomicU64,
    /// The back-end request channel of the connected front end (for CONFIG_CHANGE_MSG).
    channel: Mutex<Option<BackendChannel>>,
    /// The image lock the device holds while it runs (taken when it starts if the disk was
    /// opened without it, `--incoming`, or released by a migration).
    lock_mode: LockMode,
}

impl std::fmt::Debug for BlkBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkBackend")
            .field("queues", &self.inner.workers.len())
            .finish()
    }
}

/// The epoll token of a worker's engine completion eventfd (queue tokens are 0..num_queues and
/// the worker's wake-up event is num_queues).
pub fn completion_token(num_queues: usize) -> u64 {
    num_queues as u64 + 1
}

impl BlkBackend {
    /// A backend over `dev` with one worker per queue; `inflight` offers in-flight tracking.
    pub fn new(
        dev: Arc<Device>,
        workers: Vec<Worker>,
        queue_size: u16,
        inflight: bool,
        lock_mode: LockMode,
    ) -> BlkBackend {
        BlkBackend {
            inner: Arc::new(Inner {
                dev,
                workers: workers.into_iter().map(Mutex::new).collect(),
                queue_size,
                inflight,
                acked: AtomicU64::new(0),
                channel: Mutex::new(None),
                lock_mode,
            }),
        }
    }

    /// The device state.
    pub fn device(&self) -> &Arc<Device> {
        &self.inner.dev
    }

    /// The engine in use.
    pub fn engine_name(&self) -> &'static str {
        self.inner
            .workers
            .first()
            .map_or("none", |w| lock(w).engine_name())
    }

    /// The current configuration space.
    pub fn config(&self) -> BlkConfig {
        let d = &self.inner.dev;
        let sectors_per_phys = (d.disk.topology().physical_block / 512).max(1);
        BlkConfig {
            capacity: d.disk.sectors(),
            size_max: 4 << 20,
            seg_max: u32::try_from(d.limits.max_iov)
                .unwrap_or(u32::MAX)
                .saturating_sub(2)
                .max(1),
            blk_size: 512,
            physical_block_exp: sectors_per_phys.trailing_zeros() as u8,
            min_io_size: u16::try_from(sectors_per_phys).unwrap_or(1),
            opt_io_size: 0,
            writeback: d.writeback.load(Ordering::Relaxed),
            num_queues: u16::try_from(self.inner.workers.len()).unwrap_or(1),
            max_discard_sectors: d.max_discard_sectors,
            max_discard_seg: d.limits.max_segments,
            discard_sector_alignment: sectors_per_phys,
            max_write_zeroes_sectors: d.max_discard_sectors,
            max_write_zeroes_seg: d.limits.max_segments,
            write_zeroes_may_unmap: true,
        }
    }

    /// Registers each worker's completion eventfd with the epoll handler of its thread. Called
    /// for every new front-end connection.
    pub fn register_completion_fds(
        &self,
        handlers: &[Arc<VringEpollHandler<BlkBackend>>],
    ) -> io::Result<()> {
        let token = completion_token(self.inner.workers.len());
        for (w, h) in self.inner.workers.iter().zip(handlers) {
            if let Some(fd) = lock(w).notify_fd() {
                h.register_listener(fd, EventSet::IN, token)?;
            }
        }
        Ok(())
    }

    /// After a front end disconnected: wait for its in-flight I/O (the buffers were in its
    /// memory) and forget per-connection state.
    pub fn disconnected(&self) {
        for w in &self.inner.workers {
            lock(w).drain(false);
        }
        *lock(&self.inner.channel) = None;
        self.inner.acked.store(0, Ordering::Release);
    }

    /// At exit: finishes in-flight I/O and closes the I/O engines, so the image's files (and
    /// its lock) are released before the process ends.
    pub fn shutdown(&self) {
        for w in &self.inner.workers {
            let mut w = lock(w);
            w.drain(false);
            w.close_engine();
        }
    }

    /// Tells the front end that the configuration changed (after a resize), so it re-reads it
    /// and interrupts the guest. Returns false if no front end offered a back-end channel.
    pub fn notify_config_change(&self) -> bool {
        let guard = lock(&self.inner.channel);
        let Some(channel) = guard.as_ref() else {
            return false;
        };
        match channel.config_changed() {
            Ok(()) => true,
            Err(e) => {
                log::warn!("{e}");
                false
            }
        }
    }
}

impl VhostUserBackend for BlkBackend {
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.inner.workers.len()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.inner.queue_size)
    }

    fn features(&self) -> u64 {
        let mut f = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_TOPOLOGY
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_CONFIG_WCE
            | 1 << VIRTIO_BLK_F_MQ
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.inner.dev.disk.read_only() {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= 1 << VIRTIO_BLK_F_WRITE_ZEROES;
            if self.inner.dev.disk.capabilities().discard {
                f |= 1 << VIRTIO_BLK_F_DISCARD;
            }
        }
        f
    }

    fn acked_features(&self, features: u64) {
        self.inner.acked.store(features, Ordering::Release);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        let f = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::BACKEND_REQ;
        if self.inner.inflight {
            f | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        } else {
            f
        }
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The vring tracks EVENT_IDX itself; the workers use the same calls either way.
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<Mem>) -> io::Result<()> {
        let map = mem.memory().into_inner();
        for w in &self.inner.workers {
            lock(w).set_memory(map.clone());
        }
        Ok(())
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = self.config().to_bytes();
        let start = (offset as usize).min(bytes.len());
        let end = (offset as usize)
            .saturating_add(size as usize)
            .min(bytes.len());
        let mut out = bytes[start..end].to_vec();
        // Fields past ours (secure erase, zoned) read as zero.
        out.resize(size as usize, 0);
        out
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only the write-back byte is writable.
        if offset == CONFIG_WCE_OFFSET && buf.len() == 1 {
            let wb = buf[0] != 0;
            self.inner.dev.writeback.store(wb, Ordering::Relaxed);
            log::info!(
                "guest set the write cache to {}",
                if wb { "write-back" } else { "write-through" }
            );
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "config write of {} bytes at offset {offset}: only the write-back byte (offset 32) is writable",
                buf.len()
            ),
        ))
    }

    fn inflight_replayed(&self, queue: usize, requests: usize) {
        if let Some(s) = self.inner.dev.stats.get(queue) {
            crate::stats::QueueStats::add(&s.resubmitted, requests as u64);
        }
    }

    fn set_backend_req_fd(&self, channel: BackendChannel) {
        *lock(&self.inner.channel) = Some(channel);
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.inner.workers.len()).map(|i| 1u64 << i).collect()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // Finish what is in flight before the front end reads the ring base.
        if let Some(w) = self.inner.workers.get(queue_index as usize) {
            lock(w).drain(true);
        }
        Ok(())
    }

    fn device_starting(&self) -> io::Result<()> {
        let disk = &self.inner.dev.disk;
        match disk.take_lock(self.inner.lock_mode) {
            Ok(true) => {
                log::info!(
                    "the device starts: took the image lock and read its metadata anew (the \
                     disk was opened without it, as a migration's destination, or a migration \
                     released it)"
                );
                Ok(())
            }
            Ok(false) => Ok(()),
            Err(e) => {
                let e = format!(
                    "the device cannot start: the image lock cannot be taken, so the guest must \
                     not write the disk ({e}); is the migration's source still running the \
                     device?"
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
        // Every queue was drained by stop_vring: what the guest wrote is on the disk once it
        // is flushed, and the destination may take over.
        match self.inner.dev.disk.release_lock() {
            Ok(()) => {
                log::info!(
                    "the front end stopped the device while logging dirty pages (a live \
                     migration's source): the disk is flushed and its image lock released for \
                     the destination"
                );
                Ok(())
            }
            Err(e) => {
                let e = format!(
                    "a live migration stopped the device but the disk cannot be flushed; its \
                     image lock is kept (the destination cannot start): {e}"
                );
                log::error!("{e}");
                Err(io::Error::other(e))
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            log::warn!("queue {thread_id}: unexpected event set {evset:?}");
            return Ok(());
        }
        let (Some(worker), Some(vring)) = (self.inner.workers.get(thread_id), vrings.first())
        else {
            return Ok(());
        };
        let mut w = lock(worker);
        if u64::from(device_event) == completion_token(self.inner.workers.len()) {
            w.handle_completions(vring);
        } else {
            w.process_queue(vring);
        }
        Ok(())
    }
}
