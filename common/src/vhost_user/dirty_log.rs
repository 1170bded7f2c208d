//! Dirty-page logging for live migration: the bitmap the front end shares with
//! VHOST_USER_SET_LOG_BASE, in which the back end marks every 4 KiB page of guest memory it
//! writes while VHOST_F_LOG_ALL is acked, so that the front end sends those pages again.
//!
//! The layout is the vhost one (the kernel's vhost, QEMU's `vhost_log`, libvhost-user's
//! `vu_log_page`): bit `page % 8` of byte `page / 8`, `page` being a guest physical address
//! divided by [`LOG_PAGE`]. The front end reads and clears the bitmap concurrently (QEMU swaps
//! whole words to 0 atomically), so pages are marked with an atomic OR on their byte.
//!
//! A [`VringLog`] is what a ring carries while logging is on: the bitmap and the guest physical
//! address of its used ring for logging (SET_VRING_ADDR's `log_guest_addr`, valid when the
//! front end set VHOST_VRING_F_LOG). The writes a device makes are logged where they are
//! published: [`super::vring::VringState::add_used`] (blkback, cdrom and every device on
//! virtio-queue's `Queue`) and [`crate::ring::SplitRing`] (netback), which log the chain's
//! device-writable buffers and the used ring entries they write.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use thiserror::Error;

/// The size of the page one bit of the log stands for (VHOST_LOG_PAGE).
pub const LOG_PAGE: u64 = 0x1000;

/// What is wrong with a log region, or a write that cannot be logged.
#[derive(Debug, Error)]
pub enum LogError {
    /// An empty region, or one that wraps around.
    #[error(
        "the dirty log region of {size} bytes at offset {offset} is empty or wraps around; the \
         front end sent a broken SET_LOG_BASE"
    )]
    Invalid {
        /// The size it announced.
        size: u64,
        /// The offset in its file.
        offset: u64,
    },
    /// The region reaches past the end of its file (mapping it would fault on access).
    #[error(
        "the dirty log region of {size} bytes at offset {offset} reaches past the end of the \
         {file_size}-byte file the front end sent with SET_LOG_BASE"
    )]
    PastEnd {
        /// The size it announced.
        size: u64,
        /// The offset in its file.
        offset: u64,
        /// The file's size.
        file_size: u64,
    },
    /// The region could not be mapped.
    #[error(
        "cannot map the {size}-byte dirty log region the front end sent with SET_LOG_BASE: {source}"
    )]
    Map {
        /// The size it announced.
        size: u64,
        /// The OS error.
        source: io::Error,
    },
    /// A write beyond what the log covers.
    #[error(
        "guest memory written at {gpa:#x}+{len:#x} lies beyond the {log_bytes}-byte dirty log \
         (which covers guest memory up to {covered:#x}): the page cannot be logged, and a \
         migration running now would copy a stale page"
    )]
    Outside {
        /// Guest physical address written.
        gpa: u64,
        /// Bytes written.
        len: u64,
        /// The size of the bitmap.
        log_bytes: u64,
        /// The first guest address the bitmap does not cover.
        covered: u64,
    },
}

/// The dirty-page bitmap the front end shared (SET_LOG_BASE), mapped shared and writable.
pub struct DirtyLog {
    /// The start of the mapping (page aligned).
    base: NonNull<u8>,
    /// The length of the mapping.
    map_len: usize,
    /// Where the bitmap starts in the mapping (the offset's part below a page).
    start: usize,
    /// The bitmap's size in bytes.
    len: usize,
    /// Whether a write beyond the log was reported already (once per log).
    reported: AtomicBool,
}

// SAFETY: the mapping is owned by the `DirtyLog` (unmapped only on drop) and only ever accessed
// through atomic byte operations (`mark`), so sharing and sending it between threads is sound.
unsafe impl Send for DirtyLog {}
// SAFETY: see `Send`: every access is an atomic fetch_or on a byte inside the mapping.
unsafe impl Sync for DirtyLog {}

impl std::fmt::Debug for DirtyLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyLog").field("len", &self.len).finish()
    }
}

