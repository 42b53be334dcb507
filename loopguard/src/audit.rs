//! Audit events: kernel records -> SPEC §5 JSON lines, and the bounded log
//! file they are written to.
//!
//! Field names follow the Elastic Common Schema so the stream drops into
//! Elastic, Loki or any JSON pipeline.

use std::{
    collections::HashMap,
    fs,
    io::{self, Write as _},
    net::{IpAddr, Ipv6Addr},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use loopguard_common::{
    Event, COUNT_ALLOWED, COUNT_DENIED, DEFAULT_BUCKET, HOOK_BIND4, HOOK_BIND6, HOOK_CONNECT4,
    HOOK_CONNECT6, PROTO_TCP,
};
use serde::{Deserialize, Serialize};

use crate::{
    compile::Plan,
    nft::{LogPrefix, PrefixBucket},
    policy::{Destination, ListKind, Mode, Transport},
};

/// loopguard's log directory (systemd's `LogsDirectory=loopguard`).
pub const LOG_DIR: &str = "/var/log/loopguard";

/// Where `run` writes events and `audit` reads them, unless told otherwise.
pub fn default_log_path(instance: &str) -> PathBuf {
    Path::new(LOG_DIR).join(format!("{instance}.jsonl"))
}

/// The audit log the instance's daemon writes (as it recorded at start),
/// else [`default_log_path`].
pub fn log_path(paths: &crate::paths::InstancePaths) -> PathBuf {
    fs::read_to_string(&paths.audit_log_file)
        .ok()
        .map(|s| s.trim_end_matches('\n').to_string())
        .filter(|s| !s.is_empty())
        .map_or_else(|| default_log_path(&paths.instance), PathBuf::from)
}

/// Group that may read the audit log, when it exists.
pub const AUDIT_GROUP: &str = "loopguard-audit";

/// CLOCK_MONOTONIC -> wall clock, fixed when the reader starts.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    offset_ns: i128,
    /// CLOCK_MONOTONIC when the reader started: older events were
    /// recorded while no daemon was reading (a backlog).
    started_ns: u64,
}

impl Clock {
    /// A clock whose CLOCK_MONOTONIC `started_ns` is `offset_ns` before
    /// real time: for replaying recorded events, and for tests.
    pub fn at(offset_ns: i128, started_ns: u64) -> Clock {
        Clock {
            offset_ns,
            started_ns,
        }
    }

    pub fn now() -> Clock {
        let mono = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| i128::from(t.tv_sec()) * 1_000_000_000 + i128::from(t.tv_nsec()))
            .unwrap_or(0);
        let real = jiff::Timestamp::now().as_nanosecond();
        Clock {
            offset_ns: real - mono,
            started_ns: u64::try_from(mono).unwrap_or(0),
        }
    }

    /// Whether an event was recorded before the reader started.
    pub fn is_backlog(&self, ktime_ns: u64) -> bool {
        ktime_ns < self.started_ns
    }

    pub fn timestamp(&self, ktime_ns: u64) -> String {
        let ns = i128::from(ktime_ns) + self.offset_ns;
        match jiff::Timestamp::from_nanosecond(ns) {
            Ok(t) => format!("{t:.9}"),
            Err(_) => jiff::Timestamp::now().to_string(),
        }
    }
}

/// Names for the numbers events carry, remembered (bounded): uid -> user
/// name, cgroup id -> path.
#[derive(Default)]
pub struct EventNames {
    /// uid -> user name (`None`: no such user).
    cache: HashMap<u32, Option<String>>,
    /// cgroup id -> path relative to the cgroup2 root.
    cgroups: HashMap<u64, String>,
    /// Where cgroup2 is mounted (looked up at the first cgroup).
    cgroup_root: Option<Option<PathBuf>>,
    /// When the cgroup tree was last walked.
    walked: Option<std::time::Instant>,
}

/// The tree is walked for an unknown cgroup id at most this often: a
/// flood of short-lived clients in new cgroups costs one walk per period.
const WALK_EVERY: std::time::Duration = std::time::Duration::from_secs(5);
/// Most cgroups remembered.
const MAX_CGROUP_NAMES: usize = 16_384;
/// Most directories one walk visits, and the deepest it goes.
const MAX_WALK: usize = 16_384;
const MAX_WALK_DEPTH: usize = 32;

