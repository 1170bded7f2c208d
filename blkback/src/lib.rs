//! blkback: a vhost-user-blk backend on io_uring, Xen's blkback for KVM guests.
//!
//! - [`virtio`]: the virtio-blk request model and configuration space (transport-free);
//! - [`worker`]: one worker per queue, handing virtio-blk requests to the disk's queue object;
//! - [`vhost`]: the only module that knows vhost-user;
//! - [`control`]: `status`, `stats` and `resize` on the control socket.
//!
//! The disk itself (raw files, qcow2 images, block devices, the null device, their locks and
//! the I/O engine) comes from the storage library, [`vback_block`], as a
//! [`vback_block::BlockBackend`] that opens one [`vback_block::BlockQueue`] per virtqueue. [`run`] wires them to the
//! shared daemon ([`vback_common::Daemon`]).

pub mod control;
pub mod stats;
pub mod vhost;
/// The virtio-blk device model (feature bits, configuration space, request parsing) lives in
/// the storage library; blkback's modules know it by this name.
pub use vback_block::virtio_blk as virtio;
pub mod worker;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use thiserror::Error;
use vback_block::disk::{DiskError, DiskOptions};
use vback_block::engine::EngineChoice;
use vback_block::lock::LockMode;
use vback_block::{BlockError, open_backend};
use vback_common::hotplug::{Hotplug, HotplugError};
use vback_common::spec::{DiskMode, DiskUname, ImageFormat};
use vback_common::{CommonArgs, Daemon, DaemonError, DeviceInfo};

use crate::control::BlkControl;
use crate::stats::QueueStats;
use crate::vhost::BlkBackend;
use crate::virtio::Limits;
use crate::worker::{Device, Worker};

/// What `--print-capabilities` reports.
pub const INFO: DeviceInfo = DeviceInfo {
    name: "blkback",
    vhost_type: "block",
    // QEMU's VHostUserBackendBlockFeature: `--read-only` and `--blk-file PATH` are accepted.
    features: &["read-only", "blk-file"],
};

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// What backs the disk.
    pub disk: DiskUname,
    /// Access mode.
    pub mode: DiskMode,
    /// Number of queues.
    pub queues: u16,
    /// Maximum queue size.
    pub queue_size: u16,
    /// GET_ID serial (default: derived from the image path).
    pub serial: Option<String>,
    /// Use the page cache instead of O_DIRECT.
    pub page_cache: bool,
    /// Which I/O engine.
    pub engine: EngineChoice,
    /// Busy-poll window after activity (zero: never poll); None: [`DEFAULT_POLL`], unless
    /// there are more queues than CPUs to run them on (then no polling).
    pub poll: Option<std::time::Duration>,
    /// Offer in-flight tracking (on unless a test turns it off).
    pub inflight: bool,
    /// qcow2 images: metadata cache size and backing chain policy (`writable` is set from
    /// `mode`).
    pub qcow2: vback_block::qcow2::OpenOptions,
    /// The vbd hotplug script (`script=` in the disk entry), run with `add` before the disk is
    /// opened and `remove` after it is closed.
    pub script: Option<Hotplug>,
    /// A live migration's destination (`--incoming`): the image is opened without its lock,
    /// which is taken when the front end starts the device (after the source released it).
    pub incoming: bool,
    /// Daemon options.
    pub common: CommonArgs,
}

