//! The validated configuration: device specs parsed from the command line.

use std::path::PathBuf;

use crate::mmio::{Kind, MAX_DEVICES};

/// Where the serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialOut {
    /// Standard output (input from standard input).
    Stdio,
    /// A file (input still from standard input).
    File(PathBuf),
}

/// Everything vmm-min needs to start a VM.
#[derive(Debug, Clone)]
pub struct Config {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initrd: Option<PathBuf>,
    /// Command line (device announcements are appended).
    pub cmdline: String,
    /// Guest memory in bytes.
    pub mem: u64,
    /// vCPUs.
    pub cpus: u8,
    /// Describe the machine in ACPI tables (MADT, and the devices in the DSDT).
    pub acpi: bool,
    /// Serial output.
    pub serial: SerialOut,
    /// Devices in MMIO slot order.
    pub devices: Vec<(Kind, PathBuf)>,
    /// API socket.
    pub api: Option<PathBuf>,
}

/// A bad device or serial spec.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// An option in a device spec is unknown.
    #[error("--{dev} `{spec}`: unknown option `{opt}` (accepted: {accepted})")]
    UnknownOption {
        /// blk, net or scsi.
        dev: &'static str,
        /// The whole spec.
        spec: String,
        /// The bad option.
        opt: String,
        /// What is accepted.
        accepted: &'static str,
    },
    /// The socket path is empty.
    #[error("--{dev} `{spec}`: the socket path is empty")]
    NoSocket {
        /// blk, net or scsi.
        dev: &'static str,
        /// The whole spec.
        spec: String,
    },
    /// A MAC address does not parse.
    #[error("--net `{spec}`: `{mac}` is not a MAC address like 52:54:00:12:34:56")]
    BadMac {
        /// The whole spec.
        spec: String,
        /// The bad value.
        mac: String,
    },
    /// Too many devices.
    #[error(
        "{count} devices given; vmm-min places at most {MAX_DEVICES} (interrupt lines 5 to 15)"
    )]
    TooManyDevices {
        /// How many.
        count: usize,
    },
    /// The serial spec.
    #[error("--serial `{0}` is not stdio or file:PATH")]
    Serial(String),
}

/// Parses `SOCK[,ro]`.
pub fn parse_blk(spec: &str) -> Result<(Kind, PathBuf), ConfigError> {
    let mut parts = spec.split(',');
    let sock = socket("blk", spec, parts.next())?;
    let mut read_only = false;
    for opt in parts {
        match opt {
            "ro" => read_only = true,
            "rw" => read_only = false,
            _ => {
                return Err(ConfigError::UnknownOption {
                    dev: "blk",
                    spec: spec.into(),
                    opt: opt.into(),
                    accepted: "ro, rw",
                });
            }
        }
    }
    Ok((Kind::Blk { read_only }, sock))
}

/// Parses `SOCK[,mac=XX:XX:XX:XX:XX:XX]`.
pub fn parse_net(spec: &str) -> Result<(Kind, PathBuf), ConfigError> {
    let mut parts = spec.split(',');
    let sock = socket("net", spec, parts.next())?;
    let mut mac = None;
    for opt in parts {
        match opt.split_once('=') {
            Some(("mac", v)) => {
                mac = Some(parse_mac(v).ok_or_else(|| ConfigError::BadMac {
                    spec: spec.into(),
                    mac: v.into(),
                })?);
            }
            _ => {
                return Err(ConfigError::UnknownOption {
                    dev: "net",
                    spec: spec.into(),
                    opt: opt.into(),
                    accepted: "mac=XX:XX:XX:XX:XX:XX",
                });
            }
        }
    }
    Ok((Kind::Net { mac }, sock))
}

/// Parses `SOCK`.
pub fn parse_scsi(spec: &str) -> Result<(Kind, PathBuf), ConfigError> {
    let mut parts = spec.split(',');
    let sock = socket("scsi", spec, parts.next())?;
    if let Some(opt) = parts.next() {
        return Err(ConfigError::UnknownOption {
            dev: "scsi",
            spec: spec.into(),
            opt: opt.into(),
            accepted: "none",
        });
    }
    Ok((Kind::Scsi, sock))
}

/// Parses `stdio` or `file:PATH`.
pub fn parse_serial(spec: &str) -> Result<SerialOut, ConfigError> {
    match spec.strip_prefix("file:") {
        Some(p) if !p.is_empty() => Ok(SerialOut::File(p.into())),
        Some(_) => Err(ConfigError::Serial(spec.into())),
        None if spec == "stdio" => Ok(SerialOut::Stdio),
        None => Err(ConfigError::Serial(spec.into())),
    }
}

/// Checks the device count.
pub fn check_devices(devices: &[(Kind, PathBuf)]) -> Result<(), ConfigError> {
    if devices.len() > MAX_DEVICES {
        return Err(ConfigError::TooManyDevices {
            count: devices.len(),
        });
    }
    Ok(())
}

fn socket(dev: &'static str, spec: &str, s: Option<&str>) -> Result<PathBuf, ConfigError> {
    match s {
        Some(s) if !s.is_empty() => Ok(s.into()),
        _ => Err(ConfigError::NoSocket {
            dev,
            spec: spec.into(),
        }),
    }
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut n = 0;
    for part in s.split(':') {
        if n == 6 || part.len() != 2 {
            return None;
        }
        mac[n] = u8::from_str_radix(part, 16).ok()?;
        n += 1;
    }
    (n == 6).then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specs() {
        assert_eq!(
            parse_blk("/s,ro").unwrap(),
            (Kind::Blk { read_only: true }, PathBuf::from("/s"))
        );
        assert_eq!(
            parse_net("/n,mac=02:00:00:00:00:0a").unwrap().0,
            Kind::Net {
                mac: Some([2, 0, 0, 0, 0, 10])
            }
        );
        assert_eq!(parse_scsi("/c").unwrap().0, Kind::Scsi);
    }

    #[test]
    fn bad_specs_name_the_bad_part() {
        let e = parse_blk("/s,rx").unwrap_err().to_string();
        assert!(e.contains("`rx`") && e.contains("ro, rw"), "{e}");
        assert!(matches!(
            parse_blk(",ro"),
            Err(ConfigError::NoSocket { .. })
        ));
        let e = parse_net("/n,mac=02:00:00:00:00").unwrap_err().to_string();
        assert!(e.contains("02:00:00:00:00"), "{e}");
        assert!(parse_net("/n,mac=02:00:00:00:00:0g").is_err());
        assert!(parse_net("/n,mac=02:00:00:00:00:00:01").is_err());
        assert!(parse_scsi("/c,x").is_err());
        assert_eq!(
            parse_serial("file:").unwrap_err(),
            ConfigError::Serial("file:".into())
        );
        assert_eq!(
            parse_serial("tty").unwrap_err(),
            ConfigError::Serial("tty".into())
        );
        assert_eq!(
            parse_serial("file:/x").unwrap(),
            SerialOut::File("/x".into())
        );
    }

    #[test]
    fn device_count_is_bounded() {
        let d = vec![(Kind::Scsi, PathBuf::from("/c")); MAX_DEVICES + 1];
        assert!(check_devices(&d).is_err());
        assert!(check_devices(&d[..MAX_DEVICES]).is_ok());
    }
}
