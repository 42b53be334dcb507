//! The nftables layer: the same compiled plan, enforced per packet on `lo`.
//!
//! One table `inet <instance>` in the applying network namespace. Its base
//! chain hooks `output` and judges only TCP SYNs (new connections) and UDP
//! datagrams, and only destinations the kernel itself delivers to this
//! host: whatever leaves on `lo`, and on other interfaces what its fib
//! lookup calls local, broadcast, anycast or multicast (asked per packet,
//! so nothing needs copying when addresses change):
//!
//! ```text
//! output:        tcp flags & (syn | ack) != syn accept   # established: no lookup, no conntrack
//!                oif "lo" meta l4proto vmap { tcp : jump dispatch_tcp, udp : jump dispatch_udp }
//!                fib daddr type != { local, broadcast, anycast, multicast } accept
//!                meta l4proto vmap { tcp : jump dispatch_tcp, udp : jump dispatch_udp }
//! dispatch_tcp:  th dport vmap @dechost_tcp
//!                (the default for the rest of the scope)
//! dispatch_udp:  the same, for udp
//! ```
//!
//! (With named addresses, `ip daddr 127.0.0.0/8` and `ip6 daddr ::1` are
//! looked up in `dec4_*` / `dec6_*` first, keyed on address . port.) The
//! verdict maps are interval maps keyed on
//! disjoint (address range, port range) atoms per transport, so one lookup
//! finds the deciding service whatever the policy size. Services with the
//! same uids, list kind and mode share one verdict chain checking `meta
//! skuid` against one uid set; both are named after their content
//! (`v_<hash>`, `u_<hash>`), so the table holds as many chains as the policy
//! has distinct uid lists, and a re-apply can tell what changed. A refusal
//! looks its key up once more in a set of the same atoms (`ref*`) whose
//! elements count and name their service (comment), so per-service counts
//! survive the sharing. A refused TCP SYN is answered with a reset (the
//! client fails fast with ECONNREFUSED); a refused datagram is dropped
//! (sendto fails with EPERM). Connection tracking is never used.
//!
//! [`ruleset`] builds the whole table (add, delete, add: atomic); [`update`]
//! turns the previous plan's table into the new one in one transaction.
//! The `nftables` crate runs `nft -j -f -` with the batch, written as JSON
//! text (its typed schema has no `uid` set type).

use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, Ipv6Addr},
    rc::Rc,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{
    compile::Plan,
    policy::{ListKind, Mode, Transport, Verdict},
};

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("nft refused the ruleset")]
    Rejected(#[source] nftables::helper::NftablesError),
    #[error("failed to read table inet {table}")]
    List {
        table: String,
        #[source]
        source: nftables::helper::NftablesError,
    },
    #[error("nft printed JSON loopguard cannot read")]
    Json(#[source] serde_json::Error),
}

impl NftError {
    /// nft's own words, for `--verbose`.
    pub fn detail(&self) -> Option<String> {
        match self {
            NftError::Rejected(nftables::helper::NftablesError::NftFailed { stderr, .. })
            | NftError::List {
                source: nftables::helper::NftablesError::NftFailed { stderr, .. },
                ..
            } => Some(stderr.clone()),
            _ => None,
        }
    }
}

const NO_ARGS: &[&str] = &[];

fn nft(payload: &str, extra: &[&str]) -> Result<String, nftables::helper::NftablesError> {
    nftables::helper::apply_ruleset_raw(
        payload,
        nftables::helper::DEFAULT_NFT,
        extra.iter().copied(),
    )
}

/// The NFLOG prefix of the nftables layer's log rules,
/// `lg/<table>/<verdict chain|default>/<d|w>`: written here, parsed by
/// [`crate::audit`]. (Services share verdict chains, so the prefix says
/// only which chain refused; the packet's destination names the
/// service.)
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogPrefix {
    pub table: String,
    pub bucket: PrefixBucket,
    /// An audit-mode refusal (the packet went through).
    pub would_deny: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PrefixBucket {
    /// A service's verdict chain (shared by services of one uid set, list
    /// kind and mode).
    Chain(String),
    Default,
}

impl LogPrefix {
    const START: &'static str = "lg/";

    pub fn parse(text: &str) -> Option<LogPrefix> {
        let rest = text.strip_prefix(Self::START)?;
        let (table, rest) = rest.split_once('/')?;
        let (bucket, action) = rest.split_once('/')?;
        let bucket = match bucket {
            "default" => PrefixBucket::Default,
            "" => return None,
            chain => PrefixBucket::Chain(chain.to_string()),
        };
        let would_deny = match action {
            "w" => true,
            "d" => false,
            _ => return None,
        };
        Some(LogPrefix {
            table: table.to_string(),
            bucket,
            would_deny,
        })
    }
}

impl std::fmt::Display for LogPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bucket = match &self.bucket {
            PrefixBucket::Chain(chain) => chain.as_str(),
            PrefixBucket::Default => "default",
        };
        let action = if self.would_deny { "w" } else { "d" };
        write!(f, "{}{}/{bucket}/{action}", Self::START, self.table)
    }
}

