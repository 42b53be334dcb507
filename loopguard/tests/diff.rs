//! `loopguard diff` on the pairs in `tests/diff/`: a refactor changes no
//! access (exit 0); each real change is named (exit 1). The human, JSON
//! and GitHub outputs are snapshots.

use std::process::Command;

fn diff(new: &str, format: &str) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_loopguard"))
        .current_dir("tests/diff")
        .args(["diff", "base.toml", new, "--format", format])
        .output()
        .expect("run loopguard");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn a_refactor_changes_no_access() {
    let (code, out) = diff("refactor.toml", "human");
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("no change in access"), "{out}");
    let (code, out) = diff("refactor.toml", "json");
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["changed"], false);
}

#[test]
fn each_change_in_access_is_named() {
    for (file, says) in [
        ("group-added.toml", "postgres: group analysts gains access"),
        (
            "cgroup-added.toml",
            "postgres: cgroup user.slice gains access",
        ),
        (
            "port-widened.toml",
            "metrics: ports 9100-9199 -> 9000-9199 (widened)",
        ),
        ("audit.toml", "redis: mode enforce -> audit: WEAKENED"),
        ("bind-dropped.toml", "postgres: bind guard DROPPED"),
        // Under default allow a service restricts: matching less opens.
        (
            "port-narrowed.toml",
            "metrics: ports 9100-9199 -> 9100-9149 (narrowed): OPENS ACCESS",
        ),
    ] {
        let (code, out) = diff(file, "human");
        assert_eq!(code, 1, "{file}: {out}");
        assert!(out.contains(says), "{file}: {out}");
        let name = file.trim_end_matches(".toml");
        insta::assert_snapshot!(format!("diff_human_{name}"), out);
        let (code, json) = diff(file, "json");
        assert_eq!(code, 1, "{file}");
        insta::assert_snapshot!(format!("diff_json_{name}"), json);
        let (code, md) = diff(file, "github");
        assert_eq!(code, 1, "{file}");
        insta::assert_snapshot!(format!("diff_github_{name}"), md);
    }
}

#[test]
fn a_file_with_errors_is_exit_2() {
    let dir = std::env::temp_dir().join(format!("lg-diff-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "version = 1\n[[service]]\nname = \"x\"\nport = 99999\n",
    )
    .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_loopguard"))
        .args(["diff", "tests/diff/base.toml"])
        .arg(&bad)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("has errors"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_rename_is_a_rename_not_a_removal() {
    let (code, out) = diff("renamed.toml", "human");
    assert_eq!(code, 0, "a rename changes no one's access: {out}");
    assert!(out.starts_with("no change in access"), "{out}");
    assert!(
        out.contains("~ service postgres renamed to postgresql"),
        "{out}"
    );
    assert!(
        !out.contains("OPENS ACCESS") && !out.contains("removed"),
        "{out}"
    );
    // Access is compared across the rename.
    let (code, out) = diff("renamed-and-opened.toml", "human");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("~ service postgres renamed to pg"), "{out}");
    assert!(out.contains("+ pg: user guest gains access"), "{out}");
    assert!(!out.contains("removed"), "{out}");
    let (_, out) = diff("renamed.toml", "json");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["changed"], false);
    assert_eq!(v["services"][0]["renamed_from"], "postgres");
}
