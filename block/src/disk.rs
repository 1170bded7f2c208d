//! What backs the virtual disk: a raw image file, a host block device, or the null device.
//!
//! Opening is where policy lives: the format always comes from the spec (never probed), the
//! image is locked the way QEMU locks it (see [`crate::lock`]), images are opened with
//! O_DIRECT unless the operator asks for the page cache, and a second, buffered descriptor is
//! kept for the rare request whose buffers O_DIRECT cannot take.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use thiserror::Error;
use vback_common::spec::{DiskUname, ImageFormat};

use crate::engine::EngineFiles;
use crate::lock::{ImageLock, LockError, LockMode};
use crate::qcow2::{self, Image, Qcow2Error};

/// The unit of a disk's capacity: the 512-byte sector virtio-blk counts in. A size that is not
/// a multiple is rounded down.
pub const SECTOR: u64 = 512;

/// Why a disk could not be opened or changed.
#[derive(Debug, Error)]
pub enum DiskError {
    /// The uname names something blkback cannot serve (yet).
    #[error("{uname}: {reason}")]
    Unsupported {
        /// The uname as given.
        uname: String,
        /// Why, as a sentence.
        reason: String,
    },
    /// Opening or inspecting the file failed.
    #[error("cannot {op} {path}: {source}")]
    Io {
        /// What was being done ("open", "read the size of").
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// `phy:` names something that is not a block device (or `file:` a device).
    #[error("{path} {problem}")]
    WrongKind {
        /// The path.
        path: PathBuf,
        /// What is wrong, as a phrase.
        problem: String,
    },
    /// Another process has the image.
    #[error(
        "{0}, or, if you know the image is not used elsewhere, start blkback with --mode w! (writable, without locking)"
    )]
    Locked(#[from] LockError),
    /// A resize that cannot be done.
    #[error("resize refused: {0}")]
    Resize(String),
    /// The qcow2 image (or its backing chain) was refused.
    #[error(transparent)]
    Qcow2(#[from] Qcow2Error),
}

/// The kind of storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskKind {
    /// A regular file holding raw bytes.
    File,
    /// A host block device.
    Block,
    /// No storage: every request succeeds without I/O.
    Null,
    /// A qcow2 image (with its backing chain).
    Qcow2,
}

impl DiskKind {
    /// A word for `status`.
    pub fn name(self) -> &'static str {
        match self {
            DiskKind::File => "file",
            DiskKind::Block => "block-device",
            DiskKind::Null => "null",
            DiskKind::Qcow2 => "qcow2",
        }
    }
}

/// How to open the disk.
#[derive(Debug, Clone)]
pub struct DiskOptions {
    /// The guest may not write.
    pub read_only: bool,
    /// Use O_DIRECT (default) rather than the page cache.
    pub direct: bool,
    /// Locking mode.
    pub lock: LockMode,
    /// qcow2: metadata cache budget in bytes and backing chain policy.
    pub qcow2: qcow2::OpenOptions,
    /// A live migration's destination: the image is opened without its lock (whatever `lock`
    /// says), and a qcow2 image's metadata is only read (the source is still writing it): the
    /// metadata is read again, writable, when [`Disk::take_lock`] takes the lock.
    pub incoming: bool,
}

impl Default for DiskOptions {
    /// Writable, O_DIRECT, locked exclusively, the default qcow2 policy.
    fn default() -> DiskOptions {
        DiskOptions {
            read_only: false,
            direct: true,
            lock: LockMode::Exclusive,
            qcow2: qcow2::OpenOptions::default(),
            incoming: false,
        }
    }
}

/// An open disk.
#[derive(Debug)]
pub struct Disk {
    /// What it is.
    pub kind: DiskKind,
    /// The uname it was opened from.
    pub uname: DiskUname,
    /// The file for regular files and devices.
    pub files: Option<EngineFiles>,
    /// Whether O_DIRECT is in use.
    pub direct: bool,
    /// Read-only.
    pub read_only: bool,
    /// Physical block size in bytes (for the topology hint).
    pub physical_block: u32,
    /// Whether discard does anything (punch holes, BLKDISCARD).
    pub discard: bool,
    /// The qcow2 metadata, for [`DiskKind::Qcow2`] (the engine files are the image's).
    pub qcow2: Option<Mutex<Image>>,
    /// qcow2: how the image is opened again when a migration hands it over (see
    /// [`Disk::take_lock`]).
    qcow2_opts: Option<qcow2::OpenOptions>,
    capacity: AtomicU64,
    /// Set when a raw disk begins with another format's signature (see [`format_warning`]).
    pub format_warning: Option<String>,
    /// QEMU's locks on the image, on a descriptor of their own (the engine's are registered
    /// with io_uring, which would keep them past a crash); None for the null device, and after
    /// [`Disk::close`].
    lock: Mutex<Option<ImageLock>>,
}

