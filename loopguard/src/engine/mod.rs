//! The engine: everything after the [`Plan`]. It checks and compiles a
//! file ([`prepare`]), then puts the plan in force on the enforcement
//! layers as one unit and records it ([`apply`]), under the instance lock;
//! [`remove`] takes every layer out. Commands parse arguments, call the
//! engine and print.
//!
//! ```text
//!  file ─► check ─► compile ─► Plan ─► engine ──► journal
//!                                        │
//!                   stage all layers ◄───┘  (nothing in force changes)
//!                   commit nft, then flip bpf  (each atomic)
//!                   on failure: roll back the committed, in reverse
//!                                        │
//!                                        └──► state (journal dropped)
//! ```
//!
//! The layers sit behind one seam, [`Layer`]; the engine never asks which
//! one it holds, and its unit tests drive it with fake layers.

mod bpf_layer;
pub mod health;
mod layer;
mod nft_layer;

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use nix::fcntl::{Flock, FlockArg};

pub use self::{
    bpf_layer::BpfLayer,
    layer::{Context, Count, Damage, InForce, Layer, LayerKind, LayerSet},
    nft_layer::NftLayer,
};
use crate::{
    check::{check_source, read_policy, timed, Refusal},
    compile::{self, Plan},
    host,
    paths::InstancePaths,
    policy::{DaemonDirectory, SystemDirectory},
    state::State,
};

/// Every layer, in commit order: the nftables transaction first, then the
/// eBPF flip (a failed flip puts the previous table back).
pub fn layers() -> Vec<Box<dyn Layer>> {
    vec![Box::new(NftLayer::default()), Box::new(BpfLayer::default())]
}

/// The engine of one instance, bound to its layers and to where the eBPF
/// layer attaches: the host's ([`Engine::system`]) or, in tests, fakes
/// ([`Engine::with_layers`]). Each apply gets fresh layers (a layer keeps
/// what it staged only for the apply that staged it).
pub struct Engine {
    pub paths: InstancePaths,
    layers: Box<dyn Fn() -> Vec<Box<dyn Layer>>>,
    attach: fn(Option<&Path>) -> Result<PathBuf, host::HostError>,
}

impl Engine {
    /// The host's layers ([`layers`]), attached under its cgroup2 mount.
    pub fn system(paths: InstancePaths) -> Engine {
        Engine {
            paths,
            layers: Box::new(layers),
            attach: host::attach_cgroup,
        }
    }

    /// Other layers, in commit order, and another way to find the attach
    /// point (for tests without root: a fake layer and a plain directory).
    pub fn with_layers(
        paths: InstancePaths,
        layers: impl Fn() -> Vec<Box<dyn Layer>> + 'static,
        attach: fn(Option<&Path>) -> Result<PathBuf, host::HostError>,
    ) -> Engine {
        Engine {
            paths,
            layers: Box::new(layers),
            attach,
        }
    }

    /// The layers, fresh, in commit order.
    pub fn layers(&self) -> Vec<Box<dyn Layer>> {
        (self.layers)()
    }

    /// See [`warm_up`].
    pub fn warm_up(&self, want: LayerSet) {
        for layer in self.layers().iter().filter(|l| want.contains(l.kind())) {
            layer.warm_up(&self.paths);
        }
    }

    /// Where the kernel differs from `state`: see [`health::drift`].
    pub fn drift(&self, state: &State) -> Vec<health::Drift> {
        health::drift_of(&self.layers(), &self.paths, state)
    }

    /// The layers of the instance whose kernel objects are known to be
    /// there (eBPF: link pins; nftables: the table), in [`LayerKind`]
    /// order. A layer that cannot be asked (`nft` failing) is not counted:
    /// nothing is known of it.
    pub fn installed(&self) -> Vec<LayerKind> {
        let mut out: Vec<LayerKind> = self
            .layers()
            .iter()
            .filter(|l| matches!(l.in_force(&self.paths), InForce::Plan(_)))
            .map(|l| l.kind())
            .collect();
        out.sort();
        out
    }

    /// Whether any layer is known to be installed (see [`Engine::installed`]).
    pub fn anything_installed(&self) -> bool {
        !self.installed().is_empty()
    }

    /// See [`apply`].
    pub fn apply(&self, opts: &Options, prepared: Prepared) -> anyhow::Result<State> {
        let _lock = lock(&self.paths)?;
        self.apply_locked(opts, prepared)
    }
}

