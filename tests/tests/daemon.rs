//! `loopguard run`: audit events, floods, live host addresses, reloads,
//! metrics, and the guarantees of a daemon under systemd.

use std::time::{Duration, Instant};

use loopguard_tests::{tail, timing_target, users, Sandbox};
use nix::sys::signal::Signal;

fn policy(alice: &str, extra: &str) -> String {
    format!(
        r#"version = 1
{extra}
[[service]]
name = "web"
port = 8080
allow_users = ["{alice}"]
"#
    )
}

#[test]
fn a_denied_attempt_is_one_event_with_who_and_where() {
    let u = users();
    let mut sb = Sandbox::new("run-event");
    let p = sb.policy("p.toml", &policy(u.alice.name, ""));
    let d = sb.start_daemon(&p, &[]);
    let (seen, pid) = sb.probe_with_pid(Some(&u.bob), &["tcp", "[::1]:8080"]);
    assert_eq!(seen, "connect=EPERM");
    let events = d.wait_events(5, "bob's deny", |e| {
        e.iter().any(|v| v["process.pid"] == pid)
    });
    let mine: Vec<_> = events.iter().filter(|v| v["process.pid"] == pid).collect();
    assert_eq!(mine.len(), 1, "exactly one event: {mine:?}");
    let e = mine[0];
    assert_eq!(e["event.action"], "deny");
    assert_eq!(e["event.reason"], "service web: uid not allowed");
    assert_eq!(e["loopguard.service"], "web");
    assert_eq!(e["loopguard.mode"], "enforce");
    assert_eq!(e["loopguard.layer"], "connect");
    assert_eq!(e["user.id"], u.bob.uid);
    assert_eq!(e["user.name"], u.bob.name);
    assert_eq!(e["group.id"], u.bob.gid);
    assert_eq!(e["process.name"], "lg-probe");
    assert_eq!(e["network.transport"], "tcp");
    assert_eq!(e["network.type"], "ipv6");
    assert_eq!(e["destination.ip"], "::1");
    assert_eq!(e["destination.port"], 8080);
    // ECS categorisation, so the line indexes into Elastic as it is.
    assert_eq!(e["event.kind"], "event");
    assert_eq!(e["event.category"], serde_json::json!(["network"]));
    assert_eq!(e["event.type"], serde_json::json!(["connection", "denied"]));
    assert_eq!(e["event.outcome"], "failure");
    assert_eq!(e["ecs.version"], "8.11.0");
    assert!(
        e["host.name"].as_str().is_some_and(|h| !h.is_empty()),
        "{e}"
    );
    assert!(e.get("loopguard.backlog").is_none(), "read live: {e}");
    let ts = e["@timestamp"].as_str().expect("timestamp");
    assert!(
        ts.ends_with('Z') && ts.len() == 30,
        "RFC 3339 with ns: {ts}"
    );
    // Allowed attempts are not logged by default.
    let (_, alice_pid) = sb.probe_with_pid(Some(&u.alice), &["tcp", "127.0.0.1:8080"]);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!d.events().iter().any(|v| v["process.pid"] == alice_pid));

    // The audit command shows it, filtered.
    let r = sb
        .lg(&[
            "audit",
            "--file",
            d.audit_log.to_str().expect("utf-8"),
            "--uid",
            &u.bob.uid.to_string(),
            "--format",
            "json",
        ])
        .ok();
    assert_eq!(r.stdout.lines().count(), 1, "{}", r.stdout);
    let human = sb
        .lg(&[
            "audit",
            "--file",
            d.audit_log.to_str().expect("utf-8"),
            "--action",
            "deny",
        ])
        .ok();
    assert!(
        human
            .stdout
            .contains("lg-probe -> ::1:8080/tcp [connect] service web: uid not allowed"),
        "{}",
        human.stdout
    );
}

