//! The package as an operator installs it (`scripts/install.sh` into a DESTDIR): the same tree
//! every time and every file listed in docs/operations.md; systemd units that
//! `systemd-analyze verify` accepts and whose `ExecStart`, run under `systemd-socket-activate`
//! with the units' socket names, serves the right protocol and sends `READY=1` and `WATCHDOG=1`;
//! QEMU vhost-user descriptors that follow QEMU's schema and match `--print-capabilities`; man
//! pages and completions for every binary.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;
use vback_common::control::ControlClient;
use vback_tests::process::{Daemon, which, workspace_bin};
use vhost::VhostBackend;
use vhost::vhost_user::Frontend;

const BINS: [&str; 8] = [
    "blkback", "netback", "cdrom", "usbback", "bridge", "vmm-min", "vbctl", "vbimg",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs install.sh (the debug build, no build step) into `destdir` with `args`.
fn install(destdir: &Path, args: &[&str]) -> Output {
    // The debug binaries next to this test are the ones installed.
    workspace_bin("blkback").expect("the workspace's binaries are built");
    let o = Command::new(root().join("scripts/install.sh"))
        .arg("--no-build")
        .args(args)
        .env("DESTDIR", destdir)
        .env("PROFILE", "debug")
        .output()
        .unwrap();
    assert!(o.status.success(), "install.sh failed: {}", text(&o));
    o
}

/// Every file and directory under `dir`: relative path → (mode, contents or link target).
fn tree(dir: &Path) -> BTreeMap<String, (u32, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(dir).unwrap().display().to_string();
            let mode = m.permissions().mode();
            if m.is_dir() {
                stack.push(p.clone());
                out.insert(rel + "/", (mode, Vec::new()));
            } else {
                out.insert(rel, (mode, std::fs::read(&p).unwrap()));
            }
        }
    }
    out
}

/// `*` matches any run of characters (including '/').
fn glob(pattern: &str, s: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == s,
        Some((head, tail)) => {
            s.starts_with(head)
                && (head.len()..=s.len()).any(|i| s.is_char_boundary(i) && glob(tail, &s[i..]))
        }
    }
}

/// The patterns of docs/operations.md's "Installed files" list (PREFIX as /usr/local).
fn documented_files() -> Vec<String> {
    let doc = std::fs::read_to_string(root().join("docs/operations.md")).unwrap();
    let section = doc
        .split("\n## Installed files")
        .nth(1)
        .expect("docs/operations.md has a section `## Installed files`");
    let block = section
        .split("```")
        .nth(1)
        .expect("the section lists the files in a code block");
    block
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| l.starts_with("PREFIX/") || l.starts_with("/etc/"))
        .map(|l| l.replace("PREFIX/", "/usr/local/"))
        .collect()
}

