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
use loopguard_common::{MAX_DECISIONS, MAX_NETS, MAX_SERVICES, MAX_UID_ENTRIES};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::policy::{
    classify, AddrSet, Destination, ListKind, Mode, Policy, PortRange, Protocol, Resolved,
    Transport, Verdict,
};

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
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub transport: Transport,
    pub port_atom: u32,
    pub addr_atom: u32,
    pub service: u32,
}

/// The compiled policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// `sha256:<hex>` of the policy file's bytes.
    pub hash: String,
    pub file: String,
    pub default: Verdict,
    pub mode: Mode,
    pub log_allowed: bool,
    pub services: Vec<PlanService>,
    /// Sorted uid lists.
    pub uid_sets: Vec<Vec<u32>>,
    /// Atom `i + 1` is `port_atoms[i]`; sorted, disjoint.
    pub port_atoms: Vec<PortRange>,
    /// Atom `i + 1` is `nets[i]`.
    pub nets: Vec<IpNet>,
    pub decisions: Vec<Decision>,
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

pub fn source_hash(source: &str) -> String {
    format!("sha256:{:x}", Sha256::digest(source.as_bytes()))
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

    let mut uid_sets: Vec<Vec<u32>> = Vec::new();
    let mut interned: HashMap<&[u32], u32> = HashMap::new();
    let mut services = Vec::with_capacity(policy.services.len());
    for (s, r) in policy.services.iter().zip(&resolved.services) {
        let uid_set = *interned.entry(&r.uids[..]).or_insert_with(|| {
            uid_sets.push(r.uids.clone());
            (uid_sets.len() - 1) as u32
        });
        services.push(PlanService {
            name: s.name.clone(),
            location: policy.location(&s.name_span),
            ports: s.ports,
            protocol: s.protocol,
            addresses: s.addresses.clone(),
            list: s.list,
            mode: s.mode,
            log_allowed: s.log_allowed,
            uid_set,
        });
    }
    too_large(
        "uid entries",
        uid_sets.iter().map(Vec::len).sum(),
        MAX_UID_ENTRIES,
    )?;

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

    let mut table: HashMap<(Transport, u32, u32), u32> = HashMap::new();
    for (si, s) in services.iter().enumerate() {
        let first_atom = port_atoms.partition_point(|a| a.last < s.ports.first);
        let pas = port_atoms[first_atom..]
            .iter()
            .take_while(|a| a.first <= s.ports.last)
            .count();
        let aas: Vec<u32> = match &s.addresses {
            AddrSet::Loopback => (0..=nets.len() as u32).collect(),
            AddrSet::Nets(own) => nets
                .iter()
                .enumerate()
                .filter(|(_, n)| own.iter().any(|o| o.contains(*n)))
                .map(|(i, _)| i as u32 + 1)
                .collect(),
        };
        for t in Transport::ALL {
            if !s.protocol.includes(t) {
                continue;
            }
            for pa in first_atom..first_atom + pas {
                for &aa in &aas {
                    let key = (t, pa as u32 + 1, aa);
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

    Ok(Plan {
        hash: source_hash(&policy.source),
        file: policy.file.clone(),
        default: policy.default,
        mode: policy.mode,
        log_allowed: policy.log_allowed,
        services,
        uid_sets,
        port_atoms,
        nets,
        decisions,
    })
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

    /// The verdict the kernel gives, computed the way the eBPF programs do.
    pub fn evaluate(
        &self,
        uid: u32,
        transport: Transport,
        ip: IpAddr,
        port: u16,
        host_addrs: &[IpAddr],
    ) -> Evaluation {
        let Some(dest) = classify(ip, host_addrs) else {
            return Evaluation {
                action: Action::Allow,
                destination: None,
                service: None,
                reason: format!("{ip} is not an address of this host: outside loopguard's scope"),
            };
        };
        let pa = self.port_atom(port);
        let aa = self.addr_atom(&dest);
        let service = self
            .decisions
            .iter()
            .find(|d| d.transport == transport && d.port_atom == pa && d.addr_atom == aa)
            .map(|d| d.service as usize);
        let (deny, mode, reason) = match service {
            None => (
                self.default == Verdict::Deny,
                self.mode,
                format!("no service matches; default is {:?}", self.default).to_lowercase(),
            ),
            Some(i) => {
                let s = &self.services[i];
                let listed = self.uid_sets[s.uid_set as usize].binary_search(&uid).is_ok();
                let deny = listed != (s.list == ListKind::Allow);
                let why = match (s.list, listed) {
                    (ListKind::Allow, true) => "uid allowed",
                    (ListKind::Allow, false) => "uid not allowed",
                    (ListKind::Deny, true) => "uid denied",
                    (ListKind::Deny, false) => "uid not denied",
                };
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

    pub fn uid_count(&self) -> usize {
        let mut all: Vec<u32> = self.uid_sets.iter().flatten().copied().collect();
        all.sort_unstable();
        all.dedup();
        all.len()
    }
}
