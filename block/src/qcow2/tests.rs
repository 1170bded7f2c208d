//! Unit tests of the format layer on images made by `qemu-img` (which CI installs; a missing
//! qemu-img fails these tests loudly).

use super::*;
use std::process::Command;

/// A 1 MiB qcow2 image with 512-byte clusters: qemu-img's refcount table then covers only the
/// first 8 MiB of the file, so tests reach table growth and moves quickly.
fn create_512_byte_cluster_image(path: &str) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        path,
        "1M",
    ]);
}

pub(crate) fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is required for the qcow2 tests (apt-get install qemu-utils)");
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A gate the slow paths of an [`Image`] wait at while it is closed ([`Image::set_test_gate`]):
/// the stall tests hold an allocation, a backing read or a flush there deterministically.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    /// (open, threads that reached the gate).
    state: std::sync::Mutex<(bool, usize)>,
    cv: std::sync::Condvar,
    /// Panic instead of waiting (a bug in the slow path, simulated).
    panics: bool,
}

impl Gate {
    /// A closed gate.
    pub(crate) fn closed() -> std::sync::Arc<Gate> {
        std::sync::Arc::new(Gate::default())
    }

    /// A gate that panics when reached.
    pub(crate) fn panicking() -> std::sync::Arc<Gate> {
        std::sync::Arc::new(Gate {
            panics: true,
            ..Gate::default()
        })
    }

    /// Waits while the gate is closed.
    pub(crate) fn pass(&self) {
        assert!(!self.panics, "the test gate panics here");
        let mut g = self.state.lock().unwrap();
        g.1 += 1;
        self.cv.notify_all();
        while !g.0 {
            g = self.cv.wait(g).unwrap();
        }
    }

    /// Waits until some thread has reached the gate.
    pub(crate) fn wait_reached(&self) {
        let mut g = self.state.lock().unwrap();
        while g.1 == 0 && !g.0 {
            g = self.cv.wait(g).unwrap();
        }
    }

    /// Opens the gate for good.
    pub(crate) fn open(&self) {
        self.state.lock().unwrap().0 = true;
        self.cv.notify_all();
    }
}

fn open(path: &Path, writable: bool) -> Image {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .unwrap();
    Image::open(
        path,
        f,
        &OpenOptions {
            writable,
            ..OpenOptions::default()
        },
    )
    .unwrap()
}

#[test]
fn refcount_entries_of_every_width() {
    for order in 0..=6u32 {
        let bits = 1u64 << order;
        let max = if bits == 64 {
            u64::MAX
        } else {
            (1 << bits) - 1
        };
        let mut block = vec![0u8; 512];
        let n = 512 * 8 / bits;
        for i in 0..n {
            Image::set_entry(&mut block, i, order, (i * 7) & max);
        }
        for i in 0..n {
            assert_eq!(
                Image::get_entry(&block, i, order),
                (i * 7) & max,
                "order {order} entry {i}"
            );
        }
    }
    // QEMU packs sub-byte refcounts from the least significant bit.
    let mut b = [0u8; 1];
    Image::set_entry(&mut b, 1, 0, 1);
    assert_eq!(b[0], 0b10);
    Image::set_entry(&mut b, 1, 2, 0xf);
    assert_eq!(b[0], 0xf2);
}

