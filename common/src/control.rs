//! The control protocol: line-delimited JSON over a unix stream socket.
//!
//! Each request is one line, a JSON object with a command name and optional arguments:
//!
//! ```text
//! {"cmd":"status"}
//! {"cmd":"resize","args":{"size":"20G"}}
//! ```
//!
//! Each reply is one line:
//!
//! ```text
//! {"ok":true,"data":{...}}
//! {"ok":false,"error":{"kind":"unknown-command","message":"..."}}
//! ```
//!
//! A connection may carry any number of requests; replies come in order. Every daemon answers
//! `help` (the commands it knows), `status` and `stats`; each backend adds its own commands
//! through [`ControlHandler`]. `vbctl` and the tests use [`ControlClient`].

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};

use vback_api::{LabeledHistogram, PROTOCOL_VERSION, Stats, counters_from_device};

use crate::socket::{BindError, SocketPerms, bind_unix_with};

/// The longest request line a server reads (64 KiB); a longer one gets an error reply and the
/// connection is closed.
pub const MAX_LINE: usize = 64 * 1024;

pub use vback_api::{ControlError, ErrorKind, Reply, Request};

/// A command a backend adds, for `help`.
#[derive(Debug, Clone, Serialize)]
pub struct CommandInfo {
    /// Command name.
    pub name: &'static str,
    /// Arguments, e.g. `size=SIZE [force=true]`: the names before `=` are the only ones the
    /// command accepts (any other is refused before it runs), unless the text contains `...`.
    pub args: &'static str,
    /// One sentence.
    pub help: &'static str,
}

/// What a backend plugs into the control socket.
pub trait ControlHandler: Send + Sync {
    /// Device state for `status` (merged under `"device"`).
    fn status(&self) -> Value {
        Value::Null
    }

    /// Counters for `stats` (merged under `"device"`; the reply's uniform `counters` are
    /// derived from it).
    fn stats(&self) -> Value {
        Value::Null
    }

    /// Latency histograms for `stats` (under `"histograms"`).
    fn histograms(&self) -> Vec<LabeledHistogram> {
        Vec::new()
    }

    /// The backend's own commands, for `help`.
    fn commands(&self) -> Vec<CommandInfo> {
        Vec::new()
    }

    /// Runs a backend command; `None` means the command is unknown.
    fn handle(&self, _cmd: &str, _args: &Value) -> Option<Result<Value, ControlError>> {
        None
    }
}

/// A handler with no device commands.
#[derive(Debug, Default)]
pub struct NoDeviceCommands;
impl ControlHandler for NoDeviceCommands {}

/// Daemon-wide facts every `status` reply carries.
pub trait DaemonInfo: Send + Sync {
    /// The `"daemon"` part of `status`.
    fn daemon_status(&self) -> Value;
}

/// Dispatches one parsed request: the built-in commands first, then the backend's.
pub fn dispatch(
    daemon: &dyn DaemonInfo,
    handler: &dyn ControlHandler,
    req: &Request,
) -> Result<Value, ControlError> {
    if !(req.args.is_null() || req.args.is_object()) {
        return Err(ControlError::new(
            ErrorKind::BadRequest,
            "`args` must be a JSON object",
        ));
    }
    let builtin = matches!(req.cmd.as_str(), "help" | "status" | "stats");
    let declared = if builtin {
        Some(String::new())
    } else {
        handler
            .commands()
            .iter()
            .find(|c| c.name == req.cmd)
            .map(|c| c.args.to_owned())
    };
    if let (Some(declared), Some(given)) = (declared, req.args.as_object()) {
        check_arguments(&req.cmd, &declared, given)?;
    }
    match req.cmd.as_str() {
        "help" => {
            let mut cmds = vec![
                json!({"name": "help", "args": "", "help": "List the commands this daemon answers."}),
                json!({"name": "status", "args": "", "help": "Daemon and device state."}),
                json!({"name": "stats", "args": "", "help": "Counters (requests, bytes, errors)."}),
            ];
            for c in handler.commands() {
                cmds.push(serde_json::to_value(c).unwrap_or(Value::Null));
            }
            Ok(json!({ "protocol": PROTOCOL_VERSION, "commands": cmds }))
        }
        "status" => Ok(json!({
            "daemon": daemon.daemon_status(),
            "device": handler.status(),
        })),
        "stats" => {
            let device = handler.stats();
            let stats = Stats {
                counters: counters_from_device(&device),
                histograms: handler.histograms(),
                device,
            };
            serde_json::to_value(stats).map_err(|e| {
                ControlError::new(
                    ErrorKind::Failed,
                    format!("the stats could not be encoded: {e}"),
                )
            })
        }
        cmd => handler.handle(cmd, &req.args).unwrap_or_else(|| {
            let mut known: Vec<&str> = vec!["help", "status", "stats"];
            let extra = handler.commands();
            known.extend(extra.iter().map(|c| c.name));
            Err(ControlError::new(
                ErrorKind::UnknownCommand,
                format!(
                    "unknown command `{cmd}`; this daemon answers: {}",
                    known.join(", ")
                ),
            ))
        }),
    }
}