/// A warning when a disk served as raw begins with the signature of an image format. The
/// format is never guessed from the content (a guest may write any bytes to its own raw disk),
/// but an operator who named a qcow2 or VMDK image `tap:aio:` should hear about it: the guest
/// sees the header as data, and may overwrite it.
pub fn format_warning(head: &[u8], path: &Path) -> Option<String> {
    let (format, spec) = if head.starts_with(b"QFI\xfb") {
        ("a qcow2", "tap:qcow:")
    } else if head.starts_with(b"KDMV") || head.starts_with(b"COWD") {
        ("a VMDK", "tap:vmdk: (not served yet)")
    } else if head.starts_with(b"# Disk DescriptorFile") {
        ("a VMDK descriptor", "tap:vmdk: (not served yet)")
    } else {
        return None;
    };
    Some(format!(
        "{} starts with {format} header but is served as a raw disk, as its spec says: the guest \
         sees the header as data and can overwrite it; if it is {format} image, use {spec}",
        path.display()
    ))
}

// Block-device ioctls (linux/fs.h).
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKPBSZGET: libc::c_ulong = 0x127b;
const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKZEROOUT: libc::c_ulong = 0x127f;

fn ioctl_u64(file: &File, req: libc::c_ulong) -> std::io::Result<u64> {
    let mut v: u64 = 0;
    // SAFETY: `req` is a read-only block ioctl that writes one integer of at most 64 bits into
    // the pointed-to value, which lives on our stack for the call.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), req, &mut v) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(v)
    }
}

/// The size in bytes of an open regular file or host block device (`BLKGETSIZE64`).
pub fn device_size(file: &File) -> std::io::Result<u64> {
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        ioctl_u64(file, BLKGETSIZE64)
    } else {
        Ok(meta.len())
    }
}

fn block_range_ioctl(
    file: &File,
    req: libc::c_ulong,
    offset: u64,
    len: u64,
) -> std::io::Result<()> {
    let range: [u64; 2] = [offset, len];
    // SAFETY: BLKDISCARD and BLKZEROOUT read a `uint64_t[2]` range from the pointer, which is
    // valid for the duration of the call.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), req, range.as_ptr()) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn open_file(path: &Path, read_only: bool, direct: bool) -> std::io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(!read_only);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path)
}

