//! A SCSI/MMC CD-ROM logical unit, transport-free: it executes CDBs against the drive's state
//! (tray, lock, medium, pending unit attentions, media events) and knows nothing of virtio or
//! vhost-user. The answers follow what Linux's sr driver sends and what QEMU's scsi-cd returns
//! (`../shared/reference/cdrom-mmc.md`).

use std::collections::VecDeque;
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use vback_api::{AtomicHistogram, Histogram};

use vback_block::backend::QueueFull;
use vback_block::engine::EngineChoice;
use vback_block::lock::{ImageLock, LockMode};
use vback_block::{
    BlockBackend, BlockError, BlockQueue, ErrorKind, Operation, Request, open_backend_from_file,
};

/// SCSI status GOOD.
pub const GOOD: u8 = 0x00;
/// SCSI status CHECK CONDITION.
pub const CHECK_CONDITION: u8 = 0x02;
/// Bytes per CD sector.
pub const BLOCK: u64 = 2048;
/// Above this size an image is reported as a DVD.
pub const CD_MAX: u64 = 900 << 20;

/// Sense key, additional sense code and qualifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    /// Sense key.
    pub key: u8,
    /// Additional sense code.
    pub asc: u8,
    /// Additional sense code qualifier.
    pub ascq: u8,
}

impl Sense {
    const fn new(key: u8, asc: u8, ascq: u8) -> Sense {
        Sense { key, asc, ascq }
    }

    /// Fixed-format sense data (18 bytes).
    pub fn fixed(&self) -> [u8; 18] {
        let mut b = [0u8; 18];
        b[0] = 0x70;
        b[2] = self.key;
        b[7] = 10;
        b[12] = self.asc;
        b[13] = self.ascq;
        b
    }
}

/// No sense.
pub const NO_SENSE: Sense = Sense::new(0, 0, 0);
/// 6/29/00 power on, reset.
pub const POWER_ON: Sense = Sense::new(6, 0x29, 0);
/// 6/28/00 not ready to ready change, medium may have changed.
pub const MEDIUM_CHANGED: Sense = Sense::new(6, 0x28, 0);
/// 6/3A/00 medium not present (the tray went open under the guest).
pub const UA_NO_MEDIUM: Sense = Sense::new(6, 0x3a, 0);
/// 2/3A/00 medium not present.
pub const NO_MEDIUM: Sense = Sense::new(2, 0x3a, 0);
/// 5/20/00 invalid command operation code.
pub const INVALID_OPCODE: Sense = Sense::new(5, 0x20, 0);
/// 5/24/00 invalid field in CDB.
pub const INVALID_FIELD: Sense = Sense::new(5, 0x24, 0);
/// 5/21/00 logical block address out of range.
pub const LBA_OUT_OF_RANGE: Sense = Sense::new(5, 0x21, 0);
/// 5/53/02 medium removal prevented.
pub const REMOVAL_PREVENTED: Sense = Sense::new(5, 0x53, 2);
/// 2/53/02 medium removal prevented, no medium.
pub const REMOVAL_PREVENTED_NO_MEDIUM: Sense = Sense::new(2, 0x53, 2);
/// 5/25/00 logical unit not supported.
pub const LUN_NOT_SUPPORTED: Sense = Sense::new(5, 0x25, 0);
/// 3/11/00 unrecovered read error.
pub const READ_ERROR: Sense = Sense::new(3, 0x11, 0);

/// A disc in the drive: a read-only [`BlockBackend`] on the opened image or drive, and the one
/// [`BlockQueue`] the request queue reads through (the drive has one request queue, served by
/// one thread, one command at a time).
pub struct Medium {
    /// Where it came from.
    pub path: PathBuf,
    /// Size in bytes (a partial last 2048-byte sector reads as zeroes past it).
    pub size: u64,
    /// The disc as vback-block serves it; it holds the medium's lock.
    backend: Arc<dyn BlockBackend>,
    queue: Box<dyn BlockQueue>,
    /// The lock the medium holds while the drive runs (exclusive, or shared with `--shared`).
    lock_mode: LockMode,
}

impl std::fmt::Debug for Medium {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Medium")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("kind", &self.backend.info().kind)
            .field("engine", &self.queue.engine_name())
            .finish()
    }
}

impl Medium {
    /// The medium in `file` (opened and checked by [`crate::media`], `size` bytes), served by
    /// vback-block as a read-only raw disk on the shared I/O engine (io_uring, or the thread
    /// pool where io_uring is unavailable), holding `lock` for as long as it is in the drive.
    /// The lock must be on a descriptor of its own ([`ImageLock`]): `file` is registered with
    /// the engine's io_uring, whose files the kernel releases only some time after a crashed
    /// process is gone.
    /// `lock_mode` is the lock it should hold: [`Medium::take_lock`] takes it if `lock` is not
    /// held (a migration's destination).
    pub fn new(
        path: PathBuf,
        file: File,
        size: u64,
        lock: Option<ImageLock>,
        lock_mode: LockMode,
    ) -> Result<Medium, BlockError> {
        let backend = open_backend_from_file(&path, file, lock, true, EngineChoice::Auto)
            .map_err(|e| BlockError::disk(Operation::Open, e))?;
        let queue = backend.open_queue(1)?;
        Ok(Medium {
            path,
            size,
            backend,
            queue,
            lock_mode,
        })
    }

    /// Takes the medium's lock if it does not hold it (a migration's destination opened it
    /// without; a source that released it resumes): true if it took it now; an error while
    /// another process holds it in a conflicting way.
    pub fn take_lock(&self) -> Result<bool, BlockError> {
        self.backend.take_lock(self.lock_mode)
    }

