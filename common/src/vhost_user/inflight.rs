//! In-flight tracking (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`): a memory region the back end
//! allocates (GET_INFLIGHT_FD) and the front end keeps across back-end restarts and hands
//! back (SET_INFLIGHT_FD), in which every request popped from a ring is marked until its used
//! element is published. A back end that starts over (after a crash) finds the requests that
//! were in flight there and resubmits them, oldest first, before taking new ones.
//!
//! The layout is libvhost-user's for split rings (QEMU's `docs/interop/vhost-user.rst`,
//! `subprojects/libvhost-user`), so the front end can hand a region from another back end
//! implementation over: per queue, a 16-byte header
//! `{ u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx }` followed by
//! `desc_num` 16-byte entries `{ u8 inflight; u8 padding[5]; u16 next; u64 counter }`; queue
//! `i` starts at `i * queue_region_size(queue_size)`, libvhost-user's stride
//! (`ALIGN_UP(16 * queue_size + 2, 64)`, which always holds the header and the entries).
//!
//! The region is shared with the front end, which may write anything into it at any time: it
//! is read and written only through vm-memory's bounds-checked volatile accessors, nothing read
//! from it is used as an index without a check, and the memfd handed out is sealed against
//! shrinking (a region handed back must be, so a front end cannot truncate it under us and
//! turn an access into SIGBUS).

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};

use thiserror::Error;
use vm_memory::mmap::MmapRegionError;
use vm_memory::{Bytes, FileOffset, MmapRegion, VolatileMemory, VolatileSlice};

/// The version a region's queue header carries once a back end used it.
pub const VERSION: u16 = 1;
/// A queue header's size.
const HEADER: usize = 16;
/// One descriptor entry's size.
const ENTRY: usize = 16;
/// libvhost-user's alignment of a queue's part of the region.
const ALIGN: u64 = 64;

/// The bytes of the region for one queue of `queue_size` entries (libvhost-user's stride).
pub fn queue_region_size(queue_size: u16) -> u64 {
    (ENTRY as u64 * u64::from(queue_size) + 2).next_multiple_of(ALIGN)
}

/// The body of GET_INFLIGHT_FD, SET_INFLIGHT_FD and of GET_INFLIGHT_FD's reply (the C struct
/// `VhostUserInflight`: 20 bytes of fields padded to 24).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InflightInfo {
    /// The region's size.
    pub mmap_size: u64,
    /// Where the region starts in its file.
    pub mmap_offset: u64,
    /// How many queues it covers.
    pub num_queues: u16,
    /// Each queue's size (the descriptor entries per queue).
    pub queue_size: u16,
}

/// The size of [`InflightInfo`] on the wire.
pub const INFO_LEN: usize = 24;

impl InflightInfo {
    /// Decodes a message body (exactly [`INFO_LEN`] bytes).
    pub fn from_bytes(b: &[u8]) -> Option<InflightInfo> {
        if b.len() != INFO_LEN {
            return None;
        }
        let u64_at = |at: usize| super::wire::u64_at(b, at).unwrap_or(0);
        Some(InflightInfo {
            mmap_size: u64_at(0),
            mmap_offset: u64_at(8),
            num_queues: u16::from_le_bytes([b[16], b[17]]),
            queue_size: u16::from_le_bytes([b[18], b[19]]),
        })
    }

    /// Encodes it as a message body.
    pub fn to_bytes(self) -> Vec<u8> {
        let mut b = Vec::with_capacity(INFO_LEN);
        b.extend_from_slice(&self.mmap_size.to_le_bytes());
        b.extend_from_slice(&self.mmap_offset.to_le_bytes());
        b.extend_from_slice(&self.num_queues.to_le_bytes());
        b.extend_from_slice(&self.queue_size.to_le_bytes());
        b.resize(INFO_LEN, 0);
        b
    }
}

