//! The no-stall property of qcow2 queues: while one queue's request is stuck in the image's slow
//! path (an allocating write, a backing-file read, a flush; held at a test gate inside the format
//! layer), another queue's reads of allocated clusters still complete.
//!
//! A queue whose reads waited for the stuck request would never finish (the gate opens only
//! after them); a watchdog turns that into a failure after a generous delay instead of a hang.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vback_common::sync::lock;

use super::tests::{iov, open, run};
use crate::backend::{BlockBackend, BlockQueue, FormatInfo, Request};
use crate::engine::EngineChoice;
use crate::qcow2::tests::{Gate, qemu_img};

const MIB: u64 = 1 << 20;
/// Bytes written (allocated) before the stuck request: what queue B reads.
const ALLOCATED: u64 = MIB;
/// Where queue A's request goes: unallocated in the top image (its backing file has 0x11 there).
const FRESH: u64 = 4 * MIB;

/// A 16 MiB qcow2 image over a raw backing file of 0x11, its first [`ALLOCATED`] bytes written
/// with a pattern through a queue.
fn image(dir: &std::path::Path) -> super::LocalBackend {
    let base = dir.join("base.raw");
    std::fs::write(&base, vec![0x11u8; 16 * MIB as usize]).unwrap();
    let top = dir.join("top.qcow2");
    let b = base.display().to_string();
    let t = top.display().to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", "-F", "raw", "-b", &b, &t]);
    let backend = open(&format!("qcow2:{t}"), false, EngineChoice::IoUring);
    let mut q = backend.open_queue(4).unwrap();
    let data: Vec<u8> = (0..ALLOCATED).map(|i| (i / 4096) as u8).collect();
    let w = Request::Write {
        offset: 0,
        fua: false,
    };
    assert_eq!(run(&mut *q, w, &[&data]).unwrap(), ALLOCATED);
    backend
}

