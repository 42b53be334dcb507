//! `loopguard scan`: listeners found from the kernel with their owner,
//! process, guard and exposure; the starter policy it writes passes
//! `check` and, applied (audit mode), lets every scanned owner through
//! without a would-deny.

use std::{
    io::{BufRead as _, BufReader},
    process::Child,
};

use loopguard_tests::{users, Sandbox, TestUser};

/// A probe serving `addr` as `user`, once it says it is.
fn serve(sb: &Sandbox, user: &TestUser, addr: &str, proto: &str) -> Child {
    let mut child = sb.spawn_probe(Some(user), &["serve", addr, proto]);
    let mut line = String::new();
    let out = child.stdout.take().expect("stdout");
    BufReader::new(out).read_line(&mut line).expect("read");
    assert_eq!(line.trim(), "serving", "serve {addr}/{proto}");
    child
}

fn json(sb: &Sandbox, args: &[&str]) -> serde_json::Value {
    let r = sb.lg(args).ok();
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout))
}

#[test]
fn scan_names_owner_process_guard_and_exposure() {
    let u = users();
    let sb = Sandbox::new("scan");
    let mut held = vec![
        serve(&sb, &u.alice, "127.0.0.7:7777", "tcp"),
        serve(&sb, &u.bob, "0.0.0.0:7778", "tcp"),
        serve(&sb, &u.alice, "127.0.0.1:7779", "udp"),
    ];
    sb.apply_text(&format!(
        "version = 1\n[[service]]\nname = \"svc7777\"\nport = 7777\nallow_users = [\"{}\"]\n",
        u.alice.name
    ));

    let v = json(&sb, &["scan", "--format", "json"]);
    let all = v["listeners"].as_array().expect("listeners").clone();
    let find = |port: u16| {
        all.iter()
            .find(|l| l["port"] == port)
            .unwrap_or_else(|| panic!("port {port} not listed: {v}"))
            .clone()
    };
    let a = find(7777);
    assert_eq!(a["protocol"], "tcp");
    assert_eq!(a["address"], "127.0.0.7");
    assert_eq!(a["uid"], u.alice.uid);
    assert_eq!(a["user"], u.alice.name);
    assert_eq!(a["process"], "lg-probe");
    assert!(a["pid"].as_u64().is_some(), "{a}");
    assert_eq!(a["service"], "svc7777");
    assert_eq!(a["exposed"], false);
    let b = find(7778);
    assert_eq!(b["address"], "0.0.0.0");
    assert_eq!(b["uid"], u.bob.uid);
    assert_eq!(b["exposed"], true);
    assert!(b["service"].is_null(), "{b}");
    let c = find(7779);
    assert_eq!(c["protocol"], "udp");
    assert_eq!(c["uid"], u.alice.uid);

    let human = sb.lg(&["scan"]).ok().stdout;
    assert!(
        human.contains("NETWORK: lg-probe on 0.0.0.0:7778/tcp is also reachable from the network"),
        "{human}"
    );
    assert!(human.contains("service svc7777"), "{human}");
    assert!(human.contains("UNGUARDED"), "{human}");
    for c in &mut held {
        c.kill().ok();
        c.wait().ok();
    }
}

#[test]
fn the_starter_policy_checks_and_lets_the_owners_through_in_audit_mode() {
    let u = users();
    let sb = Sandbox::new("scan-toml");
    let mut held = vec![
        serve(&sb, &u.alice, "127.0.0.7:7777", "tcp"),
        serve(&sb, &u.bob, "0.0.0.0:7778", "tcp"),
    ];
    let toml = sb.lg(&["scan", "--format", "toml"]).ok().stdout;
    assert!(toml.contains("mode = \"audit\""), "{toml}");
    let file = sb.policy("starter.toml", &toml);
    let checked = sb.lg(&["check", file.to_str().expect("utf-8")]);
    assert_eq!(checked.code, 0, "{}\n{toml}", checked.stdout);
    sb.apply(&file, &[]).ok();

    assert_eq!(
        sb.probe(Some(&u.alice), &["tcp-to", "127.0.0.7:7777"]),
        "connect=ok"
    );
    assert_eq!(
        sb.probe(Some(&u.bob), &["tcp-to", "127.0.0.1:7778"]),
        "connect=ok"
    );
    // Someone else: let through (audit), and counted as would-deny.
    assert_eq!(
        sb.probe(Some(&u.bob), &["tcp-to", "127.0.0.7:7777"]),
        "connect=ok"
    );

    let status = json(&sb, &["status", "--format", "json"]);
    let services = status["services"].as_array().expect("services");
    let would = |port: &str| {
        services
            .iter()
            .find(|s| s["ports"] == port)
            .map(|s| s["attempts"]["would-deny"].as_u64().unwrap_or(0))
            .unwrap_or_else(|| panic!("no service on {port}: {status}"))
    };
    assert_eq!(would("7778"), 0, "the owner of 7778 is allowed");
    assert_eq!(would("7777"), 1, "only bob's attempt on alice's port");
    for c in &mut held {
        c.kill().ok();
        c.wait().ok();
    }
}
