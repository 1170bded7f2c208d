//! Pieces for tests that play a vhost-user front end themselves (no VM): guest memory as a
//! shared memfd mapping that a backend can map from the SET_MEM_TABLE it is sent.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU16, Ordering};

use vhost::VhostUserMemoryRegionInfo;

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
