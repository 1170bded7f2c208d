//! Xen disk specifications.
//!
//! A *uname* names what backs a disk, with Xen's prefixes:
//!
//! | uname | meaning |
//! |---|---|
//! | `phy:/dev/sdc` | a host block device |
//! | `file:/path`, `tap:aio:/path`, `raw:/path` | a raw image file |
//! | `tap:qcow:/path`, `tap:qcow2:/path`, `qcow2:/path` | a qcow2 image |
//! | `tap:vmdk:/path`, `vmdk:/path` | a VMDK image |
//! | `tap:cdrom:/dev/sr0`, `tap:cdrom:/path.iso` | a CD-ROM drive or ISO image |
//! | `iscsi:IQN,LUN` | a LUN of an iSCSI target |
//! | `nbd:HOST:PORT`, `nbd:unix:/path` | an NBD export |
//! | `npiv:WWPN,LUN` | Fibre Channel NPIV |
//! | `null:SIZE` | a device without storage, for measuring per-request cost |
//!
//! `tap2:` is accepted wherever `tap:` is. A bare path is refused: the format of an image is
//! never guessed (a guest could write a qcow2 header into a raw image and so make the host
//! open other files).
//!
//! A full disk *entry* is `UNAME,VDEV,MODE`, e.g. `tap:qcow:/var/lib/xen/images/alice/disk0,xvda,w`,
//! or in SXP form `(vbd (dev xvda:disk) (uname file:/img) (mode w))`. A CD entry marks its
//! virtual device with `:cdrom`: `tap:cdrom:/dev/sr0,xvdc:cdrom,r`.

use std::fmt;
use std::path::PathBuf;

use super::{SpecError, parse_size};

/// The uname forms accepted, for error messages and `--help`.
pub const ACCEPTED_UNAMES: &str = "phy:/dev/DEVICE, file:/PATH, tap:aio:/PATH, tap:qcow:/PATH \
(or tap:qcow2:, qcow2:), tap:vmdk:/PATH (or vmdk:), tap:cdrom:/PATH, iscsi:IQN,LUN, nbd:HOST:PORT, \
nbd:unix:/PATH, npiv:WWPN,LUN, null:SIZE";

/// The format of an image file, always taken from the spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// Raw bytes (`file:`, `tap:aio:`).
    Raw,
    /// QEMU copy-on-write v2/v3 (`tap:qcow:`).
    Qcow2,
    /// VMware (`tap:vmdk:`).
    Vmdk,
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Vmdk => "vmdk",
        })
    }
}

/// What backs a virtual disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskUname {
    /// `phy:` a host block device.
    Phy(PathBuf),
    /// An image file in a given format (`file:`, `tap:aio:`, `tap:qcow:`, `tap:vmdk:`).
    Image {
        /// The format named by the prefix.
        format: ImageFormat,
        /// The image path.
        path: PathBuf,
    },
    /// `tap:cdrom:` a host CD drive or an ISO image.
    Cdrom(PathBuf),
    /// `iscsi:IQN,LUN` (or `iscsi://HOST[:PORT]/IQN/LUN`, kept as the URL).
    Iscsi {
        /// The target IQN or an iscsi:// URL.
        target: String,
        /// The logical unit.
        lun: u32,
    },
    /// `nbd:HOST:PORT` or `nbd:unix:/path`.
    Nbd(NbdAddress),
    /// `npiv:WWPN,LUN`: Fibre Channel; needs FC hardware.
    Npiv {
        /// World-wide port name.
        wwpn: String,
        /// The logical unit.
        lun: u32,
    },
    /// `null:SIZE`: completes requests without I/O.
    Null {
        /// Capacity in bytes.
        size: u64,
    },
}

/// Where an NBD export is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddress {
    /// TCP host and port.
    Tcp {
        /// Host name or address (IPv6 without brackets).
        host: String,
        /// TCP port.
        port: u16,
    },
    /// A unix socket.
    Unix(PathBuf),
}

