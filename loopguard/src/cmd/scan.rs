//! `loopguard scan`: what listens on this host, who owns it, which service
//! of the policy guards it, and which is reachable from the network too;
//! `--format toml` writes a starter policy.

use std::{collections::BTreeMap, io::Write as _, path::PathBuf};

use anyhow::{anyhow, Context as _};
use loopguard::{
    compile::{self, Plan},
    paths::InstancePaths,
    policy::{Destination, SystemDirectory, Transport},
    scan::{self, Listener},
    state::State,
};
use serde::Serialize;

use super::{check_source, read_policy};
use crate::exit;

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  loopguard scan\n  loopguard scan --policy /etc/loopguard/policy.toml --format json\n  loopguard scan --format toml > policy.toml   # a starter policy, audit mode"
)]
pub(crate) struct Args {
    #[arg(long, value_enum, default_value_t)]
    format: ScanFormat,
    /// Judge against this policy file instead of the one in force.
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, Default, clap::ValueEnum)]
enum ScanFormat {
    #[default]
    Human,
    Json,
    /// A starter policy: one service per listening port, its owner
    /// allowed, in audit mode.
    Toml,
}

#[derive(Serialize)]
struct Row<'a> {
    #[serde(flatten)]
    listener: &'a Listener,
    /// The policy's service that decides connections to it; null when
    /// none does (unguarded: the default decides).
    service: Option<String>,
    /// Bound on a bind-guarded port by a uid that may not bind it.
    squatter: bool,
}

/// The plan to judge against: `--policy`, else the one in force, else
/// none (everything is unguarded).
fn plan(args: &Args, paths: &InstancePaths) -> anyhow::Result<Option<Plan>> {
    if let Some(file) = &args.policy {
        let checked = check_source(file, read_policy(file)?, Some(&SystemDirectory));
        let (Some(p), Some(r), 0) = (&checked.policy, &checked.resolved, checked.errors()) else {
            eprint!("{}", checked.report().render_human());
            return Err(anyhow!("{} has errors", checked.file));
        };
        return Ok(Some(compile::compile(p, r)?));
    }
    Ok(State::load(paths).ok().flatten().map(|s| s.plan))
}

pub(crate) fn run(args: Args, paths: &InstancePaths) -> anyhow::Result<u8> {
    let listeners = scan::listeners().context("failed to list sockets (sock_diag)")?;
    let plan = plan(&args, paths)?;
    // The service deciding for the listener's address (its loopback
    // address for the wildcard). A wildcard listener is reachable at every
    // address: a service limited to some addresses guards only those.
    let guard = |l: &Listener| -> Option<String> {
        let plan = plan.as_ref()?;
        let dest = Destination::in_scope(scan::loopback_target(l));
        let i = plan.service_for(l.protocol, &dest, l.port)?;
        let s = &plan.services[i];
        let partial = l.address.is_unspecified()
            && !matches!(s.addresses, loopguard::policy::AddrSet::Loopback);
        Some(if partial {
            format!("{} (at {} only)", s.name, s.addresses)
        } else {
            s.name.clone()
        })
    };
    // A socket on a bind-guarded port whose owner may not bind it is no
    // guarded listener: a squatter.
    let squatters = match (&plan, loopguard::scope::LocalTable::read()) {
        (Some(plan), Ok(local)) => scan::squatters(plan, &listeners, &local),
        _ => Vec::new(),
    };
    let squatter = |l: &Listener| squatters.iter().find(|s| s.listener == *l);
    let mut out = std::io::stdout().lock();
    match args.format {
        ScanFormat::Json => {
            let rows: Vec<Row<'_>> = listeners
                .iter()
                .map(|l| Row {
                    listener: l,
                    service: guard(l),
                    squatter: squatter(l).is_some(),
                })
                .collect();
            let text = serde_json::to_string_pretty(&serde_json::json!({ "listeners": rows }))?;
            writeln!(out, "{text}")?;
        }
        ScanFormat::Human => {
            writeln!(
                out,
                "{:<5} {:<28} {:>5}  {:<12} {:>7}  {:<16} {:<32} GUARD",
                "PROTO", "ADDRESS", "PORT", "OWNER", "PID", "PROCESS", "UNIT/CGROUP"
            )?;
            for l in &listeners {
                let owner = l.user.clone().unwrap_or_else(|| l.uid.to_string());
                let place = l
                    .unit
                    .clone()
                    .or(l.cgroup.clone())
                    .unwrap_or_else(|| "-".into());
                writeln!(
                    out,
                    "{:<5} {:<28} {:>5}  {:<12} {:>7}  {:<16} {:<32} {}",
                    l.protocol.as_str(),
                    l.address.to_string(),
                    l.port,
                    owner,
                    l.pid.map_or("-".into(), |p| p.to_string()),
                    l.process.as_deref().unwrap_or("-"),
                    place,
                    match squatter(l) {
                        Some(s) =>
                            format!("SQUATTER (service {}: owner not in bind_users)", s.service),
                        None =>
                            guard(l).map_or("UNGUARDED".to_string(), |s| format!("service {s}")),
                    }
                )?;
            }
            for l in listeners.iter().filter(|l| l.exposed) {
                writeln!(
                    out,
                    "NETWORK: {} on {}:{}/{} is also reachable from the network ({}); binding is not authentication",
                    l.process.as_deref().unwrap_or("a process"),
                    display_addr(l),
                    l.port,
                    l.protocol.as_str(),
                    if l.address.is_unspecified() {
                        "bound to the wildcard"
                    } else {
                        "bound to a non-loopback address"
                    }
                )?;
            }
        }
        ScanFormat::Toml => out.write_all(starter_policy(&listeners).as_bytes())?,
    }
    Ok(exit::OK)
}