#[test]
fn install_twice_gives_the_same_tree_and_every_file_is_documented() {
    let stage = tempfile::tempdir().unwrap();
    install(stage.path(), &[]);
    let first = tree(stage.path());
    let again = install(stage.path(), &[]);
    assert!(
        !text(&again).contains(".orig"),
        "a second run changes nothing: {}",
        text(&again)
    );
    let second = tree(stage.path());
    assert_eq!(
        first.keys().collect::<Vec<_>>(),
        second.keys().collect::<Vec<_>>()
    );
    for (k, v) in &first {
        assert!(second[k] == *v, "{k} differs after a second install");
    }

    // Every installed file is in the documented list, and every line of the list matches a file.
    let patterns = documented_files();
    let files: Vec<String> = first
        .keys()
        .filter(|k| !k.ends_with('/'))
        .map(|k| format!("/{k}"))
        .collect();
    for f in &files {
        assert!(
            patterns.iter().any(|p| glob(p, f)),
            "{f} is installed but not listed in docs/operations.md (Installed files)"
        );
    }
    for p in &patterns {
        assert!(
            files.iter().any(|f| glob(p, f)),
            "docs/operations.md lists {p}, which install.sh does not install"
        );
    }

    // Binaries stripped (far smaller than the build), executable; every binary has a man page
    // and completions.
    for b in BINS {
        let built = std::fs::metadata(workspace_bin(b).unwrap()).unwrap().len();
        let installed = stage.path().join("usr/local/bin").join(b);
        let m = std::fs::metadata(&installed).unwrap();
        assert!(
            m.len() * 2 < built,
            "{b}: {} bytes installed, {built} built",
            m.len()
        );
        assert!(m.permissions().mode() & 0o111 != 0, "{b} is executable");
        let section = if ["vbctl", "vbimg", "vmm-min"].contains(&b) {
            1
        } else {
            8
        };
        let page = format!("/usr/local/share/man/man{section}/{b}.{section}");
        assert!(files.contains(&page), "{page}");
        for c in [
            format!("/usr/local/share/bash-completion/completions/{b}"),
            format!("/usr/local/share/zsh/vendor-completions/_{b}"),
            format!("/usr/local/share/fish/vendor_completions.d/{b}.fish"),
        ] {
            assert!(files.contains(&c), "{c}");
        }
    }
    // vbctl's page names a page for each of its commands, and each exists.
    let man = std::str::from_utf8(&first["usr/local/share/man/man1/vbctl.1"].1)
        .unwrap()
        .to_owned();
    for cmd in ["status", "stats", "call", "check-disk", "check-vif"] {
        assert!(
            man.contains(&format!("vbctl\\-{}(1)", cmd.replace('-', "\\-"))),
            "{man}"
        );
        assert!(files.contains(&format!("/usr/local/share/man/man1/vbctl-{cmd}.1")));
    }
    assert!(man.contains("control sockets"), "{man}");

    // The scripts: executable, and they refuse to run without their parameters, saying which.
    for s in [
        "vif-bridge",
        "vif-route",
        "vif-nat",
        "vif-route-ifup",
        "block",
        "block-lvm",
    ] {
        let p = stage.path().join("etc/vback/scripts").join(s);
        let m = std::fs::metadata(&p).unwrap_or_else(|e| panic!("{s}: {e}"));
        assert!(m.permissions().mode() & 0o111 != 0, "{s} is executable");
    }
    let o = Command::new(stage.path().join("etc/vback/scripts/vif-bridge"))
        .arg("online")
        .env_remove("vif")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("$vif is not set"), "{}", text(&o));
    let o = Command::new(stage.path().join("etc/vback/scripts/block"))
        .arg("add")
        .env_remove("params")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("$params is not set"), "{}", text(&o));
    let o = Command::new(stage.path().join("etc/vback/scripts/block-lvm"))
        .arg("sideways")
        .output()
        .unwrap();
    assert!(text(&o).contains("takes add or remove"), "{}", text(&o));

    let o = Command::new(root().join("scripts/install.sh"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(
        help.contains("--prefix") && help.contains("vbimg"),
        "{help}"
    );
    assert!(!help.contains("set -"), "{help}");
}

#[test]
fn prefix_usr_puts_descriptors_where_qemu_looks() {
    let stage = tempfile::tempdir().unwrap();
    install(stage.path(), &["--prefix", "/usr"]);
    let d = stage
        .path()
        .join("usr/share/qemu/vhost-user/50-vback-blkback.json");
    let j: Value = serde_json::from_slice(&std::fs::read(&d).unwrap()).unwrap();
    assert_eq!(j["binary"], "/usr/bin/blkback", "{j}");
    let unit = std::fs::read_to_string(
        stage
            .path()
            .join("usr/lib/systemd/system/vback-blk@.service"),
    )
    .unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/blkback "), "{unit}");
    for placeholder in ["@BINDIR@", "@DOCDIR@", "@SCRIPTDIR@"] {
        assert!(!unit.contains(placeholder), "{unit}");
    }
}

/// A stage for the tests that use the installed files (once per test process).
fn stage() -> &'static Path {
    static STAGE: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    STAGE
        .get_or_init(|| {
            let t = tempfile::tempdir().unwrap();
            install(t.path(), &[]);
            t
        })
        .path()
}

const UNITS: &str = "usr/local/lib/systemd/system";

