//! Checking a policy file: read it, parse and validate it, resolve its
//! names, lint it, and judge whether `apply` would enforce it. `check`,
//! `apply`, `explain` and `run` all go through here, so CI's verdict is the
//! rollout's.

use std::path::{Path, PathBuf};

use crate::{
    diag::{Code, Diagnostic, Report},
    policy::{self, Directory, Policy, Resolved},
};

/// A policy file that could not be read as text.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("failed to read {}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}:{col}: not UTF-8 (byte 0x{byte:02x}); policy files are UTF-8 text", path.display())]
    NotUtf8 {
        path: PathBuf,
        line: usize,
        col: usize,
        byte: u8,
    },
}

/// Reads a policy file with the path in the error.
pub fn read_policy(path: &Path) -> Result<String, ReadError> {
    let bytes = std::fs::read(path).map_err(|source| ReadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    String::from_utf8(bytes).map_err(|e| {
        // Where the first bad byte is, the way an editor counts.
        let bytes = e.as_bytes();
        let at = e.utf8_error().valid_up_to();
        let before = &bytes[..at];
        let line = before.iter().filter(|b| **b == b'\n').count() + 1;
        let line_start = before
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |i| i + 1);
        let col = String::from_utf8_lossy(&before[line_start..])
            .chars()
            .count()
            + 1;
        ReadError::NotUtf8 {
            path: path.to_path_buf(),
            line,
            col,
            byte: bytes[at],
        }
    })
}

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
    /// It names systemd units whose cgroups cannot be found here.
    Units,
}

impl Refusal {
    /// The summary line's words.
    pub fn says(self) -> &'static str {
        match self {
            Refusal::Errors => "apply refuses it",
            Refusal::CutsOffRoot => "apply refuses it without --force: it would cut root off from essential local services",
            Refusal::Units => "apply refuses it: it names systemd units, and their cgroups cannot be found on this host",
        }
    }
}

impl Checked {
    /// Whether (and why) `apply` refuses this file.
    pub fn refusal(&self, force: bool) -> Option<Refusal> {
        if self.errors() > 0 {
            Some(Refusal::Errors)
        } else if self.diagnostics.iter().any(|d| d.code == Code::Unit) {
            Some(Refusal::Units)
        } else if !force && self.diagnostics.iter().any(|d| d.code == Code::CutsOffRoot) {
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
    let (source, policy, mut diagnostics) =
        timed("parse and validate", || policy::load_text(&file, source));
    let mut resolved = None;
    // Every problem in one run: names are resolved and warnings looked
    // for in the services that parsed, whatever else is wrong.
    if let Some(p) = &policy {
        let had_errors = diagnostics.iter().any(Diagnostic::is_error);
        if let Some(dir) = dir {
            match timed("resolve", || policy::resolve(p, dir)) {
                Ok(r) => {
                    diagnostics.extend(r.unresolved_units.iter().cloned());
                    if !had_errors {
                        resolved = Some(r);
                    }
                }
                Err(d) => diagnostics.extend(d),
            }
        }
        {
            // Offline checks are for other hosts: judge against Linux's
            // default port range, not this machine's.
            let ephemeral = match dir {
                Some(_) => policy::EphemeralPorts::of_host(),
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
