//! The daemon every backend runs, in two parts:
//!
//! - the **process** ([`Process`]): logging, signals, systemd notifications (readiness, status,
//!   stopping and the watchdog), the control socket (one per process), and the one place where
//!   a sandbox will be entered once everything is opened ([`Process::before_serving`]);
//! - its vhost-user **ports** ([`Port`]): where each listening socket comes from
//!   ([`ListenSource`]), the serve loop that serves again after a front end disconnects, and
//!   each port's status. A process serves any number of ports, each on its own thread, or none
//!   (a process with only its control socket).
//!
//! blkback, netback and cdrom run one port: a backend's `main` flattens [`CommonArgs`] into its
//! own options, builds its device, and hands both to [`Daemon::run`], which builds the process
//! and its port from those options. SIGTERM and SIGINT end every port's current connection,
//! remove the socket files the process created, tell systemd `STOPPING=1` and return.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use serde_json::{Value, json};
use thiserror::Error;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::control::{ControlHandler, ControlLimits, ControlServer, DaemonInfo};
use crate::notify;
use crate::socket::{BindError, SocketPerms, bind_unix_with};
use crate::vhost_user::{Connection, SetupError, VhostUserBackend, VringEpollHandler};

/// Log verbosity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    /// Only errors.
    Error,
    /// Errors and warnings.
    Warn,
    /// Connections, configuration and state changes (default).
    Info,
    /// Also each vhost-user message both ways (type, ring, key values) and each request
    /// answered with an error status (type, sector, status, reason; rate-limited).
    Debug,
    /// Everything.
    Trace,
}

impl From<LogLevel> for log::LevelFilter {
    fn from(l: LogLevel) -> Self {
        match l {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

/// Options every vback daemon takes. Flatten into a backend's clap parser with
/// `#[command(flatten)]`.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Listen for the front end on this unix socket (QEMU connects with
    /// `-chardev socket,path=PATH`). A stale socket file is replaced; one that another process
    /// still answers on is not. Also spelled --socket-path.
    #[arg(
        long,
        value_name = "PATH",
        alias = "socket-path",
        help_heading = "Daemon"
    )]
    pub socket: Option<PathBuf>,

    /// Serve on an already listening unix socket inherited as file descriptor N (for a
    /// supervisor that binds the socket itself). Without --socket and --fd, a systemd socket
    /// unit's socket is used (LISTEN_FDS; a second socket, or one named "control", becomes the
    /// control socket).
    #[arg(
        long,
        value_name = "N",
        conflicts_with = "socket",
        help_heading = "Daemon"
    )]
    pub fd: Option<RawFd>,

    /// Print this backend's vhost-user capabilities as JSON (QEMU's vhost-user.json schema)
    /// and exit.
    #[arg(long, help_heading = "Daemon")]
    pub print_capabilities: bool,

    /// Answer control commands (line-delimited JSON: status, stats, ...) on this unix socket.
    /// `vbctl` talks to it.
    #[arg(long, value_name = "PATH", help_heading = "Daemon")]
    pub control: Option<PathBuf>,

    /// Permission bits of the vhost-user socket the daemon binds (octal). The default lets only
    /// the daemon's user (and root) connect; use 0660 with --socket-group for a QEMU running
    /// as another user. A socket inherited with --fd or from systemd keeps its own mode.
    #[arg(long, value_name = "MODE", default_value = "0600", value_parser = crate::socket::parse_mode, help_heading = "Daemon")]
    pub socket_mode: u32,

    /// Give the vhost-user socket to this group (a name or a gid), e.g. the group QEMU runs as.
    #[arg(long, value_name = "GROUP", value_parser = crate::socket::parse_group, help_heading = "Daemon")]
    pub socket_group: Option<u32>,

    /// Permission bits of the control socket (octal). Whoever can connect can resize disks
    /// and change media: keep it 0600 unless a group of operators needs it.
    #[arg(long, value_name = "MODE", default_value = "0600", value_parser = crate::socket::parse_mode, help_heading = "Daemon")]
    pub control_mode: u32,

    /// Give the control socket to this group (a name or a gid).
    #[arg(long, value_name = "GROUP", value_parser = crate::socket::parse_group, help_heading = "Daemon")]
    pub control_group: Option<u32>,

    /// Log verbosity (logs go to stderr; under systemd they land in the journal).
    #[arg(long, value_enum, default_value_t = LogLevel::Info, value_name = "LEVEL", help_heading = "Daemon")]
    pub log_level: LogLevel,
}

/// What a backend tells the daemon about itself.
#[derive(Debug, Clone, Copy)]
pub struct DeviceInfo {
    /// Program name, for logs and thread names (`blkback`).
    pub name: &'static str,
    /// The vhost-user backend type for `--print-capabilities` (`block`, `net`, `scsi`).
    pub vhost_type: &'static str,
    /// Capability features for `--print-capabilities`.
    pub features: &'static [&'static str],
}

impl DeviceInfo {
    /// The `--print-capabilities` document.
    pub fn capabilities_json(&self) -> String {
        let doc = json!({ "type": self.vhost_type, "features": self.features });
        serde_json::to_string_pretty(&doc).unwrap_or_default()
    }
}

/// Sets up logging to stderr at `level` (`VBACK_LOG` overrides it with env_logger syntax).
/// Under systemd (JOURNAL_STREAM set) lines carry no timestamp: the journal adds its own.
pub fn init_logging(level: LogLevel) {
    let mut b = env_logger::Builder::new();
    b.filter_level(level.into());
    if let Ok(spec) = std::env::var("VBACK_LOG") {
        b.parse_filters(&spec);
    }
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        b.format_timestamp(None);
    }
    let _ = b.try_init();
}

/// Reports the error that ends a daemon, once: as a log line (under systemd, the journal's
/// only copy), or on stderr when logging is off. Returns the failure exit status.
pub fn fatal(name: &str, e: &dyn std::fmt::Display) -> std::process::ExitCode {
    if log::log_enabled!(target: name, log::Level::Error) {
        log::error!(target: name, "{e}");
    } else {
        eprintln!("{name}: {e}");
    }
    std::process::ExitCode::FAILURE
}

/// For a backend whose device is not built yet: says so on stderr, after its configuration was
/// parsed and validated, and returns exit status 2.
pub fn not_implemented(name: &str, what: &str, issue: Option<u32>) -> std::process::ExitCode {
    let tracking = issue.map_or_else(
        || "not scheduled yet".to_owned(),
        |n| format!("see issue #{n}"),
    );
    eprintln!(
        "{name}: the configuration is valid, but {what} is not implemented yet ({tracking}); \
         nothing was served"
    );
    std::process::ExitCode::from(2)
}

