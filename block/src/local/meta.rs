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
//! own, unchanged. One exception keeps first writes as fast as the disk: a write of whole
//! clusters that all need a new host cluster (a guest filling a fresh image) is split
//! ([`Image::prepare_write`]): the worker allocates its clusters, writes the data from the
//! guest's buffers on its own I/O engine (O_DIRECT, no copy), and goes on to the next job while
//! the write is in flight, so several of them reach the disk at once; when the data is written
//! it maps the clusters ([`Image::commit_write`]) and completes the request. Any other job,
//! and a write that touches a range still in flight, first waits for every write in flight to
//! be mapped, so the order the queues see is unchanged.

use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, RawFd};
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use vback_common::sync::lock;

use super::{gather, scatter, select_iov};
use crate::disk::Disk;
use crate::engine::{Completion, Engine, EngineChoice, Op, Submit, open_engine};
use crate::error::{BlockError, Operation};
use crate::qcow2::{DataPath, Image, PreparedWrite};

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
    /// Starts the worker of `disk` (a qcow2 disk), publishing to `dp`; its first writes go
    /// through an engine of kind `engine` of its own.
    pub fn start(
        disk: Arc<Disk>,
        dp: Arc<DataPath>,
        engine: EngineChoice,
    ) -> std::io::Result<MetaWorker> {
        let (tx, rx) = channel();
        let writes = match (&disk.files, disk.read_only) {
            (Some(files), false) => Some(open_engine(files, FLIGHT_DEPTH, engine)?),
            _ => None,
        };
        let thread = std::thread::Builder::new()
            .name("qcow2-meta".into())
            .spawn(move || serve(&disk, &dp, &rx, writes))?;
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

/// Most split first writes in flight at once (each is at most a few engine operations).
const FLIGHT_DEPTH: u32 = 64;

fn serve(disk: &Disk, dp: &DataPath, rx: &Receiver<Job>, writes: Option<Box<dyn Engine>>) {
    let Some(img) = &disk.qcow2 else {
        return;
    };
    let path = crate::backend::path_of(&disk.uname);
    let mut buf = Vec::new();
    let mut extents = Vec::new();
    let mut flight = writes.map(|e| Flight::new(e, disk.direct));
    // Set when a job panicked: the image's state in memory is unknown, so no job runs after.
    let mut failed = false;
    let error_of = |job: &Job, e: crate::qcow2::Qcow2Error| {
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
    };
    loop {
        let busy = flight.as_ref().is_some_and(|f| !f.jobs.is_empty());
        let job = if busy {
            match rx.try_recv() {
                Ok(job) => job,
                Err(TryRecvError::Empty) => {
                    // Nothing new: map the writes whose data is on the disk.
                    if let Some(f) = &mut flight {
                        f.wait_some(img, dp, &mut failed, &error_of);
                    }
                    continue;
                }
                Err(TryRecvError::Disconnected) => break,
            }
        } else {
            match rx.recv() {
                Ok(job) => job,
                Err(_) => break,
            }
        };
        let op = job.kind.operation();
        if failed {
            job.port.post(job.slot, Outcome::Done(Err(stopped(op))));
            continue;
        }
        // A first write, split: allocate here, write on the engine, map when written.
        let job = match &mut flight {
            Some(f) if matches!(job.kind, JobKind::Write { fua: false }) => {
                let len: u64 = job.iov.iter().map(|v| v.iov_len as u64).sum();
                if f.overlaps(job.offset, len) {
                    f.finish_all(img, dp, &mut failed, &error_of);
                }
                let mut g = lock(img);
                let prepared = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    if job.remap && remappable(&mut g, dp, &job, &mut extents) {
                        Ok(Err(()))
                    } else {
                        g.prepare_write(job.offset, len).map(Ok)
                    }
                }));
                let cs = g.cluster_size();
                drop(g);
                match prepared {
                    Ok(Ok(Err(()))) => {
                        job.port.post(job.slot, Outcome::Remap);
                        continue;
                    }
                    Ok(Ok(Ok(Some(w)))) => {
                        f.start(job, w, cs);
                        continue;
                    }
                    // Not a first write of whole clusters: the usual way, below.
                    Ok(Ok(Ok(None))) => job,
                    Ok(Err(e)) => {
                        job.port
                            .post(job.slot, Outcome::Done(Err(error_of(&job, e))));
                        continue;
                    }
                    Err(_) => {
                        worker_failed(disk, &mut failed);
                        job.port.post(job.slot, Outcome::Done(Err(stopped(op))));
                        continue;
                    }
                }
            }
            _ => job,
        };
        // Every other job runs after the split writes in flight are mapped.
        if let Some(f) = &mut flight {
            f.finish_all(img, dp, &mut failed, &error_of);
            if failed {
                job.port.post(job.slot, Outcome::Done(Err(stopped(op))));
                continue;
            }
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
            Ok(Err(e)) => Err(error_of(&job, e)),
            Err(_) => {
                worker_failed(disk, &mut failed);
                job.port.post(job.slot, Outcome::Done(Err(stopped(op))));
                continue;
            }
        };
        job.port.post(job.slot, Outcome::Done(r));
    }
    // The queues are gone (each waited for its jobs): nothing is in flight.
    if let Some(f) = &mut flight {
        f.finish_all(img, dp, &mut failed, &error_of);
    }
}

