//! Users and groups to uids, at apply time (or at `check` unless
//! `--offline`). Groups expand to every member: those with it as their
//! primary group and those listed as supplementary members.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
};

use uzers::os::unix::GroupExt as _;

use serde::{Deserialize, Serialize};

use super::{CgroupPath, IdList, IdRef, ListKind, Policy, Span};
use crate::diag::{Code, Diagnostic};

/// Where account names come from: NSS on the host, a fixed table in tests.
pub trait Directory {
    fn uid_of(&self, name: &str) -> Option<u32>;
    fn user_name(&self, uid: u32) -> Option<String>;
    /// Every member of the group, or `None` when the group does not exist.
    fn group_members(&self, group: &IdRef) -> Option<Vec<u32>>;
    /// The id of a cgroup (its cgroup2 directory's inode number), or
    /// `None` while it does not exist (a service not started yet is no
    /// error).
    fn cgroup_id(&self, _path: &CgroupPath) -> Option<u64> {
        None
    }
    /// The cgroup systemd runs unit `unit` in (running or not), or why it
    /// cannot be known here.
    fn unit_cgroup(&self, _unit: &str) -> Result<CgroupPath, String> {
        Err("no systemd to ask".into())
    }
    /// The uid a user name stands for in a list of `kind` (`None`: an
    /// unknown name, an error). A daemon's directory answers for names the
    /// host does not know (yet): see [`DaemonDirectory`].
    fn uid_in_list(&self, name: &str, _kind: ListKind) -> Option<u32> {
        self.uid_of(name)
    }
    /// The members a group stands for in a list of `kind`.
    fn members_in_list(&self, group: &IdRef, _kind: ListKind) -> Option<Vec<u32>> {
        self.group_members(group)
    }
}

/// Names as they were last resolved: kept with the last known good policy,
/// so that a daemon starting before the directory answers (SSSD, LDAP), or
/// after a listed user was deleted, keeps denying whom it denied.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameMemory {
    pub users: std::collections::BTreeMap<String, u32>,
    /// By name, or `#GID` for a group listed by number.
    pub groups: std::collections::BTreeMap<String, Vec<u32>>,
}

fn group_key(group: &IdRef) -> String {
    match group {
        IdRef::Name(n) => n.to_string(),
        IdRef::Id(id) => format!("#{id}"),
    }
}

/// A name a daemon's resolution could not find, and what it stands for now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unresolved {
    /// `user bob`, `group dbadmins`.
    pub name: String,
    pub kind: ListKind,
    /// On a deny-list: the uids it was last resolved to, still denied
    /// (empty: never resolved here). On an allow-list: nobody is admitted
    /// for it (fail closed).
    pub kept: Vec<u32>,
}

impl std::fmt::Display for Unresolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.kind, self.kept.as_slice()) {
            (ListKind::Allow, _) => write!(
                f,
                "{} does not resolve: on an allow-list it admits nobody until it does",
                self.name
            ),
            (ListKind::Deny, []) => write!(
                f,
                "{} does not resolve and was never resolved here: its deny-list entry denies nobody until it does",
                self.name
            ),
            (ListKind::Deny, kept) => write!(
                f,
                "{} does not resolve: uid {} it was last resolved to stays denied",
                self.name,
                kept.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

/// Resolution for `loopguard run`, which must never fail open at start or
/// on a change to the user database: a name that does not resolve is no
/// error (it would keep the whole policy, revocations included, out of
/// force) but a warning. On an allow-list it admits nobody; on a deny-list
/// the uids it was last resolved to (from [`NameMemory`]) stay denied.
/// Every name that does resolve is remembered for the next time.
pub struct DaemonDirectory<'a> {
    pub inner: &'a dyn Directory,
    /// As last resolved; `None`: strict (unknown names are errors, as for
    /// `apply` and `check`), only remembering.
    pub memory: Option<NameMemory>,
    /// What resolved now.
    pub seen: std::cell::RefCell<NameMemory>,
    pub unresolved: std::cell::RefCell<Vec<Unresolved>>,
}

impl<'a> DaemonDirectory<'a> {
    /// Strict: unknown names are errors; what resolves is remembered.
    pub fn strict(inner: &'a dyn Directory) -> Self {
        DaemonDirectory {
            inner,
            memory: None,
            seen: Default::default(),
            unresolved: Default::default(),
        }
    }

