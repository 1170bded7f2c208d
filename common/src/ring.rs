//! A split virtqueue served through direct pointers into guest memory: the data path's fast path.
//!
//! virtio-queue's `Queue` resolves every ring access through vm-memory (a region lookup and a
//! bounds-checked copy per field), publishes the used index on every `add_used` and ignores the
//! driver's `VRING_AVAIL_F_NO_INTERRUPT`. A queue moving millions of frames a second pays for
//! that on every frame. [`SplitRing`] is made from a `Queue`'s state at the start of a burst: it
//! checks once that the three rings lie inside guest memory and are aligned, then reads the
//! avail ring and the descriptors and writes the used ring through pointers, publishes the used
//! index once per batch ([`SplitRing::publish`]), and honours the driver's notification
//! suppression (EVENT_IDX's `used_event`, or `VRING_AVAIL_F_NO_INTERRUPT`). At the end of the
//! burst [`SplitRing::finish`] puts the indices back into the `Queue`, so GET_VRING_BASE and
//! everything else that reads the `Queue` stays right.
//!
//! Guest buffers are resolved through [`HostMap`]: a range must lie inside one memory region,
//! and the region of the last hit is tried first. Everything a driver wrote is read once into a
//! local copy before it is used, so a driver changing a descriptor under the device can only
//! hurt its own frames.
//!
//! While the front end logs dirty pages (live migration), a ring made
//! [`SplitRing::with_log`] the vring's [`VringLog`] logs what it writes where it publishes it:
//! [`SplitRing::push_used`] logs the chain's device-writable buffers (walked again: the data
//! was written into them) and the used element, [`SplitRing::publish`] the used index, the
//! notification calls the fields they write.

use std::cell::Cell;
use std::num::Wrapping;
use std::sync::atomic::{AtomicU16, Ordering, fence};

use thiserror::Error;

use crate::vhost_user::VringLog;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};

/// `VRING_DESC_F_NEXT`.
const F_NEXT: u16 = 1;
/// `VRING_DESC_F_WRITE`.
#[cfg(test)]
const F_WRITE: u16 = 2;
/// `VRING_DESC_F_INDIRECT`.
const F_INDIRECT: u16 = 4;
/// `VRING_AVAIL_F_NO_INTERRUPT`.
const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// `VRING_USED_F_NO_NOTIFY`.
const USED_F_NO_NOTIFY: u16 = 1;

/// Why a queue cannot be served.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum RingError {
    /// The driver has not set the queue up (or reset it).
    #[error("the queue is not ready")]
    NotReady,
    /// A size of 0 or not a power of two.
    #[error("queue size {0} is not a power of two")]
    BadSize(u16),
    /// A ring outside guest memory, across two regions, or misaligned.
    #[error(
        "the {ring} at guest address {addr:#x} ({len} bytes) is not inside one guest memory region with {align}-byte alignment"
    )]
    BadRing {
        /// "descriptor table", "avail ring" or "used ring".
        ring: &'static str,
        /// Its guest address.
        addr: u64,
        /// Its length for this queue size.
        len: u64,
        /// The alignment the spec requires.
        align: u64,
    },
}

/// Why a descriptor chain was refused (the caller returns it to the driver empty).
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum ChainError {
    /// The avail ring named a descriptor past the table.
    #[error("the avail ring names descriptor {0}, past the queue")]
    BadHead(u16),
    /// A `next` past the table.
    #[error("a descriptor's next index {0} lies past the queue")]
    BadNext(u16),
    /// More descriptors than the queue holds: the chain loops.
    #[error("a descriptor chain longer than the queue (a loop)")]
    Loop,
    /// More descriptors than the caller takes.
    #[error("a descriptor chain of more than {0} descriptors")]
    TooLong(usize),
    /// An indirect table of a bad length, outside guest memory, or inside another one.
    #[error("a bad indirect descriptor table")]
    BadIndirect,
}

impl ChainError {
    /// The reason as a fixed sentence (for drop counters that keep the last reason).
    pub fn what(&self) -> &'static str {
        match self {
            ChainError::BadHead(_) => "the avail ring names a descriptor past the queue",
            ChainError::BadNext(_) => "a descriptor's next index lies past the queue",
            ChainError::Loop => "a descriptor chain longer than the queue (a loop)",
            ChainError::TooLong(_) => "a descriptor chain of too many descriptors",
            ChainError::BadIndirect => "a bad indirect descriptor table",
        }
    }
}

/// Guest memory as host ranges. Pointers from [`HostMap::get`] stay valid while the memory it
/// was made from is alive (the borrow).
pub struct HostMap<'m> {
    mem: &'m GuestMemoryMmap<()>,
    last: Cell<(u64, u64, *mut u8)>,
}

