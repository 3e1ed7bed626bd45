//! The single-threaded core of one sandbox's backend: a smoltcp interface
//! that terminates the guest's TCP connections and DNS queries, and the host
//! sockets they become.

use std::collections::HashMap;
use std::mem;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Events, Poll, Token};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::{tcp, udp};
use smoltcp::storage::PacketMetadata;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, IpEndpoint, IpListenEndpoint};

use crate::bandwidth::TokenBucket;
use crate::device::FrameQueues;
use crate::dns::{self, DnsForwarder, Outcome, QueryDecision};
use crate::egress::{EgressGuard, Refusal, Verdict};
use crate::error::NetError;
use crate::frame::{self, FlowKey, Inspected};
use crate::link;
use crate::relay::{Buckets, ConnectOutcome, Connection};
use crate::stats::{Counters, NetStats};
use crate::NetConfig;

/// Each direction of each TCP connection buffers at most this much in the
/// stack; a full buffer stops the side that fills it.
const TCP_BUFFER_LEN: usize = 256 << 10;
/// smoltcp resets a connection whose guest leaves sent data (or a SYN-ACK)
/// unacknowledged this long: a guest that went away must not pin a host
/// socket for ever.
const GUEST_SILENCE_TIMEOUT: smoltcp::time::Duration = smoltcp::time::Duration::from_secs(60);
/// Guest frames waiting for the stack; more are dropped (TCP resends them),
/// so a guest flooding frames costs only its own backend's time.
const GUEST_BACKLOG_FRAMES: usize = 512;
const GUEST_BACKLOG_BYTES: usize = 16 << 20;
const DNS_SOCKET_PACKETS: usize = 64;
const DNS_QUERY_BUFFER_LEN: usize = 64 << 10;
/// Room for a few upstream answers of the largest size DNS over UDP allows.
const DNS_ANSWER_BUFFER_LEN: usize = 256 << 10;
const DNS_PORT: u16 = 53;
/// smoltcp forgets a neighbour 60 s after last hearing from it; the guest's
/// MAC is taught again, at the start of a poll (so before anything is sent),
/// when this much time has passed since the last time.
const GUEST_NEIGHBOR_REFRESH: Duration = Duration::from_secs(20);
const HOST_EVENTS_CAPACITY: usize = 256;
const DNS_TOKEN: Token = Token(0);
const FIRST_CONNECTION_TOKEN: usize = 1;

/// The backend's core, driven by its caller: frames in through
/// [`Stack::from_guest`], work done by [`Stack::poll`], frames out through
/// [`Stack::send_to_guest`], and [`Stack::poll_delay`] and
/// [`Stack::host_events_fd`] to know when to poll again.
pub struct Stack {
    iface: Interface,
    device: FrameQueues,
    sockets: SocketSet<'static>,
    dns_socket: SocketHandle,
    guard: EgressGuard,
    connections: HashMap<FlowKey, Connection>,
    keys_by_token: HashMap<Token, FlowKey>,
    next_token: usize,
    max_connections: usize,
    buckets: Buckets,
    /// `None` in a [`Stack::refusing`] stack, which never opens one.
    host: Option<HostSide>,
    /// Connections whose host connect reported progress this turn.
    connects_reported: Vec<FlowKey>,
    /// Reused each turn to visit connections in a rotating order, so the
    /// first in the map does not always get the bandwidth first.
    relay_order: Vec<FlowKey>,
    relay_rotation: usize,
    guest_neighbor_taught: Option<Instant>,
    dns_query: Vec<u8>,
    counters: Arc<Counters>,
    epoch: Instant,
}

/// The host end: the sockets opened for the guest and one poller watching
/// them, whose descriptor is [`Stack::host_events_fd`].
struct HostSide {
    poll: Poll,
    events: Events,
    dns: DnsForwarder,
}

