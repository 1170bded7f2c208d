//! The VM: KVM setup, the port-I/O and MMIO bus (serial port, i8042 reset line, virtio-mmio
//! devices), the vCPU loop, the backend watcher (hang-up and reconnection) and the API socket.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use serde_json::{Value, json};
use vback_common::control::{ControlError, ControlHandler, ControlServer, DaemonInfo};
use vback_common::sync::lock;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vmm_sys_util::signal::{Killable, SIGRTMIN};

use crate::config::{Config, SerialOut};
use crate::mmio::{Device, MMIO_BASE, MMIO_SIZE};
use crate::vhost::Connection;
use crate::{acpi, boot, memory};

/// Errors setting up or running the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A KVM ioctl failed.
    #[error("KVM: {what} failed: {source} (is /dev/kvm present and writable?)")]
    Kvm {
        /// Which step.
        what: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// Loading the guest.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// The ACPI tables.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// A device.
    #[error(transparent)]
    Device(#[from] crate::mmio::DeviceError),
    /// The serial output file or a thread.
    #[error("{what}: {source}")]
    Io {
        /// What failed.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The API socket.
    #[error("cannot listen on the API socket: {0}")]
    Api(String),
}

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest pulsed the i8042 reset line (Linux's `reboot`, the test guest's exit).
    Reset,
    /// `shutdown` on the API socket.
    ApiShutdown,
    /// A triple fault.
    TripleFault,
    /// `hlt` with nothing left to wake the vCPU.
    Halted,
    /// KVM could not continue (e.g. an instruction its emulator cannot handle).
    Fatal(String),
}

impl ExitReason {
    /// The process exit code: 0 for an orderly stop, 1 for a failure.
    pub fn code(&self) -> u8 {
        match self {
            ExitReason::Reset | ExitReason::ApiShutdown => 0,
            _ => 1,
        }
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::Reset => write!(f, "the guest reset the machine (i8042 reset)"),
            ExitReason::ApiShutdown => write!(f, "shutdown requested on the API socket"),
            ExitReason::TripleFault => write!(f, "the guest triple-faulted (KVM shutdown exit)"),
            ExitReason::Halted => write!(f, "the guest halted with interrupts off"),
            ExitReason::Fatal(s) => write!(f, "fatal vCPU error: {s}"),
        }
    }
}

/// The serial port's interrupt: an eventfd registered as irqfd on GSI 4.
#[derive(Debug)]
struct IrqTrigger(EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), std::io::Error> {
        self.0.write(1)
    }
}

type SerialDev = Serial<IrqTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>;

const SERIAL_BASE: u16 = 0x3f8;
const SERIAL_GSI: u32 = 4;
const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// Shared state the vCPU, watcher and API threads use.
struct Shared {
    devices: Vec<Mutex<Device>>,
    serial: Mutex<SerialDev>,
    stop: Sender<ExitReason>,
    started: Instant,
    exits: AtomicU64,
}

