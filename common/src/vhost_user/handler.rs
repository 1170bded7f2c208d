// Copyright 2019 Intel Corporation. All Rights Reserved.
// Copyright 2019-2021 Alibaba Cloud. All rights reserved.
//
// SPDX-License-Identifier: Apache-2.0

//! One front-end connection: the vrings and worker threads built for it, and the loop that
//! reads the front end's requests, checks them, applies them and answers.
//!
//! The per-request semantics (features, memory table, ring setup and registration, ring stop)
//! are forked from vhost-user-backend 0.24.0 (`src/handler.rs`); the message loop replaces the
//! vhost crate's `BackendReqHandler` (0.18), whose checks it keeps (header version and flags,
//! exact body sizes, which requests may carry descriptors, protocol features a request needs).
//! What changed is listed in the module documentation of [`crate::vhost_user`].

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread;

use thiserror::Error;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::mmap::MmapRegionError;
use vm_memory::{
    FileOffset, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap,
    GuestMemoryRegion, GuestRegionCollectionError, GuestRegionMmap, MmapRegion,
};
use vmm_sys_util::epoll::EventSet;

use super::Memory;
use super::backend::VhostUserBackend;
use super::channel::BackendChannel;
use super::event_loop::{VringEpollError, VringEpollHandler};
use super::inflight::{INFO_LEN, InflightError, InflightInfo, InflightQueue, InflightRegion};
use super::vring::{VringT, notify};
use super::wire::{self, MAX_BODY, MAX_FDS, Message, RecvError, req, u32_at, u64_at};

/// Memory slots offered with CONFIGURE_MEM_SLOTS (the kernel's vhost limit, as
/// vhost-user-backend offers).
pub const MAX_MEM_SLOTS: u64 = 509;

/// The size of the device configuration space a message may address.
const CONFIG_SPACE: u32 = 0x1000;

/// Why a connection could not be set up.
#[derive(Debug, Error)]
pub enum SetupError {
    /// A vring could not be created.
    #[error("cannot create vring {index}: {source}")]
    Vring {
        /// The vring.
        index: usize,
        /// What virtio-queue said.
        source: virtio_queue::Error,
    },
    /// A worker thread's epoll could not be set up.
    #[error(transparent)]
    Worker(#[from] VringEpollError),
    /// A worker thread could not be started.
    #[error("cannot start worker thread {thread}: {source}")]
    Spawn {
        /// The worker thread.
        thread: usize,
        /// The OS error.
        source: io::Error,
    },
}

/// Why a request was refused. The connection ends after a refusal (after an error reply where
/// the front end asked for one), as with vhost-user-backend: a front end that sent a request
/// its back end refused has no consistent state left to go on with.
#[derive(Debug, Error)]
pub enum RequestError {
    /// The body has the wrong size.
    #[error("its body is {got} bytes; this request has {want}")]
    BodySize {
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
    /// The header's version or flags are wrong.
    #[error(
        "its header flags {flags:#x} are not those of a version 1 request (a reply flag, or \
         reserved bits, set)"
    )]
    Header {
        /// The flags.
        flags: u32,
    },
    /// Descriptors where none belong, or the wrong number.
    #[error("it came with {got} file descriptors; this request takes {want}")]
    Fds {
        /// Descriptors received.
        got: usize,
        /// What the request takes.
        want: &'static str,
    },
    /// A request of a protocol feature the front end did not negotiate.
    #[error(
        "it needs protocol feature {0}, which the front end did not ack with \
         SET_PROTOCOL_FEATURES"
    )]
    NotNegotiated(&'static str),
    /// SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES acked.
    #[error(
        "the front end acked its features without VHOST_USER_F_PROTOCOL_FEATURES, which makes \
         every ring enabled: it has no SET_VRING_ENABLE to send"
    )]
    NoProtocolFeatures,
    /// A request this handler does not implement.
    #[error("this back end does not implement it")]
    Unsupported,
    /// A second SET_OWNER.
    #[error("the connection already has an owner (a second SET_OWNER)")]
    AlreadyOwned,
    /// Features acked that were not offered.
    #[error("the front end acked {what} {bits:#x}, which this back end did not offer")]
    NotOffered {
        /// "features" or "protocol features".
        what: &'static str,
        /// The bits not offered.
        bits: u64,
    },
    /// A ring index beyond the device.
    #[error("ring {ring} does not exist (the device has {rings})")]
    NoSuchRing {
        /// The index.
        ring: u32,
        /// How many the device has.
        rings: usize,
    },
    /// A queue size the device cannot serve.
    #[error(
        "ring {ring}: queue size {num} is not a power of two from 1 to {max}, the largest this \
         back end serves (give the front end a smaller queue size)"
    )]
    QueueSize {
        /// The ring.
        ring: u32,
        /// The size asked for.
        num: u32,
        /// The largest served.
        max: usize,
    },
    /// SET_VRING_ENABLE with something else than 0 or 1.
    #[error("ring {ring}: SET_VRING_ENABLE with {num} (only 0 and 1 are defined)")]
    Enable {
        /// The ring.
        ring: u32,
        /// The value.
        num: u32,
    },
    /// A ring base beyond a split ring's 16-bit index.
    #[error("ring {ring}: a ring base of {num} does not fit a split ring's 16-bit index")]
    Base {
        /// The ring.
        ring: u32,
        /// The value.
        num: u32,
    },
    /// Unknown ring address flags.
    #[error("ring {ring}: unknown ring address flags {flags:#x} (only logging, 0x1, is defined)")]
    RingFlags {
        /// The ring.
        ring: u32,
        /// The flags.
        flags: u32,
    },
    /// A misaligned ring part.
    #[error("ring {ring}: the {what} at {addr:#x} is not aligned to {align} bytes")]
    Misaligned {
        /// The ring.
        ring: u32,
        /// Which part.
        what: &'static str,
        /// Its front-end address.
        addr: u64,
        /// The alignment virtio requires.
        align: u64,
    },
    /// Ring addresses before any guest memory.
    #[error("ring {ring}: ring addresses came before any guest memory was shared")]
    NoGuestMemory {
        /// The ring.
        ring: u32,
    },
    /// A ring part outside the memory the front end shared.
    #[error(
        "ring {ring}: the {what} at front-end address {addr:#x} is not in the guest memory the \
         front end shared"
    )]
    OutsideMemory {
        /// The ring.
        ring: u32,
        /// Which part.
        what: &'static str,
        /// Its front-end address.
        addr: u64,
    },
    /// virtio-queue refused the ring.
    #[error("ring {ring}: {source}")]
    Ring {
        /// The ring.
        ring: u32,
        /// What virtio-queue said.
        source: virtio_queue::Error,
    },
    /// A memory table with too many regions.
    #[error("{got} guest memory regions; at most {max} are served")]
    TooManyRegions {
        /// Regions sent.
        got: u64,
        /// The most served.
        max: u64,
    },
    /// A region that is empty or wraps around.
    #[error(
        "guest memory region {gpa:#x}+{size:#x} (front-end address {user:#x}, offset {offset:#x}) \
         is empty or wraps around the address space"
    )]
    Region {
        /// Guest physical address.
        gpa: u64,
        /// Size.
        size: u64,
        /// Front-end address.
        user: u64,
        /// Offset in its file.
        offset: u64,
    },
    /// A region whose descriptor cannot be mapped.
    #[error("guest memory region {gpa:#x}+{size:#x} cannot be mapped: {source}")]
    Map {
        /// Guest physical address.
        gpa: u64,
        /// Size.
        size: u64,
        /// What vm-memory said.
        source: MmapRegionError,
    },
    /// Overlapping regions, or a region to remove that is not there.
    #[error("guest memory regions: {0}")]
    Layout(GuestRegionCollectionError),
    /// A device configuration access outside the configuration space.
    #[error(
        "a config access of {size} bytes at offset {offset} with flags {flags:#x} is outside the \
         {CONFIG_SPACE}-byte config space, empty, or has unknown flags"
    )]
    Config {
        /// Offset.
        offset: u32,
        /// Size.
        size: u32,
        /// Flags.
        flags: u32,
    },
    /// The back-end channel is not a unix stream socket.
    #[error("the back-end channel it handed over is not a unix stream socket")]
    NotAStreamSocket,
    /// A kick could not be (un)registered with its worker thread.
    #[error("ring {ring}: cannot register its kick with worker thread {thread}: {source}")]
    Register {
        /// The ring.
        ring: u32,
        /// The worker thread.
        thread: usize,
        /// The OS error.
        source: io::Error,
    },
    /// The device refused it.
    #[error("the device refused it: {0}")]
    Device(io::Error),
    /// An in-flight region that cannot be used.
    #[error("{0}")]
    Inflight(#[from] InflightError),
}

