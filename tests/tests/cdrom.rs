//! cdrom end to end: a real guest reads an ISO through vhost-user-scsi, the host cannot eject
//! a disc the guest has locked (mounted) unless it forces, media change reaches the guest, and
//! the guest's own eject opens the tray; and `media-insert` takes only images and drives under
//! the media directories (no guest needed for that one).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use vback_common::control::{ClientError, ControlClient, ErrorKind};
use vback_tests::Guest;
use vback_tests::process::{Daemon, vback_daemon, which};

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
    let log = dir.join(format!(
        "{}.log",
        sock.file_name().unwrap().to_string_lossy()
    ));
    let mut all = vec!["--control", ctl.to_str().unwrap()];
    all.extend_from_slice(args);
    vback_daemon("cdrom", sock, &all, &log).map_err(|e| e.to_string())
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
    let reference = d.join("reference.iso");
    std::fs::copy(&a, &reference).unwrap();
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
    let (esock, ectl) = (d.join("empty.sock"), d.join("empty.ctl"));
    let _empty = cdrom(d, &esock, &ectl, &["--empty"]).unwrap();

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

    let (ctl1, ctl2, ctl3, ctl4) = (ctl.clone(), ctl.clone(), ctl.clone(), ctl.clone());
    let (b2, b3) = (b.clone(), b.clone());
    let locked_reply = Arc::new(Mutex::new(None));
    let lr = locked_reply.clone();
    let noticed = Arc::new(Mutex::new(None));
    let nt = noticed.clone();
    let run = Guest::new()
        .vhost_scsi(&sock, "")
        .vhost_scsi(&esock, "")
        .qemu_cdrom(&reference)
        .kernel_arg("block.events_dfl_poll_msecs=1000")
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
            // The guest is asleep: only its kernel's polling can take the NewMedia event.
            let t0 = std::time::Instant::now();
            while t0.elapsed() < Duration::from_millis(5500) {
                let st = call(&ctl2, "status", Value::Null).unwrap();
                if st["device"]["media_event_pending"] == false {
                    *nt.lock().unwrap() = Some(t0.elapsed());
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
        .on_host("force-eject", move || {
            call(&ctl3, "media-eject", json!({"force": true})).expect("a forced eject works");
        })
        .on_host("insert-b", move || {
            call(&ctl4, "media-insert", json!({"path": b3.display().to_string()})).expect("insert disc B again");
        })
        .run(
            r#"
check map 'wait_dev /dev/sr2 && for s in /sys/block/sr*; do n=${s##*/}; \
  if [ "$(cat $s/device/vendor)" = "QEMU    " ]; then echo $n > /tmp/ref; \
  elif [ "$(cdctl /dev/$n status)" = no-disc ]; then echo $n > /tmp/empty; else echo $n > /tmp/ours; fi; done; \
  echo "ours=$(cat /tmp/ours) empty=$(cat /tmp/empty) reference=$(cat /tmp/ref)"'
check compare 'for n in $(cat /tmp/ours) $(cat /tmp/ref); do echo "$(cat /sys/block/$n/size) removable=$(cat /sys/block/$n/removable) type=$(cat /sys/block/$n/device/type) $(cdctl /dev/$n toc)"; done'
check empty 'e=$(cat /tmp/empty); cdctl /dev/$e status; if dd if=/dev/$e of=/dev/null bs=2048 count=1 2>/dev/null; then echo READ-SUCCEEDED; exit 1; fi; echo read-failed'
check read 'o=$(cat /tmp/ours); cdctl /dev/$o status && mkdir -p /mnt && mount -t iso9660 -o ro /dev/$o /mnt && cat /mnt/readme.txt && sha256sum /mnt/data.bin'
check host-eject-refused 'echo VBACK-HOST:eject-while-mounted; sleep 2; cat /mnt/readme.txt'
check swap 'o=$(cat /tmp/ours); umount /mnt && cdctl /dev/$o unlock >/dev/null && echo VBACK-HOST:swap && sleep 6; i=0; \
  while [ $i -lt 50 ]; do if mount -t iso9660 -o ro /dev/$o /mnt 2>/dev/null; then grep -q "disc B" /mnt/readme.txt && break; umount /mnt; fi; usleep 200000; i=$((i+1)); done; \
  cat /mnt/readme.txt'
check force-eject 'o=$(cat /tmp/ours); echo VBACK-HOST:force-eject; sleep 2; \
  if dd if=/dev/$o of=/dev/null bs=2048 count=1 skip=16 iflag=direct 2>/dev/null; then echo READ-AFTER-FORCED-EJECT; exit 1; fi; \
  umount /mnt 2>/dev/null; echo "guest still here"'
check guest-eject 'o=$(cat /tmp/ours); echo VBACK-HOST:insert-b; i=0; while [ "$(cdctl /dev/$o status)" != disc-ok ] && [ $i -lt 50 ]; do usleep 200000; i=$((i+1)); done; \
  cdctl /dev/$o eject && cdctl /dev/$o status'
"#,
        )
        .expect("the guest runs");
    eprintln!("{}", run.summary());
    run.assert_checks(&[
        "map",
        "compare",
        "empty",
        "read",
        "host-eject-refused",
        "swap",
        "force-eject",
        "guest-eject",
    ]);

    // Our answers match QEMU's scsi-cd on the same ISO where the protocol fixes the bytes.
    let cmp: Vec<&str> = run.check("compare").output.lines().collect();
    assert_eq!(cmp.len(), 2, "{}", run.output);
    assert_eq!(
        cmp[0],
        cmp[1],
        "ours vs QEMU's scsi-cd:\n{}",
        run.check("compare").output
    );
    assert!(cmp[0].contains("removable=1 type=5"), "{}", cmp[0]);

    assert!(
        run.check("empty").output.starts_with("no-disc"),
        "{}",
        run.output
    );
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
    let noticed = noticed.lock().unwrap().take();
    assert!(
        noticed.is_some(),
        "the sleeping guest's kernel polled the media change"
    );
    eprintln!("media change noticed by the guest's polling after {noticed:?}");
    assert!(
        run.check("swap").output.contains("this is disc B"),
        "{}",
        run.output
    );
    assert!(
        run.check("force-eject").output.contains("guest still here"),
        "{}",
        run.output
    );
    assert!(
        run.check("guest-eject").output.contains("tray-open"),
        "{}",
        run.output
    );

    // After the guest's eject: tray open, no medium; a media-insert closes it again.
    let st = call(&ctl, "status", Value::Null).unwrap();
    assert_eq!(st["device"]["tray"], "open", "{st}");
    assert!(st["device"]["medium"].is_null(), "{st}");
    call(
        &ctl,
        "media-insert",
        json!({"path": b.display().to_string()}),
    )
    .unwrap();
    let st = call(&ctl, "status", Value::Null).unwrap();
    assert_eq!(st["device"]["tray"], "closed", "{st}");
    let stats = call(&ctl, "stats", Value::Null).unwrap();
    assert!(
        stats["device"]["get_event_status"].as_u64().unwrap() > 3,
        "the guest polls: {stats}"
    );
    // Every READ the guest sent has a latency sample.
    let typed: vback_api::Stats = vback_api::decode("stats", stats.clone()).unwrap();
    let reads = stats["device"]["read"].as_u64().unwrap();
    assert!(reads > 0, "{stats}");
    let h = typed
        .histograms
        .iter()
        .find(|h| h.labels.get("op").map(String::as_str) == Some("read"))
        .expect("a read latency histogram");
    assert_eq!(h.histogram.count, reads, "{stats}");

    // Disc A was released by the swap: another daemon may take it now.
    let mut other = cdrom(
        d,
        &d.join("cd3.sock"),
        &d.join("cd3.ctl"),
        &["--disk", &format!("tap:cdrom:{}", a.display())],
    )
    .unwrap();
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

fn refused(ctl: &Path, path: &Path) -> String {
    match call(
        ctl,
        "media-insert",
        json!({"path": path.display().to_string()}),
    ) {
        Err(ClientError::Command(e)) => {
            assert_eq!(e.kind, ErrorKind::Failed, "{}", e.message);
            e.message
        }
        other => panic!(
            "media-insert {} should be refused: {other:?}",
            path.display()
        ),
    }
}

fn medium(ctl: &Path) -> Value {
    call(ctl, "status", Value::Null).unwrap()["device"]["medium"].clone()
}

#[test]
fn media_insert_takes_only_images_and_drives_under_the_media_directories() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let isos = d.join("isos");
    std::fs::create_dir(&isos).unwrap();
    let a = iso(&isos, "DISC_A", &[("readme.txt", b"this is disc A\n")]);
    let b = iso(&isos, "DISC_B", &[("readme.txt", b"this is disc B\n")]);
    let outside = iso(d, "DISC_C", &[("readme.txt", b"this is disc C\n")]);
    let shadow_link = isos.join("shadow.iso");
    std::os::unix::fs::symlink("/etc/shadow", &shadow_link).unwrap();
    let outside_link = isos.join("outside.iso");
    std::os::unix::fs::symlink(&outside, &outside_link).unwrap();
    let inside_link = isos.join("current.iso");
    std::os::unix::fs::symlink(&b, &inside_link).unwrap();
    let fifo = isos.join("fifo.iso");
    let st = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(st.success());
    let a_path = json!(a.display().to_string());

    // Started with a medium and no --media-dir: media come from that medium's directory.
    let (sock, ctl) = (d.join("cd.sock"), d.join("cd.ctl"));
    let mut daemon = cdrom(
        d,
        &sock,
        &ctl,
        &["--disk", &format!("tap:cdrom:{}", a.display())],
    )
    .unwrap();
    let shown = isos.display().to_string();
    for path in [
        Path::new("/etc/shadow"),
        &shadow_link,
        &outside_link,
        Path::new("/proc/self/mem"),
    ] {
        let msg = refused(&ctl, path);
        assert!(
            msg.contains(&path.display().to_string())
                && msg.contains("outside the media directories")
                && msg.contains(&shown)
                && msg.contains("--media-dir DIR"),
            "{msg}"
        );
        assert_eq!(medium(&ctl), a_path, "disc A is still in the drive");
    }
    let msg = refused(&ctl, &fifo);
    assert!(
        msg.contains(&fifo.display().to_string()) && msg.contains("FIFO"),
        "{msg}"
    );
    let msg = refused(&ctl, Path::new("/dev/null"));
    assert!(msg.contains("outside the media directories"), "{msg}");
    assert_eq!(medium(&ctl), a_path);

    // An ISO in the media directory, directly and through a link that stays inside.
    call(
        &ctl,
        "media-insert",
        json!({"path": b.display().to_string()}),
    )
    .unwrap();
    assert_eq!(medium(&ctl), json!(b.display().to_string()));
    call(&ctl, "media-eject", Value::Null).unwrap();
    call(
        &ctl,
        "media-insert",
        json!({"path": inside_link.display().to_string()}),
    )
    .unwrap();
    assert_eq!(
        medium(&ctl),
        json!(b.display().to_string()),
        "the link's target is what the drive holds"
    );
    assert_eq!(
        daemon
            .terminate(Duration::from_secs(5))
            .and_then(|s| s.code()),
        Some(0),
        "{}",
        daemon.log()
    );

    // An empty drive without --media-dir takes no media at all, and says what to do.
    let (esock, ectl) = (d.join("e.sock"), d.join("e.ctl"));
    let _empty = cdrom(d, &esock, &ectl, &["--empty"]).unwrap();
    let msg = refused(&ectl, &b);
    assert!(msg.contains("start cdrom with --media-dir DIR"), "{msg}");

    // --media-dir, repeatable: media come from those directories only.
    let other = d.join("other");
    std::fs::create_dir(&other).unwrap();
    let (msock, mctl) = (d.join("m.sock"), d.join("m.ctl"));
    let _m = cdrom(
        d,
        &msock,
        &mctl,
        &[
            "--empty",
            "--media-dir",
            other.to_str().unwrap(),
            "--media-dir",
            isos.to_str().unwrap(),
        ],
    )
    .unwrap();
    call(
        &mctl,
        "media-insert",
        json!({"path": a.display().to_string()}),
    )
    .unwrap();
    let msg = refused(&mctl, &outside);
    assert!(
        msg.contains(&other.display().to_string()) && msg.contains(&shown),
        "{msg}"
    );

    // A --media-dir that is not a directory stops cdrom at start, naming the option.
    let bad = cdrom(
        d,
        &d.join("bad.sock"),
        &d.join("bad.ctl"),
        &["--empty", "--media-dir", a.to_str().unwrap()],
    )
    .unwrap_err();
    assert!(
        bad.contains("--media-dir") && bad.contains("not a directory"),
        "{bad}"
    );
}

/// A disc another daemon holds is refused in cdrom's terms: it names cdrom's --shared (cdrom
/// has no mode w!) and does not call a read-only disc "opened for write". No guest needed.
#[test]
fn a_disc_in_use_is_refused_naming_cdroms_own_option() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let disc = d.join("disc.iso");
    std::fs::write(&disc, vec![0u8; 64 * 2048]).unwrap();
    let spec = format!("tap:cdrom:{}", disc.display());
    let mut first = cdrom(d, &d.join("a.sock"), &d.join("a.ctl"), &["--disk", &spec]).unwrap();
    for (name, extra, says) in [
        ("b", None, "start every cdrom daemon using it with --shared"),
        (
            "c",
            Some("--shared"),
            "restart that cdrom daemon with --shared",
        ),
    ] {
        let mut args = vec!["--disk", spec.as_str()];
        args.extend(extra);
        let msg = cdrom(
            d,
            &d.join(format!("{name}.sock")),
            &d.join(format!("{name}.ctl")),
            &args,
        )
        .unwrap_err();
        assert!(msg.contains(says), "{msg}");
        assert!(msg.contains("in use by pid"), "{msg}");
        for wrong in ["w!", "opened for write"] {
            assert!(!msg.contains(wrong), "names `{wrong}`: {msg}");
        }
    }
    first.terminate(Duration::from_secs(5));
    // Daemons that all pass --shared share the disc.
    let _a = cdrom(
        d,
        &d.join("d.sock"),
        &d.join("d.ctl"),
        &["--disk", &spec, "--shared"],
    )
    .unwrap();
    let _b = cdrom(
        d,
        &d.join("e.sock"),
        &d.join("e.ctl"),
        &["--disk", &spec, "--shared"],
    )
    .unwrap();
}
