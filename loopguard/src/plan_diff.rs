//! One typed diff of two compiled plans, service by service, in linear
//! time (services keyed by name in a map; sorted uid lists walked side by
//! side). `apply --dry-run` and the daemon's membership log render from
//! it; its service pairing ([`pair`]: by name, then renames by what a
//! service matches) is also what `diff` (the access diff of two policy
//! files) and the counters' carry-over across a rename use.

use std::collections::HashMap;

use crate::{
    compile::{Plan, PlanService},
    policy::ResolvedCgroup,
};

/// How a listed cgroup changed between two plans.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CgroupChange {
    /// Listed now, not before.
    Listed { path: String, id: Option<u64> },
    /// Listed before, not now.
    Unlisted { path: String, id: Option<u64> },
    /// It exists now (it did not when the old plan was compiled).
    Appeared { path: String, id: u64 },
    /// It existed and is gone.
    Gone { path: String, id: u64 },
    /// It was removed and made again: a new id.
    MadeAgain { path: String, was: u64, now: u64 },
}

/// One service's change.
#[derive(Debug)]
pub enum ServiceChange<'a> {
    Added(&'a PlanService),
    Removed(&'a PlanService),
    Changed(Box<ServiceDelta<'a>>),
}

/// A service in both plans, with what differs.
#[derive(Debug)]
pub struct ServiceDelta<'a> {
    pub old: &'a PlanService,
    pub new: &'a PlanService,
    /// Protocol, ports, addresses, list kind, mode or logging differ.
    pub shape: bool,
    pub uids_added: Vec<u32>,
    pub uids_removed: Vec<u32>,
    pub cgroups: Vec<CgroupChange>,
    /// The bind guard's uids differ (or it came or went).
    pub bind: bool,
}

/// Everything that differs from `old` to `new`.
#[derive(Debug)]
pub struct PlanDiff<'a> {
    pub old: &'a Plan,
    pub new: &'a Plan,
    /// The default verdict or mode differ.
    pub defaults: bool,
    /// Removed services first (in the old plan's order), then added and
    /// changed ones (in the new plan's order).
    pub services: Vec<ServiceChange<'a>>,
}

/// The uids of `s` in `p`.
pub fn uids<'p>(p: &'p Plan, s: &PlanService) -> &'p [u32] {
    p.uid_sets
        .get(s.uid_set as usize)
        .map_or(&[], Vec::as_slice)
}

/// The cgroups of `s` in `p`.
pub fn cgroups<'p>(p: &'p Plan, s: &PlanService) -> &'p [ResolvedCgroup] {
    p.cgroup_sets
        .get(s.uid_set as usize)
        .map_or(&[], Vec::as_slice)
}

fn bind_uids<'p>(p: &'p Plan, s: &PlanService) -> Option<&'p [u32]> {
    s.bind_set
        .and_then(|b| p.uid_sets.get(b as usize))
        .map(Vec::as_slice)
}

/// `a - b` and `b - a` of two sorted lists, in one walk.
fn sorted_difference(a: &[u32], b: &[u32]) -> (Vec<u32>, Vec<u32>) {
    let (mut only_a, mut only_b) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) if x == y => {
                i += 1;
                j += 1;
            }
            (Some(x), Some(y)) if x < y => {
                only_a.push(*x);
                i += 1;
            }
            (Some(x), None) => {
                only_a.push(*x);
                i += 1;
            }
            (_, Some(y)) => {
                only_b.push(*y);
                j += 1;
            }
            (None, None) => break,
        }
    }
    (only_a, only_b)
}