#[test]
fn writes_read_back_and_qemu_img_check_is_clean() {
    for (opts, refbits) in [
        ("compat=1.1,cluster_size=65536", 16),
        ("compat=0.10,cluster_size=4096", 16),
        ("compat=1.1,cluster_size=512,refcount_bits=1", 1),
        ("compat=1.1,cluster_size=65536,refcount_bits=64", 64),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.qcow2");
        let ps = p.to_str().unwrap();
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, ps, "4M"]);
        let mut expect = vec![0u8; 4 << 20];
        {
            let mut img = open(&p, true);
            assert_eq!(img.info().refcount_bits, refbits);
            let mut seed = 12345u64;
            for i in 0..200u64 {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let off = (seed >> 20) % (4 << 20) / 512 * 512;
                let len = (((seed >> 8) % 64 + 1) * 512).min((4 << 20) - off);
                let byte = (i % 251) as u8 + 1;
                let data = vec![byte; len as usize];
                img.write(off, &data).unwrap();
                expect[off as usize..(off + len) as usize].copy_from_slice(&data);
                if i % 50 == 49 {
                    img.discard(off, len.min(131072), i % 100 == 99).unwrap();
                    let d = len.min(131072) as usize;
                    let cs = img.cluster_size() as usize;
                    // What reads back from a discard is up to the image; zeroing is exact.
                    if i % 100 == 99 {
                        expect[off as usize..off as usize + d].fill(0);
                    } else {
                        let mut got = vec![0u8; d];
                        img.read(off, &mut got).unwrap();
                        expect[off as usize..off as usize + d].copy_from_slice(&got);
                    }
                    let _ = cs;
                }
                if i % 30 == 0 {
                    img.flush().unwrap();
                }
            }
            let mut got = vec![0u8; 4 << 20];
            img.read(0, &mut got).unwrap();
            assert!(got == expect, "{opts}: read back differs");
            img.close().unwrap();
        }
        let out = Command::new("qemu-img")
            .args(["check", ps])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{opts}: qemu-img check: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let raw = dir.path().join("a.raw");
        qemu_img(&["convert", "-O", "raw", ps, raw.to_str().unwrap()]);
        assert!(
            std::fs::read(&raw).unwrap() == expect,
            "{opts}: qemu-img reads other data"
        );
    }
}

#[test]
fn the_refcount_table_grows_and_the_l1_table_moves_on_resize() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("g.qcow2");
    let ps = p.to_str().unwrap();
    // 512-byte clusters with 16-bit refcounts: one refcount table cluster covers 8 MiB of file.
    create_512_byte_cluster_image(ps);
    let mut img = open(&p, true);
    let before = img.top().h.refcount_table_offset;
    img.resize(24 << 20).unwrap();
    assert_eq!(img.size(), 24 << 20);
    let data: Vec<u8> = (0..(20u32 << 20))
        .map(|i| (i / 512) as u8 ^ (i % 251) as u8)
        .collect();
    img.write(1 << 20, &data).unwrap();
    assert_ne!(img.top().h.refcount_table_offset, before, "the table moved");
    let mut back = vec![0u8; data.len()];
    img.read(1 << 20, &mut back).unwrap();
    assert!(back == data);
    img.close().unwrap();
    drop(img);
    let out = qemu_img(&["info", "--output=json", ps]);
    assert!(out.contains("\"virtual-size\": 25165824"), "{out}");
    qemu_img(&["check", ps]);
    let raw = dir.path().join("g.raw");
    qemu_img(&["convert", "-O", "raw", ps, raw.to_str().unwrap()]);
    let all = std::fs::read(&raw).unwrap();
    assert!(all[1 << 20..(1 << 20) + data.len()] == data[..]);
    assert!(all[..1 << 20].iter().all(|&b| b == 0));
}

/// A size-limited tmpfs mounted under a temporary directory for the life of the value (the
/// test needs root); unmounted on drop.
struct SmallFs {
    mnt: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(bytes: u64) -> SmallFs {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "vback-test"])
            .arg(&mnt)
            .output()
            .expect("mount(8) is required for this test");
        assert!(
            out.status.success(),
            "cannot mount a {bytes}-byte tmpfs at {} (this test needs root): {}",
            mnt.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        SmallFs { mnt, _dir: dir }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let out = Command::new("umount").arg(&self.mnt).output();
        if !out.as_ref().is_ok_and(|o| o.status.success()) {
            eprintln!("cannot unmount {}: {out:?}", self.mnt.display());
        }
    }
}

fn is_enospc(e: &Qcow2Error) -> bool {
    matches!(e, Qcow2Error::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC))
}

fn cluster_data(i: u64) -> Vec<u8> {
    (0..4096u64).map(|b| (i * 7 + b / 512) as u8 | 1).collect()
}

