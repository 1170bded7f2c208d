//! The guest harness: boots a throw-away Linux guest under QEMU with any set of vhost-user
//! devices, runs a shell script inside and returns what it printed and its exit status.
//!
//! The guest is Debian's kernel with a small initramfs (busybox, fio, iperf3, the virtio
//! modules) built once by `tests/guest/build.sh` and cached under `.cache/guest`. For each run
//! the harness appends a second cpio archive holding the script and any files, so nothing is
//! rebuilt. Serial ports carry the console (ttyS0), the script's output (ttyS1) and its exit
//! status (ttyS2).
//!
//! Inside the guest the script runs as root in `/harness` with two helpers:
//! `check NAME 'commands'` runs one named check of a batch (one boot, many checks: a boot costs
//! about 5 s under TCG), and `wait_dev /dev/X [SECONDS]` waits for a device node.
//!
//! Acceleration: KVM only where it can run a stock Linux guest (a hardware `kvm_intel` or
//! `kvm_amd` module); otherwise TCG. This machine's KVM is PVM, which cannot, so guests run
//! under TCG here. `VBACK_ACCEL=kvm|tcg` overrides the choice.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::HarnessError;
use crate::cpio::CpioWriter;
use crate::process::which;

/// How the guest's CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// QEMU's software emulation (multi-threaded).
    Tcg,
}

impl Accel {
    /// KVM if a hardware KVM module is loaded and /dev/kvm is usable, else TCG; `VBACK_ACCEL`
    /// overrides.
    pub fn detect() -> Accel {
        match std::env::var("VBACK_ACCEL").as_deref() {
            Ok("kvm") => return Accel::Kvm,
            Ok("tcg") => return Accel::Tcg,
            _ => {}
        }
        let hw = Path::new("/sys/module/kvm_intel").exists()
            || Path::new("/sys/module/kvm_amd").exists();
        let dev = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        if hw && dev { Accel::Kvm } else { Accel::Tcg }
    }
}

/// The cached kernel and base initramfs.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// Kernel (ELF vmlinux booted through PVH, or bzImage).
    pub kernel: PathBuf,
    /// Base initramfs (newc cpio).
    pub initramfs: PathBuf,
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

impl GuestImage {
    /// Builds the image if needed (once per process) and returns it.
    pub fn get() -> Result<GuestImage, HarnessError> {
        static IMAGE: OnceLock<Result<GuestImage, String>> = OnceLock::new();
        IMAGE
            .get_or_init(|| {
                let script = repo_root().join("tests/guest/build.sh");
                let out = Command::new(&script)
                    .stderr(Stdio::inherit())
                    .output()
                    .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
                if !out.status.success() {
                    return Err(format!(
                        "{} failed ({}); run scripts/setup.sh to install what it needs",
                        script.display(),
                        out.status
                    ));
                }
                let text = String::from_utf8_lossy(&out.stdout);
                let line = text.lines().last().unwrap_or_default();
                let mut parts = line.split_whitespace();
                match (parts.next(), parts.next()) {
                    (Some(k), Some(i)) => Ok(GuestImage {
                        kernel: k.into(),
                        initramfs: i.into(),
                    }),
                    _ => Err(format!(
                        "{} printed no image paths: {text}",
                        script.display()
                    )),
                }
            })
            .clone()
            .map_err(HarnessError::Setup)
    }
}

/// A device attached to the guest.
#[derive(Debug, Clone)]
enum Device {
    VhostBlk {
        socket: PathBuf,
        props: String,
    },
    VhostScsi {
        socket: PathBuf,
        props: String,
    },
    VhostNet {
        socket: PathBuf,
        queues: u16,
        props: String,
    },
    UsbRedir {
        socket: PathBuf,
    },
    QemuDrive {
        file: PathBuf,
        props: String,
    },
    QemuCdrom {
        image: PathBuf,
    },
}

/// A host action the guest can trigger by printing `VBACK-HOST:<name>` on a line of its own.
type HostAction = Box<dyn FnMut() + Send>;

/// A guest to boot: devices, files, resources, and a time limit.
pub struct Guest {
    devices: Vec<Device>,
    files: Vec<(PathBuf, String)>,
    mem: String,
    smp: u32,
    timeout: Duration,
    accel: Accel,
    extra: Vec<String>,
    usb: bool,
    actions: Vec<(String, HostAction)>,
    kernel_args: Vec<String>,
    reconnect_ms: Option<u64>,
    /// The destination of a live migration (its devices), see [`Guest::migrate_to`].
    migration: Option<Box<Guest>>,
}