fn worker_failed(disk: &Disk, failed: &mut bool) {
    log::error!(
        "the qcow2 metadata worker of {} failed (a bug); the disk's requests that need it now \
         fail with I/O errors: restart the daemon",
        disk.uname
    );
    *failed = true;
}

/// A split first write whose data is on its way to the disk.
struct Split {
    job: Job,
    write: PreparedWrite,
    /// Guest range.
    range: (u64, u64),
    /// One iovec array per host extent (the engine reads them until the operation completes).
    iovs: Vec<Vec<libc::iovec>>,
    /// (host offset, length) per extent.
    extents: Vec<(u64, u64)>,
    /// Engine operations not completed yet.
    pending: usize,
    /// The first failure.
    error: Option<std::io::Error>,
}

/// The split first writes in flight on the worker's engine.
struct Flight {
    engine: Box<dyn Engine>,
    direct: bool,
    /// By slab index (the engine tag is `index << 8 | extent`).
    jobs: Vec<Option<Split>>,
    done: Vec<Completion>,
}

impl Flight {
    fn new(engine: Box<dyn Engine>, direct: bool) -> Flight {
        Flight {
            engine,
            direct,
            jobs: Vec::new(),
            done: Vec::new(),
        }
    }

    fn overlaps(&self, offset: u64, len: u64) -> bool {
        self.jobs
            .iter()
            .flatten()
            .any(|s| offset < s.range.0 + s.range.1 && s.range.0 < offset + len)
    }

