//! Faults of the process plumbing every daemon shares (vback_common::daemon, control,
//! vhost_user): reconnections must not leak descriptors, running out of descriptors must not end
//! a daemon, and no connection may depend on a path another user can prepare (netback used to
//! relay each one through a socket in the shared temp dir).

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use vback_common::control::ControlClient;
use vback_tests::process::{Daemon, blkback, vback_daemon};
use vhost::VhostBackend;
use vhost::vhost_user::Frontend;

fn fd_count(d: &Daemon) -> usize {
    let pid = d.pid().expect("the daemon runs");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Waits until the daemon has seen `n` connections and none is open.
fn wait_disconnected(ctl: &mut ControlClient, n: u64, d: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = ctl.call("status", Value::Null).unwrap();
        if st["daemon"]["connections"] == n && st["daemon"]["frontend_connected"] == false {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "connection {n} did not end: {st}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// One short front-end session: enough for the daemon to build its workers.
fn session(sock: &Path) {
    let fe = Frontend::connect(sock, 8).expect("connect");
    fe.set_owner().unwrap();
    fe.get_features().unwrap();
}

fn assert_no_leak(name: &str, d: &Daemon, sock: &Path, ctl: &Path) {
    let mut c = ControlClient::connect(ctl).unwrap();
    for i in 1..=10 {
        session(sock);
        wait_disconnected(&mut c, i, d);
    }
    let before = fd_count(d);
    for i in 11..=200 {
        session(sock);
        wait_disconnected(&mut c, i, d);
    }
    let after = fd_count(d);
    assert_eq!(
        after,
        before,
        "{name}: descriptors after 10 and after 200 connections (one leaked per connection?)\n{}",
        d.log()
    );
}

/// A daemon started with a vhost-user socket and a control socket under `dir`, named after
/// its program: (daemon, socket, control socket).
fn started(bin: &str, dir: &Path, args: &[&str]) -> (Daemon, PathBuf, PathBuf) {
    let (sock, ctl) = (
        dir.join(format!("{bin}.sock")),
        dir.join(format!("{bin}.ctl")),
    );
    let mut all = args.to_vec();
    all.extend(["--control", ctl.to_str().unwrap()]);
    let d = vback_daemon(bin, &sock, &all, &dir.join(format!("{bin}.log"))).unwrap();
    (d, sock, ctl)
}

const NULL_DISK: &[&str] = &["--disk", "null:64M"];
const NULL_NET: &[&str] = &["--host", "null", "--vif", ""];

#[test]
fn reconnects_leak_no_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    for (bin, args) in [
        ("blkback", &["--disk", "null:64M", "--queues", "2"][..]),
        ("netback", NULL_NET),
        ("cdrom", &["--empty"][..]),
    ] {
        let (d, sock, ctl) = started(bin, p, args);
        assert_no_leak(bin, &d, &sock, &ctl);
    }
}

/// Sets the process's soft limit of open files.
fn set_nofile(pid: u32, soft: u64) {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let pid = libc::pid_t::try_from(pid).unwrap();
    // SAFETY: prlimit(2) with a null new limit only writes the current one into `old`.
    let r = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
    assert_eq!(r, 0);
    let new = libc::rlimit {
        rlim_cur: soft,
        rlim_max: old.rlim_max,
    };
    // SAFETY: both pointers are to valid rlimit structs that live for the call.
    let r = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
    assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());
}

fn survives_fd_exhaustion(name: &str, mut d: Daemon, sock: &Path, ctl: &Path) {
    let pid = d.pid().unwrap();
    // A control connection opened while there is room stays usable throughout.
    let mut c = ControlClient::connect(ctl).unwrap();
    session(sock);
    wait_disconnected(&mut c, 1, &d);
    // No descriptor left: the next front end and control clients cannot be set up.
    set_nofile(pid, fd_count(&d) as u64);
    let waiting = UnixStream::connect(sock).unwrap();
    let _ctl_waiting = UnixStream::connect(ctl).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        d.is_running(),
        "{name} exited when it ran out of descriptors:\n{}",
        d.log()
    );
    assert!(
        d.log().contains("cannot take a front end connection"),
        "{name} says why it cannot serve:\n{}",
        d.log()
    );
    // Resources come back: the front end that waited is served.
    set_nofile(pid, 1024);
    let fe = Frontend::from_stream(waiting, 8);
    fe.set_owner().unwrap();
    assert!(
        fe.get_features().is_ok(),
        "{name} serves the waiting front end:\n{}",
        d.log()
    );
    drop(fe);
    wait_disconnected(&mut c, 2, &d);
    assert!(
        ControlClient::connect(ctl)
            .unwrap()
            .call("status", Value::Null)
            .is_ok()
    );
    assert!(d.is_running());
}

#[test]
fn running_out_of_descriptors_does_not_end_a_daemon() {
    let dir = tempfile::tempdir().unwrap();
    // Both daemons (netback used to take its front ends through a relay of its own).
    for (bin, args) in [("blkback", NULL_DISK), ("netback", NULL_NET)] {
        let (d, sock, ctl) = started(bin, dir.path(), args);
        survives_fd_exhaustion(bin, d, &sock, &ctl);
    }
}

