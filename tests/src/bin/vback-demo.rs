//! vback-demo: boot a throw-away guest with a vhost-user-blk disk and show it working.
//!
//! The disk is a sparse raw image served by a backend daemon over vhost-user (today
//! qemu-storage-daemon, the reference, until blkback serves disks). Inside the guest: the disk
//! appears, fio writes and verifies it with crc32c, and a marker the guest writes is read back
//! from the image on the host afterwards.

use std::io::{Read, Seek, SeekFrom};
use std::process::ExitCode;
use std::time::Duration;

use vback_tests::Guest;
use vback_tests::process::qemu_storage_daemon;

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
    println!(
        "== backend: qemu-storage-daemon serving {} on {}",
        image.display(),
        sock.display()
    );
    let qsd = qemu_storage_daemon(&image, &sock, true, &dir.path().join("qsd.log"))
        .map_err(|e| e.to_string())?;

    println!(
        "== booting a guest (QEMU, {:?}) with vhost-user-blk-pci on that socket",
        vback_tests::Accel::detect()
    );
    let script = format!(
        r#"
check disk 'wait_dev /dev/vda && echo "/dev/vda: $(($(cat /sys/block/vda/size) / 2048)) MiB, queues: $(ls /sys/block/vda/mq | wc -l)"'
check fio 'fio --name=demo --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=16 --rw=randrw \
   --bs=4k --size=32M --verify=crc32c --verify_fatal=1 --randrepeat=0 --group_reporting | grep -E "read:|write:|verify|err="'
check marker 'printf "{marker}" | dd of=/dev/vda bs=4096 seek=1000 conv=notrunc,fsync 2>/dev/null && echo "marker written at 4096000"'
"#,
        marker = String::from_utf8_lossy(MARKER)
    );
    let run = Guest::new()
        .vhost_blk(&sock, "")
        .timeout(Duration::from_secs(300))
        .run(&script)
        .map_err(|e| e.to_string())?;
    for c in &run.checks {
        println!(
            "-- guest check `{}`: {}",
            c.name,
            if c.status == 0 { "ok" } else { "FAILED" }
        );
        for l in c.output.lines() {
            println!("   {l}");
        }
    }
    println!("== guest: {}", run.summary());
    drop(qsd);
    let mut buf = vec![0u8; MARKER.len()];
    let mut f = std::fs::File::open(&image).map_err(|e| e.to_string())?;
    f.seek(SeekFrom::Start(4096 * 1000))
        .and_then(|_| f.read_exact(&mut buf))
        .map_err(|e| e.to_string())?;
    let host_ok = buf == MARKER;
    println!(
        "== host: the image holds the guest's marker: {}",
        if host_ok { "yes" } else { "NO" }
    );
    if run.checks.iter().all(|c| c.status == 0) && run.checks.len() == 3 && host_ok {
        println!("== demo passed");
        Ok(())
    } else {
        Err(format!("demo failed; guest output:\n{}", run.output))
    }
}
