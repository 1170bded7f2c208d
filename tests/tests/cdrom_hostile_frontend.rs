//! A buggy or malicious front end must not crash, wedge or spin the cdrom daemon: malformed
//! vhost-user messages are refused or end that connection, rings outside guest memory or with
//! garbage in them are not served (and not polled forever), and the daemon serves the next
//! front end (`vback_tests::hostile`).

use vback_tests::hostile::Target;
use vback_tests::process::vback_daemon;

#[test]
fn hostile_front_ends_are_refused_and_cdrom_lives_on() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("cd.sock");
    let mut d = vback_daemon("cdrom", &sock, &["--empty"], &dir.path().join("cd.log")).unwrap();
    let mut t = Target {
        sock: &sock,
        daemon: &mut d,
        name: "cdrom",
        max_queue: 128,
        vrings: 3,
    };
    t.malformed_messages();

    // The control (0) and request (2) queues with garbage in them, kicked.
    t.garbage_rings_do_not_spin(&[0, 2]);

    // In-flight regions: bad sizes and counts, foreign descriptors, garbage entries (on the
    // request queue).
    t.hostile_inflight(2);
}
