//! The virtio-mmio transport (virtio 1.2, section 4.2.2, version 2): the
//! register page a virtio device shows the guest, its feature negotiation,
//! queue setup and interrupt status. The queues themselves are rust-vmm's
//! `virtio-queue`; what the device does with them is its own (see `net`).
//!
//! Everything the guest writes here is untrusted: a value the transport
//! cannot use is ignored or refused (a queue that is not valid never
//! becomes ready, features the device never offered fail `FEATURES_OK`),
//! and nothing the guest writes can make the host panic.

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;

/// "virt", little-endian.
const MAGIC: u32 = 0x7472_6976;
/// The modern (non-legacy) register layout.
const MMIO_VERSION: u32 = 2;
/// Bytes of register page each device takes.
pub const MMIO_SIZE: u64 = 0x1000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TransportError {
    #[error("saved virtio queue {index} is invalid: {reason}")]
    Queue { index: usize, reason: String },
    #[error("saved virtio state has {saved} queues, the device has {device}")]
    QueueCount { saved: usize, device: usize },
}

/// What a register write asks of the device beyond the transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Done,
    /// The driver notified queue `n` (it has new buffers for the device).
    Notify(u16),
}

/// One queue's registers and ring positions, as saved in a snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRegs {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
}

/// The transport's registers, as saved in a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub status: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub queues: Vec<QueueRegs>,
}

/// A device behind the transport: what it offers, its configuration space.
pub struct DeviceInfo {
    pub device_id: u32,
    pub features: u64,
    pub queue_sizes: &'static [u16],
}

pub struct MmioTransport {
    info: DeviceInfo,
    config: Vec<u8>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
    queues: Vec<Queue>,
}

impl MmioTransport {
    pub fn new(info: DeviceInfo, config: Vec<u8>) -> Self {
        let queues = info
            .queue_sizes
            .iter()
            .filter_map(|&max| Queue::new(max).ok())
            .collect();
        Self {
            info,
            config,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
            queues,
        }
    }

    /// The transport as a snapshot left it. The queues are checked as
    /// `virtio-queue` checks a queue the guest configures.
    pub fn from_state(info: DeviceInfo, config: Vec<u8>, state: &MmioState) -> Result<Self, TransportError> {
        let mut transport = Self::new(info, config);
        if state.queues.len() != transport.queues.len() {
            return Err(TransportError::QueueCount {
                saved: state.queues.len(),
                device: transport.queues.len(),
            });
        }
        for (index, regs) in state.queues.iter().enumerate() {
            let queue_state = QueueState {
                max_size: regs.max_size,
                next_avail: regs.next_avail,
                next_used: regs.next_used,
                event_idx_enabled: regs.event_idx,
                size: regs.size,
                ready: regs.ready,
                desc_table: regs.desc_table,
                avail_ring: regs.avail_ring,
                used_ring: regs.used_ring,
            };
            transport.queues[index] = Queue::try_from(queue_state).map_err(|e| TransportError::Queue {
                index,
                reason: e.to_string(),
            })?;
        }
        transport.device_features_sel = state.device_features_sel;
        transport.driver_features_sel = state.driver_features_sel;
        transport.driver_features = state.driver_features;
        transport.queue_sel = state.queue_sel;
        transport.status = state.status;
        transport.interrupt_status = state.interrupt_status;
        transport.config_generation = state.config_generation;
        Ok(transport)
    }

    pub fn state(&self) -> MmioState {
        MmioState {
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            status: self.status,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues: self
                .queues
                .iter()
                .map(|q| QueueRegs {
                    max_size: q.max_size(),
                    size: q.size(),
                    ready: q.ready(),
                    desc_table: q.desc_table(),
                    avail_ring: q.avail_ring(),
                    used_ring: q.used_ring(),
                    next_avail: q.next_avail(),
                    next_used: q.next_used(),
                    event_idx: q.event_idx_enabled(),
                })
                .collect(),
        }
    }

    /// The driver finished setting the device up, and has not failed it.
    pub fn is_active(&self) -> bool {
        self.status & (VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FAILED | VIRTIO_CONFIG_S_NEEDS_RESET)
            == VIRTIO_CONFIG_S_DRIVER_OK
    }

    /// Queue `index` if the driver made it ready and it lies in guest memory.
    pub fn queue(&mut self, index: usize, mem: &GuestMemoryMmap) -> Option<&mut Queue> {
        if !self.is_active() {
            return None;
        }
        // `ready` first: virtio-queue logs an error for a queue that is not.
        self.queues.get_mut(index).filter(|q| q.ready() && q.is_valid(mem))
    }

    /// Marks used buffers for the guest; true if the interrupt must be raised now.
    pub fn signal_used(&mut self) -> bool {
        let newly = self.interrupt_status & VIRTIO_MMIO_INT_VRING == 0;
        self.interrupt_status |= VIRTIO_MMIO_INT_VRING;
        newly
    }

    /// The device cannot go on with what the driver gave it: it says so
    /// (the driver may reset it) and stops using its queues.
    pub fn fail(&mut self) -> bool {
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.interrupt_status |= VIRTIO_MMIO_INT_CONFIG;
        true
    }

