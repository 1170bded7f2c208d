//! The vhost-user front end: the only module that speaks vhost-user. One [`Connection`] is one
//! backend socket; the transport asks it for features and config space, and hands it the guest
//! memory and rings when the driver sets DRIVER_OK.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserInflight};
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMem;

/// Most queues a device may have.
pub const MAX_QUEUES: usize = 16;

/// Errors talking to a backend.
#[derive(Debug, thiserror::Error)]
pub enum VhostError {
    /// A vhost-user request failed.
    #[error("vhost-user {op} on {socket} failed: {source}")]
    Request {
        /// The request.
        op: &'static str,
        /// The backend socket.
        socket: PathBuf,
        /// The protocol error.
        source: vhost::Error,
    },
    /// The socket did not answer the handshake in time.
    #[error(
        "{socket} did not answer the vhost-user handshake within {secs} s: is it a backend's \
         vhost-user socket (its --socket), not its control socket (--control)? A backend that \
         serves another front end also keeps new ones waiting"
    )]
    Handshake {
        /// The backend socket.
        socket: PathBuf,
        /// The wait, in seconds.
        secs: u64,
    },
    /// The backend reports more queues than vmm-min handles.
    #[error("the backend on {socket} reports {queues} queues; vmm-min handles 1 to {MAX_QUEUES}")]
    QueueCount {
        /// The backend socket.
        socket: PathBuf,
        /// What it reported.
        queues: u64,
    },
    /// The driver placed a ring outside guest memory.
    #[error("queue {queue}: the {what} at guest address {addr:#x} is outside guest memory")]
    BadRing {
        /// Queue index.
        queue: usize,
        /// Which part.
        what: &'static str,
        /// Its guest address.
        addr: u64,
    },
    /// The driver chose a queue size that is not a power of two.
    #[error("queue {queue}: size {size} is not a power of two between 1 and the maximum")]
    BadQueueSize {
        /// Queue index.
        queue: usize,
        /// The size.
        size: u16,
    },
    /// Duplicating the socket descriptor for the hang-up watcher failed.
    #[error("cannot duplicate the socket of {socket}: {source}")]
    Dup {
        /// The backend socket.
        socket: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The in-flight region a backend handed out (GET_INFLIGHT_FD). The device keeps it across
/// reconnections and hands it to every new backend process (SET_INFLIGHT_FD) before the rings
/// start, so the requests in flight when a backend died are resubmitted by the next one; it is
/// dropped when the driver resets the device.
pub struct Inflight {
    info: VhostUserInflight,
    file: std::fs::File,
}

impl std::fmt::Debug for Inflight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflight")
            .field("mmap_size", &self.info.mmap_size)
            .field("num_queues", &self.info.num_queues)
            .field("queue_size", &self.info.queue_size)
            .finish()
    }
}

/// One queue as the driver configured it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueConfig {
    /// Entries.
    pub size: u16,
    /// Descriptor table.
    pub desc: u64,
    /// Available (driver) ring.
    pub avail: u64,
    /// Used (device) ring.
    pub used: u64,
    /// Index at which the backend starts (the used index after a reconnect).
    pub base: u16,
    /// The driver set QueueReady.
    pub ready: bool,
}

/// A connected vhost-user backend.
pub struct Connection {
    frontend: Frontend,
    socket: PathBuf,
    /// The virtio features the backend offers (without VHOST_USER_F_PROTOCOL_FEATURES).
    pub features: u64,
    protocol: VhostUserProtocolFeatures,
    protocol_bit: bool,
    /// How many queues it has.
    pub queues: usize,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("socket", &self.socket)
            .field("features", &format_args!("{:#x}", self.features))
            .field("protocol", &self.protocol)
            .field("queues", &self.queues)
            .finish()
    }
}

/// How long the handshake's replies may take.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Asks for the features once by hand and waits at most [`HANDSHAKE_TIMEOUT`] for a reply
/// that is a vhost-user reply (the vhost crate's front end would wait forever, and retries a
/// read timeout in a loop): a control socket or a backend busy with another front end is named
/// instead of hanging. GET_FEATURES has no side effects; the real handshake follows.
fn probe(stream: &std::os::unix::net::UnixStream) -> Result<(), ()> {
    use std::io::{Read, Write};
    const GET_FEATURES: u32 = 1;
    const VERSION: u32 = 0x1;
    const REPLY: u32 = 0x4;
    let mut req = [0u8; 12];
    req[..4].copy_from_slice(&GET_FEATURES.to_le_bytes());
    req[4..8].copy_from_slice(&VERSION.to_le_bytes());
    let mut s = stream;
    s.set_write_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(|_| ())?;
    s.write_all(&req).map_err(|_| ())?;
    s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(|_| ())?;
    let mut reply = [0u8; 20];
    let r = s.read_exact(&mut reply);
    let _ = s.set_read_timeout(None);
    let _ = s.set_write_timeout(None);
    r.map_err(|_| ())?;
    let word = |i: usize| u32::from_le_bytes([reply[i], reply[i + 1], reply[i + 2], reply[i + 3]]);
    if word(0) == GET_FEATURES && word(4) & REPLY != 0 && word(8) == 8 {
        Ok(())
    } else {
        Err(())
    }
}

