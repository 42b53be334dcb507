//! The nftables layer behind the [`Layer`] seam: staging builds the batch
//! (an in-place update when the table in force was built from the
//! previous plan, else the whole table); the commit is one nft
//! transaction.

use anyhow::Context as _;

use super::layer::{Context, Count, Damage, InForce, Layer, LayerKind};
use crate::{
    check::timed,
    compile::{Action, Plan},
    nft::{self, PacketCounts},
    paths::InstancePaths,
    policy::Mode,
    scope::LocalTable,
    state::State,
};

#[derive(Default)]
pub struct NftLayer {
    staged: Option<NftChange>,
    /// Counts the committed table starts from.
    committed: Option<PacketCounts>,
    /// The ruleset generation the commit made, when it is known to be this
    /// commit's alone.
    generation: Option<u32>,
}

/// The nftables change that puts a plan in force, and the counts the new
/// table starts from.
struct NftChange {
    batch: String,
    base: PacketCounts,
    in_place: bool,
}

impl Layer for NftLayer {
    fn kind(&self) -> LayerKind {
        LayerKind::Nft
    }

    fn available(&self, ctx: &Context<'_>) -> anyhow::Result<()> {
        // A cheap probe, not `nft -c` of the whole batch: that would parse
        // and check a 10,000-service ruleset twice. A batch the kernel
        // refuses still changes nothing. With our table in force there is
        // nothing to probe (and any `nft list` would load the whole table
        // into nft's cache).
        if ctx.trusted && table_in_force(ctx.previous).is_some() {
            return Ok(());
        }
        nft::available().map_err(nft_error)
    }

    fn stage(&mut self, ctx: &Context<'_>, plan: &Plan) -> anyhow::Result<()> {
        let table = &ctx.paths.instance;
        self.staged = Some(timed("nft: build batch", || {
            if ctx.trusted {
                change(table, plan, ctx.previous)
            } else {
                full_table(table, plan, ctx.previous)
            }
        }));
        Ok(())
    }

    fn commit(&mut self, ctx: &Context<'_>, plan: &Plan) -> anyhow::Result<()> {
        let table = &ctx.paths.instance;
        let Some(change) = self.staged.take() else {
            anyhow::bail!("internal error: the nftables layer was not staged");
        };
        // The generation before and after: one step apart, the commit was
        // the only transaction between, and the table is as the batch made it.
        let before = nft::attest::generation().ok();
        let mut result = timed("nft: commit", || nft::commit(&change.batch));
        let mut base = change.base;
        let mut before = before;
        if result.is_err() && change.in_place {
            // The table in force is not what the state says (edited by
            // hand?): replace it whole.
            log::warn!("nftables: in-place update refused; replacing table {table} whole");
            let full = full_table(table, plan, ctx.previous);
            before = nft::attest::generation().ok();
            result = timed("nft: commit", || nft::commit(&full.batch));
            base = full.base;
        }
        result
            .map_err(nft_error)
            .context("the nftables transaction failed")?;
        let after = nft::attest::generation().ok();
        self.generation = match (before, after) {
            (Some(b), Some(a)) if a == b.wrapping_add(1) => Some(a),
            _ => None,
        };
        self.committed = Some(base);
        Ok(())
    }

    fn abandon(&mut self, _ctx: &Context<'_>) {
        self.staged = None;
    }

    fn roll_back(&mut self, ctx: &Context<'_>) -> anyhow::Result<()> {
        if self.committed.take().is_none() {
            return Ok(());
        }
        let table = &ctx.paths.instance;
        match ctx.previous.filter(|p| p.layers.contains(&LayerKind::Nft)) {
            Some(prev) => nft::commit(&nft::ruleset(table, &prev.plan)).map_err(nft_error)?,
            None => {
                nft::remove(table).map_err(nft_error)?;
            }
        }
        Ok(())
    }

    fn record(&self, state: &mut State) {
        state.nft_layout = nft::LAYOUT;
        state.packet_base = self.committed.clone().unwrap_or_default();
        state.nft_generation = self.generation;
    }

    fn remove(&mut self, paths: &InstancePaths) -> anyhow::Result<bool> {
        // Only our table, in this network namespace; nft missing means no
        // table.
        nft::remove(&paths.instance)
            .map_err(nft_error)
            .context("failed to remove the nftables table")
    }

