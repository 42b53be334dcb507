//! The rendered diagnostics of bad policies, pinned by snapshots. Review
//! changes with `cargo insta review` (or INSTA_UPDATE=always).

use loopguard::{diag::Report, policy};

fn render(name: &str) -> String {
    let path = format!("tests/bad/{name}.toml");
    let source = std::fs::read_to_string(&path).expect("read bad policy");
    let (p, mut diags) = policy::load(&path, source.as_str());
    if let Some(p) = &p {
        if !diags.iter().any(|d| d.is_error()) {
            diags.extend(policy::lint(
                p,
                None,
                &policy::EphemeralPorts::linux_default(),
            ));
        }
    }
    assert!(
        !diags.is_empty(),
        "{name}: a bad policy must produce diagnostics"
    );
    Report {
        file: &path,
        source: &source,
        diagnostics: &diags,
    }
    .render_human()
}

macro_rules! snapshot {
    ($test:ident, $name:literal) => {
        #[test]
        fn $test() {
            insta::assert_snapshot!($name, render($name));
        }
    };
}

snapshot!(syntax, "syntax");
// One missing `]`: one error, where the `]` belongs, with where the array
// opens; the errors that follow from it are counted, not listed.
snapshot!(unclosed_array, "unclosed-array");
// The same before a table header, the most common layout.
snapshot!(unclosed_before_header, "unclosed-before-header");
// An unquoted name inside a closed array is not an unclosed array.
snapshot!(unquoted_in_array, "unquoted-in-array");
// A message is one line: the expected new line is said in words.
snapshot!(trailing_comma, "trailing-comma");
snapshot!(unknown_keys, "unknown-keys");
snapshot!(values, "values");
snapshot!(lists, "lists");
snapshot!(addresses, "addresses");
snapshot!(overlaps, "overlaps");
snapshot!(cuts_off_root, "cuts-off-root");

#[test]
fn json_records_carry_line_and_column() {
    let path = "tests/bad/unknown-keys.toml";
    let source = std::fs::read_to_string(path).expect("read");
    let (_, diags) = policy::load(path, source.as_str());
    let records = Report {
        file: path,
        source: &source,
        diagnostics: &diags,
    }
    .records();
    let got: Vec<(usize, usize, &str)> = records
        .iter()
        .map(|r| (r.line, r.column, r.code.as_str()))
        .collect();
    assert_eq!(got, [(2, 1, "unknown-key"), (7, 1, "unknown-key")]);
}

/// Hostile input stays bounded: 2,000 copies of one service are one error
/// naming a few of them, not 2,000·1,999/2, and the check takes well under
/// a second.
#[test]
fn many_identical_services_are_one_error() {
    let mut text = String::from("version = 1\n");
    for i in 0..2000 {
        text.push_str(&format!(
            "[[service]]\nname = \"s{i}\"\nport = 5432\nallow_users = [1]\n"
        ));
    }
    let started = std::time::Instant::now();
    let (_, diags) = policy::load("many.toml", text.as_str());
    let rendered = Report {
        file: "many.toml",
        source: &text,
        diagnostics: &diags,
    }
    .render_human();
    let took = started.elapsed();
    assert_eq!(diags.len(), 1, "{}", &rendered[..rendered.len().min(2000)]);
    assert!(rendered.contains("2000 services match exactly the same traffic"));
    assert!(rendered.contains("and 1990 more"));
    assert!(
        rendered.len() < 10_000,
        "{} bytes of output",
        rendered.len()
    );
    assert!(took < std::time::Duration::from_secs(1), "{took:?}");
}

/// Many ambiguous overlaps: the first hundred are listed, then one line.
#[test]
fn ambiguous_overlaps_are_capped() {
    let mut text = String::from("version = 1\n");
    for i in 0..1000 {
        text.push_str(&format!(
            "[[service]]\nname = \"s{i}\"\nport = \"{}-{}\"\nallow_users = [1]\n",
            1000 + i,
            3000 + i
        ));
    }
    let (_, diags) = policy::load("overlaps.toml", text.as_str());
    assert_eq!(diags.len(), 101);
}

#[test]
fn default_is_a_reserved_service_name() {
    let text = "version = 1\n[[service]]\nname = \"default\"\nport = 1\nallow_users = [1]\n";
    let (_, diags) = policy::load("d.toml", text);
    assert_eq!(diags.len(), 1, "{diags:?}");
    assert!(diags[0].message.contains("reserved"), "{diags:?}");
}

/// Every diagnostic code has its section in docs/policy.md (SARIF rules
/// link there), under the word the JSON records carry.
#[test]
fn every_code_is_documented_under_its_name() {
    let readme = std::fs::read_to_string("../docs/policy.md").expect("docs/policy.md");
    for code in loopguard::diag::Code::ALL {
        let json = serde_json::to_string(&code).expect("json");
        assert_eq!(json, format!("\"{code}\""), "serialized as printed");
        assert!(
            readme.contains(&format!("### {code}\n")),
            "docs/policy.md has no section for {code}"
        );
    }
}

#[test]
fn one_missing_bracket_is_one_error_and_messages_are_one_line() {
    for name in [
        "unclosed-array",
        "unclosed-before-header",
        "unquoted-in-array",
        "trailing-comma",
    ] {
        let path = format!("tests/bad/{name}.toml");
        let source = std::fs::read_to_string(&path).expect("read bad policy");
        let (_, diags) = policy::load(&path, source.as_str());
        assert_eq!(diags.len(), 1, "{name}: {diags:?}");
        assert!(
            !diags[0].message.contains('\n'),
            "{name}: {:?}",
            diags[0].message
        );
    }
}

#[test]
fn control_characters_in_names_are_shown_escaped() {
    let (_, diags) = policy::load("x.toml", "version = 1\n\"a\\nb\" = 1\n\"a\\nb\" = 2\n");
    assert!(!diags.is_empty());
    for d in &diags {
        assert!(!d.message.chars().any(char::is_control), "{:?}", d.message);
    }
}