const PROTOCOL_FEATURES_BIT: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

impl Connection {
    /// Connects to `socket` and runs the handshake (owner, features, protocol features, queue
    /// count). `default_queues` is used when the backend does not announce MQ.
    pub fn connect(socket: &Path, default_queues: usize) -> Result<Connection, VhostError> {
        let err = |op| {
            let socket = socket.to_owned();
            move |source| VhostError::Request { op, socket, source }
        };
        let stream = std::os::unix::net::UnixStream::connect(socket).map_err(|e| {
            err("connect")(vhost::Error::VhostUserProtocol(
                vhost::vhost_user::Error::SocketConnect(e),
            ))
        })?;
        probe(&stream).map_err(|()| VhostError::Handshake {
            socket: socket.to_owned(),
            secs: HANDSHAKE_TIMEOUT.as_secs(),
        })?;
        let mut frontend = Frontend::from_stream(stream, MAX_QUEUES as u64);
        frontend.set_owner().map_err(err("SET_OWNER"))?;
        let all = frontend.get_features().map_err(err("GET_FEATURES"))?;
        let mut protocol = VhostUserProtocolFeatures::empty();
        if all & PROTOCOL_FEATURES_BIT != 0 {
            let offered = frontend
                .get_protocol_features()
                .map_err(err("GET_PROTOCOL_FEATURES"))?;
            protocol = offered
                & (VhostUserProtocolFeatures::MQ
                    | VhostUserProtocolFeatures::CONFIG
                    | VhostUserProtocolFeatures::REPLY_ACK
                    | VhostUserProtocolFeatures::BACKEND_REQ
                    | VhostUserProtocolFeatures::INFLIGHT_SHMFD);
            frontend
                .set_protocol_features(protocol)
                .map_err(err("SET_PROTOCOL_FEATURES"))?;
        }
        let queues = if protocol.contains(VhostUserProtocolFeatures::MQ) {
            frontend.get_queue_num().map_err(err("GET_QUEUE_NUM"))?
        } else {
            default_queues as u64
        };
        if queues == 0 || queues > MAX_QUEUES as u64 {
            return Err(VhostError::QueueCount {
                socket: socket.to_owned(),
                queues,
            });
        }

        Ok(Connection {
            frontend,
            socket: socket.to_owned(),
            features: all & !PROTOCOL_FEATURES_BIT,
            protocol,
            protocol_bit: all & PROTOCOL_FEATURES_BIT != 0,
            queues: queues as usize,
        })
    }