impl Stack {
    /// A stack that relays what `config` allows.
    pub fn new(config: NetConfig) -> Result<Stack, NetError> {
        let poll = Poll::new().map_err(NetError::Poller)?;
        let dns = DnsForwarder::new(config.dns_upstream, poll.registry(), DNS_TOKEN);
        let host = HostSide {
            poll,
            events: Events::with_capacity(HOST_EVENTS_CAPACITY),
            dns,
        };
        Ok(Stack::with_host(config, Some(host)))
    }

    /// A stack that allows nothing and opens no host socket: it answers ARP,
    /// resets every connection and answers every DNS query NXDOMAIN, so a
    /// guest without network fails at once rather than waiting for timeouts.
    pub fn refusing() -> Stack {
        let config = NetConfig {
            rules: crate::Rules::default(),
            // Never used: a refusing stack forwards no query.
            dns_upstream: (std::net::Ipv4Addr::LOCALHOST, DNS_PORT).into(),
            host_addresses: Vec::new(),
            max_connections: 0,
            bandwidth_bytes_per_sec: 0,
        };
        Stack::with_host(config, None)
    }

    fn with_host(config: NetConfig, host: Option<HostSide>) -> Stack {
        let now = Instant::now();
        let mut device = FrameQueues::default();
        let mut iface_config = Config::new(HardwareAddress::Ethernet(EthernetAddress(link::GATEWAY_MAC)));
        iface_config.random_seed = fastrand::u64(..);
        let mut iface = Interface::new(iface_config, &mut device, smoltcp::time::Instant::ZERO);
        // Neither the address list nor the route table can be full, nor the
        // port taken, in a stack made a line above; smoltcp is asked anyway.
        iface.update_ip_addrs(|addresses| {
            if addresses
                .push(IpCidr::new(IpAddress::Ipv4(link::GATEWAY_IP), link::PREFIX_LEN))
                .is_err()
            {
                tracing::error!("smoltcp had no room for the gateway's address");
            }
        });
        // Any-IP with a default route through our own address: the stack
        // takes packets for every destination, as the far end of each
        // guest connection.
        if iface.routes_mut().add_default_ipv4_route(link::GATEWAY_IP).is_err() {
            tracing::error!("smoltcp had no room for the default route");
        }
        iface.set_any_ip(true);

        let mut sockets = SocketSet::new(Vec::new());
        let mut dns_socket = udp::Socket::new(
            udp::PacketBuffer::new(
                vec![PacketMetadata::EMPTY; DNS_SOCKET_PACKETS],
                vec![0; DNS_QUERY_BUFFER_LEN],
            ),
            udp::PacketBuffer::new(
                vec![PacketMetadata::EMPTY; DNS_SOCKET_PACKETS],
                vec![0; DNS_ANSWER_BUFFER_LEN],
            ),
        );
        let bound = dns_socket.bind(IpListenEndpoint {
            addr: Some(IpAddress::Ipv4(link::GATEWAY_IP)),
            port: DNS_PORT,
        });
        if let Err(error) = bound {
            tracing::error!(%error, "smoltcp refused the DNS socket port 53");
        }
        let dns_socket = sockets.add(dns_socket);

        Stack {
            iface,
            device,
            sockets,
            dns_socket,
            guard: EgressGuard::new(config.rules, &config.host_addresses),
            connections: HashMap::new(),
            keys_by_token: HashMap::new(),
            next_token: FIRST_CONNECTION_TOKEN,
            max_connections: config.max_connections,
            buckets: Buckets {
                to_host: TokenBucket::new(config.bandwidth_bytes_per_sec, now),
                to_guest: TokenBucket::new(config.bandwidth_bytes_per_sec, now),
                to_host_starved: false,
                to_guest_starved: false,
            },
            host,
            connects_reported: Vec::new(),
            relay_order: Vec::new(),
            relay_rotation: 0,
            guest_neighbor_taught: None,
            dns_query: Vec::new(),
            counters: Arc::new(Counters::default()),
            epoch: now,
        }
    }