/// How to enforce.
#[derive(Clone, Debug)]
pub struct Options {
    /// Attach under this cgroup v2 directory instead of the root.
    pub cgroup: Option<PathBuf>,
    pub layers: LayerSet,
    /// Enforce even what would cut root off from essential services.
    pub force: bool,
}

/// A checked and compiled policy, ready to enforce.
pub struct Prepared {
    pub plan: Plan,
    pub policy_path: PathBuf,
    /// Rendered warnings, if any.
    pub warnings: String,
    /// The parsed file (what its lists name, before resolution), when it
    /// was read from a file.
    pub policy: Option<crate::policy::Policy>,
    /// The names as resolved, kept with the last known good once applied
    /// (`None`: not read from a file now, e.g. a repair: the last known
    /// good stays as it is).
    pub names: Option<crate::policy::NameMemory>,
    /// Names a daemon's lenient resolution could not find, and what each
    /// stands for (see [`prepare_lenient`]).
    pub unresolved: Vec<crate::policy::Unresolved>,
    /// The file's identity when it was read: the last known good keeps its
    /// text only while it is still that.
    pub source_stamp: Option<crate::state::FileStamp>,
}

impl Prepared {
    /// A plan put back as it was recorded (a repair, the last known good):
    /// nothing is read from a file.
    pub fn of_state(state: State) -> Prepared {
        Prepared {
            plan: state.plan,
            policy_path: state.policy_path,
            warnings: String::new(),
            policy: None,
            names: None,
            unresolved: Vec::new(),
            source_stamp: None,
        }
    }
}

/// A file `apply` will not enforce.
#[derive(Debug)]
pub struct Refused {
    pub why: Refusal,
    /// The rendered diagnostics and a last line saying why.
    pub report: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.report)
    }
}

/// Called before [`prepare`] by a command that will apply: each layer in
/// `want` does what is cheaper before the policy is read. (The eBPF layer,
/// when its programs are not loaded yet, builds its loader: aya parses the
/// kernel's BTF there, and that transient peak no longer stacks on a large
/// plan's memory.)
pub fn warm_up(want: LayerSet, paths: &InstancePaths) {
    Engine::system(paths.clone()).warm_up(want);
}

/// Reads, checks, resolves and compiles a policy file; an unknown name is
/// an error. The names as resolved go with it (to the last known good).
pub fn prepare(file: &Path, force: bool) -> anyhow::Result<Result<Prepared, Refused>> {
    let system = SystemDirectory;
    prepare_remembering(file, force, &DaemonDirectory::strict(&system))
}

/// [`prepare`] for `loopguard run`, which must not fail open: a name that
/// does not resolve is a warning (in `unresolved`), admits nobody on an
/// allow-list, and on a deny-list keeps denying the uids `memory` (the
/// last known good's) has for it.
pub fn prepare_lenient(
    file: &Path,
    force: bool,
    memory: crate::policy::NameMemory,
) -> anyhow::Result<Result<Prepared, Refused>> {
    prepare_lenient_with(file, force, memory, &SystemDirectory)
}

/// [`prepare_lenient`] with names resolved through `dir`.
pub fn prepare_lenient_with(
    file: &Path,
    force: bool,
    memory: crate::policy::NameMemory,
    dir: &dyn crate::policy::Directory,
) -> anyhow::Result<Result<Prepared, Refused>> {
    prepare_remembering(file, force, &DaemonDirectory::lenient(dir, memory))
}

fn prepare_remembering(
    file: &Path,
    force: bool,
    dir: &DaemonDirectory<'_>,
) -> anyhow::Result<Result<Prepared, Refused>> {
    let mut prepared = prepare_with(file, force, dir)?;
    if let Ok(p) = &mut prepared {
        p.names = Some(dir.seen.take());
        p.unresolved = dir.unresolved.take();
    }
    Ok(prepared)
}

/// [`prepare`] with names resolved through `dir`.
pub fn prepare_with(
    file: &Path,
    force: bool,
    dir: &dyn crate::policy::Directory,
) -> anyhow::Result<Result<Prepared, Refused>> {
    let source_stamp = crate::state::FileStamp::of(file);
    let source = read_policy(file)?;
    let checked = check_source(file, source, Some(dir));
    if let Some(why) = checked.refusal(force) {
        let mut report = checked.report().render_human();
        report.push_str(&format!(
            "loopguard: not applied: {} ({}, {}): {}; the policy in force is unchanged\n",
            checked.file,
            plural(checked.errors(), "error"),
            plural(checked.warnings(), "warning"),
            why.says()
        ));
        return Ok(Err(Refused { why, report }));
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
        policy: checked.policy,
        names: None,
        unresolved: Vec::new(),
        source_stamp,
    }))
}

