//! A guest for the backend's tests: a second smoltcp interface with the
//! guest's addresses, wired to a [`Stack`] through in-memory frame queues,
//! and small host servers on loopback.

#![allow(dead_code)]
// Test support: a failed setup step is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use simple_dns::rdata::{RData, A, CNAME};
use simple_dns::{Name, Packet, PacketFlag, Question, ResourceRecord, CLASS, QCLASS, QTYPE, RCODE, TYPE};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::{tcp, udp};
use smoltcp::storage::PacketMetadata;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, HardwareAddress, IpAddress, IpCidr, IpEndpoint,
    IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber, UdpPacket, UdpRepr,
};
use zeroboot_net::{link, NetConfig, NetworkPolicy, Stack};

/// Frames between the guest interface and whatever plays the link.
#[derive(Default)]
pub struct Wire {
    /// Frames for the guest.
    pub inbound: VecDeque<Vec<u8>>,
    /// Frames the guest sent.
    pub outbound: VecDeque<Vec<u8>>,
}

pub struct Frame(Vec<u8>);

impl phy::RxToken for Frame {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

pub struct Outbound<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::TxToken for Outbound<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0; len];
        let result = f(&mut frame);
        self.0.push_back(frame);
        result
    }
}

impl phy::Device for Wire {
    type RxToken<'a> = Frame;
    type TxToken<'a> = Outbound<'a>;

    fn receive(&mut self, _: smoltcp::time::Instant) -> Option<(Frame, Outbound<'_>)> {
        let frame = self.inbound.pop_front()?;
        Some((Frame(frame), Outbound(&mut self.outbound)))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Outbound<'_>> {
        Some(Outbound(&mut self.outbound))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut capabilities = DeviceCapabilities::default();
        capabilities.medium = Medium::Ethernet;
        capabilities.max_transmission_unit = link::MAX_FRAME_LEN;
        // Default checksum capabilities: the guest verifies every checksum
        // the backend computed.
        capabilities
    }
}

pub const GUEST_BUFFER_LEN: usize = 256 << 10;

pub struct Guest {
    pub iface: Interface,
    pub wire: Wire,
    pub sockets: SocketSet<'static>,
    epoch: Instant,
    next_port: u16,
}

impl Default for Guest {
    fn default() -> Self {
        Self::new()
    }
}

impl Guest {
    pub fn new() -> Guest {
        let mut wire = Wire::default();
        let config = Config::new(HardwareAddress::Ethernet(EthernetAddress(link::GUEST_MAC)));
        let mut iface = Interface::new(config, &mut wire, smoltcp::time::Instant::ZERO);
        iface.update_ip_addrs(|addresses| {
            addresses
                .push(IpCidr::new(IpAddress::Ipv4(link::GUEST_IP), link::PREFIX_LEN))
                .unwrap();
        });
        iface.routes_mut().add_default_ipv4_route(link::GATEWAY_IP).unwrap();
        Guest {
            iface,
            wire,
            sockets: SocketSet::new(Vec::new()),
            epoch: Instant::now(),
            next_port: 40000,
        }
    }

    pub fn poll(&mut self, now: Instant) {
        let timestamp =
            smoltcp::time::Instant::from_micros(now.saturating_duration_since(self.epoch).as_micros() as i64);
        self.iface.poll(timestamp, &mut self.wire, &mut self.sockets);
    }

    fn port(&mut self) -> u16 {
        self.next_port += 1;
        self.next_port
    }

    pub fn connect(&mut self, remote: SocketAddrV4) -> SocketHandle {
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; GUEST_BUFFER_LEN]),
            tcp::SocketBuffer::new(vec![0; GUEST_BUFFER_LEN]),
        );
        let port = self.port();
        socket
            .connect(
                self.iface.context(),
                IpEndpoint::new(IpAddress::Ipv4(*remote.ip()), remote.port()),
                port,
            )
            .unwrap();
        self.sockets.add(socket)
    }

    pub fn tcp(&mut self, handle: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(handle)
    }

    pub fn udp_socket(&mut self) -> SocketHandle {
        let mut socket = udp::Socket::new(
            udp::PacketBuffer::new(vec![PacketMetadata::EMPTY; 8], vec![0; 65536]),
            udp::PacketBuffer::new(vec![PacketMetadata::EMPTY; 8], vec![0; 65536]),
        );
        let port = self.port();
        socket.bind(port).unwrap();
        self.sockets.add(socket)
    }

    pub fn udp(&mut self, handle: SocketHandle) -> &mut udp::Socket<'static> {
        self.sockets.get_mut::<udp::Socket>(handle)
    }
}

