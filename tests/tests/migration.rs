//! Live migration of a blkback disk (#15 item 4), with this crate's front end playing QEMU:
//! the source's blkback logs what it writes into guest memory once the front end logs dirty
//! pages, and hands the image to a destination blkback started with `--incoming` on the same
//! image; at no point do both hold the image's write lock, and a destination that starts
//! while the source still runs the device is refused. Then real QEMUs: a guest running fio
//! migrates with a raw disk, and with a qcow2 disk and a tap NIC under a ping flood.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use vback_common::control::ControlClient;
use vback_tests::frontend::{BlkDriver, DESC_WRITE, SharedMemory, blk_layout};
use vback_tests::process::{Daemon, blkback};

/// The guest tests migrate one at a time: a migration's downtime (and so the ping flood's loss)
/// grows with the CPU the other QEMUs take from it on a 2-core machine.
static QEMUS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_migration_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    QEMUS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

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
    let _alone = one_migration_at_a_time();
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

/// netback's `stats`: (frames the guest sent, frames netback delivered to the guest).
fn net_packets(ctl: &Path) -> (u64, u64) {
    let s = ControlClient::connect(ctl)
        .unwrap()
        .call("stats", Value::Null)
        .unwrap();
    let dev = &s["device"];
    (
        dev["tx"]["packets"].as_u64().unwrap_or(0),
        dev["rx"]["packets"].as_u64().unwrap_or(0),
    )
}

/// busybox ping's summary: (transmitted, received).
fn ping_summary(out: &str) -> (u64, u64) {
    let line = out
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no ping summary in:\n{out}"));
    let n: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    (n[0], n[1])
}