#[test]
fn systemd_analyze_verify_accepts_every_unit() {
    let tool = which("systemd-analyze").expect("systemd-analyze (package systemd) is installed");
    // A root of its own: the installed units, plus the host's targets and slices they refer to.
    let root = tempfile::tempdir().unwrap();
    install(root.path(), &[]);
    let sys = root.path().join("usr/lib/systemd/system");
    std::fs::create_dir_all(&sys).unwrap();
    for e in std::fs::read_dir("/usr/lib/systemd/system").unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if (name.ends_with(".target") || name.ends_with(".slice")) && p.exists() {
            std::fs::copy(&p, sys.join(&name)).unwrap();
        }
    }
    let units: Vec<String> = std::fs::read_dir(root.path().join(UNITS))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .map(|n| n.replace("@.", "@test-instance."))
        .collect();
    assert_eq!(units.len(), 9, "{units:?}");
    let o = Command::new(tool)
        .args(["verify", "--man=no"])
        .arg(format!("--root={}", root.path().display()))
        .args(&units)
        .output()
        .unwrap();
    // verify warns about unknown keys and bad values but exits 0: any output is a failure.
    assert!(
        o.status.success() && text(&o).trim().is_empty(),
        "systemd-analyze verify {units:?}:\n{}",
        text(&o)
    );
}

/// `[Section]` → key → values of a unit file (keys may repeat).
fn unit(path: &Path) -> HashMap<String, Vec<String>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    let mut section = String::new();
    for line in std::fs::read_to_string(path).unwrap().lines() {
        let line = line.trim();
        if line.starts_with('[') {
            section = line.trim_matches(['[', ']']).to_owned();
        } else if let Some((k, v)) = line.split_once('=')
            && !line.starts_with('#')
        {
            out.entry(format!("{section}.{k}"))
                .or_default()
                .push(v.to_owned());
        }
    }
    out
}

/// `KEY=VALUE` lines (an EnvironmentFile, or an Environment= value's words).
fn env_lines<'a>(lines: impl Iterator<Item = &'a str>, env: &mut HashMap<String, String>) {
    for l in lines {
        let l = l.trim();
        if l.starts_with('#') {
            continue;
        }
        if let Some((k, v)) = l.split_once('=') {
            env.insert(k.to_owned(), v.to_owned());
        }
    }
}

/// systemd's ExecStart expansion: `${NAME}` is one word, `$NAME` is split on whitespace.
fn expand(exec: &str, env: &HashMap<String, String>) -> Vec<String> {
    let mut argv = Vec::new();
    for word in exec.split_whitespace() {
        if let Some(name) = word.strip_prefix("${").and_then(|w| w.strip_suffix('}')) {
            argv.push(env.get(name).cloned().unwrap_or_default());
        } else if let Some(name) = word.strip_prefix('$') {
            if let Some(v) = env.get(name) {
                argv.extend(v.split_whitespace().map(str::to_owned));
            }
        } else {
            argv.push(word.to_owned());
        }
    }
    argv
}