/// Why a daemon could not start or stopped with an error.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// No socket option and no socket activation.
    #[error(
        "no vhost-user socket to serve: give --socket PATH, or --fd N for an inherited listening \
         socket, or start the daemon from a systemd socket unit"
    )]
    NoSocket,
    /// The vhost-user socket could not be bound.
    #[error("vhost-user {0}")]
    Bind(BindError),
    /// The control socket could not be bound.
    #[error("control {0}")]
    Control(BindError),
    /// `--fd N` is not a listening unix socket.
    #[error("--fd {fd}: {problem}")]
    BadFd {
        /// The descriptor number.
        fd: RawFd,
        /// What is wrong.
        problem: String,
    },
    /// LISTEN_FDS was set but unusable.
    #[error("systemd socket activation: {0}")]
    Activation(String),
    /// Signal handling or the event loop could not be set up.
    #[error("cannot set up the daemon's event loop: {0}")]
    Setup(io::Error),
    /// The hook run before serving (where the sandbox is entered) failed: nothing was served.
    #[error("cannot enter the sandbox before serving (every socket was open): {0}")]
    Sandbox(io::Error),
}

/// Where a vhost-user port's listening socket comes from.
#[derive(Debug)]
pub enum ListenSource {
    /// Bind a unix socket at this path with these permissions (`--socket`). A stale socket
    /// file is replaced; one another process still answers on is refused. The file is removed
    /// when the process stops.
    Path(PathBuf, SocketPerms),
    /// An already listening unix socket inherited as this descriptor (`--fd`).
    Fd(RawFd),
    /// A listening socket passed by systemd socket activation as this descriptor.
    Activation(RawFd),
}

impl ListenSource {
    /// How logs, `STATUS=` and `status` name it.
    fn describe(&self) -> String {
        match self {
            ListenSource::Path(p, _) => p.display().to_string(),
            ListenSource::Fd(fd) => format!("fd {fd}"),
            ListenSource::Activation(fd) => format!("systemd socket (fd {fd})"),
        }
    }

    /// Binds or takes over the socket.
    fn open(&self) -> Result<Bound, DaemonError> {
        let (listener, created) = match self {
            ListenSource::Path(p, perms) => (
                bind_unix_with(p, *perms).map_err(DaemonError::Bind)?,
                Some(p.clone()),
            ),
            ListenSource::Fd(fd) | ListenSource::Activation(fd) => (inherited_listener(*fd)?, None),
        };
        let bound = Bound { listener, created };
        // Readiness comes from epoll; a connection gone from the backlog by the time it is
        // accepted must not block the loop.
        bound
            .listener
            .set_nonblocking(true)
            .map_err(DaemonError::Setup)?;
        Ok(bound)
    }
}

/// An open listening socket; the file it created (if any) is removed when it is dropped.
struct Bound {
    listener: UnixListener,
    created: Option<PathBuf>,
}

impl Drop for Bound {
    fn drop(&mut self) {
        if let Some(p) = &self.created {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl CommonArgs {
    /// The vhost-user socket these options name, and the control socket systemd passed along
    /// with it (if any).
    fn listen_source(&self) -> Result<(ListenSource, Option<RawFd>), DaemonError> {
        if let Some(p) = &self.socket {
            let perms = SocketPerms {
                mode: self.socket_mode,
                group: self.socket_group,
            };
            return Ok((ListenSource::Path(p.clone(), perms), None));
        }
        if let Some(fd) = self.fd {
            return Ok((ListenSource::Fd(fd), None));
        }
        match systemd_listen_fds()? {
            Some((fd, control)) => Ok((ListenSource::Activation(fd), control)),
            None => Err(DaemonError::NoSocket),
        }
    }
}

/// `sd_listen_fds`: the first passed socket (fd 3) and an optional control socket.
fn systemd_listen_fds() -> Result<Option<(RawFd, Option<RawFd>)>, DaemonError> {
    let Ok(count) = std::env::var("LISTEN_FDS") else {
        return Ok(None);
    };
    let pid_ok = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    if !pid_ok {
        // The variables were meant for another process (our parent): not ours to use.
        return Ok(None);
    }
    let count: RawFd = count
        .parse()
        .map_err(|_| DaemonError::Activation(format!("LISTEN_FDS={count} is not a number")))?;
    if count < 1 {
        return Ok(None);
    }
    const FIRST: RawFd = 3;
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|n| n.split(':').map(str::to_owned).collect())
        .unwrap_or_default();
    for want in ["vhost-user", "control"] {
        let n = names
            .iter()
            .take(count as usize)
            .filter(|n| *n == want)
            .count();
        if n > 1 {
            return Err(DaemonError::Activation(format!(
                "LISTEN_FDNAMES={} names {n} sockets `{want}`, so which is which is ambiguous \
                 (a .socket unit's FileDescriptorName= names every socket of that unit): give \
                 each socket its own .socket unit with its own FileDescriptorName=, as \
                 docs/daemon.md shows",
                names.join(":")
            )));
        }
    }
    let named = |want: &str| {
        names
            .iter()
            .position(|n| n == want)
            .and_then(|i| RawFd::try_from(i).ok())
            .filter(|i| *i < count)
            .map(|i| FIRST + i)
    };
    let control = named("control").or((count >= 2).then_some(FIRST + 1));
    let vhost = named("vhost-user")
        .or_else(|| (FIRST..FIRST + count).find(|fd| Some(*fd) != control))
        .ok_or_else(|| {
            DaemonError::Activation(
                "no socket is left for vhost-user after the control socket".into(),
            )
        })?;
    Ok(Some((vhost, control)))
}

/// Takes ownership of an inherited descriptor after checking it is an open unix socket.
fn inherited_listener(fd: RawFd) -> Result<UnixListener, DaemonError> {
    let bad = |problem: &str| DaemonError::BadFd {
        fd,
        problem: problem.to_owned(),
    };
    if fd < 3 {
        return Err(bad(
            "descriptors 0, 1 and 2 are stdin, stdout and stderr, not a socket",
        ));
    }
    // SAFETY: F_GETFD only reads the descriptor flags of `fd`; it touches no memory.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(bad("no such open file descriptor"));
    }
    // SAFETY: `fd` is open (checked above) and was handed to this process to serve on; nothing
    // else in the process owns it, so the listener may take ownership and close it on drop.
    let listener = unsafe { UnixListener::from_raw_fd(fd) };
    if listener.local_addr().is_err() {
        // Do not close what we could not use: give the descriptor back.
        let _ = std::os::fd::IntoRawFd::into_raw_fd(listener);
        return Err(bad("not a unix domain socket"));
    }
    Ok(listener)
}

/// One port's observable state (an entry of `ports` in `status`).
#[derive(Debug)]
struct PortState {
    listen: String,
    connected: AtomicBool,
    connections: AtomicU64,
}

impl PortState {
    fn status(&self) -> Value {
        json!({
            "socket": self.listen,
            "frontend_connected": self.connected.load(Ordering::Acquire),
            "connections": self.connections.load(Ordering::Acquire),
        })
    }
}

/// The process's observable state (the `"daemon"` part of `status`).
#[derive(Debug)]
struct ProcessState {
    name: &'static str,
    started: Instant,
    ports: Vec<Arc<PortState>>,
}

impl DaemonInfo for ProcessState {
    fn daemon_status(&self) -> Value {
        let mut v = json!({
            "name": self.name,
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "uptime_s": self.started.elapsed().as_secs(),
            "ports": self.ports.iter().map(|p| p.status()).collect::<Vec<_>>(),
        });
        // The first port's keys stay at the top level, where a one-port daemon always had them.
        if let (Some(first), Some(obj)) = (self.ports.first(), v.as_object_mut())
            && let Value::Object(port) = first.status()
        {
            obj.extend(port);
        }
        v
    }
}

/// Stops a running [`Process`] (or [`Daemon`]) from another thread (signals use it; so do
/// tests).
#[derive(Clone)]
pub struct StopHandle {
    inner: Arc<StopInner>,
}

struct StopInner {
    stopping: AtomicBool,
    /// Readable once a stop was requested (never read, so it stays readable for every waiter).
    event: EventFd,
    /// Each port's front end socket while one is served (shut down to end its connection),
    /// by port index.
    current: Mutex<HashMap<usize, Arc<UnixStream>>>,
}

impl std::fmt::Debug for StopHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StopHandle")
            .field("stopping", &self.inner.stopping.load(Ordering::Relaxed))
            .finish()
    }
}

