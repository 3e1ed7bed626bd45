//! A machine's network: its virtio-net device and the backend behind it.
//!
//! Every guest has the device (the kernel finds it at boot and configures
//! its address itself), but a fork pays nothing for it until the guest
//! touches it: the device object, its eventfds and its KVM irqfd are made
//! on the first register access, and a sandbox whose code never uses the
//! network never has one. A `print(1+1)` stays at one VM exit.
//!
//! Without networking, frames the guest sends are answered on the vCPU
//! thread by a [`zeroboot_net::Stack`] that allows nothing: a connection is
//! refused at once and a name does not resolve, instead of hanging until a
//! timeout. With networking ([`Network::start`]), a [`zeroboot_net::Backend`]
//! thread serves the queues under the sandbox's policy.

use zeroboot_net::{Backend, GuestLink, NetConfig, NetError, Stack};

use crate::devices::virtio::mmio::MMIO_SIZE;
use crate::devices::virtio::net::{NetDevice, NetDeviceError, NetState, QueueLink};
use crate::kvm::{KvmError, Vm};
use crate::memory::GuestRam;

/// Guest-physical address of the device's register page: beside the
/// doorbell, in the hole below 4 GiB where no memory slot is.
pub const VIRTIO_NET_GPA: u64 = crate::layout::DOORBELL_GPA + 0x1000;
/// Its interrupt line (COM1 has 4).
pub const VIRTIO_NET_IRQ: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error(transparent)]
    Device(#[from] NetDeviceError),
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error("cannot start the network: {0}")]
    Backend(#[from] NetError),
    #[error("networking is already on for this sandbox")]
    AlreadyStarted,
}

/// The kernel command line that describes the device and the guest's
/// address (the kernel's own IP autoconfiguration, without DHCP).
pub fn kernel_args() -> String {
    use zeroboot_net::link;
    let mask = u32::MAX << (32 - u32::from(link::PREFIX_LEN));
    format!(
        "virtio_mmio.device=4K@{VIRTIO_NET_GPA:#x}:{VIRTIO_NET_IRQ} ip={}::{}:{}::eth0:off",
        link::GUEST_IP,
        link::GATEWAY_IP,
        std::net::Ipv4Addr::from(mask),
    )
}

enum Serving {
    /// Nothing allows traffic: the vCPU thread answers what the guest sends
    /// (made on the guest's first frame).
    Refusing(Option<Box<Stack>>),
    Backend(Backend),
}

pub struct Network {
    // Field order is drop order: the backend's thread, which uses the
    // device's queues, stops before the device goes.
    serving: Serving,
    device: Option<NetDevice>,
    /// The device's state until the device is made (`None`: power-on).
    saved: Option<NetState>,
}

impl Network {
    pub fn new(saved: Option<NetState>) -> Self {
        Self {
            serving: Serving::Refusing(None),
            device: None,
            saved,
        }
    }

    pub fn handles(addr: u64) -> bool {
        (VIRTIO_NET_GPA..VIRTIO_NET_GPA + MMIO_SIZE).contains(&addr)
    }

    pub fn state(&self) -> Option<NetState> {
        self.device
            .as_ref()
            .map(NetDevice::state)
            .or_else(|| self.saved.clone())
    }

    fn device(&mut self, vm: &Vm, ram: &GuestRam) -> Result<&NetDevice, NetworkError> {
        if self.device.is_none() {
            let device = match &self.saved {
                Some(state) => NetDevice::from_state(ram.memory().clone(), state)?,
                None => NetDevice::new(ram.memory().clone())?,
            };
            vm.register_irq(device.irq(), VIRTIO_NET_IRQ)?;
            self.device = Some(device);
        }
        // Just made if it was missing.
        self.device.as_ref().ok_or(NetworkError::AlreadyStarted)
    }

    pub fn read(&mut self, vm: &Vm, ram: &GuestRam, addr: u64, data: &mut [u8]) -> Result<(), NetworkError> {
        self.device(vm, ram)?.read(addr - VIRTIO_NET_GPA, data);
        Ok(())
    }

    pub fn write(&mut self, vm: &Vm, ram: &GuestRam, addr: u64, data: &[u8]) -> Result<(), NetworkError> {
        let notified = self.device(vm, ram)?.write(addr - VIRTIO_NET_GPA, data);
        if notified {
            if let Serving::Refusing(stack) = &mut self.serving {
                let mut link = self.device.as_ref().map(NetDevice::link);
                if let Some(link) = link.as_mut() {
                    refuse(stack, link);
                }
            }
        }
        Ok(())
    }

    /// Serves the guest's traffic under `config` from now on, on a thread
    /// of its own, until the machine is dropped.
    pub fn start(&mut self, vm: &Vm, ram: &GuestRam, config: NetConfig) -> Result<(), NetworkError> {
        if matches!(self.serving, Serving::Backend(_)) {
            return Err(NetworkError::AlreadyStarted);
        }
        let link = self.device(vm, ram)?.link();
        self.serving = Serving::Backend(Backend::spawn(config, Box::new(link))?);
        Ok(())
    }

    pub fn backend(&self) -> Option<&Backend> {
        match &self.serving {
            Serving::Backend(backend) => Some(backend),
            Serving::Refusing(_) => None,
        }
    }
}

/// Answers, on this thread, everything the guest sent: ARP, refusals,
/// names that do not resolve.
fn refuse(stack: &mut Option<Box<Stack>>, link: &mut QueueLink) {
    let stack = stack.get_or_insert_with(|| Box::new(Stack::refusing()));
    link.clear_wake();
    link.drain_sent(&mut |frame| stack.from_guest(frame));
    stack.poll(std::time::Instant::now());
    // What finds no receive buffer now waits in the stack for the guest's
    // next notification (it gives buffers back with one).
    stack.send_to_guest(&mut |frame| link.deliver(frame));
}
