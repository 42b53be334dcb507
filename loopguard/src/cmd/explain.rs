//! `loopguard explain`: the verdict for one uid and destination, and the
//! service or default that decides it, computed from the compiled plan the
//! way the kernel computes it.

use std::{io::Write as _, net::SocketAddr, path::PathBuf};

use anyhow::{anyhow, Context as _};
use loopguard::{
    compile::{self, Plan},
    host,
    paths::InstancePaths,
    policy::{CgroupPath, Directory, SystemDirectory, Transport},
    scope::LocalTable,
    state::State,
};
use serde::Serialize;

use super::check_source;
use super::read_policy;
use crate::{exit, Format};

#[derive(clap::Args)]
#[command(
    group(clap::ArgGroup::new("who").required(true).args(["user", "uid", "pid"])),
    after_help = "Examples:\n  loopguard explain --user app --to 127.0.0.1:5432\n  loopguard explain --pid 4242 --to 127.0.0.1:5432\n  loopguard explain --uid 990 --cgroup system.slice/grafana.service --to 127.0.0.1:5432\n  loopguard explain --uid 990 --unit grafana.service --to 127.0.0.1:5432\n  loopguard explain --uid 1005 --to '[::1]:6379' --policy policy.toml\n  loopguard explain --user mallory --bind --to 0.0.0.0:5432"
)]
pub(crate) struct Args {
    /// User name.
    #[arg(long)]
    user: Option<String>,
    /// Numeric uid.
    #[arg(long)]
    uid: Option<u32>,
    /// A running process: its uid and its cgroup, as the kernel sees them.
    #[arg(long)]
    pid: Option<u32>,
    /// The cgroup the process runs in, relative to the cgroup2 root (e.g.
    /// system.slice/grafana.service), for lists that name cgroups.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["pid", "unit"])]
    cgroup: Option<String>,
    /// The systemd unit the process runs in (e.g. grafana.service): its
    /// cgroup, asked of systemd.
    #[arg(long, value_name = "NAME", conflicts_with = "pid")]
    unit: Option<String>,
    /// Destination, e.g. 127.0.0.1:5432 or [::1]:6379 (with --bind: the
    /// address to bind, e.g. 0.0.0.0:5432).
    #[arg(long, value_name = "ADDR:PORT", required_unless_present = "last")]
    to: Option<SocketAddr>,
    /// The most recent refusal of this uid in the audit log the daemon
    /// writes ("was that loopguard?"), then its verdict now.
    #[arg(long, conflicts_with_all = ["to", "bind", "protocol"])]
    last: bool,
    /// Explain a bind() (who may listen) instead of a connect().
    #[arg(long)]
    bind: bool,
    #[arg(long, value_enum, default_value = "tcp")]
    protocol: ProtocolArg,
    /// Explain this policy file instead of the applied one (no root needed).
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t)]
    format: Format,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ProtocolArg {
    Tcp,
    Udp,
}

#[derive(Serialize)]
struct Explanation {
    action: &'static str,
    /// `connect` or `bind`.
    attempt: &'static str,
    uid: u32,
    user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cgroup: Option<String>,
    destination: String,
    protocol: &'static str,
    in_scope: bool,
    service: Option<String>,
    location: Option<String>,
    reason: String,
    policy_hash: String,
}

