//! The `loopguard` command. `main` only maps the outcome of [`run`] to an
//! exit code; see the README for the codes, which are a stable interface.

mod cmd;

use std::{io, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};
use loopguard::{ebpf::EbpfError, host::HostError, nft::NftError, paths};

/// Exit codes (stable; documented in the README).
pub mod exit {
    /// Success; `check` found no errors.
    pub const OK: u8 = 0;
    /// The policy has problems (`check`), or `apply` refused it.
    pub const PROBLEMS: u8 = 1;
    /// Could not run: bad arguments, unreadable file, unexpected failure.
    pub const FAILURE: u8 = 2;
    /// Needs root.
    pub const NOT_ROOT: u8 = 3;
    /// The host lacks what loopguard needs (cgroup v2, BPF, bpffs).
    pub const UNSUPPORTED: u8 = 4;
    /// `status`: what the kernel enforces differs from the applied state
    /// (a layer missing or altered, an interrupted apply, no state).
    pub const DRIFT: u8 = 5;
    /// `status`: nothing enforces this instance's policy: nothing is
    /// installed, or every layer the state lists is missing or damaged.
    pub const NOT_ENFORCING: u8 = 6;
}

const AFTER_HELP: &str = "\
Examples:
  loopguard check --offline policies/*.toml     validate in CI, no name lookups
  loopguard apply /etc/loopguard/policy.toml    enforce (root)
  loopguard apply policy.toml --dry-run         show what would change
  loopguard status                              what is enforced, with counters
  loopguard explain --user app --to 127.0.0.1:5432
  loopguard run /etc/loopguard/policy.toml      daemon: enforce, stream audit events
  loopguard audit --follow --action deny        watch refusals
  loopguard remove                              detach everything

Exit codes: 0 ok, 1 policy problems, 2 could not run, 3 needs root,
4 the host lacks cgroup v2 or BPF support, 5 status: drift (the kernel
differs from the applied policy), 6 status: not enforcing.";

#[derive(Parser)]
#[command(
    name = "loopguard",
    version,
    about = "Decide which local users may reach which services on loopback",
    long_about = "Decide which local users may reach which services on this host's loopback \
(127.0.0.0/8, ::1, and every other route to the host itself), enforced by eBPF programs on \
the cgroup v2 socket hooks: a refused connect() or sendto() fails with EPERM.",
    after_help = AFTER_HELP
)]
struct Cli {
    /// Name of this installation: pins under /sys/fs/bpf/NAME, state under
    /// /run/loopguard/NAME. Independent instances never touch each other.
    #[arg(long, global = true, default_value = paths::DEFAULT_INSTANCE, value_name = "NAME")]
    instance: String,

    /// Log what happens, and print verifier logs on load failures.
    #[arg(short, long, global = true)]
    verbose: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, Default, ValueEnum)]
pub enum Format {
    #[default]
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Validate policy files: every problem, with file:line:col.
    #[command(
        after_help = "Exit codes: 0 no errors (warnings allowed), 1 problems found, 2 could not run."
    )]
    Check(cmd::check::Args),
    /// Enforce a policy (root). Atomic: the old policy stays in force until
    /// the new one is complete, and stays if anything fails.
    Apply(cmd::apply::Args),
    /// Show what is enforced: policy, services, counters, layers (root).
    Status(cmd::status::Args),
    /// Show the verdict for one user and destination, and what decides it.
    Explain(cmd::explain::Args),
    /// Foreground daemon for systemd: apply, stream audit events, keep host
    /// addresses current, reload on SIGHUP and file change (root).
    Run(cmd::run::Args),
    /// Show audit events from the audit log (root or the loopguard-audit group).
    Audit(cmd::audit::Args),
    /// Detach and delete every program, pin and file of this instance
    /// (root). Refused while the instance's `loopguard run` runs, unless
    /// --force.
    Remove(cmd::remove::Args),
    /// The change in access between two policy files: who gains or loses
    /// access to which service, scopes widened, enforcement weakened.
    Diff(cmd::diff::Args),
    /// Every TCP listener and bound UDP socket: owner, process, unit, the
    /// service that guards it (or none), and which are reachable from the
    /// network; `--format toml` writes a starter policy.
    Scan(cmd::scan::Args),
    /// From audit-mode events, the allow-lists that would have let exactly
    /// the observed traffic through: a policy, or changes to --policy.
    Learn(cmd::learn::Args),
    /// Print a shell completion script (bash, zsh, fish, elvish,
    /// powershell), e.g. `loopguard completions bash >
    /// /usr/share/bash-completion/completions/loopguard`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write a man page per command (loopguard.8, loopguard-apply.8, ...)
    /// into DIR: what packaging installs.
    #[command(hide = true)]
    Manpages {
        #[arg(value_name = "DIR")]
        dir: std::path::PathBuf,
    },
}

/// Large buffers (a policy's text, an nft batch, the kernel BTF aya
/// parses) are mapped and unmapped on their own, always. glibc's default
/// raises that threshold each time such a buffer is freed, after which
/// the next ones come from the heap and stay counted in the process's
/// memory once freed: a 10,000-service `run` peaked at 30.3 MiB that way.
fn large_allocations_go_back() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; called first in
    // main, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}

fn main() -> ExitCode {
    large_allocations_go_back();
    let cli = Cli::parse();
    // The daemon reports what it does (to journald); commands stay quiet.
    let daemon = matches!(cli.command, Command::Run(_));
    let mut logger = env_logger::Builder::new();
    logger
        .filter_level(if cli.verbose {
            log::LevelFilter::Debug
        } else if daemon {
            log::LevelFilter::Info
        } else {
            log::LevelFilter::Warn
        })
        .format_timestamp(None);
    // The daemon's lines elsewhere than the journal (a terminal, a file, a
    // container's log): each with its RFC 3339 time.
    if daemon {
        logger.format(|buf, record| {
            use std::io::Write as _;
            let now = jiff::Timestamp::now()
                .round(jiff::Unit::Second)
                .unwrap_or_else(|_| jiff::Timestamp::now());
            writeln!(buf, "{now} {} {}", record.level(), record.args())
        });
    }
    // Under systemd (stderr is the journal): each record one line with its
    // sd-daemon priority prefix, so `journalctl -p err` finds errors and a
    // multi-line diagnostic stays one entry.
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        logger.format(|buf, record| {
            use std::io::Write as _;
            let priority = match record.level() {
                log::Level::Error => 3,
                log::Level::Warn => 4,
                log::Level::Info => 6,
                log::Level::Debug | log::Level::Trace => 7,
            };
            let text = record.args().to_string();
            let text: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
            writeln!(buf, "<{priority}>{}", text.join(" | "))
        });
    }
    logger.init();
    let verbose = cli.verbose;
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(err) => report(&err, verbose),
    }
}

/// `loopguard.8` and `loopguard-<command>.8` for every visible command.
fn manpages(dir: &std::path::Path) -> anyhow::Result<u8> {
    use anyhow::Context as _;
    std::fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let command = <Cli as clap::CommandFactory>::command();
    let write = |name: &str, cmd: clap::Command| -> anyhow::Result<()> {
        let path = dir.join(format!("{name}.8"));
        let mut out = Vec::new();
        clap_mangen::Man::new(cmd).section("8").render(&mut out)?;
        std::fs::write(&path, out).with_context(|| format!("failed to write {}", path.display()))
    };
    for sub in command.get_subcommands().filter(|c| !c.is_hide_set()) {
        let name = format!("loopguard-{}", sub.get_name());
        write(&name, sub.clone().name(name.clone()))?;
    }
    write("loopguard", command)?;
    Ok(exit::OK)
}

fn run(cli: Cli) -> anyhow::Result<u8> {
    if !paths::valid_instance(&cli.instance) {
        anyhow::bail!(
            "invalid instance name {:?}: names match [a-z0-9][a-z0-9_-]{{0,31}}",
            cli.instance
        );
    }
    let paths = paths::InstancePaths::new(&cli.instance);
    match cli.command {
        Command::Check(args) => cmd::check::run(args),
        Command::Apply(args) => cmd::apply::run(args, &paths),
        Command::Status(args) => cmd::status::run(args, &paths),
        Command::Explain(args) => cmd::explain::run(args, &paths),
        Command::Run(args) => cmd::run::run(args, &paths),
        Command::Audit(args) => cmd::audit::run(args, &paths),
        Command::Remove(args) => cmd::remove::run(args, &paths),
        Command::Diff(args) => cmd::diff::run(args),
        Command::Scan(args) => cmd::scan::run(args, &paths),
        Command::Learn(args) => cmd::learn::run(args, &paths),
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "loopguard", &mut io::stdout());
            Ok(exit::OK)
        }
        Command::Manpages { dir } => manpages(&dir),
    }
}

/// One line on stderr (the whole cause chain, `: `-joined) and the exit
/// code for the kind of failure. A closed stdout is not an error.
fn report(err: &anyhow::Error, verbose: bool) -> ExitCode {
    let broken_pipe = |e: &(dyn std::error::Error + 'static)| {
        e.downcast_ref::<io::Error>()
            .map(io::Error::kind)
            .or_else(|| {
                e.downcast_ref::<serde_json::Error>()
                    .and_then(|j| j.io_error_kind())
            })
            == Some(io::ErrorKind::BrokenPipe)
    };
    if err.chain().any(broken_pipe) {
        return ExitCode::from(exit::OK);
    }
    // One line: stop at a verifier failure, whose source carries the whole
    // verifier log (printed below with --verbose).
    let mut chain: Vec<String> = Vec::new();
    for cause in err.chain() {
        chain.push(cause.to_string());
        if matches!(
            cause.downcast_ref::<EbpfError>(),
            Some(EbpfError::Verifier { .. })
        ) {
            break;
        }
    }
    eprintln!("loopguard: {}", chain.join(": "));
    let mut code = exit::FAILURE;
    for cause in err.chain() {
        if let Some(h) = cause.downcast_ref::<HostError>() {
            code = match h {
                HostError::NotRoot(_) => exit::NOT_ROOT,
                HostError::Io { .. } => exit::FAILURE,
                _ => exit::UNSUPPORTED,
            };
            break;
        }
        if let Some(e) = cause.downcast_ref::<NftError>() {
            if verbose {
                if let Some(detail) = e.detail() {
                    eprintln!("{detail}");
                }
            }
            if matches!(
                e,
                NftError::Rejected(nftables::helper::NftablesError::NftExecution { .. })
            ) {
                code = exit::UNSUPPORTED;
            }
            break;
        }
        if let Some(e) = cause.downcast_ref::<EbpfError>() {
            if verbose {
                if let Some(log) = e.verifier_log() {
                    eprintln!("{log}");
                }
            }
            if matches!(e, EbpfError::Verifier { .. } | EbpfError::Object(_)) {
                code = exit::UNSUPPORTED;
            }
            break;
        }
    }
    if let Some(p) = err.chain().find_map(|e| e.downcast_ref::<io::Error>()) {
        if p.kind() == io::ErrorKind::PermissionDenied && !nix::unistd::geteuid().is_root() {
            code = exit::NOT_ROOT;
        }
    }
    ExitCode::from(code)
}
