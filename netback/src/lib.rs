//! netback: a vhost-user-net backend with Xen's vif semantics.
//!
//! - [`rate`]: Xen's credit scheduler for `rate=RATE@WINDOW`;
//! - [`device`]: the virtio-net frame formats (transport-free);
//! - [`vhost`]: the only module that knows vhost-user.
//!
//! So far the host side is `null` (transmitted frames counted and dropped, a frame generated
//! for the guest periodically); the kernel tap with bridge, route and masquerade modes comes
//! next.

pub mod device;
pub mod rate;
pub mod vhost;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use vback_common::control::ControlHandler;
use vback_common::spec::{MacAddr, VifSpec};
use vback_common::{CommonArgs, Daemon, DaemonError, DeviceInfo};

use crate::rate::CreditLimiter;
use crate::vhost::NetBackend;

/// What `--print-capabilities` reports.
pub const INFO: DeviceInfo = DeviceInfo {
    name: "netback",
    vhost_type: "net",
    features: &[],
};

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The vif spec.
    pub vif: VifSpec,
    /// The guest's MAC (from the vif, or a random Xen one).
    pub mac: MacAddr,
    /// Host interface name.
    pub ifname: String,
    /// Daemon options.
    pub common: CommonArgs,
}

#[derive(Debug)]
struct NetControl {
    backend: NetBackend,
    config: Config,
}

impl ControlHandler for NetControl {
    fn status(&self) -> Value {
        json!({
            "host": "null",
            "mac": self.config.mac.to_string(),
            "vifname": self.config.ifname,
            "rate": self.config.vif.rate.map(|r| json!({"bytes_per_second": r.bytes_per_second, "credit_bytes": r.credit_bytes, "window_us": r.window_us()})),
        })
    }

    fn stats(&self) -> Value {
        self.backend.stats()
    }
}

/// Serves the interface with the null host side until SIGTERM/SIGINT.
pub fn run_null(config: Config) -> Result<(), DaemonError> {
    let limiter = config.vif.rate.map(|r| CreditLimiter::new(&r, 0));
    let backend = NetBackend::new_null(limiter, config.vif.mtu, Duration::from_millis(100))
        .map_err(DaemonError::Setup)?;
    log::info!(
        "interface {} mac {} (null host side){}",
        config.ifname,
        config.mac,
        config
            .vif
            .rate
            .map_or(String::new(), |r| format!(", transmit limited to {r}"))
    );
    let control = Arc::new(NetControl {
        backend: backend.clone(),
        config: config.clone(),
    });
    let b2 = backend.clone();
    Daemon::new(INFO, config.common, control)?
        .with_early_enable_relay()
        .run_with(backend, move |h| b2.register_timers(h))
}