/// Holds queue A's `request` at the gate and shows that queue B's reads of allocated clusters
/// complete meanwhile; then lets A finish and checks its result with `check_a`.
fn reads_go_on_while(request: Request, a_len: usize, check_a: fn(&[u8])) {
    let dir = tempfile::tempdir().unwrap();
    let backend = image(dir.path());
    let mut qa = backend.open_queue(4).unwrap();
    let mut qb = backend.open_queue(4).unwrap();
    let gate = Gate::closed();
    lock(backend.disk().qcow2.as_ref().unwrap()).set_test_gate(Some(gate.clone()));

    let a = std::thread::spawn(move || {
        let buf = vec![0x5au8; a_len];
        let bufs: Vec<&[u8]> = if a_len == 0 { vec![] } else { vec![&buf] };
        let r = run(&mut *qa, request, &bufs);
        (r, buf)
    });
    gate.wait_reached();

    // The watchdog: if B's reads have not finished after a long while, they are waiting for A
    // (the old design); open the gate so the test fails instead of hanging.
    let done = Arc::new(AtomicBool::new(false));
    let timed_out = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (done, timed_out, gate) = (done.clone(), timed_out.clone(), gate.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !done.load(Ordering::SeqCst) {
                if Instant::now() > deadline {
                    timed_out.store(true, Ordering::SeqCst);
                    gate.open();
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    // Queue B streams reads over the allocated clusters, 64 KiB at a time, twice.
    let chunk = 64 << 10;
    let got = vec![0u8; chunk];
    for round in 0..2 {
        for off in (0..ALLOCATED).step_by(chunk) {
            let r = run(&mut *qb, Request::Read { offset: off }, &[&got]);
            assert_eq!(r.unwrap(), chunk as u64, "round {round}, offset {off}");
            for (i, &v) in got.iter().enumerate() {
                let abs = off + i as u64;
                assert_eq!(v, (abs / 4096) as u8, "byte {abs}");
            }
        }
    }
    // `status` answers too, with what it last saw of the image.
    let info = backend.info();
    assert!(
        matches!(info.format, Some(FormatInfo::Qcow2 { .. })),
        "{info:?}"
    );
    done.store(true, Ordering::SeqCst);
    watchdog.join().unwrap();
    assert!(
        !timed_out.load(Ordering::SeqCst),
        "queue B's reads of allocated clusters waited for queue A's stuck {request:?}"
    );
    assert!(!a.is_finished(), "queue A's request was held at the gate");
    gate.open();
    let (r, buf) = a.join().unwrap();
    assert_eq!(r.unwrap(), a_len as u64);
    check_a(&buf);
    // A's request is done: B sees its effect, and the image is consistent.
    let mut got = vec![0u8; 4096];
    let r = run(&mut *qb, Request::Read { offset: FRESH }, &[&got]);
    assert_eq!(r.unwrap(), 4096);
    let expect = if matches!(request, Request::Write { .. }) {
        0x5a
    } else {
        0x11
    };
    assert!(got.iter().all(|&v| v == expect), "{:?}", &got[..8]);
    got.clear();
    drop(qb);
    drop(backend);
    let top = dir.path().join("top.qcow2");
    qemu_img(&["check", "-q", top.to_str().unwrap()]);
}

#[test]
fn allocated_reads_go_on_while_another_queue_allocates() {
    let w = Request::Write {
        offset: FRESH,
        fua: false,
    };
    reads_go_on_while(w, 4096, |_| {});
}

#[test]
fn allocated_reads_go_on_while_another_queue_reads_the_backing_file() {
    reads_go_on_while(Request::Read { offset: FRESH }, 4096, |buf| {
        assert!(buf.iter().all(|&v| v == 0x11), "the backing file's bytes");
    });
}

#[test]
fn allocated_reads_go_on_while_another_queue_flushes() {
    // A flush has no buffers; write first so that it has something to make durable.
    reads_go_on_while(Request::Flush, 0, |_| {});
}

/// Queue B's 4 KiB random reads over allocated clusters (depth 16) for `secs`, in IOPS.
fn stream_reads(q: &mut dyn BlockQueue, secs: f64) -> f64 {
    let depth = 16usize;
    let bufs: Vec<Vec<u8>> = (0..depth).map(|_| vec![0u8; 4096]).collect();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let next = |x: &mut u64| {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        (*x % (ALLOCATED / 4096)) * 4096
    };
    let start = Instant::now();
    let mut n = 0u64;
    let mut free: Vec<usize> = (0..depth).collect();
    while start.elapsed().as_secs_f64() < secs {
        while let Some(i) = free.pop() {
            let off = next(&mut x);
            // SAFETY: the buffer outlives its completion (drained below before returning).
            unsafe { q.queue(i as u64, Request::Read { offset: off }, &[iov(&bufs[i])]) }.unwrap();
        }
        q.submit().unwrap();
        let mut pfd = libc::pollfd {
            fd: q.notify_fd().unwrap(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the call.
        unsafe { libc::poll(&mut pfd, 1, 100) };
        q.clear_notify();
        q.reap(&mut |c| {
            c.result.unwrap();
            free.push(c.tag as usize);
            n += 1;
        });
    }
    q.drain(&mut |c| {
        c.result.unwrap();
    });
    n as f64 / start.elapsed().as_secs_f64()
}

/// Queue B's read throughput alone and while queue A allocates (64 KiB first writes, depth 1);
/// prints both and the ratio. A measurement, not a check: run it in release with --nocapture.
#[test]
#[ignore = "a measurement: cargo test -p vback-block --release two_queue_throughput -- --ignored --nocapture"]
fn two_queue_throughput() {
    let dir = tempfile::tempdir().unwrap();
    let top = dir.path().join("t.qcow2");
    let t = top.display().to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", &t, "4G"]);
    let backend = Arc::new(open(&format!("qcow2:{t}"), false, EngineChoice::IoUring));
    let mut qb = backend.open_queue(16).unwrap();
    let data = vec![0x42u8; ALLOCATED as usize];
    let w = Request::Write {
        offset: 0,
        fua: false,
    };
    run(&mut *qb, w, &[&data]).unwrap();
    // The worker wrote through the page cache: make it durable so the engine's O_DIRECT reads
    // do not wait for writeback during the first measurement.
    run(&mut *qb, Request::Flush, &[]).unwrap();
    let secs = 3.0;
    // Warm up (page cache, data path), then measure alone before and after the shared run.
    stream_reads(&mut *qb, 1.0);
    let alone_before = stream_reads(&mut *qb, secs);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (backend, stop) = (backend.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut qa = backend.open_queue(4).unwrap();
            let buf = vec![0x17u8; 64 << 10];
            let mut off = 16 * MIB;
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) && off + (64 << 10) <= 4 << 30 {
                let w = Request::Write {
                    offset: off,
                    fua: false,
                };
                run(&mut *qa, w, &[&buf]).unwrap();
                off += 64 << 10;
                n += 1;
            }
            n
        })
    };
    let t0 = Instant::now();
    let shared = stream_reads(&mut *qb, secs);
    stop.store(true, Ordering::SeqCst);
    let allocations = writer.join().unwrap();
    let wsecs = t0.elapsed().as_secs_f64();
    let alone_after = stream_reads(&mut *qb, secs);
    let alone = (alone_before + alone_after) / 2.0;
    println!(
        "two_queue_throughput: queue B 4k random reads QD16 alone {alone:.0} IOPS \
         ({alone_before:.0} before, {alone_after:.0} after); while queue A allocates \
         (64 KiB first writes, {:.0}/s) {shared:.0} IOPS; ratio {:.2}",
        allocations as f64 / wsecs,
        shared / alone
    );
}

/// A bug that panics in the metadata worker fails that request and every later one that needs
/// the worker with an I/O error naming the cause; allocated clusters still work, and nothing
/// hangs (dropping the queues returns).
#[test]
fn a_panic_in_the_metadata_worker_fails_requests_without_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let backend = image(dir.path());
    let mut q = backend.open_queue(4).unwrap();
    lock(backend.disk().qcow2.as_ref().unwrap()).set_test_gate(Some(Gate::panicking()));
    let buf = vec![0u8; 4096];
    for req in [
        Request::Write {
            offset: FRESH,
            fua: false,
        },
        Request::Read {
            offset: FRESH + 8192,
        },
    ] {
        let e = run(&mut *q, req, &[&buf]).unwrap_err();
        assert_eq!(e.kind, crate::error::ErrorKind::Io, "{e}");
        assert!(e.to_string().contains("metadata worker has stopped"), "{e}");
    }
    let r = run(&mut *q, Request::Read { offset: 0 }, &[&buf]);
    assert_eq!(r.unwrap(), 4096, "allocated clusters are still served");
    lock(backend.disk().qcow2.as_ref().unwrap()).set_test_gate(None);
    drop(q);
    drop(backend);
}
