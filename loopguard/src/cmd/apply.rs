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
    ebpf, host, nft,
    paths::{InstancePaths, STATE_ROOT},
    policy::SystemDirectory,
    scope::LocalTable,
    state::State,
};
use nix::fcntl::{Flock, FlockArg};

use super::read_policy;
use super::{check_source, counts, plural, timed};
use crate::exit;

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
    /// Enforcement layers: eBPF socket hooks, the nftables table on lo, or
    /// both (with both, a layer the host lacks is skipped with a warning).
    #[arg(long, value_enum, default_value_t = Layers::Both)]
    layers: Layers,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Layers {
    Bpf,
    Nft,
    Both,
}

/// Serializes apply and remove of one instance. The lock file is never
/// deleted (a waiter would lock a file nobody else sees): `remove` leaves
/// it, a few bytes on tmpfs.
pub fn lock(paths: &InstancePaths) -> anyhow::Result<Flock<fs::File>> {
    lock_with(paths, FlockArg::LockExclusive)
}

/// The instance lock if nobody holds it (`Ok(None)`: an apply, a remove or
/// a repair is under way).
pub fn try_lock(paths: &InstancePaths) -> anyhow::Result<Option<Flock<fs::File>>> {
    match lock_with(paths, FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(Some(l)),
        Err(e)
            if e.downcast_ref::<nix::errno::Errno>() == Some(&nix::errno::Errno::EWOULDBLOCK) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

fn lock_with(paths: &InstancePaths, how: FlockArg) -> anyhow::Result<Flock<fs::File>> {
    loopguard::state::private_dir(Path::new(STATE_ROOT))
        .with_context(|| format!("failed to create {STATE_ROOT}"))?;
    let path = lock_path(paths);
    let file = loopguard::state::open_lock_file(&path)
        .with_context(|| format!("failed to open {}", path.display()))?;
    Flock::lock(file, how).map_err(|(_, e)| {
        anyhow::Error::new(e).context(format!("failed to lock {}", path.display()))
    })
}

fn lock_path(paths: &InstancePaths) -> PathBuf {
    Path::new(STATE_ROOT).join(format!("{}.lock", paths.instance))
}

/// Aborts the process at a named step when `LOOPGUARD_FAULT` names it
/// (`STEP`, or `STEP@N` for the N-th time the step is reached, e.g. a
/// daemon's first reload): crash-consistency tests kill `apply` and `run`
/// at exact points instead of racing a signal against a clock.
pub fn fault(step: &str) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static REACHED: AtomicUsize = AtomicUsize::new(0);
    let Ok(want) = std::env::var("LOOPGUARD_FAULT") else {
        return;
    };
    let (name, nth) = match want.split_once('@') {
        Some((name, n)) => (name, n.parse().unwrap_or(1)),
        None => (want.as_str(), 1),
    };
    if name == step && REACHED.fetch_add(1, Ordering::SeqCst) + 1 == nth {
        eprintln!("loopguard: LOOPGUARD_FAULT={want}: aborting");
        std::process::abort();
    }
}

/// What `apply` and `run` need to enforce a file.
#[derive(Clone, Debug)]
pub struct Options {
    pub cgroup: Option<PathBuf>,
    pub layers: Layers,
    pub force: bool,
}

/// A checked and compiled policy, ready to enforce.
pub struct Prepared {
    pub plan: Plan,
    pub policy_path: PathBuf,
    /// Rendered warnings, if any.
    pub warnings: String,
}

/// Reads, checks, resolves and compiles a policy file. `Ok(Err(text))` is a
/// refusal: the rendered diagnostics and a last line saying why.
pub fn prepare(file: &Path, force: bool) -> anyhow::Result<Result<Prepared, String>> {
    let source = read_policy(file)?;
    let checked = check_source(file, source, Some(&SystemDirectory));
    if let Some(refusal) = checked.refusal(force) {
        let mut text = checked.report().render_human();
        text.push_str(&format!(
            "loopguard: not applied: {} ({}): {}; the policy in force is unchanged\n",
            checked.file,
            counts(checked.errors(), checked.warnings()),
            refusal.says()
        ));
        return Ok(Err(text));
    }
    let warnings = if checked.warnings() > 0 {
        checked.report().render_human()
    } else {
        String::new()
    };
    let (Some(policy), Some(resolved)) = (&checked.policy, &checked.resolved) else {
        anyhow::bail!("internal error: a checked policy without errors has no resolution");
    };
    let mut plan = timed("compile", || compile::compile(policy, resolved))
        .context("failed to compile the policy")?;
    let policy_path =
        fs::canonicalize(file).with_context(|| format!("failed to resolve {}", file.display()))?;
    plan.file = policy_path.display().to_string();
    Ok(Ok(Prepared {
        plan,
        policy_path,
        warnings,
    }))
}

/// Enforces a prepared policy and records it; returns the new state.
pub fn commit(opts: &Options, paths: &InstancePaths, prepared: Prepared) -> anyhow::Result<State> {
    let _lock = lock(paths)?;
    commit_locked(opts, paths, prepared)
}

/// [`commit`] for a caller that holds the instance [`lock`] already.
pub fn commit_locked(
    opts: &Options,
    paths: &InstancePaths,
    prepared: Prepared,
) -> anyhow::Result<State> {
    // Read under the lock: another apply may have finished meanwhile.
    let previous = timed("load state", || State::load(paths).ok().flatten());
    if let Some(prev) = &previous {
        loopguard::health::same_namespace(paths, prev).map_err(anyhow::Error::msg)?;
    }
    // The state is a record, not the truth: when the kernel differs from
    // it (a crash between the layers' commits, another tool's flush, an
    // interrupted apply), nothing is updated in place: both layers are
    // rewritten whole from the new plan.
    let drift = previous
        .as_ref()
        .map(|p| timed("read back", || loopguard::health::drift(paths, p)))
        .unwrap_or_default();
    for d in &drift {
        log::warn!("recovering: {d}");
    }
    let trusted = drift.is_empty();
    let pending = State {
        policy_path: prepared.policy_path.clone(),
        cgroup: opts.cgroup.clone().unwrap_or_default(),
        applied_at: jiff::Timestamp::now().to_string(),
        slot: 0,
        layers: Vec::new(),
        plan: prepared.plan,
        nft_layout: 0,
        packet_base: Default::default(),
        netns_cookie: host::netns_cookie().unwrap_or(0),
    };
    // The journal goes first: whatever happens to this process from here
    // on, the next command knows an apply of this plan was under way.
    timed("journal", || pending.save_pending(paths))
        .context("failed to record the apply; nothing changed")?;
    fault("after-journal");
    let mut changed = false;
    let outcome = match enforce(
        opts,
        paths,
        &pending.plan,
        previous.as_ref(),
        trusted,
        &mut changed,
    ) {
        Ok(o) => o,
        Err(e) => {
            // A failure before anything in force changed (the usual case:
            // every step before the commit undoes itself) is no
            // interrupted apply; after, the journal stays for the next
            // command to converge.
            if !changed {
                let _ = State::clear_pending(paths);
            }
            return Err(e);
        }
    };
    fault("before-state");
    let state = State {
        cgroup: outcome.cgroup.clone(),
        applied_at: jiff::Timestamp::now().to_string(),
        slot: outcome.slot.unwrap_or(0),
        nft_layout: if outcome.layers.iter().any(|l| l == "nft") {
            nft::LAYOUT
        } else {
            0
        },
        layers: outcome.layers,
        packet_base: outcome.packet_base,
        ..pending
    };
    timed("save state", || state.save(paths))?;
    State::clear_pending(paths)?;
    Ok(state)
}

/// `applied 1a2b3c4d5e6f (/etc/loopguard/policy.toml): 3 services, ...`
pub fn summary(state: &State, took: std::time::Duration) -> String {
    let hash = state.plan.hash.trim_start_matches("sha256:");
    let layers = if state.layers.iter().any(|l| l == "bpf") {
        format!(
            "layers {} (bpf on {})",
            state.layers.join("+"),
            state.cgroup.display()
        )
    } else {
        format!("layers {}", state.layers.join("+"))
    };
    format!(
        "applied {} ({}): {}, {}, {layers}, {} ms",
        &hash[..12.min(hash.len())],
        state.policy_path.display(),
        plural(state.plan.services.len(), "service"),
        plural(state.plan.uid_count(), "uid"),
        took.as_millis()
    )
}

pub fn run(args: Args, paths: &InstancePaths) -> anyhow::Result<u8> {
    let started = Instant::now();
    if !args.dry_run {
        host::require_root("apply")?;
    }
    let prepared = match prepare(&args.file, args.force)? {
        Ok(p) => p,
        Err(refusal) => {
            eprint!("{refusal}");
            return Ok(exit::PROBLEMS);
        }
    };
    eprint!("{}", prepared.warnings);
    if args.dry_run {
        let previous = State::load(paths).ok().flatten();
        let mut out = std::io::stdout().lock();
        for line in diff(previous.as_ref().map(|s| &s.plan), &prepared.plan) {
            writeln!(out, "{line}")?;
        }
        writeln!(out, "dry run: nothing changed")?;
        return Ok(exit::OK);
    }
    let opts = Options {
        cgroup: args.cgroup.clone(),
        layers: args.layers,
        force: args.force,
    };
    let state = commit(&opts, paths, prepared)?;
    println!("{}", summary(&state, started.elapsed()));
    Ok(exit::OK)
}

/// What [`enforce`] put in force.
struct Enforced {
    layers: Vec<String>,
    cgroup: PathBuf,
    slot: Option<u32>,
    packet_base: nft::PacketCounts,
}

/// Puts `plan` in force on the requested layers as one unit: the nft batch
/// is checked and the eBPF slot staged first; then the nft transaction
/// commits and the eBPF slot flips. A failure before the commit changes
/// nothing; a failed flip restores the previous nft table.
fn enforce(
    args: &Options,
    paths: &InstancePaths,
    plan: &Plan,
    previous: Option<&State>,
    trusted: bool,
    changed: &mut bool,
) -> anyhow::Result<Enforced> {
    let cgroup = host::attach_cgroup(args.cgroup.as_deref())?;
    let mut want_bpf = args.layers != Layers::Nft;
    let mut want_nft = args.layers != Layers::Bpf;
    if let Some(prev) = previous {
        if want_bpf && ebpf::is_installed(paths) && prev.cgroup != cgroup {
            anyhow::bail!(
                "instance {} is attached to {}, not {}; run `loopguard --instance {} remove` first or use another --instance",
                paths.instance,
                prev.cgroup.display(),
                cgroup.display(),
                paths.instance
            );
        }
    }
    if want_bpf {
        if let Err(e) = host::check_kernel()
            .and_then(|()| host::ensure_bpffs(Path::new(loopguard::paths::BPFFS)))
        {
            if args.layers == Layers::Both {
                log::warn!("eBPF layer unavailable ({e}); enforcing with nftables only");
                want_bpf = false;
            } else {
                return Err(e.into());
            }
        }
    }
    let cookie = host::netns_cookie().unwrap_or(0);
    let local = LocalTable::read().context("failed to read the kernel's local routing table")?;
    let table = &paths.instance;

    let change = if want_nft {
        // A cheap probe, not `nft -c` of the whole batch: that would parse
        // and check a 10,000-service ruleset twice. A batch the kernel
        // refuses still changes nothing: the eBPF slot flips only after the
        // commit. With our table in force there is nothing to probe (and
        // any `nft list` would load the whole table into nft's cache).
        let probe = if trusted && nft_in_force(previous).is_some() {
            Ok(())
        } else {
            nft::available()
        };
        match probe {
            Ok(()) => Some(timed("nft: build batch", || {
                if trusted {
                    nft_change(table, plan, previous)
                } else {
                    full_table(table, plan, previous)
                }
            })),
            Err(e) if args.layers == Layers::Both && want_bpf => {
                log::warn!(
                    "nftables layer unavailable ({e}{}); enforcing with eBPF only",
                    e.detail()
                        .map(|d| format!(": {}", d.trim()))
                        .unwrap_or_default()
                );
                want_nft = false;
                None
            }
            Err(e) => return Err(nft_error(e)),
        }
    } else {
        None
    };

    // Stage the eBPF side: attach if needed (with no policy in force), fill
    // the inactive slot.
    let mut staged = None;
    if want_bpf {
        let mut installed = timed("ebpf: install", || ebpf::install(paths, &cgroup, cookie))
            .context("failed to install the eBPF layer")?;
        let result = ebpf::sync_local(&mut installed.maps, &local).and_then(|_| {
            timed("ebpf: stage", || {
                // Counters carry over by service name only from a plan
                // known to be the one in force.
                let in_force = previous.filter(|_| trusted).map(|s| &s.plan);
                ebpf::stage(&mut installed.maps, plan, in_force)
            })
        });
        match result {
            Ok(slot) => {
                fault("after-stage");
                staged = Some((installed, slot));
            }
            Err(e) => {
                if installed.fresh {
                    let _ = ebpf::remove_pins(paths);
                }
                return Err(anyhow::Error::new(e)
                    .context("failed to write the policy; the policy in force is unchanged"));
            }
        }
    }

    let mut packet_base = nft::PacketCounts::default();
    if let Some(change) = change {
        let mut result = timed("nft: commit", || nft::commit(&change.batch));
        packet_base = change.base;
        if result.is_err() && change.in_place {
            // The table in force is not what the state says (edited by
            // hand?): replace it whole.
            log::warn!("nftables: in-place update refused; replacing table {table} whole");
            let full = full_table(table, plan, previous);
            result = timed("nft: commit", || nft::commit(&full.batch));
            packet_base = full.base;
        }
        if let Err(e) = result {
            if let Some((installed, _)) = &staged {
                if installed.fresh {
                    let _ = ebpf::remove_pins(paths);
                }
            }
            return Err(nft_error(e)
                .context("the nftables transaction failed; the policy in force is unchanged"));
        }
        *changed = true;
        fault("after-nft");
    }

    let mut slot = None;
    if let Some((mut installed, s)) = staged {
        if let Err(e) = ebpf::flip(&mut installed.maps, s, cookie) {
            // Put the previous nftables table back, so both layers agree.
            if want_nft {
                let restored = match previous.filter(|p| p.layers.iter().any(|l| l == "nft")) {
                    Some(prev) => nft::commit(&nft::ruleset(table, &prev.plan)).is_ok(),
                    None => nft::remove(table).is_ok(),
                };
                if !restored {
                    log::error!("could not restore the previous nftables table {table}");
                }
            }
            return Err(anyhow::Error::new(e).context("failed to switch the eBPF layer to the new policy; the previous policy is in force"));
        }
        *changed = true;
        slot = Some(s);
        fault("after-flip");
    }

    // Layers no longer wanted go, after the new ones are in force.
    *changed = true;
    if !want_nft {
        nft::remove(table).map_err(nft_error)?;
    }
    if !want_bpf {
        ebpf::remove_pins(paths).context("failed to remove the eBPF layer")?;
    }
    let mut layers = Vec::new();
    if want_bpf {
        layers.push("bpf".to_string());
    }
    if want_nft {
        layers.push("nft".to_string());
    }
    Ok(Enforced {
        layers,
        cgroup,
        slot,
        packet_base,
    })
}

/// The nftables change that puts `plan` in force, and the counts the new
/// table starts from.
struct NftChange {
    batch: String,
    base: nft::PacketCounts,
    in_place: bool,
}

/// The previous state, if it put a table of this layout in force.
fn nft_in_force(previous: Option<&State>) -> Option<&State> {
    previous.filter(|p| p.nft_layout == nft::LAYOUT && p.layers.iter().any(|l| l == "nft"))
}

/// An in-place update when the table in force was built (in this layout)
/// from the previous plan: unchanged elements keep their counters and a
/// one-service change touches a few objects. Otherwise the whole table.
/// (Should the table be gone or edited, the update fails as a whole and
/// the caller replaces the table.)
fn nft_change(table: &str, plan: &Plan, previous: Option<&State>) -> NftChange {
    let Some(prev) = nft_in_force(previous) else {
        return full_table(table, plan, previous);
    };
    let update = nft::update(table, &prev.plan, plan);
    let mut base = prev.packet_base.clone();
    if !update.recounted.is_empty() {
        // These services' counting elements are replaced (new ones start
        // at zero): what they counted moves into the base.
        match nft::refusal_counts(table, &update.recounted_sets) {
            Ok(counts) => {
                for name in &update.recounted {
                    *base.refused.entry(name.clone()).or_insert(0) +=
                        counts.get(name).copied().unwrap_or(0);
                }
            }
            Err(_) => return full_table(table, plan, previous),
        }
    }
    NftChange {
        batch: update.batch,
        base: base.kept_for(plan),
        in_place: true,
    }
}

/// The whole table; what the table in force counted carries over by
/// service name.
fn full_table(table: &str, plan: &Plan, previous: Option<&State>) -> NftChange {
    let current = nft::counters(table).unwrap_or_default();
    let base = match previous {
        Some(prev) => current.plus(&prev.packet_base),
        None => current,
    };
    NftChange {
        batch: nft::ruleset(table, plan),
        base: base.kept_for(plan),
        in_place: false,
    }
}

/// An nft failure with nft's own message in the chain.
fn nft_error(e: nft::NftError) -> anyhow::Error {
    match e.detail() {
        Some(d) if !d.trim().is_empty() => anyhow::Error::new(e).context(format!(
            "nft: {}",
            d.trim().lines().next().unwrap_or_default()
        )),
        _ => anyhow::Error::new(e),
    }
}

/// What changes from `old` to `new`, one line each.
fn diff(old: Option<&Plan>, new: &Plan) -> Vec<String> {
    let mut lines = Vec::new();
    let bind_uids =
        |p: &Plan, s: &compile::PlanService| s.bind_set.map(|b| p.uid_sets[b as usize].clone());
    let summary = |p: &Plan, s: &compile::PlanService| {
        let bind = match bind_uids(p, s) {
            Some(b) => format!(", bind guard of {} uids", b.len()),
            None => String::new(),
        };
        format!(
            "{} ({}/{} on {}, {:?}-list of {} uids{bind}, {:?})",
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
                    && old_uids == new_uids
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