impl DiskUname {
    /// Parses a uname such as `tap:qcow:/var/lib/xen/images/alice/disk0`.
    pub fn parse(input: &str) -> Result<DiskUname, SpecError> {
        let what = "disk spec";
        let Some((prefix, rest)) = input.split_once(':') else {
            let hint = if input.starts_with('/') {
                format!(
                    "no prefix says what this is; vback never guesses an image's format: write \
                     file:{input} for a raw image, tap:qcow:{input} for qcow2 or phy:{input} for \
                     a block device"
                )
            } else {
                format!("expected one of: {ACCEPTED_UNAMES}")
            };
            return Err(SpecError::new(what, input, input, hint));
        };
        let path = |p: &str, prefix_len: usize| -> Result<PathBuf, SpecError> {
            if p.is_empty() {
                return Err(SpecError::new(
                    what,
                    input,
                    &input[..prefix_len],
                    format!("`{}` must be followed by a path", &input[..prefix_len]),
                ));
            }
            if p.contains('\0') {
                return Err(SpecError::new(
                    what,
                    input,
                    p,
                    "the path contains a NUL byte",
                ));
            }
            Ok(PathBuf::from(p))
        };
        match prefix {
            "phy" => Ok(DiskUname::Phy(path(rest, 4)?)),
            "file" | "raw" => Ok(DiskUname::Image {
                format: ImageFormat::Raw,
                path: path(rest, prefix.len() + 1)?,
            }),
            "qcow2" => Ok(DiskUname::Image {
                format: ImageFormat::Qcow2,
                path: path(rest, 6)?,
            }),
            "vmdk" => Ok(DiskUname::Image {
                format: ImageFormat::Vmdk,
                path: path(rest, 5)?,
            }),
            "tap" | "tap2" => {
                let Some((driver, p)) = rest.split_once(':') else {
                    return Err(SpecError::new(
                        what,
                        input,
                        rest,
                        format!(
                            "`{prefix}:` needs a driver and a path: tap:aio:/PATH, tap:qcow:/PATH, \
                             tap:vmdk:/PATH or tap:cdrom:/PATH"
                        ),
                    ));
                };
                let plen = prefix.len() + driver.len() + 2;
                let format = match driver {
                    "aio" | "raw" | "sync" => ImageFormat::Raw,
                    "qcow" | "qcow2" => ImageFormat::Qcow2,
                    "vmdk" => ImageFormat::Vmdk,
                    "cdrom" => return Ok(DiskUname::Cdrom(path(p, plen)?)),
                    _ => {
                        return Err(SpecError::new(
                            what,
                            input,
                            driver,
                            format!(
                                "unknown {prefix} driver `{driver}`; use aio, qcow (or qcow2), vmdk or cdrom"
                            ),
                        ));
                    }
                };
                Ok(DiskUname::Image {
                    format,
                    path: path(p, plen)?,
                })
            }
            "iscsi" => parse_iscsi(input, rest),
            "nbd" => parse_nbd(input, rest).map(DiskUname::Nbd),
            "ndb" => Err(SpecError::new(
                what,
                input,
                prefix,
                "unknown prefix `ndb:`; did you mean nbd:HOST:PORT?",
            )),
            "npiv" => {
                let (wwpn, lun) = split_lun(input, rest, "npiv:WWPN,LUN")?;
                if wwpn.is_empty() {
                    return Err(SpecError::new(what, input, rest, "the WWPN is empty"));
                }
                Ok(DiskUname::Npiv {
                    wwpn: wwpn.to_owned(),
                    lun,
                })
            }
            "null" => {
                let size = parse_size(rest).map_err(|e| {
                    SpecError::new(
                        what,
                        input,
                        rest,
                        format!("null: needs a size such as null:1G ({})", e.problem),
                    )
                })?;
                if size == 0 || size % 512 != 0 {
                    return Err(SpecError::new(
                        what,
                        input,
                        rest,
                        "the size of a null device must be a non-zero multiple of 512 bytes",
                    ));
                }
                Ok(DiskUname::Null { size })
            }
            _ => Err(SpecError::new(
                what,
                input,
                prefix,
                format!("unknown prefix `{prefix}:`; expected one of: {ACCEPTED_UNAMES}"),
            )),
        }
    }

    /// The local path behind the disk, if it has one.
    pub fn path(&self) -> Option<&std::path::Path> {
        match self {
            DiskUname::Phy(p) | DiskUname::Cdrom(p) | DiskUname::Image { path: p, .. } => Some(p),
            DiskUname::Nbd(NbdAddress::Unix(p)) => Some(p),
            _ => None,
        }
    }
}

impl fmt::Display for DiskUname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiskUname::Phy(p) => write!(f, "phy:{}", p.display()),
            DiskUname::Image {
                format: ImageFormat::Raw,
                path,
            } => write!(f, "file:{}", path.display()),
            DiskUname::Image {
                format: ImageFormat::Qcow2,
                path,
            } => write!(f, "tap:qcow2:{}", path.display()),
            DiskUname::Image {
                format: ImageFormat::Vmdk,
                path,
            } => write!(f, "tap:vmdk:{}", path.display()),
            DiskUname::Cdrom(p) => write!(f, "tap:cdrom:{}", p.display()),
            DiskUname::Iscsi { target, lun } if target.starts_with("iscsi://") => {
                write!(f, "{target}/{lun}")
            }
            DiskUname::Iscsi { target, lun } => write!(f, "iscsi:{target},{lun}"),
            DiskUname::Nbd(NbdAddress::Tcp { host, port }) if host.contains(':') => {
                write!(f, "nbd:[{host}]:{port}")
            }
            DiskUname::Nbd(NbdAddress::Tcp { host, port }) => write!(f, "nbd:{host}:{port}"),
            DiskUname::Nbd(NbdAddress::Unix(p)) => write!(f, "nbd:unix:{}", p.display()),
            DiskUname::Npiv { wwpn, lun } => write!(f, "npiv:{wwpn},{lun}"),
            DiskUname::Null { size } => write!(f, "null:{size}"),
        }
    }
}

