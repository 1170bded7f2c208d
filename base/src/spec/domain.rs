//! Domain configuration files in xm/xl style (`/etc/xen/vm/alice`), the way the guide writes
//! them:
//!
//! ```text
//! name = "alice"
//! memory = 512
//! vcpus = 2
//! kernel = "/boot/vmlinuz"
//! ramdisk = "/boot/initrd"
//! extra = "console=ttyS0 root=/dev/vda"
//! disk = [ 'tap:qcow:/var/lib/xen/images/alice/disk0,xvda,w',
//!          'tap:cdrom:/isos/x.iso,xvdc:cdrom,r' ]
//! vif = [ 'bridge=br0,mac=00:16:3e:00:00:01,rate=100Mb/s@20ms' ]
//! description = "Responsible: tux@example.com"
//! ```
//!
//! The syntax is the Python subset xm files use: `key = value` per line, values a quoted string
//! (`'...'` or `"..."`, with `\\`, `\'`, `\"`, `\n` and `\t` escapes), an integer, or a list of
//! them in `[...]` that may span lines, with an optional trailing comma; `#` starts a comment
//! outside strings. Every disk and vif entry is parsed by the same parsers as the daemons'
//! options ([`DiskEntry`], [`VifSpec`]). An unknown key, a key given twice, a value of the wrong
//! kind or a bad entry is an error naming the line, so a typo is never silently ignored.

use std::fmt;

use super::{DiskEntry, SpecError, VifSpec};

/// The keys a domain file may set.
pub const DOMAIN_KEYS: &[&str] = &[
    "name",
    "description",
    "uuid",
    "memory",
    "maxmem",
    "vcpus",
    "kernel",
    "ramdisk",
    "extra",
    "root",
    "disk",
    "vif",
    "usb",
    "usbdev",
    "on_poweroff",
    "on_reboot",
    "on_crash",
];

/// What a domain's lifecycle event leads to (`on_poweroff`, `on_reboot`, `on_crash`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LifecycleAction {
    /// Stop the domain and its backends.
    Destroy,
    /// Start it again.
    Restart,
    /// Keep it as it is (for inspection).
    Preserve,
}

/// A parsed domain file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainConfig {
    /// `name`: the domain's name (required): letters, digits, `-`, `_` and `.`.
    pub name: String,
    /// `description`: free text (the guide's section 9.6).
    pub description: Option<String>,
    /// `uuid`.
    pub uuid: Option<String>,
    /// `memory` in MiB (default 128, as xm).
    pub memory_mib: u64,
    /// `maxmem` in MiB (at least `memory`).
    pub maxmem_mib: Option<u64>,
    /// `vcpus` (default 1).
    pub vcpus: u32,
    /// `kernel`, `ramdisk`, `extra` and `root` (direct kernel boot; `root` is added to the
    /// command line as `root=...`).
    pub kernel: Option<String>,
    /// See [`DomainConfig::kernel`].
    pub ramdisk: Option<String>,
    /// See [`DomainConfig::kernel`].
    pub extra: Option<String>,
    /// See [`DomainConfig::kernel`].
    pub root: Option<String>,
    /// `disk`: the domain's disks, in order.
    pub disks: Vec<DiskEntry>,
    /// `vif`: its network interfaces, in order.
    pub vifs: Vec<VifSpec>,
    /// `usb`: give the domain a USB controller.
    pub usb: bool,
    /// `usbdev`: host USB devices to pass through (`BUS-PORT` such as `4-2`, or
    /// `host:VENDOR:PRODUCT`).
    pub usbdevs: Vec<String>,
    /// `on_poweroff`, `on_reboot`, `on_crash` (defaults: destroy, restart, destroy).
    pub on_poweroff: LifecycleAction,
    /// See [`DomainConfig::on_poweroff`].
    pub on_reboot: LifecycleAction,
    /// See [`DomainConfig::on_poweroff`].
    pub on_crash: LifecycleAction,
}

/// Why a domain file was refused: the line (1-based) and what is wrong there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainConfigError {
    /// The line the problem is on (1-based; 0 for the file as a whole).
    pub line: usize,
    /// What is wrong, as a sentence.
    pub problem: String,
}

impl fmt::Display for DomainConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            f.write_str(&self.problem)
        } else {
            write!(f, "line {}: {}", self.line, self.problem)
        }
    }
}

