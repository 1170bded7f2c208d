//! The data path's view of the top image's mapping: what queue threads consult, without the
//! image's lock, to send requests on allocated clusters straight to their engine.
//!
//! [`DataPath`] holds a copy of the top image's L1 table and of some of its L2 tables, behind a
//! mutex held only for the lookup of one request (no I/O under it, ever). Only the metadata
//! worker (which owns every change to the image, under the image's own lock) writes it, through
//! [`Image::publish`](super::Image::publish) after each operation and before completing it; so
//! a request that completed is visible to every later lookup.
//!
//! A lookup either finds the whole range as data clusters referenced once (for writes) in the
//! top image, or misses (table not copied here, unallocated, zero, compressed, beyond the size
//! this copy knows): the request then goes to the metadata worker, which serves it and
//! publishes the tables it touched. A copy that is stale only while the worker is changing a
//! range can send a request racing that change to the old cluster, which is safe because
//! clusters are never reused (see the module documentation of `qcow2`): the race of two
//! concurrent guest requests on the same bytes has no defined order anyway.

use std::collections::HashMap;
use std::sync::Mutex;

use vback_common::sync::lock;

use super::l2::{Ext, OFFSET_MASK, decode_l2};

/// The top image's mapping, as far as the data path needs it.
#[derive(Debug)]
pub struct DataPath {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
pub(super) struct Inner {
    pub(super) size: u64,
    pub(super) cluster_bits: u32,
    /// log2 of the L2 entries per table.
    pub(super) l2_bits: u32,
    pub(super) version: u32,
    pub(super) extended_l2: bool,
    /// The top image's L1 entries.
    pub(super) l1: Vec<u64>,
    /// L1 index → (L2 table offset, its entries, as the image's cache holds them).
    pub(super) tables: HashMap<u64, (u64, Vec<u64>)>,
    pub(super) max_tables: usize,
}

impl DataPath {
    pub(super) fn new(inner: Inner) -> DataPath {
        DataPath {
            inner: Mutex::new(inner),
        }
    }

    /// Takes `fresh`'s contents in place of this copy's.
    pub(super) fn replace(&self, fresh: DataPath) {
        let fresh = fresh
            .inner
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *lock(&self.inner) = fresh;
    }

    pub(super) fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        f(&mut lock(&self.inner))
    }

    /// If `[guest, guest + len)` is data in the top image (referenced once, for a write) in at
    /// most `max` host extents, fills `extents` with them (host offset, length; guest order)
    /// and returns true. False: the request needs the metadata worker.
    pub fn map(
        &self,
        guest: u64,
        len: u64,
        write: bool,
        max: usize,
        extents: &mut Vec<(u64, u64)>,
    ) -> bool {
        extents.clear();
        let g = lock(&self.inner);
        if len == 0 || guest.checked_add(len).is_none_or(|e| e > g.size) {
            return false;
        }
        let cb = g.cluster_bits;
        let cs = 1u64 << cb;
        let mut pos = 0;
        while pos < len {
            let at = guest + pos;
            let l1i = at >> (cb + g.l2_bits);
            let Some(&l1e) = g.l1.get(l1i as usize) else {
                return false;
            };
            let Some((off, table)) = g.tables.get(&l1i) else {
                return false;
            };
            if l1e & OFFSET_MASK != *off {
                return false;
            }
            let idx = ((at >> cb) & ((1 << g.l2_bits) - 1)) as usize;
            let (entry, bitmap) = if g.extended_l2 {
                (table[2 * idx], Some(table[2 * idx + 1]))
            } else {
                (table[idx], None)
            };
            let Ok((Ext::Data { host, copied }, run)) =
                decode_l2(entry, bitmap, cb, g.version, at & (cs - 1))
            else {
                return false;
            };
            if write && !copied {
                return false;
            }
            let take = run.min(len - pos);
            if let Some((h, l)) = extents.last_mut()
                && *h + *l == host
            {
                *l += take;
            } else if extents.len() == max {
                return false;
            } else {
                extents.push((host, take));
            }
            pos += take;
        }
        true
    }

    /// L2 tables copied now.
    pub fn tables(&self) -> usize {
        lock(&self.inner).tables.len()
    }
}