fn split_lun<'a>(input: &str, rest: &'a str, form: &str) -> Result<(&'a str, u32), SpecError> {
    let Some((name, lun)) = rest.rsplit_once(',') else {
        return Err(SpecError::new(
            "disk spec",
            input,
            rest,
            format!("expected {form} (a comma, then the LUN number)"),
        ));
    };
    let lun = lun.parse().map_err(|_| {
        SpecError::new(
            "disk spec",
            input,
            lun,
            format!("the LUN `{lun}` is not a number (expected {form})"),
        )
    })?;
    Ok((name, lun))
}

fn parse_iscsi(input: &str, rest: &str) -> Result<DiskUname, SpecError> {
    if let Some(url) = rest.strip_prefix("//") {
        // iscsi://HOST[:PORT]/IQN/LUN, libiscsi's URL form.
        let parts: Vec<&str> = url.split('/').collect();
        let [host, iqn, lun] = parts[..] else {
            return Err(SpecError::new(
                "disk spec",
                input,
                rest,
                "expected iscsi://HOST[:PORT]/IQN/LUN",
            ));
        };
        if host.is_empty() || iqn.is_empty() {
            return Err(SpecError::new(
                "disk spec",
                input,
                rest,
                "expected iscsi://HOST[:PORT]/IQN/LUN with a host and an IQN",
            ));
        }
        let lun = lun.parse().map_err(|_| {
            SpecError::new(
                "disk spec",
                input,
                lun,
                format!("the LUN `{lun}` is not a number"),
            )
        })?;
        return Ok(DiskUname::Iscsi {
            target: format!("iscsi://{host}/{iqn}"),
            lun,
        });
    }
    let (iqn, lun) = split_lun(input, rest, "iscsi:IQN,LUN")?;
    if !(iqn.starts_with("iqn.") || iqn.starts_with("eui.") || iqn.starts_with("naa.")) {
        return Err(SpecError::new(
            "disk spec",
            input,
            iqn,
            "an iSCSI target name starts with iqn., eui. or naa. (for example iqn.2001-04.com.example:disk1)",
        ));
    }
    Ok(DiskUname::Iscsi {
        target: iqn.to_owned(),
        lun,
    })
}

fn parse_nbd(input: &str, rest: &str) -> Result<NbdAddress, SpecError> {
    let bad = |part: &str, problem: &str| SpecError::new("disk spec", input, part, problem);
    if let Some(p) = rest.strip_prefix("unix:") {
        if p.is_empty() {
            return Err(bad(rest, "nbd:unix: must be followed by a socket path"));
        }
        return Ok(NbdAddress::Unix(PathBuf::from(p)));
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let Some((host, port)) = v6.split_once("]:") else {
            return Err(bad(rest, "expected nbd:[IPV6]:PORT"));
        };
        (host, port)
    } else {
        let Some((host, port)) = rest.rsplit_once(':') else {
            return Err(bad(
                rest,
                "expected nbd:HOST:PORT (for example nbd:127.0.0.1:10809) or nbd:unix:/PATH",
            ));
        };
        (host, port)
    };
    if host.is_empty() {
        return Err(bad(rest, "the NBD host is empty"));
    }
    if host.contains(['[', ']']) || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad(host, "the NBD host contains brackets or white space"));
    }
    if host.contains(':') && !rest.starts_with('[') {
        return Err(bad(
            host,
            "write an IPv6 address in brackets, for example nbd:[::1]:10809",
        ));
    }
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| bad(port, "the NBD port must be a number from 1 to 65535"))?;
    Ok(NbdAddress::Tcp {
        host: host.to_owned(),
        port,
    })
}

/// Access mode of a disk entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskMode {
    /// `r`: read-only.
    ReadOnly,
    /// `w`: writable, exclusive.
    ReadWrite,
    /// `w!`: writable even if another guest has it open (the operator takes the risk).
    ReadWriteShared,
}

