//! qcow2 interoperability, judged by QEMU's own tools (`qemu-img`, `qemu-io`):
//!
//! - images made by `qemu-img create/convert` in every variant blkback claims (v2, v3, 512 B /
//!   64 KiB / 2 MiB clusters, deflate and zstd compression, extended L2 over a backing file,
//!   zero clusters, preallocation=metadata, a 3-deep backing chain) read byte-identical to
//!   `qemu-img convert -O raw`;
//! - after blkback's format layer writes, discards, zeroes and resizes, `qemu-img check` finds
//!   nothing and `qemu-img compare` finds the expected content;
//! - malformed images and refused backing chains fail at open with an error naming the problem.
//!
//! The format layer is driven directly (the same code the worker's synchronous path runs; the
//! worker's own tests cover the queue side). qemu-img and qemu-io must be installed
//! (`scripts/setup.sh`); their absence fails these tests.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use vback_block::qcow2::{BackingPolicy, Image, OpenOptions};
use vback_tests::qemu_tools::{path_str as s, qcow2_create, qcow2_overlay, qemu_img, qemu_io};

const MIB: u64 = 1 << 20;

/// 8 MiB of test data: incompressible and compressible 4 KiB blocks, and zero runs.
fn source(dir: &Path) -> PathBuf {
    let mut data = vec![0u8; 8 * MIB as usize];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for (i, block) in data.chunks_mut(4096).enumerate() {
        match i % 7 {
            0 | 3 => {} // zero
            1 => block.fill((i % 251) as u8),
            _ => {
                for b in block.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }
            }
        }
    }
    // A long zero run (whole clusters) in the middle.
    data[3 * MIB as usize..4 * MIB as usize].fill(0);
    let p = dir.join("src.raw");
    std::fs::write(&p, &data).unwrap();
    p
}

fn open(path: &Path, writable: bool, backing: BackingPolicy) -> Result<Image, String> {
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
            cache_bytes: 256 << 10,
            backing,
            lock_backing: true,
        },
    )
    .map_err(|e| e.to_string())
}

fn read_all(img: &mut Image) -> Vec<u8> {
    let mut out = vec![0u8; img.size() as usize];
    for (i, chunk) in out.chunks_mut(MIB as usize).enumerate() {
        img.read(i as u64 * MIB, chunk).unwrap();
    }
    out
}

fn assert_reads_like_qemu(img_path: &Path, what: &str) {
    let reference = img_path.with_extension("ref");
    qemu_img(&["convert", "-O", "raw", s(img_path), s(&reference)]);
    let want = std::fs::read(&reference).unwrap();
    let mut img =
        open(img_path, false, BackingPolicy::default()).unwrap_or_else(|e| panic!("{what}: {e}"));
    let got = read_all(&mut img);
    assert_eq!(got.len(), want.len(), "{what}: size");
    if let Some(at) = got.iter().zip(&want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {at}: blkback read {:#x}, qemu-img {:#x}",
            got[at], want[at]
        );
    }
}