fn cgroup_changes(old: &[ResolvedCgroup], new: &[ResolvedCgroup]) -> Vec<CgroupChange> {
    let was: HashMap<&str, Option<u64>> = old.iter().map(|c| (c.path.as_str(), c.id)).collect();
    let now: HashMap<&str, Option<u64>> = new.iter().map(|c| (c.path.as_str(), c.id)).collect();
    let mut out = Vec::new();
    for c in new {
        let path = c.path.to_string();
        out.extend(match (was.get(c.path.as_str()), c.id) {
            (None, id) => Some(CgroupChange::Listed { path, id }),
            (Some(None), Some(id)) => Some(CgroupChange::Appeared { path, id }),
            (Some(Some(id)), None) => Some(CgroupChange::Gone { path, id: *id }),
            (Some(Some(a)), Some(b)) if *a != b => Some(CgroupChange::MadeAgain {
                path,
                was: *a,
                now: b,
            }),
            _ => None,
        });
    }
    for c in old.iter().filter(|c| !now.contains_key(c.path.as_str())) {
        out.push(CgroupChange::Unlisted {
            path: c.path.to_string(),
            id: c.id,
        });
    }
    out
}

/// How one service of two versions (of a plan or a policy) pairs up.
#[derive(Debug)]
pub enum Pair<'a, S> {
    /// Only in the old version.
    Removed(&'a S),
    /// Only in the new one.
    Added(&'a S),
    /// In both: by name, or renamed (the names differ).
    Kept { old: &'a S, new: &'a S },
}

/// Pairs the services of two versions: by name, through a map (linear),
/// then, with `rename_key`, a service gone by name with a new one whose
/// key (what it matches: protocol, ports, addresses) is the same, each
/// once. Removed ones first (in the old order), then the rest in the new
/// order. The one pairing the dry run, the daemon's membership log and
/// `diff` share.
pub fn pair<'a, S>(
    old: &'a [S],
    new: &'a [S],
    name: impl Fn(&S) -> &str,
    rename_key: Option<&dyn Fn(&S) -> String>,
) -> Vec<Pair<'a, S>> {
    let old_by_name: HashMap<&str, &S> = old.iter().map(|s| (name(s), s)).collect();
    let new_names: std::collections::HashSet<&str> = new.iter().map(&name).collect();
    // Gone by name, by what they match (first ones popped first).
    let mut gone: HashMap<String, Vec<&S>> = HashMap::new();
    if let Some(key) = rename_key {
        for s in old.iter().rev().filter(|s| !new_names.contains(name(s))) {
            gone.entry(key(s)).or_default().push(s);
        }
    }
    let mut kept_or_added = Vec::new();
    let mut renamed: std::collections::HashSet<&str> = std::collections::HashSet::new();
    for s in new {
        match old_by_name.get(name(s)) {
            Some(o) => kept_or_added.push(Pair::Kept { old: *o, new: s }),
            None => match rename_key.and_then(|key| gone.get_mut(&key(s))?.pop()) {
                Some(o) => {
                    renamed.insert(name(o));
                    kept_or_added.push(Pair::Kept { old: o, new: s });
                }
                None => kept_or_added.push(Pair::Added(s)),
            },
        }
    }
    let mut out: Vec<Pair<'a, S>> = old
        .iter()
        .filter(|s| !new_names.contains(name(s)) && !renamed.contains(name(s)))
        .map(Pair::Removed)
        .collect();
    out.extend(kept_or_added);
    out
}

/// What a plan's service matches, as a rename key.
fn matches(s: &PlanService) -> String {
    format!("{:?} {} {}", s.protocol, s.ports, s.addresses)
}

/// Services of `new` that are a service of `old` renamed: the name is
/// gone from `old` and new in `new`, and what it matches (protocol, ports,
/// addresses) is the same. By new name, the old one; each pairs once.
pub fn renames(old: &Plan, new: &Plan) -> HashMap<String, String> {
    pair(&old.services, &new.services, |s| &s.name, Some(&matches))
        .into_iter()
        .filter_map(|p| match p {
            Pair::Kept { old, new } if old.name != new.name => {
                Some((new.name.clone(), old.name.clone()))
            }
            _ => None,
        })
        .collect()
}

