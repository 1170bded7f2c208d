//! QEMU's image tools as the tests use them (the independent judges of vback's images):
//! `qemu-img` and `qemu-io` runs that fail the test with their output when they fail, and
//! shorthands for the images tests create.

use std::path::Path;
use std::process::Command;

/// Runs `tool args...`; panics with its output unless it succeeds. Returns its stdout.
pub fn run_tool(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool} is required (apt-get install qemu-utils): {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img args...` (see [`run_tool`]).
pub fn qemu_img(args: &[&str]) -> String {
    run_tool("qemu-img", args)
}

/// `qemu-io -f qcow2 -c CMD... IMG`.
pub fn qemu_io(img: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(path_str(img));
    run_tool("qemu-io", &args);
}

/// A path as the `&str` the tools take (test paths are UTF-8).
pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 test path")
}

/// `qemu-img create -f qcow2 [-o OPTS] IMG SIZE`.
pub fn qcow2_create(img: &Path, opts: Option<&str>, size: &str) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if let Some(o) = opts {
        args.extend(["-o", o]);
    }
    args.extend([path_str(img), size]);
    qemu_img(&args);
}

/// `qemu-img create -f qcow2 [-o OPTS] -F FMT -b BACKING IMG [SIZE]`: an overlay whose header
/// names its backing file's format.
pub fn qcow2_overlay(
    backing: &Path,
    backing_fmt: &str,
    img: &Path,
    opts: Option<&str>,
    size: Option<&str>,
) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if let Some(o) = opts {
        args.extend(["-o", o]);
    }
    args.extend(["-F", backing_fmt, "-b", path_str(backing), path_str(img)]);
    if let Some(s) = size {
        args.push(s);
    }
    qemu_img(&args);
}
