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
use serde_json::{json, Map, Value};

use crate::{
    compile::Plan,
    policy::{Destination, ListKind, Mode, Transport, Verdict},
};

/// Where `run` writes events and `audit` reads them, unless told otherwise.
pub fn default_log_path(instance: &str) -> PathBuf {
    Path::new("/var/log/loopguard").join(format!("{instance}.jsonl"))
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

/// uid -> user name, bounded.
#[derive(Default)]
pub struct UserNames {
    cache: HashMap<u32, Option<String>>,
}

impl UserNames {
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

/// The categorisation fields every event carries, so it indexes into
/// Elastic as it is (SPEC §5): a refusal is a `denied` connection that
/// failed; an allowed or would-be-refused one an `allowed` connection that
/// went through.
fn ecs(m: &mut Map<String, Value>, kind: u32) {
    let (kind_type, outcome) = match kind {
        COUNT_DENIED => ("denied", "failure"),
        _ => ("allowed", "success"),
    };
    m.insert("event.kind".into(), json!("event"));
    m.insert("event.category".into(), json!(["network"]));
    m.insert("event.type".into(), json!(["connection", kind_type]));
    m.insert("event.outcome".into(), json!(outcome));
    m.insert("host.name".into(), json!(host_name()));
    m.insert("ecs.version".into(), json!(ECS_VERSION));
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

fn action_name(kind: u32) -> &'static str {
    match kind {
        COUNT_ALLOWED => "allow",
        COUNT_DENIED => "deny",
        _ => "would-deny",
    }
}

/// Why the plan decided so, as `event.reason`.
fn reason(plan: Option<&Plan>, bucket: u32, kind: u32) -> (Option<String>, String, &'static str) {
    let Some(plan) = plan else {
        return (None, "policy no longer loaded".into(), "enforce");
    };
    let mode_name = |m: Mode| match m {
        Mode::Enforce => "enforce",
        Mode::Audit => "audit",
    };
    if bucket == DEFAULT_BUCKET {
        let default = match plan.default {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
        };
        return (
            None,
            format!("no service matches; default is {default}"),
            mode_name(plan.mode),
        );
    }
    match plan.services.get(bucket as usize) {
        None => (None, "unknown service".into(), "enforce"),
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
                mode_name(s.mode),
            )
        }
    }
}

