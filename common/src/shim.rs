//! A relay between a front end and the vhost-user-backend handler that papers over one
//! ordering difference: QEMU's vhost-user netdev sends VHOST_USER_SET_VRING_ENABLE when the
//! virtio-net device resets, before any VHOST_USER_SET_FEATURES, and vhost-user-backend 0.24
//! answers such an early enable with an error and drops the connection (the spec only defines
//! the message once VHOST_USER_F_PROTOCOL_FEATURES is negotiated). Until SET_FEATURES has been
//! seen, the relay answers SET_VRING_ENABLE itself (success, if a reply was asked for),
//! remembers the state asked for each ring, and replays it to the back end right after
//! SET_FEATURES (QEMU enables the rings before it sets the features and does not repeat it).
//! Everything else is forwarded, file descriptors included, unchanged. The data path (shared
//! memory, kick and call eventfds) never goes through it.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const HDR: usize = 12;
const SET_FEATURES: u32 = 2;
const SET_VRING_ENABLE: u32 = 18;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
/// The largest body we relay (a memory table with 8 regions is 328 bytes; config space 268).
const MAX_BODY: usize = 4096;

/// One message: header, body, and the descriptors that came with it.
struct Msg {
    hdr: [u8; HDR],
    body: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Msg {
    fn request(&self) -> u32 {
        u32::from_le_bytes([self.hdr[0], self.hdr[1], self.hdr[2], self.hdr[3]])
    }
    fn flags(&self) -> u32 {
        u32::from_le_bytes([self.hdr[4], self.hdr[5], self.hdr[6], self.hdr[7]])
    }
}

fn recv(s: &UnixStream) -> Option<Msg> {
    let mut hdr = [0u8; HDR];
    let mut raw = [-1 as RawFd; 8];
    let mut iov = [libc::iovec {
        iov_base: hdr.as_mut_ptr().cast(),
        iov_len: HDR,
    }];
    // SAFETY: the iovec points at `hdr`, which is valid for HDR bytes for the call.
    let (n, nfds) = unsafe { s.recv_with_fds(&mut iov, &mut raw) }.ok()?;
    // SAFETY: recvmsg handed us `nfds` new descriptors that nothing else owns.
    let fds: Vec<OwnedFd> = raw[..nfds]
        .iter()
        .map(|fd| unsafe { OwnedFd::from_raw_fd(*fd) })
        .collect();
    if n == 0 {
        return None;
    }
    let mut s2 = s;
    if n < HDR {
        s2.read_exact(&mut hdr[n..]).ok()?;
    }
    let size = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize;
    if size > MAX_BODY {
        return None;
    }
    let mut body = vec![0u8; size];
    s2.read_exact(&mut body).ok()?;
    Some(Msg { hdr, body, fds })
}

fn send(s: &UnixStream, m: &Msg) -> bool {
    use std::os::fd::AsRawFd;
    let fds: Vec<RawFd> = m.fds.iter().map(AsRawFd::as_raw_fd).collect();
    let mut buf = m.hdr.to_vec();
    buf.extend_from_slice(&m.body);
    if fds.is_empty() {
        let mut s2 = s;
        return s2.write_all(&buf).is_ok();
    }
    s.send_with_fds(&[&buf[..]], &fds)
        .is_ok_and(|n| n == buf.len())
}

/// The name of a front-end request (vhost-user spec numbering).
pub fn request_name(req: u32) -> &'static str {
    const NAMES: [&str; 44] = [
        "NONE",
        "GET_FEATURES",
        "SET_FEATURES",
        "SET_OWNER",
        "RESET_OWNER",
        "SET_MEM_TABLE",
        "SET_LOG_BASE",
        "SET_LOG_FD",
        "SET_VRING_NUM",
        "SET_VRING_ADDR",
        "SET_VRING_BASE",
        "GET_VRING_BASE",
        "SET_VRING_KICK",
        "SET_VRING_CALL",
        "SET_VRING_ERR",
        "GET_PROTOCOL_FEATURES",
        "SET_PROTOCOL_FEATURES",
        "GET_QUEUE_NUM",
        "SET_VRING_ENABLE",
        "SEND_RARP",
        "NET_SET_MTU",
        "SET_BACKEND_REQ_FD",
        "IOTLB_MSG",
        "SET_VRING_ENDIAN",
        "GET_CONFIG",
        "SET_CONFIG",
        "CREATE_CRYPTO_SESSION",
        "CLOSE_CRYPTO_SESSION",
        "POSTCOPY_ADVISE",
        "POSTCOPY_LISTEN",
        "POSTCOPY_END",
        "GET_INFLIGHT_FD",
        "SET_INFLIGHT_FD",
        "GPU_SET_SOCKET",
        "RESET_DEVICE",
        "VRING_KICK",
        "GET_MAX_MEM_SLOTS",
        "ADD_MEM_REG",
        "REM_MEM_REG",
        "SET_STATUS",
        "GET_STATUS",
        "GET_SHARED_OBJECT",
        "SET_DEVICE_STATE_FD",
        "CHECK_DEVICE_STATE",
    ];
    NAMES.get(req as usize).copied().unwrap_or("UNKNOWN")
}