/// Every cgroup under `root` by id (its directory's inode number), breadth
/// first, with an explicit queue (no recursion on a tree anyone can deepen),
/// at most [`MAX_WALK`] entries and [`MAX_WALK_DEPTH`] levels.
fn walk_cgroups(root: &Path, into: &mut HashMap<u64, String>) {
    use std::os::unix::fs::DirEntryExt as _;
    let mut queue = std::collections::VecDeque::from([(String::new(), 0)]);
    let mut visited = 0;
    while let Some((rel, depth)) = queue.pop_front() {
        let Ok(entries) = fs::read_dir(root.join(&rel)) else {
            continue;
        };
        for e in entries.flatten() {
            visited += 1;
            if visited > MAX_WALK {
                return;
            }
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            let path = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            into.insert(e.ino(), path.clone());
            if depth < MAX_WALK_DEPTH {
                queue.push_back((path, depth + 1));
            }
        }
    }
}

impl EventNames {
    /// The path of cgroup `id`, which process `pid` ran in: its
    /// `/proc/PID/cgroup` entry, taken only when that directory's id is
    /// `id` (the process may have moved, or exited). Found paths are
    /// remembered; a miss costs one small read and one `stat`.
    pub fn cgroup(&mut self, id: u64, pid: u32) -> Option<String> {
        use std::os::unix::fs::MetadataExt as _;
        if id == 0 {
            return None;
        }
        if let Some(path) = self.cgroups.get(&id) {
            return Some(path.clone());
        }
        let root = self
            .cgroup_root
            .get_or_insert_with(|| crate::host::cgroup2_root().ok())
            .clone()?;
        let from_proc = fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .ok()
            .and_then(|text| {
                let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
                let path = path.trim_start_matches('/').to_string();
                let meta = fs::metadata(root.join(&path)).ok()?;
                (meta.ino() == id).then_some(path)
            });
        let path = match from_proc {
            Some(p) => p,
            // The process is gone (a short-lived client) or moved: look
            // through the tree, at most once a second.
            None => {
                if self.walked.is_some_and(|at| at.elapsed() < WALK_EVERY) {
                    return None;
                }
                self.walked = Some(std::time::Instant::now());
                if self.cgroups.len() > MAX_CGROUP_NAMES {
                    self.cgroups.clear();
                }
                walk_cgroups(&root, &mut self.cgroups);
                return self.cgroups.get(&id).cloned();
            }
        };
        if self.cgroups.len() > MAX_CGROUP_NAMES {
            self.cgroups.clear();
        }
        let path = if path.is_empty() {
            "/".to_string()
        } else {
            path
        };
        self.cgroups.insert(id, path.clone());
        Some(path)
    }

    pub fn get(&mut self, uid: u32) -> Option<String> {
        if self.cache.len() > 4096 {
            self.cache.clear();
        }
        self.cache
            .entry(uid)
            .or_insert_with(|| {
                uzers::get_user_by_uid(uid).map(|u| u.name().to_string_lossy().into_owned())
            })
            .clone()
    }
}

/// The Elastic Common Schema version the events follow.
pub const ECS_VERSION: &str = "8.11.0";

/// `event.action`: the words of events, metrics, `status` and filters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AuditAction {
    Allow,
    Deny,
    WouldDeny,
    /// Events lost to a full buffer (`loopguard.dropped` says how many).
    Dropped,
}

impl AuditAction {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditAction::Allow => "allow",
            AuditAction::Deny => "deny",
            AuditAction::WouldDeny => "would-deny",
            AuditAction::Dropped => "dropped",
        }
    }

    fn of_count(kind: u32) -> AuditAction {
        match kind {
            COUNT_ALLOWED => AuditAction::Allow,
            COUNT_DENIED => AuditAction::Deny,
            _ => AuditAction::WouldDeny,
        }
    }
}

/// `loopguard.layer`: the eBPF hook that decided, or the nftables layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventLayer {
    Connect,
    Sendmsg,
    Bind,
    Packet,
}

impl EventLayer {
    pub fn as_str(self) -> &'static str {
        match self {
            EventLayer::Connect => "connect",
            EventLayer::Sendmsg => "sendmsg",
            EventLayer::Bind => "bind",
            EventLayer::Packet => "packet",
        }
    }
}