impl StopHandle {
    fn new() -> io::Result<StopHandle> {
        Ok(StopHandle {
            inner: Arc::new(StopInner {
                stopping: AtomicBool::new(false),
                event: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
                current: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Ends every port's current connection and makes [`Process::run`] return.
    pub fn stop(&self) {
        self.inner.stopping.store(true, Ordering::Release);
        let _ = self.inner.event.write(1);
        for s in self.lock_current().values() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Whether a stop was requested.
    pub fn is_stopping(&self) -> bool {
        self.inner.stopping.load(Ordering::Acquire)
    }

    fn lock_current(&self) -> std::sync::MutexGuard<'_, HashMap<usize, Arc<UnixStream>>> {
        crate::sync::lock(&self.inner.current)
    }

    /// Waits for `d` (forever with `None`) or until a stop is requested. Returns whether the
    /// process is stopping.
    fn wait(&self, d: Option<Duration>) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.inner.event.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = d.map_or(-1, |d| {
            libc::c_int::try_from(d.as_millis()).unwrap_or(libc::c_int::MAX)
        });
        // SAFETY: `pfd` is one valid pollfd that lives for the call; poll(2) writes only its
        // `revents` field.
        unsafe { libc::poll(&mut pfd, 1, ms) };
        self.is_stopping()
    }
}

/// A backend the daemon can serve: a [`VhostUserBackend`] cloned into each connection.
pub trait Servable:
    VhostUserBackend<Vring: Clone + Send + Sync + 'static> + Clone + 'static
{
}

impl<T> Servable for T where
    T: VhostUserBackend<Vring: Clone + Send + Sync + 'static> + Clone + 'static
{
}

/// Registers a backend's own event sources with a new connection's worker threads.
type OnConnection<B> = Box<dyn Fn(&[Arc<VringEpollHandler<B>>]) -> io::Result<()> + Send>;

/// A vhost-user port: a listening socket and the backend served on it, one front end at a
/// time. Add it to a [`Process`] with [`Process::add_port`].
pub struct Port<B: Servable> {
    source: ListenSource,
    backend: B,
    on_connection: OnConnection<B>,
    on_disconnect: Option<Box<dyn Fn() + Send>>,
}

impl<B: Servable> std::fmt::Debug for Port<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Port")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl<B: Servable> Port<B> {
    /// A port serving `backend` on the socket `source` names.
    pub fn new(source: ListenSource, backend: B) -> Port<B> {
        Port {
            source,
            backend,
            on_connection: Box::new(|_| Ok(())),
            on_disconnect: None,
        }
    }

    /// Calls `f` with the worker threads' epoll handlers of each new connection (a backend
    /// registers its own event sources there, such as an I/O engine's completion eventfd). If
    /// it fails, that connection is closed.
    pub fn on_connection(
        mut self,
        f: impl Fn(&[Arc<VringEpollHandler<B>>]) -> io::Result<()> + Send + 'static,
    ) -> Self {
        self.on_connection = Box::new(f);
        self
    }

    /// Runs `f` after each front end disconnects, before the next one is accepted (a backend
    /// resets per-connection state there).
    pub fn on_disconnect(mut self, f: impl Fn() + Send + 'static) -> Self {
        self.on_disconnect = Some(Box::new(f));
        self
    }
}

/// A port with its backend type erased, so that one process holds ports of any backends.
trait AnyPort: Send {
    fn source(&self) -> &ListenSource;
    /// Serves front ends on `bound` until the process stops.
    fn serve(self: Box<Self>, ctx: PortContext, bound: &UnixListener) -> Result<(), DaemonError>;
}

/// What a port's serve loop knows about its process.
struct PortContext {
    /// How logs name this port's front ends: empty in a one-port process, ` on PATH` when
    /// there are several.
    label: String,
    index: usize,
    state: Arc<PortState>,
    stop: StopHandle,
}

impl<B: Servable> AnyPort for Port<B> {
    fn source(&self) -> &ListenSource {
        &self.source
    }

    fn serve(
        self: Box<Self>,
        ctx: PortContext,
        listener: &UnixListener,
    ) -> Result<(), DaemonError> {
        serve_loop(*self, &ctx, listener)
    }
}

/// A vhost-user daemon process: the control socket, signals, systemd notifications and the
/// watchdog, and any number of vhost-user [`Port`]s (none is fine: a process with only its
/// control socket).
///
/// ```no_run
/// # use std::sync::Arc;
/// # use vback_common::daemon::{Process, Port, ListenSource, Servable};
/// # fn demo<B: Servable>(a: B, b: B) -> Result<(), vback_common::DaemonError> {
/// let mut process = Process::new("bridge", Arc::new(vback_common::control::NoDeviceCommands))?;
/// process.add_port(Port::new(ListenSource::Path("/run/a.sock".into(), Default::default()), a));
/// process.add_port(Port::new(ListenSource::Path("/run/b.sock".into(), Default::default()), b));
/// process.run()
/// # }
/// ```
pub struct Process {
    name: &'static str,
    handler: Arc<dyn ControlHandler>,
    control: Option<ControlSource>,
    stop: StopHandle,
    handle_signals: bool,
    ports: Vec<Box<dyn AnyPort>>,
    before_serving: Option<Box<dyn FnOnce() -> io::Result<()> + Send>>,
}

/// Where the control socket comes from.
#[derive(Debug)]
enum ControlSource {
    Path(PathBuf, SocketPerms),
    Fd(RawFd),
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("name", &self.name)
            .field("control", &self.control)
            .field("ports", &self.ports.len())
            .finish_non_exhaustive()
    }
}

impl Process {
    /// A process named `name` (logs, thread names, `status`) answering `handler`'s control
    /// commands, with no control socket and no port yet.
    pub fn new(
        name: &'static str,
        handler: Arc<dyn ControlHandler>,
    ) -> Result<Process, DaemonError> {
        Ok(Process {
            name,
            handler,
            control: None,
            stop: StopHandle::new().map_err(DaemonError::Setup)?,
            handle_signals: true,
            ports: Vec::new(),
            before_serving: None,
        })
    }

    /// Answer control commands on a unix socket bound at `path` (removed when the process
    /// stops).
    pub fn control_socket(mut self, path: PathBuf, perms: SocketPerms) -> Self {
        self.control = Some(ControlSource::Path(path, perms));
        self
    }

    /// Answer control commands on an inherited listening socket (systemd's second socket).
    pub fn control_fd(mut self, fd: RawFd) -> Self {
        self.control = Some(ControlSource::Fd(fd));
        self
    }

    /// Do not install SIGTERM/SIGINT/SIGHUP handlers (for tests and embedding); use
    /// [`Process::stop_handle`] instead.
    pub fn without_signal_handlers(mut self) -> Self {
        self.handle_signals = false;
        self
    }

    /// Sets the hook [`Process::run`] calls once every socket (control and ports) is open and
    /// before anything is served or `READY=1` is sent: the one place where the process will
    /// enter its sandbox. If it fails, `run` returns [`DaemonError::Sandbox`].
    pub fn before_serving(mut self, f: impl FnOnce() -> io::Result<()> + Send + 'static) -> Self {
        self.before_serving = Some(Box::new(f));
        self
    }

    /// Adds a vhost-user port; it is opened and served by [`Process::run`].
    pub fn add_port<B: Servable>(&mut self, port: Port<B>) {
        self.ports.push(Box::new(port));
    }

    /// A handle that stops [`Process::run`] from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// Opens the control socket and every port, enters the sandbox, tells systemd it is ready,
    /// and serves every port (each on its own thread) until stopped. Returns `Ok` after a clean
    /// shutdown; a port whose serve loop fails stops the whole process.
    pub fn run(mut self) -> Result<(), DaemonError> {
        let states: Vec<Arc<PortState>> = self
            .ports
            .iter()
            .map(|p| {
                Arc::new(PortState {
                    listen: p.source().describe(),
                    connected: AtomicBool::new(false),
                    connections: AtomicU64::new(0),
                })
            })
            .collect();
        let state = Arc::new(ProcessState {
            name: self.name,
            started: Instant::now(),
            ports: states.clone(),
        });
        // The control socket first: whoever waits for the vhost-user socket (a hotplug script,
        // a test) can talk to the control socket once it sees it.
        let _control_server = match &self.control {
            Some(ControlSource::Path(p, perms)) => Some(
                ControlServer::start_with(
                    p,
                    state.clone(),
                    self.handler.clone(),
                    *perms,
                    ControlLimits::default(),
                )
                .map_err(DaemonError::Control)?,
            ),
            Some(ControlSource::Fd(fd)) => Some(ControlServer::from_listener(
                inherited_listener(*fd)?,
                state.clone(),
                self.handler.clone(),
            )),
            None => None,
        };
        let bound = self
            .ports
            .iter()
            .map(|p| p.source().open())
            .collect::<Result<Vec<Bound>, _>>()?;
        if self.handle_signals {
            install_signal_handlers(self.stop.clone())?;
        }
        self.enter_sandbox()?;

        for s in &states {
            log::info!("{} listening on {}", self.name, s.listen);
        }
        let status = match states.as_slice() {
            [] => "serving control requests only".to_owned(),
            [one] => format!("waiting for a front end on {}", one.listen),
            many => format!("waiting for front ends on {} ports", many.len()),
        };
        notify::notify(&format!("READY=1\nSTATUS={status}"));
        let watchdog = notify::watchdog_interval()
            .map(|every| spawn_watchdog(self.stop.clone(), every))
            .transpose()
            .map_err(DaemonError::Setup)?;

        let result = self.serve_ports(bound, states);
        notify::notify("STOPPING=1");
        if let Some(w) = watchdog {
            let _ = w.join();
        }
        log::info!("{} stopped", self.name);
        result
    }

    /// The single place where the process enters its sandbox: called by [`Process::run`] after
    /// the control socket and every port's socket are open (and the backends' files, opened
    /// before the process was built), before `READY=1` and before any front end is served.
    /// No sandbox exists yet; the [`Process::before_serving`] hook runs here.
    fn enter_sandbox(&mut self) -> Result<(), DaemonError> {
        match self.before_serving.take() {
            Some(f) => f().map_err(DaemonError::Sandbox),
            None => Ok(()),
        }
    }

    /// Serves each port on its own thread; waits until a stop is requested and every port has
    /// ended. The first port error is returned.
    fn serve_ports(
        &mut self,
        bound: Vec<Bound>,
        states: Vec<Arc<PortState>>,
    ) -> Result<(), DaemonError> {
        let mut threads = Vec::new();
        let mut result = Ok(());
        let count = self.ports.len();
        for (index, ((port, bound), state)) in std::mem::take(&mut self.ports)
            .into_iter()
            .zip(bound)
            .zip(states)
            .enumerate()
        {
            let ctx = PortContext {
                label: if count > 1 {
                    format!(" on {}", state.listen)
                } else {
                    String::new()
                },
                index,
                state,
                stop: self.stop.clone(),
            };
            let stop = self.stop.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("{}-port{index}", self.name))
                .spawn(move || {
                    let r = port.serve(ctx, &bound.listener);
                    if r.is_err() {
                        // One port failing ends the process: an operator sees it exit.
                        stop.stop();
                    }
                    drop(bound);
                    r
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    result = Err(DaemonError::Setup(e));
                    self.stop.stop();
                    break;
                }
            }
        }
        while !self.stop.wait(None) {}
        for t in threads {
            let r = t.join().unwrap_or_else(|_| {
                Err(DaemonError::Setup(io::Error::other(
                    "a port thread panicked",
                )))
            });
            if result.is_ok() {
                result = r;
            }
        }
        result
    }
}

/// Sends `WATCHDOG=1` every half `every` until the process stops.
fn spawn_watchdog(stop: StopHandle, every: Duration) -> io::Result<std::thread::JoinHandle<()>> {
    log::info!(
        "systemd watchdog: WATCHDOG=1 every {} ms",
        (every / 2).as_millis()
    );
    std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            loop {
                notify::notify("WATCHDOG=1");
                if stop.wait(Some(every / 2)) {
                    return;
                }
            }
        })
}

