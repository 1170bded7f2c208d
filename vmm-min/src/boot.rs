//! The x86-64 Linux boot protocol, entered directly in 64-bit mode: the kernel (ELF vmlinux or
//! bzImage) and initrd in guest memory, `boot_params` with the e820 map and command line,
//! identity page tables for the low 4 GiB, a flat GDT, and the boot vCPU's registers.

use std::fs::File;
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use linux_loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{KernelLoader, bzimage::BzImage, elf::Elf};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::memory::GuestMem;

/// Where the GDT lives.
pub const GDT_ADDR: u64 = 0x500;
/// Where the (empty) IDT lives.
pub const IDT_ADDR: u64 = 0x520;
/// The zero page (`boot_params`).
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack pointer (grows down below the page tables).
pub const BOOT_STACK: u64 = 0x8ff0;
/// PML4; the PDPT and four page directories follow it.
pub const PML4_ADDR: u64 = 0x9000;
const PDPT_ADDR: u64 = 0xa000;
const PD_ADDR: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Longest command line accepted.
pub const CMDLINE_MAX: usize = 4096;
/// Kernels load at or above 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;
/// End of the low RAM below the EBDA.
const EBDA_START: u64 = 0x9_fc00;

const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

/// Errors loading the guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A file could not be read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// kernel or initrd.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Neither an ELF nor a bzImage.
    #[error(
        "{path} is neither an x86-64 ELF vmlinux ({elf}) nor a bzImage ({bz}); pass an uncompressed vmlinux or a bzImage"
    )]
    BadKernel {
        /// The file.
        path: PathBuf,
        /// Why the ELF loader refused it.
        elf: String,
        /// Why the bzImage loader refused it.
        bz: String,
    },
    /// The initrd does not fit.
    #[error(
        "the initrd {path} ({size} bytes) does not fit in guest memory above the kernel (ends at {kernel_end:#x}); give the guest more --mem"
    )]
    InitrdTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Where the kernel ends.
        kernel_end: u64,
    },
    /// The command line is too long or has a NUL.
    #[error("the kernel command line is longer than {CMDLINE_MAX} bytes or contains a NUL byte")]
    Cmdline,
    /// Writing guest memory failed (it is too small for the layout).
    #[error(
        "cannot write the {what} at guest address {addr:#x}: {source}; give the guest more --mem"
    )]
    Write {
        /// What was being written.
        what: &'static str,
        /// Where.
        addr: u64,
        /// The memory error.
        source: vm_memory::GuestMemoryError,
    },
    /// A vCPU register ioctl failed.
    #[error("cannot set the boot vCPU's {what}: {source}")]
    Vcpu {
        /// Which registers.
        what: &'static str,
        /// The KVM error.
        source: kvm_ioctls::Error,
    },
}

/// What the boot vCPU starts with.
#[derive(Debug, Clone, Copy)]
pub struct EntryPoint {
    /// 64-bit entry address.
    pub rip: u64,
}

fn write<T: vm_memory::ByteValued>(
    mem: &GuestMem,
    what: &'static str,
    addr: u64,
    val: T,
) -> Result<(), BootError> {
    mem.write_obj(val, GuestAddress(addr))
        .map_err(|source| BootError::Write { what, addr, source })
}

