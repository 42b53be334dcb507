//! `loopguard explain`: the verdict for one uid and destination, and the
//! service or default that decides it, computed from the compiled plan the
//! way the kernel computes it.

use std::{io::Write as _, net::SocketAddr, path::PathBuf};

use anyhow::{anyhow, Context as _};
use loopguard::{
    compile::{self, Plan},
    host,
    paths::InstancePaths,
    policy::{Directory, SystemDirectory, Transport},
    scope::LocalTable,
    state::State,
};
use serde::Serialize;

use super::check_source;
use super::read_policy;
use crate::{exit, Format};

#[derive(clap::Args)]
#[command(
    group(clap::ArgGroup::new("who").required(true).args(["user", "uid"])),
    after_help = "Examples:\n  loopguard explain --user app --to 127.0.0.1:5432\n  loopguard explain --uid 1005 --to '[::1]:6379' --policy policy.toml\n  loopguard explain --user mallory --bind --to 0.0.0.0:5432"
)]
pub(crate) struct Args {
    /// User name.
    #[arg(long)]
    user: Option<String>,
    /// Numeric uid.
    #[arg(long)]
    uid: Option<u32>,
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
    let uid = match (&args.user, args.uid) {
        (_, Some(uid)) => uid,
        (Some(name), None) => dir
            .uid_of(name)
            .ok_or_else(|| anyhow!("unknown user {name:?}"))?,
        (None, None) => unreachable!("clap requires --user or --uid"),
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
        plan.evaluate(uid, transport, ip, port, &local)
    };
    let service = eval.service.map(|i| &plan.services[i]);
    let explanation = Explanation {
        action: eval.action.as_str(),
        attempt: if args.bind { "bind" } else { "connect" },
        uid,
        user: dir.user_name(uid),
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
            let who = match &explanation.user {
                Some(n) => format!("uid {uid} ({n})"),
                None => format!("uid {uid}"),
            };
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