/// Why a connection ended other than by the front end hanging up.
#[derive(Debug, Error)]
pub enum ConnectionError {
    /// A request was refused.
    #[error("{request} refused: {source}")]
    Refused {
        /// The request's name.
        request: &'static str,
        /// Why.
        source: RequestError,
    },
    /// A message announced more body than any request has.
    #[error(
        "the front end sent a {request} header announcing a {size}-byte body; no request has \
         more than {MAX_BODY}"
    )]
    TooLarge {
        /// The request's name.
        request: &'static str,
        /// The announced size.
        size: u32,
    },
    /// A message carried more descriptors than any request.
    #[error("the front end sent a message with more than {MAX_FDS} file descriptors")]
    TooManyFds,
    /// The socket failed.
    #[error("cannot read from the front end: {0}")]
    Read(io::Error),
    /// A reply could not be written.
    #[error("cannot answer {request} to the front end: {source}")]
    Reply {
        /// The request's name.
        request: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

impl ConnectionError {
    /// Whether this error comes from guest memory the front end did not share with us (QEMU's
    /// default RAM is private), and if so how it showed.
    pub fn unshared_memory(&self) -> Option<&'static str> {
        match self {
            ConnectionError::Refused {
                source: RequestError::Map { .. },
                ..
            } => Some("a guest memory region it sent cannot be mapped"),
            ConnectionError::Refused {
                source: RequestError::NoGuestMemory { .. },
                ..
            } => Some("it set up the rings without sharing any guest memory"),
            _ => None,
        }
    }
}

/// What a request is answered with.
enum Reply {
    /// Nothing, or a success code when the front end asked for one (REPLY_ACK).
    Ack,
    /// A reply body (requests that always have a reply).
    Body(Vec<u8>),
    /// A reply body with a descriptor (GET_INFLIGHT_FD).
    BodyFd(Vec<u8>, File),
}

/// Requests that always have a reply of their own (never a REPLY_ACK code).
fn has_own_reply(request: u32) -> bool {
    matches!(
        request,
        req::GET_FEATURES
            | req::GET_PROTOCOL_FEATURES
            | req::GET_QUEUE_NUM
            | req::GET_VRING_BASE
            | req::GET_CONFIG
            | req::GET_MAX_MEM_SLOTS
            | req::GET_INFLIGHT_FD
    )
}

/// Where a front-end virtual address range lands in guest physical memory.
#[derive(Debug, Clone, Copy)]
struct AddrMapping {
    vmm_addr: u64,
    size: u64,
    gpa_base: u64,
}

