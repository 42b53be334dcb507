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
use loopguard::{audit::default_log_path, paths::InstancePaths};
use serde_json::Value;

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
    action: Option<ActionArg>,
    /// The audit log [default: /var/log/loopguard/INSTANCE.jsonl].
    #[arg(long, value_name = "PATH")]
    file: Option<PathBuf>,
}

/// The words of `event.action`, as everywhere else (events, metrics,
/// status, docs).
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum ActionArg {
    Allow,
    Deny,
    WouldDeny,
    Dropped,
}

impl ActionArg {
    fn as_str(self) -> &'static str {
        match self {
            ActionArg::Allow => loopguard::compile::Action::Allow.as_str(),
            ActionArg::Deny => loopguard::compile::Action::Deny.as_str(),
            ActionArg::WouldDeny => loopguard::compile::Action::WouldDeny.as_str(),
            ActionArg::Dropped => "dropped",
        }
    }
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
    action: Option<ActionArg>,
}

impl Filter {
    fn keep(&self, v: &Value) -> bool {
        if let Some(since) = self.since {
            let ts = v["@timestamp"]
                .as_str()
                .and_then(|t| t.parse::<jiff::Timestamp>().ok());
            if ts.is_some_and(|t| t < since) {
                return false;
            }
        }
        if self
            .service
            .as_deref()
            .is_some_and(|s| v["loopguard.service"].as_str() != Some(s))
        {
            return false;
        }
        if self
            .uid
            .is_some_and(|u| v["user.id"].as_u64() != Some(u64::from(u)))
        {
            return false;
        }
        if self
            .action
            .is_some_and(|a| v["event.action"].as_str() != Some(a.as_str()))
        {
            return false;
        }
        true
    }
}

fn human(v: &Value) -> String {
    let s = |k: &str| {
        v[k].as_str()
            .map(String::from)
            .unwrap_or_else(|| v[k].to_string())
    };
    if v["event.action"] == "dropped" {
        return format!(
            "{} dropped {} events ({})",
            s("@timestamp"),
            s("loopguard.dropped"),
            s("loopguard.layer")
        );
    }
    format!(
        "{} {:<10} uid {} ({}) pid {} {} -> {}:{}/{} [{}] {}",
        s("@timestamp"),
        s("event.action"),
        s("user.id"),
        s("user.name"),
        s("process.pid"),
        s("process.name"),
        s("destination.ip"),
        s("destination.port"),
        s("network.transport"),
        s("loopguard.layer"),
        s("event.reason"),
    )
}

pub(crate) fn run(args: Args, paths: &InstancePaths) -> anyhow::Result<u8> {
    let path = args
        .file
        .clone()
        .unwrap_or_else(|| default_log_path(&paths.instance));
    let filter = Filter {
        since: args.since.as_deref().map(parse_since).transpose()?,
        service: args.service.clone(),
        uid: args.uid,
        action: args.action,
    };
    let mut out = io::stdout().lock();
    let print = |line: &str, out: &mut io::StdoutLock<'_>| -> io::Result<()> {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
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
