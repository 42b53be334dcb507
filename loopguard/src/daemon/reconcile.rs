//! The daemon's one reconcile loop: it owns what the daemon knows, and each
//! [`Trigger`] (a watcher's report, a signal, the tick) leads to one
//! [`Reconciler::step`] that compares what is wanted (the policy file, the
//! names and cgroups it lists, the state recorded) with what the kernel
//! attests, and acts: apply, re-resolve, repair, or stop. Nothing else
//! changes a layer.

use std::{path::PathBuf, sync::Arc, time::Duration};

use tokio::time::Instant;

use super::{metrics::Metrics, Enforced, Identities};
use crate::{
    compile::Plan,
    engine::{self, health::Drift, Engine, LayerKind, LayerSet, Options, Prepared},
    policy::{Directory, NameMemory, Unresolved},
    scope::LocalTable,
    state::{FileStamp, LastGood, State},
};

/// What woke the reconcile loop. Watchers only report; the step decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// SIGHUP: apply the file.
    Hangup,
    /// The policy file (or a directory or symlink on its way) may have
    /// changed.
    PolicyFile,
    /// The user database may have changed.
    Accounts,
    /// A listed cgroup may have appeared, gone or been made again.
    Cgroups,
    /// The kernel's local addresses or routes changed.
    LocalRoutes,
    /// An nftables change touched the instance's table (or events were
    /// lost): read the layers back.
    LayerEvent,
    /// The attach cgroup was removed or made: the cheap look, now.
    AttachCgroup,
    /// Once a second: the cheap look at the layers, and what is due
    /// (retries, the backoff's next repair).
    Tick,
}

/// Why the loop must end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stop {
    /// Enforcement was removed under the daemon (`remove --force`): putting
    /// it back would undo an operator's remove.
    Removed(String),
}

/// The longest wait between repairs (or refreshes) that do not hold.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// How often names that do not resolve, or a file that cannot be applied
/// while the last known good is enforced, are tried again.
pub const RETRY_NAMES: Duration = Duration::from_secs(5);

/// The one backoff: `free` failures in a row are tried again at once,
/// then the wait starts at `first` and doubles up to [`BACKOFF_MAX`]. A
/// success starts over.
#[derive(Debug)]
pub struct Backoff {
    free: u32,
    first: Duration,
    in_a_row: u32,
    last: Option<Instant>,
    said: bool,
}

impl Backoff {
    /// Repairs: three at once (a race with another tool's change), then
    /// 1 s, 2 s, ... 60 s.
    pub fn repairs() -> Backoff {
        Backoff::new(3, Duration::from_secs(1))
    }

    /// Refreshes after a cgroup change that did not take (the file holds
    /// edits not in force, an apply failed): 10 s, 20 s, 40 s, 60 s.
    pub fn refreshes() -> Backoff {
        Backoff::new(0, Duration::from_secs(10))
    }

    pub fn new(free: u32, first: Duration) -> Backoff {
        Backoff {
            free,
            first,
            in_a_row: 0,
            last: None,
            said: false,
        }
    }

    /// How long after the last failure the next try waits: nothing while
    /// fewer than `free` failed in a row, then `first`, doubling.
    pub fn wait(&self) -> Duration {
        let free = self.free.max(1);
        if self.in_a_row < free {
            return Duration::ZERO;
        }
        (self.first * (1u32 << (self.in_a_row - free).min(6))).min(BACKOFF_MAX)
    }

    /// Whether a try may be made now.
    pub fn due(&self) -> bool {
        self.last.is_none_or(|t| t.elapsed() >= self.wait())
    }

    /// A try was made that did not hold.
    pub fn failed(&mut self) {
        self.in_a_row += 1;
        self.last = Some(Instant::now());
    }

    /// A look found nothing wrong: the next failure waits for nothing.
    pub fn held(&mut self) {
        self.in_a_row = 0;
        self.said = false;
    }

    /// Says the wait once per run of failures (`what`: what waits).
    fn say_once(&mut self, what: &str) {
        if !self.said {
            log::error!(
                "{} {what} in a row did not hold (something keeps undoing them): the next in {} s, then less and less often, up to every {} s",
                self.in_a_row,
                self.wait().as_secs(),
                BACKOFF_MAX.as_secs()
            );
            self.said = true;
        }
    }
}

/// Where the wanted state comes from: the policy file and the user
/// database files whose change re-resolves names.
pub struct Sources {
    pub policy: PathBuf,
    pub accounts: Vec<PathBuf>,
}

