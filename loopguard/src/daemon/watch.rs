//! The daemon's watchers. Each only reports, as a [`Trigger`] on the one
//! channel the reconcile loop reads: none reads a policy, resolves a name
//! or touches a layer.

use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use netlink_sys::{
    protocols::{NETLINK_NETFILTER, NETLINK_ROUTE},
    Socket,
};
use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, watch},
};

use super::{reconcile::Trigger, Enforced};
use crate::host;

/// Where watchers send.
pub(super) type Triggers = mpsc::UnboundedSender<Trigger>;

/// Once a second: the cheap look at the layers, and what is due.
pub(super) async fn ticker(tx: Triggers) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        if tx.send(Trigger::Tick).is_err() {
            return;
        }
    }
}

/// The policy file: reported when its identity or contents may have
/// changed, once it has been quiet for 300 ms (editors and config
/// management write in several steps). inotify watches the file's
/// directory, and its target's when the file is a symlink: an edit in
/// place, a rename over it and a Kubernetes ConfigMap's `..data` swap all
/// show there. Without inotify (the watch limit reached), reported every
/// two seconds; with it, every few seconds too (the safety net: a watched
/// directory deleted and made again, NFS, a mount over the directory).
pub(super) async fn policy_file(file: PathBuf, tx: Triggers) {
    // One pending wake-up is enough: a burst of events is one look.
    let (wake, mut rx) = mpsc::channel::<()>(1);
    let mut dirs = watched_directories(&file);
    let mut watcher = watch_directories(&dirs, watched_names(&file), wake.clone());
    if let Err(e) = &watcher {
        log::warn!(
            "cannot watch {} with inotify ({e}); polling it every 2 s",
            file.display()
        );
    }
    loop {
        if watcher.is_ok() {
            match tokio::time::timeout(SAFETY_NET, rx.recv()).await {
                Ok(None) => return,
                Ok(Some(())) => {
                    // Debounce: wait until the file is quiet, for at most 2 s.
                    let settle = Instant::now() + Duration::from_secs(2);
                    while let Ok(Some(())) =
                        tokio::time::timeout(Duration::from_millis(300), rx.recv()).await
                    {
                        if Instant::now() > settle {
                            break;
                        }
                    }
                }
                Err(_) => {}
            }
        } else {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        // The symlink may point elsewhere now: watch where it points.
        let now_dirs = watched_directories(&file);
        if now_dirs != dirs || watcher.is_err() {
            dirs = now_dirs;
            watcher = watch_directories(&dirs, watched_names(&file), wake.clone());
            if let Err(e) = &watcher {
                log::warn!(
                    "cannot watch {} with inotify ({e}); polling it every 2 s",
                    file.display()
                );
            }
        }
        if tx.send(Trigger::PolicyFile).is_err() {
            return;
        }
    }
}

/// The user database (`dir`'s `names`: `/etc/passwd`, `/etc/group`),
/// reported once quiet for 100 ms (`useradd` and `gpasswd` write several
/// files).
pub(super) async fn accounts(files: Vec<PathBuf>, tx: Triggers) {
    let (wake, mut rx) = mpsc::channel::<()>(1);
    let mut dirs: Vec<WatchedDir> = Vec::new();
    for f in &files {
        let path = f
            .parent()
            .map_or_else(|| PathBuf::from("/"), Path::to_path_buf);
        if !dirs.iter().any(|d| d.path == path) {
            dirs.push(WatchedDir { path, id: None });
        }
    }
    let names = files
        .iter()
        .filter_map(|f| f.file_name())
        .map(Into::into)
        .collect();
    let _watcher = match watch_directories(&dirs, names, wake) {
        Ok(w) => w,
        Err(e) => {
            log::error!(
                "cannot watch the user database ({e}); group membership is as of the last apply"
            );
            return;
        }
    };
    while rx.recv().await.is_some() {
        while let Ok(Some(())) = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {
        }
        if tx.send(Trigger::Accounts).is_err() {
            return;
        }
    }
}

/// The cgroups the policy in force lists: inotify watches the nearest
/// existing directory on the way to each (cgroupfs reports `mkdir` and
/// `rmdir` there), reported after a short settle; every two seconds too,
/// the safety net.
pub(super) async fn cgroups(mut published: watch::Receiver<Arc<Enforced>>, tx: Triggers) {
    let Ok(root) = host::cgroup2_root() else {
        log::debug!("no cgroup2 mount: listed cgroups are not followed");
        return;
    };
    let (wake, mut rx) = mpsc::channel::<()>(1);
    let mut watched: Vec<WatchedDir> = Vec::new();
    let mut watcher = None;
    loop {
        let listed: Vec<crate::policy::ResolvedCgroup> = {
            let enforced = published.borrow_and_update();
            let mut all: Vec<_> = enforced
                .plan
                .iter()
                .flat_map(|p| p.cgroup_sets.iter().flatten().cloned())
                .collect();
            all.sort();
            all.dedup();
            all
        };
        if !listed.is_empty() {
            let (dirs, names) = cgroup_watch_points(&root, &listed);
            if dirs != watched || watcher.is_none() {
                watcher = watch_directories(&dirs, names, wake.clone())
                    .map_err(|e| {
                        log::warn!("cannot watch cgroups with inotify ({e}); looking every 2 s")
                    })
                    .ok();
                watched = dirs;
            }
        }
        tokio::select! {
            _ = tokio::time::timeout(Duration::from_secs(2), rx.recv()) => {}
            changed = published.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        }
        // A short settle (mkdir, then the unit's processes), bounded: a
        // stream of events cannot hold the report back.
        let settle = Instant::now() + Duration::from_millis(200);
        while Instant::now() < settle
            && tokio::time::timeout(Duration::from_millis(50), rx.recv())
                .await
                .is_ok_and(|m| m.is_some())
        {}
        if !listed.is_empty() && tx.send(Trigger::Cgroups).is_err() {
            return;
        }
    }
}

/// The layers' own events: nftables changes that touch the instance's
/// table (NFNLGRP_NFTABLES: `nft flush ruleset`, `systemctl restart
/// nftables`, firewalld reloads), and the attach cgroup removed or made
/// (inotify on its parent). Unpinning and `bpftool link detach` send no
/// event: the tick's look finds those.
/// The nftables event socket, bound before the daemon says it is ready:
/// a change made right after READY=1 is not missed.
pub(super) fn nft_events() -> Option<Socket> {
    const NFNLGRP_NFTABLES: u32 = 7;
    match host::netlink_socket(NETLINK_NETFILTER, 1 << (NFNLGRP_NFTABLES - 1)) {
        Ok(sock) => Some(sock),
        Err(e) => {
            log::error!("cannot watch nftables changes: {e}; the nftables layer is read back only on reloads");
            None
        }
    }
}

pub(super) async fn layers(
    instance: String,
    nft_events: Option<Socket>,
    mut published: watch::Receiver<Arc<Enforced>>,
    tx: Triggers,
) {
    // SAFETY: the socket owns its fd and lives inside the AsyncFd.
    let fd = nft_events.and_then(|sock| unsafe { AsyncFd::register(sock) }.ok());
    let mut buf = vec![0u8; 64 * 1024];
    let (cgroup_tx, mut cgroup_rx) = mpsc::channel::<()>(1);
    let mut cgroup_watch: Option<(PathBuf, Option<notify::RecommendedWatcher>)> = None;
    loop {
        let attach = published.borrow_and_update().cgroup.clone();
        if cgroup_watch.as_ref().map(|(p, _)| p) != Some(&attach) {
            let watcher = match (attach.parent(), attach.file_name()) {
                (Some(parent), Some(name)) if !host::is_cgroup2_root(&attach) => {
                    let dir = WatchedDir {
                        path: parent.to_path_buf(),
                        id: None,
                    };
                    watch_directories(&[dir], vec![name.to_os_string()], cgroup_tx.clone())
                        .map_err(|e| {
                            log::warn!(
                                "cannot watch {} with inotify ({e}); looking every second",
                                parent.display()
                            )
                        })
                        .ok()
                }
                _ => None,
            };
            cgroup_watch = Some((attach, watcher));
        }
        let nft_events = async {
            match &fd {
                Some(fd) => fd.readable().await,
                None => std::future::pending().await,
            }
        };
        let trigger = tokio::select! {
            ready = nft_events => {
                let Ok(mut guard) = ready else { return };
                let ours = nft_events_touch(guard.get_inner(), &mut buf, &instance);
                guard.clear_ready();
                ours.then_some(Trigger::LayerEvent)
            }
            _ = cgroup_rx.recv() => Some(Trigger::AttachCgroup),
            changed = published.changed() => {
                if changed.is_err() {
                    return;
                }
                None
            }
        };
        if let Some(t) = trigger {
            if tx.send(t).is_err() {
                return;
            }
        }
    }
}

/// The kernel's local table: reported once at start and whenever
/// rtnetlink announces a route or address change (a burst is one report).
pub(super) async fn local_routes(tx: Triggers) {
    let sock = match host::netlink_socket(
        NETLINK_ROUTE,
        (libc::RTMGRP_IPV4_IFADDR
            | libc::RTMGRP_IPV6_IFADDR
            | libc::RTMGRP_IPV4_ROUTE
            | libc::RTMGRP_IPV6_ROUTE) as u32,
    ) {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot watch the local routing table: {e}");
            return;
        }
    };
    // SAFETY: the socket owns its fd and lives inside the AsyncFd.
    let Ok(fd) = (unsafe { AsyncFd::register(sock) }) else {
        return;
    };
    let mut buf = vec![0u8; 64 * 1024];
    // Changes made before the watch started.
    if tx.send(Trigger::LocalRoutes).is_err() {
        return;
    }
    loop {
        let Ok(mut guard) = fd.readable().await else {
            return;
        };
        // The content does not matter: a burst of changes is one re-read.
        drain(guard.get_inner(), &mut buf);
        guard.clear_ready();
        if tx.send(Trigger::LocalRoutes).is_err() {
            return;
        }
    }
}

