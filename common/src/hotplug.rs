//! Hotplug scripts, called as Xen calls them (`/etc/xen/scripts/<script> <action>`), shared by
//! the backends that run them: netback's vif scripts get `online`/`offline` once the host
//! interface exists and before it goes away; blkback's vbd scripts get `add` before the disk is
//! opened and `remove` after it is closed. The parameters come in the environment (`$vif`,
//! `$bridge`, ... for a vif; `$params`, `$type`, `$mode`, `$vdev`, ... for a disk) and
//! `$command` repeats the action.
//!
//! Xen's scripts report `hotplug-status` (`connected`, `error` plus `hotplug-error`, or `busy`)
//! through the store; vback's report it through their exit status and stdout: exit status 0 is
//! `connected`, anything else `error`, and a line `hotplug-status=busy` (or `=error`) on stdout
//! overrides that (Xen's `ebusy`: the device is in use elsewhere). The script's last non-empty
//! line on stderr is the `hotplug-error` message. The whole stderr is logged. A script that runs
//! longer than the timeout is killed and reported.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use thiserror::Error;

/// Where `script=NAME` (a name without '/') is looked up by default.
pub const DEFAULT_SCRIPT_DIR: &str = "/etc/vback/scripts";

/// How long a script may run.
pub const SCRIPT_TIMEOUT: Duration = Duration::from_secs(30);

/// A failed script.
#[derive(Debug, Error)]
pub enum HotplugError {
    /// The script file is missing or not executable.
    #[error(
        "hotplug script {path} cannot be run: {source} (install the scripts under {DEFAULT_SCRIPT_DIR} or pass --script-dir)",
        path = path.display()
    )]
    Spawn {
        /// The script.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The script reported an error.
    #[error("hotplug script {script} {action} failed ({status}): {message}", script = path.display())]
    Failed {
        /// The script.
        path: PathBuf,
        /// `online`, `offline`, `add` or `remove`.
        action: &'static str,
        /// Exit status text.
        status: String,
        /// Its last stderr line.
        message: String,
    },
    /// The script reported `busy`: the device is in use elsewhere (Xen's `ebusy`).
    #[error("hotplug script {script} {action}: the device is busy: {message}", script = path.display())]
    Busy {
        /// The script.
        path: PathBuf,
        /// The action.
        action: &'static str,
        /// Its last stderr line.
        message: String,
    },
    /// The script hung.
    #[error("hotplug script {script} {action} did not finish within {secs} s and was killed", script = path.display(), secs = SCRIPT_TIMEOUT.as_secs())]
    Timeout {
        /// The script.
        path: PathBuf,
        /// `online` or `offline`.
        action: &'static str,
    },
}

/// One interface's script and its environment.
#[derive(Debug, Clone)]
pub struct Hotplug {
    /// The script to run.
    pub path: PathBuf,
    /// `NAME=value` pairs for its environment.
    pub env: Vec<(String, String)>,
}

impl Hotplug {
    /// Resolves `script` (a name in `dir`, or a path containing '/').
    pub fn resolve(script: &str, dir: &Path) -> PathBuf {
        if script.contains('/') {
            PathBuf::from(script)
        } else {
            dir.join(script)
        }
    }

    /// The mode a script name implies (`bridge`, `route`, `nat`), for `$mode`.
    pub fn mode_of(path: &Path) -> &'static str {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.contains("route") {
            "route"
        } else if name.contains("nat") {
            "nat"
        } else {
            "bridge"
        }
    }

    /// Runs `SCRIPT action`. Returns the script's stderr (for the log) on success.
    pub fn run(&self, action: &'static str) -> Result<String, HotplugError> {
        let mut child = Command::new(&self.path)
            .arg(action)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("command", action)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| HotplugError::Spawn {
                path: self.path.clone(),
                source,
            })?;
        let drain = |pipe: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut s = String::new();
                if let Some(p) = pipe {
                    let _ = p.take(64 * 1024).read_to_string(&mut s);
                }
                s
            })
        };
        let stdout = drain(
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        );
        let stderr = drain(
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        );
        let start = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if start.elapsed() < SCRIPT_TIMEOUT => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(HotplugError::Timeout {
                        path: self.path.clone(),
                        action,
                    });
                }
            }
        };
        let err = stderr.join().unwrap_or_default();
        let out = stdout.join().unwrap_or_default();
        for line in err.lines().filter(|l| !l.trim().is_empty()) {
            log::info!("{} {action}: {line}", self.path.display());
        }
        let message = || {
            err.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("(the script printed nothing on stderr)")
                .trim()
                .to_owned()
        };
        match (reported_status(&out), status.success()) {
            (Some(Reported::Busy), _) => Err(HotplugError::Busy {
                path: self.path.clone(),
                action,
                message: message(),
            }),
            (Some(Reported::Error), _) | (None, false) => Err(HotplugError::Failed {
                path: self.path.clone(),
                action,
                status: if status.success() {
                    "hotplug-status=error".to_owned()
                } else {
                    status.to_string()
                },
                message: message(),
            }),
            (Some(Reported::Connected) | None, true) => Ok(err),
            (Some(Reported::Connected), false) => Err(HotplugError::Failed {
                path: self.path.clone(),
                action,
                status: status.to_string(),
                message: message(),
            }),
        }
    }
}

