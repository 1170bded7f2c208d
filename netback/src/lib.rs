//! netback: a vhost-user-net backend with Xen's vif semantics.
//!
//! So far: [`rate`], Xen's credit scheduler for `rate=RATE@WINDOW`. The device (queues, tap
//! host side, hotplug scripts) comes next.

pub mod rate;