/// The daemon's core: built from an [`Engine`] (its layers) and a
/// [`Directory`], like the engine; driven by triggers.
pub struct Reconciler {
    engine: Engine,
    dir: Box<dyn Directory>,
    opts: Options,
    sources: Sources,
    metrics: Arc<Metrics>,
    /// The plan in force, for the event readers and the metrics endpoint.
    published: tokio::sync::watch::Sender<Arc<Enforced>>,
    /// What this daemon last saw in force (its own apply or another
    /// process's, read from the state).
    enforced: Arc<Enforced>,
    /// The state file as last read: another process's apply is followed.
    state_seen: Option<FileStamp>,
    /// The policy file and the user database as last resolved.
    policy_seen: Option<FileStamp>,
    accounts_seen: Vec<Option<FileStamp>>,
    /// Listed cgroups' ids as last tried, when a refresh did not hold.
    cgroups_tried: Option<Vec<Option<u64>>>,
    refresh_backoff: Backoff,
    repair_backoff: Backoff,
    /// Names as last resolved (the last known good's, then each apply's).
    resolved_names: NameMemory,
    /// Names that did not resolve at the last resolution.
    unresolved: Vec<Unresolved>,
    /// Enforcing the last known good policy, not the file.
    on_last_good: bool,
    /// The attach cgroup's absence was said.
    cgroup_gone_said: bool,
    /// A look at the layers could not be made (the instance lock was held,
    /// the backoff): the next tick makes it.
    look_pending: bool,
    /// The local table could not be copied whole: tried again each tick.
    local_unsynced: bool,
    next_retry: Instant,
}

impl Reconciler {
    pub fn new(
        engine: Engine,
        dir: Box<dyn Directory>,
        opts: Options,
        sources: Sources,
        metrics: Arc<Metrics>,
        published: tokio::sync::watch::Sender<Arc<Enforced>>,
    ) -> Reconciler {
        let resolved_names = LastGood::names(&engine.paths);
        let policy_seen = FileStamp::of(&sources.policy);
        let accounts_seen = sources.accounts.iter().map(|f| FileStamp::of(f)).collect();
        Reconciler {
            engine,
            dir,
            opts,
            sources,
            metrics,
            published,
            enforced: Arc::new(Enforced::default()),
            state_seen: None,
            policy_seen,
            accounts_seen,
            cgroups_tried: None,
            refresh_backoff: Backoff::refreshes(),
            repair_backoff: Backoff::repairs(),
            resolved_names,
            unresolved: Vec::new(),
            on_last_good: false,
            cgroup_gone_said: false,
            look_pending: false,
            local_unsynced: true,
            next_retry: Instant::now() + RETRY_NAMES,
        }
    }

    /// The plan in force, as this daemon knows it.
    pub fn enforced(&self) -> &Arc<Enforced> {
        &self.enforced
    }

    /// Applies the file at start; when it cannot be applied, enforces what
    /// is in force already, else the last known good. `false`: nothing is
    /// enforced (first boot with a broken file).
    pub fn start(&mut self) -> bool {
        // A missing --cgroup (a slice systemd has not made yet) must not
        // leave the host unguarded: made now, it is guarded from its first
        // process.
        if let Some(cgroup) = &self.opts.cgroup {
            match crate::host::make_cgroup(cgroup) {
                Ok(true) => log::warn!(
                    "cgroup {} did not exist: made it, so that processes placed there are guarded from their start",
                    cgroup.display()
                ),
                Ok(false) => {}
                Err(e) => log::error!("{e}"),
            }
        }
        self.reload("start") || self.fall_back()
    }

    /// Whether `trigger` will reload the policy file (systemd is told
    /// RELOADING around it).
    pub fn reloads(&self, trigger: Trigger) -> bool {
        match trigger {
            Trigger::Hangup => true,
            Trigger::PolicyFile => {
                let now = FileStamp::of(&self.sources.policy);
                now.is_some() && now != self.policy_seen
            }
            _ => false,
        }
    }

