//! blkback end to end: a real guest (QEMU, Debian kernel) uses disks served by blkback.
//!
//! One test, three boots (a boot costs ~5 s under TCG):
//! 1. two queues; fio with crc32c verification on both; mkfs.ext4, files, sync; fstrim
//!    punches holes in the image; a read-only second disk refuses writes (also after the guest
//!    forces the block device writable); an online resize is seen by the guest at once;
//! 2. a QEMU killed in the middle of fio (requests in flight) does not hurt blkback;
//! 3. after blkback is killed (-9) and restarted on the same socket, a new QEMU attaches and
//!    the files are intact; a host block device (a loop device, `phy:`) takes fio and discard.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use vback_common::control::ControlClient;
use vback_tests::Guest;
use vback_tests::process::blkback;

const MIB: u64 = 1 << 20;

fn stats(ctl: &Path) -> Value {
    ControlClient::connect(ctl)
        .unwrap()
        .call("stats", Value::Null)
        .unwrap()
}

fn allocated(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

#[test]
fn guest_filesystem_discard_read_only_resize_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = d.join("disk0.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(256 * MIB)
        .unwrap();
    let ro_image = d.join("ro.raw");
    let mut ro_data = b"read-only-marker".to_vec();
    ro_data.resize(16 * MIB as usize, 0x11);
    std::fs::write(&ro_image, &ro_data).unwrap();
    let (sock, ctl) = (d.join("vda.sock"), d.join("vda.ctl"));
    let (ro_sock, ro_ctl) = (d.join("vdb.sock"), d.join("vdb.ctl"));
    let disk = format!("file:{}", image.display());
    let mut a = blkback(
        &sock,
        &[
            "--disk",
            &disk,
            "--queues",
            "2",
            "--control",
            ctl.to_str().unwrap(),
        ],
        &d.join("a.log"),
    )
    .unwrap();
    let ro_disk = format!("file:{}", ro_image.display());
    let mut r = blkback(
        &ro_sock,
        &[
            "--disk",
            &ro_disk,
            "--mode",
            "r",
            "--control",
            ro_ctl.to_str().unwrap(),
        ],
        &d.join("r.log"),
    )
    .unwrap();

    let resize_reply = Arc::new(Mutex::new(Value::Null));
    let (ctl2, reply2) = (ctl.clone(), resize_reply.clone());
    let run = Guest::new()
        .vhost_blk(&sock, "num-queues=2")
        .vhost_blk(&ro_sock, "")
        .timeout(Duration::from_secs(300))
        .on_host("resize", move || {
            let mut c = ControlClient::connect(&ctl2).unwrap();
            *reply2.lock().unwrap() = c.call("resize", json!({"size": "320M"})).unwrap();
        })
        .run(
            r#"
check present 'wait_dev /dev/vda && wait_dev /dev/vdb && cat /sys/block/vda/size; cat /sys/block/vda/serial; echo; ls /sys/block/vda/mq | wc -l; cat /sys/block/vdb/ro'
check fio 'fio --name=v --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=16 --numjobs=2 \
  --cpus_allowed=0-1 --cpus_allowed_policy=split --offset_increment=64M --size=16M --rw=randwrite \
  --bs=4k --verify=crc32c --verify_fatal=1 --randrepeat=0 --group_reporting --output-format=terse >/tmp/fio.out && echo fio-ok'
check mkfs 'mkfs.ext4 -q -F /dev/vda && mkdir -p /mnt && mount /dev/vda /mnt && \
  dd if=/dev/urandom of=/mnt/a bs=1M count=8 2>/dev/null && echo hello > /mnt/b && sync && cd /mnt && sha256sum a b'
check fstrim 'dd if=/dev/zero of=/mnt/big bs=1M count=64 2>/dev/null && sync && rm /mnt/big && sync && fstrim -v /mnt'
check read-only 'head -c 16 /dev/vdb; echo; \
  if dd if=/dev/zero of=/dev/vdb bs=4096 count=1 oflag=direct 2>/dev/null; then echo WRITE-SUCCEEDED; exit 1; fi; \
  blockdev --setrw /dev/vdb; \
  if dd if=/dev/zero of=/dev/vdb bs=4096 count=1 oflag=direct 2>/dev/null; then echo FORCED-WRITE-SUCCEEDED; exit 1; fi; echo refused'
check resize 'before=$(cat /sys/block/vda/size); echo VBACK-HOST:resize; i=0; \
  while [ "$(cat /sys/block/vda/size)" = "$before" ] && [ $i -lt 300 ]; do usleep 100000; i=$((i+1)); done; \
  cat /sys/block/vda/size'
check umount 'umount /mnt && echo unmounted'
"#,
        )
        .expect("the guest runs");
    eprintln!("boot 1: {}", run.summary());
    run.assert_checks(&[
        "present",
        "fio",
        "mkfs",
        "fstrim",
        "read-only",
        "resize",
        "umount",
    ]);

    let present: Vec<String> = run
        .check("present")
        .output
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(present[0], (256 * MIB / 512).to_string());
    assert!(present[1].starts_with("vback-"), "serial: {present:?}");
    assert_eq!(present[2], "2", "two queues: {present:?}");
    assert_eq!(present[3], "1", "vdb is read-only: {present:?}");
    assert!(
        run.check("read-only")
            .output
            .starts_with("read-only-marker")
    );
    assert_eq!(
        run.check("resize").output.lines().last(),
        Some((320 * MIB / 512).to_string().as_str()),
        "the guest sees the new size"
    );
    assert_eq!(resize_reply.lock().unwrap()["guest_notified"], true);
    assert_eq!(
        std::fs::metadata(&image).unwrap().len(),
        320 * MIB,
        "the image grew"
    );

    // Both queues carried requests; fstrim's discards reached blkback and punched holes.
    let s = stats(&ctl);
    let queues = s["device"]["queues"].as_array().unwrap();
    for (i, q) in queues.iter().enumerate() {
        assert!(
            q["requests"].as_u64().unwrap() > 0,
            "queue {i} was used: {s}"
        );
        assert_eq!(q["in_flight"], 0, "{s}");
    }
    let discards: u64 = queues.iter().map(|q| q["discards"].as_u64().unwrap()).sum();
    assert!(discards > 0, "{s}");
    // Every request the storage carried out has one latency sample, on its queue.
    let typed: vback_api::Stats = vback_api::decode("stats", s.clone()).unwrap();
    let block: vback_api::BlockStats = vback_api::decode("stats", s["device"].clone()).unwrap();
    for (i, q) in block.queues.iter().enumerate() {
        let carried = q.reads
            + q.writes
            + q.flushes
            + q.discards
            + q.write_zeroes
            + q.errors_by_kind.values().sum::<u64>();
        let sampled: u64 = typed
            .histograms
            .iter()
            .filter(|h| h.labels.get("queue") == Some(&i.to_string()))
            .map(|h| h.histogram.count)
            .sum();
        assert_eq!(sampled, carried, "queue {i}: {s}");
    }
    let alloc = allocated(&image);
    eprintln!("image allocation after fstrim: {} MiB", alloc / MIB);
    assert!(
        alloc < 48 * MIB,
        "fstrim punched holes: {} MiB still allocated",
        alloc / MIB
    );
    // The guest kernel honours VIRTIO_BLK_F_RO even after `blockdev --setrw`, so no write reached
    // blkback (its own refusal of writes to a read-only disk is covered by the worker's unit
    // tests).
    let rs = stats(&ro_ctl);
    assert_eq!(rs["device"]["queues"][0]["writes"], 0, "{rs}");
    assert_eq!(
        std::fs::read(&ro_image).unwrap(),
        ro_data,
        "the read-only image is unchanged"
    );
    let sums = run.check("mkfs").output.clone();

    // A front end that dies with requests in flight (QEMU killed in the middle of fio):
    // blkback finishes or drops them and serves the next front end.
    let killed = Guest::new()
        .vhost_blk(&sock, "num-queues=2")
        .timeout(Duration::from_secs(12))
        // (fio stays in the 64 MiB the resize added: the file system ends at 256 MiB)
        .run("wait_dev /dev/vda; fio --name=busy --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=32 --rw=randrw --bs=4k --offset=256M --size=64M --time_based --runtime=60 >/dev/null");
    assert!(
        matches!(killed, Err(vback_tests::HarnessError::Timeout { .. })),
        "the guest should have been killed: {killed:?}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        a.is_running(),
        "blkback survived a front end dying mid-I/O:\n{}",
        a.log()
    );
    let s = stats(&ctl);
    for q in s["device"]["queues"].as_array().unwrap() {
        assert_eq!(
            q["in_flight"], 0,
            "nothing left in flight after the disconnect: {s}"
        );
    }

    // Crash blkback, start it again on the same socket; a new QEMU attaches; files intact.
    a.kill();
    let mut a2 = blkback(
        &sock,
        &[
            "--disk",
            &disk,
            "--queues",
            "2",
            "--control",
            ctl.to_str().unwrap(),
        ],
        &d.join("a2.log"),
    )
    .unwrap();
    let sums_file = d.join("sums");
    std::fs::write(&sums_file, &sums).unwrap();

    // A host block device (phy:): a loop device over a file.
    let loop_file = d.join("loop.raw");
    std::fs::File::create(&loop_file)
        .unwrap()
        .set_len(32 * MIB)
        .unwrap();
    let loopdev = LoopDevice::attach(&loop_file);
    let phy = format!("phy:{}", loopdev.path);
    let phy_sock = d.join("vdc.sock");
    let _p = blkback(&phy_sock, &["--disk", &phy], &d.join("p.log")).unwrap();

    let run2 = Guest::new()
        .vhost_blk(&sock, "num-queues=2")
        .vhost_blk(&phy_sock, "")
        .file(&sums_file, "/harness/sums")
        .run(
            r#"
check size 'wait_dev /dev/vda && cat /sys/block/vda/size'
check files 'mkdir -p /mnt && mount /dev/vda /mnt && cd /mnt && sha256sum -c /harness/sums'
check phy 'wait_dev /dev/vdb && cat /sys/block/vdb/size && fio --name=p --filename=/dev/vdb --direct=1 --ioengine=libaio --iodepth=8 --rw=randwrite --bs=4k --size=8M --verify=crc32c --verify_fatal=1 --randrepeat=0 >/dev/null && echo fio-ok && blkdiscard -o 0 -l 4194304 /dev/vdb && echo discard-ok'
"#,
        )
        .expect("the guest runs");
    eprintln!("boot 2: {}", run2.summary());
    run2.assert_checks(&["size", "files", "phy"]);
    assert!(
        run2.check("phy")
            .output
            .starts_with(&(32 * MIB / 512).to_string()),
        "{}",
        run2.output
    );
    assert_eq!(
        run2.check("size").output.trim(),
        (320 * MIB / 512).to_string()
    );
    assert!(a2.is_running(), "blkback survived:\n{}", a2.log());
    assert!(r.is_running(), "read-only blkback survived:\n{}", r.log());
    assert_eq!(
        a2.terminate(Duration::from_secs(5)).and_then(|s| s.code()),
        Some(0),
        "clean exit on SIGTERM:\n{}",
        a2.log()
    );
    assert!(!sock.exists(), "the socket is removed on exit");
}

/// A loop device over a file (root only), detached on drop.
struct LoopDevice {
    path: String,
}

impl LoopDevice {
    fn attach(file: &Path) -> LoopDevice {
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show", "--direct-io=on"])
            .arg(file)
            .output()
            .expect("losetup (util-linux) runs");
        assert!(
            out.status.success(),
            "losetup failed (the test needs root and /dev/loop-control): {out:?}"
        );
        LoopDevice {
            path: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.path])
            .status();
    }
}
