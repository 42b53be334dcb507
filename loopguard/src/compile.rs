//! Policy + resolved uids -> [`Plan`]: the one input of every kernel layer.
//!
//! The (protocol x port x address) space is cut into atoms so the kernel can
//! find the deciding service with a fixed number of lookups however many
//! services there are:
//! - port atoms: the port ranges between service boundaries that some
//!   service covers (an array indexed by port gives the atom);
//! - address atoms: each distinct prefix a service names (an LPM trie gives
//!   the most specific one); atom 0 is "in scope, in no named prefix";
//! - decisions: (transport, port atom, address atom) -> innermost service.
//!
//! Uid lists are interned: services with the same uids share one set.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use ipnet::IpNet;
use loopguard_common::{
    BIND_WILDCARD_ATOM, MAX_DECISIONS, MAX_NETS, MAX_SERVICES, MAX_UID_ENTRIES,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::policy::ResolvedCgroup;
use crate::policy::{
    classify, AddrSet, CgroupPath, Destination, ListKind, Mode, Policy, PortRange, Protocol,
    Resolved, Transport, Verdict,
};
use crate::scope::LocalTable;

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("policy has {count} {what}; loopguard supports at most {max}")]
    TooLarge {
        what: &'static str,
        count: usize,
        max: u32,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanService {
    pub name: String,
    /// `file:line:col` of its name.
    pub location: String,
    pub ports: PortRange,
    pub protocol: Protocol,
    pub addresses: AddrSet,
    pub list: ListKind,
    pub mode: Mode,
    pub log_allowed: bool,
    /// Index into [`Plan::uid_sets`].
    pub uid_set: u32,
    /// Who may bind its ports (index into [`Plan::uid_sets`]), when it is
    /// bind-guarded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind_set: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub transport: Transport,
    pub port_atom: u32,
    pub addr_atom: u32,
    pub service: u32,
}

/// Who may bind one (transport, port atom, address atom) cell: the uids in
/// every bind-guarded service covering it. `addr_atom` is
/// [`BIND_WILDCARD_ATOM`] for `0.0.0.0`/`::`, which listen on every address
/// and so answer to every guarded service on the port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindDecision {
    pub transport: Transport,
    pub port_atom: u32,
    pub addr_atom: u32,
    /// The innermost guarded service: named in events and `explain`.
    pub service: u32,
    /// Uids every guarded service covering the cell admits: others are
    /// refused (would-deny where only audit-mode services refuse them).
    pub uid_set: u32,
    /// Uids every enforce-mode guarded service admits; `None` when all the
    /// cell's guards are in audit mode.
    pub enforce_set: Option<u32>,
}

/// The compiled policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// `sha256:<hex>` of the policy file's bytes.
    pub hash: String,
    /// What the kernel layers enforce, as 16 hex digits: the start of the
    /// SHA-256 of everything compiled (the uids a file resolves to
    /// included). Both layers carry it (the eBPF slot's config, a chain
    /// named `plan_<id>` in the table), so what is in force can be read
    /// back from the kernel and compared with the state.
    #[serde(default)]
    pub id: String,
    pub file: String,
    pub default: Verdict,
    pub mode: Mode,
    pub log_allowed: bool,
    pub services: Vec<PlanService>,
    /// Sorted uid lists.
    pub uid_sets: Vec<Vec<u32>>,
    /// The cgroups of each uid set (by the same index), sorted; empty when
    /// no list names a cgroup.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cgroup_sets: Vec<Vec<ResolvedCgroup>>,
    /// Atom `i + 1` is `port_atoms[i]`; sorted, disjoint.
    pub port_atoms: Vec<PortRange>,
    /// Atom `i + 1` is `nets[i]`.
    pub nets: Vec<IpNet>,
    pub decisions: Vec<Decision>,
    /// Bind guards, sorted by key; empty when no service has one.
    #[serde(default)]
    pub binds: Vec<BindDecision>,
}

/// Who makes an attempt: a uid and, when known, the cgroup it runs in.
#[derive(Clone, Copy, Debug)]
pub struct Client<'a> {
    pub uid: u32,
    pub cgroup: Option<&'a CgroupPath>,
}

/// What happens to one attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Allow,
    Deny,
    WouldDeny,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
            Action::WouldDeny => "would-deny",
        }
    }
}

/// The verdict for one attempt and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Evaluation {
    pub action: Action,
    /// `None` when the destination is outside the loopback scope.
    pub destination: Option<Destination>,
    /// Index of the deciding service; `None` when the default decides.
    pub service: Option<usize>,
    pub reason: String,
}

/// `io::Write` into a hasher.
struct HashWriter<'h>(&'h mut Sha256);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub fn source_hash(source: &str) -> String {
    format!("sha256:{:x}", Sha256::digest(source.as_bytes()))
}

