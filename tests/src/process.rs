//! Backend processes for tests: spawn a daemon, wait until its socket listens, collect its log,
//! and kill it when the test ends (even on panic).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::HarnessError;

/// The path of a binary built from this workspace (`blkback`, `vbctl`, ...). `cargo test`
/// builds test executables under `target/<profile>/deps`; the binaries sit one level up.
pub fn workspace_bin(name: &str) -> Result<PathBuf, HarnessError> {
    let exe = std::env::current_exe().map_err(|e| HarnessError::Setup(e.to_string()))?;
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let p = dir.join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(HarnessError::MissingTool(format!(
            "{} is not built; run `cargo build --workspace --bins` first (scripts/test.sh does)",
            p.display()
        )))
    }
}

/// Finds a program on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Whether a unix socket is bound at `path` and listening, read from /proc/net/unix so that
/// checking does not connect (a vhost-user backend would take a probe for its front end).
pub fn is_listening(path: &Path) -> bool {
    is_listening_in(path, Path::new("/proc/net/unix"))
}

/// Like [`is_listening`], in the network namespace of process `pid` (the table of unix sockets
/// is per namespace: a daemon started in another namespace lists its socket only there).
pub fn is_listening_for(path: &Path, pid: u32) -> bool {
    is_listening_in(path, Path::new(&format!("/proc/{pid}/net/unix")))
}

fn is_listening_in(path: &Path, table: &Path) -> bool {
    const ACCEPTCON: u32 = 0x0001_0000;
    let Ok(table) = std::fs::read_to_string(table) else {
        return false;
    };
    let want = path.to_string_lossy();
    table.lines().skip(1).any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        f.len() >= 8
            && f[7] == want
            && u32::from_str_radix(f[3], 16).is_ok_and(|flags| flags & ACCEPTCON != 0)
    })
}

/// A running daemon, killed on drop. Its stdout and stderr go to a log file that
/// [`Daemon::log`] returns (tests print it when they fail).
#[derive(Debug)]
pub struct Daemon {
    name: String,
    child: Option<Child>,
    log_path: PathBuf,
}

impl Daemon {
    /// Spawns `cmd` with its output sent to `log_path`.
    pub fn spawn(name: &str, mut cmd: Command, log_path: &Path) -> Result<Daemon, HarnessError> {
        let log = File::create(log_path)
            .map_err(|e| HarnessError::Setup(format!("{}: {e}", log_path.display())))?;
        let log2 = log
            .try_clone()
            .map_err(|e| HarnessError::Setup(e.to_string()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| HarnessError::Setup(format!("cannot start {name} ({cmd:?}): {e}")))?;
        Ok(Daemon {
            name: name.to_owned(),
            child: Some(child),
            log_path: log_path.to_owned(),
        })
    }

    /// Waits until `socket` accepts connections (the daemon is ready), or fails with the
    /// daemon's log if it exits or does not listen within `timeout`.
    pub fn wait_for_socket(
        &mut self,
        socket: &Path,
        timeout: Duration,
    ) -> Result<(), HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            let pid = self.child.as_ref().map(Child::id);
            if is_listening(socket) || pid.is_some_and(|p| is_listening_for(socket, p)) {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(HarnessError::Setup(format!(
                    "{} exited ({status}) before listening on {}:\n{}",
                    self.name,
                    socket.display(),
                    self.log()
                )));
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Setup(format!(
                    "{} did not listen on {} within {timeout:?}:\n{}",
                    self.name,
                    socket.display(),
                    self.log()
                )));
            }
            sleep(Duration::from_millis(20));
        }
    }

    /// The pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything the daemon printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Sends SIGTERM and waits up to `timeout` for a clean exit; returns the exit status, or
    /// kills it and returns `None` if it does not stop.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let pid = libc::pid_t::try_from(child.id()).ok()?;
        // SAFETY: kill(2) with a pid of our own child and a valid signal number; no memory.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = child.try_wait() {
                self.child = None;
                return Some(st);
            }
            sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        self.child = None;
        None
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// qemu-storage-daemon exporting an image as vhost-user-blk: the reference backend.
pub fn qemu_storage_daemon(
    image: &Path,
    socket: &Path,
    writable: bool,
    log: &Path,
) -> Result<Daemon, HarnessError> {
    let qsd = which("qemu-storage-daemon").ok_or_else(|| {
        HarnessError::MissingTool(
            "qemu-storage-daemon not found (qemu-utils; run scripts/setup.sh)".into(),
        )
    })?;
    let mut cmd = Command::new(qsd);
    cmd.arg("--blockdev").arg(format!(
        "driver=file,node-name=file0,filename={},cache.direct=on,aio=io_uring",
        image.display()
    ));
    cmd.arg("--export").arg(format!(
        "type=vhost-user-blk,id=export0,node-name=file0,addr.type=unix,addr.path={},writable={}",
        socket.display(),
        if writable { "on" } else { "off" }
    ));
    let mut d = Daemon::spawn("qemu-storage-daemon", cmd, log)?;
    d.wait_for_socket(socket, Duration::from_secs(20))?;
    Ok(d)
}

/// Starts a daemon built from this workspace (`blkback`, `netback`, `cdrom`) with `--socket`
/// and `args`, and waits until it listens.
pub fn vback_daemon(
    bin: &str,
    socket: &Path,
    args: &[&str],
    log: &Path,
) -> Result<Daemon, HarnessError> {
    let mut cmd = Command::new(workspace_bin(bin)?);
    cmd.arg("--socket").arg(socket).args(args);
    let mut d = Daemon::spawn(bin, cmd, log)?;
    d.wait_for_socket(socket, Duration::from_secs(10))?;
    Ok(d)
}

/// Starts `blkback` (see [`vback_daemon`]).
pub fn blkback(socket: &Path, args: &[&str], log: &Path) -> Result<Daemon, HarnessError> {
    vback_daemon("blkback", socket, args, log)
}

/// Starts `netback` (see [`vback_daemon`]).
pub fn netback(socket: &Path, args: &[&str], log: &Path) -> Result<Daemon, HarnessError> {
    vback_daemon("netback", socket, args, log)
}

impl Daemon {
    /// Kills the process with SIGKILL (a crash) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
