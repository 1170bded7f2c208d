//! The virtio-blk device model, transport-free: feature bits, the configuration space, and the
//! parsing of a request's descriptor chain into an operation.
//!
//! A request is a descriptor chain: device-readable bytes first (a 16-byte header, then data for
//! writes, discards and write-zeroes), then device-writable bytes (data for reads and GET_ID,
//! then one status byte). The spec lets a driver split these across descriptors any way it
//! likes, so the parser treats the chain as two byte streams and never assumes framing. Every
//! guest address is checked against guest memory before anything is read, written or handed to
//! the kernel; a malformed chain becomes an IOERR or UNSUPP status, never a panic.
//!
//! It lives in the storage library, beside the requests it produces (as cloud-hypervisor's
//! `block` crate carries its virtio-blk request parser), so that blkback's worker, the fuzz
//! targets and the tests share one parser without depending on the blkback daemon.

use std::mem::size_of;

use crate::SECTOR;
pub use vback_common::chain::write_stream;
use vback_common::chain::{collect_iovecs, read_stream};
use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend};

/// Length of the request header (type, reserved, sector).
pub const HEADER_LEN: u64 = 16;
/// Length of one discard/write-zeroes segment.
pub const SEGMENT_LEN: u64 = 16;
/// Offset of `writeback` (the WCE byte) in the configuration space.
pub const CONFIG_WCE_OFFSET: u32 = 32;
/// Size of the configuration space we present (up to and including the write-zeroes fields).
pub const CONFIG_LEN: usize = 60;

/// Request status values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Success.
    Ok = VIRTIO_BLK_S_OK as u8,
    /// The request failed (bad request, out of range, I/O error).
    IoErr = VIRTIO_BLK_S_IOERR as u8,
    /// The request type or a flag is not supported.
    Unsupp = VIRTIO_BLK_S_UNSUPP as u8,
}

/// The configuration space fields we fill.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Largest single segment in bytes.
    pub size_max: u32,
    /// Most data segments per request.
    pub seg_max: u32,
    /// Logical block size.
    pub blk_size: u32,
    /// log2(physical block / logical block).
    pub physical_block_exp: u8,
    /// Suggested minimum I/O size in logical blocks.
    pub min_io_size: u16,
    /// Optimal I/O size in logical blocks.
    pub opt_io_size: u32,
    /// Write-back cache enabled.
    pub writeback: bool,
    /// Number of request queues.
    pub num_queues: u16,
    /// Largest discard, in sectors.
    pub max_discard_sectors: u32,
    /// Segments per discard request.
    pub max_discard_seg: u32,
    /// Discard alignment, in sectors.
    pub discard_sector_alignment: u32,
    /// Largest write-zeroes, in sectors.
    pub max_write_zeroes_sectors: u32,
    /// Segments per write-zeroes request.
    pub max_write_zeroes_seg: u32,
    /// Write-zeroes with UNMAP may deallocate.
    pub write_zeroes_may_unmap: bool,
}

impl BlkConfig {
    /// The little-endian configuration space (`struct virtio_blk_config`).
    pub fn to_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        b[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        b[8..12].copy_from_slice(&self.size_max.to_le_bytes());
        b[12..16].copy_from_slice(&self.seg_max.to_le_bytes());
        // 16..20: geometry, unused (GEOMETRY is not offered).
        b[20..24].copy_from_slice(&self.blk_size.to_le_bytes());
        b[24] = self.physical_block_exp;
        b[25] = 0; // alignment_offset
        b[26..28].copy_from_slice(&self.min_io_size.to_le_bytes());
        b[28..32].copy_from_slice(&self.opt_io_size.to_le_bytes());
        b[32] = u8::from(self.writeback);
        b[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        b[36..40].copy_from_slice(&self.max_discard_sectors.to_le_bytes());
        b[40..44].copy_from_slice(&self.max_discard_seg.to_le_bytes());
        b[44..48].copy_from_slice(&self.discard_sector_alignment.to_le_bytes());
        b[48..52].copy_from_slice(&self.max_write_zeroes_sectors.to_le_bytes());
        b[52..56].copy_from_slice(&self.max_write_zeroes_seg.to_le_bytes());
        b[56] = u8::from(self.write_zeroes_may_unmap);
        b
    }
}

/// A discard or write-zeroes range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// Flags (UNMAP for write-zeroes).
    pub flags: u32,
}

