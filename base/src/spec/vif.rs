//! Xen network interface specs: comma-separated `key=value` lists, as in a domain file's
//! `vif = ['bridge=br0,mac=00:16:3e:4f:94:a9,rate=100Mb/s@20ms,script=vif-bridge,vifname=alice.0,ip=192.168.1.21']`.
//!
//! Keys (Xen's, plus `rate_rx` which Xen does not have):
//!
//! | key | meaning |
//! |---|---|
//! | `bridge` | bridge to join (vif-bridge) |
//! | `mac` | guest MAC; a random `00:16:3e:xx:xx:xx` when absent |
//! | `ip` | guest addresses, space separated (vif-route, vif-nat) |
//! | `script` | hotplug script: `vif-bridge`, `vif-route`, `vif-nat` or a path |
//! | `vifname` | host interface name; default `vif<domid>.<devid>` |
//! | `rate` | guest transmit limit `RATE[@INTERVAL]` |
//! | `rate_rx` | guest receive limit (vback only) |
//! | `mtu` | interface MTU |
//! | `model`, `type`, `backend` | accepted for compatibility with Xen files; not used by vback |

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use super::{Rate, SpecError};

/// The keys a vif spec may contain.
pub const VIF_KEYS: &[&str] = &[
    "bridge", "mac", "ip", "script", "vifname", "rate", "rate_rx", "mtu", "model", "type",
    "backend",
];

/// Xen's (XenSource's) organisationally unique identifier: `00:16:3e`.
pub const XEN_OUI: [u8; 3] = [0x00, 0x16, 0x3e];

/// An Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A random address in Xen's range `00:16:3e:xx:xx:xx` (the last three bytes from the
    /// kernel's random source, the top bit of the fourth cleared as Xen does).
    pub fn random_xen() -> MacAddr {
        let mut b = [0u8; 3];
        // A failure to read randomness is not worth dying over: fall back to time and pid.
        if std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
            .is_err()
        {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
                ^ std::process::id();
            b = [(t >> 16) as u8, (t >> 8) as u8, t as u8];
        }
        MacAddr([XEN_OUI[0], XEN_OUI[1], XEN_OUI[2], b[0] & 0x7f, b[1], b[2]])
    }

    /// Whether the multicast (group) bit is set: such an address cannot be a NIC's.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }
}

impl FromStr for MacAddr {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let mut out = [0u8; 6];
        let mut n = 0;
        for part in s.split(':') {
            if n == 6 || part.is_empty() || part.len() > 2 {
                return Err(());
            }
            out[n] = u8::from_str_radix(part, 16).map_err(|_| ())?;
            n += 1;
        }
        if n == 6 { Ok(MacAddr(out)) } else { Err(()) }
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// A parsed vif spec. Absent keys are `None`/empty; defaults that depend on the domain (the
/// interface name) are applied by the backend.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VifSpec {
    /// `bridge=`.
    pub bridge: Option<String>,
    /// `mac=`.
    pub mac: Option<MacAddr>,
    /// `ip=` (space separated in Xen files).
    pub ip: Vec<IpAddr>,
    /// `script=`.
    pub script: Option<String>,
    /// `vifname=`.
    pub vifname: Option<String>,
    /// `rate=`: guest transmit limit.
    pub rate: Option<Rate>,
    /// `rate_rx=`: guest receive limit (vback extension).
    pub rate_rx: Option<Rate>,
    /// `mtu=`.
    pub mtu: Option<u16>,
    /// `model=`, kept for compatibility.
    pub model: Option<String>,
    /// `type=`, kept for compatibility.
    pub kind: Option<String>,
    /// `backend=`, kept for compatibility.
    pub backend: Option<String>,
}

