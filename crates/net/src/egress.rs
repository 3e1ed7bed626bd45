//! Which IPv4 destinations a guest TCP connection may reach.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use ipnet::Ipv4Net;

use crate::link;
use crate::policy::{NameVerdict, Rules};

/// Destinations no sandbox reaches whatever its rules: "this network" (which
/// Linux connects to the host itself), link-local (cloud metadata services
/// live there), multicast, reserved and broadcast, and the sandbox's own link.
const NEVER_REACHABLE: [Ipv4Net; 5] = [
    Ipv4Net::new_assert(Ipv4Addr::new(0, 0, 0, 0), 8),
    Ipv4Net::new_assert(Ipv4Addr::new(169, 254, 0, 0), 16),
    Ipv4Net::new_assert(Ipv4Addr::new(224, 0, 0, 0), 4),
    Ipv4Net::new_assert(Ipv4Addr::new(240, 0, 0, 0), 4),
    Ipv4Net::new_assert(Ipv4Addr::new(10, 0, 2, 0), link::PREFIX_LEN),
];

const LOOPBACK: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(127, 0, 0, 0), 8);

/// At most this many addresses are remembered as resolved; the oldest is
/// forgotten first, so a guest resolving without end costs bounded memory.
const MAX_RESOLVED_ADDRESSES: usize = 4096;
/// At most this many names are remembered per address (CDNs put many names
/// on one address); the oldest is forgotten first.
const MAX_NAMES_PER_ADDRESS: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Allowed,
    Refused(Refusal),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    NeverReachable,
    HostAddress,
    DeniedNetwork,
    DeniedName,
    NotAllowed,
    /// Decided by the stack, not here: `max_connections` are open.
    TooManyConnections,
}

pub(crate) struct EgressGuard {
    rules: Rules,
    host_addresses: Vec<Ipv4Addr>,
    /// The host listed a loopback address: then all of 127.0.0.0/8 is
    /// refused, since a host socket bound to 0.0.0.0 answers on every one.
    host_has_loopback: bool,
    resolved: ResolvedNames,
}

impl EgressGuard {
    pub(crate) fn new(rules: Rules, host_addresses: &[IpAddr]) -> EgressGuard {
        // IPv6 host addresses matter only as IPv4-mapped ones or as loopback:
        // the guest reaches nothing else over IPv6.
        let host_has_loopback = host_addresses
            .iter()
            .any(|address| address.is_loopback() || address.to_canonical().is_loopback());
        let host_addresses = host_addresses
            .iter()
            .filter_map(|address| match address.to_canonical() {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => None,
            })
            .collect();
        EgressGuard {
            rules,
            host_addresses,
            host_has_loopback,
            resolved: ResolvedNames::default(),
        }
    }

    pub(crate) fn rules(&self) -> &Rules {
        &self.rules
    }

    pub(crate) fn decide(&self, destination: Ipv4Addr) -> Verdict {
        if NEVER_REACHABLE.iter().any(|network| network.contains(&destination)) {
            return Verdict::Refused(Refusal::NeverReachable);
        }
        if self.host_addresses.contains(&destination) || self.host_has_loopback && LOOPBACK.contains(&destination) {
            return Verdict::Refused(Refusal::HostAddress);
        }
        if self.rules.denies_address(destination) {
            return Verdict::Refused(Refusal::DeniedNetwork);
        }
        let names = self.resolved.names_of(destination);
        let verdicts = || names.iter().map(|name| self.rules.name_verdict(name));
        if !names.is_empty() && verdicts().all(|verdict| verdict == NameVerdict::Denied) {
            return Verdict::Refused(Refusal::DeniedName);
        }
        if self.rules.allows_address(destination) || verdicts().any(|verdict| verdict == NameVerdict::Allowed) {
            return Verdict::Allowed;
        }
        Verdict::Refused(Refusal::NotAllowed)
    }

    /// Remembers that this sandbox resolved `name` to `addresses`.
    pub(crate) fn record_resolution(&mut self, name: &str, addresses: &[Ipv4Addr]) {
        let name: Arc<str> = Arc::from(name);
        for address in addresses {
            self.resolved.insert(*address, Arc::clone(&name));
        }
    }
}

/// Addresses this sandbox resolved, with the names it resolved them from.
#[derive(Default)]
struct ResolvedNames {
    names: HashMap<Ipv4Addr, Vec<Arc<str>>>,
    /// Addresses in the order first resolved, to forget the oldest.
    order: VecDeque<Ipv4Addr>,
}

