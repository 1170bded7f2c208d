//! A small ext4 filesystem on a loop device that a test can freeze (`fsfreeze`): writes to
//! files on it then block in the kernel while reads complete, which makes a backend's
//! requests complete out of order at a moment the test chooses (in-flight tracking tests).
//! Needs root, a loop device, mkfs.ext4 and fsfreeze (e2fsprogs, util-linux); a missing one
//! fails the test with the command that failed.

use std::path::{Path, PathBuf};
use std::process::Command;

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A 32 MiB ext4 filesystem on a loop device, mounted noatime in a temporary directory;
/// thawed and unmounted when dropped.
#[derive(Debug)]
pub struct LoopFs {
    dir: tempfile::TempDir,
    mnt: PathBuf,
}

impl LoopFs {
    /// Creates and mounts it (panics if it cannot: the test cannot go on).
    pub fn mount() -> LoopFs {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fs.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(32 << 20)
            .unwrap();
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img));
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        run(Command::new("mount")
            .args(["-o", "loop,noatime"])
            .arg(&img)
            .arg(&mnt));
        LoopFs { dir, mnt }
    }

    /// The mount point.
    pub fn mnt(&self) -> &Path {
        &self.mnt
    }

    /// A directory outside the filesystem for the test's other files (sockets, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Freezes (`true`) or thaws the filesystem.
    pub fn freeze(&self, on: bool) {
        let how = if on { "--freeze" } else { "--unfreeze" };
        run(Command::new("fsfreeze").arg(how).arg(&self.mnt));
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze")
            .arg("--unfreeze")
            .arg(&self.mnt)
            .output();
        // A process the test started may still hold a file on it (a daemon dropped after
        // this): detach lazily then, so the mount and its loop device (autoclear) go away
        // when the last file closes instead of piling up run after run.
        let busy = !Command::new("umount")
            .arg(&self.mnt)
            .output()
            .is_ok_and(|o| o.status.success());
        if busy {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).output();
        }
    }
}