impl std::fmt::Debug for HostMap<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostMap")
            .field("regions", &self.mem.num_regions())
            .finish()
    }
}

impl<'m> HostMap<'m> {
    /// A map of `mem`.
    pub fn new(mem: &'m GuestMemoryMmap<()>) -> Self {
        HostMap {
            mem,
            last: Cell::new((0, 0, std::ptr::null_mut())),
        }
    }

    /// The memory behind the map.
    pub fn mem(&self) -> &'m GuestMemoryMmap<()> {
        self.mem
    }

    /// The host address of guest range `gpa..gpa + len`, if it lies inside one region (a
    /// zero-length range must start inside one).
    #[inline]
    pub fn get(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        let (start, end, host) = self.last.get();
        let stop = gpa.checked_add(len)?;
        if gpa >= start && stop <= end && gpa < end {
            // `gpa - start` is inside the region that `host` maps.
            return Some(host.wrapping_add((gpa - start) as usize));
        }
        self.lookup(gpa, stop)
    }

    #[cold]
    fn lookup(&self, gpa: u64, stop: u64) -> Option<*mut u8> {
        let r = self.mem.find_region(GuestAddress(gpa))?;
        let start = r.start_addr().0;
        let end = start.checked_add(r.len())?;
        let host = r.get_host_address(MemoryRegionAddress(0)).ok()?;
        self.last.set((start, end, host));
        (stop <= end).then(|| host.wrapping_add((gpa - start) as usize))
    }

    /// Copies `buf.len()` bytes from guest address `gpa`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        let Some(p) = self.get(gpa, buf.len() as u64) else {
            return false;
        };
        // SAFETY: `p..p + buf.len()` lies inside one mapped region (checked by `get`) that the
        // borrowed memory keeps mapped; `buf` is a distinct local buffer.
        unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), buf.len()) };
        true
    }

    /// Copies `data` to guest address `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> bool {
        let Some(p) = self.get(gpa, data.len() as u64) else {
            return false;
        };
        // SAFETY: as in `read`; the region is mapped writable (guest RAM always is).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        true
    }
}

impl HostMap<'_> {
    /// Appends the host ranges of `descs` to `iov`; every descriptor must be device-writable
    /// (`writable`) or device-readable (not), and inside guest memory. Returns the bytes they
    /// cover. Zero-length descriptors are skipped.
    pub fn iovecs(
        &self,
        descs: &[Descriptor],
        writable: bool,
        iov: &mut Vec<libc::iovec>,
        max: usize,
    ) -> Result<u64, &'static str> {
        let mut total = 0u64;
        for d in descs {
            if d.is_write_only() != writable {
                return Err(if writable {
                    "a receive chain with a device-readable descriptor"
                } else {
                    "a transmit chain with a device-writable descriptor"
                });
            }
            let len = u64::from(d.len());
            if len == 0 {
                continue;
            }
            let p = self
                .get(d.addr().0, len)
                .ok_or("a descriptor outside guest memory")?;
            if iov.len() == max {
                return Err("a chain of too many buffers");
            }
            iov.push(libc::iovec {
                iov_base: p.cast(),
                iov_len: len as usize,
            });
            total += len;
        }
        Ok(total)
    }
}

/// Walks bytes `offset..offset + len` of the stream `iov` describes: `f(segment, done, n)` for
/// each piece, `segment` the piece's start, `done` the bytes before it. False if the stream is
/// shorter.
fn iov_walk(
    iov: &[libc::iovec],
    offset: usize,
    len: usize,
    mut f: impl FnMut(*mut u8, usize, usize),
) -> bool {
    let mut skip = offset;
    let mut done = 0;
    for v in iov {
        if done == len {
            break;
        }
        if skip >= v.iov_len {
            skip -= v.iov_len;
            continue;
        }
        let n = (v.iov_len - skip).min(len - done);
        f(v.iov_base.cast::<u8>().wrapping_add(skip), done, n);
        done += n;
        skip = 0;
    }
    done == len
}

/// Copies bytes `offset..offset + buf.len()` of the stream `iov` describes into `buf`; false
/// if the stream is shorter.
///
/// # Safety
/// Every iovec must describe readable memory that stays mapped during the call (as
/// [`HostMap::iovecs`] makes them, while the map's memory lives).
pub unsafe fn iov_read(iov: &[libc::iovec], offset: usize, buf: &mut [u8]) -> bool {
    let to = buf.as_mut_ptr();
    iov_walk(iov, offset, buf.len(), |seg, done, n| {
        // SAFETY: `seg..seg + n` lies in a readable mapped iovec (the caller's promise) and
        // `done + n <= buf.len()` (iov_walk's contract).
        unsafe { std::ptr::copy_nonoverlapping(seg, to.wrapping_add(done), n) }
    })
}

