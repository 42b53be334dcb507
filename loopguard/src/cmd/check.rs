//! `loopguard check`: validate policy files without touching the kernel.

use std::{io::Write as _, path::PathBuf};

use loopguard::policy::SystemDirectory;
use serde::Serialize;

use super::{check_source, counts};
use crate::exit;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
enum CheckFormat {
    #[default]
    Human,
    Json,
    /// SARIF 2.1.0, for code-scanning uploads.
    Sarif,
    /// GitHub Actions workflow commands: annotations on the pull request.
    Github,
}

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  loopguard check policy.toml\n  loopguard check --offline --format json hosts/*.toml"
)]
pub(crate) struct Args {
    /// Do not resolve user and group names (for policies meant for other
    /// hosts, e.g. in an ops repo's CI).
    #[arg(long)]
    offline: bool,
    /// Judge the file as `apply --force` would (a policy that would cut root
    /// off from essential local services passes).
    #[arg(long)]
    force: bool,
    #[arg(long, value_enum, default_value_t)]
    format: CheckFormat,
    /// Policy files.
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
}

#[derive(Serialize)]
struct FileReport {
    file: String,
    ok: bool,
    errors: usize,
    warnings: usize,
    services: usize,
    /// Why `apply` would refuse the file (`errors`, `cuts-off-root`), or
    /// null when it would enforce it.
    apply_refuses: Option<&'static str>,
    diagnostics: Vec<loopguard::diag::Record>,
}

#[derive(Serialize)]
struct JsonReport {
    ok: bool,
    files: Vec<FileReport>,
}

pub(crate) fn run(args: Args) -> anyhow::Result<u8> {
    let mut out = std::io::stdout().lock();
    let mut unreadable = false;
    let mut problems = false;
    let mut files = Vec::new();
    let mut records = Vec::new();
    for path in &args.files {
        let source = match super::read_policy(path) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("loopguard: {e:#}");
                unreadable = true;
                continue;
            }
        };
        let dir = SystemDirectory;
        let checked = check_source(path, source, (!args.offline).then_some(&dir as _));
        // The same gate as apply's: a file apply refuses is a problem.
        let refusal = checked.refusal(args.force);
        problems |= refusal.is_some();
        match args.format {
            CheckFormat::Human => {
                out.write_all(checked.report().render_human().as_bytes())?;
                let services = checked.policy.as_ref().map_or(0, |p| p.services.len());
                match refusal {
                    None => writeln!(
                        out,
                        "{}: ok, {services} service{} ({})",
                        checked.file,
                        if services == 1 { "" } else { "s" },
                        counts(0, checked.warnings())
                    )?,
                    Some(r) => writeln!(
                        out,
                        "{}: {}; {}",
                        checked.file,
                        counts(checked.errors(), checked.warnings()),
                        r.says()
                    )?,
                }
            }
            CheckFormat::Sarif | CheckFormat::Github => {
                records.extend(checked.report().records());
                // A file apply refuses without an error diagnostic (it
                // cuts root off): the warning is there; CI fails by the
                // exit code.
            }
            CheckFormat::Json => files.push(FileReport {
                file: checked.file.clone(),
                ok: refusal.is_none(),
                apply_refuses: refusal.map(|r| match r {
                    super::Refusal::Errors => "errors",
                    super::Refusal::CutsOffRoot => "cuts-off-root",
                    super::Refusal::Units => "unit",
                }),
                errors: checked.errors(),
                warnings: checked.warnings(),
                services: checked.policy.as_ref().map_or(0, |p| p.services.len()),
                diagnostics: checked.report().records(),
            }),
        }
    }
    match args.format {
        CheckFormat::Sarif => {
            serde_json::to_writer_pretty(&mut out, &loopguard::ci::sarif(&records))?;
            writeln!(out)?;
        }
        CheckFormat::Github => out.write_all(loopguard::ci::github(&records).as_bytes())?,
        CheckFormat::Human | CheckFormat::Json => {}
    }
    if let CheckFormat::Json = args.format {
        let report = JsonReport {
            ok: !problems && !unreadable,
            files,
        };
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    }
    Ok(if unreadable {
        exit::FAILURE
    } else if problems {
        exit::PROBLEMS
    } else {
        exit::OK
    })
}
