//! Reading dpdk-testpmd's output: the per-port statistics blocks that `--stats-period N`
//! prints (cumulative counters and testpmd's own rates), and the messages that say a device
//! did not come up (testpmd keeps running after those, so the caller must notice them).
//!
//! A block looks like this (after an ANSI clear-screen sequence):
//!
//! ```text
//!   ######################## NIC statistics for port 0  ########################
//!   RX-packets: 0          RX-missed: 0          RX-bytes:  0
//!   RX-errors: 0
//!   RX-nombuf:  0
//!   TX-packets: 11437056   TX-errors: 0          TX-bytes:  731971584
//!
//!   Throughput (since last show)
//!   Rx-pps:            0          Rx-bps:            0
//!   Tx-pps:      5695528          Tx-bps:   2916110336
//!   ############################################################################
//! ```
//!
//! The final "Forward statistics" block at exit uses the same `RX-packets:` keys; it is not a
//! NIC statistics block and is ignored.

/// One statistics block of one port: testpmd's cumulative counters since the port started,
/// and the rates testpmd computed since its previous block.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortStats {
    /// The port number.
    pub port: u16,
    /// Frames received.
    pub rx_packets: u64,
    /// Bytes received (frames without virtio header).
    pub rx_bytes: u64,
    /// Frames received that found no mbuf (dropped by the front end).
    pub rx_nombuf: u64,
    /// Frames transmitted (accepted by the ring).
    pub tx_packets: u64,
    /// Bytes transmitted.
    pub tx_bytes: u64,
    /// testpmd's receive rate since its previous block (frames per second).
    pub rx_pps: u64,
    /// testpmd's transmit rate since its previous block.
    pub tx_pps: u64,
}

/// Lines of testpmd (or its EAL and PMDs) that mean the port will never pass traffic.
const FAILURES: &[&str] = &[
    "Failed to setup backend",
    "Failed to start device",
    "No probed ethernet devices",
    "Fail to start port",
    "Fail to configure port",
    "EAL: FATAL",
    "EAL: Cannot",
    "Cannot create mbuf pool",
    "Creation of mbuf pool for socket",
    "No cores defined for forwarding",
];

/// If `line` says that a device or testpmd itself failed to start, the line (trimmed).
pub fn failure(line: &str) -> Option<&str> {
    let l = line.trim();
    FAILURES.iter().any(|f| l.contains(f)).then_some(l)
}

/// Removes ANSI escape sequences (`ESC [ ... letter`), which testpmd prints to clear the screen
/// before each block.
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The value after `key` on a line of `key: value` pairs (`RX-packets: 12   RX-missed: 0`).
fn field(line: &str, key: &str) -> Option<u64> {
    let mut it = line.split_whitespace();
    while let Some(w) = it.next() {
        if w == key {
            return it.next()?.parse().ok();
        }
    }
    None
}

/// Feeds testpmd's output line by line and yields each complete NIC statistics block.
/// Tolerates anything between blocks, a block cut short by the process exiting (dropped) and
/// counters it does not know.
#[derive(Debug, Default)]
pub struct StatsParser {
    current: Option<PortStats>,
}

impl StatsParser {
    /// A parser outside any block.
    pub fn new() -> StatsParser {
        StatsParser::default()
    }

