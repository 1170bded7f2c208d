//! The harness itself, in a real guest: exit status, batched checks (a failing one is reported
//! as failed), files copied in, and the tools every later test relies on (fio, iperf3).

use vback_tests::Guest;

#[test]
fn guest_runs_a_batch_of_checks() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.txt");
    std::fs::write(&data, "payload from the host\n").unwrap();

    let run = Guest::new()
        .file(&data, "/harness/in/data.txt")
        .run(
            r#"
check kernel 'uname -r; grep -q " / " /proc/mounts || true'
check file 'cat /harness/in/data.txt'
check fio 'fio --version'
check iperf3 'iperf3 --version'
check virtio-modules 'grep -E "^virtio_(pci|blk|net|scsi) " /proc/modules | wc -l'
check must-fail 'echo going to fail; exit 7'
exit 42
"#,
        )
        .expect("the guest runs");
    eprintln!("{}", run.summary());
    assert_eq!(
        run.status, 42,
        "the script's exit status comes back:\n{}",
        run.output
    );
    run.assert_checks(&["kernel", "file", "fio", "iperf3", "virtio-modules"]);
    assert_eq!(run.check("file").output, "payload from the host\n");
    assert!(
        run.check("fio").output.starts_with("fio-"),
        "{}",
        run.output
    );
    assert!(
        run.check("iperf3").output.contains("iperf 3"),
        "{}",
        run.output
    );
    assert_eq!(run.check("virtio-modules").output.trim(), "4");
    let failed = run.check("must-fail");
    assert_eq!(failed.status, 7);
    assert_eq!(failed.output, "going to fail\n");
    assert!(
        run.boot_uptime_s.is_some(),
        "the guest reports its boot time"
    );
}
