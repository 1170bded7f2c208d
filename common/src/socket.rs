//! Unix listening sockets, bound the way an operator expects: a stale socket file left by a
//! crashed daemon is replaced, a socket someone still listens on is not (found without
//! connecting to it, so a live daemon sees no phantom client), a path that is not a socket at
//! all is never removed, and the socket gets the mode and group asked for whatever the umask
//! (0600 by default: only its owner and root may connect).

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Who may connect to a socket the daemon binds: its file mode and group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketPerms {
    /// Permission bits (0o600 by default).
    pub mode: u32,
    /// A group to give the socket to (a numeric gid), if any.
    pub group: Option<u32>,
}

impl Default for SocketPerms {
    fn default() -> Self {
        SocketPerms {
            mode: 0o600,
            group: None,
        }
    }
}

/// Parses an octal mode such as `0660` or `660` (at most 0777).
pub fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        Ok(_) => Err(format!(
            "`{s}` has bits beyond 0777; give permission bits only, such as 0660"
        )),
        Err(_) => Err(format!("`{s}` is not an octal mode such as 0600 or 0660")),
    }
}

/// Parses a group name (looked up in the group database) or a numeric gid.
pub fn parse_group(s: &str) -> Result<u32, String> {
    if let Ok(gid) = s.parse::<u32>() {
        return Ok(gid);
    }
    let name = std::ffi::CString::new(s).map_err(|_| format!("`{s}` is not a group name"))?;
    // SAFETY: getgrnam(3) reads the NUL-terminated name; the returned record (static storage,
    // valid until the next getgr* call) is read at once, during option parsing on the main
    // thread before any other thread looks up groups.
    let gr = unsafe { libc::getgrnam(name.as_ptr()) };
    if gr.is_null() {
        return Err(format!(
            "no group named `{s}` on this host (give a group name from /etc/group or a numeric gid)"
        ));
    }
    // SAFETY: `gr` is non-null and points at a valid group record (see above).
    Ok(unsafe { (*gr).gr_gid })
}

/// Whether a unix socket is listening at `path` in this network namespace, read from
/// /proc/net/unix (without connecting: a vhost-user daemon would take a probe for its front
/// end). `None` if the table cannot be read.
pub fn listening_at(path: &Path) -> Option<bool> {
    const ACCEPTCON: u32 = 0x0001_0000;
    let table = std::fs::read_to_string("/proc/net/unix").ok()?;
    let want = path.to_string_lossy();
    Some(table.lines().skip(1).any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        f.len() >= 8
            && f[7] == want
            && u32::from_str_radix(f[3], 16).is_ok_and(|flags| flags & ACCEPTCON != 0)
    }))
}

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
    /// The mode or group could not be set.
    #[error(
        "cannot give socket {path} mode {mode:04o}{}: {source}",
        group.map(|g| format!(" and group {g}")).unwrap_or_default()
    )]
    Perms {
        /// The path.
        path: PathBuf,
        /// The mode asked for.
        mode: u32,
        /// The group asked for.
        group: Option<u32>,
        /// The OS error.
        source: io::Error,
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

/// Binds a unix listener at `path` with mode 0600, replacing a stale socket file.
pub fn bind_unix(path: &Path) -> Result<UnixListener, BindError> {
    bind_unix_with(path, SocketPerms::default())
}

/// Binds a unix listener at `path` with `perms`, replacing a stale socket file.
pub fn bind_unix_with(path: &Path, perms: SocketPerms) -> Result<UnixListener, BindError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(BindError::NotASocket {
                path: path.to_owned(),
            });
        }
        let live = match listening_at(path) {
            Some(true) => true,
            // Not listed here: stale, or bound in another network namespace (a connection
            // attempt tells which).
            Some(false) | None => UnixStream::connect(path).is_ok(),
        };
        if live {
            return Err(BindError::InUse {
                path: path.to_owned(),
            });
        }
        let _ = std::fs::remove_file(path);
    }
    let bind_err = |source| BindError::Bind {
        path: path.to_owned(),
        source,
    };
    // The socket file is created with 0600 whatever the umask (the umask is process-wide, so
    // it is tightened, never loosened, for the moment of the bind), then given the mode and
    // group asked for: at no time can anyone else connect to a socket meant to be private.
    // SAFETY: umask(2) only swaps the process's file mode mask; no memory is involved.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(bind_err)?;
    let set = || -> io::Result<()> {
        if let Some(gid) = perms.group {
            std::os::unix::fs::lchown(path, None, Some(gid))?;
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(perms.mode))
    };
    if let Err(source) = set() {
        let _ = std::fs::remove_file(path);
        return Err(BindError::Perms {
            path: path.to_owned(),
            mode: perms.mode,
            group: perms.group,
            source,
        });
    }
    Ok(listener)
}

/// Who is on the other end of a connected unix socket (SO_PEERCRED).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// The peer's process id (at connect time).
    pub pid: i32,
    /// Its user id.
    pub uid: u32,
    /// Its group id.
    pub gid: u32,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} uid {}", self.pid, self.uid)
    }
}

/// The credentials of the peer of the connected unix socket `fd`.
pub fn peer_of(fd: std::os::fd::BorrowedFd<'_>) -> Option<Peer> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes at most `len` bytes into `cred`, a ucred that lives for the
    // call; `len` is its size; `fd` is a borrowed, open descriptor.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    (r == 0 && cred.pid != 0).then_some(Peer {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// The mode bits and group of the socket file at `path` (for status and tests).
pub fn socket_perms(path: &Path) -> io::Result<SocketPerms> {
    let m = std::fs::symlink_metadata(path)?;
    Ok(SocketPerms {
        mode: m.mode() & 0o7777,
        group: Some(m.gid()),
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

    #[test]
    fn private_whatever_the_umask_and_as_asked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let _l = bind_unix(&p).unwrap();
        assert_eq!(socket_perms(&p).unwrap().mode, 0o600);
        let q = dir.path().join("q");
        // SAFETY: getegid(2) cannot fail.
        let gid = unsafe { libc::getegid() };
        let _m = bind_unix_with(
            &q,
            SocketPerms {
                mode: 0o660,
                group: Some(gid),
            },
        )
        .unwrap();
        let got = socket_perms(&q).unwrap();
        assert_eq!((got.mode, got.group), (0o660, Some(gid)));
    }

    #[test]
    fn modes_and_groups_parse() {
        assert_eq!(parse_mode("0660"), Ok(0o660));
        assert_eq!(parse_mode("600"), Ok(0o600));
        assert!(parse_mode("0999").unwrap_err().contains("octal"));
        assert!(parse_mode("4777").unwrap_err().contains("beyond 0777"));
        assert_eq!(parse_group("0"), Ok(0));
        assert_eq!(parse_group("root"), Ok(0));
        assert!(
            parse_group("no-such-group-x")
                .unwrap_err()
                .contains("/etc/group")
        );
    }
}
