//! A start that cannot fail open (issue: "never silently unprotected"):
//! `run` after a reboot with a policy file it cannot apply enforces the last
//! known good; a name the directory does not answer (yet) admits nobody on
//! an allow-list and keeps its last uid denied on a deny-list; a first boot
//! with a broken file says "not enforcing" and exits 6.

use std::{
    fs,
    process::Command,
    time::{Duration, Instant},
};

use loopguard_tests::{tail, timing_target, users, Sandbox};

const PORT: u16 = 7401;

fn to() -> String {
    format!("127.0.0.1:{PORT}")
}

/// A local account only this file uses, made and removed under the same
/// lock as the shared test users.
struct Account {
    uid: u32,
}

fn users_lock() -> nix::fcntl::Flock<fs::File> {
    let lock = fs::File::create("/tmp/loopguard-test-users.lock").expect("lock file");
    nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("lock")
}

fn add_account(name: &'static str) -> Account {
    let _l = users_lock();
    let _ = Command::new("userdel").arg(name).output();
    let out = Command::new("useradd")
        .args(["--system", "--no-create-home", "--user-group", name])
        .output()
        .expect("useradd");
    assert!(out.status.success(), "useradd {name}: {out:?}");
    let id = Command::new("id").args(["-u", name]).output().expect("id");
    let uid = String::from_utf8_lossy(&id.stdout)
        .trim()
        .parse()
        .expect("uid");
    Account { uid }
}

fn del_account(name: &str) {
    let _l = users_lock();
    let _ = Command::new("userdel").arg(name).output();
    let _ = Command::new("groupdel").arg(name).output();
}

