//! The vhost-user side of blkback: the only module that knows about vhost-user. It implements
//! `VhostUserBackend` by handing queue events to the workers, answers feature negotiation and
//! config-space reads, and sends the config-change message when the disk is resized.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use vback_common::exit::ExitEvents;
use vback_common::sync::lock;

use vhost::vhost_user::Backend;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::virtio::{BlkConfig, CONFIG_WCE_OFFSET};
use crate::worker::{Device, Mem, Vring, Worker};

/// The vhost-user-blk backend: cloned into every connection, state shared.
#[derive(Clone)]
pub struct BlkBackend {
    inner: Arc<Inner>,
}

struct Inner {
    dev: Arc<Device>,
    workers: Vec<Mutex<Worker>>,
    queue_size: u16,
    acked: AtomicU64,
    /// Our own duplicate of the back-end request channel (for CONFIG_CHANGE_MSG).
    channel: Mutex<Option<OwnedFd>>,
    /// The worker threads' exit eventfds, reused across connections.
    exit: ExitEvents,
}

impl std::fmt::Debug for BlkBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkBackend")
            .field("queues", &self.inner.workers.len())
            .finish()
    }
}

/// The epoll token of a worker's engine completion eventfd (queue tokens are 0..num_queues and
/// the exit event is num_queues).
pub fn completion_token(num_queues: usize) -> u64 {
    num_queues as u64 + 1
}

impl BlkBackend {
    /// A backend over `dev` with one worker per queue.
    pub fn new(dev: Arc<Device>, workers: Vec<Worker>, queue_size: u16) -> BlkBackend {
        BlkBackend {
            inner: Arc::new(Inner {
                dev,
                workers: workers.into_iter().map(Mutex::new).collect(),
                queue_size,
                acked: AtomicU64::new(0),
                channel: Mutex::new(None),
                exit: ExitEvents::new(),
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
        let Some(fd) = guard.as_ref() else {
            return false;
        };
        // struct VhostUserMsg header: request = VHOST_USER_BACKEND_CONFIG_CHANGE_MSG (2),
        // flags = version 1 (no NEED_REPLY: no answer to wait for), size = 0.
        let mut msg = [0u8; 12];
        msg[0..4].copy_from_slice(&2u32.to_le_bytes());
        msg[4..8].copy_from_slice(&1u32.to_le_bytes());
        // SAFETY: `fd` is our own duplicate of the channel socket; `msg` is valid for its length.
        let n = unsafe {
            libc::send(
                fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n != msg.len() as isize {
            log::warn!(
                "cannot send the config-change message: {}",
                io::Error::last_os_error()
            );
            return false;
        }
        true
    }
}

/// Finds the back-end request channel QEMU just handed over (SET_BACKEND_REQ_FD) and returns a
/// duplicate of it. The vhost crate wraps that socket in a `Backend` that can only send
/// shared-object and shmem messages, not CONFIG_CHANGE_MSG, and does not expose the socket; the
/// channel is recognised instead as the one unnamed unix stream socket of this process whose
/// peer is another process (the front-end connection is named after our listening socket,
/// control connections after the control socket, internal socket pairs peer with ourselves,
/// and descriptors 0–2 are skipped).
fn find_backend_channel() -> Option<OwnedFd> {
    let me = std::process::id();
    let mut found: Option<RawFd> = None;
    for entry in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<RawFd>().ok())
        else {
            continue;
        };
        if fd <= 2 {
            continue;
        }
        let Ok(link) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if !link.to_string_lossy().starts_with("socket:") {
            continue;
        }
        // SAFETY: borrowing an open descriptor of our own process for the duration of a few
        // getsockopt/getsockname calls; ManuallyDrop keeps it from being closed.
        let sock = std::mem::ManuallyDrop::new(unsafe { UnixStream::from_raw_fd(fd) });
        let Ok(addr) = sock.local_addr() else {
            continue;
        };
        if addr.as_pathname().is_some() || !addr.is_unnamed() {
            continue;
        }
        if !is_stream(fd) {
            continue;
        }
        match peer_pid(fd) {
            Some(pid) if pid != me && pid != 0 => {}
            _ => continue,
        }
        if found.is_some() {
            log::warn!("several candidate back-end channels; resize notifications are disabled");
            return None;
        }
        found = Some(fd);
    }
    let fd = found?;
    // SAFETY: F_DUPFD_CLOEXEC on an open descriptor returns a new descriptor we own.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if dup < 0 {
        return None;
    }
    // SAFETY: `dup` is a fresh descriptor owned by nobody else.
    Some(unsafe { OwnedFd::from_raw_fd(dup) })
}

fn is_stream(fd: RawFd) -> bool {
    let mut ty: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: SO_TYPE writes one int into `ty`; both pointers are valid for the call.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&raw mut ty).cast(),
            &mut len,
        )
    };
    r == 0 && ty == libc::SOCK_STREAM
}

fn peer_pid(fd: RawFd) -> Option<u32> {
    // SAFETY: an all-zero ucred is a valid value.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes a ucred into `cred`; both pointers are valid for the call.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    (r == 0).then(|| u32::try_from(cred.pid).ok()).flatten()
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
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
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::BACKEND_REQ
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

    fn set_backend_req_fd(&self, _backend: Backend) {
        let ch = find_backend_channel();
        if ch.is_none() {
            log::warn!(
                "could not identify the back-end request channel; the guest will not be told about resizes"
            );
        }
        *lock(&self.inner.channel) = ch;
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.inner.workers.len()).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.inner.exit.get(thread_index)
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // Finish what is in flight before the front end reads the ring base.
        if let Some(w) = self.inner.workers.get(queue_index as usize) {
            lock(w).drain(true);
        }
        Ok(())
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
