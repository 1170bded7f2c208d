//! Pieces for tests that play a vhost-user front end themselves (no VM): guest memory as a
//! shared memfd mapping that a backend can map from the SET_MEM_TABLE it is sent, and
//! [`BlkDriver`], a minimal vhost-user-blk driver with one queue.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

/// `len` bytes of memfd memory mapped shared into this process.
#[derive(Debug)]
pub struct SharedMemory {
    fd: OwnedFd,
    addr: *mut u8,
    len: u64,
}

impl SharedMemory {
    /// Creates and maps the memory (panics if the kernel refuses: a test cannot go on).
    pub fn new(len: u64) -> SharedMemory {
        // SAFETY: memfd_create with a NUL-terminated name; returns a new descriptor or -1.
        let fd = unsafe { libc::memfd_create(c"vback-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate on our memfd.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), len as i64) }, 0);
        // SAFETY: mapping `len` bytes of our memfd, shared, at an address the kernel chooses.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED, "mmap of the test memory");
        SharedMemory {
            fd,
            addr: addr.cast(),
            len,
        }
    }

    /// The mapping's address in this process.
    pub fn addr(&self) -> *mut u8 {
        self.addr
    }

    /// A SET_MEM_TABLE region: `size` bytes of this memory at guest address `gpa` (tests pass
    /// sizes past the mapping on purpose).
    pub fn info(&self, gpa: u64, size: u64) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: self.addr as u64,
            mmap_offset: 0,
            mmap_handle: self.fd.as_raw_fd(),
        }
    }

    /// Copies `bytes` to guest address `gpa`.
    pub fn put(&self, gpa: u64, bytes: &[u8]) {
        assert!(gpa + bytes.len() as u64 <= self.len);
        let dst = self.addr.wrapping_add(gpa as usize);
        // SAFETY: the range lies inside our mapping; the backend only reads it.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, bytes.len()) };
    }

    /// The byte at `gpa` (read volatile: the backend writes it).
    pub fn get8(&self, gpa: u64) -> u8 {
        assert!(gpa < self.len);
        let p = self.addr.wrapping_add(gpa as usize);
        // SAFETY: inside the mapping.
        unsafe { p.read_volatile() }
    }

    /// The little-endian u16 at `gpa` (2-byte aligned), loaded with Acquire: a ring index the
    /// backend publishes.
    pub fn load_u16(&self, gpa: u64) -> u16 {
        assert!(gpa.is_multiple_of(2) && gpa + 2 <= self.len);
        let p = self.addr.wrapping_add(gpa as usize).cast::<AtomicU16>();
        // SAFETY: 2-byte aligned inside the (page-aligned) mapping; written by the backend, so
        // read through an atomic.
        let a = unsafe { &*p };
        u16::from_le(a.load(Ordering::Acquire))
    }
}

impl Drop for SharedMemory {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping created in `new`.
        unsafe { libc::munmap(self.addr.cast(), self.len as usize) };
    }
}

/// [`BlkDriver`]'s guest memory size and layout.
pub mod blk_layout {
    /// Guest memory size.
    pub const MEM: u64 = 1 << 20;
    /// Queue size.
    pub const QSIZE: u16 = 16;
    /// Descriptor table.
    pub const DESC: u64 = 0;
    /// Avail ring.
    pub const AVAIL: u64 = 0x1000;
    /// Used ring.
    pub const USED: u64 = 0x2000;
    /// Request header.
    pub const HDR: u64 = 0x3000;
    /// Status byte.
    pub const STATUS: u64 = 0x3100;
    /// Data buffer.
    pub const DATA: u64 = 0x10000;
}

/// Shares `mem` (all of it, at guest address 0) and starts queue 0 in [`blk_layout`]'s rings
/// at avail index `base`, with `call` and `kick`.
fn start_queue0(fe: &mut Frontend, mem: &SharedMemory, base: u16, call: &EventFd, kick: &EventFd) {
    use blk_layout::*;
    fe.set_mem_table(&[mem.info(0, MEM)]).unwrap();
    let va = mem.addr() as u64;
    fe.set_vring_num(0, QSIZE).unwrap();
    fe.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: va + DESC,
            used_ring_addr: va + USED,
            avail_ring_addr: va + AVAIL,
            log_addr: None,
        },
    )
    .unwrap();
    fe.set_vring_base(0, base).unwrap();
    fe.set_vring_call(0, call).unwrap();
    fe.set_vring_kick(0, kick).unwrap();
    fe.set_vring_enable(0, true).unwrap();
}

/// Descriptor flag: the device writes this buffer.
pub const DESC_WRITE: u16 = 2;