    /// Releases the medium's lock for a migration's destination (the disc stays open and
    /// readable; [`Medium::take_lock`] takes it back if the migration fails).
    pub fn release_lock(&self) -> Result<(), BlockError> {
        self.backend.release_lock()
    }

    /// Whether the medium holds its lock now.
    pub fn lock_held(&self) -> bool {
        self.backend.lock_held().unwrap_or(false)
    }

    /// What serves the disc, for `status`: the backend's kind and the queue's engine.
    pub fn served_by(&self) -> (&'static str, &'static str) {
        (self.backend.info().kind, self.queue.engine_name())
    }

    fn blocks(&self) -> u64 {
        self.size.div_ceil(BLOCK)
    }

    /// Reads `len` bytes at `offset` into `iov` with one [`Request::Read`] on the medium's
    /// queue, and waits for it.
    fn read_iov(&mut self, offset: u64, len: u64, iov: &[libc::iovec]) -> Result<(), BlockError> {
        // SAFETY: the iovecs describe memory (the guest's data-in buffers, checked against
        // guest memory by collect_iovecs, or a local buffer) that stays mapped until this
        // function returns, and the request is drained (completed) before it does, whatever
        // submit says. The guest may write the same memory meanwhile: the kernel or the
        // engine's threads write plain bytes into it, which the guest may see torn, as with any
        // DMA; nothing on the host reads them back.
        if unsafe { self.queue.queue(0, Request::Read { offset }, iov) }.is_err() {
            // Every read is drained before the next: a full queue means a bug, not load.
            return Err(BlockError::new(ErrorKind::Busy, Operation::Read, QueueFull).at(offset));
        }
        let submitted = self.queue.submit();
        let mut result = None;
        self.queue.drain(&mut |c| result = Some(c.result));
        submitted?;
        match result {
            Some(Ok(n)) if n == len => Ok(()),
            Some(Ok(n)) => Err(BlockError::new(
                ErrorKind::Io,
                Operation::Read,
                format!("short read: {n} of {len} bytes"),
            )
            .at(offset)),
            Some(Err(e)) => Err(e),
            None => {
                Err(
                    BlockError::new(ErrorKind::Io, Operation::Read, "the read did not complete")
                        .at(offset),
                )
            }
        }
    }
}

/// The outcome of one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// SCSI status.
    pub status: u8,
    /// Sense data for CHECK CONDITION.
    pub sense: Option<Sense>,
    /// Data-in (returned in this buffer).
    pub data: Vec<u8>,
    /// Data-in bytes already placed in the caller's buffers (`execute_into`).
    pub direct: usize,
}

impl Response {
    fn good(data: Vec<u8>) -> Response {
        Response {
            status: GOOD,
            sense: None,
            data,
            direct: 0,
        }
    }

    fn check(sense: Sense) -> Response {
        Response {
            status: CHECK_CONDITION,
            sense: Some(sense),
            data: Vec::new(),
            direct: 0,
        }
    }
}

/// GESN media event codes.
const EV_NONE: u8 = 0;
const EV_EJECT_REQUEST: u8 = 1;
const EV_NEW_MEDIA: u8 = 2;
const EV_MEDIA_REMOVAL: u8 = 3;

/// Why a host eject was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EjectError {
    /// The guest holds PREVENT MEDIUM REMOVAL.
    #[error(
        "the guest has locked the tray (PREVENT MEDIUM REMOVAL, e.g. the disc is mounted); \
         unmount it in the guest, or use force to take the disc away anyway"
    )]
    Locked,
}

/// The drive.
#[derive(Debug)]
pub struct Cdrom {
    medium: Option<Medium>,
    tray_open: bool,
    locked: bool,
    unit_attention: VecDeque<Sense>,
    event: u8,
    last_sense: Sense,
    serial: String,
    counts: Box<[u64; 256]>,
    /// READ(10/12/16) latency from pop to used-ring publish, recorded by the request queue.
    read_latency: AtomicHistogram,
    /// READs the storage failed, by the error's kind (indexed by `ErrorKind as usize`).
    read_errors: [u64; ErrorKind::ALL.len()],
    /// Commands resubmitted after a restart (in-flight tracking), for `stats`.
    resubmitted: u64,
}

fn be16(b: &[u8]) -> usize {
    usize::from(u16::from_be_bytes([b[0], b[1]]))
}

