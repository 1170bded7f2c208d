//! vbimg: qcow2 image tools built on vback-block's format layer (the same code that serves
//! guests in blkback).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::json;
use thiserror::Error;
use vback_block::lock::{LockError, LockMode, lock_image_patiently};
use vback_block::qcow2::{self, BackingPolicy, Image, OpenOptions};

/// qcow2 image tools: create, info, check, convert, resize. They agree with `qemu-img` and take
/// the same locks as QEMU and blkback, so an image in use is refused (info, check and convert's
/// source read it anyway with -U, as qemu-img does).
#[derive(Debug, Parser)]
#[command(version, after_help = AFTER_HELP)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create an empty qcow2 (version 3) image.
    Create {
        /// The new image (must not exist).
        file: PathBuf,
        /// Virtual size (e.g. 20G); default: the backing file's size.
        size: Option<String>,
        /// Cluster size, 512 bytes to 2 MiB.
        #[arg(long, default_value = "64K")]
        cluster_size: String,
        /// Backing file, stored as given (relative names are relative to the new image).
        #[arg(long, short = 'b', requires = "backing_format")]
        backing: Option<String>,
        /// The backing file's format (raw or qcow2): always recorded, never probed.
        #[arg(long, short = 'F')]
        backing_format: Option<String>,
    },
    /// Describe an image: JSON with qemu-img's keys and meanings (qemu-img info --output json).
    Info {
        /// The image.
        file: PathBuf,
        /// Output format: json only (accepted as in qemu-img info --output json).
        #[arg(long, value_enum, default_value_t = InfoOutput::Json)]
        output: InfoOutput,
        #[command(flatten)]
        share: ForceShare,
    },
    /// Check the refcounts against the metadata. Exit status as qemu-img's: 0 clean, 2
    /// corruption, 3 leaked clusters only.
    Check {
        /// The image.
        file: PathBuf,
        /// Output format: human (qemu-img check's lines) or json (its JSON keys).
        #[arg(long, value_enum, default_value_t = CheckOutput::Human)]
        output: CheckOutput,
        #[command(flatten)]
        share: ForceShare,
    },
    /// Copy an image's guest content into a new qcow2 or raw image (zero ranges stay
    /// unallocated), like `qemu-img convert`.
    Convert {
        /// The source image.
        src: PathBuf,
        /// The new image (must not exist).
        dst: PathBuf,
        /// The source's format, raw or qcow2 (never probed).
        #[arg(short = 'f', long = "format")]
        src_format: String,
        /// The new image's format, qcow2 or raw.
        #[arg(short = 'O', long = "output-format", default_value = "qcow2")]
        out_format: String,
        /// Cluster size of a qcow2 output.
        #[arg(long, default_value = "64K")]
        cluster_size: String,
        /// Show progress on stderr, as qemu-img -p does.
        #[arg(short = 'p', long)]
        progress: bool,
        #[command(flatten)]
        share: ForceShare,
    },
    /// Grow an image to SIZE (shrinking is refused).
    Resize {
        /// The image.
        file: PathBuf,
        /// The new virtual size.
        size: String,
    },
}

/// `info --output`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum InfoOutput {
    Json,
}

/// `check --output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum CheckOutput {
    Human,
    Json,
}

/// `-U`: read an image without locking it.
#[derive(Debug, Clone, Copy, clap::Args)]
struct ForceShare {
    /// Read the image (and its backing files) without locking them, so an image that a running
    /// guest has open can be inspected, as with qemu-img -U. What is read may be inconsistent
    /// while the guest writes.
    #[arg(short = 'U', long)]
    force_share: bool,
}

/// How an image is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Writable, locked exclusively.
    Write,
    /// Read-only, locked shared (writers are refused, readers share).
    Read,
    /// Read-only, not locked (`-U`).
    ReadUnlocked,
    /// Read-only, locked shared: a backing file read for its size by `create`.
    BackingSize,
}

impl Access {
    fn read(share: ForceShare) -> Access {
        if share.force_share {
            Access::ReadUnlocked
        } else {
            Access::Read
        }
    }
}

/// An image that another process holds.
#[derive(Debug, Error)]
enum InUse {
    /// Read-only commands can read it anyway.
    #[error(
        "{0}, or, to read it anyway, pass -U (--force-share), as with qemu-img -U (what is read may be inconsistent while it is written)"
    )]
    Readable(LockError),
    /// `create` reads a backing file's size only when no size is given.
    #[error("{0}, or give the new image's size after its name, so the backing file is not opened")]
    BackingSize(LockError),
    /// Writing commands cannot.
    #[error("{0}")]
    Writable(LockError),
}

const AFTER_HELP: &str = "\
Examples:
  vbimg create base.qcow2 20G
  vbimg create -b base.qcow2 -F qcow2 overlay.qcow2
  vbimg info overlay.qcow2
  vbimg info -U running-guest.qcow2     # an image in use, not locked
  vbimg check overlay.qcow2; echo $?
  vbimg resize overlay.qcow2 30G
  vbimg convert -p -f raw -O qcow2 disk.raw disk.qcow2";

