//! Guest TCP connections through the stack to real loopback servers.

mod common;

use std::io::{ErrorKind, Read};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::time::{Duration, Instant};

use common::{echo_server, policy_config, sending_server, sink_server, Harness};
use smoltcp::socket::tcp::State;

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|index| (index * 7 + index / 251) as u8).collect()
}

#[test]
fn an_allowed_network_relays_a_mebibyte_both_ways_and_closes_cleanly() {
    let (server, echoed) = echo_server(1);
    let mut net = Harness::new(policy_config(&["127.0.0.0/8"], &[]));
    let connection = net.connect_established(server);
    let data = pattern(1 << 20);
    let received = net.exchange(connection, &data, Duration::from_secs(30));
    assert!(received == data, "echoed bytes differ");
    assert_eq!(echoed.join().unwrap(), vec![1 << 20]);
    let forgotten = net.run_until(Duration::from_secs(5), |net| {
        net.stack.connection_count() == 0 && matches!(net.tcp_state(connection), State::Closed | State::TimeWait)
    });
    assert!(
        forgotten,
        "connection not finished: guest {}",
        net.tcp_state(connection)
    );
    let stats = net.stack.stats();
    assert_eq!(stats.connections_opened, 1);
    assert_eq!(stats.connections_refused, 0);
    assert_eq!(stats.bytes_to_host, 1 << 20);
    assert_eq!(stats.bytes_to_guest, 1 << 20);
}

#[test]
fn a_destination_the_policy_does_not_allow_is_reset_at_once() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let std::net::SocketAddr::V4(address) = listener.local_addr().unwrap() else {
        unreachable!()
    };
    let mut net = Harness::new(policy_config(&["10.9.0.0/16", "*.example.com"], &[]));
    let took = net.expect_refused(address);
    // A dropped SYN would be resent after a second; the RST comes in the
    // first turns (ARP for the gateway, then the SYN).
    assert!(net.steps <= 6, "refused after {} steps", net.steps);
    assert!(took < Duration::from_millis(500), "refused after {took:?}");
    assert_eq!(listener.accept().unwrap_err().kind(), ErrorKind::WouldBlock);
    assert_eq!(net.stack.stats().connections_refused, 1);
    assert_eq!(net.stack.connection_count(), 0);
}

#[test]
fn host_addresses_are_refused_even_when_everything_is_allowed() {
    let (server, _echo) = echo_server(1);
    let mut config = policy_config(&["*"], &[]);
    config.host_addresses = vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()];
    let mut net = Harness::new(config);
    net.expect_refused(server);
    // Another loopback address reaches the same host sockets bound to
    // 0.0.0.0, so all of 127.0.0.0/8 is refused.
    net.expect_refused(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 2), server.port()));
    // And the fixed never-reachable ranges.
    for address in [
        Ipv4Addr::new(169, 254, 169, 254),
        Ipv4Addr::new(10, 0, 2, 2),
        Ipv4Addr::new(0, 1, 2, 3),
    ] {
        net.expect_refused(SocketAddrV4::new(address, 80));
    }
    assert_eq!(net.stack.stats().connections_refused, 5);
}

#[test]
fn a_denied_network_wins_over_an_allowed_one() {
    let (server, _echo) = echo_server(1);
    let mut net = Harness::new(policy_config(&["127.0.0.0/8"], &["127.0.0.1"]));
    net.expect_refused(server);
}

#[test]
fn a_failed_host_connect_resets_the_guest() {
    // Bound then closed: nothing listens on that port any more.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut net = Harness::new(policy_config(&["127.0.0.1"], &[]));
    net.expect_refused(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
    let stats = net.stack.stats();
    assert_eq!((stats.connections_failed, stats.connections_refused), (1, 0));
}

#[test]
fn max_connections_counts_live_connections() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let std::net::SocketAddr::V4(address) = listener.local_addr().unwrap() else {
        unreachable!()
    };
    let mut config = policy_config(&["127.0.0.1"], &[]);
    config.max_connections = 2;
    let mut net = Harness::new(config);
    let first = net.connect_established(address);
    let _second = net.connect_established(address);
    net.expect_refused(address);
    assert_eq!(net.stack.stats().connections_refused, 1);
    // A reset connection frees its place.
    net.guest.tcp(first).abort();
    assert!(net.run_until(Duration::from_secs(2), |net| net.stack.connection_count() == 1));
    net.connect_established(address);
    let mut accepted = Vec::new();
    while let Ok((stream, _)) = listener.accept() {
        accepted.push(stream);
    }
    assert_eq!(accepted.len(), 3);
}

