//! The virtio-net frame formats, transport-free: checking a guest's transmit chain (a
//! `virtio_net_hdr` then the frame) and writing a received frame into a receive chain.
//! Malformed frames are reported with a reason and dropped by the caller, never trusted.

use vback_common::ring::{HostMap, iov_read, iov_write};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP, VIRTIO_NET_HDR_GSO_UDP_L4,
};
use virtio_queue::desc::split::Descriptor;

/// `virtio_net_hdr_v1` (VERSION_1: always with `num_buffers`).
pub const HDR_LEN: u64 = 12;
/// The shortest frame: an Ethernet header.
pub const MIN_FRAME: u64 = 14;
/// The longest frame: 64 KiB of GSO payload plus headers.
pub const MAX_FRAME: u64 = 65_550;

/// A transmit frame that passed the checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxFrame {
    /// Frame length without the virtio header.
    pub len: u64,
    /// GSO type (0: none).
    pub gso_type: u8,
}

/// Checks a transmit chain (the descriptors `ring::SplitRing::pop` took) and collects its
/// host ranges, header included, into `iov` (at most `max`). `gso_allowed` says whether the
/// driver negotiated host TSO.
pub fn tx_frame(
    map: &HostMap<'_>,
    descs: &[Descriptor],
    gso_allowed: bool,
    iov: &mut Vec<libc::iovec>,
    max: usize,
) -> Result<TxFrame, &'static str> {
    iov.clear();
    let readable = map.iovecs(descs, false, iov, max)?;
    if readable < HDR_LEN + MIN_FRAME {
        return Err("shorter than a virtio-net header and an Ethernet header");
    }
    let mut h = [0u8; HDR_LEN as usize];
    // SAFETY: `map.iovecs` made the iovecs from guest memory that `map` borrows (mapped).
    if !unsafe { iov_read(iov, 0, &mut h) } {
        return Err("the virtio-net header is unreadable");
    }
    check_header(&h, readable, gso_allowed)
}

/// Checks a transmit frame's `virtio_net_hdr_v1` `h`; `readable` is the chain's length with the
/// header. `gso_allowed` says whether the driver negotiated host TSO.
pub fn check_header(
    h: &[u8; HDR_LEN as usize],
    readable: u64,
    gso_allowed: bool,
) -> Result<TxFrame, &'static str> {
    if readable < HDR_LEN + MIN_FRAME {
        return Err("shorter than a virtio-net header and an Ethernet header");
    }
    let len = readable - HDR_LEN;
    if len > MAX_FRAME {
        return Err("longer than 64 KiB plus headers");
    }
    let (flags, gso_type) = (h[0], h[1]);
    let gso_size = u16::from_le_bytes([h[4], h[5]]);
    let csum_start = u64::from(u16::from_le_bytes([h[6], h[7]]));
    let csum_offset = u64::from(u16::from_le_bytes([h[8], h[9]]));
    if u32::from(flags) & !0x7 != 0 {
        return Err("unknown virtio-net header flags");
    }
    let gso = u32::from(gso_type & !0x80); // ECN bit aside
    if ![
        VIRTIO_NET_HDR_GSO_NONE,
        VIRTIO_NET_HDR_GSO_TCPV4,
        VIRTIO_NET_HDR_GSO_UDP,
        VIRTIO_NET_HDR_GSO_TCPV6,
        VIRTIO_NET_HDR_GSO_UDP_L4,
    ]
    .contains(&gso)
    {
        return Err("unknown GSO type");
    }
    if gso != VIRTIO_NET_HDR_GSO_NONE {
        if !gso_allowed {
            return Err("a GSO frame without negotiated segmentation offload");
        }
        if gso_size == 0 {
            return Err("GSO size 0");
        }
    }
    if u32::from(flags) & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 && csum_start + csum_offset + 2 > len {
        return Err("the checksum offsets lie past the frame");
    }
    Ok(TxFrame { len, gso_type })
}

/// Writes `frame` into a receive chain with a header saying one buffer, no offloads. Returns
/// the used length, or `None` if the chain cannot hold it (the frame is then dropped). `iov` is
/// scratch space.
pub fn fill_rx(
    map: &HostMap<'_>,
    descs: &[Descriptor],
    frame: &[u8],
    iov: &mut Vec<libc::iovec>,
) -> Option<u32> {
    let need = HDR_LEN + frame.len() as u64;
    let mut hdr = [0u8; HDR_LEN as usize];
    hdr[10] = 1; // num_buffers
    // Usually one writable buffer holds it all: two copies, no walk.
    if let Some(d) = descs.first()
        && d.is_write_only()
        && u64::from(d.len()) >= need
    {
        let at = d.addr().0;
        if !map.write(at, &hdr) || !map.write(at + HDR_LEN, frame) {
            return None;
        }
        return u32::try_from(need).ok();
    }
    iov.clear();
    let room = map.iovecs(descs, true, iov, 1024).ok()?;
    if room < need {
        return None;
    }
    // SAFETY: `map.iovecs` made the iovecs from writable guest memory that `map` borrows.
    let hdr_ok = unsafe { iov_write(iov, 0, &hdr) };
    // SAFETY: as above.
    if !hdr_ok || !unsafe { iov_write(iov, HDR_LEN as usize, frame) } {
        return None;
    }
    u32::try_from(need).ok()
}