impl DirtyLog {
    /// Maps `size` bytes at `offset` of `file` (the region of SET_LOG_BASE), after checking
    /// that they lie inside the file.
    pub fn map(file: &File, size: u64, offset: u64) -> Result<Self, LogError> {
        let invalid = || LogError::Invalid { size, offset };
        let end = offset.checked_add(size).ok_or_else(invalid)?;
        if size == 0 {
            return Err(invalid());
        }
        let file_size = file
            .metadata()
            .map_err(|source| LogError::Map { size, source })?
            .len();
        if end > file_size {
            return Err(LogError::PastEnd {
                size,
                offset,
                file_size,
            });
        }
        // SAFETY: sysconf only reads a system constant.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
        let aligned = offset - offset % page;
        let start = offset - aligned;
        let map_len = usize::try_from(size + start).map_err(|_| invalid())?;
        let len = usize::try_from(size).map_err(|_| invalid())?;
        let aligned = libc::off_t::try_from(aligned).map_err(|_| invalid())?;
        // SAFETY: a new shared mapping of the file's pages from `aligned` (page aligned, and
        // with `map_len` inside the file, checked above), at an address the kernel picks; it
        // aliases no Rust object. The front end writes the same memory (it clears the bitmap
        // while we set bits): every access goes through atomics (`mark`). A front end that
        // shrinks the file afterwards makes an access fault, as with guest memory itself; QEMU
        // seals its log memfd against shrinking.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                aligned,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(LogError::Map {
                size,
                source: io::Error::last_os_error(),
            });
        }
        let base = NonNull::new(ptr.cast::<u8>()).ok_or_else(invalid)?;
        Ok(DirtyLog {
            base,
            map_len,
            start: start as usize,
            len,
            reported: AtomicBool::new(false),
        })
    }

    /// The size of the bitmap in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the bitmap is empty (never: an empty region is refused).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Marks every page of `len` bytes written at guest physical address `gpa` dirty. A range
    /// the bitmap does not cover marks nothing beyond it and is an error (the pages it does
    /// cover are marked).
    pub fn mark(&self, gpa: u64, len: u64) -> Result<(), LogError> {
        if len == 0 {
            return Ok(());
        }
        let outside = || LogError::Outside {
            gpa,
            len,
            log_bytes: self.len as u64,
            covered: (self.len as u64).saturating_mul(8 * LOG_PAGE),
        };
        let last = gpa.checked_add(len - 1).ok_or_else(outside)?;
        let (first, last) = (gpa / LOG_PAGE, last / LOG_PAGE);
        for page in first..=last {
            let byte = page / 8;
            if byte >= self.len as u64 {
                return Err(outside());
            }
            let at = self.base.as_ptr().wrapping_add(self.start + byte as usize);
            // SAFETY: `byte < self.len`, so `at` lies inside the mapping (`map_len == start +
            // len`), which lives as long as `self`. AtomicU8 has the size and alignment of u8;
            // the front end reads and clears the same bytes with atomic operations too.
            let cell = unsafe { AtomicU8::from_ptr(at) };
            // Release: the guest-memory write this marks happened before, so a front end that
            // sees the bit (and then copies the page) sees the data too, on any architecture.
            cell.fetch_or(1 << (page % 8), Ordering::Release);
        }
        Ok(())
    }

    /// [`DirtyLog::mark`], with an error reported in the daemon's log once per dirty log
    /// (a device cannot fail its request for it: the write is done).
    pub fn mark_or_report(&self, gpa: u64, len: u64) {
        if let Err(e) = self.mark(gpa, len)
            && !self.reported.swap(true, Ordering::Relaxed)
        {
            log::error!("{e}");
        }
    }
}

impl Drop for DirtyLog {
    fn drop(&mut self) {
        // SAFETY: `base`/`map_len` are the mapping made in `map`, unmapped only here.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.map_len) };
    }
}

/// The logging state of one ring while the front end logs: the bitmap and where its used ring
/// is for logging.
#[derive(Debug, Clone)]
pub struct VringLog {
    /// The bitmap.
    pub log: Arc<DirtyLog>,
    /// The used ring's guest physical address for logging (SET_VRING_ADDR's `log_guest_addr`
    /// with VHOST_VRING_F_LOG; `None` without the flag: used ring writes are not logged).
    pub used: Option<u64>,
}

impl VringLog {
    /// Logs the used ring element `slot` (8 bytes at 4 + 8 × slot).
    pub fn used_elem(&self, slot: u16) {
        if let Some(used) = self.used {
            self.log
                .mark_or_report(used.wrapping_add(4 + 8 * u64::from(slot)), 8);
        }
    }

    /// Logs the used ring's index (2 bytes at 2).
    pub fn used_idx(&self) {
        if let Some(used) = self.used {
            self.log.mark_or_report(used.wrapping_add(2), 2);
        }
    }