fn display_addr(l: &Listener) -> String {
    match l.address {
        std::net::IpAddr::V6(v6) => format!("[{v6}]"),
        v4 => v4.to_string(),
    }
}

/// One service per (protocol, port), its owners (and root) allowed, in
/// audit mode: nothing is refused until the operator has read the audit
/// stream and set `mode = "enforce"`.
fn starter_policy(listeners: &[Listener]) -> String {
    // An unconnected UDP socket on the wildcard at an ephemeral port is
    // most likely a client's (autobound by its first sendto): guarding it
    // would guard a port the kernel hands out again.
    let ephemeral = loopguard::policy::EphemeralPorts::of_host().range;
    let (clients, listeners): (Vec<&Listener>, Vec<&Listener>) = listeners.iter().partition(|l| {
        l.protocol == Transport::Udp
            && l.address.is_unspecified()
            && ephemeral.contains_port(l.port)
    });
    let mut by_port: BTreeMap<(u16, Transport), Vec<&Listener>> = BTreeMap::new();
    for l in listeners {
        by_port.entry((l.port, l.protocol)).or_default().push(l);
    }
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    let mut out = format!(
        "# A starter policy from `loopguard scan` on {host}: one service per\n\
         # listening port, its owner (and root) allowed. Audit mode refuses\n\
         # nothing: apply it, watch `loopguard audit --action would-deny`, add\n\
         # who needs access, then set mode = \"enforce\".\n\
         version = 1\n\
         mode = \"audit\"\n"
    );
    for l in &clients {
        out.push_str(&format!(
            "# skipped: {} on {}:{}/udp, an ephemeral port (a client's socket, most likely)\n",
            printable(l.process.as_deref().unwrap_or("?")),
            display_addr(l),
            l.port
        ));
    }
    let mut taken = std::collections::HashSet::new();
    for ((port, protocol), ls) in &by_port {
        let mut owners: Vec<String> = vec!["root".into()];
        for l in ls {
            // A name the policy reader would refuse is written as its uid.
            let o = l
                .user
                .clone()
                .filter(|n| loopguard::policy::valid_account_name(n))
                .unwrap_or_else(|| l.uid.to_string());
            if !owners.contains(&o) {
                owners.push(o);
            }
        }
        let process = ls.iter().find_map(|l| l.process.clone());
        let base = service_name(process.as_deref().unwrap_or("service"), *port, *protocol);
        let mut name = base.clone();
        let mut n = 2;
        while !taken.insert(name.clone()) {
            name = format!("{}-{n}", &base[..base.len().min(28)]);
            n += 1;
        }
        out.push('\n');
        for l in ls {
            out.push_str(&format!(
                "# {} (pid {}{}) on {}:{}/{}{}\n",
                printable(l.process.as_deref().unwrap_or("?")),
                l.pid.map_or("?".into(), |p| p.to_string()),
                l.unit
                    .as_ref()
                    .map(|u| format!(", {u}"))
                    .unwrap_or_default(),
                display_addr(l),
                l.port,
                l.protocol.as_str(),
                if l.exposed {
                    ", ALSO REACHABLE FROM THE NETWORK"
                } else {
                    ""
                }
            ));
        }
        let users: Vec<String> = owners
            .iter()
            .map(|o| match o.parse::<u32>() {
                Ok(uid) => uid.to_string(),
                Err(_) => format!("{o:?}"),
            })
            .collect();
        // Root and the listener's owner, minus root: who may listen here.
        let binders: Vec<&String> = users.iter().skip(1).collect();
        let bind_users = binders
            .iter()
            .map(|u| u.as_str())
            .chain(std::iter::once("\"root\""))
            .collect::<Vec<_>>()
            .join(", ");
        out.push_str(&format!(
            "[[service]]\nname = \"{name}\"\nport = {port}\nprotocol = \"{}\"\nallow_users = [{}]\n\
             # The bind guard: only these may listen on the port, so another user's\n\
             # program cannot take it while the server restarts (a squatter).\n\
             # bind_users = [{bind_users}]\n",
            protocol.as_str(),
            users.join(", ")
        ));
    }
    out
}

/// Text from the kernel (a process's `comm`, which its owner sets) made
/// safe for a comment line: control characters become `?`.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// `redis-server-6379` (or `-udp` for UDP): a valid, readable name.
fn service_name(process: &str, port: u16, protocol: Transport) -> String {
    let mut s: String = process
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    s = s.trim_start_matches(['-', '_']).to_string();
    let suffix = match protocol {
        Transport::Tcp => format!("-{port}"),
        Transport::Udp => format!("-{port}-udp"),
    };
    s.truncate(32 - suffix.len());
    if s.is_empty() {
        s = "service".into();
    }
    s + &suffix
}