    fn err(&self, op: &'static str) -> impl FnOnce(vhost::Error) -> VhostError + '_ {
        move |source| VhostError::Request {
            op,
            socket: self.socket.clone(),
            source,
        }
    }

    /// A duplicate of the socket descriptor, for watching for hang-up.
    pub fn watch_fd(&self) -> Result<OwnedFd, VhostError> {
        // SAFETY: the frontend's socket is open for as long as `self` lives; we only borrow it to
        // duplicate it.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.frontend.as_raw_fd()) };
        fd.try_clone_to_owned().map_err(|source| VhostError::Dup {
            socket: self.socket.clone(),
            source,
        })
    }

    /// Whether the backend serves config space (CONFIG protocol feature).
    pub fn has_config(&self) -> bool {
        self.protocol.contains(VhostUserProtocolFeatures::CONFIG)
    }

    /// Reads `len` bytes of config space at `offset` (GET_CONFIG).
    pub fn get_config(&mut self, offset: u32, len: u32) -> Result<Vec<u8>, VhostError> {
        let buf = vec![0u8; len as usize];
        let socket = self.socket.clone();
        let (_, data) = self
            .frontend
            .get_config(offset, len, VhostUserConfigFlags::WRITABLE, &buf)
            .map_err(|source| VhostError::Request {
                op: "GET_CONFIG",
                socket,
                source,
            })?;
        Ok(data)
    }

    /// Writes config space at `offset` (SET_CONFIG).
    pub fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<(), VhostError> {
        let socket = self.socket.clone();
        self.frontend
            .set_config(offset, VhostUserConfigFlags::WRITABLE, data)
            .map_err(|source| VhostError::Request {
                op: "SET_CONFIG",
                socket,
                source,
            })
    }

    /// Opens the back-end request channel (BACKEND_REQ) when the backend offers it, and serves
    /// it on a thread: a config-change message calls `on_config_change`. The thread ends when
    /// the backend closes the channel.
    pub fn open_backend_channel(
        &mut self,
        on_config_change: Arc<dyn Fn() + Send + Sync>,
    ) -> Result<(), VhostError> {
        if !self
            .protocol
            .contains(VhostUserProtocolFeatures::BACKEND_REQ)
        {
            return Ok(());
        }
        let (ours, theirs) = UnixStream::pair().map_err(|source| VhostError::Dup {
            socket: self.socket.clone(),
            source,
        })?;
        self.frontend
            .set_backend_request_fd(&theirs)
            .map_err(self.err("SET_BACKEND_REQ_FD"))?;
        drop(theirs);
        let socket = self.socket.clone();
        let spawned = std::thread::Builder::new()
            .name("backend-req".into())
            .spawn(move || serve_backend_channel(ours, &socket, &*on_config_change));
        if let Err(e) = spawned {
            log::warn!(
                "cannot serve the back-end channel of {}: {e}",
                self.socket.display()
            );
        }
        Ok(())
    }

    /// Starts the device: acked features, the memory table, and every ready queue with its
    /// kick (an ioeventfd) and call (an irqfd) descriptors.
    pub fn activate(
        &mut self,
        mem: &GuestMem,
        driver_features: u64,
        queues: &[QueueConfig],
        kicks: &[EventFd],
        call: &EventFd,
    ) -> Result<(), VhostError> {
        let mut acked = driver_features & self.features;
        let with_protocol = self.protocol_bit;
        if with_protocol {
            acked |= PROTOCOL_FEATURES_BIT;
        }
        self.frontend
            .set_features(acked)
            .map_err(self.err("SET_FEATURES"))?;
        let regions: Vec<VhostUserMemoryRegionInfo> = mem
            .iter()
            .filter_map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).ok())
            .collect();
        self.frontend
            .set_mem_table(&regions)
            .map_err(self.err("SET_MEM_TABLE"))?;
        for (i, q) in queues.iter().enumerate() {
            if !q.ready {
                continue;
            }
            self.frontend
                .set_vring_num(i, q.size)
                .map_err(self.err("SET_VRING_NUM"))?;
            let cfg = vring_config(mem, i, q)?;
            self.frontend
                .set_vring_addr(i, &cfg)
                .map_err(self.err("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_base(i, q.base)
                .map_err(self.err("SET_VRING_BASE"))?;
            self.frontend
                .set_vring_call(i, call)
                .map_err(self.err("SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(i, &kicks[i])
                .map_err(self.err("SET_VRING_KICK"))?;
            if with_protocol {
                self.frontend
                    .set_vring_enable(i, true)
                    .map_err(self.err("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }

    /// Whether the backend tracks requests in flight (INFLIGHT_SHMFD).
    pub fn tracks_inflight(&self) -> bool {
        self.protocol
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
    }

    /// Hands the backend its in-flight region before the rings start, as QEMU's vhost-user-blk
    /// does: `kept` (the region an earlier backend process handed out, whose marks tell the
    /// new one what to resubmit) if it covers these queues, else a new one from
    /// GET_INFLIGHT_FD, which `kept` then holds. Nothing without INFLIGHT_SHMFD.
    pub fn set_inflight(
        &mut self,
        kept: &mut Option<Inflight>,
        queues: &[QueueConfig],
    ) -> Result<(), VhostError> {
        if !self.tracks_inflight() {
            return Ok(());
        }
        let num_queues = u16::try_from(self.queues).unwrap_or(u16::MAX);
        let queue_size = queues
            .iter()
            .filter(|q| q.ready)
            .map(|q| q.size)
            .max()
            .unwrap_or(1);
        let fits = kept
            .as_ref()
            .is_some_and(|k| k.info.num_queues == num_queues && k.info.queue_size >= queue_size);
        if !fits {
            let ask = VhostUserInflight {
                num_queues,
                queue_size,
                ..Default::default()
            };
            let (info, file) = self
                .frontend
                .get_inflight_fd(&ask)
                .map_err(self.err("GET_INFLIGHT_FD"))?;
            *kept = Some(Inflight { info, file });
        }
        let Some(k) = kept.as_ref() else {
            return Ok(());
        };
        self.frontend
            .set_inflight_fd(&k.info, k.file.as_raw_fd())
            .map_err(self.err("SET_INFLIGHT_FD"))
    }

    /// Stops every started queue (GET_VRING_BASE), as on a device reset.
    pub fn stop(&mut self, queues: &[QueueConfig]) -> Result<(), VhostError> {
        for (i, q) in queues.iter().enumerate() {
            if q.ready {
                self.frontend
                    .get_vring_base(i)
                    .map_err(self.err("GET_VRING_BASE"))?;
            }
        }
        Ok(())
    }
}

/// Checks a queue the driver set up (size a power of two up to the maximum, rings inside guest
/// memory) and translates its ring addresses into vmm-min's address space, as vhost-user wants.
pub fn vring_config(
    mem: &GuestMem,
    i: usize,
    q: &QueueConfig,
) -> Result<VringConfigData, VhostError> {
    if q.size == 0 || !q.size.is_power_of_two() {
        return Err(VhostError::BadQueueSize {
            queue: i,
            size: q.size,
        });
    }
    let size = u64::from(q.size);
    let host = |what: &'static str, addr: u64, len: u64| {
        let bad = VhostError::BadRing {
            queue: i,
            what,
            addr,
        };
        match addr.checked_add(len - 1) {
            Some(end) if mem.address_in_range(GuestAddress(end)) => mem
                .get_host_address(GuestAddress(addr))
                .map(|p| p as u64)
                .map_err(|_| bad),
            _ => Err(bad),
        }
    };
    Ok(VringConfigData {
        queue_max_size: q.size,
        queue_size: q.size,
        flags: 0,
        desc_table_addr: host("descriptor table", q.desc, 16 * size)?,
        used_ring_addr: host("used ring", q.used, 6 + 8 * size)?,
        avail_ring_addr: host("available ring", q.avail, 6 + 2 * size)?,
        log_addr: None,
    })
}

/// VHOST_USER_BACKEND_CONFIG_CHANGE_MSG.
const BACKEND_CONFIG_CHANGE: u32 = 2;
const FLAG_VERSION: u32 = 1;
const FLAG_REPLY: u32 = 1 << 2;
const FLAG_NEED_REPLY: u32 = 1 << 3;
/// Longest message body accepted on the back-end channel.
const MAX_BODY: usize = 4096;

/// Reads back-end requests (12-byte header, body) until the channel closes or misbehaves.
/// Config changes are passed on; everything else is refused (a non-zero reply when one is
/// wanted).
fn serve_backend_channel(mut sock: UnixStream, socket: &Path, on_config_change: &dyn Fn()) {
    let mut hdr = [0u8; 12];
    let mut body = vec![0u8; MAX_BODY];
    loop {
        if sock.read_exact(&mut hdr).is_err() {
            return;
        }
        let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
        let (req, flags, size) = (word(0), word(4), word(8) as usize);
        if size > MAX_BODY || sock.read_exact(&mut body[..size]).is_err() {
            log::warn!(
                "back-end channel of {}: a {size}-byte message body; closing the channel",
                socket.display()
            );
            return;
        }
        let status: u64 = if req == BACKEND_CONFIG_CHANGE {
            log::info!("{}: configuration changed", socket.display());
            on_config_change();
            0
        } else {
            log::debug!("back-end request {req} from {} refused", socket.display());
            1
        };
        if flags & FLAG_NEED_REPLY != 0 {
            let mut reply = [0u8; 20];
            reply[0..4].copy_from_slice(&req.to_le_bytes());
            reply[4..8].copy_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
            reply[8..12].copy_from_slice(&8u32.to_le_bytes());
            reply[12..20].copy_from_slice(&status.to_le_bytes());
            if sock.write_all(&reply).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn backend_channel_passes_config_changes_and_answers_when_asked() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let count = Arc::new(AtomicU32::new(0));
        let c = count.clone();
        let t = std::thread::spawn(move || {
            serve_backend_channel(ours, Path::new("/test.sock"), &move || {
                c.fetch_add(1, Ordering::SeqCst);
            })
        });
        let msg = |req: u32, flags: u32, size: u32| {
            let mut m = req.to_le_bytes().to_vec();
            m.extend_from_slice(&flags.to_le_bytes());
            m.extend_from_slice(&size.to_le_bytes());
            m
        };
        // A config change without reply, then one that wants a reply.
        theirs.write_all(&msg(2, 1, 0)).unwrap();
        theirs.write_all(&msg(2, 1 | FLAG_NEED_REPLY, 0)).unwrap();
        let mut reply = [0u8; 20];
        theirs.read_exact(&mut reply).unwrap();
        assert_eq!(&reply[0..4], &2u32.to_le_bytes());
        assert_eq!(&reply[12..20], &0u64.to_le_bytes());
        // An unknown request with a body is refused.
        let mut m = msg(99, 1 | FLAG_NEED_REPLY, 4);
        m.extend_from_slice(&[1, 2, 3, 4]);
        theirs.write_all(&m).unwrap();
        theirs.read_exact(&mut reply).unwrap();
        assert_eq!(&reply[12..20], &1u64.to_le_bytes());
        assert_eq!(count.load(Ordering::SeqCst), 2);
        // An oversized body closes the channel.
        theirs.write_all(&msg(2, 1, 1 << 20)).unwrap();
        t.join().unwrap();
    }
}