    /// Takes one Ethernet frame the guest sent. Any bytes are safe here;
    /// the frame is processed by the next [`Stack::poll`].
    pub fn from_guest(&mut self, frame: &[u8]) {
        if frame.len() > link::MAX_FRAME_LEN
            || self.device.from_guest.len() >= GUEST_BACKLOG_FRAMES
            || self.device.from_guest_bytes + frame.len() > GUEST_BACKLOG_BYTES
        {
            Counters::add(&self.counters.guest_frames_dropped, 1);
            return;
        }
        match frame::inspect(frame) {
            Inspected::Drop => {}
            Inspected::Pass => self.device.push_from_guest(frame.to_vec()),
            Inspected::Tcp { key, opens, resets } => self.tcp_from_guest(key, opens, resets, frame),
        }
    }

    fn tcp_from_guest(&mut self, key: FlowKey, opens: bool, resets: bool, frame: &[u8]) {
        match self.connections.get(&key) {
            // The held SYN stands for this connection until the host
            // answers: a resent SYN must not connect again, nor reach the
            // stack (which would reset it, having no socket yet).
            Some(connection) if connection.is_connecting() => {
                if resets {
                    self.forget(key, true);
                }
            }
            // Segments of known connections, and of unknown ones (smoltcp
            // answers those with a RST).
            Some(_) => self.device.push_from_guest(frame.to_vec()),
            None if !opens => self.device.push_from_guest(frame.to_vec()),
            None => self.open(key, frame),
        }
    }

    fn open(&mut self, key: FlowKey, syn: &[u8]) {
        let Some(host) = self.host.as_ref() else {
            // A refusing stack: no socket listens, so the stack answers with a RST.
            Counters::add(&self.counters.connections_refused, 1);
            self.device.push_from_guest(syn.to_vec());
            return;
        };
        let verdict = if self.connections.len() >= self.max_connections {
            Verdict::Refused(Refusal::TooManyConnections)
        } else {
            self.guard.decide(*key.destination.ip())
        };
        if let Verdict::Refused(refusal) = verdict {
            tracing::debug!(destination = %key.destination, ?refusal, "guest connection refused");
            Counters::add(&self.counters.connections_refused, 1);
            // No socket listens for it, so the stack answers with a RST.
            self.device.push_from_guest(syn.to_vec());
            return;
        }
        let token = Token(self.next_token);
        self.next_token += 1;
        match Connection::connect(key.destination, syn.to_vec(), host.poll.registry(), token) {
            Ok(connection) => {
                self.keys_by_token.insert(token, key);
                self.connections.insert(key, connection);
            }
            Err(error) => {
                tracing::debug!(destination = %key.destination, %error, "host connect failed at once");
                Counters::add(&self.counters.connections_failed, 1);
                self.device.push_from_guest(syn.to_vec());
            }
        }
    }

    /// Does all the work that is due: host socket events, guest frames,
    /// DNS, relaying, timers.
    pub fn poll(&mut self, now: Instant) {
        let timestamp = self.timestamp(now);
        self.collect_host_events();
        self.teach_guest_neighbor(now, timestamp);
        self.finish_connects(timestamp);
        self.device.egress_blocked = false;
        self.iface.poll(timestamp, &mut self.device, &mut self.sockets);
        self.serve_dns(now);
        self.buckets.to_host_starved = false;
        self.buckets.to_guest_starved = false;
        self.relay(now);
        self.iface.poll(timestamp, &mut self.device, &mut self.sockets);
        self.reap();
    }