#[test]
fn the_relay_uses_no_predictable_path() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let (n, sock, ctl) = started("netback", p, NULL_NET);
    // What a local user could prepare at the relay's old path (temp dir + netback's pid): a
    // file (every connection failed with "Not a directory") and a victim file named `s`
    // behind a symlink (netback deleted it).
    let pid = n.pid().unwrap();
    let old = std::env::temp_dir().join(format!("vback-relay-{pid}"));
    std::fs::write(&old, b"in the way").unwrap();
    let mut c = ControlClient::connect(&ctl).unwrap();
    session(&sock);
    wait_disconnected(&mut c, 1, &n);
    assert_eq!(std::fs::read(&old).unwrap(), b"in the way", "left alone");
    std::fs::remove_file(&old).unwrap();

    let victim_dir = p.join("victim");
    std::fs::create_dir(&victim_dir).unwrap();
    std::fs::write(victim_dir.join("s"), b"precious").unwrap();
    std::os::unix::fs::symlink(&victim_dir, &old).unwrap();
    session(&sock);
    wait_disconnected(&mut c, 2, &n);
    let _ = std::fs::remove_file(&old);
    assert_eq!(
        std::fs::read(victim_dir.join("s")).unwrap(),
        b"precious",
        "a file behind a symlink at the old path is not touched"
    );
}

fn blkback_cmd(args: &[&str]) -> std::process::Command {
    let mut cmd =
        std::process::Command::new(vback_tests::process::workspace_bin("blkback").unwrap());
    cmd.args(args);
    cmd
}

fn mode_and_group(p: &Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(p).unwrap();
    (m.mode() & 0o777, m.gid())
}

fn umask_zero() -> std::io::Result<()> {
    // SAFETY: umask(2) only sets the process's file mode mask; no memory is involved.
    unsafe { libc::umask(0) };
    Ok(())
}

#[test]
fn sockets_are_private_whatever_the_umask() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let (sock, ctl) = (p.join("b.sock"), p.join("b.ctl"));
    let mut cmd = blkback_cmd(&[
        "--disk",
        "null:64M",
        "--socket",
        sock.to_str().unwrap(),
        "--control",
        ctl.to_str().unwrap(),
    ]);
    // SAFETY: the closure runs in the child between fork and exec and only calls umask(2),
    // which is async-signal-safe.
    unsafe {
        cmd.pre_exec(umask_zero);
    }
    let mut d = Daemon::spawn("blkback", cmd, &p.join("b.log")).unwrap();
    d.wait_for_socket(&sock, Duration::from_secs(10)).unwrap();
    assert_eq!(
        mode_and_group(&sock).0,
        0o600,
        "vhost-user socket at umask 000"
    );
    assert_eq!(mode_and_group(&ctl).0, 0o600, "control socket at umask 000");
    drop(d);

    // Opened to a group on purpose.
    let (sock, ctl) = (p.join("g.sock"), p.join("g.ctl"));
    let cmd = blkback_cmd(&[
        "--disk",
        "null:64M",
        "--socket",
        sock.to_str().unwrap(),
        "--control",
        ctl.to_str().unwrap(),
        "--socket-mode",
        "0660",
        "--socket-group",
        "daemon",
        "--control-mode",
        "0640",
        "--control-group",
        "1",
    ]);
    let mut d = Daemon::spawn("blkback", cmd, &p.join("g.log")).unwrap();
    d.wait_for_socket(&sock, Duration::from_secs(10)).unwrap();
    let daemon_gid = vback_common::socket::parse_group("daemon").unwrap();
    assert_eq!(mode_and_group(&sock), (0o660, daemon_gid));
    assert_eq!(mode_and_group(&ctl), (0o640, 1));

    // A mode that is not one is refused before anything is bound.
    let out = blkback_cmd(&[
        "--disk",
        "null:64M",
        "--socket",
        "/nonexistent/x",
        "--socket-mode",
        "rw",
    ])
    .output()
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not an octal mode"), "{err}");
}

#[test]
fn sighup_is_logged_and_survived() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("b.sock");
    let mut d = blkback(&sock, &["--disk", "null:64M"], &dir.path().join("b.log")).unwrap();
    let pid = libc::pid_t::try_from(d.pid().unwrap()).unwrap();
    // SAFETY: kill(2) on our own child with a valid signal; no memory.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !d.log().contains("SIGHUP") {
        assert!(d.is_running(), "blkback died of SIGHUP:\n{}", d.log());
        assert!(
            Instant::now() < deadline,
            "no SIGHUP log line:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(d.is_running());
    session(&sock);
    assert_eq!(
        d.terminate(Duration::from_secs(5)).and_then(|s| s.code()),
        Some(0)
    );
}

#[test]
fn an_in_use_check_is_no_front_end_and_front_ends_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let (d, sock, ctl) = started("blkback", dir.path(), NULL_DISK);
    // A second daemon on the same socket finds it in use, without connecting to it.
    let out = blkback_cmd(&["--disk", "null:64M", "--socket", sock.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use by another process"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::thread::sleep(Duration::from_millis(300));
    let mut c = ControlClient::connect(&ctl).unwrap();
    let st = c.call("status", Value::Null).unwrap();
    assert_eq!(
        st["daemon"]["connections"],
        0,
        "no phantom front end: {st}\n{}",
        d.log()
    );
    assert!(!d.log().contains("front end #"), "{}", d.log());

    // A real front end is logged with who it is.
    session(&sock);
    wait_disconnected(&mut c, 1, &d);
    let me = format!("(pid {} uid ", std::process::id());
    assert!(
        d.log()
            .lines()
            .any(|l| l.contains("front end #1 connected") && l.contains(&me)),
        "{}",
        d.log()
    );
}
