//! A packet source for the host → guest direction through a tap: an AF_PACKET socket bound to
//! the tap (inside the benchmark's network namespace) that sends the same frame over and over
//! with `sendmmsg`, 64 frames per call, bypassing the qdisc. What the tap cannot queue for its
//! reader (netback) the kernel drops and counts in the tap's `tx_dropped`.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Why the source could not start.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The namespace could not be entered.
    #[error("cannot enter network namespace {path}: {err}")]
    Netns {
        /// /run/netns/NAME.
        path: String,
        /// The OS error.
        err: std::io::Error,
    },
    /// The interface does not exist there.
    #[error("no interface {0} in the benchmark's network namespace")]
    NoInterface(String),
    /// A socket call failed.
    #[error("AF_PACKET {op} on {ifname}: {err}")]
    Socket {
        /// The call.
        op: &'static str,
        /// The interface.
        ifname: String,
        /// The OS error.
        err: std::io::Error,
    },
}

/// A 64-frame batch per `sendmmsg`.
const BATCH: usize = 64;

/// An Ethernet + IPv4 + UDP frame of `size` bytes (without FCS; at least 60) to `dst`.
pub fn udp_frame(size: usize, dst: [u8; 6]) -> Vec<u8> {
    let size = size.max(60);
    let mut f = vec![0u8; size];
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip_len = u16::try_from(size - 14).unwrap_or(u16::MAX);
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[8] = 64; // TTL
    ip[9] = 17; // UDP
    ip[12..16].copy_from_slice(&[198, 18, 0, 2]);
    ip[16..20].copy_from_slice(&[198, 18, 0, 1]);
    let mut sum: u32 = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let csum = !u16::try_from(sum).unwrap_or(0);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    let udp = &mut f[34..42];
    udp[0..2].copy_from_slice(&9u16.to_be_bytes());
    udp[2..4].copy_from_slice(&9u16.to_be_bytes());
    udp[4..6].copy_from_slice(&(ip_len - 20).to_be_bytes());
    // UDP checksum 0: none (allowed over IPv4).
    f
}

/// The last OS error of `op` on `ifname`.
fn os(op: &'static str, ifname: &str) -> SourceError {
    SourceError::Socket {
        op,
        ifname: ifname.to_owned(),
        err: std::io::Error::last_os_error(),
    }
}

/// Enters `/run/netns/<netns>` (this thread only), opens the socket and binds it to `ifname`.
pub fn open(netns: &str, ifname: &str) -> Result<OwnedFd, SourceError> {
    let path = format!("/run/netns/{netns}");
    let ns = File::open(&path).map_err(|err| SourceError::Netns {
        path: path.clone(),
        err,
    })?;
    // SAFETY: setns on a namespace file we hold open; it changes only this thread's namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(SourceError::Netns {
            path,
            err: std::io::Error::last_os_error(),
        });
    }
    let name = CString::new(ifname).map_err(|_| SourceError::NoInterface(ifname.into()))?;
    // SAFETY: if_nametoindex reads a NUL-terminated string we own.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(SourceError::NoInterface(ifname.into()));
    }
    // SAFETY: socket(2) with constant arguments; the result is checked below.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(os("socket", ifname));
    }
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: an all-zero sockaddr_ll is valid; the fields that matter are set below.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_ifindex = i32::try_from(index).unwrap_or(0);
    // SAFETY: bind reads a sockaddr_ll of the size given, which we own.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const sll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(os("bind", ifname));
    }
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads one c_int we own.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(os("PACKET_QDISC_BYPASS", ifname));
    }
    Ok(fd)
}

