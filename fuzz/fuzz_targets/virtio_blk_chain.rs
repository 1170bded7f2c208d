//! virtio-blk request parsing on hostile descriptor chains: never panics, and every iovec it
//! produces lies inside guest memory and adds up to the request's length.
#![no_main]

use vback_block::virtio_blk::{Limits, Request, parse_chain};
use libfuzzer_sys::fuzz_target;
use vback_fuzz::{MEM, chain_from};
use vm_memory::{GuestAddress, GuestMemoryBackend};

fuzz_target!(|data: &[u8]| {
    let Some((descs, mem, _)) = chain_from(data) else { return };
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