/// The frame the null host side sends the guest: a broadcast of `len` bytes (at least 60, at
/// most 1514) with a local experimental EtherType, which the guest's stack counts and ignores.
pub fn null_frame(len: usize) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f.extend_from_slice(&[0x88, 0xb5]);
    let text = b"vback netback null host side; counted and dropped. ";
    let len = len.clamp(60, 1514);
    while f.len() < len {
        let n = (len - f.len()).min(text.len());
        f.extend_from_slice(&text[..n]);
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    fn tx(m: &GuestMemoryMmap<()>, d: &[Descriptor], gso: bool) -> Result<TxFrame, &'static str> {
        tx_frame(&HostMap::new(m), d, gso, &mut Vec::new(), 64)
    }

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn hdr(m: &GuestMemoryMmap<()>, flags: u8, gso: u8, gso_size: u16, cs: u16, co: u16) {
        let mut h = [0u8; 12];
        h[0] = flags;
        h[1] = gso;
        h[4..6].copy_from_slice(&gso_size.to_le_bytes());
        h[6..8].copy_from_slice(&cs.to_le_bytes());
        h[8..10].copy_from_slice(&co.to_le_bytes());
        m.write_slice(&h, GuestAddress(0x1000)).unwrap();
    }

    #[test]
    fn transmit_checks() {
        let m = mem();
        let ok = vec![
            Descriptor::new(0x1000, 12, 0, 0),
            Descriptor::new(0x2000, 60, 0, 0),
        ];
        hdr(&m, 0, 0, 0, 0, 0);
        assert_eq!(
            tx(&m, &ok, false),
            Ok(TxFrame {
                len: 60,
                gso_type: 0
            })
        );
        for (what, (f, g, s, cs, co), gso_ok, want) in [
            ("GSO size 0", (0, 1, 0, 0, 0), true, "GSO size 0"),
            (
                "GSO not negotiated",
                (0, 1, 1400, 0, 0),
                false,
                "without negotiated",
            ),
            ("unknown GSO", (0, 9, 1400, 0, 0), true, "unknown GSO type"),
            (
                "bad flags",
                (0x40, 0, 0, 0, 0),
                true,
                "unknown virtio-net header flags",
            ),
            (
                "checksum past the frame",
                (1, 0, 0, 50, 20),
                true,
                "past the frame",
            ),
        ] {
            hdr(&m, f, g, s, cs, co);
            let e = tx(&m, &ok, gso_ok).unwrap_err();
            assert!(e.contains(want), "{what}: {e}");
        }
        hdr(&m, 0, 0, 0, 0, 0);
        let short = vec![
            Descriptor::new(0x1000, 12, 0, 0),
            Descriptor::new(0x2000, 10, 0, 0),
        ];
        assert!(tx(&m, &short, false).is_err());
        let outside = vec![
            Descriptor::new(0x1000, 12, 0, 0),
            Descriptor::new(0xff00, 0x200, 0, 0),
        ];
        assert!(tx(&m, &outside, false).unwrap_err().contains("outside"));
        let writable = vec![
            Descriptor::new(0x1000, 12, 0, 0),
            Descriptor::new(0x2000, 60, 2, 0),
        ];
        assert!(tx(&m, &writable, false).is_err());
        let huge = vec![
            Descriptor::new(0x1000, 12, 0, 0),
            Descriptor::new(0x0, 0xffff, 0, 0),
            Descriptor::new(0x0, 0x100, 0, 0),
        ];
        assert!(tx(&m, &huge, true).unwrap_err().contains("longer"));
    }

    #[test]
    fn receive_fill() {
        let m = mem();
        let f = null_frame(70);
        assert_eq!(f.len(), 70);
        assert_eq!(null_frame(10).len(), 60);
        let d = vec![Descriptor::new(0x3000, 1526, 2, 0)];
        assert_eq!(
            fill_rx(&HostMap::new(&m), &d, &f, &mut Vec::new()),
            Some(12 + f.len() as u32)
        );
        assert_eq!(m.read_obj::<u16>(GuestAddress(0x3000 + 10)).unwrap(), 1);
        let small = vec![Descriptor::new(0x3000, 20, 2, 0)];
        assert_eq!(
            fill_rx(&HostMap::new(&m), &small, &f, &mut Vec::new()),
            None
        );
    }
}
