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
