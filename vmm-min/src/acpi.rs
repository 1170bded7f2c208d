//! ACPI tables, so that a kernel without `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES` (Debian's) finds
//! the virtio-mmio devices (`LNRO0005` devices in the DSDT) and the vCPUs (MADT), as
//! cloud-hypervisor and Firecracker describe theirs. Hardware-reduced ACPI: no PM timer, no
//! SCI, no legacy fixed hardware.
//!
//! Layout in guest memory (the BIOS area, outside the e820 RAM): RSDP at 0xe0000, then XSDT,
//! FADT, MADT and DSDT, each 16-byte aligned.

use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMem;

/// Where the RSDP goes (Linux also scans 0xe0000–0xfffff for it).
pub const RSDP_ADDR: u64 = 0xe_0000;
/// End of the area the tables may use.
const TABLES_END: u64 = 0x10_0000;
const OEM_ID: &[u8; 6] = b"VBACK ";
const OEM_TABLE_ID: &[u8; 8] = b"VMM-MIN ";
/// Local APIC and IOAPIC addresses (KVM's in-kernel irqchip).
const LAPIC_ADDR: u32 = 0xfee0_0000;
const IOAPIC_ADDR: u32 = 0xfec0_0000;

/// One virtio-mmio device to describe.
#[derive(Debug, Clone, Copy)]
pub struct MmioDevice {
    /// Register window base.
    pub base: u64,
    /// Window size.
    pub size: u32,
    /// Interrupt (GSI).
    pub gsi: u32,
}

/// Errors writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit below 1 MiB (too many vCPUs or devices).
    #[error("the ACPI tables ({0} bytes) do not fit between 0xe0000 and 1 MiB")]
    TooLarge(u64),
    /// Writing guest memory failed.
    #[error("cannot write the ACPI tables to guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

fn checksum(b: &[u8]) -> u8 {
    0u8.wrapping_sub(b.iter().fold(0u8, |a, x| a.wrapping_add(*x)))
}

/// A system description table: the 36-byte header, then `body`; length and checksum filled in.
fn sdt(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(36 + body.len());
    t.extend_from_slice(signature);
    t.extend_from_slice(&((36 + body.len()) as u32).to_le_bytes());
    t.push(revision);
    t.push(0); // checksum
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    t.extend_from_slice(b"VBCK"); // creator ID
    t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

/// FADT (revision 6): hardware-reduced, DSDT pointer, no VGA, no CMOS RTC.
fn fadt(dsdt: u64) -> Vec<u8> {
    let mut b = vec![0u8; 276 - 36];
    let at = |off: usize| off - 36;
    b[at(40)..at(44)].copy_from_slice(&(dsdt as u32).to_le_bytes());
    // IAPC_BOOT_ARCH: VGA not present (bit 2), CMOS RTC not present (bit 5).
    b[at(109)..at(111)].copy_from_slice(&((1u16 << 2) | (1 << 5)).to_le_bytes());
    // Flags: HW_REDUCED_ACPI (bit 20), PWR_BUTTON and SLP_BUTTON as control-method-less.
    b[at(112)..at(116)].copy_from_slice(&((1u32 << 20) | (1 << 4) | (1 << 5)).to_le_bytes());
    b[at(131)] = 3; // FADT minor version (6.3)
    b[at(140)..at(148)].copy_from_slice(&dsdt.to_le_bytes());
    b[at(268)..at(276)].copy_from_slice(b"VBACKVMM");
    sdt(b"FACP", 6, &b)
}

/// MADT: one enabled local APIC per vCPU, the IOAPIC, and the usual ISA override of IRQ 0 to
/// GSI 2 (the PIT).
fn madt(cpus: u8) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes()); // PCAT_COMPAT: there are 8259 PICs too
    for id in 0..cpus {
        b.extend_from_slice(&[0, 8, id, id]); // type, length, ACPI processor UID, APIC ID
        b.extend_from_slice(&1u32.to_le_bytes()); // enabled
    }
    b.extend_from_slice(&[1, 12, 0, 0]); // IOAPIC: id 0, reserved
    b.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    b.extend_from_slice(&[2, 10, 0, 0]); // override: ISA bus, IRQ 0
    b.extend_from_slice(&2u32.to_le_bytes()); // -> GSI 2
    b.extend_from_slice(&0u16.to_le_bytes()); // flags: bus defaults (edge, high)
    sdt(b"APIC", 5, &b)
}

