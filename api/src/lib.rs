//! vback's typed control API: the types of the line-JSON control protocol every daemon serves
//! ([docs/control.md]), shared by the daemons (through `vback-common`'s server) and by clients
//! (`vbctl`, tests). Only `serde`, `serde_json` and `thiserror`: a client that links this crate
//! links no vhost-user or io_uring code.
//!
//! - [`Request`] / [`Reply`] / [`ControlError`] / [`ErrorKind`]: the wire envelope.
//! - [`Help`], [`Status`], [`Stats`]: the built-in commands' replies; [`BlockStats`] and
//!   [`CdromStats`] type the `device` part for those device kinds.
//! - [`Counter`]: a uniform counter (name, labels, value), derived from any device's stats with
//!   [`counters_from_device`], so a monitor reads every kind of daemon the same way.
//! - [`client`]: [`ControlClient`], a connection to a daemon's control socket;
//! - [`histogram`]: fixed log-linear latency histograms, recorded lock-free per queue and merged
//!   on read.
//!
//! [docs/control.md]: ../../../docs/control.md

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

pub mod client;
pub mod histogram;

pub use client::{ClientError, ControlClient};
pub use histogram::{AtomicHistogram, Histogram};

/// The version of the control protocol, answered by `help` as `protocol`. It grows when a
/// command's reply changes in a way a client must know about; additions of keys and commands
/// keep it (clients ignore keys they do not know). A daemon without the key speaks version 0
/// (before the typed API).
pub const PROTOCOL_VERSION: u32 = 1;

/// A request as sent on the wire.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Request {
    /// The command name.
    pub cmd: String,
    /// Arguments, an object (absent means `{}`).
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub args: Value,
}

impl Request {
    /// A request without arguments.
    pub fn new(cmd: impl Into<String>) -> Self {
        Request {
            cmd: cmd.into(),
            args: Value::Null,
        }
    }
}

/// Stable error kinds of the control protocol: scripts may match on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The request line is not a JSON object with a `cmd` string.
    BadRequest,
    /// The daemon does not know the command.
    UnknownCommand,
    /// An argument is missing or has a bad value.
    BadArgument,
    /// The command cannot run in the device's current state (for example a locked tray).
    Busy,
    /// The command ran and failed.
    Failed,
}

/// An error reply.
#[derive(Debug, Clone, Error, Serialize, Deserialize, PartialEq, Eq)]
#[error("{message}")]
pub struct ControlError {
    /// Stable kind.
    pub kind: ErrorKind,
    /// A sentence for the operator.
    pub message: String,
}

impl ControlError {
    /// An error of the given kind.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ControlError {
            kind,
            message: message.into(),
        }
    }

    /// A bad or missing argument.
    pub fn bad_argument(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadArgument, message)
    }
}

/// A reply as sent on the wire.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Reply {
    /// Whether the command succeeded.
    pub ok: bool,
    /// The result on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    /// The error on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ControlError>,
}

impl Reply {
    /// The reply for a command's result.
    pub fn from_result(r: Result<Value, ControlError>) -> Reply {
        match r {
            Ok(data) => Reply {
                ok: true,
                data: Some(data),
                error: None,
            },
            Err(e) => Reply {
                ok: false,
                data: None,
                error: Some(e),
            },
        }
    }
}

/// Errors decoding a reply's `data` into one of this crate's types.
#[derive(Debug, Error)]
#[error(
    "the daemon's `{cmd}` reply does not have the expected shape ({source}); is it a vback daemon of a matching version?"
)]
pub struct DecodeError {
    /// The command whose reply it was.
    pub cmd: &'static str,
    /// What serde found.
    #[source]
    pub source: serde_json::Error,
}

/// Decodes the `data` of a reply to `cmd` into `T`.
pub fn decode<T: for<'de> Deserialize<'de>>(
    cmd: &'static str,
    data: Value,
) -> Result<T, DecodeError> {
    serde_json::from_value(data).map_err(|source| DecodeError { cmd, source })
}

/// One command in the `help` reply.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CommandHelp {
    /// Command name.
    pub name: String,
    /// Arguments, e.g. `size=SIZE [force=true]`.
    pub args: String,
    /// One sentence.
    pub help: String,
}

/// The `help` reply.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Help {
    /// The protocol version ([`PROTOCOL_VERSION`]; 0 from a daemon older than the key).
    #[serde(default)]
    pub protocol: u32,
    /// The built-in commands, then the backend's own.
    pub commands: Vec<CommandHelp>,
}

/// One vhost-user port in `status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PortStatus {
    /// The vhost-user socket (absent for an inherited descriptor without a path).
    #[serde(default)]
    pub socket: Option<String>,
    /// Whether a front end is connected now.
    pub frontend_connected: bool,
    /// Front ends connected so far.
    pub connections: u64,
}