impl DiskMode {
    /// Parses `r`, `ro`, `w`, `rw` or `w!`.
    pub fn parse(input: &str) -> Option<DiskMode> {
        match input {
            "r" | "ro" => Some(DiskMode::ReadOnly),
            "w" | "rw" => Some(DiskMode::ReadWrite),
            "w!" => Some(DiskMode::ReadWriteShared),
            _ => None,
        }
    }

    /// Whether the guest may write.
    pub fn writable(self) -> bool {
        self != DiskMode::ReadOnly
    }
}

impl fmt::Display for DiskMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DiskMode::ReadOnly => "r",
            DiskMode::ReadWrite => "w",
            DiskMode::ReadWriteShared => "w!",
        })
    }
}

/// The guest-side name of a disk (`xvda`, `hdc`, `sdb`, `vdb`), and whether it is a CD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vdev {
    /// Device name without the `:cdrom`/`:disk` suffix.
    pub name: String,
    /// `true` for `NAME:cdrom`.
    pub cdrom: bool,
}

impl Vdev {
    /// Parses `xvda`, `xvdc:cdrom`, `hda:disk`, `sdb`, `vdb1`...
    pub fn parse(input: &str) -> Option<Vdev> {
        let (name, cdrom) = match input.split_once(':') {
            Some((n, "cdrom")) => (n, true),
            Some((n, "disk")) => (n, false),
            Some(_) => return None,
            None => (input, false),
        };
        let letters = ["xvd", "hd", "sd", "vd"]
            .iter()
            .find_map(|p| name.strip_prefix(p))?;
        let digits_at = letters
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(letters.len());
        let (l, d) = letters.split_at(digits_at);
        if l.is_empty()
            || l.len() > 3
            || !l.bytes().all(|c| c.is_ascii_lowercase())
            || !d.bytes().all(|c| c.is_ascii_digit())
        {
            return None;
        }
        Some(Vdev {
            name: name.to_owned(),
            cdrom,
        })
    }
}

impl fmt::Display for Vdev {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.cdrom {
            write!(f, "{}:cdrom", self.name)
        } else {
            f.write_str(&self.name)
        }
    }
}

/// A full disk entry: what backs the disk, what the guest calls it, and how it may use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskEntry {
    /// What backs the disk.
    pub uname: DiskUname,
    /// The guest device name.
    pub vdev: Vdev,
    /// Access mode.
    pub mode: DiskMode,
    /// xl's `script=NAME`: the vbd hotplug script run with `add` before the disk is opened and
    /// `remove` after it is closed (a name in the script directory, or a path).
    pub script: Option<String>,
}

/// Splits xl's keyword fields (`script=NAME`) off the end of a disk entry: `input` without
/// them, and the script. Only known keywords are taken, so a uname's own commas and `=` stay.
fn split_keywords(input: &str) -> Result<(&str, Option<String>), SpecError> {
    let mut rest = input.trim();
    let mut script = None;
    while let Some((head, last)) = rest.rsplit_once(',') {
        let Some(name) = last.trim().strip_prefix("script=") else {
            break;
        };
        let name = name.trim();
        if name.is_empty() || name.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(SpecError::new(
                "disk entry",
                input,
                last,
                "script= needs a script name or path without spaces, for example script=block",
            ));
        }
        if script.is_some() {
            return Err(SpecError::new(
                "disk entry",
                input,
                last,
                "script= is given twice: name one script",
            ));
        }
        script = Some(name.to_owned());
        rest = head.trim_end();
    }
    Ok((rest, script))
}

impl DiskEntry {
    /// Parses `UNAME,VDEV,MODE` (the uname may itself contain commas, as `iscsi:IQN,LUN` does:
    /// the last two fields are always VDEV and MODE) or the SXP form `(vbd ...)`.
    pub fn parse(input: &str) -> Result<DiskEntry, SpecError> {
        let what = "disk entry";
        let trimmed = input.trim();
        if trimmed.starts_with('(') {
            return parse_sxp(input);
        }
        let (trimmed, script) = split_keywords(trimmed)?;
        let mut fields = trimmed.rsplitn(3, ',');
        let (Some(mode), Some(vdev), Some(uname)) = (fields.next(), fields.next(), fields.next())
        else {
            return Err(SpecError::new(
                what,
                input,
                input,
                "expected UNAME,VDEV,MODE, for example tap:qcow:/var/lib/xen/images/alice/disk0,xvda,w",
            ));
        };
        let mut entry = Self::from_parts(input, uname.trim(), vdev.trim(), mode.trim())?;
        entry.script = script;
        Ok(entry)
    }

