//! A buggy or malicious vhost-user front end, for every backend's tests: malformed messages
//! must be refused (an error reply where REPLY_ACK is negotiated) or end that connection, rings
//! with garbage in them must not crash or wedge the daemon, and the daemon must serve the next
//! front end. Driven with the vhost crate's front-end side and raw bytes on the socket.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

use crate::frontend::SharedMemory;
use crate::process::Daemon;

/// Guest memory the hostile front end shares.
pub const MEM: u64 = 1 << 20;

/// CPU time (utime + stime, in clock ticks) the daemon has used.
fn cpu_ticks(d: &Daemon) -> u64 {
    let pid = d.pid().expect("the daemon runs");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which ends with ')'): utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// The backend under attack.
#[derive(Debug)]
pub struct Target<'a> {
    /// Its vhost-user socket.
    pub sock: &'a Path,
    /// The daemon.
    pub daemon: &'a mut Daemon,
    /// Its name, for messages.
    pub name: &'static str,
    /// The largest queue size it accepts.
    pub max_queue: u16,
    /// How many vrings it has.
    pub vrings: usize,
}

/// Connects and negotiates features, with REPLY_ACK. The front end allows queue indices up to
/// 63, so a bad index reaches the daemon.
pub fn negotiate(sock: &Path) -> Frontend {
    let mut fe = Frontend::connect(sock, 64).expect("connect");
    fe.set_owner().unwrap();
    let f = fe.get_features().unwrap();
    fe.set_features(f).unwrap();
    assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
    let pf = fe.get_protocol_features().unwrap();
    assert!(pf.contains(VhostUserProtocolFeatures::REPLY_ACK));
    fe.set_protocol_features(
        pf & (VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ),
    )
    .unwrap();
    // Ask for a reply to every request, so a refusal comes back as an error.
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe
}

