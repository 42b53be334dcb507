//! Checks across services: unique names, unambiguous overlaps, and the
//! warnings about cutting the host off from essential local services.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
};

use super::{
    Destination, IdRef, ListKind, Policy, PortRange, Resolved, Service, Transport, Verdict,
};
use crate::diag::{Code, Diagnostic};

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

/// Most services named in one `same-match` error.
const MAX_NAMED: usize = 10;
/// Most `ambiguous-overlap` errors reported.
const MAX_OVERLAPS: usize = 100;

/// Errors that need the whole policy: duplicate names and overlapping
/// services of which neither is more specific.
pub fn validate(policy: &Policy) -> Vec<Diagnostic> {
    let mut diags = Vec::new();
    let mut seen: HashMap<&str, &Service> = HashMap::new();
    for s in &policy.services {
        if let Some(first) = seen.get(s.name.as_str()) {
            diags.push(
                Diagnostic::error(
                    Code::DuplicateName,
                    format!("duplicate service name \"{}\"", s.name),
                )
                .primary(s.name_span.clone(), "second use")
                .secondary(first.name_span.clone(), "first defined here"),
            );
        } else {
            seen.insert(&s.name, s);
        }
    }

    // Services that match exactly the same traffic: one error per group,
    // however large (N copies of one service are one problem, not N²/2).
    let mut groups: HashMap<String, Vec<&Service>> = HashMap::new();
    for s in &policy.services {
        groups.entry(s.describe()).or_default().push(s);
    }
    let mut groups: Vec<Vec<&Service>> = groups.into_values().collect();
    groups.sort_by_key(|g| g[0].name_span.start);
    for g in groups.iter().filter(|g| g.len() > 1) {
        let names: Vec<String> = g.iter().map(|s| format!("\"{}\"", s.name)).collect();
        let shown = names.len().min(MAX_NAMED);
        let more = names.len() - shown;
        let mut d = Diagnostic::error(
            Code::SameMatch,
            format!(
                "{} services match exactly the same traffic ({}): {}{}",
                g.len(),
                g[0].describe(),
                names[..shown].join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            ),
        )
        .primary(
            g[1].name_span.clone(),
            format!("matches {}", g[1].describe()),
        )
        .secondary(g[0].name_span.clone(), "first defined here");
        for s in g.iter().skip(2).take(MAX_NAMED.saturating_sub(2)) {
            d = d.secondary(s.name_span.clone(), "and here");
        }
        diags.push(d.note("no service is more specific, so none can decide; merge them"));
    }

    // Sweep the distinct services in port order: only those whose ranges
    // meet are compared. Past MAX_OVERLAPS ambiguous pairs the policy is
    // wrong enough: stop (a hostile file could hold millions of pairs).
    let mut order: Vec<&Service> = groups.iter().map(|g| g[0]).collect();
    order.sort_by_key(|s| (s.ports.first, s.name_span.start));
    let mut overlaps = 0;
    'sweep: for (i, a) in order.iter().enumerate() {
        for b in &order[i + 1..] {
            if b.ports.first > a.ports.last {
                break;
            }
            if !a.intersects(b) || a.contains(b) || b.contains(a) {
                continue;
            }
            if overlaps == MAX_OVERLAPS {
                diags.push(
                    Diagnostic::error(
                        Code::AmbiguousOverlap,
                        format!("more than {MAX_OVERLAPS} pairs of services overlap ambiguously; the rest are not listed"),
                    )
                    .primary(b.name_span.clone(), "this one, and more"),
                );
                break 'sweep;
            }
            overlaps += 1;
            let (first, second) = if a.name_span.start < b.name_span.start {
                (a, b)
            } else {
                (b, a)
            };
            diags.push(
                Diagnostic::error(
                    Code::AmbiguousOverlap,
                    format!("services \"{}\" and \"{}\" overlap and neither contains the other", first.name, second.name),
                )
                .primary(second.name_span.clone(), format!("matches {}", second.describe()))
                .secondary(first.name_span.clone(), format!("matches {}", first.describe()))
                .note("where services overlap, one must contain the other (its ports, addresses and protocol), so the more specific one decides"),
            );
        }
    }
    diags
}

/// The ports the kernel hands out to `connect()` and `bind(port 0)`
/// (`net.ipv4.ip_local_port_range`, also used for IPv6), less the reserved
/// ones (`net.ipv4.ip_local_reserved_ports`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EphemeralPorts {
    pub range: PortRange,
    pub reserved: Vec<PortRange>,
    /// Read from this host (else Linux's default, for `check --offline`).
    pub from_host: bool,
}

impl EphemeralPorts {
    /// Linux's default range, nothing reserved.
    /// The kernel's ephemeral port range and reserved ports; Linux's
    /// default when they cannot be read.
    pub fn of_host() -> EphemeralPorts {
        let read = |p: &str| std::fs::read_to_string(p).ok();
        read("/proc/sys/net/ipv4/ip_local_port_range")
            .and_then(|range| {
                let reserved =
                    read("/proc/sys/net/ipv4/ip_local_reserved_ports").unwrap_or_default();
                EphemeralPorts::parse(&range, &reserved)
            })
            .unwrap_or_else(EphemeralPorts::linux_default)
    }

