//! What "loopback" means to loopguard (SPEC §1): every destination the
//! kernel delivers to this host, read from the kernel itself.
//!
//! The kernel's `local` routing table (table 255) holds one route per
//! address it accepts as its own: each interface address (link-local
//! included), whole prefixes routed to the host ("AnyIP": `ip route add
//! local 10.66.0.0/16 dev lo`), subnet-directed broadcast addresses and
//! IPv6 anycast addresses. To these loopguard adds what the kernel loops
//! back to local listeners without a route in that table: the limited
//! broadcast `255.255.255.255` and the multicast ranges `224.0.0.0/4` and
//! `ff00::/8`. The eBPF layer keeps a copy of this [`LocalTable`] in an LPM
//! trie; the nftables layer asks the kernel per packet instead (`fib daddr
//! type`), so it needs no copy.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST,
};
use netlink_packet_route::{
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteType},
    RouteNetlinkMessage,
};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use serde::{Deserialize, Serialize};

/// The kernel's number for its `local` routing table.
const RT_TABLE_LOCAL: u32 = 255;

#[derive(Debug, thiserror::Error)]
pub enum ScopeError {
    #[error("failed to read the kernel's local routing table: {context}")]
    Netlink {
        context: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the kernel's local routing table answered with a message loopguard cannot read: {0}")]
    Decode(String),
}

/// How the kernel treats a destination of its local table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LocalKind {
    /// Accepted as the host's own address.
    Local,
    /// Accepted locally as broadcast (and sent to the network too).
    Broadcast,
    /// Accepted locally as anycast.
    Anycast,
    /// Multicast: looped back to local members (and sent to the network).
    Multicast,
}

impl LocalKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LocalKind::Local => "local",
            LocalKind::Broadcast => "broadcast",
            LocalKind::Anycast => "anycast",
            LocalKind::Multicast => "multicast",
        }
    }

    /// The value of an `LG_LOCAL` entry.
    pub fn code(self) -> u32 {
        use loopguard_common::{LOCAL_ANYCAST, LOCAL_BROADCAST, LOCAL_LOCAL, LOCAL_MULTICAST};
        match self {
            LocalKind::Local => LOCAL_LOCAL,
            LocalKind::Broadcast => LOCAL_BROADCAST,
            LocalKind::Anycast => LOCAL_ANYCAST,
            LocalKind::Multicast => LOCAL_MULTICAST,
        }
    }
}

/// Prefixes the kernel delivers to this host, most specific first for
/// equal addresses; no duplicates.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalTable {
    prefixes: Vec<(IpNet, LocalKind)>,
}

/// What every host delivers locally without a route in its local table.
fn fixed() -> [(IpNet, LocalKind); 5] {
    let v4 = |a: Ipv4Addr, len| IpNet::V4(Ipv4Net::new_assert(a, len));
    let v6 = |a: Ipv6Addr, len| IpNet::V6(Ipv6Net::new_assert(a, len));
    [
        (v4(Ipv4Addr::new(127, 0, 0, 0), 8), LocalKind::Local),
        (v6(Ipv6Addr::LOCALHOST, 128), LocalKind::Local),
        (v4(Ipv4Addr::BROADCAST, 32), LocalKind::Broadcast),
        (v4(Ipv4Addr::new(224, 0, 0, 0), 4), LocalKind::Multicast),
        (
            v6(Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8),
            LocalKind::Multicast,
        ),
    ]
}

impl LocalTable {
    /// The kernel's local table of this network namespace, with the fixed
    /// ranges. Any user may read it.
    pub fn read() -> Result<LocalTable, ScopeError> {
        // A dump the kernel marks interrupted (the table changed while it
        // was read) may miss routes: read it again.
        for _ in 0..10 {
            let (routes, interrupted) = dump_local_routes()?;
            if !interrupted {
                return Ok(LocalTable::from_prefixes(routes));
            }
        }
        Err(ScopeError::Decode(
            "the local table kept changing while it was read".into(),
        ))
    }

    /// A table of `prefixes` plus the fixed ranges (tests, and hosts the
    /// caller describes).
    pub fn from_prefixes(prefixes: impl IntoIterator<Item = (IpNet, LocalKind)>) -> LocalTable {
        let mut all: Vec<(IpNet, LocalKind)> = prefixes
            .into_iter()
            .map(|(n, k)| (n.trunc(), k))
            .chain(fixed())
            .collect();
        all.sort();
        // One kind per prefix: the kernel may list one address as local on
        // one device and broadcast on another; local wins (sorted first).
        all.dedup_by(|b, a| a.0 == b.0);
        LocalTable { prefixes: all }
    }

    pub fn prefixes(&self) -> &[(IpNet, LocalKind)] {
        &self.prefixes
    }

    pub fn len(&self) -> usize {
        self.prefixes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.prefixes.is_empty()
    }