impl std::error::Error for DomainConfigError {}

fn err(line: usize, problem: impl Into<String>) -> DomainConfigError {
    DomainConfigError {
        line,
        problem: problem.into(),
    }
}

/// A value as written.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Value {
    Str(String),
    Int(i64),
    List(Vec<(usize, Value)>),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::Str(_) => "a string",
            Value::Int(_) => "a number",
            Value::List(_) => "a list",
        }
    }
}

/// Longest file taken (a domain file is a few hundred bytes).
const MAX_FILE: usize = 1 << 20;
/// Most entries in one list.
const MAX_LIST: usize = 256;

/// A character reader that counts lines.
struct Lexer<'a> {
    chars: std::iter::Peekable<std::str::Chars<'a>>,
    line: usize,
}

impl Lexer<'_> {
    fn peek(&mut self) -> Option<char> {
        self.chars.peek().copied()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.chars.next();
        if c == Some('\n') {
            self.line += 1;
        }
        c
    }

    /// Skips spaces and comments; with `newlines`, line ends too.
    fn skip(&mut self, newlines: bool) {
        while let Some(c) = self.peek() {
            match c {
                '#' => {
                    while self.peek().is_some_and(|c| c != '\n') {
                        self.bump();
                    }
                }
                '\n' if newlines => {
                    self.bump();
                }
                // A backslash at the end of a line continues it, as in Python.
                '\\' => {
                    let mut ahead = self.chars.clone();
                    ahead.next();
                    if ahead.next() == Some('\n') {
                        self.bump();
                        self.bump();
                    } else {
                        return;
                    }
                }
                c if c.is_whitespace() && c != '\n' => {
                    self.bump();
                }
                _ => return,
            }
        }
    }

    fn key(&mut self) -> Result<String, DomainConfigError> {
        let mut k = String::new();
        while let Some(c) = self.peek() {
            if c.is_ascii_alphanumeric() || c == '_' {
                k.push(c);
                self.bump();
            } else {
                break;
            }
        }
        if k.is_empty() || k.starts_with(|c: char| c.is_ascii_digit()) {
            let what = self.peek().map_or("the end of the file".into(), |c| {
                format!("`{}`", c.escape_default())
            });
            return Err(err(
                self.line,
                format!("expected `key = value`, found {what}"),
            ));
        }
        Ok(k)
    }

    fn value(&mut self, depth: usize) -> Result<Value, DomainConfigError> {
        match self.peek() {
            Some(q @ ('\'' | '"')) => {
                self.bump();
                self.string(q).map(Value::Str)
            }
            Some('[') if depth == 0 => {
                self.bump();
                let mut items = Vec::new();
                loop {
                    self.skip(true);
                    if self.peek() == Some(']') {
                        self.bump();
                        return Ok(Value::List(items));
                    }
                    if items.len() == MAX_LIST {
                        return Err(err(
                            self.line,
                            format!("a list of more than {MAX_LIST} entries"),
                        ));
                    }
                    let line = self.line;
                    items.push((line, self.value(depth + 1)?));
                    self.skip(true);
                    match self.bump() {
                        Some(',') => {}
                        Some(']') => return Ok(Value::List(items)),
                        Some(c) => {
                            return Err(err(
                                self.line,
                                format!(
                                    "expected `,` or `]` in the list, found `{}`",
                                    c.escape_default()
                                ),
                            ));
                        }
                        None => {
                            return Err(err(
                                line,
                                "the list is not closed with `]` before the end of the file",
                            ));
                        }
                    }
                }
            }
            Some('[') => Err(err(
                self.line,
                "lists inside lists are not used in domain files",
            )),
            Some(c) if c.is_ascii_digit() || c == '-' => {
                let mut n = String::new();
                while let Some(c) = self.peek() {
                    if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                        n.push(c);
                        self.bump();
                    } else {
                        break;
                    }
                }
                let digits = n.replace('_', "");
                digits
                    .parse::<i64>()
                    .map(Value::Int)
                    .map_err(|_| err(self.line, format!("`{n}` is not a number")))
            }
            Some(c) => Err(err(
                self.line,
                format!(
                    "`{}` does not start a value: write a quoted string, a number or a [list]",
                    c.escape_default()
                ),
            )),
            None => Err(err(
                self.line,
                "the value is missing at the end of the file",
            )),
        }
    }

    fn string(&mut self, quote: char) -> Result<String, DomainConfigError> {
        let start = self.line;
        let mut s = String::new();
        loop {
            match self.bump() {
                None | Some('\n') => {
                    return Err(err(
                        start,
                        format!("the string is not closed with {quote} on its line"),
                    ));
                }
                Some(c) if c == quote => return Ok(s),
                Some('\\') => match self.bump() {
                    Some('n') => s.push('\n'),
                    Some('t') => s.push('\t'),
                    Some(c @ ('\\' | '\'' | '"')) => s.push(c),
                    Some('\n') => {}
                    Some(c) => {
                        s.push('\\');
                        s.push(c);
                    }
                    None => {
                        return Err(err(start, "the string is not closed before the end"));
                    }
                },
                Some(c) => s.push(c),
            }
        }
    }
}

