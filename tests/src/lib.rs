//! vback-tests: the one guest harness every end-to-end test uses, and helpers to run backends.
//!
//! - [`harness`]: boot a throw-away Linux guest in QEMU with vhost-user devices, run a shell
//!   script (a batch of named checks) inside, get its output and status back;
//! - [`frontend`]: shared guest memory for tests that are their own vhost-user front end;
//! - [`hostile`]: a malicious front end every backend must survive;
//! - [`loopfs`]: a loop-mounted ext4 a test freezes, so writes block while reads complete;
//! - [`netns`]: network namespaces (test hosts, bridges, veths) so no traffic leaves the machine;
//! - [`qemu_tools`]: qemu-img and qemu-io, the independent judges of images;
//! - [`process`]: start daemons (vback backends, qemu-storage-daemon), wait until they listen,
//!   stop them, read their logs;
//! - [`qcow2_ops`]: the seeded operation stream of the qcow2 crash test;
//! - [`vhostmd`]: a reader of vhostmd's metrics disk (what `vbctl host-metrics` writes).
//!
//! Nothing here skips silently: a missing QEMU, kernel or tool is an error that fails the test
//! with the command that fixes it.

pub mod cpio;
pub mod frontend;
pub mod harness;
pub mod hostile;
pub mod loopfs;
pub mod netns;
pub mod process;
pub mod qcow2_ops;
pub mod qemu_tools;
pub mod vhostmd;

pub use harness::{Accel, Check, Guest, GuestRun};

use thiserror::Error;

/// Why the harness could not run a guest.
#[derive(Debug, Error)]
pub enum HarnessError {
    /// A tool the tests need is not installed.
    #[error("missing tool: {0}")]
    MissingTool(String),
    /// Building the guest image or preparing a run failed.
    #[error("harness setup failed: {0}")]
    Setup(String),
    /// QEMU ran but the guest did not report an exit status.
    #[error("the guest did not finish: {0}")]
    Guest(String),
    /// A live migration between two QEMUs failed.
    #[error("the live migration failed: {0}")]
    Migration(String),
    /// The wall-clock limit passed.
    #[error("the guest timed out after {seconds} s; console tail:\n{console_tail}")]
    Timeout {
        /// The limit.
        seconds: u64,
        /// The last lines of the kernel console.
        console_tail: String,
    },
}