/// The NFLOG group of an instance: stable, in 20000..60000, derived from
/// its name (FNV-1a) so instances side by side rarely share one (and the
/// prefix tells them apart when they do).
pub fn log_group(table: &str) -> u16 {
    let mut h: u32 = 0x811c_9dc5;
    for b in table.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    20_000 + (h % 40_000) as u16
}

/// The named counters of the default's verdicts.
const DEFAULT_ALLOW_COUNTER: &str = "default_allow";
const DEFAULT_DENY_COUNTER: &str = "default_deny";

fn proto(t: Transport) -> &'static str {
    t.as_str()
}

/// The IPv4 and IPv6 ranges of one address atom.
type Region = (Vec<(Ipv4Addr, Ipv4Addr)>, Vec<(Ipv6Addr, Ipv6Addr)>);

/// Disjoint address ranges of every address atom: atom 0 is the loopback
/// range outside every named prefix; atom `i + 1` is `plan.nets[i]` minus
/// the named prefixes inside it.
fn address_regions(nets: &[IpNet]) -> BTreeMap<u32, Region> {
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
pub const LAYOUT: u32 = 8;

/// An interval key of a verdict map or refusal set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum ElemKey {
    Ports(u16, u16),
    V4(Ipv4Addr, Ipv4Addr, u16, u16),
    V6(Ipv6Addr, Ipv6Addr, u16, u16),
}

