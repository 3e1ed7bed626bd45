//! The egress policy: what a request, session or template asks for
//! ([`NetworkPolicy`], raw strings) and its checked form ([`Rules`]).

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

/// The policy a request/session/template asks for, as given:
/// `{"allow": ["example.org", "*.example.com", "10.1.2.0/24", "1.2.3.4", "*"], "deny": [...]}`.
///
/// Each entry is a domain name (`example.org` is that name only,
/// `*.example.com` any name below example.com but not example.com itself),
/// an IPv4 address, an IPv4 CIDR, or `*` (everything). Deny wins over allow.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkPolicy {
    pub allow: Vec<String>,
    pub deny: Vec<String>,
}

impl NetworkPolicy {
    /// Checks every entry; the error names the field, e.g.
    /// `network.allow[2]: "10.1.2.0/33" is not a domain name, an IPv4 address, an IPv4 CIDR or "*"`.
    pub fn validate(&self) -> Result<Rules, PolicyError> {
        Ok(Rules {
            allow: RuleSet::parse(PolicyList::Allow, &self.allow)?,
            deny: RuleSet::parse(PolicyList::Deny, &self.deny)?,
        })
    }
}

/// Which list of a [`NetworkPolicy`] an entry is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyList {
    Allow,
    Deny,
}

impl std::fmt::Display for PolicyList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PolicyList::Allow => "allow",
            PolicyList::Deny => "deny",
        })
    }
}

/// A [`NetworkPolicy`] entry that is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("network.{list}[{index}]: {entry:?} is not a domain name, an IPv4 address, an IPv4 CIDR or \"*\"")]
    Unrecognized {
        list: PolicyList,
        index: usize,
        entry: String,
    },
    #[error(
        "network.{list}[{index}]: {entry:?} is an IPv6 address; sandboxes have no IPv6, so list IPv4 addresses, IPv4 CIDRs or domain names"
    )]
    Ipv6 {
        list: PolicyList,
        index: usize,
        entry: String,
    },
}

/// A checked [`NetworkPolicy`]. [`Rules::default`] allows nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rules {
    allow: RuleSet,
    deny: RuleSet,
}

/// What the policy says about a DNS name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NameVerdict {
    Denied,
    Allowed,
    /// Neither list names it: it is not resolved, and never sent anywhere.
    Unlisted,
}

impl Rules {
    /// Rules that allow every destination (apart from the never-reachable
    /// ones) and every name.
    pub fn allow_all() -> Rules {
        Rules {
            allow: RuleSet {
                everything: true,
                ..RuleSet::default()
            },
            deny: RuleSet::default(),
        }
    }

    /// `name` as DNS writes it, any case, with or without the trailing dot.
    pub(crate) fn name_verdict(&self, name: &str) -> NameVerdict {
        let name = normalize_name(name);
        if self.deny.matches_name(&name) {
            NameVerdict::Denied
        } else if self.allow.matches_name(&name) {
            NameVerdict::Allowed
        } else {
            NameVerdict::Unlisted
        }
    }

    pub(crate) fn denies_address(&self, address: Ipv4Addr) -> bool {
        self.deny.matches_address(address)
    }