/// Whether the file at `path` holds the source `plan` was compiled from
/// (`false` too when it cannot be read): the one check of "is the file on
/// disk the policy applied".
pub fn file_matches(path: &std::path::Path, plan: &Plan) -> bool {
    std::fs::read(path).is_ok_and(|b| source_hash(&String::from_utf8_lossy(&b)) == plan.hash)
}

pub fn compile(policy: &Policy, resolved: &Resolved) -> Result<Plan, CompileError> {
    let too_large = |what, count: usize, max: u32| {
        if count > max as usize {
            Err(CompileError::TooLarge { what, count, max })
        } else {
            Ok(())
        }
    };
    too_large("services", policy.services.len(), MAX_SERVICES)?;

    let mut sets = UidSets::default();
    let mut services = Vec::with_capacity(policy.services.len());
    let lines = crate::diag::LineIndex::new(&policy.source);
    for (s, r) in policy.services.iter().zip(&resolved.services) {
        let uid_set = sets.intern(&r.uids, &r.cgroups);
        let bind_set = r.bind_uids.as_deref().map(|u| sets.intern(u, &[]));
        services.push(PlanService {
            name: s.name.clone(),
            location: {
                let (line, col) = lines.line_col(s.name_span.start);
                format!("{}:{line}:{col}", policy.file)
            },
            ports: s.ports,
            protocol: s.protocol,
            addresses: s.addresses.clone(),
            list: s.list,
            mode: s.mode,
            log_allowed: s.log_allowed,
            uid_set,
            bind_set,
        });
    }

    let port_atoms = port_atoms(&services);
    let mut nets: Vec<IpNet> = services
        .iter()
        .filter_map(|s| match &s.addresses {
            AddrSet::Nets(n) => Some(n.iter().copied()),
            AddrSet::Loopback => None,
        })
        .flatten()
        .collect();
    nets.sort();
    nets.dedup();
    too_large("distinct address prefixes", nets.len(), MAX_NETS)?;

    let mut table: HashMap<(Transport, u32, u32), u32, foldhash::fast::RandomState> =
        HashMap::default();
    for (si, s) in services.iter().enumerate() {
        let aas = addr_atoms_of(s, &nets);
        for t in Transport::ALL {
            if !s.protocol.includes(t) {
                continue;
            }
            for pa in port_atoms_of(s, &port_atoms) {
                for &aa in &aas {
                    let key = (t, pa as u32, aa);
                    match table.get(&key) {
                        Some(&e) if !contains(&services[e as usize], s) => {}
                        _ => {
                            table.insert(key, si as u32);
                        }
                    }
                }
            }
        }
        too_large("decision entries", table.len(), MAX_DECISIONS)?;
    }
    let binds = bind_decisions(&services, &port_atoms, &nets, &mut sets);
    let uid_sets = sets.sets;
    let cgroup_sets = if sets.cgroups.iter().all(Vec::is_empty) {
        Vec::new()
    } else {
        sets.cgroups
    };
    too_large(
        "cgroup entries",
        cgroup_sets.iter().map(Vec::len).sum(),
        loopguard_common::MAX_CGROUP_ENTRIES,
    )?;
    too_large("bind decision entries", binds.len(), MAX_DECISIONS)?;
    too_large(
        "uid entries",
        uid_sets.iter().map(Vec::len).sum(),
        MAX_UID_ENTRIES,
    )?;
    let sorted: BTreeMap<_, _> = table.into_iter().collect();
    let decisions = sorted
        .into_iter()
        .map(|((transport, port_atom, addr_atom), service)| Decision {
            transport,
            port_atom,
            addr_atom,
            service,
        })
        .collect();

    let mut plan = Plan {
        id: String::new(),
        hash: source_hash(&policy.source),
        file: policy.file.clone(),
        default: policy.default,
        mode: policy.mode,
        log_allowed: policy.log_allowed,
        services,
        uid_sets,
        cgroup_sets,
        port_atoms,
        nets,
        decisions,
        binds,
    };
    plan.id = plan.content_id();
    Ok(plan)
}

/// Sorted uid lists with their cgroups, interned: equal lists share one
/// index (services of one team, and bind cells with the same
/// intersection).
#[derive(Default)]
struct UidSets {
    sets: Vec<Vec<u32>>,
    cgroups: Vec<Vec<ResolvedCgroup>>,
    /// uids -> the sets with those uids (almost always one). foldhash:
    /// SipHash over a 10,000-service plan's million uids was measurable.
    index: HashMap<Vec<u32>, Vec<u32>, foldhash::fast::RandomState>,
}

impl UidSets {
    fn intern(&mut self, uids: &[u32], cgroups: &[ResolvedCgroup]) -> u32 {
        if let Some(same) = self.index.get(uids) {
            if let Some(&i) = same.iter().find(|&&i| self.cgroups[i as usize] == cgroups) {
                return i;
            }
        }
        let i = self.sets.len() as u32;
        self.sets.push(uids.to_vec());
        self.cgroups.push(cgroups.to_vec());
        self.index.entry(uids.to_vec()).or_default().push(i);
        i
    }
}

