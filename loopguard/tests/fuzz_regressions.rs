//! Inputs that once crashed or exhausted loopguard (found by hand or by
//! `cargo xtask fuzz`), replayed through every stage a policy goes
//! through. A new find goes into `tests/fuzz/` as it is.

#[test]
fn every_recorded_find_runs_through_without_a_crash() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz");
    let mut ran = 0;
    for entry in std::fs::read_dir(&dir).expect("tests/fuzz").flatten() {
        let bytes = std::fs::read(entry.path()).expect("read");
        if let Ok(text) = std::str::from_utf8(&bytes) {
            loopguard::exercise::policy_text(text);
        }
        ran += 1;
    }
    assert!(ran > 0, "no recorded inputs in {}", dir.display());
}