#[test]
fn writes_on_a_full_file_system_fail_without_leaking_and_succeed_once_space_is_back() {
    const FS: u64 = 32 << 20;
    const CS: u64 = 4096;
    let fs = SmallFs::mount(FS);
    let p = fs.mnt.join("full.qcow2");
    let ps = p.to_str().unwrap();
    // 4 KiB clusters: a refcount block covers 8 MiB, so reservations need new blocks often.
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        ps,
        "256M",
    ]);
    let filler = fs.mnt.join("filler");
    std::fs::write(&filler, vec![0x55u8; 8 << 20]).unwrap();
    let file_len = || std::fs::metadata(&p).unwrap().len();

    // Fill the file system with guest data.
    let mut img = open(&p, true);
    let mut written = 0u64;
    loop {
        match img.write(written * CS, &cluster_data(written)) {
            Ok(()) => written += 1,
            Err(e) => {
                assert!(is_enospc(&e), "the first failure is ENOSPC: {e}");
                break;
            }
        }
        assert!(written < FS / CS, "the file system never filled up");
    }
    assert!(written > 1000, "only {written} clusters fit");

    // Many more allocating writes (three reservations' worth) fail, and neither leak a
    // cluster nor move the end of the allocation.
    let end = img.end;
    let len = file_len();
    for i in written..written + 3 * 2048 {
        let e = img.write(i * CS, &cluster_data(i)).unwrap_err();
        assert!(is_enospc(&e), "write {i}: {e}");
        assert_eq!(img.end, end, "write {i} moved the allocation end");
    }
    assert_eq!(file_len(), len);
    img.close().unwrap();
    drop(img);

    // Reopened while still full: the first allocation needs a fresh reservation, which fails
    // too, without moving the end either.
    let mut img = open(&p, true);
    let end = img.end;
    for i in written..written + 100 {
        let e = img.write(i * CS, &cluster_data(i)).unwrap_err();
        assert!(is_enospc(&e), "write {i} after reopening: {e}");
        assert_eq!(img.end, end, "write {i} after reopening moved the end");
    }
    img.close().unwrap();
    drop(img);
    qemu_img(&["check", ps]);

    // Space comes back: writes succeed again, and everything written reads back.
    std::fs::remove_file(&filler).unwrap();
    let mut img = open(&p, true);
    let more = 1024;
    for i in written..written + more {
        img.write(i * CS, &cluster_data(i))
            .unwrap_or_else(|e| panic!("write {i} with space back: {e}"));
    }
    img.flush().unwrap();
    let mut got = vec![0u8; CS as usize];
    for i in 0..written + more {
        img.read(i * CS, &mut got).unwrap();
        assert!(got == cluster_data(i), "cluster {i} reads back other data");
    }
    // (While the image is open its unused reservation counts as leaked: check after closing.)
    img.close().unwrap();
    let report = img.check().unwrap();
    assert_eq!((report.leaks, report.errors), (0, 0), "{report:?}");
    drop(img);
    // At most one reservation (a hole, unless used) past what the file system holds.
    assert!(
        file_len() <= FS + RESERVE_BYTES + 16 * CS,
        "the image grew to {} bytes on a {FS}-byte file system",
        file_len()
    );
    // qemu-img check exits nonzero on leaks too.
    qemu_img(&["check", ps]);
}

/// Writes `path` until the file system is full.
fn fill_up(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0x55u8; 64 << 10];
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
}