    /// Takes one line of output; returns the block it completes, if any.
    pub fn feed(&mut self, raw: &str) -> Option<PortStats> {
        let line = strip_ansi(raw);
        let l = line.trim();
        if let Some(rest) = l.split("NIC statistics for port").nth(1) {
            let port = rest
                .split_whitespace()
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            self.current = Some(PortStats {
                port,
                ..PortStats::default()
            });
            return None;
        }
        let cur = self.current.as_mut()?;
        if !l.is_empty() && l.chars().all(|c| c == '#') {
            return self.current.take();
        }
        if l.contains("Forward statistics") || l.contains("Port statistics") {
            // Another kind of block began: the one in progress was cut short.
            self.current = None;
            return None;
        }
        let set = |slot: &mut u64, key: &str| {
            if let Some(v) = field(l, key) {
                *slot = v;
            }
        };
        set(&mut cur.rx_packets, "RX-packets:");
        set(&mut cur.rx_bytes, "RX-bytes:");
        set(&mut cur.rx_nombuf, "RX-nombuf:");
        set(&mut cur.tx_packets, "TX-packets:");
        set(&mut cur.tx_bytes, "TX-bytes:");
        set(&mut cur.rx_pps, "Rx-pps:");
        set(&mut cur.tx_pps, "Tx-pps:");
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured from `dpdk-testpmd` 22.11 (Debian bookworm), virtio-user front end in txonly
    /// mode against a net_vhost backend, stdout and stderr together, ending with SIGINT.
    const TXONLY: &str = include_str!("testdata/testpmd-txonly.txt");
    /// Captured from the same testpmd with no backend listening on the socket.
    const NO_BACKEND: &str = include_str!("testdata/testpmd-no-backend.txt");

    #[test]
    fn parses_every_nic_statistics_block_and_ignores_the_final_forward_statistics() {
        let mut p = StatsParser::new();
        let blocks: Vec<PortStats> = TXONLY.lines().filter_map(|l| p.feed(l)).collect();
        assert_eq!(blocks.len(), 3, "{blocks:?}");
        assert_eq!(
            blocks[1],
            PortStats {
                port: 0,
                rx_packets: 0,
                rx_bytes: 0,
                rx_nombuf: 0,
                tx_packets: 11_437_056,
                tx_bytes: 731_971_584,
                rx_pps: 0,
                tx_pps: 5_695_528,
            }
        );
        assert_eq!(blocks[2].tx_packets, 23_000_800);
        assert_eq!(blocks[2].tx_pps, 5_781_222);
        assert_eq!(blocks[0].tx_pps, 0);
        // Counters only grow.
        assert!(
            blocks
                .windows(2)
                .all(|w| w[1].tx_packets >= w[0].tx_packets)
        );
        // The healthy run has no failure line.
        assert_eq!(TXONLY.lines().find_map(failure), None);
    }

    #[test]
    fn reports_a_backend_that_is_not_there() {
        let first = NO_BACKEND.lines().find_map(failure);
        assert_eq!(
            first,
            Some("virtio_user_dev_setup(): (/tmp/nbt-vh.sock) Failed to setup backend")
        );
        // It prints empty "Port statistics" headers and never a NIC block.
        let mut p = StatsParser::new();
        assert_eq!(NO_BACKEND.lines().filter_map(|l| p.feed(l)).count(), 0);
    }

    #[test]
    fn a_block_cut_short_is_dropped() {
        let mut p = StatsParser::new();
        let lines = [
            "  ######################## NIC statistics for port 1  ########################",
            "  RX-packets: 5          RX-missed: 0          RX-bytes:  320",
            "Telling cores to stop...",
            "  ---------------------- Forward statistics for port 1  ----------------------",
            "  RX-packets: 9              RX-dropped: 0             RX-total: 9",
            "  ----------------------------------------------------------------------------",
            "  ######################## NIC statistics for port 1  ########################",
            "  RX-packets: 7          RX-missed: 0          RX-bytes:  448",
            "  Rx-pps:            3          Rx-bps:            1536",
            "  ############################################################################",
        ];
        let got: Vec<PortStats> = lines.iter().filter_map(|l| p.feed(l)).collect();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].port, 1);
        assert_eq!(got[0].rx_packets, 7);
        assert_eq!(got[0].rx_bytes, 448);
        assert_eq!(got[0].rx_pps, 3);
    }

    #[test]
    fn strips_escape_sequences() {
        assert_eq!(
            strip_ansi("\x1b[2J\x1b[1;1HPort statistics ===="),
            "Port statistics ===="
        );
        assert_eq!(strip_ansi("plain"), "plain");
        assert_eq!(
            field("  TX-packets: 12   TX-errors: 3", "TX-errors:"),
            Some(3)
        );
        assert_eq!(field("  TX-packets: x", "TX-packets:"), None);
    }
}
