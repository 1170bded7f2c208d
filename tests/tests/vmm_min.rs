//! vmm-min end to end, under this machine's KVM (PVM: guest kernel code is emulated, so the
//! guests are small).
//!
//! The test guest (`tests/vmm-guest/guest.c`, built here with gcc) finds the virtio-mmio
//! devices, drives a queue of each by polling and prints `RESULT <check> ok|FAIL` lines on the
//! serial port; it runs against the real blkback, netback (null host side) and cdrom daemons, so
//! the data path is guest → vhost-user → backend → io_uring. The Linux boot-path check starts
//! Debian's vmlinux with the harness's initramfs and looks for the early boot log.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::Value;
use vback_common::control::ControlClient;
use vback_tests::harness::GuestImage;
use vback_tests::process::{Daemon, blkback, netback, vback_daemon, which, workspace_bin};

/// Builds the test guest once per test process.
fn test_guest() -> PathBuf {
    static GUEST: OnceLock<PathBuf> = OnceLock::new();
    GUEST
        .get_or_init(|| {
            let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("vmm-guest/guest.c");
            let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("vmm-test-guest.elf");
            let gcc = which("gcc")
                .expect("gcc is needed to build the vmm-min test guest (apt-get install gcc)");
            let st = Command::new(gcc)
                .args([
                    "-O2",
                    "-ffreestanding",
                    "-nostdlib",
                    "-static",
                    "-fno-pic",
                    "-no-pie",
                    "-mno-red-zone",
                    "-mgeneral-regs-only",
                    "-fno-stack-protector",
                    "-fno-asynchronous-unwind-tables",
                    "-Wall",
                    "-Werror",
                    "-Wl,-Ttext=0x200000",
                    "-Wl,--build-id=none",
                    "-o",
                ])
                .arg(&out)
                .arg(&src)
                .status()
                .expect("gcc runs");
            assert!(st.success(), "building {} failed", src.display());
            out
        })
        .clone()
}

/// A running vmm-min with its serial output in a file and its log in another.
struct Vmm {
    child: Child,
    serial: PathBuf,
    log: PathBuf,
}

impl Vmm {
    fn start(dir: &Path, kernel: &Path, args: &[&str]) -> Vmm {
        let serial = dir.join("serial.txt");
        let log = dir.join("vmm.log");
        let child = Command::new(workspace_bin("vmm-min").unwrap())
            .arg("--kernel")
            .arg(kernel)
            .arg("--serial")
            .arg(format!("file:{}", serial.display()))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("vmm-min starts");
        Vmm { child, serial, log }
    }

    fn serial(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn context(&self) -> String {
        format!(
            "--- serial ---\n{}\n--- vmm-min ---\n{}",
            self.serial(),
            self.log()
        )
    }

    /// Waits until `f(serial, log)` holds.
    fn wait_for(&mut self, what: &str, timeout: Duration, f: impl Fn(&str, &str) -> bool) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if f(&self.serial(), &self.log()) {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                if f(&self.serial(), &self.log()) {
                    return;
                }
                panic!("vmm-min exited ({st}) before {what}\n{}", self.context());
            }
            sleep(Duration::from_millis(50));
        }
        panic!("no {what} within {timeout:?}\n{}", self.context());
    }

    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            sleep(Duration::from_millis(50));
        }
        panic!(
            "vmm-min still running after {timeout:?}\n{}",
            self.context()
        );
    }

    fn send(&mut self, bytes: &[u8]) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(bytes).unwrap();
        stdin.flush().unwrap();
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the test guest to completion and returns its serial output.
fn run_guest(dir: &Path, devices: &[&str]) -> (String, String) {
    let mut vmm = Vmm::start(
        dir,
        &test_guest(),
        &[&["--mem", "64M"][..], devices].concat(),
    );
    let st = vmm.wait_exit(Duration::from_secs(120));
    let (serial, log) = (vmm.serial(), vmm.log());
    assert!(st.success(), "vmm-min failed ({st})\n{}", vmm.context());
    assert!(
        log.contains("guest reset the machine"),
        "exit reason missing\n{}",
        vmm.context()
    );
    assert!(
        serial.contains("DONE"),
        "the guest did not finish\n{}",
        vmm.context()
    );
    (serial, log)
}