#[test]
fn every_variant_reads_like_qemu_img_convert() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = source(d);
    let convert = |name: &str, extra: &[&str]| {
        let p = d.join(name);
        let mut args = vec!["convert", "-O", "qcow2"];
        args.extend_from_slice(extra);
        args.push(s(&src));
        args.push(s(&p));
        qemu_img(&args);
        p
    };
    let mut cases: Vec<(&str, PathBuf)> = vec![
        ("v2", convert("v2.qcow2", &["-o", "compat=0.10"])),
        ("v3", convert("v3.qcow2", &["-o", "compat=1.1"])),
        (
            "512 B clusters",
            convert("c512.qcow2", &["-o", "cluster_size=512"]),
        ),
        (
            "2 MiB clusters",
            convert("c2m.qcow2", &["-o", "cluster_size=2M"]),
        ),
        ("deflate", convert("deflate.qcow2", &["-c"])),
        (
            "zstd",
            convert("zstd.qcow2", &["-c", "-o", "compression_type=zstd"]),
        ),
        (
            "zstd, 512 B clusters",
            convert(
                "z512.qcow2",
                &["-c", "-o", "compression_type=zstd,cluster_size=512"],
            ),
        ),
        (
            "compressed, 512 B clusters",
            convert("c512z.qcow2", &["-c", "-o", "cluster_size=512"]),
        ),
        (
            "refcount_bits=1",
            convert("r1.qcow2", &["-o", "refcount_bits=1"]),
        ),
        (
            "refcount_bits=64",
            convert("r64.qcow2", &["-o", "refcount_bits=64"]),
        ),
    ];

    // Zero clusters (allocated and not), over data.
    let z = convert("zero.qcow2", &[]);
    qemu_io(
        &z,
        &[
            "write -z 1M 256k",
            "write -z -u 2M 128k",
            "write -z 5000 1000",
        ],
    );
    cases.push(("zero clusters", z));

    // preallocation=metadata, then partly written.
    let pm = d.join("prealloc.qcow2");
    qcow2_create(&pm, Some("preallocation=metadata"), "8M");
    qemu_io(&pm, &["write -P 0x5a 100k 300k", "write -z 2M 64k"]);
    cases.push(("preallocation=metadata", pm));

    // Extended L2 over a raw backing file: subclusters allocated, zero and unallocated.
    let ext = d.join("ext.qcow2");
    qcow2_overlay(&src, "raw", &ext, Some("extended_l2=on"), None);
    qemu_io(
        &ext,
        &[
            "write -P 0x61 4k 4k",
            "write -P 0x62 70k 6k",
            "write -z 200k 2k",
            "write -P 0x63 1M 64k",
            "write -z 2M 64k",
        ],
    );
    cases.push(("extended L2 over raw", ext));

    // A 3-deep chain: top -> mid -> base (qcow2, compressed) with writes at every level.
    let base = convert("base.qcow2", &["-c"]);
    let mid = d.join("mid.qcow2");
    qcow2_overlay(&base, "qcow2", &mid, None, None);
    qemu_io(
        &mid,
        &[
            "write -P 0x71 0 100k",
            "write -z 1M 128k",
            "write -P 0x72 6M 1M",
        ],
    );
    let top = d.join("top.qcow2");
    qcow2_overlay(&mid, "qcow2", &top, Some("cluster_size=4096"), Some("10M"));
    qemu_io(
        &top,
        &[
            "write -P 0x81 50k 20k",
            "write -z 6M 4k",
            "write -P 0x82 9M 4k",
        ],
    );
    cases.push(("3-deep chain, grown past the base", top));

    for (what, p) in &cases {
        assert_reads_like_qemu(p, what);
    }
}

/// A model of the guest's view: every operation goes to the image and to a raw file.
struct Model {
    img: Image,
    raw: File,
    size: u64,
    x: u64,
}

impl Model {
    fn rand(&mut self) -> u64 {
        self.x ^= self.x << 13;
        self.x ^= self.x >> 7;
        self.x ^= self.x << 17;
        self.x
    }

    fn range(&mut self, max_len: u64) -> (u64, u64) {
        let off = self.rand() % self.size / 512 * 512;
        let len = ((self.rand() % max_len) / 512 + 1) * 512;
        (off, len.min(self.size - off))
    }

    fn step(&mut self, i: u64) {
        match self.rand() % 10 {
            0..=5 => {
                let (off, len) = self.range(256 << 10);
                let data: Vec<u8> = (0..len).map(|j| (i as u8) ^ (j / 512) as u8).collect();
                self.img.write(off, &data).unwrap();
                self.raw.write_all_at(&data, off).unwrap();
            }
            6 | 7 => {
                let (off, len) = self.range(1 << 20);
                self.img.discard(off, len, true).unwrap();
                self.raw
                    .write_all_at(&vec![0u8; len as usize], off)
                    .unwrap();
            }
            8 => {
                // Discard leaves the content up to the image: take what it reads now.
                let (off, len) = self.range(1 << 20);
                self.img.discard(off, len, false).unwrap();
                let mut now = vec![0u8; len as usize];
                self.img.read(off, &mut now).unwrap();
                self.raw.write_all_at(&now, off).unwrap();
            }
            _ => self.img.flush().unwrap(),
        }
    }
}

