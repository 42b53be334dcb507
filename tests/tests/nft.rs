//! The nftables layer on `lo`, alone and with the eBPF layer: what a test
//! user sees, coexistence with other tables, and all-or-nothing apply.

use std::os::unix::fs::PermissionsExt as _;

use loopguard_tests::{routes, users, Sandbox};

fn policy(alice: &str) -> String {
    format!(
        r#"version = 1
[[service]]
name = "web"
port = 8080
allow_users = ["{alice}", 0]

[[service]]
name = "statsd"
port = 8125
protocol = "udp"
allow_users = ["{alice}"]
"#
    )
}

#[test]
fn nft_layer_alone_refuses_every_route() {
    let u = users();
    let sb = Sandbox::new("nft-only");
    let p = sb.policy("p.toml", &policy(u.alice.name));
    let r = sb.apply(&p, &["--layers", "nft"]).ok();
    assert!(r.stdout.contains("layers nft"), "{}", r.stdout);
    for to in routes(8080) {
        // A refused SYN is answered with a reset: the client fails fast.
        assert_eq!(
            sb.probe(Some(&u.bob), &["tcp", &to]),
            "connect=ECONNREFUSED",
            "bob -> {to}"
        );
        assert_eq!(
            sb.probe(Some(&u.alice), &["tcp", &to]),
            "connect=ok",
            "alice -> {to}"
        );
        assert_eq!(sb.probe(None, &["tcp", &to]), "connect=ok", "root -> {to}");
    }
    for to in routes(8125) {
        // A refused datagram is dropped: sendto fails, nothing arrives.
        assert_eq!(
            sb.probe(Some(&u.bob), &["udp", &to]),
            "send=EPERM recv=no",
            "bob -> {to}"
        );
        assert_eq!(
            sb.probe(Some(&u.bob), &["udp-connected", &to]),
            "send=EPERM recv=no",
            "bob -> {to}"
        );
        assert_eq!(
            sb.probe(Some(&u.alice), &["udp", &to]),
            "send=ok recv=yes",
            "alice -> {to}"
        );
    }
    // Unmatched ports are untouched.
    assert_eq!(
        sb.probe(Some(&u.bob), &["tcp", "127.0.0.1:8081"]),
        "connect=ok"
    );
    assert_eq!(
        sb.probe(Some(&u.bob), &["udp", "[::1]:8126"]),
        "send=ok recv=yes"
    );

    let v: serde_json::Value =
        serde_json::from_str(&sb.lg(&["status", "--format", "json"]).ok().stdout).expect("json");
    assert_eq!(v["layers"], serde_json::json!(["nft"]));
    assert_eq!(v["services"][0]["packets"]["deny"], 10, "{v}");
    assert_eq!(v["services"][1]["packets"]["deny"], 20, "{v}");
    assert_eq!(v["services"][0]["attempts"]["deny"], 0, "no eBPF layer");

    // A re-apply that puts a new service first (so every index moves)
    // keeps each service's count, by name.
    let shifted = format!(
        "version = 1\n[[service]]\nname = \"dns\"\nport = 53\nprotocol = \"udp\"\nallow_users = [0]\n{}",
        policy(u.alice.name).trim_start_matches("version = 1\n")
    );
    let p2 = sb.policy("p2.toml", &shifted);
    sb.apply(&p2, &["--layers", "nft"]).ok();
    let v: serde_json::Value =
        serde_json::from_str(&sb.lg(&["status", "--format", "json"]).ok().stdout).expect("json");
    let denied = |name: &str| {
        v["services"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["name"] == name))
            .map(|s| s["packets"]["deny"].clone())
    };
    assert_eq!(denied("web"), Some(10.into()), "{v}");
    assert_eq!(denied("statsd"), Some(20.into()), "{v}");
    assert_eq!(denied("dns"), Some(0.into()), "{v}");

    // Moving a service to another port (updated in place: its counting
    // elements are replaced) keeps its count too, and the new port is
    // guarded at once, the old one no more.
    let moved = sb.policy("p3.toml", &shifted.replace("8125", "8126"));
    sb.apply(&moved, &["--layers", "nft"]).ok();
    assert_eq!(
        sb.probe(Some(&u.bob), &["udp", "127.0.0.1:8126"]),
        "send=EPERM recv=no"
    );
    assert_eq!(
        sb.probe(Some(&u.bob), &["udp", "127.0.0.1:8125"]),
        "send=ok recv=yes"
    );
    let v: serde_json::Value =
        serde_json::from_str(&sb.lg(&["status", "--format", "json"]).ok().stdout).expect("json");
    let statsd = v["services"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == "statsd"))
        .map(|s| s["packets"]["deny"].clone());
    assert_eq!(statsd, Some(21.into()), "20 before the move, 1 after: {v}");
}

