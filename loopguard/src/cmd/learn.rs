//! `loopguard learn AUDIT_LOG...`: from an audit-mode trial, the
//! allow-lists that would have let exactly the observed traffic through.

use std::{
    io::{BufRead as _, Write as _},
    path::PathBuf,
};

use anyhow::Context as _;
use loopguard::{audit::AuditRecord, learn::Observed};

use super::{check_source, read_policy};
use crate::exit;

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  loopguard learn /var/log/loopguard/loopguard.jsonl > learned.toml\n  loopguard learn /var/log/loopguard/loopguard.jsonl* --policy /etc/loopguard/policy.toml"
)]
pub(crate) struct Args {
    /// Audit logs written by `loopguard run` (rotated ones too).
    #[arg(required = true, value_name = "AUDIT_LOG")]
    logs: Vec<PathBuf>,
    /// Say what to add to this policy instead of writing a new one.
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    /// `toml` (a policy; the default without --policy), `human` (the
    /// changes to --policy; its default) or `json`.
    #[arg(long, value_enum)]
    format: Option<LearnFormat>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LearnFormat {
    Toml,
    Human,
    Json,
}

pub(crate) fn run(args: Args) -> anyhow::Result<u8> {
    let mut observed = Observed::default();
    for path in &args.logs {
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
    let sources: Vec<String> = args.logs.iter().map(|p| p.display().to_string()).collect();
    let mut out = std::io::stdout().lock();
    match &args.policy {
        None => match args.format.unwrap_or(LearnFormat::Toml) {
            LearnFormat::Json => {
                writeln!(out, "{}", serde_json::to_string_pretty(&observed)?)?;
            }
            _ => out.write_all(observed.policy(&sources.join(", ")).as_bytes())?,
        },
        Some(file) => {
            let checked = check_source(file, read_policy(file)?, None);
            let (Some(policy), 0) = (&checked.policy, checked.errors()) else {
                eprint!("{}", checked.report().render_human());
                anyhow::bail!("{} has errors", checked.file);
            };
            let proposals = observed.against(policy);
            match args.format.unwrap_or(LearnFormat::Human) {
                LearnFormat::Json => {
                    writeln!(out, "{}", serde_json::to_string_pretty(&proposals)?)?;
                }
                _ => {
                    if proposals.is_empty() {
                        writeln!(
                            out,
                            "{}: lets through everything seen ({} attempts)",
                            checked.file, observed.events
                        )?;
                    }
                    for p in &proposals {
                        writeln!(out, "{p}")?;
                    }
                }
            }
        }
    }
    eprintln!(
        "loopguard: learned from {} attempts ({} other records skipped)",
        observed.events, observed.skipped
    );
    Ok(exit::OK)
}