/// One front-end connection: the device's vrings and worker threads, and the state the
/// front end negotiated. Dropping it stops and joins the worker threads.
pub struct Connection<T: VhostUserBackend> {
    backend: T,
    workers: Vec<Arc<VringEpollHandler<T>>>,
    threads: Vec<thread::JoinHandle<Result<(), VringEpollError>>>,
    vrings: Vec<T::Vring>,
    queues_per_thread: Vec<u64>,
    max_queue_size: usize,
    mem: Memory,
    mappings: Vec<AddrMapping>,
    owned: bool,
    features_acked: bool,
    acked_features: u64,
    acked_protocol_features: u64,
    /// The state each ring was asked for by SET_VRING_ENABLE before SET_FEATURES (QEMU's
    /// vhost-user netdev sends it then): applied when the features arrive.
    early_enable: Vec<Option<bool>>,
    /// The in-flight region the front end handed over (SET_INFLIGHT_FD).
    inflight: Option<Arc<InflightRegion>>,
}

impl<T: VhostUserBackend> std::fmt::Debug for Connection<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("vrings", &self.vrings.len())
            .field("workers", &self.workers.len())
            .field("acked_features", &self.acked_features)
            .finish_non_exhaustive()
    }
}

impl<T> Connection<T>
where
    T: VhostUserBackend + Clone + 'static,
    T::Vring: Clone + Send + Sync + 'static,
{
    /// The vrings and worker threads of a new connection to `backend` (started: they wait for
    /// the rings to be set up).
    pub fn new(backend: T) -> Result<Self, SetupError> {
        let num_queues = backend.num_queues();
        let max_queue_size = backend.max_queue_size();
        let queues_per_thread = backend.queues_per_thread();
        let mem: Memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut vrings = Vec::with_capacity(num_queues);
        for index in 0..num_queues {
            let size = u16::try_from(max_queue_size).unwrap_or(u16::MAX);
            let vring = T::Vring::new(mem.clone(), size)
                .map_err(|source| SetupError::Vring { index, source })?;
            vrings.push(vring);
        }
        let mut conn = Connection {
            backend: backend.clone(),
            workers: Vec::new(),
            threads: Vec::new(),
            vrings,
            queues_per_thread,
            max_queue_size,
            mem,
            mappings: Vec::new(),
            owned: false,
            features_acked: false,
            acked_features: 0,
            acked_protocol_features: 0,
            early_enable: vec![None; num_queues],
            inflight: None,
        };
        // Should a thread fail to start, dropping `conn` stops those already started.
        for (thread_id, mask) in conn.queues_per_thread.clone().into_iter().enumerate() {
            let thread_vrings = conn
                .vrings
                .iter()
                .enumerate()
                .filter(|(index, _)| *index < 64 && (mask >> index) & 1 == 1)
                .map(|(_, v)| v.clone())
                .collect();
            let worker = Arc::new(VringEpollHandler::new(
                backend.clone(),
                thread_vrings,
                thread_id,
            )?);
            let w2 = worker.clone();
            let handle = thread::Builder::new()
                .name("vring_worker".into())
                .spawn(move || {
                    let r = w2.run();
                    if let Err(e) = &r {
                        log::error!("{e}; its rings are not served until the front end reconnects");
                    }
                    r
                })
                .map_err(|source| SetupError::Spawn {
                    thread: thread_id,
                    source,
                })?;
            conn.workers.push(worker);
            conn.threads.push(handle);
        }
        Ok(conn)
    }
}

impl<T: VhostUserBackend> Connection<T> {
    /// The worker threads' epoll handlers, in thread order (a device registers its own event
    /// sources there).
    pub fn epoll_handlers(&self) -> &[Arc<VringEpollHandler<T>>] {
        &self.workers
    }

    /// Serves the front end on `sock` until it hangs up (`Ok`) or a request is refused or the
    /// socket fails (`Err`).
    pub fn serve(&mut self, sock: &UnixStream) -> Result<(), ConnectionError> {
        loop {
            let mut msg = match Message::recv(sock) {
                Ok(m) => m,
                Err(RecvError::Closed) => return Ok(()),
                Err(RecvError::Truncated { got, want }) => {
                    log::debug!(
                        "the front end hung up in the middle of a message ({got} of {want} bytes)"
                    );
                    return Ok(());
                }
                Err(RecvError::TooLarge { request, size }) => {
                    return Err(ConnectionError::TooLarge {
                        request: wire::request_name(request),
                        size,
                    });
                }
                Err(RecvError::TooManyFds) => return Err(ConnectionError::TooManyFds),
                Err(RecvError::Io(e)) => return Err(ConnectionError::Read(e)),
            };
            if log::log_enabled!(log::Level::Debug) {
                log::debug!("vhost-user request {}", msg.describe());
            }
            let request = msg.name();
            let reply_err = |source| ConnectionError::Reply { request, source };
            match self.handle(&mut msg) {
                Ok(Reply::Body(body)) => {
                    wire::send_reply(sock, msg.request, &body).map_err(reply_err)?;
                }
                Ok(Reply::BodyFd(body, file)) => {
                    wire::send_reply_with_fd(sock, msg.request, &body, &file).map_err(reply_err)?;
                }
                Ok(Reply::Ack) => {
                    if self.reply_ack() && msg.need_reply() {
                        wire::send_ack(sock, msg.request, true).map_err(reply_err)?;
                    }
                }
                Err(source) => {
                    if self.reply_ack() && msg.need_reply() && !has_own_reply(msg.request) {
                        // The connection ends anyway: a failed error reply changes nothing.
                        let _ = wire::send_ack(sock, msg.request, false);
                    }
                    return Err(ConnectionError::Refused { request, source });
                }
            }
        }
    }