/// A guest wired straight to a stack, both driven by the test's thread.
pub struct Harness {
    pub guest: Guest,
    pub stack: Stack,
    pub steps: usize,
}

impl Harness {
    pub fn new(config: NetConfig) -> Harness {
        Harness {
            guest: Guest::new(),
            stack: Stack::new(config).unwrap(),
            steps: 0,
        }
    }

    /// One turn each: the guest sends, the stack works, the guest receives.
    pub fn step(&mut self) {
        self.steps += 1;
        let now = Instant::now();
        self.guest.poll(now);
        while let Some(frame) = self.guest.wire.outbound.pop_front() {
            self.stack.from_guest(&frame);
        }
        self.stack.poll(now);
        let inbound = &mut self.guest.wire.inbound;
        self.stack.send_to_guest(&mut |frame| {
            inbound.push_back(frame.to_vec());
            true
        });
        self.guest.poll(now);
    }

    /// Steps until `done` or `timeout`; returns whether `done` came true.
    pub fn run_until(&mut self, timeout: Duration, mut done: impl FnMut(&mut Harness) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            self.step();
            if done(self) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Steps for `duration` whatever happens.
    pub fn run_for(&mut self, duration: Duration) {
        self.run_until(duration, |_| false);
    }

    pub fn tcp_state(&mut self, handle: SocketHandle) -> tcp::State {
        self.guest.tcp(handle).state()
    }

    /// Connects and waits for the handshake; panics if it does not complete.
    pub fn connect_established(&mut self, remote: SocketAddrV4) -> SocketHandle {
        let handle = self.guest.connect(remote);
        let established = self.run_until(Duration::from_secs(5), |net| {
            net.tcp_state(handle) == tcp::State::Established
        });
        assert!(
            established,
            "connection to {remote} stuck in {}",
            self.tcp_state(handle)
        );
        handle
    }

    /// Waits until the guest's connection is closed by a RST (never
    /// established); returns how long it took.
    pub fn expect_refused(&mut self, remote: SocketAddrV4) -> Duration {
        let handle = self.guest.connect(remote);
        let start = Instant::now();
        let mut established = false;
        let closed = self.run_until(Duration::from_secs(3), |net| {
            established |= net.tcp_state(handle) == tcp::State::Established;
            net.tcp_state(handle) == tcp::State::Closed
        });
        assert!(closed && !established, "connection to {remote} was not refused");
        self.guest.sockets.remove(handle);
        start.elapsed()
    }

    /// Sends `data` and reads until the host closes; returns what came back.
    pub fn exchange(&mut self, handle: SocketHandle, data: &[u8], timeout: Duration) -> Vec<u8> {
        let mut sent = 0;
        let mut closed_sending = false;
        let mut received = Vec::new();
        let finished = self.run_until(timeout, |net| {
            let socket = net.guest.tcp(handle);
            if sent < data.len() && socket.can_send() {
                sent += socket.send_slice(&data[sent..]).unwrap();
            }
            if sent == data.len() && !closed_sending {
                socket.close();
                closed_sending = true;
            }
            while socket.can_recv() {
                socket
                    .recv(|bytes| {
                        received.extend_from_slice(bytes);
                        (bytes.len(), ())
                    })
                    .unwrap();
            }
            closed_sending && !socket.may_recv()
        });
        assert!(finished, "exchange stuck: sent {sent}, received {}", received.len());
        received
    }

    /// Sends a DNS query for `name` (type A) and waits for the answer.
    pub fn resolve(&mut self, name: &str) -> (RCODE, Vec<Ipv4Addr>) {
        self.resolve_within(name, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("no DNS answer for {name}"))
    }

    pub fn resolve_within(&mut self, name: &str, timeout: Duration) -> Option<(RCODE, Vec<Ipv4Addr>)> {
        let handle = self.guest.udp_socket();
        let id = 0x1234;
        let server = IpEndpoint::new(IpAddress::Ipv4(link::GATEWAY_IP), 53);
        self.guest.udp(handle).send_slice(&dns_query(id, name), server).unwrap();
        let mut answer = None;
        self.run_until(timeout, |net| {
            if let Ok((bytes, from)) = net.guest.udp(handle).recv() {
                assert_eq!(from.endpoint, server);
                answer = Some(bytes.to_vec());
            }
            answer.is_some()
        });
        self.guest.sockets.remove(handle);
        let answer = answer?;
        let packet = Packet::parse(&answer).unwrap();
        assert_eq!(packet.id(), id);
        assert!(packet.has_flags(PacketFlag::RESPONSE));
        let addresses = packet
            .answers
            .iter()
            .filter_map(|record| match &record.rdata {
                RData::A(a) => Some(Ipv4Addr::from(a.address)),
                _ => None,
            })
            .collect();
        Some((packet.rcode(), addresses))
    }
}

pub fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut packet = Packet::new_query(id);
    packet.set_flags(PacketFlag::RECURSION_DESIRED);
    packet.questions.push(Question::new(
        Name::new_unchecked(name),
        QTYPE::TYPE(TYPE::A),
        QCLASS::CLASS(CLASS::IN),
        false,
    ));
    packet.build_bytes_vec().unwrap()
}

