//! The user-mode network backend of one sandbox VM.
//!
//! The guest has a virtio-net NIC; the VMM moves its Ethernet frames between
//! the virtio queues and a [`GuestLink`]. This crate terminates the guest's
//! TCP connections in a user-space TCP/IP stack (smoltcp) and opens real
//! host sockets for them, like slirp or passt, under an egress policy
//! ([`NetworkPolicy`]); it answers the guest's DNS queries itself or
//! forwards the ones the policy allows. It needs no privilege: no TAP, no
//! namespaces, no netlink. There is one [`Backend`] per sandbox, on a thread
//! of its own; [`Stack`] is its single-threaded core.
//!
//! Only TCP and DNS leave the sandbox: other UDP and ICMP are dropped, and
//! the guest has no IPv6.

mod backend;
mod bandwidth;
mod device;
mod dns;
mod egress;
mod error;
mod frame;
pub mod link;
mod policy;
mod relay;
mod stack;
mod stats;

use std::net::{IpAddr, SocketAddr};

pub use backend::Backend;
pub use error::NetError;
pub use link::GuestLink;
pub use policy::{NetworkPolicy, PolicyError, PolicyList, Rules};
pub use stack::Stack;
pub use stats::NetStats;

/// Everything one sandbox's backend needs. It crosses a process boundary
/// (the server makes it, the sandbox's worker runs it).
///
/// Never reachable, whatever the rules: 0.0.0.0/8, 169.254.0.0/16 (link-local
/// and cloud metadata), 224.0.0.0/4 (multicast), 240.0.0.0/4 (reserved and
/// broadcast), the link's own 10.0.2.0/24 (apart from DNS at the gateway),
/// and every `host_addresses` entry. Loopback is not in that fixed list: it
/// is refused because the host's addresses include it, and a loopback entry
/// refuses all of 127.0.0.0/8 (a host socket bound to 0.0.0.0 answers on
/// every one of them). So the server must list the loopback address; a test
/// that leaves `host_addresses` empty can let a guest reach a server on
/// 127.0.0.1.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NetConfig {
    pub rules: Rules,
    /// Where DNS queries the policy lets through are forwarded (UDP). An
    /// IP:port, never a name (the worker cannot resolve names).
    pub dns_upstream: SocketAddr,
    /// Host addresses no sandbox may ever reach, whatever the rules (the
    /// server passes every address of the host's interfaces, loopback
    /// included).
    pub host_addresses: Vec<IpAddr>,
    /// Concurrent guest TCP connections, pending host connects included;
    /// beyond it a new SYN gets a RST.
    pub max_connections: usize,
    /// Each direction, shared by all connections (a token bucket); 0 is
    /// unlimited.
    pub bandwidth_bytes_per_sec: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_crosses_a_process_boundary_as_bincode() {
        let rules = NetworkPolicy {
            allow: vec!["*.example.com".into(), "10.1.0.0/16".into(), "1.2.3.4".into()],
            deny: vec!["bad.example.com".into(), "*".into()],
        }
        .validate()
        .unwrap();
        let config = NetConfig {
            rules,
            dns_upstream: "192.0.2.53:53".parse().unwrap(),
            host_addresses: vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()],
            max_connections: 128,
            bandwidth_bytes_per_sec: 1 << 20,
        };
        let bytes = bincode::serialize(&config).unwrap();
        let back: NetConfig = bincode::deserialize(&bytes).unwrap();
        assert_eq!(back.rules, config.rules);
        assert_eq!(back.dns_upstream, config.dns_upstream);
        assert_eq!(back.host_addresses, config.host_addresses);
        assert_eq!((back.max_connections, back.bandwidth_bytes_per_sec), (128, 1 << 20));
    }
}