/// One line of the audit stream (SPEC §5), written by `run` and read by
/// `audit`. Fields in SPEC order, named as the Elastic Common Schema names
/// them; a field that does not apply (no service matched, a packet knows
/// no process) is left out.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    #[serde(rename = "@timestamp")]
    pub timestamp: String,
    #[serde(rename = "event.action")]
    pub action: AuditAction,
    #[serde(rename = "event.reason")]
    pub reason: String,
    #[serde(
        rename = "loopguard.service",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub service: Option<String>,
    #[serde(
        rename = "loopguard.mode",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub mode: Option<Mode>,
    #[serde(rename = "loopguard.layer")]
    pub layer: EventLayer,
    #[serde(rename = "user.id", default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(rename = "user.name", default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(rename = "group.id", default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    #[serde(
        rename = "process.pid",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub pid: Option<u32>,
    #[serde(
        rename = "process.name",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub process: Option<String>,
    /// The cgroup v2 path the process ran in (relative to the cgroup2
    /// root; `/` for the root), for the eBPF layer's events.
    #[serde(
        rename = "loopguard.cgroup",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cgroup: Option<String>,
    /// The systemd unit of that cgroup (its deepest `.service` or `.scope`
    /// part), when it has one. Not `service.name`: ECS gives that to the
    /// guarded service's name.
    #[serde(
        rename = "loopguard.unit",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub unit: Option<String>,
    #[serde(
        rename = "network.transport",
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient_transport"
    )]
    pub transport: Option<Transport>,
    #[serde(
        rename = "network.type",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub network_type: Option<String>,
    #[serde(
        rename = "destination.ip",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub ip: Option<IpAddr>,
    #[serde(
        rename = "destination.port",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub port: Option<u16>,
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub ecs: Option<Ecs>,
    /// Recorded while no daemon was reading: its time is when it
    /// happened, not when it was read.
    #[serde(
        rename = "loopguard.backlog",
        default,
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub backlog: bool,
    #[serde(
        rename = "loopguard.dropped",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub dropped: Option<u64>,
}

/// `tcp`, `udp`, or (older logs: `"unknown"`) nothing.
fn lenient_transport<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Transport>, D::Error> {
    let word = Option::<String>::deserialize(d)?;
    Ok(match word.as_deref() {
        Some("tcp") => Some(Transport::Tcp),
        Some("udp") => Some(Transport::Udp),
        _ => None,
    })
}

/// The categorisation fields every attempt's event carries, so it indexes
/// into Elastic as it is (SPEC §5): a refusal is a `denied` connection
/// that failed; an allowed or would-be-refused one an `allowed` connection
/// that went through.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ecs {
    #[serde(rename = "event.kind")]
    pub kind: String,
    #[serde(rename = "event.category")]
    pub category: Vec<String>,
    #[serde(rename = "event.type")]
    pub types: Vec<String>,
    #[serde(rename = "event.outcome")]
    pub outcome: String,
    #[serde(rename = "host.name")]
    pub host: String,
    #[serde(rename = "ecs.version")]
    pub version: String,
}

impl Ecs {
    fn of(action: AuditAction) -> Ecs {
        let (kind_type, outcome) = match action {
            AuditAction::Deny => ("denied", "failure"),
            _ => ("allowed", "success"),
        };
        Ecs {
            kind: "event".into(),
            category: vec!["network".into()],
            types: vec!["connection".into(), kind_type.into()],
            outcome: outcome.into(),
            host: host_name().into(),
            version: ECS_VERSION.into(),
        }
    }
}

impl AuditRecord {
    /// One JSON line (without the newline).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// This host's name, read once.
fn host_name() -> &'static str {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default()
    })
}

/// Why the plan decided so, as `event.reason`, with the service and mode.
fn reason(plan: Option<&Plan>, bucket: u32, kind: u32) -> (Option<String>, String, Mode) {
    let Some(plan) = plan else {
        return (None, "policy no longer loaded".into(), Mode::Enforce);
    };
    if bucket == DEFAULT_BUCKET {
        return (
            None,
            format!("no service matches; default is {}", plan.default),
            plan.mode,
        );
    }
    match plan.services.get(bucket as usize) {
        None => (None, "unknown service".into(), Mode::Enforce),
        Some(s) => {
            let why = match (s.list, kind == COUNT_ALLOWED) {
                (ListKind::Allow, true) => "uid allowed",
                (ListKind::Allow, false) => "uid not allowed",
                (ListKind::Deny, true) => "uid not denied",
                (ListKind::Deny, false) => "uid denied",
            };
            (
                Some(s.name.clone()),
                format!("service {}: {why}", s.name),
                s.mode,
            )
        }
    }
}

