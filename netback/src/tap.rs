//! The host side: a kernel tap (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, one file per queue pair
//! with `IFF_MULTI_QUEUE`), so the host's own networking stack bridges, routes and NATs the
//! guest's frames, as Xen's netback does with its vif devices.
//!
//! Each queue's file carries frames prefixed by a 12-byte `virtio_net_hdr_v1`: exactly what a
//! VERSION_1 guest puts in front of a transmitted frame, so a transmit chain is written to the
//! tap as it is (no copy in netback), and a received frame is read straight into the guest's
//! buffers.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use thiserror::Error;

const IFF_TAP: u16 = 0x0002;
const IFF_NO_PI: u16 = 0x1000;
const IFF_VNET_HDR: u16 = 0x4000;
const IFF_MULTI_QUEUE: u16 = 0x0100;
const IFF_ATTACH_QUEUE: u16 = 0x0200;
const IFF_DETACH_QUEUE: u16 = 0x0400;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;
const TUNSETCARRIER: libc::c_ulong = 0x4004_54e2;

/// `TUNSETOFFLOAD` bits: what the kernel may hand us (and so the guest) unsegmented.
pub const TUN_F_CSUM: u32 = 0x01;
/// TCPv4 segmentation offload.
pub const TUN_F_TSO4: u32 = 0x02;
/// TCPv6 segmentation offload.
pub const TUN_F_TSO6: u32 = 0x04;
/// TSO with ECN.
pub const TUN_F_TSO_ECN: u32 = 0x08;
/// UDP fragmentation offload.
pub const TUN_F_UFO: u32 = 0x10;

/// The vnet header both sides use (VERSION_1: `virtio_net_hdr_v1`, with `num_buffers`).
pub const VNET_HDR_LEN: i32 = 12;

/// What can go wrong with the tap.
#[derive(Debug, Error)]
pub enum TapError {
    /// `/dev/net/tun` is missing or not accessible.
    #[error(
        "cannot open /dev/net/tun: {0} (netback needs the tun driver and CAP_NET_ADMIN; run it as root or grant the capability)"
    )]
    Open(#[source] io::Error),
    /// `TUNSETIFF` refused.
    #[error(
        "cannot create or attach tap `{name}` (queue {queue}): {source}{hint}",
        hint = tunsetiff_hint(source)
    )]
    Attach {
        /// Interface name.
        name: String,
        /// Queue index.
        queue: usize,
        /// The kernel's error.
        source: io::Error,
    },
    /// Another ioctl failed.
    #[error("tap `{name}`: {what} failed: {source}")]
    Ioctl {
        /// Interface name.
        name: String,
        /// What was being set.
        what: &'static str,
        /// The kernel's error.
        source: io::Error,
    },
}

fn tunsetiff_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EBUSY) => {
            "; the interface exists and is in use (another netback, or a tap without multi-queue)"
        }
        Some(libc::EINVAL) => {
            "; an interface of that name exists with other flags (a tap must match IFF_MULTI_QUEUE, or the name belongs to another kind of device)"
        }
        Some(libc::EPERM) => "; netback needs CAP_NET_ADMIN",
        _ => "",
    }
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: u16,
    _pad: [u8; 22],
}

/// A tap interface with one file per queue.
#[derive(Debug)]
pub struct Tap {
    name: String,
    queues: Vec<File>,
}

