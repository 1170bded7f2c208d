// Copyright 2019 Intel Corporation. All Rights Reserved.
// Copyright 2021 Alibaba Cloud Computing. All rights reserved.
//
// SPDX-License-Identifier: Apache-2.0

//! The state of one vhost-user virtqueue as the handler and the device share it: the
//! virtio-queue `Queue`, its kick, call and error eventfds and whether the front end enabled it.
//!
//! Forked from vhost-user-backend 0.24.0 (`src/vring.rs`). Changed: `VringMutex` is gone (no
//! backend used it); the eventfds are kept as `File`s and read and written as eventfds (no
//! `unsafe` conversion to `EventConsumer`/`EventNotifier`), and reading a non-blocking kick with
//! nothing pending is not an error; a poisoned lock is carried on rather than unwrapped.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::ops::{Deref, DerefMut};
use std::result::Result;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use virtio_queue::{Error as VirtQueError, Queue, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace};

use super::dirty_log::VringLog;
use super::driver::Chain;
use super::inflight::{InflightError, InflightQueue, Replay};

/// Trait for objects returned by `VringT::get_ref()`.
pub trait VringStateGuard<'a, M: GuestAddressSpace> {
    /// Type for guard returned by `VringT::get_ref()`.
    type G: Deref<Target = VringState<M>>;
}

/// Trait for objects returned by `VringT::get_mut()`.
pub trait VringStateMutGuard<'a, M: GuestAddressSpace> {
    /// Type for guard returned by `VringT::get_mut()`.
    type G: DerefMut<Target = VringState<M>>;
}

/// A virtqueue shared between the request handler and the device's worker threads.
pub trait VringT<M: GuestAddressSpace>:
    for<'a> VringStateGuard<'a, M> + for<'a> VringStateMutGuard<'a, M>
{
    /// Create a new instance of Vring.
    fn new(mem: M, max_queue_size: u16) -> Result<Self, VirtQueError>
    where
        Self: Sized;

    /// Get an immutable reference to the state.
    fn get_ref(&self) -> <Self as VringStateGuard<'_, M>>::G;

    /// Get a mutable reference to the state.
    fn get_mut(&self) -> <Self as VringStateMutGuard<'_, M>>::G;

    /// Add an used descriptor into the used queue.
    fn add_used(&self, desc_index: u16, len: u32) -> Result<(), VirtQueError>;

    /// Notify the vhost-user front end that used descriptors have been put into the used queue.
    fn signal_used_queue(&self) -> io::Result<()>;

    /// Enable event notification for queue.
    fn enable_notification(&self) -> Result<bool, VirtQueError>;

    /// Disable event notification for queue.
    fn disable_notification(&self) -> Result<(), VirtQueError>;

    /// Check whether a notification to the guest is needed.
    fn needs_notification(&self) -> Result<bool, VirtQueError>;

    /// Set vring enabled state.
    fn set_enabled(&self, enabled: bool);

    /// Set queue addresses for descriptor table, available ring and used ring.
    fn set_queue_info(
        &self,
        desc_table: u64,
        avail_ring: u64,
        used_ring: u64,
    ) -> Result<(), VirtQueError>;

    /// Get queue next avail head.
    fn queue_next_avail(&self) -> u16;

    /// Set queue next avail head.
    fn set_queue_next_avail(&self, base: u16);

    /// Set queue next used head.
    fn set_queue_next_used(&self, idx: u16);

    /// Get queue next used head index from the guest memory.
    fn queue_used_idx(&self) -> Result<u16, VirtQueError>;

    /// Set configured queue size.
    fn set_queue_size(&self, num: u16);

    /// Enable/disable queue event index feature.
    fn set_queue_event_idx(&self, enabled: bool);

    /// Set queue ready state.
    fn set_queue_ready(&self, ready: bool);

    /// Set the kick eventfd.
    fn set_kick(&self, file: Option<File>);

    /// Consume a kick; returns whether the ring is enabled.
    fn read_kick(&self) -> io::Result<bool>;

    /// Set the call eventfd.
    fn set_call(&self, file: Option<File>);

    /// Set the error eventfd.
    fn set_err(&self, file: Option<File>);
}

