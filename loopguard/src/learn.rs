//! From an audit-mode trial to an enforcing policy: the allow-lists that
//! would have let exactly the observed traffic through. Input is the audit
//! stream `run` writes: `would-deny` records (refused in enforce mode) and
//! `allow` records (`log_allowed`); what nobody tried stays closed.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{
    audit::{AuditAction, AuditRecord},
    policy::{IdRef, ListKind, Policy, Transport},
};

/// Who was seen: a user name, or a uid the host could not name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(untagged)]
pub enum Who {
    User(String),
    Uid(u32),
}

impl std::fmt::Display for Who {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Who::User(n) => f.write_str(n),
            Who::Uid(u) => write!(f, "{u}"),
        }
    }
}

/// Text from an audit record made safe for one comment line or message:
/// control characters (a newline would end the comment and start TOML)
/// become `?`. Records are written by the daemon, but a log is a file, and
/// process names are chosen by whoever runs them.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// How often, and when, one identity reached one destination.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Seen {
    /// Attempts: one connect (or datagram) once, however many layers
    /// recorded it (the eBPF hook and the nftables layer both do).
    pub attempts: u64,
    /// Of those, refused in enforce mode (the rest were allowed).
    pub would_deny: u64,
    pub first: String,
    pub last: String,
}

/// What the layers recorded for one identity and destination: counts per
/// layer (an attempt is one record per layer that judged it).
#[derive(Clone, Debug, Default)]
struct Tally {
    by_layer: BTreeMap<&'static str, (u64, u64)>,
    first: String,
    last: String,
}

impl Tally {
    /// One attempt once: the count of the layer that recorded the most.
    fn seen(&self) -> Seen {
        let most = |f: fn(&(u64, u64)) -> u64| self.by_layer.values().map(f).max().unwrap_or(0);
        Seen {
            attempts: most(|c| c.0),
            would_deny: most(|c| c.1),
            first: self.first.clone(),
            last: self.last.clone(),
        }
    }
}

/// One destination the trial saw traffic to: the policy's service that
/// decided (none: the default), the port and the address.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Target {
    pub service: Option<String>,
    pub protocol: Transport,
    pub port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<std::net::IpAddr>,
}

/// Everything observed, by destination and identity.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Observed {
    /// Attempts, each counted once.
    pub events: u64,
    /// Records that were not attempts (dropped notices) or lacked a
    /// user, port or protocol.
    pub skipped: u64,
    #[serde(serialize_with = "as_list")]
    targets: BTreeMap<Target, BTreeMap<Who, Tally>>,
    /// The uid each user name was seen with.
    #[serde(skip)]
    uids: BTreeMap<String, u32>,
}

fn as_list<S: serde::Serializer>(
    targets: &BTreeMap<Target, BTreeMap<Who, Tally>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Entry<'a> {
        #[serde(flatten)]
        target: &'a Target,
        seen: Vec<(String, Seen)>,
    }
    s.collect_seq(targets.iter().map(|(target, seen)| {
        Entry {
            target,
            seen: seen
                .iter()
                .map(|(w, t)| (w.to_string(), t.seen()))
                .collect(),
        }
    }))
}

/// How to learn: what to start from and what to leave out.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Users (names or uids) never proposed: a guest who should stay out.
    pub exclude: Vec<String>,
    /// Switch audit mode to enforce; otherwise the mode stays as it is (a
    /// new policy is in audit mode).
    pub enforce: bool,
    /// Who a new policy keeps on each (protocol, port) whatever was seen,
    /// besides root (always kept): the listeners' owners.
    pub keep: BTreeMap<(Transport, u16), Vec<String>>,
}

