//! netback's virtio-net formats on hostile descriptor chains: transmit checks, receive fills and
//! control requests never panic, accepted frames fit the chain, and an accepted GSO frame has a
//! segment size.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netback::device::{HDR_LEN, check_tx, fill_rx};
use netback::{ctrl, device};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

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
            let flags = u16::from(c[6] & 0x2);
            Descriptor::new(addr, len, flags, 0)
        })
        .collect();
    let mem: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let take = fill.len().min(MEM);
    mem.write_slice(&fill[..take], GuestAddress(0)).unwrap();
    let readable: u64 = descs.iter().filter(|d| !d.is_write_only()).map(|d| u64::from(d.len())).sum();
    let gso_ok = table.first().is_some_and(|b| b & 1 == 1);
    if let Ok(f) = check_tx(&mem, descs.iter().copied(), gso_ok) {
        assert_eq!(f.len + HDR_LEN, readable, "an accepted frame is the whole chain");
        assert!(gso_ok || f.gso_type & 0x7f == 0, "GSO accepted without negotiation");
    }
    let frame = device::null_frame(60 + take % 1500);
    if let Some(len) = fill_rx(&mem, descs.iter().copied(), &frame) {
        assert_eq!(u64::from(len), HDR_LEN + frame.len() as u64);
    }
    let _ = ctrl::parse(&mem, descs.iter().copied());
    let _ = ctrl::ack(&mem, descs.iter().copied(), ctrl::ACK_OK);
});
