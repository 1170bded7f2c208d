//! systemd readiness notification (`sd_notify`), without libsystemd.
//!
//! When the daemon runs as a `Type=notify` unit, systemd sets `NOTIFY_SOCKET`; we send
//! `READY=1` once the vhost-user socket listens, `STATUS=...` as the front end comes and goes,
//! and `STOPPING=1` on shutdown. Without `NOTIFY_SOCKET` every call does nothing.
//!
//! With `WatchdogSec=` in the unit, systemd sets `WATCHDOG_USEC` (and `WATCHDOG_PID`); the
//! process then sends `WATCHDOG=1` at half that interval ([`watchdog_interval`]).

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

/// The systemd watchdog interval, if systemd asked this process for keep-alives:
/// `WATCHDOG_USEC` is a positive number of microseconds and `WATCHDOG_PID` is this process's
/// pid or absent (`sd_watchdog_enabled`). A value that is not a number is logged and ignored.
pub fn watchdog_interval() -> Option<std::time::Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    watchdog_from(usec.as_deref(), pid.as_deref(), std::process::id())
}

fn watchdog_from(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<std::time::Duration> {
    let usec = usec?;
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(me)
    {
        // Meant for another process (our parent): not ours to answer.
        return None;
    }
    match usec.trim().parse::<u64>() {
        Ok(0) => None,
        Ok(n) => Some(std::time::Duration::from_micros(n)),
        Err(_) => {
            log::warn!(
                "WATCHDOG_USEC={usec} is not a number of microseconds: no watchdog keep-alives \
                 are sent (check WatchdogSec= in the unit)"
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_only_when_meant_for_this_process() {
        use std::time::Duration;
        assert_eq!(watchdog_from(None, None, 7), None);
        assert_eq!(
            watchdog_from(Some("2000000"), None, 7),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            watchdog_from(Some("2000000"), Some("7"), 7),
            Some(Duration::from_secs(2))
        );
        assert_eq!(watchdog_from(Some("2000000"), Some("8"), 7), None);
        assert_eq!(watchdog_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_from(Some("soon"), None, 7), None);
    }

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
