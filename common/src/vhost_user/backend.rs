// Copyright 2019 Intel Corporation. All Rights Reserved.
// Copyright 2019-2021 Alibaba Cloud. All rights reserved.
//
// SPDX-License-Identifier: Apache-2.0

//! The trait a device implements to be served by the vhost-user handler.
//!
//! Forked from vhost-user-backend 0.24.0 (`src/backend.rs`, the interior-mutability
//! `VhostUserBackend` only). Changed: guest memory has no dirty bitmap (`Bitmap` is gone: no
//! backend logs dirty pages yet); `exit_event` is gone (each worker thread owns its own wake-up
//! eventfd, closed with it); `set_backend_req_fd` hands the device a [`BackendChannel`] that can
//! send any back-end message (the library's `Backend` could not send CONFIG_CHANGE_MSG); the
//! methods for messages no vback device answers (GPU socket, shared objects, device state
//! transfer, shared memory regions) are gone, and the handler refuses those messages.

use std::io::Result;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vmm_sys_util::epoll::EventSet;

use super::Memory;
use super::channel::BackendChannel;
use super::vring::VringT;

/// A vhost-user device: what it offers, and what it does with its rings' events.
///
/// To support multi-threading and asynchronous I/O, `Send + Sync` is required: the handler
/// calls it from the thread reading the front end's messages, the worker threads from theirs.
pub trait VhostUserBackend: Send + Sync {
    /// The vring type the worker threads hand to [`VhostUserBackend::handle_event`].
    type Vring: VringT<Memory>;

    /// Get number of queues supported.
    fn num_queues(&self) -> usize;

    /// Get maximum queue size supported.
    fn max_queue_size(&self) -> usize;

    /// Get available virtio features.
    fn features(&self) -> u64;

    /// Set acknowledged virtio features.
    fn acked_features(&self, _features: u64) {}

    /// Get available vhost protocol features.
    fn protocol_features(&self) -> VhostUserProtocolFeatures;

    /// Reset the emulated device state (RESET_DEVICE, RESET_OWNER).
    fn reset_device(&self) {}

    /// Enable or disable the virtio EVENT_IDX feature.
    fn set_event_idx(&self, enabled: bool);

    /// Get virtio device configuration (`size` bytes at `offset`).
    fn get_config(&self, _offset: u32, _size: u32) -> Vec<u8> {
        Vec::new()
    }

    /// Set virtio device configuration.
    fn set_config(&self, _offset: u32, _buf: &[u8]) -> Result<()> {
        Ok(())
    }

    /// Update guest memory regions.
    fn update_memory(&self, mem: Memory) -> Result<()>;

    /// The back-end request channel the front end handed over (SET_BACKEND_REQ_FD), for
    /// messages the device sends on its own initiative (CONFIG_CHANGE_MSG). It is valid for
    /// the connection it came with: drop it when the front end disconnects.
    fn set_backend_req_fd(&self, _channel: BackendChannel) {}

    /// The front end handed over an in-flight region an earlier back end used
    /// (SET_INFLIGHT_FD after a back-end restart): this back end takes over a running device
    /// (its requests in flight are resubmitted), so it should not act as if freshly powered on
    /// (cdrom's power-on unit attention).
    fn inflight_handover(&self) {}

    /// Queue `queue` resubmits `requests` requests a crashed predecessor left in flight (they
    /// come before any new one): for the device's counters.
    fn inflight_replayed(&self, _queue: usize, _requests: usize) {}

    /// Which queues each worker thread serves, one bit mask per thread.
    ///
    /// A return value of [0b11, 0b100] means: queues 0 and 1 are handled by worker thread 0,
    /// queue 2 by worker thread 1.
    fn queues_per_thread(&self) -> Vec<u64> {
        vec![0xffff_ffff]
    }

    /// Stop processing requests from the specified vring.
    ///
    /// This is called for `GET_VRING_BASE` after the vring is marked not ready and
    /// unregistered. Asynchronous backends should block until previously accepted requests
    /// have completed.
    fn stop_vring(&self, _queue_index: u32) -> Result<()> {
        Ok(())
    }

    /// Handle an event of worker thread `thread_id`.
    ///
    /// `device_event` below the number of the thread's vrings is a kick of `vrings[device_event]`
    /// (the thread's vrings are numbered from 0 in the order of its mask); tokens above
    /// [`VhostUserBackend::num_queues`] belong to descriptors the device registered itself with
    /// `VringEpollHandler::register_listener`.
    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        thread_id: usize,
    ) -> Result<()>;
}
