//! The client side of the control protocol: one connection to a daemon's control socket,
//! requests answered in order, with a timeout on each reply. Plain `std` (a unix stream and
//! `serde_json`), so a client links no daemon code.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use thiserror::Error;

use crate::{ControlError, Reply, Request};

/// Errors of a control client.
#[derive(Debug, Error)]
pub enum ClientError {
    /// Connecting failed.
    #[error(
        "cannot connect to control socket {path}: {source} (is the daemon running with --control {path}?)"
    )]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Reading or writing failed.
    #[error("control socket {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The reply could not be decoded.
    #[error("control socket {path}: the daemon sent a reply that is not valid JSON: {reply}")]
    BadReply {
        /// The socket path.
        path: PathBuf,
        /// What came back.
        reply: String,
    },
    /// No reply in time.
    #[error(
        "no reply from {path} within {secs} s: is it a daemon's control socket (--control)? A \
         vhost-user socket (--socket) that a front end is using keeps other clients waiting \
         without a word (raise the wait with --timeout if the daemon is just slow)"
    )]
    Timeout {
        /// The socket path.
        path: PathBuf,
        /// The wait, in seconds.
        secs: u64,
    },
    /// The peer closed the connection without a reply: not a control socket.
    #[error(
        "{path} closed the connection without a reply: this looks like a vhost-user socket (a \
         daemon's --socket), not a control socket; give the path the daemon was started with \
         --control"
    )]
    NotControl {
        /// The socket path.
        path: PathBuf,
    },
    /// The daemon answered with an error.
    #[error("{0}")]
    Command(ControlError),
}

/// A connection to a daemon's control socket.
#[derive(Debug)]
pub struct ControlClient {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    timeout: Duration,
}

impl ControlClient {
    /// Connects, with a 30 s timeout on each reply.
    pub fn connect(path: impl AsRef<Path>) -> Result<ControlClient, ClientError> {
        Self::connect_timeout(path, Duration::from_secs(30))
    }

    /// Connects, waiting at most `timeout` for each reply (and for each write).
    pub fn connect_timeout(
        path: impl AsRef<Path>,
        timeout: Duration,
    ) -> Result<ControlClient, ClientError> {
        let path = path.as_ref().to_owned();
        let stream = UnixStream::connect(&path).map_err(|source| ClientError::Connect {
            path: path.clone(),
            source,
        })?;
        let io_err = |source| ClientError::Io {
            path: path.clone(),
            source,
        };
        stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
        stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
        let writer = stream.try_clone().map_err(io_err)?;
        Ok(ControlClient {
            path,
            reader: BufReader::new(stream),
            writer,
            timeout,
        })
    }

    /// Sends a command and waits for its reply; an error reply becomes [`ClientError::Command`].
    pub fn call(&mut self, cmd: &str, args: Value) -> Result<Value, ClientError> {
        let req = Request {
            cmd: cmd.to_owned(),
            args,
        };
        let line = serde_json::to_string(&req).unwrap_or_default();
        let reply = self.raw(&line)?;
        let parsed: Reply = serde_json::from_str(&reply).map_err(|_| ClientError::BadReply {
            path: self.path.clone(),
            reply: reply.clone(),
        })?;
        match (parsed.ok, parsed.data, parsed.error) {
            (true, data, _) => Ok(data.unwrap_or(Value::Null)),
            (false, _, Some(e)) => Err(ClientError::Command(e)),
            (false, _, None) => Err(ClientError::BadReply {
                path: self.path.clone(),
                reply,
            }),
        }
    }

    /// Sends one raw line and returns the raw reply line (for tests of malformed input).
    pub fn raw(&mut self, line: &str) -> Result<String, ClientError> {
        let io_err = |source: io::Error| match source.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout {
                path: self.path.clone(),
                secs: self.timeout.as_secs().max(1),
            },
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => ClientError::NotControl {
                path: self.path.clone(),
            },
            _ => ClientError::Io {
                path: self.path.clone(),
                source,
            },
        };
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .map_err(io_err)?;
        let mut reply = String::new();
        let n = self.reader.read_line(&mut reply).map_err(io_err)?;
        if n == 0 {
            // A control socket always answers a line with a line; only a peer that does not
            // speak the protocol hangs up instead.
            return Err(ClientError::NotControl {
                path: self.path.clone(),
            });
        }
        Ok(reply.trim_end().to_owned())
    }
}