/// Loads the kernel, the initrd and the command line, and writes `boot_params`, page tables and
/// GDT. Returns the 64-bit entry point.
pub fn load(
    mem: &GuestMem,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    acpi_rsdp: Option<u64>,
) -> Result<EntryPoint, BootError> {
    let read_err = |what, path: &Path| {
        let path = path.to_owned();
        move |source| BootError::Read { what, path, source }
    };
    let mut kfile = File::open(kernel).map_err(read_err("kernel", kernel))?;
    let mut hdr = Default::default();
    let (rip, kernel_end) = match Elf::load(mem, None, &mut kfile, Some(GuestAddress(HIMEM_START)))
    {
        Ok(r) => (r.kernel_load.raw_value(), r.kernel_end),
        Err(elf) => match BzImage::load(mem, None, &mut kfile, Some(GuestAddress(HIMEM_START))) {
            Ok(r) => {
                hdr = r.setup_header.unwrap_or_default();
                // The 64-bit entry of a bzImage is 0x200 past the protected-mode code.
                (r.kernel_load.raw_value() + 0x200, r.kernel_end)
            }
            Err(bz) => {
                return Err(BootError::BadKernel {
                    path: kernel.to_owned(),
                    elf: elf.to_string(),
                    bz: bz.to_string(),
                });
            }
        },
    };

    let bytes = cmdline.as_bytes();
    if bytes.len() >= CMDLINE_MAX || bytes.contains(&0) {
        return Err(BootError::Cmdline);
    }
    let mut buf = bytes.to_vec();
    buf.push(0);
    mem.write_slice(&buf, GuestAddress(CMDLINE_ADDR))
        .map_err(|source| BootError::Write {
            what: "command line",
            addr: CMDLINE_ADDR,
            source,
        })?;

    let mem_end = mem.last_addr().raw_value() + 1;
    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = buf.len() as u32;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }

    if let Some(path) = initrd {
        let data = std::fs::read(path).map_err(read_err("initrd", path))?;
        let size = data.len() as u64;
        // Top of memory, page aligned, below 4 GiB (ramdisk_image is 32 bits) and above the kernel.
        let top = mem_end.min(0xffff_f000);
        let addr = top.checked_sub(size).map(|a| a & !0xfff);
        let addr = match addr {
            Some(a) if a >= kernel_end => a,
            _ => {
                return Err(BootError::InitrdTooLarge {
                    path: path.to_owned(),
                    size,
                    kernel_end,
                });
            }
        };
        mem.write_slice(&data, GuestAddress(addr))
            .map_err(|source| BootError::Write {
                what: "initrd",
                addr,
                source,
            })?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    let e820 = [
        boot_e820_entry {
            addr: 0,
            size: EBDA_START,
            r#type: E820_RAM,
        },
        boot_e820_entry {
            addr: HIMEM_START,
            size: mem_end - HIMEM_START,
            r#type: E820_RAM,
        },
    ];
    params.e820_table[..e820.len()].copy_from_slice(&e820);
    params.e820_entries = e820.len() as u8;
    if let Some(rsdp) = acpi_rsdp {
        params.acpi_rsdp_addr = rsdp;
    }
    write(mem, "boot parameters", ZERO_PAGE, params)?;

    write_page_tables(mem)?;
    write_gdt(mem)?;
    Ok(EntryPoint { rip })
}

/// Identity-maps the low 4 GiB with 2 MiB pages (RAM and the virtio-mmio window).
fn write_page_tables(mem: &GuestMem) -> Result<(), BootError> {
    // Present | writable.
    write(mem, "PML4", PML4_ADDR, PDPT_ADDR | 0x03)?;
    for g in 0..4u64 {
        let pd = PD_ADDR + g * 0x1000;
        write(mem, "PDPT", PDPT_ADDR + g * 8, pd | 0x03)?;
        for i in 0..512u64 {
            // Present | writable | page size (2 MiB).
            let entry = ((g << 30) | (i << 21)) | 0x83;
            write(mem, "page directory", pd + i * 8, entry)?;
        }
    }
    Ok(())
}

/// GDT entries: null, 64-bit code, data, TSS (as Firecracker lays them out).
const GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn segment(entry: u64, index: u16) -> kvm_segment {
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32,
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: 0,
    }
}

fn write_gdt(mem: &GuestMem) -> Result<(), BootError> {
    for (i, e) in GDT.iter().enumerate() {
        write(mem, "GDT", GDT_ADDR + i as u64 * 8, *e)?;
    }
    write(mem, "IDT", IDT_ADDR, 0u64)
}

/// The special registers of a vCPU in 64-bit long mode with paging on the tables above.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment(GDT[1], 1);
    let data = segment(GDT[2], 2);
    let tss = segment(GDT[3], 3);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    const CR0_PE: u64 = 1;
    const CR0_ET: u64 = 0x10;
    const CR0_PG: u64 = 0x8000_0000;
    const CR4_PAE: u64 = 0x20;
    const EFER_LME: u64 = 0x100;
    const EFER_LMA: u64 = 0x400;
    sregs.cr0 |= CR0_PE | CR0_ET | CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// Puts the boot vCPU at `entry` in 64-bit mode, `rsi` pointing at `boot_params`.
