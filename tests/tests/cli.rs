//! The binaries as an operator meets them: `--help` teaches, bad configuration strings are
//! refused with the bad part named, skeleton backends say clearly that they do not serve yet,
//! and vbctl talks to a real control socket.

use std::process::{Command, Output};
use std::sync::Arc;

use serde_json::{Value, json};
use vback_common::control::{CommandInfo, ControlError, ControlHandler, ControlServer, DaemonInfo};
use vback_tests::process::workspace_bin;

fn run(bin: &str, args: &[&str]) -> Output {
    Command::new(workspace_bin(bin).unwrap())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{bin}: {e}"))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn every_binary_has_a_complete_help() {
    for (bin, must) in [
        (
            "blkback",
            &[
                "--disk",
                "--socket",
                "--fd",
                "--control",
                "--print-capabilities",
                "tap:qcow:",
                "--qcow2-cache-size",
                "--backing-policy",
                "--backing-dir",
                "--backing-depth",
            ][..],
        ),
        (
            "vbimg",
            &["create", "info", "check", "resize", "convert"][..],
        ),
        (
            "netback",
            &[
                "--vif", "--domain", "--devid", "--queues", "--host", "--socket",
            ][..],
        ),
        (
            "cdrom",
            &[
                "--disk",
                "--empty",
                "--shared",
                "--media-dir",
                "--socket",
                "tap:cdrom:",
            ][..],
        ),
        ("usbback", &["--usb-version", "--ports", "--socket"][..]),
        ("bridge", &["--port", "--uplink"][..]),
        (
            "vmm-min",
            &["--kernel", "--initrd", "--blk", "--net", "--scsi", "--api"][..],
        ),
        (
            "vbctl",
            &["status", "call", "check-disk", "check-vif", "block-attach"][..],
        ),
    ] {
        let o = run(bin, &["--help"]);
        assert!(o.status.success(), "{bin} --help: {}", stderr(&o));
        let text = stdout(&o);
        for m in must {
            assert!(text.contains(m), "{bin} --help lacks {m}:\n{text}");
        }
        assert!(
            text.contains("Example"),
            "{bin} --help has no example:\n{text}"
        );
    }
}

#[test]
fn qemu_command_lines_in_help_share_guest_memory() {
    // vhost-user maps the guest's memory: a QEMU command line copied from --help must give
    // the guest a shared memory backend, or the device cannot start.
    for bin in ["blkback", "netback", "cdrom"] {
        let text = stdout(&run(bin, &["--help"]));
        for must in [
            "-object memory-backend-memfd,id=mem,size=",
            ",share=on",
            "-machine q35,memory-backend=mem",
        ] {
            assert!(text.contains(must), "{bin} --help lacks {must}:\n{text}");
        }
    }
}

#[test]
fn capabilities_follow_qemus_schema() {
    for (bin, ty) in [("blkback", "block"), ("netback", "net"), ("cdrom", "scsi")] {
        let o = run(bin, &["--print-capabilities"]);
        assert!(o.status.success(), "{bin}: {}", stderr(&o));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["type"], ty, "{bin}");
        assert!(v["features"].is_array(), "{bin}");
    }
}

#[test]
fn bad_configuration_strings_are_refused_with_the_part_named() {
    for (bin, args, says) in [
        (
            "blkback",
            &["--socket", "/tmp/x", "--disk", "/var/lib/img"][..],
            "never guesses",
        ),
        (
            "blkback",
            &["--socket", "/tmp/x", "--disk", "tap:qed:/x"][..],
            "unknown tap driver `qed`",
        ),
        (
            "blkback",
            &["--socket", "/tmp/x", "--disk", "file:/x", "--mode", "x"][..],
            "mode `x`",
        ),
        (
            "netback",
            &["--socket", "/tmp/x", "--vif", "bridge=br0,colour=red"][..],
            "unknown key `colour`",
        ),
        (
            "netback",
            &["--socket", "/tmp/x", "--vif", "rate=100Mbit/s"][..],
            "b/s",
        ),
        (
            "cdrom",
            &["--socket", "/tmp/x", "--disk", "file:/x.iso"][..],
            "is not a CD",
        ),
        (
            "vmm-min",
            &["--kernel", "k", "--mem", "1M"][..],
            "16M minimum",
        ),
        (
            "vmm-min",
            &["--kernel", "k", "--blk", "/tmp/x,rx"][..],
            "unknown option `rx`",
        ),
        (
            "vmm-min",
            &["--kernel", "k", "--net", "/tmp/x,mac=01:02"][..],
            "is not a MAC address",
        ),
        (
            "vmm-min",
            &["--kernel", "k", "--serial", "tty"][..],
            "is not stdio or file:PATH",
        ),
    ] {
        let o = run(bin, args);
        assert_eq!(o.status.code(), Some(2), "{bin} {args:?}");
        assert!(stderr(&o).contains(says), "{bin} {args:?}: {}", stderr(&o));
    }
}

