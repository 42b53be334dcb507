//! Every path loopguard reads or writes, in one place.

use std::path::{Path, PathBuf};

/// Where bpffs is (or gets) mounted.
pub const BPFFS: &str = "/sys/fs/bpf";
/// Per-instance state that is not a kernel object: the applied plan.
/// tmpfs, like bpffs: both are gone after a reboot.
pub const STATE_ROOT: &str = "/run/loopguard";
/// Persistent, root-only: each instance's last known good policy, which a
/// daemon enforces when it starts with a policy file it cannot apply.
pub const GOOD_ROOT: &str = "/var/lib/loopguard";
/// The default `--instance`.
pub const DEFAULT_INSTANCE: &str = "loopguard";

/// The pins and state of one instance.
#[derive(Clone, Debug)]
pub struct InstancePaths {
    pub instance: String,
    /// `/sys/fs/bpf/<instance>`
    pub pin_dir: PathBuf,
    pub maps_dir: PathBuf,
    pub progs_dir: PathBuf,
    pub links_dir: PathBuf,
    /// `/run/loopguard/<instance>`
    pub state_dir: PathBuf,
    /// The applied plan and its metadata, JSON.
    pub state_file: PathBuf,
    /// The journal of an `apply` under way (or interrupted).
    pub pending_file: PathBuf,
    /// `/run/loopguard`, where the locks live.
    pub state_root: PathBuf,
    /// Serializes apply, remove and repair (`<instance>.lock`; never
    /// deleted, so a waiter never locks a file nobody else sees).
    pub lock_file: PathBuf,
    /// Held by the one `run` of the instance (`<instance>.run`, its pid).
    pub run_lock_file: PathBuf,
    /// `/var/lib/loopguard/<instance>`: the last known good policy
    /// (`state.json`: the resolved plan; `names.json`: names as resolved;
    /// `policy.toml`: its text).
    pub good_dir: PathBuf,
    /// Who ran `remove --force` under a running daemon
    /// (`<instance>.removed-by`): the daemon names them when it exits.
    pub removed_by_file: PathBuf,
    /// Where the instance's daemon writes its audit log
    /// (`<instance>.audit-log`, the path as text, written by `run` at
    /// start): `audit` and `learn` read that log unless told otherwise.
    pub audit_log_file: PathBuf,
}

impl InstancePaths {
    pub fn new(instance: &str) -> Self {
        Self::with_roots(
            instance,
            Path::new(BPFFS),
            Path::new(STATE_ROOT),
            Path::new(GOOD_ROOT),
        )
    }

    pub fn with_roots(instance: &str, bpffs: &Path, state_root: &Path, good_root: &Path) -> Self {
        let pin_dir = bpffs.join(instance);
        let state_dir = state_root.join(instance);
        Self {
            instance: instance.to_string(),
            maps_dir: pin_dir.join("maps"),
            progs_dir: pin_dir.join("programs"),
            links_dir: pin_dir.join("links"),
            pin_dir,
            state_file: state_dir.join("state.json"),
            pending_file: state_dir.join("pending.json"),
            state_dir,
            state_root: state_root.to_path_buf(),
            lock_file: state_root.join(format!("{instance}.lock")),
            run_lock_file: state_root.join(format!("{instance}.run")),
            removed_by_file: state_root.join(format!("{instance}.removed-by")),
            audit_log_file: state_root.join(format!("{instance}.audit-log")),
            good_dir: good_root.join(instance),
        }
    }
}

/// Instance names become a directory and an nftables table name.
pub fn valid_instance(name: &str) -> bool {
    crate::policy::valid_name(name)
}
