//! Every route to this host, layer by layer (SPEC §1, §4): the denied uid
//! is refused on each route by `--layers bpf`, `nft` and `both`, and the
//! allowed uid gets through on each. Then who may listen (SPEC §2, bind
//! guard), and a local table far larger than the old 4,096-address limit.

use std::time::{Duration, Instant};

use loopguard_tests::{users, Sandbox, TestUser, HOST_V4, HOST_V6};

const PORT: u16 = 8443;
/// A second service on PORT, for 127.0.0.5 only, with the roles swapped:
/// a connect to `0.0.0.0` from a socket bound to 127.0.0.5 goes to
/// 127.0.0.5 and must be judged there.
const FIVE: &str = "127.0.0.5";
/// Bind-guarded.
const BIND_PORT: u16 = 5432;

/// How one layer setting refuses a TCP connect: the eBPF layer fails
/// `connect()` with EPERM; the nftables layer answers the SYN with a reset.
fn tcp_refused(layers: &str) -> &'static str {
    if layers == "nft" {
        "connect=ECONNREFUSED"
    } else {
        "connect=EPERM"
    }
}

/// One route: the probe's flags and action, and the transport.
struct Route {
    args: Vec<String>,
    udp: bool,
    /// The route decides on 127.0.0.5: the roles of the two users swap.
    five: bool,
}

fn route(args: &[&str], udp: bool) -> Route {
    Route {
        args: args.iter().map(|s| s.to_string()).collect(),
        udp,
        five: false,
    }
}

/// The sandbox's link-local address on lg0.
fn link_local(sb: &Sandbox) -> String {
    let out = sb
        .in_netns(&[
            "ip", "-6", "-o", "addr", "show", "dev", "lg0", "scope", "link",
        ])
        .ok();
    let word = out
        .stdout
        .split_whitespace()
        .find(|w| w.starts_with("fe80::"))
        .unwrap_or_else(|| panic!("no link-local address on lg0: {}", out.stdout));
    word.split('/').next().unwrap_or(word).to_string()
}

fn every_route(sb: &Sandbox) -> Vec<Route> {
    let p = PORT;
    let ll = link_local(sb);
    let mut routes: Vec<Route> = [
        "127.0.0.1".to_string(),
        "127.45.6.7".into(),
        "[::1]".into(),
        "[::ffff:127.0.0.1]".into(),
        "0.0.0.0".into(),
        "[::]".into(),
        "[::ffff:0.0.0.0]".into(),
        HOST_V4.into(),
        format!("[{HOST_V6}]"),
        format!("[::ffff:{HOST_V4}]"),
        format!("[{ll}%lg0]"),
        // AnyIP: whole prefixes routed to the host.
        "10.66.3.4".into(),
        "[2001:db8:66::7]".into(),
    ]
    .iter()
    .flat_map(|a| {
        [
            route(&["tcp", &format!("{a}:{p}")], false),
            route(&["udp", &format!("{a}:{p}")], true),
        ]
    })
    .collect();
    routes.extend([
        route(&["udp-connected", &format!("127.0.0.1:{p}")], true),
        route(&["tfo", &format!("127.0.0.1:{p}")], false),
        // Broadcast: limited (routed by the default route, or forced onto
        // lo), subnet-directed, and IPv4-mapped on an IPv6 socket.
        route(
            &["--broadcast", "udp", &format!("255.255.255.255:{p}")],
            true,
        ),
        route(
            &[
                "--broadcast",
                "--device",
                "lo",
                "udp",
                &format!("255.255.255.255:{p}"),
            ],
            true,
        ),
        route(&["--broadcast", "udp", &format!("192.0.2.255:{p}")], true),
        route(
            &[
                "--broadcast",
                "udp",
                &format!("[::ffff:255.255.255.255]:{p}"),
            ],
            true,
        ),
        // Multicast, looped back to the wildcard listener.
        route(
            &["--mcast-if", "lo", "udp", &format!("224.0.0.1:{p}")],
            true,
        ),
        route(
            &["--mcast-if", "lg0", "udp", &format!("224.0.0.1:{p}")],
            true,
        ),
        route(
            &["--mcast-if", "lg0", "udp", &format!("[ff02::1%lg0]:{p}")],
            true,
        ),
        route(
            &["--mcast-if", "lg0", "udp", &format!("[ff01::1%lg0]:{p}")],
            true,
        ),
        // IPv6 subnet-router anycast (forwarding is on).
        route(&["udp", &format!("[2001:db8::]:{p}")], true),
    ]);
    // Unspecified destination from a bound socket: the kernel sends to the
    // bound address.
    for (action, udp) in [("tcp", false), ("udp", true)] {
        routes.push(Route {
            args: vec![
                "--src".into(),
                FIVE.into(),
                action.into(),
                format!("0.0.0.0:{p}"),
            ],
            udp,
            five: true,
        });
    }
    routes
}

