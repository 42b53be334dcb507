//! What an instance has applied, kept beside its pins so `status` and
//! `explain` report what the kernel enforces, not what the file says now.

use std::{collections::HashMap, fs, io, path::PathBuf};

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
    /// nftables packet counts carried over from the tables this one
    /// replaced (see [`crate::nft::carried_counts`]): a new table starts
    /// at zero (nft's JSON input cannot seed element counters), so
    /// readers add these.
    #[serde(default)]
    pub packet_base: HashMap<String, u64>,
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