    /// Whether REPLY_ACK is in force (offered with protocol features and acked).
    fn reply_ack(&self) -> bool {
        self.backend.features() & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
            && self.acked_protocol_features & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0
    }

    fn handle(&mut self, m: &mut Message) -> Result<Reply, RequestError> {
        let version_ok = m.flags & wire::VERSION_MASK == 1;
        if !version_ok || m.flags & !(wire::VERSION_MASK | wire::FLAG_NEED_REPLY) != 0 {
            return Err(RequestError::Header { flags: m.flags });
        }
        let may_carry_fds = matches!(
            m.request,
            req::SET_MEM_TABLE
                | req::SET_VRING_KICK
                | req::SET_VRING_CALL
                | req::SET_VRING_ERR
                | req::SET_BACKEND_REQ_FD
                | req::ADD_MEM_REG
                | req::REM_MEM_REG
                | req::SET_INFLIGHT_FD
        );
        if !may_carry_fds && !m.fds.is_empty() {
            return Err(RequestError::Fds {
                got: m.fds.len(),
                want: "none",
            });
        }
        match m.request {
            req::SET_OWNER => {
                body(m, 0)?;
                if self.owned {
                    return Err(RequestError::AlreadyOwned);
                }
                self.owned = true;
                Ok(Reply::Ack)
            }
            req::RESET_OWNER => {
                body(m, 0)?;
                self.owned = false;
                self.features_acked = false;
                self.acked_features = 0;
                self.acked_protocol_features = 0;
                self.early_enable.fill(None);
                Ok(Reply::Ack)
            }
            req::RESET_DEVICE => {
                self.need_protocol(VhostUserProtocolFeatures::RESET_DEVICE, "RESET_DEVICE")?;
                body(m, 0)?;
                for (index, vring) in self.vrings.iter().enumerate() {
                    vring.set_enabled(false);
                    self.update_vring_registration(vring, index)?;
                }
                // The device state is reset; the protocol state is kept.
                self.features_acked = false;
                self.acked_features = 0;
                self.early_enable.fill(None);
                self.backend.reset_device();
                Ok(Reply::Ack)
            }
            req::GET_FEATURES => {
                body(m, 0)?;
                Ok(Reply::Body(self.backend.features().to_le_bytes().to_vec()))
            }
            req::SET_FEATURES => {
                let features = u64_body(m)?;
                self.set_features(features)?;
                Ok(Reply::Ack)
            }
            req::GET_PROTOCOL_FEATURES => {
                body(m, 0)?;
                let features =
                    self.backend.protocol_features() | VhostUserProtocolFeatures::REPLY_ACK;
                Ok(Reply::Body(features.bits().to_le_bytes().to_vec()))
            }
            req::SET_PROTOCOL_FEATURES => {
                let features = u64_body(m)?;
                let offered = (self.backend.protocol_features()
                    | VhostUserProtocolFeatures::REPLY_ACK)
                    .bits();
                if features & !offered != 0 {
                    return Err(RequestError::NotOffered {
                        what: "protocol features",
                        bits: features & !offered,
                    });
                }
                // A back end that offers VHOST_USER_F_PROTOCOL_FEATURES answers this even
                // before SET_FEATURES.
                self.acked_protocol_features = features;
                Ok(Reply::Ack)
            }
            req::GET_QUEUE_NUM => {
                self.need_protocol(VhostUserProtocolFeatures::MQ, "MQ")?;
                body(m, 0)?;
                Ok(Reply::Body(
                    (self.vrings.len() as u64).to_le_bytes().to_vec(),
                ))
            }
            req::SET_MEM_TABLE => {
                self.set_mem_table(m)?;
                Ok(Reply::Ack)
            }
            req::GET_MAX_MEM_SLOTS => {
                self.need_protocol(
                    VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
                    "CONFIGURE_MEM_SLOTS",
                )?;
                body(m, 0)?;
                Ok(Reply::Body(MAX_MEM_SLOTS.to_le_bytes().to_vec()))
            }
            req::ADD_MEM_REG => {
                self.need_protocol(
                    VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
                    "CONFIGURE_MEM_SLOTS",
                )?;
                self.add_mem_region(m)?;
                Ok(Reply::Ack)
            }
            req::REM_MEM_REG => {
                self.need_protocol(
                    VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
                    "CONFIGURE_MEM_SLOTS",
                )?;
                self.remove_mem_region(m)?;
                Ok(Reply::Ack)
            }
            req::SET_VRING_NUM => {
                let (ring, num) = vring_state(m)?;
                let vring = self.vring(ring)?;
                let max = self.max_queue_size;
                if num == 0 || num as usize > max || !num.is_power_of_two() {
                    return Err(RequestError::QueueSize { ring, num, max });
                }
                vring.set_queue_size(num as u16);
                Ok(Reply::Ack)
            }
            req::SET_VRING_ADDR => {
                self.set_vring_addr(m)?;
                Ok(Reply::Ack)
            }
            req::SET_VRING_BASE => {
                let (ring, num) = vring_state(m)?;
                let vring = self.vring(ring)?;
                let base = u16::try_from(num).map_err(|_| RequestError::Base { ring, num })?;
                vring.set_queue_next_avail(base);
                Ok(Reply::Ack)
            }
            req::GET_VRING_BASE => {
                let (ring, _) = vring_state(m)?;
                let next_avail = self.get_vring_base(ring)?;
                let mut b = ring.to_le_bytes().to_vec();
                b.extend_from_slice(&u32::from(next_avail).to_le_bytes());
                Ok(Reply::Body(b))
            }
            req::SET_VRING_KICK | req::SET_VRING_CALL | req::SET_VRING_ERR => {
                let (ring, file) = vring_file(m)?;
                let index = self.vring_index(ring)?;
                match m.request {
                    req::SET_VRING_KICK => self.set_vring_kick(index, file)?,
                    req::SET_VRING_CALL => self.set_vring_call(index, file)?,
                    _ => self.vrings[index].set_err(file),
                }
                Ok(Reply::Ack)
            }
            req::SET_VRING_ENABLE => {
                let (ring, num) = vring_state(m)?;
                let index = self.vring_index(ring)?;
                let enable = match num {
                    0 => false,
                    1 => true,
                    _ => return Err(RequestError::Enable { ring, num }),
                };
                self.set_vring_enable(index, enable)?;
                Ok(Reply::Ack)
            }
            req::GET_CONFIG => {
                self.need_protocol(VhostUserProtocolFeatures::CONFIG, "CONFIG")?;
                let (offset, size, flags) = config_header(m)?;
                let data = self.backend.get_config(offset, size);
                // On failure the reply has no payload (the spec's "size 0" error).
                let data = if data.len() == size as usize {
                    data
                } else {
                    Vec::new()
                };
                let mut b = offset.to_le_bytes().to_vec();
                b.extend_from_slice(&(data.len() as u32).to_le_bytes());
                b.extend_from_slice(&flags.to_le_bytes());
                b.extend_from_slice(&data);
                Ok(Reply::Body(b))
            }
            req::SET_CONFIG => {
                self.need_protocol(VhostUserProtocolFeatures::CONFIG, "CONFIG")?;
                let (offset, _, _) = config_header(m)?;
                self.backend
                    .set_config(offset, &m.body[12..])
                    .map_err(RequestError::Device)?;
                Ok(Reply::Ack)
            }
            req::SET_BACKEND_REQ_FD => {
                self.need_protocol(VhostUserProtocolFeatures::BACKEND_REQ, "BACKEND_REQ")?;
                let fd = single_fd(m)?;
                if !is_unix_stream(&fd) {
                    return Err(RequestError::NotAStreamSocket);
                }
                self.backend
                    .set_backend_req_fd(BackendChannel::new(UnixStream::from(fd)));
                Ok(Reply::Ack)
            }
            req::GET_INFLIGHT_FD => {
                self.need_protocol(VhostUserProtocolFeatures::INFLIGHT_SHMFD, "INFLIGHT_SHMFD")?;
                let info = self.inflight_info(m)?;
                let (_, file, reply) = InflightRegion::allocate(info.num_queues, info.queue_size)?;
                log::info!(
                    "in-flight tracking: a region for {} queues of {} entries ({} bytes) handed \
                     to the front end",
                    reply.num_queues,
                    reply.queue_size,
                    reply.mmap_size
                );
                Ok(Reply::BodyFd(reply.to_bytes(), file))
            }
            req::SET_INFLIGHT_FD => {
                self.need_protocol(VhostUserProtocolFeatures::INFLIGHT_SHMFD, "INFLIGHT_SHMFD")?;
                let info = self.inflight_info(m)?;
                let fd = single_fd(m)?;
                self.set_inflight(File::from(fd), &info)?;
                Ok(Reply::Ack)
            }
            _ => Err(RequestError::Unsupported),
        }
    }

