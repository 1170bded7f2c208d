//! netback: a vhost-user-net backend with Xen's vif semantics (bridge, route, masquerade).
//!
//! This is the skeleton: it parses and validates its configuration, answers
//! `--print-capabilities`, and says that serving is not implemented yet.

use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use netback::INFO;
use vback_common::spec::{MacAddr, VifSpec};
use vback_common::{CommonArgs, init_logging, not_implemented};

/// Serve a guest network interface over vhost-user-net; the host side is a kernel tap that
/// Xen-style hotplug scripts put on a bridge, a route or a NAT.
///
/// QEMU attaches it with:
///   -chardev socket,id=n0,path=SOCK -netdev vhost-user,id=net0,chardev=n0
///   -device virtio-net-pci,netdev=net0
#[derive(Debug, Parser)]
#[command(version, verbatim_doc_comment, after_help = AFTER_HELP)]
struct Args {
    /// The interface in Xen's vif syntax, e.g.
    /// 'bridge=br0,mac=00:16:3e:4f:94:a9,rate=100Mb/s@20ms,script=vif-bridge,vifname=alice.0'.
    #[arg(long, value_name = "SPEC", default_value = "", value_parser = VifSpec::parse)]
    vif: VifSpec,

    /// The guest's domain name or number (names the host interface vif<domid>.<devid>).
    #[arg(long, value_name = "NAME|ID", default_value = "0")]
    domain: String,

    /// The interface's number within the guest (0 to 7).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=7))]
    devid: u32,

    /// Queue pairs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    queues: u16,

    /// Host side: a kernel tap (not implemented yet), or null (transmitted frames are counted
    /// and dropped, and a broadcast frame is sent to the guest every 100 ms; for measuring the
    /// backend and testing the rate limit).
    #[arg(long, value_enum, default_value_t = Host::Tap)]
    host: Host,

    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Host {
    Tap,
    Null,
}

const AFTER_HELP: &str = "\
Example:
  netback --socket /run/vback/alice-net0.sock --domain 3 --vif 'bridge=xenbr0,rate=100Mb/s@20ms'";

fn main() -> ExitCode {
    let args = Args::parse();
    if args.common.print_capabilities {
        println!("{}", INFO.capabilities_json());
        return ExitCode::SUCCESS;
    }
    let domid = args.domain.parse::<u32>().unwrap_or(0);
    let ifname = args.vif.host_ifname(domid, args.devid);
    match args.host {
        Host::Tap => {
            eprintln!("netback: host interface {ifname} (tap)");
            not_implemented("netback", "the tap host side", Some(5))
        }
        Host::Null => {
            init_logging(args.common.log_level);
            let config = netback::Config {
                mac: args.vif.mac.unwrap_or_else(MacAddr::random_xen),
                vif: args.vif,
                ifname,
                common: args.common,
            };
            match netback::run_null(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("netback: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