#[test]
fn vbimg_summary_names_every_command() {
    let text = stdout(&run("vbimg", &["--help"]));
    let summary = text.split("\n\n").next().unwrap_or_default();
    for cmd in ["create", "info", "check", "convert", "resize"] {
        assert!(summary.contains(cmd), "the summary omits {cmd}:\n{text}");
    }
    for (cmd, opts) in [
        ("info", &["-U, --force-share", "--output"][..]),
        ("check", &["-U, --force-share", "--output"][..]),
        ("convert", &["-U, --force-share"][..]),
    ] {
        let text = stdout(&run("vbimg", &[cmd, "--help"]));
        for o in opts {
            assert!(text.contains(o), "vbimg {cmd} --help lacks {o}:\n{text}");
        }
    }
}

#[test]
fn cdrom_suggests_only_prefixes_it_takes() {
    // A bare path: the generic uname error suggests file:, which cdrom then refuses.
    for spec in ["/srv/isos/install.iso", "/srv/isos/install.iso,hdc:cdrom,r"] {
        let o = run("cdrom", &["--socket", "/tmp/x", "--disk", spec]);
        assert!(!o.status.success());
        let e = stderr(&o);
        assert!(e.contains("tap:cdrom:/srv/isos/install.iso"), "{e}");
        assert!(!e.contains("file:"), "suggests a prefix cdrom refuses: {e}");
    }
}