    /// How long the caller may wait (for guest frames or
    /// [`Stack::host_events_fd`]) before the next [`Stack::poll`] is due;
    /// `None` is until one of those.
    pub fn poll_delay(&mut self, now: Instant) -> Option<Duration> {
        if !self.device.from_guest.is_empty() || self.device.egress_blocked && !self.device.to_guest_full() {
            return Some(Duration::ZERO);
        }
        let timestamp = self.timestamp(now);
        // With the guest's queue full, smoltcp would ask to be polled at once
        // for as long as it has data, and the caller would spin; the guest's
        // wake (it took frames) is what lets it send again.
        let mut delay = if self.device.to_guest_full() {
            None
        } else {
            self.iface
                .poll_delay(timestamp, &self.sockets)
                .map(|delay| Duration::from_micros(delay.total_micros()))
        };
        let mut wait_at_most = |wait: Duration| {
            delay = Some(delay.map_or(wait, |delay| delay.min(wait)));
        };
        if let Some(deadline) = self.host.as_ref().and_then(|host| host.dns.next_deadline()) {
            wait_at_most(deadline.saturating_duration_since(now));
        }
        if self.buckets.to_host_starved {
            wait_at_most(self.buckets.to_host.time_until_refilled(now));
        }
        if self.buckets.to_guest_starved {
            wait_at_most(self.buckets.to_guest.time_until_refilled(now));
        }
        delay
    }

    /// Calls `deliver` with each frame for the guest, in order, until it
    /// returns false (the guest has no receive buffer free); returns how many
    /// were delivered. Frames not delivered stay queued for the next call.
    pub fn send_to_guest(&mut self, deliver: &mut dyn FnMut(&[u8]) -> bool) -> usize {
        let mut delivered = 0;
        while let Some(frame) = self.device.front_to_guest() {
            if !deliver(frame) {
                break;
            }
            self.device.pop_to_guest();
            delivered += 1;
        }
        delivered
    }

    /// The next frame for the guest, if any: for a caller that delivers
    /// frame by frame (a frame it then cannot deliver is lost, as on a
    /// real link; [`Stack::send_to_guest`] keeps it instead).
    pub fn to_guest(&mut self) -> Option<Vec<u8>> {
        self.device.pop_to_guest()
    }

    /// Whether frames wait for the guest.
    pub fn has_frames_for_guest(&self) -> bool {
        self.device.front_to_guest().is_some()
    }

    /// A descriptor that becomes readable when a host socket (or the DNS
    /// upstream socket) has news; [`Stack::poll`] then has work. `None` for
    /// a [`Stack::refusing`] stack, which has no host socket.
    pub fn host_events_fd(&self) -> Option<RawFd> {
        self.host.as_ref().map(|host| host.poll.as_raw_fd())
    }

    pub fn stats(&self) -> NetStats {
        self.counters.snapshot()
    }

    pub(crate) fn counters(&self) -> Arc<Counters> {
        Arc::clone(&self.counters)
    }

    /// Live guest TCP connections, pending host connects included.
    pub fn connection_count(&self) -> usize {
        self.connections.len()
    }

    fn timestamp(&self, now: Instant) -> smoltcp::time::Instant {
        let micros = now.saturating_duration_since(self.epoch).as_micros();
        smoltcp::time::Instant::from_micros(i64::try_from(micros).unwrap_or(i64::MAX))
    }

    fn collect_host_events(&mut self) {
        let Some(host) = self.host.as_mut() else {
            return;
        };
        loop {
            if let Err(error) = host.poll.poll(&mut host.events, Some(Duration::ZERO)) {
                if error.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::warn!(%error, "polling host sockets failed");
                return;
            }
            let mut seen = 0;
            for event in host.events.iter() {
                seen += 1;
                if event.token() == DNS_TOKEN {
                    host.dns.set_readable();
                    continue;
                }
                let Some(key) = self.keys_by_token.get(&event.token()) else {
                    continue;
                };
                if let Some(connection) = self.connections.get_mut(key) {
                    connection.on_event(event);
                    if connection.is_connecting() {
                        self.connects_reported.push(*key);
                    }
                }
            }
            // A full batch may have left events behind, and the descriptor
            // signals only new ones, so read until a batch comes back short.
            if seen < host.events.capacity() {
                return;
            }
        }
    }