/// Runs the `kind` unit's ExecStart as systemd would (its Environment=, the example
/// configuration with `overrides`, both sockets named by their socket units) under
/// systemd-socket-activate; checks the vhost-user socket speaks the device's protocol (feature
/// bits `want_features`), the control socket answers as `daemon`, and READY=1 and WATCHDOG=1
/// arrive on NOTIFY_SOCKET.
fn socket_activated(kind: &str, daemon: &str, overrides: &[(&str, &str)], want_features: u64) {
    let tool = which("systemd-socket-activate").expect("systemd-socket-activate is installed");
    let stage = stage();
    let units = stage.join(UNITS);
    let service = unit(&units.join(format!("vback-{kind}@.service")));
    let vu = unit(&units.join(format!("vback-{kind}@.socket")));
    let ctl = unit(&units.join(format!("vback-{kind}-control@.socket")));
    assert_eq!(service["Service.Type"], ["notify"]);
    assert!(service.contains_key("Service.WatchdogSec"), "{service:?}");
    assert_eq!(
        service["Service.Sockets"],
        [format!(
            "vback-{kind}@%i.socket vback-{kind}-control@%i.socket"
        )]
    );
    assert_eq!(
        service["Service.EnvironmentFile"],
        [format!("/etc/vback/{kind}/%i.conf")]
    );

    let mut env = HashMap::new();
    for e in service.get("Service.Environment").into_iter().flatten() {
        env_lines(e.split_whitespace(), &mut env);
    }
    let example = std::fs::read_to_string(
        stage.join(format!("usr/local/share/doc/vback/examples/{kind}.conf")),
    )
    .unwrap();
    env_lines(example.lines(), &mut env);
    for (k, v) in overrides {
        env.insert((*k).to_owned(), (*v).to_owned());
    }
    let mut argv = expand(&service["Service.ExecStart"][0], &env);
    // The binary as installed (under the stage).
    argv[0] = stage
        .join(argv[0].trim_start_matches('/'))
        .display()
        .to_string();

    let dir = tempfile::tempdir().unwrap();
    let (sock, ctl_sock, notify) = (
        dir.path().join("vu.sock"),
        dir.path().join("ctl.sock"),
        dir.path().join("notify"),
    );
    let rx = UnixDatagram::bind(&notify).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut cmd = Command::new(tool);
    cmd.arg("-l")
        .arg(&sock)
        .arg("-l")
        .arg(&ctl_sock)
        .arg(format!(
            "--fdname={}:{}",
            vu["Socket.FileDescriptorName"][0], ctl["Socket.FileDescriptorName"][0]
        ));
    cmd.arg(format!("--setenv=NOTIFY_SOCKET={}", notify.display()))
        .arg("--setenv=WATCHDOG_USEC=200000");
    for (k, v) in &env {
        cmd.arg(format!("--setenv={k}={v}"));
    }
    cmd.args(&argv);
    let mut d = Daemon::spawn(kind, cmd, &dir.path().join("log")).unwrap();
    d.wait_for_socket(&sock, Duration::from_secs(10)).unwrap();

    let fe = Frontend::connect(&sock, 1).expect("connect");
    fe.set_owner().unwrap();
    let features = fe
        .get_features()
        .unwrap_or_else(|e| panic!("{e}: {}", d.log()));
    assert_eq!(
        features & want_features,
        want_features,
        "{kind}: features {features:#x}: {}",
        d.log()
    );
    let (mut ready, mut watchdog) = (false, false);
    let mut buf = [0u8; 512];
    while !(ready && watchdog) {
        let n = rx
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("{kind}: no READY=1/WATCHDOG=1 ({e}): {}", d.log()));
        let msg = String::from_utf8_lossy(&buf[..n]);
        ready |= msg.lines().any(|l| l == "READY=1");
        watchdog |= msg.lines().any(|l| l == "WATCHDOG=1");
    }
    let st = ControlClient::connect(&ctl_sock)
        .unwrap()
        .call("status", Value::Null)
        .unwrap();
    assert_eq!(st["daemon"]["name"], daemon, "{st}");
    assert_eq!(st["daemon"]["frontend_connected"], true, "{st}");
    drop(fe);
    assert_eq!(
        d.terminate(Duration::from_secs(10)).and_then(|s| s.code()),
        Some(0),
        "{}",
        d.log()
    );
}

#[test]
fn blk_unit_under_socket_activation() {
    // VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ
    socket_activated(
        "blk",
        "blkback",
        &[("DISK", "null:64M,xvda,w")],
        1 << 9 | 1 << 12,
    );
}

#[test]
fn net_unit_under_socket_activation() {
    // VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_CTRL_VQ; the null host side: no tap
    // on this machine's network.
    socket_activated(
        "net",
        "netback",
        &[("NETBACK_OPTS", "--devid 0 --host null --null-rx off")],
        1 << 5 | 1 << 15 | 1 << 17,
    );
}

#[test]
fn cd_unit_under_socket_activation() {
    let media = tempfile::tempdir().unwrap();
    let opts = format!("--media-dir {}", media.path().display());
    // VIRTIO_SCSI_F_HOTPLUG, VIRTIO_SCSI_F_CHANGE
    socket_activated(
        "cd",
        "cdrom",
        &[("MEDIA", "--empty"), ("CDROM_OPTS", &opts)],
        1 << 1 | 1 << 2,
    );
}