/// Runs every route as the allowed and the denied user; returns the
/// failures (bounded), so one assertion reports them all.
fn check_routes(sb: &Sandbox, layers: &str, allowed: &TestUser, denied: &TestUser) -> Vec<String> {
    let mut bad = Vec::new();
    for r in every_route(sb) {
        let args: Vec<&str> = r.args.iter().map(String::as_str).collect();
        let (ok_user, refused_user) = if r.five {
            (denied, allowed)
        } else {
            (allowed, denied)
        };
        let (want_ok, want_refused) = if r.udp {
            ("send=ok recv=yes", "send=EPERM recv=no")
        } else {
            ("connect=ok", tcp_refused(layers))
        };
        let got = sb.probe(Some(ok_user), &args);
        if got != want_ok {
            bad.push(format!(
                "{layers}: {} {args:?}: {got} (want {want_ok})",
                ok_user.name
            ));
        }
        let got = sb.probe(Some(refused_user), &args);
        if got != want_refused {
            bad.push(format!(
                "{layers}: {} {args:?}: {got} (want {want_refused})",
                refused_user.name
            ));
        }
    }
    bad.truncate(20);
    bad
}

fn setup_routes(sb: &Sandbox) {
    for argv in [
        // The limited broadcast is routed like any other destination.
        &["ip", "route", "add", "default", "dev", "lg0"][..],
        &["ip", "route", "add", "local", "10.66.0.0/16", "dev", "lo"],
        &[
            "ip",
            "-6",
            "route",
            "add",
            "local",
            "2001:db8:66::/64",
            "dev",
            "lo",
        ],
        // Forwarding gives the subnet-router anycast address.
        &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"],
    ] {
        sb.in_netns(argv).ok();
    }
    // `apply` copies the local table as it is (`run` follows changes):
    // wait for the anycast route (once forwarding is on) and the
    // link-local address (after duplicate address detection).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let local = sb
            .in_netns(&["ip", "-6", "route", "show", "table", "local"])
            .ok()
            .stdout;
        if local.contains("anycast 2001:db8::") && local.contains("local fe80::") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no IPv6 anycast or link-local route: {local}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn policy(allowed: &TestUser, denied: &TestUser) -> String {
    format!(
        r#"version = 1
[[service]]
name = "svc"
port = {PORT}
protocol = "any"
allow_users = ["{a}"]

[[service]]
name = "five"
port = {PORT}
protocol = "any"
addresses = ["{FIVE}"]
allow_users = ["{d}"]

[[service]]
name = "pg"
port = {BIND_PORT}
protocol = "any"
allow_users = ["{a}", "{d}"]
bind_users = ["{a}"]
"#,
        a = allowed.name,
        d = denied.name
    )
}

#[test]
fn every_route_to_the_host_on_every_layer() {
    let u = users();
    let sb = Sandbox::new("routes");
    setup_routes(&sb);
    let p = sb.policy("p.toml", &policy(&u.alice, &u.bob));
    let mut bad = Vec::new();
    for layers in ["bpf", "nft", "both"] {
        sb.apply(&p, &["--layers", layers]).ok();
        bad.extend(check_routes(&sb, layers, &u.alice, &u.bob));
    }
    assert!(bad.is_empty(), "routes not enforced:\n{}", bad.join("\n"));
}

#[test]
fn only_bind_users_may_listen() {
    let u = users();
    let mut sb = Sandbox::new("bind");
    let p = sb.policy("p.toml", &policy(&u.alice, &u.bob));
    let port = BIND_PORT;
    let binds = [
        vec!["bind".to_string(), format!("127.0.0.1:{port}")],
        vec!["bind".into(), format!("127.0.0.1:{port}"), "udp".into()],
        vec!["bind".into(), format!("0.0.0.0:{port}")],
        vec!["bind".into(), format!("[::]:{port}"), "udp".into()],
        vec!["bind".into(), format!("[::1]:{port}")],
        vec!["bind".into(), format!("[::ffff:127.0.0.1]:{port}")],
        vec!["bind".into(), format!("{HOST_V4}:{port}")],
        vec!["--reuse".into(), "bind".into(), format!("127.0.0.9:{port}")],
    ];
    // bind() has no nftables equivalent: the nft layer alone guards
    // nothing here (README, "what each layer sees").
    for layers in ["bpf", "both"] {
        sb.apply(&p, &["--layers", layers]).ok();
        for b in &binds {
            let args: Vec<&str> = b.iter().map(String::as_str).collect();
            assert_eq!(
                sb.probe(Some(&u.bob), &args),
                "bind=EPERM",
                "{layers}: bob {args:?}"
            );
            assert_eq!(
                sb.probe(Some(&u.alice), &args),
                "bind=ok",
                "{layers}: alice {args:?}"
            );
        }
        // Other ports, and port 0 (an ephemeral port), are not guarded.
        for args in [["bind", "127.0.0.1:5433"], ["bind", "127.0.0.1:0"]] {
            assert_eq!(sb.probe(Some(&u.bob), &args), "bind=ok", "{args:?}");
        }
    }
    // UDP with SO_REUSEADDR/SO_REUSEPORT while the real service runs on the
    // wildcard: the squatter would share its datagrams.
    sb.spawn_outside(None, &["--reuse", "udp-sink", &port.to_string()]);
    sb.wait_udp_bound(port);
    let args = ["--reuse", "bind", &format!("127.0.0.1:{port}"), "udp"];
    assert_eq!(sb.probe(Some(&u.bob), &args), "bind=EPERM");
    assert_eq!(sb.probe(Some(&u.alice), &args), "bind=ok");

    // explain agrees, and names the service.
    let e = sb
        .lg(&[
            "explain",
            "--user",
            u.bob.name,
            "--bind",
            "--to",
            &format!("0.0.0.0:{port}"),
            "--format",
            "json",
        ])
        .ok();
    let v: serde_json::Value = serde_json::from_str(&e.stdout).expect("explain json");
    assert_eq!(v["action"], "deny", "{v}");
    assert_eq!(v["attempt"], "bind", "{v}");
    assert_eq!(v["service"], "pg", "{v}");
}

#[test]
fn refused_binds_are_audited() {
    let u = users();
    let mut sb = Sandbox::new("bind-audit");
    let p = sb.policy("p.toml", &policy(&u.alice, &u.bob));
    let d = sb.start_daemon(&p, &[]);
    let (out, pid) = sb.probe_with_pid(Some(&u.bob), &["bind", &format!("0.0.0.0:{BIND_PORT}")]);
    assert_eq!(out, "bind=EPERM");
    let is_ours = |e: &serde_json::Value| e["process.pid"] == pid && e["loopguard.layer"] == "bind";
    let events = d.wait_events(10, "the refused bind", |evs| evs.iter().any(is_ours));
    let e = events.iter().find(|e| is_ours(e)).expect("seen");
    assert_eq!(e["event.action"], "deny", "{e}");
    assert_eq!(e["loopguard.service"], "pg", "{e}");
    assert_eq!(e["user.id"], u.bob.uid, "{e}");
    assert_eq!(e["destination.port"], BIND_PORT, "{e}");
    assert_eq!(e["event.reason"], "service pg: uid may not bind", "{e}");
}

#[test]
fn five_thousand_host_addresses_are_all_guarded() {
    let u = users();
    let sb = Sandbox::new("many-addrs");
    let addr = |i: usize| format!("10.100.{}.{}", i / 250, i % 250 + 1);
    let batch: String = (0..5000)
        .map(|i| format!("addr add {}/32 dev lg0\n", addr(i)))
        .collect();
    let file = sb.policy("addrs.batch", &batch);
    sb.in_netns(&["ip", "-b", file.to_str().expect("utf-8 path")])
        .ok();
    let p = sb.policy("p.toml", &policy(&u.alice, &u.bob));
    for layers in ["bpf", "nft", "both"] {
        sb.apply(&p, &["--layers", layers]).ok();
        for i in [0, 1, 2500, 4095, 4096, 4999] {
            let to = format!("{}:{PORT}", addr(i));
            assert_eq!(
                sb.probe(Some(&u.bob), &["tcp", &to]),
                tcp_refused(layers),
                "{layers}: bob -> {to}"
            );
            assert_eq!(
                sb.probe(Some(&u.alice), &["tcp", &to]),
                "connect=ok",
                "{layers}: alice -> {to}"
            );
        }
    }
}

#[test]
fn mptcp_is_judged_as_tcp_and_extra_subflows_do_not_break_it() {
    let u = users();
    let sb = Sandbox::new("mptcp");
    let enabled = sb
        .in_netns(&["sysctl", "-n", "net.mptcp.enabled"])
        .ok()
        .stdout;
    assert_eq!(
        enabled.trim(),
        "1",
        "this kernel has no MPTCP: cannot test it"
    );
    // The path manager opens an extra subflow from 127.0.0.9 for every
    // connection: a kernel worker (uid 0, which the policy does not allow)
    // opens it.
    sb.in_netns(&["ip", "mptcp", "limits", "set", "subflow", "2"])
        .ok();
    sb.in_netns(&[
        "ip",
        "mptcp",
        "endpoint",
        "add",
        "127.0.0.9",
        "dev",
        "lo",
        "subflow",
    ])
    .ok();
    let p = sb.policy("p.toml", &policy(&u.alice, &u.bob));
    for layers in ["bpf", "nft", "both"] {
        sb.apply(&p, &["--layers", layers]).ok();
        for to in ["127.0.0.1", "[::1]", HOST_V4] {
            let to = format!("{to}:{PORT}");
            assert_eq!(
                sb.probe(Some(&u.bob), &["--mptcp", "tcp", &to]),
                tcp_refused(layers),
                "{layers}: bob -> {to}"
            );
            assert_eq!(
                sb.probe(Some(&u.alice), &["--mptcp", "tcp", &to]),
                "connect=ok",
                "{layers}: alice -> {to}"
            );
        }
    }
}
