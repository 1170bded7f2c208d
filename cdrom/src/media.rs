//! Where media come from: opening an image or a drive safely, and the media directories that
//! `media-insert` is confined to.
//!
//! `media-insert` runs as the daemon's user (often root) on a path named by whoever reaches the
//! control socket, and the guest then reads what was opened. So a path is taken only if, once
//! every symlink is resolved, it lies under one of the media directories (`--media-dir DIR`,
//! by default the directory of the medium cdrom started with), and only if it is a regular
//! file or a block device that is not part of a kernel pseudo file system (`/proc`, `/sys`,
//! ...). The checks hold against a path that changes while it is being opened: the resolved
//! path is opened relative to its media directory with `openat2`, the kernel refusing any
//! symlink on the way and any step out of the directory (without `openat2`: with `O_NOFOLLOW`),
//! then the opened file itself is checked (its type, its file system, and where
//! `/proc/self/fd` says it really is).

use std::fmt;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use vback_block::device_size;
use vback_block::lock::{ImageLock, LockError, LockMode};

use crate::MediumError;
use crate::mmc::Medium;

/// The directories `media-insert` takes media from (canonical paths).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MediaDirs {
    dirs: Vec<PathBuf>,
    /// The default: the directory of the medium given at start.
    from_start_medium: bool,
}

impl MediaDirs {
    /// The directories given with `--media-dir` (each must exist and be a directory); without
    /// any, the directory of `start_medium`; with neither, none (`media-insert` is refused).
    pub fn new(given: &[PathBuf], start_medium: Option<&Path>) -> Result<MediaDirs, MediumError> {
        if !given.is_empty() {
            let mut dirs = Vec::with_capacity(given.len());
            for d in given {
                let canon = std::fs::canonicalize(d).map_err(|source| MediumError::MediaDir {
                    dir: d.clone(),
                    source,
                })?;
                if !canon.is_dir() {
                    return Err(MediumError::MediaDirNotDir(d.clone()));
                }
                if !dirs.contains(&canon) {
                    dirs.push(canon);
                }
            }
            return Ok(MediaDirs {
                dirs,
                from_start_medium: false,
            });
        }
        let Some(medium) = start_medium else {
            return Ok(MediaDirs::default());
        };
        let parent = match medium.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let canon = std::fs::canonicalize(parent).map_err(|source| MediumError::Io {
            op: "resolve the directory of",
            path: medium.to_owned(),
            source,
        })?;
        Ok(MediaDirs {
            dirs: vec![canon],
            from_start_medium: true,
        })
    }