    /// Lenient, with names as last resolved.
    pub fn lenient(inner: &'a dyn Directory, memory: NameMemory) -> Self {
        DaemonDirectory {
            memory: Some(memory),
            ..Self::strict(inner)
        }
    }

    /// A name the host does not know: `None` (an error) when strict, else
    /// what it stands for, recorded.
    fn not_found(&self, name: String, kind: ListKind, kept: Option<&[u32]>) -> Option<Vec<u32>> {
        self.memory.as_ref()?;
        let kept: Vec<u32> = match kind {
            ListKind::Deny => kept.map(<[u32]>::to_vec).unwrap_or_default(),
            ListKind::Allow => Vec::new(),
        };
        let mut unresolved = self.unresolved.borrow_mut();
        if !unresolved.iter().any(|u| u.name == name && u.kind == kind) {
            unresolved.push(Unresolved {
                name,
                kind,
                kept: kept.clone(),
            });
        }
        Some(kept)
    }
}

impl Directory for DaemonDirectory<'_> {
    fn uid_of(&self, name: &str) -> Option<u32> {
        self.inner.uid_of(name)
    }

    fn user_name(&self, uid: u32) -> Option<String> {
        self.inner.user_name(uid)
    }

    fn group_members(&self, group: &IdRef) -> Option<Vec<u32>> {
        self.inner.group_members(group)
    }

    fn cgroup_id(&self, path: &CgroupPath) -> Option<u64> {
        self.inner.cgroup_id(path)
    }

    fn unit_cgroup(&self, unit: &str) -> Result<CgroupPath, String> {
        self.inner.unit_cgroup(unit)
    }

    fn uid_in_list(&self, name: &str, kind: ListKind) -> Option<u32> {
        if let Some(uid) = self.inner.uid_of(name) {
            self.seen.borrow_mut().users.insert(name.to_string(), uid);
            return Some(uid);
        }
        let kept = self
            .memory
            .as_ref()
            .and_then(|m| m.users.get(name))
            .copied();
        let kept = self.not_found(
            format!("user {name}"),
            kind,
            kept.as_ref().map(std::slice::from_ref),
        )?;
        match kept.first() {
            Some(uid) => {
                self.seen.borrow_mut().users.insert(name.to_string(), *uid);
                Some(*uid)
            }
            // Matches no process.
            None => Some(VANISHED_UID),
        }
    }

    fn members_in_list(&self, group: &IdRef, kind: ListKind) -> Option<Vec<u32>> {
        let key = group_key(group);
        if let Some(members) = self.inner.group_members(group) {
            self.seen.borrow_mut().groups.insert(key, members.clone());
            return Some(members);
        }
        let kept = self
            .memory
            .as_ref()
            .and_then(|m| m.groups.get(&key))
            .cloned();
        let kept = self.not_found(format!("group {group}"), kind, kept.as_deref())?;
        if !kept.is_empty() {
            self.seen.borrow_mut().groups.insert(key, kept.clone());
        }
        Some(kept)
    }
}

/// Where systemd runs `unit`: its `ControlGroup` while it runs, else its
/// slice's path and its name (where it will run once started).
fn systemd_unit_cgroup(unit: &str) -> Result<CgroupPath, String> {
    if !std::path::Path::new("/run/systemd/system").exists() {
        return Err("this host does not run systemd (no /run/systemd/system)".into());
    }
    let out = std::process::Command::new("systemctl")
        .args(["show", "--property=ControlGroup", "--property=Slice", "--"])
        .arg(unit)
        .output()
        .map_err(|e| format!("systemctl: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "systemctl show {unit}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    unit_cgroup_from_show(unit, &String::from_utf8_lossy(&out.stdout))
}

/// The cgroup of `unit` from `systemctl show -p ControlGroup -p Slice`.
fn unit_cgroup_from_show(unit: &str, text: &str) -> Result<CgroupPath, String> {
    let value = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .filter(|v| !v.is_empty())
    };
    let path = match (value("ControlGroup"), unit.ends_with(".slice")) {
        (Some(cg), _) => cg.to_string(),
        (None, true) => super::slice_path(unit).unwrap_or_default(),
        (None, false) => {
            let slice = value("Slice").unwrap_or("system.slice");
            let slice = super::slice_path(slice).unwrap_or_default();
            format!("{slice}/{unit}")
        }
    };
    CgroupPath::new(&path).map_err(|why| format!("its cgroup {path:?}: {why}"))
}

/// The id of `path` under the cgroup2 mount `root`: the directory's
/// inode number, which is what `bpf_get_current_cgroup_id` returns.
pub fn cgroup_id_under(root: &std::path::Path, path: &CgroupPath) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(root.join(path.as_str())).ok()?;
    meta.is_dir().then(|| meta.ino())
}

