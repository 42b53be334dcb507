//! apply, re-apply, failure, status, explain, check and remove as a user and
//! an operator see them.

use loopguard_tests::{attached_program_ids, loopguard_bin, users, wait_probe, Sandbox};

fn policy_a(alice: &str) -> String {
    format!(
        r#"version = 1
[[service]]
name = "app"
port = 7000
allow_users = ["{alice}"]

[[service]]
name = "filler"
port = 7100
deny_users = [12345]
"#
    )
}

/// Same verdicts on port 7000 as A, but every internal index differs:
/// service order, names, uid set ids, port atoms, address atoms.
fn policy_b(alice: &str, carol: &str) -> String {
    format!(
        r#"version = 1
[[service]]
name = "other"
port = "6990-6999"
allow_users = [0]

[[service]]
name = "app-renamed"
port = 7000
addresses = ["127.0.0.0/8", "::1"]
allow_users = ["{carol}", "{alice}"]

[[service]]
name = "narrow"
port = 7000
addresses = ["127.0.0.99"]
deny_users = [54321]
"#
    )
}

#[test]
fn reapply_under_load_is_atomic_and_reuses_pins() {
    let u = users();
    let mut sb = Sandbox::new("reapply");
    sb.spawn_listener(7000);
    let a = sb.policy("a.toml", &policy_a(u.alice.name));
    let b = sb.policy("b.toml", &policy_b(u.alice.name, u.carol.name));
    sb.apply(&a, &[]).ok();
    let ids = attached_program_ids(&sb.cgroup);
    assert_eq!(ids.len(), 6, "six hooks attached");

    let stop = sb.dir.join("stop");
    let stop = stop.to_str().expect("utf-8");
    let alice = sb.spawn_probe(Some(&u.alice), &["loop", "127.0.0.1:7000", stop]);
    let bob = sb.spawn_probe(Some(&u.bob), &["loop", "[::1]:7000", stop]);
    let applies = 12;
    for i in 0..applies {
        sb.apply(if i % 2 == 0 { &b } else { &a }, &[]).ok();
    }
    std::fs::write(stop, "").expect("stop file");
    let alice = wait_probe(alice);
    let bob = wait_probe(bob);
    let count = |s: &str, k: &str| -> u64 {
        s.split_whitespace()
            .find_map(|f| f.strip_prefix(&format!("{k}=")))
            .and_then(|n| n.parse().ok())
            .expect("count")
    };
    assert!(
        count(&alice, "ok") > 50,
        "alice's loop ran during the applies: {alice}"
    );
    assert_eq!(
        count(&alice, "eperm") + count(&alice, "other"),
        0,
        "alice: {alice}"
    );
    assert!(count(&bob, "eperm") > 50, "bob: {bob}");
    assert_eq!(count(&bob, "ok") + count(&bob, "other"), 0, "bob: {bob}");
    assert_eq!(
        attached_program_ids(&sb.cgroup),
        ids,
        "re-apply reused the pinned programs"
    );
    eprintln!("during {applies} applies: alice {alice}; bob {bob}");
}

