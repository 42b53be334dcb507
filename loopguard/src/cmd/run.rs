//! `loopguard run`: the foreground daemon for systemd.
//!
//! Applies the policy, then on one tokio thread: streams audit events from
//! the eBPF ring buffer to stdout (journald) and the audit log, reports
//! events lost to a full buffer, reloads on SIGHUP and when the file changes
//! (a broken edit is logged and the running policy stays), keeps the host
//! address sets current from rtnetlink, serves Prometheus metrics, and tells
//! systemd it is ready. SIGTERM stops it; enforcement stays pinned.

use std::{
    collections::HashMap,
    fs,
    io::{self, Write as _},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use aya::maps::{Map, MapData, RingBuf};
use loopguard::{
    audit::{self, AuditLog, Clock, EventNames},
    compile::Plan,
    ebpf::{self, Maps},
    engine::{self, LayerKind, LayerSet, Options},
    health::Drift,
    host, nft,
    paths::InstancePaths,
    scope::LocalTable,
    state::{LastGood, State},
};
use loopguard_common::Event;
use netlink_sys::{
    protocols::{NETLINK_NETFILTER, NETLINK_ROUTE},
    Socket,
};
use nix::fcntl::{Flock, FlockArg};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use sd_notify::NotifyState;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
};

use super::EnforceArgs;
use crate::exit;

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  loopguard run /etc/loopguard/policy.toml\n  loopguard run policy.toml --audit-log /var/log/loopguard/audit.jsonl --metrics 127.0.0.1:9477"
)]
pub(crate) struct Args {
    /// The policy file (watched for changes).
    #[arg(value_name = "FILE")]
    file: PathBuf,
    #[command(flatten)]
    enforce: EnforceArgs,
    /// Also append events here [default: /var/log/loopguard/INSTANCE.jsonl].
    #[arg(long, value_name = "PATH")]
    audit_log: Option<PathBuf>,
    /// Rotate the audit log to PATH.1 at this size.
    #[arg(long, value_name = "BYTES", default_value_t = 64 << 20)]
    audit_log_max_bytes: u64,
    /// Serve Prometheus metrics on this address (keep it on loopback).
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<SocketAddr>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    service: String,
    layer: String,
    action: String,
}

/// Metrics, refreshed from the kernel counters at each scrape.
struct Metrics {
    registry: Registry,
    attempts: Family<AttemptLabels, Counter>,
    dropped: Counter,
    generation: Gauge,
    last_apply: Gauge,
    local_prefixes: Gauge,
    local_failures: Counter,
    repairs: Family<LayerLabels, Counter>,
    enforcing: Family<LayerLabels, Gauge>,
    last_good: Gauge,
    names_unresolved: Gauge,
    squatters: Gauge,
    reload_failures: Counter,
    file_matches: Gauge,
    accounts_refreshed: Gauge,
    accounts_refresh_failures: Counter,
    cgroups_refreshed: Gauge,
    cgroups_refresh_failures: Counter,
    seen: HashMap<AttemptLabels, u64>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LayerLabels {
    layer: String,
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("loopguard");
        let attempts = Family::<AttemptLabels, Counter>::default();
        let dropped = Counter::default();
        let generation = Gauge::default();
        let last_apply = Gauge::default();
        let local_prefixes = Gauge::default();
        let local_failures = Counter::default();
        let repairs = Family::<LayerLabels, Counter>::default();
        let enforcing = Family::<LayerLabels, Gauge>::default();
        let last_good = Gauge::default();
        let names_unresolved = Gauge::default();
        let squatters = Gauge::default();
        let reload_failures = Counter::default();
        let file_matches = Gauge::default();
        let accounts_refreshed = Gauge::default();
        let accounts_refresh_failures = Counter::default();
        let cgroups_refreshed = Gauge::default();
        let cgroups_refresh_failures = Counter::default();
        registry.register(
            "cgroups_resolved_timestamp_seconds",
            "Unix time the policy's cgroups and units were last resolved after one appeared, went or was made again",
            cgroups_refreshed.clone(),
        );
        registry.register(
            "cgroups_refresh_failures",
            "Cgroup changes that could not be enforced (the policy no longer resolves, or its file holds unapplied edits)",
            cgroups_refresh_failures.clone(),
        );
        registry.register(
            "accounts_resolved_timestamp_seconds",
            "Unix time the policy's users and groups were last resolved after a change to the user database",
            accounts_refreshed.clone(),
        );
        registry.register(
            "accounts_refresh_failures",
            "Changes to the user database that could not be enforced (the policy no longer resolves, or its file holds unapplied edits)",
            accounts_refresh_failures.clone(),
        );
        registry.register(
            "policy_reload_failures",
            "Reloads that left the running policy in force (a broken edit, a failed apply)",
            reload_failures.clone(),
        );
        registry.register(
            "policy_file_matches_applied",
            "1 when the policy file's contents are the policy in force, 0 after an edit that was not applied",
            file_matches.clone(),
        );
        registry.register(
            "layer_repairs",
            "Times a layer was found missing or altered (another tool's nft flush ruleset, deleted pins) and put back",
            repairs.clone(),
        );
        registry.register(
            "layer_enforcing",
            "1 when the kernel is attested to enforce the policy in force on the layer (every eBPF link alive on the recorded cgroup; the table holding what the plan renders), else 0",
            enforcing.clone(),
        );
        registry.register(
            "policy_last_known_good",
            "1 while the daemon enforces the last known good policy because the file could not be applied at start",
            last_good.clone(),
        );
        registry.register(
            "names_unresolved",
            "Names of the policy that do not resolve (tried again every 5 s): on an allow-list they admit nobody, on a deny-list their last uids stay denied",
            names_unresolved.clone(),
        );
        registry.register(
            "squatters",
            "Sockets bound on a bind-guarded port by a uid that may not bind it (bound before the guard was in force): they keep the port",
            squatters.clone(),
        );
        registry.register(
            "local_prefixes",
            "Prefixes of the kernel's local table (and the fixed broadcast and multicast ranges) the eBPF layer guards",
            local_prefixes.clone(),
        );
        registry.register(
            "local_table_sync_failures",
            "Times the kernel's local table could not be copied into the eBPF layer whole",
            local_failures.clone(),
        );
        registry.register(
            "attempts",
            "Connection attempts (bpf) and packets (nft) per service, layer and action",
            attempts.clone(),
        );
        registry.register(
            "events_dropped",
            "Audit events lost to a full buffer",
            dropped.clone(),
        );
        registry.register(
            "policy_generation",
            "Policies applied by this process",
            generation.clone(),
        );
        registry.register(
            "last_apply_timestamp_seconds",
            "Unix time of the last successful apply",
            last_apply.clone(),
        );
        Metrics {
            registry,
            attempts,
            dropped,
            generation,
            last_apply,
            local_prefixes,
            local_failures,
            repairs,
            enforcing,
            last_good,
            names_unresolved,
            squatters,
            reload_failures,
            file_matches,
            accounts_refreshed,
            accounts_refresh_failures,
            cgroups_refreshed,
            cgroups_refresh_failures,
            seen: HashMap::new(),
        }
    }

    /// A change to `what` that could not be enforced.
    fn refresh_failed(&self, what: Identities) {
        match what {
            Identities::Accounts => self.accounts_refresh_failures.inc(),
            Identities::Cgroups => self.cgroups_refresh_failures.inc(),
        };
    }

    /// `what` was resolved again, now.
    fn resolved(&self, what: Identities) {
        let now = jiff::Timestamp::now().as_second();
        match what {
            Identities::Accounts => self.accounts_refreshed.set(now),
            Identities::Cgroups => self.cgroups_refreshed.set(now),
        };
    }

    /// Brings the counters up to the kernel's (which only grow while a
    /// policy is in force; a re-apply carries them over by service name).
    fn refresh(&mut self, paths: &InstancePaths, plan: &Plan, packet_base: &nft::PacketCounts) {
        let mut current: Vec<(AttemptLabels, u64)> = Vec::new();
        let name = |i: usize| {
            plan.services
                .get(i)
                .map_or("default".to_string(), |s| s.name.clone())
        };
        for layer in engine::layers() {
            let Some(counts) = layer.counts(paths, plan, packet_base) else {
                continue;
            };
            for c in counts {
                current.push((
                    AttemptLabels {
                        service: name(c.bucket),
                        layer: layer.kind().to_string(),
                        action: c.action.as_str().into(),
                    },
                    c.value,
                ));
            }
        }
        for (labels, value) in current {
            // The nftables layer counts refusals, whatever the mode: what it
            // counted while a service was in audit mode stays would-deny
            // after the switch to enforce (and the other way round). The
            // baseline is the refusal count, not the action's.
            let key = if labels.layer == "nft" && labels.action != "allow" {
                AttemptLabels {
                    action: "refused".into(),
                    ..labels.clone()
                }
            } else {
                labels.clone()
            };
            let last = self.seen.insert(key, value).unwrap_or(0);
            if value > last {
                self.attempts.get_or_create(&labels).inc_by(value - last);
            } else {
                // Create the series, so it shows at zero.
                let _ = self.attempts.get_or_create(&labels);
            }
        }
    }

    fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Shared between the tasks (one thread: the mutex is never contended).
struct Daemon {
    paths: InstancePaths,
    opts: Options,
    file: PathBuf,
    /// Plans by kernel slot, so events from either slot name their service.
    /// Plans events are decoded with, by [`Plan::id_number`] (the eBPF
    /// layer stamps each event with the id of the plan that decided it):
    /// the one in force and the few before it.
    plans: HashMap<u64, Plan>,
    /// A plan id seen in an event and found nowhere: not looked for again
    /// until the state file changes.
    unknown_plan: Option<u64>,
    current: Option<Plan>,
    /// The applied state's carried nftables counts.
    packet_base: nft::PacketCounts,
    log: Option<AuditLog>,
    names: EventNames,
    clock: Clock,
    metrics: Metrics,
    /// Identity of the state file last read, to notice another process's
    /// apply (config management running `loopguard apply` under the daemon).
    state_seen: Option<(SystemTime, u64, u64)>,
    /// Layers of the policy in force (from the last state read).
    applied_layers: Vec<LayerKind>,
    /// The cgroup the eBPF layer of the policy in force is attached to.
    applied_cgroup: PathBuf,
    last_repair: Option<Instant>,
    repairs_in_a_row: u32,
    /// Set when the daemon must stop: what happened (enforcement removed
    /// under it).
    fatal: tokio::sync::watch::Sender<Option<String>>,
    /// Names as last resolved (the last known good's, then each apply's).
    resolved_names: loopguard::policy::NameMemory,
    /// What the names that did not resolve stand for now, in words.
    unresolved: Vec<String>,
    /// Enforcing the last known good policy, not the file.
    on_last_good: bool,
    /// The attach cgroup's absence was logged.
    cgroup_gone_said: bool,
    /// A look at the layers could not be made (the instance lock was held,
    /// the backoff): the next tick makes it, event or not.
    look_pending: bool,
    /// The backoff was said.
    backoff_said: bool,
}

/// The longest wait between repairs that do not hold.
const REPAIR_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// How long to wait before the next repair after `in_a_row` that did not
/// hold: none for the first three, then 1 s, doubling up to a minute. A
/// look that finds nothing wrong starts over.
fn repair_backoff(in_a_row: u32) -> Duration {
    if in_a_row < 3 {
        return Duration::ZERO;
    }
    Duration::from_secs(1u64 << (in_a_row - 3).min(6)).min(REPAIR_BACKOFF_MAX)
}

/// How often names that do not resolve, or a file that cannot be applied
/// while the last known good is enforced, are tried again.
const RETRY_NAMES: Duration = Duration::from_secs(5);

impl Daemon {
    /// Applies the file; a refusal or failure is logged and the running
    /// policy stays.
    fn reload(&mut self, why: &str) -> bool {
        let ok = self.reload_inner(why);
        if !ok {
            self.metrics.reload_failures.inc();
        }
        let file = fs::read(&self.file)
            .ok()
            .map(|b| loopguard::compile::source_hash(&String::from_utf8_lossy(&b)));
        let applied = self.current.as_ref().map(|p| &p.hash);
        self.metrics
            .file_matches
            .set(i64::from(file.is_some() && file.as_ref() == applied));
        ok
    }