/// The address atoms a service covers: all of them for `loopback`, else
/// the named prefixes inside its own.
fn addr_atoms_of(s: &PlanService, nets: &[IpNet]) -> Vec<u32> {
    match &s.addresses {
        AddrSet::Loopback => (0..=nets.len() as u32).collect(),
        AddrSet::Nets(own) => nets
            .iter()
            .enumerate()
            .filter(|(_, n)| own.iter().any(|o| o.contains(*n)))
            .map(|(i, _)| i as u32 + 1)
            .collect(),
    }
}

/// The port atoms (1-based) inside a service's ports.
fn port_atoms_of(s: &PlanService, port_atoms: &[PortRange]) -> std::ops::Range<usize> {
    let first = port_atoms.partition_point(|a| a.last < s.ports.first);
    let count = port_atoms[first..]
        .iter()
        .take_while(|a| a.first <= s.ports.last)
        .count();
    first + 1..first + 1 + count
}

/// Bind guards per cell: a bind is allowed only to uids every guarded
/// service covering the cell lists (each service's guard holds on its own,
/// whatever other services say), so a cell's set is the intersection.
/// Wildcard binds listen on every address: their cell collects every
/// guarded service on the port.
fn bind_decisions(
    services: &[PlanService],
    port_atoms: &[PortRange],
    nets: &[IpNet],
    sets: &mut UidSets,
) -> Vec<BindDecision> {
    /// A cell: the innermost guarded service, the intersection of all the
    /// guards' lists and of the enforce-mode ones'.
    struct Cell {
        service: u32,
        all: Vec<u32>,
        enforce: Option<Vec<u32>>,
    }
    let mut cells: BTreeMap<(Transport, u32, u32), Cell> = BTreeMap::new();
    for (si, s) in services.iter().enumerate() {
        let Some(set) = s.bind_set else { continue };
        let mut atoms = addr_atoms_of(s, nets);
        atoms.push(BIND_WILDCARD_ATOM);
        let uids = &sets.sets[set as usize];
        let enforce = s.mode == Mode::Enforce;
        for t in Transport::ALL {
            if !s.protocol.includes(t) {
                continue;
            }
            for pa in port_atoms_of(s, port_atoms) {
                for &aa in &atoms {
                    let cell = cells.entry((t, pa as u32, aa)).or_insert_with(|| Cell {
                        service: si as u32,
                        all: uids.clone(),
                        enforce: None,
                    });
                    cell.all.retain(|u| uids.binary_search(u).is_ok());
                    if enforce {
                        match &mut cell.enforce {
                            Some(e) => e.retain(|u| uids.binary_search(u).is_ok()),
                            None => cell.enforce = Some(uids.clone()),
                        }
                    }
                    if contains(&services[cell.service as usize], s) {
                        cell.service = si as u32;
                    }
                }
            }
        }
    }
    cells
        .into_iter()
        .map(|((transport, port_atom, addr_atom), cell)| BindDecision {
            transport,
            port_atom,
            addr_atom,
            service: cell.service,
            uid_set: sets.intern(&cell.all, &[]),
            enforce_set: cell.enforce.map(|e| sets.intern(&e, &[])),
        })
        .collect()
}

/// `outer` matches everything `inner` does (validation guarantees that of
/// any two services matching one attempt, one contains the other).
fn contains(outer: &PlanService, inner: &PlanService) -> bool {
    let proto = outer.protocol == inner.protocol || outer.protocol == Protocol::Any;
    let ports = outer.ports.first <= inner.ports.first && inner.ports.last <= outer.ports.last;
    let addrs = match (&outer.addresses, &inner.addresses) {
        (AddrSet::Loopback, _) => true,
        (AddrSet::Nets(_), AddrSet::Loopback) => false,
        (AddrSet::Nets(o), AddrSet::Nets(i)) => i.iter().all(|x| o.iter().any(|y| y.contains(x))),
    };
    proto && ports && addrs
}

/// The port intervals between service boundaries that some service covers.
fn port_atoms(services: &[PlanService]) -> Vec<PortRange> {
    let mut cuts: Vec<u32> = services
        .iter()
        .flat_map(|s| [u32::from(s.ports.first), u32::from(s.ports.last) + 1])
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    // Union of the ranges, to keep only covered intervals.
    let mut ranges: Vec<(u32, u32)> = services
        .iter()
        .map(|s| (u32::from(s.ports.first), u32::from(s.ports.last)))
        .collect();
    ranges.sort_unstable();
    let mut union: Vec<(u32, u32)> = Vec::new();
    for (a, b) in ranges {
        match union.last_mut() {
            Some(last) if a <= last.1 + 1 => last.1 = last.1.max(b),
            _ => union.push((a, b)),
        }
    }
    let covered = |p: u32| {
        let i = union.partition_point(|r| r.1 < p);
        union.get(i).is_some_and(|r| r.0 <= p)
    };
    cuts.windows(2)
        .filter(|w| covered(w[0]))
        .map(|w| PortRange {
            first: w[0] as u16,
            last: (w[1] - 1) as u16,
        })
        .collect()
}