pub fn policy_config(allow: &[&str], deny: &[&str]) -> NetConfig {
    let policy = NetworkPolicy {
        allow: allow.iter().map(|entry| entry.to_string()).collect(),
        deny: deny.iter().map(|entry| entry.to_string()).collect(),
    };
    NetConfig {
        rules: policy.validate().unwrap(),
        // Nothing listens on the discard port: forwarded queries go unanswered.
        dns_upstream: "127.0.0.1:9".parse().unwrap(),
        host_addresses: Vec::new(),
        max_connections: 64,
        bandwidth_bytes_per_sec: 0,
    }
}

fn v4(address: SocketAddr) -> SocketAddrV4 {
    match address {
        SocketAddr::V4(v4) => v4,
        SocketAddr::V6(_) => panic!("not IPv4"),
    }
}

/// A loopback server that echoes every connection until its EOF, then
/// closes; the thread returns the bytes echoed per connection.
pub fn echo_server(connections: usize) -> (SocketAddrV4, JoinHandle<Vec<usize>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = v4(listener.local_addr().unwrap());
    let thread = std::thread::spawn(move || {
        let mut echoed = Vec::new();
        for _ in 0..connections {
            let (mut stream, _) = listener.accept().unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut total = 0;
            let mut buffer = vec![0; 64 << 10];
            loop {
                let read = stream.read(&mut buffer).unwrap();
                if read == 0 {
                    break;
                }
                stream.write_all(&buffer[..read]).unwrap();
                total += read;
            }
            echoed.push(total);
        }
        echoed
    });
    (address, thread)
}

/// A loopback server that sends `data` on its first connection, then closes it.
pub fn sending_server(data: Vec<u8>) -> (SocketAddrV4, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = v4(listener.local_addr().unwrap());
    let thread = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream.write_all(&data).unwrap();
    });
    (address, thread)
}

/// A loopback server that reads its first connection to EOF; the thread
/// returns how many bytes came.
pub fn sink_server() -> (SocketAddrV4, JoinHandle<usize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = v4(listener.local_addr().unwrap());
    let thread = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut received = Vec::new();
        stream.read_to_end(&mut received).unwrap();
        received.len()
    });
    (address, thread)
}

