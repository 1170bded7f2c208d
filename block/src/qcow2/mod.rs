//! qcow2 images: the format layer (metadata only; blkback's worker moves guest data).
//!
//! - [`header`]: the header and its extensions, validated;
//! - [`l2`]: L2 entry decoding (standard, compressed, extended L2) and the bounded L2 cache;
//! - this module: an open image with its backing chain ([`Image`]): guest-offset → host-offset
//!   mapping for the zero-copy fast path ([`Image::map_direct`]), and a synchronous path for
//!   everything else (reads through zero/unallocated/backing/compressed clusters, writes that
//!   allocate, discard, write-zeroes, flush, resize).
//!
//! Crash safety (see docs/qcow2.md): clusters are only ever allocated past the end of
//! everything in use, never reused, so a crash can expose nothing but zeroes or this guest's own
//! data. Refcounts are raised and made durable (fdatasync) *before* any L2/L1 entry can point at
//! the clusters (they are reserved in batches); a new L2 table is written before the L1 entry
//! that points at it; data before the L2 entry that maps it. Refcounts are lowered only after
//! the L2 changes that drop the references are durable (at the next flush). A crash can
//! therefore leak clusters (reserved, or freed-but-not-yet-decremented), which `qemu-img check
//! -r leaks` repairs, but never leave an entry pointing at a cluster with refcount 0.
//!
//! A write that fails (a full file system) gives back what it took before anything points at
//! it: its cluster goes back to the reservation, a reservation or new table that cannot be
//! written leaves the end where it was. Failed writes neither leak clusters nor grow the file.

mod create;
pub mod header;
pub mod l2;
pub mod shared;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::lock::{ImageLock, LockMode};
use thiserror::Error;

pub use create::create;
pub use header::{Compression, Header, HeaderError};
use l2::{COPIED, Ext, L2Cache, OFFSET_MASK, ZERO, decode_l2};
pub use shared::DataPath;

/// Clusters reserved (refcounts raised, made durable) at a time, in bytes, at first.
const RESERVE_BYTES: u64 = 8 << 20;
/// The most reserved at a time: a reservation used up within [`FAST_RESERVATION`] doubles the
/// next one (each costs an fdatasync, and a guest filling a fresh image at disk speed would
/// otherwise wait for one every few milliseconds); a slower one halves it.
const MAX_RESERVE_BYTES: u64 = 256 << 20;
/// See [`MAX_RESERVE_BYTES`].
const FAST_RESERVATION: std::time::Duration = std::time::Duration::from_secs(1);
/// Pending refcount decrements before a flush is forced.
const MAX_PENDING_FREES: usize = 65536;
/// The default backing chain depth limit.
pub const DEFAULT_MAX_DEPTH: usize = 16;
/// The default metadata cache size per chain, in bytes.
pub const DEFAULT_CACHE_BYTES: u64 = 4 << 20;

/// Why a qcow2 operation failed.
#[derive(Debug, Error)]
pub enum Qcow2Error {
    /// The header was refused.
    #[error("{}: {source}", path.display())]
    Header {
        /// The image.
        path: PathBuf,
        /// What is wrong.
        source: HeaderError,
    },
    /// An I/O error on an image file.
    #[error("{}: cannot {op} at offset {offset}: {source}", path.display())]
    Io {
        /// The image.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// Host offset.
        offset: u64,
        /// The OS error.
        source: std::io::Error,
    },
    /// The metadata is inconsistent.
    #[error("{}: corrupt image: {detail}; check it with `qemu-img check`", path.display())]
    Corrupt {
        /// The image.
        path: PathBuf,
        /// What was found where.
        detail: String,
    },
    /// The backing chain is refused by the policy or cannot be opened.
    #[error("{}: backing file refused: {reason}", path.display())]
    Backing {
        /// The image whose backing file is refused.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A valid image (or request) this implementation does not handle.
    #[error("{}: {reason}", path.display())]
    Unsupported {
        /// The image.
        path: PathBuf,
        /// What and what to do.
        reason: String,
    },
    /// A request outside the image or on a read-only image.
    #[error("{}: {reason}", path.display())]
    Refused {
        /// The image.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

type Result<T> = std::result::Result<T, Qcow2Error>;

/// What backing files may be opened.
#[derive(Debug, Clone)]
pub struct BackingPolicy {
    /// Longest chain below the top image.
    pub max_depth: usize,
    /// Directories backing files must be in (besides the top image's own directory).
    pub allowed_dirs: Vec<PathBuf>,
    /// Allow backing files anywhere.
    pub any_dir: bool,
    /// A backing file without a format in the header is opened as raw (never probed). Off by
    /// default: such an image is refused.
    pub raw_without_format: bool,
}

impl Default for BackingPolicy {
    fn default() -> Self {
        BackingPolicy {
            max_depth: DEFAULT_MAX_DEPTH,
            allowed_dirs: Vec::new(),
            any_dir: false,
            raw_without_format: false,
        }
    }
}

/// How to open an image.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Writes allowed (the top image only; backing files are always read-only).
    pub writable: bool,
    /// L2 cache budget for the whole chain, in bytes.
    pub cache_bytes: u64,
    /// Backing chain policy.
    pub backing: BackingPolicy,
    /// Lock backing files shared (as QEMU does).
    pub lock_backing: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            writable: false,
            cache_bytes: DEFAULT_CACHE_BYTES,
            backing: BackingPolicy::default(),
            lock_backing: true,
        }
    }
}

/// The qcow2 metadata of one image of the chain.
#[derive(Debug)]
struct Meta {
    h: Header,
    l1: Vec<u64>,
    cache: L2Cache,
}

/// One image of the chain: the top (qcow2) or a backing file (qcow2 or raw).
#[derive(Debug)]
struct Layer {
    path: PathBuf,
    file: File,
    /// Virtual size.
    size: u64,
    /// None for a raw backing file.
    meta: Option<Meta>,
    /// A backing file's shared lock (the top image's is its opener's).
    _lock: Option<ImageLock>,
}

/// Summary for `status` and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// Format version.
    pub version: u32,
    /// Cluster size.
    pub cluster_size: u64,
    /// Virtual size.
    pub size: u64,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// Extended L2 entries.
    pub extended_l2: bool,
    /// Compression type name.
    pub compression: &'static str,
    /// The backing chain below the top image (paths, top first).
    pub backing_chain: Vec<PathBuf>,
    /// L2 tables the caches may hold in total.
    pub cache_tables: usize,
    /// The backing file name as the header stores it (relative to the image if relative).
    pub backing_file: Option<String>,
    /// The backing file's format as the header records it.
    pub backing_format: Option<String>,
    /// The dirty bit (refcounts may be stale: lazy refcounts and no clean close).
    pub dirty: bool,
    /// The corrupt bit.
    pub corrupt: bool,
    /// The lazy refcounts compatible feature.
    pub lazy_refcounts: bool,
}

/// What [`Image::check`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Clusters whose refcount is higher than their references (repairable leaks).
    pub leaks: u64,
    /// Clusters whose refcount is lower than their references (corruption).
    pub errors: u64,
    /// The first errors, as sentences.
    pub messages: Vec<String>,
    /// Guest clusters the image itself maps (data, compressed, or zeroes with a host cluster),
    /// as `qemu-img check` counts them; clusters left to the backing file are not counted.
    pub allocated_clusters: u64,
    /// Guest clusters of the virtual disk.
    pub total_clusters: u64,
    /// Of the allocated clusters, those not right after the previous one in the file, and the
    /// compressed ones (as `qemu-img check` counts them).
    pub fragmented_clusters: u64,
    /// Of the allocated clusters, the compressed ones.
    pub compressed_clusters: u64,
    /// The end of the last host cluster in use.
    pub image_end_offset: u64,
}

/// Most clusters one prepared write covers (2 MiB of 64 KiB clusters).
const MAX_PREPARED_CLUSTERS: u64 = 32;

/// An allocating write between [`Image::prepare_write`] and [`Image::commit_write`] (or
/// [`Image::abandon_write`]): the host clusters its data goes to.
#[derive(Debug)]
pub struct PreparedWrite {
    guest: u64,
    clusters: Vec<PreparedCluster>,
}

#[derive(Debug)]
struct PreparedCluster {
    /// The L2 table and entry that will map it.
    l2: u64,
    idx: usize,
    /// The new host cluster.
    host: u64,
    /// What the entry mapped before (freed at the next flush once replaced).
    old: Ext,
}

impl PreparedWrite {
    /// Where the data goes: (host offset, length) runs in guest order, consecutive clusters
    /// merged.
    pub fn extents(&self, cluster_size: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for c in &self.clusters {
            match out.last_mut() {
                Some((h, l)) if *h + *l == c.host => *l += cluster_size,
                _ => out.push((c.host, cluster_size)),
            }
        }
        out
    }

    /// The guest range it covers.
    pub fn range(&self, cluster_size: u64) -> (u64, u64) {
        (self.guest, self.clusters.len() as u64 * cluster_size)
    }
}

/// Guest clusters as [`CheckReport`] counts them.
#[derive(Debug, Clone, Copy, Default)]
struct Allocation {
    allocated: u64,
    fragmented: u64,
    compressed: u64,
}