    fn from_parts(
        input: &str,
        uname: &str,
        vdev: &str,
        mode: &str,
    ) -> Result<DiskEntry, SpecError> {
        let what = "disk entry";
        let uname =
            DiskUname::parse(uname).map_err(|e| SpecError::new(what, input, &e.part, e.problem))?;
        let vdev_parsed = Vdev::parse(vdev).ok_or_else(|| {
            SpecError::new(
                what,
                input,
                vdev,
                format!(
                    "`{vdev}` is not a virtual device name; use xvdX, hdX, sdX or vdX, optionally \
                     with :cdrom or :disk (for example xvda or xvdc:cdrom)"
                ),
            )
        })?;
        let mode_parsed = DiskMode::parse(mode).ok_or_else(|| {
            SpecError::new(
                what,
                input,
                mode,
                format!("mode `{mode}` is not one of r (read-only), w (writable) or w! (writable, shared)"),
            )
        })?;
        if vdev_parsed.cdrom && mode_parsed.writable() {
            return Err(SpecError::new(
                what,
                input,
                mode,
                "a CD-ROM (VDEV:cdrom) is read-only: use mode r",
            ));
        }
        Ok(DiskEntry {
            uname,
            vdev: vdev_parsed,
            mode: mode_parsed,
            script: None,
        })
    }
}

/// What a daemon's `--disk` takes: a uname, or a full Xen entry `UNAME,VDEV,MODE` (or SXP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskArg {
    /// What backs the disk.
    pub uname: DiskUname,
    /// The entry's virtual device, if a full entry was given.
    pub vdev: Option<Vdev>,
    /// The entry's mode, if a full entry was given.
    pub mode: Option<DiskMode>,
    /// The entry's `script=`, if any.
    pub script: Option<String>,
}

impl DiskArg {
    /// Parses a uname or a full entry: two or more commas (or SXP) make an entry, anything else
    /// a uname (which may hold one comma itself: `iscsi:IQN,LUN`).
    pub fn parse(input: &str) -> Result<DiskArg, SpecError> {
        let sxp = input.trim_start().starts_with('(');
        let (bare, script) = if sxp {
            (input, None)
        } else {
            split_keywords(input)?
        };
        if sxp || bare.matches(',').count() >= 2 {
            let e = DiskEntry::parse(input)?;
            return Ok(DiskArg {
                uname: e.uname,
                vdev: Some(e.vdev),
                mode: Some(e.mode),
                script: e.script,
            });
        }
        Ok(DiskArg {
            uname: DiskUname::parse(bare)?,
            vdev: None,
            mode: None,
            script,
        })
    }

    /// The mode to use: the entry's, or `option` (a daemon's `--mode`), or `default`. An entry
    /// and an option that disagree are an error naming both.
    pub fn mode_with(
        &self,
        option: Option<DiskMode>,
        default: DiskMode,
    ) -> Result<DiskMode, String> {
        match (self.mode, option) {
            (Some(e), Some(o)) if e != o => Err(format!(
                "the disk entry says mode {e} and --mode says {o}: give the mode once"
            )),
            (Some(m), _) | (None, Some(m)) => Ok(m),
            (None, None) => Ok(default),
        }
    }
}

impl DiskUname {
    /// The vback daemon that serves this kind of disk, or `None` when the kind is parsed but
    /// not served by any daemon yet.
    pub fn served_by(&self) -> Option<&'static str> {
        match self {
            DiskUname::Phy(_)
            | DiskUname::Null { .. }
            | DiskUname::Image {
                format: ImageFormat::Raw | ImageFormat::Qcow2,
                ..
            } => Some("blkback"),
            DiskUname::Cdrom(_) => Some("cdrom"),
            DiskUname::Image {
                format: ImageFormat::Vmdk,
                ..
            }
            | DiskUname::Iscsi { .. }
            | DiskUname::Nbd(_)
            | DiskUname::Npiv { .. } => None,
        }
    }
}

impl fmt::Display for DiskEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},{},{}", self.uname, self.vdev, self.mode)?;
        if let Some(s) = &self.script {
            write!(f, ",script={s}")?;
        }
        Ok(())
    }
}