#[test]
fn audit_mode_and_log_allowed_events() {
    let u = users();
    let mut sb = Sandbox::new("run-audit");
    let p = sb.policy(
        "p.toml",
        &policy(u.alice.name, "mode = \"audit\"\nlog_allowed = true"),
    );
    let d = sb.start_daemon(&p, &[]);
    let (seen, bob_pid) = sb.probe_with_pid(Some(&u.bob), &["udp", "127.0.0.1:8080"]);
    assert_eq!(
        seen, "send=ok recv=yes",
        "UDP to a TCP service is unmatched"
    );
    let (seen, bob_tcp) = sb.probe_with_pid(Some(&u.bob), &["tcp", "127.0.0.1:8080"]);
    assert_eq!(seen, "connect=ok", "audit mode lets it through");
    let (_, alice_pid) = sb.probe_with_pid(Some(&u.alice), &["tcp", "127.0.0.1:8080"]);
    let events = d.wait_events(5, "would-deny and allow", |e| {
        e.iter().any(|v| v["process.pid"] == bob_tcp)
            && e.iter().any(|v| v["process.pid"] == alice_pid)
    });
    let of = |pid: u32| {
        events
            .iter()
            .find(|v| v["process.pid"] == pid)
            .expect("event")
    };
    assert_eq!(of(bob_tcp)["event.action"], "would-deny");
    assert_eq!(of(bob_tcp)["loopguard.mode"], "audit");
    assert_eq!(of(alice_pid)["event.action"], "allow");
    assert_eq!(
        of(bob_pid)["event.action"],
        "allow",
        "log_allowed covers unmatched traffic too"
    );
    assert_eq!(of(bob_pid)["loopguard.layer"], "sendmsg");
    assert_eq!(
        of(bob_pid)["event.reason"],
        "no service matches; default is allow"
    );
}