/// What differs from `old` to `new`.
pub fn diff<'a>(old: &'a Plan, new: &'a Plan) -> PlanDiff<'a> {
    let mut services: Vec<ServiceChange<'a>> = Vec::new();
    // By name: a renamed service is another one to the kernel.
    for p in pair(&old.services, &new.services, |s| &s.name, None) {
        let (o, s) = match p {
            Pair::Removed(o) => {
                services.push(ServiceChange::Removed(o));
                continue;
            }
            Pair::Added(s) => {
                services.push(ServiceChange::Added(s));
                continue;
            }
            Pair::Kept { old: o, new: s } => (o, s),
        };
        let (uids_added, uids_removed) = sorted_difference(uids(new, s), uids(old, o));
        let delta = ServiceDelta {
            old: o,
            new: s,
            shape: o.ports != s.ports
                || o.protocol != s.protocol
                || o.addresses != s.addresses
                || o.list != s.list
                || o.mode != s.mode
                || o.log_allowed != s.log_allowed,
            uids_added,
            uids_removed,
            cgroups: cgroup_changes(cgroups(old, o), cgroups(new, s)),
            bind: bind_uids(old, o) != bind_uids(new, s),
        };
        if delta.shape
            || delta.bind
            || !delta.uids_added.is_empty()
            || !delta.uids_removed.is_empty()
            || !delta.cgroups.is_empty()
        {
            services.push(ServiceChange::Changed(Box::new(delta)));
        }
    }
    PlanDiff {
        old,
        new,
        defaults: old.default != new.default || old.mode != new.mode,
        services,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorted_difference_walks_both_lists_once() {
        assert_eq!(
            sorted_difference(&[1, 2, 4, 9], &[2, 3, 4, 10]),
            (vec![1, 9], vec![3, 10])
        );
        assert_eq!(sorted_difference(&[], &[5]), (vec![], vec![5]));
        assert_eq!(sorted_difference(&[5], &[]), (vec![5], vec![]));
    }

    #[test]
    fn ten_thousand_services_diff_in_linear_time() {
        let plan = |extra: u32| {
            let mut p = crate::compile::tests_support::empty_plan();
            for i in 0..10_000u32 {
                p.uid_sets.push(vec![i, i + extra]);
                p.services
                    .push(crate::compile::tests_support::service(&format!("s{i}"), i));
            }
            p
        };
        let (old, new) = (plan(1), plan(2));
        let started = std::time::Instant::now();
        let d = diff(&old, &new);
        assert_eq!(d.services.len(), 10_000);
        // A quadratic diff takes seconds here; the linear one milliseconds.
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        let ServiceChange::Changed(c) = &d.services[0] else {
            panic!("service s0 should be changed");
        };
        assert_eq!(
            (c.uids_added.as_slice(), c.uids_removed.as_slice()),
            (&[2u32][..], &[1u32][..])
        );
    }

    #[test]
    fn pairs_by_name_then_renames_by_what_they_match() {
        let mut old = crate::compile::tests_support::empty_plan();
        let mut new = crate::compile::tests_support::empty_plan();
        old.uid_sets.push(vec![1]);
        new.uid_sets.push(vec![1]);
        old.services
            .push(crate::compile::tests_support::service("mysql", 0));
        old.services
            .push(crate::compile::tests_support::service("gone", 0));
        old.services[1].ports.first = 1;
        new.services
            .push(crate::compile::tests_support::service("mariadb", 0));
        assert_eq!(
            renames(&old, &new),
            [("mariadb".to_string(), "mysql".to_string())]
                .into_iter()
                .collect()
        );
        // The plan diff itself goes by name: another service to the kernel.
        let d = diff(&old, &new);
        let words: Vec<String> = d
            .services
            .iter()
            .map(|c| match c {
                ServiceChange::Removed(s) => format!("-{}", s.name),
                ServiceChange::Added(s) => format!("+{}", s.name),
                ServiceChange::Changed(d) => format!("~{}", d.new.name),
            })
            .collect();
        assert_eq!(words, ["-mysql", "-gone", "+mariadb"]);
    }
}
