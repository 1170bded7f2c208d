// Copyright 2019 Intel Corporation. All Rights Reserved.
// Copyright 2019-2021 Alibaba Cloud. All rights reserved.
//
// SPDX-License-Identifier: Apache-2.0

//! The worker threads' event loop: one epoll per thread, waiting on the kicks of the thread's
//! vrings and on whatever the device registers (an I/O engine's completions, a tap, timers).
//!
//! Forked from vhost-user-backend 0.24.0 (`src/event_loop.rs`). Changed: the exit event is the
//! worker's own eventfd, created with it and closed when it is dropped (the library took the
//! consumer from the backend with `into_raw_fd()` and never closed it: one descriptor leaked per
//! connection); the same eventfd also carries the "a vring was registered, look at it" wake-up
//! (the library used a second eventfd behind the same token); errors are a thiserror enum.

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use thiserror::Error;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::backend::VhostUserBackend;
use super::vring::VringT;
use crate::sync::lock;

/// Why a worker thread could not be set up, or stopped.
#[derive(Debug, Error)]
pub enum VringEpollError {
    /// The epoll instance or the wake-up eventfd could not be created or registered.
    #[error("cannot set up the epoll of worker thread {thread}: {source}")]
    Setup {
        /// The worker thread.
        thread: usize,
        /// The OS error.
        source: io::Error,
    },
    /// `epoll_wait` failed.
    #[error("worker thread {thread} cannot wait for events: {source}")]
    Wait {
        /// The worker thread.
        thread: usize,
        /// The OS error.
        source: io::Error,
    },
    /// A kick could not be read.
    #[error("worker thread {thread} cannot read the kick of its vring {vring}: {source}")]
    ReadKick {
        /// The worker thread.
        thread: usize,
        /// The thread's vring index.
        vring: u16,
        /// The OS error.
        source: io::Error,
    },
    /// The device failed to handle an event.
    #[error("worker thread {thread}: the device failed to handle event {event}: {source}")]
    Device {
        /// The worker thread.
        thread: usize,
        /// The event token.
        event: u16,
        /// What the device returned.
        source: io::Error,
    },
}

/// The epoll of one worker thread: add file descriptors to it, remove them, run its loop.
pub struct VringEpollHandler<T: VhostUserBackend> {
    epoll: Epoll,
    backend: T,
    num_backend_queues: usize,
    vrings: Vec<T::Vring>,
    thread_id: usize,
    /// Wakes the loop: to exit (with `exit` set) or to look at `pending`.
    wake: EventFd,
    exit: AtomicBool,
    /// The thread's vrings registered since the loop last looked (their kicks may have come
    /// before the registration: serve them once without one).
    pending: Mutex<HashSet<u16>>,
    /// Held while the device handles an event: [`VringEpollHandler::quiesce`] waits for it.
    busy: Mutex<()>,
}

impl<T: VhostUserBackend> std::fmt::Debug for VringEpollHandler<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VringEpollHandler")
            .field("thread_id", &self.thread_id)
            .field("vrings", &self.vrings.len())
            .finish_non_exhaustive()
    }
}

impl<T: VhostUserBackend> VringEpollHandler<T> {
    /// A worker for `vrings` (the thread's own, in the order of its mask).
    pub(crate) fn new(
        backend: T,
        vrings: Vec<T::Vring>,
        thread_id: usize,
    ) -> Result<Self, VringEpollError> {
        let setup = |source| VringEpollError::Setup {
            thread: thread_id,
            source,
        };
        let epoll = Epoll::new().map_err(setup)?;
        let num_backend_queues = backend.num_queues();
        let wake = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(setup)?;
        epoll
            .ctl(
                ControlOperation::Add,
                wake.as_raw_fd(),
                EpollEvent::new(EventSet::IN, num_backend_queues as u64),
            )
            .map_err(setup)?;
        Ok(VringEpollHandler {
            epoll,
            backend,
            num_backend_queues,
            vrings,
            thread_id,
            wake,
            exit: AtomicBool::new(false),
            pending: Mutex::new(HashSet::new()),
            busy: Mutex::new(()),
        })
    }

    /// Waits until the device is not handling an event of this thread (returns at once when it
    /// is not). A ring stopped before (not ready, its kick unregistered) is not served again:
    /// after this, nothing of it is in the middle of being served on this thread.
    pub(crate) fn quiesce(&self) {
        drop(lock(&self.busy));
    }