impl Target<'_> {
    /// Panics unless the daemon is alive and serves a new front end.
    pub fn still_serving(&mut self, what: &str) {
        assert!(
            self.daemon.is_running(),
            "{} died after {what}:\n{}",
            self.name,
            self.daemon.log()
        );
        // The daemon may still be tearing the previous connection down: retry briefly.
        for _ in 0..100 {
            if let Ok(fe) = Frontend::connect(self.sock, 1)
                && fe.set_owner().is_ok()
                && fe.get_features().is_ok()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "{} does not serve a new front end after {what}:\n{}",
            self.name,
            self.daemon.log()
        );
    }

    /// Malformed messages: overlapping memory regions, bad queue sizes and indices, rings
    /// outside guest memory, an unknown request, a truncated message, an oversized one.
    pub fn malformed_messages(&mut self) {
        let region = SharedMemory::new(MEM);
        {
            let fe = negotiate(self.sock);
            let r = fe.set_mem_table(&[region.info(0, MEM), region.info(MEM / 2, MEM)]);
            assert!(r.is_err(), "overlapping regions were accepted");
        }
        self.still_serving("overlapping memory regions");

        // Each bad request on a connection of its own: it must fail (an error reply, or the
        // daemon closing that connection), and the daemon must serve the next front end.
        type Bad = Box<dyn Fn(&mut Frontend) -> bool>;
        let va = region.addr() as u64;
        let (max, vrings) = (self.max_queue, self.vrings);
        let size = 64.min(max);
        let ring = move |desc: u64| VringConfigData {
            queue_max_size: max,
            queue_size: size,
            flags: 0,
            desc_table_addr: desc,
            used_ring_addr: va + 0x2000,
            avail_ring_addr: va + 0x1000,
            log_addr: None,
        };
        let cases: Vec<(&str, Bad)> = vec![
            (
                "a queue size of 0",
                Box::new(|fe| fe.set_vring_num(0, 0).is_err()),
            ),
            (
                "a queue size above the maximum",
                Box::new(move |fe| fe.set_vring_num(0, 2 * max).is_err()),
            ),
            (
                "a queue index beyond the device",
                Box::new(move |fe| fe.set_vring_num(vrings + 3, size).is_err()),
            ),
            (
                "a descriptor table outside guest memory",
                Box::new(move |fe| {
                    fe.set_vring_num(0, size).is_err()
                        || fe.set_vring_addr(0, &ring(va + 16 * MEM)).is_err()
                }),
            ),
            (
                "an avail ring outside guest memory",
                Box::new(move |fe| {
                    fe.set_vring_num(0, size).is_err()
                        || fe
                            .set_vring_addr(
                                0,
                                &VringConfigData {
                                    avail_ring_addr: va + 8 * MEM,
                                    ..ring(va)
                                },
                            )
                            .is_err()
                }),
            ),
        ];
        for (what, bad) in cases {
            let mut fe = negotiate(self.sock);
            fe.set_mem_table(&[region.info(0, MEM)]).unwrap();
            assert!(bad(&mut fe), "{what} was accepted");
            drop(fe);
            self.still_serving(what);
        }

        // An unknown request code, then a truncated message.
        {
            let mut s = UnixStream::connect(self.sock).unwrap();
            // header: request 9999, flags = version 1 | NEED_REPLY, size 0
            let mut msg = Vec::new();
            msg.extend_from_slice(&9999u32.to_le_bytes());
            msg.extend_from_slice(&(1u32 | 8).to_le_bytes());
            msg.extend_from_slice(&0u32.to_le_bytes());
            s.write_all(&msg).unwrap();
        }
        self.still_serving("an unknown request");
        {
            let mut s = UnixStream::connect(self.sock).unwrap();
            s.write_all(&[1, 0, 0, 0, 1]).unwrap();
        }
        self.still_serving("a truncated message");
        {
            // A header announcing a huge body that never comes.
            let mut s = UnixStream::connect(self.sock).unwrap();
            let mut msg = Vec::new();
            msg.extend_from_slice(&5u32.to_le_bytes()); // SET_MEM_TABLE
            msg.extend_from_slice(&1u32.to_le_bytes());
            msg.extend_from_slice(&0x7fff_ffffu32.to_le_bytes());
            s.write_all(&msg).unwrap();
        }
        self.still_serving("an oversized message");
    }

    /// For each of `queues`: garbage rings kicked (a descriptor table straddling the end of
    /// memory; an avail index more than a queue ahead, a broken driver whose queue must be left
    /// alone, not polled in a loop) must not make the daemon spin, and it serves on.
    pub fn garbage_rings_do_not_spin(&mut self, queues: &[usize]) {
        for &queue in queues {
            for (desc, idx, what) in [
                (
                    MEM - 16,
                    5u16,
                    "a descriptor table straddling the end of memory",
                ),
                (0x4000, 200, "an avail index more than a queue ahead"),
            ] {
                let conn = self.garbage_ring(queue, desc, idx);
                std::thread::sleep(Duration::from_millis(200));
                let before = cpu_ticks(self.daemon);
                std::thread::sleep(Duration::from_secs(1));
                let used = cpu_ticks(self.daemon) - before;
                // A spinning worker would use about 100 ticks in that second.
                assert!(
                    used < 50,
                    "{} used {used} clock ticks in 1 s after {what} on vring {queue}:\n{}",
                    self.name,
                    self.daemon.log()
                );
                drop(conn);
                self.still_serving(what);
            }
        }
    }

    /// Starts vring `queue` with garbage in its avail ring (an index `avail_idx`, far ahead of
    /// the device, and a head out of range), its descriptor table at `desc` bytes into guest
    /// memory (near the end: a table straddling it), and kicks it. Returns the front end (the
    /// connection stays up while the caller watches the daemon) and the kick.
    pub fn garbage_ring(&mut self, queue: usize, desc: u64, avail_idx: u16) -> (Frontend, EventFd) {
        let region = SharedMemory::new(MEM);
        let va = region.addr() as u64;
        let size = 64.min(self.max_queue);
        let mut fe = negotiate(self.sock);
        fe.set_mem_table(&[region.info(0, MEM)]).unwrap();
        fe.set_vring_num(queue, size).unwrap();
        let _ = fe.set_vring_addr(
            queue,
            &VringConfigData {
                queue_max_size: self.max_queue,
                queue_size: size,
                flags: 0,
                desc_table_addr: va + desc,
                used_ring_addr: va + 0x2000,
                avail_ring_addr: va + 0x1000,
                log_addr: None,
            },
        );
        let kick = EventFd::new(0).unwrap();
        let call = EventFd::new(0).unwrap();
        let _ = fe.set_vring_base(queue, 0);
        let _ = fe.set_vring_call(queue, &call);
        let _ = fe.set_vring_kick(queue, &kick);
        let _ = fe.set_vring_enable(queue, true);
        region.put(0x1000 + 2, &avail_idx.to_le_bytes());
        region.put(0x1000 + 4, &999u16.to_le_bytes());
        kick.write(1).unwrap();
        // The memory stays mapped in the daemon (it has its own mapping of the memfd).
        drop(region);
        (fe, kick)
    }
}