impl VifSpec {
    /// Parses `key=value[,key=value...]`. An empty string is a valid spec with every default.
    pub fn parse(input: &str) -> Result<VifSpec, SpecError> {
        let what = "vif spec";
        let mut spec = VifSpec::default();
        let mut seen: Vec<&str> = Vec::new();
        for item in input.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let Some((key, value)) = item.split_once('=') else {
                return Err(SpecError::new(
                    what,
                    input,
                    item,
                    format!(
                        "`{item}` is not key=value (known keys: {})",
                        VIF_KEYS.join(", ")
                    ),
                ));
            };
            let (key, value) = (key.trim(), value.trim());
            let bad = |problem: String| {
                SpecError::new(what, input, key, format!("{key}={value}: {problem}"))
            };
            if seen.contains(&key) {
                return Err(bad("the key is given twice".into()));
            }
            if value.is_empty() {
                return Err(bad("the value is empty".into()));
            }
            // `bridge=br0 mac=...`: keys separated by a space instead of a comma.
            if let Some(next) = value.split_whitespace().skip(1).find(|w| {
                w.split_once('=')
                    .is_some_and(|(k, _)| VIF_KEYS.contains(&k))
            }) {
                let first = value.split_whitespace().next().unwrap_or_default();
                return Err(bad(format!(
                    "the value contains a space; separate keys with commas, as in `{key}={first},{next}`"
                )));
            }
            match key {
                "bridge" => {
                    check_ifname(value)
                        .map_err(|p| bad(format!("not a valid bridge name: {p}")))?;
                    spec.bridge = Some(value.to_owned());
                }
                "mac" => {
                    let mac: MacAddr = value.parse().map_err(|()| {
                        bad("expected six hex bytes separated by colons, for example 00:16:3e:4f:94:a9".into())
                    })?;
                    if mac.is_multicast() {
                        return Err(bad(
                            "a multicast address (first byte odd) cannot be a NIC's".into(),
                        ));
                    }
                    spec.mac = Some(mac);
                }
                "ip" => {
                    for a in value.split_whitespace() {
                        let ip = a.parse().map_err(|_| {
                            bad(format!(
                                "`{a}` is not an IP address (several are separated by spaces)"
                            ))
                        })?;
                        spec.ip.push(ip);
                    }
                }
                "script" => {
                    if value.contains('\0') {
                        return Err(bad("the script name contains a NUL byte".into()));
                    }
                    spec.script = Some(value.to_owned());
                }
                "vifname" => {
                    check_ifname(value)
                        .map_err(|p| bad(format!("not a valid interface name: {p}")))?;
                    spec.vifname = Some(value.to_owned());
                }
                "rate" | "rate_rx" => {
                    let r = Rate::parse(value)
                        .map_err(|e| bad(format!("{} (in `{}`)", e.problem, e.part)))?;
                    if key == "rate" {
                        spec.rate = Some(r);
                    } else {
                        spec.rate_rx = Some(r);
                    }
                }
                "mtu" => {
                    let mtu = value
                        .parse::<u16>()
                        .ok()
                        .filter(|m| *m >= 68)
                        .ok_or_else(|| bad("the MTU must be a number from 68 to 65535".into()))?;
                    spec.mtu = Some(mtu);
                }
                "model" => spec.model = Some(value.to_owned()),
                "type" => spec.kind = Some(value.to_owned()),
                "backend" => spec.backend = Some(value.to_owned()),
                _ => {
                    return Err(SpecError::new(
                        what,
                        input,
                        key,
                        format!("unknown key `{key}`; known keys: {}", VIF_KEYS.join(", ")),
                    ));
                }
            }
            seen.push(key);
        }
        Ok(spec)
    }

    /// The host interface name: `vifname=` or Xen's `vif<domid>.<devid>`.
    pub fn host_ifname(&self, domid: u32, devid: u32) -> String {
        self.vifname
            .clone()
            .unwrap_or_else(|| format!("vif{domid}.{devid}"))
    }
}