    /// One step of the loop: what `trigger` asks for, then what is due.
    pub fn step(&mut self, trigger: Trigger) -> Option<Stop> {
        self.follow_state();
        match trigger {
            Trigger::Hangup => {
                self.policy_seen = FileStamp::of(&self.sources.policy);
                self.reload("SIGHUP");
            }
            Trigger::PolicyFile => {
                let now = FileStamp::of(&self.sources.policy);
                if now.is_some() && now != self.policy_seen {
                    self.policy_seen = now;
                    self.reload("file changed");
                }
            }
            Trigger::Accounts => {
                let now: Vec<_> = self
                    .sources
                    .accounts
                    .iter()
                    .map(|f| FileStamp::of(f))
                    .collect();
                if now != self.accounts_seen {
                    self.accounts_seen = now;
                    self.refresh_identities(Identities::Accounts);
                }
            }
            Trigger::Cgroups => self.follow_cgroups(),
            Trigger::LocalRoutes => self.sync_local_table(),
            Trigger::LayerEvent => return self.look(true),
            Trigger::AttachCgroup => return self.look(false),
            Trigger::Tick => {
                if self.local_unsynced {
                    self.sync_local_table();
                }
                if Instant::now() >= self.next_retry {
                    self.next_retry = Instant::now() + RETRY_NAMES;
                    self.retry();
                }
                return self.look(false);
            }
        }
        None
    }

    /// Applies the file; a refusal or failure is logged and the running
    /// policy stays.
    fn reload(&mut self, why: &str) -> bool {
        let ok = self.reload_inner(why);
        if !ok {
            self.metrics.reload_failures.inc();
        }
        self.note_file_matches();
        ok
    }

    fn note_file_matches(&self) {
        let matches = self
            .enforced
            .plan
            .as_ref()
            .is_some_and(|p| self.file_matches(p));
        self.metrics.file_matches.set(i64::from(matches));
    }

    /// Whether the policy file holds `plan`'s source now.
    fn file_matches(&self, plan: &Plan) -> bool {
        crate::compile::file_matches(&self.sources.policy, plan)
    }

    fn prepare(&self) -> anyhow::Result<Result<Prepared, engine::Refused>> {
        engine::prepare_lenient_with(
            &self.sources.policy,
            self.opts.force,
            self.resolved_names.clone(),
            self.dir.as_ref(),
        )
    }

    fn reload_inner(&mut self, why: &str) -> bool {
        let started = std::time::Instant::now();
        // Programs removed behind the daemon's back load again below.
        self.engine.warm_up(self.opts.layers);
        let prepared = match self.prepare() {
            Ok(Ok(p)) => p,
            Ok(Err(refusal)) => {
                log::error!("{why}: policy not applied; the running policy stays\n{refusal}");
                return false;
            }
            Err(e) => {
                log::error!("{why}: {e:#}; the running policy stays");
                return false;
            }
        };
        if !prepared.warnings.is_empty() {
            log::warn!("{}", prepared.warnings);
        }
        self.commit(why, prepared, started)
    }

    /// The policy file could not be applied at start: enforce what is in
    /// force (pinned from before this daemon), else the last known good.
    fn fall_back(&mut self) -> bool {
        let file = self.sources.policy.display().to_string();
        let in_force = State::load(&self.engine.paths)
            .ok()
            .flatten()
            .filter(|_| self.engine.anything_installed());
        if let Some(state) = in_force {
            log::error!(
                "start: {file} cannot be applied; enforcing the policy in force (plan {}, {}, applied {}) and trying again every {} s",
                state.plan.id,
                state.policy_path.display(),
                state.applied_at,
                RETRY_NAMES.as_secs()
            );
            self.follow_state();
            return true;
        }
        match LastGood::load(&self.engine.paths) {
            Ok(Some(good)) => {
                log::error!(
                    "start: {file} cannot be applied; enforcing the last known good policy (plan {}, {} of {}, applied {}) and trying again every {} s",
                    good.state.plan.id,
                    good.state.plan.hash,
                    good.state.policy_path.display(),
                    good.state.applied_at,
                    RETRY_NAMES.as_secs()
                );
                let prepared = Prepared::of_state(good.state);
                if self.commit("last known good", prepared, std::time::Instant::now()) {
                    self.on_last_good = true;
                    self.metrics.last_good.set(1);
                    return true;
                }
                log::error!(
                    "NOT ENFORCING: the last known good policy could not be applied either"
                );
                false
            }
            Ok(None) => {
                log::error!(
                    "NOT ENFORCING: {file} cannot be applied and no last known good policy was kept ({})",
                    self.engine.paths.good_dir.display()
                );
                false
            }
            Err(e) => {
                log::error!("NOT ENFORCING: {file} cannot be applied, and the last known good cannot be read: {e}");
                false
            }
        }
    }

