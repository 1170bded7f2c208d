//! A buggy or malicious front end must not crash or wedge blkback: malformed vhost-user
//! messages are refused (an error reply where REPLY_ACK is negotiated) or end that connection,
//! and the daemon serves the next front end. Driven with the vhost crate's front-end side and
//! raw bytes on the socket.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use vback_tests::frontend::SharedMemory;
use vback_tests::process::{Daemon, blkback};
use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VringConfigData};

const MEM: u64 = 1 << 20;

/// Connects and negotiates features, with REPLY_ACK.
fn negotiate(sock: &Path) -> Frontend {
    let mut fe = Frontend::connect(sock, 1).expect("connect");
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

fn still_serving(sock: &Path, d: &mut Daemon, what: &str) {
    assert!(d.is_running(), "blkback died after {what}:\n{}", d.log());
    // The daemon may still be tearing the previous connection down: retry briefly.
    for _ in 0..100 {
        if let Ok(fe) = Frontend::connect(sock, 1)
            && fe.set_owner().is_ok()
            && fe.get_features().is_ok()
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "blkback does not serve a new front end after {what}:\n{}",
        d.log()
    );
}

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
    let region = SharedMemory::new(MEM);

    // Overlapping memory regions.
    {
        let fe = negotiate(&sock);
        let r = fe.set_mem_table(&[region.info(0, MEM), region.info(MEM / 2, MEM)]);
        assert!(r.is_err(), "overlapping regions were accepted");
    }
    still_serving(&sock, &mut d, "overlapping memory regions");

    // Each bad request on a connection of its own: it must fail (an error reply, or the
    // daemon closing that connection), and the daemon must serve the next front end.
    type Bad = Box<dyn Fn(&mut Frontend, u64) -> bool>;
    let va = region.addr() as u64;
    let ring = move |desc: u64| VringConfigData {
        queue_max_size: 64,
        queue_size: 64,
        flags: 0,
        desc_table_addr: desc,
        used_ring_addr: va + 0x2000,
        avail_ring_addr: va + 0x1000,
        log_addr: None,
    };
    let cases: Vec<(&str, Bad)> = vec![
        (
            "a queue size of 0",
            Box::new(|fe, _| fe.set_vring_num(0, 0).is_err()),
        ),
        (
            "a queue size above the maximum",
            Box::new(|fe, _| fe.set_vring_num(0, 128).is_err()),
        ),
        (
            "a queue index beyond the device",
            Box::new(|fe, _| fe.set_vring_num(5, 64).is_err()),
        ),
        (
            "a descriptor table outside guest memory",
            Box::new(move |fe, _| {
                fe.set_vring_num(0, 64).is_err()
                    || fe.set_vring_addr(0, &ring(va + 16 * MEM)).is_err()
            }),
        ),
        (
            "an avail ring outside guest memory",
            Box::new(move |fe, _| {
                fe.set_vring_num(0, 64).is_err()
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
        let mut fe = negotiate(&sock);
        fe.set_mem_table(&[region.info(0, MEM)]).unwrap();
        assert!(bad(&mut fe, va), "{what} was accepted");
        drop(fe);
        still_serving(&sock, &mut d, what);
    }

    // A ring that straddles the end of guest memory, with garbage in its avail ring (an index
    // far ahead, a head out of range), kicked: every access is checked, nothing crashes.
    {
        let mut fe = negotiate(&sock);
        fe.set_mem_table(&[region.info(0, MEM)]).unwrap();
        fe.set_vring_num(0, 64).unwrap();
        let _ = fe.set_vring_addr(0, &ring(va + MEM - 16));
        let kick = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        let call = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        let _ = fe.set_vring_base(0, 0);
        let _ = fe.set_vring_call(0, &call);
        let _ = fe.set_vring_kick(0, &kick);
        let _ = fe.set_vring_enable(0, true);
        let avail = region.addr().wrapping_add(0x1000);
        // SAFETY: writing inside our own shared mapping (avail->idx at ring + 2).
        unsafe { avail.wrapping_add(2).cast::<u16>().write_unaligned(200) };
        // SAFETY: as above (avail->ring[0] at ring + 4).
        unsafe { avail.wrapping_add(4).cast::<u16>().write_unaligned(999) };
        kick.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            d.is_running(),
            "blkback died on a hostile ring:\n{}",
            d.log()
        );
    }
    still_serving(&sock, &mut d, "a straddling ring with a garbage avail ring");

    // An unknown request code, then a truncated message.
    {
        let mut s = UnixStream::connect(&sock).unwrap();
        // header: request 9999, flags = version 1 | NEED_REPLY, size 0
        let mut msg = Vec::new();
        msg.extend_from_slice(&9999u32.to_le_bytes());
        msg.extend_from_slice(&(1u32 | 8).to_le_bytes());
        msg.extend_from_slice(&0u32.to_le_bytes());
        s.write_all(&msg).unwrap();
    }
    still_serving(&sock, &mut d, "an unknown request");
    {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(&[1, 0, 0, 0, 1]).unwrap();
    }
    still_serving(&sock, &mut d, "a truncated message");
    {
        // A header announcing a huge body that never comes.
        let mut s = UnixStream::connect(&sock).unwrap();
        let mut msg = Vec::new();
        msg.extend_from_slice(&5u32.to_le_bytes()); // SET_MEM_TABLE
        msg.extend_from_slice(&1u32.to_le_bytes());
        msg.extend_from_slice(&0x7fff_ffffu32.to_le_bytes());
        s.write_all(&msg).unwrap();
    }
    still_serving(&sock, &mut d, "an oversized message");
}
