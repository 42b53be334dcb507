//! The daemon's Prometheus metrics. Every series is an atomic: the
//! reconcile loop sets them, and a scrape reads them without a lock on
//! the daemon (only the attempt counters' baseline has one of its own).

use std::{collections::HashMap, sync::Mutex};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::Identities;
use crate::{
    compile::Plan,
    engine::{Layer, LayerKind},
    nft::PacketCounts,
    paths::InstancePaths,
};

/// A layer, as a label value: its one name (`bpf`, `nft`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub(super) struct LayerLabel(pub(super) LayerKind);

impl EncodeLabelValue for LayerLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        use std::fmt::Write as _;
        encoder.write_str(self.0.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct AttemptLabels {
    service: String,
    layer: LayerLabel,
    action: String,
}

/// Metrics, refreshed from the kernel counters at each scrape.
pub struct Metrics {
    pub(super) registry: Registry,
    pub(super) attempts: Family<AttemptLabels, Counter>,
    pub(super) dropped: Counter,
    pub(super) generation: Gauge,
    pub(super) last_apply: Gauge,
    pub(super) local_prefixes: Gauge,
    pub(super) local_failures: Counter,
    pub(super) repairs: Family<LayerLabels, Counter>,
    pub(super) enforcing: Family<LayerLabels, Gauge>,
    pub(super) last_good: Gauge,
    pub(super) names_unresolved: Gauge,
    pub(super) squatters: Gauge,
    pub(super) reload_failures: Counter,
    pub(super) file_matches: Gauge,
    pub(super) accounts_refreshed: Gauge,
    pub(super) accounts_refresh_failures: Counter,
    pub(super) cgroups_refreshed: Gauge,
    pub(super) cgroups_refresh_failures: Counter,
    /// The kernel's counts at the last scrape, by series.
    seen: Mutex<HashMap<AttemptLabels, u64>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct LayerLabels {
    layer: LayerLabel,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
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
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// A change to `what` that could not be enforced.
    pub(super) fn refresh_failed(&self, what: Identities) {
        match what {
            Identities::Accounts => self.accounts_refresh_failures.inc(),
            Identities::Cgroups => self.cgroups_refresh_failures.inc(),
        };
    }

    /// `what` was resolved again, now.
    pub(super) fn resolved(&self, what: Identities) {
        let now = jiff::Timestamp::now().as_second();
        match what {
            Identities::Accounts => self.accounts_refreshed.set(now),
            Identities::Cgroups => self.cgroups_refreshed.set(now),
        };
    }

    /// Brings the counters up to the kernel's (which only grow while a
    /// policy is in force; a re-apply carries them over by service name),
    /// read through `layers`.
    pub fn refresh(
        &self,
        layers: &[Box<dyn Layer>],
        paths: &InstancePaths,
        plan: &Plan,
        packet_base: &PacketCounts,
    ) {
        let mut current: Vec<(AttemptLabels, u64)> = Vec::new();
        let name = |i: usize| {
            plan.services
                .get(i)
                .map_or("default".to_string(), |s| s.name.clone())
        };
        for layer in layers {
            let Some(counts) = layer.counts(paths, plan, packet_base) else {
                continue;
            };
            for c in counts {
                current.push((
                    AttemptLabels {
                        service: name(c.bucket),
                        layer: LayerLabel(layer.kind()),
                        action: c.action.as_str().into(),
                    },
                    c.value,
                ));
            }
        }
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (labels, value) in current {
            // The nftables layer counts refusals, whatever the mode: what it
            // counted while a service was in audit mode stays would-deny
            // after the switch to enforce (and the other way round). The
            // baseline is the refusal count, not the action's.
            let key = if labels.layer.0 == LayerKind::Nft && labels.action != "allow" {
                AttemptLabels {
                    action: "refused".into(),
                    ..labels.clone()
                }
            } else {
                labels.clone()
            };
            let last = seen.insert(key, value).unwrap_or(0);
            if value > last {
                self.attempts.get_or_create(&labels).inc_by(value - last);
            } else {
                // Create the series, so it shows at zero.
                let _ = self.attempts.get_or_create(&labels);
            }
        }
    }

    /// Whether `layer` is attested to enforce (`None`: the policy in force
    /// does not use it, and it has no series).
    pub fn set_enforcing(&self, layer: LayerKind, on: Option<bool>) {
        let labels = LayerLabels {
            layer: LayerLabel(layer),
        };
        match on {
            Some(on) => {
                self.enforcing.get_or_create(&labels).set(i64::from(on));
            }
            None => {
                self.enforcing.remove(&labels);
            }
        }
    }

    /// `layer` was found damaged and put back.
    pub fn repaired(&self, layer: LayerKind) {
        self.repairs
            .get_or_create(&LayerLabels {
                layer: LayerLabel(layer),
            })
            .inc();
    }

    /// The OpenMetrics text of every series.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