fn check_clean(img: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", s(img)])
        .output()
        .expect("qemu-img is required");
    assert!(
        out.status.success(),
        "qemu-img check {}: {}{}",
        img.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn writes_discards_zeroes_and_resize_leave_images_qemu_img_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = source(d);
    // (what, qemu-img options, over a backing file (the options are the overlay's)).
    let variants: Vec<(&str, Vec<&str>, bool)> = vec![
        ("v3", vec!["-o", "compat=1.1"], false),
        ("v2", vec!["-o", "compat=0.10"], false),
        ("512 B clusters", vec!["-o", "cluster_size=512"], false),
        ("2 MiB clusters", vec!["-o", "cluster_size=2M"], false),
        (
            "compressed",
            vec!["-c", "-o", "compression_type=zstd"],
            false,
        ),
        ("refcount_bits=2", vec!["-o", "refcount_bits=2"], false),
        ("over a backing chain", vec![], true),
        // Extended L2 (subclusters of 2 KiB and 512 bytes), alone and over a backing chain:
        // writes allocate subclusters, copy on write only partial ones.
        ("extended L2", vec!["-o", "extended_l2=on"], false),
        (
            "extended L2, 16 KiB clusters",
            vec!["-o", "extended_l2=on,cluster_size=16k"],
            false,
        ),
        (
            "extended L2, compressed",
            vec!["-c", "-o", "extended_l2=on"],
            false,
        ),
        (
            "extended L2 over a backing chain",
            vec!["extended_l2=on"],
            true,
        ),
        (
            "extended L2, 16 KiB clusters, over a backing chain",
            vec!["extended_l2=on,cluster_size=16k"],
            true,
        ),
    ];
    for (n, (what, opts, over_backing)) in variants.into_iter().enumerate() {
        let img = d.join(format!("w{n}.qcow2"));
        let base = d.join(format!("w{n}-base.qcow2"));
        if over_backing {
            qemu_img(&["convert", "-c", "-O", "qcow2", s(&src), s(&base)]);
            qcow2_overlay(&base, "qcow2", &img, opts.first().copied(), None);
        } else {
            let mut args = vec!["convert", "-O", "qcow2"];
            args.extend_from_slice(&opts);
            args.push(s(&src));
            args.push(s(&img));
            qemu_img(&args);
        }
        let model_path = d.join(format!("w{n}.raw"));
        std::fs::copy(&src, &model_path).unwrap();
        let base_before = std::fs::read(&base).ok();
        {
            let mut m = Model {
                img: open(&img, true, BackingPolicy::default()).unwrap(),
                raw: std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&model_path)
                    .unwrap(),
                size: 8 * MIB,
                x: 0x1234_5678 + n as u64,
            };
            for i in 0..150 {
                m.step(i);
            }
            // Grow online, and use the new space.
            m.img.resize(12 * MIB).unwrap();
            m.raw.set_len(12 * MIB).unwrap();
            m.size = 12 * MIB;
            for i in 150..250 {
                m.step(i);
            }
            m.img.close().unwrap();
        }
        check_clean(&img);
        let out = Command::new("qemu-img")
            .args([
                "compare",
                "-f",
                "qcow2",
                "-F",
                "raw",
                s(&img),
                s(&model_path),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{what}: qemu-img compare: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        if let Some(before) = base_before {
            assert!(
                std::fs::read(&base).unwrap() == before,
                "{what}: the backing file changed"
            );
        }
    }
}

fn patch(p: &Path, at: u64, bytes: &[u8]) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(p)
        .unwrap()
        .write_all_at(bytes, at)
        .unwrap();
}

#[test]
fn malformed_images_and_refused_chains_fail_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fresh = |name: &str| {
        let p = d.join(name);
        qemu_img(&["create", "-q", "-f", "qcow2", s(&p), "64M"]);
        p
    };
    let header = |p: &Path| {
        let mut h = vec![0u8; 512];
        File::open(p).unwrap().read_exact_at(&mut h, 0).unwrap();
        h
    };
    let be64 = |h: &[u8], at: usize| u64::from_be_bytes(h[at..at + 8].try_into().unwrap());

    let mut cases: Vec<(&str, PathBuf, &str)> = Vec::new();
    let p = fresh("trunc.qcow2");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(60)
        .unwrap();
    cases.push(("truncated header", p, "truncated"));

    let p = fresh("l1far.qcow2");
    patch(&p, 40, &(1u64 << 40).to_be_bytes());
    cases.push(("L1 beyond the file", p, "l1_table_offset"));

    let p = fresh("overlap.qcow2");
    let h = header(&p);
    // The L1 table moved onto the refcount table (the L1 table ends the file, so moving the
    // refcount table onto it would first run past the end).
    patch(&p, 40, &be64(&h, 48).to_be_bytes());
    cases.push(("refcount table overlapping L1", p, "overlaps"));

    let p = fresh("huge.qcow2");
    patch(&p, 24, &(u64::MAX / 2).to_be_bytes());
    cases.push(("absurd size", p, "size"));

    let p = fresh("feature.qcow2");
    patch(&p, 72, &(1u64 << 20).to_be_bytes());
    cases.push(("unknown incompatible feature", p, "bit 20"));

    let p = fresh("dirty.qcow2");
    patch(&p, 72, &1u64.to_be_bytes());
    let dirty = p.clone();

    // A loop: a -> b -> a.
    let a = fresh("a.qcow2");
    let b = d.join("b.qcow2");
    qcow2_overlay(&a, "qcow2", &b, None, None);
    qemu_img(&["rebase", "-u", "-F", "qcow2", "-b", s(&b), s(&a)]);
    cases.push(("backing loop", a, "loops"));

    // No backing format: the extension's type is overwritten.
    let base = d.join("base.raw");
    File::create(&base).unwrap().set_len(MIB).unwrap();
    let nofmt = d.join("nofmt.qcow2");
    qcow2_overlay(&base, "raw", &nofmt, None, None);
    let h = header(&nofmt);
    let ext = h
        .windows(4)
        .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
        .expect("a backing format extension");
    patch(&nofmt, ext as u64, &[0x12, 0x34, 0x56, 0x78]);
    cases.push(("no backing format", nofmt.clone(), "without its format"));

    // A backing file in another directory.
    let other = tempfile::tempdir().unwrap();
    let far_base = other.path().join("far.raw");
    File::create(&far_base).unwrap().set_len(MIB).unwrap();
    let far = d.join("far.qcow2");
    qcow2_overlay(&far_base, "raw", &far, None, None);
    cases.push((
        "backing outside the allowed directories",
        far.clone(),
        "outside",
    ));

    // A chain of 18 images: deeper than 16.
    let mut prev = d.join("deep0.raw");
    File::create(&prev).unwrap().set_len(MIB).unwrap();
    let mut fmt = "raw";
    for i in 1..18 {
        let p = d.join(format!("deep{i}.qcow2"));
        qcow2_overlay(&prev, fmt, &p, None, None);
        prev = p;
        fmt = "qcow2";
    }
    let deep = prev;
    cases.push(("chain deeper than 16", deep.clone(), "deeper than 16"));

    for (what, p, says) in &cases {
        let e = open(p, false, BackingPolicy::default())
            .err()
            .unwrap_or_else(|| panic!("{what}: opened"));
        assert!(e.contains(says), "{what}: {e}");
        assert!(
            e.contains(s(p)) || e.contains("qcow2"),
            "{what} names the image: {e}"
        );
    }

    // A dirty bit on an image with no tables to fix: readable, and repaired when opened for
    // writing (the repair of a real dirty image is the next test).
    open(&dirty, false, BackingPolicy::default()).unwrap();
    drop(open(&dirty, true, BackingPolicy::default()).unwrap());
    assert_eq!(header(&dirty)[79] & 1, 0, "the dirty bit is cleared");

    // What the operator can opt into.
    let relaxed = BackingPolicy {
        any_dir: true,
        raw_without_format: true,
        ..BackingPolicy::default()
    };
    open(&nofmt, false, relaxed.clone()).unwrap();
    open(&far, false, relaxed).unwrap();
    open(
        &far,
        false,
        BackingPolicy {
            allowed_dirs: vec![other.path().to_owned()],
            ..BackingPolicy::default()
        },
    )
    .unwrap();
    let mut img = open(
        &deep,
        false,
        BackingPolicy {
            max_depth: 20,
            ..BackingPolicy::default()
        },
    )
    .unwrap();
    assert_eq!(img.info().backing_chain.len(), 17);
    assert!(read_all(&mut img).iter().all(|&b| b == 0));
}

