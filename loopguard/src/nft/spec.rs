//! What a plan puts in the table, as pure data: address regions, atoms,
//! content-named uid sets and verdict chains. No I/O.

#[allow(unused_imports, reason = "the layer's common imports")]
use super::*;

pub(super) fn proto(t: Transport) -> &'static str {
    t.as_str()
}

/// The IPv4 and IPv6 ranges of one address atom.
pub(super) type Region = (Vec<(Ipv4Addr, Ipv4Addr)>, Vec<(Ipv6Addr, Ipv6Addr)>);

/// Disjoint address ranges of every address atom: atom 0 is the loopback
/// range outside every named prefix; atom `i + 1` is `plan.nets[i]` minus
/// the named prefixes inside it.
pub(super) fn address_regions(nets: &[IpNet]) -> BTreeMap<u32, Region> {
    let mut regions: BTreeMap<u32, Region> = BTreeMap::new();
    // IPv4: cut 127.0.0.0/8 at every prefix boundary.
    let lo = u32::from(Ipv4Addr::new(127, 0, 0, 0));
    let hi = u32::from(Ipv4Addr::new(127, 255, 255, 255));
    let v4: Vec<(usize, u32, u32)> = nets
        .iter()
        .enumerate()
        .filter_map(|(i, n)| match n {
            IpNet::V4(n) => Some((i, u32::from(n.network()), u32::from(n.broadcast()))),
            IpNet::V6(_) => None,
        })
        .collect();
    let mut cuts: Vec<u64> = vec![u64::from(lo), u64::from(hi) + 1];
    for (_, a, b) in &v4 {
        cuts.push(u64::from(*a));
        cuts.push(u64::from(*b) + 1);
    }
    cuts.sort_unstable();
    cuts.dedup();
    for w in cuts.windows(2) {
        let (start, end) = (w[0] as u32, (w[1] - 1) as u32);
        // The most specific prefix holding this piece decides its atom.
        let atom = v4
            .iter()
            .filter(|(_, a, b)| *a <= start && end <= *b)
            .max_by_key(|(_, a, b)| std::cmp::Reverse(b - a))
            .map_or(0, |(i, _, _)| *i as u32 + 1);
        let list = &mut regions.entry(atom).or_default().0;
        match list.last_mut() {
            Some(last) if u32::from(last.1) + 1 == start => last.1 = Ipv4Addr::from(end),
            _ => list.push((Ipv4Addr::from(start), Ipv4Addr::from(end))),
        }
    }
    // IPv6: only ::1 is in the loopback range.
    let v6_atom = nets
        .iter()
        .position(|n| matches!(n, IpNet::V6(_)))
        .map_or(0, |i| i as u32 + 1);
    regions
        .entry(v6_atom)
        .or_default()
        .1
        .push((Ipv6Addr::LOCALHOST, Ipv6Addr::LOCALHOST));
    regions
}

/// Version of the table's layout. A table of another layout (an older
/// loopguard) is replaced whole, never updated in place.
pub const LAYOUT: u32 = 9;

/// A key of a verdict map or refusal set: one port (the exact-match
/// `port` family), or intervals.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum ElemKey {
    Port(u16),
    Ports(u16, u16),
    V4(Ipv4Addr, Ipv4Addr, u16, u16),
    V6(Ipv6Addr, Ipv6Addr, u16, u16),
}

