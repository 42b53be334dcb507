//! End to end with a real service from Debian: redis-server bound to a
//! 127.x address, and redis-cli run as an allowed and a denied user.

use std::{path::Path, process::Command};

use loopguard_tests::{users, Sandbox};

const REDIS_SERVER: &str = "/usr/bin/redis-server";
const REDIS_CLI: &str = "/usr/bin/redis-cli";

#[test]
fn redis_cli_allowed_and_denied() {
    assert!(
        Path::new(REDIS_SERVER).exists() && Path::new(REDIS_CLI).exists(),
        "REDIS IS NOT INSTALLED: this end-to-end test needs Debian's redis-server and \
         redis-tools (`cargo xtask setup` installs them)"
    );
    let u = users();
    let mut sb = Sandbox::new("redis");
    let dir = sb.dir.join("redis");
    std::fs::create_dir_all(&dir).expect("redis dir");
    sb.spawn_in_netns(&[
        REDIS_SERVER,
        "--bind",
        "127.0.0.7 ::1",
        "--port",
        "6390",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        dir.to_str().expect("utf-8"),
        "--protected-mode",
        "no",
    ]);
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
