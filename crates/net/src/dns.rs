//! The guest's DNS server: answers what the policy refuses itself, forwards
//! what it allows to the upstream resolver, and reports the addresses each
//! allowed name resolved to.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::{Interest, Registry, Token};
use simple_dns::rdata::RData;
use simple_dns::{Name, Packet, PacketFlag, CLASS, RCODE};
use smoltcp::wire::IpEndpoint;

use crate::policy::{normalize_name, NameVerdict, Rules};

/// How long the upstream has to answer before the guest gets SERVFAIL.
pub(crate) const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Queries waiting for the upstream at once; beyond it a query gets SERVFAIL.
const MAX_PENDING: usize = 256;
/// Upstream datagrams read per poll, so a chatty upstream cannot hold the
/// thread; the rest are read on the next poll.
const MAX_ANSWERS_PER_POLL: usize = 1024;
/// CNAME aliases followed from a query name to its A records.
const MAX_ALIASES: usize = 16;
/// Answer records looked at for aliases and addresses.
const MAX_RECORDS_EXAMINED: usize = 256;

const HEADER_LEN: usize = 12;
/// The smallest question on the wire: the root name, type and class.
const MIN_QUESTION_LEN: usize = 5;
/// The smallest resource record on the wire: the root name, type, class,
/// TTL and a zero rdata length.
const MIN_RECORD_LEN: usize = 11;
const FLAG_RESPONSE: u16 = 0x8000;
const FLAG_RECURSION_DESIRED: u16 = 0x0100;
const FLAG_RECURSION_AVAILABLE: u16 = 0x0080;
const OPCODE_SHIFT: u16 = 11;
const OPCODE_MASK: u16 = 0xf;
const OPCODE_QUERY: u16 = 0;
const RCODE_FORMAT_ERROR: u16 = 1;
const RCODE_NOT_IMPLEMENTED: u16 = 4;

/// What to do with one query from the guest.
#[derive(Debug)]
pub(crate) enum QueryDecision {
    /// Answer at once with `reply`.
    Answer { reply: Vec<u8>, outcome: Outcome },
    /// Send to the upstream; `servfail` is the answer if it stays silent.
    Forward { name: String, servfail: Vec<u8> },
    /// Not a query, or too short to answer.
    Ignore,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The policy refused the name (REFUSED or NXDOMAIN).
    Refused,
    /// The query could not be served (FORMERR, NOTIMP, SERVFAIL).
    Failed,
}

/// The fixed 12-byte header of a DNS message.
struct Header {
    id: u16,
    flags: u16,
    questions: u16,
    records: [u16; 3],
}

impl Header {
    fn read(message: &[u8]) -> Option<Header> {
        let field = |index: usize| -> Option<u16> {
            let bytes = message.get(index * 2..index * 2 + 2)?;
            Some(u16::from_be_bytes([bytes[0], bytes[1]]))
        };
        Some(Header {
            id: field(0)?,
            flags: field(1)?,
            questions: field(2)?,
            records: [field(3)?, field(4)?, field(5)?],
        })
    }

    fn opcode(&self) -> u16 {
        (self.flags >> OPCODE_SHIFT) & OPCODE_MASK
    }

    /// Whether the counts could fit in `message_len` bytes. The parser
    /// reserves room for every counted item up front, so a 12-byte message
    /// claiming 65535 questions must be turned away before it is parsed.
    fn counts_fit(&self, message_len: usize) -> bool {
        let records: usize = self.records.iter().map(|count| usize::from(*count)).sum();
        let needed = HEADER_LEN + usize::from(self.questions) * MIN_QUESTION_LEN + records * MIN_RECORD_LEN;
        needed <= message_len
    }

    /// A reply with no question section, for queries that cannot be parsed.
    fn bare_reply(&self, rcode: u16) -> Vec<u8> {
        let flags = FLAG_RESPONSE
            | (self.opcode() << OPCODE_SHIFT)
            | (self.flags & FLAG_RECURSION_DESIRED)
            | FLAG_RECURSION_AVAILABLE
            | rcode;
        let mut reply = Vec::with_capacity(HEADER_LEN);
        reply.extend_from_slice(&self.id.to_be_bytes());
        reply.extend_from_slice(&flags.to_be_bytes());
        reply.resize(HEADER_LEN, 0);
        reply
    }
}