impl ElemKey {
    /// The key as nft JSON, written straight into the batch text (tens of
    /// thousands of elements as `serde_json::Value`s would be the largest
    /// allocation of a 10,000-service apply). Only numbers and addresses:
    /// nothing to escape.
    pub(super) fn write_json(self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = match self {
            ElemKey::Port(a) => write!(out, "{a}"),
            ElemKey::Ports(a, b) => write!(out, r#"{{"range":[{a},{b}]}}"#),
            ElemKey::V4(a, b, p, q) => write!(
                out,
                r#"{{"concat":[{{"range":["{a}","{b}"]}},{{"range":[{p},{q}]}}]}}"#
            ),
            ElemKey::V6(a, b, p, q) => write!(
                out,
                r#"{{"concat":[{{"range":["{a}","{b}"]}},{{"range":[{p},{q}]}}]}}"#
            ),
        };
    }
}

/// Everything in the table that depends on the plan, by name, so two
/// plans can be compared object by object.
///
/// Services with the same uids, list kind and mode share one verdict chain
/// (`v_<hash>`) checking one uid set (`u_<hash>`); both are named after
/// their content, so an unchanged one keeps its name from plan to plan.
pub(super) struct Spec {
    /// uid set name -> uids.
    pub(super) uid_sets: BTreeMap<String, Vec<u32>>,
    /// verdict chain name -> (uid set name, list, mode).
    pub(super) chains: BTreeMap<String, (String, ListKind, Mode)>,
    /// `dec*` map -> key -> verdict chain.
    pub(super) maps: BTreeMap<String, BTreeMap<ElemKey, Rc<str>>>,
    /// `ref*` set -> key -> service name (the element's comment).
    pub(super) refusals: BTreeMap<String, BTreeMap<ElemKey, Rc<str>>>,
    /// Whether named addresses exist (which maps the base chain uses).
    pub(super) nets: bool,
    pub(super) default: Verdict,
    pub(super) mode: Mode,
}

/// Map and set families, per transport: `4`, `6` (concatenated address .
/// port intervals), `port` (one port: a hash) and `host` (port ranges).
///
/// Single ports, most of a policy, are kept out of the interval sets: nft
/// 1.0.6 reads every element of every non-concatenated interval set in the
/// table before it changes any element (its cache), which made a
/// one-service re-apply at 10,000 services cost ~0.2 s in nft alone.
pub(super) fn families() -> impl Iterator<Item = String> {
    Transport::ALL
        .into_iter()
        .flat_map(|t| FAMILIES.map(move |f| format!("{f}_{}", proto(t))))
}

const FAMILIES: [&str; 4] = ["4", "6", "port", "host"];

/// Whether a family's sets hold intervals (all but `port`).
pub(super) fn is_interval(family: &str) -> bool {
    !family.starts_with("port")
}

/// `<prefix>_<16 hex digits>`: the start of the SHA-256 of `bytes`. Names
/// are persisted (in the table, compared by the next apply), so the hash
/// is a specified one, over an explicit encoding, never std's `Hash`.
pub(super) fn content_name(prefix: &str, bytes: &[u8]) -> String {
    use sha2::{Digest as _, Sha256};
    let digest = Sha256::digest(bytes);
    let mut name = String::with_capacity(prefix.len() + 17);
    name.push_str(prefix);
    name.push('_');
    for b in &digest[..8] {
        name.push_str(&format!("{b:02x}"));
    }
    name
}

/// A uid set's name: its sorted uids, little-endian.
pub(super) fn uid_set_name(uids: &[u32]) -> String {
    let bytes: Vec<u8> = uids.iter().flat_map(|u| u.to_le_bytes()).collect();
    content_name("u", &bytes)
}

/// A verdict chain's name: its uid set's name, list kind and mode.
pub(super) fn verdict_chain_name(set: &str, list: ListKind, mode: Mode) -> String {
    let list = match list {
        ListKind::Allow => "allow",
        ListKind::Deny => "deny",
    };
    let mode = match mode {
        Mode::Enforce => "enforce",
        Mode::Audit => "audit",
    };
    content_name("v", format!("{set}\0{list}\0{mode}").as_bytes())
}

impl Spec {
    pub(super) fn of(plan: &Plan) -> Spec {
        let mut uid_sets = BTreeMap::new();
        let set_names: Vec<String> = plan
            .uid_sets
            .iter()
            .map(|uids| {
                let name = uid_set_name(uids);
                uid_sets.insert(name.clone(), uids.clone());
                name
            })
            .collect();
        let mut chains = BTreeMap::new();
        let mut class_names: HashMap<(u32, ListKind, Mode), Rc<str>> = HashMap::new();
        // nft cannot match a socket's cgroup through the JSON API of the
        // nft this targets (Debian 12's 1.0.6 has no `socket cgroupv2`
        // there), so an allow-list naming a cgroup that exists is, for
        // this layer, a deny-list of nobody: it never refuses what the
        // eBPF layer admits by cgroup. A deny-list is judged by its uids.
        // The engine enforces such a policy only with the eBPF layer.
        let nobody = uid_set_name(&[]);
        let judged_by_cgroup = |s: &crate::compile::PlanService| {
            s.list == ListKind::Allow
                && plan
                    .cgroup_sets
                    .get(s.uid_set as usize)
                    .is_some_and(|c| c.iter().any(|c| c.id.is_some()))
        };
        let chain_of: Vec<Rc<str>> = plan
            .services
            .iter()
            .map(|s| {
                let (set_index, list) = if judged_by_cgroup(s) {
                    (u32::MAX, ListKind::Deny)
                } else {
                    (s.uid_set, s.list)
                };
                class_names
                    .entry((set_index, list, s.mode))
                    .or_insert_with(|| {
                        let set = match set_names.get(set_index as usize) {
                            Some(set) => set.clone(),
                            None => {
                                uid_sets.insert(nobody.clone(), Vec::new());
                                nobody.clone()
                            }
                        };
                        let name = verdict_chain_name(&set, list, s.mode);
                        chains.insert(name.clone(), (set, list, s.mode));
                        name.into()
                    })
                    .clone()
            })
            .collect();
        let service_names: Vec<Rc<str>> = plan
            .services
            .iter()
            .map(|s| s.name.as_str().into())
            .collect();
        let mut maps: BTreeMap<String, BTreeMap<ElemKey, Rc<str>>> =
            families().map(|f| (f, BTreeMap::new())).collect();
        let mut refusals = maps.clone();
        let regions = address_regions(&plan.nets);
        for d in &plan.decisions {
            let Some(ports) = plan.port_atoms.get((d.port_atom as usize).wrapping_sub(1)) else {
                continue;
            };
            let (p, q) = (ports.first, ports.last);
            let service = d.service as usize;
            let mut keys = Vec::new();
            if let Some((v4, v6)) = regions.get(&d.addr_atom).filter(|_| !plan.nets.is_empty()) {
                keys.extend(v4.iter().map(|(a, b)| ("4", ElemKey::V4(*a, *b, p, q))));
                keys.extend(v6.iter().map(|(a, b)| ("6", ElemKey::V6(*a, *b, p, q))));
            }
            if d.addr_atom == 0 {
                keys.push(if p == q {
                    ("port", ElemKey::Port(p))
                } else {
                    ("host", ElemKey::Ports(p, q))
                });
            }
            for (family, key) in keys {
                let name = format!("{family}_{}", proto(d.transport));
                maps.entry(name.clone())
                    .or_default()
                    .insert(key, chain_of[service].clone());
                refusals
                    .entry(name)
                    .or_default()
                    .insert(key, service_names[service].clone());
            }
        }
        Spec {
            uid_sets,
            chains,
            maps,
            refusals,
            nets: !plan.nets.is_empty(),
            default: plan.default,
            mode: plan.mode,
        }
    }
}