/// What a well-formed request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Read `len` bytes at `sector` into the data iovecs.
    Read {
        /// First sector.
        sector: u64,
        /// Bytes.
        len: u64,
    },
    /// Write `len` bytes at `sector` from the data iovecs.
    Write {
        /// First sector.
        sector: u64,
        /// Bytes.
        len: u64,
    },
    /// Make completed writes durable.
    Flush,
    /// Write the device ID into the first `len` writable data bytes (at most 20 are used).
    GetId {
        /// Room for the ID.
        len: u64,
    },
    /// Deallocate a range.
    Discard(Segment),
    /// Zero a range.
    WriteZeroes(Segment),
}

/// The result of parsing one chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// The request, or the status to answer at once.
    pub request: Result<Request, Status>,
    /// Where the status byte goes; `None` if the chain has no writable byte (nothing can be
    /// reported; the chain is returned with length 0).
    pub status: Option<GuestAddress>,
    /// Device-writable data bytes (reads, GET_ID), for the used length.
    pub writable_data: u64,
}

/// Limits the parser enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most iovecs a request may turn into.
    pub max_iov: usize,
    /// Segments per discard/write-zeroes.
    pub max_segments: u32,
}

fn fail(status: Status, status_addr: Option<GuestAddress>) -> Parsed {
    Parsed {
        request: Err(status),
        status: status_addr,
        writable_data: 0,
    }
}

/// Parses one chain. `descs` must yield the chain's descriptors in order and be cheap to
/// clone (virtio-queue's `DescriptorChain` is). `iov` is cleared and receives the data
/// segments of reads and writes.
pub fn parse_chain<M, I>(mem: &M, descs: I, iov: &mut Vec<libc::iovec>, limits: Limits) -> Parsed
where
    M: GuestMemoryBackend,
    I: Iterator<Item = Descriptor> + Clone,
{
    iov.clear();
    // Pass 1: shape of the chain.
    let (mut readable, mut writable) = (0u64, 0u64);
    let mut seen_writable = false;
    let mut in_order = true;
    let mut in_memory = true;
    let mut status: Option<GuestAddress> = None;
    for d in descs.clone() {
        let len = u64::from(d.len());
        if !mem.check_range(d.addr(), d.len() as usize) && d.len() > 0 {
            in_memory = false;
        }
        if d.is_write_only() {
            seen_writable = true;
            writable += len;
            if len > 0 {
                status = d.addr().checked_add(len - 1);
            }
        } else {
            if seen_writable {
                in_order = false;
            }
            readable += len;
        }
    }
    // The status byte itself must be in guest memory, or we cannot report anything.
    let status = status.filter(|a| mem.check_range(*a, 1));
    if !in_memory || !in_order {
        return fail(Status::IoErr, status);
    }
    if status.is_none() {
        return fail(Status::IoErr, None);
    }
    let mut header = [0u8; HEADER_LEN as usize];
    if readable < HEADER_LEN || !read_stream(mem, descs.clone(), 0, &mut header) {
        return fail(Status::IoErr, status);
    }
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or([0; 8]));
    let readable_data = readable - HEADER_LEN;
    let writable_data = writable - 1;

    let request = match kind {
        VIRTIO_BLK_T_IN => {
            if readable_data != 0 {
                return fail(Status::IoErr, status);
            }
            if !collect_iovecs(mem, descs, true, 0, writable_data, iov, limits.max_iov) {
                return fail(Status::IoErr, status);
            }
            Request::Read {
                sector,
                len: writable_data,
            }
        }
        VIRTIO_BLK_T_OUT => {
            if writable_data != 0 {
                return fail(Status::IoErr, status);
            }
            if !collect_iovecs(
                mem,
                descs,
                false,
                HEADER_LEN,
                readable_data,
                iov,
                limits.max_iov,
            ) {
                return fail(Status::IoErr, status);
            }
            Request::Write {
                sector,
                len: readable_data,
            }
        }
        VIRTIO_BLK_T_FLUSH => Request::Flush,
        VIRTIO_BLK_T_GET_ID => Request::GetId { len: writable_data },
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if readable_data == 0 || !readable_data.is_multiple_of(SEGMENT_LEN) {
                return fail(Status::IoErr, status);
            }
            if readable_data / SEGMENT_LEN > u64::from(limits.max_segments) {
                return fail(Status::IoErr, status);
            }
            let mut seg = [0u8; SEGMENT_LEN as usize];
            if !read_stream(mem, descs, HEADER_LEN, &mut seg) {
                return fail(Status::IoErr, status);
            }
            let segment = Segment {
                sector: u64::from_le_bytes(seg[0..8].try_into().unwrap_or([0; 8])),
                num_sectors: u32::from_le_bytes(seg[8..12].try_into().unwrap_or([0; 4])),
                flags: u32::from_le_bytes(seg[12..16].try_into().unwrap_or([0; 4])),
            };
            if kind == VIRTIO_BLK_T_DISCARD {
                Request::Discard(segment)
            } else {
                Request::WriteZeroes(segment)
            }
        }
        _ => return fail(Status::Unsupp, status),
    };
    Parsed {
        request: Ok(request),
        status,
        writable_data: match request {
            Request::Read { len, .. } => len,
            _ => 0,
        },
    }
}

