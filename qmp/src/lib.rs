//! A QMP client, hand-written and small: QEMU 10's schema moves faster than the `qapi` crate,
//! and vback needs a handful of commands (`chardev-add`, `device_add`, `device_del`,
//! `migrate`, `query-*`) and events (`DEVICE_DELETED`, `MIGRATION`, `SHUTDOWN`).
//!
//! The protocol (QEMU's `docs/interop/qmp-spec.rst`): the server greets with
//! `{"QMP": {"version": ..., "capabilities": [...]}}`; the client leaves capabilities
//! negotiation with `qmp_capabilities`; then each command `{"execute", "arguments", "id"}` gets
//! exactly one reply with the same `id`, `{"return": ...}` or `{"error": {"class", "desc"}}`,
//! and asynchronous events `{"event", "data", "timestamp"}` may come at any time in between.
//! This client sends one command at a time, keeps the events it reads while waiting for a
//! reply (in order, for [`Qmp::wait_event`]), and gives up after its timeout with an error
//! that says what it waited for.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use thiserror::Error;

/// Why a QMP exchange failed.
#[derive(Debug, Error)]
pub enum QmpError {
    /// The socket could not be reached.
    #[error("cannot connect to QMP at {path}: {source} (is the VMM running with -qmp unix:{path},server=on,wait=off?)", path = path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("QMP {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The VMM closed the connection (it quit, or another client took the socket).
    #[error("QMP: the VMM closed the connection while {0}")]
    Closed(String),
    /// Nothing came in time.
    #[error("QMP: no {what} within {secs} s", secs = timeout.as_secs_f64())]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        timeout: Duration,
    },
    /// The server said something that is not QMP.
    #[error("QMP: unexpected message `{line}`: {reason}")]
    Protocol {
        /// The line (cut to 200 bytes).
        line: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The command failed in the VMM.
    #[error("QMP {command} failed: {desc} ({class})")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class (`GenericError`, `DeviceNotFound`, ...).
        class: String,
        /// QEMU's message.
        desc: String,
    },
}

/// What the server greeted with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    /// QEMU's version, as `major.minor.micro`.
    pub version: String,
    /// Capabilities the server offers (none are enabled by this client).
    pub capabilities: Vec<String>,
}

/// A QMP connection, past the capabilities negotiation.
#[derive(Debug)]
pub struct Qmp<S: std::io::Read + Write = UnixStream> {
    reader: BufReader<S>,
    writer: S,
    timeout: Duration,
    next_id: u64,
    events: VecDeque<Value>,
    greeting: Greeting,
    /// Sets the read timeout of the stream (sockets), or nothing (test streams).
    set_timeout: fn(&S, Duration),
}

impl Qmp<UnixStream> {
    /// Connects to the QMP socket at `path`, reads the greeting and negotiates; every later
    /// wait gives up after `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp<UnixStream>, QmpError> {
        let s = UnixStream::connect(path).map_err(|source| QmpError::Connect {
            path: path.to_owned(),
            source,
        })?;
        let w = s.try_clone().map_err(|source| QmpError::Io {
            what: "dup".into(),
            source,
        })?;
        Qmp::over(s, w, timeout, |s, t| {
            let _ = s.set_read_timeout(Some(t.max(Duration::from_millis(1))));
        })
    }
}

