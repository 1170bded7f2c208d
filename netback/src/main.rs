//! netback: a vhost-user-net backend with Xen's vif semantics (bridge, route, masquerade).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use netback::{Config, Host, INFO, NullRx};
use vback_common::spec::{MacAddr, VifSpec};
use vback_common::{CommonArgs, init_logging};

/// Serve a guest network interface over vhost-user-net; the host side is a kernel tap that
/// Xen-style hotplug scripts put on a bridge, a route or a NAT.
///
/// QEMU attaches it with (vhost-user needs the guest's memory shared: size= as -m):
///   -object memory-backend-memfd,id=mem,size=1G,share=on -machine q35,memory-backend=mem
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

    /// Host side: a kernel tap named after the interface, which the hotplug script puts on a
    /// bridge, a route or a NAT; or null (transmitted frames are counted and dropped, the guest
    /// receives generated frames; for measuring the backend alone).
    #[arg(long, value_enum, default_value_t = HostArg::Tap)]
    host: HostArg,

    /// Where hotplug scripts named in `script=` are found (`script=/path` is used as is).
    #[arg(long, value_name = "DIR", env = "VBACK_SCRIPT_DIR", default_value = netback::hotplug::DEFAULT_SCRIPT_DIR)]
    script_dir: PathBuf,

    /// Busy-poll an empty ring (transmit, or receive while the guest has no buffers) this long
    /// (microseconds) before waiting for the guest's next kick. Under steady traffic the next
    /// burst usually comes within a few microseconds, so the default catches it without the
    /// guest's kick and netback's wake-up; it costs at most that much CPU after a burst and
    /// nothing while the interface is idle. Packet-rate-bound guests: try 50. 0: never poll.
    #[arg(long, value_name = "US", default_value_t = 5, value_parser = clap::value_parser!(u32).range(0..=1000))]
    poll_us: u32,

    /// How transmitted frames are written to the tap: uring (up to 64 frames per system call,
    /// through io_uring) or writev (one system call per frame: for hosts that disable io_uring,
    /// and for comparing). netback falls back to writev by itself when io_uring is unavailable.
    #[arg(long, value_enum, default_value_t = TapIoArg::Uring)]
    tap_io: TapIoArg,

    /// With --host null: what the guest receives (off; tick: one frame every 100 ms; flood: a
    /// frame in every buffer the guest posts).
    #[arg(long, value_enum, default_value_t = NullRxArg::Tick)]
    null_rx: NullRxArg,

    /// With --host null: length of the generated frames (60 to 1514 bytes).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u16).range(60..=1514))]
    null_frame_len: u16,

    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum TapIoArg {
    Uring,
    Writev,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum HostArg {
    Tap,
    Null,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum NullRxArg {
    Off,
    Tick,
    Flood,
}

const AFTER_HELP: &str = "\
The interface (Xen's `vif` keys):
  bridge=BR        bridge to join (vif-bridge; default: the first bridge)
  mac=MAC          the guest's MAC; default a random 00:16:3e:xx:xx:xx
  ip=A [B..]       the guest's addresses (vif-route; vif-nat defaults to 10.D/256.D%256.DEVID+1)
  script=NAME      hotplug script: vif-bridge (default), vif-route, vif-nat, a /path, or none
  vifname=NAME     host interface name; default vif<domid>.<devid>
  rate=R[@W]       guest transmit limit, Xen semantics (e.g. 100Mb/s@20ms; window default 50ms)
  rate_rx=R[@W]    guest receive limit (vback only)
  mtu=N            MTU offered to the guest and set on the host interface

Hotplug scripts are called as `SCRIPT online` after the tap exists and `SCRIPT offline` when
netback stops, with vif, bridge, ip, mac, domain, domid, devid, mode and mtu in the
environment (and netback's own environment, e.g. netdev= for vif-route). Exit status 0 means
connected; otherwise netback takes the interface down and exits with the script's last stderr
line.

Examples:
  netback --socket /run/vback/3-net0.sock --domain 3 --vif 'bridge=xenbr0,rate=100Mb/s@20ms'
  netback --socket /run/vback/3-net0.sock --domain 3 --vif 'script=vif-route,ip=192.168.1.21'
  netback --socket /run/vback/3-net0.sock --domain 3 --vif 'script=vif-nat' --queues 2
  netback --socket /tmp/n.sock --host null --null-rx flood   # the backend alone, for benchmarks";

fn main() -> ExitCode {
    let args: Args = vback_common::docgen::parse("8");
    if args.common.print_capabilities {
        println!("{}", INFO.capabilities_json());
        return ExitCode::SUCCESS;
    }
    init_logging(args.common.log_level);
    let domid = args.domain.parse::<u32>().ok();
    let ifname = match domid {
        Some(d) => args.vif.host_ifname(d, args.devid),
        None => match &args.vif.vifname {
            Some(n) => n.clone(),
            None => {
                let n = format!("vif{}.{}", args.domain, args.devid);
                if n.len() > 15 {
                    eprintln!(
                        "netback: the default interface name {n} is longer than Linux's 15 characters; give vifname= in --vif or a numeric --domain"
                    );
                    return ExitCode::from(2);
                }
                n
            }
        },
    };
    let config = Config {
        mac: args.vif.mac.unwrap_or_else(MacAddr::random_xen),
        vif: args.vif,
        ifname,
        domain: args.domain,
        domid,
        devid: args.devid,
        queues: args.queues,
        host: match args.host {
            HostArg::Tap => Host::Tap,
            HostArg::Null => Host::Null {
                rx: match args.null_rx {
                    NullRxArg::Off => NullRx::Off,
                    NullRxArg::Tick => NullRx::Tick,
                    NullRxArg::Flood => NullRx::Flood,
                },
                frame_len: usize::from(args.null_frame_len),
            },
        },
        script_dir: args.script_dir,
        poll: std::time::Duration::from_micros(u64::from(args.poll_us)),
        tap_batch: matches!(args.tap_io, TapIoArg::Uring),
        common: args.common,
    };
    match netback::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => vback_common::fatal("netback", &e),
    }
}
