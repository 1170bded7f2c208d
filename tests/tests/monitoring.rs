//! Monitoring end to end: `vbctl top -b` over real daemons, and the latency histograms they
//! serve.
//!
//! Two blkbacks share a domain's directory (as under /run/vback/<domain>/): one is read by the test front end
//! (`BlkDriver`, one request at a time, as long as `vbctl top` runs), the other idles; a third
//! was killed with SIGKILL and left its control socket behind. `vbctl top -b -i 2 -d 1`
//! prints two reports; each shows non-zero reads per second in the busy disk's row only, the
//! idle disk at zero, and the killed one as gone. Afterwards the busy disk's read histogram
//! holds exactly one sample per read it served.

use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;
use vback_common::control::ControlClient;
use vback_tests::frontend::blk_layout::{DATA, HDR, STATUS};
use vback_tests::frontend::{BlkDriver, DESC_WRITE};
use vback_tests::process::{blkback, workspace_bin};

fn stats(ctl: &Path) -> vback_api::Stats {
    let v = ControlClient::connect(ctl)
        .unwrap()
        .call("stats", Value::Null)
        .unwrap();
    vback_api::decode("stats", v).unwrap()
}

/// A blkback serving a null disk as `<dir>/<name>.sock`, with `<name>.ctl` and `<name>.log`
/// beside it (the layout under /run/vback/<domain>).
fn null_disk(dir: &Path, name: &str) -> vback_tests::process::Daemon {
    blkback(
        &dir.join(format!("{name}.sock")),
        &[
            "--disk",
            "null:64M",
            "--control",
            dir.join(format!("{name}.ctl")).to_str().unwrap(),
        ],
        &dir.join(format!("{name}.log")),
    )
    .unwrap()
}

/// The rows of `vbctl top` output for device `vdev` of `domain` (indented below the domain's
/// row), split into columns.
fn rows<'a>(out: &'a str, domain: &str, vdev: &str) -> Vec<Vec<&'a str>> {
    let mut in_domain = false;
    let mut found = Vec::new();
    for l in out.lines() {
        let c: Vec<&str> = l.split_whitespace().collect();
        if c.is_empty() {
            continue;
        }
        if !l.starts_with(' ') {
            in_domain = c[0] == domain && c.get(1) == Some(&"dom");
        } else if in_domain && l.starts_with("  ") && c[0] == vdev {
            found.push(c);
        }
    }
    found
}

/// The rows of `vbctl top` output for `domain` itself (its devices folded in).
fn domain_rows<'a>(out: &'a str, domain: &str) -> Vec<Vec<&'a str>> {
    out.lines()
        .filter(|l| !l.starts_with(' '))
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|c| c.first() == Some(&domain) && c.get(1) == Some(&"dom"))
        .collect()
}

