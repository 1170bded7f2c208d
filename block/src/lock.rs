//! Image locking, compatible with QEMU's.
//!
//! QEMU (raw-posix) takes open-file-description (OFD) byte-range locks on every image it opens:
//! a shared lock on byte `100 + i` for each permission `i` it holds (consistent read, write,
//! write-unchanged, resize) and on byte `200 + i` for each permission it refuses to share. Before
//! locking it tests the opposite bytes for conflicts. vback uses the same bytes, so a vback
//! daemon and QEMU (or `qemu-img`, `qemu-storage-daemon`, another vback daemon) exclude each
//! other exactly as two QEMU processes would:
//!
//! - writable: holds read, write and resize; shares only reading. A second writer, or anything
//!   that needs writers excluded, is refused.
//! - read-only: holds read; refuses to share write and resize, so nobody writes under a
//!   read-only guest, while other readers are welcome.
//!
//! Locks belong to the open file description: they go when the last reference to that open
//! goes. A descriptor registered with an io_uring is such a reference, and the kernel drops a
//! dead process's rings (and their registered files) asynchronously, tens of milliseconds after
//! the process has been reaped; a lock taken on the descriptor the I/O engine uses would outlive
//! a crashed daemon and refuse QEMU or `qemu-img` started right after it. [`ImageLock`] therefore
//! holds the locks on an open of its own that serves no I/O: it closes with the process, so a
//! crashed daemon never leaves a lock behind.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

/// QEMU's permission bits (`BLK_PERM_*`), by bit index.
const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
const CONSISTENT_READ: u32 = 1 << 0;
const WRITE: u32 = 1 << 1;
const WRITE_UNCHANGED: u32 = 1 << 2;
const RESIZE: u32 = 1 << 3;
const ALL: u32 = CONSISTENT_READ | WRITE | WRITE_UNCHANGED | RESIZE;

/// How an image is being opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// The guest may write: exclusive against other writers.
    Exclusive,
    /// Read-only: shared with other readers, excludes writers.
    Shared,
    /// No locking (`w!`, or the operator's explicit choice): other processes are not checked.
    None,
}

/// Why an image could not be locked.
#[derive(Debug, Error)]
pub enum LockError {
    /// Another process holds a conflicting lock.
    #[error("{path} is in use{holder}: it {conflict}; stop that user first")]
    InUse {
        /// The image.
        path: PathBuf,
        /// " by pid N (name)" when the holder could be found, else empty.
        holder: String,
        /// What conflicts, as a phrase.
        conflict: String,
    },
    /// The image could not be opened again for its lock.
    #[error(
        "cannot open {path} again (through {via}) to hold its lock: {source}; vback needs /proc mounted"
    )]
    Reopen {
        /// The image.
        path: PathBuf,
        /// The path opened.
        via: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The lock system call failed for another reason.
    #[error("cannot lock {path}: {source}")]
    Io {
        /// The image.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

fn flock(kind: i16, start: i64) -> libc::flock {
    // SAFETY: `flock` is a plain C struct for which all-zero bytes are a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = start;
    fl.l_len = 1;
    fl
}

/// Whether someone else holds a lock on byte `start` that would conflict with an exclusive one.
fn byte_taken(file: &File, start: i64) -> std::io::Result<bool> {
    let mut fl = flock(libc::F_WRLCK as i16, start);
    // SAFETY: F_OFD_GETLK reads and writes the `flock` struct we pass, which lives on our stack
    // for the duration of the call.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as i16)
}

fn lock_byte(file: &File, start: i64) -> std::io::Result<bool> {
    let fl = flock(libc::F_RDLCK as i16, start);
    // SAFETY: F_OFD_SETLK only reads the `flock` struct we pass, valid for the call.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EACCES) => Ok(false),
            _ => Err(e),
        };
    }
    Ok(true)
}

