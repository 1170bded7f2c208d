//! Domain files (`vbctl create`, xm/xl style): no input makes the parser panic, and whatever
//! it accepts holds its promises (a name, one disk per vdev, memory within range).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vback_common::spec::DomainConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = DomainConfig::parse(s) {
        assert!(!c.name.is_empty() && !c.name.contains('/'), "{s:?}");
        assert!((16..=1 << 22).contains(&c.memory_mib));
        assert!(c.vcpus >= 1);
        for (i, d) in c.disks.iter().enumerate() {
            assert!(
                c.disks[i + 1..].iter().all(|o| o.vdev.name != d.vdev.name),
                "{s:?}"
            );
        }
    } else if let Err(e) = DomainConfig::parse(s) {
        assert!(!e.problem.is_empty());
    }
});