impl DomainConfig {
    /// Parses a domain file's text.
    pub fn parse(text: &str) -> Result<DomainConfig, DomainConfigError> {
        if text.len() > MAX_FILE {
            return Err(err(
                0,
                format!(
                    "the file is larger than {} KiB: not a domain file",
                    MAX_FILE >> 10
                ),
            ));
        }
        let mut lx = Lexer {
            chars: text.chars().peekable(),
            line: 1,
        };
        let mut seen: Vec<(String, usize)> = Vec::new();
        let mut values: Vec<(String, usize, Value)> = Vec::new();
        loop {
            lx.skip(true);
            if lx.peek().is_none() {
                break;
            }
            let line = lx.line;
            let key = lx.key()?;
            if !DOMAIN_KEYS.contains(&key.as_str()) {
                return Err(err(
                    line,
                    format!("unknown key `{key}` (known: {})", DOMAIN_KEYS.join(", ")),
                ));
            }
            if let Some((_, first)) = seen.iter().find(|(k, _)| *k == key) {
                return Err(err(
                    line,
                    format!("`{key}` is set again (first on line {first}): set it once"),
                ));
            }
            seen.push((key.clone(), line));
            lx.skip(false);
            if lx.bump() != Some('=') {
                return Err(err(line, format!("expected `=` after `{key}`")));
            }
            lx.skip(false);
            let v = lx.value(0)?;
            lx.skip(false);
            match lx.peek() {
                None | Some('\n') | Some(';') => {
                    if lx.peek() == Some(';') {
                        lx.bump();
                    }
                }
                Some(c) => {
                    return Err(err(
                        lx.line,
                        format!(
                            "unexpected `{}` after the value of `{key}`",
                            c.escape_default()
                        ),
                    ));
                }
            }
            values.push((key, line, v));
        }
        Self::from_values(values)
    }

