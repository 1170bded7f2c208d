//! The queue driver every request-serving device shares (blkback's workers, cdrom): taking the
//! next request from a ring and returning it, with in-flight tracking.
//!
//! [`pop`] gives the requests to resubmit first (those a crashed back end left marked in the
//! in-flight region, oldest first), then the avail ring's, marking each one in flight;
//! [`complete`] publishes a used element and clears the mark. A popped request is a [`Chain`]:
//! its head and an iterator over its descriptors (following an indirect table, bounded by the
//! table's size, as virtio-queue's `DescriptorChain`), which can be built for any head, so a
//! resubmitted request and a new one are the same thing to the device.

use std::mem::size_of;

use virtio_queue::QueueT;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend};

use super::vring::{VringState, VringT};

/// A request taken from a ring: its head and its descriptors, read from guest memory as the
/// iterator goes (each one a fresh, bounds-checked read; a malformed chain ends early).
#[derive(Clone)]
pub struct Chain<'m, G> {
    mem: &'m G,
    head: u16,
    desc_table: GuestAddress,
    table_size: u16,
    next_index: u16,
    ttl: u16,
    indirect: bool,
    bytes: u32,
}

impl<G> std::fmt::Debug for Chain<'_, G> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chain")
            .field("head", &self.head)
            .field("desc_table", &self.desc_table)
            .finish_non_exhaustive()
    }
}

impl<'m, G: GuestMemoryBackend> Chain<'m, G> {
    /// The chain at `head` of the descriptor table at `desc_table` with `queue_size` entries.
    pub fn new(mem: &'m G, desc_table: GuestAddress, queue_size: u16, head: u16) -> Self {
        Chain {
            mem,
            head,
            desc_table,
            table_size: queue_size,
            next_index: head,
            ttl: queue_size,
            indirect: false,
            bytes: 0,
        }
    }

    /// Its head (what goes on the used ring).
    pub fn head_index(&self) -> u16 {
        self.head
    }

    /// The guest memory it reads.
    pub fn memory(&self) -> &'m G {
        self.mem
    }
}

impl<G: GuestMemoryBackend> Iterator for Chain<'_, G> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        if self.ttl == 0 || self.next_index >= self.table_size {
            return None;
        }
        let at = self
            .desc_table
            .checked_add(u64::from(self.next_index) * size_of::<Descriptor>() as u64)?;
        let desc = self.mem.read_obj::<Descriptor>(at).ok()?;
        if desc.refers_to_indirect_table() {
            // One level only, a whole number of descriptors, at most 2^16 of them.
            if self.indirect || desc.len() % 16 != 0 {
                self.ttl = 0;
                return None;
            }
            let n = u16::try_from(desc.len() / 16).ok()?;
            self.desc_table = desc.addr();
            self.table_size = n;
            self.next_index = 0;
            self.ttl = n;
            self.indirect = true;
            return self.next();
        }
        // A chain longer than 2^32 bytes is illegal (virtio 1.2, 2.7.5.2).
        self.bytes = self.bytes.checked_add(desc.len())?;
        if desc.has_next() {
            self.next_index = desc.next();
            self.ttl -= 1;
        } else {
            self.ttl = 0;
        }
        Some(desc)
    }
}

/// Takes the next request of `vring`: one to resubmit after a reconnect first (oldest first),
/// else the next chain on the avail ring, marked in flight. `None` when there is none.
pub fn pop<'m, V, M, G>(vring: &V, mem: &'m G) -> Option<Chain<'m, G>>
where
    V: VringT<M>,
    M: GuestAddressSpace,
    G: GuestMemoryBackend,
{
    let mut st = vring.get_mut();
    pop_locked(&mut st, mem)
}

/// [`pop`] on a vring state already locked.
pub fn pop_locked<'m, M, G>(st: &mut VringState<M>, mem: &'m G) -> Option<Chain<'m, G>>
where
    M: GuestAddressSpace,
    G: GuestMemoryBackend,
{
    let (desc_table, size) = {
        let q = st.get_queue();
        (GuestAddress(q.desc_table()), q.size())
    };
    let head = match st.take_resubmit() {
        Some(head) => head,
        None => {
            let head = st.get_queue_mut().pop_descriptor_chain(mem)?.head_index();
            st.mark_in_flight(head);
            head
        }
    };
    Some(Chain::new(mem, desc_table, size, head))
}

