//! A front end whose guest memory is not shared (QEMU without a shared memory backend) is told
//! apart from other protocol errors: every backend logs what to change on QEMU's command line.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use vback_tests::hostile::negotiate;
use vback_tests::process::{Daemon, vback_daemon};
use vhost::VhostBackend;
use vhost::{VhostUserMemoryRegionInfo, VringConfigData};

const HINT: &str = "guest memory is not shared: start QEMU with a shared memory backend \
                    (-object memory-backend-memfd,id=mem,size=...,share=on -machine \
                    memory-backend=mem)";

/// Waits until the daemon's log holds `n` hints.
fn wait_for_hints(d: &Daemon, n: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = d.log();
        if log.matches(HINT).count() >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no hint about shared memory after {what}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ring(addr: u64) -> VringConfigData {
    VringConfigData {
        queue_max_size: 64,
        queue_size: 64,
        flags: 0,
        desc_table_addr: addr,
        used_ring_addr: addr + 0x2000,
        avail_ring_addr: addr + 0x1000,
        log_addr: None,
    }
}

fn check(bin: &str, args: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let d = vback_daemon(bin, &sock, args, &dir.path().join("log")).unwrap();

    // QEMU with private RAM sends no memory region at all, then the rings' addresses.
    {
        let fe = negotiate(&sock);
        fe.set_vring_num(0, 64).unwrap();
        assert!(
            fe.set_vring_addr(0, &ring(0x7f00_0000_0000)).is_err(),
            "{bin} took ring addresses without guest memory"
        );
    }
    wait_for_hints(&d, 1, "rings set up without guest memory");

    // A region whose descriptor cannot be mapped (a pipe).
    {
        let (rd, _wr) = pipe();
        let fe = negotiate(&sock);
        let r = fe.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: 1 << 20,
            userspace_addr: 0x7f00_0000_0000,
            mmap_offset: 0,
            mmap_handle: rd.as_raw_fd(),
        }]);
        assert!(r.is_err(), "{bin} mapped a pipe as guest memory");
    }
    wait_for_hints(&d, 2, "a memory region that cannot be mapped");
    let log = d.log();
    assert!(
        log.contains("it set up the rings without sharing any guest memory")
            && log.contains("a guest memory region it sent cannot be mapped"),
        "{log}"
    );
    drop(d);
}

fn pipe() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let mut fds = [-1; 2];
    // SAFETY: pipe2 writes two new descriptors into `fds`, which lives for the call.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: a new descriptor that nothing else owns.
    let rd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fds[0]) };
    // SAFETY: as above.
    let wr = unsafe { std::os::fd::OwnedFd::from_raw_fd(fds[1]) };
    (rd, wr)
}

#[test]
fn blkback_says_guest_memory_is_not_shared() {
    check("blkback", &["--disk", "null:1G"]);
}

#[test]
fn netback_says_guest_memory_is_not_shared() {
    check("netback", &["--host", "null"]);
}

#[test]
fn cdrom_says_guest_memory_is_not_shared() {
    check("cdrom", &["--empty"]);
}