#[test]
fn a_flood_is_accounted_for_and_memory_stays_bounded() {
    let u = users();
    let mut sb = Sandbox::new("run-flood");
    let p = sb.policy("p.toml", &policy(u.alice.name, ""));
    let d = sb.start_daemon(&p, &[]);
    let attempts = 100_000u64;
    let out = sb.probe(
        Some(&u.bob),
        &["burst", "127.0.0.1:8080", &attempts.to_string()],
    );
    assert_eq!(out, format!("ok=0 eperm={attempts} other=0"));
    let total = |events: &[serde_json::Value]| -> u64 {
        let delivered = events.iter().filter(|v| v["user.id"] == u.bob.uid).count() as u64;
        let dropped: u64 = events
            .iter()
            .filter_map(|v| v["loopguard.dropped"].as_u64())
            .sum();
        delivered + dropped
    };
    // Under qemu on a loaded machine the daemon drains the ring slowly:
    // wait as long as it makes progress (generous bounds), not a fixed time.
    let started = Instant::now();
    let (mut seen, mut progressed) = (0, Instant::now());
    let events = loop {
        let events = d.events();
        let now = total(&events);
        if now >= attempts {
            break events;
        }
        if now > seen {
            (seen, progressed) = (now, Instant::now());
        }
        assert!(
            progressed.elapsed() < Duration::from_secs(60)
                && started.elapsed() < Duration::from_secs(600),
            "{now} of {attempts} attempts delivered or counted as dropped; no progress for {:?}",
            progressed.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(total(&events), attempts, "delivered + dropped == attempts");
    let dropped: u64 = events
        .iter()
        .filter_map(|v| v["loopguard.dropped"].as_u64())
        .sum();
    eprintln!(
        "flood of {attempts}: {} delivered, {dropped} dropped, daemon peak RSS {} KiB",
        attempts - dropped,
        d.peak_rss_kib()
    );
    assert!(
        d.peak_rss_kib() < 64 * 1024,
        "peak RSS {} KiB",
        d.peak_rss_kib()
    );
}

#[test]
fn a_new_host_address_or_local_route_is_guarded_within_a_second() {
    let u = users();
    let mut sb = Sandbox::new("run-addr");
    let p = sb.policy("p.toml", &policy(u.alice.name, ""));
    let _d = sb.start_daemon(&p, &[]);
    let addr = "198.18.0.7";
    assert_ne!(
        sb.probe(Some(&u.bob), &["tcp", &format!("{addr}:8080")]),
        "connect=EPERM",
        "not an address yet"
    );
    sb.in_netns(&["ip", "addr", "add", &format!("{addr}/32"), "dev", "lg0"])
        .ok();
    let added = Instant::now();
    loop {
        if sb.probe(Some(&u.bob), &["tcp", &format!("{addr}:8080")]) == "connect=EPERM"
            && sb.probe_outside(Some(&u.bob), &["tcp", &format!("{addr}:8080")])
                == "connect=ECONNREFUSED"
        {
            break;
        }
        assert!(
            added.elapsed() < timing_target(Duration::from_secs(1)),
            "not guarded a second after being added"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // A whole prefix routed to the host (AnyIP) likewise.
    let anyip = "10.77.200.9:8080";
    assert_ne!(
        sb.probe(Some(&u.bob), &["tcp", anyip]),
        "connect=EPERM",
        "not local yet"
    );
    sb.in_netns(&["ip", "route", "add", "local", "10.77.0.0/16", "dev", "lo"])
        .ok();
    let added = Instant::now();
    while sb.probe(Some(&u.bob), &["tcp", anyip]) != "connect=EPERM" {
        assert!(
            added.elapsed() < timing_target(Duration::from_secs(1)),
            "AnyIP prefix not guarded a second after being routed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        sb.probe(Some(&u.alice), &["tcp", anyip]),
        "connect=ok",
        "alice still gets through"
    );
}

#[test]
fn sighup_with_a_broken_policy_keeps_the_old_one_then_picks_up_the_fix() {
    let u = users();
    let mut sb = Sandbox::new("run-reload");
    let p = sb.policy("p.toml", &policy(u.alice.name, ""));
    let d = sb.start_daemon(&p, &[]);
    assert_eq!(
        sb.probe(Some(&u.bob), &["tcp", "127.0.0.1:8080"]),
        "connect=EPERM",
        "{}",
        tail(&d.log(), 3000)
    );
    std::fs::write(
        &p,
        "version = 1\n[[service]]\nname = \"web\"\nport = 99999\nallow_users = [0]\n",
    )
    .expect("write");
    d.signal(Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !d.log().contains("port 99999 is out of range") {
        assert!(
            Instant::now() < deadline,
            "diagnostics not logged: {}",
            tail(&d.log(), 4000)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(d.log().contains("p.toml:4:8"), "{}", tail(&d.log(), 4000));
    assert_eq!(
        sb.probe(Some(&u.bob), &["tcp", "127.0.0.1:8080"]),
        "connect=EPERM",
        "old policy stays"
    );
    // Fixed: bob is now allowed; the file watcher picks it up.
    std::fs::write(
        &p,
        policy(&format!("{}\", \"{}", u.alice.name, u.bob.name), ""),
    )
    .expect("write");
    let deadline = Instant::now() + Duration::from_secs(5);
    while sb.probe(Some(&u.bob), &["tcp", "127.0.0.1:8080"]) != "connect=ok" {
        assert!(
            Instant::now() < deadline,
            "fixed policy not picked up: {}",
            tail(&d.log(), 4000)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn metrics_move_one_run_per_instance_and_sigterm_keeps_enforcement() {
    let u = users();
    let mut sb = Sandbox::new("run-metrics");
    let p = sb.policy("p.toml", &policy(u.alice.name, ""));
    let d = sb.start_daemon(&p, &["--metrics", "127.0.0.1:9477"]);
    let scrape = || sb.probe(None, &["http", "127.0.0.1:9477", "/metrics"]);
    let denied = |text: &str| -> u64 {
        text.lines()
            .find(|l| {
                l.starts_with(
                    "loopguard_attempts_total{service=\"web\",layer=\"bpf\",action=\"deny\"}",
                )
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let before = denied(&scrape());
    for _ in 0..3 {
        assert_eq!(
            sb.probe(Some(&u.bob), &["tcp", "127.0.0.1:8080"]),
            "connect=EPERM"
        );
    }
    let text = scrape();
    assert_eq!(denied(&text), before + 3, "{text}");
    assert!(text.contains("loopguard_policy_generation 1"), "{text}");
    assert!(text.contains("loopguard_events_dropped_total 0"), "{text}");
    assert!(
        text.contains("loopguard_last_apply_timestamp_seconds"),
        "{text}"
    );
    assert!(
        text.contains("loopguard_policy_file_matches_applied 1"),
        "{text}"
    );
    assert!(
        text.contains("loopguard_policy_reload_failures_total 0"),
        "{text}"
    );
    for zero in [
        "loopguard_accounts_refresh_failures_total 0",
        "loopguard_cgroups_refresh_failures_total 0",
    ] {
        assert!(text.contains(zero), "{zero}: {}", tail(&text, 1500));
    }
    // A broken edit: the running policy stays, and the metrics say so.
    std::fs::write(
        &p,
        "version = 1\n[[service]]\nname = \"web\"\nport = 99999\nallow_users = [0]\n",
    )
    .expect("edit");
    d.signal(Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape();
        // SIGHUP and the file watcher may both have tried.
        let failures: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("loopguard_policy_reload_failures_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if failures >= 1 && text.contains("loopguard_policy_file_matches_applied 0") {
            break;
        }
        assert!(Instant::now() < deadline, "{text}");
        std::thread::sleep(Duration::from_millis(50));
    }

    // A second run for the same instance is refused, clearly.
    let second = sb.lg(&[
        "run",
        p.to_str().expect("utf-8"),
        "--cgroup",
        sb.cgroup.to_str().expect("utf-8"),
    ]);
    assert_eq!(second.code, 2, "{}", second.stderr);
    assert!(
        second.stderr.contains("another `loopguard run` is running"),
        "{}",
        second.stderr
    );

    // SIGTERM: the daemon goes, enforcement stays.
    d.signal(Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::path::Path::new(&format!("/proc/{}", d.pid)).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    // Its last words: what the kernel enforces, read back.
    let log = d.log();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !d.log().contains("stays in force") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        d.log().contains("the kernel enforces plan") && d.log().contains("stays in force"),
        "{}",
        tail(&log, 4000)
    );
    assert_eq!(
        sb.probe(Some(&u.bob), &["tcp", "127.0.0.1:8080"]),
        "connect=EPERM"
    );
}

#[test]
fn packet_layer_refusals_reach_the_stream() {
    let u = users();
    let mut sb = Sandbox::new("run-packet");
    let p = sb.policy(
        "p.toml",
        &format!(
            "version = 1\n[[service]]\nname = \"web\"\nport = 8080\nprotocol = \"any\"\nallow_users = [\"{}\"]\n",
            u.alice.name
        ),
    );
    let d = sb.start_daemon(&p, &[]);
    // Outside the cgroup only the nftables layer sees bob.
    assert_eq!(
        sb.probe_outside(Some(&u.bob), &["tcp", "127.0.0.1:8080"]),
        "connect=ECONNREFUSED"
    );
    assert_eq!(
        sb.probe_outside(Some(&u.bob), &["udp", "[::1]:8080"]),
        "send=EPERM recv=no"
    );
    let events = d.wait_events(5, "two packet-layer refusals", |e| {
        e.iter()
            .filter(|v| v["loopguard.layer"] == "packet")
            .count()
            >= 2
    });
    let packets: Vec<_> = events
        .iter()
        .filter(|v| v["loopguard.layer"] == "packet")
        .collect();
    assert_eq!(packets.len(), 2, "{packets:?}");
    let tcp = packets
        .iter()
        .find(|v| v["network.transport"] == "tcp")
        .expect("tcp event");
    assert_eq!(tcp["event.action"], "deny");
    assert_eq!(tcp["loopguard.service"], "web");
    assert_eq!(tcp["user.id"], u.bob.uid);
    assert_eq!(tcp["user.name"], u.bob.name);
    assert_eq!(tcp["destination.ip"], "127.0.0.1");
    assert_eq!(tcp["destination.port"], 8080);
    assert_eq!(tcp["process.pid"], serde_json::Value::Null);
    let udp = packets
        .iter()
        .find(|v| v["network.transport"] == "udp")
        .expect("udp event");
    assert_eq!(udp["network.type"], "ipv6");
    assert_eq!(udp["destination.ip"], "::1");
    assert_eq!(udp["event.reason"], "service web: uid not allowed");
}

#[test]
fn idle_connections_cannot_starve_the_metrics_endpoint_or_the_daemon() {
    let u = users();
    let mut sb = Sandbox::new("run-slowloris");
    let p = sb.policy("p.toml", &policy(u.alice.name, ""));
    // The packaged unit's file descriptor limit (LimitNOFILE=1024).
    let d = sb.start_daemon_env(
        &p,
        &["--metrics", "127.0.0.1:9478"],
        &[("LG_TEST_NOFILE", "1024")],
    );
    // 1,100 connections that never send a request (each one a file
    // descriptor in the daemon if it kept them all).
    for _ in 0..4 {
        sb.spawn_outside(None, &["hold", "127.0.0.1:9478", "275"]);
    }
    // A scrape still gets through: idle connections are dropped at the
    // deadline and only a few are served at once.
    let started = Instant::now();
    loop {
        let body = sb.probe_outside(None, &["http", "127.0.0.1:9478", "/metrics"]);
        if body.contains("loopguard_policy_generation") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no scrape served for a minute under idle connections"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The daemon still has file descriptors to reload with.
    d.signal(Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !d.log().contains("SIGHUP: applied") {
        assert!(
            Instant::now() < deadline,
            "reload failed: {}",
            tail(&d.log(), 4000)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !d.log().contains("Too many open files"),
        "{}",
        tail(&d.log(), 4000)
    );
}

#[test]
fn events_name_the_service_of_a_policy_applied_by_another_process() {
    let u = users();
    let mut sb = Sandbox::new("run-follow");
    let first = sb.policy(
        "first.toml",
        &format!(
            "version = 1\n[[service]]\nname = \"jupyter\"\nport = 8888\nallow_users = [\"{}\"]\n",
            u.alice.name
        ),
    );
    let d = sb.start_daemon(&first, &[]);
    // Config management applies another file from a shell.
    let second = sb.policy(
        "second.toml",
        &format!(
            "version = 1\nmode = \"audit\"\n[[service]]\nname = \"nobody-watch\"\nport = 8888\ndeny_users = [\"{}\"]\n",
            u.bob.name
        ),
    );
    sb.apply(&second, &[]).ok();
    let (out, pid) = sb.probe_with_pid(Some(&u.bob), &["tcp", "127.0.0.1:8888"]);
    assert_eq!(out, "connect=ok", "audit mode refuses nothing");
    let hook = |e: &serde_json::Value| e["process.pid"] == pid;
    let events = d.wait_events(10, "bob's would-deny", |evs| evs.iter().any(hook));
    let e = events.iter().find(|e| hook(e)).expect("seen");
    assert_eq!(
        e["loopguard.service"],
        "nobody-watch",
        "{e}\n{}",
        tail(&d.log(), 4000)
    );
    assert_eq!(e["loopguard.mode"], "audit", "{e}");
    assert_eq!(e["event.action"], "would-deny", "{e}");
    // The packet layer's copy (outside the cgroup only nftables judges).
    assert_eq!(
        sb.probe_outside(Some(&u.bob), &["tcp", "127.0.0.1:8888"]),
        "connect=ok"
    );
    let packet =
        |e: &serde_json::Value| e["loopguard.layer"] == "packet" && e["user.id"] == u.bob.uid;
    let events = d.wait_events(10, "the packet layer's would-deny", |evs| {
        evs.iter().any(packet)
    });
    let e = events.iter().find(|e| packet(e)).expect("seen");
    assert_eq!(e["loopguard.service"], "nobody-watch", "{e}");
    assert_eq!(e["event.action"], "would-deny", "{e}");
}

/// The window between another process's flip and its saved state (here
/// made permanent: that apply dies before saving): the eBPF layer stamps
/// each event with its plan's id, and the daemon finds the plan in the
/// applier's journal.
#[test]
fn events_decided_before_the_applier_saved_its_state_name_the_new_service() {
    let u = users();
    let mut sb = Sandbox::new("run-window");
    let first = sb.policy(
        "first.toml",
        &format!(
            "version = 1\n[[service]]\nname = \"jupyter\"\nport = 8888\nallow_users = [\"{}\"]\n",
            u.alice.name
        ),
    );
    // eBPF only: no nftables events, so the daemon has no cause to repair
    // the interrupted apply while the test looks.
    let d = sb.start_daemon(&first, &["--layers", "bpf"]);
    let second = sb.policy(
        "second.toml",
        &format!(
            "version = 1\n[[service]]\nname = \"db-admin\"\nport = 8888\ndeny_users = [\"{}\"]\n",
            u.bob.name
        ),
    );
    let cgroup = sb.cgroup.to_str().expect("utf-8");
    let r = sb.lg_env(
        &[("LOOPGUARD_FAULT", "before-state")],
        &[
            "apply",
            second.to_str().expect("utf-8"),
            "--cgroup",
            cgroup,
            "--layers",
            "bpf",
        ],
    );
    assert_ne!(r.code, 0, "the fault must abort apply: {}", r.stderr);
    let (out, pid) = sb.probe_with_pid(Some(&u.bob), &["tcp", "127.0.0.1:8888"]);
    assert_eq!(out, "connect=EPERM", "the new plan is in force");
    let hook = |e: &serde_json::Value| e["process.pid"] == pid;
    let events = d.wait_events(10, "bob's refusal", |evs| evs.iter().any(hook));
    let e = events.iter().find(|e| hook(e)).expect("seen");
    assert_eq!(e["loopguard.service"], "db-admin", "{e}");
    assert_eq!(e["event.action"], "deny", "{e}");
    assert!(
        d.log().contains("being applied by another process"),
        "the daemon says where the plan came from"
    );
}

#[test]
fn a_flushed_ruleset_is_put_back_within_a_second_and_counted() {
    let u = users();
    let mut sb = Sandbox::new("run-flush");
    let p = sb.policy("p.toml", &policy(u.alice.name, ""));
    let d = sb.start_daemon(&p, &["--metrics", "127.0.0.1:9479"]);
    assert!(sb.nft_table().is_some());
    // The first line of Debian's /etc/nftables.conf.
    sb.in_netns(&["nft", "flush", "ruleset"]).ok();
    let flushed = Instant::now();
    while sb.probe_outside(Some(&u.bob), &["tcp", "127.0.0.1:8080"]) != "connect=ECONNREFUSED" {
        assert!(
            flushed.elapsed() < timing_target(Duration::from_secs(1)),
            "the nftables layer is not back a second after the flush"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "nftables layer back {:?} after the flush",
        flushed.elapsed()
    );
    let scrape = sb.probe(None, &["http", "127.0.0.1:9479", "/metrics"]);
    assert!(
        scrape.contains("loopguard_layer_repairs_total{layer=\"nft\"} 1"),
        "{scrape}"
    );
    assert!(
        d.log().contains("nftables layer missing"),
        "{}",
        tail(&d.log(), 4000)
    );
    assert_eq!(sb.lg(&["status"]).code, 0, "status is clean again");
}

#[test]
fn logrotate_move_and_sighup_write_to_the_new_file() {
    let u = users();
    let mut sb = Sandbox::new("run-rotate");
    let p = sb.policy("p.toml", &policy(u.alice.name, ""));
    let d = sb.start_daemon(&p, &[]);
    let log = sb.dir.join("audit.jsonl");
    let (_, first) = sb.probe_with_pid(Some(&u.bob), &["tcp", "127.0.0.1:8080"]);
    d.wait_events(10, "the first refusal", |evs| {
        evs.iter().any(|e| e["process.pid"] == first)
    });
    // What logrotate does: rename, then SIGHUP.
    let moved = sb.dir.join("audit.jsonl.1");
    std::fs::rename(&log, &moved).expect("rename");
    d.signal(Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !log.exists() {
        assert!(
            Instant::now() < deadline,
            "no new log after SIGHUP: {}",
            tail(&d.log(), 4000)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (_, second) = sb.probe_with_pid(Some(&u.bob), &["tcp", "127.0.0.1:8080"]);
    d.wait_events(10, "the second refusal, in the new file", |evs| {
        evs.iter().any(|e| e["process.pid"] == second)
    });
    let old = std::fs::read_to_string(&moved).expect("rotated file");
    assert!(
        !old.contains(&format!("\"process.pid\":{second}")),
        "the second event went to the rotated file"
    );
}

#[test]
fn audit_filters_take_only_known_words() {
    let sb = Sandbox::new("audit-words");
    let log = sb.dir.join("empty.jsonl");
    std::fs::write(&log, "").expect("log");
    let r = sb.lg(&[
        "audit",
        "--action",
        "denied",
        "--file",
        log.to_str().expect("utf-8"),
    ]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("would-deny") && r.stderr.contains("deny"),
        "the error names the valid values: {}",
        r.stderr
    );
    sb.lg(&[
        "audit",
        "--action",
        "would-deny",
        "--file",
        log.to_str().expect("utf-8"),
    ])
    .ok();
}

/// A policy allowing only `name` to port 8888 (the watcher tests).
fn only(name: &str) -> String {
    format!("version = 1\n[[service]]\nname = \"db\"\nport = 8888\nallow_users = [\"{name}\"]\n")
}

/// Waits until bob's connect to port 8888 answers `want` (the policy file
/// was followed), within `secs` (stretched under emulation).
fn wait_bob(sb: &Sandbox, d: &loopguard_tests::Daemon, secs: u64, want: &str, what: &str) {
    let bob = &users().bob;
    let deadline = Instant::now() + timing_target(Duration::from_secs(secs));
    loop {
        let got = sb.probe(Some(bob), &["tcp", "127.0.0.1:8888"]);
        if got == want {
            return;
        }
        if Instant::now() >= deadline {
            // The daemon's own lines (not the loader's debug output).
            let log = d.log();
            let own: Vec<&str> = log.lines().filter(|l| l.contains("cmd::run")).collect();
            panic!(
                "{what}: bob still gets {got}; the daemon said: {}",
                tail(&own.join("\n"), 3000)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The policy file is watched with inotify: an edit in place, a
/// config-management rename over it and a Kubernetes ConfigMap's `..data`
/// symlink swap each take effect without a signal.
#[test]
fn edits_renames_and_configmap_swaps_take_effect_without_a_signal() {
    let u = users();
    let mut sb = Sandbox::new("run-watch");
    // The ConfigMap layout: policy.toml -> ..data/policy.toml,
    // ..data -> ..v1.
    let conf = sb.dir.join("conf");
    let v1 = conf.join("..v1");
    std::fs::create_dir_all(&v1).expect("mkdir");
    std::fs::write(v1.join("policy.toml"), only(u.alice.name)).expect("write");
    std::os::unix::fs::symlink("..v1", conf.join("..data")).expect("symlink");
    let file = conf.join("policy.toml");
    std::os::unix::fs::symlink("..data/policy.toml", &file).expect("symlink");
    let d = sb.start_daemon(&file, &["-v"]);
    assert_eq!(
        sb.probe(Some(&u.bob), &["tcp", "127.0.0.1:8888"]),
        "connect=EPERM"
    );

    let secs = 10;

    // 1. The ConfigMap swap: a new version directory, ..data renamed onto it.
    let v2 = conf.join("..v2");
    std::fs::create_dir_all(&v2).expect("mkdir");
    std::fs::write(v2.join("policy.toml"), only(u.bob.name)).expect("write");
    std::os::unix::fs::symlink("..v2", conf.join("..data_tmp")).expect("symlink");
    std::fs::rename(conf.join("..data_tmp"), conf.join("..data")).expect("swap");
    wait_bob(&sb, &d, secs, "connect=ok", "after the ConfigMap swap");

    // 2. Config management: a temporary file renamed over the target.
    let tmp = v2.join(".policy.toml.tmp");
    std::fs::write(&tmp, only(u.alice.name)).expect("write");
    std::fs::rename(&tmp, v2.join("policy.toml")).expect("rename");
    wait_bob(
        &sb,
        &d,
        secs,
        "connect=EPERM",
        "after a rename over the file",
    );

    // 3. An editor writing in place.
    std::fs::write(v2.join("policy.toml"), only(u.bob.name)).expect("write");
    wait_bob(&sb, &d, secs, "connect=ok", "after an edit in place");
    assert!(d.log().contains("file changed"), "{}", tail(&d.log(), 2000));
}

/// Re-pointing a symlink in the middle of the path (`current -> rel2`) and
/// a policy directory deleted and made again both take effect: the
/// symlink's directory is watched, and a slow look every 5 s catches what
/// inotify cannot see.
#[test]
fn a_repointed_directory_symlink_and_a_recreated_directory_are_followed() {
    let u = users();
    let mut sb = Sandbox::new("run-watch2");
    let root = sb.dir.join("lg");
    for (rel, who) in [("rel1", u.alice.name), ("rel2", u.bob.name)] {
        std::fs::create_dir_all(root.join(rel)).expect("mkdir");
        std::fs::write(root.join(rel).join("policy.toml"), only(who)).expect("write");
    }
    std::os::unix::fs::symlink("rel1", root.join("current")).expect("symlink");
    let file = root.join("current").join("policy.toml");
    let d = sb.start_daemon(&file, &["-v"]);
    assert_eq!(
        sb.probe(Some(&u.bob), &["tcp", "127.0.0.1:8888"]),
        "connect=EPERM"
    );
    let secs = 15;
    // `ln -sfn rel2 current`, atomically.
    std::os::unix::fs::symlink("rel2", root.join("current.new")).expect("symlink");
    std::fs::rename(root.join("current.new"), root.join("current")).expect("swap");
    wait_bob(&sb, &d, secs, "connect=ok", "after re-pointing current");

    // The release directory deleted and made again, with alice only.
    std::fs::remove_dir_all(root.join("rel2")).expect("rm -r");
    std::fs::create_dir_all(root.join("rel2")).expect("mkdir");
    std::fs::write(root.join("rel2").join("policy.toml"), only(u.alice.name)).expect("write");
    wait_bob(
        &sb,
        &d,
        secs,
        "connect=EPERM",
        "after the directory was made again",
    );
    // And an edit in the new directory is seen too.
    std::fs::write(root.join("rel2").join("policy.toml"), only(u.bob.name)).expect("write");
    wait_bob(
        &sb,
        &d,
        secs,
        "connect=ok",
        "after an edit in the new directory",
    );
}
