//! The daemon behind `loopguard run`: applies the policy, then keeps it in
//! force until stopped.
//!
//! ```text
//!  watchers ──► Trigger ──► one reconcile loop ──► engine ──► layers
//!  (file, accounts,            (wanted vs attested;      │
//!   cgroups, routes,            one backoff)             └─► published plan
//!   layers, tick, signals)                                   │
//!                                  event readers, /metrics ◄─┘
//! ```
//!
//! Watchers ([`watch`]) only report, on one channel. The [`Reconciler`]
//! owns what the daemon knows and is the only one that acts; it is built
//! from an [`crate::engine::Engine`] and a directory, so its unit tests
//! drive it with fake layers. The event readers and the metrics endpoint
//! hold the plan in force through a cheaply cloned handle. SIGTERM stops
//! the daemon; enforcement stays pinned.

mod events;
mod http;
mod metrics;
mod reconcile;
#[cfg(test)]
mod tests;
mod watch;

use std::{fs, io::Write as _, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use nix::fcntl::{Flock, FlockArg};
use sd_notify::NotifyState;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};

pub use self::{
    metrics::Metrics,
    reconcile::{Backoff, Reconciler, Sources, Stop, Trigger, BACKOFF_MAX, RETRY_NAMES},
};
use crate::{
    audit::AuditLog,
    compile::Plan,
    engine::{Engine, LayerKind, Options},
    nft::PacketCounts,
    paths::InstancePaths,
    policy::SystemDirectory,
    state::State,
};

/// The plan in force as the daemon last saw it, published to the event
/// readers and the metrics endpoint.
#[derive(Debug, Default)]
pub struct Enforced {
    pub plan: Option<Arc<Plan>>,
    /// The plan in force and the few before it, newest first: events
    /// decided just before a reload still name their service.
    pub recent: Vec<Arc<Plan>>,
    /// The applied state's carried nftables counts.
    pub packet_base: PacketCounts,
    pub layers: Vec<LayerKind>,
    /// The cgroup the eBPF layer is attached to.
    pub cgroup: PathBuf,
    /// The state file as it was when this was published: a reader that
    /// sees it unchanged need not read it.
    pub state_stamp: Option<crate::state::FileStamp>,
}

/// What changed under the names a policy lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Identities {
    /// `/etc/passwd`, `/etc/group`.
    Accounts,
    /// A listed cgroup appeared, went, or was made again.
    Cgroups,
}

impl std::fmt::Display for Identities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Identities::Accounts => "the user database",
            Identities::Cgroups => "a listed cgroup",
        })
    }
}

/// The user database files whose change re-resolves names.
pub const ACCOUNT_FILES: [&str; 2] = ["/etc/passwd", "/etc/group"];

/// How to run.
pub struct Config {
    pub file: PathBuf,
    pub opts: Options,
    pub audit_log: PathBuf,
    pub audit_log_max_bytes: u64,
    pub metrics: Option<SocketAddr>,
}

/// How the daemon ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing could be enforced at start (a broken file, no last known
    /// good).
    NothingToEnforce,
    /// SIGTERM or SIGINT; whether the kernel enforces the policy, read
    /// back as the daemon stops.
    Stopped { enforcing: bool },
    /// Enforcement was removed under the daemon.
    Removed,
}

/// Runs the daemon for the instance of `paths` until it is stopped.
pub fn run(config: Config, paths: &InstancePaths) -> anyhow::Result<Outcome> {
    let _run_lock = lock_run(paths)?;
    // A note left by a `remove --force` under an earlier daemon.
    let _ = fs::remove_file(&paths.removed_by_file);
    let log = AuditLog::open(&config.audit_log, config.audit_log_max_bytes).with_context(|| {
        format!(
            "failed to open the audit log {}",
            config.audit_log.display()
        )
    })?;
    // Where `audit` and `learn` look for the events, unless told otherwise.
    let recorded = config.audit_log.to_string_lossy().into_owned() + "\n";
    if let Err(e) = crate::files::write_private(&paths.audit_log_file, recorded.as_bytes()) {
        log::warn!(
            "{}: {e}; `loopguard audit` will not find {} by itself",
            paths.audit_log_file.display(),
            config.audit_log.display()
        );
    }
    let metrics = Arc::new(Metrics::new());
    let (published, published_rx) = tokio::sync::watch::channel(Arc::new(Enforced::default()));
    let sources = Sources {
        policy: config.file.clone(),
        accounts: ACCOUNT_FILES.iter().map(PathBuf::from).collect(),
    };
    // Built before the start's apply: a change from then on is followed,
    // however late the watchers first run.
    let mut reconciler = Reconciler::new(
        Engine::system(paths.clone()),
        Box::new(SystemDirectory),
        config.opts.clone(),
        sources,
        metrics.clone(),
        published,
    );
    if !reconciler.start() {
        return Ok(Outcome::NothingToEnforce);
    }
    log::info!("{}", starting_words(&config, reconciler.enforced(), paths));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    let stopped = runtime.block_on(serve(
        reconciler,
        &config,
        paths,
        metrics,
        published_rx,
        log,
    ))?;
    // The last line says what the kernel enforces now, read back.
    let (enforcing, words) = attested(paths);
    match stopped {
        None => {
            if enforcing {
                log::info!("stopping; {words}");
            } else {
                log::error!("stopping; {words}");
            }
            Ok(Outcome::Stopped { enforcing })
        }
        Some(Stop::Removed(why)) => {
            log::error!("{why}");
            log::error!("{words}");
            Ok(Outcome::Removed)
        }
    }
}

