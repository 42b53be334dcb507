//! `loopguard status`: what the kernel enforces for this instance.

use std::io::Write as _;

use loopguard::{
    compile::Action,
    engine::{Engine, LayerKind},
    host,
    paths::InstancePaths,
    state::State,
};
use serde::Serialize;

use crate::{exit, Format};

#[derive(clap::Args)]
pub(crate) struct Args {
    #[arg(long, value_enum, default_value_t)]
    format: Format,
}

/// Counts in the one vocabulary of events and metrics: `allow`, `deny`,
/// `would-deny`.
#[derive(Serialize, Default, Clone, Copy)]
struct Actions {
    /// Absent where the layer does not count allowed traffic.
    #[serde(skip_serializing_if = "Option::is_none")]
    allow: Option<u64>,
    deny: u64,
    #[serde(rename = "would-deny")]
    would_deny: u64,
}

/// Attempts judged by the eBPF layer, and packets by the nftables layer (a
/// refused TCP attempt is one SYN). The nftables layer counts allowed
/// packets for the default only: counting them per service would put a
/// counter on every new connection's path.
#[derive(Serialize, Default, Clone, Copy)]
struct Counts {
    attempts: Actions,
    packets: Actions,
}

#[derive(Serialize)]
struct ServiceStatus {
    name: String,
    location: String,
    protocol: String,
    ports: String,
    addresses: String,
    list: String,
    mode: String,
    uids: usize,
    /// How many uids may bind the service's ports; absent when binding is
    /// not restricted.
    #[serde(skip_serializing_if = "Option::is_none")]
    bind_uids: Option<usize>,
    #[serde(flatten)]
    counts: Counts,
}

#[derive(Serialize)]
struct Status {
    instance: String,
    installed: bool,
    /// The layers whose kernel objects are there (`bpf`: link pins,
    /// `nft`: the table): a claim, see `enforcing`.
    layers: Vec<LayerKind>,
    /// The layers the kernel is attested to enforce the applied plan on,
    /// whole: listed in the state, carrying its plan, and without drift.
    enforcing: Vec<LayerKind>,
    policy_hash: Option<String>,
    policy_path: Option<String>,
    applied_at: Option<String>,
    /// When the policy's users and groups were last resolved to uids:
    /// every apply, and every refresh `run` makes when the user database
    /// changes.
    names_resolved_at: Option<String>,
    cgroup: Option<String>,
    default: Option<String>,
    mode: Option<String>,
    default_counts: Counts,
    services: Vec<ServiceStatus>,
    /// The plan id the state records (each layer carries it too).
    plan_id: Option<String>,
    /// Whether the policy file still holds what was applied (false after
    /// an edit that was not applied, e.g. a broken one `run` refused).
    policy_file_matches: Option<bool>,
    /// How the kernel differs from the state; empty when it enforces
    /// exactly the applied policy (exit code 5 otherwise).
    drift: Vec<String>,
    /// Sockets on bind-guarded ports held by uids that may not bind them.
    squatters: Vec<loopguard::scan::Squatter>,
}

impl Actions {
    fn add(&mut self, action: Action, value: u64) {
        match action {
            Action::Allow => self.allow = Some(self.allow.unwrap_or(0) + value),
            Action::Deny => self.deny += value,
            Action::WouldDeny => self.would_deny += value,
        }
    }
}