/// The argument names in a [`CommandInfo::args`] string (`path=PATH [force=true]` → path,
/// force).
fn argument_names(declared: &str) -> Vec<&str> {
    declared
        .split_whitespace()
        .map(|t| t.trim_start_matches('[').trim_end_matches(']'))
        .filter_map(|t| t.split('=').next())
        .filter(|n| !n.is_empty())
        .collect()
}

/// Refuses an argument the command does not take, naming it and the ones it does.
fn check_arguments(
    cmd: &str,
    declared: &str,
    given: &serde_json::Map<String, Value>,
) -> Result<(), ControlError> {
    if declared.contains("...") {
        // Free-form (`KEY=VALUE...`): the command checks its own arguments.
        return Ok(());
    }
    let names = argument_names(declared);
    if let Some(bad) = given.keys().find(|k| !names.contains(&k.as_str())) {
        let takes = if names.is_empty() {
            "it takes no arguments".to_owned()
        } else {
            format!("it takes: {declared}")
        };
        return Err(ControlError::bad_argument(format!(
            "{cmd} does not take an argument `{bad}`; {takes}"
        )));
    }
    Ok(())
}

/// Handles one request line and returns the reply line (without the newline).
pub fn handle_line(daemon: &dyn DaemonInfo, handler: &dyn ControlHandler, line: &str) -> String {
    let reply = match serde_json::from_str::<Request>(line) {
        Ok(req) => Reply::from_result(dispatch(daemon, handler, &req)),
        Err(e) => Reply::from_result(Err(ControlError::new(
            ErrorKind::BadRequest,
            format!(
                "the request is not a JSON object like {{\"cmd\":\"status\"}}: {e} (at column {})",
                e.column()
            ),
        ))),
    };
    serde_json::to_string(&reply).unwrap_or_else(|_| {
        r#"{"ok":false,"error":{"kind":"failed","message":"reply could not be encoded"}}"#.into()
    })
}

/// How many clients a control server serves at once, and how long it waits for them.
#[derive(Debug, Clone, Copy)]
pub struct ControlLimits {
    /// Connections served at once; one more is kept for the operator (a peer running as root
    /// or as the daemon's own user), so a flood of idle clients cannot lock them out.
    pub max_connections: usize,
    /// A connection with no request in progress is closed after this long.
    pub idle: Duration,
    /// A request line must arrive whole within this long of its first byte.
    pub request: Duration,
}

impl Default for ControlLimits {
    fn default() -> Self {
        ControlLimits {
            max_connections: 16,
            idle: Duration::from_secs(60),
            request: Duration::from_secs(10),
        }
    }
}

/// A running control server. Dropping it stops accepting and removes the socket file (if it
/// created one).
#[derive(Debug)]
pub struct ControlServer {
    path: Option<PathBuf>,
    stop: Arc<AtomicBool>,
}

impl ControlServer {
    /// Listens on `path` and serves requests on background threads.
    pub fn start(
        path: &Path,
        daemon: Arc<dyn DaemonInfo>,
        handler: Arc<dyn ControlHandler>,
    ) -> Result<ControlServer, BindError> {
        Self::start_with(
            path,
            daemon,
            handler,
            SocketPerms::default(),
            ControlLimits::default(),
        )
    }