impl Observed {
    /// Takes one record of the audit stream. Only connections and
    /// datagrams count: a bind is listening, not reaching.
    pub fn add(&mut self, r: &AuditRecord) {
        if !matches!(r.action, AuditAction::WouldDeny | AuditAction::Allow)
            || r.layer == crate::audit::EventLayer::Bind
        {
            self.skipped += 1;
            return;
        }
        let (Some(protocol), Some(port)) = (r.transport, r.port) else {
            self.skipped += 1;
            return;
        };
        let who = match (&r.user, r.uid) {
            (Some(name), uid) => {
                if let Some(uid) = uid {
                    self.uids.insert(name.clone(), uid);
                }
                Who::User(name.clone())
            }
            (None, Some(uid)) => Who::Uid(uid),
            (None, None) => {
                self.skipped += 1;
                return;
            }
        };
        let target = Target {
            service: r.service.clone(),
            protocol,
            port,
            ip: r.ip,
        };
        let tally = self
            .targets
            .entry(target)
            .or_default()
            .entry(who)
            .or_insert_with(|| Tally {
                by_layer: BTreeMap::new(),
                first: r.timestamp.clone(),
                last: r.timestamp.clone(),
            });
        let before = tally.seen().attempts;
        let counts = tally.by_layer.entry(r.layer.as_str()).or_default();
        counts.0 += 1;
        if r.action == AuditAction::WouldDeny {
            counts.1 += 1;
        }
        self.events += tally.seen().attempts - before;
        // RFC 3339 UTC timestamps of one width order as text.
        if r.timestamp < tally.first {
            tally.first = r.timestamp.clone();
        }
        if r.timestamp > tally.last {
            tally.last = r.timestamp.clone();
        }
    }

    /// How `who` is written in a list: a valid account name quoted, else
    /// its uid (when a valid one is known), else nothing.
    fn entry(&self, who: &Who) -> Option<String> {
        let uid = |u: u32| (u < u32::MAX).then(|| u.to_string());
        match who {
            Who::User(n) if crate::policy::valid_account_name(n) => Some(format!("{n:?}")),
            Who::User(n) => self.uids.get(n).copied().and_then(uid),
            Who::Uid(u) => uid(*u),
        }
    }

    /// The uid an identity stands for, when known.
    fn uid_of(&self, who: &str) -> Option<u32> {
        who.parse().ok().or_else(|| self.uids.get(who).copied())
    }

    /// Whether `who` is on `exclude` (by name or uid).
    fn excluded(&self, who: &Who, exclude: &[String]) -> bool {
        let uid = match who {
            Who::User(n) => self.uids.get(n).copied(),
            Who::Uid(u) => Some(*u),
        };
        exclude
            .iter()
            .any(|e| *e == who.to_string() || uid.is_some_and(|u| e.parse() == Ok(u)))
    }

    /// Whether `service`'s allow-list names `who` already (by name or uid).
    fn listed(&self, service: &crate::policy::Service, who: &Who) -> bool {
        let uid = match who {
            Who::User(n) => self.uids.get(n).copied(),
            Who::Uid(u) => Some(*u),
        };
        service.users.ids.iter().any(|id| match (id, who) {
            (IdRef::Name(n), Who::User(w)) => n == w,
            (IdRef::Id(i), _) => Some(*i) == uid,
            _ => false,
        })
    }

