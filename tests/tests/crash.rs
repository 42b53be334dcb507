//! Crash consistency and damage by others (issue: "both layers always
//! enforce the same whole policy"): `apply` aborted at every named step
//! (LOOPGUARD_FAULT), layers deleted behind loopguard's back, `remove`
//! racing `apply`, symlinks planted where loopguard writes.

use std::path::Path;

use loopguard_tests::{tail, users, Sandbox, TestUser};

const PORTS: [u16; 2] = [7101, 7102];

/// Two services; `who` is the only uid let through on both.
fn policy(who: &TestUser) -> String {
    PORTS
        .iter()
        .map(|p| {
            format!(
                "[[service]]\nname = \"s{p}\"\nport = {p}\nallow_users = [\"{}\"]\n",
                who.name
            )
        })
        .fold("version = 1\n".to_string(), |a, b| a + &b)
}

/// Which whole policy one layer enforces: "A" (alice through, bob not, on
/// both ports), "B" (the other way round), or what it does instead.
fn verdict(through: impl Fn(&TestUser, u16) -> bool) -> String {
    let u = users();
    let seen: Vec<(bool, bool)> = PORTS
        .iter()
        .map(|&p| (through(&u.alice, p), through(&u.bob, p)))
        .collect();
    if seen.iter().all(|s| *s == (true, false)) {
        "A".into()
    } else if seen.iter().all(|s| *s == (false, true)) {
        "B".into()
    } else {
        format!("mixed {seen:?}")
    }
}

/// (eBPF layer, nftables layer). Inside the cgroup the socket hook answers
/// first (EPERM); a connect it lets through meets the packet layer. Outside
/// the cgroup only the packet layer judges.
fn layers(sb: &Sandbox) -> (String, String) {
    let bpf =
        verdict(|u, p| sb.probe(Some(u), &["tcp", &format!("127.0.0.1:{p}")]) != "connect=EPERM");
    let nft = verdict(|u, p| {
        sb.probe_outside(Some(u), &["tcp", &format!("127.0.0.1:{p}")]) == "connect=ok"
    });
    (bpf, nft)
}

fn status(sb: &Sandbox) -> (i32, serde_json::Value) {
    let r = sb.lg(&["status", "--format", "json"]);
    let v = serde_json::from_str(&r.stdout).unwrap_or_else(|e| {
        panic!("status json ({e}): {} {}", r.stdout, r.stderr);
    });
    (r.code, v)
}

#[test]
fn apply_killed_at_every_step_leaves_whole_policies_and_the_next_apply_converges() {
    let u = users();
    for step in [
        "after-journal",
        "mid-stage",
        "after-stage",
        "after-nft",
        "after-flip",
        "before-state",
    ] {
        let sb = Sandbox::new(&format!("crash-{}", &step[..step.len().min(10)]));
        let a = sb.policy("a.toml", &policy(&u.alice));
        let b = sb.policy("b.toml", &policy(&u.bob));
        sb.apply(&a, &[]).ok();
        assert_eq!(layers(&sb), ("A".into(), "A".into()), "{step}: before");

        let cgroup = sb.cgroup.to_str().expect("utf-8");
        let b_path = b.to_str().expect("utf-8");
        let r = sb.lg_env(
            &[("LOOPGUARD_FAULT", step)],
            &["apply", b_path, "--cgroup", cgroup],
        );
        assert_ne!(r.code, 0, "{step}: the fault must abort apply");
        assert!(r.stderr.contains("LOOPGUARD_FAULT"), "{step}: {}", r.stderr);

        // Each layer enforces one whole policy: the old or the new.
        let (bpf, nft) = layers(&sb);
        for (layer, got) in [("bpf", &bpf), ("nft", &nft)] {
            assert!(got == "A" || got == "B", "{step}: {layer} enforces {got}");
        }
        let expected = match step {
            "after-journal" | "mid-stage" | "after-stage" => ("A", "A"),
            "after-nft" => ("A", "B"),
            _ => ("B", "B"),
        };
        assert_eq!((bpf.as_str(), nft.as_str()), expected, "{step}");

        // status says something is off, and what.
        let (code, v) = status(&sb);
        assert_eq!(code, 5, "{step}: status must report drift: {v}");
        let drift = v["drift"].to_string();
        assert!(drift.contains("interrupted"), "{step}: {drift}");
        // The state still names A: a layer on B is named as drift.
        assert_eq!(
            drift.contains("nftables layer enforces plan"),
            nft == "B",
            "{step}: {drift}"
        );
        assert_eq!(
            drift.contains("eBPF layer enforces plan"),
            bpf == "B",
            "{step}: {drift}"
        );

        // The next apply converges both layers, whichever policy it puts
        // in force. After `mid-stage` the eBPF slot half holds B: putting
        // A there must clear it (bob's uid in A's uid set would let him
        // through), not take it for an empty slot.
        if step == "mid-stage" {
            sb.apply(&a, &[]).ok();
            assert_eq!(layers(&sb), ("A".into(), "A".into()), "{step}: A again");
        }
        sb.apply(&b, &[]).ok();
        assert_eq!(layers(&sb), ("B".into(), "B".into()), "{step}: after");
        let (code, v) = status(&sb);
        assert_eq!(code, 0, "{step}: {v}");
        assert_eq!(v["drift"], serde_json::json!([]), "{step}");
        sb.apply(&a, &[]).ok();
        assert_eq!(layers(&sb), ("A".into(), "A".into()), "{step}: back");
    }
}

