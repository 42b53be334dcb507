//! The change in *access* between two policy files, as a reviewer of a
//! pull request needs it: who gains or loses access to which service,
//! services added or removed, what a service matches widened or narrowed,
//! enforcement weakened, bind guards dropped, the default changed.
//!
//! Computed offline from the parsed policies (names stay names: an added
//! group is `group dbadmins`, whoever is in it), services matched by name.
//! A change that alters no access (services reordered, comments, a user
//! list reordered, `log_allowed`) is no change.

use std::collections::BTreeSet;

use serde::Serialize;

use crate::policy::{
    AddrSet, IdList, ListKind, Mode, Policy, PortRange, Protocol, Service, Verdict,
};

/// One identity as a policy names it: `user alice`, `uid 1000`,
/// `group dbadmins`, `gid 27`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(into = "String")]
pub struct Identity(String);

impl From<Identity> for String {
    fn from(i: Identity) -> String {
        i.0
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn identities(users: &IdList, groups: &IdList) -> BTreeSet<Identity> {
    let mut out = BTreeSet::new();
    for (id, _) in users.iter() {
        out.insert(Identity(match id {
            crate::policy::IdRef::Name(n) => format!("user {n}"),
            crate::policy::IdRef::Id(i) => format!("uid {i}"),
        }));
    }
    for (id, _) in groups.iter() {
        out.insert(Identity(match id {
            crate::policy::IdRef::Name(n) => format!("group {n}"),
            crate::policy::IdRef::Id(i) => format!("gid {i}"),
        }));
    }
    out
}

/// Everyone a service's allow- or deny-list names: users, groups, cgroups
/// (`cgroup system.slice/x.service`) and units (`unit grafana.service`).
fn list_identities(s: &Service) -> BTreeSet<Identity> {
    let mut out = identities(&s.users, &s.groups);
    out.extend(
        s.cgroups
            .iter()
            .map(|(p, _)| Identity(format!("cgroup {p}"))),
    );
    out.extend(s.units.iter().map(|(u, _)| Identity(format!("unit {u}"))));
    out
}

/// How what a service matches changed along one dimension.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Matches more than before (and all it did).
    Widened,
    /// Matches less than before (and nothing new).
    Narrowed,
    /// Matches other things: some more, some less.
    Moved,
}

/// A before and after, with how it changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Changed<T> {
    pub old: T,
    pub new: T,
    pub change: Scope,
}

/// What happened to one service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceChange {
    Added,
    Removed,
    Changed,
}

/// The change to one service's access.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceDiff {
    pub name: String,
    /// The service's name before, when it was renamed (what it matches is
    /// unchanged): access is compared across the rename.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub renamed_from: Option<String>,
    pub change: ServiceChange,
    /// What it matches, as `tcp/5432 on loopback` (the new one, or the old
    /// one for a removed service).
    pub matches: String,
    /// Identities that may now reach it and could not before (an allow-list
    /// entry added, a deny-list entry removed).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub gains: Vec<Identity>,
    /// Identities that could reach it and no longer may.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub loses: Vec<Identity>,
    /// The list switched between allow- and deny-list: who may reach it is
    /// turned around.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub list: Option<(ListKind, ListKind)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ports: Option<Changed<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub addresses: Option<Changed<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Changed<Protocol>>,
    /// `enforce` -> `audit` weakens: refusals are only logged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<(Mode, Mode)>,
    /// The bind guard: dropped, added, or who may bind changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bind: Option<BindDiff>,
    /// For an added or removed service: its list and who is on it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listed: Option<Listed>,
    /// Whether this change opens access (see [`AccessDiff::weakenings`]).
    pub weakens: bool,
}

/// A service's list as a whole.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Listed {
    pub kind: ListKind,
    pub who: Vec<Identity>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BindDiff {
    /// `dropped` (anyone may bind its ports now), `added`, or `changed`.
    pub change: ServiceChange,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub gains: Vec<Identity>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub loses: Vec<Identity>,
}

/// Everything that changes in access from one policy to the next.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AccessDiff {
    pub old: String,
    pub new: String,
    /// Whether access changes at all (the exit code says the same).
    pub changed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default: Option<(Verdict, Verdict)>,
    /// The policy-wide mode (the default's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<(Mode, Mode)>,
    pub services: Vec<ServiceDiff>,
    /// The new policy's default (scope changes are judged against it).
    #[serde(skip)]
    pub default_now: Verdict,
}

fn scope_of(widens: bool, narrows: bool) -> Scope {
    match (widens, narrows) {
        (true, false) => Scope::Widened,
        (false, true) => Scope::Narrowed,
        _ => Scope::Moved,
    }
}

