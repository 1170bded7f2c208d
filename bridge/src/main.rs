//! bridge: a software L2 switch between guests' vhost-user-net ports.
//!
//! This is the skeleton: it parses and validates its configuration and says that switching is
//! not implemented yet.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vback_common::not_implemented;

/// Switch Ethernet frames between guests: each --port is a vhost-user-net socket a guest's
/// virtio-net connects to; an optional --uplink joins the switch to a host interface.
#[derive(Debug, Parser)]
#[command(version, verbatim_doc_comment, after_help = AFTER_HELP)]
struct Args {
    /// Name of the switch (for logs and the control socket).
    #[arg(long, default_value = "vbr0")]
    name: String,

    /// A guest port: the vhost-user socket path to listen on. Repeat for each guest.
    #[arg(long = "port", value_name = "SOCKET", required = true)]
    ports: Vec<PathBuf>,

    /// A host interface (tap) to connect the switch to.
    #[arg(long, value_name = "IFACE")]
    uplink: Option<String>,

    /// Answer control commands on this unix socket.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
}

const AFTER_HELP: &str = "\
Example:
  bridge --name guests --port /run/vback/alice-net0.sock --port /run/vback/bob-net0.sock";

fn main() -> ExitCode {
    let args: Args = vback_common::docgen::parse("8");
    eprintln!(
        "bridge {}: {} ports, uplink {:?}",
        args.name,
        args.ports.len(),
        args.uplink
    );
    not_implemented("bridge", "the software switch", None)
}