/// Serializes apply, remove and repair of one instance. The lock file is
/// never deleted (a waiter would lock a file nobody else sees): `remove`
/// leaves it, a few bytes on tmpfs.
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
    let root = &paths.state_root;
    crate::files::private_dir(root)
        .with_context(|| format!("failed to create {}", root.display()))?;
    let path = &paths.lock_file;
    let file = crate::files::open_lock_file(path)
        .with_context(|| format!("failed to open {}", path.display()))?;
    Flock::lock(file, how).map_err(|(_, e)| {
        anyhow::Error::new(e).context(format!("failed to lock {}", path.display()))
    })
}

/// The fault step after a layer's commit.
fn committed_step(kind: LayerKind) -> &'static str {
    match kind {
        LayerKind::Nft => "after-nft",
        LayerKind::Bpf => "after-flip",
    }
}

/// Enforces a prepared policy and records it; returns the new state.
pub fn apply(opts: &Options, paths: &InstancePaths, prepared: Prepared) -> anyhow::Result<State> {
    Engine::system(paths.clone()).apply(opts, prepared)
}

impl Engine {
    /// [`Engine::apply`] for a caller that holds the instance [`lock`].
    pub fn apply_locked(&self, opts: &Options, prepared: Prepared) -> anyhow::Result<State> {
        let paths = &self.paths;
        // Read under the lock: another apply may have finished meanwhile.
        let previous = timed("load state", || State::load(paths).ok().flatten());
        if let Some(prev) = &previous {
            health::same_namespace(paths, prev).map_err(anyhow::Error::msg)?;
        }
        // The state is a record, not the truth: when the kernel differs from
        // it (a crash between the layers' commits, another tool's flush, an
        // interrupted apply), nothing is updated in place: every layer is
        // rewritten whole from the new plan.
        let drift = previous
            .as_ref()
            .map(|p| timed("read back", || self.drift(p)))
            .unwrap_or_default();
        for d in &drift {
            log::warn!("recovering: {d}");
        }
        let cookie = host::netns_cookie().unwrap_or(0);
        // The parsed file (a large policy's text is megabytes) is not needed
        // from here on: freed before the layers load programs and build
        // batches, it does not add to the peak.
        let Prepared {
            plan,
            policy_path,
            policy,
            warnings,
            names,
            unresolved: _,
            source_stamp,
        } = prepared;
        drop((policy, warnings));
        let mut state = State {
            policy_path,
            cgroup: opts.cgroup.clone().unwrap_or_default(),
            applied_at: jiff::Timestamp::now().to_string(),
            slot: 0,
            layers: Vec::new(),
            plan,
            nft_layout: 0,
            packet_base: Default::default(),
            netns_cookie: cookie,
            cgroup_id: 0,
            nft_generation: None,
        };
        // The journal goes first: whatever happens to this process from here
        // on, the next command knows an apply of this plan was under way.
        timed("journal", || state.save_pending(paths))
            .context("failed to record the apply; nothing changed")?;
        crate::fault::at("after-journal");
        let cgroup = (self.attach)(opts.cgroup.as_deref());
        let mut all = self.layers();
        let result = cgroup
            .map_err(|e| EnforceError::from(anyhow::Error::new(e)))
            .and_then(|cgroup| {
                let ctx = Context {
                    paths,
                    cgroup: &cgroup,
                    previous: previous.as_ref(),
                    trusted: drift.is_empty(),
                    netns_cookie: cookie,
                    cgroups_unjudgeable: cgroups_unjudgeable(&cgroup),
                };
                state.cgroup = cgroup.clone();
                enforce(&mut all, opts.layers, &ctx, &state.plan)
            });
        let enforced = match result {
            Ok(e) => e,
            Err(failure) => {
                // A failure before anything in force changed (the usual case:
                // every step before the commit undoes itself) is no
                // interrupted apply; after, the journal stays for the next
                // command to converge.
                if !failure.changed {
                    let _ = State::clear_pending(paths);
                }
                return Err(failure.error);
            }
        };
        crate::fault::at("before-state");
        // Read after the links were attached: a cgroup made again meanwhile
        // shows as links elsewhere, not as a lasting "made again".
        state.cgroup_id = host::cgroup_id(&state.cgroup).unwrap_or(0);
        state.applied_at = jiff::Timestamp::now().to_string();
        for layer in &all {
            if enforced.contains(&layer.kind()) {
                layer.record(&mut state);
            }
        }
        state.layers = enforced;
        timed("save state", || state.save(paths))?;
        State::clear_pending(paths)?;
        if let Some(names) = &names {
            // What a daemon falls back on when it starts with a file it cannot
            // apply. Enforcement is in place either way: a failure here is
            // said, not fatal.
            if let Err(e) = timed("keep last known good", || {
                crate::state::LastGood::save(paths, &state, names, source_stamp)
            }) {
                log::warn!("the last known good policy was not kept: {e}");
            }
        }
        Ok(state)
    }
}

