//! What an operator sees before anything is enforced (no root needed).

use std::process::Command;

#[test]
fn a_dry_run_says_where_a_real_apply_would_attach() {
    // Uids only: no account needs to exist on the machine.
    let policy = std::env::temp_dir().join(format!("lg-dry-run-{}.toml", std::process::id()));
    std::fs::write(
        &policy,
        "version = 1\n[[service]]\nname = \"db\"\nport = 5432\nallow_users = [0, 1001]\n",
    )
    .expect("write policy");
    let out = Command::new(env!("CARGO_BIN_EXE_loopguard"))
        .args(["--instance", "lg-dry-run-where", "apply"])
        .arg(&policy)
        .arg("--dry-run")
        .output()
        .expect("run loopguard");
    let _ = std::fs::remove_file(&policy);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("would enforce with layers bpf+nft"),
        "{stdout}"
    );
    // No --cgroup: the programs would sit on the cgroup2 root.
    assert!(
        stdout.contains("the whole host, every process") || stdout.contains("bpf: cannot attach"),
        "{stdout}"
    );
    assert!(
        stdout.contains("nft: table inet lg-dry-run-where"),
        "{stdout}"
    );
    assert!(
        stdout.trim_end().ends_with("dry run: nothing changed"),
        "{stdout}"
    );
}

#[test]
fn the_docs_say_unix_sockets_are_not_guarded_and_what_to_do() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).expect("README");
    let policy = std::fs::read_to_string(format!("{root}/docs/policy.md")).expect("policy.md");
    assert!(readme.contains("Unix-domain sockets are not guarded"));
    assert!(policy.contains("## What is guarded: IP, not Unix-domain sockets"));
    for doc in [&readme, &policy] {
        // What to set meanwhile: the socket's mode and group.
        assert!(doc.contains("unix_socket_permissions") && doc.contains("unixsocketperm"));
    }
}