impl std::fmt::Debug for Guest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guest")
            .field("devices", &self.devices)
            .field("files", &self.files)
            .field("mem", &self.mem)
            .field("smp", &self.smp)
            .field("accel", &self.accel)
            .finish_non_exhaustive()
    }
}

impl Default for Guest {
    fn default() -> Self {
        Self::new()
    }
}

impl Guest {
    /// A guest with 1 GiB of shared memory, 2 vCPUs and a 300 s limit.
    pub fn new() -> Guest {
        Guest {
            devices: Vec::new(),
            files: Vec::new(),
            mem: "1G".into(),
            smp: 2,
            timeout: Duration::from_secs(300),
            accel: Accel::detect(),
            extra: Vec::new(),
            usb: false,
            actions: Vec::new(),
            kernel_args: Vec::new(),
            reconnect_ms: None,
            migration: None,
        }
    }

    /// Live-migrates the guest when it prints the line `VBACK-HOST:migrate`: a second QEMU,
    /// started with the guest (`-incoming unix:...`) and with `dest`'s devices (the same kinds
    /// in the same order, on the destination's back ends), receives it through QMP's
    /// `migrate`; the source QEMU quits once the migration completed and the guest goes on in
    /// the destination. The run's output is the source's then the destination's.
    pub fn migrate_to(mut self, dest: Guest) -> Guest {
        self.migration = Some(Box::new(dest));
        self
    }

    /// Runs `action` on the host when the guest prints the line `VBACK-HOST:<name>` (for
    /// example, resizing a disk while the guest watches its size). Each action runs at most
    /// once, while the guest keeps running.
    pub fn on_host(mut self, name: &str, action: impl FnMut() + Send + 'static) -> Guest {
        self.actions
            .push((format!("VBACK-HOST:{name}"), Box::new(action)));
        self
    }

    /// A vhost-user-blk disk on `socket` (QEMU connects as the client). `props` go to
    /// `vhost-user-blk-pci` (e.g. `num-queues=2,serial=x`); `num-queues=1` is added unless given:
    /// QEMU's default is one queue per vCPU and it refuses a backend that offers fewer.
    pub fn vhost_blk(mut self, socket: impl AsRef<Path>, props: &str) -> Guest {
        self.devices.push(Device::VhostBlk {
            socket: socket.as_ref().to_owned(),
            props: props.to_owned(),
        });
        self
    }

    /// A vhost-user-scsi controller on `socket`; `num_queues=1` is added unless given.
    pub fn vhost_scsi(mut self, socket: impl AsRef<Path>, props: &str) -> Guest {
        self.devices.push(Device::VhostScsi {
            socket: socket.as_ref().to_owned(),
            props: props.to_owned(),
        });
        self
    }

    /// A virtio-net NIC on a vhost-user netdev at `socket`; `props` go to `virtio-net-pci`
    /// (e.g. `mac=00:16:3e:00:00:01,mq=on`).
    pub fn vhost_net(self, socket: impl AsRef<Path>, props: &str) -> Guest {
        self.vhost_net_queues(socket, 1, props)
    }

    /// A multi-queue virtio-net on `-netdev vhost-user,queues=N` (the guest sees `queues` pairs).
    pub fn vhost_net_queues(mut self, socket: impl AsRef<Path>, queues: u16, props: &str) -> Guest {
        self.devices.push(Device::VhostNet {
            socket: socket.as_ref().to_owned(),
            queues,
            props: props.to_owned(),
        });
        self
    }

    /// A usb-redir device on a chardev connected to `socket` (adds a qemu-xhci controller; the
    /// guest needs the generic kernel: `KERNEL_FLAVOR=amd64`).
    pub fn usb_redir(mut self, socket: impl AsRef<Path>) -> Guest {
        self.usb = true;
        self.devices.push(Device::UsbRedir {
            socket: socket.as_ref().to_owned(),
        });
        self
    }

    /// QEMU's own virtio-blk on a raw file (io_uring, O_DIRECT), for side-by-side comparisons.
    pub fn qemu_drive(mut self, file: impl AsRef<Path>, props: &str) -> Guest {
        self.devices.push(Device::QemuDrive {
            file: file.as_ref().to_owned(),
            props: props.to_owned(),
        });
        self
    }