#[test]
fn the_metadata_cache_stays_within_its_budget() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("big.qcow2");
    // 4 KiB clusters: each L2 table maps 2 MiB; 64 MiB of data needs 32 tables.
    qcow2_create(&p, Some("cluster_size=4096"), "64M");
    qemu_io(&p, &["write -P 0x33 0 64M"]);
    let f = File::open(&p).unwrap();
    let mut img = Image::open(
        &p,
        f,
        &OpenOptions {
            cache_bytes: 8 * 4096,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    assert_eq!(img.info().cache_tables, 8);
    let mut buf = vec![0u8; 4096];
    for i in 0..64 {
        img.read(i * MIB, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0x33));
        assert!(img.cached_tables() <= 8);
    }
    assert_eq!(img.cached_tables(), 8);
}

#[test]
fn kill_9_during_writes_never_corrupts_and_keeps_what_was_flushed() {
    kill_9_rounds(None);
}

#[test]
fn kill_9_during_writes_to_an_extended_l2_overlay_never_corrupts() {
    kill_9_rounds(Some("extended_l2=on"));
}

/// 20 rounds of the crash writer on an overlay made with `opts`, each ended by SIGKILL.
fn kill_9_rounds(opts: Option<&str>) {
    use vback_tests::qcow2_ops::assert_flushed_data_survived;
    const FLUSH_EVERY: u64 = 8;
    let writer = env!("CARGO_BIN_EXE_qcow2-crash-writer");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = source(d);
    let img = d.join("crash.qcow2");
    qcow2_overlay(&base, "raw", &img, opts, None);
    let base_before = std::fs::read(&base).unwrap();
    let current = d.join("now.raw");
    let mut baseline = base_before.clone();
    let mut total_flushed = 0;
    for round in 0..20u64 {
        let seed = round + 1;
        let mut child = Command::new(writer)
            .args([s(&img), &seed.to_string(), &FLUSH_EVERY.to_string()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(40 + (round * 37) % 300));
        if let Some(st) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "round {round}: the writer exited by itself ({st}): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        child.kill().unwrap(); // SIGKILL
        let out = child.wait_with_output().unwrap();
        let acked = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("flushed ")?.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        total_flushed += acked;

        let check = Command::new("qemu-img")
            .args(["check", s(&img)])
            .output()
            .unwrap();
        // 0: clean; 3: leaked clusters only (acceptable after a crash, repairable).
        assert!(
            matches!(check.status.code(), Some(0 | 3)),
            "round {round}: qemu-img check found corruption: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        qemu_img(&["convert", "-O", "raw", s(&img), s(&current)]);
        let now = std::fs::read(&current).unwrap();
        // Replay the acknowledged operations on the model; the ones after the last
        // acknowledged flush may or may not have landed: their sectors are not compared.
        assert_flushed_data_survived(&baseline, &now, seed, acked, FLUSH_EVERY, round);
        baseline = now;
    }
    assert!(
        total_flushed > 20,
        "the writer made progress ({total_flushed} operations)"
    );
    assert!(
        std::fs::read(&base).unwrap() == base_before,
        "the backing file is unchanged"
    );
}

#[test]
fn a_dirty_image_left_by_a_crashed_qemu_is_repaired_on_writable_open() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("lazy.qcow2");
    qcow2_create(&p, Some("lazy_refcounts=on,cluster_size=4096"), "16M");
    // qemu-io's `abort` kills QEMU's block layer without closing the image: with lazy
    // refcounts the dirty bit stays set and the refcounts on disk are stale.
    let _ = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x42 0 1M",
            "-c",
            "write -P 0x43 8M 300k",
            "-c",
            "flush",
            "-c",
            "abort",
            s(&p),
        ])
        .output()
        .expect("qemu-io is required (apt-get install qemu-utils)");
    let mut h = [0u8; 80];
    File::open(&p).unwrap().read_exact_at(&mut h, 0).unwrap();
    assert_eq!(h[79] & 1, 1, "qemu-io left the dirty bit set");
    let before = Command::new("qemu-img")
        .args(["check", s(&p)])
        .output()
        .unwrap();
    eprintln!(
        "qemu-img check before the repair: {:?}\n{}",
        before.status.code(),
        String::from_utf8_lossy(&before.stdout)
    );

    // Read-only: served as it is, dirty bit untouched.
    let mut ro = open(&p, false, BackingPolicy::default()).unwrap();
    let mut buf = vec![0u8; 4096];
    ro.read(8 * MIB, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0x43));
    drop(ro);
    File::open(&p).unwrap().read_exact_at(&mut h, 0).unwrap();
    assert_eq!(h[79] & 1, 1);

    let mut img = open(&p, true, BackingPolicy::default()).unwrap();
    img.write(4 * MIB, &vec![0x44u8; 65536]).unwrap();
    img.close().unwrap();
    drop(img);
    File::open(&p).unwrap().read_exact_at(&mut h, 0).unwrap();
    assert_eq!(h[79] & 1, 0, "the dirty bit is cleared");
    check_clean(&p);
    let raw = dir.path().join("lazy.raw");
    qemu_img(&["convert", "-O", "raw", s(&p), s(&raw)]);
    let all = std::fs::read(&raw).unwrap();
    assert!(all[..MIB as usize].iter().all(|&b| b == 0x42));
    assert!(
        all[4 * MIB as usize..4 * MIB as usize + 65536]
            .iter()
            .all(|&b| b == 0x44)
    );
    assert!(
        all[8 * MIB as usize..8 * MIB as usize + 300 * 1024]
            .iter()
            .all(|&b| b == 0x43)
    );
}

