//! The error every device-facing operation of the library returns: a stable [`ErrorKind`] the
//! device maps to its protocol's status (virtio-blk IOERR / UNSUPP) and the control plane
//! reports, plus the context (operation, path, offset) and the cause for the log.
//!
//! Modelled on cloud-hypervisor's `BlockError { kind, ctx, source }`: a small matchable kind
//! instead of one enum variant per failure site, so a new backend (NBD, iSCSI) adds causes, not
//! kinds.

use std::fmt;
use std::path::PathBuf;

use thiserror::Error;

use crate::disk::DiskError;
use crate::qcow2::Qcow2Error;

/// What went wrong, in a form callers match on. Stable: the names are reported on the control
/// socket (`last_error.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// An I/O operation on the storage failed (EIO and anything not classified below).
    Io,
    /// The image's structure is not valid for its format.
    InvalidFormat,
    /// Valid, but not implemented here (a format feature, an operation the storage lacks).
    Unsupported,
    /// The image's metadata is inconsistent.
    Corrupt,
    /// An offset or length outside the disk (or a read past the end of its file).
    OutOfBounds,
    /// A file the disk needs does not exist.
    NotFound,
    /// The storage is full (ENOSPC, EDQUOT).
    NoSpace,
    /// The disk or image is read-only, or the operation is not permitted.
    ReadOnly,
    /// Another user holds the disk (a lock).
    Busy,
}

impl ErrorKind {
    /// Every kind, in declaration order: `ALL[k as usize] == k` (counters by kind index it).
    pub const ALL: [ErrorKind; 9] = [
        ErrorKind::Io,
        ErrorKind::InvalidFormat,
        ErrorKind::Unsupported,
        ErrorKind::Corrupt,
        ErrorKind::OutOfBounds,
        ErrorKind::NotFound,
        ErrorKind::NoSpace,
        ErrorKind::ReadOnly,
        ErrorKind::Busy,
    ];

    /// The kind's stable name (`io`, `no-space`, ...).
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Io => "io",
            ErrorKind::InvalidFormat => "invalid-format",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::OutOfBounds => "out-of-bounds",
            ErrorKind::NotFound => "not-found",
            ErrorKind::NoSpace => "no-space",
            ErrorKind::ReadOnly => "read-only",
            ErrorKind::Busy => "busy",
        }
    }

    /// The kind of an OS error number.
    pub fn from_errno(errno: i32) -> ErrorKind {
        match errno {
            libc::ENOSPC | libc::EDQUOT => ErrorKind::NoSpace,
            libc::ENOENT | libc::ENXIO | libc::ENODEV => ErrorKind::NotFound,
            libc::EOPNOTSUPP | libc::ENOSYS => ErrorKind::Unsupported,
            libc::EROFS | libc::EPERM | libc::EACCES => ErrorKind::ReadOnly,
            libc::EBUSY | libc::EAGAIN => ErrorKind::Busy,
            libc::EFBIG | libc::EOVERFLOW => ErrorKind::OutOfBounds,
            _ => ErrorKind::Io,
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The operation that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Opening the disk or a queue on it.
    Open,
    /// A read.
    Read,
    /// A write.
    Write,
    /// A flush.
    Flush,
    /// A discard.
    Discard,
    /// A write-zeroes.
    WriteZeroes,
    /// A resize.
    Resize,
    /// Handing a batch to the kernel (or the remote end).
    Submit,
}

impl Operation {
    /// The operation as a word.
    pub fn name(self) -> &'static str {
        match self {
            Operation::Open => "open",
            Operation::Read => "read",
            Operation::Write => "write",
            Operation::Flush => "flush",
            Operation::Discard => "discard",
            Operation::WriteZeroes => "write-zeroes",
            Operation::Resize => "resize",
            Operation::Submit => "submit",
        }
    }
}

