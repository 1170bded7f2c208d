//! qcow2 L2 entries: any entry, subcluster bitmap, cluster size and offset decodes to an error
//! or to a mapping that stays inside the cluster and moves forward.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vback_block::qcow2::l2::{Ext, decode_l2};

fuzz_target!(|data: &[u8]| {
    if data.len() < 27 {
        return;
    }
    let word = |i: usize| u64::from_le_bytes(data[i..i + 8].try_into().unwrap());
    let (entry, bitmap, at) = (word(0), word(8), word(16));
    let cluster_bits = 9 + u32::from(data[24] % 13);
    let version = 2 + u32::from(data[25] & 1);
    let extended = data[26] & 1 == 1 && cluster_bits >= 14;
    let cs = 1u64 << cluster_bits;
    let in_cluster = at % (cs + 1);
    let bm = extended.then_some(bitmap);
    if let Ok((ext, run)) = decode_l2(entry, bm, cluster_bits, version, in_cluster) {
        assert!(in_cluster < cs);
        assert!(run > 0 && run <= cs - in_cluster, "run {run} at {in_cluster} of {cs}");
        match ext {
            Ext::Data { host, .. } => assert_eq!(host % 512, in_cluster % 512),
            Ext::Compressed { host, sectors } => assert!(host != 0 && sectors >= 1),
            Ext::Zero { .. } | Ext::Unallocated => {}
        }
    }
});