impl ResolvedNames {
    fn names_of(&self, address: Ipv4Addr) -> &[Arc<str>] {
        self.names.get(&address).map_or(&[], Vec::as_slice)
    }

    fn insert(&mut self, address: Ipv4Addr, name: Arc<str>) {
        if let Some(names) = self.names.get_mut(&address) {
            if !names.contains(&name) {
                if names.len() == MAX_NAMES_PER_ADDRESS {
                    names.remove(0);
                }
                names.push(name);
            }
            return;
        }
        if self.order.len() == MAX_RESOLVED_ADDRESSES {
            if let Some(oldest) = self.order.pop_front() {
                self.names.remove(&oldest);
            }
        }
        self.order.push_back(address);
        self.names.insert(address, vec![name]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::NetworkPolicy;

    fn guard(allow: &[&str], deny: &[&str], host: &[IpAddr]) -> EgressGuard {
        let rules = NetworkPolicy {
            allow: allow.iter().map(|entry| entry.to_string()).collect(),
            deny: deny.iter().map(|entry| entry.to_string()).collect(),
        }
        .validate()
        .unwrap();
        EgressGuard::new(rules, host)
    }

    #[test]
    fn fixed_ranges_are_never_reachable() {
        let guard = guard(&["*"], &[], &[]);
        for address in [
            "0.0.0.0",
            "0.1.2.3",
            "169.254.169.254",
            "224.0.0.1",
            "239.255.255.250",
            "255.255.255.255",
            "10.0.2.2",
            "10.0.2.15",
            "10.0.2.255",
        ] {
            assert_eq!(
                guard.decide(address.parse().unwrap()),
                Verdict::Refused(Refusal::NeverReachable),
                "{address}"
            );
        }
        assert_eq!(guard.decide(Ipv4Addr::new(10, 0, 3, 1)), Verdict::Allowed);
        // Loopback is refused through the host's addresses, not the fixed list.
        assert_eq!(guard.decide(Ipv4Addr::LOCALHOST), Verdict::Allowed);
    }

    #[test]
    fn a_loopback_host_address_refuses_all_of_loopback() {
        let guard = guard(&["*"], &[], &["::1".parse().unwrap(), "192.168.7.9".parse().unwrap()]);
        for address in ["127.0.0.1", "127.1.2.3", "192.168.7.9"] {
            assert_eq!(
                guard.decide(address.parse().unwrap()),
                Verdict::Refused(Refusal::HostAddress),
                "{address}"
            );
        }
        assert_eq!(guard.decide(Ipv4Addr::new(192, 168, 7, 10)), Verdict::Allowed);
    }

    #[test]
    fn names_hold_at_connection_time() {
        let mut guard = guard(&["*.example.com", "10.9.0.0/16"], &["10.9.9.9"], &[]);
        let learned = Ipv4Addr::new(93, 184, 216, 34);
        assert_eq!(guard.decide(learned), Verdict::Refused(Refusal::NotAllowed));
        guard.record_resolution("www.example.com", &[learned]);
        assert_eq!(guard.decide(learned), Verdict::Allowed);
        assert_eq!(guard.decide(Ipv4Addr::new(10, 9, 1, 1)), Verdict::Allowed);
        assert_eq!(
            guard.decide(Ipv4Addr::new(10, 9, 9, 9)),
            Verdict::Refused(Refusal::DeniedNetwork)
        );
    }

    #[test]
    fn an_address_only_resolved_from_denied_names_is_refused() {
        let mut guard = guard(&["*"], &["*.evil.example"], &[]);
        let address = Ipv4Addr::new(203, 0, 113, 7);
        guard.record_resolution("a.evil.example", &[address]);
        assert_eq!(guard.decide(address), Verdict::Refused(Refusal::DeniedName));
        guard.record_resolution("fine.example", &[address]);
        assert_eq!(guard.decide(address), Verdict::Allowed);
    }

    #[test]
    fn resolved_names_are_bounded() {
        let mut resolved = ResolvedNames::default();
        for index in 0..(MAX_RESOLVED_ADDRESSES as u32 + 10) {
            resolved.insert(Ipv4Addr::from(index), Arc::from("x.example"));
        }
        assert_eq!(resolved.names.len(), MAX_RESOLVED_ADDRESSES);
        assert!(resolved.names_of(Ipv4Addr::from(0)).is_empty());
        for index in 0..20 {
            resolved.insert(Ipv4Addr::from(100), Arc::from(format!("n{index}.example")));
        }
        assert_eq!(resolved.names_of(Ipv4Addr::from(100)).len(), MAX_NAMES_PER_ADDRESS);
    }
}
