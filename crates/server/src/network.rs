//! Sandboxes' network: the policy a request or session asks for, checked
//! here, and what the server adds to it (where DNS goes, the host's own
//! addresses that no sandbox may reach, limits). Off unless asked for.

use std::net::{IpAddr, SocketAddr};

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use zeroboot_net::{NetConfig, NetworkPolicy};

use crate::error::ApiError;

/// What a sandbox may reach. Each entry is a domain name (`example.org`),
/// every name below a domain (`*.example.com`, not the domain itself), an
/// IPv4 address or CIDR (`10.1.2.0/24`), or `*` for everything. A deny
/// entry wins over an allow entry. Never reachable, whatever the rules: the
/// host itself, link-local and metadata addresses (169.254.0.0/16), other
/// sandboxes. A name resolves only if the policy allows it, and a
/// connection to an address learned from a name is allowed only if this
/// sandbox resolved it from an allowed name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkRequest {
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub deny: Vec<String>,
}

impl From<NetworkPolicy> for NetworkRequest {
    fn from(policy: NetworkPolicy) -> Self {
        Self {
            allow: policy.allow,
            deny: policy.deny,
        }
    }
}

/// How this server lets sandboxes out.
#[derive(Debug, Clone)]
pub struct NetworkSettings {
    /// Sandboxes may have a network at all.
    pub enabled: bool,
    /// Where DNS queries a policy lets through go (`None`: no resolver was
    /// found; names then do not resolve).
    pub dns_upstream: Option<SocketAddr>,
    pub max_connections: usize,
    /// Per sandbox, each way (0: no limit).
    pub bandwidth_bytes_per_sec: u64,
    /// The host's own addresses, which no sandbox may reach. Read once, when
    /// the server starts: the server's seccomp filter then refuses the
    /// netlink socket that reading them takes. An address added later is
    /// not covered; the loopback range always is.
    pub host_addresses: Vec<IpAddr>,
    /// Deny entries added to every sandbox's policy (the operator's: a
    /// cluster's pod and service ranges, say).
    pub always_deny: Vec<String>,
}

impl Default for NetworkSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            dns_upstream: system_resolver(),
            max_connections: 256,
            bandwidth_bytes_per_sec: 0,
            host_addresses: host_addresses().unwrap_or_default(),
            always_deny: Vec::new(),
        }
    }
}

/// The first `nameserver` of /etc/resolv.conf.
pub fn system_resolver() -> Option<SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").ok()?;
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("nameserver"))
        .find_map(|rest| rest.trim().parse::<IpAddr>().ok())
        .filter(IpAddr::is_ipv4)
        .map(|ip| SocketAddr::new(ip, 53))
}

/// Every IPv4 address of this host's interfaces (loopback included). It
/// takes a netlink socket, which a sandboxed service may lack (systemd's
/// `RestrictAddressFamilies` needs `AF_NETLINK`).
pub fn host_addresses() -> std::io::Result<Vec<IpAddr>> {
    let mut addresses = vec![IpAddr::from([127, 0, 0, 1])];
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list`, freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut at = list;
    while !at.is_null() {
        // SAFETY: `at` is a node of the list getifaddrs made, not yet freed.
        let entry = unsafe { &*at };
        if !entry.ifa_addr.is_null() {
            // SAFETY: ifa_addr points at a sockaddr whose family says its type.
            let family = i32::from(unsafe { (*entry.ifa_addr).sa_family });
            if family == libc::AF_INET {
                // SAFETY: an AF_INET address is a sockaddr_in.
                let sin = unsafe { &*entry.ifa_addr.cast::<libc::sockaddr_in>() };
                addresses.push(IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes()));
            }
        }
        at = entry.ifa_next;
    }
    // SAFETY: `list` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    addresses.sort();
    addresses.dedup();
    Ok(addresses)
}

impl NetworkSettings {
    /// The backend configuration for a sandbox that asked for `request`
    /// (`None`: no network). A policy that does not parse is a 400 naming
    /// the entry.
    pub(crate) fn config_for(&self, request: Option<&NetworkRequest>) -> Result<Option<NetConfig>, ApiError> {
        let Some(request) = request else { return Ok(None) };
        let settings = self;
        NetworkPolicy {
            allow: request.allow.clone(),
            deny: request.deny.clone(),
        }
        .validate()
        .map_err(|e| ApiError::bad_request("invalid_network", e.to_string()))?;
        // The operator's entries were checked at start; they follow the
        // request's so that an error names the request's own index.
        let rules = NetworkPolicy {
            allow: request.allow.clone(),
            deny: request.deny.iter().chain(&settings.always_deny).cloned().collect(),
        }
        .validate()
        .map_err(ApiError::internal)?;
        if !settings.enabled {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "network_disabled",
                "this server gives sandboxes no network (zeroboot serve --no-network)",
            ));
        }
        Ok(Some(NetConfig {
            rules,
            // Nothing listens on port 9 of the loopback (discard): without
            // a resolver names fail at once, and the guest is told so.
            dns_upstream: settings
                .dns_upstream
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9))),
            host_addresses: settings.host_addresses.clone(),
            max_connections: settings.max_connections,
            bandwidth_bytes_per_sec: settings.bandwidth_bytes_per_sec,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_addresses_include_loopback() {
        let addresses = host_addresses().unwrap();
        assert!(addresses.contains(&IpAddr::from([127, 0, 0, 1])));
    }
}
