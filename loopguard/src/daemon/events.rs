//! Audit events: read from the eBPF ring buffer and from NFLOG, decoded
//! with the plan that decided them, and written by one writer task to
//! stdout (journald) and the audit log. The readers hold the plan in force
//! through the published handle: no lock on the daemon, no plan copied.

use std::{
    collections::HashMap,
    io::{self, Write as _},
    sync::Arc,
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use loopguard_common::Event;
use netlink_sys::Socket;
use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, watch},
};

use super::{metrics::Metrics, Enforced};
use crate::{
    audit::{self, AuditLog, AuditRecord, Clock, EventNames},
    compile::Plan,
    paths::InstancePaths,
    state::{FileStamp, State},
};

/// One audit record as written: its JSON line, and the syslog priority
/// journald files it under when stdout is the journal (a refusal or lost
/// events a warning, a would-deny a notice, an allowed attempt info), so
/// `journalctl -u loopguard -p warning` lists the refusals.
pub(super) struct EventLine {
    priority: u8,
    text: String,
}

impl EventLine {
    pub(super) fn of(record: &AuditRecord) -> EventLine {
        use audit::AuditAction;
        let priority = match record.action {
            AuditAction::Deny | AuditAction::Dropped => 4,
            AuditAction::WouldDeny => 5,
            AuditAction::Allow => 6,
        };
        EventLine {
            priority,
            text: record.to_line(),
        }
    }
}

/// What the writer task is asked to do.
pub(super) enum Write {
    Lines(Vec<EventLine>),
    /// logrotate moved the audit log (SIGHUP): write to a new one.
    Reopen,
}

/// The one writer of stdout and the audit log.
pub(super) async fn writer(mut log: Option<AuditLog>, mut rx: mpsc::Receiver<Write>) {
    // Under systemd (JOURNAL_STREAM), each line with its sd-daemon
    // priority prefix; elsewhere plain JSON lines.
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    while let Some(w) = rx.recv().await {
        let lines = match w {
            Write::Lines(lines) => lines,
            Write::Reopen => {
                if let Some(log) = log.as_mut() {
                    if let Err(e) = log.reopen() {
                        log::error!("audit log: cannot reopen: {e}");
                    }
                }
                continue;
            }
        };
        if lines.is_empty() {
            continue;
        }
        let mut text = String::with_capacity(lines.iter().map(|l| l.text.len() + 4).sum());
        for l in &lines {
            if journal {
                text.push_str(&format!("<{}>", l.priority));
            }
            text.push_str(&l.text);
            text.push('\n');
        }
        let mut out = io::stdout().lock();
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
        if let Some(log) = &mut log {
            let texts: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
            if let Err(e) = log.write_lines(&texts) {
                log::error!("audit log: {e}");
            }
        }
    }
}

/// Names the service of each event: by the id of the plan that decided it
/// (the eBPF layer stamps each event), among the plan in force and the few
/// before it. It follows the state file itself (a stat per batch), so a
/// packet after another process's apply is named by the new plan at once.
pub(super) struct Decoder {
    paths: InstancePaths,
    published: watch::Receiver<Arc<Enforced>>,
    current: Option<Arc<Plan>>,
    plans: HashMap<u64, Arc<Plan>>,
    state_seen: Option<FileStamp>,
    /// A plan id seen in an event and found nowhere: not looked for again
    /// until the state file changes.
    unknown_plan: Option<u64>,
    names: EventNames,
    clock: Clock,
}

impl Decoder {
    pub(super) fn new(paths: InstancePaths, published: watch::Receiver<Arc<Enforced>>) -> Decoder {
        Decoder {
            paths,
            published,
            current: None,
            plans: HashMap::new(),
            state_seen: None,
            unknown_plan: None,
            names: EventNames::default(),
            clock: Clock::now(),
        }
    }

