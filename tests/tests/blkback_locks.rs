//! Image locking against independent tools: blkback and QEMU (qemu-io, qemu-storage-daemon)
//! exclude each other as two QEMU processes would, and the refusal names the image and the
//! holder.

use std::process::Command;
use std::time::Duration;

use vback_tests::process::{blkback, qemu_storage_daemon, workspace_bin};

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