#[test]
fn failed_apply_keeps_the_policy_in_force() {
    let u = users();
    let sb = Sandbox::new("failed-apply");
    let a = sb.policy("a.toml", &policy_a(u.alice.name));
    sb.apply(&a, &[]).ok();
    let before = sb.lg(&["status", "--format", "json"]).ok().stdout;

    // Unknown user: refused at resolution.
    let bad = sb.policy(
        "bad.toml",
        "version = 1\n[[service]]\nname = \"app\"\nport = 7000\nallow_users = [\"no-such-user-lg\"]\n",
    );
    let r = sb.apply(&bad, &[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("unknown user \"no-such-user-lg\""),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("bad.toml:5:17"),
        "location in: {}",
        r.stderr
    );

    // Syntax error.
    let broken = sb.policy("broken.toml", "version = 1\n[[service]\n");
    assert_eq!(sb.apply(&broken, &[]).code, 1);

    // A cgroup that is not cgroup v2: refused before touching the kernel.
    let r = sb.lg(&["apply", a.to_str().expect("utf-8"), "--cgroup", "/tmp"]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "one line: {}", r.stderr);

    assert_eq!(
        sb.probe(Some(&u.bob), &["tcp", "127.0.0.1:7000"]),
        "connect=EPERM"
    );
    assert_eq!(
        sb.probe(Some(&u.alice), &["tcp", "127.0.0.1:7000"]),
        "connect=ok"
    );
    let after = sb.lg(&["status", "--format", "json"]).ok().stdout;
    let hash = |s: &str| {
        serde_json::from_str::<serde_json::Value>(s).expect("json")["policy_hash"].clone()
    };
    assert_eq!(hash(&before), hash(&after));
}

#[test]
fn remove_leaves_nothing_behind() {
    let u = users();
    let sb = Sandbox::new("remove");
    sb.apply_text(&policy_a(u.alice.name));
    assert!(!sb.leftovers().is_empty());
    assert_eq!(
        sb.probe(Some(&u.bob), &["tcp", "127.0.0.1:7000"]),
        "connect=EPERM"
    );
    let r = sb.lg(&["remove"]).ok();
    assert!(r.stdout.contains("removed instance"), "{}", r.stdout);
    assert_eq!(sb.leftovers(), Vec::<String>::new());
    assert_eq!(
        sb.probe(Some(&u.bob), &["tcp", "127.0.0.1:7000"]),
        "connect=ok"
    );
    let again = sb.lg(&["remove"]).ok();
    assert!(
        again.stdout.contains("nothing installed"),
        "{}",
        again.stdout
    );
    let status = sb.lg(&["status"]);
    assert_eq!(status.code, 6, "{}", status.stdout);
    assert!(
        status
            .stdout
            .contains("not enforcing: nothing is installed"),
        "{}",
        status.stdout
    );
}

#[test]
fn explain_agrees_with_the_kernel() {
    let u = users();
    let sb = Sandbox::new("explain");
    let b = sb.policy("b.toml", &policy_b(u.alice.name, u.carol.name));
    sb.apply(&b, &[]).ok();
    let cases = [
        (&u.alice, "127.0.0.1:7000"),
        (&u.bob, "127.0.0.1:7000"),
        (&u.carol, "[::1]:7000"),
        (&u.bob, "127.0.0.99:7000"),
        (&u.alice, "127.0.0.1:6995"),
        (&u.bob, "127.0.0.1:7001"),
    ];
    for (user, to) in cases {
        let uid = user.uid.to_string();
        // From the applied state (root) and from the file (as the user).
        let applied = sb
            .lg(&["explain", "--uid", &uid, "--to", to, "--format", "json"])
            .ok();
        let v: serde_json::Value = serde_json::from_str(&applied.stdout).expect("explain json");
        let from_file = sb.exec_as(
            Some(user),
            &[
                loopguard_bin().to_str().expect("utf-8"),
                "explain",
                "--user",
                user.name,
                "--to",
                to,
                "--policy",
                b.to_str().expect("utf-8"),
                "--format",
                "json",
            ],
        );
        assert_eq!(from_file.code, 0, "{}", from_file.stderr);
        let w: serde_json::Value = serde_json::from_str(&from_file.stdout).expect("explain json");
        assert_eq!(v["action"], w["action"], "{to}");
        assert_eq!(v["service"], w["service"], "{to}");
        let seen = sb.probe(Some(user), &["tcp", to]);
        let expected = if v["action"] == "deny" {
            "connect=EPERM"
        } else {
            "connect=ok"
        };
        assert_eq!(seen, expected, "{} -> {to}: explain said {}", user.name, v);
    }
    let human = sb
        .lg(&["explain", "--user", u.bob.name, "--to", "127.0.0.1:7000"])
        .ok();
    assert!(human.stdout.starts_with("deny: uid"), "{}", human.stdout);
    assert!(
        human.stdout.contains("service app-renamed ("),
        "{}",
        human.stdout
    );
    assert!(human.stdout.contains("EPERM"), "{}", human.stdout);
}

#[test]
fn check_runs_without_root_and_reports_everything() {
    let u = users();
    let sb = Sandbox::new("check");
    let good = sb.policy("good.toml", &policy_a(u.alice.name));
    let bad = sb.policy(
        "bad.toml",
        "version = 1\nfoo = 1\n[[service]]\nname = \"x\"\nport = 0\nallow_users = [\"nobody-lg\"]\n",
    );
    let lg = loopguard_bin();
    let lg = lg.to_str().expect("utf-8");
    let ok = sb.exec_as(Some(&u.bob), &[lg, "check", good.to_str().expect("utf-8")]);
    assert_eq!(ok.code, 0, "{}{}", ok.stdout, ok.stderr);
    let r = sb.exec_as(
        Some(&u.bob),
        &[
            lg,
            "check",
            "--format",
            "json",
            bad.to_str().expect("utf-8"),
        ],
    );
    assert_eq!(r.code, 1, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("json");
    let codes: Vec<&str> = v["files"][0]["diagnostics"]
        .as_array()
        .expect("diagnostics")
        .iter()
        .map(|d| d["code"].as_str().expect("code"))
        .collect();
    assert_eq!(codes, ["unknown-key", "port"], "{}", r.stdout);
    assert_eq!(v["files"][0]["diagnostics"][1]["line"], 5);
    assert_eq!(v["files"][0]["diagnostics"][1]["column"], 8);
    // Unknown names are errors unless --offline.
    let fixed = sb.policy(
        "names.toml",
        "version = 1\n[[service]]\nname = \"x\"\nport = 1\nallow_users = [\"nobody-lg\"]\n",
    );
    assert_eq!(
        sb.exec_as(Some(&u.bob), &[lg, "check", fixed.to_str().expect("utf-8")])
            .code,
        1
    );
    assert_eq!(
        sb.exec_as(
            Some(&u.bob),
            &[lg, "check", "--offline", fixed.to_str().expect("utf-8")]
        )
        .code,
        0
    );
    // Unreadable: could not run.
    assert_eq!(
        sb.exec_as(Some(&u.bob), &[lg, "check", "/nonexistent.toml"])
            .code,
        2
    );
}

#[test]
fn operator_commands_need_root_and_say_so_in_one_line() {
    let u = users();
    let sb = Sandbox::new("not-root");
    let p = sb.policy("p.toml", &policy_a(u.alice.name));
    let lg = loopguard_bin();
    let lg = lg.to_str().expect("utf-8");
    for args in [
        vec!["apply", p.to_str().expect("utf-8")],
        vec!["status"],
        vec!["remove"],
    ] {
        let mut argv = vec![lg];
        argv.extend(args.iter().copied());
        let r = sb.exec_as(Some(&u.bob), &argv);
        assert_eq!(r.code, 3, "{args:?}: {}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains("needs root"), "{}", r.stderr);
    }
    assert!(sb.leftovers().is_empty());
}

#[test]
fn dry_run_changes_nothing_and_shows_the_diff() {
    let u = users();
    let sb = Sandbox::new("dry-run");
    let a = sb.policy("a.toml", &policy_a(u.alice.name));
    let r = sb.apply(&a, &["--dry-run"]).ok();
    assert!(r.stdout.contains("+ service app"), "{}", r.stdout);
    assert!(sb.leftovers().is_empty(), "dry run installed something");
    sb.apply(&a, &[]).ok();
    let b = sb.policy("b.toml", &policy_b(u.alice.name, u.carol.name));
    let r = sb.apply(&b, &["--dry-run"]).ok();
    assert!(r.stdout.contains("- service app "), "{}", r.stdout);
    assert!(r.stdout.contains("+ service app-renamed"), "{}", r.stdout);
    assert_eq!(
        sb.probe(Some(&u.bob), &["tcp", "127.0.0.1:7000"]),
        "connect=EPERM"
    );
}

#[test]
fn apply_mounts_bpffs_when_missing() {
    let u = users();
    let sb = Sandbox::new("bpffs");
    let p = sb.policy("p.toml", &policy_a(u.alice.name));
    // A private mount namespace without bpffs: apply must mount its own.
    // When the namespace ends, its bpffs and every pin in it go away, and
    // with the last reference the kernel detaches the programs.
    let script = format!(
        "while grep -q ' /sys/fs/bpf bpf ' /proc/self/mounts; do umount /sys/fs/bpf || break; done; \
         if grep -q ' /sys/fs/bpf bpf ' /proc/self/mounts; then echo still-mounted; exit 1; fi; \
         nsenter --net={ns} {lg} --instance {inst} apply {p} --cgroup {cg} >/dev/null || exit 1; \
         grep -q ' /sys/fs/bpf bpf ' /proc/self/mounts && echo mounted; \
         {probe} --netns {ns} --cgroup {cg} --uid {bob} tcp 127.0.0.1:7000",
        ns = sb.netns_path.display(),
        lg = loopguard_bin().display(),
        inst = sb.instance,
        p = p.display(),
        cg = sb.cgroup.display(),
        probe = loopguard_tests::probe_bin().display(),
        bob = u.bob.uid,
    );
    let out = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .expect("unshare");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.trim(),
        "mounted\nconnect=EPERM",
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The private bpffs is gone, and so is the attachment.
    for _ in 0..100 {
        if attached_program_ids(&sb.cgroup).is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(attached_program_ids(&sb.cgroup), Vec::<u64>::new());
}

/// Pins left by a loopguard with another map layout (an upgrade without
/// `remove`) are refused as such, saying what to do, before any map of
/// the new layout is opened; `remove` still clears them.
#[test]
fn pins_of_another_abi_are_refused_with_what_to_do() {
    let u = users();
    let sb = Sandbox::new("other-abi");
    let a = sb.policy("a.toml", &policy_a(u.alice.name));
    sb.apply(&a, &[]).ok();
    let pin = format!("/sys/fs/bpf/{}/maps/LG_CONFIG", sb.instance);
    let key = ["key", "0", "0", "0", "0"];
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "lookup", "pinned", &pin])
        .args(key)
        .output()
        .expect("bpftool");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bpftool lookup ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let mut value: Vec<String> = v["value"]
        .as_array()
        .expect("value bytes")
        .iter()
        .map(|b| b.as_str().expect("hex byte").to_string())
        .collect();
    // Config { active_slot: u32, abi_version: u32, .. }: ABI 5.
    value.splice(4..8, ["0x05", "0x00", "0x00", "0x00"].map(String::from));
    let status = std::process::Command::new("bpftool")
        .args(["map", "update", "pinned", &pin])
        .args(key)
        .arg("value")
        .args(&value)
        .status()
        .expect("bpftool");
    assert!(status.success(), "bpftool map update");
    // ABI 5's counters were a per-CPU array.
    let counters = format!("/sys/fs/bpf/{}/maps/LG_COUNTERS", sb.instance);
    std::fs::remove_file(&counters).expect("unpin LG_COUNTERS");
    let status = std::process::Command::new("bpftool")
        .args(["map", "create", &counters, "type", "percpu_array"])
        .args([
            "key",
            "4",
            "value",
            "8",
            "entries",
            "16",
            "name",
            "LG_COUNTERS",
        ])
        .status()
        .expect("bpftool");
    assert!(status.success(), "bpftool map create");

    let r = sb.apply(&a, &[]);
    assert_ne!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("another map layout (ABI 5") && r.stderr.contains("remove` first"),
        "{}",
        r.stderr
    );
    sb.lg(&["remove"]).ok();
    sb.apply(&a, &[]).ok();
}