/// One event of the eBPF layer as a SPEC §5 record (fields in SPEC order).
pub fn record(ev: &Event, plan: Option<&Plan>, clock: &Clock, names: &mut UserNames) -> Value {
    let (service, reason, mode) = reason(plan, ev.bucket, u32::from(ev.action));
    let ip = normalize_display(ev.addr);
    let comm_len = ev
        .comm
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(ev.comm.len());
    let mut m = Map::new();
    m.insert("@timestamp".into(), json!(clock.timestamp(ev.ktime_ns)));
    m.insert(
        "event.action".into(),
        json!(action_name(u32::from(ev.action))),
    );
    let layer = match ev.hook {
        HOOK_CONNECT4 | HOOK_CONNECT6 => "connect",
        HOOK_BIND4 | HOOK_BIND6 => "bind",
        _ => "sendmsg",
    };
    let reason = if layer == "bind" {
        // The bind hooks judge the service's bind list, not its allow- or
        // deny-list.
        match &service {
            Some(name) if u32::from(ev.action) == COUNT_ALLOWED => {
                format!("service {name}: uid may bind")
            }
            Some(name) => format!("service {name}: uid may not bind"),
            None => reason,
        }
    } else {
        reason
    };
    m.insert("event.reason".into(), json!(reason));
    m.insert("loopguard.service".into(), json!(service));
    m.insert("loopguard.mode".into(), json!(mode));
    m.insert("loopguard.layer".into(), json!(layer));
    m.insert("user.id".into(), json!(ev.uid));
    m.insert("user.name".into(), json!(names.get(ev.uid)));
    m.insert("group.id".into(), json!(ev.gid));
    m.insert("process.pid".into(), json!(ev.pid));
    m.insert(
        "process.name".into(),
        json!(String::from_utf8_lossy(&ev.comm[..comm_len])),
    );
    m.insert(
        "network.transport".into(),
        json!(if u32::from(ev.proto) == PROTO_TCP {
            "tcp"
        } else {
            "udp"
        }),
    );
    m.insert(
        "network.type".into(),
        json!(if ip.is_ipv4() { "ipv4" } else { "ipv6" }),
    );
    m.insert("destination.ip".into(), json!(ip.to_string()));
    m.insert("destination.port".into(), json!(ev.port));
    ecs(&mut m, u32::from(ev.action));
    if clock.is_backlog(ev.ktime_ns) {
        // Recorded while no daemon was reading; its time is when it
        // happened, not when it was read.
        m.insert("loopguard.backlog".into(), json!(true));
    }
    Value::Object(m)
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
    names: &mut UserNames,
) -> Option<Value> {
    let rest = ev.prefix.strip_prefix(crate::nft::LOG_PREFIX)?;
    let (t, rest) = rest.split_once('/')?;
    if t != table {
        return None;
    }
    let (bucket, action) = rest.split_once('/')?;
    // Services share the chain that logs (`v<k>`), so the packet's own
    // destination names the service. A logged packet was in scope (the
    // base chain's fib lookup said so).
    let bucket = if bucket == "default" {
        DEFAULT_BUCKET
    } else {
        let transport = match ev.protocol {
            Some(6) => Transport::Tcp,
            Some(17) => Transport::Udp,
            _ => return None,
        };
        let (ip, port) = (ev.destination?, ev.port?);
        plan.and_then(|p| p.service_for(transport, &Destination::in_scope(ip), port))
            .map_or(u32::MAX, |i| i as u32) // no such service: "unknown service"
    };
    let kind = if action == "w" {
        loopguard_common::COUNT_WOULD_DENY
    } else {
        COUNT_DENIED
    };
    let (service, reason, mode) = reason(plan, bucket, kind);
    let mut m = Map::new();
    m.insert(
        "@timestamp".into(),
        json!(format!("{:.9}", jiff::Timestamp::now())),
    );
    m.insert("event.action".into(), json!(action_name(kind)));
    m.insert("event.reason".into(), json!(reason));
    m.insert("loopguard.service".into(), json!(service));
    m.insert("loopguard.mode".into(), json!(mode));
    m.insert("loopguard.layer".into(), json!("packet"));
    m.insert("user.id".into(), json!(ev.uid));
    m.insert("user.name".into(), json!(ev.uid.and_then(|u| names.get(u))));
    m.insert("group.id".into(), json!(ev.gid));
    // A packet no longer knows its process.
    m.insert("process.pid".into(), Value::Null);
    m.insert("process.name".into(), Value::Null);
    m.insert(
        "network.transport".into(),
        json!(match ev.protocol {
            Some(6) => "tcp",
            Some(17) => "udp",
            _ => "unknown",
        }),
    );
    m.insert(
        "network.type".into(),
        json!(if ev.destination.is_some_and(|d| d.is_ipv6()) {
            "ipv6"
        } else {
            "ipv4"
        }),
    );
    m.insert(
        "destination.ip".into(),
        json!(ev.destination.map(|d| d.to_string())),
    );
    m.insert("destination.port".into(), json!(ev.port));
    ecs(&mut m, kind);
    Some(Value::Object(m))
}

/// `event.action = "dropped"`: events lost since the last report.
pub fn dropped_record(count: u64, layer: &str) -> Value {
    let mut m = Map::new();
    m.insert(
        "@timestamp".into(),
        json!(format!("{:.9}", jiff::Timestamp::now())),
    );
    m.insert("event.action".into(), json!("dropped"));
    m.insert(
        "event.reason".into(),
        json!(format!("{count} events lost: the event buffer was full")),
    );
    m.insert("loopguard.layer".into(), json!(layer));
    m.insert("loopguard.dropped".into(), json!(count));
    Value::Object(m)
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
    pub fn write_lines(&mut self, lines: &[String]) -> io::Result<()> {
        let mut text = String::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
        for l in lines {
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
