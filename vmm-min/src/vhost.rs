//! The vhost-user front end: the only module that speaks vhost-user. One [`Connection`] is one
//! backend socket; the transport asks it for features and config space, and hands it the guest
//! memory and rings when the driver sets DRIVER_OK.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use vhost::vhost_user::message::VhostUserConfigFlags;
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
    /// Duplicating the socket descriptor for the hang-up watcher failed.
    #[error("cannot duplicate the socket of {socket}: {source}")]
    Dup {
        /// The backend socket.
        socket: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
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

const PROTOCOL_FEATURES_BIT: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

impl Connection {
    /// Connects to `socket` and runs the handshake (owner, features, protocol features, queue
    /// count). `default_queues` is used when the backend does not announce MQ.
    pub fn connect(socket: &Path, default_queues: usize) -> Result<Connection, VhostError> {
        let err = |op| {
            let socket = socket.to_owned();
            move |source| VhostError::Request { op, socket, source }
        };
        let mut frontend = Frontend::connect(socket, MAX_QUEUES as u64).map_err(err("connect"))?;
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
                    | VhostUserProtocolFeatures::REPLY_ACK);
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
            // vhost-user ring addresses are in the front end's address space.
            let size = u64::from(q.size);
            let host = |what: &'static str, addr: u64, len: u64| {
                let end = addr.checked_add(len.saturating_sub(1));
                match end {
                    Some(end) if mem.address_in_range(GuestAddress(end)) => mem
                        .get_host_address(GuestAddress(addr))
                        .map(|p| p as u64)
                        .map_err(|_| VhostError::BadRing {
                            queue: i,
                            what,
                            addr,
                        }),
                    _ => Err(VhostError::BadRing {
                        queue: i,
                        what,
                        addr,
                    }),
                }
            };
            let cfg = VringConfigData {
                queue_max_size: q.size,
                queue_size: q.size,
                flags: 0,
                desc_table_addr: host("descriptor table", q.desc, 16 * size)?,
                used_ring_addr: host("used ring", q.used, 6 + 8 * size)?,
                avail_ring_addr: host("available ring", q.avail, 6 + 2 * size)?,
                log_addr: None,
            };
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
