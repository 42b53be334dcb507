//! One module per subcommand.

pub(crate) mod apply;
pub(crate) mod audit;
pub(crate) mod check;
pub(crate) mod diff;
pub(crate) mod explain;
pub(crate) mod learn;
pub(crate) mod remove;
pub(crate) mod run;
pub(crate) mod scan;
pub(crate) mod status;

use std::path::PathBuf;

pub(crate) use loopguard::check::{check_source, read_policy, Refusal};
use loopguard::engine::{LayerSet, Options};

/// How to enforce: the arguments `apply` and `run` share.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct EnforceArgs {
    /// Attach under this cgroup v2 directory instead of the root: only
    /// processes in its subtree are guarded.
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
    /// Enforcement layers: eBPF socket hooks, the nftables table, or both
    /// (with both, a layer the host lacks is skipped with a warning).
    #[arg(long, value_enum, default_value_t = LayerSet::Both)]
    pub layers: LayerSet,
    /// Enforce even a policy that would cut root off from essential local
    /// services (see `check`'s warnings).
    #[arg(long)]
    pub force: bool,
}

impl EnforceArgs {
    pub(crate) fn options(&self) -> Options {
        Options {
            cgroup: self.cgroup.clone(),
            layers: self.layers,
            force: self.force,
        }
    }
}

pub(crate) use loopguard::engine::plural;

/// `3 errors, 1 warning`
pub(crate) fn counts(errors: usize, warnings: usize) -> String {
    format!(
        "{}, {}",
        plural(errors, "error"),
        plural(warnings, "warning")
    )
}