    /// Takes up what the daemon published (the plan in force and the ones
    /// before it) and what the state file says now. Called once per batch.
    pub(super) fn refresh(&mut self) {
        if self.current.is_none() || self.published.has_changed().unwrap_or(false) {
            let enforced = self.published.borrow_and_update().clone();
            for p in &enforced.recent {
                self.remember(p.clone());
            }
            if let Some(p) = &enforced.plan {
                self.current = Some(p.clone());
                // The state the daemon read or wrote: nothing new in it.
                if enforced.state_stamp.is_some() {
                    self.state_seen = enforced.state_stamp;
                }
            }
        }
        let stamp = FileStamp::of(&self.paths.state_file);
        if stamp.is_none() || stamp == self.state_seen {
            return;
        }
        self.state_seen = stamp;
        self.unknown_plan = None;
        match State::load(&self.paths) {
            Ok(Some(state)) if self.current.as_ref().map(|p| &p.id) != Some(&state.plan.id) => {
                let plan = Arc::new(state.plan);
                self.remember(plan.clone());
                self.current = Some(plan);
            }
            Ok(_) => {}
            Err(e) => log::warn!("{e}"),
        }
    }

    /// Keeps `plan` for decoding events, and at most three others.
    fn remember(&mut self, plan: Arc<Plan>) {
        const KEPT: usize = 4;
        let id = plan.id_number();
        if self.plans.len() >= KEPT && !self.plans.contains_key(&id) {
            let current = self.current.as_ref().map(|p| p.id_number());
            if let Some(old) = self.plans.keys().copied().find(|k| Some(*k) != current) {
                self.plans.remove(&old);
            }
        }
        self.plans.insert(id, plan);
    }

    /// An event decided by a plan this daemon has not seen: another
    /// process's apply flipped to it and has not saved its state yet (or
    /// crashed before it could): its journal holds the plan.
    fn learn_plan(&mut self, id: u64) {
        if self.unknown_plan == Some(id) {
            return;
        }
        match State::load_pending(&self.paths) {
            Ok(Some(pending)) if pending.plan.id_number() == id => {
                log::info!(
                    "following plan {} ({}), being applied by another process",
                    pending.plan.id,
                    pending.policy_path.display()
                );
                self.remember(Arc::new(pending.plan));
                return;
            }
            Ok(_) => {}
            Err(e) => log::warn!("{e}"),
        }
        log::warn!(
            "events decided by plan {id:016x}, which neither the state nor the journal holds: recorded without a service"
        );
        self.unknown_plan = Some(id);
    }

    /// The record of one eBPF event.
    pub(super) fn event(&mut self, ev: &Event) -> EventLine {
        if ev.plan_id != 0 && !self.plans.contains_key(&ev.plan_id) {
            self.learn_plan(ev.plan_id);
        }
        // A plan found nowhere is not guessed at: the record says the
        // policy that decided is not loaded rather than name a service
        // of another plan.
        let plan = match ev.plan_id {
            0 => self.current.as_deref(),
            id => self.plans.get(&id).map(Arc::as_ref),
        };
        EventLine::of(&audit::record(ev, plan, &self.clock, &mut self.names))
    }

    /// The record of one NFLOG packet, if it is one of the instance's.
    pub(super) fn packet(&mut self, ev: &crate::nflog::PacketEvent) -> Option<EventLine> {
        audit::packet_record(
            ev,
            &self.paths.instance,
            self.current.as_deref(),
            &mut self.names,
        )
        .map(|r| EventLine::of(&r))
    }
}

/// Events (or NFLOG datagrams) read in one turn of the event loop; a flood
/// cannot starve signals, repair or the metrics endpoint.
const EVENTS_PER_WAKEUP: usize = 16 * 1024;
const DATAGRAMS_PER_WAKEUP: usize = 64;

