//! L1/L2 entry decoding and the bounded L2 table cache.
//!
//! [`decode_l2`] is a pure function (fuzzed): it turns one L2 entry, and with extended L2 its
//! subcluster bitmap, into the mapping of one guest byte and how far that mapping extends.

use std::collections::HashMap;

/// L1 and standard L2 entries: bits 9..=55 hold the host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// The cluster (or L2 table) is referenced exactly once: it may be written in place.
pub const COPIED: u64 = 1 << 63;
/// A compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// Version 3: the cluster reads as zeroes.
pub const ZERO: u64 = 1;

/// What a guest byte maps to in one image of the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ext {
    /// Data at this host offset.
    Data {
        /// Host offset of the guest byte.
        host: u64,
        /// The cluster is referenced once (writable in place).
        copied: bool,
    },
    /// Reads as zeroes; `cluster` is the host cluster still allocated to it (0: none).
    Zero {
        /// Allocated host cluster, or 0.
        cluster: u64,
        /// The allocation is referenced once.
        copied: bool,
    },
    /// Not allocated here: read from the backing image (zeroes without one).
    Unallocated,
    /// A compressed cluster.
    Compressed {
        /// Host offset of the compressed data.
        host: u64,
        /// 512-byte sectors it occupies (counted from `host & !511`).
        sectors: u64,
    },
}

