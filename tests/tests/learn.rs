//! `loopguard learn`: an audit-mode trial under `run`, then the learned
//! policy applied in enforce mode lets exactly the observed attempts
//! through: replaying them gives no refusal, anything else is refused.

use loopguard_tests::{users, Sandbox};

#[test]
fn a_learned_policy_lets_through_exactly_what_the_trial_saw() {
    let u = users();
    let mut sb = Sandbox::new("learn");
    let trial = sb.policy(
        "trial.toml",
        "version = 1\nmode = \"audit\"\n\
         [[service]]\nname = \"db\"\nport = 7001\nallow_users = [\"root\"]\n\
         [[service]]\nname = \"cache\"\nport = 7002\nallow_users = [\"root\"]\n",
    );
    let d = sb.start_daemon(&trial, &[]);
    // The trial: alice uses db twice, bob uses cache once. Audit mode
    // refuses nothing.
    for (who, port) in [(&u.alice, 7001), (&u.alice, 7001), (&u.bob, 7002)] {
        let out = sb.probe(Some(who), &["tcp", &format!("127.0.0.1:{port}")]);
        assert_eq!(out, "connect=ok", "audit mode refuses nothing");
    }
    let would = |e: &serde_json::Value| e["event.action"] == "would-deny";
    d.wait_events(10, "three would-deny events", |evs| {
        evs.iter().filter(|e| would(e)).count() >= 3
    });
    let log = d.audit_log.to_str().expect("utf-8").to_string();

    // Changes to the trial policy, named.
    let changes = sb
        .lg(&[
            "learn",
            &log,
            "--policy",
            trial.to_str().expect("utf-8"),
            "--format",
            "human",
        ])
        .ok()
        .stdout;
    assert!(
        changes.contains(&format!("+ db: allow_users += \"{}\"", u.alice.name))
            && changes.contains(&format!("+ cache: allow_users += \"{}\"", u.bob.name)),
        "{changes}"
    );
    assert!(changes.contains("2 attempts"), "alice's count: {changes}");

    // Counted once each, though both layers recorded every attempt.
    assert!(!changes.contains("4 attempts"), "{changes}");
    // Without a log or --policy: the log the daemon writes, added to the
    // policy in force (in place), the mode switched by --enforce.
    let learned = sb.lg(&["learn", "--enforce"]).ok().stdout;
    assert!(learned.contains("name = \"db\""), "{learned}");
    let file = sb.policy("learned.toml", &learned);
    let checked = sb.lg(&["check", file.to_str().expect("utf-8")]);
    assert_eq!(checked.code, 0, "{}\n{learned}", checked.stdout);
    sb.apply(&file, &[]).ok();
    // What was seen gets through...
    assert_eq!(
        sb.probe(Some(&u.alice), &["tcp", "127.0.0.1:7001"]),
        "connect=ok",
        "{learned}"
    );
    assert_eq!(
        sb.probe(Some(&u.bob), &["tcp", "127.0.0.1:7002"]),
        "connect=ok",
        "{learned}"
    );
    // ...and nothing beyond it.
    assert_eq!(
        sb.probe(Some(&u.bob), &["tcp", "127.0.0.1:7001"]),
        "connect=EPERM",
        "{learned}"
    );
    assert_eq!(
        sb.probe(Some(&u.alice), &["tcp", "127.0.0.1:7002"]),
        "connect=EPERM",
        "{learned}"
    );
    // One user left out: stays refused.
    let learned = sb
        .lg(&[
            "learn",
            "--enforce",
            "--exclude",
            u.bob.name,
            "--policy",
            trial.to_str().expect("utf-8"),
        ])
        .ok()
        .stdout;
    let file = sb.policy("learned2.toml", &learned);
    sb.apply(&file, &[]).ok();
    assert_eq!(
        sb.probe(Some(&u.bob), &["tcp", "127.0.0.1:7002"]),
        "connect=EPERM",
        "{learned}"
    );
    assert_eq!(
        sb.probe(Some(&u.alice), &["tcp", "127.0.0.1:7001"]),
        "connect=ok",
        "{learned}"
    );
}