#[test]
fn table_moves_on_a_full_file_system_fail_without_leaking() {
    const FS: u64 = 32 << 20;
    let fs = SmallFs::mount(FS);
    let p = fs.mnt.join("t.qcow2");
    let ps = p.to_str().unwrap();
    // 512-byte clusters: the refcount table qemu-img makes covers the first 8 MiB of the file.
    create_512_byte_cluster_image(ps);
    let filler = fs.mnt.join("filler");
    fill_up(&filler);

    let mut img = open(&p, true);
    let (end, rt_off, rt_len) = (img.end, img.reftable_offset, img.reftable.len());
    // A larger virtual size needs a larger L1 table, written at the end of the file.
    let e = img.resize(64 << 20).unwrap_err();
    assert!(is_enospc(&e), "{e}");
    assert_eq!(img.size(), 1 << 20);
    assert_eq!(img.end, end, "a failed resize moved the allocation end");
    // A larger refcount table (needed once the file outgrows the one it has) fails the same
    // way, and the image keeps the table its header names.
    // (Large enough not to fit in the file's last, partly used page.)
    let e = img.grow_reftable(4096).unwrap_err();
    assert!(is_enospc(&e), "{e}");
    assert_eq!(
        (img.end, img.reftable_offset, img.reftable.len()),
        (end, rt_off, rt_len),
        "a failed refcount table move changed the image"
    );
    img.close().unwrap();
    drop(img);
    qemu_img(&["check", ps]);

    // With space back, both happen for real: the resize, and (writing 12 MiB) the table move.
    std::fs::remove_file(&filler).unwrap();
    let mut img = open(&p, true);
    img.resize(64 << 20).unwrap();
    let data: Vec<u8> = (0..12u32 << 20)
        .map(|i| (i / 512) as u8 ^ (i % 251) as u8)
        .collect();
    img.write(1 << 20, &data).unwrap();
    assert_ne!(img.reftable_offset, rt_off, "the refcount table moved");
    let mut back = vec![0u8; data.len()];
    img.read(1 << 20, &mut back).unwrap();
    assert!(back == data, "the data reads back");
    img.close().unwrap();
    drop(img);
    qemu_img(&["check", ps]);
}

#[test]
fn extended_l2_writes_allocate_subclusters_and_copy_on_write_only_partial_ones() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0x11u8; 1 << 20]).unwrap();
    let p = dir.path().join("ext.qcow2");
    let (b, ps) = (base.to_str().unwrap(), p.to_str().unwrap());
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        "-F",
        "raw",
        "-b",
        b,
        ps,
    ]);
    let cs = 65536u64;
    {
        let mut img = open(&p, true);
        assert!(img.info().extended_l2);
        // 1 KiB in the middle of subcluster 1 (2 KiB subclusters) of cluster 1.
        img.write(cs + 2048 + 512, &[0xabu8; 1024]).unwrap();
        let kind = |img: &mut Image, at: u64| img.lookup(0, at).unwrap().0;
        assert_eq!(
            kind(&mut img, cs),
            Ext::Unallocated,
            "subcluster 0 untouched"
        );
        let Ext::Data { host, copied: true } = kind(&mut img, cs + 2048) else {
            panic!("subcluster 1 is allocated");
        };
        assert_eq!(
            kind(&mut img, cs + 4096),
            Ext::Unallocated,
            "subcluster 2 untouched"
        );
        // The partial subcluster was completed from the backing file, and only it.
        let mut sub = vec![0u8; 2048];
        img.pread_layer(0, &mut sub, host).unwrap();
        assert!(sub[..512].iter().all(|&v| v == 0x11));
        assert!(sub[512..1536].iter().all(|&v| v == 0xab));
        assert!(sub[1536..].iter().all(|&v| v == 0x11));
        // A second write to another subcluster of the same cluster reuses its host cluster.
        img.write(cs + 8 * 2048, &[0xcdu8; 4096]).unwrap();
        assert_eq!(
            kind(&mut img, cs + 8 * 2048),
            Ext::Data {
                host: host - 2048 + 8 * 2048,
                copied: true
            }
        );
        // Zeroing whole subclusters sets their zero bits; a whole cluster loses its host
        // cluster and reads as zeroes over the backing file; a discard of part of a subcluster
        // is ignored.
        img.discard(cs + 8 * 2048, 2048, true).unwrap();
        assert!(matches!(kind(&mut img, cs + 8 * 2048), Ext::Zero { .. }));
        assert!(matches!(kind(&mut img, cs + 9 * 2048), Ext::Data { .. }));
        img.write(3 * cs, &[0x77u8; 512]).unwrap();
        img.discard(3 * cs, cs, true).unwrap();
        assert!(matches!(kind(&mut img, 3 * cs), Ext::Zero { .. }));
        img.discard(cs + 2048 + 512, 512, false).unwrap();
        let mut got = vec![0u8; 2048];
        img.read(cs + 2048, &mut got).unwrap();
        assert_eq!(got, sub);
        img.close().unwrap();
    }
    // QEMU agrees: the image is clean and reads what was written.
    qemu_img(&["check", "-q", ps]);
    let io = |cmd: &str| {
        let out = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", cmd, ps])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && !text.contains("Pattern verification failed"),
            "{cmd}: {text}"
        );
    };
    io("read -P 0x11 65536 2560");
    io("read -P 0xab 68096 1024");
    io("read -P 0x11 69120 11264");
    io("read -P 0 81920 2048");
    io("read -P 0xcd 83968 2048");
    io("read -P 0 196608 65536");
    io("read -P 0x11 262144 65536");
}

