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

/// Relays between `frontend` and `backend` until either side closes.
pub fn relay(frontend: UnixStream, backend: UnixStream) {
    let (Ok(f2), Ok(b2)) = (frontend.try_clone(), backend.try_clone()) else {
        return;
    };
    let back = std::thread::Builder::new()
        .name("vu-relay".into())
        .spawn(move || {
            // Back end to front end: replies, verbatim.
            while let Some(m) = recv(&b2) {
                if !send(&f2, &m) {
                    break;
                }
            }
            let _ = f2.shutdown(std::net::Shutdown::Both);
        });
    let mut features_seen = false;
    let mut early: Vec<[u8; 8]> = Vec::new();
    while let Some(m) = recv(&frontend) {
        let req = m.request();
        log::trace!(
            "front end request {req} ({} bytes, {} fds)",
            m.body.len(),
            m.fds.len()
        );
        if req == SET_FEATURES {
            features_seen = true;
        }
        if req == SET_VRING_ENABLE && !features_seen {
            log::debug!("answering an early SET_VRING_ENABLE (before SET_FEATURES) ourselves");
            if let Ok(state) = <[u8; 8]>::try_from(&m.body[..]) {
                early.retain(|s| s[0..4] != state[0..4]);
                early.push(state);
            }
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
                if !send(&frontend, &reply) {
                    break;
                }
            }
            continue;
        }
        if !send(&backend, &m) {
            break;
        }
        if req == SET_FEATURES {
            // Replay the ring states the front end asked for too early (no reply asked).
            for state in early.drain(..) {
                let mut hdr = [0u8; HDR];
                hdr[0..4].copy_from_slice(&SET_VRING_ENABLE.to_le_bytes());
                hdr[4..8].copy_from_slice(&1u32.to_le_bytes());
                hdr[8..12].copy_from_slice(&8u32.to_le_bytes());
                if !send(
                    &backend,
                    &Msg {
                        hdr,
                        body: state.to_vec(),
                        fds: Vec::new(),
                    },
                ) {
                    break;
                }
            }
        }
    }
    let _ = backend.shutdown(std::net::Shutdown::Both);
    if let Ok(t) = back {
        let _ = t.join();
    }
}
