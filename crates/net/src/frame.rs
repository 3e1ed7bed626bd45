//! A first look at each guest frame, before smoltcp sees it: which frames
//! may reach the stack at all, and which open a TCP connection.

use std::net::SocketAddrV4;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, IpProtocol,
    Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr,
};

use crate::link;

/// One guest TCP connection: the guest's port and the destination it
/// connects to (the guest's address is always [`link::GUEST_IP`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct FlowKey {
    pub(crate) guest_port: u16,
    pub(crate) destination: SocketAddrV4,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Inspected {
    /// Not for the stack: another protocol, another sender, a fragment.
    Drop,
    /// For the stack as it is (ARP for the gateway, UDP, ICMP).
    Pass,
    Tcp {
        key: FlowKey,
        /// A SYN without ACK: the guest opens a connection.
        opens: bool,
        resets: bool,
    },
}

pub(crate) fn inspect(frame: &[u8]) -> Inspected {
    let Ok(ethernet) = EthernetFrame::new_checked(frame) else {
        return Inspected::Drop;
    };
    match ethernet.ethertype() {
        EthernetProtocol::Arp => inspect_arp(ethernet.payload()),
        EthernetProtocol::Ipv4 if ethernet.dst_addr() == EthernetAddress(link::GATEWAY_MAC) => {
            inspect_ipv4(ethernet.payload())
        }
        _ => Inspected::Drop,
    }
}

/// Only the guest asking for the gateway: smoltcp, with any-IP on, would
/// otherwise claim every address on the link, the guest's own included.
fn inspect_arp(payload: &[u8]) -> Inspected {
    let Ok(packet) = ArpPacket::new_checked(payload) else {
        return Inspected::Drop;
    };
    match ArpRepr::parse(&packet) {
        Ok(ArpRepr::EthernetIpv4 {
            source_protocol_addr,
            target_protocol_addr,
            ..
        }) if source_protocol_addr == link::GUEST_IP && target_protocol_addr == link::GATEWAY_IP => Inspected::Pass,
        _ => Inspected::Drop,
    }
}

fn inspect_ipv4(payload: &[u8]) -> Inspected {
    let Ok(packet) = Ipv4Packet::new_checked(payload) else {
        return Inspected::Drop;
    };
    // Checksums are not verified here, as the stack does not verify them.
    let checksums = ChecksumCapabilities::ignored();
    let Ok(ip) = Ipv4Repr::parse(&packet, &checksums) else {
        return Inspected::Drop;
    };
    // A guest may only speak for itself. Fragments are dropped whole: the
    // stack does not reassemble, and a TCP header split across fragments
    // must not slip past the connection check.
    if ip.src_addr != link::GUEST_IP || packet.more_frags() || packet.frag_offset() != 0 {
        return Inspected::Drop;
    }
    if ip.next_header != IpProtocol::Tcp {
        return Inspected::Pass;
    }
    let Ok(segment) = TcpPacket::new_checked(packet.payload()) else {
        return Inspected::Drop;
    };
    let Ok(tcp) = TcpRepr::parse(&segment, &ip.src_addr.into(), &ip.dst_addr.into(), &checksums) else {
        return Inspected::Drop;
    };
    Inspected::Tcp {
        key: FlowKey {
            guest_port: tcp.src_port,
            destination: SocketAddrV4::new(ip.dst_addr, tcp.dst_port),
        },
        opens: tcp.control == TcpControl::Syn && tcp.ack_number.is_none(),
        resets: tcp.control == TcpControl::Rst,
    }
}

/// The ARP request the guest sends for the gateway. Fed to the stack, it
/// teaches it the guest's MAC, which a guest restored from a snapshot with
/// the gateway already in its ARP cache would never send on its own.
pub(crate) fn guest_arp_request() -> Vec<u8> {
    let arp = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: EthernetAddress(link::GUEST_MAC),
        source_protocol_addr: link::GUEST_IP,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: link::GATEWAY_IP,
    };
    let ethernet = EthernetRepr {
        src_addr: EthernetAddress(link::GUEST_MAC),
        dst_addr: EthernetAddress(link::GATEWAY_MAC),
        ethertype: EthernetProtocol::Arp,
    };
    let mut frame = vec![0; ethernet.buffer_len() + arp.buffer_len()];
    let mut ethernet_frame = EthernetFrame::new_unchecked(&mut frame[..]);
    ethernet.emit(&mut ethernet_frame);
    arp.emit(&mut ArpPacket::new_unchecked(ethernet_frame.payload_mut()));
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_synthetic_arp_request_is_one_the_stack_accepts() {
        assert_eq!(inspect(&guest_arp_request()), Inspected::Pass);
    }

    #[test]
    fn short_and_foreign_frames_are_dropped() {
        assert_eq!(inspect(&[]), Inspected::Drop);
        assert_eq!(inspect(&[0; 13]), Inspected::Drop);
        let mut ipv6 = vec![0; 60];
        ipv6[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert_eq!(inspect(&ipv6), Inspected::Drop);
    }
}
