//! What an instance has applied, kept beside its pins so `status` and
//! `explain` report what the kernel enforces, not what the file says now.

use std::{fs, io, path::PathBuf};

use serde::{Deserialize, Serialize};

use crate::{compile::Plan, paths::InstancePaths};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct State {
    /// Absolute path of the policy file applied.
    pub policy_path: PathBuf,
    pub cgroup: PathBuf,
    /// RFC 3339, UTC.
    pub applied_at: String,
    /// Which kernel slot holds this plan.
    pub slot: u32,
    pub layers: Vec<String>,
    pub plan: Plan,
    /// Layout of the nftables table ([`crate::nft::LAYOUT`]; 0: none or
    /// unknown), so a table of another layout is replaced, not updated.
    #[serde(default)]
    pub nft_layout: u32,
    /// nftables packet counts carried over from tables and elements that
    /// were replaced: new ones start at zero (nft's JSON input cannot seed
    /// counters), so readers add these to the kernel's.
    #[serde(default)]
    pub packet_base: crate::nft::PacketCounts,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("failed to read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a loopguard state file")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("failed to write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl State {
    /// `None` when the instance has never been applied (or was removed).
    pub fn load(paths: &InstancePaths) -> Result<Option<State>, StateError> {
        let path = &paths.state_file;
        let text = match fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StateError::Read {
                    path: path.clone(),
                    source,
                })
            }
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| StateError::Parse {
                path: path.clone(),
                source,
            })
    }

    /// Written to a temporary file and renamed, so readers never see half.
    pub fn save(&self, paths: &InstancePaths) -> Result<(), StateError> {
        let err = |source| StateError::Write {
            path: paths.state_file.clone(),
            source,
        };
        fs::create_dir_all(&paths.state_dir).map_err(err)?;
        let tmp = paths.state_file.with_extension("json.tmp");
        let text = serde_json::to_vec(self).map_err(|e| err(io::Error::other(e)))?;
        fs::write(&tmp, text).map_err(err)?;
        fs::rename(&tmp, &paths.state_file).map_err(err)
    }
}