fn assert_results(serial: &str, names: &[&str]) {
    for n in names {
        assert!(
            serial.lines().any(|l| l == format!("RESULT {n} ok")),
            "check {n} did not pass:\n{serial}"
        );
    }
    assert!(!serial.contains(" FAIL"), "a check failed:\n{serial}");
}

/// The pattern the guest writes to a sector in `round`.
fn pattern(round: u8) -> Vec<u8> {
    let mut v = vec![0u8; 512];
    v[..31].copy_from_slice(b"VMM-MIN-GUEST-WROTE-THIS round ");
    v[31] = b'0' + round;
    for (i, b) in v.iter_mut().enumerate().skip(32) {
        *b = (i as u32 * 7 + u32::from(round)) as u8;
    }
    v
}

fn sector(image: &Path, n: usize) -> Vec<u8> {
    std::fs::read(image).unwrap()[n * 512..(n + 1) * 512].to_vec()
}

#[test]
fn test_guest_drives_blkback() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = d.join("disk.img");
    std::fs::write(&image, vec![0u8; 8 << 20]).unwrap();
    let sock = d.join("blk.sock");
    let disk = format!("file:{}", image.display());
    let _blk = blkback(
        &sock,
        &["--disk", &disk, "--serial", "vmm-min-disk"],
        &d.join("blk.log"),
    )
    .unwrap();
    let (serial, log) = run_guest(d, &["--blk", sock.to_str().unwrap()]);
    assert_results(
        &serial,
        &[
            "blk-config",
            "blk-get-id",
            "blk-write",
            "blk-read",
            "blk-flush",
        ],
    );
    assert!(serial.contains("BLK capacity 16384"), "{serial}");
    assert!(serial.contains("BLK id 'vmm-min-disk'"), "{serial}");
    assert!(log.contains("blk device at 0xd0000000 started"), "{log}");
    // The data went through blkback into the image.
    assert_eq!(sector(&image, 8), pattern(1));
}

#[test]
fn test_guest_drives_netback_null() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (sock, ctl) = (d.join("net.sock"), d.join("net.ctl"));
    let _net = netback(
        &sock,
        &["--host", "null", "--control", ctl.to_str().unwrap()],
        &d.join("net.log"),
    )
    .unwrap();
    let tx = || -> Value {
        ControlClient::connect(&ctl)
            .unwrap()
            .call("stats", Value::Null)
            .unwrap()["device"]["tx"]
            .clone()
    };
    let before = tx();
    let (serial, _) = run_guest(
        d,
        &[
            "--net",
            &format!("{},mac=02:00:00:00:00:07", sock.display()),
        ],
    );
    assert_results(&serial, &["net-tx", "net-rx"]);
    assert!(
        serial.contains("NET mac 0x2:0x0:0x0:0x0:0x0:0x7"),
        "{serial}"
    );
    let after = tx();
    assert_eq!(
        after["packets"].as_u64().unwrap() - before["packets"].as_u64().unwrap(),
        1,
        "{before} -> {after}"
    );
    assert_eq!(
        after["bytes"].as_u64().unwrap() - before["bytes"].as_u64().unwrap(),
        64,
        "{before} -> {after}"
    );
}

