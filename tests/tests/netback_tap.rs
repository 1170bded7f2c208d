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

#[test]
fn bridge_mode_guests_reach_the_lan_and_each_other() {
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
    assert!(
        !dom0.sh("ip -o link show").unwrap().contains("vif1.0"),
        "the tap is gone with netback"
    );
}