/// The environment a vbd hotplug script gets, as Xen's block scripts read it from the store:
/// `params` (the path, or what follows the uname's prefix), `type` (`phy`, `file`, `qcow2`,
/// ...), `uname`, `mode` (`r`, `w`, `w!`), `vdev` and `domain` when known.
pub fn script_env(
    uname: &DiskUname,
    mode: DiskMode,
    vdev: Option<&str>,
    domain: Option<&str>,
) -> Vec<(String, String)> {
    let (kind, params) = match uname {
        DiskUname::Phy(p) => ("phy", p.display().to_string()),
        DiskUname::Image { format, path } => (
            match format {
                ImageFormat::Raw => "file",
                ImageFormat::Qcow2 => "qcow2",
                ImageFormat::Vmdk => "vmdk",
            },
            path.display().to_string(),
        ),
        DiskUname::Cdrom(p) => ("cdrom", p.display().to_string()),
        DiskUname::Null { size } => ("null", size.to_string()),
        DiskUname::Iscsi { .. } => ("iscsi", uname_params(uname)),
        DiskUname::Nbd(_) => ("nbd", uname_params(uname)),
        DiskUname::Npiv { .. } => ("npiv", uname_params(uname)),
    };
    let mut env = vec![
        ("params".to_owned(), params),
        ("type".to_owned(), kind.to_owned()),
        ("uname".to_owned(), uname.to_string()),
        ("mode".to_owned(), mode.to_string()),
    ];
    if let Some(v) = vdev {
        env.push(("vdev".to_owned(), v.to_owned()));
    }
    if let Some(d) = domain {
        env.push(("domain".to_owned(), d.to_owned()));
    }
    env
}

/// What follows a uname's `kind:` prefix.
fn uname_params(uname: &DiskUname) -> String {
    let s = uname.to_string();
    s.split_once(':')
        .map_or(s.clone(), |(_, rest)| rest.to_owned())
}

/// Why blkback could not run.
#[derive(Debug, Error)]
pub enum Error {
    /// The disk could not be opened.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// A queue on the disk (its I/O engine) could not be opened.
    #[error("cannot set up the disk's queue: {0}")]
    Queue(BlockError),
    /// A bad option.
    #[error("{0}")]
    Config(String),
    /// The daemon failed.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// The vbd hotplug script refused the disk (`error` or `busy`); the disk was not opened.
    #[error("{0}; the disk was not opened")]
    Hotplug(#[from] HotplugError),
}

/// The busy-poll window when `--poll-us` is not given and every queue has a CPU.
pub const DEFAULT_POLL: std::time::Duration = std::time::Duration::from_micros(32);

/// The busy-poll window without `--poll-us`: [`DEFAULT_POLL`] while every queue has a CPU of
/// its own, else none.
fn default_poll(queues: u16, cpus: usize) -> std::time::Duration {
    if usize::from(queues) > cpus {
        std::time::Duration::ZERO
    } else {
        DEFAULT_POLL
    }
}

/// The CPUs this process may run on (its affinity mask; 1 if it cannot be read).
fn usable_cpus() -> usize {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: sched_getaffinity writes at most size_of::<cpu_set_t>() bytes into `set`, which
    // lives on our stack for the call.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return 1;
    }
    // SAFETY: CPU_COUNT reads the set we own.
    (unsafe { libc::CPU_COUNT(&set) }).max(1) as usize
}

