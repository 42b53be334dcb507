//! `loopguard remove`: detach and delete everything of one instance.

use loopguard::{engine, host, paths::InstancePaths};

use crate::exit;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Remove even while the instance's `loopguard run` runs: the daemon
    /// notices within a second, says who removed enforcement, and exits
    /// with code 6 (its unit does not restart it).
    #[arg(long)]
    force: bool,
}

pub(crate) fn run(args: Args, paths: &InstancePaths) -> anyhow::Result<u8> {
    host::require_root("remove")?;
    if let Some(pid) = engine::daemon_pid(paths)? {
        if !args.force {
            eprintln!(
                "loopguard: not removed: `loopguard run` (pid {pid}) enforces instance {} and would \
                 put it back; stop it first (`systemctl stop loopguard`, or kill {pid}), or \
                 `loopguard --instance {} remove --force`",
                paths.instance, paths.instance
            );
            return Ok(exit::PROBLEMS);
        }
        // Who removed it, for the daemon's last words.
        let by = format!("pid {} (uid {})", std::process::id(), nix::unistd::getuid());
        if let Err(e) = loopguard::files::write_private(&paths.removed_by_file, by.as_bytes()) {
            log::warn!("cannot record who removed enforcement: {e}");
        }
    }
    let removed = engine::remove(paths)?;
    if removed.layers.is_empty() && !removed.state {
        println!("instance {}: nothing installed", paths.instance);
    } else {
        println!(
            "removed instance {}: programs detached, {} and {} deleted, table inet {} deleted",
            paths.instance,
            paths.pin_dir.display(),
            paths.state_dir.display(),
            paths.instance
        );
    }
    Ok(exit::OK)
}
