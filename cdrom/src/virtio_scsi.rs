//! The virtio-scsi request formats: command requests on the request queue, task-management and
//! asynchronous-notification requests on the control queue. Transport-free: functions over a
//! descriptor chain in guest memory and a [`Cdrom`]; the vhost-user module moves the chains.

use vback_common::chain::{collect_iovecs, read_stream, write_stream};
use virtio_queue::desc::split::Descriptor;
use vm_memory::GuestMemoryBackend;

use crate::mmc::{Cdrom, missing_lun};

/// Size of `virtio_scsi_cmd_req` with a 32-byte CDB.
pub const CMD_REQ_LEN: u64 = 51;
/// Size of `virtio_scsi_cmd_resp` with 96 bytes of sense.
pub const CMD_RESP_LEN: u64 = 108;
/// VIRTIO_SCSI_S_OK.
pub const S_OK: u8 = 0;
/// VIRTIO_SCSI_S_BAD_TARGET.
pub const S_BAD_TARGET: u8 = 3;
/// VIRTIO_SCSI_S_FAILURE.
pub const S_FAILURE: u8 = 9;
/// VIRTIO_SCSI_S_FUNCTION_COMPLETE.
pub const S_FUNCTION_COMPLETE: u8 = 0;

fn lengths(descs: impl Iterator<Item = Descriptor>) -> (u64, u64) {
    descs.fold((0, 0), |(r, w), d| {
        if d.is_write_only() {
            (r, w + u64::from(d.len()))
        } else {
            (r + u64::from(d.len()), w)
        }
    })
}

/// Handles one command request. Returns the used length (0 if the chain cannot even hold a
/// response).
pub fn handle_command<M, I>(mem: &M, descs: I, cd: &mut Cdrom) -> u32
where
    M: GuestMemoryBackend,
    I: Iterator<Item = Descriptor> + Clone,
{
    let (readable, writable) = lengths(descs.clone());
    if writable < CMD_RESP_LEN {
        return 0;
    }
    let mut resp = [0u8; CMD_RESP_LEN as usize];
    let mut req = [0u8; CMD_REQ_LEN as usize];
    if readable < CMD_REQ_LEN || !read_stream(mem, descs.clone(), 0, &mut req) {
        resp[11] = S_FAILURE;
        return if write_stream(mem, descs, 0, &resp) {
            CMD_RESP_LEN as u32
        } else {
            0
        };
    }
    let lun = &req[0..8];
    if lun[0] != 1 || lun[1] != 0 {
        resp[11] = S_BAD_TARGET;
        return if write_stream(mem, descs, 0, &resp) {
            CMD_RESP_LEN as u32
        } else {
            0
        };
    }
    let lun_id = (u16::from(lun[2] & 0x3f) << 8) | u16::from(lun[3]);
    let cdb = &req[19..51];
    let alloc = usize::try_from(writable - CMD_RESP_LEN).unwrap_or(usize::MAX);
    let r = if lun_id == 0 {
        // Reads go straight into the guest's data-in buffers.
        let mut iov = Vec::new();
        let direct = matches!(cdb[0], 0x28 | 0xa8 | 0x88)
            && alloc > 0
            && collect_iovecs(
                mem,
                descs.clone(),
                true,
                CMD_RESP_LEN,
                alloc as u64,
                &mut iov,
                256,
            );
        cd.execute_into(cdb, alloc, direct.then_some(iov.as_slice()))
    } else {
        missing_lun(cdb)
    };
    let data_len = if r.direct > 0 {
        r.direct
    } else {
        r.data.len().min(alloc)
    };
    if let Some(s) = r.sense {
        let sense = s.fixed();
        resp[0..4].copy_from_slice(&(sense.len() as u32).to_le_bytes());
        resp[12..12 + sense.len()].copy_from_slice(&sense);
    }
    resp[4..8].copy_from_slice(&((alloc - data_len) as u32).to_le_bytes());
    resp[10] = r.status;
    resp[11] = S_OK;
    if !write_stream(mem, descs.clone(), 0, &resp) {
        return 0;
    }
    if r.direct == 0 && data_len > 0 && !write_stream(mem, descs, CMD_RESP_LEN, &r.data[..data_len])
    {
        return CMD_RESP_LEN as u32;
    }
    (CMD_RESP_LEN as usize + data_len) as u32
}