impl Disk {
    /// Opens what `uname` names.
    pub fn open(uname: &DiskUname, opts: DiskOptions) -> Result<Disk, DiskError> {
        let unsupported = |reason: &str| DiskError::Unsupported {
            uname: uname.to_string(),
            reason: reason.to_owned(),
        };
        let (path, want_block) = match uname {
            DiskUname::Null { size } => {
                return Ok(Disk {
                    kind: DiskKind::Null,
                    uname: uname.clone(),
                    files: None,
                    direct: false,
                    read_only: opts.read_only,
                    physical_block: 512,
                    discard: true,
                    qcow2: None,
                    qcow2_opts: None,
                    capacity: AtomicU64::new(*size),
                    format_warning: None,
                    lock: Mutex::new(None),
                });
            }
            DiskUname::Image {
                format: ImageFormat::Raw,
                path,
            } => (path.clone(), false),
            DiskUname::Phy(path) => (path.clone(), true),
            DiskUname::Image {
                format: ImageFormat::Qcow2,
                path,
            } => (path.clone(), false),
            DiskUname::Image {
                format: ImageFormat::Vmdk,
                ..
            } => {
                return Err(unsupported(
                    "VMDK images are not supported yet; convert with `qemu-img convert -O raw` and use file:",
                ));
            }
            DiskUname::Cdrom(_) => {
                return Err(unsupported(
                    "a CD-ROM is served by the cdrom backend (vhost-user-scsi), not by blkback",
                ));
            }
            DiskUname::Iscsi { .. } => {
                return Err(unsupported("iSCSI disks are not supported yet"));
            }
            DiskUname::Nbd(_) => return Err(unsupported("NBD disks are not supported yet")),
            DiskUname::Npiv { .. } => {
                return Err(unsupported(
                    "NPIV needs Fibre Channel hardware, which this host does not have",
                ));
            }
        };
        let io = |op, source| DiskError::Io {
            op,
            path: path.clone(),
            source,
        };
        let meta = std::fs::metadata(&path).map_err(|e| io("open", e))?;
        let is_block = meta.file_type().is_block_device();
        if want_block && !is_block {
            return Err(DiskError::WrongKind {
                path,
                problem:
                    "is not a block device: phy: is for host devices; use file: for an image file"
                        .into(),
            });
        }
        if !want_block && !meta.is_file() {
            return Err(DiskError::WrongKind {
                path,
                problem: if is_block {
                    "is a block device: use phy: for host devices".into()
                } else {
                    "is not a regular file".into()
                },
            });
        }
        let main = match open_file(&path, opts.read_only, opts.direct) {
            Ok(f) => f,
            // Some file systems (tmpfs) refuse O_DIRECT: say so and use the page cache.
            Err(e) if opts.direct && e.raw_os_error() == Some(libc::EINVAL) => {
                log::warn!(
                    "{}: the file system does not support O_DIRECT; using the page cache",
                    path.display()
                );
                return Self::open(
                    uname,
                    DiskOptions {
                        direct: false,
                        ..opts.clone()
                    },
                );
            }
            Err(e) => return Err(io("open", e)),
        };
        // Not on `main`, which the engine registers with io_uring (see ImageLock). A previous
        // daemon of an older version that just died may still hold its lock for a moment.
        let lock_mode = if opts.incoming {
            LockMode::None
        } else {
            opts.lock
        };
        let lock = ImageLock::acquire(&main, &path, lock_mode, std::time::Duration::from_secs(3))?;
        let buffered = if opts.direct {
            Some(Arc::new(
                open_file(&path, opts.read_only, false).map_err(|e| io("open", e))?,
            ))
        } else {
            None
        };
        let is_qcow2 = matches!(
            uname,
            DiskUname::Image {
                format: ImageFormat::Qcow2,
                ..
            }
        );
        let qcow2_opts = is_qcow2.then(|| qcow2::OpenOptions {
            writable: !opts.read_only,
            ..opts.qcow2.clone()
        });
        let image = if let Some(q) = &qcow2_opts {
            let meta_fd = buffered
                .as_deref()
                .unwrap_or(&main)
                .try_clone()
                .map_err(|e| io("open", e))?;
            // A migration's destination only reads: opening for writing may write the header
            // (auto-clear bits, a dirty image's refcounts) while the source still owns it.
            let now = qcow2::OpenOptions {
                writable: q.writable && !opts.incoming,
                ..q.clone()
            };
            Some(Image::open(&path, meta_fd, &now)?)
        } else {
            None
        };
        let (size, physical_block, discard) = if let Some(img) = &image {
            (img.size(), (meta.blksize() as u32).clamp(512, 65536), true)
        } else if is_block {
            let size = device_size(&main).map_err(|e| io("read the size of", e))?;
            let pbs = ioctl_u64(&main, BLKPBSZGET).unwrap_or(512) as u32;
            (size, pbs, block_discard_supported(&meta))
        } else {
            (meta.len(), (meta.blksize() as u32).clamp(512, 65536), true)
        };
        let format_warning = if image.is_none() {
            let mut head = [0u8; 32];
            let probe = buffered.as_deref().unwrap_or(&main);
            let n = std::os::unix::fs::FileExt::read_at(probe, &mut head, 0).unwrap_or(0);
            format_warning(&head[..n], &path)
        } else {
            None
        };
        if let Some(w) = &format_warning {
            log::warn!("{w}");
        }
        if size % SECTOR != 0 {
            log::warn!(
                "{}: size {size} is not a multiple of 512; the last {} bytes are not visible to the guest",
                path.display(),
                size % SECTOR
            );
        }
        Ok(Disk {
            kind: if image.is_some() {
                DiskKind::Qcow2
            } else if is_block {
                DiskKind::Block
            } else {
                DiskKind::File
            },
            uname: uname.clone(),
            files: Some(EngineFiles {
                main: Arc::new(main),
                buffered,
            }),
            direct: opts.direct,
            read_only: opts.read_only,
            physical_block: if physical_block.is_power_of_two() {
                physical_block
            } else {
                512
            },
            discard,
            qcow2: image.map(Mutex::new),
            qcow2_opts,
            capacity: AtomicU64::new(size - size % SECTOR),
            format_warning,
            lock: Mutex::new(Some(lock)),
        })
    }