/// The `daemon` part of `status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DaemonStatus {
    /// The daemon's name (`blkback`, `netback`, `cdrom`, ...): the device kind.
    pub name: String,
    /// Its version.
    pub version: String,
    /// Its process id.
    pub pid: u32,
    /// Seconds since it started.
    pub uptime_s: u64,
    /// Its vhost-user ports (none in a process without ports).
    #[serde(default)]
    pub ports: Vec<PortStatus>,
}

/// The `status` reply. The first port's keys also appear at the top of `daemon` on the wire,
/// for clients older than `ports`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    /// Daemon facts.
    pub daemon: DaemonStatus,
    /// The device's state, in the shape of its kind (see each backend's page).
    #[serde(default)]
    pub device: Value,
}

/// A uniform counter: a name, labels (`queue`, `op`, `kind`, ...) and a value.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Counter {
    /// The counter's name, e.g. `reads` or `rx_packets`.
    pub name: String,
    /// Labels telling same-named counters apart (empty for device totals).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The value.
    pub value: u64,
}

/// A latency histogram in `stats`, merged over the queues or for one queue.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LabeledHistogram {
    /// What it measures, e.g. `latency_ns`.
    pub name: String,
    /// Labels (`op`, and `queue` for a per-queue one).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The histogram.
    pub histogram: Histogram,
}

/// The `stats` reply.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    /// The device's counters in the shape of its kind ([`BlockStats`], [`CdromStats`], netback's
    /// totals and queue pairs).
    #[serde(default)]
    pub device: Value,
    /// The same counters, uniform: every number in `device` ([`counters_from_device`]).
    #[serde(default)]
    pub counters: Vec<Counter>,
    /// Latency histograms, by operation and queue (empty for a device that records none).
    #[serde(default)]
    pub histograms: Vec<LabeledHistogram>,
}

/// Counters of one blkback queue (`stats` → `device.queues[i]`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlockQueueStats {
    /// Requests completed (any type, any status).
    pub requests: u64,
    /// Reads completed successfully.
    pub reads: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Writes completed successfully.
    pub writes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Flushes completed successfully.
    pub flushes: u64,
    /// Discards completed successfully.
    pub discards: u64,
    /// Write-zeroes completed successfully.
    pub write_zeroes: u64,
    /// Requests answered IOERR.
    pub errors: u64,
    /// Requests answered UNSUPP.
    pub unsupported: u64,
    /// Requests in flight now (a gauge).
    pub in_flight: u64,
    /// Requests resubmitted after a restart (left in flight by a crashed predecessor; 0 from
    /// daemons before the key).
    #[serde(default)]
    pub resubmitted: u64,
    /// Failed requests by the storage error's kind (`io`, `out-of-bounds`, ...; kinds with no
    /// error are left out).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub errors_by_kind: BTreeMap<String, u64>,
}

/// blkback's `stats` → `device`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlockStats {
    /// One entry per virtqueue.
    pub queues: Vec<BlockQueueStats>,
}

impl BlockStats {
    /// The queues' counters added up (`in_flight` too: it is the device's depth).
    pub fn total(&self) -> BlockQueueStats {
        let mut t = BlockQueueStats::default();
        for q in &self.queues {
            t.requests += q.requests;
            t.reads += q.reads;
            t.read_bytes += q.read_bytes;
            t.writes += q.writes;
            t.write_bytes += q.write_bytes;
            t.flushes += q.flushes;
            t.discards += q.discards;
            t.write_zeroes += q.write_zeroes;
            t.errors += q.errors;
            t.unsupported += q.unsupported;
            t.in_flight += q.in_flight;
            t.resubmitted += q.resubmitted;
            for (k, v) in &q.errors_by_kind {
                *t.errors_by_kind.entry(k.clone()).or_default() += v;
            }
        }
        t
    }
}

/// cdrom's `stats` → `device`: SCSI commands by kind.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CdromStats {
    /// TEST UNIT READY.
    pub test_unit_ready: u64,
    /// INQUIRY.
    pub inquiry: u64,
    /// READ CAPACITY.
    pub read_capacity: u64,
    /// READ(10/12/16).
    pub read: u64,
    /// READ TOC.
    pub read_toc: u64,
    /// GET CONFIGURATION.
    pub get_configuration: u64,
    /// GET EVENT STATUS NOTIFICATION.
    pub get_event_status: u64,
    /// PREVENT ALLOW MEDIUM REMOVAL.
    pub prevent_allow: u64,
    /// START STOP UNIT.
    pub start_stop: u64,
    /// Requests resubmitted after a restart (left in flight by a crashed predecessor; 0 from
    /// daemons before the key).
    #[serde(default)]
    pub resubmitted: u64,
    /// READs the storage failed, by the error's kind (`io`, `out-of-bounds`, ...; kinds with no
    /// error are left out).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub read_errors_by_kind: BTreeMap<String, u64>,
}