impl Plan {
    /// [`Plan::id`] of this plan's content.
    fn content_id(&self) -> String {
        let mut h = Sha256::new();
        // Serializing into the hasher: a 10,000-service plan is megabytes.
        let _ = serde_json::to_writer(HashWriter(&mut h), self);
        let digest = h.finalize();
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// [`Plan::id`] as the number the eBPF slot config holds.
    pub fn id_number(&self) -> u64 {
        u64::from_str_radix(&self.id, 16).unwrap_or(0)
    }

    /// The port atom of `port`, 0 when no service covers it.
    pub fn port_atom(&self, port: u16) -> u32 {
        let i = self.port_atoms.partition_point(|a| a.last < port);
        match self.port_atoms.get(i) {
            Some(a) if a.first <= port => i as u32 + 1,
            _ => 0,
        }
    }

    /// The address atom of a destination: its most specific named prefix.
    pub fn addr_atom(&self, dest: &Destination) -> u32 {
        let Destination::Loopback(ip) = dest else {
            return 0;
        };
        self.nets
            .iter()
            .enumerate()
            .filter(|(_, n)| n.contains(ip))
            .max_by_key(|(_, n)| n.prefix_len())
            .map_or(0, |(i, _)| i as u32 + 1)
    }

    /// The service that decides attempts on `dest`, port `port`.
    pub fn service_for(
        &self,
        transport: Transport,
        dest: &Destination,
        port: u16,
    ) -> Option<usize> {
        let pa = self.port_atom(port);
        let aa = self.addr_atom(dest);
        self.decisions
            .iter()
            .find(|d| d.transport == transport && d.port_atom == pa && d.addr_atom == aa)
            .map(|d| d.service as usize)
    }

    /// The verdict the kernel gives, computed the way the eBPF programs do.
    pub fn evaluate(
        &self,
        uid: u32,
        transport: Transport,
        ip: IpAddr,
        port: u16,
        local: &LocalTable,
    ) -> Evaluation {
        let client = Client { uid, cgroup: None };
        self.evaluate_client(&client, transport, ip, port, local)
    }

    /// Why `client` is on set `set`'s list, if it is: its uid, or the
    /// listed cgroup it runs in or below.
    pub fn listed_by(&self, set: u32, client: &Client<'_>) -> Option<String> {
        if self.uid_sets[set as usize]
            .binary_search(&client.uid)
            .is_ok()
        {
            return Some(format!("uid {}", client.uid));
        }
        // Only entries the kernel holds an id for match: one that did not
        // exist when the plan was made matches nothing, as in the kernel.
        self.cgroup_entry(set, client)
            .filter(|c| c.id.is_some())
            .map(|c| format!("cgroup {}", c.path))
    }

    /// The listed cgroup of set `set` that `client` runs in or below, with
    /// an id or not.
    fn cgroup_entry(&self, set: u32, client: &Client<'_>) -> Option<&ResolvedCgroup> {
        let cgroup = client.cgroup?.as_str();
        self.cgroup_sets.get(set as usize)?.iter().find(|c| {
            let p = c.path.as_str();
            cgroup == p
                || cgroup
                    .strip_prefix(p)
                    .is_some_and(|rest| rest.starts_with('/'))
        })
    }

    /// [`Plan::evaluate`] for a process known by its uid and cgroup.
    pub fn evaluate_client(
        &self,
        client: &Client<'_>,
        transport: Transport,
        ip: IpAddr,
        port: u16,
        local: &LocalTable,
    ) -> Evaluation {
        let uid = client.uid;
        let Some(dest) = classify(ip, local) else {
            return Evaluation {
                action: Action::Allow,
                destination: None,
                service: None,
                reason: format!("{ip} is not an address of this host: outside loopguard's scope"),
            };
        };
        let service = self.service_for(transport, &dest, port);
        let (deny, mode, reason) = match service {
            None => (
                self.default == Verdict::Deny,
                self.mode,
                format!("no service matches; default is {}", self.default),
            ),
            Some(i) => {
                let s = &self.services[i];
                let by = self.listed_by(s.uid_set, client);
                let deny = by.is_some() != (s.list == ListKind::Allow);
                let mut why = match (s.list, by) {
                    (ListKind::Allow, Some(by)) => format!("{by} allowed"),
                    (ListKind::Allow, None) => format!("uid {uid} not allowed"),
                    (ListKind::Deny, Some(by)) => format!("{by} denied"),
                    (ListKind::Deny, None) => format!("uid {uid} not denied"),
                };
                if let Some(c) = self
                    .cgroup_entry(s.uid_set, client)
                    .filter(|c| c.id.is_none())
                {
                    why.push_str(&format!(
                        " (cgroup {} is listed but did not exist when the policy was applied: \
                         it counts once it does, and `loopguard run` follows it)",
                        c.path
                    ));
                }
                (deny, s.mode, format!("service {}: {why}", s.name))
            }
        };
        let action = match (deny, mode) {
            (false, _) => Action::Allow,
            (true, Mode::Audit) => Action::WouldDeny,
            (true, Mode::Enforce) => Action::Deny,
        };
        Evaluation {
            action,
            destination: Some(dest),
            service,
            reason,
        }
    }

    /// The verdict the bind hooks give a `bind()` of `ip:port` by `uid`,
    /// computed the way the eBPF programs do.
    pub fn evaluate_bind(
        &self,
        uid: u32,
        transport: Transport,
        ip: IpAddr,
        port: u16,
        local: &LocalTable,
    ) -> Evaluation {
        let allow = |destination, reason: String| Evaluation {
            action: Action::Allow,
            destination,
            service: None,
            reason,
        };
        if port == 0 {
            return allow(
                None,
                "port 0 asks for an ephemeral port: not guarded".into(),
            );
        }
        let wildcard = match ip {
            IpAddr::V4(v4) => v4.is_unspecified(),
            IpAddr::V6(v6) => {
                v6.is_unspecified() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_unspecified())
            }
        };
        // Every address but the wildcard is judged, local or not yet
        // (IP_FREEBIND binds an address before it is the host's).
        let (dest, addr_atom) = if wildcard {
            (None, BIND_WILDCARD_ATOM)
        } else {
            let d = classify(ip, local).unwrap_or(Destination::in_scope(ip));
            let atom = self.addr_atom(&d);
            (Some(d), atom)
        };
        let key = (transport, self.port_atom(port), addr_atom);
        let found = self
            .binds
            .binary_search_by(|b| (b.transport, b.port_atom, b.addr_atom).cmp(&key))
            .ok()
            .map(|i| &self.binds[i]);
        let Some(b) = found.filter(|_| key.1 != 0) else {
            return allow(dest, "no service guards binding here".into());
        };
        let s = &self.services[b.service as usize];
        let listed = |set: u32| self.uid_sets[set as usize].binary_search(&uid).is_ok();
        // An enforce-mode guard refuses; audit-mode ones only record.
        let action = if b.enforce_set.is_some_and(|e| !listed(e)) {
            Action::Deny
        } else if !listed(b.uid_set) {
            Action::WouldDeny
        } else {
            Action::Allow
        };
        let listed = action == Action::Allow;
        let why = if listed { "may bind" } else { "may not bind" };
        Evaluation {
            action,
            destination: dest,
            service: Some(b.service as usize),
            reason: format!("service {}: uid {why}", s.name),
        }
    }

