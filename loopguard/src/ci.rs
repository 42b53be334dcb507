//! `check`'s outputs for CI: SARIF 2.1.0 for code-scanning uploads, and
//! GitHub Actions workflow commands (`::error file=…,line=…,col=…::`) that
//! annotate the pull request's diff.

use serde_sarif::sarif::{
    ArtifactLocation, Location, Message, MultiformatMessageString, PhysicalLocation, Region,
    ReportingDescriptor, Result as SarifResult, ResultLevel, Run, Sarif, Tool, ToolComponent,
    SCHEMA_URL,
};

use crate::diag::{Code, Record, Severity};

/// What each code is about, for the SARIF rule's short description.
fn describe(code: Code) -> &'static str {
    match code {
        Code::Syntax => "The file is not valid TOML.",
        Code::Type => "A value has the wrong type.",
        Code::Value => "A value is out of its allowed set.",
        Code::UnknownKey => "A key loopguard does not know (a typo?).",
        Code::MissingKey => "A required key is missing.",
        Code::Version => "An unsupported policy format version.",
        Code::Name => "An invalid or reserved service name.",
        Code::Port => "An invalid port or port range.",
        Code::Address => "An invalid address.",
        Code::Addresses => "Addresses outside loopback, or not a list.",
        Code::Id => "An invalid user or group id.",
        Code::NoList => "A service with no allow- or deny-list.",
        Code::BothLists => "A service with both an allow- and a deny-list.",
        Code::DuplicateName => "Two services with one name.",
        Code::AmbiguousOverlap => "Two services overlap and neither contains the other.",
        Code::SameMatch => "Services that match exactly the same traffic.",
        Code::UnknownUser => "A user name this host does not know.",
        Code::UnknownGroup => "A group name this host does not know.",
        Code::Cgroup => "An invalid cgroup path.",
        Code::Unit => "An invalid systemd unit name, or units on a host without systemd.",
        Code::CutsOffRoot => "The policy would cut root off from essential local services.",
        Code::BindEphemeral => "A bind guard on ports in the ephemeral range.",
    }
}

/// The SARIF log of `check`'s diagnostics over every file checked.
pub fn sarif(records: &[Record]) -> Sarif {
    let rules: Vec<ReportingDescriptor> = Code::ALL
        .iter()
        .map(|c| {
            ReportingDescriptor::builder()
                .id(c.as_str())
                .name(c.as_str())
                .short_description(
                    MultiformatMessageString::builder()
                        .text(describe(*c))
                        .build(),
                )
                .help_uri(format!(
                    "https://github.com/loopguard/loopguard/blob/main/docs/policy.md#{}",
                    c.as_str()
                ))
                .build()
        })
        .collect();
    let results: Vec<SarifResult> = records
        .iter()
        .map(|r| {
            let primary = r.labels.iter().find(|l| l.primary).or(r.labels.first());
            let region = match primary {
                Some(l) => Region::builder()
                    .start_line(l.line as i64)
                    .start_column(l.column as i64)
                    .end_line(l.end_line as i64)
                    .end_column(l.end_column as i64)
                    .build(),
                None => Region::builder()
                    .start_line(r.line as i64)
                    .start_column(r.column as i64)
                    .build(),
            };
            let mut text = r.message.clone();
            for note in &r.notes {
                text.push('\n');
                text.push_str(note);
            }
            SarifResult::builder()
                .rule_id(r.code.as_str())
                .level(match r.severity {
                    Severity::Error => ResultLevel::Error,
                    Severity::Warning => ResultLevel::Warning,
                })
                .message(Message::builder().text(text).build())
                .locations(vec![Location::builder()
                    .physical_location(
                        PhysicalLocation::builder()
                            .artifact_location(ArtifactLocation::builder().uri(&r.file).build())
                            .region(region)
                            .build(),
                    )
                    .build()])
                .build()
        })
        .collect();
    let driver = ToolComponent::builder()
        .name("loopguard")
        .version(env!("CARGO_PKG_VERSION"))
        .information_uri("https://github.com/loopguard/loopguard")
        .rules(rules)
        .build();
    Sarif::builder()
        .schema(SCHEMA_URL)
        .version(serde_json::json!("2.1.0"))
        .runs(vec![Run::builder()
            .tool(Tool::builder().driver(driver).build())
            .results(results)
            .build()])
        .build()
}

/// One GitHub Actions workflow command per diagnostic.
pub fn github(records: &[Record]) -> String {
    // Workflow command values escape %, CR and LF; properties also , and :.
    let data = |s: &str| {
        s.replace('%', "%25")
            .replace('\r', "%0D")
            .replace('\n', "%0A")
    };
    let prop = |s: &str| data(s).replace(':', "%3A").replace(',', "%2C");
    let mut out = String::new();
    for r in records {
        let level = match r.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        let primary = r.labels.iter().find(|l| l.primary).or(r.labels.first());
        let end = primary
            .map(|l| format!(",endLine={},endColumn={}", l.end_line, l.end_column))
            .unwrap_or_default();
        let mut message = r.message.clone();
        for note in &r.notes {
            message.push('\n');
            message.push_str(note);
        }
        out.push_str(&format!(
            "::{level} file={},line={},col={}{end},title={}::{}\n",
            prop(&r.file),
            r.line,
            r.column,
            prop(&format!("loopguard {}", r.code)),
            data(&message)
        ));
    }
    out
}
