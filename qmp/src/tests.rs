//! The client against recorded QEMU 10.0.2 transcripts (`-machine none -qmp unix:...`), played
//! by a fake server on a socket pair: each expected request is checked (command, arguments)
//! and answered with the recorded lines, `$ID` replaced by the request's id.

use super::*;
use std::os::unix::net::UnixStream;

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "capabilities": ["oob"]}}"#;

/// One step of a transcript: the command the client must send (None: send nothing first), and
/// the lines the server answers with.
type Step = (Option<(&'static str, Value)>, Vec<&'static str>);

fn capabilities() -> Step {
    (
        Some(("qmp_capabilities", Value::Null)),
        vec![r#"{"return": {}, "id": $ID}"#],
    )
}

/// Plays `steps` as the server (the greeting is the first step's answer); then keeps the socket
/// open for `linger` so the client's last wait can time out rather than see it closed.
fn serve(steps: Vec<Step>, linger: Duration) -> (Qmp, std::thread::JoinHandle<()>) {
    let (client, server) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || {
        let mut r = BufReader::new(server.try_clone().unwrap());
        let mut w = server;
        for (expect, answer) in steps {
            let mut id = Value::Null;
            if let Some((cmd, args)) = expect {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap() == 0 {
                    return;
                }
                let v: Value = serde_json::from_str(&line).unwrap();
                assert_eq!(v["execute"], cmd, "{line}");
                if args.is_null() {
                    assert!(v.get("arguments").is_none_or(|a| a == &json!({})), "{line}");
                } else {
                    assert_eq!(v["arguments"], args, "{line}");
                }
                id = v["id"].clone();
            }
            for a in answer {
                writeln!(w, "{}", a.replace("$ID", &id.to_string())).unwrap();
            }
        }
        std::thread::sleep(linger);
    });
    let r = client.try_clone().unwrap();
    let q = Qmp::over(r, client, Duration::from_millis(500), |s, t| {
        let _ = s.set_read_timeout(Some(t.max(Duration::from_millis(1))));
    });
    (q.unwrap(), t)
}

fn greet() -> Step {
    (None, vec![GREETING])
}

#[test]
fn greeting_capabilities_and_a_command() {
    let (mut q, t) = serve(
        vec![
            greet(),
            capabilities(),
            (
                Some(("query-status", Value::Null)),
                vec![r#"{"return": {"status": "prelaunch", "running": false}, "id": $ID}"#],
            ),
        ],
        Duration::ZERO,
    );
    assert_eq!(q.greeting().version, "10.0.2");
    assert_eq!(q.greeting().capabilities, vec!["oob".to_string()]);
    let st = q.execute("query-status", Value::Null).unwrap();
    assert_eq!(st["status"], "prelaunch");
    t.join().unwrap();
}

#[test]
fn an_error_names_the_command_class_and_message() {
    let (mut q, t) = serve(
        vec![
            greet(),
            capabilities(),
            (
                Some(("device_del", json!({"id": "nope"}))),
                vec![
                    r#"{"id": $ID, "error": {"class": "DeviceNotFound", "desc": "Device 'nope' not found"}}"#,
                ],
            ),
        ],
        Duration::ZERO,
    );
    let e = q.execute("device_del", json!({"id": "nope"})).unwrap_err();
    assert!(
        matches!(&e, QmpError::Command { class, .. } if class == "DeviceNotFound"),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "QMP device_del failed: Device 'nope' not found (DeviceNotFound)"
    );
    t.join().unwrap();
}

#[test]
fn events_before_a_reply_are_kept_for_wait_event() {
    let (mut q, t) = serve(
        vec![
            greet(),
            capabilities(),
            (
                Some(("quit", Value::Null)),
                vec![
                    r#"{"timestamp": {"seconds": 1796478322, "microseconds": 864404}, "event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}}"#,
                    r#"{"return": {}, "id": $ID}"#,
                ],
            ),
            (
                None,
                vec![
                    r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "DEVICE_DELETED", "data": {"path": "/machine/peripheral/vdb/virtio-backend"}}"#,
                    r#"{"timestamp": {"seconds": 1, "microseconds": 3}, "event": "DEVICE_DELETED", "data": {"device": "vdb", "path": "/machine/peripheral/vdb"}}"#,
                ],
            ),
        ],
        Duration::from_millis(300),
    );
    assert_eq!(q.execute("quit", Value::Null).unwrap(), json!({}));
    let d = q
        .wait_event("SHUTDOWN", Duration::from_millis(10), |_| true)
        .unwrap();
    assert_eq!(d["reason"], "host-qmp-quit");
    // The device's own event, not its backend's (which comes first and is kept).
    let d = q
        .wait_event("DEVICE_DELETED", Duration::from_secs(2), |d| {
            d["device"] == "vdb"
        })
        .unwrap();
    assert_eq!(d["path"], "/machine/peripheral/vdb");
    let rest = q.take_events();
    assert_eq!(rest.len(), 1);
    assert_eq!(
        rest[0]["data"]["path"],
        "/machine/peripheral/vdb/virtio-backend"
    );
    // Nothing more comes: a timeout that says what it waited for.
    let e = q
        .wait_event("DEVICE_DELETED", Duration::from_millis(50), |_| true)
        .unwrap_err();
    assert!(
        e.to_string().contains("no DEVICE_DELETED event within"),
        "{e}"
    );
    t.join().unwrap();
}

#[test]
fn a_silent_or_closed_or_confused_server_gives_clear_errors() {
    // No reply in time.
    let (mut q, t) = serve(
        vec![
            greet(),
            capabilities(),
            (Some(("query-status", Value::Null)), vec![]),
        ],
        Duration::from_millis(800),
    );
    let e = q.execute("query-status", Value::Null).unwrap_err();
    assert!(
        matches!(e, QmpError::Timeout { .. }) && e.to_string().contains("reply to query-status"),
        "{e}"
    );
    t.join().unwrap();
    // The server goes away.
    let (mut q, t) = serve(vec![greet(), capabilities()], Duration::ZERO);
    t.join().unwrap();
    let e = q.execute("query-status", Value::Null).unwrap_err();
    assert!(matches!(e, QmpError::Closed(_)), "{e}");
    // A reply with another id, then garbage.
    let (mut q, t) = serve(
        vec![
            greet(),
            capabilities(),
            (
                Some(("query-status", Value::Null)),
                vec![r#"{"return": {}, "id": 999}"#],
            ),
            (Some(("query-status", Value::Null)), vec!["not json"]),
        ],
        Duration::ZERO,
    );
    let e = q.execute("query-status", Value::Null).unwrap_err();
    assert!(
        e.to_string().contains("not the reply to query-status"),
        "{e}"
    );
    let e = q.execute("query-status", Value::Null).unwrap_err();
    assert!(
        matches!(&e, QmpError::Protocol { line, .. } if line == "not json"),
        "{e}"
    );
    t.join().unwrap();
}

#[test]
fn a_socket_that_is_not_qmp_is_named() {
    let (client, server) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || {
        let mut w = server;
        writeln!(w, r#"{{"return": {{}}}}"#).unwrap();
    });
    let r = client.try_clone().unwrap();
    let e = Qmp::over(r, client, Duration::from_millis(500), |_, _| {}).unwrap_err();
    assert!(e.to_string().contains("no QMP member"), "{e}");
    t.join().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let e = Qmp::connect(&dir.path().join("qmp.sock"), Duration::from_secs(1)).unwrap_err();
    assert!(e.to_string().contains("cannot connect to QMP at"), "{e}");
}