    /// QEMU's own CD drive (virtio-scsi-pci + scsi-cd) on an ISO image: the reference the
    /// cdrom backend's answers are compared with.
    pub fn qemu_cdrom(mut self, image: impl AsRef<Path>) -> Guest {
        self.devices.push(Device::QemuCdrom {
            image: image.as_ref().to_owned(),
        });
        self
    }

    /// An extra kernel command-line argument (e.g. `block.events_dfl_poll_msecs=1000`).
    pub fn kernel_arg(mut self, arg: &str) -> Guest {
        self.kernel_args.push(arg.to_owned());
        self
    }

    /// Copies a host file into the guest at `guest_path` (absolute).
    pub fn file(mut self, host: impl AsRef<Path>, guest_path: &str) -> Guest {
        self.files
            .push((host.as_ref().to_owned(), guest_path.to_owned()));
        self
    }

    /// Guest memory (QEMU syntax: `512M`, `1G`).
    pub fn mem(mut self, mem: &str) -> Guest {
        self.mem = mem.to_owned();
        self
    }

    /// vCPUs.
    pub fn smp(mut self, n: u32) -> Guest {
        self.smp = n;
        self
    }

    /// Wall-clock limit for the whole run.
    pub fn timeout(mut self, t: Duration) -> Guest {
        self.timeout = t;
        self
    }

    /// QEMU reconnects the vhost-user devices' chardevs (`reconnect-ms=`) to a backend that
    /// went away, every `ms` milliseconds: the backend can be killed and restarted under a
    /// running guest.
    pub fn reconnect_ms(mut self, ms: u64) -> Guest {
        self.reconnect_ms = Some(ms);
        self
    }

    /// An extra raw QEMU argument.
    pub fn qemu_arg(mut self, arg: &str) -> Guest {
        self.extra.push(arg.to_owned());
        self
    }

