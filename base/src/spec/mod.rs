//! Xen-style configuration strings, parsed exactly as operators write them in Xen domain files.
//!
//! - [`disk`]: disk unames (`tap:qcow:/path`, `phy:/dev/sdc`, `null:1G`, ...), full disk entries
//!   `UNAME,VDEV,MODE` and their SXP form `(vbd (dev xvda) (uname ...) (mode w))`;
//! - [`vif`]: network interface specs, `key=value` lists such as
//!   `bridge=br0,mac=00:16:3e:4f:94:a9,rate=100Mb/s@20ms`;
//! - [`rate`]: Xen's `rate=RATE[@INTERVAL]` credit windows;
//! - [`size`]: byte sizes with binary suffixes (`512M`, `1G`);
//! - [`domain`]: whole domain files in xm/xl style (`name=`, `memory=`, `disk=[...]`,
//!   `vif=[...]`, ...).
//!
//! Every malformed string yields a [`SpecError`] whose message names the bad part and says
//! what is accepted.

pub mod disk;
pub mod domain;
pub mod rate;
pub mod size;
pub mod vif;

pub use disk::{DiskArg, DiskEntry, DiskMode, DiskUname, ImageFormat, Vdev};
pub use domain::{DomainConfig, DomainConfigError};
pub use rate::Rate;
pub use size::parse_size;
pub use vif::{MacAddr, VifSpec};

use thiserror::Error;

/// A configuration string that could not be parsed. `input` is the whole string as given and
/// `part` the piece that is wrong, so a message can point at it.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{what} `{input}`: {problem}")]
pub struct SpecError {
    /// What was being parsed ("disk spec", "disk entry", "vif spec", "rate", "size").
    pub what: &'static str,
    /// The whole input.
    pub input: String,
    /// The offending part of the input (a key, a field, a prefix).
    pub part: String,
    /// What is wrong with it and what would be accepted, as a sentence.
    pub problem: String,
}

impl SpecError {
    pub(crate) fn new(
        what: &'static str,
        input: &str,
        part: &str,
        problem: impl Into<String>,
    ) -> Self {
        SpecError {
            what,
            input: input.to_owned(),
            part: part.to_owned(),
            problem: problem.into(),
        }
    }
}