/// An open qcow2 image and its backing chain.
#[derive(Debug)]
pub struct Image {
    layers: Vec<Layer>,
    writable: bool,
    reftable: Vec<u64>,
    reftable_offset: u64,
    /// Past every cluster in use or reserved: new clusters come from here.
    end: u64,
    /// Next reserved cluster to hand out, and the end of the reservation.
    next: u64,
    reserved_end: u64,
    /// The size of the next reservation, and when the current one was made.
    reserve_bytes: u64,
    reserved_at: Option<std::time::Instant>,
    /// Host clusters whose refcount drops at the next flush.
    pending_free: Vec<u64>,
    /// The last decompressed cluster: (layer, host offset, data).
    decompressed: Option<(usize, u64, Vec<u8>)>,
    /// Tests: where the slow paths (allocation, backing reads, flush) wait.
    #[cfg(test)]
    gate: Option<std::sync::Arc<tests::Gate>>,
}

fn pread_full(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

fn decode_table(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}

fn decompress(kind: Compression, input: &[u8], out: &mut [u8]) -> std::result::Result<(), String> {
    match kind {
        Compression::Deflate => {
            match miniz_oxide::inflate::decompress_slice_iter_to_slice(
                out,
                std::iter::once(input),
                false,
                true,
            ) {
                Ok(n) if n == out.len() => Ok(()),
                Ok(n) => Err(format!(
                    "deflate data ends after {n} of {} bytes",
                    out.len()
                )),
                // The output is full: QEMU accepts that too.
                Err(miniz_oxide::inflate::TINFLStatus::HasMoreOutput) => Ok(()),
                Err(e) => Err(format!("invalid deflate data ({e:?})")),
            }
        }
        Compression::Zstd => {
            use std::io::Read;
            let mut src = input;
            // QEMU compresses each cluster on its own: a window larger than the cluster is
            // hostile, and would make the decoder allocate it.
            let window = (2 * out.len() as u64).max(1 << 20);
            let mut d =
                ruzstd::decoding::StreamingDecoder::new_with_max_window_size(&mut src, window)
                    .map_err(|e| format!("invalid zstd frame: {e}"))?;
            d.read_exact(out)
                .map_err(|e| format!("invalid zstd data: {e}"))
        }
    }
}

impl Image {
    /// Opens the qcow2 image at `path` through `file` (read-write if `opts.writable`), and its
    /// backing chain as the policy allows.
    pub fn open(path: &Path, file: File, opts: &OpenOptions) -> Result<Image> {
        let top = Self::open_layer(path, file, true, None)?;
        let Some(meta) = top.meta.as_ref() else {
            unreachable!("open_layer(qcow2 = true) returns qcow2 metadata")
        };
        let h = meta.h.clone();
        if opts.writable {
            let refuse = |why: &str| Qcow2Error::Unsupported {
                path: path.to_owned(),
                reason: format!("cannot open for writing: {why}"),
            };
            if h.incompatible & header::INCOMPAT_CORRUPT != 0 {
                return Err(refuse(
                    "the image is marked corrupt; repair it with `qemu-img check -r all` or open it read-only",
                ));
            }
            if h.nb_snapshots > 0 {
                return Err(refuse(
                    "the image has internal snapshots (writing them is not supported); open it read-only",
                ));
            }
        }
        let mut layers = vec![top];
        let mut chain_h = h.clone();
        let mut seen = vec![std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned())];
        let top_dir = seen[0].parent().map(Path::to_path_buf).unwrap_or_default();
        while let Some(name) = chain_h.backing_file.clone() {
            let parent = layers[layers.len() - 1].path.clone();
            let refuse = |reason: String| Qcow2Error::Backing {
                path: parent.clone(),
                reason,
            };
            if layers.len() > opts.backing.max_depth {
                return Err(refuse(format!(
                    "the chain is deeper than {} images (--backing-depth)",
                    opts.backing.max_depth
                )));
            }
            let fmt = match chain_h.backing_format.as_deref() {
                Some("qcow2") => true,
                Some("raw") => false,
                Some(f) => {
                    return Err(refuse(format!(
                        "backing format `{f}` of {name} is not supported (raw and qcow2 are)"
                    )));
                }
                None if opts.backing.raw_without_format => false,
                None => {
                    return Err(refuse(format!(
                        "the header names backing file {name} without its format, and formats are never probed; \
                         set it with `qemu-img rebase -u -F raw|qcow2 -b {name} IMAGE`, or pass --backing-policy relaxed to open it as raw"
                    )));
                }
            };
            let p = Path::new(&name);
            let joined = if p.is_absolute() {
                p.to_owned()
            } else {
                parent.parent().unwrap_or(Path::new(".")).join(p)
            };
            let canon = std::fs::canonicalize(&joined).map_err(|e| {
                refuse(format!(
                    "cannot open backing file {}: {e}",
                    joined.display()
                ))
            })?;
            if seen.contains(&canon) {
                return Err(refuse(format!(
                    "the backing chain loops back to {}",
                    canon.display()
                )));
            }
            if !opts.backing.any_dir {
                let ok = canon.starts_with(&top_dir)
                    || opts
                        .backing
                        .allowed_dirs
                        .iter()
                        .any(|d| std::fs::canonicalize(d).is_ok_and(|d| canon.starts_with(d)));
                if !ok {
                    return Err(refuse(format!(
                        "{} is outside the allowed directories ({} and any --backing-dir); \
                         add its directory with --backing-dir or pass --backing-policy relaxed",
                        canon.display(),
                        top_dir.display()
                    )));
                }
            }
            let f = File::open(&canon).map_err(|e| {
                refuse(format!("cannot open backing file {}: {e}", canon.display()))
            })?;
            let mode = if opts.lock_backing {
                LockMode::Shared
            } else {
                LockMode::None
            };
            let lock = ImageLock::acquire(&f, &canon, mode, std::time::Duration::from_secs(3))
                .map_err(|e| refuse(e.to_string()))?;
            let layer = Self::open_layer(&canon, f, fmt, Some(lock))?;
            seen.push(canon);
            chain_h = match &layer.meta {
                Some(m) => m.h.clone(),
                None => Header {
                    backing_file: None,
                    ..chain_h
                },
            };
            layers.push(layer);
        }
        // Share the cache budget among the qcow2 images of the chain.
        let n = layers.iter().filter(|l| l.meta.is_some()).count().max(1) as u64;
        for l in &mut layers {
            if let Some(m) = &mut l.meta {
                m.cache = L2Cache::new(opts.cache_bytes / n, m.h.cluster_size());
            }
        }
        let cs = h.cluster_size();
        let rt_bytes = u64::from(h.refcount_table_clusters) * cs;
        let mut rt = vec![0u8; rt_bytes as usize];
        let top_file = &layers[0].file;
        pread_full(top_file, &mut rt, h.refcount_table_offset).map_err(|e| Qcow2Error::Io {
            path: path.to_owned(),
            op: "read the refcount table",
            offset: h.refcount_table_offset,
            source: e,
        })?;
        let file_len = top_file
            .metadata()
            .map_err(|e| Qcow2Error::Io {
                path: path.to_owned(),
                op: "read the size",
                offset: 0,
                source: e,
            })?
            .len();
        let mut img = Image {
            layers,
            writable: opts.writable,
            reftable: decode_table(&rt),
            reftable_offset: h.refcount_table_offset,
            end: file_len.div_ceil(cs) * cs,
            next: 0,
            reserved_end: 0,
            reserve_bytes: RESERVE_BYTES,
            reserved_at: None,
            pending_free: Vec::new(),
            decompressed: None,
            #[cfg(test)]
            gate: None,
        };
        if opts.writable {
            if h.incompatible & header::INCOMPAT_DIRTY != 0 {
                // Lazy refcounts were not written back before the image was last closed: rebuild
                // them from the tables, as QEMU does when it opens a dirty image for writing.
                log::warn!(
                    "{}: the dirty bit is set; rebuilding the refcounts",
                    path.display()
                );
                img.repair_refcounts()?;
            }
            // Clusters with a refcount may lie past the end of the file (reserved, or written
            // but not yet durable before a crash): never hand those out again.
            let last = img.last_referenced_cluster()?;
            img.end = img.end.max(last);
            if h.version >= 3 && h.autoclear != 0 {
                // We maintain none of the auto-clear features (bitmaps...): clear them, as the
                // specification requires of a writer that does not know them.
                img.write_at(&0u64.to_be_bytes(), 88, "clear the autoclear features")?;
                img.sync()?;
                if let Some(m) = &mut img.layers[0].meta {
                    m.h.autoclear = 0;
                }
            }
        }
        Ok(img)
    }

    fn open_layer(path: &Path, file: File, qcow2: bool, lock: Option<ImageLock>) -> Result<Layer> {
        let io = |op, offset, source| Qcow2Error::Io {
            path: path.to_owned(),
            op,
            offset,
            source,
        };
        let len = file
            .metadata()
            .map_err(|e| io("read the size", 0, e))?
            .len();
        if !qcow2 {
            return Ok(Layer {
                path: path.to_owned(),
                file,
                size: len,
                meta: None,
                _lock: lock,
            });
        }
        let mut first = vec![0u8; len.min(4096) as usize];
        let n = pread_full(&file, &mut first, 0).map_err(|e| io("read the header", 0, e))?;
        first.truncate(n);
        if first.len() >= 24 {
            let cb = u32::from_be_bytes([first[20], first[21], first[22], first[23]])
                .clamp(header::MIN_CLUSTER_BITS, header::MAX_CLUSTER_BITS);
            let want = len.min(1 << cb) as usize;
            if want > first.len() {
                first.resize(want, 0);
                let n =
                    pread_full(&file, &mut first, 0).map_err(|e| io("read the header", 0, e))?;
                first.truncate(n);
            }
        }
        let h = Header::parse(&first, len).map_err(|source| Qcow2Error::Header {
            path: path.to_owned(),
            source,
        })?;
        let mut l1 = vec![0u8; h.l1_size as usize * 8];
        pread_full(&file, &mut l1, h.l1_table_offset)
            .map_err(|e| io("read the L1 table", h.l1_table_offset, e))?;
        let cs = h.cluster_size();
        Ok(Layer {
            path: path.to_owned(),
            file,
            size: h.size,
            meta: Some(Meta {
                l1: decode_table(&l1),
                cache: L2Cache::new(0, cs),
                h,
            }),
            _lock: lock,
        })
    }

    fn top(&self) -> &Meta {
        match &self.layers[0].meta {
            Some(m) => m,
            None => unreachable!("the top layer is qcow2"),
        }
    }

    fn top_mut(&mut self) -> &mut Meta {
        match &mut self.layers[0].meta {
            Some(m) => m,
            None => unreachable!("the top layer is qcow2"),
        }
    }

    fn path(&self) -> &Path {
        &self.layers[0].path
    }

    fn corrupt(&self, li: usize, detail: String) -> Qcow2Error {
        Qcow2Error::Corrupt {
            path: self.layers[li].path.clone(),
            detail,
        }
    }

    /// Whether the image takes writes (opened writable, and not closed since).
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.layers[0].size
    }

    /// Cluster size of the top image.
    pub fn cluster_size(&self) -> u64 {
        self.top().h.cluster_size()
    }

    /// A summary.
    pub fn info(&self) -> Info {
        let h = &self.top().h;
        Info {
            version: h.version,
            cluster_size: h.cluster_size(),
            size: self.size(),
            refcount_bits: 1 << h.refcount_order,
            extended_l2: h.extended_l2(),
            compression: match h.compression {
                Compression::Deflate => "deflate",
                Compression::Zstd => "zstd",
            },
            backing_chain: self.layers[1..].iter().map(|l| l.path.clone()).collect(),
            backing_file: h.backing_file.clone(),
            backing_format: h.backing_format.clone(),
            dirty: h.incompatible & header::INCOMPAT_DIRTY != 0,
            corrupt: h.incompatible & header::INCOMPAT_CORRUPT != 0,
            lazy_refcounts: h.compatible & header::COMPAT_LAZY_REFCOUNTS != 0,
            cache_tables: self
                .layers
                .iter()
                .filter_map(|l| l.meta.as_ref().map(|m| m.cache.capacity()))
                .sum(),
        }
    }

    /// L2 tables cached now, over the whole chain.
    pub fn cached_tables(&self) -> usize {
        self.layers
            .iter()
            .filter_map(|l| l.meta.as_ref().map(|m| m.cache.len()))
            .sum()
    }

    // ---- the data path's copy of the mapping ----

    /// A [`DataPath`] for this image, empty (every lookup misses until [`Image::publish`]).
    pub fn data_path(&self) -> DataPath {
        let m = self.top();
        DataPath::new(shared::Inner {
            size: self.size(),
            cluster_bits: m.h.cluster_bits,
            l2_bits: m.h.l2_entries().trailing_zeros(),
            version: m.h.version,
            extended_l2: m.h.extended_l2(),
            l1: m.l1.clone(),
            tables: std::collections::HashMap::new(),
            max_tables: m.cache.capacity(),
        })
    }

    /// Makes `dp` this image's empty copy (as [`Image::data_path`]), forgetting what it held
    /// of another image (the same file before it was opened again).
    pub fn reset_data_path(&self, dp: &DataPath) {
        dp.replace(self.data_path());
    }

    /// Copies this image's mapping of `[guest, guest + len)` (the L1 entries and the L2 tables
    /// the cache holds; tables not cached are dropped from the copy) and its size into `dp`.
    /// Call after every change to the range, before the request that made it completes.
    pub fn publish(&self, dp: &DataPath, guest: u64, len: u64) {
        let m = self.top();
        let cb = m.h.cluster_bits;
        let l2_bits = m.h.l2_entries().trailing_zeros();
        let size = self.size();
        dp.with(|d| {
            d.size = size;
            if d.l1.len() != m.l1.len() {
                // Resized: the L1 table grew (its entries did not change).
                d.l1.clone_from(&m.l1);
            }
            if m.l1.is_empty() {
                return;
            }
            let last_l1 = m.l1.len() as u64 - 1;
            let first = (guest >> (cb + l2_bits)).min(last_l1);
            let last = ((guest + len.max(1) - 1) >> (cb + l2_bits)).min(last_l1);
            let step = if m.h.extended_l2() { 2 } else { 1 };
            for l1i in first..=last {
                let e = m.l1[l1i as usize];
                d.l1[l1i as usize] = e;
                let off = e & OFFSET_MASK;
                let Some(t) = (off != 0).then(|| m.cache.peek(off)).flatten() else {
                    d.tables.remove(&l1i);
                    continue;
                };
                match d.tables.get_mut(&l1i) {
                    Some((o, copy)) if *o == off && copy.len() == t.len() => {
                        // Only the entries of the range changed.
                        let per = 1u64 << (cb + l2_bits);
                        let lo = guest.max(l1i * per);
                        let hi = (guest + len).min((l1i + 1) * per);
                        let i0 = (((lo >> cb) & ((1 << l2_bits) - 1)) as usize) * step;
                        let i1 = if hi <= lo {
                            i0 + step
                        } else {
                            ((((hi - 1) >> cb) & ((1 << l2_bits) - 1)) as usize + 1) * step
                        };
                        copy[i0..i1].copy_from_slice(&t[i0..i1]);
                    }
                    _ => {
                        if d.tables.len() >= d.max_tables
                            && let Some(&victim) = d.tables.keys().next()
                        {
                            d.tables.remove(&victim);
                        }
                        d.tables.insert(l1i, (off, t.to_vec()));
                    }
                }
            }
        });
    }

    // ---- mapping ----

    /// The L2 table offset for `guest` in layer `li` and the entry index, or None if the L1
    /// entry is empty.
    fn l2_slot(&self, li: usize, guest: u64) -> Result<Option<(u64, usize)>> {
        let Some(m) = &self.layers[li].meta else {
            unreachable!("l2_slot on a raw layer")
        };
        let cb = m.h.cluster_bits;
        let l2_bits = m.h.l2_entries().trailing_zeros();
        let l1i = guest >> (cb + l2_bits);
        let Some(&e) = m.l1.get(l1i as usize) else {
            return Err(self.corrupt(
                li,
                format!(
                    "guest offset {guest} is beyond the L1 table ({} entries)",
                    m.l1.len()
                ),
            ));
        };
        let off = e & OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if !off.is_multiple_of(m.h.cluster_size()) {
            return Err(self.corrupt(
                li,
                format!("L1 entry {l1i} points at unaligned offset {off:#x}"),
            ));
        }
        let idx = ((guest >> cb) & (m.h.l2_entries() - 1)) as usize;
        Ok(Some((off, idx)))
    }

    /// The L2 table at `off` of layer `li`, through the cache.
    fn table(&mut self, li: usize, off: u64) -> Result<&mut Vec<u64>> {
        let layer = &mut self.layers[li];
        let Some(m) = &mut layer.meta else {
            unreachable!("table on a raw layer")
        };
        let cs = m.h.cluster_size();
        let (file, path) = (&layer.file, &layer.path);
        m.cache.get(off, || {
            let mut b = vec![0u8; cs as usize];
            let n = pread_full(file, &mut b, off).map_err(|e| Qcow2Error::Io {
                path: path.clone(),
                op: "read an L2 table",
                offset: off,
                source: e,
            })?;
            if n < b.len() {
                return Err(Qcow2Error::Corrupt {
                    path: path.clone(),
                    detail: format!("the L2 table at {off:#x} runs past the end of the file"),
                });
            }
            Ok(decode_table(&b))
        })
    }

    /// The mapping of guest byte `guest` in layer `li` (qcow2) and how far it extends within
    /// its cluster.
    fn lookup(&mut self, li: usize, guest: u64) -> Result<(Ext, u64)> {
        let (cb, version, ext_l2, cs) = match &self.layers[li].meta {
            Some(m) => (
                m.h.cluster_bits,
                m.h.version,
                m.h.extended_l2(),
                m.h.cluster_size(),
            ),
            None => unreachable!("lookup on a raw layer"),
        };
        let in_cluster = guest & (cs - 1);
        let Some((off, idx)) = self.l2_slot(li, guest)? else {
            return Ok((Ext::Unallocated, cs - in_cluster));
        };
        let t = self.table(li, off)?;
        let (entry, bitmap) = if ext_l2 {
            (t[2 * idx], Some(t[2 * idx + 1]))
        } else {
            (t[idx], None)
        };
        decode_l2(entry, bitmap, cb, version, in_cluster).map_err(|d| {
            self.corrupt(
                li,
                format!("L2 entry {idx} of the table at {off:#x} (guest offset {guest}): {d}"),
            )
        })
    }

    /// If the guest range `[guest, guest + len)` is data in the top image at consecutive host
    /// offsets (and, for a write, referenced once so it can be written in place), its host
    /// offset: the request can go straight to the engine.
    pub fn map_direct(&mut self, guest: u64, len: u64, write: bool) -> Result<Option<u64>> {
        if len == 0 || guest.checked_add(len).is_none_or(|e| e > self.size()) {
            return Ok(None);
        }
        let mut pos = 0;
        let mut start = None;
        while pos < len {
            let (ext, run) = self.lookup(0, guest + pos)?;
            let Ext::Data { host, copied } = ext else {
                return Ok(None);
            };
            if write && !copied {
                return Ok(None);
            }
            match start {
                None => start = Some(host),
                Some(s) if s + pos == host => {}
                Some(_) => return Ok(None),
            }
            pos += run;
        }
        Ok(start)
    }

    /// Like [`Image::map_direct`], for ranges that are data in the top image but not at
    /// consecutive host offsets: fills `extents` with (host offset, length) pieces in guest
    /// order and returns true if the whole range is data (referenced once, for a write) in at
    /// most `max` pieces. blkback's worker queues them one after the other on the engine.
    pub fn map_extents(
        &mut self,
        guest: u64,
        len: u64,
        write: bool,
        max: usize,
        extents: &mut Vec<(u64, u64)>,
    ) -> Result<bool> {
        extents.clear();
        if len == 0 || guest.checked_add(len).is_none_or(|e| e > self.size()) {
            return Ok(false);
        }
        let mut pos = 0;
        while pos < len {
            let (ext, run) = self.lookup(0, guest + pos)?;
            let Ext::Data { host, copied } = ext else {
                return Ok(false);
            };
            if write && !copied {
                return Ok(false);
            }
            let take = run.min(len - pos);
            if let Some((h, l)) = extents.last_mut()
                && *h + *l == host
            {
                *l += take;
            } else if extents.len() == max {
                return Ok(false);
            } else {
                extents.push((host, take));
            }
            pos += take;
        }
        Ok(true)
    }

    // ---- reads ----

    /// Reads guest bytes at `guest` into `buf` (through the whole chain).
    pub fn read(&mut self, guest: u64, buf: &mut [u8]) -> Result<()> {
        self.read_layer(0, guest, buf)
    }

    fn read_layer(&mut self, li: usize, guest: u64, buf: &mut [u8]) -> Result<()> {
        let size = self.layers[li].size;
        if guest >= size {
            buf.fill(0);
            return Ok(());
        }
        let n = (buf.len() as u64).min(size - guest) as usize;
        buf[n..].fill(0);
        if self.layers[li].meta.is_none() {
            return self.pread_layer(li, &mut buf[..n], guest);
        }
        let mut pos = 0usize;
        while pos < n {
            let g = guest + pos as u64;
            let (ext, run) = self.lookup(li, g)?;
            let take = (run as usize).min(n - pos);
            let chunk = &mut buf[pos..pos + take];
            match ext {
                Ext::Data { host, .. } => self.pread_layer(li, chunk, host)?,
                Ext::Zero { .. } => chunk.fill(0),
                Ext::Unallocated => {
                    if li + 1 < self.layers.len() {
                        self.test_gate();
                        self.read_layer(li + 1, g, chunk)?;
                    } else {
                        chunk.fill(0);
                    }
                }
                Ext::Compressed { host, sectors } => {
                    let cs = match &self.layers[li].meta {
                        Some(m) => m.h.cluster_size(),
                        None => unreachable!(),
                    };
                    let data = self.decompressed_cluster(li, host, sectors)?;
                    let at = (g & (cs - 1)) as usize;
                    chunk.copy_from_slice(&data[at..at + take]);
                }
            }
            pos += take;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at host offset `off` of layer `li`; past the end of the file
    /// reads zeroes (as QEMU does).
    fn pread_layer(&self, li: usize, buf: &mut [u8], off: u64) -> Result<()> {
        let n = pread_full(&self.layers[li].file, buf, off).map_err(|e| Qcow2Error::Io {
            path: self.layers[li].path.clone(),
            op: "read",
            offset: off,
            source: e,
        })?;
        buf[n..].fill(0);
        Ok(())
    }

    fn decompressed_cluster(&mut self, li: usize, host: u64, sectors: u64) -> Result<&[u8]> {
        let hit = matches!(&self.decompressed, Some((l, h, _)) if *l == li && *h == host);
        if !hit {
            let (cs, kind) = match &self.layers[li].meta {
                Some(m) => (m.h.cluster_size(), m.h.compression),
                None => unreachable!(),
            };
            // QEMU: the data runs from `host` to the end of its last sector.
            let csize = (sectors * 512).saturating_sub(host & 511).min(2 * cs);
            let mut input = vec![0u8; csize as usize];
            let n = pread_full(&self.layers[li].file, &mut input, host).map_err(|e| {
                Qcow2Error::Io {
                    path: self.layers[li].path.clone(),
                    op: "read a compressed cluster",
                    offset: host,
                    source: e,
                }
            })?;
            input.truncate(n);
            let mut out = match self.decompressed.take() {
                Some((_, _, mut v)) => {
                    v.resize(cs as usize, 0);
                    v
                }
                None => vec![0u8; cs as usize],
            };
            decompress(kind, &input, &mut out)
                .map_err(|d| self.corrupt(li, format!("compressed cluster at {host:#x}: {d}")))?;
            self.decompressed = Some((li, host, out));
        }
        match &self.decompressed {
            Some((_, _, d)) => Ok(d),
            None => unreachable!("set above"),
        }
    }

    /// Tests: makes the slow paths (allocation, backing reads, flush) wait at `gate` (`None`:
    /// no gate).
    #[cfg(test)]
    pub(crate) fn set_test_gate(&mut self, gate: Option<std::sync::Arc<tests::Gate>>) {
        self.gate = gate;
    }

    /// Waits at the test gate, if one is set (tests only; nothing otherwise).
    fn test_gate(&self) {
        #[cfg(test)]
        if let Some(g) = &self.gate {
            g.pass();
        }
    }

    // ---- low-level writes ----

    fn refuse(&self, reason: impl Into<String>) -> Qcow2Error {
        Qcow2Error::Refused {
            path: self.path().to_owned(),
            reason: reason.into(),
        }
    }

    fn write_at(&self, data: &[u8], off: u64, op: &'static str) -> Result<()> {
        self.layers[0]
            .file
            .write_all_at(data, off)
            .map_err(|e| Qcow2Error::Io {
                path: self.path().to_owned(),
                op,
                offset: off,
                source: e,
            })
    }

    fn sync(&self) -> Result<()> {
        self.layers[0].file.sync_data().map_err(|e| Qcow2Error::Io {
            path: self.path().to_owned(),
            op: "flush (fdatasync)",
            offset: 0,
            source: e,
        })
    }

    fn check_writable(&self, guest: u64, len: u64) -> Result<()> {
        if !self.writable {
            return Err(self.refuse("the image is open read-only"));
        }
        if guest.checked_add(len).is_none_or(|e| e > self.size()) {
            return Err(self.refuse(format!(
                "{len} bytes at {guest} reach past the virtual size {}",
                self.size()
            )));
        }
        Ok(())
    }

    // ---- refcounts ----

    fn refcount_geometry(&self) -> (u64, u64, u64) {
        let h = &self.top().h;
        let bits = 1u64 << h.refcount_order;
        let per_block = h.cluster_size() * 8 / bits;
        (h.cluster_size(), bits, per_block)
    }

    /// The refcount block for refcount table index `rti`, allocating it if needed.
    fn ensure_refblock(&mut self, rti: u64) -> Result<u64> {
        let (cs, _, per_block) = self.refcount_geometry();
        if rti as usize >= self.reftable.len() {
            self.grow_reftable(rti + 1)?;
        }
        let e = self.reftable[rti as usize] & OFFSET_MASK;
        if e != 0 {
            if !e.is_multiple_of(cs) {
                return Err(self.corrupt(
                    0,
                    format!("refcount table entry {rti} points at unaligned offset {e:#x}"),
                ));
            }
            return Ok(e);
        }
        let rb = self.end;
        self.end += cs;
        let own = (rb / cs) / per_block;
        let mut block = vec![0u8; cs as usize];
        let written = if own == rti {
            // The new block covers itself.
            let idx = (rb / cs) % per_block;
            Self::set_entry(&mut block, idx, self.top().h.refcount_order, 1);
            Ok(())
        } else {
            self.set_refcounts(rb, 1, 1)
        }
        .and_then(|()| self.write_at(&block, rb, "write a refcount block"));
        if let Err(e) = written {
            // Nothing points at the block yet.
            self.give_back(rb, 1);
            return Err(e);
        }
        if let Err(e) = self.write_at(
            &rb.to_be_bytes(),
            self.reftable_offset + rti * 8,
            "update the refcount table",
        ) {
            if nothing_written(&e) {
                self.give_back(rb, 1);
            }
            return Err(e);
        }
        self.reftable[rti as usize] = rb;
        Ok(rb)
    }

    fn set_entry(block: &mut [u8], idx: u64, order: u32, value: u64) {
        let bits = 1u64 << order;
        if bits < 8 {
            let bit = idx * bits;
            let byte = &mut block[(bit / 8) as usize];
            let shift = bit % 8;
            let mask = ((1u16 << bits) - 1) as u8;
            *byte = (*byte & !(mask << shift)) | (((value as u8) & mask) << shift);
        } else {
            let w = (bits / 8) as usize;
            let at = idx as usize * w;
            block[at..at + w].copy_from_slice(&value.to_be_bytes()[8 - w..]);
        }
    }

    fn get_entry(block: &[u8], idx: u64, order: u32) -> u64 {
        let bits = 1u64 << order;
        if bits < 8 {
            let bit = idx * bits;
            let mask = ((1u16 << bits) - 1) as u8;
            u64::from((block[(bit / 8) as usize] >> (bit % 8)) & mask)
        } else {
            let w = (bits / 8) as usize;
            let at = idx as usize * w;
            let mut x = [0u8; 8];
            x[8 - w..].copy_from_slice(&block[at..at + w]);
            u64::from_be_bytes(x)
        }
    }

    /// Reads, changes and writes back the refcounts of `n` clusters from host offset `start`
    /// (`f` maps old to new), one refcount block at a time.
    fn update_refcounts(
        &mut self,
        start: u64,
        n: u64,
        f: &mut dyn FnMut(u64) -> std::result::Result<u64, String>,
    ) -> Result<()> {
        self.update_refcounts_in(start, n, true, f)
    }

    /// [`Image::update_refcounts`]; with `allocate` false, clusters that have no refcount
    /// block (refcount 0) are left alone instead of getting one.
    fn update_refcounts_in(
        &mut self,
        start: u64,
        n: u64,
        allocate: bool,
        f: &mut dyn FnMut(u64) -> std::result::Result<u64, String>,
    ) -> Result<()> {
        let (cs, bits, per_block) = self.refcount_geometry();
        let order = self.top().h.refcount_order;
        let mut ci = start / cs;
        let last = ci + n;
        while ci < last {
            let rti = ci / per_block;
            let first = ci % per_block;
            let count = (per_block - first).min(last - ci);
            let rb = if allocate {
                self.ensure_refblock(rti)?
            } else {
                match self.reftable.get(rti as usize) {
                    Some(&e) if e & OFFSET_MASK != 0 => self.ensure_refblock(rti)?,
                    _ => {
                        ci += count;
                        continue;
                    }
                }
            };
            // The byte span holding entries [first, first + count).
            let b0 = first * bits / 8;
            let b1 = ((first + count) * bits).div_ceil(8);
            let mut span = vec![0u8; (b1 - b0) as usize];
            self.pread_layer(0, &mut span, rb + b0)?;
            // Entry indexes relative to the span: the span starts on a byte boundary, which is
            // an entry boundary for sub-byte widths only at multiples of 8 / bits.
            let base = b0 * 8 / bits;
            for i in first..first + count {
                let old = Self::get_entry(&span, i - base, order);
                let new = f(old).map_err(|d| {
                    self.corrupt(0, format!("cluster at {:#x}: {d}", (ci + i - first) * cs))
                })?;
                if bits < 64 && new >> bits != 0 {
                    return Err(
                        self.corrupt(0, format!("refcount {new} does not fit in {bits} bits"))
                    );
                }
                Self::set_entry(&mut span, i - base, order, new);
            }
            self.write_at(&span, rb + b0, "update refcounts")?;
            ci += count;
        }
        Ok(())
    }

    fn set_refcounts(&mut self, start: u64, n: u64, value: u64) -> Result<()> {
        self.update_refcounts(start, n, &mut |_| Ok(value))
    }

    /// Host offset just past the last cluster with a nonzero refcount.
    fn last_referenced_cluster(&mut self) -> Result<u64> {
        let (cs, _, per_block) = self.refcount_geometry();
        let order = self.top().h.refcount_order;
        for rti in (0..self.reftable.len()).rev() {
            let rb = self.reftable[rti] & OFFSET_MASK;
            if rb == 0 {
                continue;
            }
            let mut block = vec![0u8; cs as usize];
            self.pread_layer(0, &mut block, rb)?;
            for i in (0..per_block).rev() {
                if Self::get_entry(&block, i, order) != 0 {
                    return Ok((rti as u64 * per_block + i + 1) * cs);
                }
            }
        }
        Ok(0)
    }

    /// How many times the metadata references each host cluster of the top image (header, L1,
    /// refcount table and blocks, L2 tables, data and compressed clusters), up to the end of
    /// the file.
    fn count_references(&mut self) -> Result<(Vec<u64>, Allocation)> {
        let cs = self.cluster_size();
        let file_len = self.layers[0]
            .file
            .metadata()
            .map_err(|e| Qcow2Error::Io {
                path: self.path().to_owned(),
                op: "read the size",
                offset: 0,
                source: e,
            })?
            .len();
        let clusters = file_len.div_ceil(cs);
        let mut want = vec![0u64; clusters as usize];
        let mut refer = |this: &Image, start: u64, len: u64, what: &str| -> Result<()> {
            let first = start / cs;
            let last = (start + len.max(1) - 1) / cs;
            if last >= clusters {
                return Err(this.corrupt(
                    0,
                    format!("{what} at {start:#x} lies past the end of the file"),
                ));
            }
            for c in first..=last {
                want[c as usize] += 1;
            }
            Ok(())
        };
        let h = self.top().h.clone();
        refer(self, 0, cs, "the header")?;
        refer(
            self,
            h.l1_table_offset,
            u64::from(h.l1_size) * 8,
            "the L1 table",
        )?;
        refer(
            self,
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * cs,
            "the refcount table",
        )?;
        for rb in self.reftable.clone() {
            let rb = rb & OFFSET_MASK;
            if rb != 0 {
                refer(self, rb, cs, "a refcount block")?;
            }
        }
        let l1 = self.top().l1.clone();
        let mut alloc = Allocation::default();
        for e in &l1 {
            let l2 = e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            // Where the next data cluster would be if this table's clusters were contiguous in
            // the file (qemu-img check's fragmentation, judged within each L2 table).
            let mut next_contiguous = 0u64;
            refer(self, l2, cs, "an L2 table")?;
            let table = self.table(0, l2)?.clone();
            let step = if h.extended_l2() { 2 } else { 1 };
            for j in 0..h.l2_entries() as usize {
                let e = table[j * step];
                if e & l2::COMPRESSED != 0 {
                    if let Ok((Ext::Compressed { host, sectors }, _)) =
                        decode_l2(e, None, h.cluster_bits, h.version, 0)
                    {
                        refer(self, host & !511, sectors * 512, "a compressed cluster")?;
                    }
                    // Compressed clusters count as fragmented (qemu: they are by nature).
                    alloc.allocated += 1;
                    alloc.compressed += 1;
                    alloc.fragmented += 1;
                } else if e & OFFSET_MASK != 0 {
                    let host = e & OFFSET_MASK & !(cs - 1);
                    refer(self, host, cs, "a data cluster")?;
                    alloc.allocated += 1;
                    if next_contiguous != 0 && host != next_contiguous {
                        alloc.fragmented += 1;
                    }
                    next_contiguous = host + cs;
                }
            }
        }
        Ok((want, alloc))
    }

    /// The stored refcount of every host cluster below `clusters`.
    fn stored_refcounts(&mut self, clusters: u64) -> Result<Vec<u64>> {
        let (cs, _, per_block) = self.refcount_geometry();
        let order = self.top().h.refcount_order;
        let mut out = vec![0u64; clusters as usize];
        let mut block = vec![0u8; cs as usize];
        for (rti, rb) in self.reftable.clone().into_iter().enumerate() {
            let rb = rb & OFFSET_MASK;
            let first = rti as u64 * per_block;
            if rb == 0 || first >= clusters {
                continue;
            }
            self.pread_layer(0, &mut block, rb)?;
            for i in 0..per_block.min(clusters - first) {
                out[(first + i) as usize] = Self::get_entry(&block, i, order);
            }
        }
        Ok(out)
    }

    /// Compares the stored refcounts with the references, as `qemu-img check` does: clusters
    /// with a refcount higher than their references are leaks, lower are errors.
    pub fn check(&mut self) -> Result<CheckReport> {
        let (want, alloc) = self.count_references()?;
        let have = self.stored_refcounts(want.len() as u64)?;
        let cs = self.cluster_size();
        let mut r = CheckReport {
            allocated_clusters: alloc.allocated,
            fragmented_clusters: alloc.fragmented,
            compressed_clusters: alloc.compressed,
            image_end_offset: want
                .iter()
                .rposition(|&w| w > 0)
                .map_or(0, |c| (c as u64 + 1) * cs),
            ..CheckReport::default()
        };
        for (c, (&w, &h)) in want.iter().zip(&have).enumerate() {
            if h > w {
                r.leaks += 1;
            } else if h < w {
                r.errors += 1;
                if r.messages.len() < 20 {
                    r.messages.push(format!(
                        "cluster {c} (offset {:#x}): refcount {h}, referenced {w} times",
                        c as u64 * cs
                    ));
                }
            }
        }
        r.total_clusters = self.size().div_ceil(cs);
        Ok(r)
    }

    /// Recomputes every refcount from the metadata (header, L1, L2 and refcount tables, data
    /// and compressed clusters), writes them, and clears the dirty bit. For images whose
    /// refcounts were left stale (lazy refcounts and a crash); no snapshots (refused earlier).
    fn repair_refcounts(&mut self) -> Result<()> {
        let cs = self.cluster_size();
        let h = self.top().h.clone();
        let (want, _) = self.count_references()?;
        let clusters = want.len() as u64;
        // New refcount blocks go past everything referenced.
        self.end = self.end.max(clusters * cs);
        let mut c = 0u64;
        while c < clusters {
            let v = want[c as usize];
            let mut n = 1;
            while c + n < clusters && want[(c + n) as usize] == v {
                n += 1;
            }
            self.set_refcounts(c * cs, n, v)?;
            c += n;
        }
        self.sync()?;
        let incompatible = h.incompatible & !header::INCOMPAT_DIRTY;
        self.write_at(&incompatible.to_be_bytes(), 72, "clear the dirty bit")?;
        self.sync()?;
        self.top_mut().h.incompatible = incompatible;
        Ok(())
    }

    /// Moves the refcount table to a larger one at the end of the file. If that fails before
    /// the header names the new table, everything stays as it was (the end does not move).
    fn grow_reftable(&mut self, min_entries: u64) -> Result<()> {
        let cs = self.cluster_size();
        let old_off = self.reftable_offset;
        let old_clusters = (self.reftable.len() as u64 * 8).div_ceil(cs);
        let want = min_entries.max(self.reftable.len() as u64 * 2);
        let clusters = (want * 8).div_ceil(cs);
        if clusters * cs > header::MAX_REFTABLE_BYTES {
            return Err(
                self.refuse("the refcount table would exceed 8 MiB: the image cannot grow further")
            );
        }
        let new_off = self.end;
        self.end += clusters * cs;
        let old_table = self.reftable.clone();
        self.reftable.resize((clusters * cs / 8) as usize, 0);
        self.reftable_offset = new_off;
        if let Err(e) = self.stage_reftable(new_off, clusters) {
            // The header still names the old table, which points at none of the new clusters
            // (the table, and the blocks linked only from it): give them all back.
            self.reftable = old_table;
            self.reftable_offset = old_off;
            let taken = (self.end - new_off) / cs;
            self.give_back(new_off, taken);
            return Err(e);
        }
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&new_off.to_be_bytes());
        hdr[8..].copy_from_slice(&(clusters as u32).to_be_bytes());
        self.write_at(&hdr, 48, "switch the header to the new refcount table")?;
        self.sync()?;
        self.top_mut().h.refcount_table_offset = new_off;
        self.top_mut().h.refcount_table_clusters = clusters as u32;
        for i in 0..old_clusters {
            self.pending_free.push(old_off + i * cs);
        }
        Ok(())
    }

    /// Writes the (grown) refcount table at `off` and the refcounts of its `clusters`, durably.
    fn stage_reftable(&mut self, off: u64, clusters: u64) -> Result<()> {
        let bytes: Vec<u8> = self.reftable.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.write_at(&bytes, off, "write the new refcount table")?;
        // Refcounts for the table itself (entries for new blocks land in the new table).
        self.set_refcounts(off, clusters, 1)?;
        // Rewrite the table: set_refcounts may have added blocks.
        let bytes: Vec<u8> = self.reftable.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.write_at(&bytes, off, "write the new refcount table")?;
        self.sync()
    }

    /// A fresh cluster (refcount already 1 and durable). If the caller fails before anything
    /// points at it, it hands it back with [`Image::unalloc_cluster`].
    fn alloc_cluster(&mut self) -> Result<u64> {
        if self.next >= self.reserved_end {
            let cs = self.cluster_size();
            let now = std::time::Instant::now();
            if let Some(at) = self.reserved_at {
                self.reserve_bytes = if now.duration_since(at) < FAST_RESERVATION {
                    (self.reserve_bytes * 2).min(MAX_RESERVE_BYTES)
                } else {
                    (self.reserve_bytes / 2).max(RESERVE_BYTES)
                };
            }
            let n = (self.reserve_bytes / cs).clamp(1, 4096);
            let start = self.alloc_contiguous(n)?;
            self.next = start;
            self.reserved_end = start + n * cs;
            self.reserved_at = Some(now);
            self.extend_file(start, n * cs);
        }
        let h = self.next;
        self.next += self.cluster_size();
        Ok(h)
    }

    /// Makes the file reach past a new reservation (`len` bytes at `start`), so that data
    /// written there does not extend the file: a write past the end of the file is serialized
    /// by the file system (it changes the size), one at the end of every new cluster would
    /// stop the writes in flight from overlapping. Allocated (`fallocate`) where the file
    /// system can, else a hole (`ftruncate`). Best effort: a failure (no space) only leaves the
    /// writes to extend the file themselves, and fail as they would have.
    fn extend_file(&self, start: u64, len: u64) {
        use std::os::fd::AsRawFd;
        let f = &self.layers[0].file;
        let Ok(size) = f.metadata().map(|m| m.len()) else {
            return;
        };
        let end = start + len;
        if size >= end {
            return;
        }
        let from = size.max(start);
        // SAFETY: fallocate takes plain integers; the descriptor is open for the call.
        let r = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                0,
                from as libc::off_t,
                (end - from) as libc::off_t,
            )
        };
        if r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP) {
            let _ = f.set_len(end);
        }
    }

    /// Returns cluster `h`, just handed out by [`Image::alloc_cluster`] and referenced by
    /// nothing, to the reservation: the next allocation takes it again (its refcount stays 1,
    /// as for every reserved cluster).
    fn unalloc_cluster(&mut self, h: u64) {
        if h + self.cluster_size() == self.next {
            self.next = h;
        }
    }

    /// `n` fresh consecutive clusters at the end (for tables and reservations), refcounts
    /// durable. On failure the end does not move.
    fn alloc_contiguous(&mut self, n: u64) -> Result<u64> {
        let cs = self.cluster_size();
        let start = self.end;
        self.end += n * cs;
        if let Err(e) = self.set_refcounts(start, n, 1).and_then(|()| self.sync()) {
            self.give_back(start, n);
            return Err(e);
        }
        Ok(start)
    }

    /// Gives back `n` clusters from `start`, taken from the end and referenced by nothing: their
    /// refcounts go back to 0 where a refcount block holds them (best effort: the clusters are
    /// unused either way), and if nothing was taken after them the end moves back, so the next
    /// allocation takes them again instead of growing the file.
    fn give_back(&mut self, start: u64, n: u64) {
        let cs = self.cluster_size();
        if let Err(e) = self.update_refcounts_in(start, n, false, &mut |_| Ok(0)) {
            log::warn!(
                "cannot reset the refcounts of {n} unused clusters at {start:#x} ({e}); \
                 `qemu-img check -r leaks` reclaims them"
            );
        }
        if self.end == start + n * cs {
            self.end = start;
        }
    }

    fn free_later(&mut self, ext: Ext) {
        let cs = self.cluster_size();
        match ext {
            Ext::Data { host, .. } => self.pending_free.push(host & !(cs - 1)),
            Ext::Zero { cluster, .. } if cluster != 0 => self.pending_free.push(cluster),
            Ext::Compressed { host, sectors } => {
                let start = host & !511;
                let end = start + sectors * 512;
                let mut c = start & !(cs - 1);
                while c < end {
                    self.pending_free.push(c);
                    c += cs;
                }
            }
            _ => {}
        }
    }

    // ---- writes ----

    /// The L2 table and index for the top image's `guest` cluster, allocating the table.
    fn l2_for_write(&mut self, guest: u64) -> Result<(u64, usize)> {
        if let Some(slot) = self.l2_slot(0, guest)? {
            let m = self.top();
            let cb = m.h.cluster_bits;
            let l1i = guest >> (cb + m.h.l2_entries().trailing_zeros());
            if m.l1[l1i as usize] & COPIED == 0 {
                return Err(self.corrupt(
                    0,
                    format!(
                        "L1 entry {l1i} is shared (no COPIED flag) but the image has no snapshots"
                    ),
                ));
            }
            return Ok(slot);
        }
        let cs = self.cluster_size();
        let h = self.alloc_cluster()?;
        if let Err(e) = self.write_at(&vec![0u8; cs as usize], h, "write a new L2 table") {
            self.unalloc_cluster(h);
            return Err(e);
        }
        let m = self.top();
        let l1i = guest >> (m.h.cluster_bits + m.h.l2_entries().trailing_zeros());
        let l1_off = m.h.l1_table_offset + l1i * 8;
        if let Err(e) = self.write_at(&(h | COPIED).to_be_bytes(), l1_off, "update the L1 table") {
            // If the entry may have reached the file, the cluster stays taken (a leak at worst).
            if nothing_written(&e) {
                self.unalloc_cluster(h);
            }
            return Err(e);
        }
        let m = self.top_mut();
        m.l1[l1i as usize] = h | COPIED;
        let entries = (cs / 8) as usize;
        m.cache
            .get(h, || Ok::<_, Qcow2Error>(vec![0u64; entries]))?;
        Ok(self.l2_slot(0, guest)?.unwrap_or((h, 0)))
    }

    /// Sets an L2 entry: in the file first, then in the cache (a failed write leaves both as
    /// they were).
    fn set_l2(&mut self, off: u64, idx: usize, entry: u64) -> Result<()> {
        self.write_at(
            &entry.to_be_bytes(),
            off + idx as u64 * 8,
            "update an L2 table",
        )?;
        self.table(0, off)?[idx] = entry;
        Ok(())
    }

    /// Sets an extended L2 entry and its subcluster bitmap: in the file first (the 16 bytes in
    /// one write), then in the cache.
    fn set_l2_ext(&mut self, off: u64, idx: usize, entry: u64, bitmap: u64) -> Result<()> {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&entry.to_be_bytes());
        b[8..].copy_from_slice(&bitmap.to_be_bytes());
        self.write_at(&b, off + idx as u64 * 16, "update an L2 table")?;
        let t = self.table(0, off)?;
        t[2 * idx] = entry;
        t[2 * idx + 1] = bitmap;
        Ok(())
    }

    /// Writes `chunk` at `guest` within one cluster of an image with extended L2 entries, as
    /// QEMU does: a cluster without a host cluster gets one; the subclusters the write touches
    /// become allocated (their zero bits cleared), and only the parts of its first and last
    /// subclusters that it does not cover, if those subclusters were not allocated, are copied
    /// from what the guest read there (the backing chain, or zeroes). Untouched subclusters stay
    /// as they were (unallocated ones still read from the backing file). Data is written before
    /// the L2 entry that maps it.
    fn write_ext(&mut self, guest: u64, chunk: &[u8]) -> Result<()> {
        let cs = self.cluster_size();
        let sc = cs / 32;
        let in_cluster = guest & (cs - 1);
        let cluster = guest - in_cluster;
        let (off, idx) = self.l2_for_write(guest)?;
        let t = self.table(0, off)?;
        let (entry, bitmap) = (t[2 * idx], t[2 * idx + 1]);
        if entry & l2::COMPRESSED != 0 {
            // A compressed cluster becomes a whole allocated cluster.
            let h = self.alloc_cluster()?;
            let mut full = vec![0u8; cs as usize];
            let staged = self.read_layer(0, cluster, &mut full).and_then(|()| {
                full[in_cluster as usize..in_cluster as usize + chunk.len()].copy_from_slice(chunk);
                self.write_at(&full, h, "write data")
            });
            if let Err(e) = staged {
                self.unalloc_cluster(h);
                return Err(e);
            }
            if let Err(e) = self.set_l2_ext(off, idx, h | COPIED, 0xffff_ffff) {
                if nothing_written(&e) {
                    self.unalloc_cluster(h);
                }
                return Err(e);
            }
            if let Ok((old, _)) = decode_l2(entry, None, self.top().h.cluster_bits, 3, 0) {
                self.free_later(old);
            }
            return Ok(());
        }
        let mut host = entry & OFFSET_MASK;
        let bad = if entry & ZERO != 0 {
            Some("the zero flag is reserved in extended L2 entries".to_owned())
        } else if !host.is_multiple_of(cs) {
            Some(format!(
                "data cluster offset {host:#x} is not aligned to a cluster"
            ))
        } else if bitmap & (bitmap >> 32) & 0xffff_ffff != 0 {
            Some("a subcluster is marked both allocated and zero".to_owned())
        } else if host == 0 && bitmap & 0xffff_ffff != 0 {
            Some("subclusters are allocated in a cluster without a host offset".to_owned())
        } else {
            None
        };
        if let Some(d) = bad {
            return Err(self.corrupt(
                0,
                format!("L2 entry {idx} of the table at {off:#x} (guest offset {guest}): {d}"),
            ));
        }
        if host != 0 && entry & COPIED == 0 {
            return Err(self.corrupt(
                0,
                format!(
                    "L2 entry {idx} of the table at {off:#x} is shared (no COPIED flag) but the image has no snapshots"
                ),
            ));
        }
        let end = in_cluster + chunk.len() as u64;
        let (first, last) = (in_cluster / sc, (end - 1) / sc);
        let allocated = |i: u64| host != 0 && bitmap & (1 << i) != 0;
        // What to write: the chunk, widened to its first and last subclusters' edges where
        // those are not allocated yet (copy on write of the rest of the subcluster).
        let start = if allocated(first) {
            in_cluster
        } else {
            first * sc
        };
        let stop = if allocated(last) {
            end
        } else {
            (last + 1) * sc
        };
        let mut buf = vec![0u8; (stop - start) as usize];
        if start < in_cluster {
            self.read_layer(
                0,
                cluster + start,
                &mut buf[..(in_cluster - start) as usize],
            )?;
        }
        if stop > end {
            let at = (end - start) as usize;
            self.read_layer(0, cluster + end, &mut buf[at..])?;
        }
        buf[(in_cluster - start) as usize..(end - start) as usize].copy_from_slice(chunk);
        let fresh = host == 0;
        if fresh {
            self.test_gate();
            host = self.alloc_cluster()?;
        }
        if let Err(e) = self.write_at(&buf, host + start, "write data") {
            if fresh {
                self.unalloc_cluster(host);
            }
            return Err(e);
        }
        let mask = sub_mask(first, last);
        let new_bitmap = (bitmap | mask) & !(mask << 32);
        let new_entry = host | COPIED;
        if (new_entry, new_bitmap) != (entry, bitmap)
            && let Err(e) = self.set_l2_ext(off, idx, new_entry, new_bitmap)
        {
            if fresh && nothing_written(&e) {
                self.unalloc_cluster(host);
            }
            return Err(e);
        }
        Ok(())
    }

    /// Discards or zeroes `[guest, guest + len)` of an image with extended L2 entries: whole
    /// clusters lose their host cluster (freed at the next flush) and read as zeroes (zero
    /// bits) when zeroing or over a backing file; whole subclusters become zero subclusters
    /// (unallocated ones, when discarding without a backing file); the parts of subclusters
    /// left are written with zeroes when zeroing and left alone when discarding.
    fn discard_ext(&mut self, guest: u64, len: u64, zero: bool) -> Result<()> {
        let cs = self.cluster_size();
        let sc = cs / 32;
        let backing = self.layers.len() > 1;
        let size = self.size();
        let end = guest + len;
        let mut g = guest;
        while g < end {
            let in_cluster = g & (cs - 1);
            let take = (cs - in_cluster).min(end - g);
            let stop = in_cluster + take;
            // Whole subclusters (the end of the disk ends the last one).
            let a = in_cluster.div_ceil(sc) * sc;
            let b = if g + take == size {
                stop.div_ceil(sc) * sc
            } else {
                stop / sc * sc
            };
            if a >= b {
                if zero {
                    self.write(g, &vec![0u8; take as usize])?;
                }
                g += take;
                continue;
            }
            if zero {
                if a > in_cluster {
                    self.write(g, &vec![0u8; (a - in_cluster) as usize])?;
                }
                if stop > b {
                    self.write(g - in_cluster + b, &vec![0u8; (stop - b) as usize])?;
                }
            }
            let reads_zero = zero || backing;
            if self.l2_slot(0, g)?.is_none() && !backing {
                // No table and no backing file: reads as zeroes already.
                g += take;
                continue;
            }
            let (off, idx) = self.l2_for_write(g)?;
            let t = self.table(0, off)?;
            let (entry, bitmap) = (t[2 * idx], t[2 * idx + 1]);
            let whole = a == 0 && b >= cs;
            let mask = sub_mask(a / sc, (b / sc).min(32) - 1);
            let zeros = if reads_zero { mask << 32 } else { 0 };
            let (new_entry, new_bitmap, old) = if whole {
                let old = decode_l2(entry, None, self.top().h.cluster_bits, 3, 0).ok();
                (0, zeros, old.map(|o| o.0))
            } else if entry & l2::COMPRESSED != 0 {
                // Part of a compressed cluster: zeroes were written above; a discard is a hint.
                g += take;
                continue;
            } else {
                (entry, (bitmap & !mask & !(mask << 32)) | zeros, None)
            };
            if (new_entry, new_bitmap) != (entry, bitmap) {
                self.set_l2_ext(off, idx, new_entry, new_bitmap)?;
                if let Some(old) = old {
                    self.free_later(old);
                }
            }
            g += take;
        }
        self.maybe_flush()
    }

    /// Writes guest bytes (allocating clusters as needed, copying on write from the backing
    /// chain, zero or compressed clusters).
    pub fn write(&mut self, guest: u64, data: &[u8]) -> Result<()> {
        self.check_writable(guest, data.len() as u64)?;
        let cs = self.cluster_size();
        let ext_l2 = self.top().h.extended_l2();
        let mut pos = 0usize;
        while pos < data.len() {
            let g = guest + pos as u64;
            let in_cluster = g & (cs - 1);
            let take = ((cs - in_cluster) as usize).min(data.len() - pos);
            let chunk = &data[pos..pos + take];
            if ext_l2 {
                self.write_ext(g, chunk)?;
                pos += take;
                continue;
            }
            let (off, idx) = self.l2_for_write(g)?;
            let (ext, _) = self.lookup(0, g)?;
            match ext {
                Ext::Data { host, copied: true } => {
                    self.write_at(chunk, host, "write data")?;
                }
                Ext::Zero {
                    cluster,
                    copied: true,
                } if cluster != 0 => {
                    // Allocated but reading as zeroes: write the whole cluster in place, then
                    // drop the zero flag.
                    let mut full = vec![0u8; cs as usize];
                    full[in_cluster as usize..in_cluster as usize + take].copy_from_slice(chunk);
                    self.write_at(&full, cluster, "write data")?;
                    self.set_l2(off, idx, cluster | COPIED)?;
                }
                old => {
                    self.test_gate();
                    let h = self.alloc_cluster()?;
                    let written = if take as u64 == cs {
                        self.write_at(chunk, h, "write data")
                    } else {
                        let mut full = vec![0u8; cs as usize];
                        self.read_layer(0, g - in_cluster, &mut full)
                            .and_then(|()| {
                                full[in_cluster as usize..in_cluster as usize + take]
                                    .copy_from_slice(chunk);
                                self.write_at(&full, h, "write data")
                            })
                    };
                    // A write that fails gives its cluster back (a full file system must not
                    // leak a cluster per attempt); after a failed L2 update only if the entry
                    // cannot have reached the file.
                    if let Err(e) = written {
                        self.unalloc_cluster(h);
                        return Err(e);
                    }
                    if let Err(e) = self.set_l2(off, idx, h | COPIED) {
                        if nothing_written(&e) {
                            self.unalloc_cluster(h);
                        }
                        return Err(e);
                    }
                    self.free_later(old);
                }
            }
            pos += take;
        }
        self.maybe_flush()
    }

    /// First half of an allocating write whose data the caller writes itself (the metadata
    /// worker, with O_DIRECT from the guest's buffers, several in flight): if `[guest, guest +
    /// len)` covers whole clusters of an image with standard L2 entries and none of them is
    /// data referenced once (so every one needs a new host cluster and nothing is copied on
    /// write), allocates their host clusters (and any L2 table they need) and returns where
    /// the data goes. `None`: the write is not of that kind (use [`Image::write`]). Until
    /// [`Image::commit_write`] nothing maps the new clusters: a reader sees the old contents,
    /// and the caller must not let another request touch the range meanwhile.
    pub fn prepare_write(&mut self, guest: u64, len: u64) -> Result<Option<PreparedWrite>> {
        let cs = self.cluster_size();
        if self.top().h.extended_l2()
            || len == 0
            || !guest.is_multiple_of(cs)
            || !len.is_multiple_of(cs)
            || len > MAX_PREPARED_CLUSTERS * cs
        {
            return Ok(None);
        }
        self.check_writable(guest, len)?;
        // Look first, allocate only if every cluster qualifies.
        let mut olds = Vec::with_capacity((len / cs) as usize);
        for g in (guest..guest + len).step_by(cs as usize) {
            let (ext, _) = self.lookup(0, g)?;
            match ext {
                Ext::Data { copied: true, .. } => return Ok(None),
                Ext::Zero {
                    cluster,
                    copied: true,
                } if cluster != 0 => return Ok(None),
                old => olds.push(old),
            }
        }
        self.test_gate();
        let mut clusters: Vec<PreparedCluster> = Vec::with_capacity(olds.len());
        for (i, old) in olds.into_iter().enumerate() {
            let g = guest + i as u64 * cs;
            let slot = self.l2_for_write(g).and_then(|(off, idx)| {
                let h = self.alloc_cluster()?;
                Ok((off, idx, h))
            });
            match slot {
                Ok((l2, idx, host)) => clusters.push(PreparedCluster { l2, idx, host, old }),
                Err(e) => {
                    self.abandon_write(PreparedWrite { guest, clusters });
                    return Err(e);
                }
            }
        }
        Ok(Some(PreparedWrite { guest, clusters }))
    }

    /// Second half of a prepared write, once its data is written: maps the clusters (data
    /// before the L2 entry that maps it, as [`Image::write`]) and frees the old ones at the next
    /// flush. Publish the range to the data path afterwards.
    pub fn commit_write(&mut self, w: PreparedWrite) -> Result<()> {
        let mut rest = w.clusters.into_iter();
        while let Some(c) = rest.next() {
            if let Err(e) = self.set_l2(c.l2, c.idx, c.host | COPIED) {
                // This entry may have reached the file: its cluster stays taken; the others
                // were never mapped.
                let undone: Vec<_> = rest.collect();
                self.abandon_write(PreparedWrite {
                    guest: w.guest,
                    clusters: undone,
                });
                return Err(e);
            }
            self.free_later(c.old);
        }
        Ok(())
    }

    /// Gives up a prepared write whose data could not be written: its clusters go back to the
    /// reservation when they were the last handed out, else they stay allocated and unused (a
    /// leak `qemu-img check` reports, never a corruption).
    pub fn abandon_write(&mut self, w: PreparedWrite) {
        for c in w.clusters.iter().rev() {
            self.unalloc_cluster(c.host);
        }
    }

    /// Writes data bytes at host offset `off` of the top image (the rest of a split write's
    /// data after a short transfer), through the image's own descriptor.
    pub fn write_data(&self, data: &[u8], off: u64) -> std::io::Result<()> {
        self.layers[0].file.write_all_at(data, off)
    }

    /// The error of a split write's data that could not be written at guest offset `guest`.
    pub fn data_error(&self, source: std::io::Error, guest: u64) -> Qcow2Error {
        Qcow2Error::Io {
            path: self.path().to_owned(),
            op: "write data",
            offset: guest,
            source,
        }
    }

    fn maybe_flush(&mut self) -> Result<()> {
        if self.pending_free.len() > MAX_PENDING_FREES {
            self.flush()?;
        }
        Ok(())
    }

    /// Discards (`zero` false) or zeroes (`zero` true) guest bytes. Whole clusters become zero
    /// clusters (version 3) or unallocated ones; partial clusters are written with zeroes when
    /// zeroing and left alone when discarding (discard is a hint).
    pub fn discard(&mut self, guest: u64, len: u64, zero: bool) -> Result<()> {
        self.check_writable(guest, len)?;
        if self.top().h.extended_l2() {
            return self.discard_ext(guest, len, zero);
        }
        let cs = self.cluster_size();
        let v3 = self.top().h.version >= 3;
        let backing = self.layers.len() > 1;
        let end = guest + len;
        let mut g = guest;
        while g < end {
            let in_cluster = g & (cs - 1);
            let take = (cs - in_cluster).min(end - g);
            let whole = take == cs || (in_cluster == 0 && g + take == self.size());
            if !whole || (zero && !v3) {
                if zero {
                    self.write(g, &vec![0u8; take as usize])?;
                }
                g += take;
                continue;
            }
            let new = if v3 && (zero || backing) {
                ZERO
            } else if backing {
                // v2 over a backing file: unallocating would expose the backing data.
                g += take;
                continue;
            } else {
                0
            };
            let (ext, _) = self.lookup(0, g)?;
            let already = match ext {
                // Reads as zeroes already, or becomes unallocated anyway.
                Ext::Unallocated => !backing || new == 0,
                Ext::Zero { cluster: 0, .. } => true,
                _ => false,
            };
            if !already {
                let (off, idx) = self.l2_for_write(g)?;
                self.set_l2(off, idx, new)?;
                self.free_later(ext);
            }
            g += take;
        }
        self.maybe_flush()
    }

    /// Makes everything written so far durable, then releases the clusters freed since the
    /// last flush (their references are gone on disk now).
    pub fn flush(&mut self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.test_gate();
        self.sync()?;
        if self.pending_free.is_empty() {
            return Ok(());
        }
        let mut frees = std::mem::take(&mut self.pending_free);
        frees.sort_unstable();
        let cs = self.cluster_size();
        for c in frees {
            let mut now = 0;
            self.update_refcounts(c, 1, &mut |old| {
                if old == 0 {
                    Err("the refcount would drop below zero".into())
                } else {
                    now = old - 1;
                    Ok(old - 1)
                }
            })?;
            if now == 0 {
                self.forget_table(c);
                // Give the space back; the cluster is never reused.
                let _ = fallocate_punch(&self.layers[0].file, c, cs);
            }
        }
        Ok(())
    }

    fn forget_table(&mut self, off: u64) {
        self.top_mut().cache.forget(off);
        if matches!(&self.decompressed, Some((0, h, _)) if *h & !(self.cluster_size() - 1) == off) {
            self.decompressed = None;
        }
    }

    /// Grows the virtual size to `new_size` bytes (the L1 table moves if it must grow).
    pub fn resize(&mut self, new_size: u64) -> Result<()> {
        if !self.writable {
            return Err(self.refuse("the image is open read-only"));
        }
        let old = self.size();
        if new_size < old {
            return Err(self.refuse(format!(
                "shrinking from {old} to {new_size} bytes is not supported"
            )));
        }
        let h = self.top().h.clone();
        let need = h.l1_entries_for(new_size);
        let per_l1 = h.cluster_size() * h.l2_entries();
        if need * 8 > header::MAX_L1_BYTES || new_size > (header::MAX_L1_BYTES / 8) * per_l1 {
            return Err(self.refuse(format!("{new_size} bytes needs an L1 table over 32 MiB")));
        }
        if need > self.top().l1.len() as u64 {
            let cs = h.cluster_size();
            let clusters = (need * 8).div_ceil(cs);
            let mut l1 = self.top().l1.clone();
            l1.resize((clusters * cs / 8) as usize, 0);
            let off = self.alloc_contiguous(clusters)?;
            let bytes: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
            let staged = self
                .write_at(&bytes, off, "write the new L1 table")
                .and_then(|()| self.sync());
            if let Err(e) = staged {
                // Nothing points at the new table yet.
                self.give_back(off, clusters);
                return Err(e);
            }
            let mut hdr = [0u8; 12];
            hdr[..4].copy_from_slice(&(need as u32).to_be_bytes());
            hdr[4..].copy_from_slice(&off.to_be_bytes());
            self.write_at(&hdr, 36, "switch the header to the new L1 table")?;
            self.sync()?;
            let old_clusters = (u64::from(h.l1_size) * 8).div_ceil(cs);
            for i in 0..old_clusters {
                self.pending_free.push(h.l1_table_offset + i * cs);
            }
            l1.truncate(need as usize);
            let m = self.top_mut();
            m.l1 = l1;
            m.h.l1_size = need as u32;
            m.h.l1_table_offset = off;
        }
        self.write_at(&new_size.to_be_bytes(), 24, "write the new size")?;
        self.sync()?;
        self.top_mut().h.size = new_size;
        self.layers[0].size = new_size;
        Ok(())
    }

    /// Flushes, and gives back the clusters reserved but not used (so a cleanly closed image
    /// has no leaks).
    pub fn close(&mut self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.flush()?;
        let mut unused_tail = None;
        if self.next < self.reserved_end {
            let cs = self.cluster_size();
            let n = (self.reserved_end - self.next) / cs;
            self.set_refcounts(self.next, n, 0)?;
            if self.reserved_end == self.end {
                // Nothing lies past the reservation: the file can end where its use ends.
                unused_tail = Some(self.next);
            }
            self.next = self.reserved_end;
        }
        self.sync()?;
        if let Some(end) = unused_tail
            && self.layers[0].file.set_len(end).is_ok()
        {
            self.end = end;
            self.next = end;
            self.reserved_end = end;
        }
        self.writable = false;
        Ok(())
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            log::error!("closing the qcow2 image: {e}");
        }
    }
}

/// The bits of subclusters `first..=last` in a subcluster allocation bitmap's low half.
fn sub_mask(first: u64, last: u64) -> u64 {
    let n = last + 1 - first;
    let ones = if n >= 32 {
        0xffff_ffff
    } else {
        (1u64 << n) - 1
    };
    ones << first
}

/// Whether `e` is a write that the kernel refused before writing anything (no space, or over
/// quota): what it was to change is as it was.
fn nothing_written(e: &Qcow2Error) -> bool {
    matches!(e, Qcow2Error::Io { source, .. }
        if matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)))
}

fn fallocate_punch(file: &File, off: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate takes plain integers; the descriptor is open for the call.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests;
