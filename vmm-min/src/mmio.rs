//! The virtio-mmio transport (version 2) in front of a vhost-user backend: feature negotiation,
//! queue setup and config space on MMIO exits; the data path (queue notifications through an
//! ioeventfd, interrupts through an irqfd) runs between guest and backend without vmm-min.

use std::path::PathBuf;
use std::sync::Arc;

use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::memory::GuestMem;
use crate::transport::{Action, CONFIG_OFFSET, Transport};
use crate::vhost::{Connection, Inflight, VhostError};

/// First device's register window; each device takes 4 KiB.
pub const MMIO_BASE: u64 = 0xd000_0000;
/// Size of one device's window.
pub const MMIO_SIZE: u64 = 0x1000;
/// The first device's interrupt line (4 is the serial port).
pub const FIRST_GSI: u32 = 5;
/// Devices vmm-min can place (GSIs 5 to 15, legacy PIC lines).
pub const MAX_DEVICES: usize = 11;

const VIRTIO_NET_F_MAC: u64 = 1 << 5;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;

/// The kinds of device vmm-min attaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// virtio-blk.
    Blk {
        /// Refuse writes (VIRTIO_BLK_F_RO offered to the guest).
        read_only: bool,
    },
    /// virtio-net.
    Net {
        /// The guest's MAC (`--net SOCK,mac=`): it replaces the backend's in the config space,
        /// as QEMU's `mac=` does. Without one, the backend's MAC, or 52:54:00:12:34:56 when the
        /// backend serves no config space.
        mac: Option<[u8; 6]>,
    },
    /// virtio-scsi.
    Scsi,
}

impl Kind {
    /// The virtio device ID.
    pub fn device_id(&self) -> u32 {
        match self {
            Kind::Net { .. } => 1,
            Kind::Blk { .. } => 2,
            Kind::Scsi => 8,
        }
    }

    /// Queue count when the backend does not say (no MQ).
    pub fn default_queues(&self) -> usize {
        match self {
            Kind::Blk { .. } => 1,
            Kind::Net { .. } => 2,
            Kind::Scsi => 3,
        }
    }

    /// Size of the device's config space; accesses past it read zeros and writes are dropped
    /// (a backend may end the connection on an out-of-range SET_CONFIG).
    pub fn config_size(&self) -> u32 {
        match self {
            Kind::Blk { .. } => 60,
            Kind::Net { .. } => 12,
            Kind::Scsi => 36,
        }
    }

    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Kind::Blk { .. } => "blk",
            Kind::Net { .. } => "net",
            Kind::Scsi => "scsi",
        }
    }
}

/// What a backend's config-change message calls.
#[derive(Clone)]
struct Notifier(Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Notifier")
    }
}

/// One virtio-mmio device backed by a vhost-user socket.
#[derive(Debug)]
pub struct Device {
    /// What it is.
    pub kind: Kind,
    /// The backend socket.
    pub socket: PathBuf,
    /// Register window base.
    pub base: u64,
    /// Interrupt line.
    pub gsi: u32,
    conn: Option<Connection>,
    mem: GuestMem,
    regs: Transport,
    queues: usize,
    kicks: Vec<EventFd>,
    call: EventFd,
    on_config_change: Option<Notifier>,
    /// The backend's in-flight region, kept across reconnections (see [`Inflight`]).
    inflight: Option<Inflight>,
    /// Requests handled by vmm-min (MMIO exits) and reconnections, for `status`.
    pub mmio_exits: u64,
    /// How often the backend came back.
    pub reconnects: u64,
}

