//! The JSON batch writer: the whole table ([`ruleset`]) or the in-place
//! change from one plan to the next ([`update`]).

#[allow(unused_imports, reason = "the layer's common imports")]
use super::*;

/// Builds batch commands for one table, each as JSON text.
pub(super) struct Batch<'t> {
    pub(super) table: &'t str,
    pub(super) cmds: Vec<String>,
}

impl Batch<'_> {
    pub(super) fn obj(&self, mut obj: Value) -> Value {
        obj["family"] = json!("inet");
        obj["table"] = json!(self.table);
        obj
    }

    pub(super) fn push(&mut self, verb: &str, kind: &str, obj: Value) {
        let obj = self.obj(obj);
        self.cmds.push(json!({verb: {kind: obj}}).to_string());
    }

    pub(super) fn rule(&mut self, chain: &str, expr: Vec<Value>) {
        self.push("add", "rule", json!({"chain": chain, "expr": expr}));
    }

    pub(super) fn uid_set(&mut self, name: &str, uids: &[u32]) {
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
    pub(super) fn verdict_chain(&mut self, name: &str, set: &str, list: ListKind, mode: Mode) {
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
    pub(super) fn elements<T>(
        &mut self,
        verb: &str,
        set: &str,
        elems: &[T],
        write: impl Fn(&T, &mut String),
    ) {
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

    pub(super) fn map_elems(&mut self, verb: &str, map: &str, elems: &[(ElemKey, &str)]) {
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

    pub(super) fn refusal_elems(&mut self, verb: &str, set: &str, elems: &[(ElemKey, &str)]) {
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
    pub(super) fn dispatch_rules(&mut self, spec: &Spec) {
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
        // One port first (a hash lookup), then port ranges: the two hold
        // disjoint atoms, so at most one matches.
        scopes.push((None, "port"));
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

    pub(super) fn finish(self) -> String {
        format!(r#"{{"nftables":[{}]}}"#, self.cmds.join(","))
    }
}

/// `<family> daddr == <right>`.
pub(super) fn daddr(family: &str, right: Value) -> Value {
    json!({"match": {"op": "==", "left": {"payload": {"protocol": family, "field": "daddr"}}, "right": right}})
}
pub(super) const COUNT_CHAIN: &str = "count_refused";

/// The chain the base chain sends one transport's packets to.
pub(super) fn dispatch_chain(t: Transport) -> String {
    format!("dispatch_{}", proto(t))
}

/// Deny action: reset for TCP, drop for UDP; audit mode logs only.
pub(super) fn deny_exprs(
    table: &str,
    mode: Mode,
    bucket: &str,
    count: Option<Value>,
) -> Vec<Vec<Value>> {
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

pub(super) fn key_type(family: &str) -> Value {
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
        let mut set =
            json!({"name": format!("ref{f}"), "type": key_type(&f), "stmt": [{"counter": null}]});
        if is_interval(&f) {
            set["flags"] = json!(["interval"]);
        }
        b.push("add", "set", set);
    }
    b.push("add", "chain", json!({"name": COUNT_CHAIN}));
    for (name, (set, list, mode)) in &spec.chains {
        b.verdict_chain(name, set, *list, *mode);
    }
    for f in families() {
        let mut map = json!({"name": format!("dec{f}"), "type": key_type(&f), "map": "verdict"});
        if is_interval(&f) {
            map["flags"] = json!(["interval"]);
        }
        b.push("add", "map", map);
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
