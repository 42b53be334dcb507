//! Diagnostics: every problem found in a policy file, with its location,
//! rendered like a compiler's (codespan-reporting) or as JSON records.

use std::ops::Range;

use codespan_reporting::{
    diagnostic::{Diagnostic as CsDiagnostic, Label as CsLabel, Severity as CsSeverity},
    files::SimpleFile,
    term,
};
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Label {
    pub span: Range<usize>,
    pub message: String,
    pub primary: bool,
}

/// What a diagnostic is about: a stable identifier for scripts, docs and
/// the gate (`cuts-off-root` is matched as a type, never as text).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Code {
    Syntax,
    Type,
    Value,
    UnknownKey,
    MissingKey,
    Version,
    Name,
    Port,
    Address,
    Addresses,
    Id,
    NoList,
    BothLists,
    DuplicateName,
    AmbiguousOverlap,
    SameMatch,
    UnknownUser,
    UnknownGroup,
    Cgroup,
    Unit,
    CutsOffRoot,
    BindEphemeral,
}

impl Code {
    /// Every code, in the order the README lists them.
    pub const ALL: [Code; 22] = [
        Code::Syntax,
        Code::Type,
        Code::Value,
        Code::UnknownKey,
        Code::MissingKey,
        Code::Version,
        Code::Name,
        Code::Port,
        Code::Address,
        Code::Addresses,
        Code::Id,
        Code::NoList,
        Code::BothLists,
        Code::DuplicateName,
        Code::AmbiguousOverlap,
        Code::SameMatch,
        Code::UnknownUser,
        Code::UnknownGroup,
        Code::Cgroup,
        Code::Unit,
        Code::CutsOffRoot,
        Code::BindEphemeral,
    ];

    /// The code as printed and documented, e.g. `unknown-key`.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Syntax => "syntax",
            Code::Type => "type",
            Code::Value => "value",
            Code::UnknownKey => "unknown-key",
            Code::MissingKey => "missing-key",
            Code::Version => "version",
            Code::Name => "name",
            Code::Port => "port",
            Code::Address => "address",
            Code::Addresses => "addresses",
            Code::Id => "id",
            Code::NoList => "no-list",
            Code::BothLists => "both-lists",
            Code::DuplicateName => "duplicate-name",
            Code::AmbiguousOverlap => "ambiguous-overlap",
            Code::SameMatch => "same-match",
            Code::UnknownUser => "unknown-user",
            Code::UnknownGroup => "unknown-group",
            Code::Cgroup => "cgroup",
            Code::Unit => "unit",
            Code::CutsOffRoot => "cuts-off-root",
            Code::BindEphemeral => "bind-ephemeral",
        }
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One problem in one policy file. Spans are byte ranges into its source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub code: Code,
    pub message: String,
    pub labels: Vec<Label>,
    pub notes: Vec<String>,
}

impl Diagnostic {
    pub fn error(code: Code, message: impl Into<String>) -> Self {
        // A message is one line of plain text: control characters from the
        // file (a key or name with a newline or an escape sequence) are
        // shown escaped, never sent to the terminal.
        let message: String = message.into();
        let message = if message.chars().any(char::is_control) {
            message
                .chars()
                .map(|c| {
                    if c.is_control() {
                        c.escape_default().to_string()
                    } else {
                        c.to_string()
                    }
                })
                .collect()
        } else {
            message
        };
        Self {
            severity: Severity::Error,
            code,
            message,
            labels: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub fn warning(code: Code, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Warning,
            ..Self::error(code, message)
        }
    }

    pub fn primary(mut self, span: Range<usize>, message: impl Into<String>) -> Self {
        self.labels.push(Label {
            span,
            message: message.into(),
            primary: true,
        });
        self
    }

    pub fn secondary(mut self, span: Range<usize>, message: impl Into<String>) -> Self {
        self.labels.push(Label {
            span,
            message: message.into(),
            primary: false,
        });
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.notes.push(note.into());
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

/// A source file and what was found in it.
pub struct Report<'a> {
    pub file: &'a str,
    pub source: &'a str,
    pub diagnostics: &'a [Diagnostic],
}

/// Line starts of a source, so many offsets resolve in O(log n) each (a
/// 10,000-service policy has 10,000 locations).
pub struct LineIndex<'a> {
    source: &'a str,
    starts: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    pub fn new(source: &'a str) -> Self {
        let mut starts = vec![0];
        starts.extend(source.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex { source, starts }
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = self
            .source
            .floor_char_boundary(offset.min(self.source.len()));
        let line = self.starts.partition_point(|s| *s <= offset);
        let start = self.starts[line - 1];
        let col = self.source[start..offset].chars().count() + 1;
        (line, col)
    }
}

impl Report<'_> {
    /// Compiler-style text: `error[code]: message`, the `file:line:col`, the
    /// source lines with underlined labels, then notes.
    pub fn render_human(&self) -> String {
        let file = SimpleFile::new(self.file, self.source);
        let config = term::Config::default();
        let mut out = String::new();
        for d in self.diagnostics {
            let severity = match d.severity {
                Severity::Error => CsSeverity::Error,
                Severity::Warning => CsSeverity::Warning,
            };
            let labels = d
                .labels
                .iter()
                .map(|l| {
                    let span = clamp(self.source, &l.span);
                    if l.primary {
                        CsLabel::primary((), span).with_message(&l.message)
                    } else {
                        CsLabel::secondary((), span).with_message(&l.message)
                    }
                })
                .collect();
            let cs = CsDiagnostic::new(severity)
                .with_code(d.code.as_str())
                .with_message(&d.message)
                .with_labels(labels)
                .with_notes(d.notes.clone());
            if term::emit_to_string(&mut out, &config, &file, &cs).is_err() {
                // A span outside the file is a bug; still say what is wrong.
                out.push_str(&format!("{}: {}\n", self.file, d.message));
            }
        }
        out
    }

    /// One record per diagnostic, locations resolved to line and column.
    pub fn records(&self) -> Vec<Record> {
        let index = LineIndex::new(self.source);
        self.diagnostics
            .iter()
            .map(|d| {
                let labels: Vec<RecordLabel> = d
                    .labels
                    .iter()
                    .map(|l| {
                        let (line, column) = index.line_col(l.span.start);
                        let (end_line, end_column) = index.line_col(l.span.end);
                        RecordLabel {
                            line,
                            column,
                            end_line,
                            end_column,
                            message: l.message.clone(),
                            primary: l.primary,
                        }
                    })
                    .collect();
                let (line, column) = labels
                    .iter()
                    .find(|l| l.primary)
                    .or(labels.first())
                    .map_or((1, 1), |l| (l.line, l.column));
                Record {
                    file: self.file.to_string(),
                    line,
                    column,
                    severity: d.severity,
                    code: d.code,
                    message: d.message.clone(),
                    labels,
                    notes: d.notes.clone(),
                }
            })
            .collect()
    }
}

fn clamp(source: &str, span: &Range<usize>) -> Range<usize> {
    let start = source.floor_char_boundary(span.start.min(source.len()));
    let end = source
        .floor_char_boundary(span.end.min(source.len()))
        .max(start);
    start..end
}

/// The `--format json` form of a diagnostic (stable interface).
#[derive(Clone, Debug, Serialize)]
pub struct Record {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub severity: Severity,
    pub code: Code,
    pub message: String,
    pub labels: Vec<RecordLabel>,
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RecordLabel {
    pub line: usize,
    pub column: usize,
    pub end_line: usize,
    pub end_column: usize,
    pub message: String,
    pub primary: bool,
}
