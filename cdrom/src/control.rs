//! cdrom's control commands: `media-insert`, `media-eject`, and the drive's `status`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use vback_api::{CdromStats, LabeledHistogram};
use vback_common::control::{CommandInfo, ControlError, ControlHandler, ErrorKind};

use crate::media::MediaDirs;
use crate::mmc::Cdrom;

/// The control handler.
#[derive(Debug)]
pub struct CdControl {
    cd: Arc<Mutex<Cdrom>>,
    shared: bool,
    media: MediaDirs,
}

impl CdControl {
    /// Control over `cd`; new media come from `media` only, and are locked shared when
    /// `shared`.
    pub fn new(cd: Arc<Mutex<Cdrom>>, shared: bool, media: MediaDirs) -> CdControl {
        CdControl { cd, shared, media }
    }

    fn cd(&self) -> std::sync::MutexGuard<'_, Cdrom> {
        self.cd
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl ControlHandler for CdControl {
    fn status(&self) -> Value {
        let cd = self.cd();
        let (tray_open, locked, path) = cd.state();
        let served_by = cd.medium().map(|m| {
            let (kind, engine) = m.served_by();
            json!({ "kind": kind, "engine": engine })
        });
        json!({
            "tray": if tray_open { "open" } else { "closed" },
            "locked_by_guest": locked,
            "medium": path.map(|p| p.display().to_string()),
            "medium_served_by": served_by,
            "shared": self.shared,
            "medium_locked": cd.medium().map(|m| m.lock_held()),
            "media_dirs": self.media.dirs().iter().map(|d| d.display().to_string()).collect::<Vec<_>>(),
            "media_event_pending": cd.event_pending(),
        })
    }

    fn stats(&self) -> Value {
        let cd = self.cd();
        let stats = CdromStats {
            test_unit_ready: cd.count(0x00),
            inquiry: cd.count(0x12),
            read_capacity: cd.count(0x25),
            read: cd.reads(),
            read_toc: cd.count(0x43),
            get_configuration: cd.count(0x46),
            get_event_status: cd.count(0x4a),
            prevent_allow: cd.count(0x1e),
            start_stop: cd.count(0x1b),
            resubmitted: cd.resubmitted(),
            read_errors_by_kind: cd.read_errors_by_kind(),
        };
        serde_json::to_value(stats).unwrap_or(Value::Null)
    }

    fn histograms(&self) -> Vec<LabeledHistogram> {
        let histogram = self.cd().read_latency();
        if histogram.count == 0 {
            return Vec::new();
        }
        vec![LabeledHistogram {
            name: "latency_ns".into(),
            labels: BTreeMap::from([
                ("queue".to_owned(), "0".to_owned()),
                ("op".to_owned(), "read".to_owned()),
            ]),
            histogram,
        }]
    }

    fn commands(&self) -> Vec<CommandInfo> {
        vec![
            CommandInfo {
                name: "media-insert",
                args: "path=PATH",
                help: "Put a disc (ISO image or host drive under a --media-dir) in; the guest sees a media change.",
            },
            CommandInfo {
                name: "media-eject",
                args: "[force=true]",
                help: "Take the disc out; refused while the guest locks the tray, unless forced.",
            },
        ]
    }

    fn handle(&self, cmd: &str, args: &Value) -> Option<Result<Value, ControlError>> {
        match cmd {
            "media-insert" => Some((|| {
                let path = args.get("path").and_then(Value::as_str).ok_or_else(|| {
                    ControlError::bad_argument(
                        "media-insert needs path=PATH (an ISO image or a CD drive)",
                    )
                })?;
                let m = self
                    .media
                    .open(&PathBuf::from(path), self.shared)
                    .map_err(|e| {
                        log::warn!("media-insert: {e}");
                        ControlError::new(ErrorKind::Failed, e.to_string())
                    })?;
                let medium = m.path.display().to_string();
                let old = self.cd().insert(m);
                log::info!("medium {medium} inserted (asked for {path})");
                Ok(
                    json!({ "medium": medium, "replaced": old.map(|m| m.path.display().to_string()) }),
                )
            })()),
            "media-eject" => Some((|| {
                let force = match args.get("force") {
                    None | Some(Value::Null) => false,
                    Some(Value::Bool(b)) => *b,
                    Some(other) => {
                        return Err(ControlError::bad_argument(format!(
                            "force must be true or false, not {other}"
                        )));
                    }
                };
                match self.cd().eject(force) {
                    Ok(old) => {
                        log::info!("medium ejected{}", if force { " (forced)" } else { "" });
                        Ok(json!({ "ejected": old.map(|m| m.path.display().to_string()) }))
                    }
                    Err(e) => Err(ControlError::new(ErrorKind::Busy, e.to_string())),
                }
            })()),
            _ => None,
        }
    }
}