/// Copies `data` to bytes `offset..` of the stream `iov` describes; false if it is shorter.
///
/// # Safety
/// Every iovec must describe writable memory that stays mapped during the call (as
/// [`HostMap::iovecs`] makes them, while the map's memory lives).
pub unsafe fn iov_write(iov: &[libc::iovec], offset: usize, data: &[u8]) -> bool {
    let from = data.as_ptr();
    iov_walk(iov, offset, data.len(), |seg, done, n| {
        // SAFETY: `seg..seg + n` lies in a writable mapped iovec (the caller's promise) and
        // `done + n <= data.len()` (iov_walk's contract).
        unsafe { std::ptr::copy_nonoverlapping(from.wrapping_add(done), seg, n) }
    })
}

/// A split virtqueue for one burst (see the module documentation).
pub struct SplitRing<'m> {
    map: HostMap<'m>,
    desc: *const u8,
    avail: *const u8,
    used: *mut u8,
    size: u16,
    event_idx: bool,
    next_avail: Wrapping<u16>,
    next_used: Wrapping<u16>,
    /// The avail index last read.
    avail_idx: Wrapping<u16>,
    /// The used index last published.
    published: Wrapping<u16>,
    /// The used index at the last notification decision.
    checked: Wrapping<u16>,
    /// The driver's avail index was more than a queue ahead of the device (see
    /// [`SplitRing::broken_avail`]).
    broken: Option<u16>,
    /// The dirty log while the front end logs.
    log: Option<VringLog>,
}

impl std::fmt::Debug for SplitRing<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SplitRing")
            .field("size", &self.size)
            .field("next_avail", &self.next_avail)
            .field("next_used", &self.next_used)
            .finish_non_exhaustive()
    }
}

