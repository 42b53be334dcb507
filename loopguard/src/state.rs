//! What an instance has applied, kept beside its pins so `status` and
//! `explain` report what the kernel enforces, not what the file says now.

use crate::files::{create_private, private_dir};
use std::{
    fs, io,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

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
    pub layers: Vec<crate::layer_kind::LayerKind>,
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
    /// `SO_NETNS_COOKIE` of the network namespace the policy guards (0:
    /// unknown, kernels before 5.14). Commands run from another namespace
    /// are refused: there they would see, or change, nothing of it.
    #[serde(default)]
    pub netns_cookie: u64,
    /// The id of the cgroup the eBPF layer was attached to when applied (0:
    /// unknown, a state written before 0.1's attestation). A path that
    /// names another id now was removed and made again.
    #[serde(default)]
    pub cgroup_id: u64,
    /// The nftables ruleset generation right after this plan's commit
    /// (`None`: not known to be loopguard's own): while the namespace's
    /// generation is still this one, nothing changed the table.
    #[serde(default)]
    pub nft_generation: Option<u32>,
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
        read(&paths.state_file)
    }

    /// The journal of an `apply` that has not finished (it crashed, or is
    /// running now under the lock): the state it was putting in force.
    pub fn load_pending(paths: &InstancePaths) -> Result<Option<State>, StateError> {
        read(&pending_file(paths))
    }

    /// Written to a temporary file and renamed, so readers never see half;
    /// in a directory only root can enter, and never through a symlink.
    pub fn save(&self, paths: &InstancePaths) -> Result<(), StateError> {
        write_atomically(paths, &paths.state_file, self)
    }

    /// Records the state an `apply` is about to put in force, before it
    /// touches the kernel.
    pub fn save_pending(&self, paths: &InstancePaths) -> Result<(), StateError> {
        write_atomically(paths, &pending_file(paths), self)
    }

    /// The apply finished (its state is saved): drop the journal.
    pub fn clear_pending(paths: &InstancePaths) -> Result<(), StateError> {
        let path = pending_file(paths);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Write { path, source }),
        }
    }
}

fn pending_file(paths: &InstancePaths) -> PathBuf {
    paths.pending_file.clone()
}

fn read(path: &Path) -> Result<Option<State>, StateError> {
    let file = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StateError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    // Read whole, then parsed: serde_json's reader interface is several
    // times slower than its slice parser on a plan of 10,000 services.
    let mut text = Vec::new();
    io::Read::read_to_end(&mut &file, &mut text).map_err(|source| StateError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|source| StateError::Parse {
            path: path.to_path_buf(),
            source,
        })
}

fn write_atomically(paths: &InstancePaths, path: &Path, state: &State) -> Result<(), StateError> {
    use std::io::Write as _;
    let err = |source| StateError::Write {
        path: path.to_path_buf(),
        source,
    };
    private_dir(&paths.state_dir).map_err(err)?;
    let tmp = path.with_extension("json.tmp");
    // A leftover (or planted) temporary file or link goes; the new one is
    // created fresh, never followed.
    let mut file = create_private(&tmp).map_err(err)?;
    let text = serde_json::to_vec(state).map_err(|e| err(io::Error::other(e)))?;
    file.write_all(&text).map_err(err)?;
    // No fsync: the rename is atomic for every reader and survives this
    // process crashing; what the file describes (pins, links, the table)
    // does not survive a reboot, so neither need the file. /run is tmpfs
    // where systemd runs; on a disk the two syncs cost ~10 ms an apply at
    // 10,000 services (measured).
    fs::rename(&tmp, path).map_err(err)
}

/// The last known good policy of an instance: what its last successful
/// apply put in force (the resolved plan with its file's hash and path,
/// the names as resolved, and the file's text), kept on disk outside /run
/// (`/var/lib/loopguard/<instance>`, root only) so that a daemon starting
/// after a reboot with a policy file it cannot apply (missing, broken,
/// names the directory does not answer yet) enforces it instead of
/// nothing.
pub struct LastGood {
    pub state: State,
    pub names: crate::policy::NameMemory,
}

impl LastGood {
    const STATE: &'static str = "state.json";
    const NAMES: &'static str = "names.json";
    const TEXT: &'static str = "policy.toml";
    /// `PLAN-ID HASH NAMES-HASH`: what the files above hold, written last.
    const ID: &'static str = "id";