    /// A raw disk on `file`, which the caller opened and checked itself (cdrom's media: its
    /// own path rules decide what may be opened), holding `lock` (taken on a descriptor of its
    /// own, see [`ImageLock`]) for as long as the disk lives. `path` names it in errors and
    /// `status`. A block device is sized with `BLKGETSIZE64`, a regular file by its length;
    /// anything else is refused. The file is read as it was opened (`direct` reports whether
    /// that was with O_DIRECT); no second, buffered descriptor is opened.
    pub fn from_file(
        path: &Path,
        file: File,
        lock: Option<ImageLock>,
        read_only: bool,
    ) -> Result<Disk, DiskError> {
        let io = |op, source| DiskError::Io {
            op,
            path: path.to_owned(),
            source,
        };
        let meta = file.metadata().map_err(|e| io("inspect", e))?;
        let is_block = meta.file_type().is_block_device();
        if !is_block && !meta.is_file() {
            return Err(DiskError::WrongKind {
                path: path.to_owned(),
                problem: "is neither a regular file nor a block device".into(),
            });
        }
        let size = device_size(&file).map_err(|e| io("read the size of", e))?;
        let (uname, physical_block, discard) = if is_block {
            let pbs = ioctl_u64(&file, BLKPBSZGET).unwrap_or(512) as u32;
            (
                DiskUname::Phy(path.to_owned()),
                pbs,
                block_discard_supported(&meta),
            )
        } else {
            (
                DiskUname::Image {
                    format: ImageFormat::Raw,
                    path: path.to_owned(),
                },
                (meta.blksize() as u32).clamp(512, 65536),
                true,
            )
        };
        // SAFETY: F_GETFL on a descriptor `file` owns (open for the call) has no memory effects.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        let direct = flags >= 0 && flags & libc::O_DIRECT != 0;
        Ok(Disk {
            kind: if is_block {
                DiskKind::Block
            } else {
                DiskKind::File
            },
            uname,
            files: Some(EngineFiles {
                main: Arc::new(file),
                buffered: None,
            }),
            direct,
            read_only,
            physical_block: if physical_block.is_power_of_two() {
                physical_block
            } else {
                512
            },
            discard,
            qcow2: None,
            qcow2_opts: None,
            capacity: AtomicU64::new(size - size % SECTOR),
            format_warning: None,
            lock: Mutex::new(lock),
        })
    }

