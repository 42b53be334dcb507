//! The names of the enforcement layers: one word each, in `--layers`, the
//! state file, `status`, events and metrics. (The layers themselves are the
//! engine's.)

use std::fmt;

use serde::{Deserialize, Serialize};

/// One enforcement layer. Its name is the word of `--layers`, the state
/// file, `status` and the metrics' `layer` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerKind {
    /// eBPF programs on the cgroup's socket hooks.
    Bpf,
    /// The nftables table `inet <instance>`.
    Nft,
}

impl LayerKind {
    pub const ALL: [LayerKind; 2] = [LayerKind::Bpf, LayerKind::Nft];

    pub fn as_str(self) -> &'static str {
        match self {
            LayerKind::Bpf => "bpf",
            LayerKind::Nft => "nft",
        }
    }

    /// What people call it in messages.
    pub fn title(self) -> &'static str {
        match self {
            LayerKind::Bpf => "eBPF",
            LayerKind::Nft => "nftables",
        }
    }
}

impl fmt::Display for LayerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The layers asked for (`--layers bpf|nft|both`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LayerSet {
    Bpf,
    Nft,
    #[default]
    Both,
}

impl LayerSet {
    pub fn contains(self, kind: LayerKind) -> bool {
        matches!(
            (self, kind),
            (LayerSet::Both, _) | (LayerSet::Bpf, LayerKind::Bpf) | (LayerSet::Nft, LayerKind::Nft)
        )
    }

    /// More than one layer: one the host lacks is skipped with a warning.
    pub fn is_several(self) -> bool {
        self == LayerSet::Both
    }

    /// The set holding exactly `kinds` (both when empty or all).
    pub fn of(kinds: &[LayerKind]) -> LayerSet {
        match (
            kinds.contains(&LayerKind::Bpf),
            kinds.contains(&LayerKind::Nft),
        ) {
            (true, false) => LayerSet::Bpf,
            (false, true) => LayerSet::Nft,
            _ => LayerSet::Both,
        }
    }
}
