//! The handler against a front end speaking raw vhost-user messages on a socket pair.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::wire::{FLAG_NEED_REPLY, FLAG_REPLY, encode, req};
use super::*;
use crate::sync::lock;

/// A device that records what the handler hands it.
#[derive(Clone, Default)]
struct Probe {
    events: Arc<Mutex<Vec<u16>>>,
    channel: Arc<Mutex<Option<BackendChannel>>>,
    handovers: Arc<Mutex<usize>>,
    /// The guest memory, to serve requests with (each completed with 1 byte written).
    mem: Arc<Mutex<Option<Memory>>>,
    /// While set, a request taken is held (not completed) until it is cleared; `popped`
    /// counts requests taken.
    hold: Arc<(Mutex<bool>, std::sync::Condvar)>,
    popped: Arc<Mutex<usize>>,
    /// Requests completed.
    completed: Arc<Mutex<usize>>,
}

impl VhostUserBackend for Probe {
    type Vring = VringRwLock<Memory>;
    fn num_queues(&self) -> usize {
        2
    }
    fn max_queue_size(&self) -> usize {
        16
    }
    fn features(&self) -> u64 {
        1 << 32 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }
    fn inflight_handover(&self) {
        *lock(&self.handovers) += 1;
    }
    fn set_event_idx(&self, _enabled: bool) {}
    fn update_memory(&self, mem: Memory) -> std::io::Result<()> {
        *lock(&self.mem) = Some(mem);
        Ok(())
    }
    fn set_backend_req_fd(&self, channel: BackendChannel) {
        *lock(&self.channel) = Some(channel);
    }
    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Self::Vring],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        lock(&self.events).push(device_event);
        // Completes whatever the driver made available, as a device does (the tests that do
        // not publish requests see nothing of it).
        let mem = lock(&self.mem).clone();
        if let (Some(vring), Some(mem)) = (vrings.get(usize::from(device_event)), mem) {
            use vm_memory::GuestAddressSpace;
            let m = mem.memory();
            let heads: Vec<u16> = std::iter::from_fn(|| driver::pop(vring, &*m))
                .map(|c| c.head_index())
                .collect();
            *lock(&self.popped) += heads.len();
            let (held, cv) = &*self.hold;
            let mut h = lock(held);
            while *h && !heads.is_empty() {
                h = cv
                    .wait(h)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            drop(h);
            for head in heads {
                driver::complete(vring, head, 1).map_err(std::io::Error::other)?;
                *lock(&self.completed) += 1;
            }
            vring.signal_used_queue()?;
        }
        Ok(())
    }
}

impl Probe {
    fn events_of(&self, ring: u16) -> usize {
        lock(&self.events).iter().filter(|e| **e == ring).count()
    }
}

/// The front end's side: raw messages.
struct Raw {
    s: UnixStream,
}

impl Raw {
    fn send(&self, request: u32, flags: u32, body: &[u8], fds: &[RawFd]) {
        let m = encode(request, flags, body);
        self.s.send_with_fds(&[&m[..]], fds).unwrap();
    }

    /// A request with a reply of its own.
    fn get(&self, request: u32) -> Vec<u8> {
        self.send(request, 1, &[], &[]);
        self.reply(request)
    }

    fn reply(&self, request: u32) -> Vec<u8> {
        let mut hdr = [0u8; 12];
        (&self.s).read_exact(&mut hdr).unwrap();
        let word = |i: usize| u32::from_le_bytes(hdr[i..i + 4].try_into().unwrap());
        assert_eq!(
            word(0),
            request,
            "a reply to {}",
            wire::request_name(request)
        );
        assert_eq!(word(4), 1 | FLAG_REPLY);
        let mut body = vec![0u8; word(8) as usize];
        (&self.s).read_exact(&mut body).unwrap();
        body
    }