#[test]
fn ruleset_matches_only_what_the_kernel_delivers_here_and_never_uses_conntrack() {
    let u = users();
    let sb = Sandbox::new("nft-shape");
    sb.apply_text(&policy(u.alice.name));
    let table = sb.nft_table().expect("table exists");
    let text = table.to_string();
    assert!(!text.contains("\"ct\""), "no conntrack expression: {text}");
    // The base chain's first rule lets established TCP go, its second
    // every packet whose destination the kernel does not deliver to this
    // host (its own fib lookup); only then are TCP and UDP sent on, each to
    // its own chain, which is reachable from nowhere else.
    let rules: Vec<&serde_json::Value> = table["nftables"]
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|o| o.get("rule"))
        .collect();
    let base: Vec<_> = rules.iter().filter(|r| r["chain"] == "output").collect();
    assert_eq!(base.len(), 4, "{base:?}");
    assert!(base[0].to_string().contains("\"syn\""), "{:?}", base[0]);
    // What leaves on lo is delivered here: dispatched with no lookup.
    assert_eq!(base[1]["expr"][0]["match"]["right"], "lo", "{:?}", base[1]);
    assert!(
        base[1].to_string().contains("dispatch_tcp"),
        "{:?}",
        base[1]
    );
    let scope = &base[2]["expr"][0]["match"];
    assert_eq!(scope["op"], "!=", "{scope}");
    assert_eq!(
        scope["left"],
        serde_json::json!({"fib": {"result": "type", "flags": ["daddr"]}}),
        "{scope}"
    );
    let kinds = scope["right"]["set"].to_string();
    for kind in ["local", "broadcast", "anycast", "multicast"] {
        assert!(kinds.contains(kind), "{kinds}");
    }
    assert_eq!(base[2]["expr"][1], serde_json::json!({"accept": null}));
    let jumps = base[3]["expr"][0]["vmap"]["data"]["set"].to_string();
    assert!(
        jumps.contains("dispatch_tcp") && jumps.contains("dispatch_udp"),
        "{jumps}"
    );
    for r in &rules {
        if r["chain"] != "output" {
            assert!(
                !r.to_string().contains("\"jump\":{\"target\":\"dispatch_"),
                "only the base chain dispatches: {r}"
            );
        }
    }
}

#[test]
fn both_layers_catch_processes_outside_the_cgroup() {
    let u = users();
    let sb = Sandbox::new("nft-both");
    let r = sb.apply_text(&policy(u.alice.name));
    assert!(r.stdout.contains("layers bpf+nft"), "{}", r.stdout);
    // Inside the cgroup the socket hook refuses first, with EPERM.
    assert_eq!(
        sb.probe(Some(&u.bob), &["tcp", "127.0.0.1:8080"]),
        "connect=EPERM"
    );
    // Outside it, the packet layer still refuses.
    assert_eq!(
        sb.probe_outside(Some(&u.bob), &["tcp", "127.0.0.1:8080"]),
        "connect=ECONNREFUSED"
    );
    assert_eq!(
        sb.probe_outside(Some(&u.bob), &["udp", "[::1]:8125"]),
        "send=EPERM recv=no"
    );
    assert_eq!(
        sb.probe_outside(Some(&u.alice), &["tcp", "[::1]:8080"]),
        "connect=ok"
    );
    let v: serde_json::Value =
        serde_json::from_str(&sb.lg(&["status", "--format", "json"]).ok().stdout).expect("json");
    assert_eq!(v["layers"], serde_json::json!(["bpf", "nft"]));
}

