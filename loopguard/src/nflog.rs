//! Packet-layer audit events: the nftables layer logs each refusal to the
//! instance's NFLOG group (`log group N prefix "lg/<table>/<bucket>/<d|w>"`);
//! this module binds that group over NETLINK_NETFILTER and decodes the
//! messages. The kernel numbers them (NFULNL_CFG_F_SEQ), so gaps count
//! events it could not deliver.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_netfilter::{
    nflog::{config_request, ConfigCmd, ConfigFlags, ConfigMode, PacketNla, ULogMessage},
    NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::Socket;

/// Bytes of each refused packet copied to userspace: the IP and transport
/// headers are all that is read.
const COPY_RANGE: u32 = 128;

/// One refused packet, as the kernel logged it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PacketEvent {
    pub prefix: String,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub seq: Option<u32>,
    pub destination: Option<IpAddr>,
    pub port: Option<u16>,
    /// 6 (TCP) or 17 (UDP).
    pub protocol: Option<u8>,
}

/// Binds `group` and returns the non-blocking socket.
pub fn bind(group: u16) -> io::Result<Socket> {
    let sock = crate::host::netlink_socket(netlink_sys::constants::NETLINK_NETFILTER, 0)?;
    // A large receive buffer rides out bursts (SO_RCVBUFFORCE: root may
    // exceed rmem_max).
    let size: libc::c_int = 4 << 20;
    nix::sys::socket::setsockopt(
        &sock,
        nix::sys::socket::sockopt::RcvBufForce,
        &(size as usize),
    )
    .map_err(io::Error::from)?;
    config(&sock, group, vec![ConfigCmd::Bind.into()])?;
    config(
        &sock,
        group,
        vec![
            ConfigMode::new_packet(COPY_RANGE).into(),
            // Numbered messages: a gap counts events the kernel dropped.
            ConfigFlags::SEQ.into(),
        ],
    )?;
    Ok(sock)
}

/// Sends one NFULNL_MSG_CONFIG and waits for its acknowledgement.
fn config(
    sock: &Socket,
    group: u16,
    nlas: Vec<netlink_packet_netfilter::nflog::ConfigNla>,
) -> io::Result<()> {
    let request = config_request(NetfilterProtoFamily::Unspec, group, nlas);
    let mut msg = vec![0; request.buffer_len()];
    request.serialize(&mut msg);
    sock.send(&msg, 0)?;
    // The ack (an NLMSG_ERROR with code 0); the socket is non-blocking, so
    // poll briefly.
    let mut buf = vec![0u8; 512];
    for _ in 0..100 {
        let n = match sock.recv(&mut &mut buf[..], 0) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(e) => return Err(e),
        };
        let reply = NetlinkMessage::<NetfilterMessage>::deserialize(&buf[..n.min(buf.len())])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        if let NetlinkPayload::Error(e) = reply.payload {
            return match e.code {
                None => Ok(()),
                Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
            };
        }
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        "no answer from nfnetlink_log",
    ))
}

/// Decodes every NFULNL_MSG_PACKET in one datagram; a malformed message
/// ends the datagram (the kernel's sequence numbers count what was lost).
pub fn parse(datagram: &[u8]) -> Vec<PacketEvent> {
    let mut out = Vec::new();
    let mut rest = datagram;
    while !rest.is_empty() {
        let Ok(msg) = NetlinkMessage::<NetfilterMessage>::deserialize(rest) else {
            break;
        };
        let len = msg.header.length as usize;
        if let NetlinkPayload::InnerMessage(NetfilterMessage {
            inner: NetfilterMessageInner::ULog(ULogMessage::Packet(nlas)),
            ..
        }) = msg.payload
        {
            out.push(packet(nlas));
        }
        // Messages are 4-byte aligned.
        let step = (len + 3) & !3;
        if len == 0 || step > rest.len() {
            break;
        }
        rest = &rest[step..];
    }
    out
}

fn packet(nlas: Vec<PacketNla>) -> PacketEvent {
    let mut ev = PacketEvent {
        prefix: String::new(),
        uid: None,
        gid: None,
        seq: None,
        destination: None,
        port: None,
        protocol: None,
    };
    for nla in nlas {
        match nla {
            PacketNla::Prefix(p) => ev.prefix = p.to_string_lossy().into_owned(),
            PacketNla::Uid(uid) => ev.uid = Some(uid),
            PacketNla::Gid(gid) => ev.gid = Some(gid),
            PacketNla::Seq(seq) => ev.seq = Some(seq),
            PacketNla::Payload(data) => {
                (ev.destination, ev.port, ev.protocol) = parse_ip(&data);
            }
            _ => {}
        }
    }
    ev
}

/// Destination address, port and protocol of an IPv4 or IPv6 packet.
fn parse_ip(p: &[u8]) -> (Option<IpAddr>, Option<u16>, Option<u8>) {
    let port_at =
        |off: usize| (p.len() >= off + 4).then(|| u16::from_be_bytes([p[off + 2], p[off + 3]]));
    match p.first().map(|b| b >> 4) {
        Some(4) if p.len() >= 20 => {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
            (Some(IpAddr::V4(dst)), port_at(ihl), Some(p[9]))
        }
        Some(6) if p.len() >= 40 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(&p[24..40]);
            (Some(IpAddr::V6(Ipv6Addr::from(a))), port_at(40), Some(p[6]))
        }
        _ => (None, None, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use netlink_packet_core::NetlinkHeader;
    use netlink_packet_netfilter::NetfilterHeader;
    use std::ffi::CString;

    fn logged(nlas: Vec<PacketNla>) -> Vec<u8> {
        let mut msg = NetlinkMessage::new(
            NetlinkHeader::default(),
            NetlinkPayload::from(NetfilterMessage::new(
                NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 1),
                ULogMessage::Packet(nlas),
            )),
        );
        msg.finalize();
        let mut buf = vec![0; msg.buffer_len()];
        msg.serialize(&mut buf);
        buf
    }

    #[test]
    fn parses_logged_syns_and_stops_at_garbage() {
        let mut ip = vec![
            0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0, 127, 0, 0, 1, 127, 0, 0, 2,
        ];
        ip.extend_from_slice(&[0x9c, 0x40, 0x15, 0x38, 0, 0, 0, 0]);
        let one = logged(vec![
            PacketNla::Prefix(CString::new("lg/x/0/d").expect("no NUL")),
            PacketNla::Uid(1005),
            PacketNla::Seq(7),
            PacketNla::Payload(ip),
        ]);
        let mut datagram = one.clone();
        datagram.extend_from_slice(&one);
        datagram.extend_from_slice(&[0xff; 7]);
        let evs = parse(&datagram);
        assert_eq!(evs.len(), 2);
        assert_eq!(evs[0].prefix, "lg/x/0/d");
        assert_eq!(evs[0].uid, Some(1005));
        assert_eq!(evs[0].seq, Some(7));
        assert_eq!(evs[0].destination, Some("127.0.0.2".parse().expect("ip")));
        assert_eq!(evs[0].port, Some(5432));
        assert_eq!(evs[0].protocol, Some(6));
        // Truncated anywhere: no panic, whatever decodes.
        for cut in 0..one.len() {
            let _ = parse(&one[..cut]);
        }
    }
}
