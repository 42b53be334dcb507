//! `loopguard apply`: enforce a policy, all or nothing.

use std::{io::Write as _, path::PathBuf, time::Instant};

use loopguard::{engine, host, paths::InstancePaths, state::State};

use super::EnforceArgs;
use crate::exit;

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  loopguard apply /etc/loopguard/policy.toml\n  loopguard apply policy.toml --dry-run\n  loopguard --instance ci apply policy.toml --cgroup /sys/fs/cgroup/ci.slice"
)]
pub(crate) struct Args {
    /// The policy file.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// Print what would change; change nothing.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    enforce: EnforceArgs,
}

pub(crate) fn run(args: Args, paths: &InstancePaths) -> anyhow::Result<u8> {
    let started = Instant::now();
    if !args.dry_run {
        host::require_root("apply")?;
        engine::warm_up(args.enforce.layers, paths);
    }
    let prepared = match engine::prepare(&args.file, args.enforce.force)? {
        Ok(p) => p,
        Err(refused) => {
            eprint!("{refused}");
            return Ok(exit::PROBLEMS);
        }
    };
    eprint!("{}", prepared.warnings);
    if args.dry_run {
        let previous = State::load(paths).ok().flatten();
        let mut out = std::io::stdout().lock();
        for line in loopguard::change::describe(previous.as_ref().map(|s| &s.plan), &prepared.plan)
        {
            writeln!(out, "{line}")?;
        }
        for line in where_it_would_enforce(&args.enforce, paths) {
            writeln!(out, "{line}")?;
        }
        writeln!(out, "dry run: nothing changed")?;
        return Ok(exit::OK);
    }
    let state = engine::apply(&args.enforce.options(), paths, prepared)?;
    println!("{}", engine::summary(&state, started.elapsed()));
    // Sockets bound before a bind guard was in force keep their port.
    match loopguard::scan::squatters_now(&state.plan) {
        Ok(squatters) => {
            for s in squatters {
                log::warn!("{s}");
            }
        }
        Err(e) => log::warn!("squatters not looked for (sock_diag): {e}"),
    }
    Ok(exit::OK)
}

/// Where a real apply would enforce: the layers asked for, the cgroup the
/// eBPF programs attach to (the root: every process on the host), the
/// nftables table.
fn where_it_would_enforce(enforce: &EnforceArgs, paths: &InstancePaths) -> Vec<String> {
    use loopguard::engine::{LayerKind, LayerSet};
    let mut lines = vec![format!(
        "would enforce with layers {}{}",
        match enforce.layers {
            LayerSet::Both => "bpf+nft",
            LayerSet::Bpf => "bpf",
            LayerSet::Nft => "nft",
        },
        if enforce.layers.is_several() {
            " (a layer this host lacks is skipped with a warning)"
        } else {
            ""
        }
    )];
    if enforce.layers.contains(LayerKind::Bpf) {
        lines.push(match host::attach_cgroup(enforce.cgroup.as_deref()) {
            Ok(c) if host::is_cgroup2_root(&c) => format!(
                "  bpf: on the cgroup2 root {}: the whole host, every process (--cgroup narrows it)",
                c.display()
            ),
            Ok(c) => format!(
                "  bpf: on cgroup {}: only processes in its subtree",
                c.display()
            ),
            Err(e) => format!("  bpf: cannot attach: {e}"),
        });
    }
    if enforce.layers.contains(LayerKind::Nft) {
        lines.push(format!(
            "  nft: table inet {} in this network namespace: every socket's packets to local addresses",
            paths.instance
        ));
    }
    lines
}
