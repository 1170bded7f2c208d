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
