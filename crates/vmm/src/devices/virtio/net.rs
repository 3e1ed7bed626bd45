//! The virtio-net device: one receive and one transmit queue behind the
//! virtio-mmio transport, moving Ethernet frames between the guest and a
//! [`zeroboot_net`] backend (the user-mode stack that applies the
//! sandbox's network policy).
//!
//! Two threads touch it: the vCPU thread (register accesses, which exit to
//! the VMM) and, while networking is on, the backend's thread (queues and
//! interrupts). The transport sits behind one mutex; guest memory is shared
//! with the guest anyway, and every access to it is bounds-checked by
//! vm-memory.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU, VIRTIO_NET_HDR_F_DATA_VALID,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;
use zeroboot_net::link;

use super::mmio::{Access, DeviceInfo, MmioState, MmioTransport, TransportError};

const RX: usize = 0;
const TX: usize = 1;
/// Small queues: with the link's 64 KiB MTU each receive buffer the guest
/// posts is 17 pages, all allocated at boot and so held in the template.
/// Indirect descriptors let each take one ring slot.
const QUEUE_SIZES: &[u16] = &[32, 32];
/// Checksums both ways are the device's: a guest kernel that checks or
/// computes one runs over every byte in emulated kernel mode on hosts
/// without VMX (docs/guest-kernel.md, "Networking"). Frames arriving are
/// marked valid; frames leaving may carry a partial checksum, which the
/// backend never needs: it terminates the guest's connections and does not
/// verify what its own link carries (zeroboot_net's device capabilities).
const FEATURES: u64 = 1 << VIRTIO_F_VERSION_1
    | 1 << VIRTIO_NET_F_MAC
    | 1 << VIRTIO_NET_F_MTU
    | 1 << VIRTIO_NET_F_CSUM
    | 1 << VIRTIO_NET_F_GUEST_CSUM
    | 1 << VIRTIO_RING_F_INDIRECT_DESC;
/// `struct virtio_net_hdr_v1`, which precedes every frame in a buffer once
/// VERSION_1 is agreed: flags, gso_type, hdr_len, gso_size, csum_start,
/// csum_offset, num_buffers.
const HEADER_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum NetDeviceError {
    #[error("cannot create the network device's eventfd: {0}")]
    EventFd(std::io::Error),
    #[error(transparent)]
    Transport(#[from] TransportError),
}

/// The device's part of a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub transport: MmioState,
}

fn info() -> DeviceInfo {
    DeviceInfo {
        device_id: VIRTIO_ID_NET,
        features: FEATURES,
        queue_sizes: QUEUE_SIZES,
    }
}

/// `struct virtio_net_config`: mac, status (not offered), queue pairs (not
/// offered), mtu.
fn config_space() -> Vec<u8> {
    let mut config = Vec::with_capacity(12);
    config.extend_from_slice(&link::GUEST_MAC);
    config.extend_from_slice(&0u16.to_le_bytes());
    config.extend_from_slice(&1u16.to_le_bytes());
    config.extend_from_slice(&(link::MTU as u16).to_le_bytes());
    config
}

struct Shared {
    transport: Mutex<MmioTransport>,
    /// A clone of the VM's memory: it views the mapping the machine owns, so
    /// the device and every link must be dropped before that (see
    /// `Machine`'s field order).
    mem: GuestMemoryMmap,
    /// The device's interrupt line (a KVM irqfd).
    irq: EventFd,
    /// Written when the guest notifies a queue: the backend's wake-up.
    kick: EventFd,
}

impl Shared {
    fn transport(&self) -> MutexGuard<'_, MmioTransport> {
        // A thread that panicked while holding the lock left plain
        // registers behind, which stay usable.
        self.transport.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Raises the interrupt if the queue asks for it after new used buffers.
    fn interrupt(&self, transport: &mut MmioTransport, queue: usize) {
        let wanted = transport
            .queue(queue, &self.mem)
            .map(|q| q.needs_notification(&self.mem).unwrap_or(true))
            .unwrap_or(false);
        if wanted {
            transport.signal_used();
            // A full counter means interrupts are pending already.
            let _ = self.irq.write(1);
        }
    }
}

pub struct NetDevice {
    shared: Arc<Shared>,
}

impl NetDevice {
    /// A device as at power-on. `irq` is registered with KVM by the caller.
    pub fn new(mem: GuestMemoryMmap) -> Result<Self, NetDeviceError> {
        Self::with_transport(mem, MmioTransport::new(info(), config_space()))
    }

