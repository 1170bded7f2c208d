//! netback: a vhost-user-net backend with Xen's vif semantics.
//!
//! - [`tap`]: the host side, a kernel tap with a queue per pair;
//! - [`hotplug`]: Xen-style `vif-bridge`/`vif-route`/`vif-nat` scripts;
//! - [`rate`]: Xen's credit scheduler for `rate=RATE@WINDOW`;
//! - [`device`], [`ctrl`]: the virtio-net frame and control formats (transport-free);
//! - [`pair`]: one queue pair's data path;
//! - [`vhost`]: the only module that knows vhost-user.

pub mod ctrl;
pub mod device;
/// Hotplug scripts: the runner is shared ([`vback_common::hotplug`]).
pub use vback_common::hotplug;
pub mod pair;
pub mod rate;
pub mod tap;
pub mod vhost;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use thiserror::Error;
use vback_common::control::ControlHandler;
use vback_common::spec::{MacAddr, VifSpec};
use vback_common::sync::lock;
use vback_common::{CommonArgs, Daemon, DaemonError, DeviceInfo};

use crate::hotplug::{Hotplug, HotplugError};
use crate::tap::{Tap, TapError};
use crate::vhost::{HostSide, NetBackend, NetOptions};

/// What `--print-capabilities` reports.
pub const INFO: DeviceInfo = DeviceInfo {
    name: "netback",
    vhost_type: "net",
    features: &[],
};

/// What the null host side sends the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NullRx {
    /// Nothing.
    Off,
    /// One frame every 100 ms.
    Tick,
    /// A frame in every receive buffer the guest posts (for benchmarks).
    Flood,
}

/// The host side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    /// A kernel tap named after the interface, set up by the hotplug script.
    Tap,
    /// No host: transmitted frames are counted and dropped, received frames generated.
    Null {
        /// What the guest receives.
        rx: NullRx,
        /// Length of the generated frames.
        frame_len: usize,
    },
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The vif spec.
    pub vif: VifSpec,
    /// The guest's MAC (from the vif, or a random Xen one).
    pub mac: MacAddr,
    /// Host interface name.
    pub ifname: String,
    /// The guest's domain, as given (name or number).
    pub domain: String,
    /// The domain's number, when it is one.
    pub domid: Option<u32>,
    /// The interface's number within the guest.
    pub devid: u32,
    /// Queue pairs.
    pub queues: u16,
    /// The host side.
    pub host: Host,
    /// Where script names are looked up.
    pub script_dir: PathBuf,
    /// Busy-poll window of an empty ring.
    pub poll: Duration,
    /// Write transmitted frames to the tap in io_uring batches (else one `writev` each).
    pub tap_batch: bool,
    /// Daemon options.
    pub common: CommonArgs,
}

/// Why netback stopped.
#[derive(Debug, Error)]
pub enum NetbackError {
    /// The tap could not be set up.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// The hotplug script failed; the interface was taken down and removed.
    #[error("{0}; the interface was taken down")]
    Hotplug(#[from] HotplugError),
    /// The daemon failed.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
}

impl Config {
    /// The script to run: `script=` (`none` or empty: no script), or `vif-bridge` as in Xen.
    pub fn script(&self) -> Option<PathBuf> {
        match self.vif.script.as_deref() {
            Some("" | "none") => None,
            Some(s) => Some(Hotplug::resolve(s, &self.script_dir)),
            None => Some(Hotplug::resolve("vif-bridge", &self.script_dir)),
        }
    }

    fn hotplug(&self, path: PathBuf) -> Hotplug {
        let mode = Hotplug::mode_of(&path).to_owned();
        let ips: Vec<String> = self.vif.ip.iter().map(ToString::to_string).collect();
        let mut env = vec![
            ("vif".to_owned(), self.ifname.clone()),
            ("mac".to_owned(), self.mac.to_string()),
            ("domain".to_owned(), self.domain.clone()),
            ("devid".to_owned(), self.devid.to_string()),
            ("mode".to_owned(), mode),
            ("ip".to_owned(), ips.join(" ")),
        ];
        if let Some(d) = self.domid {
            env.push(("domid".to_owned(), d.to_string()));
        }
        if let Some(b) = &self.vif.bridge {
            env.push(("bridge".to_owned(), b.clone()));
        }
        if let Some(m) = self.vif.mtu {
            env.push(("mtu".to_owned(), m.to_string()));
        }
        Hotplug { path, env }
    }

