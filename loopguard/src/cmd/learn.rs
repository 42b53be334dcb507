//! `loopguard learn [AUDIT_LOG...]`: from an audit-mode trial, the policy
//! that lets the observed traffic through: the policy in force (or
//! `--policy`) with the users seen added to its allow-lists, or a new one.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, Write as _},
    path::PathBuf,
};

use anyhow::Context as _;
use loopguard::{
    audit::AuditRecord,
    learn::{self, Observed},
    paths::InstancePaths,
    policy::Transport,
    state::State,
};

use super::{check_source, read_policy};
use crate::exit;

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  loopguard learn > learned.toml\n  loopguard learn --exclude guest --enforce > policy.toml\n  loopguard learn /var/log/loopguard/loopguard.jsonl* --policy /etc/loopguard/policy.toml --format human"
)]
pub(crate) struct Args {
    /// Audit logs written by `loopguard run` [default: the log the
    /// instance's daemon writes, and its rotated PATH.1].
    #[arg(value_name = "AUDIT_LOG")]
    logs: Vec<PathBuf>,
    /// Add to this policy [default: the policy in force for the instance;
    /// a new policy when none is].
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    /// Write a new policy, whatever is in force.
    #[arg(long, conflicts_with = "policy")]
    new: bool,
    /// Never propose this user (a name or uid; repeatable): its attempts
    /// stay refused once enforced.
    #[arg(long, value_name = "USER")]
    exclude: Vec<String>,
    /// Switch `mode = "audit"` to enforce in what is written (the mode
    /// stays as it is otherwise; a new policy is in audit mode).
    #[arg(long)]
    enforce: bool,
    /// `toml` (the policy to apply; what it adds is said on stderr),
    /// `human` (what it adds) or `json`.
    #[arg(long, value_enum, default_value = "toml")]
    format: LearnFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LearnFormat {
    Toml,
    Human,
    Json,
}

pub(crate) fn run(args: Args, paths: &InstancePaths) -> anyhow::Result<u8> {
    let logs = if args.logs.is_empty() {
        // The daemon's log, the rotated one first (older records).
        let log = loopguard::audit::log_path(paths);
        let rotated = PathBuf::from(format!("{}.1", log.display()));
        let mut logs: Vec<PathBuf> = vec![rotated, log.clone()]
            .into_iter()
            .filter(|p| p.exists())
            .collect();
        if logs.is_empty() {
            anyhow::bail!(
                "no audit log at {} (the one instance {} writes under `run`); name one",
                log.display(),
                paths.instance
            );
        }
        logs.dedup();
        logs
    } else {
        args.logs.clone()
    };
    let mut observed = Observed::default();
    for path in &logs {
        let file = std::fs::File::open(path)
            .with_context(|| format!("failed to read the audit log {}", path.display()))?;
        for line in std::io::BufReader::new(file).lines() {
            let line = line.with_context(|| format!("failed to read {}", path.display()))?;
            match serde_json::from_str::<AuditRecord>(&line) {
                Ok(r) => observed.add(&r),
                // A torn last line, or another program's: not an attempt.
                Err(_) => observed.skipped += 1,
            }
        }
    }
    let sources: Vec<String> = logs.iter().map(|p| p.display().to_string()).collect();
    // What to add to: --policy, else the policy in force.
    let base_file = match (&args.policy, args.new) {
        (Some(f), _) => Some(f.clone()),
        (None, true) => None,
        (None, false) => State::load(paths)
            .ok()
            .flatten()
            .map(|s| s.policy_path)
            .filter(|p| p.exists()),
    };
    let checked = match &base_file {
        Some(file) => {
            let checked = check_source(file, read_policy(file)?, None);
            if checked.policy.is_none() || checked.errors() > 0 {
                eprint!("{}", checked.report().render_human());
                anyhow::bail!("{} has errors", checked.file);
            }
            Some(checked)
        }
        None => None,
    };
    let base = checked.as_ref().and_then(|c| c.policy.as_ref());
    let proposals = observed.proposals(base, &args.exclude);
    let mut out = std::io::stdout().lock();
    match args.format {
        LearnFormat::Json => {
            #[derive(serde::Serialize)]
            struct Learned<'a> {
                base: Option<String>,
                observed: &'a Observed,
                proposals: &'a [learn::Proposal],
            }
            let learned = Learned {
                base: base_file.as_ref().map(|p| p.display().to_string()),
                observed: &observed,
                proposals: &proposals,
            };
            writeln!(out, "{}", serde_json::to_string_pretty(&learned)?)?;
        }
        LearnFormat::Human => {
            if proposals.is_empty() {
                writeln!(
                    out,
                    "{}: lets through everything seen ({} attempts)",
                    base_file
                        .as_ref()
                        .map_or("a new policy".into(), |p| p.display().to_string()),
                    observed.events
                )?;
            }
            for p in &proposals {
                writeln!(out, "{p}")?;
            }
        }
        LearnFormat::Toml => {
            let text = match base {
                Some(policy) => observed.merged(policy, &proposals, args.enforce),
                None => observed.policy(
                    &sources.join(", "),
                    &learn::Options {
                        exclude: args.exclude.clone(),
                        enforce: args.enforce,
                        keep: keep(),
                    },
                ),
            };
            out.write_all(text.as_bytes())?;
            for p in &proposals {
                eprintln!("loopguard: {p}");
            }
        }
    }
    eprintln!(
        "loopguard: learned from {} attempts in {} ({} other records skipped){}",
        observed.events,
        sources.join(", "),
        observed.skipped,
        match &base_file {
            Some(f) => format!("; added to {}", f.display()),
            None => "; a new policy".into(),
        }
    );
    Ok(exit::OK)
}

/// Who a new policy keeps on each (protocol, port) besides root: the
/// owners of the sockets listening there now (they reach their own
/// service, e.g. for health checks).
fn keep() -> BTreeMap<(Transport, u16), Vec<String>> {
    let mut keep: BTreeMap<(Transport, u16), Vec<String>> = BTreeMap::new();
    let listeners = loopguard::scan::listeners().unwrap_or_else(|e| {
        log::warn!("listeners not read (sock_diag): {e}; only root is kept");
        Vec::new()
    });
    for l in listeners {
        let owner = l.user.clone().unwrap_or_else(|| l.uid.to_string());
        let at = keep.entry((l.protocol, l.port)).or_default();
        if !at.contains(&owner) {
            at.push(owner);
        }
    }
    keep
}