/// An AML package length (which counts its own bytes) for `len` bytes of content.
fn pkg_length(len: usize) -> Vec<u8> {
    if len + 1 < 64 {
        return vec![(len + 1) as u8];
    }
    for extra in 1..=3usize {
        let total = len + 1 + extra;
        if total < 1 << (4 + 8 * extra) {
            let mut v = vec![((extra as u8) << 6) | (total & 0xf) as u8];
            for i in 0..extra {
                v.push((total >> (4 + 8 * i)) as u8);
            }
            return v;
        }
    }
    // Tables this large are refused before: 0x0fff_ffff bytes of AML cannot fit below 1 MiB.
    vec![0xff, 0xff, 0xff, 0xff]
}

/// `Name(name, value)` with `value` already encoded.
fn aml_name(name: &[u8; 4], value: &[u8]) -> Vec<u8> {
    let mut v = vec![0x08];
    v.extend_from_slice(name);
    v.extend_from_slice(value);
    v
}

fn aml_string(s: &str) -> Vec<u8> {
    let mut v = vec![0x0d];
    v.extend_from_slice(s.as_bytes());
    v.push(0);
    v
}

fn aml_dword(x: u32) -> Vec<u8> {
    let mut v = vec![0x0c];
    v.extend_from_slice(&x.to_le_bytes());
    v
}

/// `Buffer() { bytes }`.
fn aml_buffer(bytes: &[u8]) -> Vec<u8> {
    let mut inner = aml_dword(bytes.len() as u32);
    inner.extend_from_slice(bytes);
    let mut v = vec![0x11];
    v.extend(pkg_length(inner.len()));
    v.extend(inner);
    v
}

/// One virtio-mmio device: `Device(Vnnn) { _HID "LNRO0005", _UID n, _CRS { Memory32Fixed,
/// Interrupt (edge, active high) } }`.
fn aml_device(index: usize, d: &MmioDevice) -> Vec<u8> {
    let mut crs = vec![0x86, 9, 0, 1]; // Memory32Fixed, read-write
    crs.extend_from_slice(&(d.base as u32).to_le_bytes());
    crs.extend_from_slice(&d.size.to_le_bytes());
    crs.extend_from_slice(&[0x89, 6, 0, 0b0000_0011, 1]); // Interrupt: consumer, edge, high
    crs.extend_from_slice(&d.gsi.to_le_bytes());
    crs.extend_from_slice(&[0x79, 0]); // end tag
    let name = format!("V{index:03}");
    let mut body = Vec::new();
    body.extend_from_slice(name.as_bytes());
    body.extend(aml_name(b"_HID", &aml_string("LNRO0005")));
    body.extend(aml_name(b"_UID", &aml_dword(index as u32)));
    body.extend(aml_name(b"_CRS", &aml_buffer(&crs)));
    let mut v = vec![0x5b, 0x82];
    v.extend(pkg_length(body.len()));
    v.extend(body);
    v
}

/// DSDT: `Scope(\_SB) { the devices }`.
fn dsdt(devices: &[MmioDevice]) -> Vec<u8> {
    let mut scope = vec![b'\\', b'_', b'S', b'B', b'_'];
    for (i, d) in devices.iter().enumerate() {
        scope.extend(aml_device(i, d));
    }
    let mut aml = vec![0x10];
    aml.extend(pkg_length(scope.len()));
    aml.extend(scope);
    sdt(b"DSDT", 2, &aml)
}

fn align16(x: u64) -> u64 {
    (x + 15) & !15
}