/// A one-port vhost-user daemon configured by [`CommonArgs`]: what blkback, netback and cdrom
/// run. It builds a [`Process`] (control socket from `--control` or systemd) with one [`Port`]
/// (from `--socket`, `--fd` or systemd).
pub struct Daemon {
    info: DeviceInfo,
    args: CommonArgs,
    process: Process,
    on_disconnect: Option<Box<dyn Fn() + Send>>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("info", &self.info)
            .field("args", &self.args)
            .finish_non_exhaustive()
    }
}

impl Daemon {
    /// A daemon for `info` configured by `args`, answering `control` commands.
    pub fn new(
        info: DeviceInfo,
        args: CommonArgs,
        control: Arc<dyn ControlHandler>,
    ) -> Result<Daemon, DaemonError> {
        Ok(Daemon {
            info,
            args,
            process: Process::new(info.name, control)?,
            on_disconnect: None,
        })
    }

    /// Do not install SIGTERM/SIGINT handlers (for tests and embedding); use
    /// [`Daemon::stop_handle`] instead.
    pub fn without_signal_handlers(mut self) -> Self {
        self.process = self.process.without_signal_handlers();
        self
    }

    /// Runs `f` after each front end disconnects, before the next one is accepted (a backend
    /// resets per-connection state there).
    pub fn on_disconnect(mut self, f: impl Fn() + Send + 'static) -> Self {
        self.on_disconnect = Some(Box::new(f));
        self
    }