/// The raw state of a vhost-user queue.
#[derive(Debug)]
pub struct VringState<M: GuestAddressSpace> {
    queue: Queue,
    kick: Option<File>,
    call: Option<File>,
    err: Option<File>,
    enabled: bool,
    mem: M,
    /// This queue's part of the in-flight region (SET_INFLIGHT_FD), if any.
    inflight: Option<InflightQueue>,
    /// Heads to resubmit before taking new ones (oldest first), found in the in-flight region
    /// when the ring started.
    resubmit: VecDeque<u16>,
    /// The dirty log while the front end logs (VHOST_F_LOG_ALL with SET_LOG_BASE): every
    /// write published through this state is logged in it.
    log: Option<VringLog>,
}

impl<M: GuestAddressSpace> VringState<M> {
    fn new(mem: M, max_queue_size: u16) -> Result<Self, VirtQueError> {
        Ok(VringState {
            queue: Queue::new(max_queue_size)?,
            kick: None,
            call: None,
            err: None,
            enabled: false,
            mem,
            inflight: None,
            resubmit: VecDeque::new(),
            log: None,
        })
    }

    /// Whether the vring is enabled or not.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Get an immutable reference to the underlying raw `Queue` object.
    pub fn get_queue(&self) -> &Queue {
        &self.queue
    }

    /// Get a mutable reference to the underlying raw `Queue` object.
    pub fn get_queue_mut(&mut self) -> &mut Queue {
        &mut self.queue
    }

    /// Add an used descriptor into the used queue (and clear its in-flight mark, if tracked:
    /// the last batch's head is recorded before the used index moves, the mark cleared and
    /// the region's used index updated after, as libvhost-user's `vu_queue_push`).
    ///
    /// While the front end logs dirty pages, the chain's device-writable buffers (the data a
    /// device wrote into them, status bytes included) and the used ring's element and index
    /// are logged: this is the one place every device on this state publishes its writes.
    pub fn add_used(&mut self, desc_index: u16, len: u32) -> Result<(), VirtQueError> {
        if let Some(inflight) = &self.inflight {
            inflight.pre_put(desc_index);
        }
        let slot = self.queue.next_used() & self.queue.size().wrapping_sub(1);
        // The chain is read while it is still the device's: once the used element is out the
        // driver may reuse its descriptors at once (another vCPU), and a chain read then can
        // name any address.
        if let Some(log) = &self.log {
            self.log_buffers(log, desc_index);
        }
        self.queue
            .add_used(self.mem.memory().deref(), desc_index, len)?;
        if let Some(log) = &self.log {
            log.used_elem(slot);
            log.used_idx();
        }
        if let Some(inflight) = &self.inflight {
            inflight.post_put(desc_index, self.queue.next_used());
        }
        Ok(())
    }

    /// Logs every device-writable buffer of chain `head` (whole buffers: a page logged that
    /// was not written only costs the migration a copy). Called before the chain is given
    /// back; the descriptors are read again, so only a driver that changed a chain it had
    /// handed to the device harms its own migration).
    fn log_buffers(&self, log: &VringLog, head: u16) {
        let mem = self.mem.memory();
        let table = GuestAddress(self.queue.desc_table());
        for d in Chain::new(mem.deref(), table, self.queue.size(), head) {
            if d.is_write_only() {
                log.buffer(d.addr().0, u64::from(d.len()));
            }
        }
    }

    /// Starts or stops logging this ring's writes.
    pub(crate) fn set_log(&mut self, log: Option<VringLog>) {
        self.log = log;
    }

    /// The dirty log while the front end logs (for devices that write through their own ring
    /// code, [`crate::ring::SplitRing::with_log`]).
    pub fn dirty_log(&self) -> Option<&VringLog> {
        self.log.as_ref()
    }

    /// The next head to resubmit, if any (see [`super::driver::pop`]).
    pub(crate) fn take_resubmit(&mut self) -> Option<u16> {
        self.resubmit.pop_front()
    }

    /// Marks `head`, just popped, in flight (when the queue is tracked).
    pub(crate) fn mark_in_flight(&mut self, head: u16) {
        if let Some(inflight) = &mut self.inflight {
            inflight.mark(head);
        }
    }

