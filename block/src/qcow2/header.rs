//! The qcow2 header (versions 2 and 3) and its extensions, parsed and validated.
//!
//! The parser works on the first cluster of the image (where the header, its extensions and the
//! backing file name live) plus the file's length, so it can be fuzzed without a file. Every
//! refusal names the field and its byte offset in the header.

use thiserror::Error;

/// "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;
/// Smallest cluster: 512 bytes.
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster QEMU makes: 2 MiB.
pub const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's limit on the L1 table (32 MiB): bounds what we hold in memory.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's limit on the refcount table (8 MiB).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// QEMU's limit on internal snapshots.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Longest backing file name (QEMU: 1023 bytes).
pub const MAX_BACKING_NAME: u32 = 1023;

/// Incompatible feature bits.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// The image is marked corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Data lives in an external file.
pub const INCOMPAT_EXTERNAL_DATA: u64 = 1 << 2;
/// The compression type field is used.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// L2 entries are 128 bits with subcluster bitmaps.
pub const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
/// Everything this implementation understands.
pub const INCOMPAT_KNOWN: u64 = INCOMPAT_DIRTY
    | INCOMPAT_CORRUPT
    | INCOMPAT_EXTERNAL_DATA
    | INCOMPAT_COMPRESSION
    | INCOMPAT_EXTENDED_L2;
/// Compatible feature: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
const EXT_EXTERNAL_DATA: u32 = 0x4441_5441;

/// How compressed clusters are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Raw deflate (the default, and the only type in version 2).
    Deflate,
    /// zstd frames.
    Zstd,
}

/// Why a header was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HeaderError {
    /// Fewer bytes than the header needs.
    #[error("the header is truncated: {need} bytes needed, the file has {have}")]
    Truncated {
        /// Bytes needed.
        need: u64,
        /// Bytes there.
        have: u64,
    },
    /// Not a qcow2 image at all.
    #[error("not a qcow2 image: magic at byte 0 is {found:#010x}, not 0x514649fb")]
    Magic {
        /// What was there.
        found: u32,
    },
    /// A field with a value this implementation refuses.
    #[error("header field {field} (byte {offset}) = {value:#x}: {problem}")]
    Field {
        /// Field name as in QEMU's qcow2 specification.
        field: &'static str,
        /// Byte offset of the field in the header.
        offset: u32,
        /// Its value.
        value: u64,
        /// What is wrong, as a phrase.
        problem: String,
    },
    /// Two metadata structures overlap.
    #[error("{a} ({a_start:#x}..{a_end:#x}) overlaps {b} ({b_start:#x}..{b_end:#x})")]
    Overlap {
        /// First structure.
        a: &'static str,
        /// Its start.
        a_start: u64,
        /// Its end.
        a_end: u64,
        /// Second structure.
        b: &'static str,
        /// Its start.
        b_start: u64,
        /// Its end.
        b_end: u64,
    },
    /// A header extension is malformed.
    #[error("header extension {kind:#010x} at byte {offset}: {problem}")]
    Extension {
        /// Extension type.
        kind: u32,
        /// Byte offset of the extension.
        offset: u64,
        /// What is wrong.
        problem: String,
    },
    /// Something valid this implementation does not do.
    #[error("unsupported: {0}")]
    Unsupported(String),
}

/// A parsed, validated header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// Entries in the L1 table.
    pub l1_size: u32,
    /// Where the L1 table starts.
    pub l1_table_offset: u64,
    /// Where the refcount table starts.
    pub refcount_table_offset: u64,
    /// Its length in clusters.
    pub refcount_table_clusters: u32,
    /// Internal snapshots.
    pub nb_snapshots: u32,
    /// Where the snapshot table starts.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible: u64,
    /// Compatible feature bits.
    pub compatible: u64,
    /// Auto-clear feature bits.
    pub autoclear: u64,
    /// log2 of the refcount width in bits (0..=6).
    pub refcount_order: u32,
    /// Length of the header structure.
    pub header_length: u32,
    /// Compression type.
    pub compression: Compression,
    /// The backing file name, if any (as stored: relative names are relative to the image).
    pub backing_file: Option<String>,
    /// The backing file's format from the backing-format extension.
    pub backing_format: Option<String>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

