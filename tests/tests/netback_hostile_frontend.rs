//! A buggy or malicious front end must not crash, wedge or spin netback: malformed vhost-user
//! messages are refused or end that connection, rings outside guest memory or with garbage in
//! them are not served (and not polled forever), and the daemon serves the next front end
//! (`vback_tests::hostile`).

use vback_tests::hostile::Target;
use vback_tests::process::netback;

#[test]
fn hostile_front_ends_are_refused_and_netback_lives_on() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("net.sock");
    let mut d = netback(
        &sock,
        &["--host", "null", "--null-rx", "flood", "--vif", ""],
        &dir.path().join("n.log"),
    )
    .unwrap();
    let mut t = Target {
        sock: &sock,
        daemon: &mut d,
        name: "netback",
        max_queue: 1024,
        vrings: 3,
    };
    t.malformed_messages();

    // Receive (0) and transmit (1) rings with garbage in them, kicked.
    t.garbage_rings_do_not_spin(&[0, 1]);

    // Dirty-page logs: bad regions, and a write beyond a log too small (a transmit chain with
    // a device-writable buffer comes back through the direct-pointer ring).
    t.hostile_dirty_log(1);
}
