//! The README's example policies pass `check`, online (names resolved on
//! this host) and offline.

use std::process::Command;

#[test]
fn example_policies_check_clean() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("examples dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "examples: {files:?}");
    for offline in [false, true] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_loopguard"));
        cmd.arg("check");
        if offline {
            cmd.arg("--offline");
        }
        let out = cmd.args(&files).output().expect("run loopguard check");
        assert_eq!(
            out.status.code(),
            Some(0),
            "offline={offline}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(stdout.matches(": ok,").count(), files.len(), "{stdout}");
        assert!(
            stdout.matches("(0 errors, 0 warnings)").count() == files.len(),
            "{stdout}"
        );
    }
}