/// The host's users and groups through NSS (`getpwnam`, `getgrnam`,
/// `getpwent`), via the uzers crate.
pub struct SystemDirectory;

impl Directory for SystemDirectory {
    fn uid_of(&self, name: &str) -> Option<u32> {
        uzers::get_user_by_name(name).map(|u| u.uid())
    }

    fn user_name(&self, uid: u32) -> Option<String> {
        uzers::get_user_by_uid(uid).map(|u| u.name().to_string_lossy().into_owned())
    }

    fn group_members(&self, group: &IdRef) -> Option<Vec<u32>> {
        let g = match group {
            IdRef::Name(n) => uzers::get_group_by_name(n.as_str())?,
            IdRef::Id(id) => uzers::get_group_by_gid(*id)?,
        };
        let mut uids: Vec<u32> = g
            .members()
            .iter()
            .filter_map(|m| uzers::get_user_by_name(m).map(|u| u.uid()))
            .collect();
        // SAFETY: getpwent is not thread-safe; loopguard resolves names on
        // one thread before starting any other.
        let all = unsafe { uzers::all_users() };
        uids.extend(
            all.filter(|u| u.primary_group_id() == g.gid())
                .map(|u| u.uid()),
        );
        Some(uids)
    }

    fn unit_cgroup(&self, unit: &str) -> Result<CgroupPath, String> {
        systemd_unit_cgroup(unit)
    }

    fn cgroup_id(&self, path: &CgroupPath) -> Option<u64> {
        // The mount is looked up once per process, not once per entry.
        static ROOT: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
        let root = ROOT.get_or_init(|| crate::host::cgroup2_root().ok());
        cgroup_id_under(root.as_ref()?, path)
    }
}

/// A uid no process runs as ((uid_t)-2): what a user who no longer exists
/// resolves to under [`LenientDirectory`].
pub const VANISHED_UID: u32 = u32::MAX - 1;

/// A listed cgroup as resolved: its path and, while it exists, its id.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ResolvedCgroup {
    pub path: CgroupPath,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
}

/// The uids of each service, in policy order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    pub services: Vec<ResolvedService>,
    /// Units whose cgroup could not be found (no systemd): warnings for
    /// `check`, a refusal for `apply`.
    pub unresolved_units: Vec<Diagnostic>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResolvedService {
    /// Sorted, without duplicates; services with the same lists share it.
    pub uids: Arc<[u32]>,
    /// Who may bind the service's ports, when it is bind-guarded.
    pub bind_uids: Option<Arc<[u32]>>,
    /// Listed cgroups, sorted by path.
    pub cgroups: Vec<ResolvedCgroup>,
}

/// Resolves every name; every unknown name is a diagnostic.
pub fn resolve(policy: &Policy, dir: &dyn Directory) -> Result<Resolved, Vec<Diagnostic>> {
    let mut r = Resolver {
        dir,
        diags: Vec::new(),
        done: HashMap::new(),
    };
    let mut unresolved = Vec::new();
    let services = policy
        .services
        .iter()
        .map(|s| ResolvedService {
            uids: r.lists(&s.users, &s.groups, &s.name_span, s.list),
            // Who may bind: an allow-list.
            bind_uids: s
                .bind
                .as_ref()
                .map(|b| r.lists(&b.users, &b.groups, &s.name_span, ListKind::Allow)),
            cgroups: {
                let units = s.units.iter().filter_map(|(unit, span)| {
                    match dir.unit_cgroup(unit) {
                        Ok(path) => Some(path),
                        Err(why) => {
                            unresolved.push(
                                Diagnostic::warning(
                                    Code::Unit,
                                    format!("unit {unit}: its cgroup cannot be found: {why}"),
                                )
                                .primary(span.clone(), "names a systemd unit")
                                .note("apply refuses units it cannot find the cgroup of; name the cgroup with `allow_cgroups`/`deny_cgroups`"),
                            );
                            None
                        }
                    }
                });
                let mut cgroups: Vec<ResolvedCgroup> = s
                    .cgroups
                    .iter()
                    .map(|(path, _)| path.clone())
                    .chain(units)
                    .map(|path| ResolvedCgroup {
                        id: dir.cgroup_id(&path),
                        path,
                    })
                    .collect();
                cgroups.sort();
                cgroups.dedup();
                cgroups
            },
        })
        .collect();
    if r.diags.is_empty() {
        Ok(Resolved {
            services,
            unresolved_units: unresolved,
        })
    } else {
        Err(r.diags)
    }
}