    /// Teaches the stack the guest's MAC now and then (see
    /// [`frame::guest_arp_request`]), dropping the stack's reply.
    fn teach_guest_neighbor(&mut self, now: Instant, timestamp: smoltcp::time::Instant) {
        if self
            .guest_neighbor_taught
            .is_some_and(|taught| now.saturating_duration_since(taught) < GUEST_NEIGHBOR_REFRESH)
        {
            return;
        }
        self.guest_neighbor_taught = Some(now);
        let queued_for_guest = self.device.to_guest_len();
        self.ingest_alone(frame::guest_arp_request(), timestamp);
        self.device.truncate_to_guest(queued_for_guest);
    }

    /// Processes `frame` with no other guest frame in the stack's queue.
    fn ingest_alone(&mut self, frame: Vec<u8>, timestamp: smoltcp::time::Instant) {
        let backlog = mem::take(&mut self.device.from_guest);
        let backlog_bytes = mem::take(&mut self.device.from_guest_bytes);
        self.device.push_from_guest(frame);
        self.iface
            .poll_ingress_single(timestamp, &mut self.device, &mut self.sockets);
        self.device.from_guest = backlog;
        self.device.from_guest_bytes = backlog_bytes;
    }

    fn finish_connects(&mut self, timestamp: smoltcp::time::Instant) {
        for key in mem::take(&mut self.connects_reported) {
            let Some(connection) = self.connections.get_mut(&key) else {
                continue;
            };
            if !connection.is_connecting() {
                continue;
            }
            match connection.connect_outcome() {
                ConnectOutcome::Pending => {}
                ConnectOutcome::Connected => self.accept_guest_syn(key, timestamp),
                ConnectOutcome::Failed(error) => {
                    tracing::debug!(destination = %key.destination, %error, "host connect failed");
                    Counters::add(&self.counters.connections_failed, 1);
                    if let Some(syn) = self.forget(key, false) {
                        // No socket listens for it, so the guest gets a RST.
                        self.device.push_from_guest(syn);
                    }
                }
            }
        }
    }

