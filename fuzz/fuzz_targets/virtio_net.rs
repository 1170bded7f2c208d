//! netback's virtio-net formats on hostile descriptor chains: transmit checks, receive fills and
//! control requests never panic, accepted frames fit the chain, and an accepted GSO frame has a
//! segment size.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netback::device::{HDR_LEN, fill_rx, tx_frame};
use netback::{ctrl, device};
use vback_common::ring::HostMap;
use vback_fuzz::chain_from;

fuzz_target!(|data: &[u8]| {
    let Some((descs, mem, take)) = chain_from(data) else { return };
    let readable: u64 = descs.iter().filter(|d| !d.is_write_only()).map(|d| u64::from(d.len())).sum();
    let gso_ok = data.get(1).is_some_and(|b| b & 1 == 1);
    let map = HostMap::new(&mem);
    let mut iov = Vec::new();
    if let Ok(f) = tx_frame(&map, &descs, gso_ok, &mut iov, 128) {
        assert_eq!(f.len + HDR_LEN, readable, "an accepted frame is the whole chain");
        assert!(gso_ok || f.gso_type & 0x7f == 0, "GSO accepted without negotiation");
        let covered: usize = iov.iter().map(|v| v.iov_len).sum();
        assert_eq!(covered as u64, readable, "the iovecs cover the chain");
    }
    let frame = device::null_frame(60 + take % 1500);
    if let Some(len) = fill_rx(&map, &descs, &frame, &mut iov) {
        assert_eq!(u64::from(len), HDR_LEN + frame.len() as u64);
    }
    let _ = ctrl::parse(&mem, descs.iter().copied());
    let _ = ctrl::ack(&mem, descs.iter().copied(), ctrl::ACK_OK);
});