/// Handles one control-queue request: task management (every task has already completed, so
/// there is nothing to abort or reset) and asynchronous-notification queries and subscriptions
/// (none supported: media changes reach Linux through GESN polling and unit attentions).
pub fn handle_control<M, I>(mem: &M, descs: I) -> u32
where
    M: GuestMemoryBackend,
    I: Iterator<Item = Descriptor> + Clone,
{
    let mut ty = [0u8; 4];
    if !read_stream(mem, descs.clone(), 0, &mut ty) {
        return if write_stream(mem, descs, 0, &[S_FAILURE]) {
            1
        } else {
            0
        };
    }
    match u32::from_le_bytes(ty) {
        0 => {
            if write_stream(mem, descs, 0, &[S_FUNCTION_COMPLETE]) {
                1
            } else {
                0
            }
        }
        1 | 2 => {
            // event_actual = 0, response = OK
            if write_stream(mem, descs, 0, &[0, 0, 0, 0, S_OK]) {
                5
            } else {
                0
            }
        }
        _ => {
            if write_stream(mem, descs, 0, &[S_FAILURE]) {
                1
            } else {
                0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn req(m: &GuestMemoryMmap<()>, lun: [u8; 4], cdb: &[u8]) {
        let mut r = [0u8; 51];
        r[0..4].copy_from_slice(&lun);
        r[19..19 + cdb.len()].copy_from_slice(cdb);
        m.write_slice(&r, GuestAddress(0x1000)).unwrap();
    }

    #[test]
    fn inquiry_through_the_request_format() {
        let m = mem();
        let mut cd = Cdrom::new(None, "s");
        req(&m, [1, 0, 0, 0], &[0x12, 0, 0, 0, 36, 0]);
        let d = vec![
            Descriptor::new(0x1000, 51, 0, 0),
            Descriptor::new(0x2000, 108, 2, 0),
            Descriptor::new(0x3000, 36, 2, 0),
        ];
        assert_eq!(handle_command(&m, d.into_iter(), &mut cd), 144);
        let resp: [u8; 12] = m.read_obj(GuestAddress(0x2000)).unwrap();
        assert_eq!((resp[10], resp[11]), (0, S_OK));
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(0x3000)).unwrap(),
            5,
            "peripheral type 5"
        );

        // A CHECK CONDITION carries fixed-format sense.
        req(&m, [1, 0, 0, 0], &[0x00, 0, 0, 0, 0, 0]);
        let d = vec![
            Descriptor::new(0x1000, 51, 0, 0),
            Descriptor::new(0x2000, 108, 2, 0),
        ];
        assert_eq!(handle_command(&m, d.into_iter(), &mut cd), 108);
        let resp: [u8; 32] = m.read_obj(GuestAddress(0x2000)).unwrap();
        assert_eq!(resp[10], 2);
        assert_eq!(u32::from_le_bytes(resp[0..4].try_into().unwrap()), 18);
        assert_eq!(
            (resp[12 + 2], resp[12 + 12]),
            (6, 0x29),
            "power-on unit attention first"
        );
    }

    #[test]
    fn bad_targets_luns_and_short_chains() {
        let m = mem();
        let mut cd = Cdrom::new(None, "s");
        req(&m, [1, 3, 0, 0], &[0x00]);
        let d = vec![
            Descriptor::new(0x1000, 51, 0, 0),
            Descriptor::new(0x2000, 108, 2, 0),
        ];
        assert_eq!(handle_command(&m, d.clone().into_iter(), &mut cd), 108);
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(0x2000 + 11)).unwrap(),
            S_BAD_TARGET
        );
        req(&m, [1, 0, 0, 5], &[0x12, 0, 0, 0, 36, 0]);
        let d2 = vec![
            Descriptor::new(0x1000, 51, 0, 0),
            Descriptor::new(0x2000, 108, 2, 0),
            Descriptor::new(0x3000, 36, 2, 0),
        ];
        handle_command(&m, d2.into_iter(), &mut cd);
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(0x3000)).unwrap(),
            0x7f,
            "no device at LUN 5"
        );
        // No room for a response: nothing written, length 0.
        let short = vec![
            Descriptor::new(0x1000, 51, 0, 0),
            Descriptor::new(0x2000, 50, 2, 0),
        ];
        assert_eq!(handle_command(&m, short.into_iter(), &mut cd), 0);
        // A response that would run past guest memory.
        let out = vec![
            Descriptor::new(0x1000, 51, 0, 0),
            Descriptor::new(0xfff0, 108, 2, 0),
        ];
        assert_eq!(handle_command(&m, out.into_iter(), &mut cd), 0);
        // Control: TMF, AN query, unknown.
        m.write_obj(0u32, GuestAddress(0x1000)).unwrap();
        let c = vec![
            Descriptor::new(0x1000, 24, 0, 0),
            Descriptor::new(0x2000, 1, 2, 0),
        ];
        assert_eq!(handle_control(&m, c.clone().into_iter()), 1);
        m.write_obj(1u32, GuestAddress(0x1000)).unwrap();
        let c = vec![
            Descriptor::new(0x1000, 16, 0, 0),
            Descriptor::new(0x2000, 5, 2, 0),
        ];
        assert_eq!(handle_control(&m, c.into_iter()), 5);
        m.write_obj(77u32, GuestAddress(0x1000)).unwrap();
        let c = vec![
            Descriptor::new(0x1000, 16, 0, 0),
            Descriptor::new(0x2000, 1, 2, 0),
        ];
        handle_control(&m, c.into_iter());
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x2000)).unwrap(), S_FAILURE);
    }

    #[test]
    fn reads_land_in_scattered_guest_buffers() {
        use std::io::Write;
        let m = mem();
        let mut t = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        t.write_all(&data).unwrap();
        let medium = crate::mmc::Medium::new(
            t.path().to_owned(),
            t.reopen().unwrap(),
            8192,
            None,
            vback_block::lock::LockMode::None,
        )
        .unwrap();
        let mut cd = Cdrom::new(Some(medium), "s");
        cd.execute(&[0, 0, 0, 0, 0, 0], 0); // power-on attention
        // READ(10) LBA 1, 2 blocks, into 1000 + 3096 bytes of buffers.
        req(&m, [1, 0, 0, 0], &[0x28, 0, 0, 0, 0, 1, 0, 0, 2, 0]);
        let d = vec![
            Descriptor::new(0x1000, 51, 0, 0),
            Descriptor::new(0x2000, 108, 2, 0),
            Descriptor::new(0x4000, 1000, 2, 0),
            Descriptor::new(0x6000, 3096, 2, 0),
        ];
        assert_eq!(handle_command(&m, d.into_iter(), &mut cd), 108 + 4096);
        let mut got = vec![0u8; 4096];
        m.read_slice(&mut got[..1000], GuestAddress(0x4000))
            .unwrap();
        m.read_slice(&mut got[1000..], GuestAddress(0x6000))
            .unwrap();
        assert_eq!(got, data[2048..6144]);
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(0x2000 + 10)).unwrap(),
            0,
            "GOOD"
        );
    }
}