fn size(s: &str) -> Result<u64, String> {
    vback_common::spec::parse_size(s).map_err(|e| e.to_string())
}

/// Locks `f` (opened from `path`) as `access` asks.
fn lock(f: &std::fs::File, path: &Path, access: Access) -> Result<(), String> {
    let mode = match access {
        Access::Write => LockMode::Exclusive,
        Access::Read | Access::BackingSize => LockMode::Shared,
        Access::ReadUnlocked => LockMode::None,
    };
    lock_image_patiently(f, path, mode, std::time::Duration::from_secs(1)).map_err(|e| {
        match access {
            Access::Read => InUse::Readable(e),
            Access::BackingSize => InUse::BackingSize(e),
            Access::Write | Access::ReadUnlocked => InUse::Writable(e),
        }
        .to_string()
    })
}

fn open(path: &Path, access: Access) -> Result<Image, String> {
    let writable = access == Access::Write;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    lock(&f, path, access)?;
    Image::open(
        path,
        f,
        &OpenOptions {
            writable,
            backing: BackingPolicy {
                any_dir: true,
                ..BackingPolicy::default()
            },
            lock_backing: access != Access::ReadUnlocked,
            ..OpenOptions::default()
        },
    )
    .map_err(|e| e.to_string())
}

fn backing_size(new: &Path, name: &str, fmt: &str) -> Result<u64, String> {
    let p = Path::new(name);
    let p = if p.is_absolute() {
        p.to_owned()
    } else {
        new.parent().unwrap_or(Path::new(".")).join(p)
    };
    match fmt {
        "qcow2" => Ok(open(&p, Access::BackingSize)?.size()),
        _ => std::fs::metadata(&p)
            .map(|m| m.len())
            .map_err(|e| format!("{}: {e}", p.display())),
    }
}

fn run(cmd: Cmd) -> Result<u8, String> {
    match cmd {
        Cmd::Create {
            file,
            size: sz,
            cluster_size,
            backing,
            backing_format,
        } => {
            let backing = backing.zip(backing_format);
            let bytes = match (&sz, &backing) {
                (Some(s), _) => size(s)?,
                (None, Some((b, f))) => backing_size(&file, b, f)?,
                (None, None) => return Err("a size is needed without a backing file".into()),
            };
            let b = backing.as_ref().map(|(b, f)| (b.as_str(), f.as_str()));
            qcow2::create(&file, bytes, size(&cluster_size)?, b).map_err(|e| e.to_string())?;
            Ok(0)
        }
        Cmd::Info {
            file,
            output: InfoOutput::Json,
            share,
        } => {
            let img = open(&file, Access::read(share))?;
            let v = info_json(&file, &img.info());
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            Ok(0)
        }
        Cmd::Check {
            file,
            output,
            share,
        } => {
            let mut img = open(&file, Access::read(share))?;
            let r = img.check().map_err(|e| e.to_string())?;
            let code = if r.errors > 0 {
                2
            } else if r.leaks > 0 {
                3
            } else {
                0
            };
            if output == CheckOutput::Json {
                let v = check_json(&file, &r);
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                return Ok(code);
            }
            for m in &r.messages {
                println!("ERROR {m}");
            }
            if r.errors > 0 {
                println!("{} errors were found on the image.", r.errors);
            }
            if r.leaks > 0 {
                println!(
                    "{} leaked clusters were found on the image (repair with `qemu-img check -r leaks`).",
                    r.leaks
                );
            }
            if r.errors == 0 && r.leaks == 0 {
                println!("No errors were found on the image.");
            }
            if r.total_clusters != 0 && r.allocated_clusters != 0 {
                let pct = |n: u64, of: u64| n as f64 * 100.0 / of as f64;
                println!(
                    "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
                    r.allocated_clusters,
                    r.total_clusters,
                    pct(r.allocated_clusters, r.total_clusters),
                    pct(r.fragmented_clusters, r.allocated_clusters),
                    pct(r.compressed_clusters, r.allocated_clusters),
                );
            }
            if r.image_end_offset != 0 {
                println!("Image end offset: {}", r.image_end_offset);
            }
            Ok(code)
        }
        Cmd::Convert {
            src,
            dst,
            src_format,
            out_format,
            cluster_size,
            progress,
            share,
        } => convert(
            &src,
            &dst,
            &src_format,
            &out_format,
            &cluster_size,
            progress,
            Access::read(share),
        ),
        Cmd::Resize { file, size: s } => {
            let mut img = open(&file, Access::Write)?;
            img.resize(size(&s)?).map_err(|e| e.to_string())?;
            img.close().map_err(|e| e.to_string())?;
            Ok(0)
        }
    }
}

