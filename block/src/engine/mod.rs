//! The I/O engine the storage backends share: asynchronous vectored reads and writes, flushes
//! and fallocate on a file, with completions delivered through an eventfd a worker can poll.
//!
//! - [`IoUringEngine`]: one io_uring per worker thread. Operations queued during one pass over a
//!   virtqueue go to the kernel in one `io_uring_enter` ([`Engine::submit`]); the file is
//!   registered (fixed file), so the kernel skips the fd lookup per request; queuing allocates
//!   nothing.
//! - [`ThreadPoolEngine`]: the fallback when io_uring is unavailable (an old kernel, a seccomp
//!   policy that forbids it): a few threads running `preadv2`/`pwritev2`/`fdatasync`/`fallocate`.
//!
//! [`open_engine`] picks io_uring and falls back automatically, saying so in the log.
//!
//! The engine never owns the buffers: callers pass raw `iovec`s (guest memory, mapped) and
//! guarantee they stay valid until the operation's completion is reaped. A short transfer is
//! reported as such (the byte count); resubmitting the rest is the caller's decision.

mod pool;
mod uring;

use std::fs::File;
use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

pub use pool::ThreadPoolEngine;
pub use uring::IoUringEngine;

/// An operation on the engine's file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `preadv` at `offset` into the iovecs.
    Read {
        /// Byte offset in the file.
        offset: u64,
    },
    /// `pwritev` at `offset` from the iovecs; `dsync` makes this write durable on completion
    /// (RWF_DSYNC: write-through when the guest turned its write cache off).
    Write {
        /// Byte offset in the file.
        offset: u64,
        /// Durable on completion.
        dsync: bool,
    },
    /// `fdatasync`.
    Flush,
    /// `fallocate(mode, offset, len)`: punch holes, zero ranges.
    Fallocate {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// `FALLOC_FL_*` flags.
        mode: i32,
    },
}

/// The files an engine works on: the main descriptor (O_DIRECT for images by default) and an
/// optional buffered one, used for requests whose buffers O_DIRECT cannot take.
#[derive(Debug, Clone)]
pub struct EngineFiles {
    /// The file every operation uses by default.
    pub main: Arc<File>,
    /// The same file opened without O_DIRECT, for [`Submit::buffered`] requests.
    pub buffered: Option<Arc<File>>,
}

/// How to submit an operation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Submit {
    /// Use the buffered (non-O_DIRECT) descriptor.
    pub buffered: bool,
}

/// A finished operation: the caller's tag and the result (bytes transferred, or `-errno`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The tag given when the operation was queued.
    pub tag: u64,
    /// Bytes transferred (reads, writes) or 0, or a negative errno.
    pub result: i32,
}

/// The queue is full: submit and reap before queuing more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the I/O engine's queue is full")]
pub struct QueueFull;

/// An asynchronous I/O engine for one worker thread.
pub trait Engine: Send {
    /// Which engine this is, for logs and `status`.
    fn name(&self) -> &'static str;

    /// Queues an operation. Nothing reaches the kernel until [`Engine::submit`].
    ///
    /// # Safety
    ///
    /// For reads and writes, `iov` must point to `iovcnt` valid `iovec`s describing memory that
    /// stays mapped and is not otherwise accessed in conflicting ways until this operation's
    /// completion has been returned by [`Engine::reap`] or [`Engine::drain`]; the `iovec` array
    /// itself must stay valid and unchanged for the same time. `iov` is ignored for other
    /// operations.
    unsafe fn queue(
        &mut self,
        tag: u64,
        op: Op,
        iov: *const libc::iovec,
        iovcnt: u32,
        how: Submit,
    ) -> Result<(), QueueFull>;

    /// Hands every queued operation to the kernel (or the pool) in one call.
    fn submit(&mut self) -> io::Result<()>;

    /// Calls `f` for each completed operation, without blocking.
    fn reap(&mut self, f: &mut dyn FnMut(Completion));

    /// An eventfd that becomes readable when completions are ready. The caller polls it and
    /// calls [`Engine::clear_notify`] before reaping.
    fn notify_fd(&self) -> RawFd;

    /// Resets the notification eventfd.
    fn clear_notify(&self);

    /// Operations queued or in flight whose completions were not reaped yet.
    fn in_flight(&self) -> usize;

    /// Waits for every operation in flight and calls `f` for each completion.
    fn drain(&mut self, f: &mut dyn FnMut(Completion));
}

/// Which engine to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineChoice {
    /// io_uring, or the thread pool if io_uring is unavailable.
    #[default]
    Auto,
    /// io_uring only (an error if it is unavailable).
    IoUring,
    /// The thread pool.
    ThreadPool,
}