    /// A request with NEED_REPLY: the REPLY_ACK code (0 is success).
    fn ack(&self, request: u32, body: &[u8], fds: &[RawFd]) -> u64 {
        self.send(request, 1 | FLAG_NEED_REPLY, body, fds);
        let b = self.reply(request);
        u64::from_le_bytes(b.try_into().unwrap())
    }

    fn u64(v: u64) -> Vec<u8> {
        v.to_le_bytes().to_vec()
    }

    fn state(ring: u32, num: u32) -> Vec<u8> {
        [ring.to_le_bytes(), num.to_le_bytes()].concat()
    }
}

/// Serves a connection to `probe` on a thread; returns the front end's side and the result.
fn start(probe: &Probe) -> (Raw, std::thread::JoinHandle<Result<(), ConnectionError>>) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let p = probe.clone();
    let t = std::thread::spawn(move || Connection::new(p).unwrap().serve(&theirs));
    (Raw { s: ours }, t)
}

/// SET_OWNER, features, protocol features with REPLY_ACK (and `extra`).
fn negotiate_protocol(fe: &Raw, extra: VhostUserProtocolFeatures) {
    fe.send(req::SET_OWNER, 1, &[], &[]);
    assert_eq!(fe.get(req::GET_FEATURES).len(), 8);
    assert_eq!(fe.get(req::GET_PROTOCOL_FEATURES).len(), 8);
    let pf = (VhostUserProtocolFeatures::REPLY_ACK | extra).bits();
    fe.send(req::SET_PROTOCOL_FEATURES, 1, &Raw::u64(pf), &[]);
}

fn features() -> u64 {
    Probe::default().features()
}