/// `qemu-img info --output json`'s keys and meanings for a qcow2 image (without its
/// `children`, the file layer).
fn info_json(file: &Path, i: &qcow2::Info) -> serde_json::Value {
    use std::os::unix::fs::MetadataExt;
    let filename = file.display().to_string();
    // Bytes the file takes on disk, as qemu-img's actual-size (holes are not counted).
    let actual = std::fs::metadata(file)
        .map(|m| m.blocks() * 512)
        .unwrap_or_default();
    let mut data = json!({
        "compat": if i.version >= 3 { "1.1" } else { "0.10" },
        "compression-type": if i.compression == "deflate" { "zlib" } else { i.compression },
        "refcount-bits": i.refcount_bits,
    });
    if i.version >= 3 {
        data["lazy-refcounts"] = json!(i.lazy_refcounts);
        data["corrupt"] = json!(i.corrupt);
        data["extended-l2"] = json!(i.extended_l2);
    }
    let mut v = json!({
        "filename": filename,
        "format": "qcow2",
        "virtual-size": i.size,
        "actual-size": actual,
        "cluster-size": i.cluster_size,
        "dirty-flag": i.dirty,
        "format-specific": { "type": "qcow2", "data": data },
    });
    if let Some(b) = &i.backing_file {
        v["backing-filename"] = json!(b);
        v["full-backing-filename"] = json!(full_backing_filename(&filename, b));
    }
    if let Some(f) = &i.backing_format {
        v["backing-filename-format"] = json!(f);
    }
    v
}

/// qemu's path_combine: a relative backing file name is relative to the image's directory, as
/// the image was named (no canonicalisation).
fn full_backing_filename(image: &str, backing: &str) -> String {
    if backing.starts_with('/') {
        return backing.to_owned();
    }
    match image.rfind('/') {
        Some(i) => format!("{}{backing}", &image[..=i]),
        None => backing.to_owned(),
    }
}

/// `qemu-img check --output json`'s keys (a key whose count is 0 is left out, as there).
fn check_json(file: &Path, r: &qcow2::CheckReport) -> serde_json::Value {
    let mut v = json!({
        "filename": file.display().to_string(),
        "format": "qcow2",
        "check-errors": 0,
    });
    for (key, n) in [
        ("corruptions", r.errors),
        ("leaks", r.leaks),
        ("image-end-offset", r.image_end_offset),
        ("total-clusters", r.total_clusters),
        ("allocated-clusters", r.allocated_clusters),
        ("fragmented-clusters", r.fragmented_clusters),
        ("compressed-clusters", r.compressed_clusters),
    ] {
        if n != 0 {
            v[key] = json!(n);
        }
    }
    v
}

/// Where converted data comes from or goes to.
enum Side {
    Qcow2(Box<Image>),
    Raw(std::fs::File),
}

fn convert(
    src: &Path,
    dst: &Path,
    src_format: &str,
    out_format: &str,
    cluster_size: &str,
    progress: bool,
    src_access: Access,
) -> Result<u8, String> {
    use std::os::unix::fs::FileExt;
    let io = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
    let (mut input, total) = match src_format {
        "qcow2" => {
            let img = open(src, src_access)?;
            let n = img.size();
            (Side::Qcow2(Box::new(img)), n)
        }
        "raw" => {
            let f = std::fs::File::open(src).map_err(|e| io(src, e))?;
            lock(&f, src, src_access)?;
            let n = f.metadata().map_err(|e| io(src, e))?.len();
            (Side::Raw(f), n)
        }
        f => return Err(format!("source format `{f}` is not raw or qcow2")),
    };
    let mut output = match out_format {
        "qcow2" => {
            qcow2::create(dst, total, size(cluster_size)?, None).map_err(|e| e.to_string())?;
            Side::Qcow2(Box::new(open(dst, Access::Write)?))
        }
        "raw" => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(dst)
                .map_err(|e| io(dst, e))?;
            f.set_len(total).map_err(|e| io(dst, e))?;
            Side::Raw(f)
        }
        f => return Err(format!("output format `{f}` is not qcow2 or raw")),
    };
    const CHUNK: u64 = 1 << 20;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut done = 0u64;
    let mut shown = -1i64;
    while done < total {
        let n = (total - done).min(CHUNK) as usize;
        let chunk = &mut buf[..n];
        match &mut input {
            Side::Qcow2(img) => img.read(done, chunk).map_err(|e| e.to_string())?,
            Side::Raw(f) => f.read_exact_at(chunk, done).map_err(|e| io(src, e))?,
        }
        // Zero ranges are left unallocated (a hole in a raw file).
        if chunk.iter().any(|&b| b != 0) {
            match &mut output {
                Side::Qcow2(img) => img.write(done, chunk).map_err(|e| e.to_string())?,
                Side::Raw(f) => f.write_all_at(chunk, done).map_err(|e| io(dst, e))?,
            }
        }
        done += n as u64;
        let pct = (done * 10000 / total.max(1)) as i64;
        if progress && pct != shown {
            shown = pct;
            eprint!("\r    ({:.2}/100%)", pct as f64 / 100.0);
        }
    }
    match output {
        Side::Qcow2(mut img) => img.close().map_err(|e| e.to_string())?,
        Side::Raw(f) => f.sync_all().map_err(|e| io(dst, e))?,
    }
    if progress {
        eprintln!("\r    (100.00/100%)");
    }
    Ok(0)
}

fn main() -> ExitCode {
    match run(vback_common::docgen::parse::<Args>("1").cmd) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("vbimg: {e}");
            ExitCode::FAILURE
        }
    }
}
