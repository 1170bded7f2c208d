//! A mock driver for unit tests: a split virtqueue in fake guest memory, driven the way a guest
//! driver drives it (chains written into the descriptor table, heads published on the avail
//! ring, completions read back from the used ring), served through the same `VringRwLock` type
//! the vhost-user framework hands the backends.

use crate::vhost_user::{VringRwLock, VringT};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

/// Guest memory as the backends see it.
pub type Mem = GuestMemoryMmap<()>;
/// The vring type the backends serve.
pub type Vring = VringRwLock<GuestMemoryAtomic<Mem>>;

/// `VRING_DESC_F_WRITE`: the device writes this buffer.
pub const WRITE: u16 = 2;

/// One queue and its driver side.
pub struct MockQueue {
    /// The memory the queue lives in.
    pub mem: GuestMemoryAtomic<Mem>,
    /// The backend's view of the queue.
    pub vring: Vring,
    size: u16,
    next_desc: u16,
    rings: (u64, u64, u64),
}

impl std::fmt::Debug for MockQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockQueue")
            .field("size", &self.size)
            .field("rings", &self.rings)
            .finish_non_exhaustive()
    }
}

impl MockQueue {
    /// A ready, enabled queue of `size` entries whose rings start at `rings_at` (keep the
    /// buffers the test uses elsewhere: fresh memory reads as zero).
    pub fn new(mem: &GuestMemoryAtomic<Mem>, size: u16, rings_at: u64) -> MockQueue {
        let rings = (rings_at, rings_at + 0x4000, rings_at + 0x8000);
        let vring = Vring::new(mem.clone(), size).expect("a vring");
        vring.set_queue_size(size);
        vring
            .set_queue_info(rings.0, rings.1, rings.2)
            .expect("ring addresses inside the memory");
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        MockQueue {
            mem: mem.clone(),
            vring,
            size,
            next_desc: 0,
            rings,
        }
    }

    fn m(&self) -> std::sync::Arc<Mem> {
        use vm_memory::GuestAddressSpace;
        self.mem.memory().into_inner()
    }

    /// Writes a chain of `(address, length, flags)` into the descriptor table and publishes its
    /// head, as a driver does. Returns the head index.
    pub fn publish(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let head = self.stage(descs);
        let m = self.m();
        let avail = self.rings.1;
        let avail_idx: u16 = m.read_obj(GuestAddress(avail + 2)).unwrap_or(0);
        m.write_obj(avail_idx.wrapping_add(1), GuestAddress(avail + 2))
            .expect("avail ring");
        head
    }

    /// Writes a chain into the descriptor table and its head into the avail ring entry after
    /// the avail index, without moving the index: the chain is not available until the test
    /// stores the index plus one at [`MockQueue::avail_addr`]` + 2` (a driver's last step).
    /// Returns the head index.
    pub fn stage(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let m = self.m();
        let n = descs.len() as u16;
        let (table, avail, _) = self.rings;
        let head = self.next_desc;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let i = i as u16;
            let idx = (self.next_desc + i) % self.size;
            let flags = if i + 1 < n { flags | 1 } else { flags };
            let d = RawDescriptor::from(Descriptor::new(addr, len, flags, (idx + 1) % self.size));
            m.write_obj(d, GuestAddress(table + 16 * u64::from(idx)))
                .expect("descriptor table in memory");
        }
        let avail_idx: u16 = m.read_obj(GuestAddress(avail + 2)).unwrap_or(0);
        let slot = avail + 4 + 2 * u64::from(avail_idx % self.size);
        m.write_obj(head, GuestAddress(slot)).expect("avail ring");
        self.next_desc = (self.next_desc + n) % self.size;
        head
    }

    /// A driver's last steps for a chain [`MockQueue::stage`]d before, to run wherever the test
    /// needs the driver to act (inside the backend, between two of its steps): the avail index
    /// plus one (release), a full barrier, then the device's notification suppression read the
    /// way Linux's `virtqueue_kick_prepare` reads it (`avail_event` with `event_idx`, else
    /// `VRING_USED_F_NO_NOTIFY`). The closure returns whether the driver kicks.
    pub fn publisher(&self, event_idx: bool) -> impl FnOnce() -> bool + Send + 'static {
        use std::sync::atomic::{Ordering, fence};
        let m = self.m();
        let (_, avail, used) = self.rings;
        let avail_event = used + 4 + 8 * u64::from(self.size);
        move || {
            let old = u16::from_le(m.read_obj(GuestAddress(avail + 2)).expect("avail ring"));
            let new = old.wrapping_add(1);
            m.store(new.to_le(), GuestAddress(avail + 2), Ordering::Release)
                .expect("avail ring");
            fence(Ordering::SeqCst);
            if event_idx {
                let event = u16::from_le(
                    m.load(GuestAddress(avail_event), Ordering::Relaxed)
                        .expect("used ring"),
                );
                // vring_need_event(event, new, old)
                new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
            } else {
                let flags = u16::from_le(
                    m.load::<u16>(GuestAddress(used), Ordering::Relaxed)
                        .expect("used ring"),
                );
                flags & 1 == 0
            }
        }
    }

    /// Guest address of the avail ring (tests that write hostile rings by hand).
    pub fn avail_addr(&self) -> u64 {
        self.rings.1
    }

    /// The descriptor-table slot the next chain is written from.
    pub fn next_desc(&self) -> u16 {
        self.next_desc
    }

    /// Writes the next chain from descriptor-table slot `slot`.
    pub fn set_next_desc(&mut self, slot: u16) {
        self.next_desc = slot % self.size;
    }

    /// The used ring's index.
    pub fn used_idx(&self) -> u16 {
        self.m()
            .read_obj(GuestAddress(self.rings.2 + 2))
            .unwrap_or(0)
    }

    /// Used ring entry `i`: (head, length).
    pub fn used(&self, i: u16) -> (u32, u32) {
        let m = self.m();
        let at = self.rings.2 + 4 + 8 * u64::from(i % self.size);
        (
            m.read_obj(GuestAddress(at)).unwrap_or(u32::MAX),
            m.read_obj(GuestAddress(at + 4)).unwrap_or(u32::MAX),
        )
    }
}
