//! One typed diff of two compiled plans, service by service, in linear
//! time (services keyed by name in a map; sorted uid lists walked side by
//! side). `apply --dry-run` and the daemon's
//! membership log render from it.

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

/// Services of `new` that are a service of `old` renamed: the name is
/// gone from `old` and new in `new`, and what it matches (protocol, ports,
/// addresses) is the same. By new name, the old one; each pairs once.
pub fn renames(old: &Plan, new: &Plan) -> HashMap<String, String> {
    let new_names: std::collections::HashSet<&str> =
        new.services.iter().map(|s| s.name.as_str()).collect();
    let old_names: std::collections::HashSet<&str> =
        old.services.iter().map(|s| s.name.as_str()).collect();
    let key = |s: &PlanService| format!("{:?} {} {}", s.protocol, s.ports, s.addresses);
    let mut gone: HashMap<_, Vec<&str>> = HashMap::new();
    for s in old.services.iter().rev() {
        if !new_names.contains(s.name.as_str()) {
            gone.entry(key(s)).or_default().push(&s.name);
        }
    }
    let mut out = HashMap::new();
    for s in &new.services {
        if old_names.contains(s.name.as_str()) {
            continue;
        }
        if let Some(was) = gone.get_mut(&key(s)).and_then(Vec::pop) {
            out.insert(s.name.clone(), was.to_string());
        }
    }
    out
}

/// What differs from `old` to `new`.
pub fn diff<'a>(old: &'a Plan, new: &'a Plan) -> PlanDiff<'a> {
    let old_by_name: HashMap<&str, &PlanService> =
        old.services.iter().map(|s| (s.name.as_str(), s)).collect();
    let new_names: std::collections::HashSet<&str> =
        new.services.iter().map(|s| s.name.as_str()).collect();
    let mut services: Vec<ServiceChange<'a>> = old
        .services
        .iter()
        .filter(|s| !new_names.contains(s.name.as_str()))
        .map(ServiceChange::Removed)
        .collect();
    for s in &new.services {
        let Some(o) = old_by_name.get(s.name.as_str()) else {
            services.push(ServiceChange::Added(s));
            continue;
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
}