/// An ISO image with one 300 kB file.
fn make_iso(d: &Path) -> PathBuf {
    let src = d.join("iso-src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("hello.txt"), vec![b'x'; 300_000]).unwrap();
    let iso = d.join("disc.iso");
    let tool = which("genisoimage").expect("genisoimage is installed (scripts/setup.sh)");
    let st = Command::new(tool)
        .args(["-quiet", "-V", "VMMTEST", "-J", "-r", "-o"])
        .arg(&iso)
        .arg(&src)
        .status()
        .unwrap();
    assert!(st.success());
    iso
}

#[test]
fn test_guest_drives_cdrom() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let iso = make_iso(d);
    let sock = d.join("cd.sock");
    let disk = format!("tap:cdrom:{}", iso.display());
    let _cd = vback_daemon("cdrom", &sock, &["--disk", &disk], &d.join("cd.log")).unwrap();
    let (serial, _) = run_guest(d, &["--no-acpi", "--scsi", sock.to_str().unwrap()]);
    assert!(
        serial.contains("ACPI none"),
        "--no-acpi wrote tables:\n{serial}"
    );
    assert_results(&serial, &["scsi-inquiry", "scsi-read-capacity"]);
    assert!(serial.contains("SCSI inquiry type 5"), "{serial}");
    let blocks = std::fs::metadata(&iso).unwrap().len() / 2048;
    assert!(
        serial.contains(&format!("SCSI capacity last_lba {} block 2048", blocks - 1)),
        "expected {} blocks:\n{serial}",
        blocks
    );
}

#[test]
fn all_three_backends_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = d.join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let (bs, ns, cs) = (d.join("blk.sock"), d.join("net.sock"), d.join("cd.sock"));
    let disk = format!("file:{}", image.display());
    let _b = blkback(&bs, &["--disk", &disk], &d.join("blk.log")).unwrap();
    let _n = netback(&ns, &["--host", "null"], &d.join("net.log")).unwrap();
    let cd = format!("tap:cdrom:{}", make_iso(d).display());
    let _c = vback_daemon("cdrom", &cs, &["--disk", &cd], &d.join("cd.log")).unwrap();
    let (serial, log) = run_guest(
        d,
        &[
            "--cpus",
            "2",
            "--blk",
            bs.to_str().unwrap(),
            "--net",
            ns.to_str().unwrap(),
            "--scsi",
            cs.to_str().unwrap(),
        ],
    );
    assert!(serial.contains("DEVICES 3"), "{serial}");
    // The ACPI tables as the guest finds them: both vCPUs, the three devices, valid checksums.
    assert!(serial.contains("ACPI cpus 2 devices 3"), "{serial}");
    assert_results(&serial, &["acpi-tables", "ap-start"]);
    assert_results(
        &serial,
        &[
            "blk-write",
            "blk-read",
            "net-tx",
            "net-rx",
            "scsi-inquiry",
            "scsi-read-capacity",
        ],
    );
    // Slots and interrupt lines follow the order blk, net, scsi.
    assert!(log.contains("virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 virtio_mmio.device=4K@0xd0002000:7"), "{log}");
    assert!(serial.contains("DEVICE 2 id 8"), "{serial}");
}

