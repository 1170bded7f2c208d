//! vback-common: what every vback backend shares.
//!
//! - [`daemon`]: the process ([`Process`]: logging, signals, systemd readiness and watchdog, the
//!   control socket, the hook where a sandbox will be entered) and its vhost-user ports
//!   ([`Port`]: listen source, the serve loop that serves again after a front end disconnects);
//!   common options ([`CommonArgs`]) and the one-port [`Daemon`] the backends run;
//! - [`control`]: the line-delimited JSON control protocol, server and client;
//! - [`spec`]: Xen configuration strings (disk unames and entries, vif specs, rates, sizes;
//!   from `vback-base`, re-exported);
//! - [`vhost_user`]: the vhost-user back-end core (the request handler, vrings, worker
//!   threads) and the [`vhost_user::VhostUserBackend`] trait every backend implements;
//! - [`docgen`]: man pages and shell completions generated from each binary's options (from
//!   `vback-base`, re-exported);
//! - [`hotplug`]: Xen-style hotplug scripts (netback's vif scripts, blkback's vbd scripts);
//! - [`socket`], [`notify`]: unix socket binding and `sd_notify`.
//!
//! Storage (the I/O engine, image locks, disks and their formats) is the `vback-block` crate's.

pub mod chain;
pub mod control;
pub mod daemon;
pub mod hotplug;
pub mod logging;
pub mod notify;
pub mod ring;
pub mod socket;
pub mod sync;
pub mod testing;
pub mod vhost_user;

pub use vback_base::{docgen, spec};

pub use daemon::{
    CommonArgs, Daemon, DaemonError, DeviceInfo, ListenSource, LogLevel, Port, Process, StopHandle,
    fatal, init_logging, not_implemented,
};
