//! The private Ethernet link between one sandbox's guest and its backend.
//!
//! Every sandbox has the same addresses: each link is private to its sandbox
//! and never seen outside it, as with slirp.

use std::net::Ipv4Addr;
use std::os::fd::RawFd;

/// The guest's address (its kernel command line or init configures it).
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The backend's address on the link: the guest's default gateway and its
/// DNS server (UDP port 53).
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// Prefix length of the link's network, 10.0.2.0/24.
pub const PREFIX_LEN: u8 = 24;
/// The guest NIC's MAC address.
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x5a, 0x42, 0x0f];
/// The backend's MAC address on the link.
pub const GATEWAY_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x5a, 0x42, 0x02];
/// The link's MTU: large, as passt does, so a 64 KiB TCP segment is one
/// frame (every guest packet costs emulated guest-kernel work on our hosts).
pub const MTU: usize = 65520;
/// The largest Ethernet frame the link carries: the MTU plus the 14-byte
/// Ethernet header (no VLAN tag, no FCS).
pub const MAX_FRAME_LEN: usize = MTU + 14;

/// The guest side of the link, implemented by the VMM over virtio queues.
pub trait GuestLink: Send {
    /// Calls `f` with each Ethernet frame (no virtio header) the guest sent
    /// since the last call.
    fn drain_sent(&mut self, f: &mut dyn FnMut(&[u8]));
    /// Hands one Ethernet frame to the guest; false if the guest has no
    /// receive buffer free now (the backend retries after the next wake).
    fn deliver(&mut self, frame: &[u8]) -> bool;
    /// A descriptor that becomes readable when the guest sent frames or gave
    /// receive buffers (an eventfd the link owns; the backend clears it
    /// through [`GuestLink::clear_wake`]).
    fn wake_fd(&self) -> RawFd;
    /// Resets [`GuestLink::wake_fd`] to not readable.
    fn clear_wake(&mut self);
}