#[test]
fn another_tables_accept_does_not_open_a_hole_and_remove_leaves_it() {
    let u = users();
    let sb = Sandbox::new("nft-coexist");
    let other = "table inet other {\n\
        chain early { type filter hook output priority -300; policy accept; oif \"lo\" accept; }\n\
        chain late { type filter hook output priority 300; policy accept; oif \"lo\" accept; }\n\
        }\n";
    let f = sb.policy("other.nft", other);
    sb.in_netns(&["nft", "-f", f.to_str().expect("utf-8")]).ok();
    let p = sb.policy("p.toml", &policy(u.alice.name));
    sb.apply(&p, &["--layers", "nft"]).ok();
    assert_eq!(
        sb.probe(Some(&u.bob), &["tcp", "127.0.0.1:8080"]),
        "connect=ECONNREFUSED"
    );
    assert_eq!(
        sb.probe(Some(&u.bob), &["udp", "127.0.0.1:8125"]),
        "send=EPERM recv=no"
    );
    assert_eq!(
        sb.probe(Some(&u.alice), &["tcp", "127.0.0.1:8080"]),
        "connect=ok"
    );

    sb.lg(&["remove"]).ok();
    assert!(sb.nft_table().is_none(), "our table is gone");
    let tables = sb.in_netns(&["nft", "list", "tables"]).ok().stdout;
    assert_eq!(
        tables.trim(),
        "table inet other",
        "the other table is untouched"
    );
    assert_eq!(
        sb.probe(Some(&u.bob), &["tcp", "127.0.0.1:8080"]),
        "connect=ok"
    );
}

