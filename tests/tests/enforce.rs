//! The eBPF layer against the real kernel: what a test user sees when it
//! connects or sends to a guarded loopback service by every route.

use loopguard_tests::{routes, users, Sandbox, HOST_V4};

/// Every route to a local listener on port 8080 that SPEC §1 lists.

#[test]
fn allow_list_tcp_every_route() {
    let u = users();
    let sb = Sandbox::new("allow-tcp");
    sb.apply_text(&format!(
        r#"version = 1
[[service]]
name = "web"
port = 8080
allow_users = ["{}", 0]
"#,
        u.alice.name
    ));
    for to in routes(8080) {
        assert_eq!(
            sb.probe(Some(&u.alice), &["tcp", &to]),
            "connect=ok",
            "alice -> {to}"
        );
        assert_eq!(sb.probe(None, &["tcp", &to]), "connect=ok", "root -> {to}");
        assert_eq!(
            sb.probe(Some(&u.bob), &["tcp", &to]),
            "connect=EPERM",
            "bob -> {to}"
        );
    }
    // TCP Fast Open goes through the same hook.
    assert_eq!(
        sb.probe(Some(&u.bob), &["tfo", "127.0.0.1:8080"]),
        "connect=EPERM"
    );
    assert_eq!(
        sb.probe(Some(&u.alice), &["tfo", "127.0.0.1:8080"]),
        "connect=ok"
    );
    // Unmatched ports behave exactly as before.
    for to in routes(8081) {
        assert_eq!(
            sb.probe(Some(&u.bob), &["tcp", &to]),
            "connect=ok",
            "bob -> {to} (unguarded port)"
        );
    }
    // UDP on the TCP service's port is not the service.
    assert_eq!(
        sb.probe(Some(&u.bob), &["udp", "127.0.0.1:8080"]),
        "send=ok recv=yes"
    );

    let status = sb.lg(&["status", "--format", "json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&status.stdout).expect("status json");
    assert_eq!(v["installed"], true);
    assert_eq!(v["layers"][0], "bpf");
    let web = &v["services"][0];
    assert_eq!(web["name"], "web");
    assert_eq!(
        web["attempts"]["deny"],
        11,
        "{status:?}",
        status = status.stdout
    );
    assert_eq!(web["attempts"]["allow"], 21);
}

#[test]
fn udp_allow_list_connected_and_unconnected() {
    let u = users();
    let sb = Sandbox::new("allow-udp");
    sb.apply_text(&format!(
        r#"version = 1
[[service]]
name = "statsd"
port = 8125
protocol = "udp"
allow_users = ["{}"]
"#,
        u.alice.name
    ));
    for to in routes(8125) {
        assert_eq!(
            sb.probe(Some(&u.alice), &["udp", &to]),
            "send=ok recv=yes",
            "alice -> {to}"
        );
        assert_eq!(
            sb.probe(Some(&u.bob), &["udp", &to]),
            "send=EPERM recv=no",
            "bob -> {to}"
        );
        assert_eq!(
            sb.probe(Some(&u.bob), &["udp-connected", &to]),
            "send=EPERM recv=no",
            "bob connected -> {to}"
        );
    }
    assert_eq!(
        sb.probe(Some(&u.alice), &["udp-connected", "[::1]:8125"]),
        "send=ok recv=yes"
    );
    // TCP to the UDP service's port is unmatched.
    assert_eq!(
        sb.probe(Some(&u.bob), &["tcp", "127.0.0.1:8125"]),
        "connect=ok"
    );
}

#[test]
fn deny_list_refuses_only_listed_uids() {
    let u = users();
    let sb = Sandbox::new("deny-list");
    sb.apply_text(&format!(
        r#"version = 1
[[service]]
name = "everything-local"
port = "1-65535"
protocol = "any"
deny_users = ["{}"]
"#,
        u.bob.name
    ));
    for to in ["127.0.0.1:22", "[::1]:9000", &format!("{HOST_V4}:5000")] {
        assert_eq!(
            sb.probe(Some(&u.bob), &["tcp", to]),
            "connect=EPERM",
            "bob -> {to}"
        );
        assert_eq!(
            sb.probe(Some(&u.bob), &["udp", to]),
            "send=EPERM recv=no",
            "bob udp -> {to}"
        );
        assert_eq!(
            sb.probe(Some(&u.alice), &["tcp", to]),
            "connect=ok",
            "alice -> {to}"
        );
        assert_eq!(sb.probe(None, &["tcp", to]), "connect=ok", "root -> {to}");
    }
}

#[test]
fn default_deny_needs_force_and_then_denies_unmatched() {
    let u = users();
    let sb = Sandbox::new("default-deny");
    let p = sb.policy(
        "deny.toml",
        &format!(
            r#"version = 1
default = "deny"
[[service]]
name = "app"
port = 3000
allow_users = ["{}"]
"#,
            u.alice.name
        ),
    );
    let refused = sb.apply(&p, &[]);
    assert_eq!(refused.code, 1, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("cuts-off-root"),
        "{}",
        refused.stderr
    );
    assert!(
        sb.leftovers().is_empty(),
        "a refused apply installed something: {:?}",
        sb.leftovers()
    );

    sb.apply(&p, &["--force"]).ok();
    assert_eq!(
        sb.probe(Some(&u.alice), &["tcp", "127.0.0.1:3000"]),
        "connect=ok"
    );
    assert_eq!(
        sb.probe(Some(&u.bob), &["tcp", "127.0.0.1:3000"]),
        "connect=EPERM"
    );
    // Unmatched traffic gets the default, for everyone, root included.
    assert_eq!(
        sb.probe(Some(&u.alice), &["tcp", "127.0.0.1:3001"]),
        "connect=EPERM"
    );
    assert_eq!(sb.probe(None, &["udp", "[::1]:53"]), "send=EPERM recv=no");
    // Traffic to other machines is not loopguard's: 198.51.100.1 is not an
    // address of this namespace (it fails for lack of a route, not EPERM).
    let out = sb.probe(Some(&u.alice), &["tcp-to", "198.51.100.1:3001"]);
    assert_ne!(out, "connect=EPERM");
}

#[test]
fn audit_mode_refuses_nothing_and_counts() {
    let u = users();
    let sb = Sandbox::new("audit");
    sb.apply_text(&format!(
        r#"version = 1
mode = "audit"
[[service]]
name = "redis"
port = 6379
allow_users = ["{}"]
"#,
        u.alice.name
    ));
    assert_eq!(
        sb.probe(Some(&u.bob), &["tcp", "127.0.0.1:6379"]),
        "connect=ok"
    );
    assert_eq!(sb.probe(Some(&u.bob), &["tcp", "[::1]:6379"]), "connect=ok");
    assert_eq!(
        sb.probe(Some(&u.alice), &["tcp", "[::1]:6379"]),
        "connect=ok"
    );
    let v: serde_json::Value =
        serde_json::from_str(&sb.lg(&["status", "--format", "json"]).ok().stdout).expect("json");
    assert_eq!(v["services"][0]["attempts"]["would-deny"], 2);
    assert_eq!(v["services"][0]["attempts"]["deny"], 0);
    assert_eq!(v["services"][0]["attempts"]["allow"], 1);
}

#[test]
fn per_service_audit_override() {
    let u = users();
    let sb = Sandbox::new("audit-override");
    sb.apply_text(&format!(
        r#"version = 1
[[service]]
name = "enforced"
port = 7000
allow_users = ["{a}"]

[[service]]
name = "trial"
port = 7001
allow_users = ["{a}"]
mode = "audit"
"#,
        a = u.alice.name
    ));
    assert_eq!(
        sb.probe(Some(&u.bob), &["tcp", "127.0.0.1:7000"]),
        "connect=EPERM"
    );
    assert_eq!(
        sb.probe(Some(&u.bob), &["tcp", "127.0.0.1:7001"]),
        "connect=ok"
    );
}

#[test]
fn groups_expand_to_primary_and_supplementary_members() {
    let u = users();
    let sb = Sandbox::new("groups");
    sb.apply_text(
        r#"version = 1
[[service]]
name = "jupyter"
port = 8888
allow_groups = ["lgt-devs"]
"#,
    );
    assert_eq!(
        sb.probe(Some(&u.carol), &["tcp", "127.0.0.1:8888"]),
        "connect=ok",
        "supplementary member"
    );
    assert_eq!(
        sb.probe(Some(&u.dave), &["tcp", "127.0.0.1:8888"]),
        "connect=ok",
        "primary member"
    );
    assert_eq!(
        sb.probe(Some(&u.alice), &["tcp", "127.0.0.1:8888"]),
        "connect=EPERM"
    );
}

#[test]
fn address_specific_services_and_most_specific_wins() {
    let u = users();
    let sb = Sandbox::new("addresses");
    sb.apply_text(&format!(
        r#"version = 1
# Port 5432 on 127.0.0.2 is alice's; on every other route it is closed to
# all but root.
[[service]]
name = "pg-all"
port = 5432
allow_users = [0]

[[service]]
name = "pg-alice"
port = 5432
addresses = ["127.0.0.2", "::1"]
allow_users = ["{a}"]

[[service]]
name = "dev-range"
port = "9000-9100"
addresses = ["127.0.1.0/24"]
deny_users = ["{b}"]
"#,
        a = u.alice.name,
        b = u.bob.name
    ));
    assert_eq!(
        sb.probe(Some(&u.alice), &["tcp", "127.0.0.2:5432"]),
        "connect=ok"
    );
    assert_eq!(
        sb.probe(Some(&u.alice), &["tcp", "[::ffff:127.0.0.2]:5432"]),
        "connect=ok"
    );
    assert_eq!(
        sb.probe(Some(&u.alice), &["tcp", "[::1]:5432"]),
        "connect=ok"
    );
    assert_eq!(
        sb.probe(None, &["tcp", "127.0.0.2:5432"]),
        "connect=EPERM",
        "root is not in pg-alice"
    );
    assert_eq!(
        sb.probe(Some(&u.alice), &["tcp", "127.0.0.1:5432"]),
        "connect=EPERM"
    );
    assert_eq!(
        sb.probe(Some(&u.alice), &["tcp", "0.0.0.0:5432"]),
        "connect=EPERM",
        "0.0.0.0 reaches 127.0.0.1"
    );
    assert_eq!(
        sb.probe(Some(&u.alice), &["tcp", "[::]:5432"]),
        "connect=ok",
        ":: reaches ::1"
    );
    assert_eq!(
        sb.probe(Some(&u.alice), &["tcp", &format!("{HOST_V4}:5432")]),
        "connect=EPERM"
    );
    assert_eq!(sb.probe(None, &["tcp", "127.0.0.1:5432"]), "connect=ok");

    assert_eq!(
        sb.probe(Some(&u.bob), &["tcp", "127.0.1.9:9050"]),
        "connect=EPERM"
    );
    assert_eq!(
        sb.probe(Some(&u.bob), &["tcp", "127.0.2.9:9050"]),
        "connect=ok"
    );
    assert_eq!(
        sb.probe(Some(&u.alice), &["tcp", "127.0.1.9:9050"]),
        "connect=ok"
    );
}

#[test]
fn ebpf_alone_guards_only_the_cgroup_subtree() {
    let u = users();
    let sb = Sandbox::new("outside");
    let p = sb.policy(
        "p.toml",
        &format!(
            "version = 1\n[[service]]\nname = \"web\"\nport = 8080\nallow_users = [\"{}\"]\n",
            u.alice.name
        ),
    );
    sb.apply(&p, &["--layers", "bpf"]).ok();
    let inside = sb.probe(Some(&u.bob), &["tcp", "127.0.0.1:8080"]);
    assert_eq!(inside, "connect=EPERM");
    // Same namespace, outside the cgroup: the eBPF layer does not see it
    // (the nftables layer is what guards processes outside the subtree).
    assert_eq!(
        sb.probe_outside(Some(&u.bob), &["tcp", "127.0.0.1:8080"]),
        "connect=ok"
    );
    assert!(sb.nft_table().is_none(), "--layers bpf installs no table");
}

/// The eBPF layer's counts survive a re-apply by service name: a service
/// kept moves to another index (one is inserted before it), another is
/// dropped, a new one starts at zero, and the default's counts stay.
#[test]
fn counts_carry_over_a_reapply_by_service_name() {
    let u = users();
    let sb = Sandbox::new("carry-counts");
    let service = |name: &str, port: u16| {
        format!(
            "[[service]]\nname = \"{name}\"\nport = {port}\nallow_users = [\"{}\"]\n",
            u.alice.name
        )
    };
    let first = format!(
        "version = 1\ndefault = \"allow\"\n{}{}",
        service("web", 8080),
        service("db", 8081)
    );
    let p = sb.policy("policy.toml", &first);
    sb.apply(&p, &["--layers", "bpf"]).ok();
    for _ in 0..3 {
        assert_eq!(
            sb.probe(Some(&u.bob), &["tcp", "127.0.0.1:8080"]),
            "connect=EPERM"
        );
    }
    assert_eq!(
        sb.probe(Some(&u.alice), &["tcp", "127.0.0.1:8080"]),
        "connect=ok"
    );
    assert_eq!(
        sb.probe(Some(&u.bob), &["tcp", "127.0.0.1:8081"]),
        "connect=EPERM"
    );
    for _ in 0..2 {
        sb.probe(Some(&u.bob), &["tcp", "127.0.0.1:9090"]);
    }

    let second = format!(
        "version = 1\ndefault = \"allow\"\n{}{}",
        service("cache", 8082),
        service("web", 8080)
    );
    let p = sb.policy("policy.toml", &second);
    sb.apply(&p, &["--layers", "bpf"]).ok();
    let status = sb.lg(&["status", "--format", "json"]).ok().stdout;
    let v: serde_json::Value = serde_json::from_str(&status).expect("status json");
    let attempts = |name: &str| {
        let s = v["services"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["name"] == name))
            .unwrap_or_else(|| {
                panic!(
                    "no {name} in status: {}",
                    loopguard_tests::tail(&status, 2000)
                )
            });
        (
            s["attempts"]["allow"].clone(),
            s["attempts"]["deny"].clone(),
        )
    };
    let tail = loopguard_tests::tail(&status, 2000);
    assert_eq!(attempts("web"), (1.into(), 3.into()), "web: {tail}");
    assert_eq!(attempts("cache"), (0.into(), 0.into()), "cache: {tail}");
    assert_eq!(
        v["default_counts"]["attempts"]["allow"], 2,
        "default: {tail}"
    );
}

#[test]
fn counts_follow_a_renamed_service_on_both_layers() {
    let u = users();
    let sb = Sandbox::new("rename-counts");
    let policy = |name: &str| {
        format!(
            "version = 1\ndefault = \"allow\"\n[[service]]\nname = \"{name}\"\nport = 8080\nallow_users = [\"{}\"]\n",
            u.alice.name
        )
    };
    let p = sb.policy("policy.toml", &policy("mysql"));
    sb.apply(&p, &[]).ok();
    for _ in 0..3 {
        assert_eq!(
            sb.probe(Some(&u.bob), &["tcp", "127.0.0.1:8080"]),
            "connect=EPERM"
        );
    }
    // The same service, renamed: its counters follow it.
    let p = sb.policy("policy.toml", &policy("mariadb"));
    let dry = sb.apply(&p, &["--dry-run"]).ok().stdout;
    assert!(dry.contains("would enforce with layers bpf+nft"), "{dry}");
    sb.apply(&p, &[]).ok();
    let status = sb.lg(&["status", "--format", "json"]).ok().stdout;
    let v: serde_json::Value = serde_json::from_str(&status).expect("status json");
    let tail = loopguard_tests::tail(&status, 2000);
    let s = &v["services"][0];
    assert_eq!(s["name"], "mariadb", "{tail}");
    assert_eq!(
        s["attempts"]["deny"], 3,
        "eBPF counts follow the rename: {tail}"
    );
    // The nftables layer counted no packet: the eBPF layer refused each
    // connect before one existed.
    assert_eq!(s["packets"]["deny"], 0, "{tail}");
}

#[test]
fn packet_counts_follow_a_renamed_service() {
    let u = users();
    let sb = Sandbox::new("rename-packets");
    let policy = |name: &str| {
        format!(
            "version = 1\ndefault = \"allow\"\n[[service]]\nname = \"{name}\"\nport = 8080\nallow_users = [\"{}\"]\n",
            u.alice.name
        )
    };
    let p = sb.policy("policy.toml", &policy("mysql"));
    sb.apply(&p, &["--layers", "nft"]).ok();
    for _ in 0..2 {
        assert_eq!(
            sb.probe(Some(&u.bob), &["tcp", "127.0.0.1:8080"]),
            "connect=ECONNREFUSED"
        );
    }
    let p = sb.policy("policy.toml", &policy("mariadb"));
    sb.apply(&p, &["--layers", "nft"]).ok();
    let status = sb.lg(&["status", "--format", "json"]).ok().stdout;
    let v: serde_json::Value = serde_json::from_str(&status).expect("status json");
    let tail = loopguard_tests::tail(&status, 2000);
    assert_eq!(v["services"][0]["name"], "mariadb", "{tail}");
    let denied = v["services"][0]["packets"]["deny"].as_u64().unwrap_or(0);
    assert!(denied >= 2, "nftables counts follow the rename: {tail}");
}
