//! A real guest uses a vhost-user-blk disk served by qemu-storage-daemon, the reference backend:
//! fio writes and verifies it (crc32c), and data written by the guest is on the host image.
//! This pins the harness and the vhost-user plumbing down against an independent backend, so
//! vback's own backends are compared with a known-good one.

use std::io::{Read, Seek, SeekFrom};
use std::time::Duration;

use vback_tests::Guest;
use vback_tests::process::qemu_storage_daemon;

const SIZE: u64 = 64 << 20;

#[test]
fn guest_fio_verify_on_qemu_storage_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    let sock = dir.path().join("blk.sock");
    let mut qsd = qemu_storage_daemon(&image, &sock, true, &dir.path().join("qsd.log"))
        .expect("qemu-storage-daemon starts");

    let run = Guest::new()
        .vhost_blk(&sock, "")
        .timeout(Duration::from_secs(240))
        .run(
            r#"
check present 'wait_dev /dev/vda && cat /sys/block/vda/size'
check fio-verify 'fio --name=verify --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=8 \
    --rw=randwrite --bs=4k --size=16M --verify=crc32c --verify_fatal=1 --do_verify=1 \
    --randrepeat=0 --output-format=terse --terse-version=3 >/tmp/fio.out && echo fio-ok'
check marker 'printf "vback-marker-%s" 0123456789 | dd of=/dev/vda bs=512 seek=65536 conv=notrunc,fsync 2>/dev/null && sync && echo written'
"#,
        )
        .expect("the guest runs");
    eprintln!("{}", run.summary());
    run.assert_checks(&["present", "fio-verify", "marker"]);
    let present = run.check("present").output.clone();
    let mut lines = present.lines();
    assert_eq!(
        lines.next(),
        Some((SIZE / 512).to_string().as_str()),
        "{present}"
    );
    assert!(run.check("fio-verify").output.contains("fio-ok"));

    assert!(
        qsd.is_running(),
        "qemu-storage-daemon survived the guest:\n{}",
        qsd.log()
    );
    drop(qsd);
    let mut f = std::fs::File::open(&image).unwrap();
    f.seek(SeekFrom::Start(65536 * 512)).unwrap();
    let mut buf = [0u8; 22];
    f.read_exact(&mut buf).unwrap();
    assert_eq!(
        &buf, b"vback-marker-012345678",
        "the guest's write reached the host image"
    );
}