    fn reload_inner(&mut self, why: &str) -> bool {
        let started = Instant::now();
        // Programs removed behind the daemon's back load again below.
        engine::warm_up(self.opts.layers, &self.paths);
        let prepared =
            match engine::prepare_lenient(&self.file, self.opts.force, self.resolved_names.clone())
            {
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
    /// `false`: nothing to enforce (first boot with a broken file).
    fn fall_back(&mut self, file: &Path) -> bool {
        let in_force = State::load(&self.paths)
            .ok()
            .flatten()
            .filter(|_| ebpf::is_installed(&self.paths) || nft::table_exists(&self.paths.instance));
        if let Some(state) = in_force {
            log::error!(
                "start: {} cannot be applied; enforcing the policy in force (plan {}, {}, applied {}) and trying again every {} s",
                file.display(),
                state.plan.id,
                state.policy_path.display(),
                state.applied_at,
                RETRY_NAMES.as_secs()
            );
            self.follow_state();
            return true;
        }
        match LastGood::load(&self.paths) {
            Ok(Some(good)) => {
                log::error!(
                    "start: {} cannot be applied; enforcing the last known good policy (plan {}, {} of {}, applied {}) and trying again every {} s",
                    file.display(),
                    good.state.plan.id,
                    good.state.plan.hash,
                    good.state.policy_path.display(),
                    good.state.applied_at,
                    RETRY_NAMES.as_secs()
                );
                let prepared = engine::Prepared {
                    plan: good.state.plan,
                    policy_path: good.state.policy_path,
                    warnings: String::new(),
                    policy: None,
                    names: None,
                    unresolved: Vec::new(),
                    source_stamp: None,
                };
                if self.commit("last known good", prepared, Instant::now()) {
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
                    "NOT ENFORCING: {} cannot be applied and no last known good policy was kept ({})",
                    file.display(),
                    self.paths.good_dir.display()
                );
                false
            }
            Err(e) => {
                log::error!("NOT ENFORCING: {} cannot be applied, and the last known good cannot be read: {e}", file.display());
                false
            }
        }
    }

    /// Sockets on bind-guarded ports held by uids that may not bind them:
    /// said when `say` (after an apply), always counted.
    fn look_for_squatters(&mut self, plan: &Plan, say: bool) {
        match loopguard::scan::squatters_now(plan) {
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

    /// Says which names did not resolve (each once per change), and keeps
    /// count for the retry and the metric.
    fn note_unresolved(&mut self, unresolved: &[loopguard::policy::Unresolved]) {
        let words: Vec<String> = unresolved.iter().map(ToString::to_string).collect();
        if words != self.unresolved {
            for w in &words {
                log::warn!("{w}; trying again every {} s", RETRY_NAMES.as_secs());
            }
            if words.is_empty() && !self.unresolved.is_empty() {
                log::info!("every name of the policy resolves again");
            }
        }
        self.metrics.names_unresolved.set(words.len() as i64);
        self.unresolved = words;
    }

    /// While names do not resolve, or the last known good is enforced
    /// instead of the file: the file is tried again, and applied when it
    /// resolves to something new. Quiet while nothing changed (the first
    /// failure was said).
    fn retry(&mut self) {
        // A squatter that was found is looked for again until it is gone.
        if self.metrics.squatters.get() > 0 {
            if let Some(plan) = self.current.clone() {
                self.look_for_squatters(&plan, false);
            }
        }
        // (A broken edit of the file is the file watcher's: it reloads on
        // the next edit. Reading a large file every few seconds for nothing
        // would cost its size in memory each time.)
        if self.unresolved.is_empty() && !self.on_last_good {
            return;
        }
        let started = Instant::now();
        let Ok(Ok(prepared)) =
            engine::prepare_lenient(&self.file, self.opts.force, self.resolved_names.clone())
        else {
            return;
        };
        let words: Vec<String> = prepared
            .unresolved
            .iter()
            .map(ToString::to_string)
            .collect();
        if self.current.as_ref().map(|p| &p.id) == Some(&prepared.plan.id)
            && words == self.unresolved
        {
            return;
        }
        self.commit("names or policy file resolve anew", prepared, started);
    }

    /// Enforces a prepared policy and makes it the one events are decoded
    /// with.
    fn commit(&mut self, why: &str, prepared: engine::Prepared, started: Instant) -> bool {
        let names = prepared.names.clone();
        let unresolved = prepared.unresolved.clone();
        let committed = engine::apply(&self.opts, &self.paths, prepared);
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
                self.note_unresolved(&unresolved);
                self.look_for_squatters(&state.plan, true);
                self.applied_layers = state.layers.clone();
                self.applied_cgroup = state.cgroup.clone();
                for kind in LayerKind::ALL {
                    if state.layers.contains(&kind) {
                        self.set_enforcing(kind, true);
                    } else {
                        self.unset_enforcing(kind);
                    }
                }
                self.remember(state.plan.clone());
                self.current = Some(state.plan);
                self.packet_base = state.packet_base;
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

    /// The user database changed (`/etc/passwd`, `/etc/group`): names and
    /// groups of the policy in force are resolved again and, when a
    /// service's uids changed, both layers are updated in place. Each
    /// change is logged (`user lgt-bob added to service db via group
    /// lgt-live`).
    fn refresh_identities(&mut self, what: Identities) {
        let Some(current) = self.current.clone() else {
            return;
        };
        // Only the file that is in force is re-resolved: an edit not yet
        // applied (a broken one) is the file watcher's business.
        let on_disk = fs::read(&self.file)
            .ok()
            .map(|b| loopguard::compile::source_hash(&String::from_utf8_lossy(&b)));
        if on_disk.as_ref() != Some(&current.hash) {
            log::warn!(
                "{what} changed, but {} holds edits not in force: not refreshed",
                self.file.display()
            );
            self.metrics.refresh_failed(what);
            return;
        }
        let started = Instant::now();
        // A name that vanished must not hold back the other changes (a
        // revocation above all): on an allow-list it admits nobody, on a
        // deny-list its last uids stay denied (userdel kills nothing: its
        // processes may run on), and it is said.
        let prepared =
            engine::prepare_lenient(&self.file, self.opts.force, self.resolved_names.clone());
        let prepared = match prepared {
            Ok(Ok(p)) => p,
            Ok(Err(refused)) => {
                log::error!("{what} changed: the policy no longer resolves; the running policy stays\n{refused}");
                self.metrics.refresh_failed(what);
                return;
            }
            Err(e) => {
                log::error!("{what} changed: {e:#}; the running policy stays");
                self.metrics.refresh_failed(what);
                return;
            }
        };
        self.metrics.resolved(what);
        self.note_unresolved(&prepared.unresolved);
        if prepared.plan.id == current.id {
            log::debug!("{what} changed; no service's list did");
            return;
        }
        let changes = membership_changes(&current, &prepared);
        if self.commit(&format!("{what} changed"), prepared, started) {
            for c in changes {
                log::info!("{c}");
            }
        }
    }
    /// Writes records to stdout and the audit log, one write each per batch.
    fn emit_all(&mut self, lines: &[EventLine]) {
        if lines.is_empty() {
            return;
        }
        // Under systemd (JOURNAL_STREAM), each line with its sd-daemon
        // priority prefix; elsewhere plain JSON lines.
        let journal = std::env::var_os("JOURNAL_STREAM").is_some();
        let mut text = String::with_capacity(lines.iter().map(|l| l.text.len() + 4).sum());
        for l in lines {
            if journal {
                text.push_str(&format!("<{}>", l.priority));
            }
            text.push_str(&l.text);
            text.push('\n');
        }
        let mut out = io::stdout().lock();
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
        if let Some(log) = &mut self.log {
            let texts: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
            if let Err(e) = log.write_lines(&texts) {
                log::error!("audit log: {e}");
            }
        }
    }

    fn emit(&mut self, record: &audit::AuditRecord) {
        self.emit_all(&[EventLine::of(record)]);
    }

    /// Puts the applied state back when a layer it lists is missing or
    /// altered. `nft_changed`: an nftables event arrived (else only the
    /// eBPF pins, a stat each, are looked at).
    fn repair(&mut self, nft_changed: bool) {
        // The cheap look, every second (a stat per eBPF link pin), against
        // the layers of the policy in force (known without reading the
        // state); the nftables layer announces its changes as events.
        let mut gone = false;
        for l in engine::layers() {
            let kind = l.kind();
            if !self.applied_layers.contains(&kind) {
                self.unset_enforcing(kind);
                continue;
            }
            match l.still_there(&self.paths, &self.applied_cgroup) {
                Some(false) => {
                    gone = true;
                    self.set_enforcing(kind, false);
                }
                // Attested by the cheap look; a layer that needs a
                // read-back keeps what the last one found.
                Some(true) => self.set_enforcing(kind, true),
                None => {}
            }
        }
        // An event that arrived while a look could not be made (the
        // instance lock held, the backoff) leaves a look pending; a lost
        // event (ENOBUFS) counts as one for this table. Other tables'
        // changes (docker, firewalld) wake nothing: at 10,000 services a
        // look at the table's content takes nft seconds.
        if !gone && !nft_changed && !self.look_pending {
            return;
        }
        // The attach cgroup is gone (systemd removed an emptied slice): no
        // repair can attach until it is made again, which inotify reports.
        // Not tried (nor counted) meanwhile; said once.
        if self.applied_layers.contains(&LayerKind::Bpf)
            && host::cgroup_id(&self.applied_cgroup).is_none()
            && self.paths.state_file.exists()
        {
            if !self.cgroup_gone_said {
                log::error!(
                    "cgroup {} is gone: the eBPF layer enforces nothing until it is made again",
                    self.applied_cgroup.display()
                );
                self.cgroup_gone_said = true;
            }
            for kind in LayerKind::ALL {
                if kind == LayerKind::Bpf {
                    self.set_enforcing(kind, false);
                }
            }
            if !nft_changed {
                return;
            }
        } else {
            self.cgroup_gone_said = false;
        }
        // One backoff: a damage that repairs do not cure (another tool
        // undoing each repair) is put back at most once per REPAIR_BACKOFF
        // after three in a row, never given up on, and said.
        let backoff = repair_backoff(self.repairs_in_a_row);
        if self.last_repair.is_some_and(|t| t.elapsed() < backoff) {
            if !self.backoff_said {
                log::error!(
                    "{} repairs in a row did not hold (something keeps undoing them): the next in {} s, then less and less often, up to every {} s",
                    self.repairs_in_a_row,
                    backoff.as_secs(),
                    REPAIR_BACKOFF_MAX.as_secs()
                );
                self.backoff_said = true;
            }
            self.look_pending = true;
            return;
        }
        // Under the instance lock, never waiting for it: an apply or remove
        // from a shell holds it while it changes the layers; the next tick
        // looks again (whatever happened meanwhile).
        let _lock = match engine::try_lock(&self.paths) {
            Ok(Some(l)) => l,
            Ok(None) => {
                self.look_pending = true;
                return;
            }
            Err(e) => {
                log::warn!("{e:#}");
                self.look_pending = true;
                return;
            }
        };
        self.look_pending = false;
        let state = match State::load(&self.paths) {
            Ok(Some(state)) => state,
            Ok(None) | Err(_) => {
                self.check_removed();
                // The state taken by anything but `remove --force`: what
                // this daemon enforces is put back.
                match self.state_of_current() {
                    Some(s) => s,
                    None => return,
                }
            }
        };
        let drift = loopguard::health::drift(&self.paths, &state);
        let damaged: Vec<LayerKind> = drift.iter().filter_map(Drift::damaged).collect();
        for kind in LayerKind::ALL {
            if state.layers.contains(&kind) {
                self.set_enforcing(kind, !damaged.contains(&kind));
            } else {
                self.unset_enforcing(kind);
            }
        }
        if damaged.is_empty() {
            self.repairs_in_a_row = 0;
            self.backoff_said = false;
            return;
        }
        for d in &drift {
            log::warn!("{d}; putting plan {} back", state.plan.id);
        }
        for layer in &damaged {
            self.metrics
                .repairs
                .get_or_create(&LayerLabels {
                    layer: layer.to_string(),
                })
                .inc();
        }
        self.last_repair = Some(Instant::now());
        self.repairs_in_a_row += 1;
        let started = Instant::now();
        // Put back what was applied, as it was applied (its layers and
        // cgroup), not what this daemon would apply.
        let opts = Options {
            cgroup: Some(state.cgroup.clone()),
            layers: LayerSet::of(&state.layers),
            force: true,
        };
        let prepared = engine::Prepared {
            plan: state.plan,
            policy_path: state.policy_path,
            warnings: String::new(),
            policy: None,
            names: None,
            unresolved: Vec::new(),
            source_stamp: None,
        };
        match engine::apply_locked(&opts, &self.paths, prepared) {
            Ok(state) => log::info!("repaired: {}", engine::summary(&state, started.elapsed())),
            Err(e) => log::error!("repair failed: {e:#}"),
        }
    }

    /// A layer the policy in force does not use has no series.
    fn unset_enforcing(&self, layer: LayerKind) {
        self.metrics.enforcing.remove(&LayerLabels {
            layer: layer.to_string(),
        });
    }

    fn set_enforcing(&self, layer: LayerKind, on: bool) {
        self.metrics
            .enforcing
            .get_or_create(&LayerLabels {
                layer: layer.to_string(),
            })
            .set(i64::from(on));
    }

    /// The state of the policy this daemon enforces, for a repair when the
    /// state file was taken (not by `remove --force`, which stops it).
    fn state_of_current(&self) -> Option<State> {
        if self.fatal.borrow().is_some() {
            return None;
        }
        let plan = self.current.clone()?;
        log::error!(
            "the state of instance {} is gone (not by `remove --force`): putting plan {} back",
            self.paths.instance,
            plan.id
        );
        Some(State {
            policy_path: self.file.clone(),
            cgroup: self.applied_cgroup.clone(),
            applied_at: String::new(),
            slot: 0,
            layers: self.applied_layers.clone(),
            plan,
            nft_layout: 0,
            packet_base: Default::default(),
            netns_cookie: 0,
            cgroup_id: 0,
            nft_generation: None,
        })
    }

    /// Enforcement removed under the daemon (`remove --force`): no state,
    /// nothing installed, after it had a policy in force. The daemon says
    /// who, and stops: putting it back would undo an operator's remove.
    fn check_removed(&mut self) {
        // Only a `remove --force` leaves its note: anything else that took
        // the state (a plain remove racing this daemon's start) is damage,
        // and the next reload or apply puts the policy back.
        if self.current.is_none()
            || !self.paths.removed_by_file.exists()
            || ebpf::is_installed(&self.paths)
            || nft::table_exists(&self.paths.instance)
        {
            return;
        }
        let by = fs::read_to_string(&self.paths.removed_by_file)
            .map(|b| format!(" by {}", b.trim()))
            .unwrap_or_default();
        let _ = fs::remove_file(&self.paths.removed_by_file);
        for kind in LayerKind::ALL {
            self.set_enforcing(kind, false);
        }
        let why = format!(
            "enforcement of instance {} was removed{by} (`loopguard remove --force`): not enforcing; stopping",
            self.paths.instance
        );
        let _ = self.fatal.send(Some(why));
    }

    /// Follows the policy in force, whoever applied it: when the state file
    /// changed since it was last read, its plan becomes the one events are
    /// decoded with (by slot). Called before each batch of events: one
    /// stat.
    fn follow_state(&mut self) {
        use std::os::unix::fs::MetadataExt as _;
        let stamp = fs::metadata(&self.paths.state_file).ok().map(|m| {
            (
                m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                m.ino(),
                m.size(),
            )
        });
        if stamp.is_none() || stamp == self.state_seen {
            return;
        }
        self.state_seen = stamp;
        match State::load(&self.paths) {
            Ok(Some(state)) => {
                if self.current.as_ref().map(|p| &p.id) != Some(&state.plan.id) {
                    log::info!(
                        "following plan {} ({}), applied by another process",
                        state.plan.id,
                        state.policy_path.display()
                    );
                }
                self.remember(state.plan.clone());
                self.unknown_plan = None;
                self.applied_cgroup = state.cgroup.clone();
                self.applied_layers = state.layers;
                self.current = Some(state.plan);
                self.packet_base = state.packet_base;
            }
            Ok(None) => {}
            Err(e) => log::warn!("{e}"),
        }
    }

    /// Keeps `plan` for decoding events, and at most two others.
    fn remember(&mut self, plan: Plan) {
        const KEPT: usize = 3;
        let id = plan.id_number();
        if self.plans.len() >= KEPT && !self.plans.contains_key(&id) {
            let current = self.current.as_ref().map(Plan::id_number);
            if let Some(old) = self.plans.keys().copied().find(|k| Some(*k) != current) {
                self.plans.remove(&old);
            }
        }
        self.plans.insert(id, plan);
    }

    /// An event decided by a plan this daemon has not seen: another
    /// process's apply flipped to it and has not saved its state yet (or
    /// crashed before it could). Its journal holds the plan.
    fn learn_plan(&mut self, id: u64) {
        if self.unknown_plan == Some(id) {
            return;
        }
        match State::load_pending(&self.paths) {
            Ok(Some(pending)) if pending.plan.id_number() == id => {
                log::info!(
                    "following plan {} ({}), being applied by another process",
                    pending.plan.id,
                    pending.policy_path.display()
                );
                self.remember(pending.plan);
            }
            Ok(_) => {
                log::warn!(
                    "events decided by plan {id:016x}, which neither the state nor the journal holds: recorded without a service"
                );
                self.unknown_plan = Some(id);
            }
            Err(e) => {
                log::warn!("{e}");
                self.unknown_plan = Some(id);
            }
        }
    }

    fn event(&mut self, ev: &Event) -> EventLine {
        if ev.plan_id != 0 && !self.plans.contains_key(&ev.plan_id) {
            self.learn_plan(ev.plan_id);
        }
        // A plan found nowhere is not guessed at: the record says the
        // policy that decided is not loaded rather than name a service
        // of another plan.
        let plan = match ev.plan_id {
            0 => self.current.as_ref(),
            id => self.plans.get(&id),
        };
        EventLine::of(&audit::record(ev, plan, &self.clock, &mut self.names))
    }
}

/// One audit record as written: its JSON line, and the syslog priority
/// journald files it under when stdout is the journal (a refusal or lost
/// events a warning, a would-deny a notice, an allowed attempt info), so
/// `journalctl -u loopguard -p warning` lists the refusals.
pub(crate) struct EventLine {
    priority: u8,
    text: String,
}

impl EventLine {
    fn of(record: &audit::AuditRecord) -> EventLine {
        use audit::AuditAction;
        let priority = match record.action {
            AuditAction::Deny | AuditAction::Dropped => 4,
            AuditAction::WouldDeny => 5,
            AuditAction::Allow => 6,
        };
        EventLine {
            priority,
            text: record.to_line(),
        }
    }
}

pub(crate) fn run(args: Args, paths: &InstancePaths) -> anyhow::Result<u8> {
    host::require_root("run")?;
    loopguard::state::private_dir(&paths.state_root)
        .with_context(|| format!("failed to create {}", paths.state_root.display()))?;
    let run_lock = &paths.run_lock_file;
    let lock_file = loopguard::state::open_lock_file(run_lock)
        .with_context(|| format!("failed to open {}", run_lock.display()))?;
    // A `remove` looking for a daemon holds the lock shared for a moment:
    // tried again for a little while before another daemon is assumed.
    let mut lock_file = lock_file;
    let mut tries = 0;
    let locked = loop {
        match Flock::lock(lock_file, FlockArg::LockExclusiveNonblock) {
            Err((file, nix::errno::Errno::EWOULDBLOCK)) if tries < 10 => {
                tries += 1;
                lock_file = file;
                std::thread::sleep(Duration::from_millis(20));
            }
            other => break other,
        }
    };
    let mut lock = match locked {
        Ok(l) => l,
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            let pid = fs::read_to_string(run_lock).unwrap_or_default();
            anyhow::bail!(
                "another `loopguard run` is running for instance {} (pid {}); stop it first",
                paths.instance,
                pid.trim()
            );
        }
        Err((_, e)) => {
            return Err(e).with_context(|| format!("failed to lock {}", run_lock.display()))
        }
    };
    lock.set_len(0).ok();
    let _ = write!(lock, "{}", std::process::id());
    // A note left by a `remove --force` under an earlier daemon.
    let _ = fs::remove_file(&paths.removed_by_file);
    let (fatal, fatal_rx) = tokio::sync::watch::channel(None);

    let log_path = args
        .audit_log
        .clone()
        .unwrap_or_else(|| audit::default_log_path(&paths.instance));
    let log = AuditLog::open(&log_path, args.audit_log_max_bytes)
        .with_context(|| format!("failed to open the audit log {}", log_path.display()))?;
    let mut daemon = Daemon {
        paths: paths.clone(),
        opts: args.enforce.options(),
        file: args.file.clone(),
        plans: HashMap::new(),
        unknown_plan: None,
        current: None,
        packet_base: nft::PacketCounts::default(),
        log: Some(log),
        names: EventNames::default(),
        clock: Clock::now(),
        metrics: Metrics::new(),
        state_seen: None,
        applied_layers: Vec::new(),
        applied_cgroup: PathBuf::new(),
        last_repair: None,
        repairs_in_a_row: 0,
        fatal,
        resolved_names: LastGood::names(paths),
        unresolved: Vec::new(),
        on_last_good: false,
        cgroup_gone_said: false,
        look_pending: false,
        backoff_said: false,
    };
    // A missing --cgroup (a slice systemd has not made yet) must not leave
    // the host unguarded: made now, it is guarded from its first process.
    if let Some(cgroup) = &daemon.opts.cgroup {
        match host::make_cgroup(cgroup) {
            Ok(true) => log::warn!(
                "cgroup {} did not exist: made it, so that processes placed there are guarded from their start",
                cgroup.display()
            ),
            Ok(false) => {}
            Err(e) => log::error!("{e}"),
        }
    }
    // Read before the start's apply: a change from then on is followed,
    // however late the watchers first run.
    let policy_stamp = stamp(&args.file);
    let accounts_stamp: Vec<Stamp> = ACCOUNT_FILES.iter().map(|f| stamp(Path::new(f))).collect();
    if !daemon.reload("start") && !daemon.fall_back(&args.file) {
        return Ok(exit::NOT_ENFORCING);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    let daemon = Arc::new(Mutex::new(daemon));
    let stopped = runtime.block_on(serve(daemon, args, policy_stamp, accounts_stamp, fatal_rx))?;
    // The last line says what the kernel enforces now, read back.
    let (enforcing, words) = attested(paths);
    match stopped {
        Stopped::Asked => {
            if enforcing {
                log::info!("stopping; {words}");
            } else {
                log::error!("stopping; {words}");
            }
            Ok(exit::OK)
        }
        Stopped::Removed(why) => {
            log::error!("{why}");
            log::error!("{words}");
            Ok(exit::NOT_ENFORCING)
        }
    }
}

/// Why [`serve`] returned.
enum Stopped {
    /// SIGTERM or SIGINT.
    Asked,
    /// Enforcement was removed under the daemon.
    Removed(String),
}

/// What the kernel enforces for the instance, attested: whether anything
/// is, and in words.
fn attested(paths: &InstancePaths) -> (bool, String) {
    let Ok(Some(state)) = State::load(paths) else {
        return (
            false,
            format!(
                "NOT ENFORCING: nothing of instance {} is in force",
                paths.instance
            ),
        );
    };
    let drift = loopguard::health::drift(paths, &state);
    let enforcing: Vec<&str> = state
        .layers
        .iter()
        .filter(|l| !drift.iter().any(|d| d.damaged() == Some(**l)))
        .map(|l| l.as_str())
        .collect();
    let drift_words: Vec<String> = drift.iter().map(ToString::to_string).collect();
    if enforcing.is_empty() {
        (false, format!("NOT ENFORCING: {}", drift_words.join("; ")))
    } else if drift.is_empty() {
        (
            true,
            format!(
                "the kernel enforces plan {} on {} (read back now; pinned, it stays in force)",
                state.plan.id,
                enforcing.join("+")
            ),
        )
    } else {
        (
            true,
            format!(
                "the kernel enforces plan {} on {} only: {}",
                state.plan.id,
                enforcing.join("+"),
                drift_words.join("; ")
            ),
        )
    }
}

fn lock(d: &Arc<Mutex<Daemon>>) -> std::sync::MutexGuard<'_, Daemon> {
    d.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn serve(
    daemon: Arc<Mutex<Daemon>>,
    args: Args,
    policy_stamp: Stamp,
    accounts_stamp: Vec<Stamp>,
    mut fatal: tokio::sync::watch::Receiver<Option<String>>,
) -> anyhow::Result<Stopped> {
    let paths = lock(&daemon).paths.clone();

    if let Some(addr) = args.metrics {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("failed to listen on {addr} for metrics"))?;
        tokio::spawn(metrics_server(listener, daemon.clone()));
    }
    if ebpf::is_installed(&paths) {
        let data = MapData::from_pin(paths.maps_dir.join("LG_EVENTS"))
            .context("failed to open LG_EVENTS")?;
        let ring =
            RingBuf::try_from(Map::RingBuf(data)).context("LG_EVENTS is not a ring buffer")?;
        tokio::spawn(read_events(ring, daemon.clone()));
        tokio::spawn(report_dropped(paths.clone(), daemon.clone()));
    }
    if nft::table_exists(&paths.instance) {
        match loopguard::nflog::bind(nft::log_group(&paths.instance)) {
            Ok(sock) => {
                tokio::spawn(read_packets(sock, daemon.clone()));
            }
            Err(e) => log::warn!("packet-layer events unavailable (nfnetlink_log): {e}"),
        }
    }
    tokio::spawn(watch_local_table(daemon.clone()));
    tokio::spawn(watch_layers(daemon.clone()));
    tokio::spawn(watch_file(args.file.clone(), daemon.clone(), policy_stamp));
    tokio::spawn(watch_accounts(daemon.clone(), accounts_stamp));
    tokio::spawn(watch_cgroups(daemon.clone()));
    tokio::spawn(retry_names(daemon.clone()));

    // The handlers first: a stop right after READY=1 must not kill the
    // process before it says what it leaves in force.
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    notify_systemd(&[NotifyState::Ready, NotifyState::Status("enforcing")]);
    log::info!("ready");
    loop {
        tokio::select! {
            _ = hup.recv() => {
                notify_reloading();
                let mut d = lock(&daemon);
                // logrotate moves the file and sends SIGHUP: write to a new
                // one at the path from now on.
                if let Some(log) = d.log.as_mut() {
                    if let Err(e) = log.reopen() {
                        log::error!("audit log: cannot reopen: {e}");
                    }
                }
                d.reload("SIGHUP");
                drop(d);
                notify_systemd(&[NotifyState::Ready]);
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            changed = fatal.changed() => {
                let why = changed.ok().and_then(|()| fatal.borrow().clone());
                if let Some(why) = why {
                    notify_systemd(&[NotifyState::Stopping, NotifyState::Status("not enforcing: removed")]);
                    return Ok(Stopped::Removed(why));
                }
            }
        }
    }
    notify_systemd(&[NotifyState::Stopping]);
    Ok(Stopped::Asked)
}

async fn read_events(ring: RingBuf<MapData>, daemon: Arc<Mutex<Daemon>>) {
    // SAFETY: the ring owns its fd and lives inside the AsyncFd.
    let mut fd = match unsafe { AsyncFd::register(ring) } {
        Ok(fd) => fd,
        Err(e) => {
            log::error!("cannot poll the event ring: {e}");
            return;
        }
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        let ring = guard.get_inner_mut();
        let more = {
            let mut d = lock(&daemon);
            d.follow_state();
            // Drain in bounded batches: memory stays flat however long
            // the flood, and the writes are large. At most
            // EVENTS_PER_WAKEUP before the other tasks (signals, repair,
            // metrics) get a turn.
            let mut lines = Vec::with_capacity(1024);
            let mut taken = 0;
            let mut more = false;
            while let Some(item) = ring.next() {
                if item.len() >= size_of::<Event>() {
                    // SAFETY: the kernel wrote an Event (repr(C), any bits valid).
                    let ev: Event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                    lines.push(d.event(&ev));
                }
                if lines.len() == 1024 {
                    d.emit_all(&lines);
                    lines.clear();
                }
                taken += 1;
                if taken == EVENTS_PER_WAKEUP {
                    more = true;
                    break;
                }
            }
            d.emit_all(&lines);
            more
        };
        if more {
            // Still readable: come back after the others had their turn.
            tokio::task::yield_now().await;
        } else {
            guard.clear_ready();
        }
    }
}

/// Events (or NFLOG datagrams) read in one turn of the event loop; a flood
/// cannot starve signals, repair or the metrics endpoint.
const EVENTS_PER_WAKEUP: usize = 16 * 1024;
const DATAGRAMS_PER_WAKEUP: usize = 64;

/// Refusals of the nftables layer, from NFLOG; gaps in the kernel's
/// sequence numbers are reported as dropped.
async fn read_packets(sock: Socket, daemon: Arc<Mutex<Daemon>>) {
    // SAFETY: the socket owns its fd and lives inside the AsyncFd.
    let Ok(fd) = (unsafe { AsyncFd::register(sock) }) else {
        return;
    };
    let mut buf = vec![0u8; 256 * 1024];
    let mut next_seq: Option<u32> = None;
    loop {
        let Ok(mut guard) = fd.readable().await else {
            return;
        };
        let mut lines = Vec::new();
        let mut lost = 0u64;
        // Whether the socket may hold more than this turn took.
        let mut more = true;
        for _ in 0..DATAGRAMS_PER_WAKEUP {
            let n = match recv_nonblocking(guard.get_inner(), &mut buf) {
                Ok(0) => {
                    more = false;
                    break;
                }
                Ok(n) => n,
                // Overflow: the sequence gap says how much was lost.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => continue,
                Err(_) => {
                    more = false;
                    break;
                }
            };
            let mut locked = lock(&daemon);
            locked.follow_state();
            let d = &mut *locked;
            for ev in loopguard::nflog::parse(&buf[..n]) {
                if let Some(seq) = ev.seq {
                    if let Some(expected) = next_seq {
                        lost += u64::from(seq.wrapping_sub(expected));
                    }
                    next_seq = Some(seq.wrapping_add(1));
                }
                // The plan is borrowed, never copied per packet.
                if let Some(v) =
                    audit::packet_record(&ev, &d.paths.instance, d.current.as_ref(), &mut d.names)
                {
                    lines.push(EventLine::of(&v));
                }
            }
        }
        {
            let mut d = lock(&daemon);
            d.emit_all(&lines);
            if lost > 0 {
                d.metrics.dropped.inc_by(lost);
                d.emit(&audit::dropped_record(lost, audit::EventLayer::Packet));
            }
        }
        if more {
            // Still readable: come back after the others had their turn.
            tokio::task::yield_now().await;
        } else {
            guard.clear_ready();
        }
    }
}

/// Reports events lost to a full ring, at most twice a second.
async fn report_dropped(paths: InstancePaths, daemon: Arc<Mutex<Daemon>>) {
    let Ok(maps) = Maps::open_pinned(&paths) else {
        return;
    };
    let mut last = maps.dropped().unwrap_or(0);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let now = maps.dropped().unwrap_or(last);
        if now > last {
            let mut d = lock(&daemon);
            d.metrics.dropped.inc_by(now - last);
            d.emit(&audit::dropped_record(
                now - last,
                audit::EventLayer::Connect,
            ));
            last = now;
        }
    }
}

/// Re-reads the kernel's local routing table whenever rtnetlink announces
/// a route or address change, and copies it into the eBPF layer. (The
/// nftables layer asks the kernel per packet: nothing to copy.)
async fn watch_local_table(daemon: Arc<Mutex<Daemon>>) {
    let sock = match rtnetlink_socket() {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot watch the local routing table: {e}");
            return;
        }
    };
    // SAFETY: the socket owns its fd and lives inside the AsyncFd.
    let Ok(fd) = (unsafe { AsyncFd::register(sock) }) else {
        return;
    };
    let mut buf = vec![0u8; 64 * 1024];
    // Changes made before the watch started.
    let mut synced = sync_local_table(&mut lock(&daemon));
    loop {
        // A sync that failed is tried again every second, event or not.
        let ready = if synced {
            Ok(fd.readable().await)
        } else {
            tokio::time::timeout(Duration::from_secs(1), fd.readable()).await
        };
        let Ok(ready) = ready else {
            synced = sync_local_table(&mut lock(&daemon));
            continue;
        };
        let Ok(mut guard) = ready else {
            return;
        };
        // The content does not matter: a burst of changes is one re-read.
        drain(guard.get_inner(), &mut buf);
        guard.clear_ready();
        synced = sync_local_table(&mut lock(&daemon));
    }
}

/// What a re-resolution changed, one line per uid and service: `user
/// lgt-bob added to service db via group lgt-live`.
fn membership_changes(old: &Plan, new: &engine::Prepared) -> Vec<String> {
    use loopguard::policy::{Directory as _, SystemDirectory};
    let dir = SystemDirectory;
    let mut names = EventNames::default();
    let mut who = |uid: u32| {
        names
            .get(uid)
            .map_or(format!("uid {uid}"), |n| format!("user {n}"))
    };
    let mut out = Vec::new();
    for s in &new.plan.services {
        let now = &new.plan.uid_sets[s.uid_set as usize];
        let was: &[u32] = old
            .services
            .iter()
            .find(|o| o.name == s.name)
            .map_or(&[], |o| &old.uid_sets[o.uid_set as usize]);
        let listed = new
            .policy
            .as_ref()
            .and_then(|p| p.services.iter().find(|ps| ps.name == s.name));
        for uid in now.iter().filter(|u| !was.contains(u)) {
            let via = listed
                .and_then(|ps| {
                    ps.groups.iter().find_map(|(g, _)| {
                        dir.group_members(g)
                            .is_some_and(|m| m.contains(uid))
                            .then(|| format!(" via group {g}"))
                    })
                })
                .unwrap_or_default();
            if *uid == loopguard::policy::VANISHED_UID {
                continue;
            }
            let what = match s.list {
                loopguard::policy::ListKind::Allow => "added to service",
                loopguard::policy::ListKind::Deny => "now on the deny-list of service",
            };
            out.push(format!("{} {what} {}{via}", who(*uid), s.name));
        }
        for uid in was.iter().filter(|u| !now.contains(u)) {
            let what = match s.list {
                loopguard::policy::ListKind::Allow => "removed from service",
                loopguard::policy::ListKind::Deny => "no longer on the deny-list of service",
            };
            out.push(format!(
                "{} {what} {} (no longer listed, or no longer in its groups)",
                who(*uid),
                s.name
            ));
        }
        let cgroups_of = |plan: &Plan, set: u32| {
            plan.cgroup_sets
                .get(set as usize)
                .cloned()
                .unwrap_or_default()
        };
        let was_cgroups = old
            .services
            .iter()
            .find(|o| o.name == s.name)
            .map(|o| cgroups_of(old, o.uid_set))
            .unwrap_or_default();
        for c in cgroups_of(&new.plan, s.uid_set) {
            let before = was_cgroups
                .iter()
                .find(|w| w.path == c.path)
                .and_then(|w| w.id);
            let change = match (before, c.id) {
                (None, Some(id)) => format!("exists now (id {id})"),
                (Some(_), None) => "is gone".to_string(),
                (Some(a), Some(b)) if a != b => format!("was made again (id {a} -> {b})"),
                _ => continue,
            };
            out.push(format!("cgroup {} of service {} {change}", c.path, s.name));
        }
    }
    out
}

/// A file's identity and contents, cheaply: modified time, size, inode.
type Stamp = Option<(SystemTime, u64, u64)>;

fn stamp(p: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt as _;
    fs::metadata(p).ok().map(|m| {
        (
            m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            m.len(),
            m.ino(),
        )
    })
}

/// What changed under the names a policy lists.
#[derive(Clone, Copy, Debug)]
enum Identities {
    /// `/etc/passwd`, `/etc/group`.
    Accounts,
    /// A listed cgroup appeared, went, or was made again.
    Cgroups,
}

impl std::fmt::Display for Identities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Identities::Accounts => "the user database",
            Identities::Cgroups => "a listed cgroup",
        })
    }
}