/// Connects and negotiates like [`negotiate`], with in-flight tracking (the daemon must offer
/// it).
pub fn negotiate_inflight(sock: &Path) -> Frontend {
    let mut fe = Frontend::connect(sock, 64).expect("connect");
    fe.set_owner().unwrap();
    let f = fe.get_features().unwrap();
    fe.set_features(f).unwrap();
    let pf = fe.get_protocol_features().unwrap();
    assert!(
        pf.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD),
        "the daemon does not offer in-flight tracking"
    );
    fe.set_protocol_features(
        pf & (VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD),
    )
    .unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe
}

/// The bytes of an in-flight region per queue of `queue_size` (libvhost-user's stride).
fn inflight_stride(queue_size: u16) -> u64 {
    vback_common::vhost_user::inflight::queue_region_size(queue_size)
}

impl Target<'_> {
    /// In-flight tracking from a hostile front end (the daemon must offer it): a region for
    /// too many queues or queues larger than the daemon's, one too small, a descriptor that is
    /// not the sealed memfd the daemon handed out, a disconnect between GET and SET, a header
    /// of another shape, and garbage entries in a valid region (a mark on a head beyond the
    /// ring, two heads with one counter, counter 0, a mark other than 1, a last-batch head out
    /// of range). Each is refused or its entries dropped with a warning, and the one valid
    /// entry is replayed on vring `queue`; the daemon serves on after each.
    pub fn hostile_inflight(&mut self, queue: usize) {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::FileExt;
        use vhost::vhost_user::message::VhostUserInflight;
        let qs = self.max_queue;
        let all = self.vrings as u16;
        let ask = |num_queues: u16, queue_size: u16| VhostUserInflight {
            num_queues,
            queue_size,
            ..Default::default()
        };

        let mut fe = negotiate_inflight(self.sock);
        assert!(fe.get_inflight_fd(&ask(all + 1, qs)).is_err());
        self.still_serving("GET_INFLIGHT_FD for more queues than the device has");

        let mut fe2 = negotiate_inflight(self.sock);
        assert!(fe2.get_inflight_fd(&ask(all, qs * 2)).is_err());
        self.still_serving("GET_INFLIGHT_FD for queues larger than the device serves");
        drop((fe, fe2));

        let mut fe = negotiate_inflight(self.sock);
        let (info, file) = fe.get_inflight_fd(&ask(all, qs)).unwrap();
        assert_eq!(info.mmap_size, u64::from(all) * inflight_stride(qs));
        let small = VhostUserInflight {
            mmap_size: info.mmap_size - 1,
            ..info
        };
        assert!(fe.set_inflight_fd(&small, file.as_raw_fd()).is_err());
        self.still_serving("an in-flight region too small for its queues");

        let mut fe = negotiate_inflight(self.sock);
        let other = SharedMemory::new(info.mmap_size);
        let raw = other.info(0, info.mmap_size).mmap_handle;
        assert!(fe.set_inflight_fd(&info, raw).is_err());
        self.still_serving("an in-flight region that is not the sealed memfd handed out");

        let mut fe = negotiate_inflight(self.sock);
        let _ = fe.get_inflight_fd(&ask(all, qs)).unwrap();
        drop(fe);
        self.still_serving("a disconnect between GET_INFLIGHT_FD and SET_INFLIGHT_FD");

        // A header of another shape: refused when the ring starts.
        let base = queue as u64 * inflight_stride(qs);
        let header = |version: u16, desc_num: u16, last: u16, used: u16| {
            let mut h = [0u8; 16];
            h[8..10].copy_from_slice(&version.to_le_bytes());
            h[10..12].copy_from_slice(&desc_num.to_le_bytes());
            h[12..14].copy_from_slice(&last.to_le_bytes());
            h[14..16].copy_from_slice(&used.to_le_bytes());
            file.write_all_at(&h, base).unwrap();
        };
        header(7, qs / 2, 0, 0);
        let (region, fe) = self.inflight_ring(queue, &info, &file);
        drop((region, fe));
        self.still_serving("an in-flight region with a garbage header");
        let log = self.daemon.log();
        assert!(
            log.contains("header says version 7") && !log.contains("resubmitting"),
            "{} did not refuse a garbage in-flight header:\n{log}",
            self.name
        );

        // Garbage entries around one valid one (head 1, counter 7).
        let ring = 8u16;
        header(1, qs, 0xfff0, 5);
        let entry = |head: u16, flag: u8, counter: u64| {
            let mut e = [0u8; 16];
            e[0] = flag;
            e[8..].copy_from_slice(&counter.to_le_bytes());
            file.write_all_at(&e, base + 16 + 16 * u64::from(head))
                .unwrap();
        };
        entry(ring + 1, 1, 3); // beyond the ring
        entry(1, 1, 7);
        entry(2, 1, 7); // the same counter again
        entry(3, 9, 8); // not a mark
        entry(4, 1, 0); // counter 0
        let (region, fe) = self.inflight_ring(queue, &info, &file);
        // Head 1 is replayed (its chain is zeroes: answered or returned, either way on the
        // used ring), and nothing else.
        let used = |r: &SharedMemory| r.load_u16(0x2000 + 2);
        for _ in 0..500 {
            if used(&region) >= 1 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            used(&region),
            1,
            "{} replayed {} requests from the garbage region:\n{}",
            self.name,
            used(&region),
            self.daemon.log()
        );
        assert_eq!(region.load_u16(0x2000 + 4), 1, "the replayed head");
        let log = self.daemon.log();
        assert_eq!(
            log.matches("was not replayed").count(),
            5,
            "each garbage entry is named:\n{log}"
        );
        drop((region, fe));
        self.still_serving("garbage entries in the in-flight region");
    }

    /// Sets up vring `queue` (8 entries, rings in fresh memory, used index 0) with the
    /// in-flight region `file`, and starts it.
    fn inflight_ring(
        &mut self,
        queue: usize,
        info: &vhost::vhost_user::message::VhostUserInflight,
        file: &std::fs::File,
    ) -> (SharedMemory, Frontend) {
        use std::os::fd::AsRawFd;
        let region = SharedMemory::new(MEM);
        let va = region.addr() as u64;
        let mut fe = negotiate_inflight(self.sock);
        fe.set_inflight_fd(info, file.as_raw_fd()).unwrap();
        fe.set_mem_table(&[region.info(0, MEM)]).unwrap();
        fe.set_vring_num(queue, 8).unwrap();
        fe.set_vring_addr(
            queue,
            &VringConfigData {
                queue_max_size: self.max_queue,
                queue_size: 8,
                flags: 0,
                desc_table_addr: va,
                used_ring_addr: va + 0x2000,
                avail_ring_addr: va + 0x1000,
                log_addr: None,
            },
        )
        .unwrap();
        fe.set_vring_base(queue, 0).unwrap();
        let call = EventFd::new(0).unwrap();
        let kick = EventFd::new(0).unwrap();
        let _ = fe.set_vring_call(queue, &call);
        let _ = fe.set_vring_kick(queue, &kick);
        let _ = fe.set_vring_enable(queue, true);
        (region, fe)
    }
}
