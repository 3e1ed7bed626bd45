//! The guest's DNS through the stack to a loopback resolver, and what the
//! answers open.

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use common::{echo_server, policy_config, Harness, Upstream};
use simple_dns::RCODE;

fn harness(upstream: &Upstream) -> Harness {
    let mut config = policy_config(&["allowed.test", "*.wild.test"], &["bad.wild.test"]);
    config.dns_upstream = upstream.address;
    Harness::new(config)
}

#[test]
fn an_allowed_name_resolves_and_only_its_addresses_open() {
    let upstream = Upstream::start();
    let (server, echoed) = echo_server(1);
    let mut net = harness(&upstream);
    // Not learned yet.
    net.expect_refused(server);
    let (rcode, addresses) = net.resolve("Allowed.Test");
    assert_eq!(rcode, RCODE::NoError);
    assert_eq!(addresses, vec![Ipv4Addr::LOCALHOST]);
    assert_eq!(upstream.asked(), vec!["Allowed.Test"]);
    // Learned through allowed.test's CNAME chain.
    let connection = net.connect_established(server);
    assert_eq!(net.exchange(connection, b"hello", Duration::from_secs(5)), b"hello");
    assert_eq!(echoed.join().unwrap(), vec![5]);
    // An address no allowed name resolved to stays closed.
    net.expect_refused(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 2), server.port()));
    let stats = net.stack.stats();
    assert_eq!((stats.dns_answered, stats.connections_refused), (1, 2));
}

#[test]
fn a_name_outside_the_policy_gets_nxdomain_and_is_never_sent() {
    let upstream = Upstream::start();
    let mut net = harness(&upstream);
    assert_eq!(net.resolve("other.test"), (RCODE::NameError, vec![]));
    assert_eq!(net.resolve("wild.test"), (RCODE::NameError, vec![]));
    assert_eq!(net.resolve("x.allowed.test"), (RCODE::NameError, vec![]));
    assert_eq!(net.resolve("bad.wild.test"), (RCODE::Refused, vec![]));
    // A wildcard name does resolve, so the upstream was reachable all along.
    assert_eq!(
        net.resolve("ok.wild.test"),
        (RCODE::NoError, vec![Ipv4Addr::new(127, 0, 0, 3)])
    );
    assert_eq!(upstream.asked(), vec!["ok.wild.test"]);
    let stats = net.stack.stats();
    assert_eq!((stats.dns_refused, stats.dns_answered), (4, 1));
}

#[test]
fn a_silent_upstream_gives_servfail_after_two_seconds() {
    let upstream = Upstream::start();
    let mut net = harness(&upstream);
    let start = Instant::now();
    assert_eq!(net.resolve("silent.wild.test"), (RCODE::ServerFailure, vec![]));
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(4),
        "{took:?}"
    );
    assert_eq!(net.stack.stats().dns_failed, 1);
}

#[test]
fn a_missing_upstream_gives_servfail_at_once() {
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = policy_config(&["*.wild.test"], &[]);
    config.dns_upstream = (Ipv4Addr::LOCALHOST, port).into();
    let mut net = Harness::new(config);
    let start = Instant::now();
    assert_eq!(net.resolve("x.wild.test"), (RCODE::ServerFailure, vec![]));
    assert!(start.elapsed() < Duration::from_millis(500), "{:?}", start.elapsed());
}

#[test]
fn a_refusing_stack_resets_and_answers_nxdomain() {
    let (server, _echo) = echo_server(1);
    let mut net = Harness::new(policy_config(&[], &[]));
    net.stack = zeroboot_net::Stack::refusing();
    assert!(net.stack.host_events_fd().is_none());
    net.expect_refused(server);
    assert_eq!(net.resolve("example.com"), (RCODE::NameError, vec![]));
    let stats = net.stack.stats();
    assert_eq!((stats.connections_refused, stats.dns_refused), (1, 1));
}

#[test]
fn other_udp_goes_nowhere() {
    let upstream = Upstream::start();
    let mut net = harness(&upstream);
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_nonblocking(true).unwrap();
    let std::net::SocketAddr::V4(address) = socket.local_addr().unwrap() else {
        unreachable!()
    };
    net.stack.from_guest(&common::udp_frame(address, b"hello"));
    // DNS to another resolver than the gateway is not answered either.
    net.stack.from_guest(&common::udp_frame(
        SocketAddrV4::new(Ipv4Addr::new(8, 8, 8, 8), 53),
        &common::dns_query(1, "allowed.test"),
    ));
    net.run_for(Duration::from_millis(100));
    assert!(socket.recv(&mut [0; 16]).is_err());
    assert!(upstream.asked().is_empty());
}
