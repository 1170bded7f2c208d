//! qcow2-crash-writer IMAGE SEED FLUSH_EVERY: applies the operation stream of SEED to the qcow2
//! image through vback-block's format layer, flushing after every FLUSH_EVERY operations and then
//! printing `flushed N` (N operations are durable), until it is killed. The qcow2 crash test
//! kills it with SIGKILL at random moments.

use std::io::Write;
use std::process::ExitCode;

use vback_block::qcow2::{Image, OpenOptions};
use vback_tests::qcow2_ops::{Qcow2Op, Qcow2Ops};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(path), Some(seed), Some(every)) = (
        args.get(1),
        args.get(2).and_then(|s| s.parse::<u64>().ok()),
        args.get(3).and_then(|s| s.parse::<u64>().ok()),
    ) else {
        eprintln!("usage: qcow2-crash-writer IMAGE SEED FLUSH_EVERY");
        return ExitCode::from(2);
    };
    let path = std::path::Path::new(path);
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!("qcow2-crash-writer: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    };
    let opts = OpenOptions {
        writable: true,
        ..OpenOptions::default()
    };
    let mut img = match Image::open(path, file, &opts) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("qcow2-crash-writer: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout().lock();
    let size = img.size();
    for (i, op) in Qcow2Ops::new(seed, size).enumerate() {
        let r = match op {
            Qcow2Op::Write { off, .. } => img.write(off, &op.data()),
            Qcow2Op::Zero { off, len } => img.discard(off, len, true),
        };
        if let Err(e) = r {
            eprintln!("qcow2-crash-writer: operation {i}: {e}");
            return ExitCode::FAILURE;
        }
        let done = i as u64 + 1;
        if done.is_multiple_of(every) {
            if let Err(e) = img.flush() {
                eprintln!("qcow2-crash-writer: flush: {e}");
                return ExitCode::FAILURE;
            }
            if writeln!(out, "flushed {done}")
                .and_then(|()| out.flush())
                .is_err()
            {
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