    /// Sockets on bind-guarded ports held by uids that may not bind them:
    /// said when `say` (after an apply), always counted.
    fn look_for_squatters(&self, plan: &Plan, say: bool) {
        match crate::scan::squatters_now(plan) {
            Ok(found) => {
                if say {
                    for s in &found {
                        log::warn!("{s}");
                    }
                } else if found.is_empty() && self.metrics.squatters.get() > 0 {
                    log::info!("no squatters are left on bind-guarded ports");
                }
                self.metrics.squatters.set(found.len() as i64);
            }
            Err(e) => log::warn!("squatters not looked for (sock_diag): {e}"),
        }
    }

    /// Says which names did not resolve (each once per change).
    fn note_unresolved(&mut self, unresolved: Vec<Unresolved>) {
        if unresolved != self.unresolved {
            for u in &unresolved {
                log::warn!("{u}; trying again every {} s", RETRY_NAMES.as_secs());
            }
            if unresolved.is_empty() && !self.unresolved.is_empty() {
                log::info!("every name of the policy resolves again");
            }
        }
        self.metrics.names_unresolved.set(unresolved.len() as i64);
        self.unresolved = unresolved;
    }

    /// While names do not resolve, or the last known good is enforced
    /// instead of the file: the file is tried again, and applied when it
    /// resolves to something new. Quiet while nothing changed.
    fn retry(&mut self) {
        // A squatter that was found is looked for again until it is gone.
        if self.metrics.squatters.get() > 0 {
            if let Some(plan) = self.enforced.plan.clone() {
                self.look_for_squatters(&plan, false);
            }
        }
        // (A broken edit of the file is the file watcher's: it reloads on
        // the next edit.)
        if self.unresolved.is_empty() && !self.on_last_good {
            return;
        }
        let started = std::time::Instant::now();
        let Ok(Ok(prepared)) = self.prepare() else {
            return;
        };
        if self.enforced.plan.as_ref().map(|p| &p.id) == Some(&prepared.plan.id)
            && prepared.unresolved == self.unresolved
        {
            return;
        }
        self.commit("names or policy file resolve anew", prepared, started);
    }

    /// Enforces a prepared policy and makes it the one published.
    fn commit(&mut self, why: &str, prepared: Prepared, started: std::time::Instant) -> bool {
        let names = prepared.names.clone();
        let unresolved = prepared.unresolved.clone();
        let committed = self.engine.apply(&self.opts, prepared);
        release_memory();
        match committed {
            Ok(state) => {
                log::info!("{why}: {}", engine::summary(&state, started.elapsed()));
                if let Some(names) = names {
                    // Read from the file now: the last known good from here on.
                    self.resolved_names = names;
                    self.on_last_good = false;
                    self.metrics.last_good.set(0);
                }
                self.note_unresolved(unresolved);
                self.look_for_squatters(&state.plan, true);
                for kind in LayerKind::ALL {
                    self.metrics
                        .set_enforcing(kind, state.layers.contains(&kind).then_some(true));
                }
                self.state_seen = FileStamp::of(&self.engine.paths.state_file);
                self.publish(state);
                self.metrics.generation.inc();
                self.metrics
                    .last_apply
                    .set(jiff::Timestamp::now().as_second());
                true
            }
            Err(e) => {
                log::error!("{why}: {e:#}; the running policy stays");
                false
            }
        }
    }

    fn publish(&mut self, state: State) {
        const RECENT: usize = 3;
        let plan = Arc::new(state.plan);
        let mut recent = vec![plan.clone()];
        recent.extend(
            self.enforced
                .recent
                .iter()
                .filter(|p| p.id != plan.id)
                .take(RECENT - 1)
                .cloned(),
        );
        let enforced = Arc::new(Enforced {
            plan: Some(plan),
            recent,
            packet_base: state.packet_base,
            layers: state.layers,
            cgroup: state.cgroup,
            state_stamp: FileStamp::of(&self.engine.paths.state_file),
        });
        self.enforced = enforced.clone();
        self.published.send_replace(enforced);
    }

