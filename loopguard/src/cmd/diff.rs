//! `loopguard diff OLD NEW`: the change in access between two policy
//! files, for review.

use std::{io::Write as _, path::PathBuf};

use loopguard::access;

use super::{check_source, read_policy};
use crate::exit;

#[derive(clap::Args)]
#[command(
    after_help = "Exit codes: 0 access unchanged, 1 access changes, 2 could not run (a file unreadable or with errors).\n\nExamples:\n  loopguard diff policy.toml policy.new.toml\n  git show main:hosts/db.toml > /tmp/old.toml && loopguard diff /tmp/old.toml hosts/db.toml --format github"
)]
pub(crate) struct Args {
    /// The policy before the change.
    #[arg(value_name = "OLD")]
    old: PathBuf,
    /// The policy after the change.
    #[arg(value_name = "NEW")]
    new: PathBuf,
    #[arg(long, value_enum, default_value_t)]
    format: DiffFormat,
}

#[derive(Clone, Copy, Debug, Default, clap::ValueEnum)]
enum DiffFormat {
    #[default]
    Human,
    Json,
    /// A Markdown summary for a pull-request comment.
    Github,
}

pub(crate) fn run(args: Args) -> anyhow::Result<u8> {
    let mut policies = Vec::new();
    for path in [&args.old, &args.new] {
        let checked = check_source(path, read_policy(path)?, None);
        match (&checked.policy, checked.errors()) {
            (Some(p), 0) => policies.push(p.clone()),
            _ => {
                eprint!("{}", checked.report().render_human());
                eprintln!("loopguard: {} has errors; no diff", checked.file);
                return Ok(exit::FAILURE);
            }
        }
    }
    let d = access::diff(&policies[0], &policies[1]);
    let mut out = std::io::stdout().lock();
    match args.format {
        DiffFormat::Human => out.write_all(d.human().as_bytes())?,
        DiffFormat::Json => {
            serde_json::to_writer_pretty(&mut out, &d)?;
            writeln!(out)?;
        }
        DiffFormat::Github => out.write_all(d.markdown().as_bytes())?,
    }
    Ok(if d.changed { exit::PROBLEMS } else { exit::OK })
}