pub(crate) fn run(args: Args, paths: &InstancePaths) -> anyhow::Result<u8> {
    host::require_root("status")?;
    // An apply (or a daemon's reload or repair) under way is no drift:
    // wait for it, a little, under the instance lock.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let _lock = loop {
        match loopguard::engine::try_lock(paths)? {
            Some(l) => break Some(l),
            None if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            None => {
                log::warn!(
                    "an apply has held instance {} for 10 s; reporting as it is",
                    paths.instance
                );
                break None;
            }
        }
    };
    let state = State::load(paths)?;
    if let Some(s) = &state {
        loopguard::engine::health::same_namespace(paths, s).map_err(anyhow::Error::msg)?;
    }
    let engine = Engine::system(paths.clone());
    let layers = engine.layers();
    // The layers whose kernel objects are there.
    let present = engine.installed();
    let installed = !present.is_empty();

    let drift = state.as_ref().map(|s| engine.drift(s)).unwrap_or_default();
    // Nothing in force: no layer the state lists is left enforcing any of
    // the plan.
    let nothing_in_force = !installed
        || state.as_ref().is_none_or(|s| {
            s.layers.iter().all(|l| {
                drift
                    .iter()
                    .any(|d| d.damaged() == Some(*l) && d.disables())
            })
        });
    let enforcing: Vec<LayerKind> = state
        .as_ref()
        .map(|s| {
            s.layers
                .iter()
                .copied()
                .filter(|l| !drift.iter().any(|d| d.damaged() == Some(*l)))
                .collect()
        })
        .unwrap_or_default();
    let mut status = Status {
        instance: paths.instance.clone(),
        installed,
        layers: present.clone(),
        enforcing: if installed { enforcing } else { Vec::new() },
        policy_hash: None,
        policy_path: None,
        applied_at: None,
        names_resolved_at: None,
        cgroup: None,
        default: None,
        mode: None,
        default_counts: Counts::default(),
        services: Vec::new(),
        plan_id: state.as_ref().map(|s| s.plan.id.clone()),
        policy_file_matches: state
            .as_ref()
            .map(|s| loopguard::compile::file_matches(&s.policy_path, &s.plan)),
        drift: match &state {
            Some(_) => drift.iter().map(ToString::to_string).collect(),
            None if installed => vec![format!(
                "no state file ({}): which policy is in force is unknown; apply one",
                paths.state_file.display()
            )],
            None => Vec::new(),
        },
        squatters: match &state {
            Some(s) if installed => loopguard::scan::squatters_now(&s.plan).unwrap_or_else(|e| {
                log::warn!("squatters not looked for (sock_diag): {e}");
                Vec::new()
            }),
            _ => Vec::new(),
        },
    };
    if let (Some(state), true) = (&state, installed) {
        let plan = &state.plan;
        status.policy_hash = Some(plan.hash.clone());
        status.policy_path = Some(state.policy_path.display().to_string());
        status.applied_at = Some(state.applied_at.clone());
        status.names_resolved_at = Some(state.applied_at.clone());
        status.cgroup = Some(state.cgroup.display().to_string());
        status.default = Some(plan.default.to_string());
        status.mode = Some(plan.mode.to_string());
        // What each layer counted, by bucket (the last: the default):
        // attempts from the eBPF layer, packets from the nftables layer.
        let mut counts = vec![Counts::default(); plan.services.len() + 1];
        for layer in &layers {
            for c in layer
                .counts(paths, plan, &state.packet_base)
                .unwrap_or_default()
            {
                let Some(at) = counts.get_mut(c.bucket) else {
                    continue;
                };
                match layer.kind() {
                    LayerKind::Bpf => at.attempts.add(c.action, c.value),
                    LayerKind::Nft => at.packets.add(c.action, c.value),
                }
            }
        }
        status.default_counts = counts[plan.services.len()];
        for (i, s) in plan.services.iter().enumerate() {
            let c = counts[i];
            status.services.push(ServiceStatus {
                name: s.name.clone(),
                location: s.location.clone(),
                protocol: s.protocol.to_string(),
                ports: s.ports.to_string(),
                addresses: s.addresses.to_string(),
                list: s.list.to_string(),
                mode: s.mode.to_string(),
                uids: plan.uid_sets[s.uid_set as usize].len(),
                bind_uids: s.bind_set.map(|b| plan.uid_sets[b as usize].len()),
                counts: c,
            });
        }
    }

    let mut out = std::io::stdout().lock();
    match args.format {
        Format::Json => {
            serde_json::to_writer_pretty(&mut out, &status)?;
            writeln!(out)?;
        }
        Format::Human => {
            for d in &status.drift {
                writeln!(out, "DRIFT:     {d}")?;
            }
            for s in &status.squatters {
                writeln!(out, "SQUATTER:  {s}")?;
            }
            if !installed {
                writeln!(
                    out,
                    "instance {}: not enforcing: nothing is installed",
                    status.instance
                )?;
                return Ok(exit::NOT_ENFORCING);
            }
            if nothing_in_force {
                writeln!(
                    out,
                    "NOT ENFORCING: instance {}: no layer enforces the applied policy (see DRIFT)",
                    status.instance
                )?;
            }
            writeln!(out, "instance:  {}", status.instance)?;
            writeln!(
                out,
                "policy:    {} ({})",
                status.policy_path.as_deref().unwrap_or("?"),
                status.policy_hash.as_deref().unwrap_or("?")
            )?;
            writeln!(
                out,
                "applied:   {} (plan {}; users and groups resolved then)",
                status.applied_at.as_deref().unwrap_or("?"),
                status.plan_id.as_deref().unwrap_or("?")
            )?;
            if status.policy_file_matches == Some(false) {
                writeln!(
                    out,
                    "note:      the policy file changed since it was applied; the applied version is in force"
                )?;
            }
            let mut layers = Vec::new();
            let attested = |l: LayerKind| {
                if status.enforcing.contains(&l) {
                    "enforcing"
                } else {
                    "NOT ENFORCING"
                }
            };
            if present.contains(&LayerKind::Bpf) {
                layers.push(format!(
                    "bpf (connect4, connect6, sendmsg4, sendmsg6, bind4, bind6 on {}): {}",
                    status.cgroup.as_deref().unwrap_or("?"),
                    attested(LayerKind::Bpf)
                ));
            }
            if present.contains(&LayerKind::Nft) {
                layers.push(format!(
                    "nft (table inet {} on lo): {}",
                    status.instance,
                    attested(LayerKind::Nft)
                ));
            }
            writeln!(out, "layers:    {}", layers.join(", "))?;
            let c = &status.default_counts;
            writeln!(
                out,
                "default:   {} ({}): attempts allow {} deny {} would-deny {}; packets allow {} deny {} would-deny {}",
                status.default.as_deref().unwrap_or("?"),
                status.mode.as_deref().unwrap_or("?"),
                c.attempts.allow.unwrap_or(0),
                c.attempts.deny,
                c.attempts.would_deny,
                c.packets.allow.unwrap_or(0),
                c.packets.deny,
                c.packets.would_deny
            )?;
            let row = |cols: [&str; 12]| {
                format!(
                    "{:<24} {:<6} {:<11} {:<18} {:<5} {:>5} {:>5} {:>8} {:>8} {:>10} {:>9} {:>8}",
                    cols[0],
                    cols[1],
                    cols[2],
                    cols[3],
                    cols[4],
                    cols[5],
                    cols[6],
                    cols[7],
                    cols[8],
                    cols[9],
                    cols[10],
                    cols[11]
                )
            };
            writeln!(
                out,
                "{}",
                row([
                    "SERVICE",
                    "PROTO",
                    "PORTS",
                    "ADDRESSES",
                    "LIST",
                    "UIDS",
                    "BIND",
                    "ALLOW",
                    "DENY",
                    "WOULD-DENY",
                    "PKT-ALLOW",
                    "PKT-REFUSED"
                ])
            )?;
            for s in &status.services {
                let n = [
                    s.uids as u64,
                    s.counts.attempts.allow.unwrap_or(0),
                    s.counts.attempts.deny,
                    s.counts.attempts.would_deny,
                    s.counts.packets.deny + s.counts.packets.would_deny,
                ]
                .map(|v| v.to_string());
                let bind = s.bind_uids.map_or("-".to_string(), |v| v.to_string());
                let pkt_allow = s
                    .counts
                    .packets
                    .allow
                    .map_or("-".to_string(), |v| v.to_string());
                writeln!(
                    out,
                    "{}",
                    row([
                        &s.name,
                        &s.protocol,
                        &s.ports,
                        &s.addresses,
                        &s.list,
                        &n[0],
                        &bind,
                        &n[1],
                        &n[2],
                        &n[3],
                        &pkt_allow,
                        &n[4]
                    ])
                )?;
            }
        }
    }
    Ok(if nothing_in_force {
        exit::NOT_ENFORCING
    } else if status.drift.is_empty() {
        exit::OK
    } else {
        exit::DRIFT
    })
}