/// Opens an engine with room for `depth` operations in flight.
pub fn open_engine(
    files: &EngineFiles,
    depth: u32,
    choice: EngineChoice,
) -> io::Result<Box<dyn Engine>> {
    match choice {
        EngineChoice::ThreadPool => Ok(Box::new(ThreadPoolEngine::new(files, 4)?)),
        EngineChoice::IoUring => Ok(Box::new(IoUringEngine::new(files, depth)?)),
        EngineChoice::Auto => match IoUringEngine::new(files, depth) {
            Ok(e) => Ok(Box::new(e)),
            Err(e) => {
                vback_common::warn_limited!(
                    "io_uring is unavailable ({e}); using the thread-pool engine (preadv/pwritev), \
                     which is slower"
                );
                Ok(Box::new(ThreadPoolEngine::new(files, 4)?))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};

    fn file_with(bytes: &[u8]) -> (tempfile::NamedTempFile, Arc<File>) {
        let mut t = tempfile::NamedTempFile::new().unwrap();
        t.write_all(bytes).unwrap();
        let f = Arc::new(t.reopen().unwrap());
        (t, f)
    }

    fn wait_one(e: &mut dyn Engine) -> Completion {
        let mut got = None;
        for _ in 0..2000 {
            e.reap(&mut |c| got = Some(c));
            if let Some(c) = got {
                return c;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("no completion");
    }

    fn exercise(choice: EngineChoice) {
        let (tmp, f) = file_with(&[7u8; 8192]);
        let files = EngineFiles {
            main: f,
            buffered: None,
        };
        let mut e = open_engine(&files, 8, choice).unwrap();

        // Write two buffers with one vectored write.
        let a = vec![1u8; 512];
        let b = vec![2u8; 1024];
        let iov = [
            libc::iovec {
                iov_base: a.as_ptr() as *mut _,
                iov_len: a.len(),
            },
            libc::iovec {
                iov_base: b.as_ptr() as *mut _,
                iov_len: b.len(),
            },
        ];
        // SAFETY: the buffers and the iovec array outlive the completion awaited below.
        unsafe {
            e.queue(
                1,
                Op::Write {
                    offset: 512,
                    dsync: false,
                },
                iov.as_ptr(),
                2,
                Submit::default(),
            )
        }
        .unwrap();
        e.submit().unwrap();
        assert_eq!(e.in_flight(), 1);
        assert_eq!(
            wait_one(&mut *e),
            Completion {
                tag: 1,
                result: 1536
            }
        );
        assert_eq!(e.in_flight(), 0);

        // Read it back.
        let mut r = vec![0u8; 2048];
        let riov = [libc::iovec {
            iov_base: r.as_mut_ptr().cast(),
            iov_len: r.len(),
        }];
        // SAFETY: as above.
        unsafe {
            e.queue(
                2,
                Op::Read { offset: 0 },
                riov.as_ptr(),
                1,
                Submit::default(),
            )
        }
        .unwrap();
        // SAFETY: no buffers.
        unsafe { e.queue(3, Op::Flush, std::ptr::null(), 0, Submit::default()) }.unwrap();
        e.submit().unwrap();
        let mut done = Vec::new();
        e.drain(&mut |c| done.push(c));
        done.sort_by_key(|c| c.tag);
        assert_eq!(
            done,
            [
                Completion {
                    tag: 2,
                    result: 2048
                },
                Completion { tag: 3, result: 0 }
            ]
        );
        assert!(r[..512].iter().all(|&x| x == 7));
        assert!(r[512..1024].iter().all(|&x| x == 1));
        assert!(r[1024..2048].iter().all(|&x| x == 2));

        // Punch a hole: reads back as zeroes, file size unchanged.
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: no buffers.
        unsafe {
            e.queue(
                4,
                Op::Fallocate {
                    offset: 4096,
                    len: 4096,
                    mode,
                },
                std::ptr::null(),
                0,
                Submit::default(),
            )
        }
        .unwrap();
        e.submit().unwrap();
        assert_eq!(wait_one(&mut *e), Completion { tag: 4, result: 0 });
        let mut check = tmp.reopen().unwrap();
        let mut all = Vec::new();
        check.seek(SeekFrom::Start(0)).unwrap();
        check.read_to_end(&mut all).unwrap();
        assert_eq!(all.len(), 8192);
        assert!(all[4096..].iter().all(|&x| x == 0));

        // A read past the end is short (0 bytes), not an error.
        // SAFETY: as above.
        unsafe {
            e.queue(
                5,
                Op::Read { offset: 1 << 20 },
                riov.as_ptr(),
                1,
                Submit::default(),
            )
        }
        .unwrap();
        e.submit().unwrap();
        assert_eq!(wait_one(&mut *e), Completion { tag: 5, result: 0 });

        // An error comes back as -errno: fallocate with a bad mode.
        // SAFETY: no buffers.
        unsafe {
            e.queue(
                6,
                Op::Fallocate {
                    offset: 0,
                    len: 0,
                    mode: 0,
                },
                std::ptr::null(),
                0,
                Submit::default(),
            )
        }
        .unwrap();
        e.submit().unwrap();
        assert_eq!(
            wait_one(&mut *e),
            Completion {
                tag: 6,
                result: -libc::EINVAL
            }
        );
    }

    #[test]
    fn io_uring_engine() {
        exercise(EngineChoice::IoUring);
    }

    #[test]
    fn thread_pool_engine() {
        exercise(EngineChoice::ThreadPool);
    }

    #[test]
    fn a_full_queue_is_reported() {
        let (_t, f) = file_with(&[0u8; 4096]);
        let files = EngineFiles {
            main: f,
            buffered: None,
        };
        let mut e = IoUringEngine::new(&files, 4).unwrap();
        let mut n = 0;
        // SAFETY: flushes carry no buffers.
        while unsafe { e.queue(n, Op::Flush, std::ptr::null(), 0, Submit::default()) }.is_ok() {
            n += 1;
            assert!(n < 1000, "the queue never filled");
        }
        assert!(n >= 4);
        e.submit().unwrap();
        let mut seen = 0;
        e.drain(&mut |_| seen += 1);
        assert_eq!(seen, n);
    }
}
