//! The virtio-mmio (version 2) register file as a pure state machine: what the guest's driver
//! reads and writes, with no KVM or vhost-user behind it. [`crate::mmio::Device`] carries out
//! the [`Action`]s it returns. Every value comes from the guest and is untrusted.

use crate::vhost::QueueConfig;

/// Largest queue the driver may ask for.
pub const QUEUE_MAX: u16 = 256;
/// Register offset where the device-specific config space starts.
pub const CONFIG_OFFSET: u64 = 0x100;
/// `VIRTIO_F_VERSION_1`: required (this is a version 2 transport).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

const MAGIC: u32 = 0x7472_6976;
const VENDOR: u32 = 0x4b43_4256; // "VBCK"
/// Driver status bits.
pub const STATUS_FEATURES_OK: u32 = 8;
/// The driver is ready: the device runs.
pub const STATUS_DRIVER_OK: u32 = 4;
/// The device hit an error the driver must reset to clear.
pub const STATUS_NEEDS_RESET: u32 = 0x40;
const INT_VRING: u32 = 1;
const INT_CONFIG: u32 = 2;

/// What the device must do after a register write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing beyond the register change.
    None,
    /// DRIVER_OK was just set: start the backend with the configured queues.
    Start,
    /// Status 0: stop the backend's queues if `was_running`, then call [`Transport::reset`].
    Reset {
        /// The device had been started.
        was_running: bool,
    },
}

/// The transport registers of one device.
#[derive(Debug, Clone)]
pub struct Transport {
    device_id: u32,
    features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<QueueConfig>,
    status: u32,
    config_generation: u32,
    config_pending: bool,
}

impl Transport {
    /// A device with `device_id`, offering `features` (VERSION_1 is added), with `queues`
    /// queues.
    pub fn new(device_id: u32, features: u64, queues: usize) -> Transport {
        Transport {
            device_id,
            features: features | VIRTIO_F_VERSION_1,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues: vec![QueueConfig::default(); queues],
            status: 0,
            config_generation: 0,
            config_pending: false,
        }
    }

    /// The features offered to the driver.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The features the driver acked (a subset of [`Transport::features`] once FEATURES_OK).
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// The queues as the driver configured them.
    pub fn queues(&self) -> &[QueueConfig] {
        &self.queues
    }

    /// Mutable queues (to set the start index after a reconnection).
    pub fn queues_mut(&mut self) -> &mut [QueueConfig] {
        &mut self.queues
    }

    /// The status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// DRIVER_OK is set and the device has not failed.
    pub fn running(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0 && self.status & STATUS_NEEDS_RESET == 0
    }

    /// Starting failed: the driver sees DEVICE_NEEDS_RESET.
    pub fn set_needs_reset(&mut self) {
        self.status |= STATUS_NEEDS_RESET;
    }