#[test]
fn a_malformed_extended_l2_entry_fails_writes_with_a_corruption_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.qcow2");
    let ps = p.to_str().unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        ps,
        "1M",
    ]);
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 1 0 4k", ps])
        .output()
        .unwrap();
    assert!(out.status.success());
    // Find the L2 table (the L1 table's first entry) and mark subcluster 5 of cluster 0
    // both allocated and zero.
    let (l2, bitmap_at) = {
        let img = open(&p, false);
        let l2 = img.top().l1[0] & OFFSET_MASK;
        (l2, l2 + 8)
    };
    assert_ne!(l2, 0);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, bitmap_at).unwrap();
    let bm = u64::from_be_bytes(b) | (1 << 5) | (1 << 37);
    f.write_all_at(&bm.to_be_bytes(), bitmap_at).unwrap();
    drop(f);
    let mut img = open(&p, true);
    let e = img.write(20 << 10, &[7u8; 512]).unwrap_err();
    assert!(matches!(e, Qcow2Error::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains("both allocated and zero"), "{e}");
    // Reads of the sound subclusters still work.
    let mut got = vec![0u8; 4096];
    img.read(0, &mut got).unwrap();
    assert!(got.iter().all(|&v| v == 1));
}

/// A guest filling a fresh image fast gets ever larger reservations (fewer fdatasyncs), the
/// file reaching past each one (fallocated: no write extends it); closing gives the unused
/// part back and cuts the file where its use ends: no leaks, no tail.
#[test]
fn reservations_grow_with_fast_allocation_and_close_trims_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("fresh.qcow2");
    let ps = p.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", ps, "1G"]);
    let mut img = open(&p, true);
    let cs = img.cluster_size();
    assert_eq!(img.reserve_bytes, RESERVE_BYTES);
    let data = vec![0x5au8; cs as usize];
    // 40 MiB of first writes: 8 + 16 + 32 MiB reservations at most, well within a second.
    for i in 0..(40 << 20) / cs {
        img.write(i * cs, &data).unwrap();
    }
    assert!(
        img.reserve_bytes >= 4 * RESERVE_BYTES,
        "the reservation grew: {} bytes",
        img.reserve_bytes
    );
    let len = std::fs::metadata(&p).unwrap().len();
    assert!(
        len >= img.reserved_end,
        "the file reaches past the reservation ({len} < {})",
        img.reserved_end
    );
    let used = img.next;
    img.close().unwrap();
    drop(img);
    assert_eq!(
        std::fs::metadata(&p).unwrap().len(),
        used,
        "the file ends where its last cluster in use ends"
    );
    // Exits 0 only when clean: no corruption, no leaked cluster.
    qemu_img(&["check", "-q", ps]);
    let mut img = open(&p, false);
    let mut got = vec![0u8; cs as usize];
    img.read(39 << 20, &mut got).unwrap();
    assert!(got == data);
}