    fn device_args(&self) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let re = self
            .reconnect_ms
            .map(|ms| format!(",reconnect-ms={ms}"))
            .unwrap_or_default();
        if self.usb {
            a.extend(["-device".into(), "qemu-xhci,id=xhci".into()]);
        }
        for (i, d) in self.devices.iter().enumerate() {
            match d {
                Device::VhostBlk { socket, props } => {
                    let q = if props.contains("num-queues=") {
                        ""
                    } else {
                        ",num-queues=1"
                    };
                    a.push("-chardev".into());
                    a.push(format!("socket,id=vub{i},path={}{re}", socket.display()));
                    a.push("-device".into());
                    a.push(format!(
                        "vhost-user-blk-pci,chardev=vub{i}{q}{}",
                        with_comma(props)
                    ));
                }
                Device::VhostScsi { socket, props } => {
                    let q = if props.contains("num_queues=") {
                        ""
                    } else {
                        ",num_queues=1"
                    };
                    a.push("-chardev".into());
                    a.push(format!("socket,id=vus{i},path={}{re}", socket.display()));
                    a.push("-device".into());
                    a.push(format!(
                        "vhost-user-scsi-pci,chardev=vus{i}{q}{}",
                        with_comma(props)
                    ));
                }
                Device::VhostNet {
                    socket,
                    queues,
                    props,
                } => {
                    a.push("-chardev".into());
                    a.push(format!("socket,id=vun{i},path={}{re}", socket.display()));
                    a.push("-netdev".into());
                    a.push(format!(
                        "vhost-user,id=net{i},chardev=vun{i},queues={queues}"
                    ));
                    a.push("-device".into());
                    let mq = if *queues > 1 {
                        format!(",mq=on,vectors={}", 2 * queues + 2)
                    } else {
                        String::new()
                    };
                    a.push(format!(
                        "virtio-net-pci,netdev=net{i}{mq}{}",
                        with_comma(props)
                    ));
                }
                Device::UsbRedir { socket } => {
                    a.push("-chardev".into());
                    a.push(format!("socket,id=usbr{i},path={}", socket.display()));
                    a.push("-device".into());
                    a.push(format!("usb-redir,chardev=usbr{i},bus=xhci.0"));
                }
                Device::QemuCdrom { image } => {
                    a.push("-drive".into());
                    a.push(format!(
                        "file={},if=none,id=cd{i},media=cdrom,readonly=on,format=raw",
                        image.display()
                    ));
                    a.push("-device".into());
                    a.push(format!("virtio-scsi-pci,id=vscsi{i}"));
                    a.push("-device".into());
                    a.push(format!("scsi-cd,bus=vscsi{i}.0,drive=cd{i}"));
                }
                Device::QemuDrive { file, props } => {
                    a.push("-drive".into());
                    a.push(format!(
                        "file={},if=none,id=drv{i},format=raw,aio=io_uring,cache.direct=on",
                        file.display()
                    ));
                    a.push("-device".into());
                    a.push(format!("virtio-blk-pci,drive=drv{i}{}", with_comma(props)));
                }
            }
        }
        a
    }

    /// Boots the guest, runs `script` (POSIX sh, busybox) inside and returns the result.
    /// A guest that boots and runs the script returns `Ok` whatever the script's status;
    /// errors are reserved for a guest that could not run it.
    pub fn run(&mut self, script: &str) -> Result<GuestRun, HarnessError> {
        let qemu = which("qemu-system-x86_64").ok_or_else(|| {
            HarnessError::MissingTool("qemu-system-x86_64 not found; run scripts/setup.sh".into())
        })?;
        let image = GuestImage::get()?;
        let work = tempfile::Builder::new()
            .prefix("vback-guest.")
            .tempdir()
            .map_err(|e| HarnessError::Setup(format!("cannot create a work directory: {e}")))?;
        let w = work.path();
        let initrd = w.join("initrd");
        self.write_initrd(&image.initramfs, &initrd, script)?;
        let (console, out, status) = (
            w.join("console.log"),
            w.join("out.log"),
            w.join("status.log"),
        );

        let serials = [&console, &out, &status];
        let mut cmd = self.qemu_command(&qemu, &image, &initrd, serials, self.device_args());
        let qemu_log = w.join("qemu.log");
        let qlog = fs::File::create(&qemu_log).map_err(|e| HarnessError::Setup(e.to_string()))?;
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(qlog);
        let migration = self.migration.take().map(|dest| Migration::new(w, *dest));
        let mut dest_child = None;
        if let Some(m) = &migration {
            cmd.arg("-qmp")
                .arg(format!("unix:{},server=on,wait=off", m.qmp_src.display()));
            let serials = [&m.console, &m.out, &m.status];
            let mut c = self.qemu_command(&qemu, &image, &initrd, serials, m.dest.device_args());
            c.arg("-qmp")
                .arg(format!("unix:{},server=on,wait=off", m.qmp_dest.display()));
            c.arg("-incoming")
                .arg(format!("unix:{}", m.socket.display()));
            let log = fs::File::create(w.join("qemu-dest.log"))
                .map_err(|e| HarnessError::Setup(e.to_string()))?;
            c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
            dest_child = Some(c.spawn().map_err(|e| {
                HarnessError::Setup(format!("cannot start the destination QEMU: {e}"))
            })?);
        }
        let mut migration = migration;
        let mut earlier = (String::new(), String::new());
        let (mut console, mut out, mut status) = (console, out, status);

        let t0 = Instant::now();
        let mut child = cmd
            .spawn()
            .map_err(|e| HarnessError::Setup(format!("cannot start QEMU: {e}")))?;
        let mut pending: Vec<(String, HostAction)> = std::mem::take(&mut self.actions);
        let exit = loop {
            if let Some(st) = child
                .try_wait()
                .map_err(|e| HarnessError::Setup(e.to_string()))?
            {
                break st;
            }
            if let Some(m) = &migration {
                let so_far = fs::read_to_string(&out).unwrap_or_default();
                if so_far.lines().any(|l| l.trim() == "VBACK-HOST:migrate") {
                    let r = m.run(self.timeout.saturating_sub(t0.elapsed()));
                    if let Err(e) = r {
                        let _ = child.kill();
                        let _ = child.wait();
                        if let Some(mut d) = dest_child.take() {
                            let _ = d.kill();
                            let _ = d.wait();
                        }
                        return Err(HarnessError::Migration(format!(
                            "{e}\n--- source QEMU stderr ---\n{}\n--- destination QEMU stderr ---\n{}",
                            fs::read_to_string(&qemu_log).unwrap_or_default(),
                            fs::read_to_string(w.join("qemu-dest.log")).unwrap_or_default()
                        )));
                    }
                    // The source quits; the guest runs on in the destination.
                    let _ = child.wait();
                    child = dest_child
                        .take()
                        .ok_or_else(|| HarnessError::Setup("no destination QEMU".into()))?;
                    earlier = (fs::read_to_string(&console).unwrap_or_default(), so_far);
                    let m = migration
                        .take()
                        .ok_or_else(|| HarnessError::Setup("no migration".into()))?;
                    (console, out, status) = (m.console, m.out, m.status);
                    continue;
                }
            }
            if !pending.is_empty() {
                let so_far =
                    String::from_utf8_lossy(&fs::read(&out).unwrap_or_default()).into_owned();
                let mut i = 0;
                while i < pending.len() {
                    if so_far.lines().any(|l| l.trim() == pending[i].0) {
                        let (_, mut action) = pending.remove(i);
                        action();
                    } else {
                        i += 1;
                    }
                }
            }
            if t0.elapsed() > self.timeout {
                let _ = child.kill();
                let _ = child.wait();
                if let Some(mut d) = dest_child.take() {
                    let _ = d.kill();
                    let _ = d.wait();
                }
                return Err(HarnessError::Timeout {
                    seconds: self.timeout.as_secs(),
                    console_tail: tail(&fs::read_to_string(&console).unwrap_or_default(), 30),
                });
            }
            sleep(Duration::from_millis(50));
        };
        let wall = t0.elapsed();
        // A guest that ended before it asked to migrate leaves the destination waiting.
        if let Some(mut d) = dest_child.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
        let console_text =
            earlier.0 + &String::from_utf8_lossy(&fs::read(&console).unwrap_or_default());
        let output = earlier.1 + &String::from_utf8_lossy(&fs::read(&out).unwrap_or_default());
        let status_text = fs::read_to_string(&status).unwrap_or_default();
        let code = status_text
            .lines()
            .filter_map(|l| l.strip_prefix("VBACK-EXIT="))
            .filter_map(|v| v.split_whitespace().next()?.parse::<i32>().ok())
            .next_back();
        let Some(code) = code else {
            return Err(HarnessError::Guest(format!(
                "no exit status from the guest (QEMU {exit}).\n--- QEMU stderr ---\n{}\n--- console tail ---\n{}\n--- output ---\n{}",
                fs::read_to_string(&qemu_log).unwrap_or_default(),
                tail(&console_text, 40),
                tail(&output, 40)
            )));
        };
        let boot = console_text
            .lines()
            .find_map(|l| l.split("VBACK-READY uptime=").nth(1))
            .and_then(|v| v.trim().parse::<f64>().ok());
        Ok(GuestRun {
            status: code,
            checks: parse_checks(&output),
            output,
            console: console_text,
            boot_uptime_s: boot,
            wall,
            accel: self.accel,
        })
    }

    /// The QEMU command line of this guest with `devices`, its serial ports to `serials`
    /// (console, output, status).
    fn qemu_command(
        &self,
        qemu: &Path,
        image: &GuestImage,
        initrd: &Path,
        serials: [&PathBuf; 3],
        devices: Vec<String>,
    ) -> Command {
        let mut cmd = Command::new(qemu);
        match self.accel {
            Accel::Kvm => cmd.args(["-accel", "kvm", "-cpu", "host"]),
            Accel::Tcg => cmd.args(["-accel", "tcg,thread=multi", "-cpu", "max"]),
        };
        cmd.args(["-smp", &self.smp.to_string(), "-m", &self.mem]);
        cmd.args(["-machine", "q35,memory-backend=mem", "-object"]);
        cmd.arg(format!(
            "memory-backend-memfd,id=mem,size={},share=on",
            self.mem
        ));
        cmd.args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-monitor",
            "none",
        ]);
        for f in serials {
            cmd.arg("-serial").arg(format!("file:{}", f.display()));
        }
        cmd.arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(initrd);
        let mut append = String::from(
            "console=ttyS0 panic=-1 quiet loglevel=4 mitigations=off scsi_mod.scan=sync rdinit=/init",
        );
        for a in &self.kernel_args {
            append.push(' ');
            append.push_str(a);
        }
        cmd.arg("-append").arg(append);
        cmd.args(devices);
        cmd.args(&self.extra);
        cmd
    }

    fn write_initrd(&self, base: &Path, dest: &Path, script: &str) -> Result<(), HarnessError> {
        let err = |e: std::io::Error| HarnessError::Setup(format!("writing the initrd: {e}"));
        fs::copy(base, dest).map_err(err)?;
        let mut w = CpioWriter::new();
        let mut dirs: Vec<String> = vec!["harness".into()];
        for (_, g) in &self.files {
            if !g.starts_with('/') {
                return Err(HarnessError::Setup(format!(
                    "guest path {g} must be absolute"
                )));
            }
            let mut acc = String::new();
            let parent = Path::new(g)
                .parent()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            for part in parent.split('/').filter(|p| !p.is_empty()) {
                acc = if acc.is_empty() {
                    part.to_owned()
                } else {
                    format!("{acc}/{part}")
                };
                if !dirs.contains(&acc) {
                    dirs.push(acc.clone());
                }
            }
        }
        for d in &dirs {
            w.dir(d);
        }
        w.file("harness/cmd.sh", 0o755, script.as_bytes());
        for (h, g) in &self.files {
            let data =
                fs::read(h).map_err(|e| HarnessError::Setup(format!("{}: {e}", h.display())))?;
            w.file(g, 0o755, &data);
        }
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(dest)
            .map_err(err)?;
        w.finish(&mut f).map_err(err)?;
        f.flush().map_err(err)
    }
}

