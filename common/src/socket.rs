//! Unix listening sockets, bound the way an operator expects: a stale socket file left by a
//! crashed daemon is replaced, a socket someone still answers on is not, and a path that is not
//! a socket at all is never removed.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Why a socket could not be bound.
#[derive(Debug, Error)]
pub enum BindError {
    /// Another process answers on the path.
    #[error("socket {path} is in use by another process; stop that process or choose another path")]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// The path exists and is not a socket.
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// Binding failed.
    #[error("cannot listen on socket {path}: {source}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// Binds a unix listener at `path`, replacing a stale socket file.
pub fn bind_unix(path: &Path) -> Result<UnixListener, BindError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(BindError::NotASocket {
                path: path.to_owned(),
            });
        }
        if UnixStream::connect(path).is_ok() {
            return Err(BindError::InUse {
                path: path.to_owned(),
            });
        }
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path).map_err(|source| BindError::Bind {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_live_and_foreign_paths() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        drop(UnixListener::bind(&p).unwrap());
        let live = bind_unix(&p).expect("a stale socket is replaced");
        assert!(matches!(bind_unix(&p), Err(BindError::InUse { .. })));
        drop(live);

        let f = dir.path().join("f");
        std::fs::write(&f, b"data").unwrap();
        let e = bind_unix(&f).unwrap_err();
        assert!(e.to_string().contains("is not a socket"), "{e}");
        assert_eq!(std::fs::read(&f).unwrap(), b"data");

        let e = bind_unix(&dir.path().join("no/such/dir/s")).unwrap_err();
        assert!(matches!(e, BindError::Bind { .. }), "{e}");
    }
}
