//! What packaging installs is generated from the CLI itself: completions
//! for each shell and a man page per visible command.

use std::process::Command;

#[test]
fn completions_for_every_packaged_shell() {
    for (shell, marker) in [
        ("bash", "_loopguard()"),
        ("zsh", "#compdef loopguard"),
        ("fish", "complete -c loopguard"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_loopguard"))
            .args(["completions", shell])
            .output()
            .expect("run");
        assert!(out.status.success(), "{shell}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(marker),
            "{shell}: {}",
            &text[..text.len().min(200)]
        );
        assert!(
            text.contains("apply") && text.contains("scan"),
            "{shell} knows the commands"
        );
    }
}

#[test]
fn a_man_page_per_command() {
    let dir = std::env::temp_dir().join(format!("lg-man-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_loopguard"))
        .arg("manpages")
        .arg(&dir)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for page in [
        "loopguard",
        "loopguard-apply",
        "loopguard-check",
        "loopguard-run",
        "loopguard-scan",
        "loopguard-diff",
        "loopguard-learn",
    ] {
        let text = std::fs::read_to_string(dir.join(format!("{page}.8")))
            .unwrap_or_else(|e| panic!("{page}.8: {e}"));
        assert!(text.contains(".TH"), "{page}.8 is a man page");
    }
    assert!(
        !dir.join("loopguard-manpages.8").exists(),
        "the hidden command has no page"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// `dpkg -P` leaves none of the packaged instance's files: every path
/// `InstancePaths` names for it outside the pins is in postrm (a new one
/// that is not fails here, not in the systemd VM).
#[test]
fn postrm_removes_every_file_of_the_packaged_instance() {
    let postrm = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../packaging/debian/postrm"
    ))
    .expect("postrm");
    let p = loopguard::paths::InstancePaths::new(loopguard::paths::DEFAULT_INSTANCE);
    for path in [
        &p.state_dir,
        &p.good_dir,
        &p.lock_file,
        &p.run_lock_file,
        &p.removed_by_file,
        &p.audit_log_file,
    ] {
        let path = path.display().to_string();
        assert!(postrm.contains(&path), "postrm does not remove {path}");
    }
}