/// One event of the eBPF layer as a SPEC §5 record.
pub fn record(
    ev: &Event,
    plan: Option<&Plan>,
    clock: &Clock,
    names: &mut EventNames,
) -> AuditRecord {
    let kind = u32::from(ev.action);
    let (service, reason, mode) = reason(plan, ev.bucket, kind);
    let ip = normalize_display(ev.addr);
    let comm_len = ev
        .comm
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(ev.comm.len());
    let layer = match ev.hook {
        HOOK_CONNECT4 | HOOK_CONNECT6 => EventLayer::Connect,
        HOOK_BIND4 | HOOK_BIND6 => EventLayer::Bind,
        _ => EventLayer::Sendmsg,
    };
    let reason = match (&service, layer) {
        // The bind hooks judge the service's bind list, not its allow- or
        // deny-list.
        (Some(name), EventLayer::Bind) if kind == COUNT_ALLOWED => {
            format!("service {name}: uid may bind")
        }
        (Some(name), EventLayer::Bind) => format!("service {name}: uid may not bind"),
        _ => reason,
    };
    let action = AuditAction::of_count(kind);
    let cgroup = names.cgroup(ev.cgroup_id, ev.pid);
    AuditRecord {
        timestamp: clock.timestamp(ev.ktime_ns),
        action,
        reason,
        service,
        mode: Some(mode),
        layer,
        uid: Some(ev.uid),
        user: names.get(ev.uid),
        gid: Some(ev.gid),
        pid: Some(ev.pid),
        process: Some(String::from_utf8_lossy(&ev.comm[..comm_len]).into_owned()),
        unit: cgroup.as_deref().and_then(crate::host::unit_of),
        cgroup,
        transport: Some(if u32::from(ev.proto) == PROTO_TCP {
            Transport::Tcp
        } else {
            Transport::Udp
        }),
        network_type: Some(if ip.is_ipv4() { "ipv4" } else { "ipv6" }.into()),
        ip: Some(ip),
        port: Some(ev.port),
        ecs: Some(Ecs::of(action)),
        backlog: clock.is_backlog(ev.ktime_ns),
        dropped: None,
    }
}

