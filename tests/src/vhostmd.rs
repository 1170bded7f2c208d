//! A reader of vhostmd's metrics disk, written from the format (vhostmd's `vhostmd.c`,
//! `libmetrics.c`, `mdisk.xml`) and not from `vbctl host-metrics`' writer, so a test that reads
//! what a guest saw judges the writer independently.
//!
//! The disk: a 16-byte header of big-endian 32-bit words (signature `mvbd`, busy, checksum,
//! length), then `length` bytes of `<metrics>` XML whose checksum is the sum of its bytes as C
//! `char`s (signed on x86) modulo 2^32.

use thiserror::Error;

/// `mvbd`.
pub const SIGNATURE: [u8; 4] = *b"mvbd";

/// Why a disk image is not a complete metrics disk.
#[derive(Debug, Error, PartialEq)]
pub enum VhostmdError {
    /// Fewer than 16 bytes, or fewer than the header's length promises.
    #[error("the disk is cut short: {have} bytes, {need} needed")]
    Short {
        /// Bytes present.
        have: usize,
        /// Bytes the header needs.
        need: usize,
    },
    /// No `mvbd` at the start.
    #[error("no metrics disk signature (mvbd): {0:02x?}")]
    Signature([u8; 4]),
    /// The writer was updating it (a reader retries).
    #[error("the busy flag is set ({0}): the writer was updating the disk")]
    Busy(u32),
    /// The content's checksum differs from the header's (a torn read).
    #[error("checksum {found:#x} of the content, the header says {header:#x}")]
    Checksum {
        /// Computed.
        found: u32,
        /// In the header.
        header: u32,
    },
    /// The content is not UTF-8 or not well-formed XML.
    #[error("the content is not the metrics XML: {0}")]
    Xml(String),
}

/// A metric as a guest reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    /// `host` or `vm`.
    pub context: String,
    /// The `domain` attribute, if any.
    pub domain: Option<String>,
    /// The `type` attribute.
    pub ty: String,
    /// `<name>`.
    pub name: String,
    /// `<value>`.
    pub value: String,
    /// The `unit` attribute, if any.
    pub unit: Option<String>,
}

fn word(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The content of a complete, consistent disk image: signature, busy clear, length within the
/// image, checksum matching.
pub fn content(disk: &[u8]) -> Result<&[u8], VhostmdError> {
    if disk.len() < 16 {
        return Err(VhostmdError::Short {
            have: disk.len(),
            need: 16,
        });
    }
    let sig = [disk[0], disk[1], disk[2], disk[3]];
    if sig != SIGNATURE {
        return Err(VhostmdError::Signature(sig));
    }
    let busy = word(disk, 4);
    if busy != 0 {
        return Err(VhostmdError::Busy(busy));
    }
    let need = 16 + word(disk, 12) as usize;
    let body = disk.get(16..need).ok_or(VhostmdError::Short {
        have: disk.len(),
        need,
    })?;
    let mut sum = 0u32;
    for &b in body {
        // A C `char` on x86 is signed.
        sum = sum.wrapping_add(i32::from(b as i8) as u32);
    }
    if sum != word(disk, 8) {
        return Err(VhostmdError::Checksum {
            found: sum,
            header: word(disk, 8),
        });
    }
    Ok(body)
}

/// Every `<metric>` of the disk image's XML.
pub fn metrics(disk: &[u8]) -> Result<Vec<Metric>, VhostmdError> {
    let body = content(disk)?;
    let text = std::str::from_utf8(body).map_err(|e| VhostmdError::Xml(e.to_string()))?;
    let doc = roxmltree::Document::parse(text).map_err(|e| VhostmdError::Xml(e.to_string()))?;
    let root = doc.root_element();
    if root.tag_name().name() != "metrics" {
        return Err(VhostmdError::Xml(format!(
            "the root element is <{}>, not <metrics>",
            root.tag_name().name()
        )));
    }
    let child = |n: roxmltree::Node, tag: &str| -> Result<String, VhostmdError> {
        n.children()
            .find(|c| c.has_tag_name(tag))
            .map(|c| c.text().unwrap_or_default().to_owned())
            .ok_or_else(|| VhostmdError::Xml(format!("a <metric> without <{tag}>")))
    };
    root.children()
        .filter(|n| n.has_tag_name("metric"))
        .map(|n| {
            Ok(Metric {
                context: n.attribute("context").unwrap_or_default().to_owned(),
                domain: n.attribute("domain").map(str::to_owned),
                ty: n.attribute("type").unwrap_or_default().to_owned(),
                name: child(n, "name")?,
                value: child(n, "value")?,
                unit: n.attribute("unit").map(str::to_owned),
            })
        })
        .collect()
}

/// Bytes from `od -A n -t x1` output (hex pairs separated by white space).
pub fn from_hex(text: &str) -> Vec<u8> {
    text.split_whitespace()
        .filter_map(|h| u8::from_str_radix(h, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(busy: u32, xml: &[u8], sum_delta: u32) -> Vec<u8> {
        let sum = xml
            .iter()
            .fold(0u32, |s, &b| s.wrapping_add(i32::from(b as i8) as u32));
        let mut d = b"mvbd".to_vec();
        d.extend(busy.to_be_bytes());
        d.extend(sum.wrapping_add(sum_delta).to_be_bytes());
        d.extend((xml.len() as u32).to_be_bytes());
        d.extend(xml);
        d.resize(1024, 0);
        d
    }

    #[test]
    fn reads_a_good_disk_and_refuses_bad_ones() {
        let xml = b"<metrics>\n  <metric type='uint64' context='vm' domain='a&amp;b' unit='KiB'>\n    <name>x</name>\n    <value>7</value>\n  </metric>\n</metrics>\n";
        let m = metrics(&disk(0, xml, 0)).unwrap();
        assert_eq!(
            m,
            [Metric {
                context: "vm".into(),
                domain: Some("a&b".into()),
                ty: "uint64".into(),
                name: "x".into(),
                value: "7".into(),
                unit: Some("KiB".into()),
            }]
        );
        assert_eq!(content(&disk(1, xml, 0)), Err(VhostmdError::Busy(1)));
        assert!(matches!(
            content(&disk(0, xml, 1)),
            Err(VhostmdError::Checksum { .. })
        ));
        let mut bad = disk(0, xml, 0);
        bad[0] = b'x';
        assert!(matches!(content(&bad), Err(VhostmdError::Signature(_))));
        assert!(matches!(
            content(&disk(0, xml, 0)[..40]),
            Err(VhostmdError::Short { .. })
        ));
        assert!(matches!(
            metrics(&disk(0, b"<metrics><metric>", 0)),
            Err(VhostmdError::Xml(_))
        ));
        assert_eq!(from_hex(" 6d 76\n 62 64\n"), b"mvbd");
    }
}
