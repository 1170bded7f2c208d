//! vback-common: what every vback backend shares.
//!
//! - [`daemon`]: common options ([`CommonArgs`]), the vhost-user serve loop that serves again
//!   after a front end disconnects, systemd socket activation and readiness, clean shutdown;
//! - [`control`]: the line-delimited JSON control protocol, server and client;
//! - [`spec`]: Xen configuration strings (disk unames and entries, vif specs, rates, sizes);
//! - [`vhost_user`]: the vhost-user back-end core (the request handler, vrings, worker
//!   threads) and the [`vhost_user::VhostUserBackend`] trait every backend implements;
//! - [`socket`], [`notify`]: unix socket binding and `sd_notify`.
//!
//! Storage (the I/O engine, image locks, disks and their formats) is the `vback-block` crate's.

pub mod chain;
pub mod control;
pub mod daemon;
pub mod logging;
pub mod notify;
pub mod ring;
pub mod socket;
pub mod spec;
pub mod sync;
pub mod testing;
pub mod vhost_user;

pub use daemon::{
    CommonArgs, Daemon, DaemonError, DeviceInfo, LogLevel, StopHandle, fatal, init_logging,
    not_implemented,
};