    /// Makes the event loop return.
    pub fn send_exit_event(&self) {
        self.exit.store(true, Ordering::SeqCst);
        let _ = self.wake.write(1);
    }

    /// Register an event into the epoll fd.
    ///
    /// When this event is later triggered, the backend implementation of `handle_event` will be
    /// called with `data` as its `device_event`.
    pub fn register_listener(&self, fd: RawFd, ev_type: EventSet, data: u64) -> io::Result<()> {
        // `data` range [0...num_queues] is reserved for queues and the wake-up event.
        if data <= self.num_backend_queues as u64 {
            Err(io::Error::from_raw_os_error(libc::EINVAL))
        } else {
            self.register_event(fd, ev_type, data)
        }
    }

    /// Unregister an event from the epoll fd.
    ///
    /// If the event is triggered after this function has been called, the event will be silently
    /// dropped.
    pub fn unregister_listener(&self, fd: RawFd, ev_type: EventSet, data: u64) -> io::Result<()> {
        // `data` range [0...num_queues] is reserved for queues and the wake-up event.
        if data <= self.num_backend_queues as u64 {
            Err(io::Error::from_raw_os_error(libc::EINVAL))
        } else {
            self.unregister_event(fd, ev_type, data)
        }
    }

    pub(crate) fn register_event(&self, fd: RawFd, ev_type: EventSet, data: u64) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(ev_type, data))?;
        if data < self.num_backend_queues as u64 {
            lock(&self.pending).insert(data as u16);
            self.wake.write(1)?;
        }
        Ok(())
    }

    pub(crate) fn unregister_event(
        &self,
        fd: RawFd,
        ev_type: EventSet,
        data: u64,
    ) -> io::Result<()> {
        if data < self.num_backend_queues as u64 {
            lock(&self.pending).remove(&(data as u16));
        }
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::new(ev_type, data))
    }

    /// Runs the event loop until [`VringEpollHandler::send_exit_event`].
    pub(crate) fn run(&self) -> Result<(), VringEpollError> {
        const EPOLL_EVENTS_LEN: usize = 100;
        let mut events = vec![EpollEvent::new(EventSet::empty(), 0); EPOLL_EVENTS_LEN];
        loop {
            let num_events = match self.epoll.wait(-1, &mut events[..]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(VringEpollError::Wait {
                        thread: self.thread_id,
                        source,
                    });
                }
            };
            for event in events.iter().take(num_events) {
                let bits = event.events;
                let Some(evset) = EventSet::from_bits(bits) else {
                    log::warn!(
                        "worker thread {}: ignoring unknown epoll event set {bits:#x}",
                        self.thread_id
                    );
                    continue;
                };
                if self.handle_event(event.data() as u16, evset)? {
                    return Ok(());
                }
            }
        }
    }

    /// Handles one event; returns true when the loop must end.
    fn handle_event(&self, device_event: u16, evset: EventSet) -> Result<bool, VringEpollError> {
        if usize::from(device_event) == self.num_backend_queues {
            let _ = self.wake.read();
            if self.exit.load(Ordering::SeqCst) {
                return Ok(true);
            }
            let pending = std::mem::take(&mut *lock(&self.pending));
            for vring in pending {
                self.device_event(vring, EventSet::IN)?;
            }
            return Ok(false);
        }
        if let Some(vring) = self.vrings.get(usize::from(device_event)) {
            let enabled = vring
                .read_kick()
                .map_err(|source| VringEpollError::ReadKick {
                    thread: self.thread_id,
                    vring: device_event,
                    source,
                })?;
            // A disabled vring is not processed.
            if !enabled {
                return Ok(false);
            }
        }
        self.device_event(device_event, evset)?;
        Ok(false)
    }

    fn device_event(&self, device_event: u16, evset: EventSet) -> Result<(), VringEpollError> {
        let _busy = lock(&self.busy);
        self.backend
            .handle_event(device_event, evset, &self.vrings, self.thread_id)
            .map_err(|source| VringEpollError::Device {
                thread: self.thread_id,
                event: device_event,
                source,
            })
    }
}

impl<T: VhostUserBackend> AsRawFd for VringEpollHandler<T> {
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}
