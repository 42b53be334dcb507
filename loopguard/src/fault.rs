//! Named fault points: crash-consistency tests abort a process at an exact
//! step instead of racing a signal against a clock.

/// Aborts the process at a named step when `LOOPGUARD_FAULT` names it
/// (`STEP`, or `STEP@N` for the N-th time the step is reached, e.g. a
/// daemon's first reload): crash-consistency tests kill `apply` and `run`
/// at exact points instead of racing a signal against a clock. The steps:
/// `after-journal`, `mid-stage` (the eBPF slot half written),
/// `after-stage`, `after-nft`, `after-flip`, `before-state`.
pub fn at(step: &str) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static REACHED: AtomicUsize = AtomicUsize::new(0);
    let Ok(want) = std::env::var("LOOPGUARD_FAULT") else {
        return;
    };
    let (name, nth) = match want.split_once('@') {
        Some((name, n)) => (name, n.parse().unwrap_or(1)),
        None => (want.as_str(), 1),
    };
    if name == step && REACHED.fetch_add(1, Ordering::SeqCst) + 1 == nth {
        eprintln!("loopguard: LOOPGUARD_FAULT={want}: aborting");
        std::process::abort();
    }
}
