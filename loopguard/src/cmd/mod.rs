//! One module per subcommand.

pub mod apply;
pub mod audit;
pub mod check;
pub mod explain;
pub mod remove;
pub mod run;
pub mod status;

use std::path::Path;

use loopguard::{
    diag::{Diagnostic, Report},
    policy::{self, Directory, Policy, Resolved},
};

/// Everything known about one policy file after checking it.
pub struct Checked {
    pub file: String,
    pub source: std::sync::Arc<str>,
    pub policy: Option<Policy>,
    pub resolved: Option<Resolved>,
    pub diagnostics: Vec<Diagnostic>,
}

/// Why `apply` would not enforce a checked file: the one gate `check` and
/// `apply` share, so CI's verdict is the rollout's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The file has errors.
    Errors,
    /// It would cut root off from essential local services; `--force`
    /// overrides.
    CutsOffRoot,
}

impl Refusal {
    /// The summary line's words.
    pub fn says(self) -> &'static str {
        match self {
            Refusal::Errors => "apply refuses it",
            Refusal::CutsOffRoot => "apply refuses it without --force: it would cut root off from essential local services",
        }
    }
}

impl Checked {
    /// Whether (and why) `apply` refuses this file.
    pub fn refusal(&self, force: bool) -> Option<Refusal> {
        if self.errors() > 0 {
            Some(Refusal::Errors)
        } else if !force && self.diagnostics.iter().any(|d| d.code == "cuts-off-root") {
            Some(Refusal::CutsOffRoot)
        } else {
            None
        }
    }

    pub fn errors(&self) -> usize {
        self.diagnostics.iter().filter(|d| d.is_error()).count()
    }
    pub fn warnings(&self) -> usize {
        self.diagnostics.len() - self.errors()
    }
    pub fn report(&self) -> Report<'_> {
        Report {
            file: &self.file,
            source: &self.source,
            diagnostics: &self.diagnostics,
        }
    }
}

/// Parse, validate, and (with a directory) resolve names and lint.
pub fn check_source(file: &Path, source: String, dir: Option<&dyn Directory>) -> Checked {
    let file = file.display().to_string();
    // One copy of the text, shared by the policy and the report.
    let source: std::sync::Arc<str> = source.into();
    let (policy, mut diagnostics) =
        timed("parse and validate", || policy::load(&file, source.clone()));
    let mut resolved = None;
    // Every problem in one run: names are resolved and warnings looked
    // for in the services that parsed, whatever else is wrong.
    if let Some(p) = &policy {
        let had_errors = diagnostics.iter().any(Diagnostic::is_error);
        if let Some(dir) = dir {
            match timed("resolve", || policy::resolve(p, dir)) {
                Ok(r) if !had_errors => resolved = Some(r),
                Ok(_) => {}
                Err(d) => diagnostics.extend(d),
            }
        }
        {
            // Offline checks are for other hosts: judge against Linux's
            // default port range, not this machine's.
            let ephemeral = match dir {
                Some(_) => loopguard::host::ephemeral_ports(),
                None => policy::EphemeralPorts::linux_default(),
            };
            diagnostics.extend(timed("lint", || {
                policy::lint(p, resolved.as_ref(), &ephemeral)
            }));
        }
    }
    Checked {
        file,
        source,
        policy,
        resolved,
        diagnostics,
    }
}

/// Runs one phase of a command, logging how long it took (`-v`).
pub fn timed<T>(phase: &str, f: impl FnOnce() -> T) -> T {
    let started = std::time::Instant::now();
    let out = f();
    log::debug!("{phase}: {:.1} ms", started.elapsed().as_secs_f64() * 1e3);
    out
}

/// `1 service`, `3 services`
pub fn plural(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// `3 errors, 1 warning`
pub fn counts(errors: usize, warnings: usize) -> String {
    format!(
        "{}, {}",
        plural(errors, "error"),
        plural(warnings, "warning")
    )
}