    /// Capacity in bytes (a multiple of 512).
    pub fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Acquire)
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.capacity() / SECTOR
    }

    /// The path, if the disk has one.
    pub fn path(&self) -> Option<&Path> {
        self.uname.path()
    }

    /// Live migration's handoff on the source, once no queue has requests in flight: makes
    /// every write durable and releases the image's lock, so that the destination's daemon can
    /// take it. A qcow2 image is closed as at exit (its reserved clusters given back, so the
    /// destination finds no leaks) and refuses writes from then on. The disk stays open: if
    /// the migration fails the front end starts the device here again, and
    /// [`Disk::take_lock`] locks it again and reads the qcow2 metadata anew.
    pub fn release_lock(&self) -> Result<(), DiskError> {
        // Not released when the flush failed: the destination must not take over an image
        // whose last writes may not be on it.
        self.make_durable(self.qcow2.is_some())?;
        vback_common::sync::lock(&self.lock).take();
        Ok(())
    }

    /// Makes every write durable: a raw image's data (`fdatasync`), a qcow2 image's data and
    /// metadata (`close`: closed too, its reserved clusters given back).
    fn make_durable(&self, close: bool) -> Result<(), DiskError> {
        match (&self.qcow2, &self.files) {
            (Some(img), _) => {
                let mut img = vback_common::sync::lock(img);
                if close { img.close() } else { img.flush() }.map_err(DiskError::from)
            }
            (None, Some(files)) if !self.read_only => {
                files.main.sync_data().map_err(|source| DiskError::Io {
                    op: "flush (fdatasync)",
                    path: self.path().map(Path::to_path_buf).unwrap_or_default(),
                    source,
                })
            }
            _ => Ok(()),
        }
    }

    /// Locks the image for `mode` if it is not locked now (a destination of a migration
    /// opened it unlocked; a source released it): fails, naming who holds it, while another
    /// process holds a conflicting lock. True if it took the lock now, or read a qcow2
    /// image's metadata anew: then the caller must drop every copy of the old mapping (the
    /// [`DataPath`](crate::qcow2::DataPath)) before serving requests.
    ///
    /// A qcow2 image is opened again (its header, tables and refcounts read from the file,
    /// writable unless the disk is read-only) when the lock is taken now, or when it was
    /// opened for reading only as a migration's destination or closed by
    /// [`Disk::release_lock`]: what was cached may be stale, since the other side wrote it.
    pub fn take_lock(&self, mode: LockMode) -> Result<bool, DiskError> {
        let (Some(files), Some(path)) = (&self.files, self.path()) else {
            return Ok(false);
        };
        let mut held = vback_common::sync::lock(&self.lock);
        let took = if held.as_ref().is_some_and(ImageLock::is_held) || mode == LockMode::None {
            false
        } else {
            // No patience: the source released its lock before its front end stopped the
            // device (a close, synchronous), so a lock still there is a process still using
            // the image.
            *held = Some(ImageLock::acquire(
                &files.main,
                path,
                mode,
                std::time::Duration::ZERO,
            )?);
            true
        };
        let (Some(img), Some(opts)) = (&self.qcow2, &self.qcow2_opts) else {
            return Ok(took);
        };
        let mut img = vback_common::sync::lock(img);
        if !took && img.is_writable() == opts.writable {
            return Ok(false);
        }
        let meta_fd = files
            .buffered
            .as_deref()
            .unwrap_or(&files.main)
            .try_clone()
            .map_err(|source| DiskError::Io {
                op: "open",
                path: path.to_owned(),
                source,
            })?;
        let fresh = Image::open(path, meta_fd, opts)?;
        let size = fresh.size();
        // The old image is closed (released) or was read-only: dropping it writes nothing.
        *img = fresh;
        self.capacity.store(size - size % SECTOR, Ordering::Release);
        Ok(true)
    }

    /// Whether the image is locked by this disk now.
    pub fn lock_held(&self) -> bool {
        vback_common::sync::lock(&self.lock)
            .as_ref()
            .is_some_and(ImageLock::is_held)
    }

    /// At exit, once no queue has requests in flight: makes every write durable, closes a
    /// qcow2 image (flushing, and giving back the clusters it reserved) and releases the
    /// disk's lock, even while other holders of the disk (a control request's thread) still
    /// exist. Writes to a closed qcow2 image are refused.
    pub fn close(&self) -> Result<(), DiskError> {
        let r = self.make_durable(true);
        vback_common::sync::lock(&self.lock).take();
        r
    }

    /// Grows the disk to `size` bytes (a file is extended, sparsely), or with `None` re-reads
    /// the size of the file or device (after `dd ... seek=` or a device resize). Shrinking is
    /// refused: it would cut data from under a running guest. Returns the new capacity.
    pub fn resize(&self, size: Option<u64>) -> Result<u64, DiskError> {
        let old = self.capacity();
        if let Some(s) = size {
            if s % SECTOR != 0 {
                return Err(DiskError::Resize(format!(
                    "{s} is not a multiple of 512 bytes"
                )));
            }
            if s < old {
                return Err(DiskError::Resize(format!(
                    "{s} bytes is smaller than the current {old}: shrinking a disk under a running guest loses data"
                )));
            }
        }
        let new = match (self.kind, &self.files) {
            (DiskKind::Null, _) => size.unwrap_or(old),
            (DiskKind::Qcow2, _) => {
                let Some(img) = &self.qcow2 else {
                    return Ok(old);
                };
                let mut img = vback_common::sync::lock(img);
                if let Some(s) = size {
                    if self.read_only {
                        return Err(DiskError::Resize("the disk is read-only".into()));
                    }
                    img.resize(s)?;
                }
                img.size() - img.size() % SECTOR
            }
            (DiskKind::File, Some(f)) => {
                let path = self.path().map(Path::to_path_buf).unwrap_or_default();
                let io = |op, source| DiskError::Io {
                    op,
                    path: path.clone(),
                    source,
                };
                if let Some(s) = size {
                    if self.read_only {
                        return Err(DiskError::Resize("the disk is read-only".into()));
                    }
                    let len = f
                        .main
                        .metadata()
                        .map_err(|e| io("read the size of", e))?
                        .len();
                    if s > len {
                        f.main.set_len(s).map_err(|e| io("extend", e))?;
                    }
                }
                let len = f
                    .main
                    .metadata()
                    .map_err(|e| io("read the size of", e))?
                    .len();
                len - len % SECTOR
            }
            (DiskKind::Block, Some(f)) => {
                if size.is_some() {
                    return Err(DiskError::Resize(
                        "a block device's size is set by the host; resize the device, then call resize without a size".into(),
                    ));
                }
                let path = self.path().map(Path::to_path_buf).unwrap_or_default();
                device_size(&f.main).map_err(|source| DiskError::Io {
                    op: "read the size of",
                    path,
                    source,
                })?
            }
            _ => old,
        };
        if new < old {
            return Err(DiskError::Resize(format!(
                "the backing now holds {new} bytes, less than the {old} the guest sees; keeping {old}"
            )));
        }
        self.capacity.store(new, Ordering::Release);
        Ok(new)
    }

    /// BLKDISCARD on a block device.
    pub fn block_discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        match &self.files {
            Some(f) => block_range_ioctl(&f.main, BLKDISCARD, offset, len),
            None => Ok(()),
        }
    }

    /// BLKZEROOUT on a block device.
    pub fn block_zeroout(&self, offset: u64, len: u64) -> std::io::Result<()> {
        match &self.files {
            Some(f) => block_range_ioctl(&f.main, BLKZEROOUT, offset, len),
            None => Ok(()),
        }
    }

    /// The default serial: `vback-` and 14 hex digits of a hash of the canonical path (stable
    /// across restarts, distinct for every image), 20 bytes like virtio-blk's ID field.
    pub fn default_serial(&self) -> String {
        let key = match self.path() {
            Some(p) => std::fs::canonicalize(p)
                .unwrap_or_else(|_| p.to_owned())
                .display()
                .to_string(),
            None => self.uname.to_string(),
        };
        // FNV-1a, 64 bits.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in key.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        format!("vback-{:014x}", h & 0x00ff_ffff_ffff_ffff)
    }
}