    /// The directories (canonical).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    fn contains(&self, resolved: &Path) -> bool {
        self.dirs.iter().any(|d| resolved.starts_with(d))
    }

    /// Opens `path` for `media-insert`: it must resolve to a regular file or a block device
    /// under one of the directories (see the module documentation).
    pub fn open(&self, path: &Path, shared: bool) -> Result<Medium, MediumError> {
        if self.dirs.is_empty() {
            return Err(MediumError::NoMediaDirs);
        }
        let resolved = std::fs::canonicalize(path).map_err(|source| MediumError::Io {
            op: "resolve",
            path: path.to_owned(),
            source,
        })?;
        if !self.contains(&resolved) {
            return Err(MediumError::OutsideMediaDirs {
                path: path.to_owned(),
                resolved,
                dirs: self.clone(),
            });
        }
        // Refuse FIFOs, sockets and character devices before opening them at all (opening one
        // can block or act on a device); the opened file is checked again below.
        let meta = std::fs::symlink_metadata(&resolved).map_err(|source| MediumError::Io {
            op: "inspect",
            path: path.to_owned(),
            source,
        })?;
        check_kind(path, meta.file_type())?;
        let file = self.open_resolved(path, &resolved)?;
        check_opened(path, &file)?;
        // Where the opened file really is (the kernel kept the resolution beneath the media
        // directory already; this also covers the fallback without openat2).
        let real = fd_path(file.as_raw_fd()).map_err(|source| MediumError::Io {
            op: "locate (through /proc/self/fd)",
            path: path.to_owned(),
            source,
        })?;
        if !self.contains(&real) {
            return Err(MediumError::OutsideMediaDirs {
                path: path.to_owned(),
                resolved: real,
                dirs: self.clone(),
            });
        }
        medium_from(resolved, file, shared, false)
    }

    /// Opens `resolved` (a canonical path under one of the directories) so that the kernel
    /// refuses any symlink met on the way and any step out of the directory: a path changed
    /// since it was resolved fails with [`MediumError::Changed`] instead of leading elsewhere.
    /// Where `openat2` is missing (a kernel before 5.6, or a seccomp filter), the last
    /// component is opened without following a symlink, and the caller's check of where the
    /// file lies does the rest.
    fn open_resolved(&self, path: &Path, resolved: &Path) -> Result<File, MediumError> {
        let io = |op, source| MediumError::Io {
            op,
            path: path.to_owned(),
            source,
        };
        let changed = |e: &std::io::Error| {
            matches!(
                e.raw_os_error(),
                Some(libc::ELOOP | libc::EXDEV | libc::EAGAIN)
            )
        };
        let flags = libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;
        let dir = self
            .dirs
            .iter()
            .find(|d| resolved.starts_with(d))
            .ok_or_else(|| MediumError::OutsideMediaDirs {
                path: path.to_owned(),
                resolved: resolved.to_owned(),
                dirs: self.clone(),
            })?;
        let rel = resolved.strip_prefix(dir).unwrap_or(resolved);
        let dir_fd = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(dir)
            .map_err(|e| io("open the media directory of", e))?;
        let rel_c = std::ffi::CString::new(rel.as_os_str().as_encoded_bytes()).map_err(|e| {
            io(
                "open",
                std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
            )
        })?;
        // SAFETY: `open_how` is plain old data, valid when zeroed (unused fields must be 0).
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        how.flags = flags as u64;
        how.resolve =
            libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
        // SAFETY: openat2 reads the NUL-terminated `rel_c` and `size_of::<open_how>()` bytes of
        // `how`, both alive for the call; `dir_fd` is an open directory.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir_fd.as_raw_fd(),
                rel_c.as_ptr(),
                &raw const how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd >= 0 {
            let fd = RawFd::try_from(fd).map_err(|e| io("open", std::io::Error::other(e)))?;
            // SAFETY: openat2 just returned `fd`, a new descriptor that nothing else owns.
            return Ok(unsafe { File::from_raw_fd(fd) });
        }
        let e = std::io::Error::last_os_error();
        if changed(&e) {
            return Err(MediumError::Changed(path.to_owned()));
        }
        if !matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) {
            return Err(io("open", e));
        }
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(flags | libc::O_NOFOLLOW)
            .open(resolved)
            .map_err(|e| {
                if changed(&e) {
                    MediumError::Changed(path.to_owned())
                } else {
                    io("open", e)
                }
            })
    }
}

impl fmt::Display for MediaDirs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.dirs.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{}", d.display())?;
        }
        if self.from_start_medium {
            f.write_str(": the directory of the medium cdrom started with")?;
        }
        Ok(())
    }
}

/// Opens an ISO image or a host CD drive read-only and locks it: exclusively, or shared with
/// other `--shared` users. For the medium named at start (an operator's choice: symlinks are
/// followed, no directory applies); `media-insert` goes through [`MediaDirs::open`].
pub fn open_medium(path: &Path, shared: bool) -> Result<Medium, MediumError> {
    open_medium_as(path, shared, false)
}

/// [`open_medium`], for a live migration's destination when `incoming`: the medium is opened
/// without its lock, which [`Medium::take_lock`] takes when the front end starts the device
/// (the source's cdrom released it by then).
pub fn open_medium_as(path: &Path, shared: bool, incoming: bool) -> Result<Medium, MediumError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|source| MediumError::Io {
            op: "open",
            path: path.to_owned(),
            source,
        })?;
    check_opened(path, &file)?;
    medium_from(path.to_owned(), file, shared, incoming)
}

