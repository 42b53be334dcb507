//! `loopguard apply`: enforce a policy, all or nothing.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::Context as _;
use loopguard::{
    compile::{self, Plan},
    ebpf, host,
    paths::{InstancePaths, STATE_ROOT},
    policy::SystemDirectory,
    state::State,
};
use nix::fcntl::{Flock, FlockArg};

use super::{check_source, counts};
use crate::{exit, read_policy};

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  loopguard apply /etc/loopguard/policy.toml\n  loopguard apply policy.toml --dry-run\n  loopguard --instance ci apply policy.toml --cgroup /sys/fs/cgroup/ci.slice"
)]
pub struct Args {
    /// The policy file.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// Attach under this cgroup v2 directory instead of the root: only
    /// processes in its subtree are guarded.
    #[arg(long, value_name = "PATH")]
    cgroup: Option<PathBuf>,
    /// Print what would change; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Apply even if the policy would cut root off from essential local
    /// services (see `check`'s warnings).
    #[arg(long)]
    force: bool,
}

/// Serializes apply and remove of one instance.
pub fn lock(paths: &InstancePaths) -> anyhow::Result<Flock<fs::File>> {
    fs::create_dir_all(STATE_ROOT).with_context(|| format!("failed to create {STATE_ROOT}"))?;
    let path = lock_path(paths);
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("failed to open {}", path.display()))?;
    Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .with_context(|| format!("failed to lock {}", path.display()))
}

fn lock_path(paths: &InstancePaths) -> PathBuf {
    Path::new(STATE_ROOT).join(format!("{}.lock", paths.instance))
}

/// Deletes the lock file, and the state root if no instance is left.
pub fn remove_lock(paths: &InstancePaths) {
    let _ = fs::remove_file(lock_path(paths));
    let _ = fs::remove_dir(STATE_ROOT);
}

pub fn run(args: Args, paths: &InstancePaths) -> anyhow::Result<u8> {
    let started = Instant::now();
    if !args.dry_run {
        host::require_root("apply")?;
    }
    let source = read_policy(&args.file)?;
    let checked = check_source(&args.file, source, Some(&SystemDirectory));
    let errors = checked.errors();
    let refused_warnings = checked
        .diagnostics
        .iter()
        .any(|d| d.code == "cuts-off-root");
    if errors > 0 || (refused_warnings && !args.force) {
        eprint!("{}", checked.report().render_human());
        if errors > 0 {
            eprintln!(
                "loopguard: not applied: {} ({}); the policy in force is unchanged",
                checked.file,
                counts(errors, checked.warnings())
            );
        } else {
            eprintln!("loopguard: not applied: the policy would cut root off from essential local services; fix it or pass --force");
        }
        return Ok(exit::PROBLEMS);
    }
    if checked.warnings() > 0 {
        eprint!("{}", checked.report().render_human());
    }
    let (Some(policy), Some(resolved)) = (&checked.policy, &checked.resolved) else {
        anyhow::bail!("internal error: a checked policy without errors has no resolution");
    };
    let mut plan = compile::compile(policy, resolved).context("failed to compile the policy")?;
    let policy_path = fs::canonicalize(&args.file)
        .with_context(|| format!("failed to resolve {}", args.file.display()))?;
    plan.file = policy_path.display().to_string();
    let previous = State::load(paths).ok().flatten();

    if args.dry_run {
        let mut out = std::io::stdout().lock();
        for line in diff(previous.as_ref().map(|s| &s.plan), &plan) {
            writeln!(out, "{line}")?;
        }
        writeln!(out, "dry run: nothing changed")?;
        return Ok(exit::OK);
    }

    let cgroup = host::attach_cgroup(args.cgroup.as_deref())?;
    let _lock = lock(paths)?;
    if let Some(prev) = &previous {
        if ebpf::is_installed(paths) && prev.cgroup != cgroup {
            anyhow::bail!(
                "instance {} is attached to {}, not {}; run `loopguard --instance {} remove` first or use another --instance",
                paths.instance,
                prev.cgroup.display(),
                cgroup.display(),
                paths.instance
            );
        }
    }
    host::check_kernel()?;
    host::ensure_bpffs(Path::new(loopguard::paths::BPFFS))?;
    let cookie = host::netns_cookie().unwrap_or(0);
    let host_addrs = host::host_addresses()?;

    let mut installed =
        ebpf::install(paths, &cgroup, cookie).context("failed to install the eBPF layer")?;
    let result = ebpf::sync_host_addrs(&mut installed.maps, &host_addrs).and_then(|()| {
        ebpf::write_plan(
            &mut installed.maps,
            &plan,
            previous.as_ref().map(|s| &s.plan),
            cookie,
        )
    });
    let slot = match result {
        Ok(slot) => slot,
        Err(e) => {
            if installed.fresh {
                // Nothing was enforced before: leave nothing attached.
                let _ = ebpf::remove_pins(paths);
            }
            return Err(anyhow::Error::new(e)
                .context("failed to write the policy; the policy in force is unchanged"));
        }
    };
    let state = State {
        policy_path,
        cgroup: cgroup.clone(),
        applied_at: jiff::Timestamp::now().to_string(),
        slot,
        layers: vec!["bpf".into()],
        plan,
    };
    state.save(paths)?;
    let hash = state.plan.hash.trim_start_matches("sha256:");
    println!(
        "applied {} ({}): {}, {}, layers bpf on {}, {} ms",
        &hash[..12.min(hash.len())],
        state.policy_path.display(),
        plural(state.plan.services.len(), "service"),
        plural(state.plan.uid_count(), "uid"),
        cgroup.display(),
        started.elapsed().as_millis()
    );
    Ok(exit::OK)
}

fn plural(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// What changes from `old` to `new`, one line each.
fn diff(old: Option<&Plan>, new: &Plan) -> Vec<String> {
    let mut lines = Vec::new();
    let summary = |p: &Plan, s: &compile::PlanService| {
        format!(
            "{} ({}/{} on {}, {:?}-list of {} uids, {:?})",
            s.name,
            match s.protocol {
                loopguard::policy::Protocol::Tcp => "tcp",
                loopguard::policy::Protocol::Udp => "udp",
                loopguard::policy::Protocol::Any => "tcp+udp",
            },
            s.ports,
            s.addresses,
            s.list,
            p.uid_sets[s.uid_set as usize].len(),
            s.mode
        )
        .to_lowercase()
    };
    let Some(old) = old else {
        lines.push("install: no policy is applied to this instance yet".into());
        for s in &new.services {
            lines.push(format!("+ service {}", summary(new, s)));
        }
        lines.push(format!("  default {:?}, mode {:?}", new.default, new.mode).to_lowercase());
        return lines;
    };
    if old.hash == new.hash && old == new {
        lines.push("no change: this policy is already applied".into());
        return lines;
    }
    if old.default != new.default || old.mode != new.mode {
        lines.push(
            format!(
                "~ default {:?} mode {:?} -> default {:?} mode {:?}",
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
                    && old_uids == new_uids;
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
