//! `loopguard remove`: detach and delete everything of one instance.

use loopguard::{engine, host, paths::InstancePaths};

use crate::exit;

pub(crate) fn run(paths: &InstancePaths) -> anyhow::Result<u8> {
    host::require_root("remove")?;
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