pub(crate) fn run(args: Args, paths: &InstancePaths) -> anyhow::Result<u8> {
    let dir = SystemDirectory;
    let (uid, cgroup) = match (&args.user, args.uid, args.pid) {
        (_, _, Some(pid)) => process_identity(pid)?,
        (_, Some(uid), None) => (uid, None),
        (Some(name), None, None) => (
            dir.uid_of(name)
                .ok_or_else(|| anyhow!("unknown user {name:?}"))?,
            None,
        ),
        (None, None, None) => unreachable!("clap requires --user, --uid or --pid"),
    };
    let cgroup = match (cgroup, &args.cgroup, &args.unit) {
        (Some(c), _, _) => Some(c),
        (None, Some(text), _) => {
            Some(CgroupPath::new(text).map_err(|why| anyhow!("--cgroup {text:?}: {why}"))?)
        }
        (None, None, Some(unit)) => Some(
            dir.unit_cgroup(unit)
                .map_err(|why| anyhow!("--unit {unit}: its cgroup cannot be found: {why}"))?,
        ),
        (None, None, None) => None,
    };
    let plan: Plan = match &args.policy {
        Some(file) => {
            let checked = check_source(file, read_policy(file)?, Some(&dir));
            if checked.errors() > 0 {
                eprint!("{}", checked.report().render_human());
                return Ok(exit::PROBLEMS);
            }
            let (Some(p), Some(r)) = (&checked.policy, &checked.resolved) else {
                anyhow::bail!("internal error: checked policy without resolution");
            };
            compile::compile(p, r)?
        }
        None => {
            host::require_root("explain without --policy")?;
            let state = State::load(paths)?.ok_or_else(|| {
                anyhow!(
                    "instance {} has no applied policy; pass --policy FILE",
                    paths.instance
                )
            })?;
            loopguard::health::same_namespace(paths, &state).map_err(anyhow::Error::msg)?;
            state.plan
        }
    };
    let mut transport = match args.protocol {
        ProtocolArg::Tcp => Transport::Tcp,
        ProtocolArg::Udp => Transport::Udp,
    };
    let mut out = std::io::stdout().lock();
    let to = match (args.to, args.last) {
        (Some(to), _) => to,
        (None, _) => {
            let Some(refusal) = last_refusal(paths, uid)? else {
                writeln!(
                    out,
                    "no refusal of uid {uid} in {}: loopguard refused nothing it recorded (was `loopguard run` running?)",
                    loopguard::audit::log_path(paths).display()
                )?;
                return Ok(exit::OK);
            };
            writeln!(out, "{}", refusal_words(&refusal))?;
            transport = refusal.transport.unwrap_or(Transport::Tcp);
            let ip = refusal
                .ip
                .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
            write!(out, "now: ")?;
            SocketAddr::new(ip, refusal.port.unwrap_or(0))
        }
    };
    let local = LocalTable::read().context("failed to read the kernel's local routing table")?;
    let (ip, port) = (to.ip(), to.port());
    let eval = if args.bind {
        plan.evaluate_bind(uid, transport, ip, port, &local)
    } else {
        let client = compile::Client {
            uid,
            cgroup: cgroup.as_ref(),
        };
        plan.evaluate_client(&client, transport, ip, port, &local)
    };
    let service = eval.service.map(|i| &plan.services[i]);
    let explanation = Explanation {
        action: eval.action.as_str(),
        attempt: if args.bind { "bind" } else { "connect" },
        uid,
        user: dir.user_name(uid),
        cgroup: cgroup.as_ref().map(ToString::to_string),
        destination: to.to_string(),
        protocol: transport.as_str(),
        in_scope: eval.destination.is_some() || (args.bind && eval.service.is_some()),
        service: service.map(|s| s.name.clone()),
        location: service.map(|s| s.location.clone()),
        reason: eval.reason.clone(),
        policy_hash: plan.hash.clone(),
    };
    match args.format {
        Format::Json => {
            serde_json::to_writer_pretty(&mut out, &explanation)?;
            writeln!(out)?;
        }
        Format::Human => {
            let mut who = match &explanation.user {
                Some(n) => format!("uid {uid} ({n})"),
                None => format!("uid {uid}"),
            };
            if let Some(c) = &explanation.cgroup {
                who.push_str(&format!(" in cgroup {c}"));
            }
            let arrow = if args.bind { "binds" } else { "->" };
            writeln!(
                out,
                "{}: {who} {arrow} {}/{}",
                explanation.action, explanation.destination, explanation.protocol
            )?;
            match service {
                Some(s) => {
                    let why = explanation
                        .reason
                        .split_once(": ")
                        .map_or(explanation.reason.as_str(), |(_, w)| w);
                    writeln!(
                        out,
                        "  decided by service {} ({}): {why}",
                        s.name, s.location
                    )?;
                }
                None => writeln!(out, "  {}", explanation.reason)?,
            }
            let effect = match (eval.action, args.bind) {
                (compile::Action::Allow, false) => "the connection proceeds",
                (compile::Action::Allow, true) => "bind() proceeds",
                (compile::Action::Deny, false) => "connect()/sendto() fails with EPERM",
                (compile::Action::Deny, true) => "bind() fails with EPERM",
                (compile::Action::WouldDeny, false) => {
                    "audit mode: the connection proceeds and is recorded as would-deny"
                }
                (compile::Action::WouldDeny, true) => {
                    "audit mode: bind() proceeds and is recorded as would-deny"
                }
            };
            writeln!(out, "  {effect}")?;
        }
    }
    Ok(exit::OK)
}