fn with_comma(props: &str) -> String {
    if props.is_empty() {
        String::new()
    } else {
        format!(",{props}")
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// One named check of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// The name given to `check`.
    pub name: String,
    /// Its exit status.
    pub status: i32,
    /// What it printed.
    pub output: String,
}

fn parse_checks(output: &str) -> Vec<Check> {
    let mut checks = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in output.lines() {
        if let Some(name) = line.strip_prefix("@@VBACK-CHECK-BEGIN ") {
            current = Some((name.trim().to_owned(), String::new()));
        } else if let Some(rest) = line.strip_prefix("@@VBACK-CHECK-END ") {
            let (name, rc) = rest.rsplit_once(" rc=").unwrap_or((rest, "-1"));
            let out = current.take().map(|(_, o)| o).unwrap_or_default();
            checks.push(Check {
                name: name.trim().to_owned(),
                status: rc.trim().parse().unwrap_or(-1),
                output: out,
            });
        } else if let Some((_, o)) = current.as_mut() {
            o.push_str(line);
            o.push('\n');
        }
    }
    checks
}

/// What a guest run produced.
#[derive(Debug, Clone)]
pub struct GuestRun {
    /// The script's exit status.
    pub status: i32,
    /// The script's output (stdout and stderr).
    pub output: String,
    /// The kernel console.
    pub console: String,
    /// Guest uptime when the script started (the boot time as the guest saw it).
    pub boot_uptime_s: Option<f64>,
    /// Wall-clock time of the whole run.
    pub wall: Duration,
    /// How the guest ran.
    pub accel: Accel,
    /// The named checks, in order.
    pub checks: Vec<Check>,
}

impl GuestRun {
    /// The check called `name`; panics (failing the test) with the guest output if it did not
    /// run.
    pub fn check(&self, name: &str) -> &Check {
        self.checks
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| {
                panic!(
                    "check `{name}` did not run in the guest; output:\n{}",
                    self.output
                )
            })
    }

    /// Panics unless every expected check ran and passed, listing the failures with their output.
    pub fn assert_checks(&self, expected: &[&str]) {
        let mut failures = Vec::new();
        for name in expected {
            match self.checks.iter().find(|c| c.name == *name) {
                None => failures.push(format!("`{name}` did not run")),
                Some(c) if c.status != 0 => failures.push(format!(
                    "`{name}` failed (status {}):\n{}",
                    c.status, c.output
                )),
                Some(_) => {}
            }
        }
        assert!(
            failures.is_empty(),
            "guest checks failed:\n{}\n--- full guest output ---\n{}\n--- console tail ---\n{}",
            failures.join("\n"),
            self.output,
            tail(&self.console, 30)
        );
    }

    /// One line for logs: acceleration, boot time and wall time.
    pub fn summary(&self) -> String {
        format!(
            "accel={:?} boot={} wall={:.1}s status={}",
            self.accel,
            self.boot_uptime_s
                .map_or("?".into(), |b| format!("{b:.2}s")),
            self.wall.as_secs_f64(),
            self.status
        )
    }
}