/// What the daemon enforces and where it reports, said once at start:
/// the policy, the layers and where they sit, the metrics address, the
/// audit log.
fn starting_words(config: &Config, enforced: &Enforced, paths: &InstancePaths) -> String {
    let mut words = vec![format!("instance {}", paths.instance)];
    if let Some(plan) = &enforced.plan {
        words.push(format!("policy {} (plan {})", plan.file, plan.id));
    }
    for layer in &enforced.layers {
        words.push(match layer {
            LayerKind::Bpf => format!(
                "layer bpf on cgroup {}{}",
                enforced.cgroup.display(),
                if crate::host::is_cgroup2_root(&enforced.cgroup) {
                    " (the whole host)"
                } else {
                    ""
                }
            ),
            LayerKind::Nft => format!("layer nft as table inet {}", paths.instance),
        });
    }
    words.push(match config.metrics {
        Some(addr) => format!("metrics on http://{addr}/metrics"),
        None => "no metrics endpoint (--metrics ADDR:PORT)".into(),
    });
    words.push(format!("audit log {}", config.audit_log.display()));
    format!("running: {}", words.join("; "))
}

/// The instance's run lock: one daemon per instance. A `remove` looking
/// for a daemon holds it shared for a moment: tried again for a little
/// while before another daemon is assumed.
fn lock_run(paths: &InstancePaths) -> anyhow::Result<Flock<fs::File>> {
    crate::files::private_dir(&paths.state_root)
        .with_context(|| format!("failed to create {}", paths.state_root.display()))?;
    let run_lock = &paths.run_lock_file;
    let mut file = crate::files::open_lock_file(run_lock)
        .with_context(|| format!("failed to open {}", run_lock.display()))?;
    let mut tries = 0;
    let locked = loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Err((f, nix::errno::Errno::EWOULDBLOCK)) if tries < 10 => {
                tries += 1;
                file = f;
                std::thread::sleep(Duration::from_millis(20));
            }
            other => break other,
        }
    };
    let mut lock = match locked {
        Ok(l) => l,
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            let pid = fs::read_to_string(run_lock).unwrap_or_default();
            anyhow::bail!(
                "another `loopguard run` is running for instance {} (pid {}); stop it first",
                paths.instance,
                pid.trim()
            );
        }
        Err((_, e)) => {
            return Err(e).with_context(|| format!("failed to lock {}", run_lock.display()))
        }
    };
    lock.set_len(0).ok();
    let _ = write!(lock, "{}", std::process::id());
    Ok(lock)
}

