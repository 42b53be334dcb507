//! The nftables layer: the same compiled plan, enforced per packet on `lo`.
//!
//! One table `inet <instance>` in the applying network namespace, replaced
//! whole in one `nft -j -f -` transaction (add, delete, add: atomic in the
//! kernel). Its base chain hooks `output` and judges only packets that
//! leave on `lo`, only TCP SYNs (new connections) and UDP datagrams, and
//! only destinations in the loopback scope:
//!
//! ```text
//! meta oif != "lo" accept                       # never touches other traffic
//! meta l4proto != { tcp, udp } accept
//! tcp flags & (syn | ack) != syn accept         # established: no cost, no conntrack
//! oif "lo" meta l4proto tcp ip daddr 127.0.0.0/8 ip daddr . th dport vmap @dec4_tcp
//! oif "lo" meta l4proto tcp ip6 daddr ::1 ip6 daddr . th dport vmap @dec6_tcp
//! oif "lo" meta l4proto tcp ip daddr @host4 th dport vmap @dechost_tcp
//! ... the same for ip6 @host6, and for udp
//! (default rules)
//! ```
//!
//! The verdict maps are interval maps keyed on disjoint (protocol, address
//! range, port range) atoms, so one lookup finds the deciding service
//! whatever the policy size. Services with the same uids, list kind and
//! mode share one chain (`v<k>`), which checks `meta skuid` against their
//! uid set: the table holds as many chains as the policy has distinct uid
//! lists, which keeps a 10,000-service apply a fraction of a second. Each
//! map element carries its own counter and names its service in its
//! comment; a refusal looks the same key up once more, in a set of the
//! same atoms (`ref*`), so per-service counts survive the sharing. A
//! refused TCP SYN is answered with a reset (the client fails fast with
//! ECONNREFUSED); a refused datagram is dropped (sendto fails with EPERM).
//! Connection tracking is never used.
//!
//! The `nftables` crate runs `nft` with the JSON batch. Its typed schema has
//! no `uid` set type, so the batch is built as JSON values.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;
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

/// Start of the NFLOG prefix: `lg/<table>/<service index|default>/<d|w>`.
pub const LOG_PREFIX: &str = "lg/";

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

fn uid_set(i: u32) -> String {
    format!("u{i}")
}

/// Names of the default's counters: `default_allow`, `default_deny`.
fn counter_names(bucket: &str) -> (String, String) {
    (format!("{bucket}_allow"), format!("{bucket}_deny"))
}

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

/// The chain of every verdict class: services with the same uid set, list
/// kind and mode share one chain, so the table holds as many chains as the
/// policy has distinct uid lists, not one per service. Returns each
/// service's class and the classes.
fn verdict_classes(plan: &Plan) -> (Vec<usize>, Vec<(u32, ListKind, Mode)>) {
    let mut classes: Vec<(u32, ListKind, Mode)> = Vec::new();
    let mut index: HashMap<(u32, ListKind, Mode), usize> = HashMap::new();
    let of_service = plan
        .services
        .iter()
        .map(|s| {
            let key = (s.uid_set, s.list, s.mode);
            *index.entry(key).or_insert_with(|| {
                classes.push(key);
                classes.len() - 1
            })
        })
        .collect();
    (of_service, classes)
}

fn class_chain(k: usize) -> String {
    format!("v{k}")
}

/// The element comment that names a service: `s<index>`.
fn service_comment(i: usize) -> String {
    format!("s{i}")
}