    /// The body of GET/SET_INFLIGHT_FD, checked against the device.
    fn inflight_info(&self, m: &Message) -> Result<InflightInfo, RequestError> {
        let info = InflightInfo::from_bytes(body(m, INFO_LEN)?).ok_or(RequestError::BodySize {
            got: m.body.len(),
            want: INFO_LEN,
        })?;
        let max = self.vrings.len();
        if info.num_queues == 0 || usize::from(info.num_queues) > max {
            return Err(InflightError::QueueCount {
                got: info.num_queues,
                max,
            }
            .into());
        }
        let qs = info.queue_size;
        if qs == 0 || !qs.is_power_of_two() || usize::from(qs) > self.max_queue_size {
            return Err(InflightError::QueueSize {
                got: qs,
                max: self.max_queue_size,
            }
            .into());
        }
        Ok(info)
    }

    /// Maps the in-flight region and attaches each queue's part to its vring (a ring already
    /// running reads it at once).
    fn set_inflight(&mut self, file: File, info: &InflightInfo) -> Result<(), RequestError> {
        let region = Arc::new(InflightRegion::map(file, info)?);
        let handover = region.was_used();
        log::info!(
            "in-flight tracking on for {} queues of {} entries{}",
            info.num_queues,
            info.queue_size,
            if handover {
                " (a region an earlier back end used: its requests in flight are resubmitted)"
            } else {
                ""
            }
        );
        for (index, vring) in self.vrings.iter().enumerate() {
            vring
                .get_mut()
                .set_inflight(InflightQueue::new(region.clone(), index));
            if vring.get_ref().get_queue().ready() {
                self.start_inflight(index)?;
            }
        }
        self.inflight = Some(region);
        if handover {
            self.backend.inflight_handover();
        }
        Ok(())
    }

    /// Reads ring `index`'s part of the in-flight region as the ring starts.
    fn start_inflight(&self, index: usize) -> Result<(), RequestError> {
        let replay = self.vrings[index].get_mut().start_inflight()?;
        let Some(replay) = replay else {
            return Ok(());
        };
        for why in &replay.dropped {
            log::warn!("ring {index}: an in-flight entry was not replayed: {why}");
        }
        if replay.finished_last_batch {
            log::debug!(
                "ring {index}: the last used element had been published before the restart"
            );
        }
        if !replay.heads.is_empty() {
            log::info!(
                "ring {index}: resubmitting {} requests that were in flight, oldest first",
                replay.heads.len()
            );
            self.backend.inflight_replayed(index, replay.heads.len());
        }
        Ok(())
    }

