//! Exit events for vhost-user-backend's worker threads, one eventfd per worker thread for the
//! life of the backend.
//!
//! vhost-user-backend 0.24 asks the backend for a fresh `(EventConsumer, EventNotifier)` pair
//! each time it builds a worker thread, which is once per front-end connection. It registers
//! the consumer with the thread's epoll by `into_raw_fd()` and never closes it
//! (`VringEpollHandler::new`, event_loop.rs), so a backend that creates a new pair per call
//! leaks one descriptor per connection, and a daemon that has seen ~1000 reconnections (VMM
//! restarts, migrations, a hostile reconnect loop) dies with EMFILE. [`ExitEvents`] hands out
//! the same eventfd every time instead: the number of descriptors is bounded by the number of
//! worker threads, not by the number of connections. (To report upstream: the handler should
//! keep the consumer as an `EventConsumer` so that it is closed with the handler.)

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::Mutex;

use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::sync::lock;

/// One exit eventfd per worker thread index, reused across connections. Share one instance
/// between all clones of a backend (keep it behind the backend's `Arc`).
#[derive(Debug, Default)]
pub struct ExitEvents {
    fds: Mutex<HashMap<usize, OwnedFd>>,
}

impl ExitEvents {
    /// An empty set; eventfds are created on first use.
    pub fn new() -> ExitEvents {
        ExitEvents::default()
    }

    /// What `VhostUserBackend::exit_event(thread_index)` returns.
    ///
    /// The consumer is the thread's long-lived eventfd itself (vhost-user-backend takes it with
    /// `into_raw_fd()` and never closes it; this set keeps owning it); the notifier is a
    /// duplicate that the library closes with the handler. Any exit notification left over
    /// from the previous connection is drained first: the caller builds the new workers only
    /// after the previous connection's workers were joined, so nobody else reads it.
    pub fn get(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let mut fds = lock(&self.fds);
        let fd = match fds.entry(thread_index) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                // SAFETY: eventfd(2) takes no pointers; the result is checked before use.
                let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
                if raw < 0 {
                    log::warn!(
                        "cannot create the exit event of worker thread {thread_index}: {}",
                        std::io::Error::last_os_error()
                    );
                    return None;
                }
                // SAFETY: `raw` is a new descriptor that nothing else owns.
                v.insert(unsafe { OwnedFd::from_raw_fd(raw) })
            }
        };
        drain(fd);
        let notifier = fd.try_clone().ok()?;
        // SAFETY: the consumer is built on a descriptor this set owns and keeps open for its
        // whole life. vhost-user-backend 0.24 only calls `into_raw_fd()` on it (registering the
        // number with the worker's epoll) and never closes it, so no double close can happen;
        // a library that dropped the consumer instead would close it, which the fd-count test
        // in daemon.rs (`reconnects_leak_no_descriptors`) would catch as a failed reconnect.
        let consumer = unsafe { EventConsumer::from_raw_fd(fd.as_raw_fd()) };
        // SAFETY: `notifier` is a new descriptor (a dup) that nothing else owns.
        let notifier = unsafe { EventNotifier::from_raw_fd(notifier.into_raw_fd()) };
        Some((consumer, notifier))
    }
}

/// Reads the eventfd's counter to zero (it is non-blocking: an empty one returns EAGAIN).
fn drain(fd: &OwnedFd) {
    let mut buf = [0u8; 8];
    // SAFETY: reads at most 8 bytes into `buf`, which is 8 bytes long and lives for the call.
    let _ = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_descriptor_every_time_and_drained() {
        let ev = ExitEvents::new();
        let (c1, n1) = ev.get(0).unwrap();
        let raw1 = c1.into_raw_fd();
        n1.notify().unwrap();
        drop(n1);
        let (c2, n2) = ev.get(0).unwrap();
        assert_eq!(c2.into_raw_fd(), raw1, "the same eventfd is reused");
        // The leftover notification from the first use was drained.
        let mut buf = [0u8; 8];
        // SAFETY: reads into an 8-byte buffer from a descriptor `ev` keeps open.
        let r = unsafe { libc::read(raw1, buf.as_mut_ptr().cast(), 8) };
        assert_eq!(r, -1, "nothing pending after get()");
        n2.notify().unwrap();
        // SAFETY: as above.
        let r = unsafe { libc::read(raw1, buf.as_mut_ptr().cast(), 8) };
        assert_eq!(r, 8, "the new notifier reaches the same eventfd");
        let (c3, _n3) = ev.get(1).unwrap();
        assert_ne!(
            c3.into_raw_fd(),
            raw1,
            "another thread gets its own eventfd"
        );
    }
}