/// Why [`enforce`] failed, and whether anything in force changed first.
#[derive(Debug)]
pub struct EnforceError {
    pub error: anyhow::Error,
    pub changed: bool,
}

impl From<anyhow::Error> for EnforceError {
    fn from(error: anyhow::Error) -> Self {
        EnforceError {
            error,
            changed: false,
        }
    }
}

/// Puts `plan` in force on the layers `want` names, as one unit: every
/// layer stages (nothing in force changes; a failure abandons what was
/// staged), then each commits in order; a failed commit rolls back the
/// committed layers in reverse, so the previous policy stays whole.
/// Layers not wanted are removed last. Returns the layers in force.
pub fn enforce(
    all: &mut [Box<dyn Layer>],
    want: LayerSet,
    ctx: &Context<'_>,
    plan: &Plan,
) -> Result<Vec<LayerKind>, EnforceError> {
    let chosen = choose(all, want, ctx)?;
    if !plan.cgroup_sets.is_empty() {
        if !chosen.iter().any(|&i| all[i].judges_cgroups()) {
            return Err(anyhow::anyhow!(
                "the policy lists cgroups, which only the eBPF layer tells apart \
                 (the nftables layer would have to let those services through whole): \
                 enforce with --layers bpf or both"
            )
            .into());
        }
        if let Some(why) = &ctx.cgroups_unjudgeable {
            return Err(anyhow::anyhow!("the policy lists cgroups, but {why}").into());
        }
    }
    for (n, &i) in chosen.iter().enumerate() {
        if let Err(e) = all[i].stage(ctx, plan) {
            for &j in chosen[..=n].iter().rev() {
                all[j].abandon(ctx);
            }
            let kind = all[i].kind().title();
            let says = format!("{kind} layer: staging failed; the policy in force is unchanged");
            return Err(e.context(says).into());
        }
    }
    crate::fault::at("after-stage");
    for (n, &i) in chosen.iter().enumerate() {
        if let Err(e) = all[i].commit(ctx, plan) {
            return Err(undo(all, &chosen, n, ctx, e));
        }
        crate::fault::at(committed_step(all[i].kind()));
    }
    // Layers no longer wanted go, after the wanted ones are in force.
    let mut in_force: Vec<LayerKind> = chosen.iter().map(|&i| all[i].kind()).collect();
    for layer in all.iter_mut().filter(|l| !in_force.contains(&l.kind())) {
        layer.remove(ctx.paths).map_err(|error| EnforceError {
            error,
            changed: true,
        })?;
    }
    // Named in one order everywhere (state, status, summaries).
    in_force.sort();
    Ok(in_force)
}

/// Why the eBPF programs on `cgroup` cannot judge listed cgroups for the
/// whole host, if they cannot. The nftables layer lets services that list
/// an existing cgroup through (it cannot tell cgroups apart), so the eBPF
/// layer must see every process: attached anywhere but the root, processes
/// outside that cgroup would reach those services unjudged.
fn cgroups_unjudgeable(cgroup: &Path) -> Option<String> {
    if !host::is_cgroup2_root(cgroup) {
        return Some(format!(
            "the eBPF programs would sit on {} rather than the cgroup2 root: processes outside it \
             would reach those services past the nftables layer, which cannot tell cgroups apart \
             (leave --cgroup out)",
            cgroup.display()
        ));
    }
    host::cgroup_view_is_global().err().map(|e| e.to_string())
}

/// The indexes of the layers to enforce with: those `want` names that the
/// host has (one it lacks is skipped with a warning when several were
/// asked for, else an error).
fn choose(
    all: &[Box<dyn Layer>],
    want: LayerSet,
    ctx: &Context<'_>,
) -> Result<Vec<usize>, EnforceError> {
    let mut chosen = Vec::new();
    let mut last_error = None;
    for (i, layer) in all.iter().enumerate() {
        if !want.contains(layer.kind()) {
            continue;
        }
        match layer.available(ctx) {
            Ok(()) => chosen.push(i),
            Err(e) if want.is_several() => {
                log::warn!(
                    "{} layer unavailable ({e:#}); enforcing without it",
                    layer.kind().title()
                );
                last_error = Some(e);
            }
            Err(e) => return Err(e.into()),
        }
    }
    if chosen.is_empty() {
        let e = last_error.unwrap_or_else(|| anyhow::anyhow!("no layer asked for"));
        return Err(e
            .context("no enforcement layer is available on this host")
            .into());
    }
    Ok(chosen)
}