/// `(vbd (dev xvda:disk) (uname file:/img) (mode w) (type disk) (backend 0))`
fn parse_sxp(input: &str) -> Result<DiskEntry, SpecError> {
    let what = "disk entry";
    let bad = |part: &str, problem: &str| SpecError::new(what, input, part, problem);
    let body = input
        .trim()
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| bad(input, "an SXP entry must be one parenthesised list: (vbd (dev ...) (uname ...) (mode ...))"))?
        .trim();
    let Some(rest) = body.strip_prefix("vbd") else {
        return Err(bad(body, "an SXP disk entry starts with (vbd"));
    };
    let (mut dev, mut uname, mut mode, mut script) = (None, None, None, None);
    let mut rest = rest.trim_start();
    while !rest.is_empty() {
        let Some(inner) = rest.strip_prefix('(') else {
            return Err(bad(rest, "expected a (key value) pair"));
        };
        let Some(end) = inner.find(')') else {
            return Err(bad(rest, "unbalanced parenthesis"));
        };
        let pair = &inner[..end];
        rest = inner[end + 1..].trim_start();
        let Some((key, value)) = pair.trim().split_once(char::is_whitespace) else {
            return Err(bad(pair, "expected (key value)"));
        };
        let value = value.trim();
        match key {
            "dev" => dev = Some(value),
            "uname" => uname = Some(value),
            "mode" => mode = Some(value),
            "script" => script = Some(value.to_owned()),
            "type" | "backend" | "bootable" | "driver" => {}
            _ => {
                return Err(bad(
                    key,
                    &format!(
                        "unknown vbd key `{key}`; known keys: dev, uname, mode, script, type, backend, bootable"
                    ),
                ));
            }
        }
    }
    let (Some(dev), Some(uname)) = (dev, uname) else {
        return Err(bad(
            input,
            "an SXP disk entry needs (dev ...) and (uname ...)",
        ));
    };
    let mut entry = DiskEntry::from_parts(input, uname, dev, mode.unwrap_or("w"))?;
    entry.script = script;
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(format: ImageFormat, p: &str) -> DiskUname {
        DiskUname::Image {
            format,
            path: PathBuf::from(p),
        }
    }

    #[test]
    fn every_uname_form() {
        let cases = [
            ("phy:/dev/sdc", DiskUname::Phy("/dev/sdc".into())),
            ("file:/img/a.raw", image(ImageFormat::Raw, "/img/a.raw")),
            ("raw:/img/a.raw", image(ImageFormat::Raw, "/img/a.raw")),
            ("tap:aio:/img/a.raw", image(ImageFormat::Raw, "/img/a.raw")),
            ("tap2:aio:/img/a.raw", image(ImageFormat::Raw, "/img/a.raw")),
            (
                "tap:qcow:/img/a.qcow2",
                image(ImageFormat::Qcow2, "/img/a.qcow2"),
            ),
            (
                "tap:qcow2:/img/a.qcow2",
                image(ImageFormat::Qcow2, "/img/a.qcow2"),
            ),
            (
                "qcow2:/img/a.qcow2",
                image(ImageFormat::Qcow2, "/img/a.qcow2"),
            ),
            (
                "tap:vmdk:/img/a.vmdk",
                image(ImageFormat::Vmdk, "/img/a.vmdk"),
            ),
            ("vmdk:/img/a.vmdk", image(ImageFormat::Vmdk, "/img/a.vmdk")),
            ("tap:cdrom:/dev/sr0", DiskUname::Cdrom("/dev/sr0".into())),
            (
                "tap:cdrom:/isos/x.iso",
                DiskUname::Cdrom("/isos/x.iso".into()),
            ),
            (
                "iscsi:iqn.2001-04.com.example:disk1,3",
                DiskUname::Iscsi {
                    target: "iqn.2001-04.com.example:disk1".into(),
                    lun: 3,
                },
            ),
            (
                "iscsi://127.0.0.1:3260/iqn.2001-04.com.example:d/0",
                DiskUname::Iscsi {
                    target: "iscsi://127.0.0.1:3260/iqn.2001-04.com.example:d".into(),
                    lun: 0,
                },
            ),
            (
                "nbd:127.0.0.1:10809",
                DiskUname::Nbd(NbdAddress::Tcp {
                    host: "127.0.0.1".into(),
                    port: 10809,
                }),
            ),
            (
                "nbd:[::1]:10809",
                DiskUname::Nbd(NbdAddress::Tcp {
                    host: "::1".into(),
                    port: 10809,
                }),
            ),
            (
                "nbd:unix:/run/nbd.sock",
                DiskUname::Nbd(NbdAddress::Unix("/run/nbd.sock".into())),
            ),
            (
                "npiv:210400e08b80c40f,2",
                DiskUname::Npiv {
                    wwpn: "210400e08b80c40f".into(),
                    lun: 2,
                },
            ),
            ("null:1G", DiskUname::Null { size: 1 << 30 }),
        ];
        for (input, want) in cases {
            let got = DiskUname::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(got, want, "{input}");
            // Display round-trips.
            assert_eq!(DiskUname::parse(&got.to_string()).unwrap(), got, "{input}");
        }
    }

    #[test]
    fn malformed_unames_name_the_bad_part() {
        for (input, part, says) in [
            ("/var/lib/img", "/var/lib/img", "never guesses"),
            ("disk.img", "disk.img", "expected one of"),
            ("foo:/x", "foo", "unknown prefix `foo:`"),
            ("ndb:127.0.0.1:10809", "ndb", "did you mean nbd"),
            ("file:", "file:", "must be followed by a path"),
            ("phy:", "phy:", "must be followed by a path"),
            ("tap:qcow:", "tap:qcow:", "must be followed by a path"),
            ("tap:/x", "/x", "needs a driver"),
            ("tap:qed:/x", "qed", "unknown tap driver `qed`"),
            (
                "iscsi:iqn.2001-04.com.example:d",
                "iqn.2001-04.com.example:d",
                "comma",
            ),
            ("iscsi:iqn.x,abc", "abc", "LUN `abc`"),
            ("iscsi:target,0", "target", "iqn."),
            ("iscsi://host/iqn.x", "//host/iqn.x", "iscsi://HOST"),
            ("nbd:host", "host", "nbd:HOST:PORT"),
            ("nbd:host:0", "0", "1 to 65535"),
            ("nbd:host:99999", "99999", "1 to 65535"),
            ("nbd::10809", ":10809", "host is empty"),
            ("nbd:unix:", "unix:", "socket path"),
            ("nbd:[::1:10809", "[::1:10809", "IPV6"),
            ("nbd:::1:10809", "::1", "in brackets"),
            ("nbd:::1]:1080nbd:9", "::1]:1080nbd", "brackets"),
            ("npiv:,1", ",1", "WWPN is empty"),
            ("null:", "", "needs a size"),
            ("null:1000", "1000", "multiple of 512"),
            ("null:0", "0", "non-zero"),
            ("null:1Q", "1Q", "needs a size"),
        ] {
            let e = DiskUname::parse(input).unwrap_err();
            assert_eq!(e.part, part, "{input}: {e}");
            assert!(e.to_string().contains(says), "{input}: {e}");
            assert!(
                e.to_string().starts_with(&format!("disk spec `{input}`")),
                "{e}"
            );
        }
    }

    #[test]
    fn entries() {
        let e = DiskEntry::parse("tap:qcow:/var/lib/xen/images/alice/disk0,xvda,w").unwrap();
        assert_eq!(
            e.uname,
            image(ImageFormat::Qcow2, "/var/lib/xen/images/alice/disk0")
        );
        assert_eq!(e.vdev.name, "xvda");
        assert!(!e.vdev.cdrom);
        assert_eq!(e.mode, DiskMode::ReadWrite);

        let e = DiskEntry::parse("tap:cdrom:/dev/sr0,xvdc:cdrom,r").unwrap();
        assert_eq!(e.uname, DiskUname::Cdrom("/dev/sr0".into()));
        assert!(e.vdev.cdrom);
        assert_eq!(e.mode, DiskMode::ReadOnly);

        let e = DiskEntry::parse("iscsi:iqn.2001-04.com.example:d,1,hdb,w!").unwrap();
        assert_eq!(
            e.uname,
            DiskUname::Iscsi {
                target: "iqn.2001-04.com.example:d".into(),
                lun: 1
            }
        );
        assert_eq!(e.vdev.name, "hdb");
        assert_eq!(e.mode, DiskMode::ReadWriteShared);

        let e = DiskEntry::parse("phy:/dev/sdc, sdb1 , ro").unwrap();
        assert_eq!(e.vdev.name, "sdb1");
        assert_eq!(e.to_string(), "phy:/dev/sdc,sdb1,r");
    }

    #[test]
    fn sxp_entries() {
        let e = DiskEntry::parse(
            "(vbd (dev xvda:disk) (uname file:/var/lib/xen/images/sles11/disk0) (mode w) (type disk) (backend 0))",
        )
        .unwrap();
        assert_eq!(
            e.uname,
            image(ImageFormat::Raw, "/var/lib/xen/images/sles11/disk0")
        );
        assert_eq!(e.vdev.name, "xvda");
        assert_eq!(e.mode, DiskMode::ReadWrite);

        for (input, part) in [
            ("(vbd (dev xvda)", "(dev xvda"),
            ("(vif (dev xvda))", "vif (dev xvda)"),
            ("(vbd (dev xvda) (colour red))", "colour"),
            (
                "(vbd (uname file:/x) (mode w))",
                "(vbd (uname file:/x) (mode w))",
            ),
            ("(vbd (dev xvda) (uname file:/x) (mode x))", "x"),
            ("(vbd (dev xvda) (uname file:/x) junk)", "junk"),
        ] {
            let e = DiskEntry::parse(input).unwrap_err();
            assert_eq!(e.part, part, "{input}: {e}");
        }
    }

    #[test]
    fn malformed_entries_name_the_bad_field() {
        for (input, part, says) in [
            ("file:/img,xvda", "file:/img,xvda", "UNAME,VDEV,MODE"),
            ("file:/img", "file:/img", "UNAME,VDEV,MODE"),
            ("file:/img,xvda,x", "x", "mode `x`"),
            ("file:/img,eth0,w", "eth0", "`eth0` is not a virtual device"),
            ("file:/img,xvd,w", "xvd", "not a virtual device"),
            (
                "file:/img,xvda:floppy,w",
                "xvda:floppy",
                "not a virtual device",
            ),
            ("tap:cdrom:/x.iso,xvdc:cdrom,w", "w", "read-only"),
            ("bogus:/img,xvda,w", "bogus", "unknown prefix"),
            ("/img,xvda,w", "/img", "never guesses"),
        ] {
            let e = DiskEntry::parse(input).unwrap_err();
            assert_eq!(e.part, part, "{input}: {e}");
            assert!(e.to_string().contains(says), "{input}: {e}");
            assert!(
                e.to_string().starts_with(&format!("disk entry `{input}`")),
                "{e}"
            );
        }
    }

    #[test]
    fn a_disk_argument_is_a_uname_or_a_full_entry() {
        let a = DiskArg::parse("tap:aio:/img,xvda,r").unwrap();
        assert_eq!(
            a.uname,
            DiskUname::Image {
                format: ImageFormat::Raw,
                path: "/img".into()
            }
        );
        assert_eq!(a.mode, Some(DiskMode::ReadOnly));
        assert_eq!(a.vdev.as_ref().unwrap().name, "xvda");
        let u = DiskArg::parse("tap:aio:/img").unwrap();
        assert_eq!((u.mode, u.vdev.as_ref()), (None, None));
        let i = DiskArg::parse("iscsi:iqn.2001-04.com.example:disk,1").unwrap();
        assert!(matches!(i.uname, DiskUname::Iscsi { lun: 1, .. }));
        assert_eq!(
            a.mode_with(None, DiskMode::ReadWrite),
            Ok(DiskMode::ReadOnly)
        );
        assert!(
            a.mode_with(Some(DiskMode::ReadWrite), DiskMode::ReadWrite)
                .unwrap_err()
                .contains("give the mode once")
        );
        assert_eq!(
            u.mode_with(None, DiskMode::ReadWrite),
            Ok(DiskMode::ReadWrite)
        );
        assert!(DiskArg::parse("tap:aio:/img,xvda,q").is_err());
        assert_eq!(DiskUname::parse("nbd:h:1").unwrap().served_by(), None);
        assert_eq!(
            DiskUname::parse("tap:qcow:/x").unwrap().served_by(),
            Some("blkback")
        );
    }

    #[test]
    fn xl_script_keyword() {
        let e = DiskEntry::parse("phy:/dev/vg0/alice,xvda,w,script=block-lvm").unwrap();
        assert_eq!(e.uname, DiskUname::Phy("/dev/vg0/alice".into()));
        assert_eq!(e.script.as_deref(), Some("block-lvm"));
        assert_eq!(e.to_string(), "phy:/dev/vg0/alice,xvda,w,script=block-lvm");
        assert_eq!(DiskEntry::parse(&e.to_string()).unwrap(), e);
        // A uname with its own comma keeps it.
        let e =
            DiskEntry::parse("iscsi:iqn.2001-04.com.example:t,2,xvdb,r,script=/etc/x/s").unwrap();
        assert_eq!(e.script.as_deref(), Some("/etc/x/s"));
        assert!(matches!(e.uname, DiskUname::Iscsi { lun: 2, .. }));
        // A bare uname with script=, and the SXP form.
        let a = DiskArg::parse("tap:aio:/img,script=block").unwrap();
        assert_eq!(a.script.as_deref(), Some("block"));
        assert_eq!(a.vdev, None);
        let a = DiskArg::parse("tap:aio:/img,xvda,r,script=block").unwrap();
        assert_eq!(a.script.as_deref(), Some("block"));
        assert_eq!(a.mode, Some(DiskMode::ReadOnly));
        let e = DiskEntry::parse("(vbd (dev xvda) (uname phy:/dev/sdc) (mode w) (script block))")
            .unwrap();
        assert_eq!(e.script.as_deref(), Some("block"));
        assert_eq!(
            DiskEntry::parse("tap:aio:/img,xvda,w").unwrap().script,
            None
        );
        // Refused with the bad part named.
        let err = DiskEntry::parse("phy:/dev/sdc,xvda,w,script=").unwrap_err();
        assert!(err.to_string().contains("script="), "{err}");
        let err = DiskEntry::parse("phy:/dev/sdc,xvda,w,script=a,script=b").unwrap_err();
        assert!(err.to_string().contains("twice"), "{err}");
    }
}