#[test]
fn top_shows_a_busy_disk_an_idle_one_and_a_killed_one() {
    let dir = tempfile::tempdir().unwrap();
    // As under /run/vback: one directory per domain.
    let d = &dir.path().join("alice");
    std::fs::create_dir(d).unwrap();
    let start = |name: &str| null_disk(d, name);
    let busy = start("busy");
    let _idle = start("idle");
    let mut dead = start("dead");
    dead.kill();
    assert!(d.join("dead.ctl").exists(), "SIGKILL leaves the socket");

    let mut drv = BlkDriver::connect(&d.join("busy.sock"));
    let mut top = Command::new(workspace_bin("vbctl").unwrap())
        .args(["top", "-b", "-i", "2", "-d", "1"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Reads of 4 KiB, one at a time, until top has printed its two reports.
    let mut sent = 0u64;
    // A VIRTIO_BLK_T_IN (0) header at sector 0.
    drv.mem().put(HDR, &[0u8; 16]);
    while top.try_wait().unwrap().is_none() {
        drv.mem().put(STATUS, &[0xff]);
        assert!(
            drv.submit(&[
                (HDR, 16, 0),
                (DATA, 4096, DESC_WRITE),
                (STATUS, 1, DESC_WRITE)
            ]),
            "read {sent} completed"
        );
        assert_eq!(drv.mem().get8(STATUS), 0, "read {sent} succeeded");
        sent += 1;
    }
    let out = top.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "vbctl top failed: {stderr}\n{stdout}");
    eprintln!("{stdout}");
    for l in stdout.lines() {
        assert!(l.chars().count() <= 80, "wider than 80 columns: {l:?}");
    }
    assert_eq!(
        stdout.matches("DEVICE").count(),
        2,
        "two reports:\n{stdout}"
    );

    let pid = busy.pid().unwrap().to_string();
    let busy_rows = rows(&stdout, "alice", "busy");
    assert_eq!(busy_rows.len(), 2, "{stdout}");
    for r in &busy_rows {
        // DEVICE KIND PID RD/s WR/s RDMB/s WRMB/s P50 P99 INFL ERR
        assert_eq!(&r[1..3], ["blk", pid.as_str()], "{stdout}");
        assert_ne!(r[3], "0", "the busy disk reads: {stdout}");
        assert_eq!(r[4], "0", "and does not write: {stdout}");
        assert_ne!(r[7], "-", "a read latency: {stdout}");
        // (In flight is 0 or 1, depending on where the sample fell.)
        assert!(
            ["0", "1"].contains(&r[9]),
            "one request at a time: {stdout}"
        );
        assert_eq!(r[10], "0", "no errors: {stdout}");
    }
    for r in rows(&stdout, "alice", "idle") {
        assert_eq!(&r[3..5], ["0", "0"], "the idle disk: {stdout}");
        assert_eq!(r[7], "-", "no latency without requests: {stdout}");
    }
    let dead_rows = rows(&stdout, "alice", "dead");
    assert_eq!(dead_rows.len(), 2, "{stdout}");
    for r in dead_rows {
        assert_eq!(r[3], "gone", "the killed daemon: {stdout}");
    }
    // The domain's row, above its devices: all three folded in, the busy disk's reads in its
    // totals (the idle one adds none, the killed one nothing).
    let alice = domain_rows(&stdout, "alice");
    assert_eq!(alice.len(), 2, "one alice row per report: {stdout}");
    for r in &alice {
        // DOMAIN dom NDEV RD/s WR/s RDMB/s WRMB/s P50 P99 INFL ERR
        assert_eq!(r[2], "3dev", "{stdout}");
        assert_ne!(r[3], "0", "the busy disk's reads: {stdout}");
        assert_eq!(r[4], "0", "{stdout}");
        assert_ne!(r[7], "-", "a read latency: {stdout}");
        assert_eq!(r[10], "0", "{stdout}");
    }
    let first_report: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("DEVICE"))
        .skip(1)
        .take_while(|l| !l.is_empty())
        .collect();
    assert!(
        first_report
            .first()
            .is_some_and(|l| l.starts_with("alice ")),
        "the domain's row comes first, then its devices: {stdout}"
    );

    // One latency sample per read served, on the read histogram.
    let s = stats(&d.join("busy.ctl"));
    let reads: u64 = s
        .counters
        .iter()
        .filter(|c| c.name == "reads")
        .map(|c| c.value)
        .sum();
    assert_eq!(reads, sent, "every read the front end sent was counted");
    let sampled: u64 = s
        .histograms
        .iter()
        .filter(|h| h.labels.get("op").map(String::as_str) == Some("read"))
        .map(|h| h.histogram.count)
        .sum();
    assert_eq!(sampled, reads, "{:?}", s.histograms);
    assert!(
        s.histograms.iter().all(|h| h.labels["op"] == "read"),
        "only reads were sent: {:?}",
        s.histograms
    );
}

/// Kills the exporter when the test ends, whatever happens.
struct Exporter(std::process::Child);
impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn scrape(addr: &str, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    write!(c, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut reply = String::new();
    c.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap();
    (head.to_owned(), body.to_owned())
}

#[test]
fn the_exporter_serves_counters_and_histograms_that_match_the_requests() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let d = &dir.path().join("bob");
    std::fs::create_dir(d).unwrap();
    let _disk = blkback(
        &d.join("xvda.sock"),
        &[
            "--disk",
            "null:64M",
            "--control",
            d.join("xvda.ctl").to_str().unwrap(),
        ],
        &d.join("xvda.log"),
    )
    .unwrap();
    let mut child = Command::new(workspace_bin("vbctl").unwrap())
        .args(["exporter", "--listen", "127.0.0.1:0"])
        .arg(dir.path())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let exporter = Exporter(child);
    let mut line = String::new();
    std::io::BufReader::new(stderr)
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("vbctl exporter: listening on http://")
        .and_then(|a| a.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("the exporter says where it listens: {line:?}"))
        .to_owned();

    let mut drv = BlkDriver::connect(&d.join("xvda.sock"));
    drv.mem().put(HDR, &[0u8; 16]);
    const READS: u64 = 300;
    for i in 0..READS {
        drv.mem().put(STATUS, &[0xff]);
        assert!(
            drv.submit(&[
                (HDR, 16, 0),
                (DATA, 4096, DESC_WRITE),
                (STATUS, 1, DESC_WRITE)
            ]),
            "read {i} completed"
        );
    }

    let (head, body) = scrape(&addr, "/metrics");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.lines().any(|l| l.eq_ignore_ascii_case(
            "content-type: application/openmetrics-text; version=1.0.0; charset=utf-8"
        )),
        "{head}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
    let value = |prefix: &str| -> u64 {
        body.lines()
            .filter(|l| l.starts_with(prefix))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    };
    let dev = r#"domain="bob",device="xvda",kind="blkback""#;
    assert_eq!(value(&format!("vback_up{{{dev}}}")), 1, "{body}");
    assert_eq!(
        value(&format!("vback_reads_total{{{dev},queue=")),
        READS,
        "{body}"
    );
    assert_eq!(
        value(&format!(
            "vback_latency_seconds_count{{{dev},op=\"read\",queue="
        )),
        READS,
        "the histogram counts every read: {body}"
    );
    assert_eq!(
        value(&format!(
            "vback_latency_seconds_bucket{{le=\"+Inf\",{dev},op=\"read\",queue="
        )),
        READS,
        "{body}"
    );
    // Anything but /metrics is a 404.
    let (head, _) = scrape(&addr, "/");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    drop(exporter);
}