/// One line describing a message: its name, ring and key values.
fn describe(m: &Msg) -> String {
    let req = m.request();
    let b = &m.body;
    let u32_at = |i: usize| {
        b.get(i..i + 4)
            .map(|x| u32::from_le_bytes([x[0], x[1], x[2], x[3]]))
    };
    let u64_at = |i: usize| {
        b.get(i..i + 8).map(|x| {
            let mut a = [0u8; 8];
            a.copy_from_slice(x);
            u64::from_le_bytes(a)
        })
    };
    let detail = match req {
        // A u64: features, protocol features, queue count, status.
        1 | 2 | 15 | 16 | 17 | 39 | 40 => u64_at(0).map(|v| format!(" {v:#x}")),
        // A vring state: index and number.
        8 | 10 | 11 | 18 => match (u32_at(0), u32_at(4)) {
            (Some(i), Some(n)) => Some(format!(" ring {i} num {n}")),
            _ => None,
        },
        // A vring address.
        9 => match (u32_at(0), u64_at(8), u64_at(16), u64_at(24)) {
            (Some(i), Some(d), Some(u), Some(a)) => {
                Some(format!(" ring {i} desc {d:#x} used {u:#x} avail {a:#x}"))
            }
            _ => None,
        },
        // A vring file: index, and bit 8 for "no fd".
        12..=14 => u64_at(0).map(|v| {
            format!(
                " ring {}{}",
                v & 0xff,
                if v & 0x100 != 0 {
                    " (no fd: polling)"
                } else {
                    ""
                }
            )
        }),
        // The memory table: region count, then (gpa, size, user address, offset) each.
        5 => u32_at(0).map(|n| {
            let regions: Vec<String> = (0..n.min(8) as usize)
                .filter_map(|r| {
                    let at = 8 + 32 * r;
                    Some(format!("{:#x}+{:#x}", u64_at(at)?, u64_at(at + 8)?))
                })
                .collect();
            format!(" {n} regions [{}]", regions.join(", "))
        }),
        24 | 25 => match (u32_at(0), u32_at(4)) {
            (Some(off), Some(size)) => Some(format!(" offset {off} size {size}")),
            _ => None,
        },
        _ => None,
    };
    format!(
        "{}{} ({} bytes, {} fds)",
        request_name(req),
        detail.unwrap_or_default(),
        b.len(),
        m.fds.len()
    )
}

