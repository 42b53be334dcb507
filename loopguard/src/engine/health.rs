//! What the kernel enforces, read back and compared with what the state
//! says: the one truth `status` reports and `apply` trusts (or not) before
//! updating a layer in place.
//!
//! Each layer carries the id of the plan it enforces ([`crate::compile::Plan::id`]):
//! the eBPF layer in its active slot's config, the nftables layer as the
//! name of an empty chain. A crash between the layers' commits, another
//! tool's `nft flush ruleset`, deleted pins or an interrupted `apply` (its
//! journal is left behind) all show up here. A layer carrying the recorded
//! plan is then attested ([`crate::engine::Layer::attest`]): each eBPF link
//! alive, on the cgroup the recorded path names now, running the instance's
//! program and listed by the kernel for that cgroup; the nftables table
//! holding what the plan renders (unless nothing was committed since).

use super::{Damage, Engine, InForce, LayerKind};
use crate::{paths::InstancePaths, state::State};

/// One way the kernel differs from the state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Drift {
    /// The state lists the layer, but nothing of it is in force (eBPF:
    /// link pins gone; nftables: the table gone).
    Missing { layer: LayerKind },
    /// The layer enforces another plan (or none): altered or replaced.
    Other {
        layer: LayerKind,
        found: Option<String>,
    },
    /// An `apply` of this plan was interrupted: its journal is left.
    Interrupted { plan: String },
    /// A layer the state does not list is in force (an interrupted apply
    /// that changed layers, or another process).
    Unexpected { layer: LayerKind },
    /// The layer carries the recorded plan, but the kernel does not enforce
    /// it as applied: links dead or elsewhere, the table's content altered.
    Damaged { layer: LayerKind, damage: Damage },
}

impl Drift {
    /// Whether the drift leaves the layer enforcing nothing of the plan:
    /// the layer missing, or none of its links attached where it applied.
    /// (A table altered, or some hooks lost, still enforce part of it.)
    pub fn disables(&self) -> bool {
        match self {
            Drift::Missing { .. } => true,
            Drift::Damaged { damage, .. } => match damage {
                Damage::CgroupReplaced { .. } => true,
                Damage::Links(faults) => faults.len() >= crate::ebpf::PROGRAMS.len(),
                Damage::TableAltered(_) => false,
            },
            Drift::Other { .. } | Drift::Interrupted { .. } | Drift::Unexpected { .. } => false,
        }
    }

    /// The layer a repair must put back, if any.
    pub fn damaged(&self) -> Option<LayerKind> {
        match self {
            Drift::Missing { layer }
            | Drift::Other { layer, .. }
            | Drift::Damaged { layer, .. } => Some(*layer),
            Drift::Interrupted { .. } | Drift::Unexpected { .. } => None,
        }
    }
}

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Drift::Missing { layer } => write!(
                f,
                "{} layer missing: {}",
                layer.title(),
                match layer {
                    LayerKind::Bpf => "its programs are not attached",
                    LayerKind::Nft => "its table is gone",
                }
            ),
            Drift::Other { layer, found } => write!(
                f,
                "{} layer enforces plan {} instead (altered or replaced)",
                layer.title(),
                found.as_deref().unwrap_or("none")
            ),
            Drift::Interrupted { plan } => write!(
                f,
                "an apply of plan {plan} was interrupted; the next apply converges both layers"
            ),
            Drift::Unexpected { layer } => write!(
                f,
                "the {} layer is in force but the state does not list it",
                layer.title()
            ),
            Drift::Damaged { layer, damage } => write!(f, "{} layer {damage}", layer.title()),
        }
    }
}

/// Where the kernel differs from `state` (empty: it enforces exactly the
/// state's plan on every layer the state lists).
pub fn drift(paths: &InstancePaths, state: &State) -> Vec<Drift> {
    Engine::system(paths.clone()).drift(state)
}

/// [`drift`] over `layers`.
pub(super) fn drift_of(
    layers: &[Box<dyn super::Layer>],
    paths: &InstancePaths,
    state: &State,
) -> Vec<Drift> {
    let mut out = Vec::new();
    for layer in layers {
        let kind = layer.kind();
        let listed = state.layers.contains(&kind);
        match layer.in_force(paths) {
            // Nothing known, so nothing reported: a repair would only guess.
            InForce::Unknown => {}
            InForce::Absent if listed => out.push(Drift::Missing { layer: kind }),
            InForce::Plan(found) if listed && found.as_ref() != Some(&state.plan.id) => {
                out.push(Drift::Other { layer: kind, found });
            }
            // The recorded plan: whether it is enforced as applied.
            InForce::Plan(_) if listed => out.extend(layer.attest(paths, state).into_iter().map(
                |damage| Drift::Damaged {
                    layer: kind,
                    damage,
                },
            )),
            InForce::Plan(_) if !listed => out.push(Drift::Unexpected { layer: kind }),
            _ => {}
        }
    }
    // A journal of the plan the state already records: the crash came
    // after the state was saved, nothing to converge.
    if let Ok(Some(pending)) = State::load_pending(paths) {
        if pending.plan.id != state.plan.id || !out.is_empty() {
            out.push(Drift::Interrupted {
                plan: pending.plan.id,
            });
        }
    }
    out
}

/// Whether this process runs in the network namespace the instance guards;
/// `Err` says which it guards and how to get there.
pub fn same_namespace(paths: &InstancePaths, state: &State) -> Result<(), String> {
    let here = crate::host::netns_cookie().unwrap_or(0);
    if state.netns_cookie == 0 || here == 0 || here == state.netns_cookie {
        return Ok(());
    }
    Err(format!(
        "instance {} guards another network namespace (cookie {}; this command runs in {here}): run loopguard there, e.g. `nsenter --net=/run/netns/NAME loopguard --instance {} ...`",
        paths.instance, state.netns_cookie, paths.instance
    ))
}