/// A live migration from the guest's QEMU to a second one (see [`Guest::migrate_to`]).
struct Migration {
    dest: Guest,
    socket: PathBuf,
    qmp_src: PathBuf,
    qmp_dest: PathBuf,
    console: PathBuf,
    out: PathBuf,
    status: PathBuf,
}

impl Migration {
    fn new(w: &Path, dest: Guest) -> Migration {
        Migration {
            dest,
            socket: w.join("migrate.sock"),
            qmp_src: w.join("qmp-src.sock"),
            qmp_dest: w.join("qmp-dest.sock"),
            console: w.join("dest-console.log"),
            out: w.join("dest-out.log"),
            status: w.join("dest-status.log"),
        }
    }

    /// Migrates (QMP `migrate` on the source, waiting for `completed`), then quits the source.
    fn run(&self, limit: Duration) -> Result<(), String> {
        let t0 = Instant::now();
        let mut src = Qmp::connect(&self.qmp_src)?;
        // A guest busy writing under TCG converges slowly at the default limits: the tests
        // want the migration done, not a short downtime.
        src.execute(
            "migrate-set-parameters",
            serde_json::json!({"downtime-limit": 2000, "max-bandwidth": 4_000_000_000u64}),
        )?;
        src.execute(
            "migrate",
            serde_json::json!({"uri": format!("unix:{}", self.socket.display())}),
        )?;
        loop {
            let st = src.execute("query-migrate", serde_json::json!({}))?;
            match st["status"].as_str() {
                Some("completed") => break,
                Some("failed") | Some("cancelled") => {
                    return Err(format!("the source says: {st}"));
                }
                _ => {}
            }
            if t0.elapsed() > limit {
                return Err(format!("not done within the time limit: {st}"));
            }
            sleep(Duration::from_millis(100));
        }
        let mut dest = Qmp::connect(&self.qmp_dest)?;
        let st = dest.execute("query-status", serde_json::json!({}))?;
        if st["status"] != "running" {
            return Err(format!("the destination does not run the guest: {st}"));
        }
        let _ = src.execute("quit", serde_json::json!({}));
        Ok(())
    }
}