/// Builds and runs the VM until it stops; returns why.
pub fn run(cfg: Config) -> Result<ExitReason, VmError> {
    let kvm_err = |what| move |source| VmError::Kvm { what, source };
    let kvm = Kvm::new().map_err(kvm_err("opening /dev/kvm"))?;
    let vm = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
    let mem = memory::create(cfg.mem)?;
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which outlives the VM: `mem` is
        // moved into the devices and kept until the process exits.
        unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    vm.set_tss_address(0xfffb_d000)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

    let mut devices = Vec::new();
    let mut cmdline = cfg.cmdline.clone();
    for (i, (kind, socket)) in cfg.devices.iter().enumerate() {
        let d = Device::new(&vm, mem.clone(), kind.clone(), socket.clone(), i)?;
        log::info!(
            "{} device {} at {:#x} irq {} on {}",
            kind.name(),
            i,
            d.base,
            d.gsi,
            socket.display()
        );
        cmdline.push(' ');
        cmdline.push_str(&d.cmdline_arg());
        devices.push(Mutex::new(d));
    }
    let rsdp = if cfg.acpi {
        let acpi_devices: Vec<acpi::MmioDevice> = devices
            .iter()
            .map(|d| {
                let d = lock(d);
                acpi::MmioDevice {
                    base: d.base,
                    size: MMIO_SIZE as u32,
                    gsi: d.gsi,
                }
            })
            .collect();
        Some(acpi::write_tables(&mem, cfg.cpus, &acpi_devices)?)
    } else {
        None
    };
    let entry = boot::load(
        &mem,
        &cfg.kernel,
        cfg.initrd.as_deref(),
        cmdline.trim(),
        rsdp,
    )?;
    log::info!(
        "kernel entry {:#x}, command line: {}",
        entry.rip,
        cmdline.trim()
    );

    let out: Box<dyn Write + Send> = match &cfg.serial {
        SerialOut::Stdio => Box::new(std::io::stdout()),
        SerialOut::File(p) => Box::new(std::fs::File::create(p).map_err(|source| VmError::Io {
            what: format!("cannot create the serial output file {}", p.display()),
            source,
        })?),
    };
    let serial_evt = EventFd::new(EFD_NONBLOCK).map_err(|source| VmError::Io {
        what: "serial eventfd".into(),
        source,
    })?;
    vm.register_irqfd(&serial_evt, SERIAL_GSI)
        .map_err(kvm_err("KVM_IRQFD for the serial port"))?;
    let serial = Serial::new(IrqTrigger(serial_evt), out);

    let (stop_tx, stop_rx) = channel();
    let shared = Arc::new(Shared {
        devices,
        serial: Mutex::new(serial),
        stop: stop_tx,
        started: Instant::now(),
        exits: AtomicU64::new(0),
    });

    for (i, d) in shared.devices.iter().enumerate() {
        let weak = Arc::downgrade(&shared);
        lock(d).set_config_notifier(Arc::new(move || {
            if let Some(s) = weak.upgrade() {
                lock(&s.devices[i]).config_changed();
            }
        }));
    }

    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let mut vcpus = Vec::with_capacity(usize::from(cfg.cpus));
    for id in 0..cfg.cpus {
        let vcpu = vm
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        vcpu.set_cpuid2(&cpuid_for(&cpuid, id, cfg.cpus))
            .map_err(kvm_err("KVM_SET_CPUID2"))?;
        if id == 0 {
            boot::setup_boot_vcpu(&vcpu, entry)?;
        }
        // The others wait in KVM for the guest's INIT/SIPI.
        vcpus.push(vcpu);
    }
    spawn_stdin(shared.clone());
    spawn_watchers(&shared, &cfg);
    let _api = match &cfg.api {
        Some(p) => Some(
            ControlServer::start(
                p,
                Arc::new(Api(shared.clone())),
                Arc::new(Api(shared.clone())),
            )
            .map_err(|e| VmError::Api(e.to_string()))?,
        ),
        None => None,
    };

    // KVM handles `hlt` in the kernel (in-kernel LAPIC): a periodic signal takes the vCPU out
    // of KVM_RUN so that the loop can tell a halt with interrupts off (a dead guest).
    install_kick_handler().map_err(|source| VmError::Io {
        what: "cannot install the vCPU kick signal handler".into(),
        source,
    })?;
    let mut threads = Vec::new();
    for (id, mut vcpu) in vcpus.into_iter().enumerate() {
        let s = shared.clone();
        let t = thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                let reason = vcpu_loop(&mut vcpu, &s, id == 0);
                let _ = s.stop.send(reason);
            })
            .map_err(|source| VmError::Io {
                what: "cannot start a vCPU thread".into(),
                source,
            })?;
        threads.push(t);
    }
    let _ = thread::Builder::new()
        .name("vcpu-kick".into())
        .spawn(move || {
            // Owns the handles (never joined), so the pthreads stay valid for kill().
            loop {
                thread::sleep(HALT_CHECK);
                for t in &threads {
                    let _ = t.kill(SIGRTMIN());
                }
            }
        });
    let reason = stop_rx
        .recv()
        .unwrap_or_else(|_| ExitReason::Fatal("the vCPU thread ended without a reason".into()));
    let _ = lock(&shared.serial).writer_mut().flush();
    if reason == ExitReason::ApiShutdown {
        // The reply to `shutdown` is written after the handler returns: give it time to go out.
        thread::sleep(Duration::from_millis(200));
    }
    // Keep the VM, memory and devices alive until the caller exits the process.
    std::mem::forget(vm);
    std::mem::forget(mem);
    Ok(reason)
}

extern "C" fn kick_handler(_: libc::c_int) {}

