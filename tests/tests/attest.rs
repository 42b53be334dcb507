//! Never silently unprotected (issue: "enforcement attested from the
//! kernel"): each guarantee broken the way the world breaks it (the attach
//! cgroup removed and made again, a link detached, a chain flushed), layer
//! by layer, asserting what a user sees (the connection gets through), what
//! `status` says (drift named, exit 5; or "not enforcing", exit 6), and
//! that `apply` and `run` put it back.

use std::{
    fs,
    time::{Duration, Instant},
};

use loopguard_tests::{tail, timing_target, users, Daemon, Sandbox, TestUser};

const PORT: u16 = 7301;

fn policy(who: &TestUser) -> String {
    format!(
        "version = 1\n[[service]]\nname = \"db\"\nport = {PORT}\nallow_users = [\"{}\"]\n",
        who.name
    )
}

fn to() -> String {
    format!("127.0.0.1:{PORT}")
}

/// What bob's connect from inside the cgroup gets while the policy holds,
/// per layer set: EPERM from the eBPF layer; the nftables layer alone
/// answers the SYN with a reset.
fn refused(layers: &str) -> &'static str {
    if layers == "nft" {
        "connect=ECONNREFUSED"
    } else {
        "connect=EPERM"
    }
}

/// systemd removes an emptied slice and makes it again when a unit starts
/// in it: the same path, a new cgroup.
fn recreate(sb: &Sandbox) {
    fs::remove_dir(&sb.cgroup).expect("rmdir the attach cgroup (is it empty?)");
    fs::create_dir(&sb.cgroup).expect("mkdir it again");
}

fn pinned_link_id(sb: &Sandbox, hook: &str) -> String {
    let pin = format!("/sys/fs/bpf/{}/links/{hook}", sb.instance);
    let out = sb
        .in_netns(&["bpftool", "-j", "link", "show", "pinned", &pin])
        .ok();
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("bpftool json");
    v["id"].to_string()
}

fn recreated_cgroup_is_drift_and_apply_attaches_anew(layers: &str) {
    let u = users();
    let mut sb = Sandbox::new(&format!("att-cg-{layers}"));
    sb.spawn_listener(PORT);
    let p = sb.policy("p.toml", &policy(&u.alice));
    sb.apply(&p, &["--layers", layers]).ok();
    assert_eq!(sb.probe(Some(&u.bob), &["tcp-to", &to()]), refused(layers));

    recreate(&sb);
    // What a user sees: the eBPF layer judges nobody in the new cgroup
    // (with both layers, the packet layer still refuses the SYN).
    let hole = if layers == "bpf" {
        "connect=ok"
    } else {
        "connect=ECONNREFUSED"
    };
    assert_eq!(sb.probe(Some(&u.bob), &["tcp-to", &to()]), hole, "{layers}");
    let st = sb.lg(&["status"]);
    assert_eq!(
        st.code,
        if layers == "bpf" { 6 } else { 5 },
        "{layers}: {}",
        st.stdout
    );
    assert!(
        st.stdout.contains("was removed and made again"),
        "{layers}: {}",
        st.stdout
    );
    if layers == "bpf" {
        assert!(st.stdout.contains("NOT ENFORCING"), "{}", st.stdout);
    }

    let r = sb.apply(&p, &["--layers", layers]).ok();
    assert!(r.stderr.contains("attached anew"), "{layers}: {}", r.stderr);
    assert_eq!(sb.probe(Some(&u.bob), &["tcp-to", &to()]), "connect=EPERM");
    assert_eq!(sb.probe(Some(&u.alice), &["tcp-to", &to()]), "connect=ok");
    let st = sb.lg(&["status"]);
    assert_eq!(st.code, 0, "{layers}: {}", st.stdout);
    assert!(sb.lg(&["remove"]).code == 0 && sb.leftovers().is_empty());
}

#[test]
fn a_recreated_cgroup_is_drift_and_apply_attaches_anew_bpf() {
    recreated_cgroup_is_drift_and_apply_attaches_anew("bpf");
}