/// Decides what to do with `query`, a UDP payload the guest sent to the
/// gateway's port 53. Never panics, whatever the bytes.
pub(crate) fn decide_query(query: &[u8], rules: &Rules) -> QueryDecision {
    let Some(header) = Header::read(query) else {
        return QueryDecision::Ignore;
    };
    if header.flags & FLAG_RESPONSE != 0 {
        return QueryDecision::Ignore;
    }
    let failed = |rcode| QueryDecision::Answer {
        reply: header.bare_reply(rcode),
        outcome: Outcome::Failed,
    };
    if header.opcode() != OPCODE_QUERY {
        return failed(RCODE_NOT_IMPLEMENTED);
    }
    if header.questions != 1 || !header.counts_fit(query.len()) {
        return failed(RCODE_FORMAT_ERROR);
    }
    let Ok(packet) = Packet::parse(query) else {
        return failed(RCODE_FORMAT_ERROR);
    };
    let Some(question) = packet.questions.first() else {
        return failed(RCODE_FORMAT_ERROR);
    };
    let answer = |rcode, outcome| match reply_to(&packet, rcode) {
        Some(reply) => QueryDecision::Answer { reply, outcome },
        None => failed(RCODE_FORMAT_ERROR),
    };
    // A name whose labels hold dots or unprintable bytes is not one the
    // policy's rules can describe, so it is never sent anywhere.
    let Some(name) = plain_name(&question.qname) else {
        return answer(RCODE::NameError, Outcome::Refused);
    };
    match rules.name_verdict(&name) {
        NameVerdict::Denied => answer(RCODE::Refused, Outcome::Refused),
        NameVerdict::Unlisted => answer(RCODE::NameError, Outcome::Refused),
        NameVerdict::Allowed => match reply_to(&packet, RCODE::ServerFailure) {
            Some(servfail) => QueryDecision::Forward { name, servfail },
            None => failed(RCODE_FORMAT_ERROR),
        },
    }
}

/// A reply to `query` echoing its question, with `rcode` and no records.
fn reply_to(query: &Packet, rcode: RCODE) -> Option<Vec<u8>> {
    let mut reply = Packet::new_reply(query.id());
    reply.set_flags(PacketFlag::RECURSION_AVAILABLE);
    if query.has_flags(PacketFlag::RECURSION_DESIRED) {
        reply.set_flags(PacketFlag::RECURSION_DESIRED);
    }
    *reply.rcode_mut() = rcode;
    reply.questions = query.questions.clone();
    reply.build_bytes_vec().ok()
}

/// The name as the policy compares it (lowercase, dot-separated), or None if
/// a label holds a dot or a byte outside printable ASCII.
fn plain_name(name: &Name) -> Option<String> {
    let mut text = String::new();
    for label in name.get_labels() {
        let bytes: &[u8] = label.as_ref();
        if bytes.iter().any(|byte| !byte.is_ascii_graphic() || *byte == b'.') {
            return None;
        }
        if !text.is_empty() {
            text.push('.');
        }
        text.push_str(std::str::from_utf8(bytes).ok()?);
    }
    Some(normalize_name(&text))
}

/// The IPv4 addresses an answer gives for `name`, following CNAME chains.
fn addresses_for(answer: &Packet, name: &str) -> Vec<Ipv4Addr> {
    let records = || answer.answers.iter().take(MAX_RECORDS_EXAMINED);
    let mut aliases = vec![name.to_owned()];
    // Each pass adds the aliases one more step down the chain; records may
    // come in any order, so passes repeat until one finds nothing new.
    loop {
        let mut found = false;
        for record in records() {
            let RData::CNAME(target) = &record.rdata else {
                continue;
            };
            let (Some(owner), Some(target)) = (plain_name(&record.name), plain_name(&target.0)) else {
                continue;
            };
            if aliases.len() < MAX_ALIASES && aliases.contains(&owner) && !aliases.contains(&target) {
                aliases.push(target);
                found = true;
            }
        }
        if !found {
            break;
        }
    }
    records()
        .filter_map(|record| match &record.rdata {
            RData::A(a) if record.class == CLASS::IN => plain_name(&record.name)
                .filter(|owner| aliases.contains(owner))
                .map(|_| Ipv4Addr::from(a.address)),
            _ => None,
        })
        .collect()
}

