//! vmm-min's virtio-mmio registers driven by a hostile guest: any sequence of register reads
//! and writes, and starting the device with whatever queues result. No panic; FEATURES_OK only
//! with offered features; queue sizes bounded; rings handed to a backend only when they are a
//! power-of-two size inside guest memory.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_min::memory::{GuestMem, create};
use vmm_min::transport::{Action, QUEUE_MAX, STATUS_FEATURES_OK, Transport};
use vmm_min::vhost::vring_config;

fn mem() -> &'static GuestMem {
    static MEM: OnceLock<GuestMem> = OnceLock::new();
    MEM.get_or_init(|| create(1 << 20).expect("1 MiB of guest memory"))
}

fuzz_target!(|data: &[u8]| {
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    let mut t = Transport::new(2, 1 << 9, usize::from(head % 4) + 1);
    // Each step: [op, offset, v0, v1, v2, v3]; op bit 0 = write.
    for step in rest.chunks_exact(6) {
        let offset = u64::from(step[1]) & 0xfc;
        let v = u32::from_le_bytes([step[2], step[3], step[4], step[5]]);
        if step[0] & 1 == 0 {
            let _ = t.read(offset);
            continue;
        }
        match t.write(offset, v) {
            Action::None => {}
            Action::Start => {
                for (i, q) in t.queues().iter().enumerate().filter(|(_, q)| q.ready) {
                    if let Ok(cfg) = vring_config(mem(), i, q) {
                        assert!(q.size.is_power_of_two());
                        assert!(mem().address_in_range(GuestAddress(q.desc + 16 * u64::from(q.size) - 1)));
                        assert!(cfg.desc_table_addr != 0);
                    }
                }
                if step[0] & 2 != 0 {
                    t.set_needs_reset();
                }
            }
            Action::Reset { .. } => t.reset(),
        }
        if t.status() & STATUS_FEATURES_OK != 0 {
            assert_eq!(t.driver_features() & !t.features(), 0);
        }
        assert!(t.queues().iter().all(|q| q.size <= QUEUE_MAX));
    }
});
