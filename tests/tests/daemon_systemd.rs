//! The daemon under systemd's conventions, with systemd's own tool: socket activation
//! (`systemd-socket-activate` passes the vhost-user and control sockets as LISTEN_FDS, named),
//! readiness and stopping notifications on NOTIFY_SOCKET, and a clean exit on SIGTERM.

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use vback_common::control::ControlClient;
use vback_tests::process::{Daemon, which, workspace_bin};
use vhost::VhostBackend;
use vhost::vhost_user::Frontend;

#[test]
fn socket_activation_and_readiness() {
    let tool = which("systemd-socket-activate")
        .expect("systemd-socket-activate (package systemd) is installed");
    let dir = tempfile::tempdir().unwrap();
    let (sock, ctl, notify) = (
        dir.path().join("vu.sock"),
        dir.path().join("ctl.sock"),
        dir.path().join("notify"),
    );
    let rx = UnixDatagram::bind(&notify).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(10))).unwrap();

    let mut cmd = Command::new(tool);
    cmd.arg("-l")
        .arg(&sock)
        .arg("-l")
        .arg(&ctl)
        .arg("--fdname=vhost-user:control");
    cmd.arg(format!("--setenv=NOTIFY_SOCKET={}", notify.display()));
    cmd.arg(workspace_bin("blkback").unwrap())
        .args(["--disk", "null:64M"]);
    let mut d = Daemon::spawn(
        "systemd-socket-activate blkback",
        cmd,
        &dir.path().join("log"),
    )
    .unwrap();
    d.wait_for_socket(&sock, Duration::from_secs(10)).unwrap();

    // The first connection makes the tool start blkback with the listening sockets.
    let fe = Frontend::connect(&sock, 1).expect("connect");
    fe.set_owner().unwrap();
    assert!(fe.get_features().is_ok(), "{}", d.log());

    let mut buf = [0u8; 512];
    let n = rx.recv(&mut buf).expect("a readiness notification");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.contains("READY=1"), "{msg}");
    assert!(
        msg.contains("STATUS=waiting for a front end on systemd socket"),
        "{msg}"
    );

    let st = ControlClient::connect(&ctl)
        .unwrap()
        .call("status", Value::Null)
        .unwrap();
    assert_eq!(st["daemon"]["socket"], "systemd socket (fd 3)", "{st}");
    assert_eq!(st["daemon"]["frontend_connected"], true, "{st}");

    drop(fe);
    assert_eq!(
        d.terminate(Duration::from_secs(5)).and_then(|s| s.code()),
        Some(0),
        "{}",
        d.log()
    );
    let mut saw_stopping = false;
    while let Ok(n) = rx.recv(&mut buf) {
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            saw_stopping = true;
            break;
        }
    }
    assert!(saw_stopping, "STOPPING=1 was sent on SIGTERM");
    assert!(
        sock.exists(),
        "an inherited socket file is left to its owner (systemd)"
    );
}

// The installed units (packaging/systemd) are verified and run the way systemd runs them in
// tests/packaging.rs.

#[test]
fn an_ambiguous_activation_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, ctl) = (dir.path().join("a.sock"), dir.path().join("a.ctl"));
    // What one .socket unit with two FileDescriptorName= lines passes: both named control.
    let mut cmd = Command::new(which("systemd-socket-activate").unwrap());
    cmd.arg("-l")
        .arg(&sock)
        .arg("-l")
        .arg(&ctl)
        .arg("--fdname=control:control")
        .arg(workspace_bin("blkback").unwrap())
        .args(["--disk", "null:64M"]);
    let mut d = Daemon::spawn("blkback (ambiguous)", cmd, &dir.path().join("log")).unwrap();
    d.wait_for_socket(&sock, Duration::from_secs(10)).unwrap();
    let _c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !d.log().contains("ambiguous") {
        assert!(
            std::time::Instant::now() < deadline,
            "no refusal: {}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(d.log().contains("FileDescriptorName="), "{}", d.log());
}

/// Collects the notifications that arrive on `rx` within `d`.
fn notifications(rx: &UnixDatagram, d: Duration) -> Vec<String> {
    let end = std::time::Instant::now() + d;
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while let Some(left) = end.checked_duration_since(std::time::Instant::now()) {
        rx.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match rx.recv(&mut buf) {
            Ok(n) => got.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(_) => break,
        }
    }
    got
}

/// blkback started with NOTIFY_SOCKET and `watchdog` as (WATCHDOG_USEC, WATCHDOG_PID).
fn blkback_with_watchdog(
    dir: &std::path::Path,
    name: &str,
    watchdog: (&str, Option<&str>),
) -> (Daemon, UnixDatagram) {
    let (sock, notify) = (
        dir.join(format!("{name}.sock")),
        dir.join(format!("{name}.n")),
    );
    let rx = UnixDatagram::bind(&notify).unwrap();
    let mut cmd = Command::new(workspace_bin("blkback").unwrap());
    cmd.args(["--disk", "null:64M", "--socket"])
        .arg(&sock)
        .env("NOTIFY_SOCKET", &notify)
        .env("WATCHDOG_USEC", watchdog.0);
    match watchdog.1 {
        Some(pid) => cmd.env("WATCHDOG_PID", pid),
        None => cmd.env_remove("WATCHDOG_PID"),
    };
    let mut d = Daemon::spawn(name, cmd, &dir.join(format!("{name}.log"))).unwrap();
    d.wait_for_socket(&sock, Duration::from_secs(10)).unwrap();
    (d, rx)
}

#[test]
fn the_watchdog_is_fed_at_half_its_interval() {
    let dir = tempfile::tempdir().unwrap();
    // WATCHDOG_USEC=300 ms and no WATCHDOG_PID: keep-alives every 150 ms.
    let (mut d, rx) = blkback_with_watchdog(dir.path(), "fed", ("300000", None));
    let got = notifications(&rx, Duration::from_millis(1000));
    let fed = got.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    assert!(
        (3..=9).contains(&fed),
        "{fed} WATCHDOG=1 in 1 s at a 300 ms interval: {got:?}\n{}",
        d.log()
    );
    assert!(got.iter().any(|m| m.contains("READY=1")), "{got:?}");
    assert_eq!(
        d.terminate(Duration::from_secs(5)).and_then(|s| s.code()),
        Some(0),
        "{}",
        d.log()
    );

    // WATCHDOG_PID names another process (systemd meant the watchdog for our parent): nothing.
    let (mut d, rx) = blkback_with_watchdog(dir.path(), "other", ("300000", Some("1")));
    let got = notifications(&rx, Duration::from_millis(700));
    assert!(got.iter().any(|m| m.contains("READY=1")), "{got:?}");
    assert!(!got.iter().any(|m| m.contains("WATCHDOG=1")), "{got:?}");
    assert_eq!(
        d.terminate(Duration::from_secs(5)).and_then(|s| s.code()),
        Some(0),
        "{}",
        d.log()
    );
}
