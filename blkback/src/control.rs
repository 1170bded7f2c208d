//! blkback's control commands: `status` and `stats` details, and `resize`.

use serde_json::{Value, json};
use vback_api::LabeledHistogram;
use vback_block::FormatInfo;
use vback_common::control::{CommandInfo, ControlError, ControlHandler, ErrorKind};
use vback_common::spec::parse_size;
use vback_common::sync::lock;

use crate::vhost::BlkBackend;

/// The control handler.
#[derive(Debug)]
pub struct BlkControl {
    backend: BlkBackend,
}

impl BlkControl {
    /// Control over `backend`.
    pub fn new(backend: BlkBackend) -> BlkControl {
        BlkControl { backend }
    }

    fn resize(&self, args: &Value) -> Result<Value, ControlError> {
        let size = match args.get("size") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(n.as_u64().ok_or_else(|| {
                ControlError::bad_argument("size must be a positive number of bytes")
            })?),
            Some(Value::String(s)) => {
                Some(parse_size(s).map_err(|e| ControlError::bad_argument(e.to_string()))?)
            }
            Some(other) => {
                return Err(ControlError::bad_argument(format!(
                    "size must be bytes or a size like 20G, not {other}"
                )));
            }
        };
        let dev = self.backend.device();
        let old = dev.disk.capacity();
        let new = dev
            .disk
            .resize(size)
            .map_err(|e| ControlError::new(ErrorKind::Failed, e.source.to_string()))?;
        let notified = new != old && self.backend.notify_config_change();
        if new != old {
            log::info!(
                "resized from {old} to {new} bytes{}",
                if notified { "; guest notified" } else { "" }
            );
        }
        Ok(json!({ "old_size": old, "size": new, "guest_notified": notified }))
    }
}

impl ControlHandler for BlkControl {
    fn status(&self) -> Value {
        let dev = self.backend.device();
        let info = dev.disk.info();
        let qcow2 = info.format.as_ref().map(|f| match f {
            FormatInfo::Qcow2 {
                info: i,
                cached_tables,
            } => json!({
                "version": i.version,
                "cluster_size": i.cluster_size,
                "refcount_bits": i.refcount_bits,
                "extended_l2": i.extended_l2,
                "compression": i.compression,
                "backing_chain": i.backing_chain.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
                "l2_cache_tables": i.cache_tables,
                "l2_cached_now": cached_tables,
            }),
        });
        let last_error = lock(&dev.last_error).as_ref().map(|e| {
            json!({
                "kind": e.kind.name(),
                "message": e.message,
                "queue": e.queue,
                "time": e.time,
            })
        });
        json!({
            "qcow2": qcow2,
            "disk": info.uname,
            "kind": info.kind,
            "size": dev.disk.capacity(),
            "read_only": info.read_only,
            "direct_io": info.direct,
            "write_cache": if dev.writeback.load(std::sync::atomic::Ordering::Relaxed) { "write-back" } else { "write-through" },
            "queues": dev.stats.len(),
            "engine": self.backend.engine_name(),
            "serial": String::from_utf8_lossy(&dev.serial).trim_end_matches('\0'),
            "warning": info.warning,
            "image_locked": dev.disk.lock_held(),
            "last_error": last_error,
        })
    }

    fn stats(&self) -> Value {
        let queues: Vec<Value> = self
            .backend
            .device()
            .stats
            .iter()
            .map(|s| s.to_json())
            .collect();
        json!({ "queues": queues })
    }

    fn histograms(&self) -> Vec<LabeledHistogram> {
        let dev = self.backend.device();
        dev.stats
            .iter()
            .enumerate()
            .flat_map(|(i, s)| s.histograms(i))
            .collect()
    }

    fn commands(&self) -> Vec<CommandInfo> {
        vec![CommandInfo {
            name: "resize",
            args: "[size=SIZE]",
            help: "Grow the disk to SIZE (a file is extended sparsely), or re-read the size of the file or device when no size is given; the guest is told at once.",
        }]
    }

    fn handle(&self, cmd: &str, args: &Value) -> Option<Result<Value, ControlError>> {
        match cmd {
            "resize" => Some(self.resize(args)),
            _ => None,
        }
    }
}