    /// Whether requests wait to be resubmitted.
    pub fn has_resubmits(&self) -> bool {
        !self.resubmit.is_empty()
    }

    /// Attaches this queue's part of an in-flight region (or detaches it).
    pub(crate) fn set_inflight(&mut self, inflight: Option<InflightQueue>) {
        self.inflight = inflight;
        self.resubmit.clear();
    }

    /// Whether the queue is tracked in an in-flight region.
    pub fn is_tracked(&self) -> bool {
        self.inflight.is_some()
    }

    /// Reads the in-flight region when the ring starts (its addresses and base are set): the
    /// requests still marked are queued for resubmission, oldest first, and the ring's next
    /// avail index becomes the used index plus their number (every request popped before
    /// is either on the used ring or one of them), as libvhost-user does. `None` when the
    /// queue is not tracked.
    pub(crate) fn start_inflight(&mut self) -> Result<Option<Replay>, InflightError> {
        let used = self.queue_used_idx().unwrap_or(self.queue.next_used());
        let size = self.queue.size();
        let Some(inflight) = self.inflight.as_mut() else {
            return Ok(None);
        };
        let replay = inflight.start(used, size)?;
        if !replay.heads.is_empty() || replay.finished_last_batch {
            let n = replay.heads.len() as u16;
            self.queue.set_next_avail(used.wrapping_add(n));
            self.queue.set_next_used(used);
        }
        self.resubmit = replay.heads.iter().copied().collect();
        Ok(Some(replay))
    }

    /// Notify the vhost-user front end that used descriptors have been put into the used queue.
    pub fn signal_used_queue(&self) -> io::Result<()> {
        match self.call.as_ref() {
            Some(call) => notify(call),
            None => Ok(()),
        }
    }

    /// Enable event notification for queue.
    ///
    /// A stopped ring (not ready: GET_VRING_BASE, or not started) is not written: its used ring
    /// belongs to the front end (a migration's destination) once its base was read.
    pub fn enable_notification(&mut self) -> Result<bool, VirtQueError> {
        if !self.queue.ready() {
            return Ok(false);
        }
        let r = self.queue.enable_notification(self.mem.memory().deref());
        self.log_notification_fields();
        r
    }

    /// Disable event notification for queue.
    pub fn disable_notification(&mut self) -> Result<(), VirtQueError> {
        if !self.queue.ready() {
            return Ok(());
        }
        let r = self.queue.disable_notification(self.mem.memory().deref());
        self.log_notification_fields();
        r
    }

    /// Logs the used ring fields notification suppression writes (the flags without
    /// EVENT_IDX, `avail_event` with it).
    fn log_notification_fields(&self) {
        if let Some(log) = &self.log {
            if self.queue.event_idx_enabled() {
                log.avail_event(self.queue.size());
            } else {
                log.used_flags();
            }
        }
    }

    /// Check whether a notification to the guest is needed.
    pub fn needs_notification(&mut self) -> Result<bool, VirtQueError> {
        self.queue.needs_notification(self.mem.memory().deref())
    }

    fn set_queue_info(
        &mut self,
        desc_table: u64,
        avail_ring: u64,
        used_ring: u64,
    ) -> Result<(), VirtQueError> {
        self.queue
            .try_set_desc_table_address(GuestAddress(desc_table))?;
        self.queue
            .try_set_avail_ring_address(GuestAddress(avail_ring))?;
        self.queue
            .try_set_used_ring_address(GuestAddress(used_ring))
    }

    fn queue_used_idx(&self) -> Result<u16, VirtQueError> {
        self.queue
            .used_idx(self.mem.memory().deref(), Ordering::Relaxed)
            .map(|idx| idx.0)
    }

    /// Whether a kick eventfd is set.
    pub fn has_kick(&self) -> bool {
        self.kick.is_some()
    }

    /// The kick eventfd, if any.
    pub fn get_kick(&self) -> Option<&File> {
        self.kick.as_ref()
    }

    /// The call eventfd, if any.
    pub fn get_call(&self) -> Option<&File> {
        self.call.as_ref()
    }

