//! vbctl: the operator's command-line tool for vback.
//!
//! Today it talks to a backend's control socket (`status`, `stats`, `call`), watches every
//! daemon (`top`, `exporter`), writes host metrics for guests (`host-metrics`) and checks Xen
//! configuration strings (`check-disk`, `check-vif`, `check-rate`). It links `vback-api` and
//! `vback-base` only: no vhost-user or storage code. The xm-style verbs (`block-attach`,
//! `usb-attach`, ...) arrive with the backends that implement them.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

mod exporter;
mod host_metrics;
mod top;

use clap::{Parser, Subcommand};
use serde_json::{Map, Value};
use vback_api::{ClientError, ControlClient, Help};
use vback_base::spec::{DiskArg, DiskUname, Rate, VifSpec};

/// Manage vback backends: query and command them over their control sockets, and check Xen
/// configuration strings before you use them.
#[derive(Debug, Parser)]
#[command(version, after_help = AFTER_HELP)]
struct Cli {
    /// Wait at most this many seconds for a daemon's reply (a busy or wrong socket fails with a
    /// message instead of hanging).
    #[arg(long, global = true, value_name = "SECONDS", default_value_t = 5.0)]
    timeout: f64,

    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Show a backend's state (daemon and device) from its control socket.
    Status {
        /// The backend's --control socket.
        control: PathBuf,
    },
    /// Show a backend's counters from its control socket.
    Stats {
        /// The backend's --control socket.
        control: PathBuf,
    },
    /// List the control commands a backend answers.
    Commands {
        /// The backend's --control socket.
        control: PathBuf,
    },
    /// Send any control command: `vbctl call SOCK resize size=20G`. Values that parse as JSON
    /// (numbers, true/false) are sent as such, anything else as a string.
    Call {
        /// The backend's --control socket.
        control: PathBuf,
        /// The command name.
        command: String,
        /// Arguments as KEY=VALUE.
        args: Vec<String>,
    },
    /// Watch daemons like xentop: one row per domain (`<dir>/<domain>/*.ctl`) with its devices
    /// folded in, then one row per device with read/write rates, latency percentiles, requests
    /// in flight and errors (block and CD), packet and bit rates (net). Batch mode (`-b`) prints
    /// plain-text iterations for scripts; without it, a full-screen view with xentop's keys (d
    /// delay, b block, n network, s sort, q quit).
    Top {
        /// Batch mode: print ITERATIONS reports and exit.
        #[arg(short = 'b', long)]
        batch: bool,
        /// How many reports to print (batch mode).
        #[arg(short = 'i', long, value_name = "ITERATIONS", default_value_t = 1)]
        iterations: u32,
        /// Seconds between samples (each report's rates cover one such interval).
        #[arg(short = 'd', long, value_name = "SECONDS", default_value_t = 1.0)]
        delay: f64,
        /// Control sockets, or directories searched for `*.ctl` (and one level of
        /// subdirectories); default /run/vback.
        paths: Vec<PathBuf>,
    },
    /// Serve every daemon's counters and latency histograms to Prometheus (OpenMetrics text at
    /// http://ADDR/metrics), sampled at each scrape.
    Exporter {
        /// Address to listen on, e.g. 127.0.0.1:9477 (port 0 picks one; it is printed).
        #[arg(long, value_name = "ADDR")]
        listen: String,
        /// Control sockets, or directories searched for `*.ctl` (and one level of
        /// subdirectories); default /run/vback.
        paths: Vec<PathBuf>,
    },
    /// Write host metrics for guests in vhostmd's metrics disk format: the host's name, CPUs,
    /// memory, paging and CPU time, and each domain's device counters, every INTERVAL seconds.
    /// Attach the file to a guest read-only (`tap:aio:/dev/shm/vhostmd0,xvdb,r`) and read it there
    /// with vhostmd's `vm-dump-metrics`.
    HostMetrics {
        /// The metrics disk file, updated in place (created full size if missing).
        #[arg(short = 'o', long, value_name = "FILE", default_value = host_metrics::DEFAULT_OUTPUT)]
        output: PathBuf,
        /// Seconds between updates (vhostmd's default update period is 5).
        #[arg(short = 'i', long, value_name = "SECONDS", default_value_t = 5.0)]
        interval: f64,
        /// Write the disk once and exit.
        #[arg(long)]
        once: bool,
        /// The disk's size: bytes, or with K or M (a multiple of 512 between 1024 and 256M;
        /// the default is what vhostmd's shipped configuration sets).
        #[arg(long, value_name = "SIZE", default_value = "256K")]
        size: String,
        /// Only this domain (repeatable); default every domain found. A guest's vhostmd
        /// reader expects its own metrics only: give each guest its own disk and --domain.
        #[arg(long = "domain", value_name = "NAME")]
        domains: Vec<String>,
        /// Control sockets, or directories searched for `*.ctl` (and one level of
        /// subdirectories: `<dir>/<domain>/<vdev>.ctl`); default /run/vback.
        paths: Vec<PathBuf>,
    },
    /// Check a disk uname (`tap:qcow:/path`) or a full entry (`UNAME,VDEV,MODE` or SXP) and
    /// print what it means.
    CheckDisk {
        /// The spec.
        spec: String,
    },
    /// Check a vif spec (`bridge=br0,mac=...,rate=...`) and print what it means.
    CheckVif {
        /// The spec.
        spec: String,
    },
    /// Check a rate (`100Mb/s@20ms`) and print the credit per window.
    CheckRate {
        /// The rate.
        rate: String,
    },
    /// xm verbs that are not available yet (block-attach, network-attach, usb-attach, ...).
    #[command(external_subcommand)]
    Other(Vec<String>),
}

