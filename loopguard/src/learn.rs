//! From an audit-mode trial to an enforcing policy: the allow-lists that
//! would have let exactly the observed traffic through. Input is the audit
//! stream `run` writes: `would-deny` records (refused in enforce mode) and
//! `allow` records (`log_allowed`); what nobody tried stays closed.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{
    audit::{AuditAction, AuditRecord},
    policy::{ListKind, Policy, Transport},
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

/// How often, and when, one identity reached one destination.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Seen {
    pub attempts: u64,
    /// Of those, refused in enforce mode (the rest were allowed).
    pub would_deny: u64,
    pub first: String,
    pub last: String,
}

/// One destination the trial saw traffic to: the policy's service that
/// decided (none: the default), and the port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Target {
    pub service: Option<String>,
    pub protocol: Transport,
    pub port: u16,
}

/// Everything observed, by destination and identity.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Observed {
    pub events: u64,
    /// Records that were not attempts (dropped notices) or lacked a
    /// user, port or protocol.
    pub skipped: u64,
    #[serde(serialize_with = "as_list")]
    pub targets: BTreeMap<Target, BTreeMap<Who, Seen>>,
}

fn as_list<S: serde::Serializer>(
    targets: &BTreeMap<Target, BTreeMap<Who, Seen>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Entry<'a> {
        #[serde(flatten)]
        target: &'a Target,
        seen: Vec<(String, &'a Seen)>,
    }
    s.collect_seq(targets.iter().map(|(target, seen)| Entry {
        target,
        seen: seen.iter().map(|(w, s)| (w.to_string(), s)).collect(),
    }))
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
            (Some(name), _) => Who::User(name.clone()),
            (None, Some(uid)) => Who::Uid(uid),
            (None, None) => {
                self.skipped += 1;
                return;
            }
        };
        self.events += 1;
        let target = Target {
            service: r.service.clone(),
            protocol,
            port,
        };
        let seen = self
            .targets
            .entry(target)
            .or_default()
            .entry(who)
            .or_insert(Seen {
                attempts: 0,
                would_deny: 0,
                first: r.timestamp.clone(),
                last: r.timestamp.clone(),
            });
        seen.attempts += 1;
        if r.action == AuditAction::WouldDeny {
            seen.would_deny += 1;
        }
        // RFC 3339 UTC timestamps of one width order as text.
        if r.timestamp < seen.first {
            seen.first = r.timestamp.clone();
        }
        if r.timestamp > seen.last {
            seen.last = r.timestamp.clone();
        }
    }

    /// A policy that lets through exactly what was seen: one service per
    /// (service, port), its identities allowed, enforcing. Ports nobody
    /// tried are not opened; traffic to other ports meets the default
    /// (allow), as before the trial.
    pub fn policy(&self, sources: &str) -> String {
        let mut out = format!(
            "# Learned by `loopguard learn` from {} attempts in {sources}: each\n\
             # service allows exactly the users seen reaching it (counts, first\n\
             # and last seen beside each). Review, then apply.\n\
             version = 1\n",
            self.events
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
            for (who, s) in seen {
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
            let base = match service {
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
            for (who, s) in seen {
                let entry = match who {
                    Who::User(n) if crate::policy::valid_account_name(n) => format!("{n:?}"),
                    Who::User(_) => continue,
                    Who::Uid(u) => u.to_string(),
                };
                out.push_str(&format!(
                    "    {entry}, # {} attempt{}, {} .. {}\n",
                    s.attempts,
                    if s.attempts == 1 { "" } else { "s" },
                    s.first,
                    s.last
                ));
            }
            out.push_str("]\n");
        }
        out
    }

    /// What to add to `policy`'s allow-lists so that what was seen gets
    /// through, one line per service and identity; observations the
    /// policy's lists cannot take (deny-lists, the default) are said too.
    pub fn against(&self, policy: &Policy) -> Vec<Proposal> {
        let mut out = Vec::new();
        for (t, seen) in &self.targets {
            let service = t
                .service
                .as_ref()
                .and_then(|n| policy.services.iter().find(|s| &s.name == n));
            for (who, s) in seen {
                // What got through already needs nothing; a would-deny
                // is what the file must change to let through.
                if s.would_deny == 0 {
                    continue;
                }
                let change = match service {
                    Some(svc) if svc.list == ListKind::Allow => Change::AddToAllowList,
                    Some(_) => Change::OnDenyList,
                    None => Change::NoService,
                };
                out.push(Proposal {
                    service: t.service.clone(),
                    protocol: t.protocol,
                    port: t.port,
                    who: who.to_string(),
                    change,
                    seen: s.clone(),
                });
            }
        }
        out
    }
}

/// One (port, protocol) of a learned policy: the first service name
/// recorded for it, and who was seen.
type Merged<'a> = (Option<&'a String>, BTreeMap<&'a Who, Seen>);

/// What `learn --policy` proposes for one identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Change {
    /// Add it to the service's allow-list.
    AddToAllowList,
    /// The service's deny-list names it: take it off, or accept the
    /// refusals.
    OnDenyList,
    /// No service decided (the default did): add a service, or accept.
    NoService,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Proposal {
    pub service: Option<String>,
    pub protocol: Transport,
    pub port: u16,
    pub who: String,
    pub change: Change,
    pub seen: Seen,
}

impl std::fmt::Display for Proposal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let seen = format!(
            "{} attempt{}, {} .. {}",
            self.seen.attempts,
            if self.seen.attempts == 1 { "" } else { "s" },
            self.seen.first,
            self.seen.last
        );
        let dest = format!("{}/{}", self.port, self.protocol.as_str());
        match (self.change, &self.service) {
            (Change::AddToAllowList, Some(s)) => {
                write!(f, "+ {s}: allow_users += {:?}  ({dest}; {seen})", self.who)
            }
            (Change::OnDenyList, Some(s)) => write!(
                f,
                "! {s}: {} is on its deny-list and was seen ({dest}; {seen})",
                self.who
            ),
            _ => write!(
                f,
                "? {} reached {dest}, which no service guards (the default decided; {seen})",
                self.who
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
        let text = o.policy("log");
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
        let text = o.policy("log");
        let (policy, diags) = crate::policy::load("learned.toml", text.as_str());
        assert!(diags.is_empty(), "{diags:?}\n{text}");
        assert_eq!(policy.expect("parses").services.len(), 2);
    }
}