    /// Logs the used ring's flags (2 bytes at 0).
    pub fn used_flags(&self) {
        if let Some(used) = self.used {
            self.log.mark_or_report(used, 2);
        }
    }

    /// Logs the used ring's `avail_event` (EVENT_IDX; 2 bytes after the `size` elements).
    pub fn avail_event(&self, size: u16) {
        if let Some(used) = self.used {
            self.log
                .mark_or_report(used.wrapping_add(4 + 8 * u64::from(size)), 2);
        }
    }

    /// Logs a buffer the device wrote.
    pub fn buffer(&self, gpa: u64, len: u64) {
        self.log.mark_or_report(gpa, len);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// A memfd of `size` bytes.
    pub(crate) fn memfd(size: u64) -> File {
        // SAFETY: memfd_create with a NUL-terminated name; the new descriptor is owned below.
        let fd = unsafe { libc::memfd_create(c"vback-log-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        use std::os::fd::FromRawFd;
        // SAFETY: a new descriptor nothing else owns.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(size).unwrap();
        f
    }

    pub(crate) fn bytes(f: &File, offset: u64, n: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut b = vec![0; n];
        f.read_exact_at(&mut b, offset).unwrap();
        b
    }

    #[test]
    fn a_write_marks_exactly_its_pages() {
        let f = memfd(64);
        let log = DirtyLog::map(&f, 64, 0).unwrap();
        // One byte of page 0; 2 bytes across pages 9 and 10; a whole page 17 exactly.
        log.mark(0x10, 1).unwrap();
        log.mark(0xa000 - 1, 2).unwrap();
        log.mark(0x11000, 0x1000).unwrap();
        log.mark(0x20000, 0).unwrap();
        let b = bytes(&f, 0, 64);
        assert_eq!(b[0], 0b1);
        assert_eq!(b[1], 0b110, "pages 9 and 10");
        assert_eq!(b[2], 0b10, "page 17 only");
        assert!(b[3..].iter().all(|&x| x == 0), "nothing else: {b:?}");
    }

    #[test]
    fn the_region_is_checked_and_a_write_outside_it_is_refused() {
        let f = memfd(0x2000);
        assert!(matches!(
            DirtyLog::map(&f, 0x1001, 0x1000),
            Err(LogError::PastEnd { .. })
        ));
        assert!(matches!(
            DirtyLog::map(&f, 0, 0),
            Err(LogError::Invalid { .. })
        ));
        assert!(matches!(
            DirtyLog::map(&f, 8, u64::MAX - 2),
            Err(LogError::Invalid { .. })
        ));
        // An offset below a page: the bitmap starts there.
        let log = DirtyLog::map(&f, 4, 0x1010).unwrap();
        log.mark(8 * LOG_PAGE, 1).unwrap();
        assert_eq!(bytes(&f, 0x1010, 4), [0, 1, 0, 0]);
        // 4 bytes cover 32 pages: page 32 is outside, and nothing is written past the bitmap.
        let e = log.mark(32 * LOG_PAGE, 1).unwrap_err();
        assert!(e.to_string().contains("beyond the 4-byte dirty log"), "{e}");
        assert!(log.mark(u64::MAX, 2).is_err(), "a range that wraps");
        assert!(log.mark(31 * LOG_PAGE, 2 * LOG_PAGE).is_err());
        assert_eq!(bytes(&f, 0x1014, 4), [0; 4]);
        assert_eq!(bytes(&f, 0x1010, 4), [0, 1, 0, 0x80], "page 31 was marked");
        let _ = (&f).flush();
    }

    #[test]
    fn a_vring_log_marks_the_used_ring_parts() {
        let f = memfd(8);
        let log = Arc::new(DirtyLog::map(&f, 8, 0).unwrap());
        let v = VringLog {
            log: log.clone(),
            used: Some(0x3000),
        };
        // Queue of 1024: element 600 is at 0x3000 + 4 + 4800 = page 4; avail_event at
        // 0x3000 + 4 + 8192 = page 5.
        v.used_elem(600);
        assert_eq!(bytes(&f, 0, 1)[0], 0b1_0000);
        v.used_idx();
        v.avail_event(1024);
        assert_eq!(bytes(&f, 0, 1)[0], 0b11_1000);
        let none = VringLog { log, used: None };
        none.used_elem(0);
        none.used_idx();
        assert_eq!(
            bytes(&f, 0, 1)[0],
            0b11_1000,
            "no VHOST_VRING_F_LOG: not logged"
        );
    }
}