/// Where to watch for the listed cgroups: for each, the deepest existing
/// directory on its path (its parent once that exists), and the names
/// whose creation or removal there matters.
fn cgroup_watch_points(
    root: &Path,
    listed: &[crate::policy::ResolvedCgroup],
) -> (Vec<WatchedDir>, Vec<std::ffi::OsString>) {
    use std::os::unix::fs::MetadataExt as _;
    let mut dirs: Vec<WatchedDir> = Vec::new();
    let mut names: Vec<std::ffi::OsString> = Vec::new();
    for c in listed {
        let parts: Vec<&str> = c.path.as_str().split('/').collect();
        names.extend(parts.iter().map(Into::into));
        // Bounded: a listed path has at most MAX_CGROUP_LEVEL parts.
        let mut dir = root.to_path_buf();
        for part in &parts {
            let next = dir.join(part);
            if !next.is_dir() {
                break;
            }
            dir = next;
        }
        if dir == root.join(c.path.as_str()) {
            dir.pop();
        }
        let id = fs::metadata(&dir).ok().map(|m| (m.dev(), m.ino()));
        if !dirs.iter().any(|d| d.path == dir) {
            dirs.push(WatchedDir { path: dir, id });
        }
    }
    names.sort();
    names.dedup();
    (dirs, names)
}