/// Streams the eBPF layer's events.
pub(super) async fn read_events(
    ring: RingBuf<MapData>,
    mut decoder: Decoder,
    tx: mpsc::Sender<Write>,
) {
    // SAFETY: the ring owns its fd and lives inside the AsyncFd.
    let mut fd = match unsafe { AsyncFd::register(ring) } {
        Ok(fd) => fd,
        Err(e) => {
            log::error!("cannot poll the event ring: {e}");
            return;
        }
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        decoder.refresh();
        // Drain in bounded batches, each handed to the writer as it fills:
        // memory stays flat however long the flood, and the writes are
        // large. At most EVENTS_PER_WAKEUP before the other tasks
        // (signals, the reconcile loop, metrics) get a turn.
        let mut taken = 0;
        let mut more = false;
        loop {
            let mut lines = Vec::with_capacity(BATCH);
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                if item.len() >= size_of::<Event>() {
                    // SAFETY: the kernel wrote an Event (repr(C), any bits valid).
                    let ev: Event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                    drop(item);
                    lines.push(decoder.event(&ev));
                }
                taken += 1;
                if lines.len() == BATCH || taken == EVENTS_PER_WAKEUP {
                    break;
                }
            }
            let full = lines.len() == BATCH || taken == EVENTS_PER_WAKEUP;
            if !lines.is_empty() && tx.send(Write::Lines(lines)).await.is_err() {
                return;
            }
            if taken == EVENTS_PER_WAKEUP {
                more = true;
                break;
            }
            if !full {
                break;
            }
        }
        if more {
            // Still readable: come back after the others had their turn.
            drop(guard);
            tokio::task::yield_now().await;
        } else {
            guard.clear_ready();
        }
    }
}

/// Lines handed to the writer at a time.
const BATCH: usize = 1024;

/// Refusals of the nftables layer, from NFLOG; gaps in the kernel's
/// sequence numbers are reported as dropped.
pub(super) async fn read_packets(
    sock: Socket,
    mut decoder: Decoder,
    metrics: Arc<Metrics>,
    tx: mpsc::Sender<Write>,
) {
    // SAFETY: the socket owns its fd and lives inside the AsyncFd.
    let Ok(fd) = (unsafe { AsyncFd::register(sock) }) else {
        return;
    };
    let mut buf = vec![0u8; 256 * 1024];
    let mut next_seq: Option<u32> = None;
    loop {
        let Ok(mut guard) = fd.readable().await else {
            return;
        };
        let mut lines = Vec::new();
        let mut lost = 0u64;
        // Whether the socket may hold more than this turn took.
        let mut more = true;
        for _ in 0..DATAGRAMS_PER_WAKEUP {
            let n = match super::watch::recv_nonblocking(guard.get_inner(), &mut buf) {
                Ok(0) => {
                    more = false;
                    break;
                }
                Ok(n) => n,
                // Overflow: the sequence gap says how much was lost.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => continue,
                Err(_) => {
                    more = false;
                    break;
                }
            };
            decoder.refresh();
            for ev in crate::nflog::parse(&buf[..n]) {
                if let Some(seq) = ev.seq {
                    if let Some(expected) = next_seq {
                        lost += u64::from(seq.wrapping_sub(expected));
                    }
                    next_seq = Some(seq.wrapping_add(1));
                }
                lines.extend(decoder.packet(&ev));
            }
        }
        if more {
            tokio::task::yield_now().await;
        } else {
            guard.clear_ready();
        }
        if lost > 0 {
            metrics.dropped.inc_by(lost);
            lines.push(EventLine::of(&audit::dropped_record(
                lost,
                audit::EventLayer::Packet,
            )));
        }
        if tx.send(Write::Lines(lines)).await.is_err() {
            return;
        }
    }
}

/// Reports events lost to a full ring, at most twice a second.
pub(super) async fn report_dropped(
    paths: InstancePaths,
    metrics: Arc<Metrics>,
    tx: mpsc::Sender<Write>,
) {
    let Ok(maps) = crate::ebpf::Maps::open_pinned(&paths) else {
        return;
    };
    let mut last = maps.dropped().unwrap_or(0);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let now = maps.dropped().unwrap_or(last);
        if now > last {
            metrics.dropped.inc_by(now - last);
            let line = EventLine::of(&audit::dropped_record(
                now - last,
                audit::EventLayer::Connect,
            ));
            if tx.send(Write::Lines(vec![line])).await.is_err() {
                return;
            }
            last = now;
        }
    }
}