    /// Queues the data of `write` (its guest buffers, at the clusters it was given) on the
    /// engine.
    fn start(&mut self, job: Job, write: PreparedWrite, cs: u64) {
        // At most 32 clusters (Image::prepare_write): the extent fits the tag's low byte.
        let extents = write.extents(cs);
        let mut iovs = Vec::with_capacity(extents.len());
        let mut skip = 0usize;
        for &(_, n) in &extents {
            let mut v = Vec::new();
            select_iov(&job.iov, skip, n as usize, &mut v);
            skip += n as usize;
            iovs.push(v);
        }
        let index = match self.jobs.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                self.jobs.push(None);
                self.jobs.len() - 1
            }
        };
        let range = write.range(cs);
        self.jobs[index] = Some(Split {
            job,
            write,
            range,
            iovs,
            extents,
            pending: 0,
            error: None,
        });
        let n = self.jobs[index].as_ref().map_or(0, |s| s.extents.len());
        for e in 0..n {
            self.queue(index, e, !self.direct);
        }
        if let Err(err) = self.engine.submit()
            && let Some(s) = self.jobs[index].as_mut()
        {
            s.error.get_or_insert(err);
        }
    }

    /// Queues extent `e` of split `index`; a full engine is drained first.
    fn queue(&mut self, index: usize, e: usize, buffered: bool) {
        let Some(s) = self.jobs[index].as_mut() else {
            return;
        };
        let (host, _) = s.extents[e];
        let iov = &s.iovs[e];
        let tag = ((index as u64) << 8) | e as u64;
        let op = Op::Write {
            offset: host,
            dsync: false,
        };
        let how = Submit { buffered };
        // SAFETY: the iovecs live in the split (their heap arrays do not move while it is in
        // `jobs`), which stays until every operation of it completed; they point into the
        // guest memory the job's queue keeps mapped until the job's result is posted (after
        // this operation completes: BlockQueue::queue's contract, see `Job`).
        let mut r = unsafe {
            self.engine
                .queue(tag, op, iov.as_ptr(), iov.len() as u32, how)
        };
        if r.is_err() {
            let _ = self.engine.submit();
            let mut done = std::mem::take(&mut self.done);
            self.engine.drain(&mut |c| done.push(c));
            self.done = done;
            // SAFETY: as above.
            r = unsafe {
                self.engine
                    .queue(tag, op, iov.as_ptr(), iov.len() as u32, how)
            };
        }
        if let Some(s) = self.jobs[index].as_mut() {
            match r {
                Ok(()) => s.pending += 1,
                Err(_) => {
                    s.error
                        .get_or_insert_with(|| std::io::Error::other("the I/O engine is full"));
                }
            }
        }
    }

    /// Waits for at least one completion (unless none is expected), then maps what is done.
    fn wait_some(
        &mut self,
        img: &Mutex<Image>,
        dp: &DataPath,
        failed: &mut bool,
        error_of: &dyn Fn(&Job, crate::qcow2::Qcow2Error) -> BlockError,
    ) {
        if self.done.is_empty() && self.engine.in_flight() > 0 {
            let mut pfd = libc::pollfd {
                fd: self.engine.notify_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            loop {
                let mut done = std::mem::take(&mut self.done);
                self.engine.reap(&mut |c| done.push(c));
                self.done = done;
                if !self.done.is_empty() {
                    break;
                }
                // SAFETY: one pollfd on our stack, valid for the call.
                unsafe { libc::poll(&mut pfd, 1, 100) };
                self.engine.clear_notify();
            }
        }
        self.settle(img, dp, failed, error_of);
    }

    /// Waits for every write in flight and maps them.
    fn finish_all(
        &mut self,
        img: &Mutex<Image>,
        dp: &DataPath,
        failed: &mut bool,
        error_of: &dyn Fn(&Job, crate::qcow2::Qcow2Error) -> BlockError,
    ) {
        while self.jobs.iter().any(Option::is_some) {
            let mut done = std::mem::take(&mut self.done);
            self.engine.drain(&mut |c| done.push(c));
            self.done = done;
            self.settle(img, dp, failed, error_of);
        }
    }

    /// Applies the completions reaped: resubmits (O_DIRECT refused the buffers: the page
    /// cache), and maps each split whose operations all completed.
    fn settle(
        &mut self,
        img: &Mutex<Image>,
        dp: &DataPath,
        failed: &mut bool,
        error_of: &dyn Fn(&Job, crate::qcow2::Qcow2Error) -> BlockError,
    ) {
        let done = std::mem::take(&mut self.done);
        let mut resubmit = false;
        for c in done {
            let (index, e) = ((c.tag >> 8) as usize, (c.tag & 0xff) as usize);
            let Some(s) = self.jobs.get_mut(index).and_then(Option::as_mut) else {
                continue;
            };
            s.pending -= 1;
            let want = s.extents[e].1;
            if c.result == -libc::EINVAL && self.direct {
                // The guest's buffers do not meet O_DIRECT's alignment.
                self.queue(index, e, true);
                resubmit = true;
            } else if c.result < 0 {
                s.error
                    .get_or_insert(std::io::Error::from_raw_os_error(-c.result));
            } else if (c.result as u64) < want {
                // Short: the rest synchronously, through the page cache.
                let (host, _) = s.extents[e];
                let mut rest = vec![0u8; (want - c.result as u64) as usize];
                gather(&s.iovs[e], c.result as usize, &mut rest);
                if let Err(err) = lock(img).write_data(&rest, host + c.result as u64) {
                    s.error.get_or_insert(err);
                }
            }
        }
        if resubmit {
            let _ = self.engine.submit();
        }
        for index in 0..self.jobs.len() {
            if self.jobs[index].as_ref().is_none_or(|s| s.pending > 0) {
                continue;
            }
            let Some(Split {
                job,
                write,
                range,
                error,
                ..
            }) = self.jobs[index].take()
            else {
                continue;
            };
            let op = job.kind.operation();
            if *failed {
                job.port.post(job.slot, Outcome::Done(Err(stopped(op))));
                continue;
            }
            let mut g = lock(img);
            let r = match error {
                Some(err) => {
                    g.abandon_write(write);
                    let e = g.data_error(err, range.0);
                    Err(error_of(&job, e))
                }
                None => match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let r = g.commit_write(write);
                    g.publish(dp, range.0, range.1);
                    r
                })) {
                    Ok(Ok(())) => Ok(range.1),
                    Ok(Err(e)) => Err(error_of(&job, e)),
                    Err(_) => {
                        *failed = true;
                        log::error!(
                            "the qcow2 metadata worker failed mapping a write (a bug); the \
                             disk's requests that need it now fail with I/O errors: restart \
                             the daemon"
                        );
                        Err(stopped(op))
                    }
                },
            };
            drop(g);
            job.port.post(job.slot, Outcome::Done(r));
        }
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
