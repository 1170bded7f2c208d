//! A buggy or malicious front end must not crash or wedge blkback: malformed vhost-user
//! messages are refused (an error reply where REPLY_ACK is negotiated) or end that connection,
//! and the daemon serves the next front end (`vback_tests::hostile`).

use std::time::Duration;

use vback_tests::hostile::{MEM, Target};
use vback_tests::process::blkback;

#[test]
fn malformed_vhost_user_messages_are_refused_and_the_daemon_lives_on() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("blk.sock");
    let mut d = blkback(
        &sock,
        &["--disk", "null:64M", "--queue-size", "64"],
        &dir.path().join("b.log"),
    )
    .unwrap();
    let mut t = Target {
        sock: &sock,
        daemon: &mut d,
        name: "blkback",
        max_queue: 64,
        vrings: 1,
    };
    t.malformed_messages();

    // A ring that straddles the end of guest memory, with garbage in its avail ring (an index
    // far ahead, a head out of range), kicked: every access is checked, nothing crashes.
    let conn = t.garbage_ring(0, MEM - 16, 200);
    std::thread::sleep(Duration::from_millis(200));
    drop(conn);
    t.still_serving("a straddling ring with a garbage avail ring");

    // In-flight regions: bad sizes and counts, foreign descriptors, garbage entries.
    t.hostile_inflight(0);
}

#[test]
fn a_guest_cannot_flood_the_log() {
    use vback_tests::frontend::BlkDriver;
    use vback_tests::frontend::blk_layout::HDR;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("blk.sock");
    let d = blkback(
        &sock,
        &["--disk", "null:64M", "--queue-size", "16"],
        &dir.path().join("b.log"),
    )
    .unwrap();
    let mut drv = BlkDriver::connect(&sock);
    // A request with no status byte is returned unanswered, with a warning: 2000 of them
    // used to write 2000 lines.
    for i in 0..2000 {
        assert!(drv.submit(&[(HDR, 16, 0)]), "request {i} returned");
    }
    let log = d.log();
    let lines = log
        .lines()
        .filter(|l| l.contains("has no status byte"))
        .count();
    assert!(
        (1..=vback_common::logging::BURST as usize).contains(&lines),
        "{lines} warnings for 2000 bad requests:\n{}",
        log.lines().take(40).collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn debug_logs_each_message_and_each_refused_request() {
    use vback_tests::frontend::BlkDriver;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("blk.sock");
    let d = blkback(
        &sock,
        &[
            "--disk",
            "null:1M",
            "--queue-size",
            "16",
            "--log-level",
            "debug",
        ],
        &dir.path().join("b.log"),
    )
    .unwrap();
    let mut drv = BlkDriver::connect(&sock);
    // VIRTIO_BLK_T_IN (0) within the disk works with every message logged...
    assert!(drv.request(0, 0, None), "{}", d.log());
    // ... and a write (1) past the end is refused, with the reason at debug.
    assert!(!drv.request(1, 4096, Some(&[0u8; 512])));
    let log = d.log();
    for want in [
        "vhost-user request GET_FEATURES",
        "vhost-user reply GET_FEATURES 0x",
        "vhost-user request SET_MEM_TABLE 1 regions [0x0+0x100000]",
        "vhost-user request SET_VRING_NUM ring 0 num 16",
        "vhost-user request SET_VRING_ADDR ring 0 desc",
        "vhost-user request SET_VRING_KICK ring 0",
        "(write at sector 4096) answered IoErr: the length is not a multiple of 512 or the range ends past the disk",
    ] {
        assert!(log.contains(want), "missing `{want}` in:\n{log}");
    }
}