impl<S: std::io::Read + Write> Qmp<S> {
    /// A connection over `reader`/`writer` (two handles of one stream); `set_timeout` bounds
    /// each read on `reader`.
    pub fn over(
        reader: S,
        writer: S,
        timeout: Duration,
        set_timeout: fn(&S, Duration),
    ) -> Result<Qmp<S>, QmpError> {
        let mut q = Qmp {
            reader: BufReader::new(reader),
            writer,
            timeout,
            next_id: 1,
            events: VecDeque::new(),
            greeting: Greeting {
                version: String::new(),
                capabilities: Vec::new(),
            },
            set_timeout,
        };
        let deadline = Instant::now() + timeout;
        let hello = q.read(deadline, "greeting")?;
        q.greeting = parse_greeting(&hello)?;
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    /// The server's greeting.
    pub fn greeting(&self) -> &Greeting {
        &self.greeting
    }

    /// Runs `command` with `arguments` (an object, or `null` for none); its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = json!({"execute": command, "id": id});
        if !arguments.is_null() {
            req["arguments"] = arguments;
        }
        let line = format!("{req}\n");
        self.writer
            .write_all(line.as_bytes())
            .and_then(|()| self.writer.flush())
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
                    QmpError::Closed(format!("sending {command}"))
                }
                _ => QmpError::Io {
                    what: format!("sending {command}"),
                    source,
                },
            })?;
        let deadline = Instant::now() + self.timeout;
        let what = format!("reply to {command}");
        loop {
            let v = self.read(deadline, &what)?;
            if v.get("event").is_some() {
                self.events.push_back(v);
                continue;
            }
            if v.get("id").and_then(Value::as_u64) != Some(id) {
                return Err(protocol(
                    &v,
                    &format!("not the reply to {command} (id {id})"),
                ));
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    class: e["class"].as_str().unwrap_or("?").to_owned(),
                    desc: e["desc"].as_str().unwrap_or("?").to_owned(),
                });
            }
            return Err(protocol(&v, "neither return nor error"));
        }
    }

    /// Waits for the first event named `name` whose `data` satisfies `matches` (events read
    /// before are looked at first; the others are kept); its `data`.
    pub fn wait_event(
        &mut self,
        name: &str,
        timeout: Duration,
        matches: impl Fn(&Value) -> bool,
    ) -> Result<Value, QmpError> {
        let is = |v: &Value| v["event"] == name && matches(&v["data"]);
        if let Some(i) = self.events.iter().position(is) {
            return Ok(self
                .events
                .remove(i)
                .map(|v| v["data"].clone())
                .unwrap_or_default());
        }
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.read(deadline, &format!("{name} event"))?;
            if v.get("event").is_none() {
                return Err(protocol(&v, "a reply while no command was waiting"));
            }
            if is(&v) {
                return Ok(v["data"].clone());
            }
            self.events.push_back(v);
        }
    }

    /// The events read so far and not taken by [`Qmp::wait_event`], oldest first.
    pub fn take_events(&mut self) -> Vec<Value> {
        self.events.drain(..).collect()
    }

    fn read(&mut self, deadline: Instant, what: &str) -> Result<Value, QmpError> {
        let mut line = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QmpError::Timeout {
                    what: what.to_owned(),
                    timeout: self.timeout,
                });
            }
            (self.set_timeout)(self.reader.get_ref(), left);
            match self.reader.read_line(&mut line) {
                Ok(0) => return Err(QmpError::Closed(format!("waiting for the {what}"))),
                Ok(_) if line.ends_with('\n') => break,
                // A partial line before a timeout: keep it and read on.
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(source) => {
                    return Err(QmpError::Io {
                        what: format!("reading the {what}"),
                        source,
                    });
                }
            }
        }
        let v: Value = serde_json::from_str(line.trim()).map_err(|e| QmpError::Protocol {
            line: cut(&line),
            reason: e.to_string(),
        })?;
        if !v.is_object() {
            return Err(protocol(&v, "not a JSON object"));
        }
        Ok(v)
    }
}

fn cut(s: &str) -> String {
    let s = s.trim();
    match s.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

fn protocol(v: &Value, reason: &str) -> QmpError {
    QmpError::Protocol {
        line: cut(&v.to_string()),
        reason: reason.to_owned(),
    }
}

fn parse_greeting(v: &Value) -> Result<Greeting, QmpError> {
    let q = v
        .get("QMP")
        .ok_or_else(|| protocol(v, "the greeting has no QMP member (is this a QMP socket?)"))?;
    let ver = &q["version"]["qemu"];
    let num = |k: &str| ver[k].as_u64().ok_or_else(|| protocol(v, "no version"));
    let version = format!("{}.{}.{}", num("major")?, num("minor")?, num("micro")?);
    let capabilities = q["capabilities"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    Ok(Greeting {
        version,
        capabilities,
    })
}

#[cfg(test)]
mod tests;
