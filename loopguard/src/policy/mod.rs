//! The policy file: its model, parser, validator and name resolution.
//!
//! Data flows one way: [`parse`] (TOML with spans) -> [`validate`]
//! (semantic checks across services) -> [`resolve`] (names to uids, at apply)
//! -> `compile` (the plan the kernel layers are built from).

mod parse;
mod resolve;
mod schema;
mod toml;
mod validate;

use std::{net::IpAddr, ops::Range};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use parse::parse;
pub use parse::{valid_account_name, valid_name};
pub use resolve::{
    cgroup_id_under, resolve, DaemonDirectory, Directory, NameMemory, Resolved, ResolvedCgroup,
    SystemDirectory, Unresolved, VANISHED_UID,
};
pub use schema::policy_schema;
pub use validate::{lint, validate, EphemeralPorts, ESSENTIAL_SERVICES};

use crate::diag::Diagnostic;

pub type Span = Range<usize>;

/// The only policy format version this build reads.
pub const POLICY_VERSION: i64 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Deny,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Enforce,
    Audit,
}

/// The `protocol` of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Any,
}

/// The words of the policy file, printed as written there.
macro_rules! words {
    ($ty:ty { $($variant:ident => $word:literal),+ $(,)? }) => {
        impl $ty {
            pub fn as_str(self) -> &'static str {
                match self {
                    $(<$ty>::$variant => $word,)+
                }
            }
        }
        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

words!(Verdict { Allow => "allow", Deny => "deny" });
words!(Mode { Enforce => "enforce", Audit => "audit" });
words!(Protocol { Tcp => "tcp", Udp => "udp", Any => "any" });
words!(ListKind { Allow => "allow", Deny => "deny" });

/// The transport of one connection attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Tcp,
    Udp,
}

impl Transport {
    pub const ALL: [Transport; 2] = [Transport::Tcp, Transport::Udp];

    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
        }
    }
}

impl Protocol {
    pub fn includes(self, t: Transport) -> bool {
        matches!(
            (self, t),
            (Protocol::Any, _) | (Protocol::Tcp, Transport::Tcp) | (Protocol::Udp, Transport::Udp)
        )
    }

    fn contains(self, other: Protocol) -> bool {
        self == other || self == Protocol::Any
    }

    fn intersects(self, other: Protocol) -> bool {
        Transport::ALL
            .iter()
            .any(|&t| self.includes(t) && other.includes(t))
    }
}

/// An inclusive port range; a single port has `first == last`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn contains_port(self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }
    fn contains(self, other: PortRange) -> bool {
        self.first <= other.first && other.last <= self.last
    }
    fn intersects(self, other: PortRange) -> bool {
        self.first <= other.last && other.first <= self.last
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// The destinations a service covers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AddrSet {
    /// Every route to this host (SPEC §1): 127.0.0.0/8, ::1, IPv4-mapped
    /// forms, the unspecified addresses and everything the kernel's local
    /// table delivers here (with broadcast and multicast).
    Loopback,
    /// Prefixes inside 127.0.0.0/8 and ::1, aggregated (no two overlap).
    /// `0.0.0.0` reaches 127.0.0.1 and `::` reaches ::1, so those are
    /// covered by whichever prefix holds 127.0.0.1 or ::1.
    Nets(Vec<IpNet>),
}

impl AddrSet {
    pub fn contains_addr(&self, addr: &Destination) -> bool {
        match (self, addr) {
            (AddrSet::Loopback, _) => true,
            (AddrSet::Nets(nets), Destination::Loopback(ip)) => nets.iter().any(|n| n.contains(ip)),
            (AddrSet::Nets(_), Destination::Host(_)) => false,
        }
    }

    fn contains(&self, other: &AddrSet) -> bool {
        match (self, other) {
            (AddrSet::Loopback, _) => true,
            (AddrSet::Nets(_), AddrSet::Loopback) => false,
            (AddrSet::Nets(outer), AddrSet::Nets(inner)) => {
                inner.iter().all(|i| outer.iter().any(|o| o.contains(i)))
            }
        }
    }

    fn intersects(&self, other: &AddrSet) -> bool {
        match (self, other) {
            (AddrSet::Loopback, _) | (_, AddrSet::Loopback) => true,
            (AddrSet::Nets(a), AddrSet::Nets(b)) => a
                .iter()
                .any(|x| b.iter().any(|y| x.contains(y) || y.contains(x))),
        }
    }
}

impl std::fmt::Display for AddrSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AddrSet::Loopback => f.write_str("loopback"),
            AddrSet::Nets(nets) => {
                let parts: Vec<String> = nets.iter().map(ToString::to_string).collect();
                f.write_str(&parts.join(", "))
            }
        }
    }
}

/// A destination already known to be in loopguard's scope, normalized the
/// way the eBPF programs normalize it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    /// Inside 127.0.0.0/8 or ::1 (after mapping 0.0.0.0 -> 127.0.0.1,
    /// :: -> ::1 and ::ffff:a.b.c.d -> a.b.c.d).
    Loopback(IpAddr),
    /// Any other destination the kernel delivers to this host: an
    /// interface address, an AnyIP prefix, a broadcast, anycast or
    /// multicast address.
    Host(IpAddr),
}