pub fn setup_boot_vcpu(vcpu: &VcpuFd, entry: EntryPoint) -> Result<(), BootError> {
    let err = |what| move |source| BootError::Vcpu { what, source };
    let sregs = vcpu.get_sregs().map_err(err("special registers"))?;
    vcpu.set_sregs(&long_mode_sregs(sregs))
        .map_err(err("special registers"))?;
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry.rip,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: ZERO_PAGE,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(err("general registers"))?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(err("FPU registers"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_segments_decode_to_flat_64_bit_code_and_data() {
        let code = segment(GDT[1], 1);
        assert_eq!(
            (code.l, code.db, code.s, code.type_, code.present),
            (1, 0, 1, 0xb, 1)
        );
        assert_eq!(
            (code.base, code.limit, code.g, code.selector),
            (0, 0xfffff, 1, 8)
        );
        let data = segment(GDT[2], 2);
        assert_eq!((data.l, data.db, data.type_, data.selector), (0, 1, 3, 16));
    }

    #[test]
    fn boot_layout_in_memory() {
        let mem = crate::memory::create(64 << 20).unwrap();
        // A minimal ELF64 x86-64 executable with one PT_LOAD segment at 2 MiB.
        let elf = tiny_elf(0x20_0000, &[0xf4]);
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("k.elf");
        std::fs::write(&k, &elf).unwrap();
        let initrd = dir.path().join("initrd");
        std::fs::write(&initrd, vec![7u8; 10_000]).unwrap();
        let e = load(&mem, &k, Some(&initrd), "console=ttyS0", Some(0xe0000)).unwrap();
        assert_eq!(e.rip, 0x20_0000);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x20_0000)).unwrap(), 0xf4);
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE)).unwrap();
        assert_eq!({ p.e820_entries }, 2);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
        let e1 = p.e820_table[1];
        assert_eq!(
            ({ e1.addr }, { e1.size }),
            (HIMEM_START, (64 << 20) - HIMEM_START)
        );
        let (img, size) = ({ p.hdr.ramdisk_image }, { p.hdr.ramdisk_size });
        assert_eq!(size, 10_000);
        assert_eq!(u64::from(img) % 4096, 0);
        assert!(u64::from(img) + 10_000 <= 64 << 20);
        let mut cl = [0u8; 14];
        mem.read_slice(&mut cl, GuestAddress(CMDLINE_ADDR)).unwrap();
        assert_eq!(&cl, b"console=ttyS0\0");
        // 0xd000_0000 (the virtio-mmio window) is identity mapped.
        let pd3: u64 = mem
            .read_obj(GuestAddress(PD_ADDR + 3 * 0x1000 + 128 * 8))
            .unwrap();
        assert_eq!(pd3 & !0xfff, 0xd000_0000);
    }

    #[test]
    fn garbage_kernel_is_refused_with_both_reasons() {
        let mem = crate::memory::create(16 << 20).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("junk");
        std::fs::write(&k, vec![0x55u8; 8192]).unwrap();
        let e = load(&mem, &k, None, "", None).unwrap_err().to_string();
        assert!(e.contains("neither an x86-64 ELF"), "{e}");
    }

    #[test]
    fn oversized_initrd_is_refused() {
        let mem = crate::memory::create(16 << 20).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("k.elf");
        std::fs::write(&k, tiny_elf(0x20_0000, &[0xf4])).unwrap();
        let initrd = dir.path().join("initrd");
        std::fs::write(&initrd, vec![0u8; 17 << 20]).unwrap();
        let e = load(&mem, &k, Some(&initrd), "", None).unwrap_err();
        assert!(matches!(e, BootError::InitrdTooLarge { .. }), "{e}");
    }

    /// An ELF64 executable whose only PT_LOAD segment holds `code` at `addr`.
    fn tiny_elf(addr: u64, code: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; 0x78];
        v[..4].copy_from_slice(b"\x7fELF");
        v[4] = 2; // 64-bit
        v[5] = 1; // little endian
        v[6] = 1; // version
        v[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        v[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        v[20..24].copy_from_slice(&1u32.to_le_bytes());
        v[24..32].copy_from_slice(&addr.to_le_bytes()); // e_entry
        v[32..40].copy_from_slice(&0x40u64.to_le_bytes()); // e_phoff
        v[52..54].copy_from_slice(&0x40u16.to_le_bytes()); // e_ehsize
        v[54..56].copy_from_slice(&0x38u16.to_le_bytes()); // e_phentsize
        v[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let ph = 0x40;
        v[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        v[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes()); // R+X
        v[ph + 8..ph + 16].copy_from_slice(&0x78u64.to_le_bytes()); // p_offset
        v[ph + 16..ph + 24].copy_from_slice(&addr.to_le_bytes()); // p_vaddr
        v[ph + 24..ph + 32].copy_from_slice(&addr.to_le_bytes()); // p_paddr
        v[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        v[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64).to_le_bytes());
        v[ph + 48..ph + 56].copy_from_slice(&0x1000u64.to_le_bytes());
        v.extend_from_slice(code);
        v
    }
}