fn probe_uid(sb: &Sandbox, uid: u32) -> String {
    let out = Command::new(loopguard_tests::probe_bin())
        .arg("--netns")
        .arg(&sb.netns_path)
        .args(["--uid", &uid.to_string(), "--gid", &uid.to_string()])
        .arg("--cgroup")
        .arg(&sb.cgroup)
        .args(["tcp-to", &to()])
        .output()
        .expect("probe");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn run_after_a_reboot_with_a_broken_file_enforces_the_last_known_good() {
    let u = users();
    let mut sb = Sandbox::new("start-lkg");
    sb.spawn_listener(PORT);
    let good = format!(
        "version = 1\n[[service]]\nname = \"db\"\nport = {PORT}\nallow_users = [\"{}\"]\n",
        u.alice.name
    );
    let p = sb.policy("p.toml", &good);
    sb.apply(&p, &[]).ok();
    let kept = fs::read_to_string(format!("/var/lib/loopguard/{}/policy.toml", sb.instance))
        .expect("the applied text is kept");
    assert_eq!(kept, good);
    sb.reboot();
    assert_eq!(sb.probe(Some(&u.bob), &["tcp-to", &to()]), "connect=ok");
    // An edit that breaks the file, made before the reboot.
    fs::write(&p, good.replace("port = ", "port = 99")).expect("break it");

    let d = sb.start_daemon(&p, &["--metrics", "127.0.0.1:9487"]);
    assert_eq!(sb.probe(Some(&u.bob), &["tcp-to", &to()]), "connect=EPERM");
    assert_eq!(sb.probe(Some(&u.alice), &["tcp-to", &to()]), "connect=ok");
    let log = d.log();
    assert!(
        log.contains("enforcing the last known good policy"),
        "{}",
        tail(&log, 2000)
    );
    let scrape = sb.probe(None, &["http", "127.0.0.1:9487", "/metrics"]);
    assert!(
        scrape.contains("loopguard_policy_last_known_good 1"),
        "{}",
        tail(&scrape, 1500)
    );

    // The file fixed: the daemon takes it (the file watch), and says so.
    fs::write(&p, &good).expect("fix it");
    let deadline = Instant::now() + timing_target(Duration::from_secs(10));
    loop {
        let scrape = sb.probe(None, &["http", "127.0.0.1:9487", "/metrics"]);
        if scrape.contains("loopguard_policy_last_known_good 0") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still on the last known good; {}",
            tail(&d.log(), 2000)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(sb.probe(Some(&u.bob), &["tcp-to", &to()]), "connect=EPERM");
}

#[test]
fn run_on_a_first_boot_with_a_broken_file_says_not_enforcing_and_exits_6() {
    let sb = Sandbox::new("start-none");
    let p = sb.policy(
        "p.toml",
        "version = 1\n[[service]]\nname = \"db\"\nport = 99999\n",
    );
    let cgroup = sb.attach.to_str().expect("utf-8");
    let r = sb.lg(&["run", p.to_str().expect("utf-8"), "--cgroup", cgroup]);
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(
        r.stderr.contains("NOT ENFORCING"),
        "{}",
        tail(&r.stderr, 2000)
    );
    assert!(sb.leftovers().is_empty(), "{:?}", sb.leftovers());
}

#[test]
fn names_that_do_not_resolve_fail_closed_and_deny_lists_keep_their_last_uid() {
    let u = users();
    let mut sb = Sandbox::new("start-names");
    sb.spawn_listener(PORT);
    let gone = add_account("lgt-gone");
    del_account("lgt-late");
    let text = format!(
        "version = 1\n[[service]]\nname = \"db\"\nport = {PORT}\n\
         allow_users = [\"{}\", \"lgt-late\", \"lgt-gone\"]\n\
         [[service]]\nname = \"other\"\nport = {}\ndeny_users = [\"lgt-gone\"]\n",
        u.alice.name,
        PORT + 1
    );
    // `apply` keeps unknown names as errors: an operator is there to fix
    // them.
    let p = sb.policy("p.toml", &text);
    let r = sb.apply(&p, &[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("unknown user \"lgt-late\""),
        "{}",
        r.stderr
    );

    // Applied once while lgt-gone exists (its uid is remembered), then the
    // account is deleted and the host "reboots".
    let without_late = text.replace(", \"lgt-late\"", "");
    let p0 = sb.policy("p0.toml", &without_late);
    sb.apply(&p0, &[]).ok();
    del_account("lgt-gone");
    sb.reboot();

    // `run` starts with the file naming one user that does not exist yet
    // and one that no longer does: it enforces the rest, fails closed.
    let d = sb.start_daemon(&p, &[]);
    let log = d.log();
    assert!(
        log.contains("user lgt-late does not resolve: on an allow-list it admits nobody"),
        "{}",
        tail(&log, 2000)
    );
    assert!(
        log.contains(&format!(
            "user lgt-gone does not resolve: uid {} it was last resolved to stays denied",
            gone.uid
        )),
        "{}",
        tail(&log, 2000)
    );
    assert_eq!(sb.probe(Some(&u.alice), &["tcp-to", &to()]), "connect=ok");
    assert_eq!(sb.probe(Some(&u.bob), &["tcp-to", &to()]), "connect=EPERM");
    // The deleted user's uid: neither admitted by the allow-list nor let
    // off the deny-list (its processes may run on).
    assert_eq!(probe_uid(&sb, gone.uid), "connect=EPERM");
    let other = format!("127.0.0.1:{}", PORT + 1);
    let out = Command::new(loopguard_tests::probe_bin())
        .arg("--netns")
        .arg(&sb.netns_path)
        .args([
            "--uid",
            &gone.uid.to_string(),
            "--gid",
            &gone.uid.to_string(),
        ])
        .arg("--cgroup")
        .arg(&sb.cgroup)
        .args(["tcp-to", &other])
        .output()
        .expect("probe");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "connect=EPERM",
        "the deny-list keeps the deleted user's uid"
    );

    // The name appears (the directory answers now): enforced within the
    // retry, without a reload.
    let late = add_account("lgt-late");
    let deadline = Instant::now() + timing_target(Duration::from_secs(10));
    while probe_uid(&sb, late.uid) != "connect=ok" {
        assert!(
            Instant::now() < deadline,
            "lgt-late still refused; {}",
            tail(&d.log(), 2000)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    del_account("lgt-late");
}

#[test]
fn a_switch_from_audit_to_enforce_keeps_earlier_refusals_as_would_deny() {
    let u = users();
    let mut sb = Sandbox::new("start-mode");
    sb.spawn_listener(PORT);
    let text = |mode: &str| {
        format!(
            "version = 1\n[[service]]\nname = \"db\"\nport = {PORT}\nmode = \"{mode}\"\nallow_users = [\"{}\"]\n",
            u.alice.name
        )
    };
    let p = sb.policy("p.toml", &text("audit"));
    let d = sb.start_daemon(&p, &["--metrics", "127.0.0.1:9488", "--layers", "nft"]);
    let scrape = || sb.probe(None, &["http", "127.0.0.1:9488", "/metrics"]);
    let line = |action: &str| {
        let s = scrape();
        s.lines()
            .find(|l| {
                l.starts_with("loopguard_attempts_total{")
                    && l.contains("service=\"db\"")
                    && l.contains("layer=\"nft\"")
                    && l.contains(&format!("action=\"{action}\""))
            })
            .map(|l| l.rsplit(' ').next().unwrap_or("").to_string())
            .unwrap_or_else(|| "0".into())
    };
    // Audit mode: bob gets through, the packet layer counts a would-deny.
    assert_eq!(
        sb.probe_outside(Some(&u.bob), &["tcp-to", &to()]),
        "connect=ok"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while line("would-deny") != "1" {
        assert!(
            Instant::now() < deadline,
            "no would-deny counted; {}",
            tail(&scrape(), 1500)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Switched to enforce: the earlier attempt stays a would-deny.
    fs::write(&p, text("enforce")).expect("switch");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = sb.lg(&["status", "--format", "json"]).ok();
        let v: serde_json::Value = serde_json::from_str(&status.stdout).expect("json");
        if v["services"][0]["mode"] == "enforce" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not reloaded; {}",
            tail(&d.log(), 1500)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(line("deny"), "0", "{}", tail(&scrape(), 1500));
    assert_eq!(line("would-deny"), "1", "{}", tail(&scrape(), 1500));
}

#[test]
fn run_with_a_missing_cgroup_makes_it_and_guards_it() {
    let u = users();
    let mut sb = Sandbox::new("start-cg");
    sb.spawn_listener(PORT);
    let below = sb.cgroup.join("slice-not-made-yet");
    let p = sb.policy(
        "p.toml",
        &format!(
            "version = 1\n[[service]]\nname = \"db\"\nport = {PORT}\nallow_users = [\"{}\"]\n",
            u.alice.name
        ),
    );
    sb.attach = below.clone();
    let d = sb.start_daemon(&p, &[]);
    assert!(below.is_dir(), "{}", tail(&d.log(), 1500));
    assert!(
        d.log().contains("did not exist: made it"),
        "{}",
        tail(&d.log(), 1500)
    );
    assert_eq!(
        sb.probe_in(Some(&u.bob), &below, &["tcp-to", &to()]),
        "connect=EPERM"
    );
}

#[test]
fn a_user_deleted_under_run_stays_denied_and_reloads_still_work() {
    let mut sb = Sandbox::new("start-del");
    sb.spawn_listener(PORT);
    let victim = add_account("lgt-gone2");
    let text = format!(
        "version = 1\n[[service]]\nname = \"db\"\nport = {PORT}\ndeny_users = [\"lgt-gone2\"]\n"
    );
    let p = sb.policy("p.toml", &text);
    let d = sb.start_daemon(&p, &[]);
    assert_eq!(probe_uid(&sb, victim.uid), "connect=EPERM");
    del_account("lgt-gone2");
    d.wait_log(
        "user lgt-gone2 does not resolve",
        10,
        "the daemon says the name is gone",
    );
    assert_eq!(probe_uid(&sb, victim.uid), "connect=EPERM", "still denied");
    // A later edit still applies (the name is no error under run).
    fs::write(&p, text.replace("name = \"db\"", "name = \"db2\"")).expect("edit");
    d.wait_log("applied", 10, "the edit applied");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sb.lg(&["status"]).stdout.contains("db2") {
        assert!(
            Instant::now() < deadline,
            "the edit was not applied; {}",
            tail(&d.log(), 1500)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        probe_uid(&sb, victim.uid),
        "connect=EPERM",
        "still denied after a reload"
    );
}