#[test]
fn a_layer_deleted_by_someone_else_is_reported_and_restored_by_apply() {
    let u = users();
    let sb = Sandbox::new("damage");
    let a = sb.policy("a.toml", &policy(&u.alice));
    sb.apply(&a, &[]).ok();
    assert_eq!(status(&sb).0, 0);

    // Another tool deletes the table (as `nft flush ruleset` does).
    sb.in_netns(&["nft", "delete", "table", "inet", &sb.instance])
        .ok();
    let (code, v) = status(&sb);
    assert_eq!(code, 5, "{v}");
    assert!(
        v["drift"].to_string().contains("nftables layer missing"),
        "{v}"
    );
    sb.apply(&a, &[]).ok();
    assert_eq!(layers(&sb), ("A".into(), "A".into()));
    assert_eq!(status(&sb).0, 0);

    // Someone unpins the links: the programs detach.
    let links = Path::new("/sys/fs/bpf").join(&sb.instance).join("links");
    for e in std::fs::read_dir(&links).expect("links dir").flatten() {
        std::fs::remove_file(e.path()).expect("unpin");
    }
    let (code, v) = status(&sb);
    assert_eq!(code, 5, "{v}");
    assert!(v["drift"].to_string().contains("eBPF layer missing"), "{v}");
    sb.apply(&a, &[]).ok();
    assert_eq!(layers(&sb), ("A".into(), "A".into()));
    assert_eq!(status(&sb).0, 0);
}

#[test]
fn remove_racing_apply_never_runs_two_applies_at_once() {
    let u = users();
    let sb = Sandbox::new("race");
    let a = sb.policy("a.toml", &policy(&u.alice));
    let a = a.to_str().expect("utf-8");
    let cgroup = sb.cgroup.to_str().expect("utf-8");
    for round in 0..10 {
        let failures: Vec<String> = std::thread::scope(|s| {
            let applies: Vec<_> = (0..2)
                .map(|_| s.spawn(|| sb.lg(&["apply", a, "--cgroup", cgroup])))
                .collect();
            let remove = s.spawn(|| sb.lg(&["remove"]));
            let mut out: Vec<String> = applies
                .into_iter()
                .map(|h| h.join().expect("thread"))
                .filter(|r| r.code != 0)
                .map(|r| r.stderr)
                .collect();
            let r = remove.join().expect("thread");
            if r.code != 0 {
                out.push(r.stderr);
            }
            out
        });
        assert!(failures.is_empty(), "round {round}: {failures:?}");
    }
    sb.lg(&["remove"]).ok();
}