/// The destination as the process gave it; IPv4 (and IPv4-mapped) shown
/// as IPv4.
fn normalize_display(addr: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// One refusal of the nftables layer as a SPEC §5 record; `None` when the
/// log prefix is not this instance's.
pub fn packet_record(
    ev: &crate::nflog::PacketEvent,
    table: &str,
    plan: Option<&Plan>,
    names: &mut EventNames,
) -> Option<AuditRecord> {
    let prefix = LogPrefix::parse(&ev.prefix)?;
    if prefix.table != table {
        return None;
    }
    // Services share the chain that logs, so the packet's own destination
    // names the service. A logged packet was in scope (the base chain's
    // fib lookup said so).
    let transport = match ev.protocol {
        Some(6) => Some(Transport::Tcp),
        Some(17) => Some(Transport::Udp),
        _ => None,
    };
    let bucket = match prefix.bucket {
        PrefixBucket::Default => DEFAULT_BUCKET,
        PrefixBucket::Chain(_) => {
            // Only TCP and UDP reach a verdict chain.
            let (transport, ip, port) = (transport?, ev.destination?, ev.port?);
            plan.and_then(|p| p.service_for(transport, &Destination::in_scope(ip), port))
                .map_or(u32::MAX, |i| i as u32) // no such service: "unknown service"
        }
    };
    let kind = if prefix.would_deny {
        loopguard_common::COUNT_WOULD_DENY
    } else {
        COUNT_DENIED
    };
    let (service, reason, mode) = reason(plan, bucket, kind);
    let action = AuditAction::of_count(kind);
    Some(AuditRecord {
        timestamp: format!("{:.9}", jiff::Timestamp::now()),
        action,
        reason,
        service,
        mode: Some(mode),
        layer: EventLayer::Packet,
        uid: ev.uid,
        user: ev.uid.and_then(|u| names.get(u)),
        gid: ev.gid,
        // A packet no longer knows its process.
        pid: None,
        process: None,
        cgroup: None,
        unit: None,
        transport,
        network_type: Some(
            if ev.destination.is_some_and(|d| d.is_ipv6()) {
                "ipv6"
            } else {
                "ipv4"
            }
            .into(),
        ),
        ip: ev.destination,
        port: ev.port,
        ecs: Some(Ecs::of(action)),
        backlog: false,
        dropped: None,
    })
}

/// `event.action = "dropped"`: events lost since the last report.
pub fn dropped_record(count: u64, layer: EventLayer) -> AuditRecord {
    AuditRecord {
        timestamp: format!("{:.9}", jiff::Timestamp::now()),
        action: AuditAction::Dropped,
        reason: format!("{count} events lost: the event buffer was full"),
        service: None,
        mode: None,
        layer,
        uid: None,
        user: None,
        gid: None,
        pid: None,
        process: None,
        cgroup: None,
        unit: None,
        transport: None,
        network_type: None,
        ip: None,
        port: None,
        ecs: None,
        backlog: false,
        dropped: Some(count),
    }
}

/// An append-only JSON-lines file that never grows past `max_bytes`: at
/// the limit it is renamed to `<path>.1` (replacing the previous one) and a
/// new file is started.
pub struct AuditLog {
    path: PathBuf,
    file: fs::File,
    written: u64,
    max_bytes: u64,
}

impl AuditLog {
    pub fn open(path: &Path, max_bytes: u64) -> io::Result<AuditLog> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // 0750 whatever the caller's umask; a directory that is a
            // symlink (planted by someone) is refused.
            use std::os::unix::fs::DirBuilderExt as _;
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(dir)?;
            if !fs::symlink_metadata(dir)?.is_dir() {
                return Err(io::Error::other(format!(
                    "{} is not a directory (a symlink?); refusing to write the audit log there",
                    dir.display()
                )));
            }
            // loopguard's own log directory (systemd makes it root:root
            // 0750 at each start) lets the audit group in; another
            // directory given with --audit-log is left as it is.
            if dir == Path::new(LOG_DIR) {
                if let Some(g) = uzers::get_group_by_name(AUDIT_GROUP) {
                    let gid = nix::unistd::Gid::from_raw(g.gid());
                    let _ = nix::unistd::chown(dir, None, Some(gid));
                    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o750));
                }
            }
        }
        let file = Self::open_file(path)?;
        let written = file.metadata()?.len();
        Ok(AuditLog {
            path: path.to_path_buf(),
            file,
            written,
            max_bytes,
        })
    }

    fn open_file(path: &Path) -> io::Result<fs::File> {
        // Never through a symlink: it could point at any root-owned file.
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        // Readable by the audit group when there is one.
        if let Some(g) = uzers::get_group_by_name(AUDIT_GROUP) {
            let _ = nix::unistd::fchown(&file, None, Some(nix::unistd::Gid::from_raw(g.gid())));
            let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o640));
        }
        Ok(file)
    }

    /// Opens the path again: after logrotate has moved the file away, new
    /// lines go to a new file at the path (SIGHUP does this).
    pub fn reopen(&mut self) -> io::Result<()> {
        self.file = Self::open_file(&self.path)?;
        self.written = self.file.metadata()?.len();
        Ok(())
    }

    /// Appends lines with one write (rotating first when needed).
    pub fn write_lines<S: AsRef<str>>(&mut self, lines: &[S]) -> io::Result<()> {
        let mut text = String::with_capacity(lines.iter().map(|l| l.as_ref().len() + 1).sum());
        for l in lines {
            let l = l.as_ref();
            if self.written + (text.len() + l.len() + 1) as u64 > self.max_bytes
                && self.written + text.len() as u64 > 0
            {
                self.file.write_all(text.as_bytes())?;
                text.clear();
                let rotated = self.path.with_extension("jsonl.1");
                fs::rename(&self.path, &rotated)?;
                self.file = Self::open_file(&self.path)?;
                self.written = 0;
            }
            text.push_str(l);
            text.push('\n');
        }
        self.file.write_all(text.as_bytes())?;
        self.written += text.len() as u64;
        Ok(())
    }
}