#[test]
fn vmm_min_names_an_unreadable_kernel() {
    let o = run(
        "vmm-min",
        &["--kernel", "/nonexistent/vmlinux", "--mem", "16M"],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("cannot read kernel /nonexistent/vmlinux"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn skeletons_say_they_do_not_serve_yet() {
    for (bin, args) in [
        ("usbback", &["--socket", "/tmp/x"][..]),
        ("bridge", &["--port", "/tmp/x"][..]),
    ] {
        let o = run(bin, args);
        assert_eq!(o.status.code(), Some(2), "{bin}");
        assert!(
            stderr(&o).contains("not implemented yet"),
            "{bin}: {}",
            stderr(&o)
        );
    }
}

#[test]
fn vbctl_checks_specs() {
    let o = run(
        "vbctl",
        &[
            "check-disk",
            "tap:qcow:/var/lib/xen/images/alice/disk0,xvda,w",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("qcow2 image"));
    assert!(stdout(&o).contains("vdev:   xvda"));

    let o = run("vbctl", &["check-vif", "bridge=br0,rate=100Mb/s@20ms"]);
    assert!(
        stdout(&o).contains("250000 bytes of credit every 20000 us"),
        "{}",
        stdout(&o)
    );

    let o = run("vbctl", &["check-disk", "file:/img,xvda,q"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("mode `q`"), "{}", stderr(&o));

    let o = run("vbctl", &["block-attach", "alice", "file:/x", "xvdb", "w"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not implemented yet"));
}

struct Info;
impl DaemonInfo for Info {
    fn daemon_status(&self) -> Value {
        json!({"name": "fake"})
    }
}
struct Dev;
impl ControlHandler for Dev {
    fn commands(&self) -> Vec<CommandInfo> {
        vec![CommandInfo {
            name: "echo",
            args: "KEY=VALUE...",
            help: "Return the arguments.",
        }]
    }
    fn handle(&self, cmd: &str, args: &Value) -> Option<Result<Value, ControlError>> {
        (cmd == "echo").then(|| Ok(args.clone()))
    }
}

#[test]
fn vbctl_talks_to_a_control_socket() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = dir.path().join("ctl.sock");
    let _server = ControlServer::start(&ctl, Arc::new(Info), Arc::new(Dev)).unwrap();
    let c = ctl.to_str().unwrap();

    let o = run("vbctl", &["status", c]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["daemon"]["name"], "fake");

    let o = run(
        "vbctl",
        &["call", c, "echo", "size=20G", "n=5", "force=true"],
    );
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v, json!({"size": "20G", "n": 5, "force": true}));

    let o = run("vbctl", &["commands", c]);
    assert!(stdout(&o).contains("echo KEY=VALUE..."), "{}", stdout(&o));

    let o = run("vbctl", &["call", c, "frobnicate"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("unknown command `frobnicate`"),
        "{}",
        stderr(&o)
    );

    let o = run(
        "vbctl",
        &["status", dir.path().join("none").to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("cannot connect"), "{}", stderr(&o));
}

#[test]
fn a_fatal_error_is_printed_once() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("x.sock");
    for (bin, args) in [
        ("blkback", vec!["--disk", "tap:aio:/nonexistent/disk.img"]),
        ("cdrom", vec!["--disk", "tap:cdrom:/nonexistent/disc.iso"]),
    ] {
        let mut all = vec!["--socket", sock.to_str().unwrap()];
        all.extend(args);
        let o = run(bin, &all);
        assert!(!o.status.success());
        let err = stderr(&o);
        assert_eq!(
            err.matches("/nonexistent/").count(),
            1,
            "{bin}: the error once, not twice:\n{err}"
        );
        assert!(err.contains(&format!("ERROR {bin}]")), "{bin}: {err}");
    }
}

#[test]
fn vbctl_and_vmm_min_do_not_hang_on_the_wrong_socket() {
    let dir = tempfile::tempdir().unwrap();
    // A socket that accepts and never answers.
    let silent = dir.path().join("silent.sock");
    let l = std::os::unix::net::UnixListener::bind(&silent).unwrap();
    let _held = std::thread::spawn(move || {
        let mut keep = Vec::new();
        for c in l.incoming() {
            keep.push(c);
        }
    });
    let o = run(
        "vbctl",
        &["--timeout", "1", "status", silent.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no reply from"), "{}", stderr(&o));
    assert!(stderr(&o).contains("--control"), "{}", stderr(&o));

    // A vhost-user socket given where a control socket belongs.
    let sock = dir.path().join("b.sock");
    let ctl = dir.path().join("b.ctl");
    let _b = vback_tests::process::blkback(
        &sock,
        &["--disk", "null:64M", "--control", ctl.to_str().unwrap()],
        &dir.path().join("b.log"),
    )
    .unwrap();
    let o = run("vbctl", &["status", sock.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("looks like a vhost-user socket"),
        "{}",
        stderr(&o)
    );
    // ... and while a front end uses it: vbctl waits in the backlog, then says why.
    let fe = vhost::vhost_user::Frontend::connect(&sock, 1).unwrap();
    vhost::VhostBackend::set_owner(&fe).unwrap();
    vhost::VhostBackend::get_features(&fe).unwrap();
    let o = run(
        "vbctl",
        &["--timeout", "1", "status", sock.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("vhost-user socket"), "{}", stderr(&o));
    drop(fe);

    // vmm-min given the control socket as a disk.
    let o = run(
        "vmm-min",
        &[
            "--kernel",
            "/nonexistent/vmlinux",
            "--mem",
            "16M",
            "--blk",
            ctl.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("did not answer the vhost-user handshake"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_full_xen_disk_entry_is_accepted_with_its_mode() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let (sock, ctl) = (dir.path().join("b.sock"), dir.path().join("b.ctl"));
    let entry = format!("tap:aio:{},xvda,r", img.display());
    let _b = vback_tests::process::blkback(
        &sock,
        &["--disk", &entry, "--control", ctl.to_str().unwrap()],
        &dir.path().join("b.log"),
    )
    .unwrap();
    let st = vback_common::control::ControlClient::connect(&ctl)
        .unwrap()
        .call("status", Value::Null)
        .unwrap();
    assert_eq!(st["device"]["read_only"], true, "{st}");
    assert_eq!(st["device"]["size"], 1 << 20, "{st}");

    let o = run(
        "blkback",
        &[
            "--socket",
            "/nonexistent/s",
            "--disk",
            &entry,
            "--mode",
            "w",
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("give the mode once"), "{}", stderr(&o));

    let o = run(
        "cdrom",
        &[
            "--socket",
            "/nonexistent/s",
            "--disk",
            "tap:cdrom:/x.iso,xvdc,w",
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("a CD is read-only"), "{}", stderr(&o));

    for (spec, says) in [
        ("nbd:localhost:10809", "served: not yet"),
        ("tap:vmdk:/x.vmdk", "served: not yet"),
        ("iscsi:iqn.2001-04.com.example:d,1", "served: not yet"),
        ("tap:qcow:/x.qcow2,xvdb,w", "served: by blkback"),
        ("tap:cdrom:/x.iso,xvdc:cdrom,r", "served: by cdrom"),
    ] {
        let o = run("vbctl", &["check-disk", spec]);
        assert!(o.status.success(), "{spec}: {}", stderr(&o));
        assert!(stdout(&o).contains(says), "{spec}: {}", stdout(&o));
    }
}
