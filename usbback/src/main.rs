//! usbback: USB pass-through (Xen's PVUSB) to KVM guests.
//!
//! This is the skeleton: it parses and validates its configuration and says that serving is not
//! implemented yet.

use std::process::ExitCode;

use clap::Parser;
use vback_common::{CommonArgs, not_implemented};

/// Serve virtual USB host controllers whose ports host USB devices are attached to, as in
/// `xm usb-hc-create alice 2 8` and `xm usb-attach alice 0 1 4-2`.
#[derive(Debug, Parser)]
#[command(version, verbatim_doc_comment, after_help = AFTER_HELP)]
struct Args {
    /// USB version of the virtual controller: 1, 2 or 3.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=3))]
    usb_version: u8,

    /// Number of ports on the controller (1 to 31).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u8).range(1..=31))]
    ports: u8,

    #[command(flatten)]
    common: CommonArgs,
}

const AFTER_HELP: &str = "\
Example:
  usbback --socket /run/vback/alice-usb.sock --usb-version 2 --ports 8";

fn main() -> ExitCode {
    let args: Args = vback_common::docgen::parse("8");
    eprintln!(
        "usbback: USB {} controller with {} ports",
        args.usb_version, args.ports
    );
    not_implemented("usbback", "USB pass-through", None)
}