/// After the commit of `chosen[n]` failed with `e`: abandons it and the
/// layers after it, rolls the committed ones back in reverse, and says
/// what is in force.
fn undo(
    all: &mut [Box<dyn Layer>],
    chosen: &[usize],
    n: usize,
    ctx: &Context<'_>,
    e: anyhow::Error,
) -> EnforceError {
    for &j in &chosen[n..] {
        all[j].abandon(ctx);
    }
    let mut restored = true;
    for &j in chosen[..n].iter().rev() {
        if let Err(r) = all[j].roll_back(ctx) {
            restored = false;
            log::error!(
                "could not put the previous policy back on the {} layer: {r:#}",
                all[j].kind().title()
            );
        }
    }
    let says = match (n, restored) {
        (0, _) => "the policy in force is unchanged",
        (_, true) => "the previous policy is back in force",
        (_, false) => "the layers may now disagree; the next apply converges them",
    };
    let kind = all[chosen[n]].kind().title();
    EnforceError {
        error: e.context(format!("{kind} layer: commit failed; {says}")),
        changed: n > 0,
    }
}

/// What [`remove`] found and deleted.
pub struct Removed {
    pub layers: Vec<LayerKind>,
    pub state: bool,
}

/// Takes every layer of the instance out of force and deletes its state.
pub fn remove(paths: &InstancePaths) -> anyhow::Result<Removed> {
    Engine::system(paths.clone()).remove()
}

impl Engine {
    /// See [`remove`].
    pub fn remove(&self) -> anyhow::Result<Removed> {
        let paths = &self.paths;
        let _lock = lock(paths)?;
        if let Some(state) = State::load(paths).ok().flatten() {
            health::same_namespace(paths, &state).map_err(anyhow::Error::msg)?;
        }
        let mut removed = Vec::new();
        for mut layer in self.layers() {
            if layer.remove(paths)? {
                removed.push(layer.kind());
            }
        }
        let mut state = paths.state_dir.exists();
        if state {
            fs::remove_dir_all(&paths.state_dir)
                .with_context(|| format!("failed to remove {}", paths.state_dir.display()))?;
        }
        state |= crate::state::LastGood::remove(paths)
            .with_context(|| format!("failed to remove {}", paths.good_dir.display()))?;
        Ok(Removed {
            layers: removed,
            state,
        })
    }
}

/// The pid of the instance's running `loopguard run`, if one holds its run
/// lock (`None`: no daemon).
pub fn daemon_pid(paths: &InstancePaths) -> anyhow::Result<Option<u32>> {
    if !paths.run_lock_file.exists() {
        return Ok(None);
    }
    let file = crate::files::open_lock_file(&paths.run_lock_file)
        .with_context(|| format!("failed to open {}", paths.run_lock_file.display()))?;
    // A shared lock, dropped at once: only a daemon holds it exclusively.
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        Ok(_held) => Ok(None),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            let pid = fs::read_to_string(&paths.run_lock_file).unwrap_or_default();
            Ok(Some(pid.trim().parse().unwrap_or(0)))
        }
        Err((_, e)) => Err(anyhow::Error::new(e)
            .context(format!("failed to lock {}", paths.run_lock_file.display()))),
    }
}

/// `applied 1a2b3c4d5e6f (/etc/loopguard/policy.toml): 3 services, ...`
pub fn summary(state: &State, took: std::time::Duration) -> String {
    let hash = state.plan.hash.trim_start_matches("sha256:");
    let names: Vec<&str> = state.layers.iter().map(|l| l.as_str()).collect();
    let mut layers = format!("layers {}", names.join("+"));
    if state.layers.contains(&LayerKind::Bpf) {
        layers.push_str(&format!(" (bpf on {})", state.cgroup.display()));
    }
    format!(
        "applied {} ({}): {}, {}, {layers}, {} ms",
        &hash[..12.min(hash.len())],
        state.policy_path.display(),
        plural(state.plan.services.len(), "service"),
        plural(state.plan.uid_count(), "uid"),
        took.as_millis()
    )
}

/// `1 service`, `3 services`
pub fn plural(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

#[cfg(test)]
mod tests;
