//! What an `apply` would change in enforcement, one line each: the
//! dry-run's answer (`apply --dry-run`).

use crate::{
    compile::{Plan, PlanService},
    policy::Protocol,
};

/// What changes from `old` to `new`, one line each.
pub fn describe(old: Option<&Plan>, new: &Plan) -> Vec<String> {
    let mut lines = Vec::new();
    let bind_uids = |p: &Plan, s: &PlanService| s.bind_set.map(|b| p.uid_sets[b as usize].clone());
    let cgroups = |p: &Plan, s: &PlanService| -> Vec<String> {
        p.cgroup_sets
            .get(s.uid_set as usize)
            .map(|c| {
                c.iter()
                    .map(|c| match c.id {
                        Some(id) => format!("{} (id {id})", c.path),
                        None => format!("{} (absent)", c.path),
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let summary = |p: &Plan, s: &PlanService| {
        let bind = match bind_uids(p, s) {
            Some(b) => format!(", bind guard of {} uids", b.len()),
            None => String::new(),
        };
        let cg = cgroups(p, s);
        let cg = if cg.is_empty() {
            String::new()
        } else {
            format!(" and {} cgroups", cg.len())
        };
        format!(
            "{} ({}/{} on {}, {}-list of {} uids{cg}{bind}, {})",
            s.name,
            match s.protocol {
                Protocol::Tcp => "tcp",
                Protocol::Udp => "udp",
                Protocol::Any => "tcp+udp",
            },
            s.ports,
            s.addresses,
            s.list,
            p.uid_sets[s.uid_set as usize].len(),
            s.mode
        )
    };
    let Some(old) = old else {
        lines.push("install: no policy is applied to this instance yet".into());
        for s in &new.services {
            lines.push(format!("+ service {}", summary(new, s)));
        }
        lines.push(format!("  default {}, mode {}", new.default, new.mode));
        return lines;
    };
    if old.hash == new.hash && old == new {
        lines.push("no change: this policy is already applied".into());
        return lines;
    }
    if old.default != new.default || old.mode != new.mode {
        lines.push(
            format!(
                "~ default {} mode {} -> default {} mode {}",
                old.default, old.mode, new.default, new.mode
            )
            .to_lowercase(),
        );
    }
    for s in &old.services {
        if !new.services.iter().any(|n| n.name == s.name) {
            lines.push(format!("- service {}", summary(old, s)));
        }
    }
    for s in &new.services {
        match old.services.iter().find(|o| o.name == s.name) {
            None => lines.push(format!("+ service {}", summary(new, s))),
            Some(o) => {
                let old_uids = &old.uid_sets[o.uid_set as usize];
                let new_uids = &new.uid_sets[s.uid_set as usize];
                let same = o.ports == s.ports
                    && o.protocol == s.protocol
                    && o.addresses == s.addresses
                    && o.list == s.list
                    && o.mode == s.mode
                    && o.log_allowed == s.log_allowed
                    && old_uids == new_uids
                    && cgroups(old, o) == cgroups(new, s)
                    && bind_uids(old, o) == bind_uids(new, s);
                if !same {
                    let added: Vec<String> = new_uids
                        .iter()
                        .filter(|u| !old_uids.contains(u))
                        .map(u32::to_string)
                        .collect();
                    let removed: Vec<String> = old_uids
                        .iter()
                        .filter(|u| !new_uids.contains(u))
                        .map(u32::to_string)
                        .collect();
                    let mut line = format!("~ service {}", summary(new, s));
                    if !added.is_empty() {
                        line.push_str(&format!(" +uids {}", added.join(",")));
                    }
                    if !removed.is_empty() {
                        line.push_str(&format!(" -uids {}", removed.join(",")));
                    }
                    let (was, now) = (cgroups(old, o), cgroups(new, s));
                    for c in now.iter().filter(|c| !was.contains(c)) {
                        line.push_str(&format!(" +cgroup {c}"));
                    }
                    for c in was.iter().filter(|c| !now.contains(c)) {
                        line.push_str(&format!(" -cgroup {c}"));
                    }
                    lines.push(line);
                }
            }
        }
    }
    if lines.is_empty() {
        lines.push(
            "no change in enforcement (the file changed, the compiled policy did not)".into(),
        );
    }
    lines
}