    fn read_kick(&self) -> io::Result<bool> {
        if let Some(kick) = &self.kick {
            let mut buf = [0u8; 8];
            match (&*kick).read(&mut buf) {
                Ok(_) => {}
                // A non-blocking kick with nothing pending (a wake-up for a ring that was
                // registered with an event already consumed).
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(self.enabled)
    }
}

/// Adds one to an eventfd's counter (a full counter means a notification is pending anyway).
pub(crate) fn notify(eventfd: &File) -> io::Result<()> {
    match (&*eventfd).write(&1u64.to_ne_bytes()) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
        Err(e) => Err(e),
    }
}

/// A `VringState` object protected by a RwLock, shared by the handler and the worker threads.
#[derive(Debug)]
pub struct VringRwLock<M: GuestAddressSpace> {
    state: Arc<RwLock<VringState<M>>>,
}

impl<M: GuestAddressSpace> Clone for VringRwLock<M> {
    fn clone(&self) -> Self {
        VringRwLock {
            state: self.state.clone(),
        }
    }
}

impl<M: GuestAddressSpace> VringRwLock<M> {
    fn write_lock(&self) -> RwLockWriteGuard<'_, VringState<M>> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn read_lock(&self) -> RwLockReadGuard<'_, VringState<M>> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<'a, M: 'a + GuestAddressSpace> VringStateGuard<'a, M> for VringRwLock<M> {
    type G = RwLockReadGuard<'a, VringState<M>>;
}

impl<'a, M: 'a + GuestAddressSpace> VringStateMutGuard<'a, M> for VringRwLock<M> {
    type G = RwLockWriteGuard<'a, VringState<M>>;
}