fn vbimg(args: &[&str]) -> (i32, String) {
    let bin = vback_tests::process::workspace_bin("vbimg").unwrap();
    let out = Command::new(bin).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn qemu_check_code(p: &Path) -> i32 {
    Command::new("qemu-img")
        .args(["check", s(p)])
        .output()
        .unwrap()
        .status
        .code()
        .unwrap_or(-1)
}

#[test]
fn vbimg_create_info_check_and_resize_agree_with_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let json = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&qemu_img(&["info", "--output=json", s(p)])).unwrap()
    };

    // create: what vbimg makes, qemu-img accepts and describes the same way, and uses.
    let base = d.join("base.raw");
    File::create(&base).unwrap().set_len(3 * MIB).unwrap();
    for (name, args, cs) in [
        ("a.qcow2", vec!["100M"], 65536),
        // 512-byte clusters and 1 GiB: the L1 table needs more than one refcount block.
        ("b.qcow2", vec!["1G", "--cluster-size", "512"], 512),
        ("c.qcow2", vec!["100M", "--cluster-size", "2M"], 2 << 20),
        ("d.qcow2", vec!["-b", "base.raw", "-F", "raw"], 65536),
    ] {
        let p = d.join(name);
        let mut a = vec!["create", s(&p)];
        a.extend_from_slice(&args);
        let (code, out) = vbimg(&a);
        assert_eq!(code, 0, "{name}: {out}");
        assert_eq!(qemu_check_code(&p), 0, "{name}: qemu-img check");
        let q = json(&p);
        assert_eq!(q["cluster-size"], cs, "{name}: {q}");
        if name == "d.qcow2" {
            assert_eq!(q["virtual-size"], 3 * MIB, "{q}");
            assert_eq!(q["backing-filename"], "base.raw", "{q}");
            assert_eq!(q["backing-filename-format"], "raw", "{q}");
        }
        qemu_io(&p, &["write -P 0x66 1M 200k", "write -z 2M 64k"]);
        if q["virtual-size"].as_u64().unwrap() <= 100 * MIB {
            assert_reads_like_qemu(&p, name);
        }
        assert_eq!(qemu_check_code(&p), 0, "{name}: after qemu-io");
    }

    // info: the same facts as qemu-img for qemu-img's images.
    let src = d.join("s.raw");
    File::create(&src).unwrap().set_len(5 * MIB).unwrap();
    for (name, opts) in [
        ("v2.qcow2", "compat=0.10"),
        ("zstd.qcow2", "compression_type=zstd,refcount_bits=1"),
        ("ext.qcow2", "extended_l2=on,cluster_size=128k"),
    ] {
        let p = d.join(name);
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, s(&p), "5M"]);
        let q = json(&p);
        let (code, out) = vbimg(&["info", s(&p)]);
        assert_eq!(code, 0, "{out}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        for key in ["virtual-size", "cluster-size", "format"] {
            assert_eq!(v[key], q[key], "{name} {key}: {v} vs {q}");
        }
        let (vd, qd) = (&v["format-specific"]["data"], &q["format-specific"]["data"]);
        for key in ["compat", "compression-type", "refcount-bits"] {
            assert_eq!(vd[key], qd[key], "{name} {key}: {vd} vs {qd}");
        }
        assert_eq!(vd["extended-l2"], qd["extended-l2"], "{name}");
    }

    // check: clean, leaked and corrupt images get qemu-img's exit status.
    let p = d.join("chk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&p), "64M"]);
    qemu_io(&p, &["write -P 1 0 1M"]);
    assert_eq!(vbimg(&["check", s(&p)]).0, 0);
    let mut h = vec![0u8; 64];
    File::open(&p).unwrap().read_exact_at(&mut h, 0).unwrap();
    let rt = u64::from_be_bytes(h[48..56].try_into().unwrap());
    let l1 = u64::from_be_bytes(h[40..48].try_into().unwrap());
    let mut e = [0u8; 8];
    File::open(&p).unwrap().read_exact_at(&mut e, rt).unwrap();
    let rb = u64::from_be_bytes(e);
    // Cluster 0 (the header) counted twice: a leak.
    patch(&p, rb, &2u16.to_be_bytes());
    assert_eq!(qemu_check_code(&p), 3);
    let (code, out) = vbimg(&["check", s(&p)]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("1 leaked clusters"), "{out}");
    // The L1 table's refcount dropped to 0: corruption.
    patch(&p, rb, &1u16.to_be_bytes());
    patch(&p, rb + 2 * (l1 / 65536), &0u16.to_be_bytes());
    assert_eq!(qemu_check_code(&p), 2);
    let (code, out) = vbimg(&["check", s(&p)]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("refcount 0, referenced 1 times"), "{out}");

    // convert: a zstd-compressed qemu-img image to raw and to qcow2, with progress; qemu-img
    // compares them identical to the source data, and the qcow2 output checks clean.
    let data = source(d);
    let comp = d.join("comp.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "compression_type=zstd",
        s(&data),
        s(&comp),
    ]);
    let out_raw = d.join("out.raw");
    let (code, out) = vbimg(&["convert", "-f", "qcow2", "-O", "raw", s(&comp), s(&out_raw)]);
    assert_eq!(code, 0, "{out}");
    assert!(std::fs::read(&out_raw).unwrap() == std::fs::read(&data).unwrap());
    let out_q = d.join("out.qcow2");
    let (code, out) = vbimg(&[
        "convert",
        "-p",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "--cluster-size",
        "4K",
        s(&data),
        s(&out_q),
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("(100.00/100%)"), "progress: {out}");
    assert_eq!(qemu_check_code(&out_q), 0);
    qemu_img(&["compare", "-f", "qcow2", "-F", "raw", s(&out_q), s(&data)]);
    assert_eq!(json(&out_q)["cluster-size"], 4096);
    assert_ne!(
        vbimg(&[
            "convert",
            "-f",
            "vmdk",
            "-O",
            "raw",
            s(&comp),
            s(&d.join("x"))
        ])
        .0,
        0,
        "formats are named, never guessed"
    );

    // resize: qemu-img sees the new size, and the image checks clean.
    let p = d.join("a.qcow2");
    assert_eq!(vbimg(&["resize", s(&p), "300G"]).0, 0);
    assert_eq!(json(&p)["virtual-size"], 300u64 << 30);
    assert_eq!(qemu_check_code(&p), 0);
    assert_ne!(vbimg(&["resize", s(&p), "1G"]).0, 0, "shrinking is refused");
}

