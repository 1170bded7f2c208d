//! Creating an empty qcow2 image (version 3, 16-bit refcounts), as `qemu-img create -f qcow2`.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::Qcow2Error;
use super::header::{MAGIC, MAX_BACKING_NAME, MAX_CLUSTER_BITS, MAX_L1_BYTES, MIN_CLUSTER_BITS};

const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

/// Creates `path` (which must not exist) as an empty qcow2 image of `size` bytes with
/// `cluster_size`-byte clusters, over `backing` (its name as stored, and its format) if given.
pub fn create(
    path: &Path,
    size: u64,
    cluster_size: u64,
    backing: Option<(&str, &str)>,
) -> Result<(), Qcow2Error> {
    let refuse = |reason: String| Qcow2Error::Refused {
        path: path.to_owned(),
        reason,
    };
    let cb = cluster_size.trailing_zeros();
    if !cluster_size.is_power_of_two() || !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cb) {
        return Err(refuse(format!(
            "cluster size {cluster_size} is not a power of two from 512 bytes to 2 MiB"
        )));
    }
    let cs = cluster_size;
    let l1_entries = size.div_ceil(cs * (cs / 8));
    if l1_entries * 8 > MAX_L1_BYTES {
        return Err(refuse(format!(
            "{size} bytes needs an L1 table over 32 MiB; use larger clusters"
        )));
    }
    if let Some((name, fmt)) = backing {
        if name.is_empty() || name.len() > MAX_BACKING_NAME as usize {
            return Err(refuse(format!(
                "a backing file name is 1 to {MAX_BACKING_NAME} bytes"
            )));
        }
        if fmt != "raw" && fmt != "qcow2" {
            return Err(refuse(format!(
                "backing format `{fmt}` is not raw or qcow2"
            )));
        }
    }
    // Layout: header | refcount table | refcount blocks | L1 table.
    let l1c = (l1_entries * 8).div_ceil(cs).max(1);
    let per_block = cs * 8 / 16;
    let (mut rtc, mut rbc) = (1u64, 1u64);
    loop {
        let total = 1 + rtc + rbc + l1c;
        let rbc2 = total.div_ceil(per_block);
        let rtc2 = (rbc2 * 8).div_ceil(cs);
        if (rbc2, rtc2) == (rbc, rtc) {
            break;
        }
        (rbc, rtc) = (rbc2, rtc2);
    }
    let rt_off = cs;
    let rb_off = rt_off + rtc * cs;
    let l1_off = rb_off + rbc * cs;
    let total = 1 + rtc + rbc + l1c;

    let mut hdr = vec![0u8; cs as usize];
    let put32 = |b: &mut [u8], at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let put64 = |b: &mut [u8], at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    put32(&mut hdr, 0, MAGIC);
    put32(&mut hdr, 4, 3);
    put32(&mut hdr, 20, cb);
    put64(&mut hdr, 24, size);
    put32(&mut hdr, 36, l1_entries as u32);
    put64(&mut hdr, 40, l1_off);
    put64(&mut hdr, 48, rt_off);
    put32(&mut hdr, 56, rtc as u32);
    put32(&mut hdr, 96, 4);
    put32(&mut hdr, 100, 112);
    let mut at = 112usize;
    if let Some((name, fmt)) = backing {
        put32(&mut hdr, at, EXT_BACKING_FORMAT);
        put32(&mut hdr, at + 4, fmt.len() as u32);
        hdr[at + 8..at + 8 + fmt.len()].copy_from_slice(fmt.as_bytes());
        at += 8 + fmt.len().div_ceil(8) * 8;
        at += 8; // end of extensions
        put64(&mut hdr, 8, at as u64);
        put32(&mut hdr, 16, name.len() as u32);
        if at + name.len() > hdr.len() {
            return Err(refuse(
                "the backing file name does not fit in the first cluster".into(),
            ));
        }
        hdr[at..at + name.len()].copy_from_slice(name.as_bytes());
    }
    let mut rt = vec![0u8; (rtc * cs) as usize];
    for i in 0..rbc {
        put64(&mut rt, i as usize * 8, rb_off + i * cs);
    }
    let mut rb = vec![0u8; (rbc * cs) as usize];
    for c in 0..total {
        rb[c as usize * 2..c as usize * 2 + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    let io = |op, source| Qcow2Error::Io {
        path: path.to_owned(),
        op,
        offset: 0,
        source,
    };
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| io("create", e))?;
    f.write_all_at(&rt, rt_off)
        .and_then(|()| f.write_all_at(&rb, rb_off))
        .and_then(|()| f.set_len(total * cs))
        .and_then(|()| f.write_all_at(&hdr, 0))
        .and_then(|()| f.sync_all())
        .map_err(|e| io("write", e))
}
