//! Image locking against independent tools: blkback and QEMU (qemu-io, qemu-storage-daemon)
//! exclude each other as two QEMU processes would, and the refusal names the image and the
//! holder; a daemon killed with SIGKILL leaves no lock behind once it is reaped.

use std::process::Command;
use std::time::Duration;

use vback_tests::process::{blkback, qemu_storage_daemon, vback_daemon, workspace_bin};
use vback_tests::qemu_tools::{path_str as s, qcow2_overlay};

fn blkback_refused(socket: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new(workspace_bin("blkback").unwrap())
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "blkback should refuse: {out:?}");
    assert!(!socket.exists(), "a refused daemon leaves no socket behind");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn writers_exclude_each_other_across_blkback_and_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = d.join("img.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let disk = format!("file:{}", image.display());

    // blkback holds it writable: a second blkback and qemu-io are refused; qemu-img info
    // (a shared reader) still works.
    let mut a = blkback(&d.join("a.sock"), &["--disk", &disk], &d.join("a.log")).unwrap();
    let msg = blkback_refused(&d.join("b.sock"), &["--disk", &disk]);
    assert!(
        msg.contains(&image.display().to_string()) && msg.contains("in use by pid"),
        "{msg}"
    );
    assert!(msg.contains("(blkback)"), "the holder is named: {msg}");
    assert!(msg.contains("start blkback with --mode w!"), "{msg}");
    let q = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 4k"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(!q.status.success());
    assert!(
        String::from_utf8_lossy(&q.stderr).contains("Failed to get \"write\" lock"),
        "{q:?}"
    );
    let info = Command::new("qemu-img")
        .args(["info", "-f", "raw"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(info.status.success(), "{info:?}");
    assert_eq!(
        a.terminate(Duration::from_secs(5)).and_then(|s| s.code()),
        Some(0)
    );

    // qemu-storage-daemon holds it writable: blkback is refused, writable or read-only.
    let qsd = qemu_storage_daemon(&image, &d.join("q.sock"), true, &d.join("q.log")).unwrap();
    let msg = blkback_refused(&d.join("b.sock"), &["--disk", &disk]);
    assert!(msg.contains("qemu-storage-da"), "{msg}");
    let msg = blkback_refused(&d.join("b.sock"), &["--disk", &disk, "--mode", "r"]);
    assert!(msg.contains("in use"), "{msg}");
    drop(qsd);

    // Readers share; a writer is refused while they read; `w!` opts out of locking.
    let _r1 = blkback(
        &d.join("r1.sock"),
        &["--disk", &disk, "--mode", "r"],
        &d.join("r1.log"),
    )
    .unwrap();
    let _r2 = blkback(
        &d.join("r2.sock"),
        &["--disk", &disk, "--mode", "r"],
        &d.join("r2.log"),
    )
    .unwrap();
    let msg = blkback_refused(&d.join("b.sock"), &["--disk", &disk]);
    assert!(msg.contains("does not allow others to write"), "{msg}");
    let _w = blkback(
        &d.join("w.sock"),
        &["--disk", &disk, "--mode", "w!"],
        &d.join("w.log"),
    )
    .unwrap();
}

fn vbimg(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(workspace_bin("vbimg").unwrap())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// vbimg refuses an image a running blkback writes, naming its own -U (not blkback's w!), and
/// with -U reads it as qemu-img -U does: info, check and convert's source; writing commands
/// stay refused.
#[test]
fn vbimg_reads_an_image_in_use_only_with_force_share() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = d.join("disk.qcow2");
    let img = image.to_str().unwrap();
    let (code, _, err) = vbimg(&["create", img, "64M"]);
    assert_eq!(code, 0, "{err}");
    let disk = format!("tap:qcow2:{img}");
    let mut a = blkback(&d.join("a.sock"), &["--disk", &disk], &d.join("a.log")).unwrap();

    for cmd in [
        vec!["info", img],
        vec!["check", img],
        vec![
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            img,
            "/nonexistent/x.raw",
        ],
    ] {
        let (code, _, err) = vbimg(&cmd);
        assert_eq!(code, 1, "{cmd:?} is refused: {err}");
        assert!(
            err.contains("in use by pid") && err.contains("(blkback)"),
            "{err}"
        );
        assert!(err.contains("pass -U (--force-share)"), "{cmd:?}: {err}");
        assert!(!err.contains("w!"), "names blkback's mode: {err}");
    }
    let (code, out, err) = vbimg(&["info", "-U", img]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["virtual-size"], 64u64 << 20, "{v}");
    let (code, out, err) = vbimg(&["check", "--force-share", img]);
    assert!(code == 0 || code == 3, "{out}{err}");
    assert!(out.contains("Image end offset: "), "{out}");
    let copy = d.join("copy.raw");
    let (code, _, err) = vbimg(&[
        "convert",
        "-U",
        "-f",
        "qcow2",
        "-O",
        "raw",
        img,
        copy.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::metadata(&copy).unwrap().len(), 64 << 20);

    // Writing commands have no -U: their refusal offers none.
    let (code, _, err) = vbimg(&["resize", img, "128M"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("in use") && !err.contains("-U") && !err.contains("w!"),
        "{err}"
    );
    assert_eq!(
        a.terminate(Duration::from_secs(5)).and_then(|s| s.code()),
        Some(0)
    );
}

/// A QEMU tool run that wants the image in a way a running daemon's lock forbids.
struct Probe {
    what: String,
    cmd: Vec<String>,
}

impl Probe {
    fn new(tool: &str, args: &[&str]) -> Probe {
        Probe {
            what: format!("{tool} {}", args.join(" ")),
            cmd: std::iter::once(tool)
                .chain(args.iter().copied())
                .map(str::to_owned)
                .collect(),
        }
    }

    fn run(&self) -> std::process::Output {
        Command::new(&self.cmd[0])
            .args(&self.cmd[1..])
            .output()
            .unwrap_or_else(|e| panic!("{} (qemu-utils is required): {e}", self.cmd[0]))
    }
}

#[test]
fn a_killed_daemon_leaves_no_lock_behind() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = d.join("disk.raw");
    let base = d.join("base.raw");
    let iso = d.join("cd.iso");
    for f in [&raw, &base, &iso] {
        std::fs::File::create(f).unwrap().set_len(4 << 20).unwrap();
    }
    let top = d.join("top.qcow2");
    qcow2_overlay(&base, "raw", &top, None, None);
    let raw_disk = format!("file:{}", raw.display());
    let top_disk = format!("tap:qcow2:{}", top.display());
    let cd = format!("tap:cdrom:{}", iso.display());
    // Each daemon, and what its lock refuses while it runs: writing (qemu-io needs the write
    // permission, which every daemon's lock refuses to share) and, for qcow2, `qemu-img info`
    // without -U (QEMU's qcow2 driver refuses to share writing of the file it reads).
    let write = |fmt: &str, p: &std::path::Path| {
        Probe::new("qemu-io", &["-f", fmt, "-c", "write 0 512", s(p)])
    };
    let cases = [
        (
            "blkback",
            vec!["--disk", raw_disk.as_str()],
            vec![write("raw", &raw)],
            vec![Probe::new("qemu-img", &["info", "-f", "raw", s(&raw)])],
        ),
        (
            "blkback",
            vec!["--disk", top_disk.as_str()],
            vec![
                Probe::new("qemu-img", &["info", s(&top)]),
                // The backing file, locked shared.
                write("raw", &base),
            ],
            vec![],
        ),
        (
            "cdrom",
            vec!["--disk", cd.as_str()],
            vec![write("raw", &iso)],
            vec![],
        ),
    ];
    for round in 0..20 {
        for (case, (bin, args, refused, also)) in cases.iter().enumerate() {
            let sock = d.join(format!("{case}-{round}.sock"));
            let log = d.join(format!("{case}-{round}.log"));
            let mut daemon = vback_daemon(bin, &sock, args, &log).unwrap();
            for p in refused {
                let out = p.run();
                assert!(
                    !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("lock"),
                    "round {round}: `{}` ran while {bin} {args:?} held the image: {out:?}",
                    p.what
                );
            }
            // SIGKILL and reap: the kernel must have released the lock by then, with nothing
            // to wait for.
            daemon.kill();
            for p in refused.iter().chain(also) {
                let out = p.run();
                assert!(
                    out.status.success(),
                    "round {round}: `{}` right after kill -9 of {bin} {args:?}: {}",
                    p.what,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}