/// `vbimg info` and `vbimg check` say what `qemu-img info --output json` and `qemu-img check`
/// say about the same images, key for key and line for line: fresh, partly written (data,
/// zeroes, zeroes over data), with a backing file (relative, from another directory), lazy
/// refcounts, version 2, 512-byte clusters, compressed, fragmented.
#[test]
fn vbimg_info_and_check_say_what_qemu_img_says() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = |name: &str| d.join(name);
    File::create(p("base.raw"))
        .unwrap()
        .set_len(3 * MIB)
        .unwrap();
    std::fs::create_dir(p("sub")).unwrap();
    // (name, creation options, size, writes)
    type Recipe<'a> = (&'a str, Vec<&'a str>, Option<&'a str>, Vec<&'a str>);
    let images: Vec<Recipe> = vec![
        ("fresh.qcow2", vec![], Some("64M"), vec![]),
        (
            "written.qcow2",
            vec![],
            Some("64M"),
            vec![
                "write -P 1 0 1M",
                "write -z 2M 64k",
                "write -P 3 10M 64k",
                "write -P 4 5M 128k",
                "write -z 10M 64k",
            ],
        ),
        (
            "overlay.qcow2",
            vec!["-b", "base.raw", "-F", "raw"],
            None,
            vec!["write -P 2 1M 100k"],
        ),
        // A relative backing name is relative to the new image's directory.
        (
            "sub/overlay.qcow2",
            vec!["-b", "../base.raw", "-F", "raw"],
            None,
            vec![],
        ),
        (
            "lazy.qcow2",
            vec!["-o", "lazy_refcounts=on"],
            Some("8M"),
            vec![],
        ),
        (
            "v2.qcow2",
            vec!["-o", "compat=0.10"],
            Some("5M"),
            vec!["write -P 9 0 70k"],
        ),
        (
            "small.qcow2",
            vec!["-o", "cluster_size=512"],
            Some("1M"),
            vec!["write -P 5 0 200k", "write -P 6 512k 64k"],
        ),
        (
            "fragmented.qcow2",
            vec![],
            Some("64M"),
            vec![
                "write -P 5 1M 64k",
                "write -P 6 0 64k",
                "write -P 7 512k 64k",
            ],
        ),
    ];
    let mut names: Vec<String> = Vec::new();
    for (name, opts, size, writes) in &images {
        let path = p(name);
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        args.extend_from_slice(opts);
        args.push(s(&path));
        args.extend(size);
        qemu_img(&args);
        if !writes.is_empty() {
            qemu_io(&path, writes);
        }
        names.push(s(&path).to_owned());
    }
    let data = source(d);
    let comp = p("compressed.qcow2");
    qemu_img(&["convert", "-c", "-O", "qcow2", s(&data), s(&comp)]);
    names.push(s(&comp).to_owned());
    // Relative names, as an operator types them (filename and full-backing-filename keep them).
    names.push("overlay.qcow2".to_owned());
    names.push("sub/overlay.qcow2".to_owned());

    let run = |bin: &str, args: &[&str]| -> String {
        let bin = if bin == "vbimg" {
            vback_tests::process::workspace_bin("vbimg").unwrap()
        } else {
            PathBuf::from(bin)
        };
        let out = Command::new(bin)
            .args(args)
            .current_dir(d)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let parse = |t: &str| -> serde_json::Value { serde_json::from_str(t).unwrap() };
    for name in &names {
        let mut q = parse(&run("qemu-img", &["info", "--output", "json", name]));
        // The file layer (qemu's block driver tree) has no counterpart in vbimg.
        q.as_object_mut().unwrap().remove("children");
        let v = parse(&run("vbimg", &["info", "--output", "json", name]));
        assert_eq!(v, q, "{name}: info");
        let q = parse(&run("qemu-img", &["check", "--output", "json", name]));
        let v = parse(&run("vbimg", &["check", "--output", "json", name]));
        assert_eq!(v, q, "{name}: check --output json");
        let q = run("qemu-img", &["check", name]);
        let v = run("vbimg", &["check", name]);
        assert_eq!(v, q, "{name}: check");
    }
    // The counts are the guest's clusters: qemu-img's percentages, not the host's clusters.
    let v = run("vbimg", &["check", "written.qcow2"]);
    assert!(
        v.contains("19/1024 = 1.86% allocated"),
        "data clusters and zeroes over data are allocated, plain zeroes are not: {v}"
    );
}