fn ports_change(old: PortRange, new: PortRange) -> Option<Changed<String>> {
    (old != new).then(|| {
        let covers = |a: PortRange, b: PortRange| a.first <= b.first && b.last <= a.last;
        Changed {
            old: old.to_string(),
            new: new.to_string(),
            change: scope_of(covers(new, old), covers(old, new)),
        }
    })
}

fn addresses_change(old: &AddrSet, new: &AddrSet) -> Option<Changed<String>> {
    (old != new).then(|| {
        let covers = |a: &AddrSet, b: &AddrSet| match (a, b) {
            (AddrSet::Loopback, _) => true,
            (AddrSet::Nets(_), AddrSet::Loopback) => false,
            (AddrSet::Nets(outer), AddrSet::Nets(inner)) => {
                inner.iter().all(|i| outer.iter().any(|o| o.contains(i)))
            }
        };
        Changed {
            old: old.to_string(),
            new: new.to_string(),
            change: scope_of(covers(new, old), covers(old, new)),
        }
    })
}

fn protocol_change(old: Protocol, new: Protocol) -> Option<Changed<Protocol>> {
    (old != new).then_some(Changed {
        old,
        new,
        change: match (old, new) {
            (_, Protocol::Any) => Scope::Widened,
            (Protocol::Any, _) => Scope::Narrowed,
            _ => Scope::Moved,
        },
    })
}

fn bind_change(old: &Service, new: &Service) -> Option<BindDiff> {
    let ids = |s: &Service| s.bind.as_ref().map(|b| identities(&b.users, &b.groups));
    match (ids(old), ids(new)) {
        (None, None) => None,
        (Some(_), None) => Some(BindDiff {
            change: ServiceChange::Removed,
            gains: Vec::new(),
            loses: Vec::new(),
        }),
        (None, Some(_)) => Some(BindDiff {
            change: ServiceChange::Added,
            gains: Vec::new(),
            loses: Vec::new(),
        }),
        (Some(a), Some(b)) if a == b => None,
        (Some(a), Some(b)) => Some(BindDiff {
            change: ServiceChange::Changed,
            gains: b.difference(&a).cloned().collect(),
            loses: a.difference(&b).cloned().collect(),
        }),
    }
}

fn service_change(old: &Service, new: &Service) -> Option<ServiceDiff> {
    let renamed_from = (old.name != new.name).then(|| old.name.clone());
    let (was, now) = (list_identities(old), list_identities(new));
    let (mut gains, mut loses, mut list) = (Vec::new(), Vec::new(), None);
    if old.list != new.list {
        list = Some((old.list, new.list));
    } else {
        let added: Vec<Identity> = now.difference(&was).cloned().collect();
        let removed: Vec<Identity> = was.difference(&now).cloned().collect();
        // An allow-list entry grants; a deny-list entry takes away.
        (gains, loses) = match new.list {
            ListKind::Allow => (added, removed),
            ListKind::Deny => (removed, added),
        };
    }
    let d = ServiceDiff {
        name: new.name.clone(),
        renamed_from,
        change: ServiceChange::Changed,
        matches: new.describe(),
        gains,
        loses,
        list,
        ports: ports_change(old.ports, new.ports),
        addresses: addresses_change(&old.addresses, &new.addresses),
        protocol: protocol_change(old.protocol, new.protocol),
        mode: (old.mode != new.mode).then_some((old.mode, new.mode)),
        bind: bind_change(old, new),
        listed: if old.list == new.list {
            None
        } else {
            Some(Listed {
                kind: new.list,
                who: now.iter().cloned().collect(),
            })
        },
        weakens: false,
    };
    let unchanged = d.renamed_from.is_none() && !service_change_beyond_rename(&d);
    (!unchanged).then_some(d)
}

/// Whether a changed service's diff says more than its rename.
fn service_change_beyond_rename(d: &ServiceDiff) -> bool {
    !(d.gains.is_empty()
        && d.loses.is_empty()
        && d.list.is_none()
        && d.ports.is_none()
        && d.addresses.is_none()
        && d.protocol.is_none()
        && d.mode.is_none()
        && d.bind.is_none())
}

fn whole(s: &Service, change: ServiceChange) -> ServiceDiff {
    ServiceDiff {
        name: s.name.clone(),
        renamed_from: None,
        change,
        matches: s.describe(),
        gains: Vec::new(),
        loses: Vec::new(),
        list: None,
        ports: None,
        addresses: None,
        protocol: None,
        mode: None,
        bind: None,
        listed: Some(Listed {
            kind: s.list,
            who: list_identities(s).into_iter().collect(),
        }),
        weakens: false,
    }
}

