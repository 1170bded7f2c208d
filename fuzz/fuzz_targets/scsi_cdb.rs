//! The CD-ROM's CDB handling and the virtio-scsi request format: any CDB, any allocation
//! length, any state sequence: no panic, and the answer never exceeds what the initiator
//! can take.
#![no_main]

use cdrom::mmc::{CHECK_CONDITION, Cdrom, GOOD, Medium};
use cdrom::virtio_scsi::handle_command;
use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// A 64 KiB + 100 byte image of zeroes (a medium is a regular file or a block device).
fn image() -> &'static std::path::Path {
    static IMAGE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    IMAGE.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("vback-fuzz-cdrom-{}.iso", std::process::id()));
        std::fs::write(&p, vec![0u8; 64 * 1024 + 100]).unwrap();
        p
    })
}

fuzz_target!(|data: &[u8]| {
    let medium = std::fs::File::open(image())
        .ok()
        .and_then(|file| Medium::new(
            image().to_owned(),
            file,
            64 * 1024 + 100,
            None,
            vback_block::lock::LockMode::None,
        )
        .ok());
    let mut cd = Cdrom::new(medium, "fuzz");
    // A sequence of commands: [alloc_lo, alloc_hi, len, cdb...]*
    let mut rest = data;
    while rest.len() >= 3 {
        let alloc = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
        let n = usize::from(rest[2] % 17).min(rest.len() - 3);
        let cdb = &rest[3..3 + n];
        let r = cd.execute(cdb, alloc);
        assert!(r.status == GOOD || r.status == CHECK_CONDITION);
        assert!(r.data.len() <= alloc);
        if cdb.first() == Some(&0x42) {
            let _ = cd.eject(cdb.len() % 2 == 0);
        }
        rest = &rest[3 + n..];
    }
    // The same bytes as a virtio-scsi request in guest memory.
    let mem: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap();
    let take = data.len().min(51);
    mem.write_slice(&data[..take], GuestAddress(0x100)).unwrap();
    let wlen = data.first().map_or(108, |b| u32::from(*b) * 4);
    let descs = vec![Descriptor::new(0x100, take as u32, 0, 0), Descriptor::new(0x1000, wlen, 2, 0)];
    let used = handle_command(&mem, descs.into_iter(), &mut cd);
    assert!(used <= wlen);
});