struct Resolver<'d> {
    dir: &'d dyn Directory,
    diags: Vec<Diagnostic>,
    /// Equal lists of one kind resolve once (they share storage: see
    /// `IdList`).
    done: HashMap<(*const IdRef, *const IdRef, ListKind), Arc<[u32]>>,
}

impl Resolver<'_> {
    /// The uids of a users list and a groups list together.
    fn lists(
        &mut self,
        users: &IdList,
        groups: &IdList,
        fallback: &Span,
        kind: ListKind,
    ) -> Arc<[u32]> {
        let key = (users.ids.as_ptr(), groups.ids.as_ptr(), kind);
        if let Some(uids) = self.done.get(&key) {
            return uids.clone();
        }
        let mut uids = BTreeSet::new();
        let errors_before = self.diags.len();
        for (value, span) in users.iter() {
            let span = span.cloned().unwrap_or_else(|| fallback.clone());
            match value {
                IdRef::Id(id) => {
                    uids.insert(*id);
                }
                IdRef::Name(n) => match self.dir.uid_in_list(n, kind) {
                    Some(uid) => {
                        uids.insert(uid);
                    }
                    None => self.diags.push(
                        Diagnostic::error(Code::UnknownUser, format!("unknown user \"{n}\""))
                            .primary(span, "no such user on this host")
                            .note("use a numeric uid, or `check --offline` for a policy meant for another host"),
                    ),
                },
            }
        }
        for (value, span) in groups.iter() {
            let span = span.cloned().unwrap_or_else(|| fallback.clone());
            match self.dir.members_in_list(value, kind) {
                Some(members) => uids.extend(members),
                None => self.diags.push(
                    Diagnostic::error(Code::UnknownGroup, format!("unknown group \"{value}\""))
                        .primary(span, "no such group on this host"),
                ),
            }
        }
        let uids: Arc<[u32]> = uids.into_iter().collect();
        // Lists with errors are not shared: each service reports its own.
        if self.diags.len() == errors_before {
            self.done.insert(key, uids.clone());
        }
        uids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_map_to_their_cgroups() {
        let cg = |unit: &str, show: &str| {
            unit_cgroup_from_show(unit, show).map(|p| p.as_str().to_string())
        };
        assert_eq!(
            cg(
                "grafana.service",
                "ControlGroup=/system.slice/grafana.service\nSlice=system.slice\n"
            ),
            Ok("system.slice/grafana.service".into())
        );
        // Not running: where it will run.
        assert_eq!(
            cg(
                "backup.service",
                "ControlGroup=\nSlice=system-backup.slice\n"
            ),
            Ok("system.slice/system-backup.slice/backup.service".into())
        );
        assert_eq!(
            cg("never.service", "ControlGroup=\nSlice=\n"),
            Ok("system.slice/never.service".into())
        );
        assert_eq!(
            cg("user-1000.slice", "ControlGroup=\n"),
            Ok("user.slice/user-1000.slice".into())
        );
        assert!(
            cg("-.slice", "ControlGroup=\n").is_err(),
            "the root is no list entry"
        );
        assert!(super::super::valid_unit_name("getty@tty1.service"));
        assert!(!super::super::valid_unit_name("grafana"));
        assert!(!super::super::valid_unit_name("a b.service"));
        assert!(!super::super::valid_unit_name(".service"));
    }
}
