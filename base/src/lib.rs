//! vback-base: what both the daemons and the operator's tools need, without vhost-user or
//! storage code (so `vbctl` links none of it).
//!
//! - [`spec`]: Xen configuration strings (disk unames and entries, vif specs, rates, sizes);
//! - [`docgen`]: man pages and shell completions generated from each binary's options.
//!
//! `vback-common` re-exports both (`vback_common::spec`, `vback_common::docgen`).

pub mod docgen;
pub mod spec;