/// Why an in-flight region was refused.
#[derive(Debug, Error)]
pub enum InflightError {
    /// A queue count of 0 or beyond the device's.
    #[error(
        "the in-flight region is for {got} queues; this device has {max} (1 to {max} are \
         accepted)"
    )]
    QueueCount {
        /// Queues asked for.
        got: u16,
        /// The device's queues.
        max: usize,
    },
    /// A queue size the back end does not serve.
    #[error(
        "the in-flight region is for queues of {got} entries; this back end serves powers of \
         two up to {max} (start it with a larger queue size, e.g. blkback --queue-size {got})"
    )]
    QueueSize {
        /// The size asked for.
        got: u16,
        /// The largest served.
        max: usize,
    },
    /// A region smaller than its queues need.
    #[error(
        "the in-flight region of {got} bytes is too small for {queues} queues of {queue_size} \
         entries ({want} bytes)"
    )]
    TooSmall {
        /// Its size.
        got: u64,
        /// What the queues need.
        want: u64,
        /// Queues.
        queues: u16,
        /// Queue size.
        queue_size: u16,
    },
    /// The descriptor is not a memfd sealed against shrinking.
    #[error(
        "the in-flight region's descriptor is not a memfd sealed against shrinking (the region \
         must be one a back end handed out with GET_INFLIGHT_FD)"
    )]
    NotSealed,
    /// The file is smaller than offset + size.
    #[error(
        "the in-flight region {offset:#x}+{size:#x} lies beyond the end of its file ({file} \
         bytes)"
    )]
    BeyondFile {
        /// Offset.
        offset: u64,
        /// Size.
        size: u64,
        /// The file's size.
        file: u64,
    },
    /// The region cannot be mapped.
    #[error("the in-flight region cannot be mapped: {0}")]
    Map(MmapRegionError),
    /// The memfd cannot be created.
    #[error("cannot create the in-flight region: {0}")]
    Create(io::Error),
    /// A ring larger than the region's queues: its higher heads could not be tracked.
    #[error(
        "queue {queue}: the ring has {ring_size} entries but the in-flight region tracks \
         {queue_size} per queue (the front end must ask GET_INFLIGHT_FD for its real queue size)"
    )]
    RingLarger {
        /// The queue.
        queue: usize,
        /// The ring's size (SET_VRING_NUM).
        ring_size: u16,
        /// The region's queue size.
        queue_size: u16,
    },
    /// A queue header that is not one of a split ring of this size.
    #[error(
        "queue {queue}: the in-flight region's header says version {version} with {desc_num} \
         entries; this back end wrote version {VERSION} with {queue_size} (the region is \
         garbage, or not a split-ring region)"
    )]
    Header {
        /// The queue.
        queue: usize,
        /// Its version.
        version: u16,
        /// Its entries.
        desc_num: u16,
        /// The region's queue size.
        queue_size: u16,
    },
}

/// A mapped in-flight region.
#[derive(Debug)]
pub struct InflightRegion {
    map: MmapRegion<()>,
    num_queues: u16,
    queue_size: u16,
}

/// memfd seals (linux/fcntl.h), as libc may lack some.
const F_SEAL_SEAL: libc::c_int = 0x0001;
const F_SEAL_SHRINK: libc::c_int = 0x0002;
const F_SEAL_GROW: libc::c_int = 0x0004;

