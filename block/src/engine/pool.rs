//! The fallback engine: a few threads doing synchronous `preadv2`/`pwritev2`/`fdatasync`/
//! `fallocate`, completions handed back through a queue and an eventfd.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use super::{Completion, Engine, EngineFiles, Op, QueueFull, Submit};

struct Job {
    tag: u64,
    op: Op,
    iov: *const libc::iovec,
    iovcnt: u32,
    fd: RawFd,
}

// SAFETY: a Job's iovec pointer refers to memory the submitter guarantees to keep valid until
// the completion is reaped (the `Engine::queue` contract); the pool thread only uses it for the
// duration of one system call before the completion is posted.
unsafe impl Send for Job {}

struct Shared {
    done: Mutex<VecDeque<Completion>>,
    eventfd: EventFd,
}

/// The thread-pool engine.
pub struct ThreadPoolEngine {
    tx: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
    pending: Vec<Job>,
    in_flight: usize,
    main: RawFd,
    buffered: Option<RawFd>,
    _files: EngineFiles,
}

impl std::fmt::Debug for ThreadPoolEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadPoolEngine")
            .field("threads", &self.threads.len())
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

impl ThreadPoolEngine {
    /// A pool of `threads` threads.
    pub fn new(files: &EngineFiles, threads: usize) -> io::Result<ThreadPoolEngine> {
        let shared = Arc::new(Shared {
            done: Mutex::new(VecDeque::new()),
            eventfd: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
        });
        let (tx, rx) = channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let (rx, shared) = (rx.clone(), shared.clone());
            handles.push(
                std::thread::Builder::new()
                    .name(format!("io-pool-{i}"))
                    .spawn(move || pool_thread(&rx, &shared))?,
            );
        }
        Ok(ThreadPoolEngine {
            tx: Some(tx),
            threads: handles,
            shared,
            pending: Vec::new(),
            in_flight: 0,
            main: files.main.as_raw_fd(),
            buffered: files.buffered.as_ref().map(|f| f.as_raw_fd()),
            _files: files.clone(),
        })
    }
}

fn pool_thread(rx: &Mutex<Receiver<Job>>, shared: &Shared) {
    loop {
        let job = {
            let Ok(guard) = rx.lock() else { return };
            match guard.recv() {
                Ok(j) => j,
                Err(_) => return,
            }
        };
        let result = run_job(&job);
        if let Ok(mut q) = shared.done.lock() {
            q.push_back(Completion {
                tag: job.tag,
                result,
            });
        }
        let _ = shared.eventfd.write(1);
    }
}

fn run_job(job: &Job) -> i32 {
    let iovcnt = i32::try_from(job.iovcnt).unwrap_or(i32::MAX);
    let r: isize = match job.op {
        Op::Read { offset } => {
            // SAFETY: `iov` points to `iovcnt` iovecs over memory valid until completion (the
            // `Engine::queue` contract); `fd` is kept open by the engine's files.
            unsafe { libc::preadv2(job.fd, job.iov, iovcnt, offset as libc::off_t, 0) }
        }
        Op::Write { offset, dsync } => {
            let flags = if dsync { libc::RWF_DSYNC } else { 0 };
            // SAFETY: as for reads.
            unsafe { libc::pwritev2(job.fd, job.iov, iovcnt, offset as libc::off_t, flags) }
        }
        // SAFETY: fdatasync on a descriptor the engine keeps open; no memory involved.
        Op::Flush => unsafe { libc::fdatasync(job.fd) as isize },
        Op::Fallocate { offset, len, mode } => {
            // SAFETY: fallocate on a descriptor the engine keeps open; no memory involved.
            unsafe {
                libc::fallocate(job.fd, mode, offset as libc::off_t, len as libc::off_t) as isize
            }
        }
    };
    if r < 0 {
        -io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    } else {
        i32::try_from(r).unwrap_or(i32::MAX)
    }
}

impl Engine for ThreadPoolEngine {
    fn name(&self) -> &'static str {
        "thread-pool"
    }

    unsafe fn queue(
        &mut self,
        tag: u64,
        op: Op,
        iov: *const libc::iovec,
        iovcnt: u32,
        how: Submit,
    ) -> Result<(), QueueFull> {
        let fd = match (how.buffered, self.buffered) {
            (true, Some(b)) => b,
            _ => self.main,
        };
        self.pending.push(Job {
            tag,
            op,
            iov,
            iovcnt,
            fd,
        });
        self.in_flight += 1;
        Ok(())
    }

    fn submit(&mut self) -> io::Result<()> {
        let tx = self
            .tx
            .as_ref()
            .ok_or_else(|| io::Error::other("the I/O thread pool has stopped"))?;
        for job in self.pending.drain(..) {
            tx.send(job)
                .map_err(|_| io::Error::other("the I/O thread pool has stopped"))?;
        }
        Ok(())
    }

    fn reap(&mut self, f: &mut dyn FnMut(Completion)) {
        let done: Vec<Completion> = match self.shared.done.lock() {
            Ok(mut q) => q.drain(..).collect(),
            Err(_) => return,
        };
        for c in done {
            self.in_flight = self.in_flight.saturating_sub(1);
            f(c);
        }
    }

    fn notify_fd(&self) -> RawFd {
        self.shared.eventfd.as_raw_fd()
    }

    fn clear_notify(&self) {
        let _ = self.shared.eventfd.read();
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn drain(&mut self, f: &mut dyn FnMut(Completion)) {
        let _ = self.submit();
        while self.in_flight > 0 {
            self.reap(f);
            if self.in_flight > 0 {
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        }
    }
}

impl Drop for ThreadPoolEngine {
    fn drop(&mut self) {
        let mut ignore = |_c: Completion| {};
        self.drain(&mut ignore);
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