#[test]
fn a_qcow2_image_named_as_raw_is_served_raw_with_a_loud_warning() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    qcow2_create(&img, None, "64M");
    let len = std::fs::metadata(&img).unwrap().len();
    let (sock, ctl) = (dir.path().join("b.sock"), dir.path().join("b.ctl"));
    let spec = format!("tap:aio:{}", img.display());
    let d = vback_tests::process::blkback(
        &sock,
        &["--disk", &spec, "--control", s(&ctl)],
        &dir.path().join("b.log"),
    )
    .unwrap();
    // Never probed: the spec decides (the guest sees the file's bytes, header included) ...
    let st = vback_common::control::ControlClient::connect(&ctl)
        .unwrap()
        .call("status", serde_json::Value::Null)
        .unwrap();
    assert_eq!(st["device"]["kind"], "file", "{st}");
    assert_eq!(st["device"]["size"], len - len % 512, "{st}");
    // ... but the operator is told, in the log and in status.
    let w = st["device"]["warning"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        w.contains("starts with a qcow2 header") && w.contains("tap:qcow:"),
        "{st}"
    );
    assert!(
        d.log().contains("starts with a qcow2 header"),
        "{}",
        d.log()
    );

    // A raw image with ordinary content gets no warning.
    let raw = dir.path().join("plain.img");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let (sock2, ctl2) = (dir.path().join("p.sock"), dir.path().join("p.ctl"));
    let spec = format!("tap:aio:{}", raw.display());
    let _p = vback_tests::process::blkback(
        &sock2,
        &["--disk", &spec, "--control", s(&ctl2)],
        &dir.path().join("p.log"),
    )
    .unwrap();
    let st = vback_common::control::ControlClient::connect(&ctl2)
        .unwrap()
        .call("status", serde_json::Value::Null)
        .unwrap();
    assert!(st["device"]["warning"].is_null(), "{st}");
}
