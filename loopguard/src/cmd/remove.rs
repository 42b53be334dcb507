//! `loopguard remove`: detach and delete everything of one instance.

use anyhow::Context as _;
use loopguard::{ebpf, host, nft, paths::InstancePaths};

use crate::exit;

pub fn run(paths: &InstancePaths) -> anyhow::Result<u8> {
    host::require_root("remove")?;
    let _lock = super::apply::lock(paths)?;
    if let Some(state) = loopguard::state::State::load(paths).ok().flatten() {
        loopguard::health::same_namespace(paths, &state).map_err(anyhow::Error::msg)?;
    }
    let had_pins = ebpf::remove_pins(paths).context("failed to remove the eBPF layer")?;
    // Only our table, in this network namespace; nft missing means no table.
    let had_table = nft::remove(&paths.instance).context("failed to remove the nftables table")?;
    let had_state = paths.state_dir.exists();
    if had_state {
        std::fs::remove_dir_all(&paths.state_dir)
            .with_context(|| format!("failed to remove {}", paths.state_dir.display()))?;
    }
    if had_pins || had_state || had_table {
        println!(
            "removed instance {}: programs detached, {} and {} deleted, table inet {} deleted",
            paths.instance,
            paths.pin_dir.display(),
            paths.state_dir.display(),
            paths.instance
        );
    } else {
        println!("instance {}: nothing installed", paths.instance);
    }
    Ok(exit::OK)
}
