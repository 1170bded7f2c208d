//! vback-demo: boot a throw-away guest with a disk served by blkback and a network interface
//! served by netback, and show them working.
//!
//! blkback serves a sparse raw image over vhost-user; netback serves a NIC whose tap its
//! `vif-bridge` hotplug script puts on a bridge in a network namespace, with a "LAN host" (a
//! second namespace) on the same bridge; QEMU boots a Debian kernel with both attached. Inside
//! the guest: the disk appears with blkback's serial, fio writes and verifies it with crc32c,
//! ext4 is created and used, the disk is grown online while the guest watches; the NIC pings
//! the LAN host and runs iperf3 against it. On the host: the guest's marker is in the image,
//! and blkback's and netback's counters show the traffic. Nothing leaves the machine.

use std::io::{Read, Seek, SeekFrom};
use std::process::ExitCode;
use std::time::Duration;

use serde_json::{Value, json};
use vback_common::control::ControlClient;
use vback_tests::Guest;
use vback_tests::netns::Netns;
use vback_tests::process::blkback;

const SIZE: u64 = 256 << 20;
const MARKER: &[u8] = b"written by the guest through vhost-user";

fn main() -> ExitCode {
    match demo() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vback-demo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn demo() -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let image = dir.path().join("disk0.raw");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(SIZE))
        .map_err(|e| e.to_string())?;
    let sock = dir.path().join("disk0.sock");
    let ctl = dir.path().join("disk0.ctl");
    let disk = format!("tap:aio:{}", image.display());
    println!(
        "== blkback --socket {} --control {} --disk {disk}",
        sock.display(),
        ctl.display()
    );
    let mut daemon = blkback(
        &sock,
        &["--disk", &disk, "--control", &ctl.to_string_lossy()],
        &dir.path().join("blkback.log"),
    )
    .map_err(|e| e.to_string())?;

    println!("== network: namespaces dom0 (bridge br0) and lan (10.240.0.20/24 on br0)");
    let dom0 = Netns::new("dom0").map_err(|e| e.to_string())?;
    let lan = Netns::new("lan").map_err(|e| e.to_string())?;
    dom0.sh("ip link add br0 type bridge && ip link set br0 up")
        .map_err(|e| e.to_string())?;
    dom0.veth("lanport", &lan, "eth0")
        .map_err(|e| e.to_string())?;
    dom0.sh("ip link set lanport master br0 && ip link set lanport up")
        .map_err(|e| e.to_string())?;
    lan.sh("ip addr add 10.240.0.20/24 dev eth0 && ip link set eth0 up")
        .map_err(|e| e.to_string())?;
    let nsock = dir.path().join("net0.sock");
    let nctl = dir.path().join("net0.ctl");
    let vif = "bridge=br0,mac=00:16:3e:00:00:01";
    println!(
        "== netback (in dom0) --socket {} --control {} --domain 1 --vif '{vif}'",
        nsock.display(),
        nctl.display()
    );
    let mut netd = dom0
        .netback(
            &nsock,
            &[
                "--domain",
                "1",
                "--vif",
                vif,
                "--control",
                &nctl.to_string_lossy(),
            ],
            &dir.path().join("netback.log"),
        )
        .map_err(|e| e.to_string())?;
    println!(
        "   vif-bridge put vif1.0 on br0: {}",
        dom0.sh("ip -o link show master br0 | awk '{split($2, a, \"@\"); sub(\":\", \"\", a[1]); printf \"%s \", a[1]}'")
            .unwrap_or_default()
    );
    let iperf = lan
        .command("iperf3")
        .args(["-s", "-1", "-B", "10.240.0.20"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("iperf3: {e} (run scripts/setup.sh)"))?;

    println!(
        "== booting a guest (QEMU, {:?}) with vhost-user-blk-pci and a vhost-user virtio-net-pci",
        vback_tests::Accel::detect()
    );
    let ctl2 = ctl.clone();
    let script = format!(
        r#"
check disk 'wait_dev /dev/vda && echo "/dev/vda: $(($(cat /sys/block/vda/size) / 2048)) MiB, serial $(cat /sys/block/vda/serial)"'
check fio 'fio --name=demo --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=16 --rw=randrw \
   --bs=4k --size=32M --verify=crc32c --verify_fatal=1 --randrepeat=0 --group_reporting | grep -E "read:|write:|err="'
check ext4 'mkfs.ext4 -q -F /dev/vda && mkdir -p /mnt && mount /dev/vda /mnt && echo hello > /mnt/hello && sync && df -h /mnt | tail -1 && umount /mnt'
check marker 'printf "{marker}" | dd of=/dev/vda bs=4096 seek=50000 conv=notrunc,fsync 2>/dev/null && echo "marker written at byte 204800000"'
check net 'ip link set eth0 up && ip addr add 10.240.0.10/24 dev eth0 && ping -c 3 -W 2 10.240.0.20 | tail -2'
check iperf3 'iperf3 -c 10.240.0.20 -t 2 | grep -E "sender|receiver"'
check resize 'echo VBACK-HOST:grow; i=0; while [ $(cat /sys/block/vda/size) -eq 524288 ] && [ $i -lt 200 ]; do usleep 100000; i=$((i+1)); done; \
   echo "/dev/vda is now $(($(cat /sys/block/vda/size) / 2048)) MiB"; dmesg | grep -m1 "capacity change"'
"#,
        marker = String::from_utf8_lossy(MARKER)
    );
    let run = Guest::new()
        .vhost_blk(&sock, "")
        .vhost_net(&nsock, "mac=00:16:3e:00:00:01")
        .timeout(Duration::from_secs(300))
        .on_host("grow", move || {
            if let Ok(mut c) = ControlClient::connect(&ctl2) {
                let r = c.call("resize", json!({"size": "512M"}));
                println!(
                    "== host: control socket {}: resize size=512M -> {:?}",
                    ctl2.display(),
                    r.map(|v| v.to_string())
                );
            }
        })
        .run(&script)
        .map_err(|e| e.to_string())?;
    for c in &run.checks {
        println!(
            "-- guest check `{}`: {}",
            c.name,
            if c.status == 0 { "ok" } else { "FAILED" }
        );
        for l in c.output.lines().filter(|l| !l.starts_with("VBACK-HOST:")) {
            println!("   {l}");
        }
    }
    println!("== guest: {}", run.summary());
    let stats = ControlClient::connect(&ctl)
        .and_then(|mut c| c.call("stats", Value::Null))
        .map_err(|e| e.to_string())?;
    let q = &stats["device"]["queues"][0];
    println!(
        "== blkback stats: {} requests, {} reads ({} MiB), {} writes ({} MiB), {} flushes, {} discards, {} errors",
        q["requests"],
        q["reads"],
        q["read_bytes"].as_u64().unwrap_or(0) >> 20,
        q["writes"],
        q["write_bytes"].as_u64().unwrap_or(0) >> 20,
        q["flushes"],
        q["discards"],
        q["errors"]
    );
    let nstats = ControlClient::connect(&nctl)
        .and_then(|mut c| c.call("stats", Value::Null))
        .map_err(|e| e.to_string())?;
    let (tx, rx) = (&nstats["device"]["tx"], &nstats["device"]["rx"]);
    println!(
        "== netback stats: guest sent {} frames ({} MiB), received {} frames ({} KiB), {} dropped",
        tx["packets"],
        tx["bytes"].as_u64().unwrap_or(0) >> 20,
        rx["packets"],
        rx["bytes"].as_u64().unwrap_or(0) >> 10,
        tx["drops"].as_u64().unwrap_or(0) + rx["drops"].as_u64().unwrap_or(0)
    );
    let _ = iperf.wait_with_output();
    netd.terminate(Duration::from_secs(5));
    daemon.terminate(Duration::from_secs(5));
    let mut buf = vec![0u8; MARKER.len()];
    let mut f = std::fs::File::open(&image).map_err(|e| e.to_string())?;
    f.seek(SeekFrom::Start(4096 * 50000))
        .and_then(|_| f.read_exact(&mut buf))
        .map_err(|e| e.to_string())?;
    let host_ok = buf == MARKER;
    println!(
        "== host: the image holds the guest's marker: {}",
        if host_ok { "yes" } else { "NO" }
    );
    let all = run.checks.len() == 7 && run.checks.iter().all(|c| c.status == 0);
    if all && host_ok {
        println!("== demo passed");
        Ok(())
    } else {
        Err(format!("demo failed; guest output:\n{}", run.output))
    }
}
