//! cgroup identities (SPEC §2): a process in a listed cgroup, or below it,
//! is on the list whatever its uid; the same uid elsewhere is not. Under
//! `run`, a listed cgroup removed and made again (a new id) is followed
//! within a second. Layer by layer: the eBPF layer judges cgroups, the
//! nftables layer never refuses what it admits, and nftables alone
//! refuses a policy that names cgroups.
//!
//! Since the nftables layer passes services that list a cgroup, such a
//! policy is enforced only with the programs on the cgroup2 root (else
//! processes outside the attach cgroup would go unjudged): the tests that
//! enforce one attach there, so they run on the VM matrix's disposable
//! guests and say SKIPPED on a host.

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use loopguard_tests::{cgroup2_root, tail, users, wait_until_probe, Daemon, Sandbox, TestUser};

/// `dir` relative to the cgroup2 root, as a policy names it.
fn rel(dir: &Path) -> String {
    dir.strip_prefix(cgroup2_root())
        .expect("under the cgroup2 root")
        .display()
        .to_string()
}

fn mkdir(dir: &Path) -> PathBuf {
    fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    dir.to_path_buf()
}

fn policy(app: &Path, later: &Path, other: &Path, alice: &TestUser) -> String {
    format!(
        "version = 1\n\
         [[service]]\nname = \"db\"\nport = 7021\nallow_users = [{}]\nallow_cgroups = [\"{}\", \"{}\"]\n\
         [[service]]\nname = \"cache\"\nport = 7022\ndeny_cgroups = [\"/{}/\"]\n",
        alice.uid,
        rel(app),
        rel(later),
        rel(other),
    )
}

#[test]
#[ignore = "attaches at the cgroup2 root: runs on the VM matrix (cargo xtask vm-test), never on a host"]
fn a_listed_cgroup_and_its_children_are_on_the_list_on_bpf_and_both() {
    let u = users();
    for layers in ["bpf", "both"] {
        let Some(sb) = Sandbox::on_root(&format!("cg-{layers}")) else {
            return;
        };
        let app = mkdir(&sb.cgroup.join("app"));
        let worker = mkdir(&app.join("worker"));
        let other = mkdir(&sb.cgroup.join("other"));
        let later = sb.cgroup.join("later");
        let p = sb.policy("p.toml", &policy(&app, &later, &other, &u.alice));
        sb.apply(&p, &["--layers", layers]).ok();

        let db = ["tcp", "127.0.0.1:7021"];
        let cache = ["tcp", "127.0.0.1:7022"];
        let at = |who: &TestUser, dir: &Path, args: &[&str]| sb.probe_in(Some(who), dir, args);
        assert_eq!(at(&u.bob, &app, &db), "connect=ok", "{layers}: bob in app");
        assert_eq!(
            at(&u.bob, &worker, &db),
            "connect=ok",
            "{layers}: below app"
        );
        assert_eq!(
            at(&u.bob, &other, &db),
            "connect=EPERM",
            "{layers}: bob elsewhere"
        );
        assert_eq!(
            sb.probe(Some(&u.bob), &db),
            "connect=EPERM",
            "{layers}: bob in the parent"
        );
        assert_eq!(
            at(&u.alice, &other, &db),
            "connect=ok",
            "{layers}: a listed uid"
        );
        // IPv6 and UDP take the same path.
        assert_eq!(
            at(&u.bob, &other, &["tcp", "[::1]:7021"]),
            "connect=EPERM",
            "{layers}: ::1"
        );
        // The deny-list names `other`: bob there is refused, elsewhere not.
        assert_eq!(
            at(&u.bob, &other, &cache),
            "connect=EPERM",
            "{layers}: deny"
        );
        assert_eq!(
            at(&u.bob, &app, &cache),
            "connect=ok",
            "{layers}: not denied"
        );
        // A cgroup that did not exist at apply matches nothing after a
        // one-shot apply (no daemon follows it).
        let later = mkdir(&later);
        assert_eq!(
            at(&u.bob, &later, &db),
            "connect=EPERM",
            "{layers}: made after apply"
        );
    }
}

