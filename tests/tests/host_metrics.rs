//! Host metrics for guests end to end: `vbctl host-metrics` writes vhostmd's metrics disk for
//! domain `alice` (whose first disk is a blkback), a second blkback serves that file read-only
//! to alice's QEMU guest as its second disk, as the Xen guide's
//! `block-attach alice tap:aio:/dev/shm/vhostmd0 xvdb r`, and the guest reads it.
//!
//! The guest has no vhostmd tools: it reads the disk as libmetrics does (header, content, header
//! again; retried while the busy flag is set or the header changed) and prints it in hex; the
//! test parses it with `vback_tests::vhostmd` (a reader written from the format), verifies the
//! checksum and finds the host's name and the read count of the guest's own first disk, as
//! alice's blkback reports it.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use vback_common::control::ControlClient;
use vback_tests::harness::Guest;
use vback_tests::process::{blkback, workspace_bin};
use vback_tests::vhostmd::{self, Metric};

/// The read count of the blkback behind `ctl`, summed over its queues.
fn reads(ctl: &Path) -> u64 {
    let v = ControlClient::connect(ctl)
        .unwrap()
        .call("stats", Value::Null)
        .unwrap();
    let s: vback_api::Stats = vback_api::decode("stats", v).unwrap();
    s.counters
        .iter()
        .filter(|c| c.name == "reads")
        .map(|c| c.value)
        .sum()
}

fn value<'a>(m: &'a [Metric], context: &str, domain: Option<&str>, name: &str) -> Option<&'a str> {
    m.iter()
        .find(|x| x.context == context && x.domain.as_deref() == domain && x.name == name)
        .map(|x| x.value.as_str())
}

