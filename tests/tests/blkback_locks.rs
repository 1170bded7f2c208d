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