    pub fn uid_count(&self) -> usize {
        let mut all: Vec<u32> = self.uid_sets.iter().flatten().copied().collect();
        all.sort_unstable();
        all.dedup();
        all.len()
    }
}

/// Plans built by hand, for other modules' tests.
#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    /// A plan with no service.
    pub(crate) fn empty_plan() -> Plan {
        Plan {
            hash: String::new(),
            id: "empty".into(),
            file: String::new(),
            default: Verdict::Allow,
            mode: Mode::Enforce,
            log_allowed: false,
            services: Vec::new(),
            uid_sets: Vec::new(),
            cgroup_sets: Vec::new(),
            port_atoms: Vec::new(),
            nets: Vec::new(),
            decisions: Vec::new(),
            binds: Vec::new(),
        }
    }

    /// A TCP allow-list service on loopback port 5432 with uid set `uid_set`.
    pub(crate) fn service(name: &str, uid_set: u32) -> PlanService {
        PlanService {
            name: name.into(),
            location: String::new(),
            ports: PortRange {
                first: 5432,
                last: 5432,
            },
            protocol: Protocol::Tcp,
            addresses: AddrSet::Loopback,
            list: ListKind::Allow,
            mode: Mode::Enforce,
            log_allowed: false,
            uid_set,
            bind_set: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{self, Directory, IdRef};

    /// The test directory: numeric ids only, group 7 is users 2 and 3, and
    /// one cgroup exists when `cgroup` names it (path, id).
    struct Fake {
        cgroup: Option<(&'static str, u64)>,
    }
    /// No cgroup exists.
    const NO_NAMES: Fake = Fake { cgroup: None };
    /// `system.slice/app.service` exists (id 42).
    const WITH_APP: Fake = Fake {
        cgroup: Some(("system.slice/app.service", 42)),
    };
    impl Directory for Fake {
        fn uid_of(&self, _: &str) -> Option<u32> {
            None
        }
        fn user_name(&self, _: u32) -> Option<String> {
            None
        }
        fn group_members(&self, g: &IdRef) -> Option<Vec<u32>> {
            match g {
                IdRef::Id(7) => Some(vec![2, 3]),
                _ => None,
            }
        }
        fn cgroup_id(&self, path: &CgroupPath) -> Option<u64> {
            self.cgroup
                .filter(|(p, _)| *p == path.as_str())
                .map(|(_, id)| id)
        }
    }

    fn plan_of(text: &str) -> (Policy, Plan) {
        let (p, diags) = policy::load("t.toml", text);
        assert!(diags.is_empty(), "{diags:?}");
        let p = p.expect("policy");
        let r = policy::resolve(&p, &NO_NAMES).expect("resolve");
        let plan = compile(&p, &r).expect("compile");
        (p, plan)
    }

    /// The reference semantics, straight from SPEC §2, without atoms.
    fn reference(
        p: &Policy,
        plan: &Plan,
        uid: u32,
        t: Transport,
        ip: IpAddr,
        port: u16,
        host: &LocalTable,
    ) -> Action {
        let Some(dest) = classify(ip, host) else {
            return Action::Allow;
        };
        let (deny, mode) = match p.deciding_service(t, &dest, port) {
            None => (p.default == Verdict::Deny, p.mode),
            Some(i) => {
                let s = &p.services[i];
                let listed = plan.uid_sets[plan.services[i].uid_set as usize].contains(&uid);
                (listed != (s.list == ListKind::Allow), s.mode)
            }
        };
        match (deny, mode) {
            (false, _) => Action::Allow,
            (true, Mode::Audit) => Action::WouldDeny,
            (true, Mode::Enforce) => Action::Deny,
        }
    }

    const POLICIES: &[&str] = &[
        r#"version = 1
[[service]]
name = "pg"
port = 5432
allow_users = [1, 0]
"#,
        r#"version = 1
default = "deny"
mode = "audit"
[[service]]
name = "all"
port = "1-65535"
protocol = "any"
deny_users = [4]
[[service]]
name = "web"
port = "8000-8099"
allow_users = [1]
mode = "enforce"
[[service]]
name = "web-one"
port = 8080
addresses = ["127.0.0.2", "::1"]
allow_groups = [7]
[[service]]
name = "dns"
port = 53
protocol = "udp"
addresses = ["127.0.0.53"]
allow_users = [0]
"#,
        r#"version = 1
[[service]]
name = "net16"
port = "9000-9100"
addresses = ["127.0.0.0/16"]
allow_users = [1]
[[service]]
name = "net24"
port = "9050-9060"
addresses = ["127.0.0.0/24", "::ffff:127.0.1.0/120"]
deny_users = [2]
[[service]]
name = "host"
port = 9055
addresses = ["127.0.0.1"]
protocol = "udp"
allow_users = [3]
[[service]]
name = "udp-wide"
port = "9000-9200"
protocol = "udp"
deny_users = [1]
"#,
    ];

    #[test]
    fn plan_agrees_with_the_reference_semantics() {
        let host = LocalTable::from_prefixes([
            (
                "192.0.2.1/32".parse().unwrap(),
                crate::scope::LocalKind::Local,
            ),
            (
                "2001:db8::1/128".parse().unwrap(),
                crate::scope::LocalKind::Local,
            ),
            (
                "10.66.0.0/16".parse().unwrap(),
                crate::scope::LocalKind::Local,
            ),
        ]);
        let ips: Vec<IpAddr> = [
            "127.0.0.1",
            "127.0.0.2",
            "127.0.0.53",
            "127.0.1.5",
            "127.1.0.1",
            "::1",
            "0.0.0.0",
            "::",
            "::ffff:127.0.0.2",
            "::ffff:0.0.0.0",
            "192.0.2.1",
            "2001:db8::1",
            "::ffff:192.0.2.1",
            "10.0.0.1",
            "10.66.3.4",
            "255.255.255.255",
            "224.0.0.1",
            "ff02::1",
            "::2",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let ports = [
            1, 52, 53, 54, 5431, 5432, 5433, 7999, 8000, 8080, 8099, 8100, 8999, 9000, 9049, 9050,
            9055, 9060, 9061, 9100, 9101, 9200, 9201, 65535,
        ];
        let mut checked = 0;
        for text in POLICIES {
            let (p, plan) = plan_of(text);
            for &ip in &ips {
                for &port in &ports {
                    for t in Transport::ALL {
                        for uid in 0..5 {
                            let got = plan.evaluate(uid, t, ip, port, &host).action;
                            let want = reference(&p, &plan, uid, t, ip, port, &host);
                            assert_eq!(got, want, "uid {uid} {ip} {port}/{t:?} in\n{text}");
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert!(checked > 10_000);
    }

    #[test]
    fn binds_agree_with_the_reference_semantics() {
        let text = r#"version = 1
[[service]]
name = "pg"
port = 5432
allow_users = [1]
bind_users = [2, 3]
[[service]]
name = "pg-two"
port = 5432
addresses = ["127.0.0.2"]
allow_users = [1]
bind_users = [3, 4]
mode = "audit"
[[service]]
name = "web"
port = "8000-8099"
protocol = "any"
deny_users = [9]
bind_groups = [7]
[[service]]
name = "web-one"
port = 8080
protocol = "udp"
addresses = ["127.0.0.3"]
deny_users = [9]
[[service]]
name = "open"
port = 9000
allow_users = [1]
"#;
        let (p, plan) = plan_of(text);
        let host = LocalTable::from_prefixes([(
            "192.0.2.1/32".parse().unwrap(),
            crate::scope::LocalKind::Local,
        )]);
        let ips: Vec<IpAddr> = [
            "127.0.0.1",
            "127.0.0.2",
            "127.0.0.3",
            "::1",
            "0.0.0.0",
            "::",
            "::ffff:0.0.0.0",
            "::ffff:127.0.0.2",
            "192.0.2.1",
            "10.1.1.1",
            "224.0.0.1",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let mut denied = 0;
        for &ip in &ips {
            let wildcard = ip.is_unspecified() || ip == "::ffff:0.0.0.0".parse::<IpAddr>().unwrap();
            for port in [0, 5431, 5432, 8000, 8080, 8099, 9000] {
                for t in Transport::ALL {
                    for uid in 0..10 {
                        // SPEC §2: every guarded service covering the bind
                        // must list the uid.
                        let dest = Some(classify(ip, &host).unwrap_or(Destination::in_scope(ip)));
                        let guards: Vec<usize> = (0..p.services.len())
                            .filter(|&i| {
                                let s = &p.services[i];
                                port != 0
                                    && s.bind.is_some()
                                    && s.protocol.includes(t)
                                    && s.ports.contains_port(port)
                                    && (wildcard
                                        || dest
                                            .as_ref()
                                            .is_some_and(|d| s.addresses.contains_addr(d)))
                            })
                            .collect();
                        let refusing: Vec<Mode> = guards
                            .iter()
                            .filter(|&&i| {
                                let set = plan.services[i].bind_set.expect("guarded") as usize;
                                !plan.uid_sets[set].contains(&uid)
                            })
                            .map(|&i| p.services[i].mode)
                            .collect();
                        // An enforce-mode guard refuses; audit-mode ones
                        // only record.
                        let want = if refusing.contains(&Mode::Enforce) {
                            Action::Deny
                        } else if refusing.is_empty() {
                            Action::Allow
                        } else {
                            Action::WouldDeny
                        };
                        let got = plan.evaluate_bind(uid, t, ip, port, &host);
                        assert_eq!(
                            got.action, want,
                            "uid {uid} bind {ip}:{port}/{t:?}: {}",
                            got.reason
                        );
                        denied += usize::from(want != Action::Allow);
                    }
                }
            }
        }
        assert!(denied > 100, "{denied}");
        // The audit-mode service decides its own cell only.
        let two: IpAddr = "127.0.0.2".parse().unwrap();
        let e = plan.evaluate_bind(2, Transport::Tcp, two, 5432, &host);
        assert_eq!(e.action, Action::WouldDeny, "{}", e.reason);
        let one: IpAddr = "127.0.0.1".parse().unwrap();
        let e = plan.evaluate_bind(4, Transport::Tcp, one, 5432, &host);
        assert_eq!(e.action, Action::Deny, "{}", e.reason);
        // An audit-mode guard on part of the port never weakens an
        // enforce-mode one: the wildcard listens on 127.0.0.1 too.
        let any: IpAddr = "0.0.0.0".parse().unwrap();
        let e = plan.evaluate_bind(5, Transport::Tcp, any, 5432, &host);
        assert_eq!(e.action, Action::Deny, "{}", e.reason);
        // A not-yet-local address (IP_FREEBIND) is judged too.
        let later: IpAddr = "10.9.9.9".parse().unwrap();
        let e = plan.evaluate_bind(5, Transport::Tcp, later, 5432, &host);
        assert_eq!(e.action, Action::Deny, "{}", e.reason);
    }

    #[test]
    fn atoms_and_interning() {
        let (_, plan) = plan_of(POLICIES[1]);
        // "all" covers everything, so the atoms tile 1..=65535.
        assert_eq!(plan.port_atoms.first().map(|a| a.first), Some(1));
        assert_eq!(plan.port_atoms.last().map(|a| a.last), Some(65535));
        assert!(plan
            .port_atoms
            .windows(2)
            .all(|w| w[0].last + 1 == w[1].first));
        assert_eq!(plan.port_atom(0), 0);
        assert_eq!(plan.nets.len(), 3, "127.0.0.2, 127.0.0.53, ::1");
        let (_, plan) = plan_of(
            "version = 1\n[[service]]\nname = \"a\"\nport = 1\nallow_users = [1, 2]\n[[service]]\nname = \"b\"\nport = 2\nallow_users = [2, 1, 2]\n",
        );
        assert_eq!(
            plan.uid_sets,
            vec![vec![1, 2]],
            "equal uid lists share one set"
        );
        assert_eq!(plan.port_atom(3), 0, "unguarded port");
    }

    #[test]
    fn cgroups_join_the_list_they_are_on() {
        let text = "version = 1\n\
            [[service]]\nname = \"a\"\nport = 1\nallow_users = [5]\nallow_cgroups = [\"/system.slice/app.service/\", \"later.slice\"]\n\
            [[service]]\nname = \"b\"\nport = 2\nallow_users = [5]\n\
            [[service]]\nname = \"c\"\nport = 3\ndeny_cgroups = [\"system.slice/app.service\"]\n";
        let (p, diags) = policy::load("t.toml", text);
        assert!(diags.is_empty(), "{diags:?}");
        let p = p.expect("policy");
        let r = policy::resolve(&p, &WITH_APP).expect("resolves");
        let plan = compile(&p, &r).expect("compiles");
        // Same uids, other cgroups: not one set.
        assert_ne!(plan.services[0].uid_set, plan.services[1].uid_set);
        let set = &plan.cgroup_sets[plan.services[0].uid_set as usize];
        let listed: Vec<(&str, Option<u64>)> =
            set.iter().map(|c| (c.path.as_str(), c.id)).collect();
        assert_eq!(
            listed,
            [
                ("later.slice", None),
                ("system.slice/app.service", Some(42))
            ]
        );
        let local = LocalTable::from_prefixes([]);
        let ip: IpAddr = "127.0.0.1".parse().expect("ip");
        let at = |uid, cgroup: Option<&str>, port| {
            let path = cgroup.map(|c| CgroupPath::new(c).expect("path"));
            let client = Client {
                uid,
                cgroup: path.as_ref(),
            };
            plan.evaluate_client(&client, Transport::Tcp, ip, port, &local)
        };
        let below = Some("system.slice/app.service/worker");
        assert_eq!(at(9, below, 1).action, Action::Allow, "a child cgroup");
        assert_eq!(
            at(9, Some("later.slice"), 1).action,
            Action::Deny,
            "absent when resolved: matches nothing, as in the kernel"
        );
        assert!(at(9, Some("later.slice"), 1)
            .reason
            .contains("cgroup later.slice is listed but did not exist"));
        assert_eq!(
            at(9, Some("system.slice/app.service"), 1).action,
            Action::Allow
        );
        assert_eq!(
            at(9, Some("system.slice/app.serviceX"), 1).action,
            Action::Deny
        );
        assert_eq!(at(9, None, 1).action, Action::Deny);
        assert_eq!(at(5, None, 1).action, Action::Allow);
        assert_eq!(at(9, below, 2).action, Action::Deny, "b lists no cgroup");
        assert_eq!(at(9, below, 3).action, Action::Deny, "on c's deny-list");
        assert_eq!(at(9, None, 3).action, Action::Allow);
        assert!(at(9, below, 1)
            .reason
            .contains("cgroup system.slice/app.service allowed"));
        // The ids are part of what is enforced, and the dry-run says so.
        let r2 = policy::resolve(&p, &NO_NAMES).expect("resolves");
        let absent = compile(&p, &r2).expect("compiles");
        assert_ne!(absent.id, plan.id);
        let said = crate::change::describe(Some(&absent), &plan).join("\n");
        assert!(
            said.contains("+cgroup system.slice/app.service (id 42) -cgroup system.slice/app.service (absent)"),
            "{said}"
        );
    }

    #[test]
    fn cgroup_paths_are_checked() {
        for (bad, why) in [
            ("", "root"),
            ("/", "root"),
            ("a//b", "empty part"),
            ("a/../b", ".."),
            ("./a", "."),
            ("0::/system.slice/x.service", "a /proc/PID/cgroup line"),
            ("a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p/q", "17 levels"),
        ] {
            assert!(CgroupPath::new(bad).is_err(), "{bad:?} ({why})");
            let text = format!(
                "version = 1\n[[service]]\nname = \"a\"\nport = 1\nallow_cgroups = [{bad:?}]\n"
            );
            let (_, diags) = policy::load("t.toml", text.as_str());
            assert!(
                diags.iter().any(|d| d.code == crate::diag::Code::Cgroup),
                "{bad:?}: {diags:?}"
            );
        }
        let p = CgroupPath::new("/a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p/").expect("16 levels");
        assert_eq!((p.as_str().len(), p.level()), (31, 16));
        let text =
            "version = 1\n[[service]]\nname = \"a\"\nport = 1\nallow_units = [\"grafana\"]\n";
        let (_, diags) = policy::load("t.toml", text);
        assert!(diags
            .iter()
            .any(|d| d.code == crate::diag::Code::Unit && d.is_error()));
        let text = "version = 1\n[[service]]\nname = \"a\"\nport = 1\nallow_users = [1]\ndeny_cgroups = [\"x\"]\n";
        let (_, diags) = policy::load("t.toml", text);
        assert!(diags.iter().any(|d| d.code == crate::diag::Code::BothLists));
    }

    #[test]
    fn hash_is_of_the_file() {
        let (_, plan) = plan_of(POLICIES[0]);
        assert_eq!(plan.hash, source_hash(POLICIES[0]));
        assert!(plan.hash.starts_with("sha256:") && plan.hash.len() == 7 + 64);
    }
}