/// Reads every pending nftables event; whether any may concern the
/// instance's table (another table's changes, docker's or firewalld's, do
/// not wake a read-back). A lost event (ENOBUFS) or one that cannot be read
/// counts as ours.
fn nft_events_touch(fd: &Socket, buf: &mut [u8], table: &str) -> bool {
    let mut ours = false;
    loop {
        match recv_nonblocking(fd, buf) {
            Ok(n) if n > 0 => {
                ours |= crate::nft::attest::events_touch(&buf[..n.min(buf.len())], table)
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => ours = true,
            _ => break,
        }
    }
    ours
}

/// Reads every pending message of a netlink socket whose messages only
/// say "something changed". A full socket buffer (ENOBUFS) lost some:
/// the caller's re-read covers them too.
fn drain(fd: &Socket, buf: &mut [u8]) {
    loop {
        match recv_nonblocking(fd, buf) {
            Ok(n) if n > 0 => continue,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => continue,
            _ => break,
        }
    }
}

/// One datagram from a netlink socket, without blocking.
pub(super) fn recv_nonblocking(sock: &Socket, buf: &mut [u8]) -> io::Result<usize> {
    sock.recv(&mut &mut buf[..], libc::MSG_DONTWAIT)
}

/// How often the watched file is looked at even without an event.
const SAFETY_NET: Duration = Duration::from_secs(5);

/// A watched directory: its path and identity (device, inode), so a
/// directory removed and made again at the same path is watched anew.
#[derive(Clone, Debug, PartialEq, Eq)]
struct WatchedDir {
    path: PathBuf,
    id: Option<(u64, u64)>,
}

/// The directory holding `file`, the one holding its target when it is a
/// symlink that leads elsewhere, and the directory of every symlink on
/// the way (`/etc/lg/current -> release-1`: `/etc/lg`, where `current`
/// is re-pointed).
fn watched_directories(file: &Path) -> Vec<WatchedDir> {
    use std::os::unix::fs::MetadataExt as _;
    let parent = |p: &Path| match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut paths = vec![parent(file)];
    if let Ok(target) = fs::canonicalize(file) {
        paths.push(parent(&target));
    }
    // Bounded by the path's depth.
    for ancestor in file.ancestors().skip(1) {
        if fs::symlink_metadata(ancestor).is_ok_and(|m| m.file_type().is_symlink()) {
            paths.push(parent(ancestor));
        }
    }
    let mut dirs: Vec<WatchedDir> = Vec::new();
    for path in paths {
        let id = fs::metadata(&path).ok().map(|m| (m.dev(), m.ino()));
        if !dirs
            .iter()
            .any(|d| d.path == path || (id.is_some() && d.id == id))
        {
            dirs.push(WatchedDir { path, id });
        }
    }
    dirs
}

/// The names, within the watched directories, whose change may change
/// what `file` reads: its own, and each name its symlinks go through
/// (`..data` for a ConfigMap). Other entries of the directory (the audit
/// log, an editor's swap file) wake nothing.
fn watched_names(file: &Path) -> Vec<std::ffi::OsString> {
    let mut names: Vec<std::ffi::OsString> = file.file_name().into_iter().map(Into::into).collect();
    // Symlinks on the way: their names, in their directories.
    for ancestor in file.ancestors().skip(1) {
        if fs::symlink_metadata(ancestor).is_ok_and(|m| m.file_type().is_symlink()) {
            names.extend(ancestor.file_name().map(Into::into));
        }
    }
    let mut at = file.to_path_buf();
    // A bounded walk: symlink loops end it.
    for _ in 0..8 {
        let Ok(target) = fs::read_link(&at) else {
            break;
        };
        for part in target.components() {
            if let std::path::Component::Normal(n) = part {
                names.push(n.to_os_string());
            }
        }
        at = match at.parent() {
            Some(dir) => dir.join(&target),
            None => target,
        };
    }
    names
}

/// An inotify watch on `dirs`; an event on one of `names` is a wake-up on
/// `tx`.
fn watch_directories(
    dirs: &[WatchedDir],
    names: Vec<std::ffi::OsString>,
    tx: mpsc::Sender<()>,
) -> notify::Result<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Reading a file is no change: reloads and name lookups open
        // the very files watched, and must not wake the watch again.
        let relevant = event.is_ok_and(|e| {
            e.need_rescan()
                || !matches!(e.kind, notify::EventKind::Access(_))
                    && e.paths.iter().any(|p| {
                        p.file_name()
                            .is_some_and(|n| names.iter().any(|m| m.as_os_str() == n))
                    })
        });
        if relevant {
            let _ = tx.try_send(());
        }
    })?;
    for dir in dirs {
        watcher.watch(&dir.path, notify::RecursiveMode::NonRecursive)?;
    }
    Ok(watcher)
}