    fn in_force(&self, paths: &InstancePaths) -> InForce {
        match nft::plan_in_force(&paths.instance) {
            Err(e) => {
                log::debug!("nftables layer not checked: {e}");
                InForce::Unknown
            }
            Ok(None) => InForce::Absent,
            Ok(Some(found)) => InForce::Plan(found),
        }
    }

    fn attest(&self, paths: &InstancePaths, state: &State) -> Vec<Damage> {
        // Nothing committed since loopguard's own commit: the table is as
        // that commit made it.
        if let (Some(recorded), Ok(now)) = (state.nft_generation, nft::attest::generation()) {
            if recorded == now {
                return Vec::new();
            }
        }
        match nft::attest::table_differences(&paths.instance, &state.plan) {
            Ok(diffs) if diffs.is_empty() => Vec::new(),
            Ok(diffs) => vec![Damage::TableAltered(diffs)],
            Err(e) => {
                // Gone between the two reads, or nft cannot be asked: the
                // plan read-back judges that.
                log::debug!("nftables layer content not checked: {e}");
                Vec::new()
            }
        }
    }

    fn still_there(&self, _paths: &InstancePaths, _cgroup: &std::path::Path) -> Option<bool> {
        None
    }

    fn counts(
        &self,
        paths: &InstancePaths,
        plan: &Plan,
        packet_base: &PacketCounts,
    ) -> Option<Vec<Count>> {
        let counts = nft::counters(&paths.instance).ok()?.plus(packet_base);
        // The table counts refusals; an audit-mode service's packet went
        // through, so its refusal is a would-deny.
        let refused = |mode: Mode| match mode {
            Mode::Enforce => Action::Deny,
            Mode::Audit => Action::WouldDeny,
        };
        let mut out: Vec<Count> = counts
            .refused_by_index(plan)
            .into_iter()
            .enumerate()
            .map(|(i, value)| Count {
                bucket: i,
                action: refused(plan.services[i].mode),
                value,
            })
            .collect();
        let default = plan.services.len();
        out.push(Count {
            bucket: default,
            action: Action::Allow,
            value: counts.default_allowed,
        });
        out.push(Count {
            bucket: default,
            action: refused(plan.mode),
            value: counts.default_denied,
        });
        Some(out)
    }

    fn sync_local(
        &mut self,
        _paths: &InstancePaths,
        _table: &LocalTable,
    ) -> anyhow::Result<Option<usize>> {
        // `fib daddr type` asks the kernel per packet: nothing to copy.
        Ok(None)
    }
}

/// The previous state, if it put a table of this layout in force.
fn table_in_force(previous: Option<&State>) -> Option<&State> {
    previous.filter(|p| p.nft_layout == nft::LAYOUT && p.layers.contains(&LayerKind::Nft))
}

/// An in-place update when the table in force was built (in this layout)
/// from the previous plan: unchanged elements keep their counters and a
/// one-service change touches a few objects. Otherwise the whole table.
/// (Should the table be gone or edited, the update fails as a whole and
/// the commit replaces the table.)
fn change(table: &str, plan: &Plan, previous: Option<&State>) -> NftChange {
    let Some(prev) = table_in_force(previous) else {
        return full_table(table, plan, previous);
    };
    // A renamed service's counts follow it: read whole, then moved to the
    // new name (renames are rare; the update in place would drop them).
    if !crate::plan_diff::renames(&prev.plan, plan).is_empty() {
        return full_table(table, plan, previous);
    }
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
        Some(prev) => current
            .plus(&prev.packet_base)
            .renamed(&crate::plan_diff::renames(&prev.plan, plan)),
        None => current,
    };
    NftChange {
        batch: nft::ruleset(table, plan),
        base: base.kept_for(plan),
        in_place: false,
    }
}

/// An nft failure with nft's own message in the chain.
pub(crate) fn nft_error(e: nft::NftError) -> anyhow::Error {
    match e.detail() {
        Some(d) if !d.trim().is_empty() => anyhow::Error::new(e).context(format!(
            "nft: {}",
            d.trim().lines().next().unwrap_or_default()
        )),
        _ => anyhow::Error::new(e),
    }
}
