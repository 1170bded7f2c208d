//! vback-bench: side-by-side benchmarks of vback's backends against QEMU's, driven by
//! independent userspace clients (no VM: guests under TCG cannot measure I/O).
//!
//! `vback-bench blk` runs blkback and qemu-storage-daemon one after the other on the same file
//! and on a null device, through libblkio's `virtio-blk-vhost-user` driver (the `blkio` crate,
//! written by QEMU's block developers), and host fio (io_uring, O_DIRECT) on the same file as
//! the limit. Each backend is pinned to CPU 0 and the client to CPU 1, so both backends get the
//! same share of this 2-core machine.
//!
//! `vback-bench net` drives netback (null and tap host sides) and DPDK's vhost PMD with DPDK's
//! virtio-user front end in dpdk-testpmd, both directions, small and large frames.

mod afpacket;
mod blk;
mod net;
mod testpmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Benchmark vback backends against QEMU's, side by side, in one run.
#[derive(Debug, Parser)]
#[command(version, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// vhost-user-blk: blkback vs qemu-storage-daemon (and host fio as the limit).
    Blk(blk::Args),
    /// vhost-user-net: netback (null and tap host sides) vs DPDK's vhost PMD, driven by DPDK's
    /// virtio-user front end (dpdk-testpmd; install it with scripts/bench-setup.sh).
    Net(net::Args),
}

const AFTER_HELP: &str = "\
Examples:
  vback-bench blk                       # the full table (about 3 minutes)
  vback-bench blk --repeat 3 --seconds 3  # medians of 3 alternating runs (about 6 minutes)
  vback-bench blk --seconds 3 --only null-randread-qd32,file-randread-qd32
  vback-bench blk --json results.json   # also write the measurements as JSON
  scripts/bench-setup.sh && vback-bench net   # netback vs DPDK vhost, tx/rx, 64 and 1500 B
  vback-bench net --repeat 3 --seconds 5      # medians of 3 alternating runs (about 10 minutes)
  vback-bench net --only netback-null,dpdk-vhost --directions tx --frame-sizes 64
  vback-bench net --only netback-tap --json tap.json  # the tap host side alone";

fn main() -> ExitCode {
    let r = match Cli::parse().cmd {
        Cmd::Blk(args) => blk::run(&args),
        Cmd::Net(args) => net::run(&args),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vback-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