    /// How the kernel treats `ip` (IPv4-mapped taken as IPv4), by its most
    /// specific prefix; `None` when it is not delivered to this host.
    /// Linear: `explain` and `check` ask once; the kernel layers look up
    /// their own copies.
    pub fn kind_of(&self, ip: IpAddr) -> Option<LocalKind> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        self.prefixes
            .iter()
            .filter(|(n, _)| n.contains(&ip))
            .max_by_key(|(n, _)| n.prefix_len())
            .map(|(_, k)| *k)
    }
}

/// Every route of table 255, as (prefix, kind), and whether the kernel
/// flagged the dump as interrupted.
fn dump_local_routes() -> Result<(Vec<(IpNet, LocalKind)>, bool), ScopeError> {
    let io_err = |context| move |source| ScopeError::Netlink { context, source };
    let mut socket = Socket::new(NETLINK_ROUTE).map_err(io_err("socket"))?;
    socket.bind_auto().map_err(io_err("bind"))?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(io_err("connect"))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = 1;
    let mut request = NetlinkMessage::new(
        header,
        NetlinkPayload::from(RouteNetlinkMessage::GetRoute(RouteMessage::default())),
    );
    request.finalize();
    let mut buf = vec![0u8; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0).map_err(io_err("send"))?;

    let mut out = Vec::new();
    let mut interrupted = false;
    let mut recv = vec![0u8; 64 * 1024];
    loop {
        let size = socket.recv(&mut &mut recv[..], 0).map_err(io_err("recv"))?;
        let mut offset = 0;
        while offset < size {
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&recv[offset..size])
                .map_err(|e| ScopeError::Decode(e.to_string()))?;
            let len = msg.header.length as usize;
            interrupted |= msg.header.flags & NLM_F_DUMP_INTR != 0;
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok((out, interrupted)),
                NetlinkPayload::Error(e) => {
                    return Err(ScopeError::Netlink {
                        context: "dump",
                        source: e.to_io(),
                    })
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(route)) => {
                    if let Some(p) = local_prefix(&route) {
                        out.push(p);
                    }
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}

/// The prefix and kind of a route of the local table.
fn local_prefix(route: &RouteMessage) -> Option<(IpNet, LocalKind)> {
    let table = route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(route.header.table));
    if table != RT_TABLE_LOCAL {
        return None;
    }
    let kind = match route.header.kind {
        RouteType::Local => LocalKind::Local,
        RouteType::Broadcast => LocalKind::Broadcast,
        RouteType::Anycast => LocalKind::Anycast,
        RouteType::Multicast => LocalKind::Multicast,
        _ => return None,
    };
    let len = route.header.destination_prefix_length;
    let addr = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
        RouteAttribute::Destination(RouteAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
        _ => None,
    })?;
    let net = IpNet::new(addr, len).ok()?;
    Some((net.trunc(), kind))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_by_most_specific_prefix() {
        let t = LocalTable::from_prefixes([
            ("10.55.0.1/32".parse().unwrap(), LocalKind::Local),
            ("10.55.0.255/32".parse().unwrap(), LocalKind::Broadcast),
            ("10.66.0.0/16".parse().unwrap(), LocalKind::Local),
            ("2001:db8:55::/64".parse().unwrap(), LocalKind::Anycast),
            ("2001:db8:55::1/128".parse().unwrap(), LocalKind::Local),
        ]);
        let k = |s: &str| t.kind_of(s.parse().unwrap());
        assert_eq!(k("10.55.0.1"), Some(LocalKind::Local));
        assert_eq!(k("::ffff:10.55.0.1"), Some(LocalKind::Local));
        assert_eq!(k("10.55.0.255"), Some(LocalKind::Broadcast));
        assert_eq!(k("10.66.200.3"), Some(LocalKind::Local));
        assert_eq!(k("10.55.0.2"), None);
        assert_eq!(k("255.255.255.255"), Some(LocalKind::Broadcast));
        assert_eq!(k("224.0.0.1"), Some(LocalKind::Multicast));
        assert_eq!(k("ff02::1"), Some(LocalKind::Multicast));
        assert_eq!(k("127.9.9.9"), Some(LocalKind::Local));
        assert_eq!(k("2001:db8:55::1"), Some(LocalKind::Local));
        assert_eq!(k("2001:db8:55::"), Some(LocalKind::Anycast));
        assert_eq!(k("8.8.8.8"), None);
    }

    #[test]
    fn the_kernel_table_has_loopback() {
        // Any namespace with lo up has 127.0.0.0/8 in table local; the
        // fixed ranges are there regardless.
        let t = LocalTable::read().expect("read the local table");
        assert_eq!(
            t.kind_of("127.0.0.1".parse().unwrap()),
            Some(LocalKind::Local)
        );
    }
}