    /// A register read of `data.len()` bytes at `offset` into the page.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            let start = (offset - u64::from(VIRTIO_MMIO_CONFIG)) as usize;
            for (i, byte) in data.iter_mut().enumerate() {
                *byte = self.config.get(start + i).copied().unwrap_or(0);
            }
            return;
        }
        // Registers are 32-bit; the spec allows only aligned 32-bit reads.
        if data.len() != 4 || !offset.is_multiple_of(4) {
            return;
        }
        let queue = self.queues.get(self.queue_sel as usize);
        let value = match offset as u32 {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.info.device_id,
            VIRTIO_MMIO_VENDOR_ID => 0,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.info.features as u32,
                1 => (self.info.features >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            VIRTIO_MMIO_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// A register write at `offset` into the page.
    pub fn write(&mut self, offset: u64, data: &[u8], mem: &GuestMemoryMmap) -> Access {
        // The configuration space of a network device is read-only.
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) || data.len() != 4 || !offset.is_multiple_of(4) {
            return Access::Done;
        }
        let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        // Queue registers may change only while the queue is not ready, and
        // only before DRIVER_OK (virtio 1.2, 4.2.2.2).
        let setting_up = self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0;
        let queue = self
            .queues
            .get_mut(self.queue_sel as usize)
            .filter(|q| setting_up && !q.ready());
        match offset as u32 {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES if self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 => {
                match self.driver_features_sel {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32),
                    _ => {}
                }
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            VIRTIO_MMIO_QUEUE_NUM => {
                if let Some(q) = queue {
                    // A size the queue refuses (not a power of two, too
                    // large) leaves it invalid, so it never becomes ready.
                    let _ = q.try_set_size(value as u16);
                }
            }
            VIRTIO_MMIO_QUEUE_READY => {
                if let Some(q) = queue {
                    // Ready only if valid, and valid only if ready: set,
                    // check, and take back a queue that is not.
                    q.set_ready(value == 1);
                    if q.ready() && !q.is_valid(mem) {
                        q.set_ready(false);
                    }
                } else if value == 0 {
                    if let Some(q) = self.queues.get_mut(self.queue_sel as usize) {
                        q.set_ready(false);
                    }
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW => queue
                .into_iter()
                .for_each(|q| q.set_desc_table_address(Some(value), None)),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => queue
                .into_iter()
                .for_each(|q| q.set_desc_table_address(None, Some(value))),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => queue
                .into_iter()
                .for_each(|q| q.set_avail_ring_address(Some(value), None)),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => queue
                .into_iter()
                .for_each(|q| q.set_avail_ring_address(None, Some(value))),
            VIRTIO_MMIO_QUEUE_USED_LOW => queue
                .into_iter()
                .for_each(|q| q.set_used_ring_address(Some(value), None)),
            VIRTIO_MMIO_QUEUE_USED_HIGH => queue
                .into_iter()
                .for_each(|q| q.set_used_ring_address(None, Some(value))),
            VIRTIO_MMIO_QUEUE_NOTIFY if self.is_active() && (value as usize) < self.queues.len() => {
                return Access::Notify(value as u16);
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt_status &= !value,
            VIRTIO_MMIO_STATUS => self.set_status(value),
            _ => {}
        }
        Access::Done
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value;
        // FEATURES_OK holds only for features the device offered: the
        // driver reads the status back and gives up if it did not stick.
        let newly_ok = value & VIRTIO_CONFIG_S_FEATURES_OK != 0 && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0;
        if newly_ok {
            if self.driver_features & !self.info.features != 0 {
                value &= !VIRTIO_CONFIG_S_FEATURES_OK;
            } else {
                let event_idx =
                    self.driver_features & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX) != 0;
                self.queues.iter_mut().for_each(|q| q.set_event_idx(event_idx));
            }
        }
        // Bits only accumulate until a reset.
        let known = VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK
            | VIRTIO_CONFIG_S_FAILED;
        self.status |= value & known;
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            // DRIVER_OK without agreed features: a broken driver.
            self.status |= VIRTIO_CONFIG_S_FAILED;
        }
    }

    fn reset(&mut self) {
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt_status = 0;
        self.queues.iter_mut().for_each(|q| q.reset());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    const FEATURES: u64 = 1 << 32 | 1 << 5;

    fn transport() -> (MmioTransport, GuestMemoryMmap) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let info = DeviceInfo {
            device_id: 1,
            features: FEATURES,
            queue_sizes: &[16, 16],
        };
        (MmioTransport::new(info, vec![1, 2, 3, 4, 5, 6]), mem)
    }

    fn read(t: &MmioTransport, offset: u32) -> u32 {
        let mut data = [0u8; 4];
        t.read(u64::from(offset), &mut data);
        u32::from_le_bytes(data)
    }

    fn write(t: &mut MmioTransport, mem: &GuestMemoryMmap, offset: u32, value: u32) -> Access {
        t.write(u64::from(offset), &value.to_le_bytes(), mem)
    }

    fn set_up(t: &mut MmioTransport, mem: &GuestMemoryMmap, driver_features: u64) {
        write(
            t,
            mem,
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        write(t, mem, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        write(t, mem, VIRTIO_MMIO_DRIVER_FEATURES, driver_features as u32);
        write(t, mem, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        write(t, mem, VIRTIO_MMIO_DRIVER_FEATURES, (driver_features >> 32) as u32);
        write(t, mem, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_FEATURES_OK);
        for (q, base) in [(0u32, 0x1000u32), (1, 0x4000)] {
            write(t, mem, VIRTIO_MMIO_QUEUE_SEL, q);
            write(t, mem, VIRTIO_MMIO_QUEUE_NUM, 16);
            write(t, mem, VIRTIO_MMIO_QUEUE_DESC_LOW, base);
            write(t, mem, VIRTIO_MMIO_QUEUE_AVAIL_LOW, base + 0x1000);
            write(t, mem, VIRTIO_MMIO_QUEUE_USED_LOW, base + 0x2000);
            write(t, mem, VIRTIO_MMIO_QUEUE_READY, 1);
        }
        write(t, mem, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_DRIVER_OK);
    }

    #[test]
    fn a_driver_sets_the_device_up_and_notifies() {
        let (mut t, mem) = transport();
        assert_eq!(read(&t, VIRTIO_MMIO_MAGIC_VALUE), MAGIC);
        assert_eq!(read(&t, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(read(&t, VIRTIO_MMIO_DEVICE_ID), 1);
        write(&mut t, &mem, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(read(&t, VIRTIO_MMIO_DEVICE_FEATURES), 1);
        set_up(&mut t, &mem, FEATURES);
        assert!(t.is_active());
        assert!(t.queue(1, &mem).is_some());
        assert_eq!(write(&mut t, &mem, VIRTIO_MMIO_QUEUE_NOTIFY, 1), Access::Notify(1));
        assert_eq!(write(&mut t, &mem, VIRTIO_MMIO_QUEUE_NOTIFY, 7), Access::Done);
        let mut mac = [0u8; 6];
        t.read(u64::from(VIRTIO_MMIO_CONFIG), &mut mac);
        assert_eq!(mac, [1, 2, 3, 4, 5, 6]);
        // Interrupt status is set by the device and cleared by the driver.
        assert!(t.signal_used());
        assert!(!t.signal_used());
        write(&mut t, &mem, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert_eq!(read(&t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    }

    #[test]
    fn features_never_offered_fail_negotiation() {
        let (mut t, mem) = transport();
        set_up(&mut t, &mem, FEATURES | 1 << 40);
        assert_eq!(read(&t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        assert!(!t.is_active(), "DRIVER_OK without FEATURES_OK fails the device");
        assert!(t.queue(0, &mem).is_none());
    }

    #[test]
    fn garbage_queue_setup_never_makes_a_ready_queue() {
        let (mut t, mem) = transport();
        write(&mut t, &mem, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        write(&mut t, &mem, VIRTIO_MMIO_QUEUE_SEL, 0);
        write(&mut t, &mem, VIRTIO_MMIO_QUEUE_NUM, 13);
        write(&mut t, &mem, VIRTIO_MMIO_QUEUE_DESC_LOW, 0xffff_f000);
        write(&mut t, &mem, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0xffff_ffff);
        write(&mut t, &mem, VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(read(&t, VIRTIO_MMIO_QUEUE_READY), 0);
        // Out-of-range selectors and odd-sized accesses are ignored.
        write(&mut t, &mem, VIRTIO_MMIO_QUEUE_SEL, 99);
        write(&mut t, &mem, VIRTIO_MMIO_QUEUE_NUM, 16);
        assert_eq!(read(&t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
        t.write(u64::from(VIRTIO_MMIO_STATUS), &[1], &mem);
        let mut odd = [0u8; 2];
        t.read(u64::from(VIRTIO_MMIO_MAGIC_VALUE) + 1, &mut odd);
        assert_eq!(odd, [0, 0]);
        t.read(0xfff, &mut odd);
    }

    #[test]
    fn state_round_trips_and_a_bad_saved_queue_is_refused() {
        let (mut t, mem) = transport();
        set_up(&mut t, &mem, FEATURES);
        let state = t.state();
        let info = || DeviceInfo {
            device_id: 1,
            features: FEATURES,
            queue_sizes: &[16, 16],
        };
        let restored = MmioTransport::from_state(info(), vec![], &state).unwrap();
        assert_eq!(restored.state(), state);
        let mut bad = state.clone();
        bad.queues[1].size = 3;
        assert!(matches!(
            MmioTransport::from_state(info(), vec![], &bad),
            Err(TransportError::Queue { index: 1, .. })
        ));
        bad.queues.pop();
        assert!(MmioTransport::from_state(info(), vec![], &bad).is_err());
        // A reset forgets the driver's setup.
        write(&mut t, &mem, VIRTIO_MMIO_STATUS, 0);
        assert!(!t.is_active());
        assert_eq!(
            t.state().queues[0],
            QueueRegs {
                max_size: 16,
                size: 16,
                ..Default::default()
            }
        );
    }
}
