//! qcow2 images: no header (or image behind it) makes the format layer panic, hang or allocate
//! without bound. Valid-looking inputs are opened from a file and read at a few offsets, which
//! walks the L1/L2 tables, compressed clusters and the refcount table.
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;
use vback_block::qcow2::{Header, Image, OpenOptions};

fuzz_target!(|data: &[u8]| {
    let Ok(h) = Header::parse(data, data.len() as u64) else {
        return;
    };
    assert!((512..=2 << 20).contains(&h.cluster_size()));
    let path = std::env::temp_dir().join(format!("vback-fuzz-qcow2-{}", std::process::id()));
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(data).unwrap();
    drop(f);
    let file = std::fs::File::open(&path).unwrap();
    let opts = OpenOptions {
        cache_bytes: 64 << 10,
        lock_backing: false,
        ..OpenOptions::default()
    };
    if let Ok(mut img) = Image::open(&path, file, &opts) {
        let size = img.size();
        let mut buf = vec![0u8; 4096];
        for at in [0, size / 3, size / 2, size.saturating_sub(4096)] {
            let n = (size - at.min(size)).min(4096) as usize;
            let _ = img.read(at, &mut buf[..n]);
            let _ = img.map_direct(at, n as u64, false);
        }
    }
    let _ = std::fs::remove_file(&path);
});
