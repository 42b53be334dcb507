//! The eBPF layer behind the [`Layer`] seam: staging fills the inactive
//! slot (installing and attaching the programs first, with no policy in
//! force, if they are not pinned yet); the commit flips the active slot.

use std::path::Path;

use anyhow::Context as _;

use loopguard_common::{COUNT_ALLOWED, COUNT_DENIED, COUNT_WOULD_DENY, DEFAULT_BUCKET, SLOTS};

use super::layer::{Context, Count, Damage, InForce, Layer, LayerKind};
use crate::{
    check::timed,
    compile::{Action, Plan},
    ebpf::{self, Installed},
    host,
    nft::PacketCounts,
    paths::InstancePaths,
    scope::LocalTable,
    state::State,
};

#[derive(Default)]
pub struct BpfLayer {
    /// The pinned maps and the slot staged for the new plan.
    staged: Option<(Installed, u32)>,
    /// The slot flipped to, once committed.
    committed: Option<u32>,
    /// The active slot before this apply (read when staging), which a
    /// roll back restores exactly (a slot, or none).
    active_before: Option<u32>,
}

impl Layer for BpfLayer {
    fn kind(&self) -> LayerKind {
        LayerKind::Bpf
    }

    fn judges_cgroups(&self) -> bool {
        true
    }

    fn available(&self, _ctx: &Context<'_>) -> anyhow::Result<()> {
        host::check_kernel()?;
        host::ensure_bpffs(Path::new(crate::paths::BPFFS))?;
        Ok(())
    }

    fn warm_up(&self, paths: &InstancePaths) {
        ebpf::build_loader_early(paths);
    }

    fn stage(&mut self, ctx: &Context<'_>, plan: &Plan) -> anyhow::Result<()> {
        if let Some(prev) = ctx.previous {
            if ebpf::is_installed(ctx.paths) && prev.cgroup != ctx.cgroup {
                anyhow::bail!(
                    "instance {} is attached to {}, not {}; run `loopguard --instance {} remove` first or use another --instance",
                    ctx.paths.instance,
                    prev.cgroup.display(),
                    ctx.cgroup.display(),
                    ctx.paths.instance
                );
            }
        }
        let local =
            LocalTable::read().context("failed to read the kernel's local routing table")?;
        let mut installed = timed("ebpf: install", || {
            ebpf::install(ctx.paths, ctx.cgroup, ctx.netns_cookie)
        })
        .context("failed to install the eBPF layer")?;
        if !installed.reattached.is_empty() {
            log::warn!(
                "eBPF layer: attached anew to {} ({})",
                ctx.cgroup.display(),
                Damage::Links(installed.reattached.clone())
            );
        }
        self.active_before = installed.maps.config().ok().map(|c| c.active_slot);
        let result = ebpf::sync_local(&mut installed.maps, &local).and_then(|_| {
            timed("ebpf: stage", || {
                // Counters carry over by service name only from a plan
                // known to be the one in force.
                let in_force = ctx.in_force(LayerKind::Bpf).map(|s| &s.plan);
                ebpf::stage(&mut installed.maps, plan, in_force)
            })
        });
        match result {
            Ok(slot) => {
                self.staged = Some((installed, slot));
                Ok(())
            }
            Err(e) => {
                if installed.fresh {
                    let _ = ebpf::remove_pins(ctx.paths);
                }
                Err(anyhow::Error::new(e).context("failed to write the policy"))
            }
        }
    }

    fn commit(&mut self, ctx: &Context<'_>, _plan: &Plan) -> anyhow::Result<()> {
        let Some((installed, slot)) = self.staged.as_mut() else {
            anyhow::bail!("internal error: the eBPF layer was not staged");
        };
        ebpf::flip(&mut installed.maps, *slot, ctx.netns_cookie)
            .context("failed to switch the eBPF layer to the new policy")?;
        self.committed = Some(*slot);
        Ok(())
    }