impl Tap {
    /// Creates (or attaches to an existing persistent) tap `name` with `queues` queues. With
    /// more than one queue the tap is multi-queue. The files are non-blocking.
    pub fn open(name: &str, queues: usize) -> Result<Tap, TapError> {
        let queues = queues.max(1);
        let mut flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        if queues > 1 {
            flags |= IFF_MULTI_QUEUE;
        }
        let mut files = Vec::with_capacity(queues);
        let mut real_name = name.to_owned();
        for q in 0..queues {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open("/dev/net/tun")
                .map_err(TapError::Open)?;
            let mut req = IfReq {
                name: [0; libc::IFNAMSIZ],
                flags,
                _pad: [0; 22],
            };
            let n = real_name.len().min(libc::IFNAMSIZ - 1);
            req.name[..n].copy_from_slice(&real_name.as_bytes()[..n]);
            // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is (same size
            // and layout: 16 name bytes, then the flags in the union); it lives across the call.
            let r = unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF, &mut req) };
            if r < 0 {
                return Err(TapError::Attach {
                    name: real_name,
                    queue: q,
                    source: io::Error::last_os_error(),
                });
            }
            if q == 0 {
                real_name = CStr::from_bytes_until_nul(&req.name)
                    .map(|c| c.to_string_lossy().into_owned())
                    .unwrap_or(real_name);
            }
            let tap = Tap {
                name: real_name.clone(),
                queues: Vec::new(),
            };
            tap.ioctl_int(
                &f,
                TUNSETVNETHDRSZ,
                VNET_HDR_LEN,
                "setting the vnet header size",
            )?;
            files.push(f);
        }
        Ok(Tap {
            name: real_name,
            queues: files,
        })
    }

    fn ioctl_int(
        &self,
        f: &File,
        req: libc::c_ulong,
        val: i32,
        what: &'static str,
    ) -> Result<(), TapError> {
        let v: libc::c_int = val;
        // SAFETY: these tun ioctls read one int through the pointer, which points at `v`.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), req, &v) };
        if r < 0 {
            return Err(TapError::Ioctl {
                name: self.name.clone(),
                what,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// The interface's name (as the kernel gave it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of queues.
    pub fn queues(&self) -> usize {
        self.queues.len()
    }

    /// The file of queue `q`.
    pub fn queue_fd(&self, q: usize) -> Option<RawFd> {
        self.queues.get(q).map(AsRawFd::as_raw_fd)
    }

    /// Tells the kernel which offloads the guest accepts (`TUN_F_*`): frames the host sends the
    /// guest may then be unsegmented and carry partial checksums.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        let Some(f) = self.queues.first() else {
            return Ok(());
        };
        // TUNSETOFFLOAD takes the flags as the argument value itself, not a pointer.
        // SAFETY: an integer argument; no memory is passed.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), TUNSETOFFLOAD, libc::c_ulong::from(flags)) };
        if r < 0 {
            return Err(TapError::Ioctl {
                name: self.name.clone(),
                what: "setting the offloads",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Sets the link's carrier (up while a guest driver is running).
    pub fn set_carrier(&self, up: bool) -> Result<(), TapError> {
        let Some(f) = self.queues.first() else {
            return Ok(());
        };
        self.ioctl_int(f, TUNSETCARRIER, i32::from(up), "setting the carrier")
    }

    /// Attaches queue `q` to the interface, or detaches it so the kernel stops steering frames
    /// to a queue the guest does not use.
    pub fn set_queue_attached(&self, q: usize, attached: bool) -> Result<(), TapError> {
        if self.queues.len() < 2 {
            return Ok(());
        }
        let Some(f) = self.queues.get(q) else {
            return Ok(());
        };
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: if attached {
                IFF_ATTACH_QUEUE
            } else {
                IFF_DETACH_QUEUE
            },
            _pad: [0; 22],
        };
        // SAFETY: TUNSETQUEUE reads one `struct ifreq` (only its flags), `req` lives across it.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), TUNSETQUEUE, &mut req) };
        if r < 0 {
            let e = io::Error::last_os_error();
            // Attaching an attached queue (or detaching a detached one) is EINVAL: not an error.
            if e.raw_os_error() == Some(libc::EINVAL) {
                return Ok(());
            }
            return Err(TapError::Ioctl {
                name: self.name.clone(),
                what: if attached {
                    "attaching a queue"
                } else {
                    "detaching a queue"
                },
                source: e,
            });
        }
        Ok(())
    }
}

/// Brings the interface up or down with `SIOCSIFFLAGS` (the scripts normally do this; netback
/// uses it to take the port down when a script fails).
pub fn set_link_up(name: &str, up: bool) -> io::Result<()> {
    // SAFETY: a plain socket(2) call; the result is checked and owned below.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `s` is a fresh descriptor nobody else owns.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(s) };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: 0,
        _pad: [0; 22],
    };
    let n = name.len().min(libc::IFNAMSIZ - 1);
    req.name[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: SIOCGIFFLAGS fills the flags of the `struct ifreq` that `req` is.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let up_flag = libc::IFF_UP as u16;
    if up {
        req.flags |= up_flag;
    } else {
        req.flags &= !up_flag;
    }
    // SAFETY: SIOCSIFFLAGS reads the `struct ifreq` that `req` is.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Maps the guest's acked receive features to `TUN_F_*` offload flags.
pub fn offload_flags(acked: u64) -> u32 {
    use virtio_bindings::virtio_net::{
        VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO,
    };
    let has = |b: u32| acked & (1 << b) != 0;
    let mut f = 0;
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        f |= TUN_F_CSUM;
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            f |= TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            f |= TUN_F_TSO6;
        }
        if has(VIRTIO_NET_F_GUEST_ECN) && f & (TUN_F_TSO4 | TUN_F_TSO6) != 0 {
            f |= TUN_F_TSO_ECN;
        }
        if has(VIRTIO_NET_F_GUEST_UFO) {
            f |= TUN_F_UFO;
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_net::*;

    #[test]
    fn offloads_follow_the_guest_and_need_checksum_offload() {
        assert_eq!(offload_flags(0), 0);
        assert_eq!(
            offload_flags(1 << VIRTIO_NET_F_GUEST_TSO4),
            0,
            "TSO without checksum offload is meaningless"
        );
        let all = (1 << VIRTIO_NET_F_GUEST_CSUM)
            | (1 << VIRTIO_NET_F_GUEST_TSO4)
            | (1 << VIRTIO_NET_F_GUEST_TSO6)
            | (1 << VIRTIO_NET_F_GUEST_ECN)
            | (1 << VIRTIO_NET_F_GUEST_UFO);
        assert_eq!(
            offload_flags(all),
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO
        );
    }

    #[test]
    fn a_bad_name_is_an_error_naming_it() {
        // An over-long name is cut by the kernel ABI; a name with a slash is refused by the
        // kernel (EINVAL), and the error says which interface.
        match Tap::open("bad/name", 1) {
            Err(e) => assert!(e.to_string().contains("bad/name"), "{e}"),
            Ok(_) => panic!("a tap named bad/name was created"),
        }
    }
}
