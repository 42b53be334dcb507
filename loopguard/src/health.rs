//! What the kernel enforces, read back and compared with what the state
//! says: the one truth `status` reports and `apply` trusts (or not) before
//! updating a layer in place.
//!
//! Each layer carries the id of the plan it enforces ([`crate::compile::Plan::id`]):
//! the eBPF layer in its active slot's config, the nftables layer as the
//! name of an empty chain. A crash between the layers' commits, another
//! tool's `nft flush ruleset`, deleted pins or an interrupted `apply` (its
//! journal is left behind) all show up here.

use crate::{ebpf, nft, paths::InstancePaths, state::State};

/// One way the kernel differs from the state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Drift {
    /// The state lists the eBPF layer, but its programs are not attached
    /// (link pins gone).
    BpfMissing,
    /// The eBPF layer enforces another plan (or none).
    BpfOther { found: Option<String> },
    /// The state lists the nftables layer, but the table is gone.
    NftMissing,
    /// The table holds another plan, or was altered.
    NftOther { found: Option<String> },
    /// An `apply` of this plan was interrupted: its journal is left.
    Interrupted { plan: String },
    /// A layer the state does not list is in force (an interrupted apply
    /// that changed layers, or another process).
    Unexpected { layer: &'static str },
}

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let plan = |p: &Option<String>| p.clone().unwrap_or_else(|| "none".into());
        match self {
            Drift::BpfMissing => f.write_str("eBPF layer missing: its programs are not attached"),
            Drift::BpfOther { found } => {
                write!(f, "eBPF layer enforces plan {} instead", plan(found))
            }
            Drift::NftMissing => f.write_str("nftables layer missing: its table is gone"),
            Drift::NftOther { found } => {
                write!(
                    f,
                    "nftables table holds plan {} instead (altered or replaced)",
                    plan(found)
                )
            }
            Drift::Interrupted { plan } => write!(
                f,
                "an apply of plan {plan} was interrupted; the next apply converges both layers"
            ),
            Drift::Unexpected { layer } => write!(
                f,
                "the {layer} layer is in force but the state does not list it"
            ),
        }
    }
}

/// Where the kernel differs from `state` (empty: it enforces exactly the
/// state's plan on every layer the state lists).
pub fn drift(paths: &InstancePaths, state: &State) -> Vec<Drift> {
    let mut out = Vec::new();
    let want = &state.plan.id;
    if state.layers.iter().any(|l| l == "bpf") {
        if !ebpf::is_installed(paths) {
            out.push(Drift::BpfMissing);
        } else {
            let found = ebpf::Maps::open_pinned(paths)
                .ok()
                .and_then(|m| ebpf::plan_in_force(&m).ok().flatten())
                .map(|id| format!("{id:016x}"));
            if found.as_ref() != Some(want) {
                out.push(Drift::BpfOther { found });
            }
        }
    }
    let wants_nft = state.layers.iter().any(|l| l == "nft");
    match nft::plan_in_force(&paths.instance) {
        // nft cannot be asked (missing, out of memory): nothing known, so
        // nothing reported; a repair would only guess.
        Err(e) => log::debug!("nftables layer not checked: {e}"),
        Ok(None) if wants_nft => out.push(Drift::NftMissing),
        Ok(Some(found)) if wants_nft && found.as_ref() != Some(want) => {
            out.push(Drift::NftOther { found });
        }
        Ok(Some(_)) if !wants_nft => out.push(Drift::Unexpected { layer: "nftables" }),
        Ok(_) => {}
    }
    if !state.layers.iter().any(|l| l == "bpf") && ebpf::is_installed(paths) {
        out.push(Drift::Unexpected { layer: "eBPF" });
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