#[test]
fn planted_symlinks_are_not_followed() {
    let u = users();
    let sb = Sandbox::new("symlink");
    let a = sb.policy("a.toml", &policy(&u.alice));
    sb.apply(&a, &[]).ok();
    let victim = sb.dir.join("victim");
    std::fs::write(&victim, "precious").expect("victim");
    let state_dir = Path::new("/run/loopguard").join(&sb.instance);
    let tmp = state_dir.join("state.json.tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&victim, &tmp).expect("plant");
    sb.apply(&a, &[]).ok();
    assert_eq!(
        std::fs::read_to_string(&victim).expect("victim"),
        "precious",
        "the state write followed a planted link"
    );
    // The state is private to root.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&state_dir)
        .expect("state dir")
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "state dir mode {mode:o}");
    let mode = std::fs::metadata(state_dir.join("state.json"))
        .expect("state file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "state file mode {mode:o}");

    // A symlink where the audit log goes: the daemon refuses to write
    // through it.
    let log_dir = sb.dir.join("log");
    std::fs::create_dir_all(&log_dir).expect("log dir");
    std::os::unix::fs::symlink(&victim, log_dir.join("audit.jsonl")).expect("plant");
    let r = sb.lg(&[
        "run",
        a.to_str().expect("utf-8"),
        "--cgroup",
        sb.cgroup.to_str().expect("utf-8"),
        "--audit-log",
        log_dir.join("audit.jsonl").to_str().expect("utf-8"),
    ]);
    assert_ne!(r.code, 0, "run must refuse the planted log: {}", r.stderr);
    assert_eq!(
        std::fs::read_to_string(&victim).expect("victim"),
        "precious"
    );
}

#[test]
fn run_killed_mid_reload_is_reported_and_its_restart_converges() {
    let u = users();
    let mut sb = Sandbox::new("crash-run");
    let p = sb.policy("p.toml", &policy(&u.alice));
    // The daemon's own apply at start is the first time it reaches the
    // step; the reload is the second.
    let d = sb.start_daemon_env(&p, &[], &[("LOOPGUARD_FAULT", "after-nft@2")]);
    assert_eq!(layers(&sb), ("A".into(), "A".into()));
    std::fs::write(&p, policy(&u.bob)).expect("edit");
    d.signal(nix::sys::signal::Signal::SIGHUP);
    d.wait_exit(30);
    assert!(
        d.log().contains("LOOPGUARD_FAULT"),
        "{}",
        tail(&d.log(), 4000)
    );
    assert_eq!(layers(&sb), ("A".into(), "B".into()), "split at the fault");
    let (code, v) = status(&sb);
    assert_eq!(code, 5, "{v}");
    assert!(v["drift"].to_string().contains("interrupted"), "{v}");
    // systemd restarts the daemon: its first apply converges.
    let _d = sb.start_daemon(&p, &[]);
    assert_eq!(layers(&sb), ("B".into(), "B".into()));
    assert_eq!(status(&sb).0, 0);
}

#[test]
fn pins_out_of_sight_are_found_not_attached_twice() {
    let u = users();
    let sb = Sandbox::new("hidden-pins");
    let a = sb.policy("a.toml", &policy(&u.alice));
    sb.apply(&a, &[]).ok();
    let before = loopguard_tests::attached_program_ids(&sb.cgroup);
    // Another mount namespace with its own, empty bpffs: the instance's
    // pins are not visible there.
    let script = format!(
        "mount -t bpf bpf /sys/fs/bpf && nsenter --net={ns} {lg} --instance {inst} apply {p} --cgroup {cg}",
        ns = sb.netns_path.display(),
        lg = loopguard_tests::loopguard_bin().display(),
        inst = sb.instance,
        p = a.display(),
        cg = sb.cgroup.display(),
    );
    let out = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .expect("unshare");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "apply must refuse: {stderr}");
    assert!(stderr.contains("already has programs attached"), "{stderr}");
    assert_eq!(
        loopguard_tests::attached_program_ids(&sb.cgroup),
        before,
        "no second set attached"
    );
    assert_eq!(layers(&sb), ("A".into(), "A".into()));
}

#[test]
fn commands_from_another_network_namespace_are_refused() {
    let u = users();
    let sb = Sandbox::new("foreign-ns");
    let a = sb.policy("a.toml", &policy(&u.alice));
    sb.apply(&a, &[]).ok();
    // The same instance, from the host's namespace (not the sandbox's).
    let host = |args: &[&str]| {
        let out = std::process::Command::new(loopguard_tests::loopguard_bin())
            .args(["--instance", &sb.instance])
            .args(args)
            .output()
            .expect("run loopguard");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let cgroup = sb.cgroup.to_str().expect("utf-8");
    for args in [
        vec!["remove"],
        vec!["status"],
        vec!["apply", a.to_str().expect("utf-8"), "--cgroup", cgroup],
        vec!["explain", "--uid", "0", "--to", "127.0.0.1:7101"],
    ] {
        let (code, stderr) = host(&args);
        assert_ne!(code, 0, "{args:?} from another namespace must fail");
        assert!(
            stderr.contains("guards another network namespace"),
            "{args:?}: {stderr}"
        );
    }
    // Nothing was removed or changed where the instance lives.
    assert!(sb.nft_table().is_some(), "the table is still in force");
    assert_eq!(layers(&sb), ("A".into(), "A".into()));
    assert_eq!(status(&sb).0, 0);
}