/// Sends `frame` on `fd` until `stop`, adding the frames the kernel accepted to `sent`.
/// Returns the first error other than a full queue.
pub fn send_until(
    fd: &OwnedFd,
    ifname: &str,
    frame: &[u8],
    stop: &Arc<AtomicBool>,
    sent: &Arc<AtomicU64>,
) -> Result<(), SourceError> {
    let mut iov = libc::iovec {
        iov_base: frame.as_ptr().cast_mut().cast(),
        iov_len: frame.len(),
    };
    // SAFETY: an all-zero mmsghdr is valid (no name, no control data).
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    for m in &mut msgs {
        m.msg_hdr.msg_iov = &raw mut iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: sendmmsg reads BATCH headers that point at one iovec and the frame, all of
        // which outlive the call; the kernel only reads the frame.
        let n =
            unsafe { libc::sendmmsg(fd.as_raw_fd(), msgs.as_mut_ptr(), BATCH as libc::c_uint, 0) };
        if n < 0 {
            let e = os("sendmmsg", ifname);
            match &e {
                SourceError::Socket { err, .. }
                    if matches!(
                        err.raw_os_error(),
                        Some(libc::ENOBUFS | libc::EAGAIN | libc::EINTR)
                    ) =>
                {
                    std::thread::yield_now();
                }
                _ => return Err(e),
            }
        } else {
            sent.fetch_add(n.unsigned_abs().into(), Ordering::Relaxed);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_have_the_asked_size_and_a_valid_ip_header() {
        for size in [60, 64, 1500] {
            let f = udp_frame(size, [0x00, 0x16, 0x3e, 0, 0xbe, 0x01]);
            assert_eq!(f.len(), size);
            assert_eq!(&f[0..6], &[0x00, 0x16, 0x3e, 0, 0xbe, 0x01]);
            assert_eq!(
                usize::from(u16::from_be_bytes([f[16], f[17]])),
                size - 14,
                "IPv4 total length"
            );
            // The one's-complement sum over a header with its checksum is 0xffff.
            let mut sum: u32 = f[14..34]
                .chunks(2)
                .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
                .sum();
            while sum > 0xffff {
                sum = (sum & 0xffff) + (sum >> 16);
            }
            assert_eq!(sum, 0xffff, "IPv4 header checksum of a {size}-byte frame");
        }
        assert_eq!(udp_frame(10, [0xff; 6]).len(), 60);
    }

    /// A network namespace for one test, deleted at the end.
    struct Ns(String);
    impl Drop for Ns {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.0])
                .status();
        }
    }

    /// Opens a tap named `name` inside namespace `ns` (from a thread that enters it), as
    /// netback's tap host side will: the reader of what the source sends.
    fn tap_in(ns: &str, name: &str) -> OwnedFd {
        let (ns, name) = (ns.to_owned(), name.to_owned());
        std::thread::spawn(move || {
            let nsf = File::open(format!("/run/netns/{ns}")).expect("namespace file");
            // SAFETY: setns on a namespace file we hold open; this thread only.
            let rc = unsafe { libc::setns(nsf.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            let tun = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")
                .expect("/dev/net/tun (the tun driver) is needed for the tap source test");
            // SAFETY: an all-zero ifreq is valid; name and flags are set below.
            let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
            for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
                *d = s as libc::c_char;
            }
            ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
            const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
            // SAFETY: TUNSETIFF reads and writes the ifreq we own.
            let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &raw mut ifr) };
            assert_eq!(rc, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
            OwnedFd::from(tun)
        })
        .join()
        .expect("tap thread")
    }

    #[test]
    fn the_source_sends_its_frames_into_a_tap_in_a_namespace() {
        let ns = Ns(format!("vback-bench-test-{}", std::process::id()));
        let ip = |args: &[&str]| {
            let out = std::process::Command::new("ip")
                .args(args)
                .output()
                .expect("ip (iproute2) is needed for the tap source test");
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ip(&["netns", "add", &ns.0]);
        let tap = tap_in(&ns.0, "vbtsrc0");
        ip(&["-n", &ns.0, "link", "set", "dev", "vbtsrc0", "up"]);
        let frame = udp_frame(64, [0x00, 0x16, 0x3e, 0, 0xbe, 0x01]);
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (ns2, f2, stop2, sent2) = (ns.0.clone(), frame.clone(), stop.clone(), sent.clone());
        let source = std::thread::spawn(move || {
            let fd = open(&ns2, "vbtsrc0")?;
            send_until(&fd, "vbtsrc0", &f2, &stop2, &sent2)
        });
        // Read frames from the tap until 100 arrived (5 s at most).
        let mut got = 0;
        let mut buf = [0u8; 2048];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut pfd = libc::pollfd {
            fd: tap.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        while got < 100 && std::time::Instant::now() < deadline {
            // SAFETY: poll on one pollfd we own.
            if unsafe { libc::poll(&raw mut pfd, 1, 100) } <= 0 {
                continue;
            }
            // SAFETY: read into a buffer we own, of the length given.
            let n = unsafe { libc::read(tap.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            let n = usize::try_from(n).expect("read from the tap");
            // The kernel may also send its own frames (IPv6 router solicitations): skip them.
            if n == frame.len() && buf[..n] == frame[..] {
                got += 1;
            }
        }
        stop.store(true, Ordering::Relaxed);
        let r = source.join().expect("source thread");
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(got, 100, "frames read back from the tap");
        assert!(sent.load(Ordering::Relaxed) >= 100);
        // Opening on an interface that is not there says which.
        let e = open(&ns.0, "vbtnone0").unwrap_err();
        assert!(e.to_string().contains("vbtnone0"), "{e}");
    }
}
