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
