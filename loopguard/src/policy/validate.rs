//! Checks across services: unique names, unambiguous overlaps, and the
//! warnings about cutting the host off from essential local services.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
};

use super::{Destination, IdRef, ListKind, Policy, Resolved, Service, Transport, Verdict};
use crate::diag::Diagnostic;

/// Local services a host needs; a `default = "deny"` policy that cuts root
/// off from them breaks name resolution and more.
pub const ESSENTIAL_SERVICES: &[(Transport, IpAddr, u16, &str)] = &[
    (
        Transport::Udp,
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 53)),
        53,
        "the systemd-resolved DNS stub",
    ),
    (
        Transport::Tcp,
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 53)),
        53,
        "the systemd-resolved DNS stub",
    ),
    (
        Transport::Udp,
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 54)),
        53,
        "the systemd-resolved DNS proxy",
    ),
];

/// Errors that need the whole policy: duplicate names and overlapping
/// services of which neither is more specific.
pub fn validate(policy: &Policy) -> Vec<Diagnostic> {
    let mut diags = Vec::new();
    let mut seen: HashMap<&str, &Service> = HashMap::new();
    for s in &policy.services {
        if let Some(first) = seen.get(s.name.as_str()) {
            diags.push(
                Diagnostic::error(
                    "duplicate-name",
                    format!("duplicate service name \"{}\"", s.name),
                )
                .primary(s.name_span.clone(), "second use")
                .secondary(first.name_span.clone(), "first defined here"),
            );
        } else {
            seen.insert(&s.name, s);
        }
    }

    // Sweep in port order: only services whose ranges meet are compared.
    let mut order: Vec<&Service> = policy.services.iter().collect();
    order.sort_by_key(|s| (s.ports.first, s.name_span.start));
    for (i, a) in order.iter().enumerate() {
        for b in &order[i + 1..] {
            if b.ports.first > a.ports.last {
                break;
            }
            if !a.intersects(b) {
                continue;
            }
            let (first, second) = if a.name_span.start < b.name_span.start {
                (a, b)
            } else {
                (b, a)
            };
            match (a.contains(b), b.contains(a)) {
                (true, true) => diags.push(
                    Diagnostic::error(
                        "same-match",
                        format!("services \"{}\" and \"{}\" match exactly the same traffic", first.name, second.name),
                    )
                    .primary(second.name_span.clone(), format!("matches {}", second.describe()))
                    .secondary(first.name_span.clone(), format!("matches {}", first.describe()))
                    .note("no service is more specific, so neither can decide; merge them"),
                ),
                (false, false) => diags.push(
                    Diagnostic::error(
                        "ambiguous-overlap",
                        format!("services \"{}\" and \"{}\" overlap and neither contains the other", first.name, second.name),
                    )
                    .primary(second.name_span.clone(), format!("matches {}", second.describe()))
                    .secondary(first.name_span.clone(), format!("matches {}", first.describe()))
                    .note("where services overlap, one must contain the other (its ports, addresses and protocol), so the more specific one decides"),
                ),
                _ => {}
            }
        }
    }
    diags
}

/// Warnings: a `default = "deny"` policy under which root could no longer
/// reach an essential local service. `resolved` gives the uids when names
/// were resolved; without it (offline) only `0` and `root` count as root.
pub fn lint(policy: &Policy, resolved: Option<&Resolved>) -> Vec<Diagnostic> {
    let mut diags = Vec::new();
    if policy.default != Verdict::Deny {
        return diags;
    }
    let default_span = policy.default_span.clone().unwrap_or(0..0);
    for (transport, ip, port, what) in ESSENTIAL_SERVICES {
        let dest = Destination::Loopback(*ip);
        let (allowed, span, label) = match policy.deciding_service(*transport, &dest, *port) {
            None => (
                false,
                default_span.clone(),
                "no service matches it, so the default denies it".to_string(),
            ),
            Some(i) => {
                let s = &policy.services[i];
                let listed = root_listed(s, resolved.map(|r| &r.services[i].uids[..]));
                let allowed = listed == (s.list == ListKind::Allow);
                (
                    allowed,
                    s.name_span.clone(),
                    "this service decides and does not let root through".to_string(),
                )
            }
        };
        if !allowed {
            diags.push(
                Diagnostic::warning(
                    "cuts-off-root",
                    format!("root could not reach {what} on {ip}:{port}/{}", transport.as_str()),
                )
                .primary(span, label)
                .note(format!(
                    "add a service for {ip}:{port}/{} that allows root (uid 0) and the system users that resolve names; `apply` refuses this policy without --force",
                    transport.as_str()
                )),
            );
        }
    }
    diags
}

fn root_listed(s: &Service, uids: Option<&[u32]>) -> bool {
    if let Some(uids) = uids {
        return uids.contains(&0);
    }
    let is_root =
        |id: &IdRef| matches!(id, IdRef::Id(0)) || matches!(id, IdRef::Name(n) if n == "root");
    s.users.ids.iter().any(is_root) || s.groups.ids.iter().any(is_root)
}