    fn need_protocol(
        &self,
        feature: VhostUserProtocolFeatures,
        name: &'static str,
    ) -> Result<(), RequestError> {
        if self.acked_protocol_features & feature.bits() != 0 {
            Ok(())
        } else {
            Err(RequestError::NotNegotiated(name))
        }
    }

    fn vring_index(&self, ring: u32) -> Result<usize, RequestError> {
        let index = ring as usize;
        if index < self.vrings.len() {
            Ok(index)
        } else {
            Err(RequestError::NoSuchRing {
                ring,
                rings: self.vrings.len(),
            })
        }
    }

    fn vring(&self, ring: u32) -> Result<&T::Vring, RequestError> {
        Ok(&self.vrings[self.vring_index(ring)?])
    }

    fn set_features(&mut self, features: u64) -> Result<(), RequestError> {
        let offered = self.backend.features();
        if features & !offered != 0 {
            return Err(RequestError::NotOffered {
                what: "features",
                bits: features & !offered,
            });
        }
        self.acked_features = features;
        self.features_acked = true;
        let early = std::mem::replace(&mut self.early_enable, vec![None; self.vrings.len()]);
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            // Without VHOST_USER_F_PROTOCOL_FEATURES every ring is enabled at once
            // (https://qemu-project.gitlab.io/qemu/interop/vhost-user.html#ring-states).
            for (index, vring) in self.vrings.iter().enumerate() {
                vring.set_enabled(true);
                self.update_vring_registration(vring, index)?;
            }
        } else {
            // With it, the rings stay as they are, plus what the front end asked for early.
            for (index, enable) in early.into_iter().enumerate() {
                if let Some(enable) = enable {
                    log::debug!(
                        "ring {index}: applying the SET_VRING_ENABLE {} that came before \
                         SET_FEATURES",
                        u8::from(enable)
                    );
                    let vring = &self.vrings[index];
                    vring.set_enabled(enable);
                    self.update_vring_registration(vring, index)?;
                }
            }
        }
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for vring in &self.vrings {
            vring.set_queue_event_idx(event_idx);
        }
        self.backend.set_event_idx(event_idx);
        self.backend.acked_features(features);
        Ok(())
    }

    fn set_vring_enable(&mut self, index: usize, enable: bool) -> Result<(), RequestError> {
        if !self.features_acked {
            // QEMU's vhost-user netdev enables (and disables) rings before it sets the
            // features. The spec defines the message only once VHOST_USER_F_PROTOCOL_FEATURES
            // is negotiated; remember the last state asked for each ring (one per ring: a
            // flood of them costs nothing) and apply it with SET_FEATURES.
            log::debug!(
                "ring {index}: SET_VRING_ENABLE {} before SET_FEATURES: applied when the features \
                 are set",
                u8::from(enable)
            );
            self.early_enable[index] = Some(enable);
            return Ok(());
        }
        if self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(RequestError::NoProtocolFeatures);
        }
        // The back end must not pass data to or from a ring until it is enabled, nor after it
        // is disabled.
        let vring = &self.vrings[index];
        vring.set_enabled(enable);
        self.update_vring_registration(vring, index)
    }

    fn set_mem_table(&mut self, m: &mut Message) -> Result<(), RequestError> {
        let n = u64::from(u32_at(&m.body, 0).ok_or(RequestError::BodySize {
            got: m.body.len(),
            want: 8,
        })?);
        if n > MAX_FDS as u64 {
            return Err(RequestError::TooManyRegions {
                got: n,
                max: MAX_FDS as u64,
            });
        }
        let n = n as usize;
        body(m, 8 + 32 * n)?;
        if m.fds.len() != n {
            return Err(RequestError::Fds {
                got: m.fds.len(),
                want: "one per region",
            });
        }
        let mut regions = Vec::with_capacity(n);
        let mut mappings = Vec::with_capacity(n);
        for (i, fd) in std::mem::take(&mut m.fds).into_iter().enumerate() {
            let r = region_at(&m.body, 8 + 32 * i);
            regions.push(map_region(&r, fd)?);
            mappings.push(r.mapping());
        }
        regions.sort_by_key(|r| r.start_addr());
        let mem = if regions.is_empty() {
            GuestMemoryMmap::new()
        } else {
            GuestMemoryMmap::from_regions(regions).map_err(RequestError::Layout)?
        };
        self.publish_memory(mem)?;
        self.mappings = mappings;
        Ok(())
    }

    /// Makes `mem` the connection's guest memory: the vrings see it the next time they call
    /// `memory()`, and the device is told.
    fn publish_memory(&mut self, mem: GuestMemoryMmap<()>) -> Result<(), RequestError> {
        self.mem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(mem);
        self.backend
            .update_memory(self.mem.clone())
            .map_err(RequestError::Device)
    }

    fn add_mem_region(&mut self, m: &mut Message) -> Result<(), RequestError> {
        body(m, 40)?;
        let fd = single_fd(m)?;
        if self.mappings.len() as u64 >= MAX_MEM_SLOTS {
            return Err(RequestError::TooManyRegions {
                got: self.mappings.len() as u64 + 1,
                max: MAX_MEM_SLOTS,
            });
        }
        // After 8 bytes of padding, one region as in a memory table.
        let r = region_at(&m.body, 8);
        let region = map_region(&r, fd)?;
        let mem = self
            .mem
            .memory()
            .insert_region(Arc::new(region))
            .map_err(RequestError::Layout)?;
        self.publish_memory(mem)?;
        self.mappings.push(r.mapping());
        Ok(())
    }

    fn remove_mem_region(&mut self, m: &mut Message) -> Result<(), RequestError> {
        body(m, 40)?;
        // "For compatibility with existing incorrect implementations, the back-end MAY accept
        // messages with one file descriptor", which it closes (dropping the message does).
        if m.fds.len() > 1 {
            return Err(RequestError::Fds {
                got: m.fds.len(),
                want: "none (or one, ignored)",
            });
        }
        let r = region_at(&m.body, 8);
        let (mem, _) = self
            .mem
            .memory()
            .remove_region(GuestAddress(r.gpa), r.size)
            .map_err(RequestError::Layout)?;
        self.publish_memory(mem)?;
        self.mappings.retain(|x| x.gpa_base != r.gpa);
        Ok(())
    }

    fn vmm_va_to_gpa(&self, ring: u32, what: &'static str, addr: u64) -> Result<u64, RequestError> {
        if self.mappings.is_empty() {
            return Err(RequestError::NoGuestMemory { ring });
        }
        self.mappings
            .iter()
            .find(|m| addr >= m.vmm_addr && addr - m.vmm_addr < m.size)
            .map(|m| addr - m.vmm_addr + m.gpa_base)
            .ok_or(RequestError::OutsideMemory { ring, what, addr })
    }

    fn set_vring_addr(&mut self, m: &Message) -> Result<(), RequestError> {
        body(m, 40)?;
        let b = &m.body;
        let (ring, flags) = (u32_at(b, 0).unwrap_or(0), u32_at(b, 4).unwrap_or(0));
        let desc = u64_at(b, 8).unwrap_or(0);
        let used = u64_at(b, 16).unwrap_or(0);
        let avail = u64_at(b, 24).unwrap_or(0);
        let vring = self.vring(ring)?;
        if flags & !1 != 0 {
            return Err(RequestError::RingFlags { ring, flags });
        }
        for (what, addr, align) in [
            ("descriptor table", desc, 16),
            ("avail ring", avail, 2),
            ("used ring", used, 4),
        ] {
            if addr % align != 0 {
                return Err(RequestError::Misaligned {
                    ring,
                    what,
                    addr,
                    align,
                });
            }
        }
        let desc = self.vmm_va_to_gpa(ring, "descriptor table", desc)?;
        let avail = self.vmm_va_to_gpa(ring, "avail ring", avail)?;
        let used = self.vmm_va_to_gpa(ring, "used ring", used)?;
        vring
            .set_queue_info(desc, avail, used)
            .map_err(|source| RequestError::Ring { ring, source })?;
        // SET_VRING_BASE restores only the avail index; the used index is whatever the
        // driver's used ring says (0 after a reboot), as QEMU's libvhost-user does.
        let idx = vring
            .queue_used_idx()
            .map_err(|source| RequestError::Ring { ring, source })?;
        vring.set_queue_next_used(idx);
        Ok(())
    }

    fn get_vring_base(&mut self, ring: u32) -> Result<u16, RequestError> {
        let index = self.vring_index(ring)?;
        let vring = &self.vrings[index];
        // "Client must start ring upon receiving a kick (that is, detecting that file
        // descriptor is readable) on the descriptor specified by VHOST_USER_SET_VRING_KICK,
        // and stop ring upon receiving VHOST_USER_GET_VRING_BASE."
        vring.set_queue_ready(false);
        self.update_vring_registration(vring, index)?;
        self.backend
            .stop_vring(ring)
            .map_err(RequestError::Device)?;
        let next_avail = vring.queue_next_avail();
        vring.set_kick(None);
        vring.set_call(None);
        Ok(next_avail)
    }

    fn set_vring_kick(&mut self, index: usize, file: Option<File>) -> Result<(), RequestError> {
        let vring = &self.vrings[index];
        // A new kick for a running ring: take the old one out of its epoll before it closes.
        if vring.get_ref().get_queue().ready() {
            vring.set_queue_ready(false);
            self.update_vring_registration(vring, index)?;
            vring.set_kick(file);
            vring.set_queue_ready(true);
            return self.update_vring_registration(vring, index);
        }
        vring.set_kick(file);
        self.init_vring_if_needed(index)
    }

    fn set_vring_call(&mut self, index: usize, file: Option<File>) -> Result<(), RequestError> {
        let vring = &self.vrings[index];
        if let Some(call) = &file {
            // Used buffers published while the front end had no (or another) call eventfd,
            // across a reconnect for instance, signalled nobody: signal the new one once, as
            // QEMU's libvhost-user does. A spurious interrupt costs the driver one look at its
            // used ring.
            let _ = notify(call);
        }
        vring.set_call(file);
        self.init_vring_if_needed(index)
    }

    /// Starts a ring once it has its kick (QEMU sends SET_VRING_KICK last).
    fn init_vring_if_needed(&self, index: usize) -> Result<(), RequestError> {
        let vring = &self.vrings[index];
        let needs_init = {
            let st = vring.get_ref();
            !st.get_queue().ready() && st.has_kick()
        };
        if needs_init {
            self.start_inflight(index)?;
            vring.set_queue_ready(true);
            self.update_vring_registration(vring, index)?;
        }
        Ok(())
    }

    /// Adds the ring's kick to its worker's epoll or removes it, after the ring's state: kicks
    /// are served only while the ring is both started and enabled, and none is lost (the
    /// worker serves a newly registered ring once without a kick).
    fn update_vring_registration(
        &self,
        vring: &T::Vring,
        index: usize,
    ) -> Result<(), RequestError> {
        let st = vring.get_ref();
        let Some(fd) = st.get_kick().map(AsRawFd::as_raw_fd) else {
            return Ok(());
        };
        let Some((thread, mask)) = self
            .queues_per_thread
            .iter()
            .enumerate()
            .find(|(_, mask)| index < 64 && (*mask >> index) & 1 == 1)
        else {
            return Ok(());
        };
        // The ring's number among its thread's rings.
        let token = u64::from((mask & ((1u64 << index) - 1)).count_ones());
        let worker = &self.workers[thread];
        if st.get_queue().ready() && st.is_enabled() {
            if let Err(source) = worker.register_event(fd, EventSet::IN, token)
                && source.kind() != io::ErrorKind::AlreadyExists
            {
                // An already enabled ring enabled again is no error.
                return Err(RequestError::Register {
                    ring: index as u32,
                    thread,
                    source,
                });
            }
        } else {
            let _ = worker.unregister_event(fd, EventSet::IN, token);
        }
        Ok(())
    }
}

