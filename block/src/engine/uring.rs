//! The io_uring engine.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{IoUring, opcode, squeue, types};
use vmm_sys_util::eventfd::EventFd;

use super::{Completion, Engine, EngineFiles, Op, QueueFull, Submit};

/// One io_uring with the file registered at fixed index 0 (and the buffered twin at 1), and an
/// eventfd registered for completion notifications.
pub struct IoUringEngine {
    ring: IoUring,
    eventfd: EventFd,
    in_flight: usize,
    has_buffered: bool,
    // Keep the files open as long as the ring refers to them.
    _files: EngineFiles,
}

impl std::fmt::Debug for IoUringEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoUringEngine")
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

impl IoUringEngine {
    /// A ring with room for `depth` operations (the completion queue is twice as large).
    pub fn new(files: &EngineFiles, depth: u32) -> io::Result<IoUringEngine> {
        let entries = depth.max(4).next_power_of_two();
        let ring = IoUring::builder()
            .setup_cqsize(entries * 2)
            .setup_clamp()
            .build(entries)?;
        let mut fds: Vec<RawFd> = vec![files.main.as_raw_fd()];
        if let Some(b) = &files.buffered {
            fds.push(b.as_raw_fd());
        }
        ring.submitter().register_files(&fds)?;
        let eventfd = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        Ok(IoUringEngine {
            ring,
            eventfd,
            in_flight: 0,
            has_buffered: files.buffered.is_some(),
            _files: files.clone(),
        })
    }

    fn build(op: Op, iov: *const libc::iovec, iovcnt: u32, file: types::Fixed) -> squeue::Entry {
        match op {
            Op::Read { offset } => opcode::Readv::new(file, iov, iovcnt).offset(offset).build(),
            Op::Write { offset, dsync } => opcode::Writev::new(file, iov, iovcnt)
                .offset(offset)
                .rw_flags(if dsync { libc::RWF_DSYNC } else { 0 })
                .build(),
            Op::Flush => opcode::Fsync::new(file)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Op::Fallocate { offset, len, mode } => opcode::Fallocate::new(file, len)
                .offset(offset)
                .mode(mode)
                .build(),
        }
    }
}

impl Drop for IoUringEngine {
    fn drop(&mut self) {
        // Closing a ring releases its registered files asynchronously, some time after the
        // process or the ring is gone; an image lock held through them would outlive us.
        // Unregistering is synchronous. (Callers drain in-flight I/O before dropping.)
        let _ = self.ring.submitter().unregister_files();
    }
}

impl Engine for IoUringEngine {
    fn name(&self) -> &'static str {
        "io_uring"
    }

    unsafe fn queue(
        &mut self,
        tag: u64,
        op: Op,
        iov: *const libc::iovec,
        iovcnt: u32,
        how: Submit,
    ) -> Result<(), QueueFull> {
        let index = if how.buffered && self.has_buffered {
            1
        } else {
            0
        };
        let entry = Self::build(op, iov, iovcnt, types::Fixed(index)).user_data(tag);
        // SAFETY: the caller guarantees (this function's contract) that the iovecs and the
        // memory they describe stay valid until the completion is reaped; the fixed file index
        // refers to a file registered in `new` and kept open by `_files`.
        unsafe { self.ring.submission().push(&entry) }.map_err(|_| QueueFull)?;
        self.in_flight += 1;
        Ok(())
    }

    fn submit(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // The completion queue is full: the caller reaps and submits again later.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    fn reap(&mut self, f: &mut dyn FnMut(Completion)) {
        for cqe in self.ring.completion() {
            self.in_flight = self.in_flight.saturating_sub(1);
            f(Completion {
                tag: cqe.user_data(),
                result: cqe.result(),
            });
        }
    }

    fn notify_fd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    fn clear_notify(&self) {
        let _ = self.eventfd.read();
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn drain(&mut self, f: &mut dyn FnMut(Completion)) {
        while self.in_flight > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => {
                    vback_common::error_limited!("waiting for in-flight I/O failed: {e}");
                    return;
                }
            }
            self.reap(f);
        }
    }
}
