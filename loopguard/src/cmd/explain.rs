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
    #[arg(long, value_name = "ADDR:PORT")]
    to: SocketAddr,
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
    let transport = match args.protocol {
        ProtocolArg::Tcp => Transport::Tcp,
        ProtocolArg::Udp => Transport::Udp,
    };
    let local = LocalTable::read().context("failed to read the kernel's local routing table")?;
    let (ip, port) = (args.to.ip(), args.to.port());
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
        destination: args.to.to_string(),
        protocol: transport.as_str(),
        in_scope: eval.destination.is_some() || (args.bind && eval.service.is_some()),
        service: service.map(|s| s.name.clone()),
        location: service.map(|s| s.location.clone()),
        reason: eval.reason.clone(),
        policy_hash: plan.hash.clone(),
    };
    let mut out = std::io::stdout().lock();
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