impl<T: VhostUserBackend> Drop for Connection<T> {
    fn drop(&mut self) {
        for w in &self.workers {
            w.send_exit_event();
        }
        for t in self.threads.drain(..) {
            // A worker's error was logged when it stopped.
            if t.join().is_err() {
                log::error!("a vring worker thread panicked");
            }
        }
    }
}

/// Checks that the body is exactly `want` bytes.
fn body(m: &Message, want: usize) -> Result<&[u8], RequestError> {
    if m.body.len() == want {
        Ok(&m.body)
    } else {
        Err(RequestError::BodySize {
            got: m.body.len(),
            want,
        })
    }
}

fn u64_body(m: &Message) -> Result<u64, RequestError> {
    Ok(u64_at(body(m, 8)?, 0).unwrap_or(0))
}

/// A vring state body: (index, number).
fn vring_state(m: &Message) -> Result<(u32, u32), RequestError> {
    let b = body(m, 8)?;
    Ok((u32_at(b, 0).unwrap_or(0), u32_at(b, 4).unwrap_or(0)))
}

/// A vring file body: the ring (bits 0–7) and its eventfd, unless bit 8 says there is none.
fn vring_file(m: &mut Message) -> Result<(u32, Option<File>), RequestError> {
    let v = u64_body(m)?;
    let has_fd = v & 0x100 == 0;
    let want = if has_fd { 1 } else { 0 };
    if m.fds.len() != want {
        return Err(RequestError::Fds {
            got: m.fds.len(),
            want: if has_fd {
                "one (bit 8 of the body is clear)"
            } else {
                "none (bit 8 of the body says so)"
            },
        });
    }
    Ok(((v & 0xff) as u32, m.fds.pop().map(File::from)))
}