#[test]
fn a_recreated_cgroup_is_drift_and_apply_attaches_anew_both() {
    recreated_cgroup_is_drift_and_apply_attaches_anew("both");
}

fn detached_link_is_drift_and_apply_attaches_anew(layers: &str) {
    let u = users();
    let mut sb = Sandbox::new(&format!("att-det-{layers}"));
    sb.spawn_listener(PORT);
    let p = sb.policy("p.toml", &policy(&u.alice));
    sb.apply(&p, &["--layers", layers]).ok();
    let id = pinned_link_id(&sb, "loopguard_connect4");
    sb.in_netns(&["bpftool", "link", "detach", "id", &id]).ok();
    if layers == "bpf" {
        assert_eq!(sb.probe(Some(&u.bob), &["tcp-to", &to()]), "connect=ok");
    }
    let st = sb.lg(&["status"]);
    // Five hooks still judge: drift, not "not enforcing".
    assert_eq!(st.code, 5, "{layers}: {}", st.stdout);
    assert!(
        st.stdout
            .contains("not enforcing on loopguard_connect4: its link is detached"),
        "{layers}: {}",
        st.stdout
    );
    let json = sb.lg(&["status", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&json.stdout).expect("json");
    assert!(
        !v["enforcing"].to_string().contains("bpf"),
        "{layers}: {}",
        v["enforcing"]
    );
    let r = sb.apply(&p, &["--layers", layers]).ok();
    assert!(
        r.stderr.contains("attached anew") && r.stderr.contains("loopguard_connect4"),
        "{layers}: {}",
        r.stderr
    );
    assert_eq!(sb.probe(Some(&u.bob), &["tcp-to", &to()]), "connect=EPERM");
    assert_ne!(pinned_link_id(&sb, "loopguard_connect4"), id, "a new link");
    assert_eq!(sb.lg(&["status"]).code, 0);
}

#[test]
fn a_detached_link_is_drift_and_apply_attaches_anew_bpf() {
    detached_link_is_drift_and_apply_attaches_anew("bpf");
}

#[test]
fn a_detached_link_is_drift_and_apply_attaches_anew_both() {
    detached_link_is_drift_and_apply_attaches_anew("both");
}

fn flushed_chain_is_drift_and_apply_restores_it(layers: &str) {
    let u = users();
    let mut sb = Sandbox::new(&format!("att-fl-{layers}"));
    sb.spawn_listener(PORT);
    let p = sb.policy("p.toml", &policy(&u.alice));
    sb.apply(&p, &["--layers", layers]).ok();
    assert_eq!(
        sb.probe_outside(Some(&u.bob), &["tcp-to", &to()]),
        "connect=ECONNREFUSED"
    );
    sb.in_netns(&["nft", "flush", "chain", "inet", &sb.instance, "output"])
        .ok();
    // Outside the cgroup only the packet layer judges: nothing now.
    assert_eq!(
        sb.probe_outside(Some(&u.bob), &["tcp-to", &to()]),
        "connect=ok"
    );
    let st = sb.lg(&["status"]);
    assert_eq!(st.code, 5, "{layers}: {}", st.stdout);
    assert!(
        st.stdout
            .contains("table altered: chain output has 0 rules"),
        "{layers}: {}",
        st.stdout
    );
    sb.apply(&p, &["--layers", layers]).ok();
    assert_eq!(
        sb.probe_outside(Some(&u.bob), &["tcp-to", &to()]),
        "connect=ECONNREFUSED"
    );
    assert_eq!(sb.lg(&["status"]).code, 0);
}

#[test]
fn a_flushed_chain_is_drift_and_apply_restores_it_nft() {
    flushed_chain_is_drift_and_apply_restores_it("nft");
}

#[test]
fn a_flushed_chain_is_drift_and_apply_restores_it_both() {
    flushed_chain_is_drift_and_apply_restores_it("both");
}

/// Waits until `probe` says `want`, within the daemon's one second (scaled
/// under emulation); says how long it took.
fn repaired_within_a_second(what: &str, d: &Daemon, probe: impl Fn() -> String, want: &str) {
    let broken = Instant::now();
    loop {
        let got = probe();
        if got == want {
            break;
        }
        assert!(
            broken.elapsed() < timing_target(Duration::from_secs(1)) + Duration::from_millis(500),
            "{what}: not repaired a second later (probe says {got}); daemon log: {}",
            tail(&d.log(), 2000)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("{what}: repaired {:?} after the damage", broken.elapsed());
}

#[test]
fn run_repairs_a_recreated_cgroup_a_detached_link_and_a_flushed_chain() {
    let u = users();
    let mut sb = Sandbox::new("att-run");
    sb.spawn_listener(PORT);
    let p = sb.policy("p.toml", &policy(&u.alice));
    let d = sb.start_daemon(&p, &["--metrics", "127.0.0.1:9485"]);
    assert_eq!(sb.probe(Some(&u.bob), &["tcp-to", &to()]), "connect=EPERM");

    recreate(&sb);
    repaired_within_a_second(
        "recreated cgroup",
        &d,
        || sb.probe(Some(&u.bob), &["tcp-to", &to()]),
        "connect=EPERM",
    );
    d.wait_log(
        "was removed and made again",
        10,
        "the daemon names the damage",
    );
    d.wait_log("repaired", 10, "the daemon says it repaired");

    let id = pinned_link_id(&sb, "loopguard_connect4");
    sb.in_netns(&["bpftool", "link", "detach", "id", &id]).ok();
    let deadline = Instant::now() + timing_target(Duration::from_secs(2));
    while pinned_link_id(&sb, "loopguard_connect4") == id {
        assert!(
            Instant::now() < deadline,
            "the detached link was not replaced; daemon log: {}",
            tail(&d.log(), 2000)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(sb.probe(Some(&u.bob), &["tcp-to", &to()]), "connect=EPERM");
    d.wait_log(
        "its link is detached",
        10,
        "the daemon names the detached link",
    );
    // The repair rewrites the table too (nothing is trusted after a
    // damage): let it finish, or it would mend the flush below unasked.
    let deadline = Instant::now() + timing_target(Duration::from_secs(5));
    while sb.lg(&["status"]).code != 0 {
        assert!(Instant::now() < deadline, "the repair did not finish");
        std::thread::sleep(Duration::from_millis(50));
    }

    sb.in_netns(&["nft", "flush", "chain", "inet", &sb.instance, "output"])
        .ok();
    repaired_within_a_second(
        "flushed chain",
        &d,
        || sb.probe_outside(Some(&u.bob), &["tcp-to", &to()]),
        "connect=ECONNREFUSED",
    );
    d.wait_log("table altered", 10, "the daemon names the altered table");

    let scrape = sb.probe(None, &["http", "127.0.0.1:9485", "/metrics"]);
    for layer in ["bpf", "nft"] {
        let line = scrape
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "loopguard_layer_repairs_total{{layer=\"{layer}\"}}"
                ))
            })
            .unwrap_or_else(|| panic!("no repairs counted for {layer}: {}", tail(&scrape, 1500)));
        let n: u64 = line
            .rsplit(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .expect("a count");
        assert!(n >= 1, "{line}");
    }
    assert_eq!(sb.lg(&["status"]).code, 0, "status is clean again");
}

#[test]
fn remove_under_a_running_daemon_is_refused_unless_forced_and_the_daemon_says_who() {
    let u = users();
    let mut sb = Sandbox::new("att-rm");
    sb.spawn_listener(PORT);
    let p = sb.policy("p.toml", &policy(&u.alice));
    let d = sb.start_daemon(&p, &[]);
    let r = sb.lg(&["remove"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains(&format!("`loopguard run` (pid {})", d.pid))
            && r.stderr.contains("--force"),
        "{}",
        r.stderr
    );
    assert_eq!(sb.probe(Some(&u.bob), &["tcp-to", &to()]), "connect=EPERM");

    let r = sb.lg(&["remove", "--force"]).ok();
    assert!(r.stdout.contains("removed instance"), "{}", r.stdout);
    let code = sb.wait_child(d.pid, timing_target(Duration::from_secs(2)).as_secs() + 1);
    assert_eq!(
        code,
        Some(6),
        "the daemon exits 6; {}",
        tail(&d.log(), 2000)
    );
    let log = d.log();
    assert!(
        log.contains("was removed by pid") && log.contains("(uid 0)"),
        "{}",
        tail(&log, 2000)
    );
    let last = log.lines().last().unwrap_or_default();
    assert!(last.contains("NOT ENFORCING"), "the last line: {last}");
    // Nothing was put back.
    assert_eq!(sb.probe(Some(&u.bob), &["tcp-to", &to()]), "connect=ok");
    assert_eq!(sb.lg(&["status"]).code, 6);
    assert!(sb.leftovers().is_empty(), "{:?}", sb.leftovers());
}

#[test]
fn a_stopped_daemon_says_what_the_kernel_enforces() {
    let u = users();
    let mut sb = Sandbox::new("att-stop");
    let p = sb.policy("p.toml", &policy(&u.alice));
    let d = sb.start_daemon(&p, &["--layers", "bpf"]);
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(sb.wait_child(d.pid, 10), Some(0));
    let log = d.log();
    let last = log.lines().last().unwrap_or_default();
    assert!(
        last.contains("the kernel enforces plan") && last.contains("on bpf (read back now"),
        "the last line: {last}"
    );
}

#[test]
fn a_squatter_bound_before_the_guard_is_named_by_apply_status_run_and_scan() {
    let u = users();
    let mut sb = Sandbox::new("att-squat");
    // bob listens on the port before any policy guards who may bind it.
    sb.spawn_outside(Some(&u.bob), &["listen", &PORT.to_string()]);
    sb.wait_listening(&to());
    let p = sb.policy(
        "p.toml",
        &format!(
            "version = 1\n[[service]]\nname = \"db\"\nport = {PORT}\nallow_users = [\"{a}\", \"{b}\"]\nbind_users = [\"{a}\"]\n",
            a = u.alice.name,
            b = u.bob.name
        ),
    );
    let r = sb.apply(&p, &[]).ok();
    let warning = r
        .stderr
        .lines()
        .find(|l| l.contains("squatter: lg-probe"))
        .unwrap_or_else(|| panic!("apply names no squatter: {}", r.stderr));
    assert!(
        warning.contains(u.bob.name)
            && warning.contains(&format!(":{PORT}/tcp"))
            && warning.contains("service db"),
        "{warning}"
    );
    let st = sb.lg(&["status"]);
    assert!(st.stdout.contains("SQUATTER:"), "{}", st.stdout);
    let scan = sb.lg(&["scan"]).ok();
    let row = scan
        .stdout
        .lines()
        .find(|l| l.contains(&format!(" {PORT} ")) && l.contains(u.bob.name))
        .unwrap_or_else(|| panic!("no row for bob's listener: {}", tail(&scan.stdout, 2000)));
    assert!(row.contains("SQUATTER (service db"), "{row}");
    let json = sb.lg(&["scan", "--format", "json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&json.stdout).expect("json");
    assert!(
        v["listeners"]
            .as_array()
            .expect("listeners")
            .iter()
            .any(|l| l["port"] == PORT && l["squatter"] == true),
        "{}",
        tail(&json.stdout, 2000)
    );
    // A listener bob starts now is refused: the guard holds for new binds.
    assert_eq!(
        sb.probe(Some(&u.bob), &["bind", &format!("127.0.0.1:{}", PORT)]),
        "bind=EPERM"
    );
    let d = sb.start_daemon(&p, &["--metrics", "127.0.0.1:9486"]);
    d.wait_log("squatter: lg-probe", 10, "the daemon names the squatter");
    let scrape = sb.probe(None, &["http", "127.0.0.1:9486", "/metrics"]);
    assert!(
        scrape.contains("loopguard_squatters 1"),
        "{}",
        tail(&scrape, 1500)
    );
}

/// Waits until `status` exits 0 (every listed layer attested), within
/// `secs`; the daemon's log tail on failure.
fn wait_clean(sb: &Sandbox, d: &Daemon, secs: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let st = sb.lg(&["status"]);
        if st.code == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not repaired in {secs} s (status {}: {}); daemon log: {}",
            st.code,
            tail(&st.stdout, 500),
            tail(&d.log(), 1500)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn run_repairs_damage_made_under_the_lock_a_dormant_table_and_a_lost_state() {
    let u = users();
    let mut sb = Sandbox::new("att-more");
    sb.spawn_listener(PORT);
    let p = sb.policy("p.toml", &policy(&u.alice));
    let d = sb.start_daemon(&p, &[]);
    let refused = || sb.probe_outside(Some(&u.bob), &["tcp-to", &to()]) == "connect=ECONNREFUSED";
    assert!(refused());

    // Damage while the instance lock is held: the event comes while no look
    // can be made; the look is made once the lock is free.
    let lock = format!("/run/loopguard/{}.lock", sb.instance);
    let netns = format!("--net={}", sb.netns_path.display());
    let held = std::process::Command::new("flock")
        .args(["-x", &lock, "-c"])
        .arg(format!(
            "nsenter {netns} nft flush chain inet {} output; sleep 1",
            sb.instance
        ))
        .status()
        .expect("flock");
    assert!(held.success());
    wait_clean(&sb, &d, 5, "damage made under the lock");
    assert!(refused());

    // A table switched off keeps its counts: it is dormant all the same.
    sb.in_netns(&[
        "nft",
        "add",
        "table",
        "inet",
        &sb.instance,
        "{ flags dormant; }",
    ])
    .ok();
    d.wait_log(
        "the table is dormant",
        10,
        "the daemon names the dormant table",
    );
    wait_clean(&sb, &d, 5, "a dormant table");
    assert!(refused());

    // The state taken (not by `remove --force`): the daemon puts back the
    // policy it enforces.
    fs::remove_dir_all(format!("/run/loopguard/{}", sb.instance)).expect("rm state");
    sb.in_netns(&["nft", "flush", "chain", "inet", &sb.instance, "output"])
        .ok();
    d.wait_log(
        "is gone (not by `remove --force`)",
        10,
        "the daemon says the state is gone",
    );
    wait_clean(&sb, &d, 5, "a lost state");
    assert!(refused());
}

#[test]
fn repairs_that_do_not_hold_back_off_are_said_and_tried_again() {
    let u = users();
    let mut sb = Sandbox::new("att-fight");
    sb.spawn_listener(PORT);
    let p = sb.policy("p.toml", &policy(&u.alice));
    let d = sb.start_daemon(&p, &["--layers", "nft"]);
    // Another tool undoes every repair as it lands (it watches `nft
    // monitor`), for a few seconds.
    let fight = format!(
        "nft monitor rules | while read -r l; do case \"$l\" in *\"inet {t} output\"*) nft flush chain inet {t} output;; esac; done",
        t = sb.instance
    );
    let mut fighter = std::process::Command::new("timeout")
        .args([
            "8",
            "nsenter",
            &format!("--net={}", sb.netns_path.display()),
            "sh",
            "-c",
            &fight,
        ])
        .spawn()
        .expect("fighter");
    std::thread::sleep(Duration::from_millis(300));
    sb.in_netns(&["nft", "flush", "chain", "inet", &sb.instance, "output"])
        .ok();
    d.wait_log(
        "repairs in a row did not hold",
        10,
        "the daemon says it backs off",
    );
    let _ = fighter.wait();
    // It stopped: the daemon puts the policy back after its backoff.
    wait_clean(&sb, &d, 40, "after the backoff");
    assert_eq!(
        sb.probe_outside(Some(&u.bob), &["tcp-to", &to()]),
        "connect=ECONNREFUSED"
    );
}