/// A DNS resolver on loopback for the backend to forward to. It answers
/// `allowed.test` through a CNAME to `alias.cdn.test` at 127.0.0.1, any
/// other name starting with `silent` not at all, and every other name with
/// 127.0.0.3; it records every name it is asked.
pub struct Upstream {
    pub address: SocketAddr,
    pub asked: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Upstream {
    pub fn start() -> Upstream {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let address = socket.local_addr().unwrap();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let asked = Arc::clone(&asked);
            let stop = Arc::clone(&stop);
            move || {
                let mut buffer = vec![0; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((length, from)) = socket.recv_from(&mut buffer) else {
                        continue;
                    };
                    let query = Packet::parse(&buffer[..length]).unwrap();
                    let question = query.questions[0].clone();
                    let name = question.qname.to_string();
                    asked.lock().unwrap().push(name.clone());
                    if name.starts_with("silent") {
                        continue;
                    }
                    let mut reply = Packet::new_reply(query.id());
                    reply.questions.push(question);
                    let a = |owner, address: Ipv4Addr| {
                        ResourceRecord::new(
                            owner,
                            CLASS::IN,
                            60,
                            RData::A(A {
                                address: address.into(),
                            }),
                        )
                    };
                    if name.eq_ignore_ascii_case("allowed.test") {
                        reply.answers.push(ResourceRecord::new(
                            Name::new_unchecked("allowed.test"),
                            CLASS::IN,
                            60,
                            RData::CNAME(CNAME(Name::new_unchecked("alias.cdn.test"))),
                        ));
                        reply
                            .answers
                            .push(a(Name::new_unchecked("alias.cdn.test"), Ipv4Addr::new(127, 0, 0, 1)));
                    } else {
                        reply
                            .answers
                            .push(a(Name::new_unchecked(&name), Ipv4Addr::new(127, 0, 0, 3)));
                    }
                    socket.send_to(&reply.build_bytes_vec().unwrap(), from).unwrap();
                }
            }
        });
        Upstream {
            address,
            asked,
            stop,
            thread: Some(thread),
        }
    }

    pub fn asked(&self) -> Vec<String> {
        self.asked.lock().unwrap().clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

/// An Ethernet frame from the guest to the gateway carrying `ip` and `payload`.
fn ipv4_frame(ip: Ipv4Repr, emit_payload: impl FnOnce(&mut [u8])) -> Vec<u8> {
    let ethernet = EthernetRepr {
        src_addr: EthernetAddress(link::GUEST_MAC),
        dst_addr: EthernetAddress(link::GATEWAY_MAC),
        ethertype: EthernetProtocol::Ipv4,
    };
    let mut frame = vec![0; ethernet.buffer_len() + ip.buffer_len() + ip.payload_len];
    let mut ethernet_frame = EthernetFrame::new_unchecked(&mut frame[..]);
    ethernet.emit(&mut ethernet_frame);
    let mut packet = Ipv4Packet::new_unchecked(ethernet_frame.payload_mut());
    ip.emit(&mut packet, &smoltcp::phy::ChecksumCapabilities::default());
    emit_payload(packet.payload_mut());
    frame
}

/// A guest SYN from `guest_port` to `destination`.
pub fn syn_frame(guest_port: u16, destination: SocketAddrV4) -> Vec<u8> {
    let tcp = TcpRepr {
        src_port: guest_port,
        dst_port: destination.port(),
        control: TcpControl::Syn,
        seq_number: TcpSeqNumber(1000),
        ack_number: None,
        window_len: 64240,
        window_scale: Some(7),
        max_seg_size: Some(1460),
        sack_permitted: true,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    let ip = Ipv4Repr {
        src_addr: link::GUEST_IP,
        dst_addr: *destination.ip(),
        next_header: IpProtocol::Tcp,
        payload_len: tcp.buffer_len(),
        hop_limit: 64,
    };
    ipv4_frame(ip, |payload| {
        tcp.emit(
            &mut TcpPacket::new_unchecked(payload),
            &link::GUEST_IP.into(),
            &(*destination.ip()).into(),
            &smoltcp::phy::ChecksumCapabilities::default(),
        )
    })
}

/// A guest UDP datagram from port 5353 to `destination`.
pub fn udp_frame(destination: SocketAddrV4, data: &[u8]) -> Vec<u8> {
    let udp = UdpRepr {
        src_port: 5353,
        dst_port: destination.port(),
    };
    let ip = Ipv4Repr {
        src_addr: link::GUEST_IP,
        dst_addr: *destination.ip(),
        next_header: IpProtocol::Udp,
        payload_len: udp.header_len() + data.len(),
        hop_limit: 64,
    };
    ipv4_frame(ip, |payload| {
        udp.emit(
            &mut UdpPacket::new_unchecked(payload),
            &link::GUEST_IP.into(),
            &(*destination.ip()).into(),
            data.len(),
            |buffer| buffer.copy_from_slice(data),
            &smoltcp::phy::ChecksumCapabilities::default(),
        )
    })
}