    /// A handle that stops [`Daemon::run`] from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        self.process.stop_handle()
    }

    /// Serves front ends until stopped. Returns `Ok` after a clean shutdown.
    pub fn run<B: Servable>(self, backend: B) -> Result<(), DaemonError> {
        self.run_with(backend, |_| Ok(()))
    }

    /// Like [`Daemon::run`], calling `on_connection` with the worker threads' epoll handlers of
    /// each new connection (see [`Port::on_connection`]).
    pub fn run_with<B, F>(self, backend: B, on_connection: F) -> Result<(), DaemonError>
    where
        B: Servable,
        F: Fn(&[Arc<VringEpollHandler<B>>]) -> io::Result<()> + Send + 'static,
    {
        let (source, control_fd) = self.args.listen_source()?;
        let mut process = self.process;
        process = match (&self.args.control, control_fd) {
            (Some(p), _) => process.control_socket(
                p.clone(),
                SocketPerms {
                    mode: self.args.control_mode,
                    group: self.args.control_group,
                },
            ),
            (None, Some(fd)) => process.control_fd(fd),
            (None, None) => process,
        };
        let mut port = Port::new(source, backend).on_connection(on_connection);
        port.on_disconnect = self.on_disconnect;
        process.add_port(port);
        process.run()
    }
}

/// A port's serve loop: one front end at a time, served again after each disconnect, until
/// the process stops.
fn serve_loop<B: Servable>(
    port: Port<B>,
    ctx: &PortContext,
    listener: &UnixListener,
) -> Result<(), DaemonError> {
    let stop = &ctx.stop;
    let state = &ctx.state;
    let listen_desc = &state.listen;
    let epoll = Epoll::new().map_err(DaemonError::Setup)?;
    const LISTENER: u64 = 0;
    const STOP: u64 = 1;
    epoll
        .ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER),
        )
        .map_err(DaemonError::Setup)?;
    epoll
        .ctl(
            ControlOperation::Add,
            stop.inner.event.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP),
        )
        .map_err(DaemonError::Setup)?;

    let mut events = vec![EpollEvent::default(); 2];
    loop {
        if stop.is_stopping() {
            return Ok(());
        }
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(DaemonError::Setup(e)),
        };
        if events[..n].iter().any(|e| e.data() == STOP) || stop.is_stopping() {
            return Ok(());
        }
        // Nothing a client does ends the daemon: a connection that cannot be set up (no
        // descriptors left, a failed accept) is logged and retried after a pause, and the
        // front end waiting in the backlog is served once resources are back.
        let (mut conn, frontend) = match accept_frontend(listener, &port) {
            Ok(Some(c)) => c,
            Ok(None) => continue,
            Err(e) => {
                crate::warn_limited!(
                    "cannot take a front end connection on {listen_desc}: {e}; retrying"
                );
                stop.wait(Some(RETRY_PAUSE));
                continue;
            }
        };
        let frontend = Arc::new(frontend);
        let serial = state.connections.fetch_add(1, Ordering::AcqRel) + 1;
        state.connected.store(true, Ordering::Release);
        stop.lock_current().insert(ctx.index, frontend.clone());
        if stop.is_stopping() {
            let _ = frontend.shutdown(std::net::Shutdown::Both);
        }
        let who = {
            use std::os::fd::AsFd;
            crate::socket::peer_of(frontend.as_fd())
                .map_or_else(|| "peer unknown".to_owned(), |p| p.to_string())
        };
        let fe = format!("front end #{serial}{}", ctx.label);
        log::info!("{fe} connected ({who})");
        notify::status(&format!("serving front end #{serial} on {listen_desc}"));

        // The front end's requests are served on this thread until it hangs up (even
        // mid-message: that is how a front end ends a session) or a request is refused.
        match conn.serve(&frontend) {
            Ok(()) => log::info!("{fe} disconnected"),
            Err(e) => match e.unshared_memory() {
                Some(what) => log::error!(
                    "{fe} disconnected after an error: {e}: {what}; {UNSHARED_MEMORY_HINT}"
                ),
                None => log::warn!("{fe} disconnected after an error: {e}"),
            },
        }
        stop.lock_current().remove(&ctx.index);
        // Dropping the connection stops and joins its worker threads.
        drop(conn);
        drop(frontend);
        state.connected.store(false, Ordering::Release);
        if let Some(f) = &port.on_disconnect {
            f();
        }
        notify::status(&format!("waiting for a front end on {listen_desc}"));
    }
}

