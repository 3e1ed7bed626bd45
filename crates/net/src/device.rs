//! The smoltcp device: two in-memory frame queues between the stack and the
//! guest link.

use std::collections::VecDeque;

use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use crate::link;

/// Frames waiting for the guest, counted in bytes: past it smoltcp keeps
/// further data in its socket buffers until the guest takes some.
const TO_GUEST_LIMIT_BYTES: usize = 4 << 20;
/// Frames waiting for the guest, counted in frames (small frames such as
/// ACKs would otherwise pile up by the thousand).
const TO_GUEST_LIMIT_FRAMES: usize = 1024;

#[derive(Default)]
pub(crate) struct FrameQueues {
    /// Guest frames smoltcp has yet to process.
    pub(crate) from_guest: VecDeque<Vec<u8>>,
    pub(crate) from_guest_bytes: usize,
    to_guest: VecDeque<Vec<u8>>,
    to_guest_bytes: usize,
    /// smoltcp wanted to send while the guest's queue was full.
    pub(crate) egress_blocked: bool,
}

impl FrameQueues {
    pub(crate) fn push_from_guest(&mut self, frame: Vec<u8>) {
        self.from_guest_bytes += frame.len();
        self.from_guest.push_back(frame);
    }

    pub(crate) fn to_guest_full(&self) -> bool {
        self.to_guest_bytes >= TO_GUEST_LIMIT_BYTES || self.to_guest.len() >= TO_GUEST_LIMIT_FRAMES
    }

    pub(crate) fn to_guest_len(&self) -> usize {
        self.to_guest.len()
    }

    /// Drops the frames queued for the guest after the first `len`.
    pub(crate) fn truncate_to_guest(&mut self, len: usize) {
        while self.to_guest.len() > len {
            if let Some(frame) = self.to_guest.pop_back() {
                self.to_guest_bytes -= frame.len();
            }
        }
    }

    pub(crate) fn front_to_guest(&self) -> Option<&[u8]> {
        self.to_guest.front().map(Vec::as_slice)
    }

    pub(crate) fn pop_to_guest(&mut self) -> Option<Vec<u8>> {
        let frame = self.to_guest.pop_front()?;
        self.to_guest_bytes -= frame.len();
        Some(frame)
    }
}

pub(crate) struct GuestFrame(Vec<u8>);

impl phy::RxToken for GuestFrame {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(&self.0)
    }
}

pub(crate) struct ToGuest<'a> {
    queue: &'a mut VecDeque<Vec<u8>>,
    bytes: &'a mut usize,
}

impl phy::TxToken for ToGuest<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let mut frame = vec![0; len];
        let result = f(&mut frame);
        *self.bytes += frame.len();
        self.queue.push_back(frame);
        result
    }
}

impl phy::Device for FrameQueues {
    type RxToken<'a> = GuestFrame;
    type TxToken<'a> = ToGuest<'a>;

    // The reply token is handed out even when the guest's queue is full: a
    // reply (an ACK, a RST) is at most one frame per guest frame, and guest
    // frames are bounded where they are queued.
    fn receive(&mut self, _timestamp: Instant) -> Option<(GuestFrame, ToGuest<'_>)> {
        let frame = self.from_guest.pop_front()?;
        self.from_guest_bytes -= frame.len();
        Some((
            GuestFrame(frame),
            ToGuest {
                queue: &mut self.to_guest,
                bytes: &mut self.to_guest_bytes,
            },
        ))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<ToGuest<'_>> {
        if self.to_guest_full() {
            self.egress_blocked = true;
            return None;
        }
        Some(ToGuest {
            queue: &mut self.to_guest,
            bytes: &mut self.to_guest_bytes,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut capabilities = DeviceCapabilities::default();
        capabilities.medium = Medium::Ethernet;
        capabilities.max_transmission_unit = link::MAX_FRAME_LEN;
        // Checksums are computed for the guest but not verified on its
        // frames: nothing corrupts a frame in memory, and a guest that
        // offloads checksums leaves them partial.
        let mut checksum = ChecksumCapabilities::default();
        checksum.ipv4 = Checksum::Tx;
        checksum.tcp = Checksum::Tx;
        checksum.udp = Checksum::Tx;
        checksum.icmpv4 = Checksum::Tx;
        capabilities.checksum = checksum;
        capabilities
    }
}
