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

/// The unit files in docs/daemon.md: (file name, contents).
fn documented_units() -> Vec<(String, String)> {
    let doc =
        std::fs::read_to_string(vback_tests::harness::repo_root().join("docs/daemon.md")).unwrap();
    let mut units = Vec::new();
    let mut rest = doc.as_str();
    while let Some(start) = rest.find("```ini\n") {
        let body = &rest[start + 7..];
        let end = body.find("```").unwrap();
        let block = &body[..end];
        let name = block
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# /etc/systemd/system/"))
            .expect("each unit block starts with its path")
            .to_owned();
        units.push((name, block.to_owned()));
        rest = &body[end..];
    }
    units
}

fn key<'a>(unit: &'a str, k: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
        .collect()
}

#[test]
fn the_documented_units_verify_and_name_the_sockets_right() {
    let units = documented_units();
    assert_eq!(units.len(), 3, "two socket units and a service");
    let dir = tempfile::tempdir().unwrap();
    let blkback = workspace_bin("blkback").unwrap();
    let mut paths = Vec::new();
    for (name, body) in &units {
        let body = body.replace("/usr/local/bin/blkback", blkback.to_str().unwrap());
        std::fs::write(dir.path().join(name), body).unwrap();
        paths.push(dir.path().join(name.replace("@.", "@t.")));
    }
    let out = Command::new(which("systemd-analyze").expect("systemd-analyze (package systemd)"))
        .arg("verify")
        .args(&paths)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.trim().is_empty(),
        "systemd-analyze verify: {err}"
    );

    // The service's sockets, in its Sockets= order, with the names their units give them.
    let service = &units
        .iter()
        .find(|(n, _)| n.ends_with(".service"))
        .unwrap()
        .1;
    let mut listen = Vec::new();
    let mut names = Vec::new();
    for s in key(service, "Sockets")[0].split_whitespace() {
        let file = s.replace("%i", "");
        let unit = &units.iter().find(|(n, _)| *n == file).unwrap().1;
        let l = key(unit, "ListenStream");
        let n = key(unit, "FileDescriptorName");
        assert_eq!(
            (l.len(), n.len()),
            (1, 1),
            "one socket and one name per unit: {s}"
        );
        listen.push(l[0].replace("/run/vback/%i", &dir.path().join("t").to_string_lossy()));
        names.push(n[0]);
    }
    assert_eq!(names, ["vhost-user", "control"]);
    assert!(listen[0].ends_with("t.sock") && listen[1].ends_with("t.ctl"));

    // Run blkback the way those units do.
    let mut cmd = Command::new(which("systemd-socket-activate").unwrap());
    for l in &listen {
        cmd.arg("-l").arg(l);
    }
    cmd.arg(format!("--fdname={}", names.join(":")));
    cmd.arg(&blkback).args(["--disk", "null:64M"]);
    let mut d = Daemon::spawn("blkback (units)", cmd, &dir.path().join("log")).unwrap();
    let sock = std::path::PathBuf::from(&listen[0]);
    d.wait_for_socket(&sock, Duration::from_secs(10)).unwrap();
    let fe = Frontend::connect(&sock, 1).expect("connect");
    fe.set_owner().unwrap();
    assert!(
        fe.get_features().is_ok(),
        "vhost-user on .sock: {}",
        d.log()
    );
    let st = ControlClient::connect(&listen[1])
        .unwrap()
        .call("status", Value::Null)
        .unwrap();
    assert_eq!(
        st["daemon"]["frontend_connected"], true,
        "control on .ctl: {st}"
    );
}

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
