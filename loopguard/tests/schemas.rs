//! The schemas CI and editors rely on: `check --format sarif` is valid
//! SARIF 2.1.0, and the policy JSON Schema (`docs/policy.schema.json`)
//! accepts every shipped policy and rejects the structural mistakes in
//! `tests/bad/`.

use std::process::Command;

fn schema(path: &str) -> jsonschema::Validator {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let v: serde_json::Value = serde_json::from_str(&text).expect("schema JSON");
    jsonschema::validator_for(&v).expect("a valid schema")
}

fn errors(validator: &jsonschema::Validator, doc: &serde_json::Value) -> Vec<String> {
    validator
        .iter_errors(doc)
        .take(5)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect()
}

#[test]
fn check_sarif_is_valid_sarif_2_1_0() {
    let out = Command::new(env!("CARGO_BIN_EXE_loopguard"))
        .args(["check", "--offline", "--format", "sarif"])
        .args([
            "tests/bad/values.toml",
            "tests/bad/overlaps.toml",
            "tests/bad/cuts-off-root.toml",
            "../examples/workstation.toml",
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1), "the bad files fail the check");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let sarif = schema("tests/schemas/sarif-schema-2.1.0.json");
    let errs = errors(&sarif, &doc);
    assert!(errs.is_empty(), "{errs:?}");
    let results = doc["runs"][0]["results"].as_array().expect("results");
    assert!(results.len() >= 3, "{}", results.len());
    assert!(results
        .iter()
        .any(|r| r["ruleId"] == "cuts-off-root" && r["level"] == "warning"));
    let first = &results[0]["locations"][0]["physicalLocation"];
    assert_eq!(first["artifactLocation"]["uri"], "tests/bad/values.toml");
    assert!(first["region"]["startLine"]
        .as_u64()
        .is_some_and(|l| l >= 1));
}

#[test]
fn check_github_writes_workflow_commands() {
    let out = Command::new(env!("CARGO_BIN_EXE_loopguard"))
        .args([
            "check",
            "--offline",
            "--format",
            "github",
            "tests/bad/values.toml",
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next().expect("a line");
    assert!(
        first.starts_with("::error file=tests/bad/values.toml,line=1,col="),
        "{first}"
    );
    assert!(text
        .lines()
        .all(|l| l.starts_with("::error ") || l.starts_with("::warning ")));
}

fn toml_as_json(path: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).expect("read");
    let v: toml::Value =
        toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::to_value(v).expect("json")
}

#[test]
fn the_policy_schema_takes_every_shipped_policy() {
    let policy = schema("../docs/policy.schema.json");
    let mut files: Vec<_> = ["../examples", "tests/diff"]
        .iter()
        .flat_map(|d| std::fs::read_dir(d).expect("dir"))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 5);
    for f in files {
        let errs = errors(&policy, &toml_as_json(&f));
        assert!(errs.is_empty(), "{}: {errs:?}", f.display());
    }
}

#[test]
fn the_policy_schema_rejects_the_structural_mistakes() {
    let policy = schema("../docs/policy.schema.json");
    // Unknown keys, values outside their sets, both lists / no list. (The
    // rest of tests/bad needs the whole file or the host: `check`'s job.)
    for f in ["unknown-keys.toml", "values.toml", "lists.toml"] {
        let path = std::path::Path::new("tests/bad").join(f);
        let errs = errors(&policy, &toml_as_json(&path));
        assert!(!errs.is_empty(), "{f} passed the schema");
    }
}