    /// The host connection is up: a socket listening on exactly the
    /// destination takes the held SYN, and the guest's handshake completes.
    fn accept_guest_syn(&mut self, key: FlowKey, timestamp: smoltcp::time::Instant) {
        let Some(syn) = self.connections.get_mut(&key).and_then(Connection::take_held_syn) else {
            return;
        };
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; TCP_BUFFER_LEN]),
            tcp::SocketBuffer::new(vec![0; TCP_BUFFER_LEN]),
        );
        // The guest's stack already decided how to segment its writes.
        socket.set_nagle_enabled(false);
        socket.set_timeout(Some(GUEST_SILENCE_TIMEOUT));
        let listening = socket.listen(IpListenEndpoint {
            addr: Some(IpAddress::Ipv4(*key.destination.ip())),
            port: key.destination.port(),
        });
        if listening.is_err() {
            Counters::add(&self.counters.connections_failed, 1);
            self.forget(key, true);
            return;
        }
        let handle = self.sockets.add(socket);
        if let Some(connection) = self.connections.get_mut(&key) {
            connection.attach(handle);
        }
        // Alone in the queue, so no other guest SYN for the same
        // destination can be taken by this socket while it listens.
        self.ingest_alone(syn, timestamp);
        if self.sockets.get::<tcp::Socket>(handle).is_listening() {
            tracing::debug!(destination = %key.destination, "the stack did not take a held SYN");
            Counters::add(&self.counters.connections_failed, 1);
            self.forget(key, true);
            return;
        }
        Counters::add(&self.counters.connections_opened, 1);
    }

    /// Drops a connection and its socket; returns its held SYN if it had one.
    fn forget(&mut self, key: FlowKey, reset_host: bool) -> Option<Vec<u8>> {
        let mut connection = self.connections.remove(&key)?;
        self.keys_by_token.remove(&connection.token);
        if let Some(host) = &self.host {
            connection.close_host(host.poll.registry(), reset_host);
        }
        if let Some(handle) = connection.socket() {
            self.sockets.remove(handle);
        }
        connection.take_held_syn()
    }

    fn relay(&mut self, now: Instant) {
        let Some(host) = &self.host else {
            return;
        };
        self.relay_order.clear();
        self.relay_order.extend(
            self.connections
                .iter()
                .filter(|(_, connection)| connection.socket().is_some())
                .map(|(key, _)| *key),
        );
        if self.relay_order.is_empty() {
            return;
        }
        self.relay_rotation = self.relay_rotation.wrapping_add(1);
        let start = self.relay_rotation % self.relay_order.len();
        self.relay_order.rotate_left(start);
        for key in &self.relay_order {
            let Some(connection) = self.connections.get_mut(key) else {
                continue;
            };
            let Some(handle) = connection.socket() else {
                continue;
            };
            connection.relay(
                self.sockets.get_mut::<tcp::Socket>(handle),
                &mut self.buckets,
                now,
                &self.counters,
                host.poll.registry(),
            );
        }
    }

    /// Removes the connections both sides are done with.
    fn reap(&mut self) {
        let Some(host) = &self.host else {
            return;
        };
        let registry = host.poll.registry();
        let sockets = &mut self.sockets;
        let keys_by_token = &mut self.keys_by_token;
        self.connections.retain(|_, connection| {
            let Some(handle) = connection.socket() else {
                return true;
            };
            if !connection.settle(sockets.get::<tcp::Socket>(handle), registry) {
                return true;
            }
            sockets.remove(handle);
            keys_by_token.remove(&connection.token);
            false
        });
    }

    fn serve_dns(&mut self, now: Instant) {
        loop {
            let socket = self.sockets.get_mut::<udp::Socket>(self.dns_socket);
            let guest = match socket.recv() {
                Ok((query, metadata)) => {
                    self.dns_query.clear();
                    self.dns_query.extend_from_slice(query);
                    metadata.endpoint
                }
                Err(_) => break,
            };
            match dns::decide_query(&self.dns_query, self.guard.rules()) {
                QueryDecision::Ignore => {}
                QueryDecision::Answer { reply, outcome } => {
                    let counter = match outcome {
                        Outcome::Refused => &self.counters.dns_refused,
                        Outcome::Failed => &self.counters.dns_failed,
                    };
                    Counters::add(counter, 1);
                    send_dns(&mut self.sockets, self.dns_socket, &reply, guest);
                }
                QueryDecision::Forward { name, servfail } => {
                    let forwarded = match self.host.as_mut() {
                        Some(host) => host.dns.forward(&self.dns_query, guest, name, servfail, now),
                        None => Err(servfail),
                    };
                    if let Err(servfail) = forwarded {
                        Counters::add(&self.counters.dns_failed, 1);
                        send_dns(&mut self.sockets, self.dns_socket, &servfail, guest);
                    }
                }
            }
        }
        let Some(host) = self.host.as_mut() else {
            return;
        };
        let (sockets, dns_socket, guard, counters) =
            (&mut self.sockets, self.dns_socket, &mut self.guard, &self.counters);
        host.dns.receive_answers(|answer| {
            guard.record_resolution(&answer.name, &answer.addresses);
            Counters::add(&counters.dns_answered, 1);
            send_dns(sockets, dns_socket, &answer.reply, answer.guest);
        });
        host.dns.expire(now, |guest, servfail| {
            Counters::add(&counters.dns_failed, 1);
            send_dns(sockets, dns_socket, &servfail, guest);
        });
    }
}

fn send_dns(sockets: &mut SocketSet<'static>, handle: SocketHandle, reply: &[u8], guest: IpEndpoint) {
    if let Err(error) = sockets.get_mut::<udp::Socket>(handle).send_slice(reply, guest) {
        tracing::debug!(%error, "dropped a DNS answer for the guest");
    }
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack")
            .field("connections", &self.connections.len())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}
