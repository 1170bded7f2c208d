//! netback with the kernel tap host side, in real guests (QEMU's `-netdev vhost-user` +
//! virtio-net-pci), in Xen's three modes. Every host is a network namespace the test creates:
//! "dom0" runs netback and owns the bridge, routes and NAT; "lan" and "outside" are other
//! machines. No frame leaves the machine.

use std::path::Path;
use std::process::{Child, Stdio};
use std::thread;
use std::time::Duration;

use serde_json::Value;
use vback_common::control::ControlClient;
use vback_tests::Guest;
use vback_tests::netns::Netns;

/// The rate test measures what a guest under TCG can offer, so it runs alone: it takes this lock
/// for writing, every other guest test here for reading.
static GUESTS: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn shared() -> std::sync::RwLockReadGuard<'static, ()> {
    GUESTS
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn stats(ctl: &Path) -> Value {
    ControlClient::connect(ctl)
        .unwrap()
        .call("stats", Value::Null)
        .unwrap()
}

/// A LAN host on `br` in `dom0` with address `addr`.
fn lan_host(dom0: &Netns, br: &str, addr: &str) -> Netns {
    let lan = Netns::new("lan").unwrap();
    dom0.veth("lanport", &lan, "eth0").unwrap();
    dom0.sh(&format!(
        "ip link set lanport master {br} && ip link set lanport up"
    ))
    .unwrap();
    lan.sh(&format!(
        "ip addr add {addr} dev eth0 && ip link set eth0 up"
    ))
    .unwrap();
    lan
}

/// An iperf3 server for one test, in `ns`, bound to `addr`.
fn iperf_server(ns: &Netns, addr: &str) -> Child {
    ns.command("iperf3")
        .args(["-s", "-1", "-B", addr])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("iperf3 runs (scripts/setup.sh installs it)")
}