    /// Keeps `state` (just applied and saved) as the last known good, with
    /// `names`, and the policy file's text when `text_stamp` (its identity
    /// when it was read) says it is still what was applied. Synced: it must
    /// survive the reboot it is for. Nothing is written when the last known
    /// good already holds this plan with these names (a re-apply of the same
    /// file); the state file is copied, not serialized again.
    pub fn save(
        paths: &InstancePaths,
        state: &State,
        names: &crate::policy::NameMemory,
        text_stamp: Option<FileStamp>,
    ) -> Result<(), StateError> {
        use crate::check::timed;
        let dir = &paths.good_dir;
        let err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StateError::Write { path, source }
        };
        private_dir(dir).map_err(err(dir))?;
        let names_json = serde_json::to_vec(names).map_err(|e| err(dir)(io::Error::other(e)))?;
        let id_path = dir.join(Self::ID);
        let id = format!(
            "{} {} {}\n",
            state.plan.id,
            state.plan.hash,
            crate::compile::source_hash(&String::from_utf8_lossy(&names_json))
        );
        if fs::read_to_string(&id_path).is_ok_and(|old| old == id) {
            return Ok(());
        }
        // The id goes first: a crash part way leaves an id that matches
        // nothing, so the next apply writes everything again.
        let _ = fs::remove_file(&id_path);
        let state_path = dir.join(Self::STATE);
        timed("last known good: state", || {
            copy_synced(&paths.state_file, &state_path)
        })
        .map_err(err(&state_path))?;
        let names_path = dir.join(Self::NAMES);
        write_synced(&names_path, &names_json).map_err(err(&names_path))?;
        // The text, for the operator, when the file is still the one read
        // (it may have been edited since).
        let text_path = dir.join(Self::TEXT);
        match text_stamp {
            Some(stamp) if FileStamp::of(&state.policy_path) == Some(stamp) => {
                timed("last known good: text", || {
                    copy_synced(&state.policy_path, &text_path)
                })
                .map_err(err(&text_path))?;
            }
            _ => {
                let _ = fs::remove_file(&text_path);
            }
        }
        write_synced(&id_path, id.as_bytes()).map_err(err(&id_path))?;
        Ok(())
    }

    /// The last known good, if one was kept.
    pub fn load(paths: &InstancePaths) -> Result<Option<LastGood>, StateError> {
        let Some(state) = read(&paths.good_dir.join(Self::STATE))? else {
            return Ok(None);
        };
        let names_path = paths.good_dir.join(Self::NAMES);
        let names = match fs::read(&names_path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|source| StateError::Parse {
                path: names_path.clone(),
                source,
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Default::default(),
            Err(source) => {
                return Err(StateError::Read {
                    path: names_path,
                    source,
                })
            }
        };
        Ok(Some(LastGood { state, names }))
    }

    /// Names as last resolved (empty when none were kept).
    pub fn names(paths: &InstancePaths) -> crate::policy::NameMemory {
        LastGood::load(paths)
            .ok()
            .flatten()
            .map(|g| g.names)
            .unwrap_or_default()
    }

    /// Deletes the instance's last known good (`remove`).
    pub fn remove(paths: &InstancePaths) -> io::Result<bool> {
        match fs::remove_dir_all(&paths.good_dir) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// A file's identity and contents, cheaply: modified time (ns), size,
/// inode. Equal before and after: the same contents (an edit in place
/// changes the time, a rename over the file the inode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileStamp {
    modified: std::time::SystemTime,
    len: u64,
    ino: u64,
}

impl FileStamp {
    pub fn of(path: &Path) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt as _;
        let m = fs::metadata(path).ok()?;
        Some(FileStamp {
            modified: m.modified().ok()?,
            len: m.len(),
            ino: m.ino(),
        })
    }
}

/// Copies a file into a root-only one, atomically and durably.
fn copy_synced(from: &Path, to: &Path) -> io::Result<()> {
    let tmp = to.with_extension("tmp");
    let mut src = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(from)?;
    let mut dst = create_private(&tmp)?;
    io::copy(&mut src, &mut dst)?;
    dst.sync_all()?;
    fs::rename(&tmp, to)?;
    if let Some(dir) = to.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Writes a root-only file atomically and durably: temporary file, fsync,
/// rename, fsync of the directory.
fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("tmp");
    let mut file = create_private(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
