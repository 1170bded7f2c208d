//! Unit tests of the format layer on images made by `qemu-img` (which CI installs; a missing
//! qemu-img fails these tests loudly).

use super::*;
use std::process::Command;

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
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        ps,
        "1M",
    ]);
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