/// Relays between `frontend` and `backend` until either side closes. `num_queues` is the
/// back end's number of rings: an early SET_VRING_ENABLE for a ring beyond it is passed to the
/// back end, which refuses it, so the relay keeps at most one pending state per real ring.
/// Without `answer_early`, early enables are forwarded too (the relay only logs).
pub fn relay(frontend: UnixStream, backend: UnixStream, num_queues: usize, answer_early: bool) {
    let (Ok(f2), Ok(b2)) = (frontend.try_clone(), backend.try_clone()) else {
        return;
    };
    let back = std::thread::Builder::new()
        .name("vu-relay".into())
        .spawn(move || {
            // Back end to front end: replies, verbatim.
            while let Some(m) = recv(&b2) {
                log::debug!("vhost-user reply {}", describe(&m));
                if !send(&f2, &m) {
                    break;
                }
            }
            let _ = f2.shutdown(std::net::Shutdown::Both);
        });
    relay_requests(&frontend, &backend, num_queues, answer_early);
    let _ = backend.shutdown(std::net::Shutdown::Both);
    if let Ok(t) = back {
        let _ = t.join();
    }
}

/// The front-end-to-back-end half of [`relay`].
fn relay_requests(
    frontend: &UnixStream,
    backend: &UnixStream,
    num_queues: usize,
    answer_early: bool,
) {
    let mut features_seen = false;
    // The last state asked for each ring before SET_FEATURES (index = ring).
    let mut early: Vec<Option<u32>> = vec![None; num_queues];
    while let Some(m) = recv(frontend) {
        let req = m.request();
        log::debug!("vhost-user request {}", describe(&m));
        if req == SET_FEATURES {
            features_seen = true;
        }
        let early_state = (answer_early && req == SET_VRING_ENABLE && !features_seen)
            .then(|| <[u8; 8]>::try_from(&m.body[..]).ok())
            .flatten()
            .map(|b| {
                let index = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                let num = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
                (index, num)
            })
            .filter(|(index, _)| (*index as usize) < num_queues);
        if let Some((index, num)) = early_state {
            log::debug!(
                "answering an early SET_VRING_ENABLE of ring {index} (before SET_FEATURES) ourselves"
            );
            early[index as usize] = Some(num);
            if m.flags() & FLAG_NEED_REPLY != 0 {
                let mut hdr = [0u8; HDR];
                hdr[0..4].copy_from_slice(&SET_VRING_ENABLE.to_le_bytes());
                hdr[4..8].copy_from_slice(&(1 | FLAG_REPLY).to_le_bytes());
                hdr[8..12].copy_from_slice(&8u32.to_le_bytes());
                let reply = Msg {
                    hdr,
                    body: 0u64.to_le_bytes().to_vec(),
                    fds: Vec::new(),
                };
                if !send(frontend, &reply) {
                    return;
                }
            }
            continue;
        }
        if !send(backend, &m) {
            return;
        }
        if req == SET_FEATURES {
            // Replay the ring states the front end asked for too early (no reply asked).
            for (index, num) in early
                .iter_mut()
                .enumerate()
                .filter_map(|(i, s)| s.take().map(|n| (i, n)))
            {
                let mut hdr = [0u8; HDR];
                hdr[0..4].copy_from_slice(&SET_VRING_ENABLE.to_le_bytes());
                hdr[4..8].copy_from_slice(&1u32.to_le_bytes());
                hdr[8..12].copy_from_slice(&8u32.to_le_bytes());
                let mut body = Vec::with_capacity(8);
                body.extend_from_slice(&(index as u32).to_le_bytes());
                body.extend_from_slice(&num.to_le_bytes());
                if !send(
                    backend,
                    &Msg {
                        hdr,
                        body,
                        fds: Vec::new(),
                    },
                ) {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn enable(index: u32, num: u32, need_reply: bool) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&SET_VRING_ENABLE.to_le_bytes());
        let flags = 1 | if need_reply { FLAG_NEED_REPLY } else { 0 };
        m.extend_from_slice(&flags.to_le_bytes());
        m.extend_from_slice(&8u32.to_le_bytes());
        m.extend_from_slice(&index.to_le_bytes());
        m.extend_from_slice(&num.to_le_bytes());
        m
    }

    fn set_features() -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&SET_FEATURES.to_le_bytes());
        m.extend_from_slice(&1u32.to_le_bytes());
        m.extend_from_slice(&8u32.to_le_bytes());
        m.extend_from_slice(&(1u64 << 32).to_le_bytes());
        m
    }

    /// Runs the request half against `input` and returns what reached the back end.
    fn run(input: &[u8], num_queues: usize) -> (Vec<u8>, Duration) {
        let (mut fe, fe_peer) = UnixStream::pair().unwrap();
        let (be_peer, mut be) = UnixStream::pair().unwrap();
        let data = input.to_vec();
        let writer = std::thread::spawn(move || {
            fe.write_all(&data).unwrap();
            fe.shutdown(std::net::Shutdown::Write).unwrap();
            // Drain the replies so the relay never blocks on a full socket.
            let mut sink = Vec::new();
            let _ = fe.read_to_end(&mut sink);
        });
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            let _ = be.read_to_end(&mut got);
            got
        });
        let t0 = Instant::now();
        relay_requests(&fe_peer, &be_peer, num_queues, true);
        let took = t0.elapsed();
        drop(be_peer);
        drop(fe_peer);
        writer.join().unwrap();
        (reader.join().unwrap(), took)
    }

    #[test]
    fn early_enables_are_replayed_once_per_ring_after_set_features() {
        let mut input = Vec::new();
        input.extend(enable(0, 1, true));
        input.extend(enable(1, 1, false));
        input.extend(enable(0, 0, false));
        input.extend(enable(0, 1, false));
        input.extend(set_features());
        let (got, _) = run(&input, 2);
        let mut want = set_features();
        want.extend(enable(0, 1, false));
        want.extend(enable(1, 1, false));
        assert_eq!(got, want);
    }

    #[test]
    fn an_early_enable_of_a_ring_that_does_not_exist_goes_to_the_back_end() {
        let input = enable(7, 1, false);
        let (got, _) = run(&input, 2);
        assert_eq!(got, input, "the back end sees it (and refuses it)");
    }

    #[test]
    fn many_early_enables_keep_bounded_state() {
        // 80k early enables of distinct rings used to build an 80k-entry list scanned on every
        // message (quadratic: 2.7 s of CPU) and replayed in full. Now the relay keeps one state
        // per real ring; enables of rings that do not exist go to the back end as they come.
        let mut input = Vec::new();
        let mut want = Vec::new();
        for i in 0..80_000u32 {
            input.extend(enable(i, 1, false));
            if i >= 2 {
                want.extend(enable(i, 1, false));
            }
        }
        input.extend(set_features());
        want.extend(set_features());
        want.extend(enable(0, 1, false));
        want.extend(enable(1, 1, false));
        let (got, took) = run(&input, 2);
        assert!(got == want, "one replay per real ring (took {took:?})");
    }

    #[test]
    fn messages_are_described_with_their_key_values() {
        let m = Msg {
            hdr: {
                let mut h = [0u8; HDR];
                h[..4].copy_from_slice(&8u32.to_le_bytes());
                h[8..].copy_from_slice(&8u32.to_le_bytes());
                h
            },
            body: [3u32.to_le_bytes(), 256u32.to_le_bytes()].concat(),
            fds: Vec::new(),
        };
        assert_eq!(
            describe(&m),
            "SET_VRING_NUM ring 3 num 256 (8 bytes, 0 fds)"
        );
        assert_eq!(request_name(5), "SET_MEM_TABLE");
        assert_eq!(request_name(999), "UNKNOWN");
        // Without answering early enables, the relay forwards them as they come.
        let (fe_peer, mut fe) = UnixStream::pair().unwrap();
        let (be_peer, mut be) = UnixStream::pair().unwrap();
        fe.write_all(&enable(0, 1, false)).unwrap();
        fe.shutdown(std::net::Shutdown::Write).unwrap();
        relay_requests(&fe_peer, &be_peer, 2, false);
        drop(be_peer);
        let mut got = Vec::new();
        be.read_to_end(&mut got).unwrap();
        assert_eq!(got, enable(0, 1, false));
    }
}
