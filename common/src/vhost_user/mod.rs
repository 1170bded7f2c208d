//! The vhost-user back-end core vback owns: the request handler that speaks to the front end,
//! the vrings, and the worker threads that serve them.
//!
//! A backend implements [`VhostUserBackend`] (the same trait, nearly, as rust-vmm's
//! vhost-user-backend crate) and hands it to a [`crate::Port`] (or [`crate::Daemon`]), which
//! accepts each front end and serves it through a [`Connection`]: the connection builds the
//! device's vrings and worker threads, reads the front end's requests on the port's own thread,
//! checks each one (header, body size, descriptors, the protocol features it needs), applies it
//! and answers. Kicks are
//! served by the worker threads ([`VringEpollHandler`]), which call the device's
//! `handle_event`; the handler never touches the data path.
//!
//! # Origin
//!
//! This is a fork of vhost-user-backend 0.24.0 (rust-vmm, Apache-2.0: `backend.rs`,
//! `event_loop.rs`, `vring.rs`, and the request semantics of `handler.rs`; those files keep
//! their copyright and licence headers), with its own message loop in place of the vhost
//! crate's (0.18) `BackendReqHandler`, whose message types and checks it follows. The vhost
//! crate is still used for the protocol's flag definitions and, in tests and vmm-min, as the
//! front end. crosvm owns its handler for the same reasons. What changed:
//!
//! - **Early SET_VRING_ENABLE.** QEMU's vhost-user netdev enables rings before it sets the
//!   features; vhost-user-backend refused that and dropped the connection, so vback relayed
//!   every connection through a thread that answered those messages itself. The handler now
//!   remembers the last state asked for each ring (bounded: one per ring; a ring that does not
//!   exist is refused) and applies it when SET_FEATURES arrives.
//! - **The back-end channel.** SET_BACKEND_REQ_FD's socket is handed to the device as a
//!   [`BackendChannel`], which sends CONFIG_CHANGE_MSG (the library's `Backend` wrapper could
//!   not, nor expose its socket, so blkback used to look for the socket in `/proc/self/fd`).
//! - **The connection is accepted by the daemon**, which therefore knows the front end's
//!   socket (its SO_PEERCRED pid and uid are logged) and can end it (stop).
//! - **No descriptor leaks across connections.** Each worker thread owns its wake-up eventfd
//!   (exit and "a ring was registered"), closed with it; the library registered the consumer
//!   the backend gave it with `into_raw_fd()` and never closed it.
//! - **A new call eventfd is signalled once** (SET_VRING_CALL), as libvhost-user does, so that
//!   no interrupt is lost across a reconnect or a change of eventfd.
//! - **Descriptors are received close-on-exec** (MSG_CMSG_CLOEXEC): guest memory and eventfds
//!   do not leak into child processes (netback's hotplug scripts).
//! - **Debug logging** of every request and reply (its type, ring and key values) at
//!   `--log-level debug`, done by the handler itself.
//! - **Errors** are thiserror enums that name the request and what is wrong with it; a memory
//!   region that cannot be mapped and rings without guest memory are told apart, so the daemon
//!   can say that guest memory is not shared. Unsorted memory tables are sorted; a memory table
//!   of 0 regions maps nothing (the rings then fail with that hint); a queue size that is not a
//!   power of two, acked features or protocol features that were not offered, and ring bases
//!   beyond 16 bits are refused; SET_VRING_KICK on a running ring moves the registration to the
//!   new eventfd.
//! - **In-flight tracking** (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`, for devices that offer it):
//!   GET_INFLIGHT_FD allocates a sealed memfd in libvhost-user's split-ring layout,
//!   SET_INFLIGHT_FD maps the one the front end kept and attaches each queue's part to its
//!   vring ([`inflight`]); [`driver::pop`] marks each request it takes, the vring's `add_used`
//!   clears the mark once the used element is published, and a ring that starts with marks
//!   left by a crashed back end replays them (each entry checked), oldest first, before new
//!   requests. vhost-user-backend answered both requests "not supported".
//! - **Gone**: dirty-page logging bitmaps (no device logs yet), postcopy, Xen mappings, the GPU
//!   socket, shared objects, device state transfer, shared memory regions, `VringMutex`, the
//!   `VhostUserBackendMut` variant. Those requests are refused.
//!
//! # What to propose upstream (rust-vmm/vhost)
//!
//! - vhost-user-backend: keep the exit consumer as an `EventConsumer` owned by
//!   `VringEpollHandler` (or create the exit eventfd in the library) so it is closed with the
//!   handler: today one descriptor leaks per connection.
//! - vhost-user-backend: accept SET_VRING_ENABLE before SET_FEATURES (remember it per ring and
//!   apply it with the features), as QEMU's vhost-user netdev sends it then.
//! - vhost: let `Backend` send VHOST_USER_BACKEND_CONFIG_CHANGE_MSG (and the other back-end
//!   requests), or expose its socket, and have vhost-user-backend hand it to the backend.
//! - vhost-user-backend: signal a new call eventfd once on SET_VRING_CALL (libvhost-user's
//!   "in case of I/O hang after reconnecting").
//! - vhost: receive descriptors with MSG_CMSG_CLOEXEC.
//! - vhost-user-backend: in-flight tracking (rust-vmm/vhost-user-backend#14, PR #20 open since
//!   2021): the region and its validated replay as `inflight.rs` does them, and a way to build a
//!   `DescriptorChain` for a given head (virtio-queue keeps `DescriptorChain::new` private, so
//!   `driver.rs` carries its own bounded chain walker for resubmitted heads).
//! - vhost-user-backend: a way to serve an already accepted `UnixStream` (the daemon wants the
//!   peer's credentials and to shut the connection down), and refuse queue sizes that are not
//!   a power of two instead of ignoring them in virtio-queue's `set_size`.

mod backend;
mod channel;
pub mod driver;
mod event_loop;
mod handler;
pub mod inflight;
mod vring;
pub mod wire;

use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

pub use backend::VhostUserBackend;
pub use channel::{BackendChannel, ChannelError};
pub use event_loop::{VringEpollError, VringEpollHandler};
pub use handler::{Connection, ConnectionError, MAX_MEM_SLOTS, RequestError, SetupError};
pub use vring::{VringRwLock, VringState, VringStateGuard, VringStateMutGuard, VringT};

/// The guest memory of a connection, as the devices see it.
pub type Memory = GuestMemoryAtomic<GuestMemoryMmap<()>>;

#[cfg(test)]
mod tests;