fn perms(mode: LockMode) -> (u32, u32) {
    match mode {
        // (held, not shared)
        LockMode::Exclusive => (
            CONSISTENT_READ | WRITE | RESIZE,
            ALL & !(CONSISTENT_READ | WRITE_UNCHANGED),
        ),
        LockMode::Shared => (CONSISTENT_READ, WRITE | RESIZE),
        LockMode::None => (0, 0),
    }
}

/// Locks `file` (opened from `path`) for `mode`, or explains who is in the way.
pub fn lock_image(file: &File, path: &Path, mode: LockMode) -> Result<(), LockError> {
    let (held, unshared) = perms(mode);
    let io = |source| LockError::Io {
        path: path.to_owned(),
        source,
    };
    let conflict = |text: String| LockError::InUse {
        path: path.to_owned(),
        holder: holders(path),
        conflict: text,
    };
    for (i, name) in PERM_NAMES.iter().enumerate() {
        let bit = 1u32 << i;
        if held & bit != 0 && byte_taken(file, SHARED_BASE + i as i64).map_err(io)? {
            return Err(conflict(format!(
                "is opened by a process that does not allow others to {name}"
            )));
        }
        if unshared & bit != 0 && byte_taken(file, PERM_BASE + i as i64).map_err(io)? {
            return Err(conflict(format!("is opened for {name} by another process")));
        }
    }
    for (i, name) in PERM_NAMES.iter().enumerate() {
        let bit = 1u32 << i;
        if held & bit != 0 && !lock_byte(file, PERM_BASE + i as i64).map_err(io)? {
            return Err(conflict(format!(
                "is locked against {name} by another process"
            )));
        }
        if unshared & bit != 0 && !lock_byte(file, SHARED_BASE + i as i64).map_err(io)? {
            return Err(conflict(format!("is opened for {name} by another process")));
        }
    }
    Ok(())
}

/// Like [`lock_image`], but when the conflicting lock has no visible holder (a process that
/// just died: the kernel releases an io_uring's registered files asynchronously, after the
/// process is gone) it retries for up to `patience` before giving up.
pub fn lock_image_patiently(
    file: &File,
    path: &Path,
    mode: LockMode,
    patience: std::time::Duration,
) -> Result<(), LockError> {
    let deadline = std::time::Instant::now() + patience;
    loop {
        match lock_image(file, path, mode) {
            Err(LockError::InUse { holder, .. })
                if holder.is_empty() && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// QEMU's locks on an image (see [`lock_image`]), held on a read-only open of the image made
/// for them alone: never used for I/O, never registered with an io_uring, so they go as soon as
/// the value is dropped or the process exits, even by SIGKILL. Keep it as long as the image is
/// in use.
#[derive(Debug)]
pub struct ImageLock {
    /// None for [`LockMode::None`]: nothing to hold.
    file: Option<File>,
}

impl ImageLock {
    /// Locks the image open as `image` (from `path`, named in errors) for `mode`, retrying for
    /// up to `patience` while the conflicting lock has no visible holder (see
    /// [`lock_image_patiently`]). The lock's descriptor is a new open of the same file, made
    /// through `/proc/self/fd` (so it is the file `image` is, whatever `path` names now).
    pub fn acquire(
        image: &File,
        path: &Path,
        mode: LockMode,
        patience: std::time::Duration,
    ) -> Result<ImageLock, LockError> {
        if mode == LockMode::None {
            return Ok(ImageLock { file: None });
        }
        let via = PathBuf::from(format!("/proc/self/fd/{}", image.as_raw_fd()));
        // Read-only: a read lock (all QEMU takes) needs no more. Close-on-exec (std's default):
        // a child must not inherit the lock.
        let file = File::open(&via).map_err(|source| LockError::Reopen {
            path: path.to_owned(),
            via,
            source,
        })?;
        lock_image_patiently(&file, path, mode, patience)?;
        Ok(ImageLock { file: Some(file) })
    }

    /// Whether a lock is actually held (not [`LockMode::None`]).
    pub fn is_held(&self) -> bool {
        self.file.is_some()
    }
}

/// " by pid 1234 (qemu-system-x86)" for the processes that hold OFD locks on the file, found
/// through /proc/PID/fdinfo (OFD locks show no pid in /proc/locks). Empty if none is visible.
pub fn holders(path: &Path) -> String {
    let Ok(meta) = std::fs::metadata(path) else {
        return String::new();
    };
    let (major, minor) = (libc::major(meta.dev()), libc::minor(meta.dev()));
    let needle = format!("{major:02x}:{minor:02x}:{}", meta.ino());
    let me = std::process::id();
    let mut found: Vec<String> = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return String::new();
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fdinfo")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_to_string(fd.path())
                .map(|t| {
                    t.lines()
                        .any(|l| l.starts_with("lock:") && l.contains(&needle))
                })
                .unwrap_or(false)
        });
        if holds {
            let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            found.push(format!("pid {pid} ({})", comm.trim()));
        }
    }
    if found.is_empty() {
        String::new()
    } else {
        format!(" by {}", found.join(", "))
    }
}

