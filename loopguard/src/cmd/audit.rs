//! `loopguard audit`: the audit events `loopguard run` wrote, filtered,
//! optionally followed as they arrive.

use std::{
    fs,
    io::{self, BufRead as _, BufReader, Seek as _, SeekFrom, Write as _},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use loopguard::{
    audit::{log_path, AuditAction, AuditRecord},
    paths::InstancePaths,
};

use crate::{exit, Format};

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  loopguard audit --since 1h --action deny\n  loopguard audit --follow --format json --service postgres"
)]
pub(crate) struct Args {
    /// Keep printing events as they are written.
    #[arg(long)]
    follow: bool,
    /// Only events at or after this time: RFC 3339 (2026-11-29T15:00:00Z)
    /// or an age (90s, 10m, 2h, 1d).
    #[arg(long, value_name = "T")]
    since: Option<String>,
    #[arg(long, value_enum, default_value_t)]
    format: Format,
    /// Only this service.
    #[arg(long)]
    service: Option<String>,
    /// Only this uid.
    #[arg(long)]
    uid: Option<u32>,
    /// Only this action (an unknown one is an error, not an empty result).
    #[arg(long, value_enum)]
    action: Option<AuditAction>,
    /// The audit log [default: the one the instance's `run` writes, else
    /// /var/log/loopguard/INSTANCE.jsonl].
    #[arg(long, value_name = "PATH")]
    file: Option<PathBuf>,
}

fn parse_since(s: &str) -> anyhow::Result<jiff::Timestamp> {
    if let Ok(t) = s.parse::<jiff::Timestamp>() {
        return Ok(t);
    }
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = num
        .parse()
        .with_context(|| format!("invalid --since {s:?}"))?;
    let secs = match unit {
        "s" | "" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => anyhow::bail!("invalid --since {s:?}: use RFC 3339 or an age like 10m"),
    };
    Ok(jiff::Timestamp::now() - jiff::SignedDuration::from_secs(secs))
}

struct Filter {
    since: Option<jiff::Timestamp>,
    service: Option<String>,
    uid: Option<u32>,
    action: Option<AuditAction>,
}

impl Filter {
    fn keep(&self, r: &AuditRecord) -> bool {
        let ts = r.timestamp.parse::<jiff::Timestamp>().ok();
        !(self
            .since
            .is_some_and(|since| ts.is_some_and(|t| t < since))
            || self
                .service
                .as_deref()
                .is_some_and(|s| r.service.as_deref() != Some(s))
            || self.uid.is_some_and(|u| r.uid != Some(u))
            || self.action.is_some_and(|a| r.action != a))
    }
}

fn human(r: &AuditRecord) -> String {
    let or = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    if r.action == AuditAction::Dropped {
        return format!(
            "{} dropped {} events ({})",
            r.timestamp,
            r.dropped.unwrap_or(0),
            r.layer.as_str()
        );
    }
    format!(
        "{} {:<10} uid {} ({}) pid {} {} -> {}:{}/{} [{}] {}",
        r.timestamp,
        r.action.as_str(),
        or(r.uid.map(|u| u.to_string())),
        or(r.user.clone()),
        or(r.pid.map(|p| p.to_string())),
        or(r.process.clone()),
        or(r.ip.map(|i| i.to_string())),
        or(r.port.map(|p| p.to_string())),
        or(r.transport.map(|t| t.as_str().to_string())),
        r.layer.as_str(),
        r.reason,
    )
}

pub(crate) fn run(args: Args, paths: &InstancePaths) -> anyhow::Result<u8> {
    let path = args.file.clone().unwrap_or_else(|| log_path(paths));
    let filter = Filter {
        since: args.since.as_deref().map(parse_since).transpose()?,
        service: args.service.clone(),
        uid: args.uid,
        action: args.action,
    };
    let mut out = io::stdout().lock();
    let print = |line: &str, out: &mut io::StdoutLock<'_>| -> io::Result<()> {
        // A line of another version or a torn write: skipped.
        let Ok(v) = serde_json::from_str::<AuditRecord>(line) else {
            return Ok(());
        };
        if !filter.keep(&v) {
            return Ok(());
        }
        match args.format {
            Format::Json => writeln!(out, "{line}"),
            Format::Human => writeln!(out, "{}", human(&v)),
        }
    };
    // The rotated file first: it holds the older events.
    let rotated = path.with_extension("jsonl.1");
    if rotated.exists() {
        for line in open(&rotated)?.lines() {
            print(&line?, &mut out)?;
        }
    }
    let mut reader = open(&path)?;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? > 0 {
            if line.ends_with('\n') {
                print(line.trim_end(), &mut out)?;
            } else {
                // A partial line: wait for the rest.
                reader.seek(SeekFrom::Current(-(line.len() as i64)))?;
                if !args.follow {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            continue;
        }
        if !args.follow {
            break;
        }
        out.flush()?;
        std::thread::sleep(Duration::from_millis(200));
        // Rotated away: continue with the new file.
        let here = reader.get_ref().metadata()?.ino();
        if fs::metadata(&path).is_ok_and(|m| m.ino() != here) {
            reader = open(&path)?;
        }
    }
    Ok(exit::OK)
}

fn open(path: &Path) -> anyhow::Result<BufReader<fs::File>> {
    fs::File::open(path).map(BufReader::new).with_context(|| {
        format!(
            "failed to read the audit log {} (written by `loopguard run`)",
            path.display()
        )
    })
}