/// An upstream answer ready for the guest.
pub(crate) struct RelayedAnswer {
    pub(crate) guest: IpEndpoint,
    /// The upstream's answer with the guest's query id back in place.
    pub(crate) reply: Vec<u8>,
    pub(crate) name: String,
    pub(crate) addresses: Vec<Ipv4Addr>,
}

struct PendingQuery {
    guest: IpEndpoint,
    guest_id: u16,
    name: String,
    servfail: Vec<u8>,
    deadline: Instant,
}

/// Queries in flight to the upstream resolver over one host UDP socket.
pub(crate) struct DnsForwarder {
    /// None when it could not be opened (no route to the upstream, say):
    /// every query allowed through then gets SERVFAIL at once, and the
    /// rest of the network works.
    socket: Option<UdpSocket>,
    /// Keyed by the id sent upstream: ids are drawn at random rather than
    /// the guest's own, so that two guest queries with one id cannot be
    /// confused and an off-path host cannot guess them.
    pending: HashMap<u16, PendingQuery>,
    readable: bool,
    /// The upstream's host said nothing listens there (ICMP port
    /// unreachable): every query in flight fails now, not at its deadline.
    upstream_refused: bool,
    receive_buffer: Vec<u8>,
}

impl DnsForwarder {
    pub(crate) fn new(upstream: SocketAddr, registry: &Registry, token: Token) -> DnsForwarder {
        let open = || -> io::Result<UdpSocket> {
            let any: SocketAddr = match upstream {
                SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
                SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
            };
            let mut socket = UdpSocket::bind(any)?;
            // Connected, so the kernel drops datagrams from anyone else.
            socket.connect(upstream)?;
            registry.register(&mut socket, token, Interest::READABLE)?;
            Ok(socket)
        };
        let socket = match open() {
            Ok(socket) => Some(socket),
            Err(error) => {
                tracing::warn!(%upstream, %error, "cannot reach the DNS upstream: this sandbox's names do not resolve");
                None
            }
        };
        DnsForwarder {
            socket,
            pending: HashMap::new(),
            readable: true,
            upstream_refused: false,
            receive_buffer: vec![0; usize::from(u16::MAX)],
        }
    }

    pub(crate) fn set_readable(&mut self) {
        self.readable = true;
    }

    /// Sends `query` upstream; on failure returns `servfail` for the guest.
    pub(crate) fn forward(
        &mut self,
        query: &[u8],
        guest: IpEndpoint,
        name: String,
        servfail: Vec<u8>,
        now: Instant,
    ) -> Result<(), Vec<u8>> {
        let Some(socket) = self.socket.as_ref() else {
            return Err(servfail);
        };
        if self.pending.len() >= MAX_PENDING {
            return Err(servfail);
        }
        let Some(header) = Header::read(query) else {
            return Err(servfail);
        };
        let id = loop {
            let candidate = fastrand::u16(..);
            if !self.pending.contains_key(&candidate) {
                break candidate;
            }
        };
        let mut upstream_query = query.to_vec();
        upstream_query[..2].copy_from_slice(&id.to_be_bytes());
        match socket.send(&upstream_query) {
            Ok(_) => {
                self.pending.insert(
                    id,
                    PendingQuery {
                        guest,
                        guest_id: header.id,
                        name,
                        servfail,
                        deadline: now + UPSTREAM_TIMEOUT,
                    },
                );
                Ok(())
            }
            Err(error) => {
                tracing::debug!(%error, "could not forward a DNS query upstream");
                Err(servfail)
            }
        }
    }

    /// Reads the upstream's answers and calls `relay` with each one that
    /// matches a query in flight.
    pub(crate) fn receive_answers(&mut self, mut relay: impl FnMut(RelayedAnswer)) {
        let Some(socket) = self.socket.as_ref() else {
            return;
        };
        for _ in 0..MAX_ANSWERS_PER_POLL {
            if !self.readable {
                return;
            }
            let length = match socket.recv(&mut self.receive_buffer) {
                Ok(length) => length,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    return;
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {
                    self.upstream_refused = true;
                    continue;
                }
                Err(error) => {
                    // Another ICMP error from an earlier send; the queries
                    // in flight time out to SERVFAIL.
                    tracing::debug!(%error, "DNS upstream socket error");
                    continue;
                }
            };
            let message = &self.receive_buffer[..length];
            if let Some(answer) = Self::match_answer(&mut self.pending, message) {
                relay(answer);
            }
        }
    }

