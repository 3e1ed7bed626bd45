//! Whatever frames the guest sends, the stack neither panics nor stops
//! working.

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use common::{dns_query, echo_server, policy_config, syn_frame, udp_frame, Harness};
use zeroboot_net::link;

const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
const ETHERTYPE_ARP: [u8; 2] = [0x08, 0x06];

fn ethernet_to_gateway(ethertype: [u8; 2], payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(14 + payload.len());
    frame.extend_from_slice(&link::GATEWAY_MAC);
    frame.extend_from_slice(&link::GUEST_MAC);
    frame.extend_from_slice(&ethertype);
    frame.extend_from_slice(payload);
    frame
}

#[test]
fn garbage_frames_never_panic_and_the_stack_keeps_working() {
    let (server, echoed) = echo_server(1);
    // Only loopback is allowed: a mutated SYN may name any address, and
    // tests reach nothing beyond this machine.
    let mut net = Harness::new(policy_config(&["127.0.0.1"], &[]));
    let mut rng = fastrand::Rng::with_seed(0x2e40_b007);
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let samples = [
        syn_frame(4000, SocketAddrV4::new(Ipv4Addr::new(10, 9, 9, 9), 80)),
        syn_frame(4001, SocketAddrV4::new(Ipv4Addr::LOCALHOST, closed_port)),
        udp_frame(
            SocketAddrV4::new(link::GATEWAY_IP, 53),
            &dns_query(7, "www.example.com"),
        ),
        udp_frame(
            SocketAddrV4::new(link::GATEWAY_IP, 53),
            &[0, 1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0],
        ),
    ];

    let mut frames: Vec<Vec<u8>> = Vec::new();
    for round in 0..6000 {
        let frame = match round % 6 {
            // Random bytes of random length, up to past the largest frame.
            0 => {
                let len = if rng.u8(..) == 0 {
                    rng.usize(..70_000)
                } else {
                    rng.usize(..200)
                };
                (0..len).map(|_| rng.u8(..)).collect()
            }
            // Random IPv4 and ARP payloads behind a valid Ethernet header.
            1 => ethernet_to_gateway(
                ETHERTYPE_IPV4,
                &(0..rng.usize(..120)).map(|_| rng.u8(..)).collect::<Vec<_>>(),
            ),
            2 => ethernet_to_gateway(
                ETHERTYPE_ARP,
                &(0..rng.usize(..60)).map(|_| rng.u8(..)).collect::<Vec<_>>(),
            ),
            // Valid frames with a few bytes changed and the end cut anywhere.
            3 | 4 => {
                let mut frame = samples[rng.usize(..samples.len())].clone();
                for _ in 0..rng.usize(1..5) {
                    let index = rng.usize(14..frame.len());
                    frame[index] = rng.u8(..);
                }
                frame.truncate(rng.usize(14..=frame.len()));
                frame
            }
            // IPv4 headers whose lengths lie: total length, header length.
            _ => {
                let mut frame = samples[rng.usize(..samples.len())].clone();
                match rng.u8(..3) {
                    0 => frame[16..18].copy_from_slice(&[0xff, 0xff]),
                    1 => frame[14] = 0x4f,
                    _ => frame[14 + 20 + 12] = 0xf0,
                }
                frame
            }
        };
        frames.push(frame);
    }
    let start = Instant::now();
    for batch in frames.chunks(100) {
        for frame in batch {
            net.stack.from_guest(frame);
        }
        net.stack.poll(Instant::now());
        net.stack.send_to_guest(&mut |_| true);
    }
    // Let pending host connects (to the closed port) fail and settle.
    for _ in 0..50 {
        net.stack.poll(Instant::now());
        net.stack.send_to_guest(&mut |_| true);
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "garbage took {:?}",
        start.elapsed()
    );

    let connection = net.connect_established(server);
    assert_eq!(
        net.exchange(connection, b"still here", Duration::from_secs(5)),
        b"still here"
    );
    assert_eq!(echoed.join().unwrap(), vec![10]);
}

#[test]
fn a_frame_flood_is_bounded() {
    let mut net = Harness::new(policy_config(&[], &[]));
    let frame = udp_frame(SocketAddrV4::new(Ipv4Addr::new(1, 2, 3, 4), 9), &[0; 1000]);
    for _ in 0..100_000 {
        net.stack.from_guest(&frame);
    }
    assert!(net.stack.stats().guest_frames_dropped > 90_000);
    net.stack.poll(Instant::now());
    // A resent SYN while the host connect is pending starts nothing new.
    let (server, _echo) = echo_server(1);
    let mut net = Harness::new(policy_config(&["127.0.0.1"], &[]));
    for _ in 0..5 {
        net.stack.from_guest(&syn_frame(4100, server));
    }
    assert_eq!(net.stack.connection_count(), 1);
}