#[test]
fn killed_backends_are_reported_and_new_requests_run_after_they_restart() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = d.join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let iso = make_iso(d);
    let (bs, ns, cs) = (d.join("blk.sock"), d.join("net.sock"), d.join("cd.sock"));
    let nctl = d.join("net.ctl");
    let api = d.join("vmm.api");
    let disk = format!("file:{}", image.display());
    let cd = format!("tap:cdrom:{}", iso.display());
    let start = |round: u32| -> Vec<Daemon> {
        vec![
            blkback(&bs, &["--disk", &disk], &d.join(format!("blk{round}.log"))).unwrap(),
            netback(
                &ns,
                &["--host", "null", "--control", nctl.to_str().unwrap()],
                &d.join(format!("net{round}.log")),
            )
            .unwrap(),
            vback_daemon(
                "cdrom",
                &cs,
                &["--disk", &cd],
                &d.join(format!("cd{round}.log")),
            )
            .unwrap(),
        ]
    };
    let mut first = start(1);
    let mut vmm = Vmm::start(
        d,
        &test_guest(),
        &[
            "--mem",
            "64M",
            "--cmdline",
            "vmmtest.wait",
            "--blk",
            bs.to_str().unwrap(),
            "--net",
            ns.to_str().unwrap(),
            "--scsi",
            cs.to_str().unwrap(),
            "--api",
            api.to_str().unwrap(),
        ],
    );
    vmm.wait_for(
        "the guest waiting for input",
        Duration::from_secs(60),
        |s, _| s.contains("WAITING"),
    );
    assert_results(
        &vmm.serial(),
        &["blk-write", "blk-read", "net-tx", "net-rx", "scsi-inquiry"],
    );
    let status = |api: &Path| {
        ControlClient::connect(api)
            .unwrap()
            .call("status", Value::Null)
            .unwrap()
    };
    let connected = |s: &Value| -> Vec<bool> {
        (0..3)
            .map(|i| s["device"]["devices"][i]["connected"].as_bool().unwrap())
            .collect()
    };
    let s = status(&api);
    assert_eq!(connected(&s), [true, true, true], "{s}");
    for i in 0..3 {
        assert_eq!(s["device"]["devices"][i]["driver_status"], 15, "{s}");
    }

    for daemon in &mut first {
        daemon.kill();
    }
    vmm.wait_for(
        "three disconnect reports",
        Duration::from_secs(20),
        |_, l| l.matches("disconnected; the device waits").count() == 3,
    );
    let s = status(&api);
    assert_eq!(connected(&s), [false, false, false], "{s}");
    assert!(
        vmm.child.try_wait().unwrap().is_none(),
        "vmm-min stopped\n{}",
        vmm.context()
    );

    let _second = start(2);
    vmm.wait_for("three reconnections", Duration::from_secs(20), |_, l| {
        l.matches("reconnected").count() == 3
    });
    let s = status(&api);
    assert_eq!(connected(&s), [true, true, true], "{s}");
    for i in 0..3 {
        assert_eq!(s["device"]["devices"][i]["reconnects"], 1, "{s}");
    }

    vmm.send(b"\n");
    let st = vmm.wait_exit(Duration::from_secs(60));
    assert!(st.success(), "{}", vmm.context());
    assert_results(
        &vmm.serial(),
        &[
            "blk-after-reconnect",
            "net-tx-after-reconnect",
            "net-rx-after-reconnect",
            "scsi-after-reconnect",
        ],
    );
    assert_eq!(sector(&image, 8), pattern(1));
    assert_eq!(sector(&image, 16), pattern(2));
    // The new netback counted the frame sent after the reconnection.
    let tx = ControlClient::connect(&nctl)
        .unwrap()
        .call("stats", Value::Null)
        .unwrap();
    assert_eq!(tx["device"]["tx"]["packets"], 1, "{tx}");
}

#[test]
fn a_misbehaving_driver_gets_needs_reset_and_the_device_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = d.join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let sock = d.join("blk.sock");
    let disk = format!("file:{}", image.display());
    let mut blk = blkback(&sock, &["--disk", &disk], &d.join("blk.log")).unwrap();
    let mut vmm = Vmm::start(
        d,
        &test_guest(),
        &[
            "--mem",
            "64M",
            "--cmdline",
            "vmmtest.hostile",
            "--blk",
            sock.to_str().unwrap(),
        ],
    );
    let st = vmm.wait_exit(Duration::from_secs(60));
    assert!(st.success(), "{}", vmm.context());
    let s = vmm.serial();
    // After the refused start, a reset and a proper setup work.
    assert_results(
        &s,
        &["blk-hostile-refused", "blk-write", "blk-read", "blk-flush"],
    );
    assert!(
        vmm.log().contains("outside guest memory"),
        "{}",
        vmm.context()
    );
    assert!(blk.is_running(), "blkback died:\n{}", blk.log());
    assert_eq!(sector(&image, 8), pattern(1));
}

#[test]
fn a_resize_in_blkback_reaches_the_guest_as_a_config_change() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = d.join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let (sock, ctl) = (d.join("blk.sock"), d.join("blk.ctl"));
    let disk = format!("file:{}", image.display());
    let _blk = blkback(
        &sock,
        &["--disk", &disk, "--control", ctl.to_str().unwrap()],
        &d.join("blk.log"),
    )
    .unwrap();
    let mut vmm = Vmm::start(
        d,
        &test_guest(),
        &[
            "--mem",
            "64M",
            "--cmdline",
            "vmmtest.resize",
            "--blk",
            sock.to_str().unwrap(),
        ],
    );
    vmm.wait_for(
        "the guest waiting for a resize",
        Duration::from_secs(60),
        |s, _| s.contains("WAITING-RESIZE"),
    );
    let r = ControlClient::connect(&ctl)
        .unwrap()
        .call("resize", serde_json::json!({"size": "2M"}))
        .unwrap();
    assert_eq!(r["guest_notified"], true, "{r}");
    let st = vmm.wait_exit(Duration::from_secs(60));
    assert!(st.success(), "{}", vmm.context());
    let s = vmm.serial();
    assert_results(&s, &["blk-config-change"]);
    assert!(s.contains("BLK resized capacity 4096"), "{s}");
}