    fn abandon(&mut self, ctx: &Context<'_>) {
        if let Some((installed, _)) = self.staged.take() {
            if installed.fresh {
                let _ = ebpf::remove_pins(ctx.paths);
            }
        }
    }

    fn roll_back(&mut self, ctx: &Context<'_>) -> anyhow::Result<()> {
        let Some((mut installed, _)) = self.staged.take() else {
            return Ok(());
        };
        self.committed = None;
        if installed.fresh {
            ebpf::remove_pins(ctx.paths)?;
            return Ok(());
        }
        // What was active before is still whole: the stage wrote the other
        // slot.
        match self.active_before {
            Some(slot) => Ok(ebpf::flip(&mut installed.maps, slot, ctx.netns_cookie)?),
            None => {
                ebpf::remove_pins(ctx.paths)?;
                Ok(())
            }
        }
    }

    fn record(&self, state: &mut State) {
        state.slot = self.committed.unwrap_or(0);
    }

    fn remove(&mut self, paths: &InstancePaths) -> anyhow::Result<bool> {
        ebpf::remove_pins(paths).context("failed to remove the eBPF layer")
    }

    fn in_force(&self, paths: &InstancePaths) -> InForce {
        if !ebpf::is_installed(paths) {
            return InForce::Absent;
        }
        InForce::Plan(
            ebpf::Maps::open_pinned(paths)
                .ok()
                .and_then(|m| ebpf::plan_in_force(&m).ok().flatten())
                .map(|id| format!("{id:016x}")),
        )
    }

    fn attest(&self, paths: &InstancePaths, state: &State) -> Vec<Damage> {
        let mut out = Vec::new();
        let now = host::cgroup_id(&state.cgroup);
        if state.cgroup_id != 0 && now != Some(state.cgroup_id) {
            out.push(Damage::CgroupReplaced {
                path: state.cgroup.clone(),
                was: state.cgroup_id,
                now,
            });
        }
        let faults: Vec<_> = ebpf::attest::links(paths, &state.cgroup)
            .into_iter()
            .filter_map(|r| Some((r.hook, r.fault?)))
            .collect();
        if !faults.is_empty() {
            out.push(Damage::Links(faults));
        }
        out
    }

    fn still_there(&self, paths: &InstancePaths, cgroup: &Path) -> Option<bool> {
        // About twenty syscalls: each link's info, its program's id, the
        // cgroup's list of programs.
        Some(
            ebpf::attest::links(paths, cgroup)
                .iter()
                .all(|r| r.fault.is_none()),
        )
    }

    fn counts(&self, paths: &InstancePaths, plan: &Plan, _: &PacketCounts) -> Option<Vec<Count>> {
        let maps = ebpf::Maps::open_pinned(paths).ok()?;
        let slot = maps.config().ok()?.active_slot;
        if slot >= SLOTS {
            return None;
        }
        let mut out = Vec::with_capacity(3 * (plan.services.len() + 1));
        for i in 0..=plan.services.len() {
            let bucket = if i == plan.services.len() {
                DEFAULT_BUCKET
            } else {
                i as u32
            };
            for (kind, action) in [
                (COUNT_ALLOWED, Action::Allow),
                (COUNT_DENIED, Action::Deny),
                (COUNT_WOULD_DENY, Action::WouldDeny),
            ] {
                out.push(Count {
                    bucket: i,
                    action,
                    value: maps.counter(slot, bucket, kind).unwrap_or(0),
                });
            }
        }
        Some(out)
    }

    fn sync_local(
        &mut self,
        paths: &InstancePaths,
        table: &LocalTable,
    ) -> anyhow::Result<Option<usize>> {
        if !ebpf::is_installed(paths) {
            return Ok(None);
        }
        let mut maps = ebpf::Maps::open_pinned(paths)?;
        Ok(Some(ebpf::sync_local(&mut maps, table)?))
    }
}