/// A sandbox and a policy listing its cgroup `app` (and two that do not
/// exist).
fn with_policy(name: &str) -> (Sandbox, PathBuf) {
    let sb = Sandbox::new(name);
    let app = mkdir(&sb.cgroup.join("app"));
    let p = sb.policy(
        "p.toml",
        &policy(
            &app,
            &sb.cgroup.join("l"),
            &sb.cgroup.join("o"),
            &users().alice,
        ),
    );
    (sb, p)
}

/// On a host (programs on the test's own cgroup), a policy listing cgroups
/// is refused: the nftables layer would let processes outside that cgroup
/// through those services.
#[test]
fn a_policy_listing_cgroups_needs_the_programs_on_the_cgroup2_root() {
    let (sb, p) = with_policy("cg-child");
    for layers in ["bpf", "both"] {
        let ran = sb.apply(&p, &["--layers", layers]);
        assert_ne!(ran.code, 0, "{layers}: applied on a child cgroup");
        assert!(
            ran.stderr.contains("rather than the cgroup2 root"),
            "{layers}: stderr: {}",
            tail(&ran.stderr, 600)
        );
        assert!(sb.nft_table().is_none(), "{layers}: a table was left");
        assert!(
            loopguard_tests::attached_programs(&sb.cgroup).is_empty(),
            "{layers}: programs were left"
        );
    }
}

#[test]
fn nftables_alone_refuses_a_policy_that_names_cgroups() {
    let (sb, p) = with_policy("cg-nft");
    let ran = sb.apply(&p, &["--layers", "nft"]);
    assert_ne!(ran.code, 0, "applied with nft alone");
    assert!(
        ran.stderr.contains("--layers bpf or both"),
        "stderr: {}",
        tail(&ran.stderr, 600)
    );
    assert!(sb.nft_table().is_none(), "a table was left");
}

/// Until `who` in `dir` gets `want` from the guarded port: within the
/// second the daemon promises.
fn wait_for(sb: &Sandbox, who: &TestUser, dir: &Path, want: &str, what: &str, d: &Daemon) {
    wait_until_probe(
        || sb.probe_in(Some(who), dir, &["tcp", "127.0.0.1:7021"]),
        want,
        Duration::from_secs(1),
        what,
        || d.log(),
    );
}

#[test]
#[ignore = "attaches at the cgroup2 root: runs on the VM matrix (cargo xtask vm-test), never on a host"]
fn run_follows_a_listed_cgroup_made_again_within_a_second() {
    let u = users();
    for (layers, metrics) in [("bpf", "127.0.0.1:9481"), ("both", "127.0.0.1:9482")] {
        let Some(mut sb) = Sandbox::on_root(&format!("cgrun-{layers}")) else {
            return;
        };
        let app = mkdir(&sb.cgroup.join("app"));
        let other = mkdir(&sb.cgroup.join("other"));
        let later = sb.cgroup.join("later");
        let p = sb.policy("p.toml", &policy(&app, &later, &other, &u.alice));
        let d = sb.start_daemon(&p, &["--layers", layers, "--metrics", metrics]);
        assert_eq!(
            sb.probe_in(Some(&u.bob), &app, &["tcp", "127.0.0.1:7021"]),
            "connect=ok",
            "{layers}: before"
        );

        // Removed and made again: a new id, followed.
        fs::remove_dir(&app).expect("rmdir app");
        let app = mkdir(&app);
        wait_for(&sb, &u.bob, &app, "connect=ok", layers, &d);
        // A cgroup listed before it existed, once it does.
        let later = mkdir(&later);
        wait_for(&sb, &u.bob, &later, "connect=ok", layers, &d);
        d.wait_log(
            &format!("cgroup {} of service db was made again", rel(&app)),
            5,
            layers,
        );

        // Cgroup follows are their own metrics, not the user database's.
        let text = sb.probe(None, &["http", metrics, "/metrics"]);
        let value = |name: &str| -> Option<f64> {
            text.lines()
                .find(|l| l.starts_with(&format!("{name} ")))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse().ok())
        };
        assert!(
            value("loopguard_cgroups_resolved_timestamp_seconds").is_some_and(|v| v > 0.0),
            "{layers}: {}",
            tail(&text, 1500)
        );
        assert_eq!(
            value("loopguard_accounts_resolved_timestamp_seconds"),
            Some(0.0),
            "{layers}"
        );
        assert_eq!(
            value("loopguard_cgroups_refresh_failures_total"),
            Some(0.0),
            "{layers}"
        );

        // The refusal's event names the cgroup the process ran in.
        assert_eq!(
            sb.probe_in(Some(&u.bob), &other, &["tcp", "127.0.0.1:7021"]),
            "connect=EPERM"
        );
        let other_rel = rel(&other);
        let is_it = |e: &serde_json::Value| {
            e["event.action"] == "deny"
                && e["loopguard.service"] == "db"
                && e["user.id"] == u.bob.uid
                && e["loopguard.cgroup"] == other_rel.as_str()
        };
        d.wait_events(
            10,
            &format!("{layers}: bob's refusal in {other_rel}"),
            |ev| ev.iter().any(is_it),
        );
    }
}