    /// Names and groups (or the cgroups) of the policy in force are
    /// resolved again and, when a service's lists changed, the layers are
    /// updated in place. Each change is logged (`user lgt-bob added to
    /// service db via group lgt-live`).
    fn refresh_identities(&mut self, what: Identities) -> bool {
        let Some(current) = self.enforced.plan.clone() else {
            return true;
        };
        // Only the file that is in force is re-resolved: an edit not yet
        // applied (a broken one) is the file watcher's business.
        if !self.file_matches(&current) {
            log::warn!(
                "{what} changed, but {} holds edits not in force: not refreshed",
                self.sources.policy.display()
            );
            self.metrics.refresh_failed(what);
            return false;
        }
        let started = std::time::Instant::now();
        // A name that vanished must not hold back the other changes (a
        // revocation above all): on an allow-list it admits nobody, on a
        // deny-list its last uids stay denied, and it is said.
        let prepared = match self.prepare() {
            Ok(Ok(p)) => p,
            Ok(Err(refused)) => {
                log::error!("{what} changed: the policy no longer resolves; the running policy stays\n{refused}");
                self.metrics.refresh_failed(what);
                return false;
            }
            Err(e) => {
                log::error!("{what} changed: {e:#}; the running policy stays");
                self.metrics.refresh_failed(what);
                return false;
            }
        };
        self.metrics.resolved(what);
        self.note_unresolved(prepared.unresolved.clone());
        if prepared.plan.id == current.id {
            log::debug!("{what} changed; no service's list did");
            return true;
        }
        let changes = membership_changes(&current, &prepared, self.dir.as_ref());
        if self.commit(&format!("{what} changed"), prepared, started) {
            for c in changes {
                log::info!("{c}");
            }
            return true;
        }
        false
    }

    /// A listed cgroup that appeared, went, or was made again (a restarted
    /// unit gets a new id) updates the layers; a refresh that did not hold
    /// waits for the backoff unless the ids changed again.
    fn follow_cgroups(&mut self) {
        let Some(plan) = self.enforced.plan.clone() else {
            return;
        };
        let mut listed: Vec<&crate::policy::ResolvedCgroup> =
            plan.cgroup_sets.iter().flatten().collect();
        listed.sort();
        listed.dedup();
        let now: Vec<Option<u64>> = listed.iter().map(|c| self.dir.cgroup_id(&c.path)).collect();
        let applied: Vec<Option<u64>> = listed.iter().map(|c| c.id).collect();
        if now == applied {
            self.cgroups_tried = None;
            self.refresh_backoff.held();
            return;
        }
        let again = self.cgroups_tried.as_ref() == Some(&now);
        if again && !self.refresh_backoff.due() {
            return;
        }
        if self.refresh_identities(Identities::Cgroups) {
            self.refresh_backoff.held();
            self.cgroups_tried = None;
        } else {
            self.refresh_backoff.failed();
            self.cgroups_tried = Some(now);
        }
    }

    /// Copies the kernel's local table into every layer that keeps a copy.
    fn sync_local_table(&mut self) {
        let table = match LocalTable::read() {
            Ok(t) => t,
            Err(e) => {
                self.metrics.local_failures.inc();
                log::error!("cannot read the kernel's local routing table: {e}");
                self.local_unsynced = true;
                return;
            }
        };
        self.metrics.local_prefixes.set(table.len() as i64);
        let mut synced = true;
        for mut layer in self.engine.layers() {
            match layer.sync_local(&self.engine.paths, &table) {
                Ok(Some(changed)) if changed > 0 => log::debug!(
                    "local table: {} prefixes, {changed} {} entries changed",
                    table.len(),
                    layer.kind()
                ),
                Ok(_) => {}
                Err(e) => {
                    synced = false;
                    log::error!(
                        "local routing table not fully guarded by the {} layer: {e:#}",
                        layer.kind().title()
                    );
                }
            }
        }
        if !synced {
            self.metrics.local_failures.inc();
        }
        self.local_unsynced = !synced;
    }