/// Whether a change in what a service matches opens access: under an
/// `allow` default a service restricts, so matching less (or other
/// things) opens; under `deny` it grants, so matching more does.
fn scope_opens(default: Verdict, change: Scope) -> bool {
    match default {
        Verdict::Allow => change != Scope::Widened,
        Verdict::Deny => change != Scope::Narrowed,
    }
}

/// Whether a change to one service opens access, judged against the
/// default of the new policy: under `allow`, a service restricts, so
/// removing it or narrowing what it matches opens; under `deny`, a
/// service grants, so adding it or widening it opens. A deny-list service
/// grants everyone it does not name, so adding one opens under any
/// default (it may sit inside a stricter service). Gains, a list turned
/// around, enforce -> audit and a bind guard dropped or widened always
/// open.
fn weakens(d: &ServiceDiff, default: Verdict) -> bool {
    let scope = |c: &Option<Changed<String>>| c.as_ref().map(|c| c.change);
    let protocol = d.protocol.as_ref().map(|c| c.change);
    let scope_opens = [scope(&d.ports), scope(&d.addresses), protocol]
        .into_iter()
        .flatten()
        .any(|c| scope_opens(default, c));
    match d.change {
        ServiceChange::Added => {
            default == Verdict::Deny || d.listed.as_ref().is_some_and(|l| l.kind == ListKind::Deny)
        }
        ServiceChange::Removed => default == Verdict::Allow,
        ServiceChange::Changed => {
            !d.gains.is_empty()
                || d.list.is_some()
                || scope_opens
                || matches!(d.mode, Some((Mode::Enforce, Mode::Audit)))
                || d.bind
                    .as_ref()
                    .is_some_and(|b| b.change == ServiceChange::Removed || !b.gains.is_empty())
        }
    }
}

/// The access diff from `old` to `new`. Linear in the number of services
/// (services are paired by name through a map, then renames by what they
/// match: [`crate::plan_diff::pair`]).
pub fn diff(old: &Policy, new: &Policy) -> AccessDiff {
    use crate::plan_diff::{pair, Pair};
    // A service gone by name whose match (protocol, ports, addresses) a
    // new name has: a rename, compared across (the pairing the plan diff
    // uses).
    let key = |s: &Service| format!("{:?} {} {}", s.protocol, s.ports, s.addresses);
    let mut services: Vec<ServiceDiff> = Vec::new();
    for p in pair(&old.services, &new.services, |s| &s.name, Some(&key)) {
        match p {
            Pair::Removed(o) => services.push(whole(o, ServiceChange::Removed)),
            Pair::Added(s) => services.push(whole(s, ServiceChange::Added)),
            Pair::Kept { old: o, new: s } => services.extend(service_change(o, s)),
        }
    }
    for d in &mut services {
        d.weakens = weakens(d, new.default);
    }
    let default = (old.default != new.default).then_some((old.default, new.default));
    let mode = (old.mode != new.mode).then_some((old.mode, new.mode));
    // A rename alone changes no one's access.
    let access_changes = services
        .iter()
        .any(|d| d.change != ServiceChange::Changed || service_change_beyond_rename(d));
    AccessDiff {
        old: old.file.clone(),
        new: new.file.clone(),
        changed: default.is_some() || mode.is_some() || access_changes,
        default,
        mode,
        services,
        default_now: new.default,
    }
}

impl AccessDiff {
    /// One line per change, for a terminal.
    pub fn human(&self) -> String {
        if !self.changed {
            // Renames, if any, are said: the services they are.
            let mut out = format!("no change in access from {} to {}\n", self.old, self.new);
            for line in self.lines() {
                out.push_str(&line);
                out.push('\n');
            }
            return out;
        }
        let mut out = format!("access changes from {} to {}:\n", self.old, self.new);
        for line in self.lines() {
            out.push_str(&line);
            out.push('\n');
        }
        out
    }

    /// A Markdown summary for a pull-request comment (`--format github`).
    pub fn markdown(&self) -> String {
        if !self.changed {
            return format!(
                "### loopguard: no change in access\n\n`{}` → `{}`: who may reach which service is unchanged.\n",
                self.old, self.new
            );
        }
        let weakened = self.weakenings();
        let mut out = format!(
            "### loopguard: access changes\n\n`{}` → `{}`{}\n\n",
            self.old,
            self.new,
            if weakened > 0 {
                format!(
                    " — **{weakened} weakening{}**",
                    if weakened == 1 { "" } else { "s" }
                )
            } else {
                String::new()
            }
        );
        for line in self.lines() {
            out.push_str(&format!("- {}\n", line.trim_start()));
        }
        out
    }