/// Whether the kernel discards on this device (discard_max_bytes > 0 in sysfs).
fn block_discard_supported(meta: &std::fs::Metadata) -> bool {
    let rdev = meta.rdev();
    let p = format!(
        "/sys/dev/block/{}:{}/queue/discard_max_bytes",
        libc::major(rdev),
        libc::minor(rdev)
    );
    std::fs::read_to_string(p)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .is_some_and(|n| n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vback_common::sync::lock;

    fn opts(read_only: bool) -> DiskOptions {
        DiskOptions {
            read_only,
            direct: true,
            lock: if read_only {
                LockMode::Shared
            } else {
                LockMode::Exclusive
            },
            qcow2: Default::default(),
            incoming: false,
        }
    }

    #[test]
    fn open_resize_and_lock() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.raw");
        File::create(&p).unwrap().set_len(1 << 20).unwrap();
        let uname = DiskUname::parse(&format!("file:{}", p.display())).unwrap();
        let d = Disk::open(&uname, opts(false)).unwrap();
        assert_eq!(d.kind, DiskKind::File);
        assert_eq!(d.capacity(), 1 << 20);
        assert_eq!(d.sectors(), 2048);
        assert!(d.default_serial().starts_with("vback-"));
        assert_eq!(d.default_serial().len(), 20);

        // A second writable open is refused, naming the image.
        let e = Disk::open(&uname, opts(false)).unwrap_err();
        assert!(e.to_string().contains(&p.display().to_string()), "{e}");
        assert!(e.to_string().contains("in use"), "{e}");

        // Grow to 2 MiB; shrinking is refused; re-read after an outside grow.
        assert_eq!(d.resize(Some(2 << 20)).unwrap(), 2 << 20);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 2 << 20);
        assert!(
            d.resize(Some(1 << 20))
                .unwrap_err()
                .to_string()
                .contains("shrinking")
        );
        assert!(d.resize(Some(1000)).is_err());
        OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(3 << 20)
            .unwrap();
        assert_eq!(d.resize(None).unwrap(), 3 << 20);
        drop(d);
        // Released on close.
        crate::lock::until_released(|| Disk::open(&uname, opts(true)));
    }

    /// A migration's handoff of a qcow2 image between two disks on it: the destination opens
    /// it while the source still allocates, reads nothing stale once it took over, and the
    /// image is clean (no leaks) with both closed.
    #[test]
    fn a_qcow2_image_is_handed_over_with_its_metadata_read_anew() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.qcow2");
        let ps = p.to_str().unwrap();
        crate::qcow2::tests::qemu_img(&["create", "-q", "-f", "qcow2", ps, "8M"]);
        let uname = DiskUname::parse(&format!("tap:qcow2:{ps}")).unwrap();
        let pattern = |b: u8| vec![b; 64 << 10];
        let src = Disk::open(&uname, opts(false)).unwrap();
        let write =
            |d: &Disk, at: u64, b: u8| lock(d.qcow2.as_ref().unwrap()).write(at, &pattern(b));
        let read = |d: &Disk, at: u64| {
            let mut buf = vec![0u8; 64 << 10];
            lock(d.qcow2.as_ref().unwrap()).read(at, &mut buf).unwrap();
            buf
        };
        write(&src, 0, 1).unwrap();
        let dst = Disk::open(
            &uname,
            DiskOptions {
                incoming: true,
                ..opts(false)
            },
        )
        .unwrap();
        assert!(!dst.lock_held());
        assert!(
            write(&dst, 3 << 20, 9).is_err(),
            "the destination does not write before the handoff"
        );
        // Allocated after the destination read the metadata.
        write(&src, 1 << 20, 2).unwrap();
        assert!(
            dst.take_lock(LockMode::Exclusive).is_err(),
            "the source still holds the image"
        );
        src.release_lock().unwrap();
        assert!(
            write(&src, 4 << 20, 7).is_err(),
            "the source writes no more once it handed the image over"
        );
        assert!(dst.take_lock(LockMode::Exclusive).unwrap());
        assert!(dst.lock_held());
        assert_eq!(read(&dst, 0), pattern(1));
        assert_eq!(read(&dst, 1 << 20), pattern(2), "no stale mapping");
        write(&dst, 2 << 20, 3).unwrap();
        // Nothing more to take or read again.
        assert!(!dst.take_lock(LockMode::Exclusive).unwrap());
        dst.close().unwrap();
        drop((src, dst));
        // Exits 0 only when clean: no corruption, no leaked cluster (qemu_img asserts it).
        crate::qcow2::tests::qemu_img(&["check", "-f", "qcow2", ps]);
        let again = Disk::open(&uname, opts(true)).unwrap();
        for (at, b) in [(0, 1), (1 << 20, 2), (2 << 20, 3)] {
            assert_eq!(read(&again, at), pattern(b), "at {at}");
        }
    }

    #[test]
    fn wrong_kinds_and_formats_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        File::create(&p).unwrap().set_len(4096).unwrap();
        for (u, says) in [
            (format!("phy:{}", p.display()), "is not a block device"),
            (
                format!("file:{}", dir.path().display()),
                "not a regular file",
            ),
            (
                format!("file:{}/missing", dir.path().display()),
                "cannot open",
            ),
            (format!("tap:qcow:{}", p.display()), "not a qcow2 image"),
            ("tap:cdrom:/x.iso".to_string(), "cdrom backend"),
            ("npiv:1,1".to_string(), "Fibre Channel"),
        ] {
            let e = Disk::open(&DiskUname::parse(&u).unwrap(), opts(false)).unwrap_err();
            assert!(e.to_string().contains(says), "{u}: {e}");
        }
    }

    #[test]
    fn odd_sizes_round_down_and_null_resizes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("odd");
        File::create(&p).unwrap().set_len(4096 + 100).unwrap();
        let d = Disk::open(
            &DiskUname::parse(&format!("file:{}", p.display())).unwrap(),
            opts(true),
        )
        .unwrap();
        assert_eq!(d.capacity(), 4096);
        assert!(d.resize(Some(8192)).is_err(), "read-only disks do not grow");

        let n = Disk::open(&DiskUname::parse("null:1M").unwrap(), opts(false)).unwrap();
        assert_eq!(n.kind, DiskKind::Null);
        assert_eq!(n.resize(Some(2 << 20)).unwrap(), 2 << 20);
    }
}