    pub(crate) fn allows_address(&self, address: Ipv4Addr) -> bool {
        self.allow.matches_address(address)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct RuleSet {
    /// `*` was listed.
    everything: bool,
    networks: Vec<Ipv4Net>,
    domains: Vec<DomainRule>,
}

impl RuleSet {
    fn parse(list: PolicyList, entries: &[String]) -> Result<RuleSet, PolicyError> {
        let mut rules = RuleSet::default();
        for (index, entry) in entries.iter().enumerate() {
            match parse_entry(entry) {
                Ok(Entry::Everything) => rules.everything = true,
                Ok(Entry::Network(network)) => rules.networks.push(network),
                Ok(Entry::Domain(domain)) => rules.domains.push(domain),
                Err(EntryError::Ipv6) => {
                    return Err(PolicyError::Ipv6 {
                        list,
                        index,
                        entry: entry.clone(),
                    })
                }
                Err(EntryError::Unrecognized) => {
                    return Err(PolicyError::Unrecognized {
                        list,
                        index,
                        entry: entry.clone(),
                    })
                }
            }
        }
        Ok(rules)
    }

    fn matches_address(&self, address: Ipv4Addr) -> bool {
        self.everything || self.networks.iter().any(|network| network.contains(&address))
    }

    /// `name` is already normalized.
    fn matches_name(&self, name: &str) -> bool {
        self.everything || self.domains.iter().any(|domain| domain.matches(name))
    }
}

/// A domain entry, lowercase, without a trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum DomainRule {
    /// `example.org`: that name only.
    Exact(String),
    /// `*.example.com`: any name below example.com, not example.com itself.
    Below(String),
}

impl DomainRule {
    fn matches(&self, name: &str) -> bool {
        match self {
            DomainRule::Exact(domain) => name == domain,
            DomainRule::Below(domain) => name
                .strip_suffix(domain.as_str())
                .and_then(|prefix| prefix.strip_suffix('.'))
                .is_some_and(|labels| !labels.is_empty()),
        }
    }
}

enum Entry {
    Everything,
    Network(Ipv4Net),
    Domain(DomainRule),
}

enum EntryError {
    Ipv6,
    Unrecognized,
}

fn parse_entry(entry: &str) -> Result<Entry, EntryError> {
    if entry == "*" {
        return Ok(Entry::Everything);
    }
    if let Ok(address) = entry.parse::<Ipv4Addr>() {
        return Ok(Entry::Network(Ipv4Net::from(address)));
    }
    if let Ok(network) = entry.parse::<Ipv4Net>() {
        // "10.1.2.3/24" means the network 10.1.2.0/24, as routing tables read it.
        return Ok(Entry::Network(network.trunc()));
    }
    if entry.parse::<Ipv6Addr>().is_ok() || entry.parse::<Ipv6Net>().is_ok() {
        return Err(EntryError::Ipv6);
    }
    parse_domain(entry).map(Entry::Domain).ok_or(EntryError::Unrecognized)
}

fn parse_domain(entry: &str) -> Option<DomainRule> {
    let name = normalize_name(entry);
    let (below, name) = match name.strip_prefix("*.") {
        Some(rest) => (true, rest.to_owned()),
        None => (false, name),
    };
    if !is_domain_name(&name) {
        return None;
    }
    Some(if below {
        DomainRule::Below(name)
    } else {
        DomainRule::Exact(name)
    })
}

/// Host-name syntax (RFC 1123) plus `_`, which service names use; the last
/// label is not all digits, so a mistyped IPv4 address such as `1.2.3.300`
/// is an error rather than a name that never resolves.
fn is_domain_name(name: &str) -> bool {
    const MAX_NAME_LEN: usize = 253;
    const MAX_LABEL_LEN: usize = 63;
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return false;
    }
    let labels_valid = name.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= MAX_LABEL_LEN
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_')
    });
    let top_label_numeric = name
        .rsplit('.')
        .next()
        .is_some_and(|label| label.bytes().all(|byte| byte.is_ascii_digit()));
    labels_valid && !top_label_numeric
}

