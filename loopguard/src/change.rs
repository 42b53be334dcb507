//! What an `apply` would change in enforcement, one line each: the
//! dry-run's answer (`apply --dry-run`).

use crate::{
    compile::{Plan, PlanService},
    plan_diff::{CgroupChange, ServiceChange},
    policy::Protocol,
};

/// What changes from `old` to `new`, one line each.
pub fn describe(old: Option<&Plan>, new: &Plan) -> Vec<String> {
    let mut lines = Vec::new();
    let summary = |p: &Plan, s: &PlanService| {
        let bind = match s.bind_set.and_then(|b| p.uid_sets.get(b as usize)) {
            Some(b) => format!(", bind guard of {} uids", b.len()),
            None => String::new(),
        };
        let cg = match crate::plan_diff::cgroups(p, s).len() {
            0 => String::new(),
            n => format!(" and {n} cgroups"),
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
            crate::plan_diff::uids(p, s).len(),
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
    let diff = crate::plan_diff::diff(old, new);
    let cgroup = |path: &str, id: Option<u64>| match id {
        Some(id) => format!("{path} (id {id})"),
        None => format!("{path} (absent)"),
    };
    for change in &diff.services {
        match change {
            ServiceChange::Removed(s) => lines.push(format!("- service {}", summary(old, s))),
            ServiceChange::Added(s) => lines.push(format!("+ service {}", summary(new, s))),
            ServiceChange::Changed(d) => {
                let mut line = format!("~ service {}", summary(new, d.new));
                let ids = |uids: &[u32]| {
                    uids.iter()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                };
                if !d.uids_added.is_empty() {
                    line.push_str(&format!(" +uids {}", ids(&d.uids_added)));
                }
                if !d.uids_removed.is_empty() {
                    line.push_str(&format!(" -uids {}", ids(&d.uids_removed)));
                }
                let (mut plus, mut minus) = (Vec::new(), Vec::new());
                for c in &d.cgroups {
                    match c {
                        CgroupChange::Listed { path, id } => plus.push(cgroup(path, *id)),
                        CgroupChange::Unlisted { path, id } => minus.push(cgroup(path, *id)),
                        CgroupChange::Appeared { path, id } => {
                            plus.push(cgroup(path, Some(*id)));
                            minus.push(cgroup(path, None));
                        }
                        CgroupChange::Gone { path, id } => {
                            plus.push(cgroup(path, None));
                            minus.push(cgroup(path, Some(*id)));
                        }
                        CgroupChange::MadeAgain { path, was, now } => {
                            plus.push(cgroup(path, Some(*now)));
                            minus.push(cgroup(path, Some(*was)));
                        }
                    }
                }
                for c in plus {
                    line.push_str(&format!(" +cgroup {c}"));
                }
                for c in minus {
                    line.push_str(&format!(" -cgroup {c}"));
                }
                lines.push(line);
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
