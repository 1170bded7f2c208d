//! vhost-user messages on the socket: reading a request with the descriptors that came with
//! it, writing a reply, naming and describing messages for the debug log.
//!
//! A message is a 12-byte header (request code, flags, body size; little-endian, as on every
//! host vback runs on) followed by the body. Descriptors travel as SCM_RIGHTS with the first
//! bytes of a message; they are received close-on-exec (MSG_CMSG_CLOEXEC), so that no guest
//! memory or eventfd reaches a child process such as netback's hotplug script.

use std::io::{self, Read, Write};
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// The size of a message header.
pub const HDR_LEN: usize = 12;
/// The largest body a request may have (that of the vhost crate, and of QEMU's
/// `VHOST_USER_PAYLOAD_SIZE` plus room: a memory table of 8 regions is 264 bytes).
pub const MAX_BODY: usize = 0x1000;
/// The most descriptors one message may carry (a memory table of 32 regions).
pub const MAX_FDS: usize = 32;

/// Header flag: the version bits.
pub const VERSION_MASK: u32 = 0x3;
/// Header flag: this is a reply.
pub const FLAG_REPLY: u32 = 0x4;
/// Header flag: the sender wants a reply (REPLY_ACK).
pub const FLAG_NEED_REPLY: u32 = 0x8;

/// Front-end request codes (the vhost-user specification's numbering).
#[allow(missing_docs)]
pub mod req {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const RESET_OWNER: u32 = 4;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_LOG_BASE: u32 = 6;
    pub const SET_LOG_FD: u32 = 7;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const SET_VRING_ERR: u32 = 14;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const SET_BACKEND_REQ_FD: u32 = 21;
    pub const GET_CONFIG: u32 = 24;
    pub const SET_CONFIG: u32 = 25;
    pub const GET_INFLIGHT_FD: u32 = 31;
    pub const SET_INFLIGHT_FD: u32 = 32;
    pub const RESET_DEVICE: u32 = 34;
    pub const GET_MAX_MEM_SLOTS: u32 = 36;
    pub const ADD_MEM_REG: u32 = 37;
    pub const REM_MEM_REG: u32 = 38;
}

/// Back-end request codes (messages the back end sends on the back-end request channel).
pub mod backend_req {
    /// VHOST_USER_BACKEND_CONFIG_CHANGE_MSG: the device configuration changed.
    pub const CONFIG_CHANGE_MSG: u32 = 2;
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

/// One request from the front end: header, body, and the descriptors that came with it.
#[derive(Debug)]
pub struct Message {
    /// The request code.
    pub request: u32,
    /// The header flags.
    pub flags: u32,
    /// The body.
    pub body: Vec<u8>,
    /// The descriptors (closed when the message is dropped, unless taken).
    pub fds: Vec<OwnedFd>,
}

/// What is wrong with what came from the socket.
#[derive(Debug)]
pub enum RecvError {
    /// The front end closed the connection at a message boundary.
    Closed,
    /// It closed it in the middle of a message (`got` of `want` bytes of the message).
    Truncated {
        /// Bytes received.
        got: usize,
        /// Bytes the message needed.
        want: usize,
    },
    /// The header announces a body larger than any request has.
    TooLarge {
        /// The request code.
        request: u32,
        /// The announced size.
        size: u32,
    },
    /// The message came with more descriptors than any request carries.
    TooManyFds,
    /// Reading failed.
    Io(io::Error),
}

impl Message {
    /// Whether the front end asked for a reply (meaningful once REPLY_ACK is negotiated).
    pub fn need_reply(&self) -> bool {
        self.flags & FLAG_NEED_REPLY != 0
    }

    /// The name of the request.
    pub fn name(&self) -> &'static str {
        request_name(self.request)
    }

    /// Reads one message. Blocks until a whole message is there or the front end hangs up.
    pub fn recv(sock: &UnixStream) -> Result<Message, RecvError> {
        let mut hdr = [0u8; HDR_LEN];
        let (n, fds, truncated) = recv_with_fds(sock, &mut hdr).map_err(RecvError::Io)?;
        if n == 0 {
            return Err(RecvError::Closed);
        }
        if truncated {
            return Err(RecvError::TooManyFds);
        }
        read_rest(sock, &mut hdr[n..], n, HDR_LEN)?;
        let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
        let (request, flags, size) = (word(0), word(4), word(8));
        if size as usize > MAX_BODY {
            return Err(RecvError::TooLarge { request, size });
        }
        let mut body = vec![0u8; size as usize];
        read_rest(sock, &mut body, HDR_LEN, HDR_LEN + size as usize)?;
        Ok(Message {
            request,
            flags,
            body,
            fds,
        })
    }