    fn from_values(values: Vec<(String, usize, Value)>) -> Result<DomainConfig, DomainConfigError> {
        let mut c = DomainConfig {
            name: String::new(),
            description: None,
            uuid: None,
            memory_mib: 128,
            maxmem_mib: None,
            vcpus: 1,
            kernel: None,
            ramdisk: None,
            extra: None,
            root: None,
            disks: Vec::new(),
            vifs: Vec::new(),
            usb: false,
            usbdevs: Vec::new(),
            on_poweroff: LifecycleAction::Destroy,
            on_reboot: LifecycleAction::Restart,
            on_crash: LifecycleAction::Destroy,
        };
        let mut name_line = None;
        let mut memory_line = 0;
        for (key, line, v) in values {
            let wrong = |want: &str| err(line, format!("`{key}` takes {want}, not {}", v.kind()));
            let string = || match &v {
                Value::Str(s) => Ok(s.clone()),
                _ => Err(wrong("a quoted string")),
            };
            let number = |min: i64, max: i64, unit: &str| match v {
                Value::Int(n) if (min..=max).contains(&n) => Ok(n),
                Value::Int(n) => Err(err(
                    line,
                    format!("`{key}` = {n} is out of range ({min} to {max}{unit})"),
                )),
                _ => Err(wrong("a number")),
            };
            let strings = |what: &str| -> Result<Vec<(usize, String)>, DomainConfigError> {
                match &v {
                    Value::List(items) => items
                        .iter()
                        .map(|(l, v)| match v {
                            Value::Str(s) => Ok((*l, s.clone())),
                            other => Err(err(
                                *l,
                                format!(
                                    "each {what} in `{key}` is a quoted string, not {}",
                                    other.kind()
                                ),
                            )),
                        })
                        .collect(),
                    // One entry without brackets, as xm accepts.
                    Value::Str(s) => Ok(vec![(line, s.clone())]),
                    Value::Int(_) => Err(wrong("a list of quoted strings")),
                }
            };
            match key.as_str() {
                "name" => {
                    let n = string()?;
                    if n.is_empty()
                        || n.len() > 64
                        || !n
                            .chars()
                            .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
                        || n.starts_with('.')
                    {
                        return Err(err(
                            line,
                            format!(
                                "name `{}` must be 1 to 64 letters, digits, `-`, `_` or `.` (not \
                                 starting with `.`): it names the domain's directory under \
                                 /run/vback",
                                n.escape_default()
                            ),
                        ));
                    }
                    c.name = n;
                    name_line = Some(line);
                }
                "description" => c.description = Some(string()?),
                "uuid" => {
                    let u = string()?;
                    let ok = u.len() == 36
                        && u.char_indices().all(|(i, ch)| {
                            if [8, 13, 18, 23].contains(&i) {
                                ch == '-'
                            } else {
                                ch.is_ascii_hexdigit()
                            }
                        });
                    if !ok {
                        return Err(err(
                            line,
                            format!(
                                "uuid `{}` is not of the form 8-4-4-4-12 hexadecimal digits",
                                u.escape_default()
                            ),
                        ));
                    }
                    c.uuid = Some(u.to_ascii_lowercase());
                }
                "memory" => {
                    c.memory_mib = number(16, 1 << 22, " MiB")? as u64;
                    memory_line = line;
                }
                "maxmem" => c.maxmem_mib = Some(number(16, 1 << 22, " MiB")? as u64),
                "vcpus" => c.vcpus = number(1, 255, "")? as u32,
                "kernel" => c.kernel = Some(string()?),
                "ramdisk" => c.ramdisk = Some(string()?),
                "extra" => c.extra = Some(string()?),
                "root" => c.root = Some(string()?),
                "disk" => {
                    for (l, s) in strings("disk entry")? {
                        let d = DiskEntry::parse(&s).map_err(|e| spec_err(l, &e))?;
                        if let Some(other) = c.disks.iter().find(|o| o.vdev.name == d.vdev.name) {
                            return Err(err(
                                l,
                                format!(
                                    "two disks are called {} (`{other}` and `{d}`): give each its own vdev",
                                    d.vdev.name
                                ),
                            ));
                        }
                        c.disks.push(d);
                    }
                }
                "vif" => {
                    for (l, s) in strings("vif spec")? {
                        let spec = VifSpec::parse(&s).map_err(|e| spec_err(l, &e))?;
                        if let Some(mac) = spec.mac
                            && c.vifs.iter().any(|o| o.mac == Some(mac))
                        {
                            return Err(err(
                                l,
                                format!("two vifs have the MAC address {mac}: give each its own"),
                            ));
                        }
                        c.vifs.push(spec);
                    }
                }
                "usb" => c.usb = number(0, 1, " (0 or 1)")? == 1,
                "usbdev" => {
                    for (l, s) in strings("USB device")? {
                        if !usb_device_ok(&s) {
                            return Err(err(
                                l,
                                format!(
                                    "usbdev `{}` is neither BUS-PORT (such as 4-2, from \
                                     `vbctl usb-list-assignable-devices`) nor host:VENDOR:PRODUCT \
                                     (such as host:047b:0002)",
                                    s.escape_default()
                                ),
                            ));
                        }
                        c.usbdevs.push(s);
                    }
                }
                "on_poweroff" | "on_reboot" | "on_crash" => {
                    let s = string()?;
                    let a = match s.as_str() {
                        "destroy" => LifecycleAction::Destroy,
                        "restart" => LifecycleAction::Restart,
                        "preserve" => LifecycleAction::Preserve,
                        other => {
                            return Err(err(
                                line,
                                format!(
                                    "`{key}` = `{}`: vback does destroy, restart or preserve",
                                    other.escape_default()
                                ),
                            ));
                        }
                    };
                    match key.as_str() {
                        "on_poweroff" => c.on_poweroff = a,
                        "on_reboot" => c.on_reboot = a,
                        _ => c.on_crash = a,
                    }
                }
                _ => unreachable!("keys are checked against DOMAIN_KEYS"),
            }
        }
        if name_line.is_none() {
            return Err(err(0, "the file sets no `name`: every domain needs one"));
        }
        if let Some(max) = c.maxmem_mib
            && max < c.memory_mib
        {
            return Err(err(
                memory_line,
                format!("memory = {} is more than maxmem = {max}", c.memory_mib),
            ));
        }
        if c.usb && c.usbdevs.is_empty() {
            // A controller without devices is what `usb = 1` asks for: fine.
        } else if !c.usbdevs.is_empty() {
            c.usb = true;
        }
        Ok(c)
    }
}