impl Destination {
    /// An address already known to be delivered to this host (by the
    /// kernel's own lookup, e.g. a packet the nftables layer logged).
    pub fn in_scope(ip: IpAddr) -> Destination {
        let ip = normalize_ip(ip);
        if is_loopback_range(ip) {
            Destination::Loopback(ip)
        } else {
            Destination::Host(ip)
        }
    }
}

/// Maps an address as a program sees it to the address loopguard decides
/// on: IPv4-mapped to IPv4, unspecified to the loopback address the kernel
/// delivers it to.
pub fn normalize_ip(ip: IpAddr) -> IpAddr {
    let ip = match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        other => other,
    }
}

/// Whether `ip` (normalized) is a loopback-range address.
pub fn is_loopback_range(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.octets()[0] == 127,
        IpAddr::V6(v6) => v6 == std::net::Ipv6Addr::LOCALHOST,
    }
}

/// Classifies a destination: `None` when it is outside loopguard's scope
/// (the kernel does not deliver it to this host).
pub fn classify(ip: IpAddr, local: &crate::scope::LocalTable) -> Option<Destination> {
    let ip = normalize_ip(ip);
    if is_loopback_range(ip) {
        Some(Destination::Loopback(ip))
    } else if local.kind_of(ip).is_some() {
        Some(Destination::Host(ip))
    } else {
        None
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListKind {
    /// `allow_users` / `allow_groups`: only the listed uids pass.
    Allow,
    /// `deny_users` / `deny_groups`: the listed uids are refused.
    Deny,
}

/// A user or group as written: a name or a numeric id.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum IdRef {
    Name(String),
    Id(u32),
}

impl std::fmt::Display for IdRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IdRef::Name(n) => f.write_str(n),
            IdRef::Id(i) => write!(f, "{i}"),
        }
    }
}

/// A list of users or groups as written. Equal lists share one copy: large
/// policies repeat a few team lists across thousands of services, and a
/// list of 100 uids per service would otherwise be a million entries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdList {
    pub ids: std::sync::Arc<[IdRef]>,
    /// Where entries that can fail to resolve (names, and group ids) are
    /// written, by index in `ids`; a numeric uid keeps no span.
    pub name_spans: Vec<(usize, Span)>,
}

impl IdList {
    /// Each entry with its span, when it has one.
    pub fn iter(&self) -> impl Iterator<Item = (&IdRef, Option<&Span>)> {
        let mut spans = self.name_spans.iter().peekable();
        self.ids.iter().enumerate().map(move |(i, id)| {
            let span = spans.next_if(|(at, _)| *at == i).map(|(_, s)| s);
            (id, span)
        })
    }
}

/// Deepest cgroup a list may name (levels below the cgroup2 root). The
/// eBPF layer looks up one ancestor of the calling process per level a
/// policy names, so this bounds the map operations of a verdict.
pub const MAX_CGROUP_LEVEL: u32 = loopguard_common::MAX_CGROUP_LEVEL;

/// A cgroup v2 directory as a list names it: relative to the cgroup2 root,
/// without leading or trailing `/` (`system.slice/grafana.service`). A
/// process matches in that cgroup or below it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CgroupPath(String);