/// Writes RSDP, XSDT, FADT, MADT and DSDT; returns the RSDP address.
pub fn write_tables(mem: &GuestMem, cpus: u8, devices: &[MmioDevice]) -> Result<u64, AcpiError> {
    let dsdt = dsdt(devices);
    let madt = madt(cpus);
    let xsdt_addr = align16(RSDP_ADDR + 36);
    let fadt_addr = align16(xsdt_addr + 36 + 16);
    let madt_addr = align16(fadt_addr + 276);
    let dsdt_addr = align16(madt_addr + madt.len() as u64);
    let end = dsdt_addr + dsdt.len() as u64;
    if end > TABLES_END {
        return Err(AcpiError::TooLarge(end - RSDP_ADDR));
    }
    let mut xsdt_body = Vec::new();
    xsdt_body.extend_from_slice(&fadt_addr.to_le_bytes());
    xsdt_body.extend_from_slice(&madt_addr.to_le_bytes());
    let xsdt = sdt(b"XSDT", 1, &xsdt_body);

    let mut rsdp = Vec::with_capacity(36);
    rsdp.extend_from_slice(b"RSD PTR ");
    rsdp.push(0); // checksum of the first 20 bytes
    rsdp.extend_from_slice(OEM_ID);
    rsdp.push(2); // revision: ACPI 2.0+
    rsdp.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    rsdp.extend_from_slice(&36u32.to_le_bytes());
    rsdp.extend_from_slice(&xsdt_addr.to_le_bytes());
    rsdp.push(0); // extended checksum
    rsdp.extend_from_slice(&[0, 0, 0]);
    rsdp[8] = checksum(&rsdp[..20]);
    rsdp[32] = checksum(&rsdp);

    for (addr, t) in [
        (RSDP_ADDR, &rsdp),
        (xsdt_addr, &xsdt),
        (fadt_addr, &fadt(dsdt_addr)),
        (madt_addr, &madt),
        (dsdt_addr, &dsdt),
    ] {
        mem.write_slice(t, GuestAddress(addr))?;
    }
    Ok(RSDP_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(mem: &GuestMem, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn table(mem: &GuestMem, addr: u64) -> Vec<u8> {
        let len = u32_at(&read(mem, addr, 8), 4) as usize;
        let t = read(mem, addr, len);
        assert_eq!(t.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0, "checksum");
        t
    }

    fn devices() -> Vec<MmioDevice> {
        (0..3)
            .map(|i| MmioDevice {
                base: 0xd000_0000 + i * 0x1000,
                size: 0x1000,
                gsi: 5 + i as u32,
            })
            .collect()
    }

    #[test]
    fn tables_chain_from_the_rsdp_with_valid_checksums() {
        let mem = crate::memory::create(16 << 20).unwrap();
        let rsdp_addr = write_tables(&mem, 2, &devices()).unwrap();
        let rsdp = read(&mem, rsdp_addr, 36);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(rsdp[..20].iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
        assert_eq!(rsdp.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
        let xsdt = table(&mem, u64_at(&rsdp, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        assert_eq!(xsdt.len(), 36 + 16);
        let fadt = table(&mem, u64_at(&xsdt, 36));
        assert_eq!(&fadt[..4], b"FACP");
        assert_eq!(fadt.len(), 276);
        assert_ne!(u32_at(&fadt, 112) & (1 << 20), 0, "hardware-reduced");
        let madt = table(&mem, u64_at(&xsdt, 44));
        assert_eq!(&madt[..4], b"APIC");
        // Two local APICs, the IOAPIC and one override.
        assert_eq!(madt.len(), 36 + 8 + 2 * 8 + 12 + 10);
        assert_eq!(&madt[44..48], &[0, 8, 0, 0]);
        assert_eq!(&madt[52..56], &[0, 8, 1, 1]);
        let dsdt = table(&mem, u64_at(&fadt, 140));
        assert_eq!(&dsdt[..4], b"DSDT");
        assert_eq!(u64::from(u32_at(&fadt, 40)), u64_at(&fadt, 140));
        let hid = dsdt.windows(8).filter(|w| w == b"LNRO0005").count();
        assert_eq!(hid, 3);
    }

    #[test]
    fn package_lengths_encode_as_the_aml_spec_says() {
        assert_eq!(pkg_length(0), [1]);
        assert_eq!(pkg_length(62), [63]);
        // 63 bytes of content + 2 length bytes = 65 = 0x41.
        assert_eq!(pkg_length(63), [0x41, 0x04]);
        // 5000 + 3 = 5003 = 0x138b: two extra bytes.
        assert_eq!(pkg_length(5000), [0x8b, 0x38, 0x01]);
    }

    /// The DSDT disassembles with ACPICA's iasl into the devices we meant.
    #[test]
    fn dsdt_disassembles_with_iasl() {
        let iasl = std::env::var_os("PATH")
            .and_then(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join("iasl"))
                    .find(|p| p.is_file())
            })
            .expect("iasl (Debian package acpica-tools; run scripts/setup.sh) checks the AML");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("dsdt.dat");
        std::fs::write(&f, dsdt(&devices())).unwrap();
        let out = std::process::Command::new(iasl)
            .arg("-d")
            .arg(&f)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dsl = std::fs::read_to_string(dir.path().join("dsdt.dsl")).unwrap();
        for want in [
            "Device (V000)",
            "Device (V002)",
            "Name (_HID, \"LNRO0005\")",
            "Memory32Fixed (ReadWrite,",
            "0xD0001000",
            "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )",
            "0x00000007,",
        ] {
            assert!(dsl.contains(want), "`{want}` missing in:\n{dsl}");
        }
    }
}
