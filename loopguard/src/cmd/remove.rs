//! `loopguard remove`: detach and delete everything of one instance.

use anyhow::Context as _;
use loopguard::{ebpf, host, paths::InstancePaths};

use crate::exit;

pub fn run(paths: &InstancePaths) -> anyhow::Result<u8> {
    host::require_root("remove")?;
    let _lock = super::apply::lock(paths)?;
    let had_pins = ebpf::remove_pins(paths).context("failed to remove the eBPF layer")?;
    let had_state = paths.state_dir.exists();
    if had_state {
        std::fs::remove_dir_all(&paths.state_dir)
            .with_context(|| format!("failed to remove {}", paths.state_dir.display()))?;
    }
    super::apply::remove_lock(paths);
    if had_pins || had_state {
        println!(
            "removed instance {}: programs detached, {} and {} deleted",
            paths.instance,
            paths.pin_dir.display(),
            paths.state_dir.display()
        );
    } else {
        println!("instance {}: nothing installed", paths.instance);
    }
    Ok(exit::OK)
}