/// The last refusal (deny or would-deny, of a connection or datagram) of
/// `uid` in the instance's audit log (and its rotated PATH.1).
fn last_refusal(
    paths: &InstancePaths,
    uid: u32,
) -> anyhow::Result<Option<loopguard::audit::AuditRecord>> {
    use loopguard::audit::{AuditAction, AuditRecord, EventLayer};
    use std::io::BufRead as _;
    let log = loopguard::audit::log_path(paths);
    let rotated = PathBuf::from(format!("{}.1", log.display()));
    // The current log first: the rotated one holds older records.
    for path in [log, rotated] {
        let Ok(file) = std::fs::File::open(&path) else {
            continue;
        };
        let mut last = None;
        for line in std::io::BufReader::new(file).lines() {
            let line = line.with_context(|| format!("failed to read {}", path.display()))?;
            // Cheap filter before parsing: the uid must be on the line.
            if !line.contains(&format!("\"user.id\":{uid}")) {
                continue;
            }
            if let Ok(r) = serde_json::from_str::<AuditRecord>(&line) {
                if r.uid == Some(uid)
                    && matches!(r.action, AuditAction::Deny | AuditAction::WouldDeny)
                    && r.layer != EventLayer::Bind
                {
                    last = Some(r);
                }
            }
        }
        if last.is_some() {
            return Ok(last);
        }
    }
    Ok(None)
}

/// `last refusal: 2026-12-07T10:00:00Z, deny by loopguard (connect) of
/// uid 1005 (guest), process psql (pid 42) -> 127.0.0.1:5432/tcp: ...`
fn refusal_words(r: &loopguard::audit::AuditRecord) -> String {
    let who = match (&r.user, r.uid) {
        (Some(n), Some(u)) => format!("uid {u} ({n})"),
        (None, Some(u)) => format!("uid {u}"),
        _ => "?".into(),
    };
    let process = match (&r.process, r.pid) {
        (Some(p), Some(pid)) => format!(", process {p} (pid {pid})"),
        (None, Some(pid)) => format!(", pid {pid}"),
        _ => String::new(),
    };
    let to = match (r.ip, r.port) {
        (Some(ip), Some(port)) => SocketAddr::new(ip, port).to_string(),
        (None, Some(port)) => format!("port {port}"),
        _ => "?".into(),
    };
    format!(
        "last refusal: {}, {} by loopguard ({} layer) of {who}{process} -> {to}/{}: {}{}",
        r.timestamp,
        r.action.as_str(),
        r.layer.as_str(),
        r.transport.map_or("?", |t| t.as_str()),
        r.reason,
        r.service
            .as_ref()
            .map(|s| format!(" (service {s})"))
            .unwrap_or_default()
    )
}

/// A running process's uid (the real one, which the kernel's checks read)
/// and cgroup v2 path, from `/proc`.
fn process_identity(pid: u32) -> anyhow::Result<(u32, Option<CgroupPath>)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("no process {pid} (reading /proc/{pid}/status)"))?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .ok_or_else(|| anyhow!("/proc/{pid}/status has no Uid line"))?;
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .with_context(|| format!("reading /proc/{pid}/cgroup"))?;
    // The root cgroup ("0::/") is on no list: no path to give.
    let cgroup = cgroups
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .and_then(|p| CgroupPath::new(p).ok());
    Ok((uid, cgroup))
}