fn spec_err(line: usize, e: &SpecError) -> DomainConfigError {
    err(line, e.to_string())
}

fn usb_device_ok(s: &str) -> bool {
    let hex4 = |x: &str| x.len() == 4 && x.chars().all(|c| c.is_ascii_hexdigit());
    if let Some(rest) = s.strip_prefix("host:") {
        return rest
            .split_once(':')
            .is_some_and(|(v, p)| hex4(v) && hex4(p));
    }
    // BUS-PORT[.PORT...]: 4-2, 1-1.3
    let Some((bus, ports)) = s.split_once('-') else {
        return false;
    };
    let num = |x: &str| !x.is_empty() && x.len() <= 3 && x.chars().all(|c| c.is_ascii_digit());
    num(bus) && ports.split('.').all(num)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: &str = r#"
# The guide's example guest, as xm writes it.
name = "alice"
description = "Responsible: tux@example.com"
memory = 512
vcpus = 2
kernel = "/boot/vmlinuz"
ramdisk = '/boot/initrd'
extra = "console=ttyS0 \
  quiet"
root = "/dev/vda1"
disk = [ 'tap:qcow:/var/lib/xen/images/alice/disk0,xvda,w',
         'tap:cdrom:/isos/install.iso,xvdc:cdrom,r',   # the installer
       ]
vif = [ 'bridge=br0,mac=00:16:3e:00:00:01,rate=100Mb/s@20ms' ]
usbdev = [ '4-2', 'host:047b:0002' ]
on_crash = 'preserve'
"#;

    #[test]
    fn the_guides_example() {
        let c = DomainConfig::parse(ALICE).unwrap();
        assert_eq!(c.name, "alice");
        assert_eq!(
            c.description.as_deref(),
            Some("Responsible: tux@example.com")
        );
        assert_eq!((c.memory_mib, c.vcpus), (512, 2));
        assert_eq!(c.kernel.as_deref(), Some("/boot/vmlinuz"));
        assert_eq!(c.ramdisk.as_deref(), Some("/boot/initrd"));
        assert_eq!(c.extra.as_deref(), Some("console=ttyS0   quiet"));
        assert_eq!(c.root.as_deref(), Some("/dev/vda1"));
        assert_eq!(c.disks.len(), 2);
        assert_eq!(c.disks[0].vdev.name, "xvda");
        assert!(c.disks[1].vdev.cdrom);
        assert_eq!(c.vifs.len(), 1);
        assert_eq!(c.vifs[0].bridge.as_deref(), Some("br0"));
        assert!(c.vifs[0].rate.is_some());
        assert!(c.usb, "usbdev implies a controller");
        assert_eq!(c.usbdevs, vec!["4-2", "host:047b:0002"]);
        assert_eq!(c.on_crash, LifecycleAction::Preserve);
        assert_eq!(c.on_reboot, LifecycleAction::Restart);
    }

    #[test]
    fn defaults_and_single_entries() {
        // `;` ends a statement, and another may follow on the same line.
        let c =
            DomainConfig::parse("name='bob'\ndisk='null:1G,xvda,w'; vif = 'bridge=br1'\n").unwrap();
        assert_eq!(c.vifs[0].bridge.as_deref(), Some("br1"));
        let c = DomainConfig::parse("name='bob'\ndisk='null:1G,xvda,w'\nvif = ''\n").unwrap();
        assert_eq!((c.memory_mib, c.vcpus, c.usb), (128, 1, false));
        assert_eq!(c.disks.len(), 1);
        assert_eq!(c.vifs, vec![VifSpec::default()]);
        assert_eq!(c.on_poweroff, LifecycleAction::Destroy);
    }

    /// Every refusal names its line and what is wrong.
    #[test]
    fn mistakes_are_named_with_their_line() {
        for (text, says) in [
            ("name = 'a'\nmemroy = 512\n", "line 2: unknown key `memroy`"),
            (
                "name = 'a'\nname = 'b'\n",
                "line 2: `name` is set again (first on line 1)",
            ),
            ("memory = 512\n", "sets no `name`"),
            ("name = a\n", "line 1: `a` does not start a value"),
            ("name = 'a\n", "line 1: the string is not closed"),
            (
                "name = 'a'\nmemory = '512'\n",
                "line 2: `memory` takes a number, not a string",
            ),
            (
                "name = 'a'\nmemory = 8\n",
                "line 2: `memory` = 8 is out of range",
            ),
            ("name = 'a'\nvcpus = 0x2\n", "line 2: `0x2` is not a number"),
            (
                "name = 'a'\nmemory = 512 MB\n",
                "line 2: unexpected `M` after the value",
            ),
            ("name = 'a/b'\n", "line 1: name `a/b` must be"),
            ("name = '..'\n", "name `..` must be"),
            (
                "name = 'a'\ndisk = [ 'tap:qcow:/x,xvda,w',\n  'tap:bogus:/y,xvdb,w' ]\n",
                "line 3: disk entry `tap:bogus:/y,xvdb,w`: unknown tap driver `bogus`",
            ),
            (
                "name = 'a'\ndisk = [ 'null:1G,xvda,w', 'null:2G,xvda,r' ]\n",
                "line 2: two disks are called xvda",
            ),
            (
                "name = 'a'\ndisk = [ 'null:1G,xvda,w'\n",
                "the list is not closed",
            ),
            (
                "name = 'a'\ndisk = [ 'null:1G,xvda,w' 'x' ]\n",
                "expected `,` or `]`",
            ),
            (
                "name = 'a'\ndisk = [ 3 ]\n",
                "line 2: each disk entry in `disk` is a quoted string",
            ),
            ("name = 'a'\ndisk = [[ 'x' ]]\n", "lists inside lists"),
            (
                "name = 'a'\nvif = [ 'bridge=br0,colour=red' ]\n",
                "line 2: vif spec",
            ),
            (
                "name = 'a'\nvif = [ 'mac=00:16:3e:00:00:01', 'mac=00:16:3e:00:00:01' ]\n",
                "two vifs have the MAC address",
            ),
            (
                "name = 'a'\nusbdev = [ 'keyboard' ]\n",
                "usbdev `keyboard` is neither",
            ),
            (
                "name = 'a'\non_crash = 'coredump-restart'\n",
                "destroy, restart or preserve",
            ),
            (
                "name = 'a'\nuuid = '1234'\n",
                "is not of the form 8-4-4-4-12",
            ),
            (
                "name = 'a'\nmemory = 1024\nmaxmem = 512\n",
                "memory = 1024 is more than maxmem = 512",
            ),
            (
                "name = 'a'\n= 3\n",
                "line 2: expected `key = value`, found `=`",
            ),
            ("name 'a'\n", "line 1: expected `=` after `name`"),
        ] {
            let e = DomainConfig::parse(text).unwrap_err();
            assert!(e.to_string().contains(says), "{text:?}: {e}");
        }
    }

    #[test]
    fn comments_escapes_and_trailing_commas() {
        let c = DomainConfig::parse(
            "# head\nname = \"it's\\\"me\\\"\" # a comment\n\
             description = 'a # not a comment'\nvif = [\n  'bridge=br0',\n  # between\n  'bridge=br1',\n]\n",
        )
        .unwrap_err();
        // `'` and `"` are not name characters.
        assert!(c.to_string().contains("must be"), "{c}");
        let c = DomainConfig::parse(
            "name = 'web-1.example'\ndescription = 'a # not a comment'\nvif = [\n  'bridge=br0',\n  # between\n  'bridge=br1',\n]\nuuid = 'AA6969F3-8012-24F0-1E3A-35F150001950'\n",
        )
        .unwrap();
        assert_eq!(c.description.as_deref(), Some("a # not a comment"));
        assert_eq!(c.vifs.len(), 2);
        assert_eq!(
            c.uuid.as_deref(),
            Some("aa6969f3-8012-24f0-1e3a-35f150001950")
        );
    }
}