    /// A config change: new generation, and the config bit in InterruptStatus.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.config_pending = true;
    }

    /// Back to the state after power-on (the driver wrote status 0).
    pub fn reset(&mut self) {
        let n = self.queues.len();
        *self = Transport::new(self.device_id, self.features, n);
    }

    fn sel_queue(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// A register read below the config space (`offset` < 0x100); unknown registers read 0.
    pub fn read(&self, offset: u64) -> u32 {
        let q = self.queues.get(self.queue_sel as usize);
        match offset {
            0x00 => MAGIC,
            0x04 => 2,
            0x08 => self.device_id,
            0x0c => VENDOR,
            0x10 => match self.device_features_sel {
                0 => self.features as u32,
                1 => (self.features >> 32) as u32,
                _ => 0,
            },
            0x34 if q.is_some() => u32::from(QUEUE_MAX),
            0x44 => q.map_or(0, |q| u32::from(q.ready)),
            0x60 => {
                let mut s = 0;
                if self.running() {
                    // With irqfd vmm-min cannot tell a queue interrupt from none: always let
                    // the driver look at its used rings.
                    s |= INT_VRING;
                }
                if self.config_pending {
                    s |= INT_CONFIG;
                }
                s
            }
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => 0,
        }
    }

    /// A register write below the config space. Writes that make no sense (a queue index past
    /// the last, queue changes while the device runs) are ignored.
    pub fn write(&mut self, offset: u64, v: u32) -> Action {
        let set_lo = |x: &mut u64, v: u32| *x = (*x & !0xffff_ffff) | u64::from(v);
        let set_hi = |x: &mut u64, v: u32| *x = (*x & 0xffff_ffff) | (u64::from(v) << 32);
        let queue_writable = !self.running();
        match offset {
            0x14 => self.device_features_sel = v,
            0x20 if self.status & STATUS_FEATURES_OK == 0 => match self.driver_features_sel {
                0 => set_lo(&mut self.driver_features, v),
                1 => set_hi(&mut self.driver_features, v),
                _ => {}
            },
            0x24 => self.driver_features_sel = v,
            0x30 => self.queue_sel = v,
            0x38 | 0x44 | 0x80..=0xa4 if !queue_writable => {
                log::debug!("queue register {offset:#x} written while the device runs: ignored")
            }
            0x38 => {
                if let Some(q) = self.sel_queue() {
                    q.size = (v.min(u32::from(QUEUE_MAX))) as u16;
                }
            }
            0x44 => {
                if let Some(q) = self.sel_queue() {
                    q.ready = v == 1;
                }
            }
            0x50 => log::debug!("queue notify {v} without an ioeventfd match"),
            0x64 => {
                if v & INT_CONFIG != 0 {
                    self.config_pending = false;
                }
            }
            0x70 => return self.write_status(v),
            0x80 => self
                .sel_queue()
                .into_iter()
                .for_each(|q| set_lo(&mut q.desc, v)),
            0x84 => self
                .sel_queue()
                .into_iter()
                .for_each(|q| set_hi(&mut q.desc, v)),
            0x90 => self
                .sel_queue()
                .into_iter()
                .for_each(|q| set_lo(&mut q.avail, v)),
            0x94 => self
                .sel_queue()
                .into_iter()
                .for_each(|q| set_hi(&mut q.avail, v)),
            0xa0 => self
                .sel_queue()
                .into_iter()
                .for_each(|q| set_lo(&mut q.used, v)),
            0xa4 => self
                .sel_queue()
                .into_iter()
                .for_each(|q| set_hi(&mut q.used, v)),
            _ => log::debug!("write {v:#x} to register {offset:#x} ignored"),
        }
        Action::None
    }

    fn write_status(&mut self, v: u32) -> Action {
        if v == 0 {
            return Action::Reset {
                was_running: self.running(),
            };
        }
        let mut v = v;
        if v & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            let unknown = self.driver_features & !self.features;
            if unknown != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                log::warn!(
                    "driver features {:#x} refused (offered {:#x}; VERSION_1 is required)",
                    self.driver_features,
                    self.features
                );
                v &= !STATUS_FEATURES_OK;
            }
        }
        // DRIVER_OK needs FEATURES_OK; NEEDS_RESET is the device's to set, not the driver's.
        if v & STATUS_FEATURES_OK == 0 && self.status & STATUS_FEATURES_OK == 0 {
            v &= !STATUS_DRIVER_OK;
        }
        v = (v & !STATUS_NEEDS_RESET) | (self.status & STATUS_NEEDS_RESET);
        let starting = v & STATUS_DRIVER_OK != 0 && self.status & STATUS_DRIVER_OK == 0;
        self.status = v;
        if starting && self.status & STATUS_NEEDS_RESET == 0 {
            Action::Start
        } else {
            Action::None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn negotiate(t: &mut Transport, lo: u32, hi: u32) -> u32 {
        t.write(0x70, 1 | 2);
        t.write(0x24, 0);
        t.write(0x20, lo);
        t.write(0x24, 1);
        t.write(0x20, hi);
        t.write(0x70, 1 | 2 | 8);
        t.read(0x70)
    }

    #[test]
    fn identity_and_features() {
        let mut t = Transport::new(2, 1 << 9, 1);
        assert_eq!(t.read(0x00), 0x7472_6976);
        assert_eq!(t.read(0x04), 2);
        assert_eq!(t.read(0x08), 2);
        assert_eq!(t.read(0x10), 1 << 9);
        t.write(0x14, 1);
        assert_eq!(t.read(0x10), 1, "VERSION_1 in the high word");
        t.write(0x14, 7);
        assert_eq!(t.read(0x10), 0);
    }

    #[test]
    fn features_ok_only_for_offered_features_with_version_1() {
        let mut t = Transport::new(2, 1 << 9, 1);
        assert_eq!(negotiate(&mut t, 1 << 9, 1) & 8, 8);
        assert_eq!(t.driver_features(), (1 << 9) | VIRTIO_F_VERSION_1);
        // Features cannot change after FEATURES_OK.
        t.write(0x24, 0);
        t.write(0x20, 1 << 3);
        assert_eq!(t.driver_features(), (1 << 9) | VIRTIO_F_VERSION_1);

        let mut t = Transport::new(2, 1 << 9, 1);
        assert_eq!(negotiate(&mut t, 1 << 30, 1) & 8, 0, "not offered");
        let mut t = Transport::new(2, 1 << 9, 1);
        assert_eq!(negotiate(&mut t, 1 << 9, 0) & 8, 0, "no VERSION_1");
        // And without FEATURES_OK, DRIVER_OK does not start anything.
        assert_eq!(t.write(0x70, 1 | 2 | 4), Action::None);
        assert!(!t.running());
    }

    #[test]
    fn queue_setup_start_and_reset() {
        let mut t = Transport::new(1, 0, 2);
        negotiate(&mut t, 0, 1);
        t.write(0x30, 1);
        assert_eq!(t.read(0x34), u32::from(QUEUE_MAX));
        t.write(0x38, 100_000);
        t.write(0x80, 0x1000);
        t.write(0x84, 0x2);
        t.write(0x90, 0x3000);
        t.write(0xa0, 0x4000);
        t.write(0x44, 1);
        let q = t.queues()[1];
        assert_eq!(
            (q.size, q.desc, q.avail, q.used, q.ready),
            (QUEUE_MAX, 0x2_0000_1000, 0x3000, 0x4000, true)
        );
        assert!(!t.queues()[0].ready);
        // A queue past the last reads as absent and ignores writes.
        t.write(0x30, 2);
        assert_eq!(t.read(0x34), 0);
        t.write(0x44, 1);
        assert_eq!(t.read(0x44), 0);

        assert_eq!(t.write(0x70, 1 | 2 | 8 | 4), Action::Start);
        assert!(t.running());
        assert_eq!(t.read(0x60), 1);
        // Queue registers are frozen while running; a second DRIVER_OK does not restart.
        t.write(0x30, 1);
        t.write(0x80, 0xdead);
        assert_eq!(t.queues()[1].desc, 0x2_0000_1000);
        assert_eq!(t.write(0x70, 1 | 2 | 8 | 4), Action::None);

        assert_eq!(t.write(0x70, 0), Action::Reset { was_running: true });
        t.reset();
        assert_eq!(t.status(), 0);
        assert!(t.queues().iter().all(|q| *q == QueueConfig::default()));
        assert_eq!(t.write(0x70, 0), Action::Reset { was_running: false });
    }

    #[test]
    fn needs_reset_sticks_until_reset_and_the_driver_cannot_set_it() {
        let mut t = Transport::new(2, 0, 1);
        negotiate(&mut t, 0, 1);
        assert_eq!(t.write(0x70, 0x40 | 1 | 2 | 8), Action::None);
        assert_eq!(t.status() & 0x40, 0);
        assert_eq!(t.write(0x70, 1 | 2 | 8 | 4), Action::Start);
        t.set_needs_reset();
        assert!(!t.running());
        assert_eq!(t.read(0x60), 0);
        t.write(0x70, 1 | 2 | 8 | 4);
        assert_eq!(t.status() & 0x40, 0x40);
        t.reset();
        assert_eq!(t.status(), 0);
    }

    #[test]
    fn config_change_interrupt_and_ack() {
        let mut t = Transport::new(2, 0, 1);
        let g = t.read(0xfc);
        t.config_changed();
        assert_eq!(t.read(0x60) & 2, 2);
        assert_ne!(t.read(0xfc), g);
        t.write(0x64, 1);
        assert_eq!(
            t.read(0x60) & 2,
            2,
            "acking the vring bit keeps the config bit"
        );
        t.write(0x64, 2);
        assert_eq!(t.read(0x60) & 2, 0);
    }
}