    /// Compares the layers with the state and puts back what a layer it
    /// lists lost. `event`: an nftables or cgroup event arrived (else only
    /// the cheap look is made, unless one is pending).
    fn look(&mut self, event: bool) -> Option<Stop> {
        let paths = self.engine.paths.clone();
        let enforced = self.enforced.clone();
        // The cheap look (a stat per eBPF link pin), against the layers of
        // the policy in force; the nftables layer announces its changes.
        let mut gone = false;
        for l in self.engine.layers() {
            let kind = l.kind();
            if !enforced.layers.contains(&kind) {
                self.metrics.set_enforcing(kind, None);
                continue;
            }
            match l.still_there(&paths, &enforced.cgroup) {
                Some(false) => {
                    gone = true;
                    self.metrics.set_enforcing(kind, Some(false));
                }
                Some(true) => self.metrics.set_enforcing(kind, Some(true)),
                None => {}
            }
        }
        if !gone && !event && !self.look_pending {
            return None;
        }
        // The attach cgroup is gone (systemd removed an emptied slice): no
        // repair can attach until it is made again, which inotify reports.
        // Not tried (nor counted) meanwhile; said once.
        if enforced.layers.contains(&LayerKind::Bpf)
            && crate::host::cgroup_id(&enforced.cgroup).is_none()
            && paths.state_file.exists()
        {
            if !self.cgroup_gone_said {
                log::error!(
                    "cgroup {} is gone: the eBPF layer enforces nothing until it is made again",
                    enforced.cgroup.display()
                );
                self.cgroup_gone_said = true;
            }
            self.metrics.set_enforcing(LayerKind::Bpf, Some(false));
            if !event {
                return None;
            }
        } else {
            self.cgroup_gone_said = false;
        }
        if !self.repair_backoff.due() {
            self.repair_backoff.say_once("repairs");
            self.look_pending = true;
            return None;
        }
        // Under the instance lock, never waiting for it: an apply or remove
        // from a shell holds it while it changes the layers.
        let _lock = match engine::try_lock(&paths) {
            Ok(Some(l)) => l,
            Ok(None) => {
                self.look_pending = true;
                return None;
            }
            Err(e) => {
                log::warn!("{e:#}");
                self.look_pending = true;
                return None;
            }
        };
        self.look_pending = false;
        let state = match State::load(&paths) {
            Ok(Some(state)) => state,
            Ok(None) | Err(_) => {
                if let Some(stop) = self.removed() {
                    return Some(stop);
                }
                // The state taken by anything but `remove --force`: what
                // this daemon enforces is put back.
                self.state_of_current()?
            }
        };
        let drift = self.engine.drift(&state);
        let damaged: Vec<LayerKind> = drift.iter().filter_map(Drift::damaged).collect();
        for kind in LayerKind::ALL {
            let on = state
                .layers
                .contains(&kind)
                .then(|| !damaged.contains(&kind));
            self.metrics.set_enforcing(kind, on);
        }
        if damaged.is_empty() {
            self.repair_backoff.held();
            return None;
        }
        for d in &drift {
            log::warn!("{d}; putting plan {} back", state.plan.id);
        }
        for layer in &damaged {
            self.metrics.repaired(*layer);
        }
        self.repair_backoff.failed();
        let started = std::time::Instant::now();
        // Put back what was applied, as it was applied (its layers and
        // cgroup), not what this daemon would apply.
        let opts = Options {
            cgroup: Some(state.cgroup.clone()),
            layers: LayerSet::of(&state.layers),
            force: true,
        };
        match self.engine.apply_locked(&opts, Prepared::of_state(state)) {
            // (Enforcing is said by the next look's read-back: the repair's
            // own nftables commit wakes one, the tick's look the eBPF one.)
            Ok(state) => log::info!("repaired: {}", engine::summary(&state, started.elapsed())),
            Err(e) => log::error!("repair failed: {e:#}"),
        }
        None
    }

    /// The state of the policy this daemon enforces, for a repair when the
    /// state file was taken (not by `remove --force`, which stops it).
    fn state_of_current(&self) -> Option<State> {
        let plan = self.enforced.plan.clone()?;
        log::error!(
            "the state of instance {} is gone (not by `remove --force`): putting plan {} back",
            self.engine.paths.instance,
            plan.id
        );
        Some(State {
            policy_path: self.sources.policy.clone(),
            cgroup: self.enforced.cgroup.clone(),
            applied_at: String::new(),
            slot: 0,
            layers: self.enforced.layers.clone(),
            plan: Plan::clone(&plan),
            nft_layout: 0,
            packet_base: Default::default(),
            netns_cookie: 0,
            cgroup_id: 0,
            nft_generation: None,
        })
    }