impl<'m> SplitRing<'m> {
    /// The ring of `queue` in `mem`, positioned where the queue is.
    pub fn new(queue: &Queue, mem: &'m GuestMemoryMmap<()>) -> Result<Self, RingError> {
        if !queue.ready() {
            return Err(RingError::NotReady);
        }
        let size = queue.size();
        if size == 0 || !size.is_power_of_two() {
            return Err(RingError::BadSize(size));
        }
        let map = HostMap::new(mem);
        let n = u64::from(size);
        let place = |ring: &'static str, addr: u64, len: u64, align: u64| {
            map.get(addr, len)
                .filter(|_| addr.is_multiple_of(align))
                .ok_or(RingError::BadRing {
                    ring,
                    addr,
                    len,
                    align,
                })
        };
        let desc = place("descriptor table", queue.desc_table(), 16 * n, 16)?;
        let avail = place("avail ring", queue.avail_ring(), 6 + 2 * n, 2)?;
        let used = place("used ring", queue.used_ring(), 6 + 8 * n, 4)?;
        let next_avail = Wrapping(queue.next_avail());
        let next_used = Wrapping(queue.next_used());
        Ok(SplitRing {
            map,
            desc,
            avail,
            used,
            size,
            event_idx: queue.event_idx_enabled(),
            next_avail,
            next_used,
            avail_idx: next_avail,
            published: next_used,
            checked: next_used,
            broken: None,
            log: None,
        })
    }

    /// Logs every write the ring makes into guest memory in `log` (the vring's
    /// [`crate::vhost_user::VringState::dirty_log`]; `None`: nothing is logged).
    pub fn with_log(mut self, log: Option<&VringLog>) -> Self {
        self.log = log.cloned();
        self
    }

    /// Guest memory as host ranges, for the buffers.
    pub fn map(&self) -> &HostMap<'m> {
        &self.map
    }

    /// The queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    fn avail_idx_atomic(&self) -> &AtomicU16 {
        // SAFETY: the avail ring lies inside a mapped region (checked in `new`) that the borrow
        // keeps mapped, and is 2-byte aligned, so its `idx` at offset 2 is an aligned u16 that
        // the driver also accesses atomically.
        unsafe { AtomicU16::from_ptr(self.avail.wrapping_add(2).cast::<u16>().cast_mut()) }
    }

    fn avail_u16(&self, off: usize) -> u16 {
        // SAFETY: callers pass offsets inside the avail ring (checked in `new`: 6 + 2 × size
        // bytes), which is 2-byte aligned and mapped while the borrow lives.
        u16::from_le(unsafe { self.avail.wrapping_add(off).cast::<u16>().read_volatile() })
    }

    fn used_u16(&self, off: usize) -> &AtomicU16 {
        // SAFETY: callers pass offsets inside the used ring (6 + 8 × size bytes, checked in
        // `new`), which is 4-byte aligned and mapped while the borrow lives.
        unsafe { AtomicU16::from_ptr(self.used.wrapping_add(off).cast::<u16>()) }
    }

    /// Reads the driver's avail index (acquire: the entries it covers are visible after) and
    /// returns the chains it makes available. An index more than a queue ahead of the device
    /// is a broken driver: nothing is available then (see [`SplitRing::broken_avail`]).
    pub fn refresh(&mut self) -> u16 {
        let idx = Wrapping(u16::from_le(
            self.avail_idx_atomic().load(Ordering::Acquire),
        ));
        let n = (idx - self.next_avail).0;
        if n > self.size {
            self.broken = Some(idx.0);
            self.avail_idx = self.next_avail;
            return 0;
        }
        self.avail_idx = idx;
        n
    }

    /// The avail index the driver published if it claimed more chains than the queue holds
    /// (the queue then serves nothing until the driver resets it).
    pub fn broken_avail(&self) -> Option<u16> {
        self.broken
    }

    /// Chains the driver made available and the device has not taken, as of the last read of
    /// the avail index; reads it again when none are left.
    #[inline]
    pub fn pending(&mut self) -> u16 {
        let n = (self.avail_idx - self.next_avail).0;
        if n != 0 { n } else { self.refresh() }
    }

    /// Takes the next available chain: its descriptors (indirect tables followed) go to `out`,
    /// at most `max` of them. `None` when the ring is empty. On `Err` the chain is still taken:
    /// return it with [`SplitRing::push_used`] and length 0.
    pub fn pop(
        &mut self,
        out: &mut Vec<Descriptor>,
        max: usize,
    ) -> Option<(u16, Result<(), ChainError>)> {
        if self.pending() == 0 {
            return None;
        }
        let slot = usize::from(self.next_avail.0 & (self.size - 1));
        let head = self.avail_u16(4 + 2 * slot);
        self.next_avail += Wrapping(1);
        out.clear();
        let r = self.walk(head, out, max);
        Some((head, r))
    }

    /// Puts the last `n` taken chains back (they will be taken again).
    pub fn unpop(&mut self, n: u16) {
        self.next_avail -= Wrapping(n);
    }

    fn read_desc(&self, table: *const u8, i: u16) -> Descriptor {
        // SAFETY: callers pass indices inside `table`, which lies inside one mapped region kept
        // mapped by the borrow (the ring's table: checked in `new`; an indirect table: checked
        // by `HostMap::get` in `walk`). The read is unaligned-safe and copies the 16 bytes out.
        let raw: [u8; 16] = unsafe {
            table
                .wrapping_add(16 * usize::from(i))
                .cast::<[u8; 16]>()
                .read_unaligned()
        };
        let u64_at = |o: usize| u64::from_le_bytes(raw[o..o + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |o: usize| u32::from_le_bytes(raw[o..o + 4].try_into().unwrap_or([0; 4]));
        let u16_at = |o: usize| u16::from_le_bytes([raw[o], raw[o + 1]]);
        Descriptor::new(u64_at(0), u32_at(8), u16_at(12), u16_at(14))
    }

    fn walk(&self, head: u16, out: &mut Vec<Descriptor>, max: usize) -> Result<(), ChainError> {
        if head >= self.size {
            return Err(ChainError::BadHead(head));
        }
        let mut table = self.desc;
        let mut table_len = self.size;
        let mut indirect = false;
        let mut i = head;
        let mut seen = 0u32;
        loop {
            let d = self.read_desc(table, i);
            seen += 1;
            if d.flags() & F_INDIRECT != 0 {
                // Only one indirect table per chain, not inside another one, and not chained.
                if indirect || d.flags() & F_NEXT != 0 || !out.is_empty() {
                    return Err(ChainError::BadIndirect);
                }
                let len = u64::from(d.len());
                if len == 0 || !len.is_multiple_of(16) || len / 16 > 65536 {
                    return Err(ChainError::BadIndirect);
                }
                table = self
                    .map
                    .get(d.addr().0, len)
                    .ok_or(ChainError::BadIndirect)?;
                table_len = u16::try_from(len / 16).unwrap_or(u16::MAX);
                indirect = true;
                i = 0;
                seen = 0;
                continue;
            }
            if out.len() == max {
                return Err(ChainError::TooLong(max));
            }
            out.push(d);
            if d.flags() & F_NEXT == 0 {
                return Ok(());
            }
            if seen >= u32::from(table_len) {
                return Err(ChainError::Loop);
            }
            i = d.next();
            if i >= table_len {
                return Err(ChainError::BadNext(i));
            }
        }
    }

    /// Returns chain `head` to the driver with `len` bytes written. Not visible to the driver
    /// until [`SplitRing::publish`].
    #[inline]
    pub fn push_used(&mut self, head: u16, len: u32) {
        let slot = usize::from(self.next_used.0 & (self.size - 1));
        let at = self.used.wrapping_add(4 + 8 * slot);
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        // SAFETY: `slot < size`, so the 8 bytes at `4 + 8 × slot` lie inside the used ring
        // (checked in `new`, mapped while the borrow lives); the driver does not read the
        // element before the index store in `publish` covers it.
        unsafe { at.cast::<[u8; 8]>().write_volatile(elem) };
        self.next_used += Wrapping(1);
        if let Some(log) = &self.log {
            let mut descs = Vec::new();
            // A chain that cannot be walked now was returned without data (or the driver broke
            // it since): what could be walked is logged.
            let _ = self.walk(head, &mut descs, usize::from(self.size));
            for d in descs.iter().filter(|d| d.is_write_only()) {
                log.buffer(d.addr().0, u64::from(d.len()));
            }
            log.used_elem(slot as u16);
        }
    }

    /// Chains returned and not yet published, or published but not yet considered for a
    /// notification.
    pub fn unnotified(&self) -> u16 {
        (self.next_used - self.checked).0
    }

    /// Makes the returned chains visible to the driver (release: the elements before the index).
    #[inline]
    pub fn publish(&mut self) {
        if self.published != self.next_used {
            self.used_u16(2)
                .store(self.next_used.0.to_le(), Ordering::Release);
            self.published = self.next_used;
            if let Some(log) = &self.log {
                log.used_idx();
            }
        }
    }

    /// Publishes, then says whether the driver wants an interrupt for what was returned since
    /// the last call (EVENT_IDX's `used_event`, else the `NO_INTERRUPT` flag).
    pub fn needs_notification(&mut self) -> bool {
        self.publish();
        if self.checked == self.next_used {
            return false;
        }
        // The used index store before the driver's fields are read (pairs with the driver's
        // barrier between writing `used_event` and reading the used index).
        fence(Ordering::SeqCst);
        let old = self.checked;
        self.checked = self.next_used;
        if self.event_idx {
            let event = Wrapping(self.avail_u16(4 + 2 * usize::from(self.size)));
            // virtio's vring_need_event: notify if `event` lies in [old, new).
            (self.next_used - event - Wrapping(1)) < (self.next_used - old)
        } else {
            self.avail_u16(0) & AVAIL_F_NO_INTERRUPT == 0
        }
    }

    /// Asks the driver to notify about new chains; true if chains arrived meanwhile (the caller
    /// then serves them, and may disable notifications again).
    pub fn enable_notification(&mut self) -> bool {
        if self.event_idx {
            let off = 4 + 8 * usize::from(self.size);
            self.used_u16(off)
                .store(self.next_avail.0.to_le(), Ordering::Relaxed);
            if let Some(log) = &self.log {
                log.avail_event(self.size);
            }
        } else {
            self.used_u16(0).store(0, Ordering::Relaxed);
            if let Some(log) = &self.log {
                log.used_flags();
            }
        }
        // The write above before the avail index read (pairs with the driver's barrier between
        // writing the avail index and reading the device's field).
        fence(Ordering::SeqCst);
        self.refresh() != 0
    }

    /// Asks the driver not to notify (without EVENT_IDX; with it, notifications stop by
    /// themselves after one).
    pub fn disable_notification(&mut self) {
        if !self.event_idx {
            self.used_u16(0)
                .store(USED_F_NO_NOTIFY.to_le(), Ordering::Relaxed);
            if let Some(log) = &self.log {
                log.used_flags();
            }
        }
    }

    /// Publishes and puts the indices back into `queue` (which the ring was made from).
    pub fn finish(mut self, queue: &mut Queue) {
        self.publish();
        queue.set_next_avail(self.next_avail.0);
        queue.set_next_used(self.next_used.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{MockQueue, WRITE};
    use crate::vhost_user::VringT;
    use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryAtomic};

    fn setup(size: u16) -> (GuestMemoryAtomic<GuestMemoryMmap<()>>, MockQueue) {
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40000)]).unwrap(),
        );
        let q = MockQueue::new(&mem, size, 0x10000);
        (mem, q)
    }

    #[test]
    fn writes_are_logged_while_the_front_end_logs() {
        use crate::vhost_user::dirty_log::tests::{bytes, memfd};
        use crate::vhost_user::{DirtyLog, VringLog};
        let (mem, mut q) = setup(8);
        let m = mem.memory().into_inner();
        let h1 = q.publish(&[(0x1000, 12, 0), (0x2000, 64, 0)]);
        let h2 = q.publish(&[(0x3000, 16, 0), (0x3800, 0x1000, WRITE)]);
        let f = memfd(8);
        let log = VringLog {
            log: std::sync::Arc::new(DirtyLog::map(&f, 8, 0).unwrap()),
            used: Some(0x18000),
        };
        let mut st = q.vring.get_mut();
        let mut ring = SplitRing::new(st.get_queue(), &m)
            .unwrap()
            .with_log(Some(&log));
        let mut d = Vec::new();
        assert!(ring.pop(&mut d, 8).is_some());
        assert!(ring.pop(&mut d, 8).is_some());
        ring.push_used(h1, 0);
        assert_eq!(
            bytes(&f, 0, 8),
            [0, 0, 0, 1, 0, 0, 0, 0],
            "the used element only"
        );
        ring.push_used(h2, 0x1000);
        ring.enable_notification();
        ring.finish(st.get_queue_mut());
        // The written buffer (pages 3 and 4; not the read-only ones at pages 1-3) and the
        // used ring (page 0x18).
        assert_eq!(bytes(&f, 0, 8), [0b1_1000, 0, 0, 1, 0, 0, 0, 0]);
        // Without a log nothing is marked.
        f.set_len(0).unwrap();
        f.set_len(8).unwrap();
        let h3 = {
            drop(st);
            q.publish(&[(0x5000, 16, WRITE)])
        };
        let mut st = q.vring.get_mut();
        let mut ring = SplitRing::new(st.get_queue(), &m).unwrap();
        assert!(ring.pop(&mut d, 8).is_some());
        ring.push_used(h3, 16);
        ring.finish(st.get_queue_mut());
        assert_eq!(bytes(&f, 0, 8), [0; 8]);
    }

    #[test]
    fn pops_publishes_and_writes_back() {
        let (mem, mut q) = setup(8);
        let m = mem.memory().into_inner();
        let h1 = q.publish(&[(0x1000, 12, 0), (0x2000, 64, 0)]);
        let h2 = q.publish(&[(0x3000, 1500, WRITE)]);
        let st = q.vring.get_mut();
        let mut ring = SplitRing::new(st.get_queue(), &m).unwrap();
        let mut d = Vec::new();
        let (head, r) = ring.pop(&mut d, 8).unwrap();
        assert_eq!((head, r), (h1, Ok(())));
        assert_eq!(d.len(), 2);
        assert_eq!((d[1].addr().0, d[1].len()), (0x2000, 64));
        let (head, r) = ring.pop(&mut d, 8).unwrap();
        assert_eq!((head, r), (h2, Ok(())));
        assert!(d[0].is_write_only());
        assert!(ring.pop(&mut d, 8).is_none());
        ring.push_used(h1, 0);
        ring.push_used(h2, 76);
        drop(st);
        // Not visible before publish.
        assert_eq!(q.used_idx(), 0);
        let mut st = q.vring.get_mut();
        let mut ring = SplitRing::new(st.get_queue(), &m).unwrap();
        assert!(ring.pop(&mut d, 8).is_some());
        ring.push_used(h1, 0);
        ring.push_used(h2, 76);
        ring.finish(st.get_queue_mut());
        assert_eq!(
            (st.get_queue().next_avail(), st.get_queue().next_used()),
            (1, 2)
        );
        drop(st);
        assert_eq!(q.used_idx(), 2);
        assert_eq!(q.used(1), (u32::from(h2), 76));
    }

    #[test]
    fn hostile_chains_are_refused() {
        let (mem, mut q) = setup(8);
        let m = mem.memory().into_inner();
        // A loop: descriptor 0 → 1 → 0.
        q.set_next_desc(0);
        q.publish(&[(0x1000, 10, 0), (0x2000, 10, 0)]);
        let table = 0x10000u64;
        m.write_obj(0u16, GuestAddress(table + 16 + 14)).unwrap();
        m.write_obj(1u16, GuestAddress(table + 16 + 12)).unwrap();
        // A head past the queue.
        let avail = q.avail_addr();
        m.write_obj(9u16, GuestAddress(avail + 4 + 2)).unwrap();
        m.write_obj(2u16, GuestAddress(avail + 2)).unwrap();
        let st = q.vring.get_mut();
        let mut ring = SplitRing::new(st.get_queue(), &m).unwrap();
        let mut d = Vec::new();
        assert_eq!(ring.pop(&mut d, 64).unwrap().1, Err(ChainError::Loop));
        assert_eq!(ring.pop(&mut d, 64).unwrap().1, Err(ChainError::BadHead(9)));
        drop(st);
        // Too long for the caller, and a next index past the queue.
        let (mem, mut q) = setup(8);
        let m = mem.memory().into_inner();
        q.publish(&[(0x1000, 10, 0), (0x2000, 10, 0), (0x3000, 10, 0)]);
        q.publish(&[(0x1000, 10, 0), (0x2000, 10, 0)]);
        m.write_obj(200u16, GuestAddress(table + 3 * 16 + 14))
            .unwrap();
        let st = q.vring.get_mut();
        let mut ring = SplitRing::new(st.get_queue(), &m).unwrap();
        assert_eq!(ring.pop(&mut d, 2).unwrap().1, Err(ChainError::TooLong(2)));
        assert_eq!(
            ring.pop(&mut d, 64).unwrap().1,
            Err(ChainError::BadNext(200))
        );
    }

    #[test]
    fn an_avail_index_more_than_a_queue_ahead_serves_nothing() {
        let (mem, mut q) = setup(8);
        let m = mem.memory().into_inner();
        q.publish(&[(0x1000, 12, 0)]);
        m.write_obj(9u16, GuestAddress(q.avail_addr() + 2)).unwrap();
        let st = q.vring.get_mut();
        let mut ring = SplitRing::new(st.get_queue(), &m).unwrap();
        assert!(ring.pop(&mut Vec::new(), 8).is_none());
        assert!(
            !ring.enable_notification(),
            "no busy loop on a broken index"
        );
        assert_eq!(ring.broken_avail(), Some(9));
    }

    #[test]
    fn indirect_tables() {
        let (mem, mut q) = setup(8);
        let m = mem.memory().into_inner();
        // An indirect table of two descriptors at 0x5000.
        let raw = |addr: u64, len: u32, flags: u16, next: u16| {
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&addr.to_le_bytes());
            b[8..12].copy_from_slice(&len.to_le_bytes());
            b[12..14].copy_from_slice(&flags.to_le_bytes());
            b[14..].copy_from_slice(&next.to_le_bytes());
            b
        };
        m.write_slice(&raw(0x1000, 12, F_NEXT, 1), GuestAddress(0x5000))
            .unwrap();
        m.write_slice(&raw(0x2000, 60, 0, 0), GuestAddress(0x5010))
            .unwrap();
        q.publish(&[(0x5000, 32, F_INDIRECT)]);
        // An indirect table outside memory, and one of a bad length.
        q.publish(&[(0x7fff_0000, 32, F_INDIRECT)]);
        q.publish(&[(0x5000, 20, F_INDIRECT)]);
        // A table whose entry points back to itself.
        m.write_slice(&raw(0x1000, 12, F_NEXT, 0), GuestAddress(0x6000))
            .unwrap();
        q.publish(&[(0x6000, 16, F_INDIRECT)]);
        let st = q.vring.get_mut();
        let mut ring = SplitRing::new(st.get_queue(), &m).unwrap();
        let mut d = Vec::new();
        assert_eq!(ring.pop(&mut d, 8).unwrap().1, Ok(()));
        assert_eq!(d.len(), 2);
        assert_eq!((d[1].addr().0, d[1].len()), (0x2000, 60));
        assert_eq!(ring.pop(&mut d, 8).unwrap().1, Err(ChainError::BadIndirect));
        assert_eq!(ring.pop(&mut d, 8).unwrap().1, Err(ChainError::BadIndirect));
        assert_eq!(ring.pop(&mut d, 8).unwrap().1, Err(ChainError::Loop));
    }

    #[test]
    fn notification_suppression() {
        let (mem, mut q) = setup(8);
        let m = mem.memory().into_inner();
        let avail = q.avail_addr();
        let h = q.publish(&[(0x3000, 100, WRITE)]);
        let mut st = q.vring.get_mut();
        // No EVENT_IDX: the NO_INTERRUPT flag decides.
        let mut ring = SplitRing::new(st.get_queue(), &m).unwrap();
        assert!(!ring.needs_notification(), "nothing returned yet");
        assert_eq!(ring.pop(&mut Vec::new(), 8).unwrap().1, Ok(()));
        ring.push_used(h, 1);
        m.write_obj(AVAIL_F_NO_INTERRUPT, GuestAddress(avail))
            .unwrap();
        assert!(!ring.needs_notification());
        m.write_obj(0u16, GuestAddress(avail)).unwrap();
        ring.push_used(h, 1);
        assert!(ring.needs_notification());
        // Notifications from the driver: the used ring's flags.
        ring.disable_notification();
        let used = 0x10000 + 0x8000;
        assert_eq!(m.read_obj::<u16>(GuestAddress(used)).unwrap(), 1);
        assert!(!ring.enable_notification());
        assert_eq!(m.read_obj::<u16>(GuestAddress(used)).unwrap(), 0);
        ring.finish(st.get_queue_mut());

        // EVENT_IDX: notify when used_event lies in [old, new).
        st.get_queue_mut().set_event_idx(true);
        let mut ring = SplitRing::new(st.get_queue(), &m).unwrap();
        let used_event = avail + 4 + 2 * 8;
        m.write_obj(5u16, GuestAddress(used_event)).unwrap(); // once entry 5 is used
        ring.push_used(h, 1);
        ring.push_used(h, 1); // used index 2 → 4
        assert!(!ring.needs_notification());
        ring.push_used(h, 1); // → 5
        assert!(!ring.needs_notification());
        ring.push_used(h, 1); // → 6: entry 5 is out, which the driver asked about
        assert!(ring.needs_notification());
        ring.push_used(h, 1);
        assert!(!ring.needs_notification(), "already told about index 5");
        // The device's avail_event asks for a kick at next_avail; true if chains came meanwhile.
        assert!(!ring.enable_notification());
        assert_eq!(
            m.read_obj::<u16>(GuestAddress(used + 4 + 8 * 8)).unwrap(),
            1
        );
        drop(st);
        q.publish(&[(0x3000, 100, WRITE)]);
        let st = q.vring.get_mut();
        let mut ring = SplitRing::new(st.get_queue(), &m).unwrap();
        assert!(ring.enable_notification());
    }

    #[test]
    fn rings_outside_memory_or_misaligned_are_refused() {
        let (mem, q) = setup(8);
        let m = mem.memory().into_inner();
        let mut st = q.vring.get_mut();
        st.get_queue_mut().set_ready(false);
        assert_eq!(
            SplitRing::new(st.get_queue(), &m).unwrap_err(),
            RingError::NotReady
        );
        st.get_queue_mut().set_ready(true);
        st.get_queue_mut()
            .set_used_ring_address(Some(0x3ffe0), Some(0));
        let e = SplitRing::new(st.get_queue(), &m).unwrap_err();
        assert!(
            matches!(
                e,
                RingError::BadRing {
                    ring: "used ring",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("0x3ffe0"), "{e}");
    }

    #[test]
    fn host_map_ranges() {
        let m = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x2000), 0x1000),
        ])
        .unwrap();
        let map = HostMap::new(&m);
        assert!(map.get(0x0, 0x1000).is_some());
        assert!(map.get(0xf00, 0x200).is_none(), "across the end");
        assert!(map.get(0x1800, 4).is_none(), "in the hole");
        assert!(map.get(0x2ffc, 4).is_some());
        assert!(map.get(0x2ffc, 8).is_none());
        assert!(map.get(u64::MAX - 2, 8).is_none());
        assert!(map.write(0x2010, b"abc"));
        let mut b = [0u8; 3];
        assert!(map.read(0x2010, &mut b));
        assert_eq!(&b, b"abc");
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x2011)).unwrap(), b'b');

        let descs = [
            Descriptor::new(0x2000, 3, F_WRITE, 0),
            Descriptor::new(0x100, 0, F_WRITE, 0),
            Descriptor::new(0x2100, 5, F_WRITE, 0),
        ];
        let mut iov = Vec::new();
        assert_eq!(map.iovecs(&descs, true, &mut iov, 8), Ok(8));
        assert_eq!(iov.len(), 2, "the empty descriptor is skipped");
        assert!(map.iovecs(&descs, false, &mut Vec::new(), 8).is_err());
        assert!(map.iovecs(&descs, true, &mut Vec::new(), 1).is_err());
        let out = [Descriptor::new(0x1ff0, 0x20, F_WRITE, 0)];
        assert_eq!(
            map.iovecs(&out, true, &mut Vec::new(), 8),
            Err("a descriptor outside guest memory")
        );
        // SAFETY: the iovecs come from `map.iovecs` over `m`, alive and writable.
        let ok = unsafe { iov_write(&iov, 2, b"XYZW") };
        assert!(ok);
        // SAFETY: as above.
        let ok = unsafe { iov_write(&iov, 6, b"XYZ") };
        assert!(!ok, "one byte past the end");
        let mut all = [0u8; 8];
        // SAFETY: as above.
        let ok = unsafe { iov_read(&iov, 0, &mut all) };
        assert!(ok);
        assert_eq!(&all[2..6], b"XYZW");
        // SAFETY: as above.
        let ok = unsafe { iov_read(&iov, 1, &mut all) };
        assert!(!ok);
        assert_eq!(m.read_obj::<[u8; 2]>(GuestAddress(0x2100)).unwrap(), *b"YZ");
    }
}