/// A tmux server of the test's own (its own socket), killed at the end.
struct Tmux(String);
impl Tmux {
    fn cmd(&self) -> Command {
        let mut c = Command::new("tmux");
        c.args(["-L", &self.0]);
        c
    }
    fn screen(&self) -> String {
        let o = self
            .cmd()
            .args(["capture-pane", "-p", "-t", "top"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
    fn keys(&self, k: &str) {
        assert!(
            self.cmd()
                .args(["send-keys", "-t", "top", k])
                .status()
                .unwrap()
                .success()
        );
    }
    fn alive(&self) -> bool {
        self.cmd()
            .args(["has-session", "-t", "top"])
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    }
}
impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").stderr(Stdio::null()).status();
    }
}

/// Waits (up to a minute, a bound for a failure, not a measurement) until the screen satisfies
/// `ok`, doing `work` between looks; returns the last screen.
fn until(t: &Tmux, mut work: impl FnMut(), ok: impl Fn(&str) -> bool) -> (bool, String) {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let s = t.screen();
        if ok(&s) {
            return (true, s);
        }
        if std::time::Instant::now() > end {
            return (false, s);
        }
        work();
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn the_full_screen_view_in_tmux() {
    assert!(
        vback_tests::process::which("tmux").is_some(),
        "tmux is missing: scripts/setup.sh installs it"
    );
    let dir = tempfile::tempdir().unwrap();
    let d = &dir.path().join("carol");
    std::fs::create_dir(d).unwrap();
    let start = |name: &str| null_disk(d, name);
    let _busy = start("busy");
    let mut idle = start("idle");
    let t = Tmux(format!("vback-top-{}", std::process::id()));
    let cmd = format!(
        "{} top -d 1 {}",
        workspace_bin("vbctl").unwrap().display(),
        dir.path().display()
    );
    assert!(
        t.cmd()
            .args([
                "new-session",
                "-d",
                "-s",
                "top",
                "-x",
                "80",
                "-y",
                "24",
                &cmd
            ])
            .status()
            .unwrap()
            .success()
    );
    let mut drv = BlkDriver::connect(&d.join("busy.sock"));
    drv.mem().put(HDR, &[0u8; 16]);
    let mut read = || {
        for _ in 0..50 {
            drv.mem().put(STATUS, &[0xff]);
            assert!(drv.submit(&[
                (HDR, 16, 0),
                (DATA, 4096, DESC_WRITE),
                (STATUS, 1, DESC_WRITE)
            ]));
        }
    };
    let busy_reads = |s: &str| {
        rows(s, "carol", "busy")
            .first()
            .is_some_and(|r| r.len() > 4 && r[1] == "blk" && r[3] != "0" && r[3] != "(new:")
    };
    let (ok, s) = until(&t, &mut read, busy_reads);
    assert!(ok, "the busy disk's reads show on screen:\n{s}");
    assert!(s.contains("DEVICE"), "{s}");
    assert!(s.contains("q quit"), "the keys are shown:\n{s}");
    let idle_row = rows(&s, "carol", "idle");
    assert_eq!(idle_row.first().map(|r| r[3]), Some("0"), "{s}");
    for l in s.lines() {
        assert!(l.chars().count() <= 80, "{l:?}");
    }

    assert!(
        domain_rows(&s, "carol")
            .first()
            .is_some_and(|r| r[2] == "2dev" && r[3] != "0"),
        "the domain's row folds in the busy disk's reads:\n{s}"
    );

    // `b` hides block devices (not their domain's row), and brings them back.
    t.keys("b");
    let (ok, s) = until(
        &t,
        || {},
        |s| rows(s, "carol", "busy").is_empty() && !domain_rows(s, "carol").is_empty(),
    );
    assert!(ok, "b hides block rows:\n{s}");
    t.keys("b");
    let (ok, s) = until(&t, || {}, |s| !rows(s, "carol", "busy").is_empty());
    assert!(ok, "b shows them again:\n{s}");

    // A daemon killed mid-view is shown as gone; the view goes on.
    idle.kill();
    let (ok, s) = until(&t, &mut read, |s| {
        rows(s, "carol", "idle")
            .first()
            .is_some_and(|r| r.get(3) == Some(&"gone"))
    });
    assert!(ok, "the killed daemon is shown as gone:\n{s}");
    assert!(t.alive(), "top survived a daemon vanishing");

    // `q` quits.
    t.keys("q");
    let end = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while t.alive() && std::time::Instant::now() < end {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(!t.alive(), "q ends vbctl top:\n{}", t.screen());
}

/// `vbctl top -b` started by the guest (`VBACK-HOST:top`) while it loads both its devices.
type TopRun = std::sync::Arc<std::sync::Mutex<Option<std::process::Child>>>;

#[test]
fn top_over_a_guest_loading_its_disk_and_its_nic() {
    let dir = tempfile::tempdir().unwrap();
    let d = &dir.path().join("dave");
    std::fs::create_dir(d).unwrap();
    let _disk = null_disk(d, "xvda");
    let _nic = vback_tests::process::netback(
        &d.join("vif0.sock"),
        &[
            "--host",
            "null",
            "--vif",
            "mac=00:16:3e:00:00:01",
            "--control",
            d.join("vif0.ctl").to_str().unwrap(),
        ],
        &d.join("vif0.log"),
    )
    .unwrap();
    let top: TopRun = TopRun::default();
    let (top2, root) = (top.clone(), dir.path().to_owned());
    // The guest reads its disk in a loop and sends UDP (fio's net engine) to netback's null
    // host side, which also sends it a frame every 100 ms; meanwhile the host runs
    // `vbctl top -b -i 2 -d 1` over the domain.
    let run = vback_tests::Guest::new()
        .vhost_blk(d.join("xvda.sock"), "")
        .vhost_net(d.join("vif0.sock"), "mac=00:16:3e:00:00:01")
        .timeout(std::time::Duration::from_secs(120))
        .on_host("top", move || {
            let child = Command::new(workspace_bin("vbctl").unwrap())
                .args(["top", "-b", "-i", "2", "-d", "1"])
                .arg(&root)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            *top2.lock().unwrap() = Some(child);
        })
        .run(
            r#"
check load 'wait_dev /dev/vda && ip link set eth0 up && ip addr add 10.99.0.2/24 dev eth0 && \
  arp -s 10.99.0.1 02:00:00:00:00:01 && \
  (while :; do dd if=/dev/vda of=/dev/null bs=4096 count=256 iflag=direct 2>/dev/null; done) & r=$!; \
  fio --name=udp --ioengine=net --protocol=udp --hostname=10.99.0.1 --port=5000 --rw=write \
    --bs=1400 --size=4G --time_based --runtime=9 >/tmp/fio.out 2>&1 & f=$!; \
  sleep 2; echo VBACK-HOST:top; sleep 6; kill $r; wait $f; echo loaded'
"#,
        )
        .expect("the guest runs");
    eprintln!("guest: {}", run.summary());
    run.assert_checks(&["load"]);
    let child = top
        .lock()
        .unwrap()
        .take()
        .expect("the guest started vbctl top");
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "vbctl top failed: {stderr}\n{stdout}");
    eprintln!("{stdout}");
    for l in stdout.lines() {
        assert!(l.chars().count() <= 80, "wider than 80 columns: {l:?}");
    }
    let disk = rows(&stdout, "dave", "xvda");
    let nic = rows(&stdout, "dave", "vif0");
    let dom = domain_rows(&stdout, "dave");
    assert_eq!(
        (disk.len(), nic.len(), dom.len()),
        (2, 2, 2),
        "two reports: {stdout}"
    );
    for r in &disk {
        // DEVICE KIND PID RD/s ...
        assert_eq!(r[1], "blk", "{stdout}");
        assert_ne!(r[3], "0", "the guest reads its disk: {stdout}");
    }
    for r in &nic {
        // vif0 net PID rx Npps X.XMb/s tx Npps X.XMb/s drop/s N stall N
        assert_eq!(&r[1..2], ["net"], "{stdout}");
        assert_eq!((r[3], r[6]), ("rx", "tx"), "{stdout}");
        assert_ne!(r[4], "0pps", "netback's frames reach the guest: {stdout}");
        assert_ne!(r[7], "0pps", "the guest's UDP leaves: {stdout}");
        assert_ne!(r[8], "0.0Mb/s", "{stdout}");
    }
    for r in &dom {
        assert_eq!(&r[1..3], ["dom", "2dev"], "{stdout}");
        assert_ne!(r[3], "0", "the disk's reads folded in: {stdout}");
    }
}
