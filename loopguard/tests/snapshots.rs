//! Snapshots of what loopguard builds from the shipped examples: the
//! nftables batch, the in-place update after a one-service change, the
//! dry-run's description of that change, and an audit record. A change in
//! any of them shows up in review (`cargo insta review`).

use loopguard::{compile::Plan, exercise::plan_of};

fn examples() -> Vec<(String, String)> {
    let mut files: Vec<_> = std::fs::read_dir("../examples")
        .expect("examples/")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let name = p.file_stem().expect("stem").to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&p).expect("read"))
        })
        .collect()
}

fn plan(name: &str, text: &str) -> Plan {
    plan_of(&format!("{name}.toml"), text).unwrap_or_else(|| panic!("{name} compiles"))
}

/// The example with one more service: what a pull request might add.
fn edited(text: &str) -> String {
    format!(
        "{text}\n[[service]]\nname = \"added-by-review\"\nport = 7777\nallow_users = [\"root\"]\n"
    )
}

/// nft's JSON, one object per line: reviewable diffs.
fn lines(batch: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(batch).expect("nft JSON");
    v["nftables"]
        .as_array()
        .expect("nftables array")
        .iter()
        .map(|o| o.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn nft_batches_of_the_examples() {
    for (name, text) in examples() {
        let p = plan(&name, &text);
        insta::assert_snapshot!(
            format!("nft_{name}"),
            lines(&loopguard::nft::ruleset("loopguard", &p))
        );
    }
}

#[test]
fn nft_updates_after_adding_a_service() {
    for (name, text) in examples() {
        let old = plan(&name, &text);
        let new = plan(&name, &edited(&text));
        let update = loopguard::nft::update("loopguard", &old, &new);
        insta::assert_snapshot!(format!("nft_update_{name}"), lines(&update.batch));
    }
}

#[test]
fn dry_run_descriptions() {
    for (name, text) in examples() {
        let old = plan(&name, &text);
        let new = plan(&name, &edited(&text));
        let fresh = loopguard::change::describe(None, &old).join("\n");
        let changed = loopguard::change::describe(Some(&old), &new).join("\n");
        insta::assert_snapshot!(
            format!("dry_run_{name}"),
            format!("{fresh}\n---\n{changed}")
        );
    }
}

#[test]
fn an_audit_record() {
    let (name, text) = examples().into_iter().next().expect("an example");
    let p = plan(&name, &text);
    let mut addr = [0u8; 16];
    addr[10] = 0xff;
    addr[11] = 0xff;
    addr[12..].copy_from_slice(&[127, 0, 0, 1]);
    let mut comm = [0u8; 16];
    comm[..4].copy_from_slice(b"psql");
    let ev = loopguard_common::Event {
        ktime_ns: 2_000_000_000,
        pid: 4242,
        uid: 0,
        gid: 0,
        bucket: 0,
        slot: 0,
        port: p.services[0].ports.first,
        action: loopguard_common::COUNT_DENIED as u8,
        proto: loopguard_common::PROTO_TCP as u8,
        hook: 0,
        _pad: [0; 7],
        plan_id: p.id_number(),
        addr,
        comm,
        cgroup_id: 0,
    };
    // 2026-11-30T00:00:00Z at CLOCK_MONOTONIC 0.
    let clock = loopguard::audit::Clock::at(1_796_000_000_000_000_000, 0);
    let mut record = loopguard::audit::record(&ev, Some(&p), &clock, &mut Default::default());
    if let Some(ecs) = record.ecs.as_mut() {
        ecs.host = "HOST".into();
    }
    let line = record.to_line();
    // What `audit` reads back is what `run` wrote.
    let back: loopguard::audit::AuditRecord = serde_json::from_str(&line).expect("reads back");
    assert_eq!(back, record);
    let pretty: serde_json::Value = serde_json::from_str(&line).expect("json");
    insta::assert_snapshot!(
        format!("audit_{name}"),
        serde_json::to_string_pretty(&pretty).expect("json")
    );
}
