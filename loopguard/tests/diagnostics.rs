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
    let got: Vec<(usize, usize, &str)> =
        records.iter().map(|r| (r.line, r.column, r.code)).collect();
    assert_eq!(got, [(2, 1, "unknown-key"), (7, 1, "unknown-key")]);
}
