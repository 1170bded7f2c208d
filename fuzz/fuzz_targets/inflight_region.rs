//! In-flight tracking on a region whose every byte a hostile front end wrote: the queue's
//! header and entries come from the input, as do the ring's used index and size. Reading the
//! region when the ring starts never panics, replays only heads inside the ring, each once,
//! and marking, publishing and walking the replayed chains (descriptor tables from the input
//! too) stay inside the region and guest memory.
#![no_main]

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vback_common::vhost_user::driver::Chain;
use vback_common::vhost_user::inflight::{InflightQueue, InflightRegion};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let Some((cfg, rest)) = data.split_first_chunk::<4>() else { return };
    let queue_size = 1u16 << (cfg[0] % 9); // 1 to 256
    let ring_size = 1u16 << (cfg[1] % 9);
    let used_idx = u16::from_le_bytes([cfg[2], cfg[3]]);
    let Ok((_, file, info)) = InflightRegion::allocate(1, queue_size) else { return };
    let len = (info.mmap_size as usize).min(rest.len());
    if file.write_all_at(&rest[..len], 0).is_err() {
        return;
    }
    let Ok(region) = InflightRegion::map(file, &info) else { return };
    let region = Arc::new(region);
    let Some(mut q) = InflightQueue::new(region.clone(), 0) else { return };
    let Ok(replay) = q.start(used_idx, ring_size) else { return };
    let mut seen = std::collections::HashSet::new();
    for &h in &replay.heads {
        assert!(h < ring_size && h < queue_size, "head {h} replayed");
        assert!(seen.insert(h), "head {h} replayed twice");
    }
    // Guest memory from what follows the region in the input; walk each replayed chain.
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]) else { return };
    let fill = &rest[len..];
    let _ = mem.write_slice(&fill[..fill.len().min(MEM)], GuestAddress(0));
    for &h in &replay.heads {
        let n = Chain::new(&mem, GuestAddress(0), ring_size, h).take(1 << 17).count();
        assert!(n <= usize::from(ring_size) + 65535, "a chain of {n} descriptors");
        q.pre_put(h);
        q.post_put(h, used_idx.wrapping_add(1));
    }
    // Marks on any head (those beyond the region are ignored), then a second start.
    for &b in fill.iter().take(64) {
        q.mark(u16::from(b));
    }
    let mut again = InflightQueue::new(region, 0).unwrap();
    if let Ok(r) = again.start(used_idx, ring_size) {
        assert!(r.heads.iter().all(|&h| h < ring_size));
    }
});
