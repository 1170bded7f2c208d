//! Network namespaces for tests: every test host (the "dom0" that runs netback and owns the
//! bridge, a LAN host, an outside server) is a namespace the test creates and deletes, so no
//! frame leaves the machine. Names carry the test process's id, so parallel tests and leftover
//! namespaces of a crashed run do not collide.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::HarnessError;
use crate::process::{Daemon, which, workspace_bin};

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

fn ip(args: &[&str]) -> Result<Output, HarnessError> {
    let ip = which("ip")
        .ok_or_else(|| HarnessError::MissingTool("ip (iproute2); run scripts/setup.sh".into()))?;
    Command::new(ip)
        .args(args)
        .output()
        .map_err(|e| HarnessError::Setup(format!("ip {}: {e}", args.join(" "))))
}

fn ok(out: Output, what: &str) -> Result<String, HarnessError> {
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(HarnessError::Setup(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

impl Netns {
    /// Creates `vbt<pid>-<n>-<tag>` with its loopback up.
    pub fn new(tag: &str) -> Result<Netns, HarnessError> {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "vbt{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        ok(
            ip(&["netns", "add", &name])?,
            &format!("ip netns add {name}"),
        )?;
        let ns = Netns { name };
        ns.sh("ip link set lo up")?;
        Ok(ns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs a shell script inside the namespace; its stdout, or an error with both outputs.
    pub fn sh(&self, script: &str) -> Result<String, HarnessError> {
        let out = self
            .command("sh")
            .args(["-ec", script])
            .output()
            .map_err(|e| HarnessError::Setup(format!("ip netns exec {}: {e}", self.name)))?;
        ok(out, &format!("in {}: {script}", self.name))
    }

    /// A veth pair: `a` in this namespace, `b` in `other`.
    pub fn veth(&self, a: &str, other: &Netns, b: &str) -> Result<(), HarnessError> {
        ok(
            ip(&[
                "link",
                "add",
                a,
                "netns",
                &self.name,
                "type",
                "veth",
                "peer",
                "name",
                b,
                "netns",
                &other.name,
            ])?,
            "creating a veth pair",
        )?;
        Ok(())
    }

    /// Starts `netback` inside the namespace with `--socket` and `args`, the repository's
    /// hotplug scripts, and waits until it listens.
    pub fn netback(
        &self,
        socket: &Path,
        args: &[&str],
        log: &Path,
    ) -> Result<Daemon, HarnessError> {
        self.netback_env(socket, args, &[], log)
    }

    /// [`Netns::netback`] with extra environment variables (the scripts see them, e.g.
    /// `netdev=` for vif-route).
    pub fn netback_env(
        &self,
        socket: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        log: &Path,
    ) -> Result<Daemon, HarnessError> {
        let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../netback/scripts");
        let mut cmd = self.command(workspace_bin("netback")?);
        cmd.arg("--socket")
            .arg(socket)
            .arg("--script-dir")
            .arg(scripts)
            .args(args)
            .envs(env.iter().copied());
        let mut d = Daemon::spawn("netback", cmd, log)?;
        d.wait_for_socket(socket, Duration::from_secs(15))?;
        Ok(d)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Processes still inside keep their sockets but lose the name; tests stop theirs first.
        let _ = ip(&["netns", "pids", &self.name]).map(|o| {
            for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                let _ = Command::new("kill").arg("-9").arg(pid).status();
            }
        });
        let _ = ip(&["netns", "del", &self.name]);
    }
}