const AFTER_HELP: &str = "\
Examples:
  vbctl status /run/vback/alice-xvda.ctl
  vbctl call /run/vback/alice-xvda.ctl resize size=20G
  vbctl top -b -i 2 -d 1 /run/vback
  vbctl exporter --listen 127.0.0.1:9477
  vbctl host-metrics --output /dev/shm/vhostmd0 --interval 5 --domain alice
  vbctl check-disk 'tap:qcow:/var/lib/xen/images/alice/disk0,xvda,w'
  vbctl check-vif 'bridge=br0,mac=00:16:3e:4f:94:a9,rate=100Mb/s@20ms'

xm-style verbs planned: block-attach, block-detach, block-list, block-configure, network-attach,
network-detach, network-list, usb-hc-create, usb-hc-destroy, usb-list-assignable-devices,
usb-attach, usb-detach, usb-list.";

const XM_VERBS: &[&str] = &[
    "block-attach",
    "block-detach",
    "block-list",
    "block-configure",
    "network-attach",
    "network-detach",
    "network-list",
    "usb-hc-create",
    "usb-hc-destroy",
    "usb-list-assignable-devices",
    "usb-attach",
    "usb-detach",
    "usb-list",
];

fn main() -> ExitCode {
    let cli: Cli = vback_base::docgen::parse("1");
    if !(cli.timeout.is_finite() && cli.timeout > 0.0) {
        eprintln!("vbctl: --timeout must be a positive number of seconds");
        return ExitCode::from(2);
    }
    let timeout = std::time::Duration::from_secs_f64(cli.timeout);
    match run(cli.cmd, timeout) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("vbctl: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn call(control: &PathBuf, cmd: &str, args: Value, timeout: Duration) -> Result<Value, String> {
    let mut c = ControlClient::connect_timeout(control, timeout).map_err(|e| e.to_string())?;
    c.call(cmd, args).map_err(|e| match e {
        ClientError::Command(e) => format!("{cmd}: {e}"),
        other => other.to_string(),
    })
}

fn run(cmd: Cmd, timeout: Duration) -> Result<(), String> {
    match cmd {
        Cmd::Status { control } => print_json(&call(&control, "status", Value::Null, timeout)?),
        Cmd::Stats { control } => print_json(&call(&control, "stats", Value::Null, timeout)?),
        Cmd::Commands { control } => {
            let help: Help =
                vback_api::decode("help", call(&control, "help", Value::Null, timeout)?)
                    .map_err(|e| e.to_string())?;
            for c in &help.commands {
                println!("{:<28} {}", format!("{} {}", c.name, c.args), c.help);
            }
        }
        Cmd::Call {
            control,
            command,
            args,
        } => {
            let mut map = Map::new();
            for a in &args {
                let Some((k, v)) = a.split_once('=') else {
                    return Err(format!("argument `{a}` is not KEY=VALUE"));
                };
                let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_owned()));
                map.insert(k.to_owned(), value);
            }
            print_json(&call(&control, &command, Value::Object(map), timeout)?);
        }
        Cmd::Top {
            batch,
            iterations,
            delay,
            paths,
        } => {
            if !(delay.is_finite() && delay > 0.0) {
                return Err("-d must be a positive number of seconds".into());
            }
            let paths = if paths.is_empty() {
                vec![PathBuf::from(top::DEFAULT_DIR)]
            } else {
                paths
            };
            let delay = Duration::from_secs_f64(delay);
            if batch {
                top::batch(&paths, iterations, delay, timeout, &mut std::io::stdout())
            } else {
                top::interactive(&paths, delay, timeout)
            }
            .map_err(|e| e.to_string())?;
        }
        Cmd::Exporter { listen, paths } => {
            let paths = if paths.is_empty() {
                vec![PathBuf::from(top::DEFAULT_DIR)]
            } else {
                paths
            };
            exporter::serve(&listen, &paths, timeout).map_err(|e| e.to_string())?;
        }
        Cmd::HostMetrics {
            output,
            interval,
            once,
            size,
            domains,
            paths,
        } => {
            if !(interval.is_finite() && interval > 0.0) {
                return Err("--interval must be a positive number of seconds".into());
            }
            let size = host_metrics::parse_size(&size).map_err(|e| e.to_string())?;
            let paths = if paths.is_empty() {
                vec![PathBuf::from(top::DEFAULT_DIR)]
            } else {
                paths
            };
            host_metrics::run(
                &output,
                size,
                Duration::from_secs_f64(interval),
                once,
                &paths,
                &domains,
                timeout,
            )
            .map_err(|e| e.to_string())?;
        }
        Cmd::CheckDisk { spec } => {
            let arg = DiskArg::parse(&spec).map_err(|e| e.to_string())?;
            println!("uname:  {}", arg.uname);
            describe_uname(&arg.uname);
            if let Some(v) = &arg.vdev {
                println!(
                    "vdev:   {}{}",
                    v.name,
                    if v.cdrom { " (CD-ROM)" } else { "" }
                );
            }
            if let Some(m) = arg.mode {
                println!(
                    "mode:   {m} ({})",
                    if m.writable() {
                        "writable"
                    } else {
                        "read-only"
                    }
                );
            }
            match arg.uname.served_by() {
                Some(daemon) => println!("served: by {daemon}"),
                None => println!(
                    "served: not yet: this kind of disk parses, but no vback daemon serves it \
                     yet (planned)"
                ),
            }
        }
        Cmd::CheckVif { spec } => {
            let v = VifSpec::parse(&spec).map_err(|e| e.to_string())?;
            let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
            println!("bridge:   {}", opt(&v.bridge));
            println!(
                "mac:      {}",
                v.mac
                    .map_or_else(|| "random 00:16:3e:xx:xx:xx".into(), |m| m.to_string())
            );
            let ips: Vec<String> = v.ip.iter().map(ToString::to_string).collect();
            println!(
                "ip:       {}",
                if ips.is_empty() {
                    "-".into()
                } else {
                    ips.join(" ")
                }
            );
            println!("script:   {}", opt(&v.script));
            println!(
                "vifname:  {}",
                v.vifname
                    .clone()
                    .unwrap_or_else(|| "vif<domid>.<devid>".into())
            );
            println!(
                "rate:     {}",
                v.rate.map_or_else(|| "unlimited".into(), describe_rate)
            );
            println!(
                "rate_rx:  {}",
                v.rate_rx.map_or_else(|| "unlimited".into(), describe_rate)
            );
            if let Some(m) = v.mtu {
                println!("mtu:      {m}");
            }
        }
        Cmd::CheckRate { rate } => {
            println!(
                "{}",
                describe_rate(Rate::parse(&rate).map_err(|e| e.to_string())?)
            );
        }
        Cmd::Other(words) => {
            let verb = words.first().map(String::as_str).unwrap_or_default();
            return Err(if XM_VERBS.contains(&verb) {
                format!("`{verb}` is not implemented yet; it arrives with the backend it drives")
            } else {
                format!("unknown command `{verb}`; see `vbctl --help`")
            });
        }
    }
    Ok(())
}

fn describe_uname(u: &DiskUname) {
    let what = match u {
        DiskUname::Phy(_) => "host block device".to_owned(),
        DiskUname::Image { format, .. } => format!("{format} image"),
        DiskUname::Cdrom(_) => "CD-ROM (drive or ISO image)".into(),
        DiskUname::Iscsi { .. } => "iSCSI LUN".into(),
        DiskUname::Nbd(_) => "NBD export".into(),
        DiskUname::Npiv { .. } => "Fibre Channel NPIV LUN (needs FC hardware)".into(),
        DiskUname::Null { size } => format!("null device of {size} bytes"),
    };
    println!("kind:   {what}");
}

fn describe_rate(r: Rate) -> String {
    format!(
        "{} bytes/s: {} bytes of credit every {} us",
        r.bytes_per_second,
        r.credit_bytes,
        r.window_us()
    )
}