    /// Enforcement removed under the daemon (`remove --force`): no state,
    /// nothing installed, the note `remove --force` leaves. The daemon says
    /// who, and stops. Anything else that took the state (a plain remove
    /// racing this daemon's start) is damage, put back.
    fn removed(&mut self) -> Option<Stop> {
        let paths = &self.engine.paths;
        if self.enforced.plan.is_none()
            || !paths.removed_by_file.exists()
            || self.engine.anything_installed()
        {
            return None;
        }
        let by = std::fs::read_to_string(&paths.removed_by_file)
            .map(|b| format!(" by {}", b.trim()))
            .unwrap_or_default();
        let _ = std::fs::remove_file(&paths.removed_by_file);
        for kind in LayerKind::ALL {
            self.metrics.set_enforcing(kind, Some(false));
        }
        Some(Stop::Removed(format!(
            "enforcement of instance {} was removed{by} (`loopguard remove --force`): not enforcing; stopping",
            paths.instance
        )))
    }

    /// Follows the policy in force, whoever applied it: when the state file
    /// changed since it was last read, its plan is published. One stat.
    fn follow_state(&mut self) {
        let stamp = FileStamp::of(&self.engine.paths.state_file);
        if stamp.is_none() || stamp == self.state_seen {
            return;
        }
        self.state_seen = stamp;
        match State::load(&self.engine.paths) {
            Ok(Some(state)) => {
                if self.enforced.plan.as_ref().map(|p| &p.id) != Some(&state.plan.id) {
                    log::info!(
                        "following plan {} ({}), applied by another process",
                        state.plan.id,
                        state.policy_path.display()
                    );
                }
                // Its cgroup, layers and counts too, whatever the plan.
                self.publish(state);
            }
            Ok(None) => {}
            Err(e) => log::warn!("{e}"),
        }
    }
}

/// Hands freed memory back to the kernel: a reload reads the whole policy
/// (tens of megabytes for a large one), and glibc would otherwise keep the
/// peak resident for the daemon's lifetime.
fn release_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// What a re-resolution changed, one line per uid and service (`user
/// lgt-bob added to service db via group lgt-live`) and per listed cgroup
/// that appeared, went or was made again.
fn membership_changes(old: &Plan, new: &Prepared, dir: &dyn Directory) -> Vec<String> {
    use crate::{
        plan_diff::{CgroupChange, ServiceChange},
        policy::{ListKind, VANISHED_UID},
    };
    let who = |uid: u32| {
        dir.user_name(uid)
            .map_or(format!("uid {uid}"), |n| format!("user {n}"))
    };
    let listed: std::collections::HashMap<&str, &crate::policy::Service> = new
        .policy
        .iter()
        .flat_map(|p| p.services.iter())
        .map(|s| (s.name.as_str(), s))
        .collect();
    let mut out = Vec::new();
    for change in crate::plan_diff::diff(old, &new.plan).services {
        let ServiceChange::Changed(d) = change else {
            continue;
        };
        let name = &d.new.name;
        // Each listed group's members, asked once per service.
        let groups: Vec<(String, Vec<u32>)> = listed
            .get(name.as_str())
            .map(|ps| {
                ps.groups
                    .iter()
                    .filter(|_| !d.uids_added.is_empty())
                    .filter_map(|(g, _)| Some((g.to_string(), dir.group_members(g)?)))
                    .collect()
            })
            .unwrap_or_default();
        for &uid in d.uids_added.iter().filter(|&&u| u != VANISHED_UID) {
            let via = groups
                .iter()
                .find(|(_, members)| members.contains(&uid))
                .map(|(g, _)| format!(" via group {g}"))
                .unwrap_or_default();
            let what = match d.new.list {
                ListKind::Allow => "added to service",
                ListKind::Deny => "now on the deny-list of service",
            };
            out.push(format!("{} {what} {name}{via}", who(uid)));
        }
        for &uid in &d.uids_removed {
            let what = match d.new.list {
                ListKind::Allow => "removed from service",
                ListKind::Deny => "no longer on the deny-list of service",
            };
            out.push(format!(
                "{} {what} {name} (no longer listed, or no longer in its groups)",
                who(uid)
            ));
        }
        for c in &d.cgroups {
            let (path, change) = match c {
                CgroupChange::Listed { path, id: Some(id) }
                | CgroupChange::Appeared { path, id } => (path, format!("exists now (id {id})")),
                CgroupChange::Gone { path, .. } => (path, "is gone".to_string()),
                CgroupChange::MadeAgain { path, was, now } => {
                    (path, format!("was made again (id {was} -> {now})"))
                }
                CgroupChange::Listed { .. } | CgroupChange::Unlisted { .. } => continue,
            };
            out.push(format!("cgroup {path} of service {name} {change}"));
        }
    }
    out
}
