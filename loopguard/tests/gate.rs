//! `check` and `apply --dry-run` pass the same verdict on every policy the
//! project has (SPEC: one gate; CI's green is the rollout's green).

use std::process::Command;

fn code(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_loopguard"))
        .args(["--instance", "lg-gate-test"])
        .args(args)
        .output()
        .expect("run loopguard");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn check_and_apply_dry_run_agree_on_every_policy() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<_> = ["../examples", "tests/bad"]
        .iter()
        .flat_map(|d| std::fs::read_dir(root.join(d)).expect("dir").flatten())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 10, "{files:?}");
    for f in &files {
        let f = f.to_str().expect("utf-8");
        for force in [false, true] {
            let extra: &[&str] = if force { &["--force"] } else { &[] };
            let (check, said) = code(&[&["check", f][..], extra].concat());
            let (apply, applied) = code(&[&["apply", "--dry-run", f][..], extra].concat());
            assert!(
                (check == 0) == (apply == 0),
                "{f} (force {force}): check exit {check}, apply --dry-run exit {apply}\ncheck: {said}\napply: {applied}"
            );
        }
    }
}
