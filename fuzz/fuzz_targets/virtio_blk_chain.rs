//! virtio-blk request parsing on hostile descriptor chains: never panics, and every iovec it
//! produces lies inside guest memory and adds up to the request's length.
#![no_main]

use blkback::virtio::{Limits, Request, parse_chain};
use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const MEM: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else { return };
    let n = usize::from(n % 9);
    if rest.len() < n * 8 {
        return;
    }
    let (table, fill) = rest.split_at(n * 8);
    let descs: Vec<Descriptor> = table
        .chunks(8)
        .map(|c| {
            let addr = u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])) % (2 * MEM as u64);
            let len = u32::from(u16::from_le_bytes([c[4], c[5]]));
            let flags = u16::from(c[6] & 0x2); // WRITE or not
            Descriptor::new(addr, len, flags, 0)
        })
        .collect();
    let mem: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let take = fill.len().min(MEM);
    mem.write_slice(&fill[..take], GuestAddress(0)).unwrap();
    let base = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
    let mut iov = Vec::with_capacity(8);
    let p = parse_chain(&mem, descs.into_iter(), &mut iov, Limits { max_iov: 8, max_segments: 1 });
    let total: usize = iov.iter().map(|v| v.iov_len).sum();
    for v in &iov {
        let start = v.iov_base as usize;
        assert!(start >= base && start + v.iov_len <= base + MEM, "an iovec outside guest memory");
    }
    if let Ok(Request::Read { len, .. } | Request::Write { len, .. }) = p.request {
        assert_eq!(total as u64, len, "iovecs do not add up to the request");
    }
    if let Some(s) = p.status {
        assert!(s.0 < MEM as u64, "the status byte is outside guest memory");
    }
});
