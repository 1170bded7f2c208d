//! The per-image metadata worker of a qcow2 disk: one thread that runs every request the data
//! path cannot send straight to a queue's engine (allocating writes, reads through backing
//! files, compressed, zero or unallocated clusters, flush, discard, write-zeroes), so that a
//! queue thread never blocks on metadata and the other queues keep streaming.
//!
//! A queue hands the worker a [`Job`] (its slot, the request, a copy of its iovecs) and goes on;
//! the worker runs it on the [`Image`](crate::qcow2::Image) under the image's lock, publishes
//! what changed to the [`DataPath`] (before the request completes, so a completed write's
//! clusters are on the fast path for every later request), and posts the result to the queue's
//! [`MetaPort`], whose eventfd is a duplicate of the queue engine's: the worker's completions
//! wake the queue's thread exactly like the engine's.
//!
//! Jobs run one at a time, in the order the queues sent them: the format layer's crash-safe
//! ordering (refcounts before L2 entries, data before the L2 entry that maps it) is the image's
//! own, unchanged.

use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, RawFd};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use vback_common::sync::lock;

use super::{gather, scatter};
use crate::disk::Disk;
use crate::error::{BlockError, Operation};
use crate::qcow2::{DataPath, Image};

/// Largest bounce buffer of the worker's reads and writes.
const CHUNK: u64 = 1 << 20;

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum JobKind {
    Read,
    Write { fua: bool },
    Flush,
    Discard { len: u64, fua: bool },
    WriteZeroes { len: u64, fua: bool },
}

impl JobKind {
    fn operation(self) -> Operation {
        match self {
            JobKind::Read => Operation::Read,
            JobKind::Write { .. } => Operation::Write,
            JobKind::Flush => Operation::Flush,
            JobKind::Discard { .. } => Operation::Discard,
            JobKind::WriteZeroes { .. } => Operation::WriteZeroes,
        }
    }
}

/// One request for the worker.
pub(super) struct Job {
    /// The queue's slot (returned with the result).
    pub slot: u32,
    pub kind: JobKind,
    /// Guest offset.
    pub offset: u64,
    /// The request's buffers (reads and writes).
    pub iov: Vec<libc::iovec>,
    /// A read or write the worker finds mapped (data clusters of the top image, once their L2
    /// tables are loaded) goes back to the queue for its engine instead of being served here.
    pub remap: bool,
    /// Where the result goes.
    pub port: Arc<MetaPort>,
}

// SAFETY: a job's iovecs point into memory the queue's caller keeps mapped until the request's
// completion is reaped (BlockQueue::queue's contract). The queue reaps the slot only after the
// worker posted its result (the worker touches the buffers no more after that), and a queue that
// is dropped first waits for its jobs (LocalQueue's Drop). While the job runs, only the worker
// accesses the buffers on the host side (the queue does not touch a slot in flight); a guest
// writing them concurrently only changes the bytes copied (see gather/scatter).
unsafe impl Send for Job {}

/// A queue's mailbox for the worker's completions.
#[derive(Debug)]
pub(super) struct MetaPort {
    done: Mutex<Posted>,
    cv: Condvar,
    /// A duplicate of the queue engine's eventfd.
    notify: File,
}

