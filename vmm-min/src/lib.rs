//! vmm-min: the smallest KVM VMM that boots a Linux guest (or a freestanding test guest) and
//! plugs in vback's backends over vhost-user. It emulates only a 16550 serial port, the i8042
//! reset line and the virtio-mmio transport; every virtio device is a vhost-user socket.
//!
//! Modules: [`config`] (validated configuration), [`memory`] (memfd guest memory), [`boot`]
//! (64-bit Linux boot protocol), [`acpi`] (tables describing the vCPUs and devices),
//! [`transport`] (the virtio-mmio registers as a pure state machine), [`mmio`] (a transport in
//! front of a vhost-user backend), [`vhost`] (the only module that speaks vhost-user), [`vm`]
//! (KVM, vCPU loop, backend watcher, API socket).

pub mod acpi;
pub mod boot;
pub mod config;
pub mod memory;
pub mod mmio;
pub mod transport;
pub mod vhost;
pub mod vm;

pub use config::Config;
pub use vm::{ExitReason, VmError, run};
