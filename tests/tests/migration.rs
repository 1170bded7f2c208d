//! Live migration of a blkback disk (#15 item 4), with this crate's front end playing QEMU:
//! the source's blkback logs what it writes into guest memory once the front end logs dirty
//! pages, and hands the image to a destination blkback started with `--incoming` on the same
//! image; at no point do both hold the image's write lock, and a destination that starts
//! while the source still runs the device is refused.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use vback_common::control::ControlClient;
use vback_tests::frontend::{BlkDriver, DESC_WRITE, SharedMemory, blk_layout};
use vback_tests::process::{Daemon, blkback};

fn image_locked(ctl: &Path) -> bool {
    let st = ControlClient::connect(ctl)
        .unwrap()
        .call("status", Value::Null)
        .unwrap();
    st["device"]["image_locked"]
        .as_bool()
        .unwrap_or_else(|| panic!("status has image_locked: {st}"))
}

/// A read of sector 0 into the data buffer; true if it completed with OK.
fn read0(d: &mut BlkDriver) -> bool {
    use blk_layout::*;
    d.mem().put(HDR, &[0u8; 16]);
    d.mem().put(STATUS, &[0xff]);
    d.submit(&[
        (HDR, 16, 0),
        (DATA, 512, DESC_WRITE),
        (STATUS, 1, DESC_WRITE),
    ]) && d.mem().get8(STATUS) == 0
}

/// The dirty pages in the first `bytes` of a log bitmap.
fn dirty_pages(log: &SharedMemory, bytes: u64) -> Vec<u64> {
    (0..bytes * 8)
        .filter(|p| log.get8(p / 8) & (1 << (p % 8)) != 0)
        .collect()
}

/// A migration's two blkbacks on one raw image of `len` bytes in `d`: the source `a` (locked)
/// and the destination `b` (`--incoming`), their sockets and control sockets.
struct Pair {
    a: Daemon,
    b: Daemon,
    sa: PathBuf,
    sb: PathBuf,
    ca: PathBuf,
    cb: PathBuf,
}

impl Pair {
    /// The daemons, then the source's and destination's sockets and control sockets.
    fn parts(self) -> (Daemon, Daemon, [PathBuf; 4]) {
        (self.a, self.b, [self.sa, self.sb, self.ca, self.cb])
    }

    fn start(d: &Path, len: u64) -> Pair {
        let image = d.join("disk.raw");
        std::fs::File::create(&image).unwrap().set_len(len).unwrap();
        let disk = format!("file:{}", image.display());
        let (sa, sb) = (d.join("a.sock"), d.join("b.sock"));
        let (ca, cb) = (d.join("a.ctl"), d.join("b.ctl"));
        let start = |sock: &Path, ctl: &Path, extra: &[&str], log: &str| {
            let mut args = vec!["--disk", &disk, "--control", ctl.to_str().unwrap()];
            args.extend_from_slice(extra);
            blkback(sock, &args, &d.join(log)).unwrap()
        };
        let a = start(&sa, &ca, &[], "a.log");
        let b = start(&sb, &cb, &["--incoming"], "b.log");
        Pair {
            a,
            b,
            sa,
            sb,
            ca,
            cb,
        }
    }
}