fn server_output(c: Child) -> String {
    let out = c.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// iperf3's receiver line, in Mbit/s.
fn receiver_mbps(out: &str) -> f64 {
    let line = out
        .lines()
        .rfind(|l| l.contains("receiver"))
        .unwrap_or_else(|| panic!("no iperf3 receiver line in:\n{out}"));
    let w: Vec<&str> = line.split_whitespace().collect();
    let i = w
        .iter()
        .position(|x| x.ends_with("bits/sec"))
        .unwrap_or_else(|| panic!("no rate in {line}"));
    let v: f64 = w[i - 1].parse().unwrap();
    match w[i] {
        "Gbits/sec" => v * 1000.0,
        "Mbits/sec" => v,
        "Kbits/sec" => v / 1000.0,
        _ => v / 1e6,
    }
}

/// The tap goes with netback's last file (the kernel may take a moment to tear it down).
fn assert_gone(ns: &Netns, ifname: &str) {
    let mut links = String::new();
    for _ in 0..50 {
        links = ns.sh("ip -o link show").unwrap();
        if !links.contains(ifname) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{ifname} outlived netback: {links}");
}

#[test]
fn bridge_mode_guests_reach_the_lan_and_each_other() {
    let _guests = shared();
    let dir = tempfile::tempdir().unwrap();
    let dom0 = Netns::new("dom0").unwrap();
    dom0.sh("ip link add br0 type bridge && ip link set br0 up")
        .unwrap();
    let lan = lan_host(&dom0, "br0", "10.231.0.20/24");

    let mut daemons = Vec::new();
    for (dom, mac) in [(1, "00:16:3e:00:01:01"), (2, "00:16:3e:00:02:01")] {
        let sock = dir.path().join(format!("net{dom}.sock"));
        let ctl = dir.path().join(format!("net{dom}.ctl"));
        let d = dom0
            .netback(
                &sock,
                &[
                    "--domain",
                    &dom.to_string(),
                    "--vif",
                    &format!("bridge=br0,mac={mac}"),
                    "--control",
                    ctl.to_str().unwrap(),
                ],
                &dir.path().join(format!("net{dom}.log")),
            )
            .unwrap();
        daemons.push((d, sock, ctl, mac));
    }
    // The hotplug script put both interfaces on the bridge.
    let ports = dom0.sh("ip -o link show master br0").unwrap();
    for vif in ["vif1.0", "vif2.0", "lanport"] {
        assert!(ports.contains(vif), "{vif} is on br0: {ports}");
    }
    let server = iperf_server(&lan, "10.231.0.20");

    let (sock_b, mac_b) = (daemons[1].1.clone(), daemons[1].3);
    let peer = thread::spawn(move || {
        Guest::new()
            .vhost_net(&sock_b, &format!("mac={mac_b}"))
            .timeout(Duration::from_secs(180))
            .run(
                r#"
check up 'ip link set eth0 up && ip addr add 10.231.0.12/24 dev eth0'
check reach 'for i in $(seq 90); do ping -c 1 -W 1 10.231.0.11 >/dev/null 2>&1 && break; done; ping -c 2 -W 2 10.231.0.11'
check linger 'sleep 6'
"#,
            )
    });
    let run = Guest::new()
        .vhost_net(&daemons[0].1, &format!("mac={}", daemons[0].3))
        .timeout(Duration::from_secs(180))
        .run(
            r#"
check up 'ip link set eth0 up && ip addr add 10.231.0.11/24 dev eth0 && cat /sys/class/net/eth0/address'
check lan 'ping -c 3 -W 2 10.231.0.20'
check iperf 'iperf3 -c 10.231.0.20 -t 3'
check peer 'for i in $(seq 90); do ping -c 1 -W 1 10.231.0.12 >/dev/null 2>&1 && break; done; ping -c 2 -W 2 10.231.0.12'
"#,
        )
        .expect("guest A runs");
    eprintln!("{}", run.summary());
    let peer = peer.join().unwrap().expect("guest B runs");
    eprintln!("{}", peer.summary());
    run.assert_checks(&["up", "lan", "iperf", "peer"]);
    peer.assert_checks(&["up", "reach"]);
    assert_eq!(run.check("up").output.trim(), "00:16:3e:00:01:01");
    let srv = server_output(server);
    let mbps = receiver_mbps(&srv);
    eprintln!("guest → LAN host through netback (bridge): {mbps:.0} Mbit/s");
    assert!(mbps > 1.0, "iperf3 moved data: {srv}");

    let s = stats(&daemons[0].2);
    assert!(s["device"]["tx"]["packets"].as_u64().unwrap() > 1000, "{s}");
    assert!(s["device"]["rx"]["packets"].as_u64().unwrap() > 100, "{s}");
    for (mut d, ..) in daemons {
        assert!(
            d.terminate(Duration::from_secs(10))
                .is_some_and(|s| s.success())
        );
        assert!(d.log().contains("vif-bridge offline"), "{}", d.log());
    }
    assert_gone(&dom0, "vif1.0");
}

/// Xen's routed mode, with two queue pairs: the LAN reaches the guest through the host's proxy
/// ARP and the /32 route, and the guest's flows spread over both pairs.
#[test]
fn route_mode_proxy_arp_and_two_queue_pairs() {
    let _guests = shared();
    let dir = tempfile::tempdir().unwrap();
    let dom0 = Netns::new("dom0").unwrap();
    dom0.sh("ip link add xenbr0 type bridge && ip addr add 10.232.0.1/24 dev xenbr0 && ip link set xenbr0 up")
        .unwrap();
    let lan = lan_host(&dom0, "xenbr0", "10.232.0.20/24");
    let (sock, ctl) = (dir.path().join("net.sock"), dir.path().join("net.ctl"));
    let mut d = dom0
        .netback_env(
            &sock,
            &[
                "--domain",
                "4",
                "--queues",
                "2",
                "--vif",
                "script=vif-route,ip=10.232.0.10,mac=00:16:3e:00:04:01",
                "--control",
                ctl.to_str().unwrap(),
            ],
            &[("netdev", "xenbr0")],
            &dir.path().join("net.log"),
        )
        .unwrap();
    let routes = dom0
        .sh("ip route show dev vif4.0; ip -o addr show dev vif4.0")
        .unwrap();
    assert!(routes.contains("10.232.0.10 "), "{routes}");
    assert!(routes.contains("10.232.0.1/32"), "{routes}");

    let lan2 = lan.name().to_owned();
    let from_lan = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let fl = from_lan.clone();
    let server = iperf_server(&lan, "10.232.0.20");
    let run = Guest::new()
        .vhost_net_queues(&sock, 2, "mac=00:16:3e:00:04:01")
        .timeout(Duration::from_secs(180))
        .on_host("lanping", move || {
            let out = std::process::Command::new("ip")
                .args(["netns", "exec", &lan2, "ping", "-c", "3", "-W", "2", "10.232.0.10"])
                .output()
                .unwrap();
            *fl.lock().unwrap() = format!(
                "{}{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        })
        .run(
            r#"
check up 'ip link set eth0 up && ip addr add 10.232.0.10/24 dev eth0 && ip route add default via 10.232.0.1 && ls /sys/class/net/eth0/queues'
check gw 'ping -c 2 -W 2 10.232.0.1'
check lan 'ping -c 2 -W 2 10.232.0.20'
check fromlan 'echo VBACK-HOST:lanping; sleep 6'
check iperf 'iperf3 -c 10.232.0.20 -t 3 -P 4 | tail -4'
"#,
        )
        .expect("the guest runs");
    eprintln!("{}", run.summary());
    run.assert_checks(&["up", "gw", "lan", "fromlan", "iperf"]);
    let queues = &run.check("up").output;
    assert!(
        queues.contains("rx-1") && queues.contains("tx-1"),
        "{queues}"
    );
    let from_lan = from_lan.lock().unwrap().clone();
    assert!(
        from_lan.contains(" 0% packet loss"),
        "LAN → guest: {from_lan}"
    );
    let neigh = lan.sh("ip neigh show 10.232.0.10").unwrap();
    let br_mac = dom0.sh("cat /sys/class/net/xenbr0/address").unwrap();
    assert!(
        neigh.contains(br_mac.trim()),
        "the LAN host learned the guest's address from dom0's proxy ARP: {neigh} vs {br_mac}"
    );
    let mbps = receiver_mbps(&server_output(server));
    eprintln!("guest → LAN host through netback (route, 2 pairs, 4 streams): {mbps:.0} Mbit/s");

    let s = stats(&ctl);
    eprintln!("{s}");
    let q1 = &s["device"]["queues"][1];
    assert!(
        q1["tx"]["packets"].as_u64().unwrap() + q1["rx"]["packets"].as_u64().unwrap() > 0,
        "the second pair carried frames: {s}"
    );
    assert!(
        d.terminate(Duration::from_secs(10))
            .is_some_and(|s| s.success())
    );
    assert!(d.log().contains("vif-route offline"), "{}", d.log());
}

/// Xen's NAT mode: the guest (Xen's default address for domain 3) reaches a server outside,
/// which sees the host's address; `offline` removes the NAT.
#[test]
fn nat_mode_masquerades_and_offline_removes_the_rules() {
    let _guests = shared();
    let dir = tempfile::tempdir().unwrap();
    let dom0 = Netns::new("dom0").unwrap();
    let outside = Netns::new("out").unwrap();
    dom0.veth("uplink", &outside, "eth0").unwrap();
    dom0.sh("ip addr add 10.233.0.1/24 dev uplink && ip link set uplink up")
        .unwrap();
    outside
        .sh("ip addr add 10.233.0.2/24 dev eth0 && ip link set eth0 up")
        .unwrap();
    let sock = dir.path().join("net.sock");
    let mut d = dom0
        .netback(
            &sock,
            &[
                "--domain",
                "3",
                "--vif",
                "script=vif-nat,mac=00:16:3e:00:03:01",
            ],
            &dir.path().join("net.log"),
        )
        .unwrap();
    let rules = dom0.sh("nft list table ip vback_nat").unwrap();
    assert!(
        rules.contains("10.0.3.1") && rules.contains("masquerade"),
        "{rules}"
    );

    let server = iperf_server(&outside, "10.233.0.2");
    let run = Guest::new()
        .vhost_net(&sock, "mac=00:16:3e:00:03:01")
        .timeout(Duration::from_secs(180))
        .run(
            r#"
check up 'ip link set eth0 up && ip addr add 10.0.3.1/16 dev eth0 && ip route add default via 10.0.3.128'
check out 'ping -c 2 -W 2 10.233.0.2'
check iperf 'iperf3 -c 10.233.0.2 -t 2 | tail -3'
"#,
        )
        .expect("the guest runs");
    eprintln!("{}", run.summary());
    run.assert_checks(&["up", "out", "iperf"]);
    let srv = server_output(server);
    assert!(
        srv.contains("Accepted connection from 10.233.0.1,"),
        "the outside server sees the host's address: {srv}"
    );
    assert!(!srv.contains("10.0.3.1"), "{srv}");
    eprintln!(
        "guest → outside through netback (NAT): {:.0} Mbit/s",
        receiver_mbps(&srv)
    );

    assert!(
        d.terminate(Duration::from_secs(10))
            .is_some_and(|s| s.success())
    );
    assert!(d.log().contains("vif-nat offline"), "{}", d.log());
    let tables = dom0.sh("nft list tables").unwrap();
    assert!(
        !tables.contains("vback_nat"),
        "offline removed the NAT: {tables}"
    );
}

/// `rate=` on the guest's transmit path, with iperf3 in the guest as the source.
/// - Xen's `100Mb/s@20ms`: UDP on a 9000-byte MTU, measured on the receiving host's interface
///   between two marks the guest prints (wire bytes; iperf3's own receiver report is not used
///   because a window's credit arrives as one 243 KB burst, more than a default socket buffer
///   holds). Why not 1500-byte TCP: a guest under TCG cannot send 1500-byte frames at
///   100 Mbit/s on this machine (about 70 Mbit/s unlimited), and with TSO's 64 KiB frames Xen's
///   window semantics give 78 Mbit/s (docs/netback.md); jumbo frames let the limit, not the
///   guest's CPU, decide. A 4 MiB send buffer keeps more than a window's 27 frames queued.
/// - `10Mb/s` (default 50 ms window): TCP with TSO, iperf3's receiver report.
#[test]
fn rate_limits_hold_in_a_guest() {
    let _alone = GUESTS
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = tempfile::tempdir().unwrap();
    let dom0 = Netns::new("dom0").unwrap();
    dom0.sh("ip link add br0 type bridge && ip link set br0 up && ip link add br1 type bridge && ip link set br1 up")
        .unwrap();
    let lan_a = lan_host(&dom0, "br0", "10.234.0.20/24");
    dom0.sh("ip link set lanport mtu 9000 && ip link set br0 mtu 9000")
        .unwrap();
    lan_a.sh("ip link set eth0 mtu 9000").unwrap();
    let lan_b = Netns::new("lanb").unwrap();
    dom0.veth("lanport1", &lan_b, "eth0").unwrap();
    dom0.sh("ip link set lanport1 master br1 && ip link set lanport1 up")
        .unwrap();
    lan_b
        .sh("ip addr add 10.235.0.20/24 dev eth0 && ip link set eth0 up")
        .unwrap();
    let mut daemons = Vec::new();
    for (devid, vif) in [
        (
            0,
            "bridge=br0,mac=00:16:3e:00:06:01,rate=100Mb/s@20ms,mtu=9000",
        ),
        (1, "bridge=br1,mac=00:16:3e:00:06:02,rate=10Mb/s"),
    ] {
        let sock = dir.path().join(format!("net{devid}.sock"));
        let ctl = dir.path().join(format!("net{devid}.ctl"));
        let d = dom0
            .netback(
                &sock,
                &[
                    "--domain",
                    "6",
                    "--devid",
                    &devid.to_string(),
                    "--vif",
                    vif,
                    "--control",
                    ctl.to_str().unwrap(),
                ],
                &dir.path().join(format!("net{devid}.log")),
            )
            .unwrap();
        daemons.push((d, sock, ctl));
    }
    let (srv_a, srv_b) = (
        iperf_server(&lan_a, "10.234.0.20"),
        iperf_server(&lan_b, "10.235.0.20"),
    );
    let marks: std::sync::Arc<std::sync::Mutex<Vec<(std::time::Instant, u64)>>> =
        std::sync::Arc::default();
    let rx_bytes = {
        let lan = lan_a.name().to_owned();
        move || -> u64 {
            let o = std::process::Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &lan,
                    "cat",
                    "/sys/class/net/eth0/statistics/rx_bytes",
                ])
                .output()
                .unwrap();
            String::from_utf8_lossy(&o.stdout).trim().parse().unwrap()
        }
    };
    let (m1, m2, rb1, rb2) = (marks.clone(), marks.clone(), rx_bytes.clone(), rx_bytes);
    let run = Guest::new()
        .on_host("mark1", move || m1.lock().unwrap().push((std::time::Instant::now(), rb1())))
        .on_host("mark2", move || m2.lock().unwrap().push((std::time::Instant::now(), rb2())))
        .vhost_net(&daemons[0].1, "mac=00:16:3e:00:06:01")
        .vhost_net(&daemons[1].1, "mac=00:16:3e:00:06:02")
        .timeout(Duration::from_secs(180))
        .run(
            r#"
check up 'ip link set eth0 mtu 9000 up && ip addr add 10.234.0.11/24 dev eth0 && ip link set eth1 up && ip addr add 10.235.0.11/24 dev eth1'
check r100 'echo 4194304 > /proc/sys/net/core/wmem_default && (iperf3 -u -b 300M -l 8948 -c 10.234.0.20 -t 7 > /tmp/r100 2>&1 &) && sleep 2 && echo VBACK-HOST:mark1 && sleep 4 && echo VBACK-HOST:mark2 && sleep 2 && grep sender /tmp/r100'
check r10 'iperf3 -c 10.235.0.20 -t 5 -O 1 | tail -3'
"#,
        )
        .expect("the guest runs");
    eprintln!("{}", run.summary());
    run.assert_checks(&["up", "r100", "r10"]);
    let marks = marks.lock().unwrap().clone();
    assert_eq!(marks.len(), 2, "both marks were seen");
    let secs = marks[1].0.duration_since(marks[0].0).as_secs_f64();
    let a = (marks[1].1 - marks[0].1) as f64 * 8.0 / secs / 1e6;
    let _ = server_output(srv_a);
    let b = receiver_mbps(&server_output(srv_b));
    eprintln!(
        "rate=100Mb/s@20ms: {a:.1} Mbit/s on the wire over {secs:.2} s; rate=10Mb/s: {b:.2} Mbit/s (iperf3 goodput); guest: {}",
        run.check("r100").output.trim()
    );
    assert!(
        (95.0..=100.5).contains(&a),
        "rate=100Mb/s@20ms measured {a:.1} Mbit/s; the guest offered:\n{}",
        run.check("r100").output
    );
    assert!(
        (9.5..=10.05).contains(&b),
        "rate=10Mb/s measured {b:.2} Mbit/s"
    );
    for (_, _, ctl) in &daemons {
        let s = stats(ctl);
        assert!(
            s["device"]["tx"]["rate_limited_stalls"].as_u64().unwrap() > 10,
            "{s}"
        );
    }
}

/// `status` tells which bridge the interface is on when vif-bridge chose it (no `bridge=`: the
/// first bridge on the host), and none when no script put it on one. No guest needed.
#[test]
fn status_names_the_bridge_the_script_joined() {
    let _guests = shared();
    let dir = tempfile::tempdir().unwrap();
    let dom0 = Netns::new("dom0").unwrap();
    dom0.sh("ip link add xbr7 type bridge && ip link set xbr7 up")
        .unwrap();
    let status = |vif: &str, dom: &str| {
        let sock = dir.path().join(format!("net{dom}.sock"));
        let ctl = dir.path().join(format!("net{dom}.ctl"));
        let mut d = dom0
            .netback(
                &sock,
                &[
                    "--domain",
                    dom,
                    "--vif",
                    vif,
                    "--control",
                    ctl.to_str().unwrap(),
                ],
                &dir.path().join(format!("net{dom}.log")),
            )
            .unwrap();
        let st = ControlClient::connect(&ctl)
            .unwrap()
            .call("status", Value::Null)
            .unwrap();
        d.terminate(Duration::from_secs(10));
        st
    };
    let st = status("mac=00:16:3e:00:07:01", "7");
    assert_eq!(st["device"]["bridge"], "xbr7", "{st}");
    let st = status("mac=00:16:3e:00:08:01,script=none", "8");
    assert_eq!(st["device"]["bridge"], Value::Null, "{st}");
}

/// A failing hotplug script: netback reports the script's message, takes the port down and
/// exits; the tap does not outlive it.
#[test]
fn a_failing_script_is_reported_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let dom0 = Netns::new("dom0").unwrap();
    let sock = dir.path().join("net.sock");
    let err = dom0
        .netback(
            &sock,
            &["--domain", "7", "--vif", "bridge=nosuchbr"],
            &dir.path().join("net.log"),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("exited (exit status: 1)"), "{err}");
    assert!(
        err.contains("vif-bridge online failed")
            && err.contains("Could not find bridge device nosuchbr"),
        "{err}"
    );
    assert!(err.contains("taken down"), "{err}");
    assert_gone(&dom0, "vif7.0");
}