/// What to do when a front end's guest memory cannot be used by another process: QEMU's
/// default RAM is private (anonymous, or a memory backend without `share=on`).
pub const UNSHARED_MEMORY_HINT: &str = "guest memory is not shared: start QEMU with a shared \
     memory backend (-object memory-backend-memfd,id=mem,size=...,share=on -machine \
     memory-backend=mem)";

/// How long the serve loop waits before it retries a connection it could not set up.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// Why the next front end could not be taken.
#[derive(Debug, Error)]
enum AcceptError {
    /// Its vrings or worker threads could not be built.
    #[error("{0}")]
    Setup(#[from] SetupError),
    /// The device could not register its event sources with the worker threads.
    #[error("cannot register the device's event sources: {0}")]
    Register(io::Error),
    /// accept(2) failed.
    #[error("accept: {0}")]
    Accept(io::Error),
}

/// Builds the vhost-user connection for the next front end (vrings, worker threads) and
/// accepts it. `None` if nobody was waiting after all.
fn accept_frontend<B: Servable>(
    listener: &UnixListener,
    port: &Port<B>,
) -> Result<Option<(Connection<B>, UnixStream)>, AcceptError> {
    // Everything the connection needs comes first, the front end last: should resources
    // run out, it stays in the backlog until they are back.
    let conn = Connection::new(port.backend.clone())?;
    (port.on_connection)(conn.epoll_handlers()).map_err(AcceptError::Register)?;
    match listener.accept() {
        // accept(2) gives a blocking socket whatever the listener's mode.
        Ok((stream, _)) => Ok(Some((conn, stream))),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
        Err(e) => Err(AcceptError::Accept(e)),
    }
}

/// SIGTERM/SIGINT stop the daemon; a second one exits at once. SIGHUP (a closed terminal, or
/// an operator's habitual "reload") is logged and otherwise ignored: the configuration comes
/// from the command line, and logs go to stderr, so there is nothing to reload or reopen.
fn install_signal_handlers(stop: StopHandle) -> Result<(), DaemonError> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(DaemonError::Setup)?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if sig == SIGHUP {
                    log::info!(
                        "SIGHUP: ignored (the configuration comes from the command line and \
                         logs go to stderr: nothing to reload or reopen; restart the daemon \
                         to change its options)"
                    );
                    continue;
                }
                if stop.is_stopping() {
                    log::warn!("signal {sig} again while stopping: exiting now");
                    std::process::exit(1);
                }
                log::info!("signal {sig}: stopping");
                stop.stop();
            }
        })
        .map_err(DaemonError::Setup)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;
    use vhost::VhostBackend;
    use vhost::vhost_user::message::VhostUserProtocolFeatures;
    use vhost::vhost_user::{Frontend, VhostUserFrontend};
    use vmm_sys_util::epoll::EventSet;

    use crate::vhost_user::{Memory, VringRwLock};

    /// The smallest backend: one queue, no device logic; counts feature negotiations.
    #[derive(Clone, Default)]
    struct Nop {
        acked: Arc<AtomicUsize>,
    }

    impl VhostUserBackend for Nop {
        type Vring = VringRwLock<Memory>;
        fn num_queues(&self) -> usize {
            1
        }
        fn max_queue_size(&self) -> usize {
            256
        }
        fn features(&self) -> u64 {
            1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1
                | vhost::vhost_user::message::VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        }
        fn acked_features(&self, _f: u64) {
            self.acked.fetch_add(1, Ordering::AcqRel);
        }
        fn protocol_features(&self) -> VhostUserProtocolFeatures {
            VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK
        }
        fn set_event_idx(&self, _enabled: bool) {}
        fn update_memory(&self, _mem: Memory) -> std::io::Result<()> {
            Ok(())
        }
        fn handle_event(
            &self,
            _q: u16,
            _e: EventSet,
            _v: &[Self::Vring],
            _t: usize,
        ) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn args(socket: &std::path::Path, control: Option<&std::path::Path>) -> CommonArgs {
        CommonArgs {
            socket: Some(socket.to_owned()),
            fd: None,
            print_capabilities: false,
            control: control.map(Into::into),
            socket_mode: 0o600,
            socket_group: None,
            control_mode: 0o600,
            control_group: None,
            log_level: LogLevel::Info,
        }
    }

    const INFO: DeviceInfo = DeviceInfo {
        name: "nop",
        vhost_type: "block",
        features: &[],
    };

    fn wait_listening(path: &std::path::Path) {
        for _ in 0..500 {
            if path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("{} never appeared", path.display());
    }

    #[test]
    fn serves_again_after_each_disconnect_and_stops_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("vu.sock");
        let ctl = dir.path().join("ctl.sock");
        let backend = Nop::default();
        let acked = backend.acked.clone();
        let disconnects = Arc::new(AtomicUsize::new(0));
        let d2 = disconnects.clone();
        let daemon = Daemon::new(
            INFO,
            args(&sock, Some(&ctl)),
            Arc::new(crate::control::NoDeviceCommands),
        )
        .unwrap()
        .without_signal_handlers()
        .on_disconnect(move || {
            d2.fetch_add(1, Ordering::AcqRel);
        });
        let stop = daemon.stop_handle();
        let t = std::thread::spawn(move || daemon.run(backend));
        wait_listening(&sock);

        for round in 1..=3 {
            let mut fe = Frontend::connect(&sock, 1).expect("connect");
            fe.set_owner().unwrap();
            let features = fe.get_features().unwrap();
            assert_ne!(features & (1 << 32), 0, "VERSION_1 offered");
            fe.set_features(features).unwrap();
            let pf = fe.get_protocol_features().unwrap();
            assert!(pf.contains(VhostUserProtocolFeatures::CONFIG));
            let mut c = crate::control::ControlClient::connect(&ctl).unwrap();
            let st = c.call("status", Value::Null).unwrap();
            assert_eq!(st["daemon"]["frontend_connected"], true, "{st}");
            assert_eq!(st["daemon"]["connections"], round, "{st}");
            drop(fe);
            // The daemon notices the hang-up and is ready for the next front end.
            for _ in 0..500 {
                if disconnects.load(Ordering::Acquire) == round {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            assert_eq!(disconnects.load(Ordering::Acquire), round);
        }
        assert_eq!(acked.load(Ordering::Acquire), 3);

        // A front end that sends garbage ends only its own connection.
        {
            use std::io::Write;
            let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
            s.write_all(&[0xff; 7]).unwrap();
        }
        for _ in 0..500 {
            if disconnects.load(Ordering::Acquire) == 4 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(disconnects.load(Ordering::Acquire), 4);
        let fe = Frontend::connect(&sock, 1).expect("still serving");
        fe.set_owner().unwrap();
        assert!(fe.get_features().is_ok());

        // Stop while a front end is connected: the connection ends, run() returns, and the
        // socket files are gone.
        stop.stop();
        let r = t.join().unwrap();
        assert!(r.is_ok(), "{r:?}");
        assert!(!sock.exists(), "vhost-user socket removed");
        assert!(!ctl.exists(), "control socket removed");
        drop(fe);
    }

    #[test]
    fn refuses_a_socket_in_use_and_bad_fds() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("busy.sock");
        let _other = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let d = Daemon::new(
            INFO,
            args(&sock, None),
            Arc::new(crate::control::NoDeviceCommands),
        )
        .unwrap()
        .without_signal_handlers();
        let e = d.run(Nop::default()).unwrap_err();
        assert!(e.to_string().contains("in use by another process"), "{e}");

        let mut a = args(&sock, None);
        a.socket = None;
        a.fd = Some(1);
        let d = Daemon::new(INFO, a.clone(), Arc::new(crate::control::NoDeviceCommands))
            .unwrap()
            .without_signal_handlers();
        let e = d.run(Nop::default()).unwrap_err();
        assert!(e.to_string().starts_with("--fd 1: "), "{e}");

        a.fd = Some(9999);
        let d = Daemon::new(INFO, a.clone(), Arc::new(crate::control::NoDeviceCommands))
            .unwrap()
            .without_signal_handlers();
        let e = d.run(Nop::default()).unwrap_err();
        assert!(
            e.to_string().contains("no such open file descriptor"),
            "{e}"
        );

        // A regular file's descriptor is not a socket (and is not closed by the refusal).
        let f = std::fs::File::create(dir.path().join("f")).unwrap();
        a.fd = Some(f.as_raw_fd());
        let d = Daemon::new(INFO, a.clone(), Arc::new(crate::control::NoDeviceCommands))
            .unwrap()
            .without_signal_handlers();
        let e = d.run(Nop::default()).unwrap_err();
        assert!(e.to_string().contains("not a unix domain socket"), "{e}");
        assert!(f.metadata().is_ok());
    }

    #[test]
    fn serves_on_an_inherited_fd() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("inherited.sock");
        let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let fd = std::os::fd::IntoRawFd::into_raw_fd(l);
        let mut a = args(&sock, None);
        a.socket = None;
        a.fd = Some(fd);
        let d = Daemon::new(INFO, a, Arc::new(crate::control::NoDeviceCommands))
            .unwrap()
            .without_signal_handlers();
        let stop = d.stop_handle();
        let t = std::thread::spawn(move || d.run(Nop::default()));
        let fe = Frontend::connect(&sock, 1).unwrap();
        fe.set_owner().unwrap();
        assert!(fe.get_features().is_ok());
        stop.stop();
        assert!(t.join().unwrap().is_ok());
        assert!(
            sock.exists(),
            "an inherited socket's file belongs to whoever bound it"
        );
    }

    #[test]
    fn unshared_guest_memory_is_told_from_other_errors() {
        use crate::vhost_user::{ConnectionError, RequestError};
        let refused = |source| ConnectionError::Refused {
            request: "SET_MEM_TABLE",
            source,
        };
        let mmap = refused(RequestError::Map {
            gpa: 0,
            size: 1 << 20,
            source: vm_memory::mmap::MmapRegionError::Mmap(io::Error::from_raw_os_error(
                libc::ENODEV,
            )),
        });
        assert!(mmap.unshared_memory().is_some());
        // Ring addresses refused while no memory was ever mapped: QEMU with private RAM.
        assert!(
            refused(RequestError::NoGuestMemory { ring: 0 })
                .unshared_memory()
                .is_some()
        );
        // Ring addresses outside the memory that was mapped are a plain bad request.
        let outside = refused(RequestError::OutsideMemory {
            ring: 0,
            what: "descriptor table",
            addr: 0x1000,
        });
        assert!(outside.unshared_memory().is_none());
        assert!(
            refused(RequestError::Device(io::Error::other("no")))
                .unshared_memory()
                .is_none()
        );
        assert!(ConnectionError::TooManyFds.unshared_memory().is_none());
    }

    #[test]
    fn capabilities_document() {
        let info = DeviceInfo {
            name: "blkback",
            vhost_type: "block",
            features: &["read-only"],
        };
        let v: Value = serde_json::from_str(&info.capabilities_json()).unwrap();
        assert_eq!(v, json!({"type": "block", "features": ["read-only"]}));
    }

    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        for _ in 0..500 {
            if cond() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("{what}: timed out");
    }

    fn status(ctl: &std::path::Path) -> Value {
        crate::control::ControlClient::connect(ctl)
            .unwrap()
            .call("status", Value::Null)
            .unwrap()
    }

    /// Connects a front end to `sock` and negotiates features.
    fn frontend(sock: &std::path::Path) -> Frontend {
        let fe = Frontend::connect(sock, 1).expect("connect");
        fe.set_owner().unwrap();
        let features = fe.get_features().unwrap();
        fe.set_features(features).unwrap();
        fe
    }

    #[test]
    fn one_process_serves_two_ports_that_reconnect_independently() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, ctl) = (
            dir.path().join("a.sock"),
            dir.path().join("b.sock"),
            dir.path().join("ctl.sock"),
        );
        let (na, nb) = (Nop::default(), Nop::default());
        let (acked_a, acked_b) = (na.acked.clone(), nb.acked.clone());
        let gone_a = Arc::new(AtomicUsize::new(0));
        let gone_b = Arc::new(AtomicUsize::new(0));
        let (ga, gb) = (gone_a.clone(), gone_b.clone());
        let sandboxed = Arc::new(AtomicBool::new(false));
        let sb = sandboxed.clone();
        let (a2, b2, ctl2) = (a.clone(), b.clone(), ctl.clone());
        let mut process = Process::new("nop2", Arc::new(crate::control::NoDeviceCommands))
            .unwrap()
            .without_signal_handlers()
            .control_socket(ctl.clone(), SocketPerms::default())
            .before_serving(move || {
                // The hook runs once every socket is open.
                assert!(a2.exists() && b2.exists() && ctl2.exists());
                sb.store(true, Ordering::Release);
                Ok(())
            });
        process.add_port(
            Port::new(ListenSource::Path(a.clone(), SocketPerms::default()), na).on_disconnect(
                move || {
                    ga.fetch_add(1, Ordering::AcqRel);
                },
            ),
        );
        process.add_port(
            Port::new(ListenSource::Path(b.clone(), SocketPerms::default()), nb).on_disconnect(
                move || {
                    gb.fetch_add(1, Ordering::AcqRel);
                },
            ),
        );
        let stop = process.stop_handle();
        let t = std::thread::spawn(move || process.run());
        wait_listening(&a);
        wait_listening(&b);
        assert!(
            sandboxed.load(Ordering::Acquire),
            "the hook ran before serving"
        );

        // Both ports serve a front end at the same time.
        let fe_a = frontend(&a);
        let fe_b = frontend(&b);
        let st = status(&ctl);
        assert_eq!(st["daemon"]["ports"][0]["frontend_connected"], true, "{st}");
        assert_eq!(st["daemon"]["ports"][1]["frontend_connected"], true, "{st}");
        assert_eq!(st["daemon"]["socket"], a.display().to_string(), "{st}");
        assert_eq!(st["daemon"]["ports"][1]["socket"], b.display().to_string());

        // Port a reconnects twice while port b keeps its front end.
        drop(fe_a);
        wait_for("a's first disconnect", || {
            gone_a.load(Ordering::Acquire) == 1
        });
        let fe_a = frontend(&a);
        drop(fe_a);
        wait_for("a's second disconnect", || {
            gone_a.load(Ordering::Acquire) == 2
        });
        assert_eq!(gone_b.load(Ordering::Acquire), 0, "b was not disturbed");
        assert!(fe_b.get_features().is_ok(), "b still served");
        let st = status(&ctl);
        assert_eq!(st["daemon"]["ports"][0]["connections"], 2, "{st}");
        assert_eq!(
            st["daemon"]["ports"][0]["frontend_connected"], false,
            "{st}"
        );
        assert_eq!(st["daemon"]["ports"][1]["connections"], 1, "{st}");
        assert_eq!(st["daemon"]["ports"][1]["frontend_connected"], true, "{st}");
        assert_eq!(
            st["daemon"]["connections"], 2,
            "first port at the top level: {st}"
        );

        // Then b reconnects on its own.
        drop(fe_b);
        wait_for("b's disconnect", || gone_b.load(Ordering::Acquire) == 1);
        let fe_b = frontend(&b);
        let fe_a = frontend(&a);
        // SET_FEATURES has no reply: wait until each port's backend saw it.
        wait_for("a's third feature ack", || {
            acked_a.load(Ordering::Acquire) == 3
        });
        wait_for("b's second feature ack", || {
            acked_b.load(Ordering::Acquire) == 2
        });

        // One stop ends both connections and both ports; every socket file is removed.
        stop.stop();
        let r = t.join().unwrap();
        assert!(r.is_ok(), "{r:?}");
        for p in [&a, &b, &ctl] {
            assert!(!p.exists(), "{} removed", p.display());
        }
        assert_eq!(gone_a.load(Ordering::Acquire), 3);
        assert_eq!(gone_b.load(Ordering::Acquire), 2);
        drop((fe_a, fe_b));
    }

    #[test]
    fn a_process_without_ports_answers_its_control_socket_and_stops() {
        let dir = tempfile::tempdir().unwrap();
        let ctl = dir.path().join("ctl.sock");
        let process = Process::new("portless", Arc::new(crate::control::NoDeviceCommands))
            .unwrap()
            .without_signal_handlers()
            .control_socket(ctl.clone(), SocketPerms::default());
        let stop = process.stop_handle();
        let t = std::thread::spawn(move || process.run());
        wait_listening(&ctl);
        let st = status(&ctl);
        assert_eq!(st["daemon"]["name"], "portless", "{st}");
        assert_eq!(st["daemon"]["ports"], json!([]), "{st}");
        assert!(st["daemon"].get("socket").is_none(), "{st}");
        stop.stop();
        assert!(t.join().unwrap().is_ok());
        assert!(!ctl.exists(), "control socket removed");
    }

    #[test]
    fn a_failing_sandbox_hook_serves_nothing_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("vu.sock");
        let mut process = Process::new("nop", Arc::new(crate::control::NoDeviceCommands))
            .unwrap()
            .without_signal_handlers()
            .before_serving(|| Err(io::Error::other("no landlock")));
        process.add_port(Port::new(
            ListenSource::Path(sock.clone(), SocketPerms::default()),
            Nop::default(),
        ));
        let e = process.run().unwrap_err();
        assert!(e.to_string().contains("cannot enter the sandbox"), "{e}");
        assert!(e.to_string().contains("no landlock"), "{e}");
        assert!(!sock.exists(), "the socket it bound is removed");
    }

    #[test]
    fn no_socket_is_a_clear_error() {
        let mut a = args(std::path::Path::new("/x"), None);
        a.socket = None;
        // LISTEN_PID never matches this test process, so activation is not used.
        let e = a.listen_source().unwrap_err();
        assert!(e.to_string().contains("--socket PATH"), "{e}");
    }
}