#[test]
fn failed_nft_transaction_leaves_both_layers_at_the_previous_policy() {
    let u = users();
    let sb = Sandbox::new("nft-fail");
    let a = sb.policy("a.toml", &policy(u.alice.name));
    sb.apply(&a, &[]).ok();
    let before = sb.lg(&["status", "--format", "json"]).ok().stdout;

    // An nft that checks (-c) and lists fine but fails to commit, the way a
    // transaction fails when the kernel refuses it at commit time.
    let fake_dir = sb.dir.join("fake-bin");
    std::fs::create_dir_all(&fake_dir).expect("dir");
    let real = String::from_utf8_lossy(
        &std::process::Command::new("sh")
            .args(["-c", "command -v nft"])
            .output()
            .expect("which")
            .stdout,
    )
    .trim()
    .to_string();
    let fake = fake_dir.join("nft");
    std::fs::write(
        &fake,
        // It reads the whole batch first, as nft does: exiting before
        // would make loopguard's write fail (EPIPE) instead, depending on
        // timing.
        format!("#!/bin/sh\nfor a in \"$@\"; do case \"$a\" in -c|list) exec {real} \"$@\";; esac; done\ncat >/dev/null\necho 'Error: simulated commit failure' >&2\nexit 1\n"),
    )
    .expect("fake nft");
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let path = format!(
        "{}:{}",
        fake_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );

    // B lets bob in; it must not take effect on either layer.
    let b = sb.policy(
        "b.toml",
        &format!("version = 1\n[[service]]\nname = \"web\"\nport = 8080\nallow_users = [\"{}\", \"{}\"]\n", u.alice.name, u.bob.name),
    );
    let cgroup = sb.cgroup.to_str().expect("utf-8");
    let r = sb.lg_env(
        &[("PATH", &path)],
        &["apply", b.to_str().expect("utf-8"), "--cgroup", cgroup],
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("simulated commit failure"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("unchanged"), "{}", r.stderr);

    assert_eq!(
        sb.probe(Some(&u.bob), &["tcp", "127.0.0.1:8080"]),
        "connect=EPERM",
        "eBPF still at A"
    );
    assert_eq!(
        sb.probe_outside(Some(&u.bob), &["tcp", "127.0.0.1:8080"]),
        "connect=ECONNREFUSED",
        "nft still at A"
    );
    let after = sb.lg(&["status", "--format", "json"]).ok().stdout;
    let hash = |s: &str| {
        serde_json::from_str::<serde_json::Value>(s).expect("json")["policy_hash"].clone()
    };
    assert_eq!(hash(&before), hash(&after));

    // With the real nft, B applies to both.
    sb.apply(&b, &[]).ok();
    assert_eq!(
        sb.probe(Some(&u.bob), &["tcp", "127.0.0.1:8080"]),
        "connect=ok"
    );
    assert_eq!(
        sb.probe_outside(Some(&u.bob), &["tcp", "127.0.0.1:8080"]),
        "connect=ok"
    );
}

#[test]
fn changing_layers_removes_the_one_no_longer_wanted() {
    let u = users();
    let sb = Sandbox::new("nft-switch");
    let p = sb.policy("p.toml", &policy(u.alice.name));
    sb.apply(&p, &[]).ok();
    assert!(sb.nft_table().is_some());
    sb.apply(&p, &["--layers", "bpf"]).ok();
    assert!(sb.nft_table().is_none(), "table removed");
    assert_eq!(
        sb.probe_outside(Some(&u.bob), &["tcp", "127.0.0.1:8080"]),
        "connect=ok"
    );
    sb.apply(&p, &["--layers", "nft"]).ok();
    assert!(
        loopguard_tests::attached_program_ids(&sb.cgroup).is_empty(),
        "eBPF detached"
    );
    assert_eq!(
        sb.probe(Some(&u.bob), &["tcp", "127.0.0.1:8080"]),
        "connect=ECONNREFUSED"
    );
    sb.lg(&["remove"]).ok();
    assert_eq!(sb.leftovers(), Vec::<String>::new());
}

/// Port ranges and single ports live in different nft maps (ranges in
/// interval maps, single ports in hash maps): each is judged, and counted,
/// on the nftables layer alone, at the edges of the range and past them.
#[test]
fn nft_layer_judges_port_ranges_and_single_ports() {
    let u = users();
    let sb = Sandbox::new("nft-ranges");
    let p = sb.policy(
        "p.toml",
        &format!(
            "version = 1\n\
             [[service]]\nname = \"dev\"\nport = \"9000-9010\"\nallow_users = [\"{a}\"]\n\
             [[service]]\nname = \"web\"\nport = 9020\nallow_users = [\"{a}\"]\n",
            a = u.alice.name
        ),
    );
    sb.apply(&p, &["--layers", "nft"]).ok();
    for port in [9000, 9005, 9010, 9020] {
        for to in routes(port) {
            assert_eq!(
                sb.probe(Some(&u.bob), &["tcp", &to]),
                "connect=ECONNREFUSED",
                "bob -> {to}"
            );
            assert_eq!(
                sb.probe(Some(&u.alice), &["tcp", &to]),
                "connect=ok",
                "alice -> {to}"
            );
        }
    }
    for port in [8999, 9011, 9019, 9021] {
        assert_eq!(
            sb.probe(Some(&u.bob), &["tcp", &format!("127.0.0.1:{port}")]),
            "connect=ok",
            "bob -> {port}, outside every service"
        );
    }
    let v: serde_json::Value =
        serde_json::from_str(&sb.lg(&["status", "--format", "json"]).ok().stdout).expect("json");
    for (i, name) in [(0, "dev"), (1, "web")] {
        assert_eq!(v["services"][i]["name"], name, "{v}");
        assert!(
            v["services"][i]["packets"]["deny"].as_u64().unwrap_or(0) > 0,
            "{name}'s refusals are counted: {}",
            v["services"][i]
        );
    }
}
