//! What this host has listening, from the kernel: every TCP listener and
//! every bound, unconnected UDP socket (sock_diag over netlink, IPv4 and
//! IPv6), with its owner, process and systemd unit or cgroup. Every one of
//! them is reachable over loopback by any local user; one bound to the
//! wildcard or to a non-loopback address is reachable from the network too.

use std::{
    collections::HashMap,
    fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP, TCP_LISTEN},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
    SockDiagMessage,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr};
use serde::Serialize;

use crate::policy::Transport;

/// One socket that accepts connections or datagrams.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Listener {
    pub protocol: Transport,
    pub address: IpAddr,
    pub port: u16,
    pub uid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process: Option<String>,
    /// The systemd unit (`postgresql@15-main.service`), when the process
    /// runs in one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// The process's cgroup v2 path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// Bound to the wildcard or a non-loopback address: reachable from the
    /// network, not only over loopback.
    pub exposed: bool,
    #[serde(skip)]
    pub inode: u32,
}

/// Every TCP listener and bound UDP socket of this network namespace.
pub fn listeners() -> io::Result<Vec<Listener>> {
    let mut out = Vec::new();
    for family in [AF_INET, AF_INET6] {
        for (protocol, states) in [
            (IPPROTO_TCP, StateFlags::LISTEN),
            // Unconnected UDP sockets are in TCP_CLOSE; connected ones
            // (ESTABLISHED) accept from one peer only and are left out.
            (IPPROTO_UDP, StateFlags::CLOSE),
        ] {
            dump(family, protocol, states, &mut out)?;
        }
    }
    out.sort_by_key(|l| (l.port, l.protocol, l.address));
    out.dedup_by(|a, b| a.inode == b.inode && a.inode != 0);
    annotate(&mut out);
    Ok(out)
}

fn dump(family: u8, protocol: u8, states: StateFlags, out: &mut Vec<Listener>) -> io::Result<()> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol,
            extensions: ExtensionFlags::empty(),
            states,
            socket_id: if family == AF_INET {
                SocketId::new_v4()
            } else {
                SocketId::new_v6()
            },
        })
        .into(),
    );
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let mut recv = vec![0u8; 64 * 1024];
    loop {
        let n = socket.recv(&mut &mut recv[..], 0)?;
        let mut at = 0;
        while at < n {
            let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&recv[at..n])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => {
                    return Err(e.code.map_or_else(
                        || io::Error::other("sock_diag error"),
                        |c| io::Error::from_raw_os_error(-c.get()),
                    ))
                }
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    let h = &r.header;
                    let tcp = protocol == IPPROTO_TCP;
                    if tcp && h.state != TCP_LISTEN {
                        // (The kernel filtered on state already.)
                    } else {
                        let address = unmap(h.socket_id.source_address);
                        out.push(Listener {
                            protocol: if tcp { Transport::Tcp } else { Transport::Udp },
                            address,
                            port: h.socket_id.source_port,
                            uid: h.uid,
                            user: None,
                            pid: None,
                            process: None,
                            unit: None,
                            cgroup: None,
                            exposed: !is_loopback(address),
                            inode: h.inode,
                        });
                    }
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            at += len;
        }
    }
}

/// IPv4-mapped IPv6 as IPv4.
fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback(),
    }
}

/// The address a local client would connect to for this listener: its own,
/// or the loopback address of its family for the wildcard.
pub fn loopback_target(l: &Listener) -> IpAddr {
    match l.address {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        other => other,
    }
}