/// Kills `vbctl host-metrics` when the test ends, whatever happens.
struct Writer(std::process::Child);
impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_guest_reads_the_hosts_metrics_and_its_own_disks_counters() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // As under /run/vback: one directory per domain; bob's disk must not reach alice.
    let run = d.join("run");
    for dom in ["alice", "bob"] {
        std::fs::create_dir_all(run.join(dom)).unwrap();
    }
    let disk = |dom: &str| {
        let dd = run.join(dom);
        blkback(
            &dd.join("xvda.sock"),
            &[
                "--disk",
                "null:64M",
                "--control",
                dd.join("xvda.ctl").to_str().unwrap(),
            ],
            &d.join(format!("{dom}.log")),
        )
        .unwrap()
    };
    let _alice = disk("alice");
    let _bob = disk("bob");
    let alice_ctl = run.join("alice/xvda.ctl");
    let mdisk = d.join("vhostmd0");
    let vbctl = workspace_bin("vbctl").unwrap();
    let writer = |extra: &[&str]| {
        let mut c = Command::new(&vbctl);
        c.args([
            "host-metrics",
            "--size",
            "64K",
            "--domain",
            "alice",
            "--output",
        ])
        .arg(&mdisk)
        .args(extra)
        .arg(&run);
        c
    };

    // Once, before any guest: the disk exists at its full size and reads back on the host.
    let out = writer(&["--once"]).output().unwrap();
    assert!(
        out.status.success(),
        "vbctl host-metrics --once: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&mdisk).unwrap();
    assert_eq!(bytes.len(), 64 * 1024);
    let m = vhostmd::metrics(&bytes).unwrap();
    assert_eq!(value(&m, "vm", Some("alice"), "xvda.reads"), Some("0"));
    assert_eq!(value(&m, "vm", Some("alice"), "xvda.up"), Some("1"));
    assert!(
        m.iter().all(|x| x.domain.as_deref() != Some("bob")),
        "--domain alice leaves bob out: {m:?}"
    );

    // The metrics disk served read-only by a blkback of its own (outside /run/vback), and the
    // writer updating it every second from now on.
    let msock = d.join("mdisk.sock");
    let mspec = format!("tap:aio:{},xvdb,r", mdisk.display());
    let _mdisk_server = blkback(&msock, &["--disk", &mspec], &d.join("m.log")).unwrap();
    let _writer = Writer(
        writer(&["--interval", "1"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );

    // The guest reads 200 blocks from its first disk, the host notes alice's read count, the
    // guest waits three updates and reads the metrics disk as libmetrics does.
    let at_snap = Arc::new(Mutex::new(None::<u64>));
    let (snap, ctl2) = (at_snap.clone(), alice_ctl.clone());
    let run_out = Guest::new()
        .vhost_blk(run.join("alice/xvda.sock"), "")
        .vhost_blk(&msock, "")
        .timeout(Duration::from_secs(300))
        .on_host("snap", move || {
            *snap.lock().unwrap() = Some(reads(&ctl2));
        })
        .run(
            r#"
check reads 'wait_dev /dev/vda && wait_dev /dev/vdb && cat /sys/block/vdb/ro && \
  dd if=/dev/vda of=/dev/null bs=4096 count=200 iflag=direct 2>/dev/null && echo VBACK-HOST:snap && sleep 3'
check metrics 'hdr() { dd if=/dev/vdb bs=512 count=1 iflag=direct 2>/dev/null | od -A n -t x1 -N 16 -v | tr -d " \n"; }; \
  i=0; while [ $i -lt 30 ]; do \
    h1=$(hdr); dd if=/dev/vdb of=/tmp/md bs=4096 count=4 iflag=direct 2>/dev/null; h2=$(hdr); \
    case "$h1" in 6d76626400000000*) [ "$h1" = "$h2" ] && break;; esac; \
    sleep 1; i=$((i+1)); \
  done; echo "tries $i"; od -A n -t x1 -v /tmp/md'
"#,
        )
        .expect("the guest runs");
    eprintln!("guest: {}", run_out.summary());
    run_out.assert_checks(&["reads", "metrics"]);
    let after = reads(&alice_ctl);
    let snap = at_snap
        .lock()
        .unwrap()
        .expect("the guest asked the host to note alice's reads");

    assert_eq!(
        run_out.check("reads").output.lines().next(),
        Some("1"),
        "the metrics disk is read-only in the guest"
    );
    let out = &run_out.check("metrics").output;
    let (tries, hex) = out.split_once('\n').unwrap();
    eprintln!("guest reader: {tries}");
    assert_ne!(tries, "tries 30", "the guest found a settled disk:\n{out}");
    let seen = vhostmd::from_hex(hex);
    assert_eq!(seen.len(), 16 * 1024, "{out}");
    let m = vhostmd::metrics(&seen).unwrap_or_else(|e| panic!("{e}:\n{out}"));

    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(
        value(&m, "host", None, "HostName"),
        Some(hostname.trim()),
        "{m:?}"
    );
    assert!(value(&m, "host", None, "TotalPhyMem").is_some(), "{m:?}");
    assert!(value(&m, "host", None, "TotalCPUTime").is_some(), "{m:?}");
    assert_eq!(value(&m, "vm", Some("alice"), "xvda.up"), Some("1"));
    assert_eq!(value(&m, "vm", Some("alice"), "xvda.kind"), Some("blkback"));
    let seen_reads: u64 = value(&m, "vm", Some("alice"), "xvda.reads")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("alice's xvda.reads: {m:?}"));
    eprintln!(
        "alice's xvda reads: {snap} at the snapshot, {seen_reads} in the guest, {after} at the end"
    );
    // Written after the snapshot (three updates passed), before the guest stopped: between the
    // two counts of alice's blkback, and at least the guest's 200 reads.
    assert!(
        (snap..=after).contains(&seen_reads) && seen_reads >= 200,
        "the guest saw {seen_reads} reads of its disk; alice's blkback counted {snap} when the \
         guest had read, {after} at the end"
    );
    assert!(
        m.iter().all(|x| x.domain.as_deref() != Some("bob")),
        "{m:?}"
    );
}