impl ElemKey {
    /// The key as nft JSON, written straight into the batch text (tens of
    /// thousands of elements as `serde_json::Value`s would be the largest
    /// allocation of a 10,000-service apply). Only numbers and addresses:
    /// nothing to escape.
    fn write_json(self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = match self {
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
struct Spec {
    /// uid set name -> uids.
    uid_sets: BTreeMap<String, Vec<u32>>,
    /// verdict chain name -> (uid set name, list, mode).
    chains: BTreeMap<String, (String, ListKind, Mode)>,
    /// `dec*` map -> key -> verdict chain.
    maps: BTreeMap<String, BTreeMap<ElemKey, Rc<str>>>,
    /// `ref*` set -> key -> service name (the element's comment).
    refusals: BTreeMap<String, BTreeMap<ElemKey, Rc<str>>>,
    /// Whether named addresses exist (which maps the base chain uses).
    nets: bool,
    default: Verdict,
    mode: Mode,
}

/// Map and set families: `4`, `6` (concatenated address . port keys) and
/// `host` (port keys), per transport.
fn families() -> impl Iterator<Item = String> {
    Transport::ALL
        .into_iter()
        .flat_map(|t| ["4", "6", "host"].map(move |f| format!("{f}_{}", proto(t))))
}

/// `<prefix>_<16 hex digits>`: the start of the SHA-256 of `bytes`. Names
/// are persisted (in the table, compared by the next apply), so the hash
/// is a specified one, over an explicit encoding, never std's `Hash`.
fn content_name(prefix: &str, bytes: &[u8]) -> String {
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
fn uid_set_name(uids: &[u32]) -> String {
    let bytes: Vec<u8> = uids.iter().flat_map(|u| u.to_le_bytes()).collect();
    content_name("u", &bytes)
}

/// A verdict chain's name: its uid set's name, list kind and mode.
fn verdict_chain_name(set: &str, list: ListKind, mode: Mode) -> String {
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
    fn of(plan: &Plan) -> Spec {
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
        let chain_of: Vec<Rc<str>> = plan
            .services
            .iter()
            .map(|s| {
                class_names
                    .entry((s.uid_set, s.list, s.mode))
                    .or_insert_with(|| {
                        let set = set_names[s.uid_set as usize].clone();
                        let name = verdict_chain_name(&set, s.list, s.mode);
                        chains.insert(name.clone(), (set, s.list, s.mode));
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
                keys.push(("host", ElemKey::Ports(p, q)));
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

/// Builds batch commands for one table, each as JSON text.
struct Batch<'t> {
    table: &'t str,
    cmds: Vec<String>,
}

impl Batch<'_> {
    fn obj(&self, mut obj: Value) -> Value {
        obj["family"] = json!("inet");
        obj["table"] = json!(self.table);
        obj
    }

    fn push(&mut self, verb: &str, kind: &str, obj: Value) {
        let obj = self.obj(obj);
        self.cmds.push(json!({verb: {kind: obj}}).to_string());
    }

    fn rule(&mut self, chain: &str, expr: Vec<Value>) {
        self.push("add", "rule", json!({"chain": chain, "expr": expr}));
    }

    fn uid_set(&mut self, name: &str, uids: &[u32]) {
        let mut set = json!({"name": name, "type": "uid"});
        if !uids.is_empty() {
            set["elem"] = json!(uids);
        }
        self.push("add", "set", set);
    }

    /// A verdict chain: the listed uids pass (allow-list) or are refused
    /// (deny-list). Every refusal (and would-deny) is also sent to the
    /// instance's NFLOG group, where `loopguard run` turns it into an
    /// audit event; with no listener the kernel discards it.
    fn verdict_chain(&mut self, name: &str, set: &str, list: ListKind, mode: Mode) {
        self.push("add", "chain", json!({"name": name}));
        let op = match list {
            ListKind::Allow => "==",
            ListKind::Deny => "!=",
        };
        self.rule(
            name,
            vec![
                json!({"match": {"op": op, "left": {"meta": {"key": "skuid"}}, "right": format!("@{set}")}}),
                json!({"accept": null}),
            ],
        );
        // A jump returns to the next rule, so the count is a rule of its own.
        self.rule(name, vec![json!({"jump": {"target": COUNT_CHAIN}})]);
        for e in deny_exprs(self.table, mode, name, None) {
            self.rule(name, e);
        }
    }

    /// `{"<verb>": {"element": {..., "elem": [<elems>]}}}`, with the
    /// elements written by `write`.
    fn elements<T>(&mut self, verb: &str, set: &str, elems: &[T], write: impl Fn(&T, &mut String)) {
        if elems.is_empty() {
            return;
        }
        let head = json!({"family": "inet", "table": self.table, "name": set}).to_string();
        let mut cmd = format!(r#"{{"{verb}":{{"element":{}"#, &head[..head.len() - 1]);
        cmd.push_str(r#","elem":["#);
        for (i, e) in elems.iter().enumerate() {
            if i > 0 {
                cmd.push(',');
            }
            write(e, &mut cmd);
        }
        cmd.push_str("]}}}");
        self.cmds.push(cmd);
    }

    fn map_elems(&mut self, verb: &str, map: &str, elems: &[(ElemKey, &str)]) {
        let delete = verb == "delete";
        self.elements(verb, &format!("dec{map}"), elems, |(k, chain), out| {
            if delete {
                k.write_json(out);
            } else {
                out.push('[');
                k.write_json(out);
                out.push_str(r#",{"jump":{"target":"#);
                out.push_str(&json!(chain).to_string());
                out.push_str("}}]");
            }
        });
    }

    fn refusal_elems(&mut self, verb: &str, set: &str, elems: &[(ElemKey, &str)]) {
        let delete = verb == "delete";
        self.elements(verb, &format!("ref{set}"), elems, |(k, service), out| {
            if delete {
                k.write_json(out);
            } else {
                out.push_str(r#"{"elem":{"val":"#);
                k.write_json(out);
                out.push_str(r#","comment":"#);
                out.push_str(&json!(service).to_string());
                out.push_str("}}");
            }
        });
    }

    /// The rules of the base chain and of the refusal-counting chain,
    /// which depend only on the plan's default, mode and whether it names
    /// addresses.
    fn dispatch_rules(&mut self, spec: &Spec) {
        // The lookups, one per transport: (address match, map family).
        // Without named addresses every in-scope destination is address
        // atom 0, so the port alone decides (a one-field rbtree lookup);
        // with them, the loopback range is looked up by address . port
        // first (pipapo) and the rest of the scope by port.
        let mut scopes: Vec<(Option<Value>, &str)> = Vec::new();
        if spec.nets {
            scopes.push((
                Some(daddr(
                    "ip",
                    json!({"prefix": {"addr": "127.0.0.0", "len": 8}}),
                )),
                "4",
            ));
            scopes.push((Some(daddr("ip6", json!("::1"))), "6"));
        }
        scopes.push((None, "host"));
        let l4proto = |t: Transport| json!({"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": proto(t)}});
        let lookup_key = |map: &str| match map {
            "4" => {
                json!({"concat": [{"payload": {"protocol": "ip", "field": "daddr"}}, {"payload": {"protocol": "th", "field": "dport"}}]})
            }
            "6" => {
                json!({"concat": [{"payload": {"protocol": "ip6", "field": "daddr"}}, {"payload": {"protocol": "th", "field": "dport"}}]})
            }
            _ => json!({"payload": {"protocol": "th", "field": "dport"}}),
        };
        // Refusals are counted per service by a second lookup of the same
        // key, on the refusal path only, in sets whose elements carry
        // their own counters (and the service in their comment). A
        // loopback-range match returns, so no refusal counts twice.
        for t in Transport::ALL {
            for (addr, map) in &scopes {
                let mut e = vec![l4proto(t)];
                e.extend(addr.clone());
                e.push(json!({"match": {"op": "==", "left": lookup_key(map), "right": format!("@ref{map}_{}", proto(t))}}));
                if addr.is_some() {
                    e.push(json!({"return": null}));
                }
                self.rule(COUNT_CHAIN, e);
            }
        }

        // The base chain lets established TCP go at its first rule (most
        // packets: one comparison, no lookup, no connection tracking),
        // then everything the kernel does not deliver to this host (one
        // fib lookup per SYN or datagram), and sends new TCP connections
        // and UDP to a chain of their own (one lookup, not a walk past the
        // other protocol's rules).
        self.rule(
            BASE_CHAIN,
            vec![
                json!({"match": {"op": "!=", "left": {"&": [{"payload": {"protocol": "tcp", "field": "flags"}}, ["syn", "ack"]]}, "right": "syn"}}),
                json!({"accept": null}),
            ],
        );
        let jumps: Vec<Value> = Transport::ALL
            .iter()
            .map(|t| json!([proto(*t), {"jump": {"target": dispatch_chain(*t)}}]))
            .collect();
        let dispatch =
            json!({"vmap": {"key": {"meta": {"key": "l4proto"}}, "data": {"set": jumps}}});
        // Whatever leaves on lo the kernel delivers here: no lookup needed
        // (the usual case, so loopback connections pay what they did).
        self.rule(
            BASE_CHAIN,
            vec![
                json!({"match": {"op": "==", "left": {"meta": {"key": "oif"}}, "right": "lo"}}),
                dispatch.clone(),
            ],
        );
        // Other interfaces carry broadcast and multicast (looped back to
        // local listeners) and the rest of the world: the kernel's own fib
        // lookup tells them apart, for SYNs and datagrams only.
        self.rule(
            BASE_CHAIN,
            vec![
                json!({"match": {"op": "!=", "left": {"fib": {"result": "type", "flags": ["daddr"]}}, "right": {"set": ["local", "broadcast", "anycast", "multicast"]}}}),
                json!({"accept": null}),
            ],
        );
        self.rule(BASE_CHAIN, vec![dispatch]);
        for t in Transport::ALL {
            let chain = dispatch_chain(t);
            for (addr, map) in &scopes {
                let mut e: Vec<Value> = addr.iter().cloned().collect();
                e.push(json!({"vmap": {"key": lookup_key(map), "data": format!("@dec{map}_{}", proto(t))}}));
                self.rule(&chain, e);
            }
            // Unmatched traffic in scope: the default.
            match spec.default {
                Verdict::Allow => self.rule(
                    &chain,
                    vec![
                        json!({"counter": DEFAULT_ALLOW_COUNTER}),
                        json!({"accept": null}),
                    ],
                ),
                Verdict::Deny => {
                    for e in deny_exprs(
                        self.table,
                        spec.mode,
                        "default",
                        Some(json!({"counter": DEFAULT_DENY_COUNTER})),
                    ) {
                        self.rule(&chain, e);
                    }
                }
            }
        }
    }

    fn finish(self) -> String {
        format!(r#"{{"nftables":[{}]}}"#, self.cmds.join(","))
    }
}

const BASE_CHAIN: &str = "output";

/// The empty chain whose name says which plan the table holds.
fn plan_chain(id: &str) -> String {
    format!("{PLAN_CHAIN_PREFIX}{id}")
}
const PLAN_CHAIN_PREFIX: &str = "plan_";

/// What the instance's table holds, read back from the kernel: `None`
/// when there is no table, else the plan id its plan chain names (`None`
/// inside: an altered table without one); `Err` when nft cannot be asked.
/// One cheap `nft list chains`.
pub fn plan_in_force(table: &str) -> Result<Option<Option<String>>, NftError> {
    let chains = chains(table)?;
    if chains.is_empty() {
        return Ok(None);
    }
    Ok(Some(
        chains
            .iter()
            .find_map(|c| c.strip_prefix(PLAN_CHAIN_PREFIX))
            .map(str::to_string),
    ))
}

/// `<family> daddr == <right>`.
fn daddr(family: &str, right: Value) -> Value {
    json!({"match": {"op": "==", "left": {"payload": {"protocol": family, "field": "daddr"}}, "right": right}})
}
const COUNT_CHAIN: &str = "count_refused";

/// The chain the base chain sends one transport's packets to.
fn dispatch_chain(t: Transport) -> String {
    format!("dispatch_{}", proto(t))
}

/// Deny action: reset for TCP, drop for UDP; audit mode logs only.
fn deny_exprs(table: &str, mode: Mode, bucket: &str, count: Option<Value>) -> Vec<Vec<Value>> {
    let group = log_group(table);
    let prefix = |would_deny: bool| LogPrefix {
        table: table.to_string(),
        bucket: if bucket == "default" {
            PrefixBucket::Default
        } else {
            PrefixBucket::Chain(bucket.to_string())
        },
        would_deny,
    };
    let log = |a: &str| json!({"log": {"prefix": prefix(a == "w").to_string(), "group": group}});
    let with_count = |mut e: Vec<Value>| {
        if let Some(c) = &count {
            e.insert(e.len() - 1, c.clone());
        }
        e
    };
    match mode {
        Mode::Audit => vec![with_count(vec![log("w"), json!({"accept": null})])],
        Mode::Enforce => vec![
            with_count(vec![
                json!({"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}}),
                log("d"),
                json!({"reject": {"type": "tcp reset"}}),
            ]),
            with_count(vec![log("d"), json!({"drop": null})]),
        ],
    }
}

fn key_type(family: &str) -> Value {
    if family.starts_with('4') {
        json!(["ipv4_addr", "inet_service"])
    } else if family.starts_with('6') {
        json!(["ipv6_addr", "inet_service"])
    } else {
        json!("inet_service")
    }
}

/// The whole table as one JSON batch: create-if-missing, delete, create
/// with every set, map, chain and rule. Its counters start at zero.
pub fn ruleset(table: &str, plan: &Plan) -> String {
    let spec = Spec::of(plan);
    let t = json!({"family": "inet", "name": table});
    let mut b = Batch {
        table,
        cmds: vec![
            json!({"add": {"table": t}}).to_string(),
            json!({"delete": {"table": t}}).to_string(),
            json!({"add": {"table": t}}).to_string(),
        ],
    };
    b.push("add", "chain", json!({"name": plan_chain(&plan.id)}));
    for (name, uids) in &spec.uid_sets {
        b.uid_set(name, uids);
    }
    for name in [DEFAULT_ALLOW_COUNTER, DEFAULT_DENY_COUNTER] {
        b.push("add", "counter", json!({"name": name}));
    }
    // Only the refusal sets count (per element): the verdict maps are on
    // every new connection's path. A concatenated interval key that
    // includes `meta l4proto` is refused by some kernels with Debian 12's
    // nft (6.12: EOPNOTSUPP), so maps are per transport and the rule
    // matches the protocol.
    for f in families() {
        b.push(
            "add",
            "set",
            json!({"name": format!("ref{f}"), "type": key_type(&f), "flags": ["interval"], "stmt": [{"counter": null}]}),
        );
    }
    b.push("add", "chain", json!({"name": COUNT_CHAIN}));
    for (name, (set, list, mode)) in &spec.chains {
        b.verdict_chain(name, set, *list, *mode);
    }
    for f in families() {
        b.push(
            "add",
            "map",
            json!({"name": format!("dec{f}"), "type": key_type(&f), "map": "verdict", "flags": ["interval"]}),
        );
    }
    for (f, elems) in &spec.maps {
        let elems: Vec<(ElemKey, &str)> = elems.iter().map(|(k, c)| (*k, &**c)).collect();
        b.map_elems("add", f, &elems);
    }
    for (f, elems) in &spec.refusals {
        let elems: Vec<(ElemKey, &str)> = elems.iter().map(|(k, s)| (*k, &**s)).collect();
        b.refusal_elems("add", f, &elems);
    }
    for t in Transport::ALL {
        b.push("add", "chain", json!({"name": dispatch_chain(t)}));
    }
    b.push(
        "add",
        "chain",
        json!({"name": BASE_CHAIN, "type": "filter", "hook": "output", "prio": 0, "policy": "accept"}),
    );
    b.dispatch_rules(&spec);
    b.finish()
}

/// What an in-place update changes.
pub struct Update {
    pub batch: String,
    /// Services whose refusal elements are replaced: their counts must be
    /// read before the update and carried (see [`refusal_counts`]).
    pub recounted: Vec<String>,
    /// The refusal sets holding those services' elements.
    pub recounted_sets: Vec<String>,
}

/// The changes that turn the table of `old` into the table of `plan`, in
/// one transaction: new sets and chains first, then element changes, then
/// the dispatch rules (flushed and re-added), then what is no longer
/// referenced. Unchanged elements keep their counters. A service whose
/// refusal elements change has all of them replaced (its count is carried
/// by the caller).
pub fn update(table: &str, old: &Plan, plan: &Plan) -> Update {
    let (was, now) = (Spec::of(old), Spec::of(plan));
    let mut b = Batch {
        table,
        cmds: Vec::new(),
    };
    // The table must hold `old`: deleting its plan chain fails the whole
    // transaction otherwise (and the caller replaces the table whole).
    if old.id != plan.id {
        b.push("delete", "chain", json!({"name": plan_chain(&old.id)}));
        b.push("add", "chain", json!({"name": plan_chain(&plan.id)}));
    }
    for (name, uids) in &now.uid_sets {
        if !was.uid_sets.contains_key(name) {
            b.uid_set(name, uids);
        }
    }
    for (name, (set, list, mode)) in &now.chains {
        if !was.chains.contains_key(name) {
            b.verdict_chain(name, set, *list, *mode);
        }
    }
    for f in families() {
        let empty = BTreeMap::new();
        let (old_m, new_m) = (
            was.maps.get(&f).unwrap_or(&empty),
            now.maps.get(&f).unwrap_or(&empty),
        );
        let gone: Vec<(ElemKey, &str)> = old_m
            .iter()
            .filter(|(k, c)| new_m.get(*k) != Some(*c))
            .map(|(k, c)| (*k, &**c))
            .collect();
        let added: Vec<(ElemKey, &str)> = new_m
            .iter()
            .filter(|(k, c)| old_m.get(*k) != Some(*c))
            .map(|(k, c)| (*k, &**c))
            .collect();
        b.map_elems("delete", &f, &gone);
        b.map_elems("add", &f, &added);
    }
    // Services with any refusal element changed, in any set.
    let mut recounted: Vec<Rc<str>> = Vec::new();
    for f in families() {
        let empty = BTreeMap::new();
        let (old_s, new_s) = (
            was.refusals.get(&f).unwrap_or(&empty),
            now.refusals.get(&f).unwrap_or(&empty),
        );
        for (k, s) in old_s {
            if new_s.get(k) != Some(s) {
                recounted.push(s.clone());
            }
        }
        for (k, s) in new_s {
            if old_s.get(k) != Some(s) {
                recounted.push(s.clone());
            }
        }
    }
    recounted.sort();
    recounted.dedup();
    let mut recounted_sets = Vec::new();
    for f in families() {
        let empty = BTreeMap::new();
        let pick = |m: &BTreeMap<ElemKey, Rc<str>>| -> Vec<(ElemKey, Rc<str>)> {
            m.iter()
                .filter(|(_, s)| recounted.binary_search(s).is_ok())
                .map(|(k, s)| (*k, s.clone()))
                .collect()
        };
        let gone = pick(was.refusals.get(&f).unwrap_or(&empty));
        let added = pick(now.refusals.get(&f).unwrap_or(&empty));
        if !gone.is_empty() {
            recounted_sets.push(format!("ref{f}"));
        }
        let gone: Vec<(ElemKey, &str)> = gone.iter().map(|(k, s)| (*k, &**s)).collect();
        let added: Vec<(ElemKey, &str)> = added.iter().map(|(k, s)| (*k, &**s)).collect();
        b.refusal_elems("delete", &f, &gone);
        b.refusal_elems("add", &f, &added);
    }
    let dispatch = Transport::ALL.map(dispatch_chain);
    for chain in [BASE_CHAIN, COUNT_CHAIN, &dispatch[0], &dispatch[1]] {
        b.push("flush", "chain", json!({"name": chain}));
    }
    b.dispatch_rules(&now);
    for name in was.chains.keys() {
        if !now.chains.contains_key(name) {
            b.push("delete", "chain", json!({"name": name}));
        }
    }
    for name in was.uid_sets.keys() {
        if !now.uid_sets.contains_key(name) {
            b.push("delete", "set", json!({"name": name}));
        }
    }
    Update {
        batch: b.finish(),
        recounted: recounted.iter().map(|s| s.to_string()).collect(),
        recounted_sets,
    }
}

/// Whether `nft` runs and the kernel has nf_tables (lists the tables).
pub fn available() -> Result<(), NftError> {
    nftables::helper::get_current_ruleset_raw(nftables::helper::DEFAULT_NFT, ["list", "tables"])
        .map(drop)
        .map_err(NftError::Rejected)
}

/// Commits a batch: one transaction.
pub fn commit(batch: &str) -> Result<(), NftError> {
    nft(batch, NO_ARGS).map(drop).map_err(NftError::Rejected)
}

/// Deletes the instance's table, and nothing else. Returns whether it
/// existed.
pub fn remove(table: &str) -> Result<bool, NftError> {
    // Without a working nft there is no table of ours (nft made it).
    let Ok(chains) = chains(table) else {
        return Ok(false);
    };
    let existed = !chains.is_empty();
    // Add-then-delete needs no look first: a table nobody can list (no
    // chains left) goes too, and a missing one is no error.
    let t = json!({"family": "inet", "name": table});
    let batch = json!({"nftables": [{"add": {"table": t}}, {"delete": {"table": t}}]});
    nft(&batch.to_string(), NO_ARGS).map_err(NftError::Rejected)?;
    Ok(existed)
}

fn list_table(table: &str) -> Result<Value, NftError> {
    let out = nftables::helper::get_current_ruleset_raw(
        nftables::helper::DEFAULT_NFT,
        ["list", "table", "inet", table],
    )
    .map_err(|source| NftError::List {
        table: table.to_string(),
        source,
    })?;
    serde_json::from_str(&out).map_err(NftError::Json)
}

/// Whether the instance's table exists. Asks for chain names only: `nft
/// list tables` loads far more into nft's cache (0.12 s with a
/// 10,000-service table), `list chains` next to nothing, and the table
/// always has its base chain.
pub fn table_exists(table: &str) -> bool {
    chains(table).is_ok_and(|c| !c.is_empty())
}

/// The names of the table's chains (empty: no such table).
fn chains(table: &str) -> Result<Vec<String>, NftError> {
    let out = nftables::helper::get_current_ruleset_raw(
        nftables::helper::DEFAULT_NFT,
        ["list", "chains", "inet"],
    )
    .map_err(|source| NftError::List {
        table: table.to_string(),
        source,
    })?;
    let doc: Value = serde_json::from_str(&out).map_err(NftError::Json)?;
    Ok(doc["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o.get("chain"))
        .filter(|c| c["table"] == table && c["family"] == "inet")
        .filter_map(|c| c["name"].as_str().map(str::to_string))
        .collect())
}

/// Packet counts of the nftables layer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PacketCounts {
    /// Refused (or, in audit mode, would-be refused) packets by service
    /// name.
    pub refused: HashMap<String, u64>,
    pub default_allowed: u64,
    pub default_denied: u64,
}

impl PacketCounts {
    /// `self` plus `other`.
    pub fn plus(mut self, other: &PacketCounts) -> PacketCounts {
        for (name, v) in &other.refused {
            *self.refused.entry(name.clone()).or_insert(0) += v;
        }
        self.default_allowed += other.default_allowed;
        self.default_denied += other.default_denied;
        self
    }

    /// Only the services `plan` has (a removed service's count goes).
    pub fn kept_for(mut self, plan: &Plan) -> PacketCounts {
        let names: std::collections::HashSet<&str> =
            plan.services.iter().map(|s| s.name.as_str()).collect();
        self.refused.retain(|name, _| names.contains(name.as_str()));
        self
    }

    /// Per service of `plan`, by index.
    pub fn refused_by_index(&self, plan: &Plan) -> Vec<u64> {
        plan.services
            .iter()
            .map(|s| self.refused.get(&s.name).copied().unwrap_or(0))
            .collect()
    }
}

/// Sums refusal-set element counters by service (the element comment).
fn add_refusals(set: &Value, out: &mut HashMap<String, u64>) {
    for e in set["elem"].as_array().into_iter().flatten() {
        let e = &e["elem"];
        if let (Some(service), Some(packets)) =
            (e["comment"].as_str(), e["counter"]["packets"].as_u64())
        {
            *out.entry(service.to_string()).or_insert(0) += packets;
        }
    }
}

/// The counts the table in force holds (without what earlier tables
/// counted: see `State::packet_base`).
pub fn counters(table: &str) -> Result<PacketCounts, NftError> {
    let doc = list_table(table)?;
    let mut out = PacketCounts::default();
    for obj in doc["nftables"].as_array().into_iter().flatten() {
        if let Some(c) = obj.get("counter") {
            let packets = c["packets"].as_u64().unwrap_or(0);
            match c["name"].as_str() {
                Some(DEFAULT_ALLOW_COUNTER) => out.default_allowed += packets,
                Some(DEFAULT_DENY_COUNTER) => out.default_denied += packets,
                _ => {}
            }
        } else if let Some(set) = obj.get("set") {
            add_refusals(set, &mut out.refused);
        }
    }
    Ok(out)
}

/// Refusal counts by service in the named sets only.
pub fn refusal_counts(table: &str, sets: &[String]) -> Result<HashMap<String, u64>, NftError> {
    let mut out = HashMap::new();
    for set in sets {
        let text = nftables::helper::get_current_ruleset_raw(
            nftables::helper::DEFAULT_NFT,
            ["list", "set", "inet", table, set],
        )
        .map_err(|source| NftError::List {
            table: table.to_string(),
            source,
        })?;
        let doc: Value = serde_json::from_str(&text).map_err(NftError::Json)?;
        for obj in doc["nftables"].as_array().into_iter().flatten() {
            if let Some(set) = obj.get("set") {
                add_refusals(set, &mut out);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {

    /// Names are persisted in tables: a change of encoding or hash must
    /// be a new [`LAYOUT`], never a silent rename.
    #[test]
    fn content_names_are_pinned() {
        assert_eq!(uid_set_name(&[0, 1000]), uid_set_name(&[0, 1000]));
        assert_ne!(uid_set_name(&[0, 1000]), uid_set_name(&[1000]));
        assert_eq!(uid_set_name(&[]), "u_e3b0c44298fc1c14", "sha256 of nothing");
        let set = uid_set_name(&[1000]);
        assert_ne!(
            verdict_chain_name(&set, ListKind::Allow, Mode::Enforce),
            verdict_chain_name(&set, ListKind::Allow, Mode::Audit)
        );
        assert_eq!(LAYOUT, 8, "names below are of layout 8");
        assert_eq!(set, "u_79ff7fbc96a0a611");
    }

    use super::*;

    #[test]
    fn regions_are_disjoint_and_cover_127_8() {
        let nets: Vec<IpNet> = ["127.0.0.0/16", "127.0.0.0/24", "127.0.0.53/32", "::1/128"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let r = address_regions(&nets);
        let mut all: Vec<(u32, u32)> = r
            .values()
            .flat_map(|(v4, _)| v4.iter().map(|(a, b)| (u32::from(*a), u32::from(*b))))
            .collect();
        all.sort_unstable();
        assert_eq!(
            all.first().map(|x| x.0),
            Some(u32::from(Ipv4Addr::new(127, 0, 0, 0)))
        );
        assert_eq!(
            all.last().map(|x| x.1),
            Some(u32::from(Ipv4Addr::new(127, 255, 255, 255)))
        );
        assert!(all.windows(2).all(|w| w[0].1 + 1 == w[1].0), "{all:?}");
        // 127.0.0.53 is its own atom (3), inside /24 (atom 2) inside /16 (1).
        assert_eq!(
            r[&3].0,
            vec![(Ipv4Addr::new(127, 0, 0, 53), Ipv4Addr::new(127, 0, 0, 53))]
        );
        assert_eq!(r[&2].0.len(), 2, "/24 minus .53: {:?}", r[&2].0);
        assert_eq!(r[&4].1, vec![(Ipv6Addr::LOCALHOST, Ipv6Addr::LOCALHOST)]);
        assert!(r[&0].1.is_empty());
    }
}