    fn match_answer(pending: &mut HashMap<u16, PendingQuery>, message: &[u8]) -> Option<RelayedAnswer> {
        let header = Header::read(message)?;
        if header.flags & FLAG_RESPONSE == 0 {
            return None;
        }
        let query = pending.get(&header.id)?;
        let parsed = if header.counts_fit(message.len()) {
            Packet::parse(message).ok()
        } else {
            None
        };
        let addresses = match &parsed {
            Some(answer) => {
                let same_question = answer.questions.len() == 1
                    && answer
                        .questions
                        .first()
                        .and_then(|question| plain_name(&question.qname))
                        .is_some_and(|name| name == query.name);
                if !same_question {
                    // Not the answer to this query; the real one may follow.
                    return None;
                }
                addresses_for(answer, &query.name)
            }
            // Relayed as it is; with nothing understood, no address is
            // learned, so the answer opens no connection.
            None => Vec::new(),
        };
        let query = pending.remove(&header.id)?;
        let mut reply = message.to_vec();
        reply[..2].copy_from_slice(&query.guest_id.to_be_bytes());
        Some(RelayedAnswer {
            guest: query.guest,
            reply,
            name: query.name,
            addresses,
        })
    }

    /// Removes the queries the upstream left unanswered past their deadline
    /// (or all of them, if the upstream is not there) and calls `fail` with
    /// each one's guest and SERVFAIL answer.
    pub(crate) fn expire(&mut self, now: Instant, mut fail: impl FnMut(IpEndpoint, Vec<u8>)) {
        let refused = std::mem::take(&mut self.upstream_refused);
        let expired: Vec<u16> = self
            .pending
            .iter()
            .filter(|(_, query)| refused || query.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(query) = self.pending.remove(&id) {
                fail(query.guest, query.servfail);
            }
        }
    }

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().map(|query| query.deadline).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::NetworkPolicy;
    use simple_dns::rdata::{A, CNAME};
    use simple_dns::{Question, ResourceRecord, QCLASS, QTYPE, TYPE};

    fn rules(allow: &[&str], deny: &[&str]) -> Rules {
        NetworkPolicy {
            allow: allow.iter().map(|entry| entry.to_string()).collect(),
            deny: deny.iter().map(|entry| entry.to_string()).collect(),
        }
        .validate()
        .unwrap()
    }

