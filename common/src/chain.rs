//! Descriptor chains as byte streams. The virtio spec lets a driver split a request across
//! descriptors any way it likes, so devices read their headers from "the readable bytes" and
//! write their answers to "the writable bytes" without assuming framing. Every access goes
//! through `vm-memory`, which checks it against the region it falls in.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestMemoryBackend};

/// Total length of the device-readable (`writable == false`) or device-writable descriptors.
pub fn chain_len(descs: impl Iterator<Item = Descriptor>, writable: bool) -> u64 {
    descs
        .filter(|d| d.is_write_only() == writable)
        .map(|d| u64::from(d.len()))
        .sum()
}

/// Copies `buf.len()` bytes starting `offset` bytes into the chain's readable stream.
pub fn read_stream<M: GuestMemoryBackend>(
    mem: &M,
    descs: impl Iterator<Item = Descriptor>,
    mut offset: u64,
    buf: &mut [u8],
) -> bool {
    let mut filled = 0usize;
    for d in descs.filter(|d| !d.is_write_only()) {
        let len = u64::from(d.len());
        if offset >= len {
            offset -= len;
            continue;
        }
        let take = usize::try_from((len - offset).min((buf.len() - filled) as u64)).unwrap_or(0);
        let Some(addr) = d.addr().checked_add(offset) else {
            return false;
        };
        if mem
            .read_slice(&mut buf[filled..filled + take], addr)
            .is_err()
        {
            return false;
        }
        filled += take;
        offset = 0;
        if filled == buf.len() {
            return true;
        }
    }
    filled == buf.len()
}

/// Copies `data` into the chain's writable stream starting at byte `offset`.
pub fn write_stream<M: GuestMemoryBackend>(
    mem: &M,
    descs: impl Iterator<Item = Descriptor>,
    mut offset: u64,
    data: &[u8],
) -> bool {
    let mut done = 0usize;
    for d in descs.filter(Descriptor::is_write_only) {
        let len = u64::from(d.len());
        if offset >= len {
            offset -= len;
            continue;
        }
        let take = usize::try_from((len - offset).min((data.len() - done) as u64)).unwrap_or(0);
        let Some(addr) = d.addr().checked_add(offset) else {
            return false;
        };
        if mem.write_slice(&data[done..done + take], addr).is_err() {
            return false;
        }
        done += take;
        offset = 0;
        if done == data.len() {
            return true;
        }
    }
    done == data.len()
}

/// Appends iovecs for bytes `[start, start + len)` of the readable (`writable == false`) or
/// writable stream. Returns `false` if an address is outside guest memory or `iov` would
/// exceed `max`.
pub fn collect_iovecs<M: GuestMemoryBackend>(
    mem: &M,
    descs: impl Iterator<Item = Descriptor>,
    writable: bool,
    start: u64,
    len: u64,
    iov: &mut Vec<libc::iovec>,
    max: usize,
) -> bool {
    let end = start + len;
    let mut pos = 0u64;
    for d in descs.filter(|d| d.is_write_only() == writable) {
        let dlen = u64::from(d.len());
        let (dstart, dend) = (pos, pos + dlen);
        pos = dend;
        let lo = dstart.max(start);
        let hi = dend.min(end);
        if lo >= hi {
            if pos >= end {
                break;
            }
            continue;
        }
        let Some(addr) = d.addr().checked_add(lo - dstart) else {
            return false;
        };
        let Ok(count) = usize::try_from(hi - lo) else {
            return false;
        };
        for slice in mem.get_slices(addr, count) {
            let Ok(slice) = slice else {
                return false;
            };
            if iov.len() >= max {
                return false;
            }
            iov.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    #[test]
    fn streams_span_descriptors_and_stop_at_memory_bounds() {
        let m: GuestMemoryMmap<()> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        m.write_slice(b"abc", GuestAddress(0x100)).unwrap();
        m.write_slice(b"defg", GuestAddress(0x200)).unwrap();
        let d = vec![
            Descriptor::new(0x100, 3, 0, 0),
            Descriptor::new(0x200, 4, 0, 0),
            Descriptor::new(0x300, 8, 2, 0),
        ];
        let mut buf = [0u8; 6];
        assert!(read_stream(&m, d.clone().into_iter(), 1, &mut buf));
        assert_eq!(&buf, b"bcdefg");
        let mut big = [0u8; 8];
        assert!(
            !read_stream(&m, d.clone().into_iter(), 0, &mut big),
            "only 7 readable bytes"
        );
        assert!(write_stream(&m, d.clone().into_iter(), 2, b"xyz"));
        assert_eq!(m.read_obj::<[u8; 3]>(GuestAddress(0x302)).unwrap(), *b"xyz");
        assert!(
            !write_stream(&m, d.clone().into_iter(), 6, b"xyz"),
            "past the writable bytes"
        );
        let out = vec![Descriptor::new(0xfff0, 0x100, 2, 0)];
        assert!(
            !write_stream(&m, out.into_iter(), 0, &[1u8; 0x20]),
            "past guest memory"
        );
    }
}