/// For tests: retries `f` for up to 5 s while it fails. A lock released by dropping its
/// descriptor can still look held for a moment when another test thread of the same process has
/// just forked a child (qemu-img, say): the child shares the open file description, and so the
/// OFD lock, until it execs and close-on-exec drops it.
#[cfg(test)]
pub(crate) fn until_released<T, E: std::fmt::Debug>(mut f: impl FnMut() -> Result<T, E>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if std::time::Instant::now() >= deadline => panic!("still locked: {e:?}"),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(p: &Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .unwrap()
    }

    #[test]
    fn writers_exclude_each_other_and_readers_share() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();

        let w1 = open(&p);
        lock_image(&w1, &p, LockMode::Exclusive).unwrap();
        let w2 = open(&p);
        let e = lock_image(&w2, &p, LockMode::Exclusive).unwrap_err();
        assert!(e.to_string().contains("is in use"), "{e}");
        assert!(e.to_string().contains(&p.display().to_string()), "{e}");
        // Readers are refused while a writer is in (they forbid writing).
        let r = open(&p);
        assert!(lock_image(&r, &p, LockMode::Shared).is_err());
        // Closing the writer releases everything.
        drop(w1);
        drop(w2);
        lock_image(&r, &p, LockMode::Shared).unwrap();
        let r2 = open(&p);
        lock_image(&r2, &p, LockMode::Shared).unwrap();
        let w3 = open(&p);
        let e = lock_image(&w3, &p, LockMode::Exclusive).unwrap_err();
        assert!(
            e.to_string().contains("does not allow others to write"),
            "{e}"
        );
        // No locking at all is always allowed.
        lock_image(&w3, &p, LockMode::None).unwrap();
    }

    #[test]
    fn an_image_lock_lives_on_its_own_descriptor_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        let image = open(&p);
        let lock =
            ImageLock::acquire(&image, &p, LockMode::Exclusive, std::time::Duration::ZERO).unwrap();
        assert!(lock.is_held());
        // The lock is not on the image's own descriptor: that one holds nothing, so closing
        // it (or a kernel that keeps it open for a while) does not matter...
        let other = open(&p);
        assert!(lock_image(&other, &p, LockMode::Shared).is_err());
        drop(image);
        assert!(lock_image(&other, &p, LockMode::Shared).is_err());
        // ...and dropping the lock releases the image.
        drop(lock);
        until_released(|| lock_image(&other, &p, LockMode::Exclusive));
        // Without locking, nothing is opened or checked.
        let none =
            ImageLock::acquire(&open(&p), &p, LockMode::None, std::time::Duration::ZERO).unwrap();
        assert!(!none.is_held());
    }

    #[test]
    fn holders_are_named_when_visible() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        // A lock held by this process is not reported (we skip ourselves), and no lock → "".
        assert_eq!(holders(&p), "");
        assert_eq!(holders(&dir.path().join("missing")), "");
    }
}