/// Decodes the L2 entry `entry` (and `bitmap` for extended L2 images) for the byte at
/// `in_cluster` of a cluster of `1 << cluster_bits` bytes. Returns the mapping of that byte and
/// how many bytes from it (within the cluster) share it.
pub fn decode_l2(
    entry: u64,
    bitmap: Option<u64>,
    cluster_bits: u32,
    version: u32,
    in_cluster: u64,
) -> Result<(Ext, u64), String> {
    let cs = 1u64 << cluster_bits;
    if in_cluster >= cs {
        return Err(format!(
            "offset {in_cluster} is outside a {cs}-byte cluster"
        ));
    }
    let rest = cs - in_cluster;
    if entry & COMPRESSED != 0 {
        let shift = 62 - (cluster_bits - 8);
        let host = entry & ((1u64 << shift) - 1);
        let sectors = ((entry >> shift) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
        if host == 0 {
            return Err("a compressed cluster at host offset 0".into());
        }
        return Ok((Ext::Compressed { host, sectors }, rest));
    }
    let host = entry & OFFSET_MASK;
    let copied = entry & COPIED != 0;
    if !host.is_multiple_of(cs) {
        return Err(format!(
            "data cluster offset {host:#x} is not aligned to a cluster"
        ));
    }
    let Some(bm) = bitmap else {
        let ext = if version >= 3 && entry & ZERO != 0 {
            Ext::Zero {
                cluster: host,
                copied,
            }
        } else if host == 0 {
            Ext::Unallocated
        } else {
            Ext::Data {
                host: host + in_cluster,
                copied,
            }
        };
        return Ok((ext, rest));
    };
    if entry & ZERO != 0 {
        return Err("the zero flag is reserved in extended L2 entries".into());
    }
    let sc_size = cs / 32;
    let first = (in_cluster / sc_size) as u32;
    let state = |sc: u32| ((bm >> sc) & 1, (bm >> (32 + sc)) & 1);
    let (alloc, zero) = state(first);
    if alloc == 1 && zero == 1 {
        return Err(format!(
            "subcluster {first} is marked both allocated and zero"
        ));
    }
    if host == 0 && alloc == 1 {
        return Err(format!(
            "subcluster {first} is allocated in a cluster without a host offset"
        ));
    }
    let mut end = first + 1;
    while end < 32 && state(end) == (alloc, zero) {
        end += 1;
    }
    let run = u64::from(end) * sc_size - in_cluster;
    let ext = if alloc == 1 {
        Ext::Data {
            host: host + in_cluster,
            copied,
        }
    } else if zero == 1 {
        Ext::Zero {
            cluster: 0,
            copied: false,
        }
    } else {
        Ext::Unallocated
    };
    Ok((ext, run))
}

/// A bounded cache of L2 tables (decoded to native-endian words), least recently used out.
#[derive(Debug)]
pub struct L2Cache {
    max_tables: usize,
    tick: u64,
    map: HashMap<u64, (u64, Vec<u64>)>,
}

impl L2Cache {
    /// A cache of at most `budget` bytes of `cluster_size`-byte tables (at least two tables).
    pub fn new(budget: u64, cluster_size: u64) -> L2Cache {
        let max_tables = (budget / cluster_size).max(2) as usize;
        L2Cache {
            max_tables,
            tick: 0,
            map: HashMap::new(),
        }
    }

    /// Most tables held at once.
    pub fn capacity(&self) -> usize {
        self.max_tables
    }

    /// Tables held now.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The table at host offset `off`, loading it with `load` on a miss.
    pub fn get<E>(
        &mut self,
        off: u64,
        load: impl FnOnce() -> Result<Vec<u64>, E>,
    ) -> Result<&mut Vec<u64>, E> {
        self.tick += 1;
        let tick = self.tick;
        if !self.map.contains_key(&off) {
            let table = load()?;
            if self.map.len() >= self.max_tables
                && let Some(victim) = self
                    .map
                    .iter()
                    .min_by_key(|(_, (used, _))| *used)
                    .map(|(k, _)| *k)
            {
                self.map.remove(&victim);
            }
            self.map.insert(off, (tick, table));
        }
        let e = self.map.get_mut(&off).map(|e| {
            e.0 = tick;
            &mut e.1
        });
        // Just inserted or present.
        Ok(e.unwrap_or_else(|| unreachable!("the table was inserted above")))
    }

    /// The table at `off` if it is cached (not counted as a use).
    pub fn peek(&self, off: u64) -> Option<&[u64]> {
        self.map.get(&off).map(|e| e.1.as_slice())
    }

    /// Drops the table at `off` (it was freed).
    pub fn forget(&mut self, off: u64) {
        self.map.remove(&off);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_entries() {
        let cb = 16;
        assert_eq!(
            decode_l2(0, None, cb, 3, 100).unwrap(),
            (Ext::Unallocated, 65436)
        );
        assert_eq!(
            decode_l2(COPIED | 0x50000, None, cb, 3, 512).unwrap(),
            (
                Ext::Data {
                    host: 0x50200,
                    copied: true
                },
                65024
            )
        );
        assert_eq!(
            decode_l2(ZERO, None, cb, 3, 0).unwrap().0,
            Ext::Zero {
                cluster: 0,
                copied: false
            }
        );
        // Version 2 has no zero flag: bit 0 is ignored.
        assert_eq!(decode_l2(ZERO, None, cb, 2, 0).unwrap().0, Ext::Unallocated);
        assert!(decode_l2(0x50200, None, cb, 3, 0).is_err(), "unaligned");
        assert!(
            decode_l2(0, None, cb, 3, 65536).is_err(),
            "outside the cluster"
        );
    }

    #[test]
    fn compressed_entries() {
        // 64 KiB clusters: the sector count starts at bit 62 - 8 = 54.
        let e = COMPRESSED | (3u64 << 54) | 0x12345;
        assert_eq!(
            decode_l2(e, None, 16, 3, 0).unwrap().0,
            Ext::Compressed {
                host: 0x12345,
                sectors: 4
            }
        );
        // 512-byte clusters: one bit of sector count at bit 61.
        let e = COMPRESSED | (1u64 << 61) | 0x400;
        assert_eq!(
            decode_l2(e, None, 9, 3, 0).unwrap().0,
            Ext::Compressed {
                host: 0x400,
                sectors: 2
            }
        );
    }

    #[test]
    fn subclusters() {
        let cb = 16; // 2 KiB subclusters
        // Subclusters 0-1 allocated, 2 zero, 3.. unallocated.
        let bm = 0b11 | (0b100 << 32);
        let (e, run) = decode_l2(0x20000, Some(bm), cb, 3, 100).unwrap();
        assert_eq!(
            (e, run),
            (
                Ext::Data {
                    host: 0x20064,
                    copied: false
                },
                4096 - 100
            )
        );
        assert_eq!(
            decode_l2(0x20000, Some(bm), cb, 3, 4096).unwrap(),
            (
                Ext::Zero {
                    cluster: 0,
                    copied: false
                },
                2048
            )
        );
        assert_eq!(
            decode_l2(0x20000, Some(bm), cb, 3, 6144).unwrap(),
            (Ext::Unallocated, 65536 - 6144)
        );
        assert!(decode_l2(0x20000, Some(1 | 1 << 32), cb, 3, 0).is_err());
        assert!(decode_l2(0, Some(1), cb, 3, 0).is_err());
        assert!(decode_l2(ZERO, Some(0), cb, 3, 0).is_err());
    }

    #[test]
    fn the_cache_is_bounded_and_lru() {
        let mut c = L2Cache::new(3 * 512, 512);
        assert_eq!(c.capacity(), 3);
        let load = |v: u64| move || Ok::<_, ()>(vec![v; 64]);
        for off in [512u64, 1024, 1536] {
            c.get(off, load(off)).unwrap();
        }
        c.get(512, load(0)).unwrap(); // 512 is now most recent
        c.get(2048, load(2048)).unwrap(); // evicts 1024
        assert_eq!(c.len(), 3);
        assert_eq!(c.get(512, load(0)).unwrap()[0], 512, "still cached");
        assert_eq!(c.get(1024, load(7)).unwrap()[0], 7, "reloaded");
        assert_eq!(L2Cache::new(0, 65536).capacity(), 2, "at least two tables");
    }
}
