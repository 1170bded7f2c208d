//! Xen configuration strings: no input makes a parser panic, and whatever parses as a disk
//! uname or entry prints back to a string that parses to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vback_common::spec::{DiskEntry, DiskUname, Rate, VifSpec, parse_size};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(u) = DiskUname::parse(s) {
        assert_eq!(DiskUname::parse(&u.to_string()).as_ref(), Ok(&u), "{s:?}");
    }
    if let Ok(e) = DiskEntry::parse(s) {
        assert_eq!(DiskEntry::parse(&e.to_string()).as_ref(), Ok(&e), "{s:?}");
    }
    if let Ok(r) = Rate::parse(s) {
        assert!(r.credit_bytes > 0);
    }
    let _ = VifSpec::parse(s);
    let _ = parse_size(s);
});