fn single_fd(m: &mut Message) -> Result<OwnedFd, RequestError> {
    if m.fds.len() != 1 {
        return Err(RequestError::Fds {
            got: m.fds.len(),
            want: "one",
        });
    }
    Ok(m.fds.remove(0))
}

/// A config message's header: (offset, size, flags), checked against its payload.
fn config_header(m: &Message) -> Result<(u32, u32, u32), RequestError> {
    let b = &m.body;
    let (Some(offset), Some(size), Some(flags)) = (u32_at(b, 0), u32_at(b, 4), u32_at(b, 8)) else {
        return Err(RequestError::BodySize {
            got: b.len(),
            want: 12,
        });
    };
    if b.len() - 12 != size as usize {
        return Err(RequestError::BodySize {
            got: b.len(),
            want: 12 + size as usize,
        });
    }
    // Flags: WRITABLE (0x1) and LIVE_MIGRATION (0x2).
    let end = offset.checked_add(size);
    if flags & !0x3 != 0 || size == 0 || end.is_none_or(|e| e > CONFIG_SPACE) {
        return Err(RequestError::Config {
            offset,
            size,
            flags,
        });
    }
    Ok((offset, size, flags))
}

/// One memory region as a message carries it.
struct Region {
    gpa: u64,
    size: u64,
    user: u64,
    offset: u64,
}

impl Region {
    fn mapping(&self) -> AddrMapping {
        AddrMapping {
            vmm_addr: self.user,
            size: self.size,
            gpa_base: self.gpa,
        }
    }
}

fn region_at(b: &[u8], at: usize) -> Region {
    Region {
        gpa: u64_at(b, at).unwrap_or(0),
        size: u64_at(b, at + 8).unwrap_or(0),
        user: u64_at(b, at + 16).unwrap_or(0),
        offset: u64_at(b, at + 24).unwrap_or(0),
    }
}

/// Maps a region of the front end's guest memory from its descriptor.
fn map_region(r: &Region, fd: OwnedFd) -> Result<GuestRegionMmap<()>, RequestError> {
    let invalid = || RequestError::Region {
        gpa: r.gpa,
        size: r.size,
        user: r.user,
        offset: r.offset,
    };
    let wraps = r.gpa.checked_add(r.size).is_none()
        || r.user.checked_add(r.size).is_none()
        || r.offset.checked_add(r.size).is_none();
    let size = usize::try_from(r.size).map_err(|_| invalid())?;
    if r.size == 0 || wraps {
        return Err(invalid());
    }
    let mapping = MmapRegion::<()>::from_file(FileOffset::new(File::from(fd), r.offset), size)
        .map_err(|source| RequestError::Map {
            gpa: r.gpa,
            size: r.size,
            source,
        })?;
    GuestRegionMmap::new(mapping, GuestAddress(r.gpa)).ok_or_else(invalid)
}

/// Whether `fd` is a unix stream socket (what a back-end channel must be).
fn is_unix_stream(fd: &OwnedFd) -> bool {
    let int_opt = |opt| {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt(2) writes at most `len` bytes (one int) into `v`, which lives for
        // the call; `fd` is an open descriptor we own (a non-socket only makes the call fail).
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&raw mut v).cast(),
                &mut len,
            )
        };
        (r == 0).then_some(v)
    };
    int_opt(libc::SO_DOMAIN) == Some(libc::AF_UNIX)
        && int_opt(libc::SO_TYPE) == Some(libc::SOCK_STREAM)
}