fn kind_name(t: std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_symlink() {
        "a symlink"
    } else {
        "not a file"
    }
}

fn check_kind(path: &Path, t: std::fs::FileType) -> Result<(), MediumError> {
    if t.is_file() || t.is_block_device() {
        Ok(())
    } else {
        Err(MediumError::WrongKind {
            path: path.to_owned(),
            kind: kind_name(t),
        })
    }
}

/// Kernel pseudo file systems: their "regular files" are views of the kernel or of processes.
const PSEUDO_FS: [(libc::__fsword_t, &str); 8] = [
    (libc::PROC_SUPER_MAGIC, "proc"),
    (libc::SYSFS_MAGIC, "sysfs"),
    (libc::DEBUGFS_MAGIC, "debugfs"),
    (libc::TRACEFS_MAGIC, "tracefs"),
    (libc::SECURITYFS_MAGIC, "securityfs"),
    (libc::CGROUP_SUPER_MAGIC, "cgroup"),
    (libc::CGROUP2_SUPER_MAGIC, "cgroup2"),
    (libc::BPF_FS_MAGIC, "bpf"),
];

/// Checks a file opened read-only and non-blocking (a FIFO would wait for a writer): a regular
/// file or a block device, not on a pseudo file system; then makes it blocking. `path` is the
/// name for messages.
fn check_opened(path: &Path, file: &File) -> Result<(), MediumError> {
    let io = |op, source| MediumError::Io {
        op,
        path: path.to_owned(),
        source,
    };
    let meta = file.metadata().map_err(|e| io("inspect", e))?;
    check_kind(path, meta.file_type())?;
    let fd = file.as_raw_fd();
    // SAFETY: `statfs` is plain old data, valid when zeroed.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open (owned by `file`, alive for the call) and `st` is a writable statfs
    // that outlives the call.
    if unsafe { libc::fstatfs(fd, &mut st) } < 0 {
        return Err(io("inspect", std::io::Error::last_os_error()));
    }
    if let Some(&(_, fs)) = PSEUDO_FS.iter().find(|(magic, _)| *magic == st.f_type) {
        return Err(MediumError::PseudoFile {
            path: path.to_owned(),
            fs,
        });
    }
    // Reads must wait for the data (io_uring would answer EAGAIN on a non-blocking file).
    // SAFETY: F_GETFL on an open fd has no memory effects.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: F_SETFL on an open fd with the flags it reported, less O_NONBLOCK.
    if fl < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_NONBLOCK) } < 0 {
        return Err(io("set up", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Where an open file lies, as the kernel knows it.
fn fd_path(fd: RawFd) -> std::io::Result<PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
}

/// Sizes and locks an opened, checked medium.
fn medium_from(
    path: PathBuf,
    file: File,
    shared: bool,
    incoming: bool,
) -> Result<Medium, MediumError> {
    let io = |op, source| MediumError::Io {
        op,
        path: path.clone(),
        source,
    };
    let size = device_size(&file).map_err(|e| io("read the size of", e))?;
    let mode = if shared {
        LockMode::Shared
    } else {
        LockMode::Exclusive
    };
    // Not on `file`, which the engine registers with io_uring (see ImageLock); the backend
    // holds it while the medium is in the drive.
    let now = if incoming { LockMode::None } else { mode };
    let lock = ImageLock::acquire(&file, &path, now, std::time::Duration::from_secs(3))
        .map_err(|e| locked(e, shared))?;
    Medium::new(path.clone(), file, size, Some(lock), mode)
        .map_err(|source| MediumError::Backend { path, source })
}

/// A lock error in cdrom's terms (the lock's own words speak of writing, which cdrom never
/// does).
pub(crate) fn locked(e: LockError, shared: bool) -> MediumError {
    match e {
        LockError::InUse { path, holder, .. } => MediumError::Locked {
            path,
            holder,
            shared,
        },
        other => MediumError::Lock(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    struct Dirs {
        _tmp: tempfile::TempDir,
        media: PathBuf,
        outside: PathBuf,
    }

    fn dirs() -> Dirs {
        let tmp = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(tmp.path()).unwrap();
        let media = root.join("media");
        std::fs::create_dir(&media).unwrap();
        std::fs::write(media.join("disc.iso"), vec![7u8; 4096]).unwrap();
        let outside = root.join("secret");
        std::fs::write(&outside, b"not for the guest").unwrap();
        Dirs {
            _tmp: tmp,
            media,
            outside,
        }
    }

    fn only(dir: &Path) -> MediaDirs {
        MediaDirs::new(&[dir.to_owned()], None).unwrap()
    }

    #[test]
    fn an_image_in_a_media_directory_is_taken() {
        let d = dirs();
        let m = only(&d.media)
            .open(&d.media.join("disc.iso"), false)
            .unwrap();
        assert_eq!(
            (m.path.as_path(), m.size),
            (&*d.media.join("disc.iso"), 4096)
        );
        // A symlink that stays inside: the drive holds its target.
        symlink(d.media.join("disc.iso"), d.media.join("current.iso")).unwrap();
        drop(m);
        let m = only(&d.media)
            .open(&d.media.join("current.iso"), false)
            .unwrap();
        assert_eq!(m.path, d.media.join("disc.iso"));
    }

    #[test]
    fn paths_outside_the_media_directories_are_refused_with_the_option_named() {
        let d = dirs();
        let dirs = only(&d.media);
        symlink(&d.outside, d.media.join("link.iso")).unwrap();
        symlink("/etc/shadow", d.media.join("shadow.iso")).unwrap();
        let dotdot = d.media.join("../secret");
        for p in [
            d.outside.clone(),
            d.media.join("link.iso"),
            d.media.join("shadow.iso"),
            dotdot,
            PathBuf::from("/etc/shadow"),
            PathBuf::from("/proc/self/mem"),
        ] {
            let e = dirs.open(&p, false).unwrap_err();
            assert!(
                matches!(e, MediumError::OutsideMediaDirs { .. }),
                "{}: {e}",
                p.display()
            );
            let msg = e.to_string();
            assert!(
                msg.contains(&p.display().to_string())
                    && msg.contains(&d.media.display().to_string())
                    && msg.contains("--media-dir DIR"),
                "{msg}"
            );
        }
    }

    #[test]
    fn the_lock_is_held_by_the_backend_while_the_medium_is_in_the_drive() {
        let d = dirs();
        let iso = d.media.join("disc.iso");
        let m = open_medium(&iso, false).unwrap();
        assert_eq!(m.served_by().0, "file");
        let e = open_medium(&iso, true).unwrap_err();
        assert!(matches!(e, MediumError::Locked { .. }), "{e}");
        let mut cd = crate::mmc::Cdrom::new(Some(m), "l");
        cd.execute(&[0, 0, 0, 0, 0, 0], 0);
        let r = cd.execute(&[0x28, 0, 0, 0, 0, 1, 0, 0, 1, 0], 2048);
        assert_eq!(r.data, vec![7u8; 2048], "read through the backend");
        // The guest ejects: the disc leaves the drive, and its lock with it.
        cd.execute(&[0x1b, 0, 0, 0, 2, 0], 0);
        open_medium(&iso, false).unwrap();
    }

    #[test]
    fn fifos_sockets_and_character_devices_are_refused_without_blocking() {
        let d = dirs();
        let fifo = d.media.join("fifo.iso");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let sock = d.media.join("sock.iso");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        for (p, kind) in [(fifo, "a FIFO"), (sock, "a socket")] {
            let e = only(&d.media).open(&p, false).unwrap_err();
            assert!(e.to_string().contains(kind), "{e}");
        }
        let e = only(Path::new("/dev"))
            .open(Path::new("/dev/null"), false)
            .unwrap_err();
        assert!(e.to_string().contains("a character device"), "{e}");
        // The opened file is checked too (the path may change after the first look).
        let e = check_opened(&d.media, &File::open(&d.media).unwrap()).unwrap_err();
        assert!(e.to_string().contains("a directory"), "{e}");
    }

    #[test]
    fn block_devices_are_taken() {
        // A block device node inside the media directory (root: mknod), for a loop device's
        // numbers; an unbound loop device opens, with size 0.
        let d = dirs();
        let node = d.media.join("drive");
        let c = std::ffi::CString::new(node.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a NUL-terminated path that outlives the call.
        let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFBLK | 0o600, libc::makedev(7, 0)) };
        assert_eq!(
            r,
            0,
            "mknod (the test needs root): {}",
            std::io::Error::last_os_error()
        );
        let m = only(&d.media).open(&node, true).unwrap();
        assert_eq!(m.path, node);
    }

    #[test]
    fn files_of_kernel_pseudo_file_systems_are_refused_even_inside_a_media_directory() {
        let dirs = only(Path::new("/proc/self"));
        let e = dirs
            .open(Path::new("/proc/self/status"), false)
            .unwrap_err();
        assert!(
            matches!(e, MediumError::PseudoFile { fs: "proc", .. }),
            "{e}"
        );
        let e = open_medium(Path::new("/proc/self/mem"), false).unwrap_err();
        assert!(e.to_string().contains("proc"), "{e}");
    }

    #[test]
    fn a_path_changed_after_it_was_resolved_is_not_followed() {
        // What a swap between the check and the open leaves to `open_resolved`: a resolved
        // path that now holds a symlink, out of the directory or even inside it, or a
        // directory on the way that became a symlink.
        let d = dirs();
        let dirs = only(&d.media);
        let link = d.media.join("swapped.iso");
        symlink(&d.outside, &link).unwrap();
        let inside = d.media.join("inside.iso");
        symlink(d.media.join("disc.iso"), &inside).unwrap();
        std::fs::create_dir(d.outside.with_extension("d")).unwrap();
        std::fs::write(d.outside.with_extension("d").join("x.iso"), b"outside").unwrap();
        symlink(d.outside.with_extension("d"), d.media.join("sub")).unwrap();
        for p in [link, inside, d.media.join("sub/x.iso")] {
            let e = dirs.open_resolved(&p, &p).unwrap_err();
            assert!(matches!(e, MediumError::Changed(_)), "{}: {e}", p.display());
        }
        assert!(
            dirs.open_resolved(&d.media, &d.media.join("disc.iso"))
                .is_ok()
        );
        // And where an opened file lies, as the last check sees it.
        let f = File::open(&d.outside).unwrap();
        let real = fd_path(f.as_raw_fd()).unwrap();
        assert_eq!(real, d.outside);
        assert!(!dirs.contains(&real));
    }

    #[test]
    fn the_default_is_the_start_mediums_directory_and_none_without_one() {
        let d = dirs();
        let m = MediaDirs::new(&[], Some(&d.media.join("disc.iso"))).unwrap();
        assert_eq!(m.dirs(), std::slice::from_ref(&d.media));
        assert!(
            m.to_string()
                .contains("the directory of the medium cdrom started with")
        );

        let none = MediaDirs::new(&[], None).unwrap();
        let e = none.open(&d.media.join("disc.iso"), false).unwrap_err();
        assert!(matches!(e, MediumError::NoMediaDirs), "{e}");
        assert!(
            e.to_string().contains("start cdrom with --media-dir DIR"),
            "{e}"
        );

        // Given directories replace the default; each must be a directory.
        let m = MediaDirs::new(
            std::slice::from_ref(&d.media),
            Some(Path::new("/etc/passwd")),
        )
        .unwrap();
        assert_eq!(m.dirs(), std::slice::from_ref(&d.media));
        let e = MediaDirs::new(std::slice::from_ref(&d.outside), None).unwrap_err();
        assert!(
            e.to_string().contains("--media-dir") && e.to_string().contains("not a directory"),
            "{e}"
        );
        let e = MediaDirs::new(&[d.media.join("nope")], None).unwrap_err();
        assert!(e.to_string().contains("--media-dir"), "{e}");
    }
}
