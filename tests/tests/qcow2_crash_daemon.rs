//! kill -9 of the blkback daemon itself, 20 times, in the middle of random writes to a qcow2
//! overlay with periodic flushes. A minimal vhost-user-blk front end in this test (the vhost
//! crate's front-end side, guest memory in a memfd, one split virtqueue) writes, zeroes and
//! flushes one request at a time; another thread sends SIGKILL to the daemon at a varying
//! moment. After each kill `qemu-img check` may find leaked clusters but never corruption, and
//! every write acknowledged before the last acknowledged flush reads back (through qemu-img).

use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vback_tests::frontend::SharedMemory;
use vback_tests::process::blkback;
use vback_tests::qcow2_ops::{Qcow2Op, Qcow2Ops, assert_flushed_data_survived};
use vback_tests::qemu_tools::path_str as s;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

const MEM: u64 = 1 << 20;
const QSIZE: u16 = 16;
const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HDR: u64 = 0x3000;
const STATUS: u64 = 0x3100;
const DATA: u64 = 0x10000;
const FLUSH_EVERY: u64 = 8;

/// A connected front end with one queue.
struct Driver {
    _fe: Frontend,
    kick: EventFd,
    _call: EventFd,
    mem: SharedMemory,
    next: u16,
}

impl Driver {
    fn connect(sock: &Path) -> Driver {
        let mut fe = Frontend::connect(sock, 1).expect("connect");
        fe.set_owner().unwrap();
        let f = fe.get_features().unwrap();
        fe.set_features(f).unwrap();
        assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
        let pf = fe.get_protocol_features().unwrap();
        fe.set_protocol_features(pf & VhostUserProtocolFeatures::CONFIG)
            .unwrap();
        let mem = SharedMemory::new(MEM);
        fe.set_mem_table(&[mem.info(0, MEM)]).unwrap();
        let va = mem.addr() as u64;
        fe.set_vring_num(0, QSIZE).unwrap();
        fe.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: va + DESC,
                used_ring_addr: va + USED,
                avail_ring_addr: va + AVAIL,
                log_addr: None,
            },
        )
        .unwrap();
        fe.set_vring_base(0, 0).unwrap();
        let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        fe.set_vring_call(0, &call).unwrap();
        fe.set_vring_kick(0, &kick).unwrap();
        fe.set_vring_enable(0, true).unwrap();
        Driver {
            _fe: fe,
            kick,
            _call: call,
            mem,
            next: 0,
        }
    }

    /// One request (header, optional data out, status in); true if it completed with OK
    /// within a second.
    fn request(&mut self, kind: u32, sector: u64, data: Option<&[u8]>) -> bool {
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.put(HDR, &hdr);
        self.mem.put(STATUS, &[0xff]);
        let mut descs = vec![(HDR, 16u32, 0u16)];
        if let Some(d) = data {
            self.mem.put(DATA, d);
            descs.push((DATA, d.len() as u32, 0));
        }
        descs.push((STATUS, 1, 2)); // device-writable
        let n = descs.len();
        for (i, (addr, len, flags)) in descs.into_iter().enumerate() {
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            let more = if i + 1 < n { 1u16 } else { 0 };
            d[12..14].copy_from_slice(&(flags | more).to_le_bytes());
            d[14..16].copy_from_slice(&(i as u16 + 1).to_le_bytes());
            self.mem.put(DESC + 16 * i as u64, &d);
        }
        // Publish head 0 and bump the avail index.
        let slot = u64::from(self.next % QSIZE);
        self.mem.put(AVAIL + 4 + 2 * slot, &0u16.to_le_bytes());
        self.next = self.next.wrapping_add(1);
        std::sync::atomic::fence(Ordering::SeqCst);
        self.mem.put(AVAIL + 2, &self.next.to_le_bytes());
        std::sync::atomic::fence(Ordering::SeqCst);
        let _ = self.kick.write(1);
        let t0 = Instant::now();
        while self.mem.load_u16(USED + 2) != self.next {
            if t0.elapsed() > Duration::from_secs(1) {
                return false;
            }
            std::thread::yield_now();
        }
        self.mem.get8(STATUS) == 0
    }
}

#[test]
fn kill_9_of_the_daemon_during_writes_never_corrupts_and_keeps_what_was_flushed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.raw");
    let base_data: Vec<u8> = (0..8u32 << 20).map(|i| (i >> 12) as u8 | 1).collect();
    std::fs::write(&base, &base_data).unwrap();
    let img = d.join("top.qcow2");
    let out = Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            s(&base),
            s(&img),
        ])
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
        let mut drv = Driver::connect(&sock);
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