/// Installs a no-op handler for the kick signal, with SA_RESTART so that the vCPU thread's
/// other system calls (vhost-user requests, serial writes) are not cut short by it.
fn install_kick_handler() -> std::io::Result<()> {
    // SAFETY: sigaction is plain data; all-zero is a valid empty value.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = kick_handler as *const () as usize;
    act.sa_flags = libc::SA_RESTART;
    // SAFETY: `act` is a valid sigaction with an async-signal-safe (empty) handler; the old
    // action is not wanted.
    let r = unsafe { libc::sigaction(SIGRTMIN(), &act, std::ptr::null_mut()) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// How often the vCPU is checked for a halt with interrupts off.
const HALT_CHECK: Duration = Duration::from_secs(1);

/// Whether the vCPU sits in `hlt` with interrupts disabled: nothing but an NMI can wake it.
fn halted_for_good(vcpu: &VcpuFd) -> bool {
    const RFLAGS_IF: u64 = 1 << 9;
    let halted = vcpu
        .get_mp_state()
        .is_ok_and(|m| m.mp_state == kvm_bindings::KVM_MP_STATE_HALTED);
    halted && vcpu.get_regs().is_ok_and(|r| r.rflags & RFLAGS_IF == 0)
}

/// The supported CPUID with this vCPU's APIC ID (leaf 1 EBX[31:24], leaves 0xb and 0x1f EDX)
/// and the logical processor count.
fn cpuid_for(supported: &kvm_bindings::CpuId, id: u8, cpus: u8) -> kvm_bindings::CpuId {
    let mut c = supported.clone();
    for e in c.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(cpus) << 16);
                if cpus > 1 {
                    e.edx |= 1 << 28; // HTT: the count in EBX[23:16] is valid
                }
            }
            0xb | 0x1f => e.edx = u32::from(id),
            _ => {}
        }
    }
    c
}

/// Runs one vCPU until the VM stops. Only the boot vCPU's halt with interrupts off ends the VM
/// (others halt that way when the guest parks them).
fn vcpu_loop(vcpu: &mut VcpuFd, s: &Shared, boot_cpu: bool) -> ExitReason {
    loop {
        let exit = match vcpu.run() {
            Ok(e) => e,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                if boot_cpu && halted_for_good(vcpu) {
                    return ExitReason::Halted;
                }
                continue;
            }
            Err(e) => return ExitReason::Fatal(format!("KVM_RUN failed: {e}")),
        };
        s.exits.fetch_add(1, Ordering::Relaxed);
        match exit {
            VcpuExit::IoOut(port, data) => {
                if (SERIAL_BASE..SERIAL_BASE + 8).contains(&port) {
                    let _ = lock(&s.serial).write((port - SERIAL_BASE) as u8, data[0]);
                } else if port == I8042_COMMAND && data.first() == Some(&I8042_RESET) {
                    return ExitReason::Reset;
                }
            }
            VcpuExit::IoIn(port, data) => {
                if (SERIAL_BASE..SERIAL_BASE + 8).contains(&port) {
                    data[0] = lock(&s.serial).read((port - SERIAL_BASE) as u8);
                } else if port == I8042_COMMAND {
                    data.fill(0);
                } else {
                    data.fill(0xff);
                }
            }
            VcpuExit::MmioRead(addr, data) => match device_at(s, addr) {
                Some((d, off)) => lock(d).read(off, data),
                None => {
                    log::debug!(
                        "read of {} bytes at unclaimed address {addr:#x}",
                        data.len()
                    );
                    data.fill(0)
                }
            },
            VcpuExit::MmioWrite(addr, data) => match device_at(s, addr) {
                Some((d, off)) => lock(d).write(off, data),
                None => log::debug!("write of {data:x?} to unclaimed address {addr:#x}"),
            },
            VcpuExit::Hlt => return ExitReason::Halted,
            VcpuExit::Shutdown => return ExitReason::TripleFault,
            VcpuExit::SystemEvent(t, _) => {
                return ExitReason::Fatal(format!("system event {t}"));
            }
            VcpuExit::FailEntry(reason, cpu) => {
                return ExitReason::Fatal(format!(
                    "VM entry failed on cpu {cpu} (hardware reason {reason:#x})"
                ));
            }
            VcpuExit::InternalError => {
                let run = vcpu.get_kvm_run();
                // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the
                // active member of the exit union.
                let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                return ExitReason::Fatal(format!(
                    "KVM internal error, suberror {suberror} (1 = instruction emulation failure) at rip {rip:#x}"
                ));
            }
            other => log::debug!("unhandled vCPU exit {other:?}"),
        }
    }
}

fn device_at(s: &Shared, addr: u64) -> Option<(&Mutex<Device>, u64)> {
    let idx = addr.checked_sub(MMIO_BASE)? / MMIO_SIZE;
    let d = s.devices.get(usize::try_from(idx).ok()?)?;
    Some((d, (addr - MMIO_BASE) % MMIO_SIZE))
}

/// Feeds standard input to the serial port's receive FIFO.
fn spawn_stdin(s: Arc<Shared>) {
    let _ = thread::Builder::new().name("stdin".into()).spawn(move || {
        let mut buf = [0u8; 64];
        let mut stdin = std::io::stdin();
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let mut rest = &buf[..n];
                    while !rest.is_empty() {
                        let took = lock(&s.serial).enqueue_raw_bytes(rest).unwrap_or(0);
                        rest = &rest[took..];
                        if took == 0 {
                            thread::sleep(Duration::from_millis(5));
                        }
                    }
                }
            }
        }
    });
}