    /// One line describing the message: its name, ring and key values.
    pub fn describe(&self) -> String {
        describe(self.request, &self.body, self.fds.len())
    }
}

/// Reads `buf.len()` more bytes of a message of `want` bytes of which `got` came already.
fn read_rest(
    mut sock: &UnixStream,
    buf: &mut [u8],
    got: usize,
    want: usize,
) -> Result<(), RecvError> {
    let mut done = 0;
    while done < buf.len() {
        match sock.read(&mut buf[done..]) {
            Ok(0) => {
                return Err(RecvError::Truncated {
                    got: got + done,
                    want,
                });
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(RecvError::Io(e)),
        }
    }
    Ok(())
}

/// An 8-byte-aligned buffer for the control message of up to [`MAX_FDS`] descriptors.
#[repr(C, align(8))]
struct CmsgBuf([u8; CMSG_SPACE]);

/// CMSG_SPACE(MAX_FDS * sizeof(int)) on Linux: a 16-byte `cmsghdr` and the descriptors,
/// rounded up to 8 bytes.
const CMSG_SPACE: usize =
    size_of::<libc::cmsghdr>() + (MAX_FDS * size_of::<RawFd>()).next_multiple_of(8);

/// recvmsg(2) into `buf` with MSG_CMSG_CLOEXEC: the bytes read, the descriptors received (owned
/// at once, so every one is closed even if the message is refused), and whether the kernel had
/// to drop descriptors that did not fit (MSG_CTRUNC).
fn recv_with_fds(sock: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>, bool)> {
    let mut cmsg = CmsgBuf([0; CMSG_SPACE]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid value (null pointers, zero lengths).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.0.as_mut_ptr().cast();
    msg.msg_controllen = CMSG_SPACE;
    let n = loop {
        // SAFETY: `msg` points at one iovec covering `buf` (valid and writable for its length)
        // and at `cmsg` (valid, writable and 8-byte aligned for `msg_controllen` bytes); all
        // three outlive the call, and recvmsg(2) writes only within them and into `msg`.
        let r = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if r >= 0 {
            break r as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: `msg` was filled in by recvmsg(2): CMSG_FIRSTHDR reads only its control fields.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !c.is_null() {
        // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR return null or a header lying wholly inside the
        // control buffer the kernel filled in (`msg_controllen` was updated to its length).
        let hdr = unsafe { std::ptr::read_unaligned(c) };
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN only computes a length.
            let data_len =
                (hdr.cmsg_len as usize).saturating_sub(unsafe { libc::CMSG_LEN(0) } as usize);
            // SAFETY: the data of this header lies inside the control buffer (the kernel wrote
            // `cmsg_len` bytes from the header's start).
            let data = unsafe { libc::CMSG_DATA(c) };
            // SAFETY: those `data_len` bytes lie inside `cmsg`, which lives (and is not written)
            // while the slice is used; u8 has no alignment requirement.
            let data = unsafe { std::slice::from_raw_parts(data, data_len) };
            for raw in data.chunks_exact(size_of::<RawFd>()) {
                let fd = RawFd::from_ne_bytes([raw[0], raw[1], raw[2], raw[3]]);
                // SAFETY: SCM_RIGHTS handed this process a new descriptor that nothing else
                // owns; owning it here closes it whatever becomes of the message.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        // SAFETY: `c` is a valid header inside `msg`'s control buffer (see above).
        c = unsafe { libc::CMSG_NXTHDR(&msg, c) };
    }
    Ok((n, fds, msg.msg_flags & libc::MSG_CTRUNC != 0))
}

/// Writes a reply to `request` with `body`.
pub fn send_reply(mut sock: &UnixStream, request: u32, body: &[u8]) -> io::Result<()> {
    if log::log_enabled!(log::Level::Debug) {
        log::debug!("vhost-user reply {}", describe(request, body, 0));
    }
    sock.write_all(&encode(request, 1 | FLAG_REPLY, body))
}

/// Writes a reply to `request` with `body` and one descriptor (SCM_RIGHTS with its first
/// bytes).
pub fn send_reply_with_fd(
    sock: &UnixStream,
    request: u32,
    body: &[u8],
    fd: &impl AsRawFd,
) -> io::Result<()> {
    if log::log_enabled!(log::Level::Debug) {
        log::debug!("vhost-user reply {}", describe(request, body, 1));
    }
    let data = encode(request, 1 | FLAG_REPLY, body);
    let mut cmsg = CmsgBuf([0; CMSG_SPACE]);
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is a valid value (null pointers, zero lengths).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.0.as_mut_ptr().cast();
    // SAFETY: CMSG_LEN only computes a length.
    let data_at = unsafe { libc::CMSG_LEN(0) } as usize;
    // SAFETY: CMSG_SPACE only computes a length.
    let space = unsafe { libc::CMSG_SPACE(size_of::<RawFd>() as u32) } as usize;
    let hdr = libc::cmsghdr {
        cmsg_len: data_at + size_of::<RawFd>(),
        cmsg_level: libc::SOL_SOCKET,
        cmsg_type: libc::SCM_RIGHTS,
    };
    // SAFETY: `cmsg` is CMSG_SPACE-sized for MAX_FDS descriptors, larger than one header;
    // write_unaligned has no alignment requirement.
    unsafe { std::ptr::write_unaligned(cmsg.0.as_mut_ptr().cast::<libc::cmsghdr>(), hdr) };
    cmsg.0[data_at..data_at + size_of::<RawFd>()].copy_from_slice(&fd.as_raw_fd().to_ne_bytes());
    msg.msg_controllen = space;
    // SAFETY: `msg` points at one iovec over `data` (read only by the kernel) and at `cmsg`,
    // both alive for the call; `fd` is open (borrowed for the call).
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    if n < data.len() {
        // The descriptor went with the first bytes; the rest as a plain write.
        let mut s = sock;
        s.write_all(&data[n..])?;
    }
    Ok(())
}

/// Writes the REPLY_ACK answer to `request`: success, or failure.
pub fn send_ack(mut sock: &UnixStream, request: u32, ok: bool) -> io::Result<()> {
    log::debug!(
        "vhost-user reply {} {} (REPLY_ACK)",
        request_name(request),
        if ok { "done" } else { "refused" }
    );
    let code = if ok { 0u64 } else { 1 };
    sock.write_all(&encode(request, 1 | FLAG_REPLY, &code.to_le_bytes()))
}

/// A message: header and body.
pub fn encode(request: u32, flags: u32, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(HDR_LEN + body.len());
    m.extend_from_slice(&request.to_le_bytes());
    m.extend_from_slice(&flags.to_le_bytes());
    m.extend_from_slice(&(body.len() as u32).to_le_bytes());
    m.extend_from_slice(body);
    m
}

/// A little-endian u32 at `at` in `b`, if there.
pub fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    let x = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([x[0], x[1], x[2], x[3]]))
}

/// A little-endian u64 at `at` in `b`, if there.
pub fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    let x = b.get(at..at.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(x);
    Some(u64::from_le_bytes(a))
}

/// One line describing a message (request or reply): its name, ring and key values.
pub fn describe(request: u32, b: &[u8], fds: usize) -> String {
    let detail = match request {
        // A u64: features, protocol features, queue count, memory slots.
        req::GET_FEATURES
        | req::SET_FEATURES
        | req::GET_PROTOCOL_FEATURES
        | req::SET_PROTOCOL_FEATURES
        | req::GET_QUEUE_NUM
        | req::GET_MAX_MEM_SLOTS
        | 39
        | 40 => u64_at(b, 0).map(|v| format!(" {v:#x}")),
        // A vring state: index and number.
        req::SET_VRING_NUM | req::SET_VRING_BASE | req::GET_VRING_BASE | req::SET_VRING_ENABLE => {
            match (u32_at(b, 0), u32_at(b, 4)) {
                (Some(i), Some(n)) => Some(format!(" ring {i} num {n}")),
                _ => None,
            }
        }
        // A vring address.
        req::SET_VRING_ADDR => match (u32_at(b, 0), u64_at(b, 8), u64_at(b, 16), u64_at(b, 24)) {
            (Some(i), Some(d), Some(u), Some(a)) => {
                Some(format!(" ring {i} desc {d:#x} used {u:#x} avail {a:#x}"))
            }
            _ => None,
        },
        // A vring file: index, and bit 8 for "no fd".
        req::SET_VRING_KICK..=req::SET_VRING_ERR => u64_at(b, 0).map(|v| {
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
        req::SET_MEM_TABLE => u32_at(b, 0).map(|n| {
            let regions: Vec<String> = (0..n.min(8) as usize)
                .filter_map(|r| {
                    let at = 8 + 32 * r;
                    Some(format!("{:#x}+{:#x}", u64_at(b, at)?, u64_at(b, at + 8)?))
                })
                .collect();
            format!(" {n} regions [{}]", regions.join(", "))
        }),
        // One region (after 8 bytes of padding).
        req::ADD_MEM_REG | req::REM_MEM_REG => match (u64_at(b, 8), u64_at(b, 16)) {
            (Some(gpa), Some(size)) => Some(format!(" {gpa:#x}+{size:#x}")),
            _ => None,
        },
        req::GET_CONFIG | req::SET_CONFIG => match (u32_at(b, 0), u32_at(b, 4)) {
            (Some(off), Some(size)) => Some(format!(" offset {off} size {size}")),
            _ => None,
        },
        _ => None,
    };
    format!(
        "{}{} ({} bytes, {} fds)",
        request_name(request),
        detail.unwrap_or_default(),
        b.len(),
        fds
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_described_with_their_key_values() {
        let body = [3u32.to_le_bytes(), 256u32.to_le_bytes()].concat();
        assert_eq!(
            describe(req::SET_VRING_NUM, &body, 0),
            "SET_VRING_NUM ring 3 num 256 (8 bytes, 0 fds)"
        );
        let mut table = vec![0u8; 8 + 32];
        table[0] = 1;
        table[16..24].copy_from_slice(&0x10_0000u64.to_le_bytes());
        assert_eq!(
            describe(req::SET_MEM_TABLE, &table, 1),
            "SET_MEM_TABLE 1 regions [0x0+0x100000] (40 bytes, 1 fds)"
        );
        assert_eq!(
            describe(req::SET_VRING_CALL, &0x101u64.to_le_bytes(), 0),
            "SET_VRING_CALL ring 1 (no fd: polling) (8 bytes, 0 fds)"
        );
        // A body too short for its values is named without them.
        assert_eq!(
            describe(req::SET_VRING_ADDR, &[0; 4], 0),
            "SET_VRING_ADDR (4 bytes, 0 fds)"
        );
        assert_eq!(request_name(req::SET_MEM_TABLE), "SET_MEM_TABLE");
        assert_eq!(request_name(999), "UNKNOWN");
    }

    fn send_fds(s: &UnixStream, data: &[u8], fds: &[RawFd]) {
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        s.send_with_fds(&[data], fds).unwrap();
    }

    fn cloexec(fd: &OwnedFd) -> bool {
        // SAFETY: F_GETFD only reads the flags of a descriptor we own.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
        flags & libc::FD_CLOEXEC != 0
    }

    #[test]
    fn a_message_and_its_descriptors_are_received_close_on_exec() {
        let (a, b) = UnixStream::pair().unwrap();
        let efd = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        let msg = encode(req::SET_VRING_CALL, 1, &1u64.to_le_bytes());
        send_fds(&a, &msg, &[efd.as_raw_fd()]);
        let m = Message::recv(&b).unwrap();
        assert_eq!(
            (m.request, m.flags, m.body.len()),
            (req::SET_VRING_CALL, 1, 8)
        );
        assert_eq!(m.fds.len(), 1);
        assert!(cloexec(&m.fds[0]), "a received descriptor is close-on-exec");

        // A header in two pieces, a body in three.
        let msg = encode(req::SET_VRING_NUM, 1, &[1, 0, 0, 0, 64, 0, 0, 0]);
        (&a).write_all(&msg[..5]).unwrap();
        let t = std::thread::spawn(move || {
            for part in [&msg[5..13], &msg[13..15], &msg[15..]] {
                std::thread::sleep(std::time::Duration::from_millis(20));
                (&a).write_all(part).unwrap();
            }
            a
        });
        let m = Message::recv(&b).unwrap();
        assert_eq!(m.describe(), "SET_VRING_NUM ring 1 num 64 (8 bytes, 0 fds)");
        let a = t.join().unwrap();

        // Too large a body is refused before it is read; a hang-up mid-message is told from
        // one between messages.
        (&a).write_all(&encode(req::SET_MEM_TABLE, 1, &[])[..8])
            .unwrap();
        (&a).write_all(&0x7fff_ffffu32.to_le_bytes()).unwrap();
        assert!(matches!(
            Message::recv(&b),
            Err(RecvError::TooLarge {
                size: 0x7fff_ffff,
                ..
            })
        ));
        (&a).write_all(&[1, 0, 0]).unwrap();
        drop(a);
        assert!(matches!(
            Message::recv(&b),
            Err(RecvError::Truncated { got: 3, want: 12 })
        ));
        assert!(matches!(Message::recv(&b), Err(RecvError::Closed)));
    }

    #[test]
    fn more_descriptors_than_any_request_carries_are_refused_and_closed() {
        let (a, b) = UnixStream::pair().unwrap();
        let efd = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        let many = vec![efd.as_raw_fd(); MAX_FDS + 4];
        send_fds(&a, &encode(req::SET_MEM_TABLE, 1, &[]), &many);
        assert!(matches!(Message::recv(&b), Err(RecvError::TooManyFds)));
    }
}
