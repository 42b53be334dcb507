//! `loopguard run`: the foreground daemon for systemd (see
//! [`loopguard::daemon`]).

use std::{net::SocketAddr, path::PathBuf};

use loopguard::{
    audit,
    daemon::{self, Config, Outcome},
    host,
    paths::InstancePaths,
};

use super::EnforceArgs;
use crate::exit;

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  loopguard run /etc/loopguard/policy.toml\n  loopguard run policy.toml --audit-log /var/log/loopguard/audit.jsonl --metrics 127.0.0.1:9477"
)]
pub(crate) struct Args {
    /// The policy file (watched for changes).
    #[arg(value_name = "FILE")]
    file: PathBuf,
    #[command(flatten)]
    enforce: EnforceArgs,
    /// Also append events here [default: /var/log/loopguard/INSTANCE.jsonl].
    #[arg(long, value_name = "PATH")]
    audit_log: Option<PathBuf>,
    /// Rotate the audit log to PATH.1 at this size.
    #[arg(long, value_name = "BYTES", default_value_t = 64 << 20)]
    audit_log_max_bytes: u64,
    /// Serve Prometheus metrics on this address (keep it on loopback).
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<SocketAddr>,
}

pub(crate) fn run(args: Args, paths: &InstancePaths) -> anyhow::Result<u8> {
    host::require_root("run")?;
    let config = Config {
        opts: args.enforce.options(),
        // Absolute: `audit` and `learn` find it from anywhere.
        audit_log: args
            .audit_log
            .map(|p| std::path::absolute(&p).unwrap_or(p))
            .unwrap_or_else(|| audit::default_log_path(&paths.instance)),
        audit_log_max_bytes: args.audit_log_max_bytes,
        metrics: args.metrics,
        file: args.file,
    };
    Ok(match daemon::run(config, paths)? {
        Outcome::Stopped { .. } => exit::OK,
        Outcome::NothingToEnforce | Outcome::Removed => exit::NOT_ENFORCING,
    })
}