fn field(field: &'static str, offset: u32, value: u64, problem: impl Into<String>) -> HeaderError {
    HeaderError::Field {
        field,
        offset,
        value,
        problem: problem.into(),
    }
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Whether L2 entries are 128 bits wide (subclusters).
    pub fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTENDED_L2 != 0
    }

    /// Bytes per L2 entry.
    pub fn l2_entry_bytes(&self) -> u64 {
        if self.extended_l2() { 16 } else { 8 }
    }

    /// Guest clusters one L2 table maps.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_bytes()
    }

    /// L1 entries needed for `size` bytes.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        let per_l1 = self.cluster_size() * self.l2_entries();
        size.div_ceil(per_l1)
    }

    /// Parses the header from `first` (the image's first cluster, or as much of it as the file
    /// has) and checks it against the file length `file_len`.
    pub fn parse(first: &[u8], file_len: u64) -> Result<Header, HeaderError> {
        let have = first.len() as u64;
        if have < 4 {
            return Err(HeaderError::Truncated { need: 72, have });
        }
        let magic = be32(first, 0);
        if magic != MAGIC {
            return Err(HeaderError::Magic { found: magic });
        }
        if have < 72 {
            return Err(HeaderError::Truncated { need: 72, have });
        }
        let version = be32(first, 4);
        if version != 2 && version != 3 {
            return Err(field(
                "version",
                4,
                version.into(),
                "only qcow2 versions 2 and 3 exist",
            ));
        }
        let backing_file_offset = be64(first, 8);
        let backing_file_size = be32(first, 16);
        let cluster_bits = be32(first, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(field(
                "cluster_bits",
                20,
                cluster_bits.into(),
                "the cluster size must be 512 bytes to 2 MiB (9..=21)",
            ));
        }
        let cs = 1u64 << cluster_bits;
        let size = be64(first, 24);
        let crypt_method = be32(first, 32);
        if crypt_method != 0 {
            return Err(HeaderError::Unsupported(format!(
                "encrypted images (crypt_method {crypt_method} at byte 32)"
            )));
        }
        let l1_size = be32(first, 36);
        let l1_table_offset = be64(first, 40);
        let refcount_table_offset = be64(first, 48);
        let refcount_table_clusters = be32(first, 56);
        let nb_snapshots = be32(first, 60);
        let snapshots_offset = be64(first, 64);

        let (incompatible, compatible, autoclear, refcount_order, header_length) = if version == 3 {
            if have < 104 {
                return Err(HeaderError::Truncated { need: 104, have });
            }
            let hl = be32(first, 100);
            if hl < 104 || !hl.is_multiple_of(8) || u64::from(hl) > cs {
                return Err(field(
                    "header_length",
                    100,
                    hl.into(),
                    "must be at least 104, a multiple of 8 and within the first cluster",
                ));
            }
            if u64::from(hl) > have {
                return Err(HeaderError::Truncated {
                    need: hl.into(),
                    have,
                });
            }
            (
                be64(first, 72),
                be64(first, 80),
                be64(first, 88),
                be32(first, 96),
                hl,
            )
        } else {
            (0, 0, 0, 4, 72)
        };
        if refcount_order > 6 {
            return Err(field(
                "refcount_order",
                96,
                refcount_order.into(),
                "refcounts are at most 64 bits wide (order 6)",
            ));
        }
        let unknown = incompatible & !INCOMPAT_KNOWN;
        let compression = if incompatible & INCOMPAT_COMPRESSION != 0 {
            if header_length < 105 {
                return Err(field(
                    "incompatible_features",
                    72,
                    incompatible,
                    "the compression type bit is set but the header has no compression_type field",
                ));
            }
            match first[104] {
                0 => Compression::Deflate,
                1 => Compression::Zstd,
                t => {
                    return Err(field(
                        "compression_type",
                        104,
                        t.into(),
                        "only 0 (deflate) and 1 (zstd) are defined",
                    ));
                }
            }
        } else {
            if header_length >= 105 && first[104] != 0 {
                return Err(field(
                    "compression_type",
                    104,
                    first[104].into(),
                    "a compression type other than deflate needs incompatible feature bit 3",
                ));
            }
            Compression::Deflate
        };
        if incompatible & INCOMPAT_EXTENDED_L2 != 0 && cluster_bits < 14 {
            return Err(field(
                "cluster_bits",
                20,
                cluster_bits.into(),
                "extended L2 entries need clusters of at least 16 KiB",
            ));
        }

        // Extensions: from the end of the header to the backing file name or the cluster end.
        let ext_end = if backing_file_offset != 0 {
            backing_file_offset.min(cs)
        } else {
            cs
        }
        .min(have);
        let mut at = u64::from(header_length);
        let mut backing_format = None;
        let mut feature_names: Vec<(u8, u8, String)> = Vec::new();
        while at + 8 <= ext_end {
            let kind = be32(first, at as usize);
            let len = u64::from(be32(first, at as usize + 4));
            let data = at + 8;
            if kind == EXT_END {
                break;
            }
            if data + len > ext_end {
                return Err(HeaderError::Extension {
                    kind,
                    offset: at,
                    problem: format!(
                        "its {len} bytes run past the end of the header area at byte {ext_end}"
                    ),
                });
            }
            let bytes = &first[data as usize..(data + len) as usize];
            match kind {
                EXT_BACKING_FORMAT => {
                    let s = std::str::from_utf8(bytes)
                        .map_err(|_| HeaderError::Extension {
                            kind,
                            offset: at,
                            problem: "the backing format is not UTF-8".into(),
                        })?
                        .trim_end_matches('\0')
                        .to_owned();
                    backing_format = Some(s);
                }
                EXT_FEATURE_NAMES => {
                    for e in bytes.chunks_exact(48) {
                        let name = String::from_utf8_lossy(&e[2..])
                            .trim_end_matches('\0')
                            .to_owned();
                        feature_names.push((e[0], e[1], name));
                    }
                }
                EXT_EXTERNAL_DATA => {
                    return Err(HeaderError::Unsupported(
                        "images with an external data file".into(),
                    ));
                }
                _ => {}
            }
            at = data + len.div_ceil(8) * 8;
        }
        if unknown != 0 {
            let names: Vec<String> = (0..64)
                .filter(|b| unknown & (1 << b) != 0)
                .map(|b| {
                    feature_names
                        .iter()
                        .find(|(t, bit, _)| *t == 0 && u32::from(*bit) == b)
                        .map_or_else(|| format!("bit {b}"), |(_, _, n)| format!("{n} (bit {b})"))
                })
                .collect();
            return Err(HeaderError::Unsupported(format!(
                "incompatible feature(s) {}",
                names.join(", ")
            )));
        }
        if incompatible & INCOMPAT_EXTERNAL_DATA != 0 {
            return Err(HeaderError::Unsupported(
                "images with an external data file".into(),
            ));
        }

        let backing_file = if backing_file_offset != 0 {
            if backing_file_size == 0 || backing_file_size > MAX_BACKING_NAME {
                return Err(field(
                    "backing_file_size",
                    16,
                    backing_file_size.into(),
                    format!("a backing file name is 1 to {MAX_BACKING_NAME} bytes"),
                ));
            }
            let end = backing_file_offset.checked_add(backing_file_size.into());
            if backing_file_offset < u64::from(header_length) || end.is_none_or(|e| e > cs) {
                return Err(field(
                    "backing_file_offset",
                    8,
                    backing_file_offset,
                    "the backing file name must lie in the first cluster, after the header",
                ));
            }
            let end = end.unwrap_or(0);
            if end > have {
                return Err(HeaderError::Truncated { need: end, have });
            }
            let name = &first[backing_file_offset as usize..end as usize];
            Some(
                std::str::from_utf8(name)
                    .map_err(|_| {
                        field(
                            "backing_file_offset",
                            8,
                            backing_file_offset,
                            "the backing file name is not UTF-8",
                        )
                    })?
                    .to_owned(),
            )
        } else {
            None
        };
        if backing_format.is_some() && backing_file.is_none() {
            backing_format = None;
        }

        let h = Header {
            version,
            cluster_bits,
            size,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            nb_snapshots,
            snapshots_offset,
            incompatible,
            compatible,
            autoclear,
            refcount_order,
            header_length,
            compression,
            backing_file,
            backing_format,
        };
        h.validate_layout(file_len)?;
        Ok(h)
    }

    fn validate_layout(&self, file_len: u64) -> Result<(), HeaderError> {
        let cs = self.cluster_size();
        // Virtual size: the L1 table must map all of it and stay within QEMU's limit.
        let per_l1 = cs * self.l2_entries();
        let max_size = (MAX_L1_BYTES / 8) * per_l1;
        if self.size > max_size || self.size > (1u64 << 62) {
            return Err(field(
                "size",
                24,
                self.size,
                format!("larger than the {max_size} bytes an L1 table of at most 32 MiB can map"),
            ));
        }
        let need_l1 = self.l1_entries_for(self.size);
        if u64::from(self.l1_size) < need_l1 {
            return Err(field(
                "l1_size",
                36,
                self.l1_size.into(),
                format!("{need_l1} L1 entries are needed to map {} bytes", self.size),
            ));
        }
        if u64::from(self.l1_size) * 8 > MAX_L1_BYTES {
            return Err(field(
                "l1_size",
                36,
                self.l1_size.into(),
                "the L1 table would exceed 32 MiB",
            ));
        }
        let l1_bytes = u64::from(self.l1_size) * 8;
        let region = |name: &'static str, off: u32, start: u64, len: u64| {
            if !start.is_multiple_of(cs) {
                return Err(field(name, off, start, "not aligned to a cluster"));
            }
            match start.checked_add(len) {
                Some(end) if end <= file_len => Ok((start, end)),
                _ => Err(field(
                    name,
                    off,
                    start,
                    format!(
                        "the {len}-byte table runs past the end of the file ({file_len} bytes)"
                    ),
                )),
            }
        };
        let mut regions: Vec<(&'static str, u64, u64)> = vec![("the header", 0, cs.min(file_len))];
        if l1_bytes > 0 {
            let (s, e) = region("l1_table_offset", 40, self.l1_table_offset, l1_bytes)?;
            regions.push(("the L1 table", s, e));
        }
        if self.refcount_table_clusters == 0 {
            return Err(field(
                "refcount_table_clusters",
                56,
                0,
                "an image needs a refcount table",
            ));
        }
        let rt_bytes = u64::from(self.refcount_table_clusters) * cs;
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(field(
                "refcount_table_clusters",
                56,
                self.refcount_table_clusters.into(),
                "the refcount table would exceed 8 MiB",
            ));
        }
        let (s, e) = region(
            "refcount_table_offset",
            48,
            self.refcount_table_offset,
            rt_bytes,
        )?;
        regions.push(("the refcount table", s, e));
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(field(
                "nb_snapshots",
                60,
                self.nb_snapshots.into(),
                format!("at most {MAX_SNAPSHOTS} snapshots"),
            ));
        }
        if self.nb_snapshots > 0 {
            // Each entry is at least 40 bytes.
            let (s, e) = region(
                "snapshots_offset",
                64,
                self.snapshots_offset,
                u64::from(self.nb_snapshots) * 40,
            )?;
            regions.push(("the snapshot table", s, e));
        }
        for i in 0..regions.len() {
            for j in i + 1..regions.len() {
                let (a, a0, a1) = regions[i];
                let (b, b0, b1) = regions[j];
                if a0 < b1 && b0 < a1 {
                    return Err(HeaderError::Overlap {
                        a,
                        a_start: a0,
                        a_end: a1,
                        b,
                        b_start: b0,
                        b_end: b1,
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal valid v3 image header in a 64 KiB first cluster: 1 GiB, L1 at 0x30000 (2
    /// entries), refcount table at 0x10000 (1 cluster); the file is 0x40000 bytes.
    pub(crate) fn v3() -> Vec<u8> {
        let mut b = vec![0u8; 65536];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&16u32.to_be_bytes());
        b[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        b[36..40].copy_from_slice(&2u32.to_be_bytes());
        b[40..48].copy_from_slice(&0x30000u64.to_be_bytes());
        b[48..56].copy_from_slice(&0x10000u64.to_be_bytes());
        b[56..60].copy_from_slice(&1u32.to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&112u32.to_be_bytes());
        b
    }

    fn set32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }

    fn set64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }

    #[test]
    fn a_valid_header_parses() {
        let h = Header::parse(&v3(), 0x40000).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.l2_entries(), 8192);
        assert_eq!(h.compression, Compression::Deflate);
        assert_eq!(h.backing_file, None);
    }

    #[test]
    fn backing_name_and_format_extension() {
        let mut b = v3();
        // Backing format extension at 112: "qcow2".
        set32(&mut b, 112, EXT_BACKING_FORMAT);
        set32(&mut b, 116, 5);
        b[120..125].copy_from_slice(b"qcow2");
        set32(&mut b, 128, 0);
        set64(&mut b, 8, 200);
        set32(&mut b, 16, 8);
        b[200..208].copy_from_slice(b"base.img");
        let h = Header::parse(&b, 0x40000).unwrap();
        assert_eq!(h.backing_file.as_deref(), Some("base.img"));
        assert_eq!(h.backing_format.as_deref(), Some("qcow2"));
    }

    #[test]
    fn malformed_headers_name_the_field() {
        type Case = (&'static str, Box<dyn Fn(&mut Vec<u8>)>, u64, &'static str);
        let cases: Vec<Case> = vec![
            ("truncated", Box::new(|b| b.truncate(50)), 50, "truncated"),
            (
                "magic",
                Box::new(|b| b[0] = 0),
                0x40000,
                "not a qcow2 image",
            ),
            ("version", Box::new(|b| set32(b, 4, 4)), 0x40000, "version"),
            (
                "cluster 256",
                Box::new(|b| set32(b, 20, 8)),
                0x40000,
                "cluster_bits",
            ),
            (
                "cluster 4M",
                Box::new(|b| set32(b, 20, 22)),
                0x40000,
                "cluster_bits",
            ),
            (
                "L1 beyond the file",
                Box::new(|b| set64(b, 40, 0x100000)),
                0x40000,
                "l1_table_offset",
            ),
            (
                "L1 unaligned",
                Box::new(|b| set64(b, 40, 0x30008)),
                0x40000,
                "not aligned",
            ),
            (
                "refcount table overlapping L1",
                Box::new(|b| set64(b, 48, 0x30000)),
                0x40000,
                "overlaps",
            ),
            (
                "L1 overlapping the header",
                Box::new(|b| set64(b, 40, 0)),
                0x40000,
                "overlaps",
            ),
            (
                "absurd size",
                Box::new(|b| set64(b, 24, u64::MAX)),
                0x40000,
                "size",
            ),
            (
                "L1 too small",
                Box::new(|b| set64(b, 24, 1 << 40)),
                0x40000,
                "l1_size",
            ),
            (
                "huge refcount table",
                Box::new(|b| set32(b, 56, 1 << 20)),
                0x40000,
                "8 MiB",
            ),
            (
                "no refcount table",
                Box::new(|b| set32(b, 56, 0)),
                0x40000,
                "refcount_table_clusters",
            ),
            (
                "refcount order",
                Box::new(|b| set32(b, 96, 7)),
                0x40000,
                "refcount_order",
            ),
            (
                "header length",
                Box::new(|b| set32(b, 100, 90)),
                0x40000,
                "header_length",
            ),
            (
                "unknown incompatible feature",
                Box::new(|b| set64(b, 72, 1 << 9)),
                0x40000,
                "bit 9",
            ),
            (
                "encryption",
                Box::new(|b| set32(b, 32, 1)),
                0x40000,
                "encrypted",
            ),
            (
                "bad compression type",
                Box::new(|b| {
                    set64(b, 72, INCOMPAT_COMPRESSION);
                    b[104] = 7;
                }),
                0x40000,
                "compression_type",
            ),
            (
                "backing name outside the cluster",
                Box::new(|b| {
                    set64(b, 8, 65530);
                    set32(b, 16, 100);
                }),
                0x40000,
                "backing_file_offset",
            ),
            (
                "oversized extension",
                Box::new(|b| {
                    set32(b, 112, 0x1234);
                    set32(b, 116, 1 << 20);
                }),
                0x40000,
                "header extension",
            ),
            (
                "extended L2 with small clusters",
                Box::new(|b| {
                    set64(b, 72, INCOMPAT_EXTENDED_L2);
                    set32(b, 20, 12);
                }),
                0x40000,
                "16 KiB",
            ),
            (
                "snapshot table beyond the file",
                Box::new(|b| {
                    set32(b, 60, 3);
                    set64(b, 64, 0x50000);
                }),
                0x40000,
                "snapshots_offset",
            ),
        ];
        for (what, f, len, says) in cases {
            let mut b = v3();
            f(&mut b);
            let e = Header::parse(&b, len).unwrap_err().to_string();
            assert!(e.contains(says), "{what}: {e}");
        }
    }

    #[test]
    fn v2_headers_have_fixed_defaults() {
        let mut b = v3();
        set32(&mut b, 4, 2);
        // Feature bits past byte 72 are not header in v2 (that is where extensions start).
        set64(&mut b, 72, 0);
        let h = Header::parse(&b, 0x40000).unwrap();
        assert_eq!((h.version, h.refcount_order, h.incompatible), (2, 4, 0));
    }
}