    /// [`ControlServer::start`] with the socket's mode and group, and other limits than the
    /// defaults.
    pub fn start_with(
        path: &Path,
        daemon: Arc<dyn DaemonInfo>,
        handler: Arc<dyn ControlHandler>,
        perms: SocketPerms,
        limits: ControlLimits,
    ) -> Result<ControlServer, BindError> {
        let listener = bind_unix_with(path, perms)?;
        Ok(Self::serve(
            listener,
            Some(path.to_owned()),
            daemon,
            handler,
            limits,
        ))
    }

    /// Serves on an inherited listener (systemd socket activation); the file is not removed.
    pub fn from_listener(
        listener: UnixListener,
        daemon: Arc<dyn DaemonInfo>,
        handler: Arc<dyn ControlHandler>,
    ) -> ControlServer {
        Self::serve(listener, None, daemon, handler, ControlLimits::default())
    }

    fn serve(
        listener: UnixListener,
        path: Option<PathBuf>,
        daemon: Arc<dyn DaemonInfo>,
        handler: Arc<dyn ControlHandler>,
        limits: ControlLimits,
    ) -> ControlServer {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let active = Arc::new(AtomicUsize::new(0));
        let spawned = thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                loop {
                    let conn = listener.accept();
                    if stop2.load(Ordering::Acquire) {
                        break;
                    }
                    let conn = match conn {
                        Ok((c, _)) => c,
                        Err(e) => {
                            // Out of descriptors or memory: not the end of the daemon. Wait
                            // for resources to come back and accept again.
                            crate::warn_limited!("control socket: accept failed: {e}; retrying");
                            thread::sleep(Duration::from_millis(100));
                            continue;
                        }
                    };
                    admit(conn, &active, limits, &daemon, &handler);
                }
            });
        if let Err(e) = spawned {
            log::error!("cannot start the control thread: {e}");
        }
        ControlServer { path, stop }
    }
}

/// Whether the peer is the operator: root or the daemon's own user.
fn peer_is_operator(conn: &UnixStream) -> bool {
    use std::os::fd::AsFd;
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    let me = unsafe { libc::geteuid() };
    crate::socket::peer_of(conn.as_fd()).is_some_and(|p| p.uid == 0 || p.uid == me)
}

/// Serves `conn` on its own thread if there is room, else refuses it with a reply.
fn admit(
    conn: UnixStream,
    active: &Arc<AtomicUsize>,
    limits: ControlLimits,
    daemon: &Arc<dyn DaemonInfo>,
    handler: &Arc<dyn ControlHandler>,
) {
    let _ = conn.set_write_timeout(Some(limits.request));
    let now = active.load(Ordering::Acquire);
    let room =
        now < limits.max_connections || (now == limits.max_connections && peer_is_operator(&conn));
    if !room {
        crate::warn_limited!(
            "control socket: refusing a client, {now} connections are open (the most served at once)"
        );
        let reply = Reply::from_result(Err(ControlError::new(
            ErrorKind::Busy,
            format!(
                "this daemon already serves {now} control connections, the most it serves at \
                 once; close idle clients (they are closed after {} s) and try again",
                limits.idle.as_secs()
            ),
        )));
        let mut conn = conn;
        let _ = writeln!(
            conn,
            "{}",
            serde_json::to_string(&reply).unwrap_or_default()
        );
        return;
    }
    active.fetch_add(1, Ordering::AcqRel);
    let (d, h, a) = (daemon.clone(), handler.clone(), active.clone());
    let spawned = thread::Builder::new()
        .name("control-conn".into())
        .spawn(move || {
            serve_connection(conn, &*d, &*h, limits);
            a.fetch_sub(1, Ordering::AcqRel);
        });
    if let Err(e) = spawned {
        active.fetch_sub(1, Ordering::AcqRel);
        crate::warn_limited!("control socket: cannot start a thread for a client: {e}");
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(p) = &self.path {
            // Wake the accept loop so it sees the stop flag, then remove the file.
            let _ = UnixStream::connect(p);
            let _ = std::fs::remove_file(p);
        }
    }
}