    /// Changes that open access or loosen enforcement: the default made
    /// `allow`, enforce -> audit, and each service whose change opens
    /// access ([`ServiceDiff::weakens`]).
    pub fn weakenings(&self) -> usize {
        usize::from(matches!(self.default, Some((_, Verdict::Allow))))
            + usize::from(matches!(self.mode, Some((Mode::Enforce, Mode::Audit))))
            + self.services.iter().filter(|s| s.weakens).count()
    }

    fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some((a, b)) = self.default {
            out.push(format!("~ default {a} -> {b} (traffic no service matches)"));
        }
        if let Some((a, b)) = self.mode {
            let how = if b == Mode::Audit {
                ": WEAKENED, refusals only logged"
            } else {
                ""
            };
            out.push(format!("~ mode {a} -> {b}{how}"));
        }
        let list = |ids: &[Identity]| {
            ids.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let opens = |c: Scope| {
            if scope_opens(self.default_now, c) {
                ": OPENS ACCESS"
            } else {
                ""
            }
        };
        for s in &self.services {
            let (sign, what) = match s.change {
                ServiceChange::Added => ("+", "added"),
                ServiceChange::Removed => ("-", "removed"),
                ServiceChange::Changed => ("", ""),
            };
            if !what.is_empty() {
                out.push(format!(
                    "{sign} service {} {what} ({}; {}){}{}",
                    s.name,
                    s.matches,
                    listed_words(s.listed.as_ref()),
                    if s.change == ServiceChange::Removed {
                        ": its traffic falls to the default"
                    } else {
                        ""
                    },
                    if s.weakens { ": OPENS ACCESS" } else { "" }
                ));
                continue;
            }
            let name = &s.name;
            if let Some(was) = &s.renamed_from {
                out.push(format!(
                    "~ service {was} renamed to {name} (it matches {} as before; its counters follow it)",
                    s.matches
                ));
            }
            if !s.gains.is_empty() {
                out.push(format!(
                    "+ {name}: {} gain{} access",
                    list(&s.gains),
                    if s.gains.len() == 1 { "s" } else { "" }
                ));
            }
            if !s.loses.is_empty() {
                out.push(format!(
                    "- {name}: {} lose{} access",
                    list(&s.loses),
                    if s.loses.len() == 1 { "s" } else { "" }
                ));
            }
            if let Some((a, b)) = s.list {
                out.push(format!(
                    "~ {name}: {a}-list -> {b}-list (who may reach it is turned around; now {})",
                    listed_words(s.listed.as_ref())
                ));
            }
            if let Some(p) = &s.ports {
                out.push(format!(
                    "~ {name}: ports {} -> {} ({}){}",
                    p.old,
                    p.new,
                    scope_word(p.change),
                    opens(p.change)
                ));
            }
            if let Some(a) = &s.addresses {
                out.push(format!(
                    "~ {name}: addresses {} -> {} ({}){}",
                    a.old,
                    a.new,
                    scope_word(a.change),
                    opens(a.change)
                ));
            }
            if let Some(p) = &s.protocol {
                out.push(format!(
                    "~ {name}: protocol {} -> {} ({}){}",
                    p.old,
                    p.new,
                    scope_word(p.change),
                    opens(p.change)
                ));
            }
            if let Some((a, b)) = s.mode {
                let how = if b == Mode::Audit {
                    ": WEAKENED, refusals only logged"
                } else {
                    ""
                };
                out.push(format!("~ {name}: mode {a} -> {b}{how}"));
            }
            if let Some(b) = &s.bind {
                match b.change {
                    ServiceChange::Removed => out.push(format!(
                        "- {name}: bind guard DROPPED (any user may listen on its ports)"
                    )),
                    ServiceChange::Added => out.push(format!("+ {name}: bind guard added")),
                    ServiceChange::Changed => {
                        if !b.gains.is_empty() {
                            out.push(format!(
                                "+ {name}: {} may now bind its ports",
                                list(&b.gains)
                            ));
                        }
                        if !b.loses.is_empty() {
                            out.push(format!(
                                "- {name}: {} may no longer bind its ports",
                                list(&b.loses)
                            ));
                        }
                    }
                }
            }
        }
        out
    }
}

/// `allow-list of user app, group dbadmins`, `deny-list of nobody`.
fn listed_words(l: Option<&Listed>) -> String {
    match l {
        None => String::new(),
        Some(l) if l.who.is_empty() => format!("an empty {}-list", l.kind),
        Some(l) => format!(
            "{}-list of {}",
            l.kind,
            l.who
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn scope_word(s: Scope) -> &'static str {
    match s {
        Scope::Widened => "widened",
        Scope::Narrowed => "narrowed",
        Scope::Moved => "moved",
    }
}