/// A `hotplug-status=` line a script printed on stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reported {
    Connected,
    Error,
    Busy,
}

/// The last `hotplug-status=VALUE` line of `stdout`, if any (other lines are ignored; an
/// unknown value counts as `error`).
fn reported_status(stdout: &str) -> Option<Reported> {
    let value = stdout
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("hotplug-status="))?;
    Some(match value.trim() {
        "connected" => Reported::Connected,
        "busy" => Reported::Busy,
        _ => Reported::Error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &Path, body: &str) -> PathBuf {
        let p = dir.join("vif-test");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn success_gets_the_action_and_environment() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out");
        let path = script(
            d.path(),
            &format!("echo \"$1 $vif $bridge\" > {}", out.display()),
        );
        let h = Hotplug {
            path,
            env: vec![
                ("vif".into(), "vif3.0".into()),
                ("bridge".into(), "br0".into()),
            ],
        };
        h.run("online").unwrap();
        assert_eq!(
            std::fs::read_to_string(out).unwrap().trim(),
            "online vif3.0 br0"
        );
    }

    #[test]
    fn failure_carries_the_last_stderr_line() {
        let d = tempfile::tempdir().unwrap();
        let path = script(
            d.path(),
            "echo noise >&2; echo 'Could not find bridge br9' >&2; exit 1",
        );
        let h = Hotplug { path, env: vec![] };
        let e = h.run("online").unwrap_err().to_string();
        assert!(e.contains("online failed"), "{e}");
        assert!(e.ends_with("Could not find bridge br9"), "{e}");
    }

    #[test]
    fn a_missing_script_says_where_it_looked() {
        let h = Hotplug {
            path: Hotplug::resolve("vif-nothing", Path::new("/nonexistent/dir")),
            env: vec![],
        };
        let e = h.run("online").unwrap_err().to_string();
        assert!(e.contains("/nonexistent/dir/vif-nothing"), "{e}");
    }

    #[test]
    fn busy_and_error_reported_on_stdout() {
        let d = tempfile::tempdir().unwrap();
        let path = script(
            d.path(),
            "echo hotplug-status=busy; echo '/dev/loop0 is mounted' >&2; exit 1",
        );
        let h = Hotplug { path, env: vec![] };
        let e = h.run("add").unwrap_err();
        assert!(matches!(e, HotplugError::Busy { .. }), "{e}");
        assert!(e.to_string().ends_with("/dev/loop0 is mounted"), "{e}");

        let path = script(d.path(), "echo hotplug-status=error; echo bad >&2; exit 0");
        let e = Hotplug { path, env: vec![] }.run("add").unwrap_err();
        assert!(matches!(e, HotplugError::Failed { .. }), "{e}");
        assert!(e.to_string().ends_with("bad"), "{e}");

        let path = script(d.path(), "echo noise; echo hotplug-status=connected");
        Hotplug { path, env: vec![] }.run("add").unwrap();
    }

    #[test]
    fn modes_from_names() {
        assert_eq!(Hotplug::mode_of(Path::new("/x/vif-route")), "route");
        assert_eq!(Hotplug::mode_of(Path::new("vif-nat")), "nat");
        assert_eq!(Hotplug::mode_of(Path::new("vif-bridge")), "bridge");
    }
}