    /// The service of `policy` that guards what `t` records: the one named
    /// when it still exists, else (a rename) the one that decides that
    /// protocol, port and address now.
    fn guard<'p>(
        &self,
        policy: &'p Policy,
        t: &Target,
    ) -> Option<(usize, &'p crate::policy::Service)> {
        let ip =
            t.ip.unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
        let dest = crate::policy::Destination::in_scope(ip);
        // The service named, while it still matches what was reached.
        if let Some(i) = t.service.as_ref().and_then(|n| {
            policy
                .services
                .iter()
                .position(|s| &s.name == n && s.matches(t.protocol, &dest, t.port))
        }) {
            return Some((i, &policy.services[i]));
        }
        let i = policy.deciding_service(t.protocol, &dest, t.port)?;
        Some((i, &policy.services[i]))
    }

    /// What to change in `base` (none: a new policy) so that what was
    /// seen gets through, one line per service and identity: additions to
    /// allow-lists, and what no allow-list can take (a deny-list, the
    /// default deciding), and who was left out.
    pub fn proposals(&self, base: Option<&Policy>, exclude: &[String]) -> Vec<Proposal> {
        let mut out: Vec<Proposal> = Vec::new();
        for (t, seen) in &self.targets {
            let guard = base.and_then(|p| self.guard(p, t));
            for (who, tally) in seen {
                let s = tally.seen();
                // What got through needs nothing; a would-deny is what the
                // file must change to let through.
                if s.would_deny == 0 {
                    continue;
                }
                let change = if self.excluded(who, exclude) {
                    Change::Excluded
                } else {
                    match guard {
                        Some((_, svc)) if svc.list == ListKind::Allow && self.listed(svc, who) => {
                            continue
                        }
                        Some((_, svc)) if svc.list == ListKind::Allow => Change::AddToAllowList,
                        Some(_) => Change::OnDenyList,
                        None if base.is_some() => Change::NoService,
                        None => Change::NewService,
                    }
                };
                let service = guard
                    .map(|(_, s)| s.name.clone())
                    .or_else(|| t.service.clone());
                // One line per (service, protocol, port, who): the same
                // attempt seen on several addresses is added up.
                if let Some(p) = out.iter_mut().find(|p| {
                    p.service == service
                        && p.protocol == t.protocol
                        && p.port == t.port
                        && p.who == who.to_string()
                }) {
                    p.seen.attempts += s.attempts;
                    p.seen.would_deny += s.would_deny;
                    p.seen.first = p.seen.first.clone().min(s.first);
                    p.seen.last = p.seen.last.clone().max(s.last);
                    continue;
                }
                out.push(Proposal {
                    service,
                    service_index: guard.map(|(i, _)| i),
                    protocol: t.protocol,
                    port: t.port,
                    who: who.to_string(),
                    entry: self.entry(who),
                    addable: guard.is_some_and(|(_, svc)| svc.users_span.is_some()),
                    change,
                    seen: s,
                });
            }
        }
        // What to add first, then what no list takes, then who was left out.
        let rank = |c: Change| match c {
            Change::AddToAllowList | Change::NewService => 0,
            Change::OnDenyList => 1,
            Change::NoService => 2,
            Change::Excluded => 3,
        };
        out.sort_by(|a, b| {
            (rank(a.change), &a.service, a.port, &a.who).cmp(&(
                rank(b.change),
                &b.service,
                b.port,
                &b.who,
            ))
        });
        out
    }

    /// `base`'s text with the proposed users added to its allow-lists in
    /// place (comments and layout kept, each addition with its counts)
    /// and, with `enforce`, every `mode = "audit"` switched to enforce.
    pub fn merged(&self, base: &Policy, proposals: &[Proposal], enforce: bool) -> String {
        let text: &str = &base.source;
        // (span, replacement), applied from the end.
        let mut edits: Vec<(std::ops::Range<usize>, String)> = Vec::new();
        let mut adds: BTreeMap<usize, Vec<&Proposal>> = BTreeMap::new();
        for p in proposals
            .iter()
            .filter(|p| p.change == Change::AddToAllowList)
        {
            if let (Some(i), Some(_), true) = (p.service_index, &p.entry, p.addable) {
                let list = adds.entry(i).or_default();
                // One entry per identity (a range service seen on several
                // ports; a user seen by name and by uid).
                let uid = self.uid_of(&p.who);
                let same = |q: &&Proposal| {
                    q.entry == p.entry || uid.is_some() && self.uid_of(&q.who) == uid
                };
                if !list.iter().any(same) {
                    list.push(p);
                }
            }
        }
        for (i, props) in adds {
            let Some(span) = base.services[i].users_span.clone() else {
                continue;
            };
            let mut lines = String::from("[\n");
            for p in props {
                lines.push_str(&format!(
                    "    {}, # learned: {}\n",
                    p.entry.as_deref().unwrap_or_default(),
                    p.seen_words()
                ));
            }
            let inner = text.get(span.start + 1..span.end).unwrap_or("]");
            lines.push_str("    ");
            lines.push_str(inner.trim_start());
            edits.push((span, lines));
        }
        if enforce {
            use crate::policy::Mode;
            // Every mode that reads as audit (an escaped spelling too)
            // becomes enforce: the value is rewritten whole.
            let enforce = |span: std::ops::Range<usize>| {
                let quoted = text
                    .get(span.clone())
                    .is_some_and(|v| v.starts_with(['"', '\'']));
                let word = if quoted { "\"enforce\"" } else { "enforce" };
                (span, word.to_string())
            };
            if base.mode == Mode::Audit {
                edits.extend(base.mode_span.clone().map(enforce));
            }
            for svc in base.services.iter().filter(|s| s.mode == Mode::Audit) {
                edits.extend(svc.mode_span.clone().map(enforce));
            }
        }
        edits.sort_by_key(|(span, _)| std::cmp::Reverse(span.start));
        let mut out = text.to_string();
        for (span, with) in edits {
            if out.is_char_boundary(span.start) && out.is_char_boundary(span.end) {
                out.replace_range(span, &with);
            }
        }
        out
    }

    /// A new policy that lets through what was seen: one service per
    /// (protocol, port), its identities allowed, with `opts.keep` (root,
    /// the listeners' owners) kept. Ports nobody tried are not opened;
    /// traffic to other ports meets the default (allow), as before the
    /// trial. In audit mode unless `opts.enforce`.
    pub fn policy(&self, sources: &str, opts: &Options) -> String {
        let mut out = format!(
            "# Learned by `loopguard learn` from {} attempts in {sources}: each\n\
             # service allows the users seen reaching it (counts, first and last\n\
             # seen beside each), root and the owners of its listeners. Review,\n\
             # then apply{}.\n\
             version = 1\n\
             mode = \"{}\"\n",
            self.events,
            if opts.enforce {
                ""
            } else {
                "; it refuses nothing until `mode = \"enforce\"` (or learn --enforce)"
            },
            if opts.enforce { "enforce" } else { "audit" }
        );
        // One service per (protocol, port): two recorded services (a
        // rename across the logs, or a port decided once by a service and
        // once by the default) must not become two services that match
        // the same traffic.
        let mut merged: BTreeMap<(u16, Transport), Merged<'_>> = BTreeMap::new();
        for (t, seen) in &self.targets {
            let entry = merged.entry((t.port, t.protocol)).or_default();
            if entry.0.is_none() {
                entry.0 = t.service.as_ref();
            }
            for (who, tally) in seen {
                let s = tally.seen();
                let m = entry.1.entry(who).or_insert_with(|| Seen {
                    attempts: 0,
                    would_deny: 0,
                    first: s.first.clone(),
                    last: s.last.clone(),
                });
                m.attempts += s.attempts;
                m.would_deny += s.would_deny;
                if s.first < m.first {
                    m.first = s.first.clone();
                }
                if s.last > m.last {
                    m.last = s.last.clone();
                }
            }
        }
        let ports_of: BTreeMap<&String, usize> =
            merged
                .values()
                .filter_map(|(n, _)| *n)
                .fold(BTreeMap::new(), |mut m, n| {
                    *m.entry(n).or_default() += 1;
                    m
                });
        let mut names = std::collections::HashSet::new();
        for ((port, protocol), (service, seen)) in &merged {
            let udp = if *protocol == Transport::Udp {
                "-udp"
            } else {
                ""
            };
            // A recorded name is used only when it is a valid service name
            // (ASCII: no quote, newline or multibyte cut can come through).
            let recorded = service.filter(|s| crate::policy::valid_name(s));
            let base = match recorded {
                Some(s) if ports_of.get(s) == Some(&1) => (*s).clone(),
                Some(s) => format!("{}-{port}{udp}", &s[..s.len().min(20)]),
                None => format!("port-{port}{udp}"),
            };
            let mut name = base.clone();
            let mut n = 2;
            while !names.insert(name.clone()) {
                name = format!("{}-{n}", &base[..base.len().min(28)]);
                n += 1;
            }
            out.push_str(&format!(
                "\n[[service]]\nname = \"{name}\"\nport = {port}\nprotocol = \"{}\"\nallow_users = [\n",
                protocol.as_str()
            ));
            let mut listed: Vec<String> = Vec::new();
            let root = "root".to_string();
            let kept = opts.keep.get(&(*protocol, *port)).into_iter().flatten();
            for kept in std::iter::once(&root).chain(kept) {
                if crate::policy::valid_account_name(kept) && !listed.contains(kept) {
                    out.push_str(&format!(
                        "    {kept:?}, # kept: root, or a listener's owner\n"
                    ));
                    listed.push(kept.clone());
                }
            }
            for (who, s) in seen {
                if self.excluded(who, &opts.exclude) || listed.contains(&who.to_string()) {
                    continue;
                }
                let Some(entry) = self.entry(who) else {
                    continue;
                };
                if listed.contains(&entry) {
                    continue;
                }
                listed.push(entry.clone());
                out.push_str(&format!(
                    "    {entry}, # {} attempt{}, {} .. {}\n",
                    s.attempts,
                    if s.attempts == 1 { "" } else { "s" },
                    one_line(&s.first),
                    one_line(&s.last)
                ));
            }
            out.push_str("]\n");
        }
        out
    }
}