    pub fn from_state(mem: GuestMemoryMmap, state: &NetState) -> Result<Self, NetDeviceError> {
        Self::with_transport(
            mem,
            MmioTransport::from_state(info(), config_space(), &state.transport)?,
        )
    }

    fn with_transport(mem: GuestMemoryMmap, transport: MmioTransport) -> Result<Self, NetDeviceError> {
        let eventfd = || EventFd::new(libc::EFD_NONBLOCK).map_err(NetDeviceError::EventFd);
        Ok(Self {
            shared: Arc::new(Shared {
                transport: Mutex::new(transport),
                mem,
                irq: eventfd()?,
                kick: eventfd()?,
            }),
        })
    }

    pub fn state(&self) -> NetState {
        NetState {
            transport: self.shared.transport().state(),
        }
    }

    pub fn irq(&self) -> &EventFd {
        &self.shared.irq
    }

    pub fn read(&self, offset: u64, data: &mut [u8]) {
        self.shared.transport().read(offset, data);
    }

    /// A register write; true if the guest notified a queue (it sent frames
    /// or gave receive buffers), which the caller passes on to the backend.
    pub fn write(&self, offset: u64, data: &[u8]) -> bool {
        let access = self.shared.transport().write(offset, data, &self.shared.mem);
        if access == Access::Done {
            return false;
        }
        // A full counter already wakes the backend.
        let _ = self.shared.kick.write(1);
        true
    }

    /// The queues as a backend sees them.
    pub fn link(&self) -> QueueLink {
        QueueLink {
            shared: Arc::clone(&self.shared),
        }
    }
}

/// The guest's end of the link, over the device's queues.
pub struct QueueLink {
    shared: Arc<Shared>,
}

impl zeroboot_net::GuestLink for QueueLink {
    fn drain_sent(&mut self, f: &mut dyn FnMut(&[u8])) {
        // Frames are copied out under the lock and handed on after it, so
        // that the backend may deliver answers from inside `f`.
        let mut frames = Vec::new();
        {
            let shared = &*self.shared;
            let mem = &shared.mem;
            let mut transport = shared.transport();
            let mut sent_any = false;
            let mut broken = false;
            while let Some(queue) = transport.queue(TX, mem) {
                let Some(chain) = queue.pop_descriptor_chain(mem) else {
                    break;
                };
                let head = chain.head_index();
                if let Ok(mut reader) = chain.reader(mem) {
                    let len = reader.available_bytes();
                    if len > HEADER_LEN && len <= HEADER_LEN + link::MAX_FRAME_LEN {
                        let mut frame = vec![0; len];
                        if std::io::Read::read_exact(&mut reader, &mut frame).is_ok() {
                            frame.drain(..HEADER_LEN);
                            frames.push(frame);
                        }
                    }
                }
                sent_any = true;
                if queue.add_used(mem, head, 0).is_err() {
                    broken = true;
                    break;
                }
            }
            if broken && transport.fail() {
                let _ = shared.irq.write(1);
            } else if sent_any {
                shared.interrupt(&mut transport, TX);
            }
        }
        for frame in &frames {
            f(frame);
        }
    }

    fn deliver(&mut self, frame: &[u8]) -> bool {
        let shared = &*self.shared;
        let mem = &shared.mem;
        let mut transport = shared.transport();
        let Some(queue) = transport.queue(RX, mem) else {
            // No receive queue (the driver is not up): the frame is lost,
            // as on a cable nobody listens to.
            return true;
        };
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            return false;
        };
        let head = chain.head_index();
        let mut header = [0u8; HEADER_LEN];
        header[0] = VIRTIO_NET_HDR_F_DATA_VALID as u8;
        header[10] = 1; // num_buffers
        let written = match chain.writer(mem) {
            Ok(mut writer) if writer.available_bytes() >= HEADER_LEN + frame.len() => {
                use std::io::Write;
                match writer.write_all(&header).and_then(|()| writer.write_all(frame)) {
                    Ok(()) => (HEADER_LEN + frame.len()) as u32,
                    Err(_) => 0,
                }
            }
            // A buffer too small for the frame (or not in guest memory):
            // the frame is dropped, the buffer handed back empty.
            _ => 0,
        };
        if queue.add_used(mem, head, written).is_err() {
            if transport.fail() {
                let _ = shared.irq.write(1);
            }
            return true;
        }
        shared.interrupt(&mut transport, RX);
        true
    }

    fn wake_fd(&self) -> RawFd {
        self.shared.kick.as_raw_fd()
    }

    fn clear_wake(&mut self) {
        let _ = self.shared.kick.read();
    }
}
