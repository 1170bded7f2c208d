//! A buggy or malicious front end must not crash, wedge or spin netback: malformed vhost-user
//! messages are refused or end that connection, rings outside guest memory or with garbage in
//! them are not served (and not polled forever), and the daemon serves the next front end
//! (`vback_tests::hostile`).

use std::time::Duration;

use vback_tests::hostile::{MEM, Target};
use vback_tests::process::{Daemon, netback};

/// CPU time (utime + stime, in clock ticks) the process has used.
fn cpu_ticks(d: &Daemon) -> u64 {
    let pid = d.pid().expect("netback runs");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which ends with ')'): utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

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

    // Receive (0) and transmit (1) rings with garbage in them, kicked: a table straddling the
    // end of memory, and an avail index far ahead of the device (more than a queue: a broken
    // driver whose queue must be left alone, not polled in a loop).
    for queue in [0, 1] {
        for (desc, idx, what) in [
            (
                MEM - 16,
                5u16,
                "a descriptor table straddling the end of memory",
            ),
            (0x4000, 200, "an avail index more than a queue ahead"),
        ] {
            let conn = t.garbage_ring(queue, desc, idx);
            std::thread::sleep(Duration::from_millis(200));
            let before = cpu_ticks(t.daemon);
            std::thread::sleep(Duration::from_secs(1));
            let used = cpu_ticks(t.daemon) - before;
            // A spinning worker would use about 100 ticks in that second.
            assert!(
                used < 50,
                "netback used {used} clock ticks in 1 s after {what} on vring {queue}:\n{}",
                t.daemon.log()
            );
            drop(conn);
            t.still_serving(what);
        }
    }
}