/// Names that do not resolve yet (SSSD or LDAP not answering at boot), or
/// a file that could not be applied while something else is enforced, are
/// tried again every few seconds.
async fn retry_names(daemon: Arc<Mutex<Daemon>>) {
    let mut tick = tokio::time::interval(RETRY_NAMES);
    tick.tick().await;
    loop {
        tick.tick().await;
        lock(&daemon).retry();
    }
}

/// Follows the cgroups the policy in force lists: one that appears, goes,
/// or is removed and made again (a restarted unit gets a new cgroup, with
/// a new id) updates both layers within a second. inotify watches the
/// nearest existing directory on the way to each listed cgroup (cgroupfs
/// reports `mkdir` and `rmdir` there); a look every two seconds is the
/// safety net.
async fn watch_cgroups(daemon: Arc<Mutex<Daemon>>) {
    let Ok(root) = host::cgroup2_root() else {
        log::debug!("no cgroup2 mount: listed cgroups are not followed");
        return;
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut watched: Vec<WatchedDir> = Vec::new();
    let mut watcher = None;
    let mut tried: Option<(Vec<Option<u64>>, Instant)> = None;
    const RETRY: Duration = Duration::from_secs(10);
    const REFRESH_EVERY: Duration = Duration::from_millis(250);
    loop {
        // What the policy in force lists, and the ids it was applied with.
        let listed: Vec<loopguard::policy::ResolvedCgroup> = {
            let d = lock(&daemon);
            let mut all: Vec<_> = d
                .current
                .iter()
                .flat_map(|p| p.cgroup_sets.iter().flatten().cloned())
                .collect();
            all.sort();
            all.dedup();
            all
        };
        let now: Vec<Option<u64>> = listed
            .iter()
            .map(|c| loopguard::policy::cgroup_id_under(&root, &c.path))
            .collect();
        let applied: Vec<Option<u64>> = listed.iter().map(|c| c.id).collect();
        // A refresh that failed (the file holds edits not in force, a
        // commit failed) is retried every RETRY, not in a loop; one that
        // worked is followed by at most one more per REFRESH_EVERY (a
        // cgroup made and removed in a loop costs one apply a second).
        let retry_due = tried
            .as_ref()
            .is_none_or(|(ids, at)| *ids != now || at.elapsed() >= RETRY);
        if now != applied && retry_due {
            if let Some((_, at)) = &tried {
                tokio::time::sleep(REFRESH_EVERY.saturating_sub(at.elapsed())).await;
            }
            tried = Some((now, Instant::now()));
            lock(&daemon).refresh_identities(Identities::Cgroups);
            continue;
        }
        let (dirs, names) = cgroup_watch_points(&root, &listed);
        if dirs != watched || watcher.is_none() {
            watcher = watch_directories(&dirs, names, tx.clone())
                .map_err(|e| {
                    log::warn!("cannot watch cgroups with inotify ({e}); looking every 2 s")
                })
                .ok();
            watched = dirs;
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await;
        // A short settle (mkdir, then the unit's processes), bounded: a
        // stream of events cannot hold the look back.
        let settle = Instant::now() + Duration::from_millis(200);
        while Instant::now() < settle
            && tokio::time::timeout(Duration::from_millis(50), rx.recv())
                .await
                .is_ok_and(|m| m.is_some())
        {}
    }
}

/// Where to watch for the listed cgroups: for each, the deepest existing
/// directory on its path (its parent once that exists), and the names
/// whose creation or removal there matters.
fn cgroup_watch_points(
    root: &Path,
    listed: &[loopguard::policy::ResolvedCgroup],
) -> (Vec<WatchedDir>, Vec<std::ffi::OsString>) {
    use std::os::unix::fs::MetadataExt as _;
    let mut dirs: Vec<WatchedDir> = Vec::new();
    let mut names: Vec<std::ffi::OsString> = Vec::new();
    for c in listed {
        let parts: Vec<&str> = c.path.as_str().split('/').collect();
        names.extend(parts.iter().map(Into::into));
        // Bounded: a listed path has at most MAX_CGROUP_LEVEL parts.
        let mut dir = root.to_path_buf();
        for part in &parts {
            let next = dir.join(part);
            if !next.is_dir() {
                break;
            }
            dir = next;
        }
        if dir == root.join(c.path.as_str()) {
            dir.pop();
        }
        let id = fs::metadata(&dir).ok().map(|m| (m.dev(), m.ino()));
        if !dirs.iter().any(|d| d.path == dir) {
            dirs.push(WatchedDir { path: dir, id });
        }
    }
    names.sort();
    names.dedup();
    (dirs, names)
}

/// The user database files whose change re-resolves names.
const ACCOUNT_FILES: [&str; 2] = ["/etc/passwd", "/etc/group"];

/// Watches the user database and re-resolves the policy in force when it
/// changes (debounced: `useradd` and `gpasswd` write several files).
async fn watch_accounts(daemon: Arc<Mutex<Daemon>>, resolved: Vec<Stamp>) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let names = vec!["passwd".into(), "group".into()];
    let dirs = [WatchedDir {
        path: PathBuf::from("/etc"),
        id: None,
    }];
    let _watcher = match watch_directories(&dirs, names, tx) {
        Ok(w) => w,
        Err(e) => {
            log::error!("cannot watch the user database (/etc/passwd, /etc/group): {e}; group membership is as of the last apply");
            return;
        }
    };
    // The files' identities (as resolved at start): only a real change
    // re-resolves.
    let stamps = || {
        ACCOUNT_FILES
            .iter()
            .map(|f| stamp(Path::new(f)))
            .collect::<Vec<_>>()
    };
    let mut seen = resolved;
    while rx.recv().await.is_some() {
        while let Ok(Some(())) = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {
        }
        let now = stamps();
        if now == seen {
            continue;
        }
        seen = now;
        lock(&daemon).refresh_identities(Identities::Accounts);
    }
}

/// Copies the kernel's local table into every layer that keeps a copy;
/// false when that failed.
fn sync_local_table(d: &mut Daemon) -> bool {
    let table = match LocalTable::read() {
        Ok(t) => t,
        Err(e) => {
            d.metrics.local_failures.inc();
            log::error!("cannot read the kernel's local routing table: {e}");
            return false;
        }
    };
    d.metrics.local_prefixes.set(table.len() as i64);
    let mut synced = true;
    for mut layer in engine::layers() {
        match layer.sync_local(&d.paths, &table) {
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
        d.metrics.local_failures.inc();
    }
    synced
}

/// Notices a layer removed or altered behind loopguard's back and puts the
/// policy in force back: nftables changes arrive as netlink events
/// (NFNLGRP_NFTABLES: `nft flush ruleset`, `systemctl restart nftables`,
/// firewalld reloads); the eBPF layer's links are read back every second
/// and when the attach cgroup is removed or made (inotify on its parent):
/// unpinning, `bpftool link detach` and a removed cgroup send no event.
async fn watch_layers(daemon: Arc<Mutex<Daemon>>) {
    const NFNLGRP_NFTABLES: u32 = 7;
    let paths = lock(&daemon).paths.clone();
    // Without nftables events the tick still reads the eBPF links back.
    let fd = match host::netlink_socket(NETLINK_NETFILTER, 1 << (NFNLGRP_NFTABLES - 1)) {
        // SAFETY: the socket owns its fd and lives inside the AsyncFd.
        Ok(sock) => unsafe { AsyncFd::register(sock) }.ok(),
        Err(e) => {
            log::error!("cannot watch nftables changes: {e}; the nftables layer is read back only on reloads");
            None
        }
    };
    let mut buf = vec![0u8; 64 * 1024];
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // The attach cgroup's parent, watched: systemd removing the cgroup and
    // making it again is seen at once, not at the next tick.
    let (cgroup_tx, mut cgroup_rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut cgroup_watch: Option<(PathBuf, Option<notify::RecommendedWatcher>)> = None;
    loop {
        let attach = lock(&daemon).applied_cgroup.clone();
        if cgroup_watch.as_ref().map(|(p, _)| p) != Some(&attach) {
            let watcher = match (attach.parent(), attach.file_name()) {
                (Some(parent), Some(name)) if !host::is_cgroup2_root(&attach) => {
                    let dir = WatchedDir {
                        path: parent.to_path_buf(),
                        id: None,
                    };
                    watch_directories(&[dir], vec![name.to_os_string()], cgroup_tx.clone())
                        .map_err(|e| {
                            log::warn!(
                                "cannot watch {} with inotify ({e}); looking every second",
                                parent.display()
                            )
                        })
                        .ok()
                }
                _ => None,
            };
            cgroup_watch = Some((attach, watcher));
        }
        let nft_events = async {
            match &fd {
                Some(fd) => fd.readable().await,
                None => std::future::pending().await,
            }
        };
        let nft_changed = tokio::select! {
            ready = nft_events => {
                let Ok(mut guard) = ready else { return };
                let ours = nft_events_touch(guard.get_inner(), &mut buf, &paths.instance);
                guard.clear_ready();
                ours
            }
            _ = cgroup_rx.recv() => false,
            _ = tick.tick() => false,
        };
        let mut d = lock(&daemon);
        d.repair(nft_changed);
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

/// Reads every pending nftables event; whether any may concern the
/// instance's table (another table's changes, docker's or firewalld's, do
/// not wake a read-back). A lost event (ENOBUFS) or one that cannot be read
/// counts as ours.
fn nft_events_touch(fd: &Socket, buf: &mut [u8], table: &str) -> bool {
    let mut ours = false;
    loop {
        match recv_nonblocking(fd, buf) {
            Ok(n) if n > 0 => ours |= nft::attest::events_touch(&buf[..n.min(buf.len())], table),
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => ours = true,
            _ => break,
        }
    }
    ours
}

/// Reads every pending message of a netlink socket whose messages only
/// say "something changed". A full socket buffer (ENOBUFS) lost some:
/// the caller's re-read covers them too.
fn drain(fd: &Socket, buf: &mut [u8]) {
    loop {
        match recv_nonblocking(fd, buf) {
            Ok(n) if n > 0 => continue,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => continue,
            _ => break,
        }
    }
}

/// One datagram from a netlink socket, without blocking.
fn recv_nonblocking(sock: &Socket, buf: &mut [u8]) -> io::Result<usize> {
    sock.recv(&mut &mut buf[..], libc::MSG_DONTWAIT)
}

fn rtnetlink_socket() -> io::Result<Socket> {
    host::netlink_socket(
        NETLINK_ROUTE,
        (libc::RTMGRP_IPV4_IFADDR
            | libc::RTMGRP_IPV6_IFADDR
            | libc::RTMGRP_IPV4_ROUTE
            | libc::RTMGRP_IPV6_ROUTE) as u32,
    )
}

/// Reloads when the file's identity or contents change, once it has been
/// quiet for 300 ms (editors and config management write in several
/// steps). inotify watches the file's directory, and its target's when the
/// file is a symlink: an edit in place, a rename over it and a Kubernetes
/// ConfigMap's `..data` swap all show there. Without inotify (the watch
/// limit reached), the file is polled every two seconds.
async fn watch_file(file: PathBuf, daemon: Arc<Mutex<Daemon>>, applied: Stamp) {
    // One pending wake-up is enough: a burst of events is one look.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut dirs = watched_directories(&file);
    let mut watcher = watch_directories(&dirs, watched_names(&file), tx.clone());
    if let Err(e) = &watcher {
        log::warn!(
            "cannot watch {} with inotify ({e}); polling it every 2 s",
            file.display()
        );
    }
    // What the start applied (read before it): a change made before this
    // task first ran is a change too.
    let mut seen = applied;
    loop {
        if watcher.is_ok() {
            // inotify, with a slow look as a safety net: a watched
            // directory deleted and made again, a file system that sends
            // no events (NFS, FUSE), a mount over the directory.
            match tokio::time::timeout(SAFETY_NET, rx.recv()).await {
                Ok(None) => return,
                Ok(Some(())) => {}
                Err(_) => {
                    let quiet = stamp(&file) == seen && watched_directories(&file) == dirs;
                    if quiet {
                        continue;
                    }
                }
            }
            // Debounce: wait until the file is quiet, for at most 2 s.
            let settle = Instant::now() + Duration::from_secs(2);
            while let Ok(Some(())) =
                tokio::time::timeout(Duration::from_millis(300), rx.recv()).await
            {
                if Instant::now() > settle {
                    break;
                }
            }
        } else {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        // The symlink may point elsewhere now: watch where it points.
        let now_dirs = watched_directories(&file);
        if now_dirs != dirs || watcher.is_err() {
            dirs = now_dirs;
            watcher = watch_directories(&dirs, watched_names(&file), tx.clone());
            if let Err(e) = &watcher {
                log::warn!(
                    "cannot watch {} with inotify ({e}); polling it every 2 s",
                    file.display()
                );
            }
        }
        let now = stamp(&file);
        log::debug!("policy file: looked ({now:?}, was {seen:?})");
        if now == seen || now.is_none() {
            continue;
        }
        seen = now;
        notify_reloading();
        lock(&daemon).reload("file changed");
        notify_systemd(&[NotifyState::Ready]);
    }
}

/// How often the watched file is looked at even without an event.
const SAFETY_NET: Duration = Duration::from_secs(5);

/// A watched directory: its path and identity (device, inode), so a
/// directory removed and made again at the same path is watched anew.
#[derive(Clone, Debug, PartialEq, Eq)]
struct WatchedDir {
    path: PathBuf,
    id: Option<(u64, u64)>,
}

/// The directory holding `file`, the one holding its target when it is a
/// symlink that leads elsewhere, and the directory of every symlink on
/// the way (`/etc/lg/current -> release-1`: `/etc/lg`, where `current`
/// is re-pointed).
fn watched_directories(file: &Path) -> Vec<WatchedDir> {
    use std::os::unix::fs::MetadataExt as _;
    let parent = |p: &Path| match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut paths = vec![parent(file)];
    if let Ok(target) = fs::canonicalize(file) {
        paths.push(parent(&target));
    }
    // Bounded by the path's depth.
    for ancestor in file.ancestors().skip(1) {
        if fs::symlink_metadata(ancestor).is_ok_and(|m| m.file_type().is_symlink()) {
            paths.push(parent(ancestor));
        }
    }
    let mut dirs: Vec<WatchedDir> = Vec::new();
    for path in paths {
        let id = fs::metadata(&path).ok().map(|m| (m.dev(), m.ino()));
        if !dirs
            .iter()
            .any(|d| d.path == path || (id.is_some() && d.id == id))
        {
            dirs.push(WatchedDir { path, id });
        }
    }
    dirs
}

/// The names, within the watched directories, whose change may change
/// what `file` reads: its own, and each name its symlinks go through
/// (`..data` for a ConfigMap). Other entries of the directory (the audit
/// log, an editor's swap file) wake nothing.
fn watched_names(file: &Path) -> Vec<std::ffi::OsString> {
    let mut names: Vec<std::ffi::OsString> = file.file_name().into_iter().map(Into::into).collect();
    // Symlinks on the way: their names, in their directories.
    for ancestor in file.ancestors().skip(1) {
        if fs::symlink_metadata(ancestor).is_ok_and(|m| m.file_type().is_symlink()) {
            names.extend(ancestor.file_name().map(Into::into));
        }
    }
    let mut at = file.to_path_buf();
    // A bounded walk: symlink loops end it.
    for _ in 0..8 {
        let Ok(target) = fs::read_link(&at) else {
            break;
        };
        for part in target.components() {
            if let std::path::Component::Normal(n) = part {
                names.push(n.to_os_string());
            }
        }
        at = match at.parent() {
            Some(dir) => dir.join(&target),
            None => target,
        };
    }
    names
}

/// An inotify watch on `dirs`; an event on one of `names` is a wake-up on
/// `tx`.
fn watch_directories(
    dirs: &[WatchedDir],
    names: Vec<std::ffi::OsString>,
    tx: tokio::sync::mpsc::Sender<()>,
) -> notify::Result<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Reading a file is no change: reloads and name lookups open
        // the very files watched, and must not wake the watch again.
        let relevant = event.is_ok_and(|e| {
            e.need_rescan()
                || !matches!(e.kind, notify::EventKind::Access(_))
                    && e.paths.iter().any(|p| {
                        p.file_name()
                            .is_some_and(|n| names.iter().any(|m| m.as_os_str() == n))
                    })
        });
        if relevant {
            let _ = tx.try_send(());
        }
    })?;
    for dir in dirs {
        watcher.watch(&dir.path, notify::RecursiveMode::NonRecursive)?;
    }
    Ok(watcher)
}

/// Scrapes served at once; a connection beyond them is closed at once (a
/// flood of idle connections cannot take the daemon's file descriptors,
/// and a real scrape gets through as soon as one is free).
const METRICS_CONNECTIONS: usize = 16;
/// A whole request (headers in, response out) gets this long.
const METRICS_DEADLINE: Duration = Duration::from_secs(5);

async fn metrics_server(listener: tokio::net::TcpListener, daemon: Arc<Mutex<Daemon>>) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let permits = Arc::new(tokio::sync::Semaphore::new(METRICS_CONNECTIONS));
    loop {
        let conn = match listener.accept().await {
            Ok((conn, _)) => conn,
            Err(e) => {
                // Out of file descriptors (or another transient error):
                // back off instead of spinning on accept.
                log::warn!("metrics: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            drop(conn);
            continue;
        };
        let daemon = daemon.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let response = metrics_response(&daemon, &req);
                async move { Ok::<_, std::convert::Infallible>(response) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(METRICS_DEADLINE)
                .keep_alive(false)
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(conn), service);
            // A slow or idle client loses its connection at the deadline.
            let _ = tokio::time::timeout(METRICS_DEADLINE, served).await;
        });
    }
}

/// `GET /metrics`: OpenMetrics text; anything else 404 (405 for another
/// method on /metrics).
fn metrics_response(
    daemon: &Arc<Mutex<Daemon>>,
    req: &hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<http_body_util::Full<hyper::body::Bytes>> {
    use hyper::{header, Method, Response, StatusCode};
    let empty = |status: StatusCode| {
        let mut r = Response::new(http_body_util::Full::default());
        *r.status_mut() = status;
        r
    };
    if req.uri().path() != "/metrics" {
        return empty(StatusCode::NOT_FOUND);
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return empty(StatusCode::METHOD_NOT_ALLOWED);
    }
    let body = {
        let mut d = lock(daemon);
        let paths = d.paths.clone();
        if let Some(plan) = d.current.clone() {
            let base = d.packet_base.clone();
            d.metrics.refresh(&paths, &plan, &base);
        }
        d.metrics.encode()
    };
    let mut r = Response::new(http_body_util::Full::new(hyper::body::Bytes::from(body)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
    );
    r
}

/// `sd_notify(3)`, when systemd set $NOTIFY_SOCKET (a no-op otherwise).
fn notify_systemd(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        log::debug!("sd_notify: {e}");
    }
}

/// RELOADING=1 with the MONOTONIC_USEC that `Type=notify-reload` wants.
fn notify_reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify_systemd(&[NotifyState::Reloading, now]),
        Err(_) => notify_systemd(&[NotifyState::Reloading]),
    }
}