/// The reconcile loop, with the watchers, event readers and the metrics
/// endpoint around it; `None` when asked to stop.
async fn serve(
    mut reconciler: Reconciler,
    config: &Config,
    paths: &InstancePaths,
    metrics: Arc<Metrics>,
    published: tokio::sync::watch::Receiver<Arc<Enforced>>,
    log: AuditLog,
) -> anyhow::Result<Option<Stop>> {
    if let Some(addr) = config.metrics {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("failed to listen on {addr} for metrics"))?;
        tokio::spawn(http::serve(
            listener,
            http::Scrape {
                paths: paths.clone(),
                metrics: metrics.clone(),
                published: published.clone(),
            },
        ));
    }
    // A few batches queued at most: a flood waits for the writer instead
    // of piling up in memory.
    let (write_tx, write_rx) = mpsc::channel(4);
    tokio::spawn(events::writer(Some(log), write_rx));
    if crate::ebpf::is_installed(paths) {
        let ring = crate::ebpf::event_ring(paths)?;
        let decoder = events::Decoder::new(paths.clone(), published.clone());
        tokio::spawn(events::read_events(ring, decoder, write_tx.clone()));
        tokio::spawn(events::report_dropped(
            paths.clone(),
            metrics.clone(),
            write_tx.clone(),
        ));
    }
    if crate::nft::table_exists(&paths.instance) {
        match crate::nflog::bind(crate::nft::log_group(&paths.instance)) {
            Ok(sock) => {
                let decoder = events::Decoder::new(paths.clone(), published.clone());
                tokio::spawn(events::read_packets(
                    sock,
                    decoder,
                    metrics.clone(),
                    write_tx.clone(),
                ));
            }
            Err(e) => log::warn!("packet-layer events unavailable (nfnetlink_log): {e}"),
        }
    }
    let (tx, mut triggers) = mpsc::unbounded_channel();
    tokio::spawn(watch::ticker(tx.clone()));
    tokio::spawn(watch::local_routes(tx.clone()));
    tokio::spawn(watch::layers(
        paths.instance.clone(),
        watch::nft_events(),
        published.clone(),
        tx.clone(),
    ));
    tokio::spawn(watch::policy_file(config.file.clone(), tx.clone()));
    tokio::spawn(watch::accounts(
        ACCOUNT_FILES.iter().map(PathBuf::from).collect(),
        tx.clone(),
    ));
    tokio::spawn(watch::cgroups(published.clone(), tx));

    // The handlers first: a stop right after READY=1 must not kill the
    // process before it says what it leaves in force.
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    notify_systemd(&[NotifyState::Ready, NotifyState::Status("enforcing")]);
    log::info!("ready");
    loop {
        let first = tokio::select! {
            _ = hup.recv() => {
                // logrotate moves the file and sends SIGHUP: write to a new
                // one at the path from now on.
                let _ = write_tx.send(events::Write::Reopen).await;
                Trigger::Hangup
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            t = triggers.recv() => match t {
                Some(t) => t,
                None => break,
            },
        };
        // What else is pending, once each: a burst is one step per kind.
        let mut batch = vec![first];
        while let Ok(t) = triggers.try_recv() {
            if !batch.contains(&t) {
                batch.push(t);
            }
        }
        for trigger in batch {
            let reloads = reconciler.reloads(trigger);
            if reloads {
                notify_reloading();
            }
            let stop = reconciler.step(trigger);
            if reloads {
                notify_systemd(&[NotifyState::Ready]);
            }
            if let Some(stop) = stop {
                notify_systemd(&[
                    NotifyState::Stopping,
                    NotifyState::Status("not enforcing: removed"),
                ]);
                return Ok(Some(stop));
            }
        }
    }
    notify_systemd(&[NotifyState::Stopping]);
    Ok(None)
}

/// What the kernel enforces for the instance, attested: whether anything
/// is, and in words.
pub fn attested(paths: &InstancePaths) -> (bool, String) {
    let Ok(Some(state)) = State::load(paths) else {
        return (
            false,
            format!(
                "NOT ENFORCING: nothing of instance {} is in force",
                paths.instance
            ),
        );
    };
    let drift = crate::engine::health::drift(paths, &state);
    let enforcing: Vec<&str> = state
        .layers
        .iter()
        .filter(|l| !drift.iter().any(|d| d.damaged() == Some(**l)))
        .map(|l| l.as_str())
        .collect();
    let drift_words: Vec<String> = drift.iter().map(ToString::to_string).collect();
    if enforcing.is_empty() {
        (false, format!("NOT ENFORCING: {}", drift_words.join("; ")))
    } else if drift.is_empty() {
        (
            true,
            format!(
                "the kernel enforces plan {} on {} (read back now; pinned, it stays in force)",
                state.plan.id,
                enforcing.join("+")
            ),
        )
    } else {
        (
            true,
            format!(
                "the kernel enforces plan {} on {} only: {}",
                state.plan.id,
                enforcing.join("+"),
                drift_words.join("; ")
            ),
        )
    }
}

/// `sd_notify(3)`, when systemd set $NOTIFY_SOCKET (a no-op otherwise).
fn notify_systemd(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        log::debug!("sd_notify: {e}");
    }
}

/// RELOADING=1 with the MONOTONIC_USEC that `Type=notify-reload` wants.
fn notify_reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify_systemd(&[NotifyState::Reloading, now]),
        Err(_) => notify_systemd(&[NotifyState::Reloading]),
    }
}