/// #15's migration case end to end: a guest on QEMU A with a qcow2 disk on blkback, a NIC on
/// netback (tap on a bridge in a "dom0" namespace) and a CD drive on cdrom runs fio
/// `--verify=crc32c`, a ping flood to a LAN host and md5 reads of the disc while it migrates
/// to QEMU B, whose devices are a second blkback (`--incoming`, the same image), a second
/// netback (its own tap on the same bridge, as the destination host's vif) and a second
/// cdrom on the same disc. fio: 0 errors; ping: under 1% lost, and the LAN host is reached
/// through the destination's vif afterwards; every md5 right (what cdrom read into guest
/// memory during the migration was logged); the image lock never held twice; the qcow2 image
/// `qemu-img check` clean (no leaks) once both blkbacks have exited.
#[test]
fn a_guest_with_a_qcow2_disk_and_a_tap_nic_migrates_under_fio_and_a_ping_flood() {
    let _alone = one_migration_at_a_time();
    use vback_tests::netns::Netns;
    use vback_tests::qemu_tools::{path_str, qcow2_create, qemu_img};

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = d.join("disk.qcow2");
    qcow2_create(&image, None, "64M");
    let disk = format!("tap:qcow2:{}", image.display());
    let (sa, sb, ca, cb) = (
        d.join("a.sock"),
        d.join("b.sock"),
        d.join("a.ctl"),
        d.join("b.ctl"),
    );
    let start = |sock: &Path, ctl: &Path, extra: &[&str], log: &str| {
        let mut args = vec!["--disk", &disk, "--control", ctl.to_str().unwrap()];
        args.extend_from_slice(extra);
        blkback(sock, &args, &d.join(log)).unwrap()
    };
    let mut a = start(&sa, &ca, &[], "a.log");
    let mut b = start(&sb, &cb, &["--incoming"], "b.log");

    let dom0 = Netns::new("dom0").unwrap();
    dom0.sh("ip link add br0 type bridge && ip link set br0 up")
        .unwrap();
    let lan = Netns::new("lan").unwrap();
    dom0.veth("lanport", &lan, "eth0").unwrap();
    dom0.sh("ip link set lanport master br0 && ip link set lanport up")
        .unwrap();
    lan.sh("ip addr add 10.231.9.20/24 dev eth0 && ip link set eth0 up")
        .unwrap();
    let mac = "00:16:3e:00:09:01";
    let (na, nb, nca, ncb) = (
        d.join("na.sock"),
        d.join("nb.sock"),
        d.join("na.ctl"),
        d.join("nb.ctl"),
    );
    // Xen gives the migrated domain a new id on the destination: its vif is vif2.0.
    let netback = |dom: &str, sock: &Path, ctl: &Path| {
        dom0.netback(
            sock,
            &[
                "--domain",
                dom,
                "--vif",
                &format!("bridge=br0,mac={mac}"),
                "--control",
                ctl.to_str().unwrap(),
            ],
            &d.join(format!("net{dom}.log")),
        )
        .unwrap()
    };
    let mut na_d = netback("1", &na, &nca);
    let mut nb_d = netback("2", &nb, &ncb);

    // A disc of 4 MiB of noise, and a cdrom for each QEMU: the destination's `--incoming`
    // (without it, its power-on unit attention fails the guest's read in progress).
    let src = d.join("iso-src");
    std::fs::create_dir_all(&src).unwrap();
    let mut x = 0x9e37_79b9u32;
    let noise: Vec<u8> = (0..4 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    std::fs::write(src.join("noise.bin"), &noise).unwrap();
    let iso = d.join("disc.iso");
    let st = std::process::Command::new("genisoimage")
        .args(["-quiet", "-V", "MIGRATE", "-r", "-o"])
        .arg(&iso)
        .arg(&src)
        .status()
        .expect("genisoimage (scripts/setup.sh)");
    assert!(st.success());
    let md5 = std::process::Command::new("md5sum")
        .arg(&iso)
        .output()
        .unwrap();
    let md5 = String::from_utf8_lossy(&md5.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    let cd = format!("tap:cdrom:{}", iso.display());
    let (cda, cdb) = (d.join("cda.sock"), d.join("cdb.sock"));
    let (cdca, cdcb) = (d.join("cda.ctl"), d.join("cdb.ctl"));
    let cdrom = |sock: &Path, ctl: &Path, extra: &[&str], log: &str| {
        let mut args = vec!["--disk", &cd, "--control", ctl.to_str().unwrap()];
        args.extend_from_slice(extra);
        vback_tests::process::vback_daemon("cdrom", sock, &args, &d.join(log)).unwrap()
    };
    let mut cda_d = cdrom(&cda, &cdca, &[], "cda.log");
    let mut cdb_d = cdrom(&cdb, &cdcb, &["--incoming"], "cdb.log");

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = watch_locks(ca.clone(), cb.clone(), stop.clone());
    // fio and a ping flood (busybox: the next echo as soon as the reply came, at least every
    // 10 ms) run across the migration, which the guest asks for 3 s into them.
    let script = r#"
check up 'ip link set eth0 up && ip addr add 10.231.9.11/24 dev eth0 && \
  for i in $(seq 30); do ping -c 1 -W 1 10.231.9.20 >/dev/null 2>&1 && break; done; ping -c 1 -W 2 10.231.9.20 >/dev/null && echo up'
check mig 'wait_dev /dev/vda && { fio --name=v --filename=/dev/vda --direct=1 --ioengine=libaio \
  --iodepth=16 --rw=randwrite --bs=4k --size=32M --time_based --runtime=14 --verify=crc32c \
  --verify_fatal=1 --verify_backlog=256 --randrepeat=0 --output-format=terse >/tmp/fio.out; \
  echo fio-status=$? >/tmp/fio.st; } & ping -q -A -i 0.01 -w 14 10.231.9.20 >/tmp/ping.out 2>&1 & \
  { wait_dev /dev/sr0; end=$(( $(date +%s) + 14 )); while [ $(date +%s) -lt $end ]; do \
    echo md5=$(dd if=/dev/sr0 bs=64k iflag=direct 2>>/tmp/dd.err | md5sum | cut -d" " -f1); done >/tmp/cd.out; } & \
  sleep 3; echo VBACK-HOST:migrate; wait; cut -d";" -f5,6 /tmp/fio.out; cat /tmp/fio.st; cat /tmp/ping.out; cat /tmp/cd.out; \
  grep -i error /tmp/dd.err; dmesg | grep -i -E "sr0|scsi" | tail -5'
check after 'ping -c 3 -W 2 10.231.9.20 | tail -2; echo VBACK-HOST:fdb; sleep 2'
"#;
    // The bridge's forwarding table while the guest runs on B (a vif whose front end went
    // away loses its carrier, and the bridge its entries).
    let fdb = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let (fdb_w, ns) = (fdb.clone(), dom0.name().to_owned());
    let run = vback_tests::Guest::new()
        .mem("256M")
        .timeout(Duration::from_secs(150))
        .on_host("fdb", move || {
            let o = std::process::Command::new("ip")
                .args(["netns", "exec", &ns, "bridge", "fdb", "show", "br", "br0"])
                .output()
                .unwrap();
            *fdb_w.lock().unwrap() = String::from_utf8_lossy(&o.stdout).into_owned();
        })
        .vhost_blk(&sa, "")
        .vhost_net(&na, &format!("mac={mac}"))
        .vhost_scsi(&cda, "")
        .migrate_to(
            vback_tests::Guest::new()
                .vhost_blk(&sb, "")
                .vhost_net(&nb, &format!("mac={mac}"))
                .vhost_scsi(&cdb, ""),
        )
        .run(script)
        .unwrap_or_else(|e| panic!("{e}\n--- a ---\n{}\n--- b ---\n{}", a.log(), b.log()));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (both, polls) = watcher.join().unwrap();
    let logs = || {
        format!(
            "--- blkback a ---\n{}\n--- blkback b ---\n{}\n--- netback a ---\n{}\n--- netback b ---\n{}\n--- cdrom a ---\n{}\n--- cdrom b ---\n{}",
            a.log(),
            b.log(),
            na_d.log(),
            nb_d.log(),
            cda_d.log(),
            cdb_d.log()
        )
    };
    eprintln!("{}\n{}", run.summary(), logs());
    run.assert_checks(&["up", "mig", "after"]);
    let out = run.check("mig").output.clone();
    assert!(
        out.contains("fio-status=0"),
        "fio failed across the migration:\n{out}\n{}",
        logs()
    );
    let sums: Vec<&str> = out.lines().filter_map(|l| l.strip_prefix("md5=")).collect();
    assert!(
        sums.len() >= 3,
        "the disc was read across the migration: {out}"
    );
    assert!(
        sums.iter().all(|s| *s == md5),
        "every read of the disc has its md5 {md5}: {sums:?}\n{out}"
    );
    let (sent, got) = ping_summary(&out);
    let lost = sent - got.min(sent);
    eprintln!("ping flood across the migration: {sent} sent, {got} received, {lost} lost");
    assert!(sent > 500, "the flood ran ({sent} echoes)");
    assert!(
        lost * 100 < sent,
        "the ping flood lost {lost} of {sent} (1% allowed)"
    );
    // The destination's vif carries the guest now: the bridge learnt the guest there, and its
    // netback moved the flood's second half both ways.
    let fdb = fdb.lock().unwrap().clone();
    assert!(
        fdb.lines()
            .any(|l| l.starts_with(mac) && l.contains("dev vif2.0")),
        "the bridge knows the guest behind the destination's vif:\n{fdb}"
    );
    let (tx_b, rx_b) = net_packets(&ncb);
    assert!(
        tx_b > 100 && rx_b > 100,
        "the destination netback carries the guest's traffic: tx {tx_b} rx {rx_b}"
    );
    assert!(polls > 10, "the lock states were watched ({polls} polls)");
    assert!(!both, "both blkbacks held the image lock at once");
    for (who, log) in [
        ("blkback", a.log()),
        ("netback", na_d.log()),
        ("cdrom", cda_d.log()),
    ] {
        assert!(
            log.contains("dirty page logging on"),
            "the source {who} logged dirty pages: {log}"
        );
        assert!(
            !log.contains("beyond the"),
            "the source {who} logged only addresses inside guest memory: {log}"
        );
    }
    let medium_locked = |ctl: &Path| {
        ControlClient::connect(ctl)
            .unwrap()
            .call("status", Value::Null)
            .unwrap()["device"]["medium_locked"]
            .as_bool()
    };
    assert_eq!(
        (medium_locked(&cdca), medium_locked(&cdcb)),
        (Some(false), Some(true)),
        "the disc's lock moved to the destination's cdrom"
    );
    assert!(
        b.log().contains("read its metadata anew"),
        "the destination read the qcow2 metadata at the handoff: {}",
        b.log()
    );
    for p in [&mut a, &mut b, &mut na_d, &mut nb_d, &mut cda_d, &mut cdb_d] {
        assert_eq!(
            p.terminate(Duration::from_secs(10)).and_then(|s| s.code()),
            Some(0)
        );
    }
    // Clean: no corruption and no leaked cluster (the source gave back what it had reserved
    // when it handed the image over).
    let check = qemu_img(&["check", "-f", "qcow2", "--output=json", path_str(&image)]);
    let v: Value = serde_json::from_str(&check).unwrap();
    assert_eq!(v["corruptions"].as_u64().unwrap_or(0), 0, "{check}");
    assert_eq!(v["leaks"].as_u64().unwrap_or(0), 0, "{check}");
    assert!(
        v["allocated-clusters"].as_u64().unwrap_or(0) > 0,
        "fio's writes allocated clusters: {check}"
    );
}