    fn options(&self) -> NetOptions {
        NetOptions {
            pairs: usize::from(self.queues),
            mac: self.mac,
            mtu: self.vif.mtu,
            tx_rate: self.vif.rate,
            rx_rate: self.vif.rate_rx,
            poll: self.poll,
            tap_batch: self.tap_batch,
        }
    }
}

#[derive(Debug)]
struct NetControl {
    backend: NetBackend,
    config: Config,
    hotplug: Mutex<Value>,
}

impl NetControl {
    /// The bridge the interface is on now, as the kernel has it (the hotplug script chose it:
    /// `bridge=`, or for vif-bridge without it the first bridge on the host); `None` without a
    /// tap or when the tap is not a bridge port.
    fn bridge(&self) -> Option<String> {
        match self.config.host {
            Host::Tap => bridge_of(&self.config.ifname),
            Host::Null { .. } => None,
        }
    }
}

/// The bridge `ifname` is a port of, from sysfs (`master` links to the bridge).
fn bridge_of(ifname: &str) -> Option<String> {
    let master = std::fs::read_link(format!("/sys/class/net/{ifname}/master")).ok()?;
    let name = master.file_name()?.to_str()?.to_owned();
    Path::new("/sys/class/net")
        .join(&name)
        .join("bridge")
        .is_dir()
        .then_some(name)
}

impl ControlHandler for NetControl {
    fn status(&self) -> Value {
        let rate = |r: Option<vback_common::spec::Rate>| {
            r.map(|r| json!({"bytes_per_second": r.bytes_per_second, "credit_bytes": r.credit_bytes, "window_us": r.window_us()}))
        };
        json!({
            "host": match self.config.host { Host::Tap => "tap", Host::Null { .. } => "null" },
            "mac": self.config.mac.to_string(),
            "vifname": self.config.ifname,
            "queues": self.config.queues,
            "bridge": self.bridge(),
            "ip": self.config.vif.ip.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "hotplug": *lock(&self.hotplug),
            "rate": rate(self.config.vif.rate),
            "rate_rx": rate(self.config.vif.rate_rx),
        })
    }

    fn stats(&self) -> Value {
        self.backend.stats()
    }

    fn histograms(&self) -> Vec<vback_api::LabeledHistogram> {
        self.backend.histograms()
    }
}

/// Serves the interface until SIGTERM/SIGINT: creates the tap, runs the hotplug script's
/// `online`, serves front ends, and runs `offline` on the way out.
pub fn run(config: Config) -> Result<(), NetbackError> {
    let (host, tap) = match config.host {
        Host::Tap => {
            let tap = Arc::new(Tap::open(&config.ifname, usize::from(config.queues))?);
            if let Err(e) = tap.set_carrier(false) {
                log::warn!("{e}");
            }
            (HostSide::Tap(tap.clone()), Some(tap))
        }
        Host::Null { rx, frame_len } => (
            HostSide::Null {
                frame: device::null_frame(frame_len),
                tick: (rx == NullRx::Tick).then_some(Duration::from_millis(100)),
                flood: rx == NullRx::Flood,
            },
            None,
        ),
    };
    let backend = NetBackend::new(config.options(), host).map_err(DaemonError::Setup)?;

    let mut hotplug_status = json!({"status": "none"});
    let hotplug = match (&tap, config.script()) {
        (Some(tap), Some(path)) => {
            let h = config.hotplug(path);
            if let Err(e) = h.run("online") {
                let _ = tap::set_link_up(tap.name(), false);
                return Err(e.into());
            }
            match bridge_of(tap.name()) {
                Some(b) => log::info!("{} online: connected, on bridge {b}", h.path.display()),
                None => log::info!("{} online: connected", h.path.display()),
            }
            hotplug_status = json!({"status": "connected", "script": h.path});
            Some(h)
        }
        (Some(tap), None) => {
            if let Err(e) = tap::set_link_up(tap.name(), true) {
                log::warn!("cannot bring {} up: {e}", tap.name());
            }
            None
        }
        (None, _) => None,
    };
    log::info!(
        "interface {} mac {} ({} host side, {} queue pair(s)){}",
        config.ifname,
        config.mac,
        if tap.is_some() { "tap" } else { "null" },
        config.queues,
        config
            .vif
            .rate
            .map_or(String::new(), |r| format!(", transmit limited to {r}"))
    );
    let control = Arc::new(NetControl {
        backend: backend.clone(),
        config: config.clone(),
        hotplug: Mutex::new(hotplug_status),
    });
    let (b2, b3) = (backend.clone(), backend.clone());
    let served = Daemon::new(INFO, config.common.clone(), control)
        .map(|d| d.on_disconnect(move || b3.disconnected()))
        .and_then(|d| d.run_with(backend, move |h| b2.register(h)));
    if let Some(h) = hotplug {
        match h.run("offline") {
            Ok(_) => log::info!("{} offline: done", h.path.display()),
            Err(e) => log::error!("{e}"),
        }
    }
    drop(tap);
    served.map_err(Into::into)
}