/// DNS names compare case-insensitively and with or without the root's
/// trailing dot.
pub(crate) fn normalize_name(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str], deny: &[&str]) -> NetworkPolicy {
        NetworkPolicy {
            allow: allow.iter().map(|entry| entry.to_string()).collect(),
            deny: deny.iter().map(|entry| entry.to_string()).collect(),
        }
    }

    #[test]
    fn accepts_every_kind_of_entry() {
        let rules = policy(
            &[
                "example.org",
                "*.example.com",
                "10.1.2.0/24",
                "1.2.3.4",
                "Trailing.Dot.",
                "_svc.x-y.io",
            ],
            &["*"],
        )
        .validate()
        .unwrap();
        assert!(rules.allows_address(Ipv4Addr::new(10, 1, 2, 200)));
        assert!(!rules.allows_address(Ipv4Addr::new(10, 1, 3, 1)));
        assert!(rules.allows_address(Ipv4Addr::new(1, 2, 3, 4)));
        assert!(!rules.allows_address(Ipv4Addr::new(1, 2, 3, 5)));
        assert!(rules.denies_address(Ipv4Addr::new(8, 8, 8, 8)));
        assert_eq!(rules.name_verdict("example.org"), NameVerdict::Denied);
    }

    #[test]
    fn host_bits_of_a_cidr_are_dropped() {
        let rules = policy(&["10.1.2.3/24"], &[]).validate().unwrap();
        assert!(rules.allows_address(Ipv4Addr::new(10, 1, 2, 99)));
    }

    #[test]
    fn domain_rules_match_as_documented() {
        let rules = policy(&["example.org", "*.example.com"], &["bad.example.com"])
            .validate()
            .unwrap();
        assert_eq!(rules.name_verdict("example.org"), NameVerdict::Allowed);
        assert_eq!(rules.name_verdict("EXAMPLE.org."), NameVerdict::Allowed);
        assert_eq!(rules.name_verdict("www.example.org"), NameVerdict::Unlisted);
        assert_eq!(rules.name_verdict("example.com"), NameVerdict::Unlisted);
        assert_eq!(rules.name_verdict("a.b.example.com"), NameVerdict::Allowed);
        assert_eq!(rules.name_verdict("notexample.com"), NameVerdict::Unlisted);
        assert_eq!(rules.name_verdict("bad.example.com"), NameVerdict::Denied);
        assert_eq!(rules.name_verdict("x.bad.example.com"), NameVerdict::Allowed);
    }

    #[test]
    fn star_allows_every_name_and_address() {
        let rules = policy(&["*"], &[]).validate().unwrap();
        assert_eq!(rules.name_verdict("anything.at.all"), NameVerdict::Allowed);
        assert!(rules.allows_address(Ipv4Addr::new(93, 184, 216, 34)));
        assert_eq!(rules, Rules::allow_all());
    }

    #[test]
    fn default_rules_allow_nothing() {
        let rules = Rules::default();
        assert_eq!(rules.name_verdict("example.org"), NameVerdict::Unlisted);
        assert!(!rules.allows_address(Ipv4Addr::new(1, 1, 1, 1)));
    }

    #[test]
    fn bad_entries_name_the_field_and_the_reason() {
        let cases: &[(NetworkPolicy, &str)] = &[
            (
                policy(&["example.org", "1.2.3.4", "10.1.2.0/33"], &[]),
                r#"network.allow[2]: "10.1.2.0/33" is not a domain name, an IPv4 address, an IPv4 CIDR or "*""#,
            ),
            (
                policy(&[], &["ok.example", "exa mple.org"]),
                r#"network.deny[1]: "exa mple.org" is not a domain name, an IPv4 address, an IPv4 CIDR or "*""#,
            ),
            (
                policy(&[""], &[]),
                r#"network.allow[0]: "" is not a domain name, an IPv4 address, an IPv4 CIDR or "*""#,
            ),
            (
                policy(&["1.2.3.300"], &[]),
                r#"network.allow[0]: "1.2.3.300" is not a domain name, an IPv4 address, an IPv4 CIDR or "*""#,
            ),
            (
                policy(&["*.*.example.com"], &[]),
                r#"network.allow[0]: "*.*.example.com" is not a domain name, an IPv4 address, an IPv4 CIDR or "*""#,
            ),
            (
                policy(&["-bad.example"], &[]),
                r#"network.allow[0]: "-bad.example" is not a domain name, an IPv4 address, an IPv4 CIDR or "*""#,
            ),
            (
                policy(&["a..b"], &[]),
                r#"network.allow[0]: "a..b" is not a domain name, an IPv4 address, an IPv4 CIDR or "*""#,
            ),
            (
                policy(&[&format!("{}.com", "a".repeat(64))], &[]),
                &format!(
                    r#"network.allow[0]: "{}.com" is not a domain name, an IPv4 address, an IPv4 CIDR or "*""#,
                    "a".repeat(64)
                ),
            ),
            (
                policy(&["1.1.1.1", "2001:db8::1"], &[]),
                r#"network.allow[1]: "2001:db8::1" is an IPv6 address; sandboxes have no IPv6, so list IPv4 addresses, IPv4 CIDRs or domain names"#,
            ),
            (
                policy(&[], &["::/0"]),
                r#"network.deny[0]: "::/0" is an IPv6 address; sandboxes have no IPv6, so list IPv4 addresses, IPv4 CIDRs or domain names"#,
            ),
        ];
        for (policy, expected) in cases {
            let error = policy.validate().unwrap_err();
            assert_eq!(error.to_string(), *expected, "{policy:?}");
        }
    }

    #[test]
    fn json_fields_are_optional_and_unknown_ones_refused() {
        let empty: NetworkPolicy = serde_json::from_str("{}").unwrap();
        assert_eq!(empty, NetworkPolicy::default());
        let allow_only: NetworkPolicy = serde_json::from_str(r#"{"allow": ["*"]}"#).unwrap();
        assert_eq!(allow_only, policy(&["*"], &[]));
        let error = serde_json::from_str::<NetworkPolicy>(r#"{"allow": [], "alow": []}"#)
            .unwrap_err()
            .to_string();
        assert!(error.contains("unknown field `alow`"), "{error}");
    }

    #[test]
    fn rules_survive_serialization() {
        let rules = policy(&["*.example.com", "10.0.0.0/8"], &["1.2.3.4"])
            .validate()
            .unwrap();
        let json = serde_json::to_string(&rules).unwrap();
        assert_eq!(serde_json::from_str::<Rules>(&json).unwrap(), rules);
    }
}