    fn query(id: u16, name: &str) -> Vec<u8> {
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

    fn rcode_of(reply: &[u8]) -> RCODE {
        Packet::parse(reply).unwrap().rcode()
    }

    #[test]
    fn the_policy_decides_each_name() {
        let rules = rules(&["*.example.com"], &["bad.example.com"]);
        match decide_query(&query(7, "www.Example.com."), &rules) {
            QueryDecision::Forward { name, servfail } => {
                assert_eq!(name, "www.example.com");
                let servfail = Packet::parse(&servfail).unwrap();
                assert_eq!(servfail.id(), 7);
                assert_eq!(servfail.rcode(), RCODE::ServerFailure);
            }
            other => panic!("{other:?}"),
        }
        match decide_query(&query(8, "bad.example.com"), &rules) {
            QueryDecision::Answer { reply, outcome } => {
                assert_eq!(rcode_of(&reply), RCODE::Refused);
                assert_eq!(outcome, Outcome::Refused);
                let reply = Packet::parse(&reply).unwrap();
                assert_eq!(reply.id(), 8);
                assert_eq!(reply.questions.len(), 1);
            }
            other => panic!("{other:?}"),
        }
        match decide_query(&query(9, "example.org"), &rules) {
            QueryDecision::Answer { reply, .. } => assert_eq!(rcode_of(&reply), RCODE::NameError),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_label_holding_a_dot_is_never_forwarded() {
        let mut packet = Packet::new_query(1);
        let labels = [
            simple_dns::Label::new_unchecked(&b"x.example"[..]),
            simple_dns::Label::new_unchecked(&b"com"[..]),
        ];
        packet.questions.push(Question::new(
            Name::new_with_labels(&labels),
            QTYPE::TYPE(TYPE::A),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
        let bytes = packet.build_bytes_vec().unwrap();
        match decide_query(&bytes, &rules(&["*.example.com"], &[])) {
            QueryDecision::Answer { reply, .. } => assert_eq!(rcode_of(&reply), RCODE::NameError),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_queries_get_formerr_or_nothing() {
        let rules = Rules::allow_all();
        assert!(matches!(decide_query(&[1, 2, 3], &rules), QueryDecision::Ignore));
        // A response sent to the server is not answered.
        let mut response = query(1, "a.example");
        response[2] |= 0x80;
        assert!(matches!(decide_query(&response, &rules), QueryDecision::Ignore));
        // 65535 questions claimed in a 12-byte message.
        let claims = [0, 1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0];
        match decide_query(&claims, &rules) {
            QueryDecision::Answer { reply, outcome } => {
                assert_eq!(outcome, Outcome::Failed);
                assert_eq!(reply.len(), HEADER_LEN);
                assert_eq!(reply[3] & 0xf, RCODE_FORMAT_ERROR as u8);
            }
            other => panic!("{other:?}"),
        }
        let truncated = &query(2, "a.example")[..20];
        assert!(matches!(
            decide_query(truncated, &rules),
            QueryDecision::Answer {
                outcome: Outcome::Failed,
                ..
            }
        ));
        let mut inverse = query(3, "a.example");
        inverse[2] |= 1 << 3;
        match decide_query(&inverse, &rules) {
            QueryDecision::Answer { reply, .. } => {
                assert_eq!(reply[3] & 0xf, RCODE_NOT_IMPLEMENTED as u8)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let rules = Rules::allow_all();
        let mut rng = fastrand::Rng::with_seed(0x5eed);
        let valid = query(4, "www.example.com");
        for round in 0..20_000 {
            let bytes: Vec<u8> = if round % 2 == 0 {
                (0..rng.usize(0..600)).map(|_| rng.u8(..)).collect()
            } else {
                let mut mutated = valid.clone();
                for _ in 0..rng.usize(1..6) {
                    let index = rng.usize(..mutated.len());
                    mutated[index] = rng.u8(..);
                }
                mutated.truncate(rng.usize(0..=mutated.len()));
                mutated
            };
            let _ = decide_query(&bytes, &rules);
            let mut pending = HashMap::new();
            let _ = DnsForwarder::match_answer(&mut pending, &bytes);
        }
    }

    #[test]
    fn addresses_follow_cname_chains() {
        let mut answer = Packet::new_reply(1);
        answer.questions.push(Question::new(
            Name::new_unchecked("www.example.com"),
            QTYPE::TYPE(TYPE::A),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
        // Out of order on purpose: the chain is www -> edge -> host.
        answer.answers.push(ResourceRecord::new(
            Name::new_unchecked("host.cdn.example"),
            CLASS::IN,
            60,
            RData::A(A {
                address: u32::from(Ipv4Addr::new(192, 0, 2, 1)),
            }),
        ));
        answer.answers.push(ResourceRecord::new(
            Name::new_unchecked("edge.cdn.example"),
            CLASS::IN,
            60,
            RData::CNAME(CNAME(Name::new_unchecked("HOST.cdn.example"))),
        ));
        answer.answers.push(ResourceRecord::new(
            Name::new_unchecked("www.example.com"),
            CLASS::IN,
            60,
            RData::CNAME(CNAME(Name::new_unchecked("edge.cdn.example"))),
        ));
        answer.answers.push(ResourceRecord::new(
            Name::new_unchecked("unrelated.example"),
            CLASS::IN,
            60,
            RData::A(A {
                address: u32::from(Ipv4Addr::new(192, 0, 2, 99)),
            }),
        ));
        let bytes = answer.build_bytes_vec().unwrap();
        let parsed = Packet::parse(&bytes).unwrap();
        assert_eq!(
            addresses_for(&parsed, "www.example.com"),
            vec![Ipv4Addr::new(192, 0, 2, 1)]
        );
    }
}
