//! vback-common's split virtqueue fast path on a driver that writes anything: the whole fake
//! guest memory (descriptor table, avail ring with its index and `used_event`, indirect tables)
//! comes from the input. Popping chains, returning them and the notification checks never
//! panic or touch memory outside the guest's, a chain never holds more descriptors than asked,
//! and the indices written back are the ones the ring moved.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vback_common::ring::SplitRing;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&cfg, fill)) = data.split_first() else { return };
    let size = 1u16 << (cfg % 9); // 1 to 256
    let event_idx = cfg & 0x80 != 0;
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]) else { return };
    let _ = mem.write_slice(&fill[..fill.len().min(MEM)], GuestAddress(0));
    // Rings where a driver would put them: table at 0, avail after it, used on the next page.
    let Ok(mut q) = Queue::new(256) else { return };
    q.set_size(size);
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(16 * u32::from(size)), Some(0));
    q.set_used_ring_address(Some(0x8000), Some(0));
    q.set_event_idx(event_idx);
    q.set_ready(true);
    let Ok(mut ring) = SplitRing::new(&q, &mem) else { return };
    let mut descs = Vec::new();
    let mut popped = 0u16;
    while let Some((head, r)) = ring.pop(&mut descs, 16) {
        assert!(descs.len() <= 16);
        if r.is_ok() {
            assert!(!descs.is_empty());
        }
        ring.push_used(head, descs.len() as u32);
        popped = popped.wrapping_add(1);
        if popped % 7 == 0 {
            let _ = ring.needs_notification();
        }
        if popped > 2 * size {
            break;
        }
    }
    let _ = ring.enable_notification();
    ring.disable_notification();
    let _ = ring.needs_notification();
    ring.finish(&mut q);
    assert_eq!(q.next_avail(), popped);
    assert_eq!(q.next_used(), popped);
});