impl InflightRegion {
    /// Allocates a zeroed region for `num_queues` queues of `queue_size` entries (GET_INFLIGHT_FD):
    /// the region, its descriptor for the front end, and what to answer.
    pub fn allocate(
        num_queues: u16,
        queue_size: u16,
    ) -> Result<(InflightRegion, File, InflightInfo), InflightError> {
        let size = u64::from(num_queues) * queue_region_size(queue_size);
        // SAFETY: memfd_create with a NUL-terminated name; returns a new descriptor or -1.
        let fd = unsafe {
            libc::memfd_create(
                c"vback-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(InflightError::Create(io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a new descriptor nothing else owns.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len(size).map_err(InflightError::Create)?;
        // SAFETY: fcntl(F_ADD_SEALS) on our own memfd; no memory is passed.
        let r = unsafe {
            libc::fcntl(
                file.as_raw_fd(),
                libc::F_ADD_SEALS,
                F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL,
            )
        };
        if r != 0 {
            return Err(InflightError::Create(io::Error::last_os_error()));
        }
        let info = InflightInfo {
            mmap_size: size,
            mmap_offset: 0,
            num_queues,
            queue_size,
        };
        let dup = file.try_clone().map_err(InflightError::Create)?;
        let region = InflightRegion::map(dup, &info)?;
        Ok((region, file, info))
    }

    /// Maps the region a front end handed back (SET_INFLIGHT_FD), after checking `info` against
    /// what it covers (the caller checked queue count and size against the device).
    pub fn map(file: File, info: &InflightInfo) -> Result<InflightRegion, InflightError> {
        let want = u64::from(info.num_queues) * queue_region_size(info.queue_size);
        if info.mmap_size < want {
            return Err(InflightError::TooSmall {
                got: info.mmap_size,
                want,
                queues: info.num_queues,
                queue_size: info.queue_size,
            });
        }
        // SAFETY: fcntl(F_GET_SEALS) only reads the descriptor's seals.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & F_SEAL_SHRINK == 0 {
            return Err(InflightError::NotSealed);
        }
        let file_len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let end = info.mmap_offset.checked_add(want);
        if end.is_none_or(|e| e > file_len) {
            return Err(InflightError::BeyondFile {
                offset: info.mmap_offset,
                size: want,
                file: file_len,
            });
        }
        // Map only what the queues use (the rest of a larger region is never touched).
        let len = usize::try_from(want).map_err(|_| InflightError::TooSmall {
            got: info.mmap_size,
            want,
            queues: info.num_queues,
            queue_size: info.queue_size,
        })?;
        let map = MmapRegion::<()>::from_file(FileOffset::new(file, info.mmap_offset), len)
            .map_err(InflightError::Map)?;
        Ok(InflightRegion {
            map,
            num_queues: info.num_queues,
            queue_size: info.queue_size,
        })
    }

    /// How many queues it covers.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// Its queue size.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// Whether a back end already used the region (some queue header has a version): the
    /// front end is handing over from an earlier back end.
    pub fn was_used(&self) -> bool {
        (0..usize::from(self.num_queues)).any(|q| {
            self.queue_slice(q)
                .and_then(|s| s.read_obj::<u16>(8).ok())
                .is_some_and(|v| v != 0)
        })
    }

    fn queue_slice(&self, queue: usize) -> Option<VolatileSlice<'_>> {
        let stride = usize::try_from(queue_region_size(self.queue_size)).ok()?;
        let len = HEADER + ENTRY * usize::from(self.queue_size);
        self.map.get_slice(queue.checked_mul(stride)?, len).ok()
    }
}

/// One entry found marked when a queue was set up again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Marked {
    head: u16,
    counter: u64,
}

/// What reconciling a queue's part of the region found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Replay {
    /// The heads to resubmit, oldest first.
    pub heads: Vec<u16>,
    /// Entries dropped as garbage (with why), for the log.
    pub dropped: Vec<String>,
    /// Whether the last batch had been published (its head was cleared).
    pub finished_last_batch: bool,
}

/// One queue's part of an in-flight region, attached to its vring.
#[derive(Debug)]
pub struct InflightQueue {
    region: Arc<InflightRegion>,
    queue: usize,
    /// The next counter value to give a popped request.
    counter: u64,
}

impl InflightQueue {
    /// Queue `queue`'s part of `region` (`None` when the region does not cover it).
    pub fn new(region: Arc<InflightRegion>, queue: usize) -> Option<InflightQueue> {
        (queue < usize::from(region.num_queues)).then_some(InflightQueue {
            region,
            queue,
            counter: 1,
        })
    }

