//! systemd readiness notification (`sd_notify`), without libsystemd.
//!
//! When the daemon runs as a `Type=notify` unit, systemd sets `NOTIFY_SOCKET`; we send
//! `READY=1` once the vhost-user socket listens, `STATUS=...` as the front end comes and goes,
//! and `STOPPING=1` on shutdown. Without `NOTIFY_SOCKET` every call does nothing.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` (e.g. `"READY=1\nSTATUS=waiting"`) to systemd if it asked for notifications.
/// Returns whether a message was sent. Failures are logged, never fatal.
pub fn notify(state: &str) -> bool {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let target = target.to_string_lossy().into_owned();
    let result = (|| -> std::io::Result<()> {
        let sock = UnixDatagram::unbound()?;
        if let Some(name) = target.strip_prefix('@') {
            let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        } else {
            sock.send_to(state.as_bytes(), &target)?;
        }
        Ok(())
    })();
    match result {
        Ok(()) => true,
        Err(e) => {
            log::warn!("cannot notify systemd at NOTIFY_SOCKET={target}: {e}");
            false
        }
    }
}

/// `STATUS=...`: a line systemctl status shows.
pub fn status(text: &str) {
    notify(&format!("STATUS={text}"));
}

#[cfg(test)]
mod tests {
    use super::*;

    // NOTIFY_SOCKET is process-wide: one test covers both the path and the abstract form.
    #[test]
    fn sends_to_the_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        // SAFETY: no other test in this crate reads or writes NOTIFY_SOCKET, and this test does
        // not spawn threads that read the environment concurrently.
        unsafe { std::env::set_var("NOTIFY_SOCKET", &path) };
        assert!(notify("READY=1\nSTATUS=listening"));
        let mut buf = [0u8; 128];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=listening");

        let name = format!("vback-notify-test-{}", std::process::id());
        let rx2 =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        // SAFETY: as above.
        unsafe { std::env::set_var("NOTIFY_SOCKET", format!("@{name}")) };
        status("serving");
        let n = rx2.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STATUS=serving");

        // SAFETY: as above.
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        assert!(!notify("READY=1"));
    }
}