/// Linux interface names: 1 to 15 bytes, no '/', ':' or whitespace, not "." or "..".
fn check_ifname(name: &str) -> Result<(), &'static str> {
    if name.chars().any(char::is_whitespace) {
        return Err("it contains white space");
    }
    if name.chars().any(|c| c == '/' || c == ':' || c.is_control()) {
        return Err("it contains '/', ':' or a control character");
    }
    if name.len() > 15 {
        return Err("longer than 15 characters");
    }
    if name == "." || name == ".." {
        return Err("`.` and `..` are reserved");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guides_example() {
        let v = VifSpec::parse(
            "bridge=br0,mac=00:16:3e:4f:94:a9,rate=100Mb/s@20ms,script=vif-bridge,vifname=alice.0,ip=192.168.1.21",
        )
        .unwrap();
        assert_eq!(v.bridge.as_deref(), Some("br0"));
        assert_eq!(v.mac.unwrap().to_string(), "00:16:3e:4f:94:a9");
        assert_eq!(v.rate.unwrap().credit_bytes, 250_000);
        assert_eq!(v.script.as_deref(), Some("vif-bridge"));
        assert_eq!(v.host_ifname(3, 0), "alice.0");
        assert_eq!(v.ip, vec!["192.168.1.21".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn defaults_and_extras() {
        let v = VifSpec::parse("").unwrap();
        assert_eq!(v, VifSpec::default());
        assert_eq!(v.host_ifname(7, 1), "vif7.1");
        let v = VifSpec::parse(
            " ip=10.0.0.2 10.0.0.3 , rate_rx=1MB/s , mtu=9000,model=virtio,type=vif,backend=0",
        )
        .unwrap();
        assert_eq!(v.ip.len(), 2);
        assert_eq!(v.rate_rx.unwrap().credit_bytes, 50_000);
        assert_eq!(v.mtu, Some(9000));
    }

    #[test]
    fn random_macs_are_xen_unicast() {
        for _ in 0..32 {
            let m = MacAddr::random_xen();
            assert_eq!(m.0[..3], XEN_OUI);
            assert_eq!(m.0[3] & 0x80, 0);
            assert!(!m.is_multicast());
            assert_eq!(m.to_string().parse::<MacAddr>().unwrap(), m);
        }
    }

    #[test]
    fn malformed_vifs_name_the_key() {
        for (input, part, says) in [
            ("colour=red", "colour", "unknown key `colour`"),
            ("bridge", "bridge", "not key=value"),
            ("bridge=", "bridge", "empty"),
            ("bridge=br0,bridge=br1", "bridge", "twice"),
            ("mac=00:16:3e:4f:94", "mac", "six hex bytes"),
            ("mac=00:16:3e:4f:94:zz", "mac", "six hex bytes"),
            ("mac=01:16:3e:4f:94:a9", "mac", "multicast"),
            ("ip=192.168.1.300", "ip", "`192.168.1.300` is not an IP"),
            ("rate=100Mbit/s", "rate", "b/s"),
            ("rate=100Mb/s@20h", "rate", "unit"),
            ("rate_rx=0B/s", "rate_rx", "zero"),
            ("vifname=a-very-long-interface-name", "vifname", "15"),
            ("vifname=a/b", "vifname", "'/'"),
            ("bridge=br 0", "bridge", "white space"),
            ("mtu=20", "mtu", "68 to 65535"),
            ("mtu=big", "mtu", "68 to 65535"),
            // A space instead of a comma between keys.
            (
                "bridge=br0 mac=00:16:3e:4f:94:a9",
                "bridge",
                "the value contains a space; separate keys with commas, as in \
                 `bridge=br0,mac=00:16:3e:4f:94:a9`",
            ),
            (
                "ip=10.0.0.2 10.0.0.3 script=vif-route",
                "ip",
                "separate keys with commas, as in `ip=10.0.0.2,script=vif-route`",
            ),
            (
                "vifname=a-long-name mtu=1500",
                "vifname",
                "contains a space",
            ),
            ("bridge=a-very-long-bridge name", "bridge", "white space"),
        ] {
            let e = VifSpec::parse(input).unwrap_err();
            assert_eq!(e.part, part, "{input}: {e}");
            assert!(e.to_string().contains(says), "{input}: {e}");
            assert!(
                e.to_string().starts_with(&format!("vif spec `{input}`")),
                "{e}"
            );
        }
    }
}