impl<M: 'static + GuestAddressSpace> VringT<M> for VringRwLock<M> {
    fn new(mem: M, max_queue_size: u16) -> Result<Self, VirtQueError> {
        Ok(VringRwLock {
            state: Arc::new(RwLock::new(VringState::new(mem, max_queue_size)?)),
        })
    }

    fn get_ref(&self) -> <Self as VringStateGuard<'_, M>>::G {
        self.read_lock()
    }

    fn get_mut(&self) -> <Self as VringStateMutGuard<'_, M>>::G {
        self.write_lock()
    }

    fn add_used(&self, desc_index: u16, len: u32) -> Result<(), VirtQueError> {
        self.write_lock().add_used(desc_index, len)
    }

    fn signal_used_queue(&self) -> io::Result<()> {
        self.read_lock().signal_used_queue()
    }

    fn enable_notification(&self) -> Result<bool, VirtQueError> {
        self.write_lock().enable_notification()
    }

    fn disable_notification(&self) -> Result<(), VirtQueError> {
        self.write_lock().disable_notification()
    }

    fn needs_notification(&self) -> Result<bool, VirtQueError> {
        self.write_lock().needs_notification()
    }

    fn set_enabled(&self, enabled: bool) {
        self.write_lock().enabled = enabled;
    }

    fn set_queue_info(
        &self,
        desc_table: u64,
        avail_ring: u64,
        used_ring: u64,
    ) -> Result<(), VirtQueError> {
        self.write_lock()
            .set_queue_info(desc_table, avail_ring, used_ring)
    }

    fn queue_next_avail(&self) -> u16 {
        self.read_lock().queue.next_avail()
    }

    fn set_queue_next_avail(&self, base: u16) {
        self.write_lock().queue.set_next_avail(base);
    }

    fn set_queue_next_used(&self, idx: u16) {
        self.write_lock().queue.set_next_used(idx);
    }

    fn queue_used_idx(&self) -> Result<u16, VirtQueError> {
        self.read_lock().queue_used_idx()
    }

    fn set_queue_size(&self, num: u16) {
        self.write_lock().queue.set_size(num);
    }

    fn set_queue_event_idx(&self, enabled: bool) {
        self.write_lock().queue.set_event_idx(enabled);
    }

    fn set_queue_ready(&self, ready: bool) {
        self.write_lock().queue.set_ready(ready);
    }

    fn set_kick(&self, file: Option<File>) {
        self.write_lock().kick = file;
    }

    fn read_kick(&self) -> io::Result<bool> {
        self.read_lock().read_kick()
    }

    fn set_call(&self, file: Option<File>) {
        self.write_lock().call = file;
    }

    fn set_err(&self, file: Option<File>) {
        self.write_lock().err = file;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
    use vmm_sys_util::eventfd::EventFd;

    type Vring = VringRwLock<GuestMemoryAtomic<GuestMemoryMmap<()>>>;

    fn vring() -> Vring {
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x100000), 0x10000)]).unwrap(),
        );
        Vring::new(mem, 0x1000).unwrap()
    }

    fn eventfd_file() -> (File, EventFd) {
        let efd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        use std::os::fd::{FromRawFd, IntoRawFd};
        // SAFETY: the descriptor is a new duplicate that nothing else owns.
        let file = unsafe { File::from_raw_fd(efd.try_clone().unwrap().into_raw_fd()) };
        (file, efd)
    }

    #[test]
    fn a_new_vring_is_configured_by_its_setters() {
        let vring = vring();
        assert!(!vring.get_ref().has_kick());
        assert!(!vring.get_ref().is_enabled());
        assert!(!vring.get_ref().get_queue().ready());
        assert!(!vring.get_ref().get_queue().event_idx_enabled());

        vring.set_enabled(true);
        assert!(vring.get_ref().is_enabled());

        vring.set_queue_info(0x100100, 0x100200, 0x100300).unwrap();
        assert_eq!(vring.get_ref().get_queue().desc_table(), 0x100100);
        assert_eq!(vring.get_ref().get_queue().avail_ring(), 0x100200);
        assert_eq!(vring.get_ref().get_queue().used_ring(), 0x100300);

        assert_eq!(vring.queue_next_avail(), 0);
        vring.set_queue_next_avail(0x20);
        assert_eq!(vring.queue_next_avail(), 0x20);

        vring.set_queue_size(0x200);
        assert_eq!(vring.get_ref().get_queue().size(), 0x200);

        vring.set_queue_event_idx(true);
        assert!(vring.get_ref().get_queue().event_idx_enabled());

        vring.set_queue_ready(true);
        assert!(vring.get_ref().get_queue().ready());
    }

    #[test]
    fn a_stopped_ring_does_not_write_its_notification_fields() {
        use vm_memory::Bytes;
        let vring = vring();
        vring.set_queue_info(0x100000, 0x101000, 0x102000).unwrap();
        vring.set_queue_size(16);
        vring.set_queue_event_idx(true);
        vring.set_queue_next_avail(7);
        let mem = vring.get_ref().mem.memory();
        // avail_event, after the 16 used elements.
        let avail_event = GuestAddress(0x102000 + 4 + 8 * 16);
        assert!(!vring.enable_notification().unwrap());
        assert_eq!(mem.read_obj::<u16>(avail_event).unwrap(), 0);
        vring.set_queue_ready(true);
        vring.enable_notification().unwrap();
        assert_eq!(mem.read_obj::<u16>(avail_event).unwrap(), 7);
    }

    #[test]
    fn kick_and_call_are_eventfds() {
        let vring = vring();
        vring.set_enabled(true);
        // No kick yet: reading it only reports the ring's state.
        assert!(vring.read_kick().unwrap());

        let (kick, kick_efd) = eventfd_file();
        vring.set_kick(Some(kick));
        kick_efd.write(1).unwrap();
        assert!(vring.read_kick().unwrap());
        assert!(kick_efd.read().is_err(), "the kick was consumed");
        // A spurious wake-up on a non-blocking kick does not fail.
        assert!(vring.read_kick().unwrap());
        vring.set_kick(None);
        assert!(!vring.get_ref().has_kick());

        let (call, call_efd) = eventfd_file();
        vring.signal_used_queue().unwrap();
        vring.set_call(Some(call));
        vring.signal_used_queue().unwrap();
        vring.signal_used_queue().unwrap();
        assert_eq!(call_efd.read().unwrap(), 2);
        vring.set_call(None);
        assert!(vring.get_ref().get_call().is_none());
    }
}
