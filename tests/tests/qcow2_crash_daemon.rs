//! kill -9 of the blkback daemon itself, 20 times, in the middle of random writes to a qcow2
//! overlay with periodic flushes. A minimal vhost-user-blk front end in this test (the vhost
//! crate's front-end side, guest memory in a memfd, one split virtqueue) writes, zeroes and
//! flushes one request at a time; another thread sends SIGKILL to the daemon at a varying
//! moment. After each kill `qemu-img check` may find leaked clusters but never corruption, and
//! every write acknowledged before the last acknowledged flush reads back (through qemu-img).
//! Once on a standard overlay, once on one with extended L2 entries (subcluster allocation).

use std::process::Command;
use std::time::Duration;

use vback_tests::frontend::BlkDriver;
use vback_tests::process::blkback;
use vback_tests::qcow2_ops::{Qcow2Op, Qcow2Ops, assert_flushed_data_survived};
use vback_tests::qemu_tools::path_str as s;

const FLUSH_EVERY: u64 = 8;

#[test]
fn kill_9_of_the_daemon_during_writes_never_corrupts_and_keeps_what_was_flushed() {
    crash_rounds(None);
}

#[test]
fn kill_9_of_the_daemon_on_an_extended_l2_overlay_never_corrupts_and_keeps_what_was_flushed() {
    crash_rounds(Some("extended_l2=on"));
}

/// 20 rounds of writes, zeroes and flushes to an overlay made with `opts`, each ended by a
/// SIGKILL of the daemon.
fn crash_rounds(opts: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.raw");
    let base_data: Vec<u8> = (0..8u32 << 20).map(|i| (i >> 12) as u8 | 1).collect();
    std::fs::write(&base, &base_data).unwrap();
    let img = d.join("top.qcow2");
    let mut args = vec![
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        s(&base),
        s(&img),
    ];
    if let Some(o) = opts {
        args.extend(["-o", o]);
    }
    let out = Command::new("qemu-img")
        .args(&args)
        .output()
        .expect("qemu-img is required (apt-get install qemu-utils)");
    assert!(out.status.success());
    let current = d.join("now.raw");
    let mut baseline = base_data.clone();
    let sock = d.join("blk.sock");
    let disk = format!("tap:qcow2:{}", img.display());
    let mut total_acked = 0u64;
    for round in 0..20u64 {
        let _ = std::fs::remove_file(&sock);
        let mut daemon = blkback(
            &sock,
            &["--disk", &disk, "--queue-size", "16"],
            &d.join(format!("b{round}.log")),
        )
        .unwrap();
        let pid = daemon.pid().unwrap() as libc::pid_t;
        let mut drv = BlkDriver::connect(&sock);
        let delay = Duration::from_millis(60 + (round * 53) % 300);
        let killer = std::thread::spawn(move || {
            std::thread::sleep(delay);
            // SAFETY: kill(2) on the daemon this test started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        });
        let seed = round + 100;
        let mut acked = 0u64;
        for (i, op) in Qcow2Ops::new(seed, baseline.len() as u64).enumerate() {
            let ok = match op {
                Qcow2Op::Write { off, .. } => drv.request(1, off / 512, Some(&op.data())),
                Qcow2Op::Zero { off, len } => {
                    let mut seg = [0u8; 16];
                    seg[..8].copy_from_slice(&(off / 512).to_le_bytes());
                    seg[8..12].copy_from_slice(&((len / 512) as u32).to_le_bytes());
                    drv.request(13, 0, Some(&seg))
                }
            };
            if !ok {
                break;
            }
            let n = i as u64 + 1;
            if n.is_multiple_of(FLUSH_EVERY) {
                if !drv.request(4, 0, None) {
                    break;
                }
                acked = n;
            }
        }
        killer.join().unwrap();
        daemon.terminate(Duration::from_secs(5));
        drop(drv);
        total_acked += acked;
        eprintln!("round {round}: {acked} operations acknowledged by a flush");
        // The dead (and reaped) daemon's lock is gone: nothing to wait for.
        let check = Command::new("qemu-img")
            .args(["check", s(&img)])
            .output()
            .unwrap();
        assert!(
            matches!(check.status.code(), Some(0 | 3)),
            "round {round}: qemu-img check found corruption: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let _ = std::fs::remove_file(&current);
        let out = Command::new("qemu-img")
            .args(["convert", "-O", "raw", s(&img), s(&current)])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let now = std::fs::read(&current).unwrap();
        assert_flushed_data_survived(&baseline, &now, seed, acked, FLUSH_EVERY, round);
        baseline = now;
    }
    assert!(
        total_acked >= 100,
        "the daemon acknowledged flushed writes before being killed ({total_acked} operations)"
    );
    assert!(
        std::fs::read(&base).unwrap() == base_data,
        "the backing file is unchanged"
    );
}

/// SIGTERM while a front end and a control client are still connected (the control client made
/// a request and keeps its connection open): the daemon still closes the image before it exits.
/// Closing flushes, which releases the clusters discarded since the last flush: without it
/// their refcounts stay raised and `qemu-img check` finds them leaked.
#[test]
fn sigterm_after_a_control_request_closes_the_image() {
    use vback_common::control::ControlClient;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("img.qcow2");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", s(&img), "64M"])
        .output()
        .expect("qemu-img is required (apt-get install qemu-utils)");
    assert!(out.status.success());
    let (sock, ctl) = (d.join("blk.sock"), d.join("blk.ctl"));
    let disk = format!("tap:qcow2:{}", img.display());
    let mut daemon = blkback(
        &sock,
        &["--disk", &disk, "--control", s(&ctl)],
        &d.join("b.log"),
    )
    .unwrap();
    let mut drv = BlkDriver::connect(&sock);
    // Two clusters written (allocated), the first discarded whole: its refcount drops at the
    // next flush, which only closing the image does here.
    let data = vec![0x42u8; 128 << 10];
    assert!(drv.request(1, 0, Some(&data)), "{}", daemon.log());
    let mut seg = [0u8; 16];
    seg[8..12].copy_from_slice(&128u32.to_le_bytes());
    assert!(drv.request(11, 0, Some(&seg)), "{}", daemon.log());
    let mut client = ControlClient::connect(&ctl).unwrap();
    let status = client.call("status", serde_json::Value::Null).unwrap();
    assert_eq!(status["device"]["kind"], "qcow2", "{status}");
    assert_eq!(
        daemon
            .terminate(Duration::from_secs(10))
            .and_then(|st| st.code()),
        Some(0),
        "clean exit on SIGTERM:\n{}",
        daemon.log()
    );
    drop(client);
    drop(drv);
    let check = Command::new("qemu-img")
        .args(["check", s(&img)])
        .output()
        .unwrap();
    assert_eq!(
        check.status.code(),
        Some(0),
        "the image was closed (the discarded cluster released) before the daemon exited: {}\n{}",
        String::from_utf8_lossy(&check.stdout),
        daemon.log()
    );
}