/// One (port, protocol) of a learned policy: the first service name
/// recorded for it, and who was seen.
type Merged<'a> = (Option<&'a String>, BTreeMap<&'a Who, Seen>);

/// What `learn` proposes for one identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Change {
    /// Add it to the service's allow-list.
    AddToAllowList,
    /// The service's deny-list names it: take it off, or accept the
    /// refusals.
    OnDenyList,
    /// No service of the policy guards it (the default decided): add a
    /// service, or accept.
    NoService,
    /// A new policy gets a service for it.
    NewService,
    /// Left out (`--exclude`): its attempts stay refused once enforced.
    Excluded,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Proposal {
    /// The service that guards it now (by name, or by what it matches
    /// after a rename), else the one the records named.
    pub service: Option<String>,
    #[serde(skip)]
    service_index: Option<usize>,
    pub protocol: Transport,
    pub port: u16,
    pub who: String,
    /// How it is written in a list (`"alice"`, `1007`); `None`: a name no
    /// list can hold.
    #[serde(skip)]
    entry: Option<String>,
    /// The guarding service has a users list to add to.
    #[serde(skip)]
    addable: bool,
    pub change: Change,
    pub seen: Seen,
}

impl Proposal {
    fn seen_words(&self) -> String {
        format!(
            "{} attempt{}, {} .. {}",
            self.seen.attempts,
            if self.seen.attempts == 1 { "" } else { "s" },
            one_line(&self.seen.first),
            one_line(&self.seen.last)
        )
    }
}

