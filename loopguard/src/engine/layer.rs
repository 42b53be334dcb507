//! The seam between the engine and an enforcement layer: the eBPF socket
//! hooks ([`super::bpf_layer`]) and the nftables table
//! ([`super::nft_layer`]) each implement [`Layer`], and the engine never
//! asks which one it holds. Tests drive the engine with fake layers.

use std::{
    fmt,
    path::{Path, PathBuf},
};

pub use crate::layer_kind::{LayerKind, LayerSet};
use crate::{
    compile::{Action, Plan},
    ebpf::attest::LinkFault,
    nft::PacketCounts,
    paths::InstancePaths,
    scope::LocalTable,
    state::State,
};

/// One count a layer keeps: how many attempts (or packets) of the plan's
/// service `bucket` (`plan.services.len()`: the default) ended in
/// `action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Count {
    pub bucket: usize,
    pub action: Action,
    pub value: u64,
}

/// What a layer is asked about the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InForce {
    /// Nothing of the layer is in force.
    Absent,
    /// In force, carrying this plan id (`None`: none, or unreadable).
    Plan(Option<String>),
    /// The layer cannot be asked (its tool missing, out of memory):
    /// nothing is known, so nothing is judged.
    Unknown,
}

/// How a layer that enforces the recorded plan differs from what it
/// should be, read from the kernel (see [`Layer::attest`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Damage {
    /// The attach cgroup's path names another cgroup than the one applied
    /// to (it was removed and made again), or none.
    CgroupReplaced {
        path: PathBuf,
        was: u64,
        now: Option<u64>,
    },
    /// Hooks whose link is not attached as applied, each with what is
    /// wrong.
    Links(Vec<(&'static str, LinkFault)>),
    /// The table's content differs from what the plan renders (bounded
    /// list of differences).
    TableAltered(Vec<String>),
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Damage::CgroupReplaced { path, was, now } => match now {
                Some(now) => write!(
                    f,
                    "cgroup {} was removed and made again (id {was} -> {now}); the programs are not attached to the new one",
                    path.display()
                ),
                None => write!(f, "cgroup {} (id {was}) is gone", path.display()),
            },
            Damage::Links(faults) => {
                // Hooks with the same fault on one line.
                let mut groups: Vec<(String, Vec<&str>)> = Vec::new();
                for (hook, fault) in faults {
                    let why = fault.to_string();
                    match groups.iter_mut().find(|(w, _)| *w == why) {
                        Some((_, hooks)) => hooks.push(hook),
                        None => groups.push((why, vec![hook])),
                    }
                }
                let parts: Vec<String> = groups
                    .iter()
                    .map(|(why, hooks)| format!("{}: {why}", hooks.join(", ")))
                    .collect();
                write!(f, "not enforcing on {}", parts.join("; "))
            }
            Damage::TableAltered(diffs) => {
                write!(f, "table altered: {}", diffs.join("; "))
            }
        }
    }
}

/// What every layer's step is given.
pub struct Context<'a> {
    pub paths: &'a InstancePaths,
    /// The cgroup the eBPF layer attaches to (resolved).
    pub cgroup: &'a Path,
    /// The state of the apply before this one.
    pub previous: Option<&'a State>,
    /// Whether the kernel enforces exactly what `previous` records: only
    /// then may a layer update itself in place.
    pub trusted: bool,
    /// `SO_NETNS_COOKIE` of this network namespace (0: unknown).
    pub netns_cookie: u64,
    /// Why a policy listing cgroups cannot be enforced here, if it cannot:
    /// the programs are not on the cgroup2 root, or cgroup ids here are
    /// not the kernel's own.
    pub cgroups_unjudgeable: Option<String>,
}

impl Context<'_> {
    /// The previous state, when it lists `kind` and the kernel is known to
    /// enforce it.
    pub fn in_force(&self, kind: LayerKind) -> Option<&State> {
        self.previous
            .filter(|p| self.trusted && p.layers.contains(&kind))
    }
}

/// One enforcement layer, driven by the engine as a two-phase commit:
/// every layer stages (nothing in force changes), then each commits in
/// order; a failed commit rolls the committed ones back in reverse.
pub trait Layer {
    fn kind(&self) -> LayerKind;

    /// Whether this host can enforce with the layer; the error says why
    /// not (with several layers asked for, the engine skips it).
    fn available(&self, ctx: &Context<'_>) -> anyhow::Result<()>;

    /// Whether the layer tells processes apart by cgroup (`allow_cgroups`
    /// and `deny_cgroups`). One that does not lets an allow-list naming a
    /// cgroup that exists through whole, and judges a deny-list by its
    /// uids: it never refuses what the layer that does judge them admits.
    fn judges_cgroups(&self) -> bool {
        false
    }

    /// Work a first apply will do anyway that is better done before the
    /// policy is read (see [`super::warm_up`]); nothing in force changes.
    fn warm_up(&self, _paths: &InstancePaths) {}

    /// Everything up to the commit, changing nothing in force.
    fn stage(&mut self, ctx: &Context<'_>, plan: &Plan) -> anyhow::Result<()>;

    /// Puts the staged plan in force: the layer's one atomic step.
    fn commit(&mut self, ctx: &Context<'_>, plan: &Plan) -> anyhow::Result<()>;

    /// A staged plan that will not be committed: undo what staging
    /// created (never what is in force).
    fn abandon(&mut self, ctx: &Context<'_>);

    /// After a later layer failed: put back what was in force before the
    /// commit.
    fn roll_back(&mut self, ctx: &Context<'_>) -> anyhow::Result<()>;

    /// Writes what the next apply and the readers need into the state.
    fn record(&self, state: &mut State);

    /// Takes the layer out of force entirely; whether anything was there.
    fn remove(&mut self, paths: &InstancePaths) -> anyhow::Result<bool>;

    /// Which plan the kernel enforces on this layer.
    fn in_force(&self, paths: &InstancePaths) -> InForce;

    /// How the layer, enforcing `state`'s plan, differs from what the
    /// state records, read from the kernel: links that are dead or
    /// elsewhere, a table whose content is not the plan's. Empty: it
    /// enforces exactly that.
    fn attest(&self, paths: &InstancePaths, state: &State) -> Vec<Damage>;

    /// A cheap look, for a daemon's every-second check of the layer
    /// attached to `cgroup`: `Some(false)` when the layer is known not to
    /// enforce (its links gone, detached or elsewhere), `None` when only a
    /// read-back can tell (the nftables layer announces its changes as
    /// netlink events).
    fn still_there(&self, paths: &InstancePaths, cgroup: &Path) -> Option<bool>;

    /// What the layer counted for `plan`, in force now (`packet_base`: the
    /// counts carried over from replaced nftables objects); `None` when the
    /// layer is not there to ask.
    fn counts(
        &self,
        paths: &InstancePaths,
        plan: &Plan,
        packet_base: &PacketCounts,
    ) -> Option<Vec<Count>>;

    /// Copies the kernel's local table into the layer, if it keeps a copy
    /// (the nftables layer asks the kernel per packet); `Ok(None)` when it
    /// keeps none or is not installed, else the entries changed.
    fn sync_local(
        &mut self,
        paths: &InstancePaths,
        table: &LocalTable,
    ) -> anyhow::Result<Option<usize>>;
}