/// Checks that `len` bytes at `sector` lie inside a disk of `capacity` sectors, without
/// overflow.
pub fn range_ok(sector: u64, len: u64, capacity: u64) -> bool {
    let Some(bytes_cap) = capacity.checked_mul(SECTOR) else {
        return false;
    };
    sector
        .checked_mul(SECTOR)
        .and_then(|start| start.checked_add(len))
        .is_some_and(|end| end <= bytes_cap)
}

const _: () = assert!(size_of::<Descriptor>() == 16);

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestMemoryMmap};

    const W: u16 = VRING_DESC_F_WRITE as u16;
    const LIMITS: Limits = Limits {
        max_iov: 8,
        max_segments: 1,
    };

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn header(mem: &GuestMemoryMmap<()>, at: u64, kind: u32, sector: u64) {
        mem.write_obj(kind.to_le(), GuestAddress(at)).unwrap();
        mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        mem.write_obj(sector.to_le(), GuestAddress(at + 8)).unwrap();
    }

    fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
    }

    fn parse(m: &GuestMemoryMmap<()>, descs: &[RawDescriptor]) -> (Parsed, Vec<libc::iovec>) {
        let q = MockSplitQueue::new(m, 16);
        let chain = q.build_desc_chain(descs).unwrap();
        let mut iov = Vec::with_capacity(8);
        let p = parse_chain(m, chain, &mut iov, LIMITS);
        (p, iov)
    }

    #[test]
    fn read_write_flush_getid() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 8);
        let (p, iov) = parse(
            &m,
            &[
                desc(0x1000, 16, 0),
                desc(0x2000, 4096, W),
                desc(0x3000, 1, W),
            ],
        );
        assert_eq!(
            p.request,
            Ok(Request::Read {
                sector: 8,
                len: 4096
            })
        );
        assert_eq!(p.status, Some(GuestAddress(0x3000)));
        assert_eq!(iov.len(), 1);
        assert_eq!(iov[0].iov_len, 4096);

        // Header, data and status all in one writable-after-readable pair; data split in two.
        header(&m, 0x1000, VIRTIO_BLK_T_OUT, 0);
        let (p, iov) = parse(
            &m,
            &[
                desc(0x1000, 16 + 512, 0),
                desc(0x4000, 512, 0),
                desc(0x3000, 1, W),
            ],
        );
        assert_eq!(
            p.request,
            Ok(Request::Write {
                sector: 0,
                len: 1024
            })
        );
        assert_eq!(iov.len(), 2);
        assert_eq!(iov[0].iov_len, 512);

        // Data and status in one writable descriptor.
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 1);
        let (p, iov) = parse(&m, &[desc(0x1000, 16, 0), desc(0x2000, 513, W)]);
        assert_eq!(
            p.request,
            Ok(Request::Read {
                sector: 1,
                len: 512
            })
        );
        assert_eq!(p.status, Some(GuestAddress(0x2000 + 512)));
        assert_eq!(iov[0].iov_len, 512);

        header(&m, 0x1000, VIRTIO_BLK_T_FLUSH, 0);
        let (p, _) = parse(&m, &[desc(0x1000, 16, 0), desc(0x3000, 1, W)]);
        assert_eq!(p.request, Ok(Request::Flush));

        header(&m, 0x1000, VIRTIO_BLK_T_GET_ID, 0);
        let (p, _) = parse(
            &m,
            &[desc(0x1000, 16, 0), desc(0x2000, 20, W), desc(0x3000, 1, W)],
        );
        assert_eq!(p.request, Ok(Request::GetId { len: 20 }));
    }

    #[test]
    fn a_header_split_across_descriptors() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 77);
        // The 16-byte header is in two descriptors of 5 and 11 bytes.
        m.write_slice(
            &m.read_obj::<[u8; 16]>(GuestAddress(0x1000)).unwrap()[5..],
            GuestAddress(0x5000),
        )
        .unwrap();
        let (p, _) = parse(
            &m,
            &[
                desc(0x1000, 5, 0),
                desc(0x5000, 11, 0),
                desc(0x2000, 512, W),
                desc(0x3000, 1, W),
            ],
        );
        assert_eq!(
            p.request,
            Ok(Request::Read {
                sector: 77,
                len: 512
            })
        );
    }

    #[test]
    fn discard_and_write_zeroes_segments() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_DISCARD, 0);
        m.write_obj(100u64.to_le(), GuestAddress(0x1010)).unwrap();
        m.write_obj(8u32.to_le(), GuestAddress(0x1018)).unwrap();
        m.write_obj(0u32, GuestAddress(0x101c)).unwrap();
        let (p, _) = parse(&m, &[desc(0x1000, 32, 0), desc(0x3000, 1, W)]);
        assert_eq!(
            p.request,
            Ok(Request::Discard(Segment {
                sector: 100,
                num_sectors: 8,
                flags: 0
            }))
        );
        // Two segments exceed max_segments = 1.
        let (p, _) = parse(&m, &[desc(0x1000, 48, 0), desc(0x3000, 1, W)]);
        assert_eq!(p.request, Err(Status::IoErr));
        // A partial segment.
        let (p, _) = parse(&m, &[desc(0x1000, 24, 0), desc(0x3000, 1, W)]);
        assert_eq!(p.request, Err(Status::IoErr));
    }

    #[test]
    fn malformed_chains() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        type Case = (
            &'static str,
            Vec<RawDescriptor>,
            Result<Request, Status>,
            bool,
        );
        let cases: Vec<Case> = vec![
            (
                "no status byte",
                vec![desc(0x1000, 16, 0), desc(0x2000, 512, 0)],
                Err(Status::IoErr),
                false,
            ),
            (
                "short header",
                vec![desc(0x1000, 8, 0), desc(0x3000, 1, W)],
                Err(Status::IoErr),
                true,
            ),
            (
                "read data in a readable descriptor",
                vec![
                    desc(0x1000, 16, 0),
                    desc(0x2000, 512, 0),
                    desc(0x3000, 1, W),
                ],
                Err(Status::IoErr),
                true,
            ),
            (
                "readable after writable",
                vec![
                    desc(0x1000, 16, 0),
                    desc(0x2000, 512, W),
                    desc(0x4000, 16, 0),
                    desc(0x3000, 1, W),
                ],
                Err(Status::IoErr),
                true,
            ),
            (
                "data outside guest memory",
                vec![
                    desc(0x1000, 16, 0),
                    desc(0x20_0000, 512, W),
                    desc(0x3000, 1, W),
                ],
                Err(Status::IoErr),
                true,
            ),
            (
                "data straddling the end of memory",
                vec![
                    desc(0x1000, 16, 0),
                    desc(0xf_ff00, 512, W),
                    desc(0x3000, 1, W),
                ],
                Err(Status::IoErr),
                true,
            ),
            (
                "header outside guest memory",
                vec![desc(0x40_0000, 16, 0), desc(0x3000, 1, W)],
                Err(Status::IoErr),
                true,
            ),
            (
                "status outside guest memory",
                vec![desc(0x1000, 16, 0), desc(0x50_0000, 1, W)],
                Err(Status::IoErr),
                false,
            ),
            (
                "too many segments",
                (0..9)
                    .map(|i| desc(0x8000 + i * 0x1000, 512, W))
                    .chain([desc(0x1000, 16, 0)])
                    .collect(),
                Err(Status::IoErr),
                true,
            ),
        ];
        for (what, descs, want, has_status) in cases {
            let (p, _) = parse(&m, &descs);
            assert_eq!(p.request, want, "{what}");
            assert_eq!(p.status.is_some(), has_status, "{what}");
        }
        // The too-many-segments case above had readable after writable; a clean one:
        let mut descs = vec![desc(0x1000, 16, 0)];
        descs.extend((0..9).map(|i| desc(0x8000 + i * 0x1000, 512, W)));
        descs.push(desc(0x3000, 1, W));
        let (p, _) = parse(&m, &descs);
        assert_eq!(p.request, Err(Status::IoErr), "more iovecs than max_iov");

        header(&m, 0x1000, 0x4242, 0);
        let (p, _) = parse(&m, &[desc(0x1000, 16, 0), desc(0x3000, 1, W)]);
        assert_eq!(p.request, Err(Status::Unsupp), "unknown type");
        header(&m, 0x1000, VIRTIO_BLK_T_OUT, 0);
        let (p, _) = parse(
            &m,
            &[
                desc(0x1000, 16, 0),
                desc(0x2000, 512, 0),
                desc(0x4000, 8, W),
                desc(0x3000, 1, W),
            ],
        );
        assert_eq!(p.request, Err(Status::IoErr), "write with writable data");
    }

    #[test]
    fn ranges() {
        assert!(range_ok(0, 512, 1));
        assert!(!range_ok(0, 513, 1));
        assert!(!range_ok(1, 512, 1));
        assert!(range_ok(7, 512, 8));
        assert!(!range_ok(u64::MAX, 512, 8));
        assert!(!range_ok(u64::MAX / 512, 1024, u64::MAX / 512));
        assert!(!range_ok(0, 512, u64::MAX));
    }

    #[test]
    fn config_bytes() {
        let c = BlkConfig {
            capacity: 0x1122,
            seg_max: 126,
            blk_size: 512,
            writeback: true,
            num_queues: 2,
            ..Default::default()
        };
        let b = c.to_bytes();
        assert_eq!(&b[0..8], &0x1122u64.to_le_bytes());
        assert_eq!(&b[12..16], &126u32.to_le_bytes());
        assert_eq!(b[CONFIG_WCE_OFFSET as usize], 1);
        assert_eq!(&b[34..36], &2u16.to_le_bytes());
    }
}