#[test]
fn a_blkback_disk_is_handed_over_to_an_incoming_blkback_with_one_writer_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    // The destination starts while the source holds the lock: it opens the image unlocked.
    let (mut a, mut b, [sa, sb, ca, cb]) = Pair::start(dir.path(), 1 << 20).parts();
    assert!(image_locked(&ca));
    assert!(!image_locked(&cb), "an incoming blkback holds no lock");

    // The guest writes through the source.
    let mut fa = BlkDriver::connect_migratable(&sa, 0, SharedMemory::new(blk_layout::MEM)).unwrap();
    let pattern: Vec<u8> = (0..512).map(|i| (i * 7 + 3) as u8).collect();
    assert!(
        fa.request(1, 0, Some(&pattern)),
        "a write through the source"
    );

    // A destination started too early (the source still runs the device) is refused.
    let e = BlkDriver::connect_migratable(&sb, 0, SharedMemory::new(blk_layout::MEM))
        .err()
        .unwrap_or_else(|| panic!("not refused: {}", b.log()));
    assert!(e.contains("SET_VRING_KICK"), "{e}");
    assert!(
        b.log()
            .contains("the device cannot start: the image lock cannot be taken"),
        "{}",
        b.log()
    );
    assert!(!image_locked(&cb) && image_locked(&ca));

    // Migration: logging on, a read the source serves is logged (the data buffer's page, the
    // status byte's, the used ring's), then the source stops the device.
    let log = SharedMemory::new(4096);
    fa.start_logging(&log, 64);
    assert!(read0(&mut fa));
    assert_eq!(fa.mem().get8(blk_layout::DATA + 5), pattern[5]);
    let (used, hdr, data) = (
        blk_layout::USED / 4096,
        blk_layout::HDR / 4096,
        blk_layout::DATA / 4096,
    );
    assert_eq!(dirty_pages(&log, 64), vec![used, hdr, data]);
    let base = fa.stop();
    assert_eq!(base, 2, "both requests were taken and completed");
    assert!(
        !image_locked(&ca),
        "the source released the lock when its device stopped during the migration"
    );
    assert!(
        a.log().contains("image lock released for the destination"),
        "{}",
        a.log()
    );

    // The destination's front end starts the device where the source stopped: the
    // destination takes the lock and sees what the guest wrote.
    let dest_mem = SharedMemory::new(blk_layout::MEM);
    dest_mem.copy_from(fa.mem());
    let mut fb = BlkDriver::connect_migratable(&sb, base, dest_mem).unwrap();
    assert!(image_locked(&cb) && !image_locked(&ca));
    assert!(read0(&mut fb));
    assert_eq!(
        (0..512)
            .map(|i| fb.mem().get8(blk_layout::DATA + i))
            .collect::<Vec<u8>>(),
        pattern
    );

    // The source's front end resuming now (a migration QEMU would not fail at this point) is
    // refused: the destination writes.
    drop(fa);
    let e = BlkDriver::connect_migratable(&sa, base, SharedMemory::new(blk_layout::MEM))
        .err()
        .expect("refused");
    assert!(e.contains("SET_VRING_KICK"), "{e}");
    assert!(image_locked(&cb) && !image_locked(&ca));
    drop(fb);
    for p in [&mut a, &mut b] {
        assert_eq!(
            p.terminate(Duration::from_secs(5)).and_then(|s| s.code()),
            Some(0)
        );
    }
}

