//! Hotplug scripts, called as Xen calls them: `SCRIPT online` once the host interface exists and
//! `SCRIPT offline` before it goes away, with the interface in `$vif` and the other parameters in
//! the environment (`bridge`, `ip`, `mac`, `domain`, `domid`, `devid`, `mode`, `mtu`).
//!
//! Xen's scripts report `hotplug-status` (`connected` or `error` plus `hotplug-error`) through
//! the store; vback's report through their exit status: 0 is `connected`, anything else is
//! `error`, and the script's last non-empty line on stderr is the `hotplug-error` message. The
//! whole stderr is logged. A script that runs longer than the timeout is killed and reported.

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
        /// `online` or `offline`.
        action: &'static str,
        /// Exit status text.
        status: String,
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
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| HotplugError::Spawn {
                path: self.path.clone(),
                source,
            })?;
        let mut stderr = child.stderr.take();
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(e) = stderr.as_mut() {
                let _ = e.take(64 * 1024).read_to_string(&mut s);
            }
            s
        });
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
        let err = reader.join().unwrap_or_default();
        for line in err.lines().filter(|l| !l.trim().is_empty()) {
            log::info!("{} {action}: {line}", self.path.display());
        }
        if status.success() {
            return Ok(err);
        }
        let message = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("(the script printed nothing on stderr)")
            .trim()
            .to_owned();
        Err(HotplugError::Failed {
            path: self.path.clone(),
            action,
            status: status.to_string(),
            message,
        })
    }
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
    fn modes_from_names() {
        assert_eq!(Hotplug::mode_of(Path::new("/x/vif-route")), "route");
        assert_eq!(Hotplug::mode_of(Path::new("vif-nat")), "nat");
        assert_eq!(Hotplug::mode_of(Path::new("vif-bridge")), "bridge");
    }
}
