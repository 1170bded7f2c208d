//! blkback's vbd hotplug scripts (`script=` in the disk entry): `add` runs before the disk is
//! opened and `remove` after it is closed, with Xen's parameters in the environment; a script's
//! `error` stops blkback with the script's message; the shipped `block` script answers `busy`
//! for a `phy:` device that is in use (a mounted loop device).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use vback_tests::process::{Daemon, workspace_bin};

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// Runs blkback once to its exit (used where it must refuse to start).
fn blkback_once(sock: &Path, disk: &str, script_dir: &Path) -> Output {
    Command::new(workspace_bin("blkback").unwrap())
        .arg("--socket")
        .arg(sock)
        .args(["--disk", disk])
        .arg("--script-dir")
        .arg(script_dir)
        .output()
        .unwrap()
}

/// A script that records its action, environment, and how many of blkback's descriptors
/// (its parent's) point at the image at that moment.
fn recorder(dir: &Path, record: &Path, image: &Path) -> PathBuf {
    script(
        dir,
        "rec",
        &format!(
            "open=$(ls -l /proc/$PPID/fd 2>/dev/null | grep -c '{img}')\n\
             echo \"$1 command=$command params=$params type=$type mode=$mode vdev=$vdev \
             domain=$domain uname=$uname open=$open\" >> {rec}",
            img = image.display(),
            rec = record.display()
        ),
    )
}

#[test]
fn add_before_the_disk_is_opened_and_remove_after_it_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let record = dir.path().join("record");
    recorder(dir.path(), &record, &img);
    let sock = dir.path().join("vu.sock");
    let disk = format!("tap:aio:{},xvdb,w,script=rec", img.display());
    let mut cmd = Command::new(workspace_bin("blkback").unwrap());
    cmd.arg("--socket")
        .arg(&sock)
        .args(["--disk", &disk, "--domain", "alice"])
        .arg("--script-dir")
        .arg(dir.path());
    let mut d = Daemon::spawn("blkback", cmd, &dir.path().join("log")).unwrap();
    d.wait_for_socket(&sock, Duration::from_secs(10)).unwrap();
    let added = std::fs::read_to_string(&record).unwrap();
    assert_eq!(
        added.trim(),
        format!(
            "add command=add params={p} type=file mode=w vdev=xvdb domain=alice \
             uname=file:{p} open=0",
            p = img.display()
        ),
        "{}",
        d.log()
    );
    // Serving: blkback has the image open now.
    let pid = d.pid().unwrap();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
        .filter(|t| t == &img)
        .count();
    assert!(open > 0, "blkback has the image open while serving");

    assert_eq!(
        d.terminate(Duration::from_secs(10)).and_then(|s| s.code()),
        Some(0),
        "{}",
        d.log()
    );
    let all = std::fs::read_to_string(&record).unwrap();
    let lines: Vec<&str> = all.lines().collect();
    assert_eq!(lines.len(), 2, "{all}");
    assert!(
        lines[1].starts_with("remove command=remove ") && lines[1].ends_with(" open=0"),
        "remove runs once the image is closed: {all}"
    );
    assert!(d.log().contains("add: connected"), "{}", d.log());
}

#[test]
fn an_error_stops_blkback_with_the_scripts_message() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let record = dir.path().join("record");
    script(
        dir.path(),
        "refuse",
        &format!(
            "echo \"$1\" >> {}\necho 'checking volume' >&2\n\
             echo 'volume group vg0 not found' >&2\nexit 3",
            record.display()
        ),
    );
    let sock = dir.path().join("vu.sock");
    let o = blkback_once(
        &sock,
        &format!("phy:{},xvda,w,script=refuse", img.display()),
        dir.path(),
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("refuse add failed") && t.contains("volume group vg0 not found"),
        "{t}"
    );
    assert!(t.contains("the disk was not opened"), "{t}");
    assert!(!sock.exists(), "nothing was served");
    // Refused at add: no remove (nothing was set up).
    assert_eq!(std::fs::read_to_string(&record).unwrap(), "add\n");

    // A script that cannot be found names where it was looked for.
    let o = blkback_once(&sock, "null:1M,xvda,w,script=no-such-script", dir.path());
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("{}/no-such-script", dir.path().display())),
        "{}",
        text(&o)
    );

    // add succeeded but the disk cannot be opened: remove still runs.
    let record2 = dir.path().join("record2");
    script(
        dir.path(),
        "ok",
        &format!("echo \"$1\" >> {}", record2.display()),
    );
    let missing = dir.path().join("missing.img");
    let o = blkback_once(
        &sock,
        &format!("file:{},xvda,w,script=ok", missing.display()),
        dir.path(),
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert_eq!(
        std::fs::read_to_string(&record2).unwrap(),
        "add\nremove\n",
        "{}",
        text(&o)
    );
}

/// A loop device over a file with a mounted ext4 file system, torn down on drop.
struct MountedLoop {
    dev: String,
    mnt: tempfile::TempDir,
    _img: tempfile::TempDir,
}

