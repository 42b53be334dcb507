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
    /// Takes one record of the audit stream.
    pub fn add(&mut self, r: &AuditRecord) {
        if !matches!(r.action, AuditAction::WouldDeny | AuditAction::Allow) {
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
                first: r.timestamp.clone(),
                last: r.timestamp.clone(),
            });
        seen.attempts += 1;
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
        let ports_of: BTreeMap<&Option<String>, usize> =
            self.targets.keys().fold(BTreeMap::new(), |mut m, t| {
                *m.entry(&t.service).or_default() += 1;
                m
            });
        let mut names = std::collections::HashSet::new();
        for (t, seen) in &self.targets {
            let udp = if t.protocol == Transport::Udp {
                "-udp"
            } else {
                ""
            };
            let base = match &t.service {
                Some(s) if ports_of.get(&t.service) == Some(&1) => s.clone(),
                Some(s) => format!("{}-{}{udp}", &s[..s.len().min(20)], t.port),
                None => format!("port-{}{udp}", t.port),
            };
            let mut name = base.clone();
            let mut n = 2;
            while !names.insert(name.clone()) {
                name = format!("{}-{n}", &base[..base.len().min(28)]);
                n += 1;
            }
            out.push_str(&format!(
                "\n[[service]]\nname = \"{name}\"\nport = {}\nprotocol = \"{}\"\nallow_users = [\n",
                t.port,
                t.protocol.as_str()
            ));
            for (who, s) in seen {
                let entry = match who {
                    Who::User(n) => format!("\"{}\"", n.replace('\\', "\\\\").replace('"', "\\\"")),
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
                let listed = service.is_some_and(|svc| {
                    svc.users.iter().any(|(id, _)| match (id, who) {
                        (crate::policy::IdRef::Name(a), Who::User(b)) => a == b,
                        (crate::policy::IdRef::Id(a), Who::Uid(b)) => a == b,
                        _ => false,
                    })
                });
                let change = match service {
                    Some(svc) if svc.list == ListKind::Allow && !listed => Change::AddToAllowList,
                    Some(svc) if svc.list == ListKind::Deny => Change::OnDenyList,
                    Some(_) => continue,
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