#[test]
fn bandwidth_limits_each_direction() {
    const LEN: usize = 256 << 10;
    let mut config = policy_config(&["127.0.0.1"], &[]);
    config.bandwidth_bytes_per_sec = 512 << 10;

    let data = pattern(LEN);
    let (server, sender) = sending_server(data.clone());
    let mut net = Harness::new(config.clone());
    let connection = net.connect_established(server);
    let start = Instant::now();
    let received = net.exchange(connection, &[], Duration::from_secs(10));
    let took = start.elapsed();
    sender.join().unwrap();
    assert!(received == data, "received bytes differ");
    assert!(
        took >= Duration::from_millis(400),
        "256 KiB to the guest took only {took:?}"
    );
    assert!(took < Duration::from_secs(3), "256 KiB to the guest took {took:?}");

    let (server, sink) = sink_server();
    let mut net = Harness::new(config);
    let connection = net.connect_established(server);
    let start = Instant::now();
    net.exchange(connection, &data, Duration::from_secs(10));
    let took = start.elapsed();
    assert_eq!(sink.join().unwrap(), LEN);
    assert!(
        took >= Duration::from_millis(400),
        "256 KiB to the host took only {took:?}"
    );
    assert!(took < Duration::from_secs(3), "256 KiB to the host took {took:?}");
}

#[test]
fn the_guest_half_closes_and_still_reads() {
    // The server reads to EOF, then answers: the answer must still reach a
    // guest that already shut down its sending side.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let std::net::SocketAddr::V4(address) = listener.local_addr().unwrap() else {
        unreachable!()
    };
    let server = std::thread::spawn(move || {
        use std::io::Write;
        let (mut stream, _) = listener.accept().unwrap();
        let mut request = Vec::new();
        stream.read_to_end(&mut request).unwrap();
        stream.write_all(&request.repeat(3)).unwrap();
    });
    let mut net = Harness::new(policy_config(&["127.0.0.1"], &[]));
    let connection = net.connect_established(address);
    let received = net.exchange(connection, b"ping", Duration::from_secs(5));
    server.join().unwrap();
    assert_eq!(received, b"pingpingping");
}

#[test]
fn a_guest_reset_resets_the_host_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let std::net::SocketAddr::V4(address) = listener.local_addr().unwrap() else {
        unreachable!()
    };
    let mut net = Harness::new(policy_config(&["127.0.0.1"], &[]));
    let connection = net.connect_established(address);
    let (mut host, _) = listener.accept().unwrap();
    net.guest.tcp(connection).abort();
    net.run_until(Duration::from_secs(2), |net| net.stack.connection_count() == 0);
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let error = host.read(&mut [0; 16]).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::ConnectionReset);
}

#[test]
fn a_host_reset_resets_the_guest_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let std::net::SocketAddr::V4(address) = listener.local_addr().unwrap() else {
        unreachable!()
    };
    let mut net = Harness::new(policy_config(&["127.0.0.1"], &[]));
    let connection = net.connect_established(address);
    let (host, _) = listener.accept().unwrap();
    socket2::SockRef::from(&host).set_linger(Some(Duration::ZERO)).unwrap();
    drop(host);
    let reset = net.run_until(Duration::from_secs(2), |net| {
        net.tcp_state(connection) == State::Closed && net.stack.connection_count() == 0
    });
    assert!(reset, "guest connection in {}", net.tcp_state(connection));
}