#[test]
fn api_shutdown_stops_the_vm() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = d.join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let sock = d.join("blk.sock");
    let api = d.join("vmm.api");
    let disk = format!("file:{}", image.display());
    let _blk = blkback(&sock, &["--disk", &disk], &d.join("blk.log")).unwrap();
    let mut vmm = Vmm::start(
        d,
        &test_guest(),
        &[
            "--cmdline",
            "vmmtest.wait",
            "--blk",
            sock.to_str().unwrap(),
            "--api",
            api.to_str().unwrap(),
        ],
    );
    vmm.wait_for(
        "the guest waiting for input",
        Duration::from_secs(60),
        |s, _| s.contains("WAITING"),
    );
    let mut c = ControlClient::connect(&api).unwrap();
    let s = c.call("status", Value::Null).unwrap();
    assert_eq!(s["daemon"]["name"], "vmm-min", "{s}");
    assert_eq!(s["device"]["devices"][0]["kind"], "blk", "{s}");
    assert!(
        s["device"]["devices"][0]["mmio_exits"].as_u64().unwrap() > 10,
        "{s}"
    );
    let st = c.call("stats", Value::Null).unwrap();
    assert!(st["device"]["vcpu_exits"].as_u64().unwrap() > 10, "{st}");
    assert_eq!(st["device"]["devices"][0]["reconnects"], 0, "{st}");
    let r = c.call("shutdown", Value::Null).unwrap();
    assert_eq!(r["stopping"], true);
    let st = vmm.wait_exit(Duration::from_secs(20));
    assert!(st.success(), "{}", vmm.context());
    assert!(
        vmm.log().contains("shutdown requested on the API socket"),
        "{}",
        vmm.context()
    );
}

#[test]
fn a_halt_with_interrupts_off_stops_vmm_min_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let mut vmm = Vmm::start(
        dir.path(),
        &test_guest(),
        &["--mem", "16M", "--cmdline", "vmmtest.halt"],
    );
    let st = vmm.wait_exit(Duration::from_secs(30));
    assert_eq!(st.code(), Some(1), "{}", vmm.context());
    assert!(vmm.serial().contains("HALTING"), "{}", vmm.context());
    assert!(
        vmm.log().contains("the guest halted with interrupts off"),
        "{}",
        vmm.context()
    );
}

