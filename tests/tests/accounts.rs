//! Live group membership under `run`: a user added to a listed group gets
//! through within a second, a removed one is refused within a second, on
//! each layer; the daemon says what changed and why.

use std::{process::Command, time::Duration};

use loopguard_tests::{users, wait_until_probe, Sandbox};

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

/// Until bob (or `user`) gets `want` from the guarded port: within the
/// second the daemon promises.
fn wait_for(
    sb: &Sandbox,
    user: &loopguard_tests::TestUser,
    want: &str,
    what: &str,
    log: &dyn Fn() -> String,
) {
    wait_until_probe(
        || sb.probe(Some(user), &["tcp", "127.0.0.1:7011"]),
        want,
        Duration::from_secs(1),
        what,
        log,
    );
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
        d.wait_log(
            &format!(
                "user {} added to service db via group {}",
                u.bob.name, group.0
            ),
            5,
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
        d.wait_log(
            &format!("user {} removed from service db", u.bob.name),
            5,
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