/// A QMP connection (vback's QMP client) with errors as messages.
struct Qmp(vback_qmp::Qmp);

impl Qmp {
    fn connect(path: &Path) -> Result<Qmp, String> {
        vback_qmp::Qmp::connect(path, Duration::from_secs(30))
            .map(Qmp)
            .map_err(|e| e.to_string())
    }

    /// Runs `cmd`; its `return` value, or its error as the message.
    fn execute(&mut self, cmd: &str, args: serde_json::Value) -> Result<serde_json::Value, String> {
        self.0.execute(cmd, args).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_are_parsed() {
        let out = "noise\n@@VBACK-CHECK-BEGIN a\nline1\nline2\n@@VBACK-CHECK-END a rc=0\n\
                   @@VBACK-CHECK-BEGIN b c\n@@VBACK-CHECK-END b c rc=3\n";
        let c = parse_checks(out);
        assert_eq!(c.len(), 2);
        assert_eq!(
            c[0],
            Check {
                name: "a".into(),
                status: 0,
                output: "line1\nline2\n".into()
            }
        );
        assert_eq!(c[1].name, "b c");
        assert_eq!(c[1].status, 3);
    }

    #[test]
    fn device_arguments() {
        let g = Guest::new()
            .vhost_blk("/s/blk", "")
            .vhost_blk("/s/blk2", "num-queues=2,serial=x")
            .vhost_scsi("/s/scsi", "")
            .vhost_net("/s/net", "mac=00:16:3e:00:00:01");
        let a = g.device_args().join(" ");
        assert!(
            a.contains("vhost-user-blk-pci,chardev=vub0,num-queues=1"),
            "{a}"
        );
        assert!(
            a.contains("vhost-user-blk-pci,chardev=vub1,num-queues=2,serial=x"),
            "{a}"
        );
        assert!(
            a.contains("vhost-user-scsi-pci,chardev=vus2,num_queues=1"),
            "{a}"
        );
        assert!(a.contains("-netdev vhost-user,id=net3,chardev=vun3"), "{a}");
        assert!(
            a.contains("virtio-net-pci,netdev=net3,mac=00:16:3e:00:00:01"),
            "{a}"
        );
    }
}