/// Owner names, and the process, unit and cgroup holding each socket
/// (one walk over /proc/*/fd; a socket shared by several processes is
/// named after the first).
fn annotate(listeners: &mut [Listener]) {
    let wanted: HashMap<u32, usize> = listeners
        .iter()
        .enumerate()
        .filter(|(_, l)| l.inode != 0)
        .map(|(i, l)| (l.inode, i))
        .collect();
    let mut found: HashMap<u32, u32> = HashMap::new();
    if let Ok(procs) = fs::read_dir("/proc") {
        for p in procs.filter_map(Result::ok) {
            let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(fds) = fs::read_dir(p.path().join("fd")) else {
                continue;
            };
            for fd in fds.filter_map(Result::ok) {
                let Ok(target) = fs::read_link(fd.path()) else {
                    continue;
                };
                let target = target.to_string_lossy();
                let Some(inode) = target
                    .strip_prefix("socket:[")
                    .and_then(|t| t.strip_suffix(']'))
                    .and_then(|t| t.parse::<u32>().ok())
                else {
                    continue;
                };
                if wanted.contains_key(&inode) {
                    found.entry(inode).or_insert(pid);
                }
            }
            if found.len() == wanted.len() {
                break;
            }
        }
    }
    let mut names = crate::audit::EventNames::default();
    for l in listeners.iter_mut() {
        l.user = names.get(l.uid);
        let Some(&pid) = found.get(&l.inode) else {
            continue;
        };
        l.pid = Some(pid);
        let proc_dir = Path::new("/proc").join(pid.to_string());
        l.process = fs::read_to_string(proc_dir.join("comm"))
            .ok()
            .map(|c| c.trim_end().to_string());
        let cgroup = fs::read_to_string(proc_dir.join("cgroup"))
            .ok()
            .and_then(|c| {
                c.lines()
                    .find_map(|line| line.strip_prefix("0::"))
                    .map(str::to_string)
            });
        l.unit = cgroup.as_deref().and_then(unit_of);
        l.cgroup = cgroup;
    }
}

pub use crate::host::unit_of;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_from_cgroup_paths() {
        assert_eq!(
            unit_of("/system.slice/redis-server.service").as_deref(),
            Some("redis-server.service")
        );
        assert_eq!(
            unit_of("/user.slice/user-1000.slice/session-4.scope").as_deref(),
            Some("session-4.scope")
        );
        assert_eq!(unit_of("/lgt-scan.test"), None);
    }
}

/// A socket bound on a bind-guarded port by a uid that may not bind it:
/// bound before the guard was in force, it keeps the port and receives
/// what clients send there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Squatter {
    #[serde(flatten)]
    pub listener: Listener,
    /// The service whose `bind_users` the owner is not among.
    pub service: String,
    /// The service is in audit mode: the bind would be recorded, not
    /// refused.
    pub audit: bool,
}

impl std::fmt::Display for Squatter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let l = &self.listener;
        let who = l.user.clone().unwrap_or_else(|| format!("uid {}", l.uid));
        write!(
            f,
            "squatter: {} (pid {}, {who}) holds {}/{}, which service {} lets only its bind_users bind{}; it keeps the port and receives what clients send there: stop it{}",
            l.process.as_deref().unwrap_or("a process"),
            l.pid.map_or("?".to_string(), |p| p.to_string()),
            std::net::SocketAddr::new(l.address, l.port),
            l.protocol.as_str(),
            self.service,
            if self.audit { " (audit mode)" } else { "" },
            if l.protocol == Transport::Tcp {
                " (a TCP listener can be closed with `ss -K`)"
            } else {
                ""
            }
        )
    }
}

/// The listeners on a bind-guarded port whose owner may not bind it.
pub fn squatters(
    plan: &crate::compile::Plan,
    listeners: &[Listener],
    local: &crate::scope::LocalTable,
) -> Vec<Squatter> {
    use crate::compile::Action;
    if plan.services.iter().all(|s| s.bind_set.is_none()) {
        return Vec::new();
    }
    listeners
        .iter()
        .filter_map(|l| {
            let eval = plan.evaluate_bind(l.uid, l.protocol, l.address, l.port, local);
            if eval.action == Action::Allow {
                return None;
            }
            let service = eval
                .service
                .and_then(|i| plan.services.get(i))
                .map_or_else(|| "?".to_string(), |s| s.name.clone());
            Some(Squatter {
                listener: l.clone(),
                service,
                audit: eval.action == Action::WouldDeny,
            })
        })
        .collect()
}

/// [`squatters`] of this network namespace now (sock_diag, the local
/// table); nothing to look for when no service is bind-guarded.
pub fn squatters_now(plan: &crate::compile::Plan) -> io::Result<Vec<Squatter>> {
    if plan.services.iter().all(|s| s.bind_set.is_none()) {
        return Ok(Vec::new());
    }
    let local = crate::scope::LocalTable::read().map_err(io::Error::other)?;
    Ok(squatters(plan, &listeners()?, &local))
}