/// A memfd of `size` bytes: the guest memory.
fn memfd(size: u64) -> File {
    // SAFETY: memfd_create(2) reads the NUL-terminated name and creates a new descriptor; the
    // result is checked before use.
    let fd = unsafe { libc::memfd_create(c"vback-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    f.set_len(size).unwrap();
    f
}

/// The front-end address of the guest memory (any number: the back end maps the memfd).
const VA: u64 = 0x7000_0000;

/// A memory table of one region of 1 MiB at guest address 0, and rings `0..rings` of 8
/// entries laid out in it, started with a kick and a call each (returned).
fn set_up_rings(fe: &Raw, rings: u32) -> Vec<(EventFd, EventFd)> {
    set_up_rings_in(fe, rings, &memfd(1 << 20))
}

/// [`set_up_rings`] in `mem` (1 MiB): ring `r`'s descriptor table at guest address
/// `0x1_0000 × r`, its avail ring 0x1000 above, its used ring 0x2000 above.
fn set_up_rings_in(fe: &Raw, rings: u32, mem: &File) -> Vec<(EventFd, EventFd)> {
    let mut table = Vec::new();
    table.extend_from_slice(&1u32.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes());
    for v in [0u64, 1 << 20, VA, 0] {
        table.extend_from_slice(&v.to_le_bytes());
    }
    assert_eq!(fe.ack(req::SET_MEM_TABLE, &table, &[mem.as_raw_fd()]), 0);
    (0..rings)
        .map(|ring| {
            let base = VA + 0x1_0000 * u64::from(ring);
            assert_eq!(fe.ack(req::SET_VRING_NUM, &Raw::state(ring, 8), &[]), 0);
            let mut addr = Vec::new();
            addr.extend_from_slice(&ring.to_le_bytes());
            addr.extend_from_slice(&0u32.to_le_bytes());
            for v in [base, base + 0x2000, base + 0x1000, 0] {
                addr.extend_from_slice(&v.to_le_bytes());
            }
            assert_eq!(fe.ack(req::SET_VRING_ADDR, &addr, &[]), 0);
            assert_eq!(fe.ack(req::SET_VRING_BASE, &Raw::state(ring, 0), &[]), 0);
            let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let r = Raw::u64(u64::from(ring));
            assert_eq!(fe.ack(req::SET_VRING_CALL, &r, &[call.as_raw_fd()]), 0);
            assert_eq!(fe.ack(req::SET_VRING_KICK, &r, &[kick.as_raw_fd()]), 0);
            (kick, call)
        })
        .collect()
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn an_early_vring_enable_is_answered_and_applied_with_the_features() {
    let probe = Probe::default();
    let (fe, t) = start(&probe);
    negotiate_protocol(&fe, VhostUserProtocolFeatures::empty());
    // QEMU's vhost-user netdev: enables before SET_FEATURES. The last state of each ring
    // counts.
    assert_eq!(fe.ack(req::SET_VRING_ENABLE, &Raw::state(0, 1), &[]), 0);
    fe.send(req::SET_VRING_ENABLE, 1, &Raw::state(1, 1), &[]);
    for _ in 0..10_000 {
        fe.send(req::SET_VRING_ENABLE, 1, &Raw::state(1, 0), &[]);
    }
    let rings = set_up_rings(&fe, 2);
    for (kick, _) in &rings {
        kick.write(1).unwrap();
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        lock(&probe.events).len(),
        0,
        "no ring runs before the features"
    );
    assert_eq!(fe.ack(req::SET_FEATURES, &Raw::u64(features()), &[]), 0);
    wait_until("ring 0 to be served", || probe.events_of(0) > 0);
    rings[1].0.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(probe.events_of(1), 0, "ring 1 was disabled last");
    // Enabled now, ring 1 is served once without a kick (it may have missed one).
    assert_eq!(fe.ack(req::SET_VRING_ENABLE, &Raw::state(1, 1), &[]), 0);
    wait_until("ring 1 to be served", || probe.events_of(1) > 0);
    drop(fe);
    assert!(
        t.join().unwrap().is_ok(),
        "a hang-up ends the connection cleanly"
    );
}

#[test]
fn an_early_enable_of_a_ring_that_does_not_exist_is_refused() {
    let probe = Probe::default();
    let (fe, t) = start(&probe);
    negotiate_protocol(&fe, VhostUserProtocolFeatures::empty());
    assert_eq!(fe.ack(req::SET_VRING_ENABLE, &Raw::state(7, 1), &[]), 1);
    let e = t.join().unwrap().unwrap_err();
    assert_eq!(
        e.to_string(),
        "SET_VRING_ENABLE refused: ring 7 does not exist (the device has 2)"
    );
}

#[test]
fn a_new_call_eventfd_is_signalled_once_and_a_new_kick_is_served() {
    let probe = Probe::default();
    let (fe, t) = start(&probe);
    negotiate_protocol(&fe, VhostUserProtocolFeatures::empty());
    assert_eq!(fe.ack(req::SET_FEATURES, &Raw::u64(features()), &[]), 0);
    let rings = set_up_rings(&fe, 1);
    let (kick, call) = &rings[0];
    assert_eq!(
        call.read().unwrap(),
        1,
        "the new call eventfd was signalled"
    );
    assert!(call.read().is_err(), "once");
    assert_eq!(fe.ack(req::SET_VRING_ENABLE, &Raw::state(0, 1), &[]), 0);
    wait_until("ring 0 to be served", || probe.events_of(0) > 0);

    // A new call eventfd on a running ring (QEMU masking and unmasking an interrupt).
    let call2 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    assert_eq!(
        fe.ack(req::SET_VRING_CALL, &Raw::u64(0), &[call2.as_raw_fd()]),
        0
    );
    assert_eq!(call2.read().unwrap(), 1);
    // No eventfd (polling): nothing to signal.
    assert_eq!(fe.ack(req::SET_VRING_CALL, &Raw::u64(0x100), &[]), 0);

    // A new kick on a running ring is the one served.
    let kick2 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    assert_eq!(
        fe.ack(req::SET_VRING_KICK, &Raw::u64(0), &[kick2.as_raw_fd()]),
        0
    );
    std::thread::sleep(Duration::from_millis(50));
    let before = probe.events_of(0);
    kick2.write(1).unwrap();
    wait_until("the new kick to be served", || probe.events_of(0) > before);
    let after = probe.events_of(0);
    kick.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(probe.events_of(0), after, "the old kick is not watched");
    drop(fe);
    assert!(t.join().unwrap().is_ok());
}

#[test]
fn the_back_end_channel_reaches_the_device() {
    let probe = Probe::default();
    let (fe, t) = start(&probe);
    negotiate_protocol(&fe, VhostUserProtocolFeatures::BACKEND_REQ);
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    assert_eq!(fe.ack(req::SET_BACKEND_REQ_FD, &[], &[ours.as_raw_fd()]), 0);
    drop(ours);
    let ch = lock(&probe.channel)
        .clone()
        .expect("the device got the channel");
    ch.config_changed().unwrap();
    let mut got = [0u8; 12];
    theirs.read_exact(&mut got).unwrap();
    assert_eq!(&got[..], &encode(2, 1, &[])[..], "CONFIG_CHANGE_MSG");

    // Anything but a unix stream socket is refused.
    let efd = EventFd::new(0).unwrap();
    assert_eq!(fe.ack(req::SET_BACKEND_REQ_FD, &[], &[efd.as_raw_fd()]), 1);
    let e = t.join().unwrap().unwrap_err();
    assert!(e.to_string().contains("not a unix stream socket"), "{e}");
}

#[test]
fn the_back_end_channel_needs_its_protocol_feature() {
    let probe = Probe::default();
    let (fe, t) = start(&probe);
    negotiate_protocol(&fe, VhostUserProtocolFeatures::empty());
    let (ours, _theirs) = UnixStream::pair().unwrap();
    assert_eq!(fe.ack(req::SET_BACKEND_REQ_FD, &[], &[ours.as_raw_fd()]), 1);
    let e = t.join().unwrap().unwrap_err();
    assert!(
        e.to_string().contains("protocol feature BACKEND_REQ"),
        "{e}"
    );
    assert!(lock(&probe.channel).is_none());
}

#[test]
fn refusals_name_the_request_and_the_problem() {
    type Bad = Box<dyn Fn(&Raw)>;
    let cases: Vec<(Bad, &str)> = vec![
        (
            Box::new(|fe| {
                fe.ack(req::SET_VRING_NUM, &Raw::state(0, 12), &[]);
            }),
            "SET_VRING_NUM refused: ring 0: queue size 12 is not a power of two from 1 to 16",
        ),
        (
            Box::new(|fe| {
                fe.ack(req::SET_FEATURES, &Raw::u64(1 << 40), &[]);
            }),
            "SET_FEATURES refused: the front end acked features 0x10000000000, which this back \
             end did not offer",
        ),
        (
            Box::new(|fe| {
                fe.ack(req::SET_OWNER, &[], &[]);
            }),
            "SET_OWNER refused: the connection already has an owner (a second SET_OWNER)",
        ),
        (
            Box::new(|fe| {
                let efd = EventFd::new(0).unwrap();
                fe.ack(req::SET_VRING_NUM, &Raw::state(0, 8), &[efd.as_raw_fd()]);
            }),
            "SET_VRING_NUM refused: it came with 1 file descriptors; this request takes none",
        ),
        (
            Box::new(|fe| {
                fe.send(req::GET_QUEUE_NUM, 1 | FLAG_NEED_REPLY, &[], &[]);
            }),
            "GET_QUEUE_NUM refused: it needs protocol feature MQ",
        ),
        (
            Box::new(|fe| {
                fe.ack(req::SET_VRING_ADDR, &[0u8; 40], &[]);
            }),
            "SET_VRING_ADDR refused: ring 0: ring addresses came before any guest memory was \
             shared",
        ),
        (
            Box::new(|fe| {
                fe.send(31, 1 | FLAG_NEED_REPLY, &[0; 24], &[]);
            }),
            "GET_INFLIGHT_FD refused: it needs protocol feature INFLIGHT_SHMFD",
        ),
    ];
    for (bad, want) in cases {
        let (fe, t) = start(&Probe::default());
        negotiate_protocol(&fe, VhostUserProtocolFeatures::empty());
        bad(&fe);
        let e = t.join().unwrap().unwrap_err().to_string();
        assert!(e.starts_with(want), "`{e}` is not `{want}`");
    }
}

#[test]
fn device_tokens_are_above_the_rings_and_the_wake_up() {
    let (fe, t) = start(&Probe::default());
    drop(fe);
    assert!(t.join().unwrap().is_ok());
    let conn = Connection::new(Probe::default()).unwrap();
    let w = &conn.epoll_handlers()[0];
    let efd = EventFd::new(0).unwrap();
    // 0 and 1 are the rings, 2 the wake-up.
    for reserved in 0..=2 {
        assert!(
            w.register_listener(efd.as_raw_fd(), EventSet::IN, reserved)
                .is_err()
        );
    }
    w.register_listener(efd.as_raw_fd(), EventSet::IN, 3)
        .unwrap();
    assert!(
        w.register_listener(efd.as_raw_fd(), EventSet::IN, 3)
            .is_err(),
        "registered twice"
    );
    w.unregister_listener(efd.as_raw_fd(), EventSet::IN, 3)
        .unwrap();
    assert!(
        w.unregister_listener(efd.as_raw_fd(), EventSet::IN, 3)
            .is_err()
    );
}

impl Raw {
    /// A reply with one descriptor.
    fn reply_with_fd(&self, request: u32) -> (Vec<u8>, File) {
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        let mut buf = [0u8; 12 + 24];
        let (n, file) = self.s.recv_with_fd(&mut buf).unwrap();
        assert_eq!(n, buf.len());
        assert_eq!(u32::from_le_bytes(buf[..4].try_into().unwrap()), request);
        (
            buf[12..].to_vec(),
            file.expect("a descriptor with the reply"),
        )
    }
}

fn inflight_body(mmap_size: u64, num_queues: u16, queue_size: u16) -> Vec<u8> {
    inflight::InflightInfo {
        mmap_size,
        mmap_offset: 0,
        num_queues,
        queue_size,
    }
    .to_bytes()
}

#[test]
fn an_inflight_region_is_handed_out_and_taken_back() {
    let probe = Probe::default();
    let (fe, t) = start(&probe);
    negotiate_protocol(&fe, VhostUserProtocolFeatures::INFLIGHT_SHMFD);
    fe.send(req::GET_INFLIGHT_FD, 1, &inflight_body(0, 2, 16), &[]);
    let (body, fd) = fe.reply_with_fd(req::GET_INFLIGHT_FD);
    let got = inflight::InflightInfo::from_bytes(&body).unwrap();
    assert_eq!(got.mmap_size, 2 * inflight::queue_region_size(16));
    assert_eq!(
        (got.mmap_offset, got.num_queues, got.queue_size),
        (0, 2, 16)
    );
    let set = inflight_body(got.mmap_size, 2, 16);
    assert_eq!(fe.ack(req::SET_INFLIGHT_FD, &set, &[fd.as_raw_fd()]), 0);
    assert_eq!(*lock(&probe.handovers), 0, "a fresh region is no handover");
    drop(fe);
    assert!(t.join().unwrap().is_ok());

    // A region a back end used (a queue header with a version) is a handover.
    let mut header = [0u8; 16];
    header[8..10].copy_from_slice(&inflight::VERSION.to_le_bytes());
    header[10..12].copy_from_slice(&16u16.to_le_bytes());
    use std::os::unix::fs::FileExt;
    fd.write_all_at(&header, 0).unwrap();
    let (fe, t) = start(&probe);
    negotiate_protocol(&fe, VhostUserProtocolFeatures::INFLIGHT_SHMFD);
    assert_eq!(fe.ack(req::SET_INFLIGHT_FD, &set, &[fd.as_raw_fd()]), 0);
    assert_eq!(*lock(&probe.handovers), 1);
    drop(fe);
    assert!(t.join().unwrap().is_ok());
}

#[test]
fn bad_inflight_regions_are_refused_with_the_reason() {
    let (_, sealed, _) = inflight::InflightRegion::allocate(2, 16).unwrap();
    let size = 2 * inflight::queue_region_size(16);
    let unsealed = memfd(size);
    type Bad = Box<dyn Fn(&Raw)>;
    let cases: Vec<(Bad, String)> = vec![
        (
            Box::new(|fe| fe.send(req::GET_INFLIGHT_FD, 1, &inflight_body(0, 3, 16), &[])),
            "GET_INFLIGHT_FD refused: the in-flight region is for 3 queues; this device has 2"
                .into(),
        ),
        (
            Box::new(|fe| fe.send(req::GET_INFLIGHT_FD, 1, &inflight_body(0, 0, 16), &[])),
            "GET_INFLIGHT_FD refused: the in-flight region is for 0 queues".into(),
        ),
        (
            Box::new(|fe| fe.send(req::GET_INFLIGHT_FD, 1, &inflight_body(0, 2, 32), &[])),
            "GET_INFLIGHT_FD refused: the in-flight region is for queues of 32 entries; this \
             back end serves powers of two up to 16"
                .into(),
        ),
        (
            Box::new(|fe| fe.send(req::GET_INFLIGHT_FD, 1, &[0; 20], &[])),
            "GET_INFLIGHT_FD refused: its body is 20 bytes; this request has 24".into(),
        ),
        (
            Box::new(move |fe| {
                let body = inflight_body(size - 1, 2, 16);
                fe.ack(req::SET_INFLIGHT_FD, &body, &[sealed.as_raw_fd()]);
            }),
            format!(
                "SET_INFLIGHT_FD refused: the in-flight region of {} bytes is too small for 2 \
                 queues of 16 entries ({size} bytes)",
                size - 1
            ),
        ),
        (
            Box::new(move |fe| {
                let body = inflight_body(size, 2, 16);
                fe.ack(req::SET_INFLIGHT_FD, &body, &[unsealed.as_raw_fd()]);
            }),
            "SET_INFLIGHT_FD refused: the in-flight region's descriptor is not a memfd sealed \
             against shrinking"
                .into(),
        ),
        (
            Box::new(move |fe| {
                fe.ack(req::SET_INFLIGHT_FD, &inflight_body(size, 2, 16), &[]);
            }),
            "SET_INFLIGHT_FD refused: it came with 0 file descriptors; this request takes one"
                .into(),
        ),
    ];
    for (bad, want) in cases {
        let (fe, t) = start(&Probe::default());
        negotiate_protocol(&fe, VhostUserProtocolFeatures::INFLIGHT_SHMFD);
        bad(&fe);
        let e = t.join().unwrap().unwrap_err().to_string();
        assert!(e.starts_with(&want), "`{e}` is not `{want}`");
    }
}

/// The SET_VRING_ADDR body of ring 0 as `set_up_rings` lays it out, with `flags` and `log`.
fn ring0_addr(flags: u32, log: u64, moved: u64) -> Vec<u8> {
    let mut addr = Vec::new();
    addr.extend_from_slice(&0u32.to_le_bytes());
    addr.extend_from_slice(&flags.to_le_bytes());
    for v in [VA + moved, VA + 0x2000, VA + 0x1000, log] {
        addr.extend_from_slice(&v.to_le_bytes());
    }
    addr
}

/// Puts descriptor `i` (one device-writable buffer at `gpa` of `len` bytes) on ring 0's avail
/// ring (slot `i`, avail index `i + 1`) in `mem`, as `set_up_rings_in` laid it out.
fn publish_write(mem: &File, i: u16, gpa: u64, len: u32) {
    use std::os::unix::fs::FileExt;
    let mut d = Vec::new();
    d.extend_from_slice(&gpa.to_le_bytes());
    d.extend_from_slice(&len.to_le_bytes());
    d.extend_from_slice(&2u16.to_le_bytes());
    d.extend_from_slice(&0u16.to_le_bytes());
    mem.write_all_at(&d, 16 * u64::from(i)).unwrap();
    mem.write_all_at(&i.to_le_bytes(), 0x1004 + 2 * u64::from(i))
        .unwrap();
    mem.write_all_at(&(i + 1).to_le_bytes(), 0x1002).unwrap();
}

fn used_idx(mem: &File) -> u16 {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 2];
    mem.read_exact_at(&mut b, 0x2002).unwrap();
    u16::from_le_bytes(b)
}

/// The dirty pages in a log bitmap.
fn dirty_pages(log: &File, bytes: usize) -> Vec<u64> {
    use std::os::unix::fs::FileExt;
    let mut b = vec![0u8; bytes];
    log.read_exact_at(&mut b, 0).unwrap();
    (0..bytes as u64 * 8)
        .filter(|p| b[(*p / 8) as usize] & (1 << (p % 8)) != 0)
        .collect()
}

#[test]
fn writes_are_logged_in_the_dirty_log_while_log_all_is_acked() {
    let probe = Probe::default();
    let (fe, t) = start(&probe);
    let offered = u64::from_le_bytes(fe.get(req::GET_FEATURES).try_into().unwrap());
    assert_ne!(
        offered & handler::VHOST_F_LOG_ALL,
        0,
        "VHOST_F_LOG_ALL offered"
    );
    let pf = u64::from_le_bytes(fe.get(req::GET_PROTOCOL_FEATURES).try_into().unwrap());
    assert_ne!(pf & VhostUserProtocolFeatures::LOG_SHMFD.bits(), 0);
    negotiate_protocol(&fe, VhostUserProtocolFeatures::LOG_SHMFD);
    assert_eq!(fe.ack(req::SET_FEATURES, &Raw::u64(features()), &[]), 0);
    let mem = memfd(1 << 20);
    let rings = set_up_rings_in(&fe, 1, &mem);
    assert_eq!(fe.ack(req::SET_VRING_ENABLE, &Raw::state(0, 1), &[]), 0);

    // Logging off: a write is not logged.
    let log = memfd(32);
    let mut base = Raw::u64(32);
    base.extend_from_slice(&0u64.to_le_bytes());
    fe.send(req::SET_LOG_BASE, 1, &base, &[log.as_raw_fd()]);
    assert_eq!(fe.reply(req::SET_LOG_BASE), base, "the region echoed");
    publish_write(&mem, 0, 0x5_0000, 0x10);
    rings[0].0.write(1).unwrap();
    wait_until("the first request to complete", || used_idx(&mem) == 1);
    assert_eq!(dirty_pages(&log, 32), Vec::<u64>::new());

    // Migration starts: VHOST_F_LOG_ALL, then the ring addresses again with the used ring's
    // log address, on the running ring.
    let on = features() | handler::VHOST_F_LOG_ALL;
    assert_eq!(fe.ack(req::SET_FEATURES, &Raw::u64(on), &[]), 0);
    assert_eq!(
        fe.ack(req::SET_VRING_ADDR, &ring0_addr(1, 0x2000, 0), &[]),
        0
    );
    // 0x1800 bytes at 0x6_0800: pages 0x60 and 0x61; the used ring: page 2.
    publish_write(&mem, 1, 0x6_0800, 0x1800);
    rings[0].0.write(1).unwrap();
    wait_until("the second request to complete", || used_idx(&mem) == 2);
    assert_eq!(dirty_pages(&log, 32), vec![2, 0x60, 0x61]);

    // Migration done: logging off again.
    assert_eq!(fe.ack(req::SET_FEATURES, &Raw::u64(features()), &[]), 0);
    publish_write(&mem, 2, 0x7_0000, 0x10);
    rings[0].0.write(1).unwrap();
    wait_until("the third request to complete", || used_idx(&mem) == 3);
    assert_eq!(dirty_pages(&log, 32), vec![2, 0x60, 0x61]);

    // A running ring's addresses cannot move.
    assert_eq!(
        fe.ack(req::SET_VRING_ADDR, &ring0_addr(0, 0, 0x100), &[]),
        1
    );
    let e = t.join().unwrap().unwrap_err();
    assert!(e.to_string().contains("while the ring runs"), "{e}");
}

#[test]
fn bad_log_regions_are_refused() {
    let probe = Probe::default();
    let (fe, t) = start(&probe);
    negotiate_protocol(&fe, VhostUserProtocolFeatures::empty());
    let log = memfd(32);
    let mut base = Raw::u64(32);
    base.extend_from_slice(&0u64.to_le_bytes());
    // Without LOG_SHMFD.
    fe.send(req::SET_LOG_BASE, 1, &base, &[log.as_raw_fd()]);
    let e = t.join().unwrap().unwrap_err();
    assert!(e.to_string().contains("protocol feature LOG_SHMFD"), "{e}");

    // Past the end of its file: refused, nothing mapped.
    let (fe, t) = start(&probe);
    negotiate_protocol(&fe, VhostUserProtocolFeatures::LOG_SHMFD);
    let mut base = Raw::u64(32);
    base.extend_from_slice(&8u64.to_le_bytes());
    fe.send(req::SET_LOG_BASE, 1, &base, &[log.as_raw_fd()]);
    let e = t.join().unwrap().unwrap_err();
    assert!(
        e.to_string().contains("past the end of the 32-byte file"),
        "{e}"
    );
}

#[test]
fn get_vring_base_answers_after_the_request_being_served_completes() {
    let probe = Probe::default();
    let (fe, t) = start(&probe);
    negotiate_protocol(&fe, VhostUserProtocolFeatures::empty());
    assert_eq!(fe.ack(req::SET_FEATURES, &Raw::u64(features()), &[]), 0);
    let mem = memfd(1 << 20);
    let rings = set_up_rings_in(&fe, 1, &mem);
    assert_eq!(fe.ack(req::SET_VRING_ENABLE, &Raw::state(0, 1), &[]), 0);
    *lock(&probe.hold.0) = true;
    publish_write(&mem, 0, 0x5_0000, 0x10);
    rings[0].0.write(1).unwrap();
    wait_until("the device to take the request", || {
        *lock(&probe.popped) == 1
    });
    // The device is in the middle of the request: the ring stops, and the base the front end
    // gets (the next avail index, 1) is final only once the request is on the used ring.
    fe.send(req::GET_VRING_BASE, 1, &Raw::state(0, 0), &[]);
    let hold = probe.hold.clone();
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        *lock(&hold.0) = false;
        hold.1.notify_all();
    });
    let base = fe.reply(req::GET_VRING_BASE);
    assert_eq!(
        *lock(&probe.completed),
        1,
        "the reply came before the request being served completed"
    );
    assert_eq!(base, Raw::state(0, 1));
    assert_eq!(used_idx(&mem), 1);
    release.join().unwrap();
    // The stopped ring takes nothing more.
    publish_write(&mem, 1, 0x6_0000, 0x10);
    rings[0].0.write(1).unwrap();
    drop(fe);
    assert!(t.join().unwrap().is_ok());
    assert_eq!(*lock(&probe.popped), 1);
}
