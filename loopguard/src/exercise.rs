//! Every stage a policy file goes through, without the kernel: read,
//! validate, lint, resolve (with made-up accounts), compile, evaluate,
//! build the nftables batch. The fuzz target (`fuzz/`) and the regression
//! tests of its finds (`tests/fuzz_regressions.rs`) both run this, so a
//! crash input replays exactly.

use std::net::IpAddr;

use crate::{
    compile,
    policy::{self, Directory, EphemeralPorts, IdRef, Transport},
    scope::{LocalKind, LocalTable},
};

/// Every name resolves (to a uid derived from it) and every group has two
/// members, so inputs reach the compiler instead of stopping at names.
struct Everyone;

impl Directory for Everyone {
    fn uid_of(&self, name: &str) -> Option<u32> {
        let h = name.bytes().fold(1000u32, |h, b| {
            h.wrapping_mul(31).wrapping_add(u32::from(b))
        });
        Some(h % 70_000)
    }
    fn user_name(&self, _: u32) -> Option<String> {
        None
    }
    fn group_members(&self, group: &IdRef) -> Option<Vec<u32>> {
        let base = match group {
            IdRef::Id(id) => *id,
            IdRef::Name(n) => self.uid_of(n)?,
        };
        Some(vec![base, base.wrapping_add(1)])
    }
}

/// The plan of `text` with made-up accounts (every name resolves), or
/// `None` if the file has errors: for snapshot tests of what loopguard
/// builds from a policy, on any machine.
pub fn plan_of(file: &str, text: &str) -> Option<compile::Plan> {
    let (policy, diags) = policy::load(file, text);
    let policy = policy?;
    if diags.iter().any(|d| d.is_error()) {
        return None;
    }
    let resolved = policy::resolve(&policy, &Everyone).ok()?;
    compile::compile(&policy, &resolved).ok()
}

/// Runs `text` through every stage. Must not panic, whatever the text.
pub fn policy_text(text: &str) {
    assert!(
        policy::fast_toml_path_agrees(text),
        "the token loop's uid arrays read this text differently"
    );
    let (policy, diags) = policy::load("fuzz.toml", text);
    let Some(policy) = policy else {
        return;
    };
    let _ = policy::lint(&policy, None, &EphemeralPorts::linux_default());
    if diags.iter().any(|d| d.is_error()) {
        return;
    }
    let Ok(resolved) = policy::resolve(&policy, &Everyone) else {
        return;
    };
    let Ok(plan) = compile::compile(&policy, &resolved) else {
        return;
    };
    let local = LocalTable::from_prefixes([(
        ipnet::IpNet::from(IpAddr::from([192, 0, 2, 1])),
        LocalKind::Local,
    )]);
    let ips: [IpAddr; 5] = [
        [127, 0, 0, 1].into(),
        [127, 0, 0, 2].into(),
        [0, 0, 0, 0].into(),
        [192, 0, 2, 1].into(),
        std::net::Ipv6Addr::LOCALHOST.into(),
    ];
    for (ip, port) in ips.iter().zip([1, 22, 5432, 8080, 65535]) {
        for t in Transport::ALL {
            let _ = plan.evaluate(1000, t, *ip, port, &local);
            let _ = plan.evaluate_bind(1000, t, *ip, port, &local);
        }
    }
    let _ = crate::nft::ruleset("fuzz", &plan);
}