/// Polls both daemons' `status` until `stop` is set; true if both ever said they held the
/// image lock at once.
fn watch_locks(
    a: std::path::PathBuf,
    b: std::path::PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(bool, usize)> {
    std::thread::spawn(move || {
        let (mut both, mut polls) = (false, 0);
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            both |= image_locked(&a) && image_locked(&b);
            polls += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        (both, polls)
    })
}

#[test]
fn a_guest_running_fio_verify_migrates_to_a_second_qemu_with_an_incoming_blkback() {
    let dir = tempfile::tempdir().unwrap();
    let (mut a, mut b, [sa, sb, ca, cb]) = Pair::start(dir.path(), 64 << 20).parts();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = watch_locks(ca.clone(), cb.clone(), stop.clone());

    // fio writes and verifies across the migration: the guest asks for it 2 s into the run.
    let script = r#"
check fio 'wait_dev /dev/vda && { fio --name=v --filename=/dev/vda --direct=1 --ioengine=libaio \
  --iodepth=16 --rw=randwrite --bs=4k --size=32M --time_based --runtime=12 --verify=crc32c \
  --verify_fatal=1 --verify_backlog=256 --randrepeat=0 --output-format=terse >/tmp/fio.out; \
  echo fio-status=$? >/tmp/fio.st; } & sleep 2; echo VBACK-HOST:migrate; wait; \
  cut -d";" -f5,6 /tmp/fio.out; cat /tmp/fio.st'
"#;
    let run = vback_tests::Guest::new()
        .mem("256M")
        .timeout(Duration::from_secs(120))
        .vhost_blk(&sa, "")
        .migrate_to(vback_tests::Guest::new().vhost_blk(&sb, ""))
        .run(script)
        .unwrap_or_else(|e| panic!("{e}\n--- a ---\n{}\n--- b ---\n{}", a.log(), b.log()));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (both, polls) = watcher.join().unwrap();
    assert!(
        run.check("fio").output.contains("fio-status=0"),
        "fio failed across the migration:\n{}\n--- a ---\n{}\n--- b ---\n{}",
        run.summary(),
        a.log(),
        b.log()
    );
    assert!(polls > 10, "the lock states were watched ({polls} polls)");
    assert!(!both, "both blkbacks held the image lock at once");
    assert!(
        a.log().contains("image lock released for the destination"),
        "{}",
        a.log()
    );
    assert!(
        a.log().contains("dirty page logging on"),
        "the source logged dirty pages during the migration: {}",
        a.log()
    );
    assert!(b.log().contains("took the image lock"), "{}", b.log());
    assert!(image_locked(&cb) && !image_locked(&ca));
    eprintln!(
        "migrated in a run of {:?}: {}\n--- a ---\n{}\n--- b ---\n{}",
        run.wall,
        run.check("fio").output,
        a.log(),
        b.log()
    );
    for p in [&mut a, &mut b] {
        assert_eq!(
            p.terminate(Duration::from_secs(5)).and_then(|s| s.code()),
            Some(0)
        );
    }
}

/// netback's `stats`: (frames the guest sent, bytes netback delivered to the guest).
fn net_stats(ctl: &Path) -> (u64, u64) {
    let s = ControlClient::connect(ctl)
        .unwrap()
        .call("stats", Value::Null)
        .unwrap();
    let dev = &s["device"];
    (
        dev["tx"]["bytes"].as_u64().unwrap_or(0),
        dev["rx"]["bytes"].as_u64().unwrap_or(0),
    )
}

#[test]
fn a_guest_with_a_netback_nic_migrates_and_its_nic_runs_on_the_destination_netback() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (sa, sb) = (d.join("na.sock"), d.join("nb.sock"));
    let (ca, cb) = (d.join("na.ctl"), d.join("nb.ctl"));
    let args = |ctl: &Path| {
        [
            "--host".to_owned(),
            "null".to_owned(),
            "--vif".to_owned(),
            "mac=00:16:3e:00:00:01".to_owned(),
            "--control".to_owned(),
            ctl.to_str().unwrap().to_owned(),
        ]
    };
    let (aa, ab) = (args(&ca), args(&cb));
    let (ra, rb): (Vec<&str>, Vec<&str>) = (
        aa.iter().map(String::as_str).collect(),
        ab.iter().map(String::as_str).collect(),
    );
    let mut a = vback_tests::process::netback(&sa, &ra, &d.join("na.log")).unwrap();
    let mut b = vback_tests::process::netback(&sb, &rb, &d.join("nb.log")).unwrap();
    // The guest transmits UDP and receives netback's frames (one every 100 ms) across the
    // migration; it counts what it received before and after.
    let script = r#"
check net 'ip link set eth0 up && ip addr add 10.99.0.2/24 dev eth0 && arp -s 10.99.0.1 02:00:00:00:00:01 && sleep 1 && \
  fio --name=udp --ioengine=net --protocol=udp --hostname=10.99.0.1 --port=5000 --rw=write --bs=1400 --size=4G \
  --time_based --runtime=8 >/tmp/fio.out 2>&1 & sleep 2; \
  echo rx-before=$(cat /sys/class/net/eth0/statistics/rx_packets); echo VBACK-HOST:migrate; wait; sleep 1; \
  echo rx-after=$(cat /sys/class/net/eth0/statistics/rx_packets); grep -o "WRITE: bw=[^,]*" /tmp/fio.out'
"#;
    let run = vback_tests::Guest::new()
        .mem("256M")
        .timeout(Duration::from_secs(120))
        .vhost_net(&sa, "mac=00:16:3e:00:00:01")
        .migrate_to(vback_tests::Guest::new().vhost_net(&sb, "mac=00:16:3e:00:00:01"))
        .run(script)
        .unwrap_or_else(|e| panic!("{e}\n--- a ---\n{}\n--- b ---\n{}", a.log(), b.log()));
    let out = run.check("net").output.clone();
    eprintln!("{out}\n--- a ---\n{}\n--- b ---\n{}", a.log(), b.log());
    run.assert_checks(&["net"]);
    let count = |key: &str| -> u64 {
        out.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{key} in {out}"))
    };
    let (before, after) = (count("rx-before="), count("rx-after="));
    assert!(
        after > before,
        "the guest received frames after the migration ({before} -> {after})"
    );
    assert!(
        a.log().contains("dirty page logging on"),
        "the source netback logged dirty pages: {}",
        a.log()
    );
    let (tx_b, rx_b) = net_stats(&cb);
    assert!(
        tx_b > 0 && rx_b > 0,
        "the destination netback carries the guest's traffic after the migration: tx {tx_b} rx {rx_b}"
    );
    for p in [&mut a, &mut b] {
        assert_eq!(
            p.terminate(Duration::from_secs(5)).and_then(|s| s.code()),
            Some(0)
        );
    }
}