impl MetaPort {
    /// A port that signals `engine_fd` (duplicated: the port owns its descriptor).
    pub fn new(engine_fd: RawFd) -> std::io::Result<MetaPort> {
        // SAFETY: F_DUPFD_CLOEXEC on a descriptor the engine keeps open for this call; it
        // returns a new descriptor (or -1), which nothing else owns.
        let fd = unsafe { libc::fcntl(engine_fd, libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(MetaPort {
            done: Mutex::new(Posted::default()),
            cv: Condvar::new(),
            // SAFETY: `fd` was just created above and is owned by nothing else.
            notify: unsafe { File::from_raw_fd(fd) },
        })
    }

    fn post(&self, slot: u32, outcome: Outcome) {
        {
            let mut d = lock(&self.done);
            match outcome {
                Outcome::Done(r) => d.results.push((slot, r)),
                Outcome::Remap => d.remap.push(slot),
            }
        }
        self.cv.notify_all();
        // An eventfd counter write; EAGAIN (counter full) means it is readable already.
        let _ = (&self.notify).write(&1u64.to_ne_bytes());
    }

    /// Moves the posted results into `out` and the slots handed back into `remap`; returns
    /// how many jobs that finishes.
    pub fn take(
        &self,
        out: &mut Vec<(u32, Result<u64, BlockError>)>,
        remap: &mut Vec<u32>,
    ) -> usize {
        let mut d = lock(&self.done);
        let n = d.results.len() + d.remap.len();
        out.append(&mut d.results);
        remap.append(&mut d.remap);
        n
    }

    /// Waits until some job finishes.
    pub fn wait(&self) {
        let mut d = lock(&self.done);
        while d.results.is_empty() && d.remap.is_empty() {
            d = self
                .cv
                .wait(d)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }
}

/// What the worker posted and the queue has not taken yet.
#[derive(Debug, Default)]
struct Posted {
    results: Vec<(u32, Result<u64, BlockError>)>,
    /// Slots handed back for the engine.
    remap: Vec<u32>,
}

/// How a job ended.
enum Outcome {
    Done(Result<u64, BlockError>),
    /// The range is data in the top image, now published: the queue sends it to its engine.
    Remap,
}

/// The worker thread of one qcow2 disk, shared by its backend and queues; joined when the last
/// of them is dropped.
#[derive(Debug)]
pub(super) struct MetaWorker {
    tx: Mutex<Option<Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl MetaWorker {
    /// Starts the worker of `disk` (a qcow2 disk), publishing to `dp`.
    pub fn start(disk: Arc<Disk>, dp: Arc<DataPath>) -> std::io::Result<MetaWorker> {
        let (tx, rx) = channel();
        let thread = std::thread::Builder::new()
            .name("qcow2-meta".into())
            .spawn(move || serve(&disk, &dp, &rx))?;
        Ok(MetaWorker {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Hands `job` to the worker; gives it back if the worker is gone.
    pub fn send(&self, job: Job) -> Result<(), Job> {
        match &*lock(&self.tx) {
            Some(tx) => tx.send(job).map_err(|e| e.0),
            None => Err(job),
        }
    }
}

impl Drop for MetaWorker {
    fn drop(&mut self) {
        lock(&self.tx).take();
        if let Some(t) = lock(&self.thread).take()
            && t.join().is_err()
        {
            log::error!("the qcow2 metadata worker panicked");
        }
    }
}

fn serve(disk: &Disk, dp: &DataPath, rx: &Receiver<Job>) {
    let Some(img) = &disk.qcow2 else {
        return;
    };
    let path = crate::backend::path_of(&disk.uname);
    let mut buf = Vec::new();
    let mut extents = Vec::new();
    // Set when a job panicked: the image's state in memory is unknown, so no job runs after.
    let mut failed = false;
    while let Ok(job) = rx.recv() {
        let op = job.kind.operation();
        if failed {
            job.port.post(job.slot, Outcome::Done(Err(stopped(op))));
            continue;
        }
        let mut g = lock(img);
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if job.remap && remappable(&mut g, dp, &job, &mut extents) {
                Ok(None)
            } else {
                run(&mut g, dp, &job, &mut buf).map(Some)
            }
        }));
        drop(g);
        let r = match ran {
            Ok(Ok(None)) => {
                job.port.post(job.slot, Outcome::Remap);
                continue;
            }
            Ok(Ok(Some(n))) => Ok(n),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                log::error!(
                    "the qcow2 metadata worker of {} failed (a bug); the disk's requests that need \
                     it now fail with I/O errors: restart the daemon",
                    disk.uname
                );
                failed = true;
                job.port.post(job.slot, Outcome::Done(Err(stopped(op))));
                continue;
            }
        };
        let r = r.map_err(|e| {
            let e = BlockError::qcow2(job.kind.operation(), e);
            let e = if e.path.is_some() {
                e
            } else {
                e.at_path(path.clone())
            };
            if job.kind == JobKind::Flush {
                e
            } else {
                e.at(job.offset)
            }
        });
        job.port.post(job.slot, Outcome::Done(r));
    }
}

/// The error of a job the failed worker does not run.
fn stopped(op: Operation) -> BlockError {
    BlockError::new(
        crate::error::ErrorKind::Io,
        op,
        "the qcow2 metadata worker has stopped after a failure (see the log); restart the daemon",
    )
}

/// Whether a read or write is data in the top image (loading its L2 tables), published so the
/// queue can send it to its engine. Errors are left to [`run`] to report.
fn remappable(img: &mut Image, dp: &DataPath, job: &Job, extents: &mut Vec<(u64, u64)>) -> bool {
    let write = match job.kind {
        JobKind::Read => false,
        JobKind::Write { .. } => true,
        _ => return false,
    };
    let len: u64 = job.iov.iter().map(|v| v.iov_len as u64).sum();
    if !matches!(
        img.map_extents(job.offset, len, write, super::MAX_PIECES, extents),
        Ok(true)
    ) {
        return false;
    }
    img.publish(dp, job.offset, len);
    true
}

/// Runs one job on the image; publishes the range it touched.
fn run(
    img: &mut Image,
    dp: &DataPath,
    job: &Job,
    buf: &mut Vec<u8>,
) -> Result<u64, crate::qcow2::Qcow2Error> {
    let offset = job.offset;
    match job.kind {
        JobKind::Read | JobKind::Write { .. } => {
            let write = job.kind != JobKind::Read;
            let len: u64 = job.iov.iter().map(|v| v.iov_len as u64).sum();
            buf.resize(len.min(CHUNK) as usize, 0);
            let mut done = 0u64;
            let mut result = Ok(());
            while done < len && result.is_ok() {
                let n = (len - done).min(CHUNK) as usize;
                result = if write {
                    gather(&job.iov, done as usize, &mut buf[..n]);
                    img.write(offset + done, &buf[..n])
                } else {
                    img.read(offset + done, &mut buf[..n]).map(|()| {
                        scatter(&job.iov, done as usize, &buf[..n]);
                    })
                };
                done += n as u64;
            }
            // Whatever happened, the mapping of what was done is current.
            img.publish(dp, offset, done.max(1));
            result?;
            if matches!(job.kind, JobKind::Write { fua: true }) {
                img.flush()?;
            }
            Ok(len)
        }
        JobKind::Flush => img.flush().map(|()| 0),
        JobKind::Discard { len, fua } | JobKind::WriteZeroes { len, fua } => {
            let zero = matches!(job.kind, JobKind::WriteZeroes { .. });
            let r = img.discard(offset, len, zero);
            img.publish(dp, offset, len.max(1));
            r?;
            if fua {
                img.flush()?;
            }
            Ok(0)
        }
    }
}