/// Errors creating a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The first connection failed.
    #[error(transparent)]
    Vhost(#[from] VhostError),
    /// An eventfd or KVM registration failed.
    #[error("cannot set up the {what} of the {kind} device on {socket}: {source}")]
    Kvm {
        /// ioeventfd or irqfd.
        what: &'static str,
        /// Device kind.
        kind: &'static str,
        /// Its socket.
        socket: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

impl Device {
    /// Connects to the backend and registers one ioeventfd per queue on QueueNotify and an
    /// irqfd on `gsi`.
    pub fn new(
        vm: &Arc<VmFd>,
        mem: GuestMem,
        kind: Kind,
        socket: PathBuf,
        index: usize,
    ) -> Result<Device, DeviceError> {
        let conn = Connection::connect(&socket, kind.default_queues())?;
        let base = MMIO_BASE + index as u64 * MMIO_SIZE;
        let gsi = FIRST_GSI + index as u32;
        let kvm_err = |what, e: std::io::Error| DeviceError::Kvm {
            what,
            kind: kind.name(),
            socket: socket.clone(),
            source: e,
        };
        let queues = conn.queues;
        let mut kicks = Vec::with_capacity(queues);
        for q in 0..queues {
            let kick = EventFd::new(EFD_NONBLOCK).map_err(|e| kvm_err("kick eventfd", e))?;
            vm.register_ioevent(&kick, &IoEventAddress::Mmio(base + 0x50), q as u32)
                .map_err(|e| kvm_err("ioeventfd", std::io::Error::from_raw_os_error(e.errno())))?;
            kicks.push(kick);
        }
        let call = EventFd::new(EFD_NONBLOCK).map_err(|e| kvm_err("call eventfd", e))?;
        vm.register_irqfd(&call, gsi)
            .map_err(|e| kvm_err("irqfd", std::io::Error::from_raw_os_error(e.errno())))?;
        let mut features = conn.features;
        match kind {
            Kind::Net { mac } if !conn.has_config() || mac.is_some() => {
                features |= VIRTIO_NET_F_MAC
            }
            Kind::Blk { read_only: true } => features |= VIRTIO_BLK_F_RO,
            _ => {}
        }
        Ok(Device {
            regs: Transport::new(kind.device_id(), features, queues),
            kind,
            socket,
            base,
            gsi,
            conn: Some(conn),
            mem,
            queues,
            kicks,
            call,
            on_config_change: None,
            inflight: None,
            mmio_exits: 0,
            reconnects: 0,
        })
    }

    /// Serves the backend's config-change messages with `notify` (which should call
    /// [`Device::config_changed`]), now and after each reconnection.
    pub fn set_config_notifier(&mut self, notify: Arc<dyn Fn() + Send + Sync>) {
        self.on_config_change = Some(Notifier(notify.clone()));
        if let Some(conn) = self.conn.as_mut()
            && let Err(e) = conn.open_backend_channel(notify)
        {
            log::warn!("{e}; config changes will not reach the guest");
        }
    }

    /// Whether a backend is connected.
    pub fn connected(&self) -> bool {
        self.conn.is_some()
    }

    /// A descriptor to watch for the backend hanging up.
    pub fn watch_fd(&self) -> Option<std::os::fd::OwnedFd> {
        self.conn.as_ref().and_then(|c| c.watch_fd().ok())
    }

    /// The `virtio_mmio.device=` kernel argument announcing this device.
    pub fn cmdline_arg(&self) -> String {
        format!("virtio_mmio.device=4K@{:#x}:{}", self.base, self.gsi)
    }

    /// The driver's status register.
    pub fn status(&self) -> u32 {
        self.regs.status()
    }

    /// The backend hung up: forget it; the guest's queues stay as they are.
    pub fn disconnected(&mut self) {
        self.conn = None;
    }

    /// A new connection to the backend: replay the device state, restarting each queue at the
    /// used index the guest last saw. A backend that tracks requests in flight gets the region
    /// its predecessor handed out and resubmits what was in flight at the crash; with one that
    /// does not, requests that had not completed in ring order are lost.
    pub fn reconnect(&mut self, conn: Connection) -> Result<(), VhostError> {
        let mut conn = conn;
        if let Some(Notifier(n)) = self.on_config_change.clone()
            && let Err(e) = conn.open_backend_channel(n)
        {
            log::warn!("{e}; config changes will not reach the guest");
        }
        self.conn = Some(conn);
        self.reconnects += 1;
        if self.regs.running() {
            for q in self.regs.queues_mut().iter_mut().filter(|q| q.ready) {
                q.base = self
                    .mem
                    .read_obj::<u16>(GuestAddress(q.used + 2))
                    .unwrap_or(0);
            }
            self.activate()?;
        }
        Ok(())
    }

    fn activate(&mut self) -> Result<(), VhostError> {
        for (i, q) in self
            .regs
            .queues()
            .iter()
            .enumerate()
            .filter(|(_, q)| q.ready)
        {
            crate::vhost::vring_config(&self.mem, i, q)?;
        }
        let Some(conn) = self.conn.as_mut() else {
            return Ok(());
        };
        conn.set_inflight(&mut self.inflight, self.regs.queues())?;
        conn.activate(
            &self.mem,
            self.regs.driver_features(),
            self.regs.queues(),
            &self.kicks,
            &self.call,
        )
    }

    /// Marks a config change and interrupts the guest.
    pub fn config_changed(&mut self) {
        self.regs.config_changed();
        let _ = self.call.write(1);
    }

    /// Config space served by vmm-min when the backend has none (no CONFIG protocol feature).
    fn local_config(&self) -> Vec<u8> {
        match &self.kind {
            Kind::Net { mac } => {
                let mut c = mac.unwrap_or([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]).to_vec();
                c.extend_from_slice(&1u16.to_le_bytes()); // status: link up
                c.extend_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
                c
            }
            Kind::Scsi => {
                let mut c = Vec::new();
                let req_queues = (self.queues.saturating_sub(2)).max(1) as u32;
                for v in [req_queues, 128, 0xffff, 128, 16, 96, 32] {
                    c.extend_from_slice(&v.to_le_bytes());
                }
                c.extend_from_slice(&0u16.to_le_bytes()); // max_channel
                c.extend_from_slice(&255u16.to_le_bytes()); // max_target
                c.extend_from_slice(&16383u32.to_le_bytes()); // max_lun
                c
            }
            Kind::Blk { .. } => Vec::new(),
        }
    }

    fn config_in_range(&self, offset: u32, len: usize) -> bool {
        offset
            .checked_add(len as u32)
            .is_some_and(|end| end <= self.kind.config_size())
    }

    fn read_config(&mut self, offset: u32, data: &mut [u8]) {
        data.fill(0);
        let len = data.len() as u32;
        if !self.config_in_range(offset, data.len()) {
            log::debug!("{}: config read past the end at {offset}", self.kind.name());
            return;
        }
        match self.conn.as_mut() {
            Some(conn) if conn.has_config() => match conn.get_config(offset, len) {
                Ok(c) if c.len() == data.len() => data.copy_from_slice(&c),
                Ok(_) => log::warn!("{}: short GET_CONFIG reply", self.socket.display()),
                Err(e) => log::warn!("{e}"),
            },
            _ => {
                let c = self.local_config();
                let start = offset as usize;
                if start < c.len() {
                    let n = data.len().min(c.len() - start);
                    data[..n].copy_from_slice(&c[start..start + n]);
                }
            }
        }
        if let Kind::Net { mac: Some(mac) } = &self.kind {
            for (i, b) in data.iter_mut().enumerate() {
                if let Some(m) = mac.get(offset as usize + i) {
                    *b = *m;
                }
            }
        }
    }

    /// A guest read of the register window at `offset`.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.mmio_exits += 1;
        if offset >= CONFIG_OFFSET {
            self.read_config((offset - CONFIG_OFFSET) as u32, data);
            return;
        }
        let b = self.regs.read(offset).to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&b[..n]);
    }

    /// A guest write to the register window at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        self.mmio_exits += 1;
        if offset >= CONFIG_OFFSET {
            let off = (offset - CONFIG_OFFSET) as u32;
            if !self.config_in_range(off, data.len()) {
                log::warn!(
                    "{}: guest config write of {} bytes at offset {off} is past the end; dropped",
                    self.kind.name(),
                    data.len()
                );
                return;
            }
            if let Some(conn) = self.conn.as_mut()
                && conn.has_config()
                && let Err(e) = conn.set_config(off, data)
            {
                log::warn!("{e}");
            }
            return;
        }
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        match self.regs.write(offset, u32::from_le_bytes(b)) {
            Action::None => {}
            Action::Start => self.start(),
            Action::Reset { was_running } => {
                if was_running
                    && let Some(conn) = self.conn.as_mut()
                    && let Err(e) = conn.stop(self.regs.queues())
                {
                    log::warn!("{e}");
                }
                // A reset device has nothing in flight: the next start gets a new region.
                self.inflight = None;
                self.regs.reset();
            }
        }
    }

    fn start(&mut self) {
        if let Err(e) = self.activate() {
            log::error!(
                "{} device at {:#x}: starting the backend failed: {e}",
                self.kind.name(),
                self.base
            );
            self.regs.set_needs_reset();
        } else if self.conn.is_none() {
            log::warn!(
                "{} device at {:#x}: the driver is ready; the backend starts when it is back",
                self.kind.name(),
                self.base
            );
        } else {
            log::info!(
                "{} device at {:#x} started ({} queues ready) on {}",
                self.kind.name(),
                self.base,
                self.regs.queues().iter().filter(|q| q.ready).count(),
                self.socket.display()
            );
        }
    }
}