/// This machine kind runs no systemd: a policy naming units is a warning
/// for `check` and a clear refusal for `apply`, which changes nothing.
#[test]
fn units_without_systemd_are_refused_clearly() {
    if Path::new("/run/systemd/system").exists() {
        eprintln!("SKIPPED: this host runs systemd; the refusal needs a host without it");
        return;
    }
    let sb = Sandbox::new("cg-units");
    let p = sb.policy(
        "p.toml",
        "version = 1\n[[service]]\nname = \"db\"\nport = 7023\nallow_units = [\"grafana.service\"]\n",
    );
    let file = p.to_str().expect("utf-8");
    let check = sb.lg(&["check", file]);
    assert_ne!(check.code, 0, "check passed: {}", tail(&check.stdout, 600));
    let all = format!("{}{}", check.stdout, check.stderr);
    assert!(
        all.contains("warning[unit]") && all.contains("does not run systemd"),
        "check said: {}",
        tail(&all, 800)
    );
    let apply = sb.apply(&p, &["--layers", "bpf"]);
    assert_ne!(apply.code, 0, "applied");
    assert!(
        apply.stderr.contains("names systemd units"),
        "apply said: {}",
        tail(&apply.stderr, 800)
    );
    assert!(sb.nft_table().is_none());
}

/// `explain --pid` reads a process's uid and cgroup; `--cgroup` names one.
/// Both judge as the kernel does: by the cgroups that existed when the
/// names were resolved. No enforcement needed (`--policy`).
#[test]
fn explain_judges_a_process_by_its_cgroup() {
    let u = users();
    let sb = Sandbox::new("cg-explain");
    let app = mkdir(&sb.cgroup.join("app"));
    let other = mkdir(&sb.cgroup.join("other"));
    let p = sb.policy(
        "p.toml",
        &policy(&app, &sb.cgroup.join("later"), &other, &u.alice),
    );
    let file = p.to_str().expect("utf-8");
    let explain = |who: &[&str]| {
        let mut args = vec!["explain", "--to", "127.0.0.1:7021", "--policy", file];
        args.extend_from_slice(who);
        let ran = sb.lg(&args);
        assert_eq!(ran.code, 0, "explain {who:?}: {}", tail(&ran.stderr, 600));
        ran.stdout
    };
    let worker = format!("{}/worker", rel(&app));
    let out = explain(&["--uid", &u.bob.uid.to_string(), "--cgroup", &worker]);
    assert!(
        out.starts_with("allow:") && out.contains(&format!("cgroup {} allowed", rel(&app))),
        "{}",
        tail(&out, 600)
    );
    let later = format!("{}/later", sb.cgroup.display());
    let out = explain(&[
        "--uid",
        &u.bob.uid.to_string(),
        "--cgroup",
        &rel(Path::new(&later)),
    ]);
    assert!(
        out.starts_with("deny:"),
        "absent when resolved: {}",
        tail(&out, 600)
    );

    // A running process, by pid: root in `app`, then in `other`.
    let mut sleeper = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .expect("spawn sleep");
    let pid = sleeper.id().to_string();
    for (dir, want) in [(&app, "allow:"), (&other, "deny:")] {
        fs::write(dir.join("cgroup.procs"), &pid).expect("move the process");
        let out = explain(&["--pid", &pid]);
        assert!(
            out.starts_with(want) && out.contains(&format!("in cgroup {}", rel(dir))),
            "pid in {}: {}",
            rel(dir),
            tail(&out, 600)
        );
    }
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}