    pub fn linux_default() -> EphemeralPorts {
        EphemeralPorts {
            range: PortRange {
                first: 32768,
                last: 60999,
            },
            reserved: Vec::new(),
            from_host: false,
        }
    }

    /// From the sysctl files' text: `"32768\t60999"` and `"5432,8000-8010"`.
    pub fn parse(range: &str, reserved: &str) -> Option<EphemeralPorts> {
        let mut it = range.split_whitespace().map(str::parse::<u16>);
        let (first, last) = (it.next()?.ok()?, it.next()?.ok()?);
        let reserved = reserved
            .trim()
            .split(',')
            .filter(|p| !p.is_empty())
            .filter_map(|p| {
                let (a, b) = p.split_once('-').unwrap_or((p, p));
                Some(PortRange {
                    first: a.trim().parse().ok()?,
                    last: b.trim().parse().ok()?,
                })
            })
            .collect();
        Some(EphemeralPorts {
            range: PortRange { first, last },
            reserved,
            from_host: true,
        })
    }

    /// The ports of `r` the kernel may hand out, as ranges.
    fn handed_out(&self, r: PortRange) -> Vec<PortRange> {
        let (lo, hi) = (r.first.max(self.range.first), r.last.min(self.range.last));
        let mut out = Vec::new();
        if lo > hi {
            return Vec::new();
        }
        let mut next = u32::from(lo);
        let mut reserved = self.reserved.clone();
        reserved.sort_by_key(|p| p.first);
        for res in reserved {
            if u32::from(res.last) < next || u32::from(res.first) > u32::from(hi) {
                continue;
            }
            if u32::from(res.first) > next {
                out.push((next, u32::from(res.first) - 1));
            }
            next = next.max(u32::from(res.last) + 1);
        }
        if next <= u32::from(hi) {
            out.push((next, u32::from(hi)));
        }
        out.into_iter()
            .map(|(a, b)| PortRange {
                first: a as u16,
                last: b as u16,
            })
            .collect()
    }
}

/// Warnings: a bind-guarded port the kernel may hand to any `connect()`
/// as its local port (the guard cannot stop that: no bind() happens), and
/// a `default = "deny"` policy under which root could no longer reach an
/// essential local service. `resolved` gives the uids when names were
/// resolved; without it (offline) only `0` and `root` count as root.
pub fn lint(
    policy: &Policy,
    resolved: Option<&Resolved>,
    ephemeral: &EphemeralPorts,
) -> Vec<Diagnostic> {
    let mut diags = Vec::new();
    for s in policy.services.iter().filter(|s| s.bind.is_some()) {
        let exposed = ephemeral.handed_out(s.ports);
        let Some(first) = exposed.first() else {
            continue;
        };
        let list: Vec<String> = exposed.iter().map(ToString::to_string).collect();
        let whose = if ephemeral.from_host {
            "this host's"
        } else {
            "Linux's default"
        };
        diags.push(
            Diagnostic::warning(
                Code::BindEphemeral,
                format!(
                    "bind-guarded port {first} lies in {whose} ephemeral port range {}: the kernel may hand it to any connect(), and no bind() happens to refuse",
                    ephemeral.range
                ),
            )
            .primary(s.name_span.clone(), "this service guards binding")
            .note(format!(
                "reserve it: sysctl -w net.ipv4.ip_local_reserved_ports={} (and in /etc/sysctl.d/ to keep it)",
                list.join(",")
            )),
        );
    }
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
                // A deny-list of cgroups may hold root's own processes and
                // the system's resolvers, whatever their uids.
                let denies_cgroups =
                    s.list == ListKind::Deny && !(s.cgroups.is_empty() && s.units.is_empty());
                let allowed = listed == (s.list == ListKind::Allow) && !denies_cgroups;
                let label = if denies_cgroups {
                    "this service decides and denies cgroups, which may hold root's processes"
                } else {
                    "this service decides and does not let root through"
                };
                (allowed, s.name_span.clone(), label.to_string())
            }
        };
        if !allowed {
            diags.push(
                Diagnostic::warning(
                    Code::CutsOffRoot,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ephemeral_ports_less_the_reserved() {
        let e = EphemeralPorts::parse("32768\t60999\n", "40000,40010-40020\n").expect("parse");
        let r = |a, b| PortRange { first: a, last: b };
        assert_eq!(e.handed_out(r(5432, 5432)), vec![]);
        assert_eq!(e.handed_out(r(40000, 40000)), vec![]);
        assert_eq!(e.handed_out(r(40001, 40001)), vec![r(40001, 40001)]);
        assert_eq!(
            e.handed_out(r(39990, 40030)),
            vec![r(39990, 39999), r(40001, 40009), r(40021, 40030)]
        );
        assert_eq!(e.handed_out(r(60000, 65535)), vec![r(60000, 60999)]);
        assert_eq!(
            EphemeralPorts::linux_default().handed_out(r(8000, 8080)),
            vec![]
        );
    }
}