/// The whole table as one JSON batch: create-if-missing, delete, create
/// with every set, map, chain and rule. Its counters start at zero.
pub fn ruleset(table: &str, plan: &Plan, host_addrs: &[IpAddr]) -> Value {
    let t = json!({"family": "inet", "name": table});
    let mut cmds = vec![
        json!({"add": {"table": t}}),
        json!({"delete": {"table": t}}),
        json!({"add": {"table": t}}),
    ];
    let add = |kind: &str, mut obj: Value| {
        obj["family"] = json!("inet");
        obj["table"] = json!(table);
        json!({"add": {kind: obj}})
    };
    let counter = |name: &str| add("counter", json!({"name": name}));

    for (i, uids) in plan.uid_sets.iter().enumerate() {
        let mut set = json!({"name": uid_set(i as u32), "type": "uid"});
        if !uids.is_empty() {
            set["elem"] = json!(uids);
        }
        cmds.push(add("set", set));
    }

    // Deny action: reset for TCP, drop for UDP; audit mode logs only.
    // Every refusal (and would-deny) is also sent to the instance's NFLOG
    // group, where `loopguard run` turns it into an audit event; with no
    // listener the kernel discards it.
    let group = log_group(table);
    let deny_exprs = |mode: Mode, bucket: &str, count: Option<Value>| -> Vec<Vec<Value>> {
        let log = |a: &str| json!({"log": {"prefix": format!("{LOG_PREFIX}{table}/{bucket}/{a}"), "group": group}});
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
    };
    let chain_rule =
        |chain: &str, expr: Vec<Value>| add("rule", json!({"chain": chain, "expr": expr}));

    // The lookups, one per transport and scope: (family, scope match,
    // map family). Without named addresses every in-scope destination is
    // address atom 0, so the port alone decides: the one-field maps (an
    // rbtree lookup) serve the loopback range too, instead of the
    // concatenated ones (pipapo, whose cost grows with the element count).
    let (lo4, lo6) = if plan.nets.is_empty() {
        ("host", "host")
    } else {
        ("4", "6")
    };
    let scopes = [
        (
            "ip",
            json!({"prefix": {"addr": "127.0.0.0", "len": 8}}),
            lo4,
        ),
        ("ip6", json!("::1"), lo6),
        ("ip", json!("@host4"), "host"),
        ("ip6", json!("@host6"), "host"),
    ];
    let daddr = |family: &str, right: &Value| json!({"match": {"op": "==", "left": {"payload": {"protocol": family, "field": "daddr"}}, "right": right}});
    let l4proto = |t: Transport| json!({"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": proto(t)}});
    let lookup_key = |family: &str, map: &str| {
        if map == "host" {
            json!({"payload": {"protocol": "th", "field": "dport"}})
        } else {
            json!({"concat": [{"payload": {"protocol": family, "field": "daddr"}}, {"payload": {"protocol": "th", "field": "dport"}}]})
        }
    };

    // Refusals are counted per service by a second lookup of the same
    // key, on the refusal path only, in sets whose elements carry their
    // own counters (and the service in their comment).
    let count_chain = "count_refused";
    cmds.push(add("chain", json!({"name": count_chain})));
    // Its rules go in after the sets they look up.
    let mut count_rules = Vec::new();
    for t in Transport::ALL {
        for (family, right, map) in &scopes {
            count_rules.push(chain_rule(
                count_chain,
                vec![
                    l4proto(t),
                    daddr(family, right),
                    json!({"match": {"op": "==", "left": lookup_key(family, map), "right": format!("@ref{map}_{}", proto(t))}}),
                ],
            ));
        }
    }
    let count_refused = json!({"jump": {"target": count_chain}});

    let (class_of, classes) = verdict_classes(plan);
    for (k, (set, list, mode)) in classes.iter().enumerate() {
        let chain = class_chain(k);
        cmds.push(add("chain", json!({"name": chain})));
        let op = match list {
            ListKind::Allow => "==",
            ListKind::Deny => "!=",
        };
        cmds.push(chain_rule(
            &chain,
            vec![
                json!({"match": {"op": op, "left": {"meta": {"key": "skuid"}}, "right": format!("@{}", uid_set(*set))}}),
                json!({"accept": null}),
            ],
        ));
        // A jump returns to the next rule, so the count is a rule of its own.
        cmds.push(chain_rule(&chain, vec![count_refused.clone()]));
        for e in deny_exprs(*mode, &chain, None) {
            cmds.push(chain_rule(&chain, e));
        }
    }

    let (d_allow, d_deny) = counter_names("default");
    cmds.push(counter(&d_allow));
    cmds.push(counter(&d_deny));

    // Verdict maps and refusal sets, one per transport and address family:
    // a concatenated interval key that includes `meta l4proto` is refused
    // by some kernels with Debian 12's nft (6.12: EOPNOTSUPP), so the
    // protocol is matched by the rule instead. Only the refusal sets count
    // (per element): the verdict maps are on every new connection's path.
    let regions = address_regions(&plan.nets);
    let mut elems: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let mut refused: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for t in Transport::ALL {
        for family in ["4", "6", "host"] {
            elems.insert(format!("{family}_{}", proto(t)), Vec::new());
            refused.insert(format!("{family}_{}", proto(t)), Vec::new());
        }
    }
    let refusal_elem = |val: Value, service: usize| json!({"elem": {"val": val, "comment": service_comment(service)}});
    for d in &plan.decisions {
        let Some(ports) = plan.port_atoms.get(d.port_atom as usize - 1) else {
            continue;
        };
        let port_range = json!({"range": [ports.first, ports.last]});
        let service = d.service as usize;
        let verdict = json!({"jump": {"target": class_chain(class_of[service])}});
        let t = proto(d.transport);
        let mut keys = Vec::new();
        if let Some((v4, v6)) = regions.get(&d.addr_atom).filter(|_| !plan.nets.is_empty()) {
            for (a, b) in v4 {
                keys.push((
                    "4",
                    json!({"concat": [{"range": [a.to_string(), b.to_string()]}, port_range]}),
                ));
            }
            for (a, b) in v6 {
                keys.push((
                    "6",
                    json!({"concat": [{"range": [a.to_string(), b.to_string()]}, port_range]}),
                ));
            }
        }
        if d.addr_atom == 0 {
            keys.push(("host", port_range.clone()));
        }
        for (family, key) in keys {
            let name = format!("{family}_{t}");
            elems
                .entry(name.clone())
                .or_default()
                .push(json!([key.clone(), verdict]));
            refused
                .entry(name)
                .or_default()
                .push(refusal_elem(key, service));
        }
    }
    let key_type = |name: &str| {
        if name.starts_with('4') {
            json!(["ipv4_addr", "inet_service"])
        } else if name.starts_with('6') {
            json!(["ipv6_addr", "inet_service"])
        } else {
            json!("inet_service")
        }
    };
    let counted = json!([{"counter": null}]);
    for (name, elems) in elems {
        let mut m = json!({"name": format!("dec{name}"), "type": key_type(&name), "map": "verdict", "flags": ["interval"]});
        if !elems.is_empty() {
            m["elem"] = Value::Array(elems);
        }
        cmds.push(add("map", m));
    }
    for (name, elems) in refused {
        let mut m = json!({"name": format!("ref{name}"), "type": key_type(&name), "flags": ["interval"], "stmt": counted});
        if !elems.is_empty() {
            m["elem"] = Value::Array(elems);
        }
        cmds.push(add("set", m));
    }
    let hosts4: Vec<String> = host_addrs
        .iter()
        .filter(|a| a.is_ipv4())
        .map(ToString::to_string)
        .collect();
    let hosts6: Vec<String> = host_addrs
        .iter()
        .filter(|a| a.is_ipv6())
        .map(ToString::to_string)
        .collect();
    let mut host4 = json!({"name": "host4", "type": "ipv4_addr"});
    if !hosts4.is_empty() {
        host4["elem"] = json!(hosts4);
    }
    let mut host6 = json!({"name": "host6", "type": "ipv6_addr"});
    if !hosts6.is_empty() {
        host6["elem"] = json!(hosts6);
    }
    cmds.push(add("set", host4));
    cmds.push(add("set", host6));
    cmds.extend(count_rules);

    // The base chain.
    let out = "output";
    cmds.push(add(
        "chain",
        json!({"name": out, "type": "filter", "hook": "output", "prio": 0, "policy": "accept"}),
    ));
    let oif_lo = json!({"match": {"op": "==", "left": {"meta": {"key": "oif"}}, "right": "lo"}});
    let rule = |expr: Vec<Value>| chain_rule(out, expr);
    cmds.push(rule(vec![
        json!({"match": {"op": "!=", "left": {"meta": {"key": "oif"}}, "right": "lo"}}),
        json!({"accept": null}),
    ]));
    cmds.push(rule(vec![
        json!({"match": {"op": "!=", "left": {"meta": {"key": "l4proto"}}, "right": {"set": ["tcp", "udp"]}}}),
        json!({"accept": null}),
    ]));
    cmds.push(rule(vec![
        json!({"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}}),
        json!({"match": {"op": "!=", "left": {"&": [{"payload": {"protocol": "tcp", "field": "flags"}}, ["syn", "ack"]]}, "right": "syn"}}),
        json!({"accept": null}),
    ]));
    for t in Transport::ALL {
        for (family, right, map) in &scopes {
            cmds.push(rule(vec![
                oif_lo.clone(),
                l4proto(t),
                daddr(family, right),
                json!({"vmap": {"key": lookup_key(family, map), "data": format!("@dec{map}_{}", proto(t))}}),
            ]));
        }
    }
    // Unmatched traffic in scope: the default.
    for (family, right, _) in &scopes {
        let head = vec![oif_lo.clone(), daddr(family, right)];
        match plan.default {
            Verdict::Allow => {
                let mut e = head.clone();
                e.extend([json!({"counter": d_allow}), json!({"accept": null})]);
                cmds.push(rule(e));
            }
            Verdict::Deny => {
                for tail in deny_exprs(plan.mode, "default", Some(json!({"counter": d_deny}))) {
                    let mut e = head.clone();
                    e.extend(tail);
                    cmds.push(rule(e));
                }
            }
        }
    }
    json!({"nftables": cmds})
}

/// Whether `nft` runs and the kernel has nf_tables (lists the tables).
pub fn available() -> Result<(), NftError> {
    nftables::helper::get_current_ruleset_raw(nftables::helper::DEFAULT_NFT, ["list", "tables"])
        .map(drop)
        .map_err(NftError::Rejected)
}

/// Commits a batch: one transaction.
pub fn commit(batch: &Value) -> Result<(), NftError> {
    nft(&batch.to_string(), NO_ARGS)
        .map(drop)
        .map_err(NftError::Rejected)
}

/// Replaces the host address sets, in one transaction (the daemon calls
/// this when rtnetlink reports an address change).
pub fn sync_host_addrs(table: &str, host_addrs: &[IpAddr]) -> Result<(), NftError> {
    let mut cmds = Vec::new();
    for (set, v4) in [("host4", true), ("host6", false)] {
        let set_ref = json!({"family": "inet", "table": table, "name": set});
        cmds.push(json!({"flush": {"set": set_ref}}));
        let elems: Vec<String> = host_addrs
            .iter()
            .filter(|a| a.is_ipv4() == v4)
            .map(ToString::to_string)
            .collect();
        if !elems.is_empty() {
            cmds.push(json!({"add": {"element": {"family": "inet", "table": table, "name": set, "elem": elems}}}));
        }
    }
    let batch = json!({"nftables": cmds});
    nft(&batch.to_string(), NO_ARGS)
        .map(drop)
        .map_err(NftError::Rejected)
}

/// Deletes the instance's table, and nothing else. Returns whether it
/// existed.
pub fn remove(table: &str) -> Result<bool, NftError> {
    if !table_exists(table) {
        return Ok(false);
    }
    let batch = json!({"nftables": [{"delete": {"table": {"family": "inet", "name": table}}}]});
    nft(&batch.to_string(), NO_ARGS).map_err(NftError::Rejected)?;
    Ok(true)
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

pub fn table_exists(table: &str) -> bool {
    let Ok(out) = nftables::helper::get_current_ruleset_raw(
        nftables::helper::DEFAULT_NFT,
        ["list", "tables", "inet"],
    ) else {
        return false;
    };
    let Ok(doc) = serde_json::from_str::<Value>(&out) else {
        return false;
    };
    doc["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|o| o["table"]["name"] == table && o["table"]["family"] == "inet")
}

/// Packet counts of the table in force: `default_allow`, `default_deny`
/// (named counters), and per service `s<i>_refused` (refused or would-be
/// refused), summed over the service's elements.
pub fn counters(table: &str) -> Result<HashMap<String, u64>, NftError> {
    let doc = list_table(table)?;
    let mut out = HashMap::new();
    let mut add = |name: String, packets: u64| *out.entry(name).or_insert(0) += packets;
    for obj in doc["nftables"].as_array().into_iter().flatten() {
        if let Some(c) = obj.get("counter") {
            if let (Some(name), Some(packets)) = (c["name"].as_str(), c["packets"].as_u64()) {
                add(name.to_string(), packets);
            }
            continue;
        }
        let Some(set) = obj.get("set") else { continue };
        for e in set["elem"].as_array().into_iter().flatten() {
            let e = &e["elem"];
            if let (Some(comment), Some(packets)) =
                (e["comment"].as_str(), e["counter"]["packets"].as_u64())
            {
                add(format!("{comment}_refused"), packets);
            }
        }
    }
    Ok(out)
}

/// `counts` plus what earlier tables counted.
pub fn with_base(
    mut counts: HashMap<String, u64>,
    base: Option<&HashMap<String, u64>>,
) -> HashMap<String, u64> {
    for (k, v) in base.into_iter().flatten() {
        *counts.entry(k.clone()).or_insert(0) += v;
    }
    counts
}

/// Counts so far (kernel plus base), renamed for `plan` (services matched
/// by name): the new table's base, so counts survive a re-apply.
pub fn carried_counts(
    current: &HashMap<String, u64>,
    previous: Option<&Plan>,
    plan: &Plan,
) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    for suffix in ["allow", "deny"] {
        let name = format!("default_{suffix}");
        if let Some(v) = current.get(&name) {
            out.insert(name, *v);
        }
    }
    let Some(previous) = previous else { return out };
    let by_name: HashMap<&str, usize> = previous
        .services
        .iter()
        .enumerate()
        .map(|(j, p)| (p.name.as_str(), j))
        .collect();
    for (i, s) in plan.services.iter().enumerate() {
        if let Some(j) = by_name.get(s.name.as_str()) {
            if let Some(v) = current.get(&format!("s{j}_refused")) {
                out.insert(format!("s{i}_refused"), *v);
            }
        }
    }
    out
}

/// Per-service refused packet counts, then the default's (allowed,
/// denied). The verdict maps do not count, so allowed packets are counted
/// for the default only (the eBPF layer counts allowed attempts per
/// service).
pub fn service_counts(counts: &HashMap<String, u64>, services: usize) -> (Vec<u64>, (u64, u64)) {
    let get = |name: &str| counts.get(name).copied().unwrap_or(0);
    (
        (0..services)
            .map(|i| get(&format!("s{i}_refused")))
            .collect(),
        (get("default_allow"), get("default_deny")),
    )
}

#[cfg(test)]
mod tests {
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
