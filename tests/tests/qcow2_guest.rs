//! A real guest on a qcow2 disk served by blkback, over a raw backing file: the guest sees the
//! backing data, writes (allocating clusters) and verifies with fio, makes and fills an ext4
//! file system, reads it back after dropping its caches, trims it, sees an online resize and
//! writes into the new space; afterwards `qemu-img check`
//! is clean, `qemu-img` reads the guest's file system content, and the backing file is unchanged.
//! Once on a standard overlay, once on one with extended L2 entries (subcluster allocation:
//! the guest's 4 KiB writes allocate 2 KiB subclusters, the rest of a cluster still reads the
//! backing file).

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use vback_common::control::ControlClient;
use vback_tests::Guest;
use vback_tests::process::blkback;
use vback_tests::qemu_tools::{path_str as s, qcow2_overlay, qemu_img};

const MIB: u64 = 1 << 20;
const MARKER: &[u8] = b"backing-file-marker";

#[test]
fn guest_on_a_qcow2_overlay_over_a_backing_file() {
    guest_on_an_overlay(None);
}

#[test]
fn guest_on_an_extended_l2_qcow2_overlay_over_a_backing_file() {
    guest_on_an_overlay(Some("extended_l2=on"));
}

/// The guest's run on an overlay made with `opts`.
fn guest_on_an_overlay(opts: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.raw");
    let mut base_data = MARKER.to_vec();
    base_data.resize(128 * MIB as usize, 0x5a);
    std::fs::write(&base, &base_data).unwrap();
    let top = d.join("top.qcow2");
    qcow2_overlay(&base, "raw", &top, opts, None);
    let (sock, ctl) = (d.join("vda.sock"), d.join("vda.ctl"));
    let disk = format!("tap:qcow:{}", top.display());
    let mut daemon = blkback(
        &sock,
        &["--disk", &disk, "--control", s(&ctl)],
        &d.join("blkback.log"),
    )
    .unwrap();

    let ctl2 = ctl.clone();
    let run = Guest::new()
        .vhost_blk(&sock, "")
        .timeout(Duration::from_secs(300))
        .on_host("resize", move || {
            let reply = ControlClient::connect(&ctl2)
                .unwrap()
                .call("resize", serde_json::json!({"size": "160M"}))
                .unwrap();
            assert_eq!(reply["guest_notified"], true, "{reply}");
        })
        .run(
            r#"
check present 'wait_dev /dev/vda && cat /sys/block/vda/size && head -c 19 /dev/vda; echo'
check fio 'fio --name=v --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=8 --offset=64M \
  --size=16M --rw=randwrite --bs=4k --verify=crc32c --verify_fatal=1 --randrepeat=0 \
  --output-format=terse >/tmp/fio.out && echo fio-ok'
check mkfs 'mkfs.ext4 -q -F /dev/vda && mkdir -p /mnt && mount /dev/vda /mnt && \
  dd if=/dev/urandom of=/mnt/a bs=1M count=8 2>/dev/null && echo hello > /mnt/b && sync && \
  cd /mnt && sha256sum a b'
check reread 'cd / && umount /mnt && echo 3 > /proc/sys/vm/drop_caches && mount /dev/vda /mnt && \
  cd /mnt && sha256sum a b'
check fstrim 'dd if=/dev/zero of=/mnt/big bs=1M count=32 2>/dev/null && sync && rm /mnt/big && \
  sync && fstrim -v /mnt'
check umount 'cd / && umount /mnt && echo unmounted'
check resize 'before=$(cat /sys/block/vda/size); echo VBACK-HOST:resize; i=0; \
  while [ "$(cat /sys/block/vda/size)" = "$before" ] && [ $i -lt 300 ]; do usleep 100000; i=$((i+1)); done; \
  cat /sys/block/vda/size; dd if=/dev/urandom of=/dev/vda bs=1M seek=150 count=4 oflag=direct 2>/dev/null && echo grown-written'
"#,
        )
        .unwrap_or_else(|e| {
            panic!(
                "the guest did not finish: {e}\nblkback log:\n{}",
                daemon.log()
            )
        });
    eprintln!("{}", run.summary());
    run.assert_checks(&[
        "present", "fio", "mkfs", "reread", "fstrim", "umount", "resize",
    ]);
    let resized: Vec<&str> = run.check("resize").output.lines().collect();
    assert_eq!(
        resized[resized.len().saturating_sub(2)..],
        [(160 * MIB / 512).to_string().as_str(), "grown-written"],
        "the guest sees the online resize and writes past the old end"
    );
    let present: Vec<&str> = run.check("present").output.lines().collect();
    assert_eq!(present[0], (128 * MIB / 512).to_string());
    assert_eq!(
        present[1].as_bytes(),
        MARKER,
        "the guest reads the backing file through the overlay"
    );
    assert_eq!(
        run.check("mkfs").output,
        run.check("reread").output,
        "the files read back after the guest dropped its caches"
    );
    let stats: Value = ControlClient::connect(&ctl)
        .unwrap()
        .call("stats", Value::Null)
        .unwrap();
    let q = &stats["device"]["queues"][0];
    assert!(q["discards"].as_u64().unwrap() > 0, "{stats}");
    assert_eq!(q["errors"], 0, "{stats}");

    let status: Value = ControlClient::connect(&ctl)
        .unwrap()
        .call("status", Value::Null)
        .unwrap();
    assert_eq!(status["device"]["kind"], "qcow2", "{status}");
    assert_eq!(status["device"]["qcow2"]["cluster_size"], 65536, "{status}");
    assert_eq!(
        status["device"]["qcow2"]["extended_l2"],
        opts.is_some(),
        "{status}"
    );
    assert_eq!(
        status["device"]["qcow2"]["backing_chain"][0],
        std::fs::canonicalize(&base).unwrap().display().to_string(),
        "{status}"
    );

    assert!(
        daemon.terminate(Duration::from_secs(10)).is_some(),
        "blkback stops on SIGTERM"
    );
    let check = Command::new("qemu-img")
        .args(["check", s(&top)])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "qemu-img check after the guest ({:?}): {}{}\n{}",
        check.status.code(),
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr),
        daemon.log()
    );
    assert!(
        std::fs::read(&base).unwrap() == base_data,
        "the backing file is unchanged"
    );
    // QEMU sees the guest's file system: the ext4 magic at byte 1080.
    let raw = d.join("top.raw");
    qemu_img(&["convert", "-O", "raw", s(&top), s(&raw)]);
    let img = std::fs::read(&raw).unwrap();
    assert_eq!(&img[1080..1082], &[0x53, 0xef], "ext4 superblock magic");
    assert_eq!(img.len() as u64, 160 * MIB, "qemu-img sees the grown image");
}
