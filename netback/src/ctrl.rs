//! The control virtqueue (`VIRTIO_NET_F_CTRL_VQ`), transport-free: a request is a 2-byte
//! `{class, command}` header, the command's data, and one device-writable ack byte.
//!
//! Most front ends (QEMU, DPDK's virtio-user) serve the control queue themselves and only tell
//! the backend which queue pairs to enable; a minimal VMM that passes every queue through (as
//! vmm-min does) hands it to netback, which answers here.

use vback_common::chain::{read_stream, write_stream};
use virtio_queue::desc::split::Descriptor;
use vm_memory::GuestMemoryBackend;

/// `VIRTIO_NET_OK`.
pub const ACK_OK: u8 = 0;
/// `VIRTIO_NET_ERR`.
pub const ACK_ERR: u8 = 1;

const CLASS_RX: u8 = 0;
const CLASS_MAC: u8 = 1;
const CLASS_VLAN: u8 = 2;
const CLASS_ANNOUNCE: u8 = 3;
const CLASS_MQ: u8 = 4;
const CLASS_GUEST_OFFLOADS: u8 = 5;

/// A decoded control command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`: use this many queue pairs.
    QueuePairs(u16),
    /// `VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET`: the receive offloads the guest wants now.
    GuestOffloads(u64),
    /// Receive filtering (promiscuous, all-multicast, MAC tables, VLANs) and announcement acks:
    /// the tap delivers everything the host stack sends it, so these are acknowledged and have
    /// no effect.
    Accepted,
}

/// Why a control request is refused (the ack is `VIRTIO_NET_ERR`, or the chain is returned
/// unanswered when it has no room for an ack).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtrlError {
    /// Too short, or unreadable.
    Malformed(&'static str),
    /// A class/command netback does not implement.
    Unsupported(u8, u8),
}

/// Parses a control request.
pub fn parse<M, I>(mem: &M, descs: I) -> Result<Command, CtrlError>
where
    M: GuestMemoryBackend,
    I: Iterator<Item = Descriptor> + Clone,
{
    let readable: u64 = descs
        .clone()
        .filter(|d| !d.is_write_only())
        .map(|d| u64::from(d.len()))
        .sum();
    let mut hdr = [0u8; 2];
    if readable < 2 || !read_stream(mem, descs.clone(), 0, &mut hdr) {
        return Err(CtrlError::Malformed("no readable class and command"));
    }
    let (class, cmd) = (hdr[0], hdr[1]);
    match (class, cmd) {
        (CLASS_MQ, 0) => {
            let mut b = [0u8; 2];
            if !read_stream(mem, descs, 2, &mut b) {
                return Err(CtrlError::Malformed("VQ_PAIRS_SET without a pair count"));
            }
            Ok(Command::QueuePairs(u16::from_le_bytes(b)))
        }
        (CLASS_GUEST_OFFLOADS, 0) => {
            let mut b = [0u8; 8];
            if !read_stream(mem, descs, 2, &mut b) {
                return Err(CtrlError::Malformed("GUEST_OFFLOADS_SET without offloads"));
            }
            Ok(Command::GuestOffloads(u64::from_le_bytes(b)))
        }
        (CLASS_RX, 0..=5) | (CLASS_MAC, 0..=1) | (CLASS_VLAN, 0..=1) | (CLASS_ANNOUNCE, 0) => {
            Ok(Command::Accepted)
        }
        _ => Err(CtrlError::Unsupported(class, cmd)),
    }
}

/// Writes the ack byte into the last device-writable byte of the chain. Returns the used length,
/// or `None` when the chain has nowhere to put it.
pub fn ack<M, I>(mem: &M, descs: I, status: u8) -> Option<u32>
where
    M: GuestMemoryBackend,
    I: Iterator<Item = Descriptor> + Clone,
{
    let room: u64 = descs
        .clone()
        .filter(Descriptor::is_write_only)
        .map(|d| u64::from(d.len()))
        .sum();
    if room == 0 {
        return None;
    }
    write_stream(mem, descs, room - 1, &[status]).then_some(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    const W: u16 = 2; // VRING_DESC_F_WRITE

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    #[test]
    fn commands_decode() {
        let m = mem();
        m.write_slice(&[4, 0, 3, 0], GuestAddress(0x1000)).unwrap();
        let chain = vec![
            Descriptor::new(0x1000, 2, 0, 0),
            Descriptor::new(0x1002, 2, 0, 0),
            Descriptor::new(0x2000, 1, W, 0),
        ];
        assert_eq!(
            parse(&m, chain.clone().into_iter()),
            Ok(Command::QueuePairs(3))
        );
        assert_eq!(ack(&m, chain.into_iter(), ACK_OK), Some(1));
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x2000)).unwrap(), ACK_OK);

        m.write_slice(&[5, 0, 0x81, 0, 0, 0, 0, 0, 0, 0], GuestAddress(0x1000))
            .unwrap();
        let chain = vec![
            Descriptor::new(0x1000, 10, 0, 0),
            Descriptor::new(0x2000, 1, W, 0),
        ];
        assert_eq!(
            parse(&m, chain.into_iter()),
            Ok(Command::GuestOffloads(0x81))
        );

        m.write_slice(&[0, 0, 1], GuestAddress(0x1000)).unwrap(); // promiscuous on
        let chain = vec![
            Descriptor::new(0x1000, 3, 0, 0),
            Descriptor::new(0x2000, 1, W, 0),
        ];
        assert_eq!(parse(&m, chain.into_iter()), Ok(Command::Accepted));
    }

    #[test]
    fn malformed_and_unknown_requests_are_refused() {
        let m = mem();
        m.write_slice(&[4, 0], GuestAddress(0x1000)).unwrap();
        let short = vec![
            Descriptor::new(0x1000, 2, 0, 0),
            Descriptor::new(0x2000, 1, W, 0),
        ];
        assert!(matches!(
            parse(&m, short.into_iter()),
            Err(CtrlError::Malformed(_))
        ));
        m.write_slice(&[9, 7], GuestAddress(0x1000)).unwrap();
        let unknown = vec![
            Descriptor::new(0x1000, 2, 0, 0),
            Descriptor::new(0x2000, 1, W, 0),
        ];
        assert_eq!(
            parse(&m, unknown.into_iter()),
            Err(CtrlError::Unsupported(9, 7))
        );
        let nothing = vec![Descriptor::new(0x2000, 1, W, 0)];
        assert!(parse(&m, nothing.clone().into_iter()).is_err());
        let no_ack = vec![Descriptor::new(0x1000, 2, 0, 0)];
        assert_eq!(ack(&m, no_ack.into_iter(), ACK_ERR), None);
        let outside = vec![Descriptor::new(0xffff_0000, 4, 0, 0)];
        assert!(parse(&m, outside.into_iter()).is_err());
    }
}
