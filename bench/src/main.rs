//! vback-bench: side-by-side benchmarks of vback's backends against QEMU's, driven by
//! independent userspace clients (no VM: guests under TCG cannot measure I/O).
//!
//! `vback-bench blk` runs blkback and qemu-storage-daemon one after the other on the same file
//! and on a null device, through libblkio's `virtio-blk-vhost-user` driver (the `blkio` crate,
//! written by QEMU's block developers), and host fio (io_uring, O_DIRECT) on the same file as
//! the limit. Each backend is pinned to CPU 0 and the client to CPU 1, so both backends get the
//! same share of this 2-core machine.

mod blk;

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
}

const AFTER_HELP: &str = "\
Examples:
  vback-bench blk                       # the full table (about 3 minutes)
  vback-bench blk --repeat 3 --seconds 3  # medians of 3 alternating runs (about 6 minutes)
  vback-bench blk --seconds 3 --only null-randread-qd32,file-randread-qd32
  vback-bench blk --json results.json   # also write the measurements as JSON";

fn main() -> ExitCode {
    match Cli::parse().cmd {
        Cmd::Blk(args) => match blk::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vback-bench: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