/// A failed operation: its kind, what was being done where, and why.
#[derive(Debug, Error)]
#[error("{}{}{}: {source}", op.name(), path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default(), offset.map(|o| format!(" at offset {o}")).unwrap_or_default())]
pub struct BlockError {
    /// The stable kind.
    pub kind: ErrorKind,
    /// What was being done.
    pub op: Operation,
    /// The file, when there is one.
    pub path: Option<PathBuf>,
    /// The byte offset (in the disk as the guest sees it), when it matters.
    pub offset: Option<u64>,
    /// The cause.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl BlockError {
    /// An error of `kind` during `op` with `source` as its cause.
    pub fn new(
        kind: ErrorKind,
        op: Operation,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> BlockError {
        BlockError {
            kind,
            op,
            path: None,
            offset: None,
            source: source.into(),
        }
    }

    /// An OS error (its kind from the errno).
    pub fn os(op: Operation, errno: i32) -> BlockError {
        BlockError::new(
            ErrorKind::from_errno(errno),
            op,
            std::io::Error::from_raw_os_error(errno),
        )
    }

    /// From an `io::Error` (its kind from the errno, else `Io`).
    pub fn io(op: Operation, e: std::io::Error) -> BlockError {
        let kind = e
            .raw_os_error()
            .map_or(ErrorKind::Io, ErrorKind::from_errno);
        BlockError::new(kind, op, e)
    }

    /// Adds the path.
    pub fn at_path(mut self, path: Option<PathBuf>) -> BlockError {
        self.path = path;
        self
    }

    /// Adds the offset.
    pub fn at(mut self, offset: u64) -> BlockError {
        self.offset = Some(offset);
        self
    }
}

impl Qcow2Error {
    /// The stable kind of this qcow2 error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Qcow2Error::Header { .. } => ErrorKind::InvalidFormat,
            Qcow2Error::Io { source, .. } => source
                .raw_os_error()
                .map_or(ErrorKind::Io, ErrorKind::from_errno),
            Qcow2Error::Corrupt { .. } => ErrorKind::Corrupt,
            Qcow2Error::Backing { .. } => ErrorKind::NotFound,
            Qcow2Error::Unsupported { .. } => ErrorKind::Unsupported,
            Qcow2Error::Refused { .. } => ErrorKind::OutOfBounds,
        }
    }
}

impl BlockError {
    /// A qcow2 error during `op` (the image's path is in its message).
    pub fn qcow2(op: Operation, e: Qcow2Error) -> BlockError {
        BlockError::new(e.kind(), op, e)
    }

    /// A disk error during `op`.
    pub fn disk(op: Operation, e: DiskError) -> BlockError {
        let kind = match &e {
            DiskError::Unsupported { .. } => ErrorKind::Unsupported,
            DiskError::Io { source, .. } => source
                .raw_os_error()
                .map_or(ErrorKind::Io, ErrorKind::from_errno),
            DiskError::WrongKind { .. } => ErrorKind::InvalidFormat,
            DiskError::Locked(_) => ErrorKind::Busy,
            DiskError::Resize(_) => ErrorKind::Unsupported,
            DiskError::Qcow2(q) => q.kind(),
        };
        BlockError::new(kind, op, e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_kinds_are_listed_in_declaration_order() {
        for (i, k) in ErrorKind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i, "{}", k.name());
        }
        let names: std::collections::HashSet<&str> =
            ErrorKind::ALL.iter().map(|k| k.name()).collect();
        assert_eq!(names.len(), ErrorKind::ALL.len(), "names are distinct");
    }

    #[test]
    fn kinds_come_from_errnos_and_messages_carry_the_context() {
        assert_eq!(ErrorKind::from_errno(libc::ENOSPC), ErrorKind::NoSpace);
        assert_eq!(ErrorKind::from_errno(libc::EDQUOT), ErrorKind::NoSpace);
        assert_eq!(
            ErrorKind::from_errno(libc::EOPNOTSUPP),
            ErrorKind::Unsupported
        );
        assert_eq!(ErrorKind::from_errno(libc::EIO), ErrorKind::Io);
        let e = BlockError::os(Operation::Write, libc::ENOSPC)
            .at_path(Some("/img/a.raw".into()))
            .at(4096);
        assert_eq!(e.kind, ErrorKind::NoSpace);
        let s = e.to_string();
        assert!(s.starts_with("write /img/a.raw at offset 4096: "), "{s}");
        assert_eq!(e.kind.to_string(), "no-space");
        let q = Qcow2Error::Corrupt {
            path: "/x.qcow2".into(),
            detail: "L2 table at 0".into(),
        };
        let e = BlockError::qcow2(Operation::Read, q);
        assert_eq!(e.kind, ErrorKind::Corrupt);
        assert!(e.to_string().contains("corrupt image"), "{e}");
    }
}