#[test]
fn descriptors_follow_qemus_schema_and_match_print_capabilities() {
    let stage = stage();
    let dir = stage.join("etc/qemu/vhost-user");
    let mut seen = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        let j: Value = serde_json::from_slice(&std::fs::read(&p).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let obj = j.as_object().unwrap();
        // QEMU's VhostUserBackend: description, type, binary (and optional tags); nothing else.
        for k in obj.keys() {
            assert!(
                ["description", "type", "binary", "tags"].contains(&k.as_str()),
                "{}: unknown key {k}",
                p.display()
            );
        }
        assert!(j["description"].as_str().is_some_and(|s| !s.is_empty()));
        let ty = j["type"].as_str().unwrap();
        assert!(["block", "net", "scsi"].contains(&ty), "{ty}");
        let binary = j["binary"].as_str().unwrap();
        assert!(binary.starts_with('/'), "{binary} is absolute");
        let installed = stage.join(binary.trim_start_matches('/'));
        assert!(installed.is_file(), "{binary} exists after install");
        // The binary's capabilities: the same type, features from the schema's list for it.
        let o = Command::new(&installed)
            .arg("--print-capabilities")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        let caps: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(caps["type"], ty, "{caps}");
        let features: Vec<&str> = caps["features"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap())
            .collect();
        let allowed: &[&str] = match ty {
            "block" => &["read-only", "blk-file"],
            _ => &[],
        };
        for f in &features {
            assert!(allowed.contains(f), "{ty}: {f} is not in QEMU's schema");
        }
        if ty == "block" {
            assert_eq!(features, ["read-only", "blk-file"], "{caps}");
        }
        seen.push(ty.to_owned());
    }
    seen.sort();
    assert_eq!(seen, ["block", "net", "scsi"]);
}

/// What a management tool does with a block descriptor that reports read-only and blk-file.
#[test]
fn blkback_serves_blk_file_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let sock = dir.path().join("vu.sock");
    let mut d = vback_tests::process::blkback(
        &sock,
        &["--blk-file", img.to_str().unwrap(), "--read-only"],
        &dir.path().join("log"),
    )
    .unwrap();
    let fe = Frontend::connect(&sock, 1).unwrap();
    fe.set_owner().unwrap();
    let f = fe.get_features().unwrap();
    assert!(
        f & 1 << 5 != 0,
        "VIRTIO_BLK_F_RO offered: {f:#x}: {}",
        d.log()
    );
    drop(fe);
    assert_eq!(
        d.terminate(Duration::from_secs(10)).and_then(|s| s.code()),
        Some(0)
    );
    // --blk-file and --disk together are refused.
    let o = Command::new(workspace_bin("blkback").unwrap())
        .args([
            "--blk-file",
            "/x",
            "--disk",
            "null:1M",
            "--socket",
            "/tmp/none",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("--blk-file"), "{}", text(&o));
}

#[test]
fn libvirt_examples_in_the_docs_validate() {
    let tool = which("virt-xml-validate")
        .expect("virt-xml-validate (package libvirt-clients, scripts/setup.sh) is installed");
    let doc = std::fs::read_to_string(root().join("docs/operations.md")).unwrap();
    let examples: Vec<&str> = doc
        .split("```xml\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .collect();
    assert!(
        !examples.is_empty(),
        "docs/operations.md has a libvirt example"
    );
    let dir = tempfile::tempdir().unwrap();
    for (i, x) in examples.iter().enumerate() {
        assert!(
            x.contains("<memoryBacking>") && x.contains("vhostuser"),
            "{x}"
        );
        let p = dir.path().join(format!("domain{i}.xml"));
        std::fs::write(&p, x).unwrap();
        let o = Command::new(&tool).arg(&p).arg("domain").output().unwrap();
        assert!(o.status.success(), "{x}\n{}", text(&o));
    }
}
