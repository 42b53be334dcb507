//! End to end with a real service from Debian: redis-server bound to a
//! 127.x address, and redis-cli run as an allowed and a denied user.

use std::{path::Path, process::Command};

use loopguard_tests::{users, Sandbox};

const REDIS_SERVER: &str = "/usr/bin/redis-server";
const REDIS_CLI: &str = "/usr/bin/redis-cli";

/// A Debian redis-server in the sandbox's namespace, on `bind` and `port`,
/// keeping nothing on disk.
fn spawn_redis(sb: &mut Sandbox, bind: &str, port: &str) {
    let dir = sb.dir.join("redis");
    std::fs::create_dir_all(&dir).expect("redis dir");
    sb.spawn_in_netns(&[
        REDIS_SERVER,
        "--bind",
        bind,
        "--port",
        port,
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        dir.to_str().expect("utf-8"),
        "--protected-mode",
        "no",
    ]);
}

#[test]
fn redis_cli_allowed_and_denied() {
    assert!(
        Path::new(REDIS_SERVER).exists() && Path::new(REDIS_CLI).exists(),
        "REDIS IS NOT INSTALLED: this end-to-end test needs Debian's redis-server and \
         redis-tools (`cargo xtask setup` installs them)"
    );
    let u = users();
    let mut sb = Sandbox::new("redis");
    spawn_redis(&mut sb, "127.0.0.7 ::1", "6390");
    sb.wait_listening("127.0.0.7:6390");
    sb.apply_text(&format!(
        r#"version = 1
[[service]]
name = "redis"
port = 6390
allow_users = ["{}", "root"]
"#,
        u.alice.name
    ));
    let cli = |user, host: &str, cmd: &[&str]| {
        let mut argv = vec![REDIS_CLI, "-h", host, "-p", "6390"];
        argv.extend_from_slice(cmd);
        sb.exec_as(Some(user), &argv)
    };
    let ok = cli(&u.alice, "127.0.0.7", &["SET", "greeting", "hello"]);
    assert_eq!(ok.stdout.trim(), "OK", "{}{}", ok.stdout, ok.stderr);
    let got = cli(&u.alice, "::1", &["GET", "greeting"]);
    assert_eq!(got.stdout.trim(), "hello", "{}{}", got.stdout, got.stderr);

    for host in ["127.0.0.7", "::1", "::ffff:127.0.0.7"] {
        let denied = cli(&u.bob, host, &["GET", "greeting"]);
        let said = format!("{}{}", denied.stdout, denied.stderr);
        assert!(
            said.contains("Operation not permitted"),
            "bob via {host} should see EPERM, saw: {said}"
        );
        assert!(!said.contains("hello"), "{said}");
    }
    // The denial is the kernel's, not redis's: redis itself never saw bob.
    let info = Command::new("nsenter")
        .arg(format!("--net={}", sb.netns_path.display()))
        .args([REDIS_CLI, "-h", "127.0.0.7", "-p", "6390", "INFO", "stats"])
        .output()
        .expect("redis-cli as root");
    let info = String::from_utf8_lossy(&info.stdout);
    let connections: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("total_connections_received:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("INFO stats has total_connections_received");
    // wait_listening's probe, alice's two, and this one.
    assert_eq!(connections, 4, "{info}");
}

/// The operator's path with a real server: `scan` writes a starter policy,
/// `run` enforces it in audit mode, three users reach Redis with the real
/// client, `learn` (one user excluded) adds the two intended ones to the
/// policy in force, `diff` shows exactly that, and once applied the two
/// get in and the third is refused with EPERM.
#[test]
fn from_scan_to_enforcement_with_redis() {
    assert!(
        Path::new(REDIS_SERVER).exists() && Path::new(REDIS_CLI).exists(),
        "REDIS IS NOT INSTALLED: this end-to-end test needs Debian's redis-server and \
         redis-tools (`cargo xtask setup` installs them)"
    );
    let u = users();
    let mut sb = Sandbox::new("redis-path");
    spawn_redis(&mut sb, "127.0.0.7", "6391");
    sb.wait_listening("127.0.0.7:6391");
    // scan: a starter policy in audit mode, with the bind guard suggested.
    let starter = sb.lg(&["scan", "--format", "toml"]).ok().stdout;
    assert!(starter.contains("mode = \"audit\""), "{starter}");
    assert!(starter.contains("port = 6391"), "{starter}");
    assert!(starter.contains("# bind_users = ["), "{starter}");
    let policy = sb.policy("policy.toml", &starter);
    assert_eq!(sb.lg(&["check", policy.to_str().expect("utf-8")]).code, 0);
    // run, in audit mode: it says what it enforces and where it reports.
    let d = sb.start_daemon(&policy, &[]);
    let cli = |user, cmd: &[&str]| {
        let mut argv = vec![REDIS_CLI, "-h", "127.0.0.7", "-p", "6391"];
        argv.extend_from_slice(cmd);
        sb.exec_as(Some(user), &argv)
    };
    for who in [&u.alice, &u.bob, &u.carol] {
        let r = cli(who, &["PING"]);
        assert_eq!(
            r.stdout.trim(),
            "PONG",
            "audit mode refuses nothing: {}",
            r.stderr
        );
    }
    d.wait_events(10, "three users' would-deny", |evs| {
        [&u.alice, &u.bob, &u.carol].iter().all(|w| {
            evs.iter()
                .any(|e| e["event.action"] == "would-deny" && e["user.name"] == w.name)
        })
    });
    let said = d.log();
    assert!(
        said.contains("running: instance") && said.contains("audit log"),
        "run says what it enforces at start: {}",
        loopguard_tests::tail(&said, 1500)
    );
    // Off the journal, each line has its RFC 3339 time.
    assert!(
        said.lines()
            .filter(|l| l.contains("running: instance"))
            .all(|l| l.starts_with("20") && l.contains("Z INFO running:")),
        "{}",
        loopguard_tests::tail(&said, 1500)
    );
    // `audit` finds the log `run --audit-log` writes, without being told.
    let audit = sb.lg(&["audit", "--action", "would-deny"]).ok().stdout;
    assert!(
        audit.contains(u.carol.name),
        "{}",
        loopguard_tests::tail(&audit, 1500)
    );
    // learn, carol excluded: added to the policy in force, enforcing.
    let learned = sb.lg(&["learn", "--exclude", u.carol.name, "--enforce"]);
    assert_eq!(learned.code, 0, "{}", learned.stderr);
    assert!(learned.stderr.contains("left out"), "{}", learned.stderr);
    let new = sb.policy("learned.toml", &learned.stdout);
    // diff: the two intended users gain access, enforcement is switched on.
    let diff = sb.lg(&[
        "diff",
        policy.to_str().expect("utf-8"),
        new.to_str().expect("utf-8"),
    ]);
    assert_eq!(diff.code, 1, "{}", diff.stdout);
    for who in [&u.alice, &u.bob] {
        assert!(
            diff.stdout.contains(&format!("user {} gain", who.name))
                || diff.stdout.contains(&format!("user {},", who.name)),
            "{}",
            diff.stdout
        );
    }
    assert!(!diff.stdout.contains(u.carol.name), "{}", diff.stdout);
    // enforce.
    sb.apply(&new, &[]).ok();
    for who in [&u.alice, &u.bob] {
        let r = cli(who, &["PING"]);
        assert_eq!(r.stdout.trim(), "PONG", "{}: {}", who.name, r.stderr);
    }
    let refused = cli(&u.carol, &["PING"]);
    let said = format!("{}{}", refused.stdout, refused.stderr);
    assert!(said.contains("Operation not permitted"), "{said}");
    // "Was that loopguard?"
    let last = sb
        .lg(&["explain", "--user", u.carol.name, "--last"])
        .ok()
        .stdout;
    assert!(
        last.starts_with("last refusal: ") && last.contains(":6391/tcp"),
        "{last}"
    );
    assert!(last.contains("now: deny"), "{last}");
}