    fn slice(&self) -> Option<VolatileSlice<'_>> {
        self.region.queue_slice(self.queue)
    }

    fn desc_num(&self) -> u16 {
        self.region.queue_size
    }

    /// Reads the queue's part at start (SET_VRING_KICK after SET_INFLIGHT_FD), as
    /// libvhost-user's `vu_check_queue_inflights`: a fresh part gets its header; otherwise,
    /// if the header's used index differs from the ring's (`ring_used_idx`), the last batch
    /// was published and its head is cleared; then the entries still marked are collected,
    /// checked (only heads below `ring_size`, the marks 0 and 1, unique counters) and
    /// returned oldest first.
    pub fn start(&mut self, ring_used_idx: u16, ring_size: u16) -> Result<Replay, InflightError> {
        let desc_num = self.desc_num();
        let queue = self.queue;
        if ring_size > desc_num {
            return Err(InflightError::RingLarger {
                queue,
                ring_size,
                queue_size: desc_num,
            });
        }
        let region = self.region.clone();
        let Some(s) = region.queue_slice(queue) else {
            return Ok(Replay::default());
        };
        let version = s.read_obj::<u16>(8).unwrap_or(0);
        let header_num = s.read_obj::<u16>(10).unwrap_or(0);
        if version == 0 {
            // Never used: initialise the header (the front end zeroed or we allocated it).
            let _ = s.write_obj(desc_num, 10);
            let _ = s.write_obj(ring_used_idx, 14);
            let _ = s.write_obj(0u16, 12);
            fence(Ordering::Release);
            let _ = s.write_obj(VERSION, 8);
            self.counter = 1;
            // Entries left marked by a garbage region are not ours: clear them.
            for i in 0..usize::from(desc_num) {
                let _ = s.write_obj(0u8, HEADER + ENTRY * i);
            }
            return Ok(Replay::default());
        }
        if version != VERSION || header_num != desc_num {
            return Err(InflightError::Header {
                queue,
                version,
                desc_num: header_num,
                queue_size: desc_num,
            });
        }
        let mut replay = Replay::default();
        let used_idx = s.read_obj::<u16>(14).unwrap_or(0);
        if used_idx != ring_used_idx {
            let last = s.read_obj::<u16>(12).unwrap_or(0);
            if last < desc_num {
                let _ = s.write_obj(0u8, HEADER + ENTRY * usize::from(last));
                replay.finished_last_batch = true;
            } else {
                replay.dropped.push(format!(
                    "the last batch's head {last} is beyond the queue's {desc_num} entries"
                ));
            }
            fence(Ordering::Release);
            let _ = s.write_obj(ring_used_idx, 14);
        }
        let mut marked = Vec::new();
        let mut counters = HashSet::new();
        for i in 0..desc_num {
            let at = HEADER + ENTRY * usize::from(i);
            let flag = s.read_obj::<u8>(at).unwrap_or(0);
            if flag == 0 {
                continue;
            }
            let counter = s.read_obj::<u64>(at + 8).unwrap_or(0);
            let why = if flag != 1 {
                Some(format!(
                    "head {i} is marked {flag} (only 0 and 1 are defined)"
                ))
            } else if i >= ring_size {
                Some(format!(
                    "head {i} is beyond the ring's {ring_size} descriptors"
                ))
            } else if counter == 0 {
                Some(format!("head {i} has counter 0 (counters start at 1)"))
            } else if !counters.insert(counter) {
                Some(format!(
                    "head {i} has counter {counter}, which another head has too"
                ))
            } else {
                None
            };
            match why {
                Some(why) => {
                    replay.dropped.push(why);
                    // Not ours to replay: clear it, so it does not come back.
                    let _ = s.write_obj(0u8, at);
                }
                None => marked.push(Marked { head: i, counter }),
            }
        }
        marked.sort_by_key(|m| m.counter);
        self.counter = marked.last().map_or(1, |m| m.counter.saturating_add(1));
        replay.heads = marked.into_iter().map(|m| m.head).collect();
        Ok(replay)
    }

    /// Marks `head` in flight (it was just popped): `counter`, then the mark.
    pub fn mark(&mut self, head: u16) {
        if head >= self.desc_num() {
            return;
        }
        let counter = self.counter;
        self.counter = self.counter.wrapping_add(1).max(1);
        if let Some(s) = self.slice() {
            let at = HEADER + ENTRY * usize::from(head);
            let _ = s.write_obj(counter, at + 8);
            let _ = s.write_obj(0u16, at + 6);
            fence(Ordering::Release);
            let _ = s.write_obj(1u8, at);
        }
    }

    /// Before `head`'s used element is published: it is the last batch's head.
    pub fn pre_put(&self, head: u16) {
        if let Some(s) = self.slice() {
            let _ = s.write_obj(head, 12);
            fence(Ordering::Release);
        }
    }

    /// After `head`'s used element was published with the used index now `used_idx`: the mark
    /// is cleared, then the header's used index follows the ring's.
    pub fn post_put(&self, head: u16, used_idx: u16) {
        if head >= self.desc_num() {
            return;
        }
        if let Some(s) = self.slice() {
            fence(Ordering::Release);
            let _ = s.write_obj(0u8, HEADER + ENTRY * usize::from(head));
            fence(Ordering::Release);
            let _ = s.write_obj(used_idx, 14);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poke(region: &InflightRegion, queue: usize, at: usize, bytes: &[u8]) {
        region
            .queue_slice(queue)
            .unwrap()
            .write_slice(bytes, at)
            .unwrap();
    }

    fn entry(region: &InflightRegion, queue: usize, head: u16, flag: u8, counter: u64) {
        let at = HEADER + ENTRY * usize::from(head);
        poke(region, queue, at, &[flag]);
        poke(region, queue, at + 8, &counter.to_le_bytes());
    }

    fn handed_back(num_queues: u16, queue_size: u16) -> (Arc<InflightRegion>, File) {
        let (_, file, info) = InflightRegion::allocate(num_queues, queue_size).unwrap();
        let region = InflightRegion::map(file.try_clone().unwrap(), &info).unwrap();
        (Arc::new(region), file)
    }

    #[test]
    fn the_stride_is_libvhost_users_and_holds_header_and_entries() {
        assert_eq!(queue_region_size(128), 2112);
        assert_eq!(queue_region_size(256), 4160);
        for qs in [1u16, 2, 4, 3, 7, 128, 1024, 32768] {
            assert!(queue_region_size(qs) >= (HEADER + ENTRY * usize::from(qs)) as u64);
            assert_eq!(queue_region_size(qs) % 64, 0);
        }
    }

    #[test]
    fn the_wire_struct_round_trips_in_24_bytes() {
        let i = InflightInfo {
            mmap_size: 4224,
            mmap_offset: 0,
            num_queues: 2,
            queue_size: 128,
        };
        let b = i.to_bytes();
        assert_eq!(b.len(), INFO_LEN);
        assert_eq!(InflightInfo::from_bytes(&b), Some(i));
        assert_eq!(InflightInfo::from_bytes(&b[..20]), None);
    }

    #[test]
    fn marked_requests_come_back_oldest_first_and_published_ones_do_not() {
        let (region, _file) = handed_back(1, 8);
        let mut q = InflightQueue::new(region.clone(), 0).unwrap();
        assert_eq!(q.start(0, 8).unwrap(), Replay::default());
        assert!(region.was_used());
        for head in [5, 2, 7, 1] {
            q.mark(head);
        }
        // 2 completes: used index 1.
        q.pre_put(2);
        q.post_put(2, 1);
        // 7 was published (used index 2 in the ring) but the back end died before clearing it.
        q.pre_put(7);
        // A new back end: the ring's used index is 2.
        let mut again = InflightQueue::new(region.clone(), 0).unwrap();
        let replay = again.start(2, 8).unwrap();
        assert!(replay.finished_last_batch);
        assert_eq!(replay.heads, vec![5, 1]);
        assert!(replay.dropped.is_empty());
        // New marks are younger than the replayed ones.
        again.mark(3);
        let mut third = InflightQueue::new(region, 0).unwrap();
        assert_eq!(third.start(2, 8).unwrap().heads, vec![5, 1, 3]);
    }

    #[test]
    fn garbage_entries_are_dropped_with_a_reason_and_never_replayed() {
        let (region, _file) = handed_back(1, 16);
        let mut q = InflightQueue::new(region.clone(), 0).unwrap();
        q.start(0, 16).unwrap();
        entry(&region, 0, 1, 1, 9);
        entry(&region, 0, 2, 1, 9); // duplicate counter
        entry(&region, 0, 3, 7, 10); // not a mark
        entry(&region, 0, 4, 1, 0); // counter 0
        entry(&region, 0, 12, 1, 11); // beyond a ring of 8
        entry(&region, 0, 6, 1, 5);
        // A last-batch head beyond the queue, and a used index that differs.
        poke(&region, 0, 12, &99u16.to_le_bytes());
        poke(&region, 0, 14, &77u16.to_le_bytes());
        let mut again = InflightQueue::new(region.clone(), 0).unwrap();
        let replay = again.start(0, 8).unwrap();
        assert_eq!(replay.heads, vec![6, 1]);
        assert_eq!(replay.dropped.len(), 5, "{:?}", replay.dropped);
        assert!(!replay.finished_last_batch);
        // Dropped entries were cleared: a second start sees only the valid ones.
        let mut third = InflightQueue::new(region, 0).unwrap();
        let replay = third.start(0, 8).unwrap();
        assert_eq!(replay.heads, vec![6, 1]);
        assert!(replay.dropped.is_empty());
    }

    #[test]
    fn a_header_of_another_shape_is_refused() {
        let (region, _file) = handed_back(2, 16);
        poke(&region, 1, 8, &3u16.to_le_bytes());
        let mut q = InflightQueue::new(region.clone(), 1).unwrap();
        assert!(matches!(q.start(0, 16), Err(InflightError::Header { .. })));
        poke(&region, 1, 8, &1u16.to_le_bytes());
        poke(&region, 1, 10, &64u16.to_le_bytes());
        assert!(matches!(q.start(0, 16), Err(InflightError::Header { .. })));
        assert!(InflightQueue::new(region.clone(), 2).is_none());
        // A ring larger than the region tracks is refused (its high heads could not be marked).
        let mut q0 = InflightQueue::new(region, 0).unwrap();
        assert!(matches!(
            q0.start(0, 32),
            Err(InflightError::RingLarger { ring_size: 32, .. })
        ));
    }

    #[test]
    fn regions_too_small_unsealed_or_short_files_are_refused() {
        let (_, file, info) = InflightRegion::allocate(2, 128).unwrap();
        let small = InflightInfo {
            mmap_size: info.mmap_size - 1,
            ..info
        };
        assert!(matches!(
            InflightRegion::map(file.try_clone().unwrap(), &small),
            Err(InflightError::TooSmall { .. })
        ));
        let more = InflightInfo {
            num_queues: 3,
            mmap_size: 3 * queue_region_size(128),
            ..info
        };
        assert!(matches!(
            InflightRegion::map(file.try_clone().unwrap(), &more),
            Err(InflightError::BeyondFile { .. })
        ));
        let tmp = tempfile::tempfile().unwrap();
        tmp.set_len(info.mmap_size).unwrap();
        assert!(matches!(
            InflightRegion::map(tmp, &info),
            Err(InflightError::NotSealed)
        ));
        // The front end cannot shrink what we handed out.
        assert!(file.set_len(0).is_err());
    }
}