fn serve_connection(
    mut conn: UnixStream,
    daemon: &dyn DaemonInfo,
    handler: &dyn ControlHandler,
    limits: ControlLimits,
) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 4096];
    // When the connection last went idle, and when the request being read began.
    let mut idle_since = Instant::now();
    let mut request_since: Option<Instant> = None;
    loop {
        // Answer every complete line already read.
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            if nl > MAX_LINE {
                break;
            }
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let text = String::from_utf8_lossy(&line);
            let text = text.trim();
            if !text.is_empty() {
                let reply = handle_line(daemon, handler, text);
                if writeln!(conn, "{reply}").is_err() {
                    return;
                }
            }
            idle_since = Instant::now();
            request_since = (!buf.is_empty()).then(Instant::now);
        }
        if buf.len() > MAX_LINE {
            let reply = Reply::from_result(Err(ControlError::new(
                ErrorKind::BadRequest,
                format!("request line longer than {MAX_LINE} bytes; closing the connection"),
            )));
            let _ = writeln!(
                conn,
                "{}",
                serde_json::to_string(&reply).unwrap_or_default()
            );
            return;
        }
        let deadline = match request_since {
            Some(t) => t + limits.request,
            None => idle_since + limits.idle,
        };
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            if request_since.is_some() {
                let reply = Reply::from_result(Err(ControlError::new(
                    ErrorKind::BadRequest,
                    format!(
                        "the request did not arrive whole within {} s; closing the connection",
                        limits.request.as_secs()
                    ),
                )));
                let _ = writeln!(
                    conn,
                    "{}",
                    serde_json::to_string(&reply).unwrap_or_default()
                );
            }
            return;
        };
        if left.is_zero() || conn.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match conn.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => {
                if buf.is_empty() && request_since.is_none() {
                    request_since = Some(Instant::now());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // A timeout: the loop finds the deadline passed and closes.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

pub use vback_api::client::{ClientError, ControlClient};

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::sync::Mutex;

    struct Info;
    impl DaemonInfo for Info {
        fn daemon_status(&self) -> Value {
            json!({"name": "test"})
        }
    }

    #[derive(Default)]
    struct Dev {
        size: Mutex<u64>,
    }
    impl ControlHandler for Dev {
        fn status(&self) -> Value {
            json!({"size": *self.size.lock().unwrap()})
        }
        fn stats(&self) -> Value {
            json!({"reads": 7})
        }
        fn commands(&self) -> Vec<CommandInfo> {
            vec![CommandInfo {
                name: "resize",
                args: "size=BYTES",
                help: "Change the capacity.",
            }]
        }
        fn handle(&self, cmd: &str, args: &Value) -> Option<Result<Value, ControlError>> {
            (cmd == "resize").then(|| {
                let size = args
                    .get("size")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| ControlError::bad_argument("resize needs size=BYTES"))?;
                *self.size.lock().unwrap() = size;
                Ok(json!({"size": size}))
            })
        }
    }

    fn reply(line: &str) -> Reply {
        serde_json::from_str(&handle_line(&Info, &Dev::default(), line)).unwrap()
    }

    #[test]
    fn unknown_arguments_are_refused_by_name() {
        let r = reply(r#"{"cmd":"resize","args":{"sise":"20G"}}"#);
        let e = r.error.unwrap();
        assert_eq!(e.kind, ErrorKind::BadArgument);
        assert!(e.message.contains("`sise`"), "{}", e.message);
        assert!(e.message.contains("size=BYTES"), "{}", e.message);
        let r = reply(r#"{"cmd":"resize","args":{"size":1,"bogus":1}}"#);
        assert!(r.error.unwrap().message.contains("`bogus`"));
        let r = reply(r#"{"cmd":"status","args":{"verbose":true}}"#);
        assert!(r.error.unwrap().message.contains("takes no arguments"));
        assert!(reply(r#"{"cmd":"resize","args":{"size":5}}"#).ok);
        assert_eq!(argument_names("path=PATH [force=true]"), ["path", "force"]);
    }

    #[test]
    fn builtin_commands() {
        let r = reply(r#"{"cmd":"status"}"#);
        assert!(r.ok);
        assert_eq!(
            r.data.unwrap(),
            json!({"daemon": {"name": "test"}, "device": {"size": 0}})
        );
        let r = reply(r#"{"cmd":"stats"}"#);
        let data = r.data.unwrap();
        assert_eq!(data["device"]["reads"], 7);
        // The typed reply: the same counters, uniform.
        let stats: vback_api::Stats = vback_api::decode("stats", data).unwrap();
        assert_eq!(stats.counters.len(), 1);
        assert_eq!(
            (stats.counters[0].name.as_str(), stats.counters[0].value),
            ("reads", 7)
        );
        assert!(stats.histograms.is_empty());
        let r = reply(r#"{"cmd":"help"}"#);
        let help: vback_api::Help = vback_api::decode("help", r.data.unwrap()).unwrap();
        assert_eq!(help.protocol, vback_api::PROTOCOL_VERSION);
        let names: Vec<&str> = help.commands.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["help", "status", "stats", "resize"]);
    }

    #[test]
    fn malformed_requests_get_error_replies() {
        for (line, kind, says) in [
            ("not json", ErrorKind::BadRequest, "column"),
            ("[1,2]", ErrorKind::BadRequest, "JSON object"),
            (r#"{"command":"status"}"#, ErrorKind::BadRequest, "cmd"),
            (r#"{"cmd":5}"#, ErrorKind::BadRequest, "JSON object"),
            (
                r#"{"cmd":"status","args":[1]}"#,
                ErrorKind::BadRequest,
                "args",
            ),
            (
                r#"{"cmd":"frobnicate"}"#,
                ErrorKind::UnknownCommand,
                "`frobnicate`",
            ),
            (r#"{"cmd":"resize"}"#, ErrorKind::BadArgument, "size=BYTES"),
            (
                r#"{"cmd":"resize","args":{"size":"big"}}"#,
                ErrorKind::BadArgument,
                "size",
            ),
        ] {
            let r = reply(line);
            assert!(!r.ok, "{line}");
            let e = r.error.unwrap();
            assert_eq!(e.kind, kind, "{line}: {}", e.message);
            assert!(e.message.contains(says), "{line}: {}", e.message);
        }
        // The unknown-command message lists what is known.
        let e = reply(r#"{"cmd":"x"}"#).error.unwrap();
        assert!(
            e.message.contains("help, status, stats, resize"),
            "{}",
            e.message
        );
    }

    #[test]
    fn server_and_client_over_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let server = ControlServer::start(&path, Arc::new(Info), Arc::new(Dev::default())).unwrap();

        // A second server on the same live path is refused.
        let e = ControlServer::start(&path, Arc::new(Info), Arc::new(Dev::default())).unwrap_err();
        assert!(matches!(e, BindError::InUse { .. }), "{e}");

        let mut c = ControlClient::connect(&path).unwrap();
        assert_eq!(
            c.call("resize", json!({"size": 4096})).unwrap(),
            json!({"size": 4096})
        );
        assert_eq!(
            c.call("status", Value::Null).unwrap()["device"]["size"],
            4096
        );
        match c.call("nope", Value::Null) {
            Err(ClientError::Command(e)) => assert_eq!(e.kind, ErrorKind::UnknownCommand),
            other => panic!("{other:?}"),
        }
        // Garbage does not kill the connection.
        let raw = c.raw("}{").unwrap();
        assert!(raw.contains("bad-request"), "{raw}");
        assert!(c.call("stats", Value::Null).is_ok());

        // An over-long line gets an error and the connection closes; the server lives on.
        let long = "x".repeat(MAX_LINE + 10);
        let raw = c.raw(&long).unwrap();
        assert!(raw.contains("longer than"), "{raw}");
        let mut c2 = ControlClient::connect(&path).unwrap();
        assert!(c2.call("status", Value::Null).is_ok());

        drop(server);
        assert!(!path.exists(), "the socket file is removed on drop");
        let e = ControlClient::connect(&path).unwrap_err();
        assert!(e.to_string().contains("--control"), "{e}");
    }

    #[test]
    fn a_stale_socket_is_replaced_and_a_regular_file_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stale.sock");
        drop(UnixListener::bind(&path).unwrap()); // leaves a dead socket file
        let _s = ControlServer::start(&path, Arc::new(Info), Arc::new(NoDeviceCommands)).unwrap();
        assert!(
            ControlClient::connect(&path)
                .unwrap()
                .call("help", Value::Null)
                .is_ok()
        );

        let file = dir.path().join("file");
        std::fs::write(&file, b"precious").unwrap();
        let e =
            ControlServer::start(&file, Arc::new(Info), Arc::new(NoDeviceCommands)).unwrap_err();
        assert!(matches!(e, BindError::NotASocket { .. }), "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"precious");
    }
    /// Reads one reply line from a raw connection (None: the server closed it). Waiting
    /// 10 s for either is a failure.
    fn read_reply(c: &UnixStream) -> Option<String> {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut line = String::new();
        match BufReader::new(c).read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(line),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => None,
            Err(e) => panic!("no reply and not closed within 10 s: {e}"),
        }
    }

    /// A server taking 4 connections (+1 for the operator) with the given timeouts.
    fn limited_server(
        idle: Duration,
        request: Duration,
    ) -> (tempfile::TempDir, PathBuf, ControlServer) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let limits = ControlLimits {
            max_connections: 4,
            idle,
            request,
        };
        let s = ControlServer::start_with(
            &path,
            Arc::new(Info),
            Arc::new(NoDeviceCommands),
            SocketPerms::default(),
            limits,
        )
        .unwrap();
        (dir, path, s)
    }

    #[test]
    fn connections_are_capped_with_a_slot_kept_for_the_operator() {
        let (_dir, path, _s) = limited_server(Duration::from_secs(60), Duration::from_secs(10));
        // Idle clients fill the general slots, and the test (root or the daemon's own user:
        // the operator) still gets the kept one.
        let mut idle = Vec::new();
        for _ in 0..4 {
            let mut c = UnixStream::connect(&path).unwrap();
            writeln!(c, r#"{{"cmd":"help"}}"#).unwrap();
            assert!(read_reply(&c).unwrap().contains(r#""ok":true"#));
            idle.push(c);
        }
        let mut op = ControlClient::connect(&path).unwrap();
        assert!(
            op.call("status", Value::Null).is_ok(),
            "the operator's slot"
        );
        // Past that, a client is refused with a reply that says why.
        let c = UnixStream::connect(&path).unwrap();
        let r = read_reply(&c).expect("a refusal reply");
        assert!(r.contains(r#""kind":"busy""#), "{r}");
        assert!(r.contains("control connections"), "{r}");
        assert!(read_reply(&c).is_none(), "and the connection is closed");
        // Closing one makes room again.
        drop(idle.pop());
        let mut again = None;
        for _ in 0..200 {
            if let Ok(mut c) = ControlClient::connect(&path)
                && c.call("help", Value::Null).is_ok()
            {
                again = Some(c);
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(again.is_some(), "a slot came back");
        drop(op);
    }

    #[test]
    fn idle_and_slow_clients_are_closed() {
        let (_dir, path, _s) =
            limited_server(Duration::from_millis(300), Duration::from_millis(300));
        // An idle client is closed without a word.
        let c = UnixStream::connect(&path).unwrap();
        assert!(read_reply(&c).is_none(), "closed when idle");
        // One that answers first, then idles, too.
        let mut c = UnixStream::connect(&path).unwrap();
        writeln!(c, r#"{{"cmd":"help"}}"#).unwrap();
        assert!(read_reply(&c).unwrap().contains(r#""ok":true"#));
        assert!(read_reply(&c).is_none(), "closed when idle after a request");
        // A client trickling a request byte by byte never completes it.
        let mut c = UnixStream::connect(&path).unwrap();
        let reader = c.try_clone().unwrap();
        let t = std::thread::spawn(move || read_reply(&reader));
        for b in br#"{"cmd":"help"}"# {
            if c.write_all(&[*b]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let r = t.join().unwrap().expect("a reply that says why");
        assert!(r.contains("did not arrive whole"), "{r}");
    }
}