fn be32(b: &[u8]) -> u64 {
    u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

fn msf(lba: u64) -> [u8; 4] {
    let f = lba + 150;
    [
        0,
        ((f / 75) / 60) as u8,
        ((f / 75) % 60) as u8,
        (f % 75) as u8,
    ]
}

impl Cdrom {
    /// A drive, tray closed, with `medium` (or empty), reporting power-on to the first command.
    pub fn new(medium: Option<Medium>, serial: &str) -> Cdrom {
        Cdrom {
            medium,
            tray_open: false,
            locked: false,
            unit_attention: VecDeque::from([POWER_ON]),
            event: EV_NONE,
            last_sense: NO_SENSE,
            serial: serial
                .chars()
                .filter(char::is_ascii_graphic)
                .take(20)
                .collect(),
            counts: Box::new([0; 256]),
            read_latency: AtomicHistogram::default(),
            read_errors: [0; ErrorKind::ALL.len()],
            resubmitted: 0,
        }
    }

    /// This daemon takes over a drive a guest was already using (an earlier daemon served it
    /// and died; the front end handed its in-flight region over): no power-on unit attention,
    /// which the guest would take for a reset. What the earlier daemon knew is not carried
    /// over: the tray lock (PREVENT ALLOW MEDIUM REMOVAL) is forgotten, and a medium changed
    /// while no daemon ran is not reported.
    pub fn take_over(&mut self) {
        self.unit_attention.retain(|s| *s != POWER_ON);
    }

    /// Counts `n` commands a crashed predecessor left in flight, resubmitted to this drive.
    pub fn note_resubmitted(&mut self, n: usize) {
        self.resubmitted += n as u64;
    }

    /// Commands resubmitted after restarts.
    pub fn resubmitted(&self) -> u64 {
        self.resubmitted
    }

    /// Whether a disc is in the closed drive.
    pub fn ready(&self) -> bool {
        self.medium.is_some() && !self.tray_open
    }

    /// Tray open, guest lock, and the medium's path.
    pub fn state(&self) -> (bool, bool, Option<&std::path::Path>) {
        (
            self.tray_open,
            self.locked,
            self.medium.as_ref().map(|m| m.path.as_path()),
        )
    }

    /// The disc in the drive, if any.
    pub fn medium(&self) -> Option<&Medium> {
        self.medium.as_ref()
    }

    /// How many commands with opcode `op` the guest sent.
    pub fn count(&self, op: u8) -> u64 {
        self.counts[usize::from(op)]
    }

    /// READ(10/12/16) commands the guest sent.
    pub fn reads(&self) -> u64 {
        self.count(0x28) + self.count(0xa8) + self.count(0x88)
    }

    /// Records a READ's latency (pop to used-ring publish).
    pub fn record_read_latency(&self, d: std::time::Duration) {
        self.read_latency
            .record(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// READs the storage failed, by the error kind's name (kinds with none left out).
    pub fn read_errors_by_kind(&self) -> std::collections::BTreeMap<String, u64> {
        ErrorKind::ALL
            .iter()
            .zip(self.read_errors)
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| (k.name().to_owned(), n))
            .collect()
    }

    /// The READ latency histogram so far.
    pub fn read_latency(&self) -> Histogram {
        self.read_latency.snapshot()
    }

    /// Whether a media event waits for the guest's next GET EVENT STATUS NOTIFICATION poll.
    pub fn event_pending(&self) -> bool {
        self.event != EV_NONE
    }

    /// The host puts a disc in (and closes the tray). The guest sees a media change.
    pub fn insert(&mut self, medium: Medium) -> Option<Medium> {
        let old = self.medium.replace(medium);
        self.tray_open = false;
        self.unit_attention.push_back(MEDIUM_CHANGED);
        self.event = EV_NEW_MEDIA;
        old
    }

    /// The host takes the disc out. Refused while the guest locks the tray, unless `force`
    /// (then the guest sees the disc vanish, as with a yanked disc). Returns the old medium.
    pub fn eject(&mut self, force: bool) -> Result<Option<Medium>, EjectError> {
        if self.locked && !force {
            // Tell the guest someone pressed the eject button.
            self.event = EV_EJECT_REQUEST;
            return Err(EjectError::Locked);
        }
        let old = self.medium.take();
        self.tray_open = true;
        if old.is_some() {
            self.unit_attention.push_back(UA_NO_MEDIUM);
            self.event = EV_MEDIA_REMOVAL;
        }
        Ok(old)
    }

    /// Executes a CDB for logical unit 0. `alloc` is how many data-in bytes the initiator
    /// can take (the answer is truncated to it).
    pub fn execute(&mut self, cdb: &[u8], alloc: usize) -> Response {
        self.execute_into(cdb, alloc, None)
    }

    /// Like [`Cdrom::execute`]; READ commands put their data straight into `iov` (which must
    /// describe `alloc` bytes of memory the caller keeps valid for the call), so a guest's
    /// buffers are filled by the engine without a copy.
    pub fn execute_into(
        &mut self,
        cdb: &[u8],
        alloc: usize,
        iov: Option<&[libc::iovec]>,
    ) -> Response {
        if let Some(&op) = cdb.first() {
            self.counts[usize::from(op)] += 1;
        }
        let mut r = self.dispatch(cdb, alloc, iov);
        if let Some(s) = r.sense {
            self.last_sense = s;
        }
        r.data.truncate(alloc);
        r
    }

    fn dispatch(&mut self, cdb: &[u8], alloc: usize, iov: Option<&[libc::iovec]>) -> Response {
        let Some(&op) = cdb.first() else {
            return Response::check(INVALID_OPCODE);
        };
        // Unit attentions go to any command but these.
        if !matches!(op, 0x12 | 0x03 | 0xa0)
            && let Some(ua) = self.unit_attention.pop_front()
        {
            return Response::check(ua);
        }
        let cdb = {
            let mut c = [0u8; 16];
            let n = cdb.len().min(16);
            c[..n].copy_from_slice(&cdb[..n]);
            c
        };
        let needs_medium = !matches!(
            op,
            0x12 | 0x03 | 0x1a | 0x5a | 0x1b | 0x1e | 0x46 | 0x4a | 0xbd | 0xa0 | 0x35 | 0x91
        );
        if needs_medium && !self.ready() {
            return Response::check(NO_MEDIUM);
        }
        match op {
            0x00 => Response::good(Vec::new()), // TEST UNIT READY
            0x03 => self.request_sense(),
            0x12 => self.inquiry(&cdb),
            0x1a | 0x5a => self.mode_sense(&cdb, op == 0x5a),
            0x1b => self.start_stop(&cdb),
            0x1e => {
                self.locked = cdb[4] & 3 != 0;
                Response::good(Vec::new())
            }
            0x25 => self.read_capacity(),
            0x28 => self.read(be32(&cdb[2..6]), be16(&cdb[7..9]) as u64, alloc, iov),
            0xa8 => self.read(be32(&cdb[2..6]), be32(&cdb[6..10]), alloc, iov),
            0x88 => self.read(
                u64::from_be_bytes(cdb[2..10].try_into().unwrap_or([0; 8])),
                be32(&cdb[10..14]),
                alloc,
                iov,
            ),
            0x43 => self.read_toc(&cdb),
            0x46 => self.get_configuration(&cdb),
            0x4a => self.event_status(&cdb),
            0x51 => self.disc_information(&cdb),
            0x52 => self.track_information(&cdb),
            0xbd => self.mechanism_status(),
            0xa0 => report_luns(),
            0x35 | 0x91 => Response::good(Vec::new()), // SYNCHRONIZE CACHE: nothing is cached
            _ => Response::check(INVALID_OPCODE),
        }
    }

    fn request_sense(&mut self) -> Response {
        let s = self.unit_attention.pop_front().unwrap_or(self.last_sense);
        self.last_sense = NO_SENSE;
        Response::good(s.fixed().to_vec())
    }

    fn inquiry(&self, cdb: &[u8; 16]) -> Response {
        if cdb[1] & 1 == 0 {
            if cdb[2] != 0 {
                return Response::check(INVALID_FIELD);
            }
            let mut d = vec![0u8; 36];
            d[0] = 0x05; // CD/DVD
            d[1] = 0x80; // removable
            d[2] = 0x05; // SPC-3
            d[3] = 0x02;
            d[4] = 31;
            d[8..16].copy_from_slice(b"VBACK   ");
            d[16..32].copy_from_slice(b"CD-ROM          ");
            d[32..36].copy_from_slice(b"0.1 ");
            return Response::good(d);
        }
        match cdb[2] {
            0x00 => Response::good(vec![0x05, 0x00, 0, 3, 0x00, 0x80, 0x83]),
            0x80 => {
                let mut d = vec![0x05, 0x80, 0, self.serial.len() as u8];
                d.extend_from_slice(self.serial.as_bytes());
                Response::good(d)
            }
            0x83 => {
                let id = format!("VBACK   CD-ROM {}", self.serial);
                let mut d = vec![
                    0x05,
                    0x83,
                    0,
                    (id.len() + 4) as u8,
                    0x02,
                    0x01,
                    0,
                    id.len() as u8,
                ];
                d.extend_from_slice(id.as_bytes());
                Response::good(d)
            }
            _ => Response::check(INVALID_FIELD),
        }
    }

    fn mode_sense(&self, cdb: &[u8; 16], ten: bool) -> Response {
        let page = cdb[2] & 0x3f;
        if page != 0x2a && page != 0x3f {
            return Response::check(INVALID_FIELD);
        }
        let mut p = vec![0u8; 22];
        p[0] = 0x2a;
        p[1] = 20;
        p[2] = 0x3b; // reads CD-R, CD-RW, and the DVD-ROM/R bits
        p[4] = 0x7f;
        p[5] = 0xff;
        p[6] = 0x29 | if self.locked { 0x02 } else { 0 }; // tray, eject, lock supported
        p[8..10].copy_from_slice(&2816u16.to_be_bytes()); // 16x max read speed, kB/s
        p[10..12].copy_from_slice(&256u16.to_be_bytes());
        p[12..14].copy_from_slice(&2048u16.to_be_bytes());
        p[14..16].copy_from_slice(&2816u16.to_be_bytes());
        let mut d = if ten {
            let mut h = vec![0u8; 8];
            h[0..2].copy_from_slice(&((p.len() + 6) as u16).to_be_bytes());
            h
        } else {
            vec![(p.len() + 3) as u8, 0, 0, 0]
        };
        d.extend_from_slice(&p);
        Response::good(d)
    }

    fn start_stop(&mut self, cdb: &[u8; 16]) -> Response {
        let (loej, start) = (cdb[4] & 2 != 0, cdb[4] & 1 != 0);
        if !loej {
            return Response::good(Vec::new());
        }
        if start {
            // Close the tray: a disc in it is loaded again.
            if self.tray_open {
                self.tray_open = false;
                if self.medium.is_some() {
                    self.event = EV_NEW_MEDIA;
                }
            }
            return Response::good(Vec::new());
        }
        if self.locked {
            return Response::check(if self.medium.is_some() {
                REMOVAL_PREVENTED
            } else {
                REMOVAL_PREVENTED_NO_MEDIUM
            });
        }
        // The tray opens and the disc leaves the drive (and its lock): the host sees an empty,
        // open drive until it inserts a disc, which closes the tray.
        self.tray_open = true;
        if let Some(m) = self.medium.take() {
            log::info!("the guest ejected {}", m.path.display());
        }
        Response::good(Vec::new())
    }

    fn blocks(&self) -> u64 {
        self.medium.as_ref().map_or(0, Medium::blocks)
    }

    fn read_capacity(&self) -> Response {
        let last = self.blocks().saturating_sub(1).min(u64::from(u32::MAX)) as u32;
        let mut d = last.to_be_bytes().to_vec();
        d.extend_from_slice(&(BLOCK as u32).to_be_bytes());
        Response::good(d)
    }

    fn read(
        &mut self,
        lba: u64,
        count: u64,
        alloc: usize,
        iov: Option<&[libc::iovec]>,
    ) -> Response {
        let Some(m) = self.medium.as_mut() else {
            return Response::check(NO_MEDIUM);
        };
        if lba.checked_add(count).is_none_or(|end| end > m.blocks()) {
            return Response::check(LBA_OUT_OF_RANGE);
        }
        // At most 64 MiB per command (the guest's max_sectors keeps it far below).
        if count > (64 << 20) / BLOCK {
            return Response::check(INVALID_FIELD);
        }
        let (off, len) = (lba * BLOCK, count * BLOCK);
        // Bytes the file holds for this range (a partial last sector reads as zeroes).
        let avail = m.size.saturating_sub(off).min(len);
        let direct = iov.filter(|_| avail == len && len as usize <= alloc);
        let result = match direct {
            Some(iov) => m.read_iov(off, len, iov).map(|()| Response {
                direct: len as usize,
                ..Response::good(Vec::new())
            }),
            None => {
                let mut buf = vec![0u8; len as usize];
                let v = [libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: avail as usize,
                }];
                let r = if avail > 0 {
                    m.read_iov(off, avail, &v)
                } else {
                    Ok(())
                };
                r.map(|()| Response::good(buf))
            }
        };
        match result {
            Ok(r) => r,
            Err(e) => {
                vback_common::warn_limited!(
                    "{}: read of {count} blocks at {lba} failed: {e}",
                    m.path.display()
                );
                self.read_errors[e.kind as usize] += 1;
                Response::check(READ_ERROR)
            }
        }
    }

    fn read_toc(&self, cdb: &[u8; 16]) -> Response {
        let msf_mode = cdb[1] & 2 != 0;
        let mut format = cdb[2] & 0x0f;
        if format == 0 && cdb[9] & 0xc0 != 0 {
            format = cdb[9] >> 6; // the old SFF-8020 placement
        }
        let track = cdb[6];
        let addr = |lba: u64| -> [u8; 4] {
            if msf_mode {
                msf(lba)
            } else {
                (lba as u32).to_be_bytes()
            }
        };
        let mut d = vec![0u8, 0, 1, 1];
        match format {
            0 => {
                if track > 1 && track != 0xaa {
                    return Response::check(INVALID_FIELD);
                }
                if track <= 1 {
                    d.extend_from_slice(&[0, 0x14, 1, 0]);
                    d.extend_from_slice(&addr(0));
                }
                // Lead-out: data, digital copy permitted (0x16, as QEMU's scsi-cd answers).
                d.extend_from_slice(&[0, 0x16, 0xaa, 0]);
                d.extend_from_slice(&addr(self.blocks()));
            }
            1 => {
                d.extend_from_slice(&[0, 0x14, 1, 0]);
                d.extend_from_slice(&addr(0));
            }
            _ => return Response::check(INVALID_FIELD),
        }
        let len = (d.len() - 2) as u16;
        d[0..2].copy_from_slice(&len.to_be_bytes());
        Response::good(d)
    }

    fn profile(&self) -> u16 {
        match &self.medium {
            Some(m) if !self.tray_open && m.size > CD_MAX => 0x0010,
            Some(_) if !self.tray_open => 0x0008,
            _ => 0,
        }
    }

    fn get_configuration(&self, cdb: &[u8; 16]) -> Response {
        let rt = cdb[1] & 3;
        let start = be16(&cdb[2..4]) as u16;
        let current = self.profile();
        let mut features: Vec<(u16, Vec<u8>)> = Vec::new();
        let cur = |on: bool| if on { 1u8 } else { 0 };
        let mut list = vec![0x00, 0x00, 0x03, 8];
        list.extend_from_slice(&[0x00, 0x10, cur(current == 0x0010), 0]);
        list.extend_from_slice(&[0x00, 0x08, cur(current == 0x0008), 0]);
        features.push((0x0000, list));
        features.push((0x0001, vec![0x00, 0x01, 0x0b, 8, 0, 0, 0, 1, 1, 0, 0, 0]));
        features.push((0x0003, vec![0x00, 0x03, 0x03, 4, 0x29, 0, 0, 0]));
        let mut d = vec![0u8; 8];
        d[6..8].copy_from_slice(&current.to_be_bytes());
        for (code, bytes) in features {
            let take = match rt {
                0 | 1 => code >= start,
                2 => code == start,
                _ => return Response::check(INVALID_FIELD),
            };
            if take {
                d.extend_from_slice(&bytes);
            }
        }
        let len = (d.len() - 4) as u32;
        d[0..4].copy_from_slice(&len.to_be_bytes());
        Response::good(d)
    }

    fn event_status(&mut self, cdb: &[u8; 16]) -> Response {
        if cdb[1] & 1 == 0 {
            return Response::check(INVALID_FIELD); // only polled mode
        }
        if cdb[4] & 0x10 == 0 {
            // No supported class requested: NEA.
            return Response::good(vec![0, 2, 0x80, 0x10]);
        }
        // As QEMU reports it: an open tray hides whatever disc lies in it.
        let status = if self.tray_open {
            1
        } else if self.medium.is_some() {
            2
        } else {
            0
        };
        let d = vec![0, 6, 0x04, 0x10, self.event, status, 0, 0];
        self.event = EV_NONE;
        Response::good(d)
    }

    fn disc_information(&self, cdb: &[u8; 16]) -> Response {
        if cdb[1] & 7 != 0 {
            return Response::check(INVALID_FIELD);
        }
        let mut d = vec![0u8; 34];
        d[0..2].copy_from_slice(&32u16.to_be_bytes());
        d[2] = 0x0e; // complete disc, complete last session
        d[3] = 1;
        d[4] = 1;
        d[5] = 1;
        d[6] = 1;
        d[7] = 0x20; // unrestricted use
        d[16..24].fill(0xff);
        Response::good(d)
    }

    fn track_information(&self, cdb: &[u8; 16]) -> Response {
        let kind = cdb[1] & 3;
        let n = be32(&cdb[2..6]);
        let ok = match kind {
            0 => n < self.blocks(), // an LBA in track 1
            1 => n == 1,
            _ => false,
        };
        if !ok {
            return Response::check(INVALID_FIELD);
        }
        let blocks = self.blocks() as u32;
        let mut d = vec![0u8; 36];
        d[0..2].copy_from_slice(&34u16.to_be_bytes());
        d[2] = 1;
        d[3] = 1;
        d[5] = 0x04; // data track
        d[6] = 0x01; // mode 1
        d[24..28].copy_from_slice(&blocks.to_be_bytes());
        d[28..32].copy_from_slice(&blocks.saturating_sub(1).to_be_bytes());
        Response::good(d)
    }

    fn mechanism_status(&self) -> Response {
        let mut d = vec![0u8; 8];
        if self.tray_open {
            d[1] = 0x10;
        }
        Response::good(d)
    }
}

/// REPORT LUNS: LUN 0 only.
pub fn report_luns() -> Response {
    let mut d = vec![0u8; 16];
    d[0..4].copy_from_slice(&8u32.to_be_bytes());
    Response::good(d)
}

/// The answers for a LUN that does not exist.
pub fn missing_lun(cdb: &[u8]) -> Response {
    match cdb.first() {
        Some(0x12) => {
            let mut d = vec![0u8; 36];
            d[0] = 0x7f; // peripheral qualifier 3: no device here
            Response::good(d)
        }
        Some(0xa0) => report_luns(),
        Some(0x03) => Response::good(LUN_NOT_SUPPORTED.fixed().to_vec()),
        _ => Response::check(LUN_NOT_SUPPORTED),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn medium(blocks: u64) -> (tempfile::NamedTempFile, Medium) {
        let mut t = tempfile::NamedTempFile::new().unwrap();
        let mut data = vec![0u8; (blocks * BLOCK) as usize];
        for (i, c) in data.chunks_mut(BLOCK as usize).enumerate() {
            c[0] = i as u8;
        }
        t.write_all(&data).unwrap();
        let m = Medium::new(
            t.path().to_owned(),
            t.reopen().unwrap(),
            blocks * BLOCK,
            None,
            LockMode::None,
        )
        .unwrap();
        (t, m)
    }

    #[test]
    fn a_take_over_raises_no_power_on_attention() {
        let mut cd = Cdrom::new(None, "t");
        cd.take_over();
        assert!(cd.unit_attention.is_empty());
    }

    #[test]
    fn power_on_then_ready_and_reads() {
        let (_t, m) = medium(10);
        let mut cd = Cdrom::new(Some(m), "s1");
        let r = cd.execute(&[0x00, 0, 0, 0, 0, 0], 0);
        assert_eq!(r.sense, Some(POWER_ON));
        assert_eq!(cd.execute(&[0x00, 0, 0, 0, 0, 0], 0).status, GOOD);
        let cap = cd.execute(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8);
        assert_eq!(cap.data, [0, 0, 0, 9, 0, 0, 8, 0]);
        let r = cd.execute(&[0x28, 0, 0, 0, 0, 3, 0, 0, 2, 0], 4096);
        assert_eq!(r.status, GOOD);
        assert_eq!((r.data[0], r.data[2048]), (3, 4));
        let r = cd.execute(&[0x28, 0, 0, 0, 0, 9, 0, 0, 2, 0], 4096);
        assert_eq!(r.sense, Some(LBA_OUT_OF_RANGE));
        let r = cd.execute(
            &[
                0x88, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 1, 0, 0,
            ],
            2048,
        );
        assert_eq!(r.sense, Some(LBA_OUT_OF_RANGE), "no overflow");
    }

    #[test]
    fn reads_go_through_the_block_queue_and_its_errors_are_medium_errors() {
        let (t, m) = medium(10);
        assert_eq!(m.served_by().0, "file");
        let mut cd = Cdrom::new(Some(m), "r");
        cd.execute(&[0, 0, 0, 0, 0, 0], 0);
        // Straight into the caller's buffers (two of them), as for a guest's data-in.
        let (a, b) = (vec![0u8; 1024], vec![0u8; 3072]);
        let iov = [
            libc::iovec {
                iov_base: a.as_ptr() as *mut libc::c_void,
                iov_len: a.len(),
            },
            libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            },
        ];
        let r = cd.execute_into(&[0x28, 0, 0, 0, 0, 7, 0, 0, 2, 0], 4096, Some(&iov));
        assert_eq!((r.status, r.direct), (GOOD, 4096));
        assert_eq!((a[0], b[1024]), (7, 8));
        // The image shrinks under the drive: vback-block's out-of-bounds error is an
        // unrecovered read error for the guest, on both paths, and the drive goes on.
        t.as_file().set_len(5 * BLOCK).unwrap();
        let r = cd.execute_into(&[0x28, 0, 0, 0, 0, 6, 0, 0, 2, 0], 4096, Some(&iov));
        assert_eq!((r.sense, r.direct), (Some(READ_ERROR), 0));
        let r = cd.execute(&[0xa8, 0, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0], 2048);
        assert_eq!(r.sense, Some(READ_ERROR));
        assert_eq!(
            cd.read_errors_by_kind().into_iter().collect::<Vec<_>>(),
            [("out-of-bounds".to_owned(), 2)],
            "counted by the storage error's kind"
        );
        let r = cd.execute(&[0x28, 0, 0, 0, 0, 4, 0, 0, 1, 0], 2048);
        assert_eq!((r.status, r.data[0]), (GOOD, 4));
    }

    #[test]
    fn inquiry_toc_configuration_and_unknown() {
        let (_t, m) = medium(310);
        let mut cd = Cdrom::new(Some(m), "abc");
        let r = cd.execute(&[0x12, 0, 0, 0, 36, 0], 36);
        assert_eq!((r.data[0], r.data[1]), (5, 0x80));
        let r = cd.execute(&[0x12, 1, 0x80, 0, 255, 0], 255);
        assert_eq!(&r.data[4..], b"abc");
        cd.execute(&[0, 0, 0, 0, 0, 0], 0); // consume power-on
        let r = cd.execute(&[0x43, 0, 0, 0, 0, 0, 0, 0, 100, 0], 100);
        assert_eq!(r.data.len(), 20);
        assert_eq!(
            &r.data[16..20],
            &310u32.to_be_bytes(),
            "lead-out at the end"
        );
        let r = cd.execute(&[0x43, 2, 0, 0, 0, 0, 0xaa, 0, 100, 0], 100);
        assert_eq!(&r.data[8..12], &msf(310), "lead-out in MSF");
        let r = cd.execute(&[0x46, 0, 0, 0, 0, 0, 0, 0, 255, 0], 255);
        assert_eq!(&r.data[6..8], &[0x00, 0x08], "a small image is a CD-ROM");
        assert_eq!(
            cd.execute(&[0xff, 0, 0, 0, 0, 0], 0).sense,
            Some(INVALID_OPCODE)
        );
        assert_eq!(cd.execute(&[], 0).sense, Some(INVALID_OPCODE));
    }

    #[test]
    fn tray_lock_eject_and_media_change() {
        let (_t, m) = medium(10);
        let (_t2, m2) = medium(20);
        let mut cd = Cdrom::new(Some(m), "x");
        cd.execute(&[0, 0, 0, 0, 0, 0], 0);
        // Locked: the guest's eject and the host's eject are refused.
        assert_eq!(cd.execute(&[0x1e, 0, 0, 0, 1, 0], 0).status, GOOD);
        assert_eq!(
            cd.execute(&[0x1b, 0, 0, 0, 2, 0], 0).sense,
            Some(REMOVAL_PREVENTED)
        );
        assert_eq!(cd.eject(false).unwrap_err(), EjectError::Locked);
        let ev = cd.execute(&[0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8, 0], 8);
        assert_eq!(
            ev.data[4], EV_EJECT_REQUEST,
            "the guest hears the eject button"
        );
        // Unlocked: the guest ejects; no medium until the tray closes.
        cd.execute(&[0x1e, 0, 0, 0, 0, 0], 0);
        assert_eq!(cd.execute(&[0x1b, 0, 0, 0, 2, 0], 0).status, GOOD);
        assert_eq!(cd.execute(&[0, 0, 0, 0, 0, 0], 0).sense, Some(NO_MEDIUM));
        assert!(cd.state().0, "the tray is open");
        // The host inserts another disc: unit attention, then a NewMedia event, then ready.
        cd.insert(m2);
        assert_eq!(
            cd.execute(&[0, 0, 0, 0, 0, 0], 0).sense,
            Some(MEDIUM_CHANGED)
        );
        let ev = cd.execute(&[0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8, 0], 8);
        assert_eq!((ev.data[4], ev.data[5]), (EV_NEW_MEDIA, 2));
        assert_eq!(cd.execute(&[0, 0, 0, 0, 0, 0], 0).status, GOOD);
        let cap = cd.execute(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8);
        assert_eq!(&cap.data[0..4], &19u32.to_be_bytes());
        // A forced host eject under a lock: the disc is gone, the guest is told.
        cd.execute(&[0x1e, 0, 0, 0, 1, 0], 0);
        assert!(cd.eject(true).unwrap().is_some());
        assert_eq!(cd.execute(&[0, 0, 0, 0, 0, 0], 0).sense, Some(UA_NO_MEDIUM));
        assert_eq!(cd.execute(&[0, 0, 0, 0, 0, 0], 0).sense, Some(NO_MEDIUM));
        assert_eq!(
            cd.execute(&[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], 2048).sense,
            Some(NO_MEDIUM)
        );
        // Commands that work without a medium.
        assert_eq!(cd.execute(&[0x1a, 0, 0x2a, 0, 255, 0], 255).status, GOOD);
        assert_eq!(
            cd.execute(&[0xbd, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0], 8).data[1],
            0x10
        );
    }

    #[test]
    fn every_other_command_and_its_errors() {
        let (_t, m) = medium(310);
        let mut cd = Cdrom::new(Some(m), "serial-1");
        assert_eq!(
            cd.execute(&[0x03, 0, 0, 0, 18, 0], 18).data[12],
            0x29,
            "REQUEST SENSE reports the power-on attention"
        );
        assert_eq!(
            cd.execute(&[0x03, 0, 0, 0, 18, 0], 18).data[2],
            0,
            "then no sense"
        );
        // INQUIRY VPD pages and a bad one.
        assert_eq!(
            cd.execute(&[0x12, 1, 0x00, 0, 255, 0], 255).data[4..7],
            [0x00, 0x80, 0x83]
        );
        let id = cd.execute(&[0x12, 1, 0x83, 0, 255, 0], 255);
        assert_eq!(
            (id.data[4], id.data[5]),
            (0x02, 0x01),
            "an ASCII T10 vendor designator"
        );
        assert!(String::from_utf8_lossy(&id.data[8..]).contains("serial-1"));
        assert_eq!(
            cd.execute(&[0x12, 1, 0x99, 0, 255, 0], 255).sense,
            Some(INVALID_FIELD)
        );
        assert_eq!(
            cd.execute(&[0x12, 0, 0x80, 0, 255, 0], 255).sense,
            Some(INVALID_FIELD),
            "page without EVPD"
        );
        // MODE SENSE(10) page 0x2A, and an unsupported page.
        let ms = cd.execute(&[0x5a, 0, 0x2a, 0, 0, 0, 0, 0, 255, 0], 255);
        assert_eq!((ms.data[8], ms.data[9]), (0x2a, 20));
        assert_eq!(
            cd.execute(&[0x1a, 0, 0x08, 0, 255, 0], 255).sense,
            Some(INVALID_FIELD)
        );
        // READ TOC formats 1 and an unsupported one; a track past the last.
        assert_eq!(
            cd.execute(&[0x43, 0, 1, 0, 0, 0, 0, 0, 12, 0], 12)
                .data
                .len(),
            12
        );
        assert_eq!(
            cd.execute(&[0x43, 0, 4, 0, 0, 0, 0, 0, 12, 0], 12).sense,
            Some(INVALID_FIELD)
        );
        assert_eq!(
            cd.execute(&[0x43, 0, 0, 0, 0, 0, 5, 0, 12, 0], 12).sense,
            Some(INVALID_FIELD)
        );
        // READ DISC INFORMATION, READ TRACK INFORMATION (by track and by LBA; bad ones).
        let di = cd.execute(&[0x51, 0, 0, 0, 0, 0, 0, 0, 34, 0], 34);
        assert_eq!((di.data[2], di.data.len()), (0x0e, 34));
        assert_eq!(
            cd.execute(&[0x51, 1, 0, 0, 0, 0, 0, 0, 34, 0], 34).sense,
            Some(INVALID_FIELD)
        );
        let ti = cd.execute(&[0x52, 1, 0, 0, 0, 1, 0, 0, 36, 0], 36);
        assert_eq!(&ti.data[24..28], &310u32.to_be_bytes());
        assert_eq!(
            cd.execute(&[0x52, 0, 0, 0, 0, 5, 0, 0, 36, 0], 36).status,
            GOOD
        );
        assert_eq!(
            cd.execute(&[0x52, 1, 0, 0, 0, 2, 0, 0, 36, 0], 36).sense,
            Some(INVALID_FIELD)
        );
        assert_eq!(
            cd.execute(&[0x52, 0, 0, 0, 1, 0x36, 0, 0, 36, 0], 36).sense,
            Some(INVALID_FIELD)
        );
        // GET CONFIGURATION: one feature only (RT=2), and a bad RT.
        let gc = cd.execute(&[0x46, 2, 0, 3, 0, 0, 0, 0, 255, 0], 255);
        assert_eq!(
            (gc.data.len(), gc.data[9]),
            (16, 0x03),
            "header and the removable-medium feature"
        );
        assert_eq!(
            cd.execute(&[0x46, 3, 0, 0, 0, 0, 0, 0, 255, 0], 255).sense,
            Some(INVALID_FIELD)
        );
        // GESN: asynchronous mode is refused; a class we do not support gets NEA.
        assert_eq!(
            cd.execute(&[0x4a, 0, 0, 0, 0x10, 0, 0, 0, 8, 0], 8).sense,
            Some(INVALID_FIELD)
        );
        assert_eq!(
            cd.execute(&[0x4a, 1, 0, 0, 0x02, 0, 0, 0, 8, 0], 8).data[2],
            0x80
        );
        // REPORT LUNS, SYNCHRONIZE CACHE, START STOP without LoEj, MECHANISM STATUS.
        assert_eq!(
            &cd.execute(&[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0], 16)
                .data[0..4],
            &8u32.to_be_bytes()
        );
        assert_eq!(
            cd.execute(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0).status,
            GOOD
        );
        assert_eq!(cd.execute(&[0x1b, 0, 0, 0, 1, 0], 0).status, GOOD);
        assert_eq!(
            cd.execute(&[0xbd, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0], 8).data,
            [0; 8]
        );
        // Allocation lengths truncate.
        assert_eq!(cd.execute(&[0x12, 0, 0, 0, 5, 0], 5).data.len(), 5);
        // A bigger image is a DVD.
        let t = tempfile::NamedTempFile::new().unwrap();
        t.as_file().set_len(CD_MAX + BLOCK).unwrap();
        let big = Medium::new(
            t.path().to_owned(),
            t.reopen().unwrap(),
            CD_MAX + BLOCK,
            None,
            LockMode::None,
        )
        .unwrap();
        let mut dvd = Cdrom::new(Some(big), "d");
        dvd.execute(&[0, 0, 0, 0, 0, 0], 0);
        assert_eq!(
            &dvd.execute(&[0x46, 0, 0, 0, 0, 0, 0, 0, 255, 0], 255).data[6..8],
            &[0x00, 0x10]
        );
        // An empty drive: no medium for reads and capacity; the commands that need none work.
        let mut empty = Cdrom::new(None, "e");
        empty.execute(&[0, 0, 0, 0, 0, 0], 0);
        assert_eq!(
            empty.execute(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8).sense,
            Some(NO_MEDIUM)
        );
        assert_eq!(
            empty
                .execute(&[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], 2048)
                .sense,
            Some(NO_MEDIUM)
        );
        assert_eq!(
            empty.execute(&[0x43, 0, 0, 0, 0, 0, 0, 0, 12, 0], 12).sense,
            Some(NO_MEDIUM)
        );
        assert_eq!(
            &empty
                .execute(&[0x46, 0, 0, 0, 0, 0, 0, 0, 255, 0], 255)
                .data[6..8],
            &[0, 0],
            "no current profile"
        );
        assert_eq!(
            empty.execute(&[0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8, 0], 8).data[5],
            0,
            "no medium, tray closed"
        );
        empty.execute(&[0x1e, 0, 0, 0, 1, 0], 0);
        assert_eq!(
            empty.execute(&[0x1b, 0, 0, 0, 2, 0], 0).sense,
            Some(REMOVAL_PREVENTED_NO_MEDIUM)
        );
    }

    #[test]
    fn fuzzed_cdbs_never_panic() {
        let (_t, m) = medium(4);
        let mut cd = Cdrom::new(Some(m), "f");
        let mut x: u64 = 0x1234_5678;
        for _ in 0..20000 {
            let mut cdb = [0u8; 16];
            for b in &mut cdb {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            let n = (x % 17) as usize;
            let r = cd.execute(&cdb[..n], (x >> 8) as usize % 70000);
            assert!(r.status == GOOD || r.status == CHECK_CONDITION);
        }
    }
}