/// The uniform counters of a device's `stats`: every unsigned integer in `device`, named by its
/// key. A nested object's keys are prefixed with the object's key (`rx` → `rx_packets`); the
/// objects of an array get a label named after the array's key, without a plural `s`
/// (`queues[1].reads` → `reads{queue="1"}`), and their index as its value. Other values
/// (strings, booleans, negative or fractional numbers) are not counters and are left out.
pub fn counters_from_device(device: &Value) -> Vec<Counter> {
    let mut out = Vec::new();
    walk(device, "", &BTreeMap::new(), &mut out);
    out
}

fn walk(v: &Value, prefix: &str, labels: &BTreeMap<String, String>, out: &mut Vec<Counter>) {
    match v {
        Value::Number(n) => {
            if let (Some(value), false) = (n.as_u64(), prefix.is_empty()) {
                out.push(Counter {
                    name: prefix.to_owned(),
                    labels: labels.clone(),
                    value,
                });
            }
        }
        Value::Object(map) => {
            for (k, v) in map {
                let name = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}_{k}")
                };
                walk(v, &name, labels, out);
            }
        }
        Value::Array(items) => {
            // The label is the array's own key; its name takes the place of the prefix.
            let key = prefix.rsplit('_').next().unwrap_or(prefix);
            let label = key.strip_suffix('s').unwrap_or(key).to_owned();
            let outer = &prefix[..prefix.len() - key.len()];
            let outer = outer.strip_suffix('_').unwrap_or(outer);
            for (i, item) in items.iter().enumerate() {
                let mut l = labels.clone();
                l.insert(label.clone(), i.to_string());
                walk(item, outer, &l, out);
            }
        }
        Value::Null | Value::Bool(_) | Value::String(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn counters_are_flattened_with_labels_for_arrays() {
        let dev = json!({
            "rx": {"packets": 5, "bytes": 300},
            "queues": [{"rx": {"packets": 2}}, {"rx": {"packets": 3}, "tx": {"packets": 1}}],
            "active_pairs": 2,
            "last_drop_reason": "ring full",
            "locked": true,
            "delta": -1,
        });
        let mut c = counters_from_device(&dev);
        c.sort();
        let want = vec![
            Counter {
                name: "active_pairs".into(),
                labels: labels(&[]),
                value: 2,
            },
            Counter {
                name: "rx_bytes".into(),
                labels: labels(&[]),
                value: 300,
            },
            Counter {
                name: "rx_packets".into(),
                labels: labels(&[]),
                value: 5,
            },
            Counter {
                name: "rx_packets".into(),
                labels: labels(&[("queue", "0")]),
                value: 2,
            },
            Counter {
                name: "rx_packets".into(),
                labels: labels(&[("queue", "1")]),
                value: 3,
            },
            Counter {
                name: "tx_packets".into(),
                labels: labels(&[("queue", "1")]),
                value: 1,
            },
        ];
        assert_eq!(c, want);
    }

    #[test]
    fn block_stats_decode_from_the_wire_shape_and_add_up() {
        let dev = json!({"queues": [
            {"requests": 3, "reads": 2, "read_bytes": 8192, "writes": 1, "write_bytes": 512,
             "flushes": 0, "discards": 0, "write_zeroes": 0, "errors": 0, "unsupported": 0,
             "in_flight": 1},
            {"requests": 4, "reads": 4, "read_bytes": 4096, "writes": 0, "write_bytes": 0,
             "flushes": 0, "discards": 0, "write_zeroes": 0, "errors": 1, "unsupported": 0,
             "in_flight": 2, "errors_by_kind": {"io": 1}},
        ]});
        let s: BlockStats = decode("stats", dev).unwrap();
        let t = s.total();
        assert_eq!((t.requests, t.reads, t.read_bytes), (7, 6, 12288));
        assert_eq!((t.in_flight, t.errors), (3, 1));
        assert_eq!(t.errors_by_kind.get("io"), Some(&1));
        // A queue's object without a required counter is refused with the command's name.
        let e = decode::<BlockStats>("stats", json!({"queues": [{"reads": 1}]})).unwrap_err();
        assert!(e.to_string().contains("`stats` reply"), "{e}");
    }

    #[test]
    fn help_without_a_protocol_is_version_zero() {
        let h: Help = decode("help", json!({"commands": []})).unwrap();
        assert_eq!(h.protocol, 0);
        let h: Help = decode(
            "help",
            json!({"protocol": 1, "commands": [
            {"name": "status", "args": "", "help": "x"}]}),
        )
        .unwrap();
        assert_eq!((h.protocol, h.commands.len()), (1, 1));
    }

    #[test]
    fn the_envelope_keeps_its_wire_shape() {
        let r = Reply::from_result(Err(ControlError::new(ErrorKind::UnknownCommand, "no")));
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"ok":false,"error":{"kind":"unknown-command","message":"no"}}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::new("status")).unwrap(),
            r#"{"cmd":"status"}"#
        );
    }
}