impl CgroupPath {
    /// Normalises `text` (a leading or trailing `/` is dropped, as written
    /// in `/proc/PID/cgroup` or `docker/`), or says what is wrong with it.
    pub fn new(text: &str) -> Result<Self, &'static str> {
        if text.starts_with("0::") {
            return Err("drop the `0::` of the /proc/PID/cgroup line: the path follows it");
        }
        let path = text.trim_start_matches('/').trim_end_matches('/');
        if path.is_empty() {
            return Err("the cgroup2 root holds every process: use `default` instead");
        }
        if path.len() > 4096 {
            return Err("longer than a path may be");
        }
        let mut level = 0;
        for part in path.split('/') {
            level += 1;
            if part.is_empty() || part == "." || part == ".." {
                return Err("a cgroup path has no empty, `.` or `..` parts");
            }
            if part.contains('\0') {
                return Err("a cgroup path has no NUL bytes");
            }
        }
        if level > MAX_CGROUP_LEVEL {
            return Err("deeper than the 16 levels loopguard looks up");
        }
        Ok(CgroupPath(path.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Levels below the cgroup2 root: `system.slice/x.service` is 2.
    pub fn level(&self) -> u32 {
        self.0.split('/').count() as u32
    }
}

impl std::fmt::Display for CgroupPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Unit types that have a cgroup of their own.
pub const UNIT_SUFFIXES: [&str; 6] = [".service", ".scope", ".slice", ".socket", ".mount", ".swap"];

/// Whether `name` is a systemd unit name with a cgroup: systemd's unit
/// name characters, at most 255 bytes, one of [`UNIT_SUFFIXES`].
pub fn valid_unit_name(name: &str) -> bool {
    name.len() <= 255
        && UNIT_SUFFIXES
            .iter()
            .any(|s| name.len() > s.len() && name.ends_with(s))
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":-_.\\@".contains(&b))
}

/// The cgroup path systemd gives slice `name`: `a-b.slice` lives at
/// `a.slice/a-b.slice`; `-.slice` is the root (no path).
pub fn slice_path(name: &str) -> Option<String> {
    let stem = name.strip_suffix(".slice")?;
    if stem == "-" {
        return Some(String::new());
    }
    let mut parts: Vec<String> = stem
        .match_indices('-')
        .map(|(i, _)| format!("{}.slice", &stem[..i]))
        .collect();
    parts.push(name.to_string());
    Some(parts.join("/"))
}

/// Who may listen on a service's ports (SPEC §2, bind guard).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BindGuard {
    pub users: IdList,
    pub groups: IdList,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub name_span: Span,
    pub ports: PortRange,
    pub protocol: Protocol,
    pub addresses: AddrSet,
    pub list: ListKind,
    pub users: IdList,
    /// Where the users array (`allow_users` or `deny_users`) is written,
    /// brackets included: `learn` adds to it in place.
    pub users_span: Option<Span>,
    pub groups: IdList,
    /// `allow_cgroups`/`deny_cgroups`: processes in these cgroups (or
    /// below) are on the list whatever their uid.
    pub cgroups: Vec<(CgroupPath, Span)>,
    /// `allow_units`/`deny_units`: systemd units, each standing for its
    /// cgroup (resolved through systemd).
    pub units: Vec<(String, Span)>,
    /// `bind_users`/`bind_groups`: who may bind the service's ports; `None`
    /// when binding is not restricted.
    pub bind: Option<BindGuard>,
    /// Effective mode: the service's own, else the policy's.
    pub mode: Mode,
    /// Where the service's own `mode` value is written, when it is.
    pub mode_span: Option<Span>,
    /// Effective: the service's own, else the policy's.
    pub log_allowed: bool,
}

impl Service {
    pub fn matches(&self, transport: Transport, dest: &Destination, port: u16) -> bool {
        self.protocol.includes(transport)
            && self.ports.contains_port(port)
            && self.addresses.contains_addr(dest)
    }

    /// Everything `other` matches, `self` matches too.
    pub fn contains(&self, other: &Service) -> bool {
        self.protocol.contains(other.protocol)
            && self.ports.contains(other.ports)
            && self.addresses.contains(&other.addresses)
    }

    pub fn intersects(&self, other: &Service) -> bool {
        self.protocol.intersects(other.protocol)
            && self.ports.intersects(other.ports)
            && self.addresses.intersects(&other.addresses)
    }

    /// `tcp/5432 on loopback`: what the service matches, for messages.
    pub fn describe(&self) -> String {
        let proto = match self.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Any => "tcp+udp",
        };
        format!("{proto}/{} on {}", self.ports, self.addresses)
    }
}

/// A parsed policy file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// The file as named on the command line.
    pub file: String,
    /// The file's text, shared with the caller (a large policy is several
    /// megabytes).
    pub source: std::sync::Arc<str>,
    pub default: Verdict,
    /// Where `default` is set, when it is.
    pub default_span: Option<Span>,
    pub mode: Mode,
    /// Where the policy's `mode` value is written, when it is.
    pub mode_span: Option<Span>,
    pub log_allowed: bool,
    pub services: Vec<Service>,
}

impl Policy {
    /// The service that decides for one attempt (the innermost match), if
    /// any. Linear: used by `check` and as the reference the compiled plan
    /// is tested against, never on the connect path.
    pub fn deciding_service(
        &self,
        transport: Transport,
        dest: &Destination,
        port: u16,
    ) -> Option<usize> {
        let mut best: Option<usize> = None;
        for (i, s) in self.services.iter().enumerate() {
            if !s.matches(transport, dest, port) {
                continue;
            }
            best = match best {
                Some(b) if !self.services[b].contains(s) => Some(b),
                _ => Some(i),
            };
        }
        best
    }
}

/// Whether the TOML reader's fast path for uid arrays reads `text` exactly
/// as its general path does (for the fuzzer, [`crate::exercise`]).
pub fn fast_toml_path_agrees(text: &str) -> bool {
    toml::token_read_agrees(text)
}

/// Parse, then validate: every problem in the file, errors and warnings.
pub fn load(file: &str, source: impl Into<String>) -> (Option<Policy>, Vec<Diagnostic>) {
    let (_, policy, diags) = load_text(file, source.into());
    (policy, diags)
}

/// [`load`], returning the text too, shared (diagnostics quote it).
pub fn load_text(
    file: &str,
    source: String,
) -> (std::sync::Arc<str>, Option<Policy>, Vec<Diagnostic>) {
    let (source, policy, mut diags) = parse(file, source);
    if let Some(p) = &policy {
        diags.extend(validate(p));
    }
    (source, policy, diags)
}