/// A minimal vhost-user-blk front end: the vhost crate's front-end side, guest memory in a
/// memfd, one split virtqueue, one request at a time.
#[allow(missing_debug_implementations)]
pub struct BlkDriver {
    _fe: Frontend,
    kick: EventFd,
    _call: EventFd,
    mem: SharedMemory,
    next: u16,
}

impl BlkDriver {
    /// Connects to `sock`, negotiates, and sets up queue 0.
    pub fn connect(sock: &Path) -> BlkDriver {
        use blk_layout::*;
        let mut fe = Frontend::connect(sock, 1).expect("connect");
        fe.set_owner().unwrap();
        let f = fe.get_features().unwrap();
        fe.set_features(f).unwrap();
        assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
        let pf = fe.get_protocol_features().unwrap();
        fe.set_protocol_features(pf & VhostUserProtocolFeatures::CONFIG)
            .unwrap();
        let mem = SharedMemory::new(MEM);
        let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        start_queue0(&mut fe, &mem, 0, &call, &kick);
        BlkDriver {
            _fe: fe,
            kick,
            _call: call,
            mem,
            next: 0,
        }
    }

    /// The guest memory.
    pub fn mem(&self) -> &SharedMemory {
        &self.mem
    }

    /// One request (header, optional data out, status in); true if it completed with OK
    /// within a second.
    pub fn request(&mut self, kind: u32, sector: u64, data: Option<&[u8]>) -> bool {
        use blk_layout::*;
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.put(HDR, &hdr);
        self.mem.put(STATUS, &[0xff]);
        let mut descs = vec![(HDR, 16u32, 0u16)];
        if let Some(d) = data {
            self.mem.put(DATA, d);
            descs.push((DATA, d.len() as u32, 0));
        }
        descs.push((STATUS, 1, DESC_WRITE));
        self.submit(&descs) && self.mem.get8(STATUS) == 0
    }

    /// Publishes one chain of `(guest address, length, flags)` descriptors at head 0 (NEXT
    /// links are added), kicks, and waits up to a second for the device to return it; true
    /// if it did.
    pub fn submit(&mut self, descs: &[(u64, u32, u16)]) -> bool {
        use blk_layout::*;
        let n = descs.len();
        for (i, (addr, len, flags)) in descs.iter().enumerate() {
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            let more = if i + 1 < n { 1u16 } else { 0 };
            d[12..14].copy_from_slice(&(flags | more).to_le_bytes());
            d[14..16].copy_from_slice(&(i as u16 + 1).to_le_bytes());
            self.mem.put(DESC + 16 * i as u64, &d);
        }
        // Publish head 0 and bump the avail index.
        let slot = u64::from(self.next % QSIZE);
        self.mem.put(AVAIL + 4 + 2 * slot, &0u16.to_le_bytes());
        self.next = self.next.wrapping_add(1);
        std::sync::atomic::fence(Ordering::SeqCst);
        self.mem.put(AVAIL + 2, &self.next.to_le_bytes());
        std::sync::atomic::fence(Ordering::SeqCst);
        let _ = self.kick.write(1);
        let t0 = Instant::now();
        while self.mem.load_u16(USED + 2) != self.next {
            if t0.elapsed() > Duration::from_secs(1) {
                return false;
            }
            std::thread::yield_now();
        }
        true
    }
}

/// A vhost-user-blk front end that outlives its back end, as QEMU's device does: the guest
/// memory and the ring stay while back ends come and go. Several requests can be in flight at
/// once (each at its own descriptors), completions are read from the used ring in the order
/// the back end published them. On each connection it does what QEMU's vhost-user-blk does
/// after a back-end crash: the ring restarts at the used index (SET_VRING_BASE), and, when the
/// back end offers in-flight tracking and `inflight` is asked for, the region is fetched once
/// (GET_INFLIGHT_FD) and handed back on every connection (SET_INFLIGHT_FD) before the ring
/// starts.
#[allow(missing_debug_implementations)]
pub struct RestartableBlk {
    fe: Option<Frontend>,
    kick: EventFd,
    call: EventFd,
    mem: SharedMemory,
    avail: u16,
    inflight: Option<(vhost::vhost_user::message::VhostUserInflight, std::fs::File)>,
}

/// [`RestartableBlk`]'s layout: queue size, and where request `n`'s parts live.
pub mod restartable_layout {
    /// Queue size (each request takes 3 descriptors: 5 requests at once).
    pub const QSIZE: u16 = super::blk_layout::QSIZE;
    /// Request `n`'s header.
    pub fn header(n: u16) -> u64 {
        0x3000 + 0x20 * u64::from(n)
    }
    /// Request `n`'s status byte.
    pub fn status(n: u16) -> u64 {
        0x3800 + u64::from(n)
    }
    /// Request `n`'s data buffer (4 KiB).
    pub fn data(n: u16) -> u64 {
        0x10000 + 0x1000 * u64::from(n)
    }
    /// Request `n`'s head (its first descriptor).
    pub fn head(n: u16) -> u16 {
        3 * n
    }
}

