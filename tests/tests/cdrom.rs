//! cdrom end to end: a real guest reads an ISO through vhost-user-scsi, the host cannot eject
//! a disc the guest has locked (mounted) unless it forces, media change reaches the guest, and
//! the guest's own eject opens the tray.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use vback_common::control::{ClientError, ControlClient, ErrorKind};
use vback_tests::Guest;
use vback_tests::process::{Daemon, which, workspace_bin};

fn iso(dir: &Path, name: &str, files: &[(&str, &[u8])]) -> PathBuf {
    let src = dir.join(format!("{name}-src"));
    std::fs::create_dir_all(&src).unwrap();
    for (f, data) in files {
        std::fs::write(src.join(f), data).unwrap();
    }
    let out = dir.join(format!("{name}.iso"));
    let tool = which("genisoimage").expect("genisoimage is installed (scripts/setup.sh)");
    let st = Command::new(tool)
        .args(["-quiet", "-V", name, "-J", "-r", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .unwrap();
    assert!(st.success());
    out
}

fn cdrom(dir: &Path, sock: &Path, ctl: &Path, args: &[&str]) -> Result<Daemon, String> {
    let mut cmd = Command::new(workspace_bin("cdrom").unwrap());
    cmd.arg("--socket")
        .arg(sock)
        .arg("--control")
        .arg(ctl)
        .args(args);
    let mut d = Daemon::spawn(
        "cdrom",
        cmd,
        &dir.join(format!(
            "{}.log",
            sock.file_name().unwrap().to_string_lossy()
        )),
    )
    .map_err(|e| e.to_string())?;
    d.wait_for_socket(sock, Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    Ok(d)
}

fn call(ctl: &Path, cmd: &str, args: Value) -> Result<Value, ClientError> {
    ControlClient::connect(ctl).unwrap().call(cmd, args)
}

#[test]
fn guest_reads_an_iso_locks_ejects_and_sees_media_change() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let payload: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let a = iso(
        d,
        "DISC_A",
        &[("readme.txt", b"this is disc A\n"), ("data.bin", &payload)],
    );
    let b = iso(d, "DISC_B", &[("readme.txt", b"this is disc B\n")]);
    let sum = String::from_utf8(
        Command::new("sha256sum")
            .arg(d.join("DISC_A-src/data.bin"))
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let sum = sum.split_whitespace().next().unwrap().to_owned();
    let (sock, ctl) = (d.join("cd.sock"), d.join("cd.ctl"));
    let spec = format!("tap:cdrom:{},xvdc:cdrom,r", a.display());
    let mut daemon = cdrom(d, &sock, &ctl, &["--disk", &spec]).unwrap();

    // One disc serves one guest: a second daemon on the same image is refused.
    let second = cdrom(
        d,
        &d.join("cd2.sock"),
        &d.join("cd2.ctl"),
        &["--disk", &format!("tap:cdrom:{}", a.display())],
    );
    let msg = second.unwrap_err();
    assert!(
        msg.contains("one guest at a time") && msg.contains("in use"),
        "{msg}"
    );

    let (ctl1, ctl2) = (ctl.clone(), ctl.clone());
    let b2 = b.clone();
    let locked_reply = Arc::new(Mutex::new(None));
    let lr = locked_reply.clone();
    let run = Guest::new()
        .vhost_scsi(&sock, "")
        .on_host("eject-while-mounted", move || {
            *lr.lock().unwrap() = Some(call(&ctl1, "media-eject", Value::Null));
        })
        .on_host("swap", move || {
            // The guest's unlock (PREVENT ALLOW 0) follows its umount asynchronously: allow
            // it a moment.
            let mut r = call(&ctl2, "media-eject", Value::Null);
            for _ in 0..40 {
                if r.is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
                r = call(&ctl2, "media-eject", Value::Null);
            }
            r.expect("eject after unmount");
            call(&ctl2, "media-insert", json!({"path": b2.display().to_string()})).expect("insert disc B");
        })
        .run(
            r#"
check read 'wait_dev /dev/sr0 && cdctl /dev/sr0 status && mkdir -p /mnt && mount -t iso9660 -o ro /dev/sr0 /mnt && cat /mnt/readme.txt && sha256sum /mnt/data.bin'
check host-eject-refused 'echo VBACK-HOST:eject-while-mounted; sleep 2; cat /mnt/readme.txt'
check swap 'umount /mnt && cdctl /dev/sr0 unlock >/dev/null && echo VBACK-HOST:swap && i=0; while [ $i -lt 50 ]; do if mount -t iso9660 -o ro /dev/sr0 /mnt 2>/dev/null; then grep -q "disc B" /mnt/readme.txt && break; umount /mnt; fi; usleep 200000; i=$((i+1)); done; cat /mnt/readme.txt; umount /mnt'
check guest-eject 'cdctl /dev/sr0 eject && cdctl /dev/sr0 status'
"#,
        )
        .expect("the guest runs");
    eprintln!("{}", run.summary());
    run.assert_checks(&["read", "host-eject-refused", "swap", "guest-eject"]);
    let read = run.check("read").output.clone();
    assert!(read.starts_with("disc-ok\n"), "{read}");
    assert!(
        read.contains("this is disc A") && read.contains(&sum),
        "the guest read the ISO: {read}\n(expected {sum})"
    );
    match locked_reply.lock().unwrap().take() {
        Some(Err(ClientError::Command(e))) => {
            assert_eq!(e.kind, ErrorKind::Busy);
            assert!(
                e.message.contains("guest has locked the tray"),
                "{}",
                e.message
            );
        }
        other => panic!("the host eject of a mounted disc should be refused: {other:?}"),
    }
    assert!(
        run.check("host-eject-refused")
            .output
            .contains("this is disc A")
    );
    assert!(
        run.check("swap").output.contains("this is disc B"),
        "{}",
        run.output
    );
    assert!(
        run.check("guest-eject").output.contains("tray-open"),
        "{}",
        run.output
    );
    let st = call(&ctl, "status", Value::Null).unwrap();
    assert_eq!(st["device"]["tray"], "open", "{st}");
    assert!(
        st["device"]["medium"]
            .as_str()
            .unwrap()
            .ends_with("DISC_B.iso"),
        "{st}"
    );

    // Disc A was released by the swap: another daemon may take it now. A forced eject works
    // under a lock, and the daemon exits cleanly.
    let mut other = cdrom(
        d,
        &d.join("cd3.sock"),
        &d.join("cd3.ctl"),
        &["--disk", &format!("tap:cdrom:{}", a.display())],
    )
    .unwrap();
    assert!(call(&ctl, "media-eject", json!({"force": true})).is_ok());
    assert_eq!(
        other
            .terminate(Duration::from_secs(5))
            .and_then(|s| s.code()),
        Some(0)
    );
    assert_eq!(
        daemon
            .terminate(Duration::from_secs(5))
            .and_then(|s| s.code()),
        Some(0),
        "{}",
        daemon.log()
    );
}