/// One thread per device: waits for the backend to hang up, reports it, and reconnects when the
/// socket accepts connections again.
fn spawn_watchers(shared: &Arc<Shared>, cfg: &Config) {
    for (i, (kind, socket)) in cfg.devices.iter().enumerate() {
        let s = shared.clone();
        let (kind, socket) = (kind.clone(), socket.clone());
        let _ = thread::Builder::new()
            .name(format!("watch-{i}"))
            .spawn(move || watch(&s, i, &kind, &socket));
    }
}

/// First wait before reconnecting; doubled (up to [`RECONNECT_MAX`]) while the backend keeps
/// failing or hanging up within [`RECONNECT_STABLE`].
const RECONNECT_MIN: Duration = Duration::from_millis(200);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
const RECONNECT_STABLE: Duration = Duration::from_secs(2);

fn watch(s: &Shared, i: usize, kind: &crate::mmio::Kind, socket: &Path) {
    let mut delay = RECONNECT_MIN;
    let mut since = Instant::now();
    loop {
        let fd = lock(&s.devices[i]).watch_fd();
        if let Some(fd) = fd {
            let mut p = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLRDHUP,
                revents: 0,
            };
            loop {
                // SAFETY: `p` is one valid pollfd for the duration of the call.
                let r = unsafe { libc::poll(&mut p, 1, -1) };
                if r > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
                    break;
                }
            }
            drop(fd);
            lock(&s.devices[i]).disconnected();
            log::error!(
                "{} device {i}: backend on {} disconnected; the device waits for it to come back",
                kind.name(),
                socket.display()
            );
            if since.elapsed() >= RECONNECT_STABLE {
                delay = RECONNECT_MIN;
            }
        }
        loop {
            thread::sleep(delay);
            delay = (delay * 2).min(RECONNECT_MAX);
            if !socket.exists() {
                continue;
            }
            match Connection::connect(socket, kind.default_queues()) {
                Ok(conn) => {
                    let mut d = lock(&s.devices[i]);
                    match d.reconnect(conn) {
                        Ok(()) => {
                            log::warn!(
                                "{} device {i}: backend on {} reconnected (status {:#x})",
                                kind.name(),
                                socket.display(),
                                d.status()
                            );
                            since = Instant::now();
                            break;
                        }
                        Err(e) => {
                            d.disconnected();
                            log::warn!("{} device {i}: reconnecting failed: {e}", kind.name());
                        }
                    }
                }
                Err(e) => {
                    // Waiting for the daemon to come back is the normal case: no back-off.
                    delay = RECONNECT_MIN;
                    log::debug!("{} device {i}: not back yet: {e}", kind.name());
                }
            }
        }
    }
}

/// The API socket: `status` and `shutdown`.
struct Api(Arc<Shared>);

impl DaemonInfo for Api {
    fn daemon_status(&self) -> Value {
        json!({
            "name": "vmm-min",
            "pid": std::process::id(),
            "uptime_s": self.0.started.elapsed().as_secs(),
            "vcpu_exits": self.0.exits.load(Ordering::Relaxed),
        })
    }
}

impl ControlHandler for Api {
    fn status(&self) -> Value {
        let devs: Vec<Value> = self
            .0
            .devices
            .iter()
            .map(|d| {
                let d = lock(d);
                json!({
                    "kind": d.kind.name(),
                    "socket": d.socket,
                    "mmio_base": format!("{:#x}", d.base),
                    "irq": d.gsi,
                    "connected": d.connected(),
                    "driver_status": d.status(),
                    "reconnects": d.reconnects,
                    "mmio_exits": d.mmio_exits,
                })
            })
            .collect();
        json!({ "devices": devs })
    }

    fn stats(&self) -> Value {
        let devs: Vec<Value> = self
            .0
            .devices
            .iter()
            .map(|d| {
                let d = lock(d);
                json!({
                    "kind": d.kind.name(),
                    "mmio_exits": d.mmio_exits,
                    "reconnects": d.reconnects,
                })
            })
            .collect();
        json!({
            "vcpu_exits": self.0.exits.load(Ordering::Relaxed),
            "devices": devs,
        })
    }

    fn commands(&self) -> Vec<vback_common::control::CommandInfo> {
        vec![vback_common::control::CommandInfo {
            name: "shutdown",
            args: "",
            help: "Stop the VM now and exit vmm-min (status 0).",
        }]
    }

    fn handle(&self, cmd: &str, _args: &Value) -> Option<Result<Value, ControlError>> {
        match cmd {
            "shutdown" => {
                let _ = self.0.stop.send(ExitReason::ApiShutdown);
                Some(Ok(json!({"stopping": true})))
            }
            _ => None,
        }
    }
}
