//! Shared pieces of vback's fuzz targets.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Size of the fake guest memory the chain targets use.
pub const MEM: usize = 64 * 1024;

/// A hostile descriptor chain and the guest memory it points into, from fuzz input: the first
/// byte gives the number of descriptors (0 to 8), 8 bytes each follow (address up to twice the
/// memory, length up to 64 KiB, the WRITE flag), the rest fills the memory. Returns the
/// descriptors, the memory and how many bytes of it the input filled.
pub fn chain_from(data: &[u8]) -> Option<(Vec<Descriptor>, GuestMemoryMmap<()>, usize)> {
    let (&n, rest) = data.split_first()?;
    let n = usize::from(n % 9);
    if rest.len() < n * 8 {
        return None;
    }
    let (table, fill) = rest.split_at(n * 8);
    let descs = table
        .chunks(8)
        .map(|c| {
            let addr = u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])) % (2 * MEM as u64);
            let len = u32::from(u16::from_le_bytes([c[4], c[5]]));
            let flags = u16::from(c[6] & 0x2); // WRITE or not
            Descriptor::new(addr, len, flags, 0)
        })
        .collect();
    let mem: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).ok()?;
    let take = fill.len().min(MEM);
    mem.write_slice(&fill[..take], GuestAddress(0)).ok()?;
    Some((descs, mem, take))
}
