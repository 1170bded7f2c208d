//! Guest memory: one memfd, mapped shared, so that every vhost-user backend can map the same
//! pages (SET_MEM_TABLE passes the memfd).

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

/// Guest memory starts at 0 and must end below the MMIO window.
pub const MMIO_START: u64 = 0xc000_0000;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// memfd_create or ftruncate failed.
    #[error("cannot create the {size}-byte guest memory memfd: {source}")]
    Memfd {
        /// Bytes asked for.
        size: u64,
        /// The OS error.
        source: std::io::Error,
    },
    /// The size does not fit below the MMIO window.
    #[error(
        "guest memory of {size} bytes does not fit below the MMIO window at {MMIO_START:#x}; use --mem 3G or less"
    )]
    TooLarge {
        /// Bytes asked for.
        size: u64,
    },
    /// vm-memory refused the mapping.
    #[error("cannot map guest memory: {0}")]
    Map(String),
}

/// The memfd-backed guest memory.
pub type GuestMem = GuestMemoryMmap<()>;

/// Creates `size` bytes of guest memory at guest physical address 0, backed by a memfd mapped
/// `MAP_SHARED`.
pub fn create(size: u64) -> Result<GuestMem, MemoryError> {
    if size > MMIO_START {
        return Err(MemoryError::TooLarge { size });
    }
    let name: &CStr = c"vmm-min-guest-ram";
    // SAFETY: memfd_create with a valid NUL-terminated name and flags; returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd {
            size,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|source| MemoryError::Memfd { size, source })?;
    let len = usize::try_from(size).map_err(|_| MemoryError::TooLarge { size })?;
    GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        len,
        Some(FileOffset::new(file, 0)),
    )])
    .map_err(|e| MemoryError::Map(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn memory_is_memfd_backed_and_writable() {
        let m = create(16 << 20).unwrap();
        assert_eq!(m.num_regions(), 1);
        let r = m.iter().next().unwrap();
        assert!(r.file_offset().is_some());
        m.write_obj(0xdead_beef_u32, GuestAddress(0x1000)).unwrap();
        assert_eq!(
            m.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
    }

    #[test]
    fn memory_overlapping_mmio_is_refused() {
        assert!(matches!(
            create(MMIO_START + 4096),
            Err(MemoryError::TooLarge { .. })
        ));
    }
}