impl std::fmt::Display for Proposal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let seen = self.seen_words();
        let dest = format!("{}/{}", self.port, self.protocol.as_str());
        let who = one_line(&self.who);
        let service = self.service.as_deref().map(one_line);
        match (self.change, &service) {
            (Change::AddToAllowList, Some(s)) if self.entry.is_none() => write!(
                f,
                "! {s}: {who} was seen but cannot be written in a list (neither a valid account name nor its uid is known); add it by hand ({dest}; {seen})"
            ),
            (Change::AddToAllowList, Some(s)) if !self.addable => write!(
                f,
                "! {s}: {who} was seen but not added: the service has no allow_users list to add to ({dest}; {seen})"
            ),
            (Change::AddToAllowList, Some(s)) => write!(
                f,
                "+ {s}: allow_users += {}  ({dest}; {seen})",
                self.entry.as_deref().unwrap_or_default()
            ),
            (Change::OnDenyList, Some(s)) => write!(
                f,
                "! {s}: {who} is on its deny-list and was seen ({dest}; {seen})"
            ),
            (Change::Excluded, _) => write!(
                f,
                "- {who} left out (--exclude): stays refused on {dest} ({seen})"
            ),
            (Change::NewService, _) => {
                write!(f, "+ new service for {dest}: allow {who:?} ({seen})")
            }
            _ => write!(
                f,
                "? {who} reached {dest}, which no service of the policy guards (the default decided; {seen})"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::EventLayer;

    fn record(
        action: &str,
        layer: &str,
        service: Option<&str>,
        user: &str,
        port: u16,
    ) -> AuditRecord {
        let mut v = serde_json::json!({
            "@timestamp": "2026-11-30T00:00:00.000000000Z",
            "event.action": action,
            "event.reason": "r",
            "loopguard.layer": layer,
            "user.id": 1000,
            "user.name": user,
            "network.transport": "tcp",
            "destination.port": port,
        });
        if let Some(s) = service {
            v["loopguard.service"] = s.into();
        }
        serde_json::from_value(v).expect("a record")
    }

    #[test]
    fn binds_are_not_reaching_and_one_port_is_one_service() {
        let mut o = Observed::default();
        o.add(&record("would-deny", "bind", Some("db"), "mallory", 5432));
        o.add(&record("would-deny", "connect", Some("db"), "alice", 5432));
        // The same port decided by the default (another address): merged.
        o.add(&record("would-deny", "packet", None, "bob", 5432));
        o.add(&record("dropped", "connect", None, "x", 1));
        assert_eq!(o.events, 2);
        let text = o.policy("log", &Options::default());
        assert_eq!(text.matches("[[service]]").count(), 1, "{text}");
        assert!(
            text.contains("\"alice\"") && text.contains("\"bob\""),
            "{text}"
        );
        assert!(!text.contains("mallory"), "a bind is not access: {text}");
        let _ = EventLayer::Bind;
    }

    #[test]
    fn the_learned_policy_reads_back() {
        let mut o = Observed::default();
        o.add(&record("would-deny", "connect", Some("db"), "alice", 5432));
        o.add(&record("allow", "connect", Some("db"), "bob", 5432));
        o.add(&record("would-deny", "connect", None, "carol", 8080));
        let text = o.policy("log", &Options::default());
        let (policy, diags) = crate::policy::load("learned.toml", text.as_str());
        assert!(diags.is_empty(), "{diags:?}\n{text}");
        assert_eq!(policy.expect("parses").services.len(), 2);
    }

    fn record_with(
        action: &str,
        layer: &str,
        service: Option<&str>,
        user: &str,
        uid: u32,
        port: u16,
    ) -> AuditRecord {
        let mut r = record(action, layer, service, user, port);
        r.uid = Some(uid);
        r
    }

    #[test]
    fn one_attempt_counts_once_whatever_number_of_layers_recorded_it() {
        let mut o = Observed::default();
        // Three psql runs, each seen by the eBPF hook and the nftables layer.
        for _ in 0..3 {
            o.add(&record("would-deny", "connect", Some("db"), "alice", 5432));
            o.add(&record("would-deny", "packet", Some("db"), "alice", 5432));
        }
        assert_eq!(o.events, 3);
        let p = o.proposals(None, &[]);
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].seen.attempts, p[0].seen.would_deny), (3, 3));
        assert!(o
            .policy("log", &Options::default())
            .contains("alice\", # 3 attempts"));
    }

    #[test]
    fn a_new_policy_keeps_root_and_owners_stays_in_audit_and_leaves_out_the_excluded() {
        let mut o = Observed::default();
        o.add(&record("would-deny", "connect", Some("db"), "alice", 5432));
        o.add(&record("would-deny", "connect", Some("db"), "guest", 5432));
        let mut opts = Options {
            exclude: vec!["guest".into()],
            ..Options::default()
        };
        opts.keep
            .insert((Transport::Tcp, 5432), vec!["postgres".into()]);
        let text = o.policy("log", &opts);
        assert!(text.contains("mode = \"audit\""), "{text}");
        for kept in ["\"root\"", "\"postgres\"", "\"alice\""] {
            assert!(text.contains(kept), "{kept} missing: {text}");
        }
        assert!(!text.contains("guest"), "{text}");
        let enforced = o.policy(
            "log",
            &Options {
                enforce: true,
                ..opts
            },
        );
        assert!(enforced.contains("mode = \"enforce\""), "{enforced}");
        let (policy, diags) = crate::policy::load("learned.toml", enforced.as_str());
        assert!(diags.is_empty(), "{diags:?}");
        assert_eq!(policy.expect("parses").services[0].users.ids.len(), 3);
    }

    const BASE: &str = "version = 1\nmode = \"audit\"   # a trial\n\n[[service]]\nname = \"mariadb\"  # renamed from mysql\nport = 3306\nallow_users = [\n    \"root\",   # admin\n    1007,\n]\n\n[[service]]\nname = \"redis\"\nport = 6379\nmode = \"audit\"\nallow_users = [\"redis\"]\n";

    #[test]
    fn learning_adds_to_the_policy_in_force_in_place() {
        let (base, diags) = crate::policy::load("p.toml", BASE);
        assert!(diags.is_empty(), "{diags:?}");
        let base = base.expect("parses");
        let mut o = Observed::default();
        // Recorded under the service's old name: the policy guards the
        // port under its new one.
        o.add(&record_with(
            "would-deny",
            "connect",
            Some("mysql"),
            "alice",
            1001,
            3306,
        ));
        // Listed already (by uid): not proposed again.
        o.add(&record_with(
            "would-deny",
            "connect",
            Some("mysql"),
            "bob",
            1007,
            3306,
        ));
        o.add(&record_with(
            "would-deny",
            "connect",
            Some("redis"),
            "guest",
            1009,
            6379,
        ));
        o.add(&record_with(
            "would-deny",
            "connect",
            None,
            "carol",
            1010,
            8080,
        ));
        let proposals = o.proposals(Some(&base), &["1009".into()]);
        let words: Vec<String> = proposals.iter().map(ToString::to_string).collect();
        assert_eq!(proposals.len(), 3, "{words:#?}");
        assert!(
            words[0].starts_with("+ mariadb: allow_users += \"alice\""),
            "{words:#?}"
        );
        assert!(
            words[1].starts_with("? carol reached 8080/tcp"),
            "{words:#?}"
        );
        assert!(words[2].starts_with("- guest left out"), "{words:#?}");
        let merged = o.merged(&base, &proposals, false);
        assert!(
            merged.contains("# renamed from mysql"),
            "comments stay: {merged}"
        );
        assert!(
            merged.contains("\"alice\", # learned: 1 attempt"),
            "{merged}"
        );
        assert!(merged.contains("mode = \"audit\"   # a trial"), "{merged}");
        let (learned, diags) = crate::policy::load("learned.toml", merged.as_str());
        assert!(diags.is_empty(), "{diags:?}\n{merged}");
        let learned = learned.expect("parses");
        assert_eq!(learned.services[0].users.ids.len(), 3, "{merged}");
        assert_eq!(learned.services[1].users.ids.len(), 1, "guest stays out");
        let enforced = o.merged(&base, &proposals, true);
        let (learned, _) = crate::policy::load("learned.toml", enforced.as_str());
        let learned = learned.expect("parses");
        assert_eq!(learned.mode, crate::policy::Mode::Enforce, "{enforced}");
        assert_eq!(
            learned.services[1].mode,
            crate::policy::Mode::Enforce,
            "{enforced}"
        );
    }

    #[test]
    fn what_a_log_says_cannot_write_toml() {
        // A timestamp with a newline would end the comment and add users.
        let mut r = record_with("would-deny", "connect", Some("db"), "alice", 1001, 5432);
        r.timestamp = "2026-11-30T00:00:00Z\n    \"mallory\", \"root\", # ".into();
        let mut o = Observed::default();
        o.add(&r);
        let (base, _) = crate::policy::load(
            "p.toml",
            "version = 1\n[[service]]\nname = \"db\"\nport = 5432\nallow_users = [\"postgres\"]\n",
        );
        let base = base.expect("parses");
        let merged = o.merged(&base, &o.proposals(Some(&base), &[]), false);
        let (learned, diags) = crate::policy::load("l.toml", merged.as_str());
        assert!(diags.is_empty(), "{diags:?}\n{merged}");
        assert_eq!(
            learned.expect("parses").services[0].users.ids.len(),
            2,
            "{merged}"
        );
        // A recorded service name with a quote is not written as a name,
        // and a long multibyte one does not panic.
        let mut o = Observed::default();
        let evil = "x\"\nallow_groups = [\"wheel\"] #";
        o.add(&record_with(
            "would-deny",
            "connect",
            Some(evil),
            "alice",
            1001,
            5432,
        ));
        let long = "a".to_string() + &"\u{e9}".repeat(10);
        o.add(&record_with(
            "would-deny",
            "connect",
            Some(&long),
            "alice",
            1001,
            5433,
        ));
        o.add(&record_with(
            "would-deny",
            "connect",
            Some(&long),
            "alice",
            1001,
            5434,
        ));
        let text = o.policy("log", &Options::default());
        let (learned, diags) = crate::policy::load("l.toml", text.as_str());
        assert!(diags.is_empty(), "{diags:?}\n{text}");
        assert!(
            !text
                .lines()
                .any(|l| l.trim_start().starts_with("allow_groups")),
            "{text}"
        );
        assert!(learned
            .expect("parses")
            .services
            .iter()
            .all(|s| s.groups.ids.is_empty()));
    }

    #[test]
    fn a_name_that_now_guards_another_port_is_not_trusted() {
        // `db` moved to 3306; what was reached on 5432 is `pg`'s now.
        let (base, _) = crate::policy::load(
            "p.toml",
            "version = 1\n[[service]]\nname = \"pg\"\nport = 5432\nallow_users = [\"root\"]\n[[service]]\nname = \"db\"\nport = 3306\nallow_users = [\"root\"]\n",
        );
        let base = base.expect("parses");
        let mut o = Observed::default();
        o.add(&record_with(
            "would-deny",
            "connect",
            Some("db"),
            "alice",
            1001,
            5432,
        ));
        let p = o.proposals(Some(&base), &[]);
        assert_eq!(p[0].service.as_deref(), Some("pg"), "{p:?}");
    }

    #[test]
    fn what_cannot_be_added_is_said_and_nothing_is_added_twice() {
        let (base, _) = crate::policy::load(
            "p.toml",
            "version = 1\n[[service]]\nname = \"grp\"\nport = 7000\nallow_groups = [\"wheel\"]\n[[service]]\nname = \"range\"\nport = \"5432-5433\"\nallow_users = [\"root\"]\n",
        );
        let base = base.expect("parses");
        let mut o = Observed::default();
        o.add(&record_with(
            "would-deny",
            "connect",
            Some("grp"),
            "alice",
            1001,
            7000,
        ));
        o.add(&record_with(
            "would-deny",
            "connect",
            Some("range"),
            "alice",
            1001,
            5432,
        ));
        o.add(&record_with(
            "would-deny",
            "connect",
            Some("range"),
            "alice",
            1001,
            5433,
        ));
        let mut by_uid = record_with("would-deny", "connect", Some("range"), "alice", 1001, 5433);
        by_uid.user = None;
        o.add(&by_uid);
        let mut bad = record_with("would-deny", "connect", Some("range"), "x", u32::MAX, 5432);
        bad.user = None;
        o.add(&bad);
        let p = o.proposals(Some(&base), &[]);
        let words: Vec<String> = p.iter().map(ToString::to_string).collect();
        assert!(
            words
                .iter()
                .any(|w| w.contains("not added: the service has no allow_users")),
            "{words:#?}"
        );
        assert!(
            words
                .iter()
                .any(|w| w.contains("cannot be written in a list")),
            "{words:#?}"
        );
        let merged = o.merged(&base, &p, false);
        assert_eq!(merged.matches("learned").count(), 1, "{merged}");
        let (learned, diags) = crate::policy::load("l.toml", merged.as_str());
        assert!(diags.is_empty(), "{diags:?}\n{merged}");
        assert!(learned.is_some());
    }

    #[test]
    fn enforce_switches_a_mode_however_it_is_spelled() {
        let (base, _) = crate::policy::load(
            "p.toml",
            "version = 1\nmode = \"\\u0061udit\"\n[[service]]\nname = \"db\"\nport = 5432\nallow_users = [\"root\"]\n",
        );
        let base = base.expect("parses");
        assert_eq!(base.mode, crate::policy::Mode::Audit);
        let merged = Observed::default().merged(&base, &[], true);
        let (learned, _) = crate::policy::load("l.toml", merged.as_str());
        assert_eq!(
            learned.expect("parses").mode,
            crate::policy::Mode::Enforce,
            "{merged}"
        );
    }
}