impl MountedLoop {
    fn new() -> MountedLoop {
        let img_dir = tempfile::tempdir().unwrap();
        let img = img_dir.path().join("fs.img");
        std::fs::write(&img, vec![0u8; 8 << 20]).unwrap();
        let run = |c: &mut Command| {
            let o = c.output().unwrap();
            assert!(o.status.success(), "{c:?}: {}", text(&o));
            String::from_utf8_lossy(&o.stdout).trim().to_owned()
        };
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img));
        let dev = run(Command::new("losetup").args(["--find", "--show"]).arg(&img));
        let mnt = tempfile::tempdir().unwrap();
        let m = MountedLoop {
            dev,
            mnt,
            _img: img_dir,
        };
        run(Command::new("mount").arg(&m.dev).arg(m.mnt.path()));
        m
    }
}

impl Drop for MountedLoop {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.mnt.path()).output();
        let _ = Command::new("losetup").args(["-d", &self.dev]).output();
    }
}

#[test]
fn block_says_busy_for_a_device_in_use() {
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/hotplug");
    let held = MountedLoop::new();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vu.sock");
    let blkback = |disk: &str| blkback_once(&sock, disk, &scripts);
    for mode in ["w", "r"] {
        let o = blkback(&format!("phy:{},xvda,{mode},script=block", held.dev));
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        let t = text(&o);
        assert!(t.contains("the device is busy"), "{mode}: {t}");
        assert!(
            t.contains(&format!(
                "{} is mounted {}on {}",
                held.dev,
                if mode == "r" { "read-write " } else { "" },
                held.mnt.path().display()
            )),
            "{mode}: {t}"
        );
        assert!(!sock.exists());
    }

    // The script alone, as an operator runs it by hand: `busy` on stdout, the reason on stderr.
    let o = Command::new(scripts.join("block"))
        .arg("add")
        .env("type", "phy")
        .env("params", &held.dev)
        .env("mode", "w")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hotplug-status=busy\n");

    // Not a block device, and a free one (connected).
    let o = blkback("phy:/etc/hostname,xvda,w,script=block");
    assert!(
        text(&o).contains("/etc/hostname is not a block device"),
        "{}",
        text(&o)
    );
    let _ = Command::new("umount").arg(held.mnt.path()).output();
    let o = Command::new(scripts.join("block"))
        .arg("add")
        .env("type", "phy")
        .env("params", &held.dev)
        .env("mode", "w")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));

    // The free device, served as a management tool starts blkback: --blk-file is phy: here.
    let mut d = vback_tests::process::blkback(
        &sock,
        &["--blk-file", &held.dev, "--read-only"],
        &dir.path().join("log"),
    )
    .unwrap();
    assert_eq!(
        d.terminate(Duration::from_secs(10)).and_then(|s| s.code()),
        Some(0),
        "{}",
        d.log()
    );
    assert!(
        d.log()
            .contains(&format!("disk phy:{} (block-device, ", held.dev)),
        "{}",
        d.log()
    );
}

#[test]
fn hook_directories_run_around_the_action() {
    // The shipped scripts in a directory of their own, with Xen-style hook directories.
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/hotplug");
    let dir = tempfile::tempdir().unwrap();
    for f in ["block", "block-lvm", "block-common.sh"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let record = dir.path().join("record");
    for (hook_dir, name) in [("block-pre.d", "pre"), ("block-post.d", "post")] {
        std::fs::create_dir(dir.path().join(hook_dir)).unwrap();
        script(
            &dir.path().join(hook_dir),
            &format!("{name}.hook"),
            &format!("echo \"{name} $1 $params\" >> {}", record.display()),
        );
    }
    let img = dir.path().join("disk.img");
    std::fs::write(&img, b"").unwrap();
    let block = |action: &str, params: &Path| {
        Command::new(dir.path().join("block"))
            .arg(action)
            .env("type", "file")
            .env("params", params)
            .env("mode", "w")
            .output()
            .unwrap()
    };
    let o = block("add", &img);
    assert!(o.status.success(), "{}", text(&o));
    let o = block("remove", &img);
    assert!(o.status.success(), "{}", text(&o));
    let p = img.display();
    assert_eq!(
        std::fs::read_to_string(&record).unwrap(),
        format!("pre add {p}\npost add {p}\npre remove {p}\npost remove {p}\n")
    );
    // A failed action runs no post hook; a failing pre hook fails the action.
    std::fs::remove_file(&record).unwrap();
    let missing = dir.path().join("missing.img");
    let o = block("add", &missing);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("does not exist"), "{}", text(&o));
    assert_eq!(
        std::fs::read_to_string(&record).unwrap(),
        format!("pre add {}\n", missing.display())
    );
    script(&dir.path().join("block-pre.d"), "pre.hook", "exit 4");
    let o = block("add", &img);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("pre.hook add failed"), "{}", text(&o));

    // block-lvm takes only phy:/dev/VG/LV.
    let o = Command::new(dir.path().join("block-lvm"))
        .arg("add")
        .env("type", "phy")
        .env("params", "/dev/sdc")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("/dev/sdc is not /dev/VG/LV"),
        "{}",
        text(&o)
    );
}