/// Publishes `head` on the used ring with `len` bytes written, and clears its in-flight mark.
pub fn complete<V, M>(vring: &V, head: u16, len: u32) -> Result<(), virtio_queue::Error>
where
    V: VringT<M>,
    M: GuestAddressSpace,
{
    vring.add_used(head, len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::MockQueue;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn a_chain_follows_next_links_and_one_indirect_table() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let desc = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
            let d = Descriptor::new(addr, len, flags, next);
            mem.write_obj(d, GuestAddress(0x1000 + 16 * i)).unwrap();
        };
        // 3 -> 5 -> indirect table of 2 at 0x4000.
        desc(3, 0x8000, 16, 1, 5);
        desc(5, 0x4000, 32, 1 | 4, 0);
        mem.write_obj(Descriptor::new(0x9000, 8, 1, 1), GuestAddress(0x4000))
            .unwrap();
        mem.write_obj(Descriptor::new(0x9100, 1, 2, 0), GuestAddress(0x4010))
            .unwrap();
        let chain = Chain::new(&mem, GuestAddress(0x1000), 8, 3);
        let got: Vec<(u64, u32)> = chain.map(|d| (d.addr().0, d.len())).collect();
        assert_eq!(got, vec![(0x8000, 16), (0x9000, 8), (0x9100, 1)]);
        // A loop ends after the table's size.
        desc(0, 0x8000, 1, 1, 1);
        desc(1, 0x8000, 1, 1, 0);
        assert_eq!(Chain::new(&mem, GuestAddress(0x1000), 8, 0).count(), 8);
        // A head beyond the table yields nothing.
        assert_eq!(Chain::new(&mem, GuestAddress(0x1000), 8, 8).count(), 0);
        // Nested indirect tables end the chain.
        mem.write_obj(Descriptor::new(0x4000, 32, 4, 0), GuestAddress(0x4000))
            .unwrap();
        assert_eq!(Chain::new(&mem, GuestAddress(0x1000), 8, 5).count(), 0);
    }

    #[test]
    fn pop_takes_the_avail_ring_in_order() {
        let mem = vm_memory::GuestMemoryAtomic::new(
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x20000)]).unwrap(),
        );
        let mut q = MockQueue::new(&mem, 8, 0x10000);
        q.publish(&[(0x8000, 16, 0)]);
        q.publish(&[(0x8100, 16, 0)]);
        let m = mem.memory();
        assert_eq!(pop(&q.vring, &*m).map(|c| c.head_index()), Some(0));
        assert_eq!(pop(&q.vring, &*m).map(|c| c.head_index()), Some(1));
        assert!(pop(&q.vring, &*m).is_none());
        complete(&q.vring, 1, 0).unwrap();
        assert_eq!(q.used_idx(), 1);
    }

    #[test]
    fn a_new_vring_on_the_same_region_resubmits_oldest_first_then_takes_new_requests() {
        use super::super::inflight::{InflightQueue, InflightRegion};
        use std::sync::Arc;
        let mem = vm_memory::GuestMemoryAtomic::new(
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x20000)]).unwrap(),
        );
        let (_, file, info) = InflightRegion::allocate(1, 8).unwrap();
        let region = Arc::new(InflightRegion::map(file, &info).unwrap());
        let attach = |q: &MockQueue| {
            let mut st = q.vring.get_mut();
            st.set_inflight(InflightQueue::new(region.clone(), 0));
            st.start_inflight().unwrap()
        };
        let mut q = MockQueue::new(&mem, 8, 0x10000);
        assert_eq!(attach(&q).unwrap().heads, Vec::<u16>::new());
        for i in 0..4 {
            q.publish(&[(0x8000 + 0x100 * i, 16, 0)]);
        }
        let m = mem.memory();
        let heads: Vec<u16> = (0..4)
            .map(|_| pop(&q.vring, &*m).unwrap().head_index())
            .collect();
        assert_eq!(heads, [0, 1, 2, 3]);
        // 2 completes; the back end dies with 0, 1 and 3 in flight.
        complete(&q.vring, 2, 0).unwrap();
        // The front end rewinds the ring to the used index (1) and a new back end starts on the
        // same region, with one more request published meanwhile.
        q.publish(&[(0x9000, 16, 0)]);
        let q2 = MockQueue::new(&mem, 8, 0x10000);
        q2.vring.set_queue_next_avail(1);
        let replay = attach(&q2).unwrap();
        assert_eq!(replay.heads, [0, 1, 3]);
        assert_eq!(
            q2.vring.queue_next_avail(),
            4,
            "used index + requests in flight"
        );
        let heads: Vec<u16> =
            std::iter::from_fn(|| pop(&q2.vring, &*m).map(|c| c.head_index())).collect();
        assert_eq!(heads, [0, 1, 3, 4], "the replayed ones, then the new one");
        // Completed, they are no longer marked: a third back end has nothing to replay.
        for h in heads {
            complete(&q2.vring, h, 0).unwrap();
        }
        let q3 = MockQueue::new(&mem, 8, 0x10000);
        assert_eq!(attach(&q3).unwrap().heads, Vec::<u16>::new());
    }
}
