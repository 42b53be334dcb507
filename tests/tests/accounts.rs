//! Live group membership under `run`: a user added to a listed group gets
//! through within a second, a removed one is refused within a second, on
//! each layer; the daemon says what changed and why.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use loopguard_tests::{tail, timing_target, users, Sandbox};

/// A system group for one test, deleted when dropped.
struct Group(String);

impl Group {
    fn new(name: &str) -> Group {
        let _ = Command::new("groupdel").arg(name).output();
        let ok = Command::new("groupadd")
            .args(["--system", name])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "groupadd {name}");
        Group(name.to_string())
    }
    fn change(&self, flag: &str, user: &str) {
        let ok = Command::new("gpasswd")
            .args([flag, user, &self.0])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(ok, "gpasswd {flag} {user} {}", self.0);
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        let _ = Command::new("groupdel").arg(&self.0).output();
    }
}

fn wait_log(d: &loopguard_tests::Daemon, line: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !d.log().contains(line) {
        assert!(
            Instant::now() < deadline,
            "{what}: {line:?} not logged; {}",
            tail(&d.log(), 2000)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_for(
    sb: &Sandbox,
    user: &loopguard_tests::TestUser,
    want: &str,
    what: &str,
    log: &dyn Fn() -> String,
) {
    let deadline =
        Instant::now() + timing_target(Duration::from_secs(1)) + Duration::from_millis(500);
    loop {
        let got = sb.probe(Some(user), &["tcp", "127.0.0.1:7011"]);
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still {got}; daemon log: {}",
            tail(&log(), 2000)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn group_membership_changes_are_enforced_within_a_second_on_every_layer() {
    let u = users();
    for (layers, refused) in [
        ("bpf", "connect=EPERM"),
        ("nft", "connect=ECONNREFUSED"),
        ("both", "connect=EPERM"),
    ] {
        let group = Group::new(&format!("lgt-live-{layers}"));
        let mut sb = Sandbox::new(&format!("acct-{layers}"));
        let p = sb.policy(
            "p.toml",
            &format!(
                "version = 1\n[[service]]\nname = \"db\"\nport = 7011\nallow_groups = [\"{}\"]\n",
                group.0
            ),
        );
        let d = sb.start_daemon(&p, &["--layers", layers]);
        let log = || d.log();
        assert_eq!(
            sb.probe(Some(&u.bob), &["tcp", "127.0.0.1:7011"]),
            refused,
            "{layers}: before"
        );

        group.change("-a", u.bob.name);
        wait_for(
            &sb,
            &u.bob,
            "connect=ok",
            &format!("{layers}: bob added"),
            &log,
        );
        wait_log(
            &d,
            &format!(
                "user {} added to service db via group {}",
                u.bob.name, group.0
            ),
            layers,
        );

        group.change("-d", u.bob.name);
        wait_for(
            &sb,
            &u.bob,
            refused,
            &format!("{layers}: bob removed"),
            &log,
        );
        wait_log(
            &d,
            &format!("user {} removed from service db", u.bob.name),
            layers,
        );
        // Alice was never a member.
        assert_eq!(
            sb.probe(Some(&u.alice), &["tcp", "127.0.0.1:7011"]),
            refused,
            "{layers}"
        );
    }
}