/// Debian's kernel through the 64-bit boot protocol with two vCPUs: on this machine's PVM the
/// kernel runs in emulation and dies later, so the check is the early boot log: the banner, our
/// command line and e820 map, the initrd found, vmm-min's ACPI tables accepted (checksums, the
/// MADT's IOAPIC and both CPUs).
#[test]
fn linux_boot_path_prints_the_early_boot_log() {
    let image = GuestImage::get().unwrap();
    assert!(
        image.kernel.ends_with("vmlinux"),
        "the harness found no uncompressed vmlinux: {}",
        image.kernel.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let disk = d.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let sock = d.join("blk.sock");
    let _blk: Daemon = blkback(
        &sock,
        &["--disk", &format!("file:{}", disk.display())],
        &d.join("blk.log"),
    )
    .unwrap();
    let mut vmm = Vmm::start(
        d,
        &image.kernel,
        &[
            "--initrd",
            image.initramfs.to_str().unwrap(),
            "--mem",
            "512M",
            "--cpus",
            "2",
            "--cmdline",
            "console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1",
            "--blk",
            sock.to_str().unwrap(),
        ],
    );
    // About a minute on a quiet machine; several when other builds compete for the 2 cores.
    vmm.wait_for("the early boot log", Duration::from_secs(300), |s, _| {
        s.contains("Linux version") && s.contains("smpboot: Allowing 2 CPUs")
    });
    let s = vmm.serial();
    for want in [
        "Command line: console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1 virtio_mmio.device=4K@0xd0000000:5",
        "BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable",
        "RAMDISK: [mem ",
        "Hypervisor detected: KVM",
        "ACPI: RSDP 0x00000000000E0000",
        "ACPI: FACP 0x",
        "ACPI: DSDT 0x",
        "ACPI: APIC 0x",
        "IOAPIC[0]: apic_id 0, version 17, address 0xfec00000, GSI 0-23",
        "ACPI: Using ACPI (MADT) for SMP configuration information",
    ] {
        assert!(s.contains(want), "`{want}` missing:\n{s}");
    }
}

/// A write stuck in a blkback (its image's filesystem frozen) while a later read completed;
/// blkback SIGKILLed, the filesystem thawed, a new blkback started (with `--no-inflight` on
/// both unless `inflight`). Returns the guest's serial output, the second daemon's log and the
/// sector the write was for.
fn kill_blkback_with_a_write_in_flight(inflight: bool) -> (String, String, Vec<u8>) {
    use vback_tests::loopfs::LoopFs;
    let fs = LoopFs::mount();
    let d = fs.dir();
    let image = fs.mnt().join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let bs = d.join("blk.sock");
    let disk = format!("file:{}", image.display());
    let mut args = vec!["--disk", disk.as_str()];
    if !inflight {
        args.push("--no-inflight");
    }
    let mut first = blkback(&bs, &args, &d.join("blk1.log")).unwrap();
    let mut vmm = Vmm::start(
        d,
        &test_guest(),
        &[
            "--mem",
            "64M",
            "--cmdline",
            "vmmtest.inflight",
            "--blk",
            bs.to_str().unwrap(),
        ],
    );
    vmm.wait_for(
        "the guest's first round",
        Duration::from_secs(60),
        |s, _| s.contains("WAITING-FREEZE"),
    );
    fs.freeze(true);
    vmm.send(b"\n");
    vmm.wait_for(
        "the read behind the stuck write",
        Duration::from_secs(60),
        |s, _| s.contains("WAITING-RESTART"),
    );
    assert_results(&vmm.serial(), &["blk-write", "blk-inflight-read-first"]);

    let pid = first.pid().unwrap() as libc::pid_t;
    // SAFETY: kill(2) on our own child's pid with a valid signal; no memory involved.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    // The killed process ends once its blocked write returns.
    fs.freeze(false);
    first.kill();
    vmm.wait_for("the disconnect", Duration::from_secs(20), |_, l| {
        l.contains("disconnected; the device waits")
    });
    let second = blkback(&bs, &args, &d.join("blk2.log")).unwrap();
    vmm.wait_for("the reconnection", Duration::from_secs(20), |_, l| {
        l.contains("reconnected")
    });
    vmm.send(b"\n");
    let st = vmm.wait_exit(Duration::from_secs(60));
    assert!(st.success(), "{}", vmm.context());
    (vmm.serial(), second.log(), sector(&image, 24))
}

/// vmm-min keeps its in-flight region across a blkback crash: the write in flight comes back
/// from the restarted blkback, exactly once, with its data on disk. Without in-flight tracking
/// the same crash loses it (the read behind it is served again instead).
#[test]
fn a_write_in_flight_when_blkback_dies_is_resubmitted_by_the_next_one() {
    let (serial, log, sector24) = kill_blkback_with_a_write_in_flight(true);
    assert_results(
        &serial,
        &["blk-inflight-write-completed", "blk-inflight-data"],
    );
    assert!(
        log.contains("resubmitting 1 requests that were in flight"),
        "{log}"
    );
    assert_eq!(sector24, pattern(3));

    let (serial, _, _) = kill_blkback_with_a_write_in_flight(false);
    assert!(
        serial.contains("INFLIGHT second used 3\n")
            && serial.contains("RESULT blk-inflight-write-completed FAIL"),
        "without tracking the read is served again and the write is lost:\n{serial}"
    );
}
