//! The deterministic stream of guest operations the qcow2 crash test replays: the writer
//! process (`qcow2-crash-writer`) applies it to an image until it is killed, and the test
//! replays it on a raw model to know what must have survived.

/// One operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qcow2Op {
    /// Write `len` bytes at `off`, every 512-byte sector filled with `fill(sector)`.
    Write {
        /// Byte offset.
        off: u64,
        /// Length in bytes.
        len: u64,
        /// Seed of the sector pattern.
        tag: u64,
    },
    /// Write zeroes.
    Zero {
        /// Byte offset.
        off: u64,
        /// Length in bytes.
        len: u64,
    },
}

impl Qcow2Op {
    /// The byte every sector `sector` (absolute) of a write tagged `tag` holds.
    pub fn fill(tag: u64, sector: u64) -> u8 {
        let x = tag
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_add(sector.wrapping_mul(0xbf58_476d_1ce4_e5b9));
        (x >> 56) as u8 | 1
    }

    /// The range it touches.
    pub fn range(&self) -> (u64, u64) {
        match *self {
            Qcow2Op::Write { off, len, .. } | Qcow2Op::Zero { off, len } => (off, len),
        }
    }

    /// Its data.
    pub fn data(&self) -> Vec<u8> {
        match *self {
            Qcow2Op::Write { off, len, tag } => {
                (0..len).map(|i| Self::fill(tag, (off + i) / 512)).collect()
            }
            Qcow2Op::Zero { len, .. } => vec![0; len as usize],
        }
    }
}

/// A seeded stream of operations on a disk of `size` bytes.
#[derive(Debug, Clone)]
pub struct Qcow2Ops {
    x: u64,
    size: u64,
    n: u64,
}

impl Qcow2Ops {
    /// The stream for `seed`.
    pub fn new(seed: u64, size: u64) -> Qcow2Ops {
        Qcow2Ops {
            x: seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1,
            size,
            n: 0,
        }
    }

    fn rand(&mut self) -> u64 {
        self.x ^= self.x << 13;
        self.x ^= self.x >> 7;
        self.x ^= self.x << 17;
        self.x
    }
}

impl Iterator for Qcow2Ops {
    type Item = Qcow2Op;

    fn next(&mut self) -> Option<Qcow2Op> {
        self.n += 1;
        let (off, len) = if self.rand().is_multiple_of(4) {
            // Whole 64 KiB clusters, aligned: a first write of them is split by the metadata
            // worker (data on its engine, mapped when written).
            let c = 64 << 10;
            let off = self.rand() % self.size / c * c;
            (off, (1 + self.rand() % 3) * c)
        } else {
            let off = self.rand() % self.size / 512 * 512;
            (off, ((self.rand() % (192 << 10)) / 512 + 1) * 512)
        };
        let len = len.min(self.size - off);
        Some(if self.rand().is_multiple_of(8) {
            Qcow2Op::Zero { off, len }
        } else {
            Qcow2Op::Write {
                off,
                len,
                tag: self.x ^ self.n,
            }
        })
    }
}

/// After a crash: checks that `now` (the image's content, as raw) holds every operation of the
/// stream `seed` up to the `acked`-th (the last one a flush acknowledged), starting from
/// `baseline`. The `flush_every` operations after it may or may not have landed, so their
/// sectors are not compared. Panics naming the first sector that lost acknowledged data.
pub fn assert_flushed_data_survived(
    baseline: &[u8],
    now: &[u8],
    seed: u64,
    acked: u64,
    flush_every: u64,
    round: u64,
) {
    let mut model = baseline.to_vec();
    let mut ops = Qcow2Ops::new(seed, model.len() as u64);
    for _ in 0..acked {
        let Some(op) = ops.next() else { break };
        let (off, len) = op.range();
        model[off as usize..(off + len) as usize].copy_from_slice(&op.data());
    }
    let mut unsure = vec![false; model.len() / 512];
    for op in ops.take(flush_every as usize) {
        let (off, len) = op.range();
        for sector in off / 512..(off + len) / 512 {
            unsure[sector as usize] = true;
        }
    }
    for (sector, u) in unsure.iter().enumerate() {
        let r = sector * 512..sector * 512 + 512;
        assert!(
            *u || now[r.clone()] == model[r],
            "round {round}: sector {sector} lost data acknowledged by the flush after operation {acked}"
        );
    }
}