/// Opens the disk and builds the backend (without serving it).
pub fn build(config: &Config) -> Result<BlkBackend, Error> {
    let read_only = !config.mode.writable();
    let lock = match config.mode {
        DiskMode::ReadOnly => LockMode::Shared,
        DiskMode::ReadWrite => LockMode::Exclusive,
        DiskMode::ReadWriteShared => LockMode::None,
    };
    if config.incoming {
        log::info!(
            "--incoming: the image is opened without its lock, which is taken when the front \
             end starts the device (once the migration's source has released it); a qcow2 \
             image's metadata is read again then"
        );
    }
    let disk = open_backend(
        &config.disk,
        DiskOptions {
            read_only,
            direct: !config.page_cache,
            lock,
            qcow2: config.qcow2.clone(),
            incoming: config.incoming,
        },
        config.engine,
    )?;
    let serial_text = config
        .serial
        .clone()
        .unwrap_or_else(|| disk.default_serial());
    if serial_text.len() > 20 {
        return Err(Error::Config(format!(
            "--serial `{serial_text}` is longer than 20 bytes"
        )));
    }
    let mut serial = [0u8; 20];
    serial[..serial_text.len()].copy_from_slice(serial_text.as_bytes());
    let queue_size = config.queue_size;
    let max_iov = usize::from(queue_size).max(8);
    let dev = Arc::new(Device {
        disk,
        writeback: AtomicBool::new(true),
        serial,
        stats: (0..config.queues).map(|_| QueueStats::default()).collect(),
        limits: Limits {
            max_iov,
            max_segments: 1,
        },
        max_discard_sectors: (1 << 30) / 512,
        last_error: Mutex::new(None),
    });
    let poll = config.poll.unwrap_or_else(|| {
        let cpus = usable_cpus();
        let poll = default_poll(config.queues, cpus);
        if poll.is_zero() {
            log::info!(
                "{} queues on {cpus} CPU(s): queues do not busy-poll (one would take the CPU \
                 another needs); --poll-us sets it anyway",
                config.queues
            );
        }
        poll
    });
    let mut workers = Vec::new();
    for q in 0..usize::from(config.queues) {
        let io = dev
            .disk
            .open_queue(u32::from(queue_size))
            .map_err(Error::Queue)?;
        let mut w = Worker::new(q, dev.clone(), Some(io), usize::from(queue_size));
        w.set_poll(poll);
        workers.push(w);
    }
    let backend = BlkBackend::new(dev.clone(), workers, queue_size, config.inflight, lock);
    let info = dev.disk.info();
    log::info!(
        "disk {} ({}, {} bytes, {}{}), {} queue(s) of {}, engine {}, serial {}",
        info.uname,
        info.kind,
        dev.disk.capacity(),
        if read_only { "read-only" } else { "writable" },
        match (info.kind, info.direct) {
            ("null", _) => "",
            (_, true) => ", O_DIRECT",
            (_, false) => ", page cache",
        },
        config.queues,
        queue_size,
        backend.engine_name(),
        serial_text
    );
    Ok(backend)
}

/// Runs the hotplug script's `add`, opens the disk and serves it until SIGTERM/SIGINT, then
/// closes the disk and runs `remove` (also when opening or serving failed after `add`).
pub fn run(config: Config) -> Result<(), Error> {
    if let Some(h) = &config.script {
        h.run("add")?;
        log::info!("{} add: connected", h.path.display());
    }
    let served = serve(&config);
    if let Some(h) = &config.script {
        match h.run("remove") {
            Ok(_) => log::info!("{} remove: done", h.path.display()),
            Err(e) => log::error!("{e}"),
        }
    }
    served
}

/// Opens the disk and serves it; the disk is closed when this returns.
fn serve(config: &Config) -> Result<(), Error> {
    let backend = build(config)?;
    let control = Arc::new(BlkControl::new(backend.clone()));
    let b2 = backend.clone();
    let daemon =
        Daemon::new(INFO, config.common.clone(), control)?.on_disconnect(move || b2.disconnected());
    let b3 = backend.clone();
    let b4 = backend.clone();
    let served = daemon.run_with(backend, move |handlers| {
        b3.register_completion_fds(handlers)
    });
    // Close the disk now: a control request's thread may still hold the backend, and the
    // process ends when this returns (an image not closed keeps its reserved and freed
    // clusters counted, which `qemu-img check` reports as leaks).
    b4.shutdown();
    if let Err(e) = b4.device().disk.close() {
        log::error!("closing the disk: {e}");
    }
    served?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_poll_only_when_each_has_a_cpu() {
        assert_eq!(default_poll(1, 1), DEFAULT_POLL);
        assert_eq!(default_poll(2, 2), DEFAULT_POLL);
        assert!(default_poll(4, 1).is_zero());
        assert!(default_poll(3, 2).is_zero());
        assert!(usable_cpus() >= 1);
    }
}