impl Default for RestartableBlk {
    fn default() -> Self {
        RestartableBlk::new()
    }
}

impl RestartableBlk {
    /// The guest side, not connected.
    pub fn new() -> RestartableBlk {
        RestartableBlk {
            fe: None,
            kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            mem: SharedMemory::new(blk_layout::MEM),
            avail: 0,
            inflight: None,
        }
    }

    /// Connects to `sock` and starts the ring at the used index. Returns whether in-flight
    /// tracking is on (asked for and offered).
    pub fn connect(&mut self, sock: &Path, inflight: bool) -> bool {
        use restartable_layout::QSIZE;
        self.fe = None;
        let mut fe = Frontend::connect(sock, 1).expect("connect");
        fe.set_owner().unwrap();
        let f = fe.get_features().unwrap();
        fe.set_features(f).unwrap();
        let offered = fe.get_protocol_features().unwrap();
        let mut pf = VhostUserProtocolFeatures::CONFIG;
        let tracked = inflight && offered.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD);
        if tracked {
            pf |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        }
        fe.set_protocol_features(offered & pf).unwrap();
        if tracked {
            if self.inflight.is_none() {
                let ask = vhost::vhost_user::message::VhostUserInflight {
                    num_queues: 1,
                    queue_size: QSIZE,
                    ..Default::default()
                };
                self.inflight = Some(fe.get_inflight_fd(&ask).expect("GET_INFLIGHT_FD"));
            }
            let (info, file) = self.inflight.as_ref().unwrap();
            fe.set_inflight_fd(info, file.as_raw_fd())
                .expect("SET_INFLIGHT_FD");
        }
        // What QEMU does after its back end died: the avail index it cannot know is rewound to
        // the used index.
        start_queue0(&mut fe, &self.mem, self.used_idx(), &self.call, &self.kick);
        self.fe = Some(fe);
        tracked
    }

    /// Forgets the connection (the back end died).
    pub fn disconnect(&mut self) {
        self.fe = None;
    }

    /// The guest memory.
    pub fn mem(&self) -> &SharedMemory {
        &self.mem
    }

    /// Publishes request `n` (a virtio-blk `kind` at `sector`, 4 KiB of data out for a write,
    /// in for a read) on the avail ring and kicks.
    pub fn submit(&mut self, n: u16, kind: u32, sector: u64) {
        use restartable_layout::*;
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.put(header(n), &hdr);
        self.mem.put(status(n), &[0xff]);
        let data_flags = if kind == 0 { DESC_WRITE } else { 0 };
        let parts = [
            (header(n), 16u32, 0u16),
            (data(n), 4096, data_flags),
            (status(n), 1, DESC_WRITE),
        ];
        let first = head(n);
        for (i, (addr, len, flags)) in parts.iter().enumerate() {
            let idx = first + i as u16;
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            let more = if i + 1 < parts.len() { 1u16 } else { 0 };
            d[12..14].copy_from_slice(&(flags | more).to_le_bytes());
            d[14..16].copy_from_slice(&(idx + 1).to_le_bytes());
            self.mem.put(blk_layout::DESC + 16 * u64::from(idx), &d);
        }
        let slot = u64::from(self.avail % QSIZE);
        self.mem
            .put(blk_layout::AVAIL + 4 + 2 * slot, &first.to_le_bytes());
        self.avail = self.avail.wrapping_add(1);
        std::sync::atomic::fence(Ordering::SeqCst);
        self.mem
            .put(blk_layout::AVAIL + 2, &self.avail.to_le_bytes());
        std::sync::atomic::fence(Ordering::SeqCst);
        let _ = self.kick.write(1);
    }

    /// The used index the back end published.
    pub fn used_idx(&self) -> u16 {
        self.mem.load_u16(blk_layout::USED + 2)
    }

    /// Waits until the used index reaches `target`; false if it did not within `timeout`.
    pub fn wait_used(&self, target: u16, timeout: Duration) -> bool {
        let t0 = Instant::now();
        while self.used_idx() != target {
            if t0.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }

    /// The heads on the used ring so far, in the order they were published (the test keeps
    /// fewer than a ring's worth).
    pub fn used_heads(&self) -> Vec<u16> {
        let n = self.used_idx();
        (0..n)
            .map(|i| {
                let at = blk_layout::USED + 4 + 8 * u64::from(i % restartable_layout::QSIZE);
                self.mem.load_u16(at)
            })
            .collect()
    }

    /// Request `n`'s status byte.
    pub fn status(&self, n: u16) -> u8 {
        self.mem.get8(restartable_layout::status(n))
    }
}
