//! Packet-layer audit events: the nftables layer logs each refusal to the
//! instance's NFLOG group (`log group N prefix "lg/<table>/<bucket>/<d|w>"`);
//! this module binds that group over NETLINK_NETFILTER and decodes the
//! messages. The kernel numbers them (NFULNL_CFG_F_SEQ), so gaps count
//! events it could not deliver.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, OwnedFd},
};

const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_ULOG: u16 = 4;
const NFULNL_MSG_PACKET: u16 = 0;
const NFULNL_MSG_CONFIG: u16 = 1;
const NFULA_CFG_CMD: u16 = 1;
const NFULA_CFG_MODE: u16 = 2;
const NFULA_CFG_FLAGS: u16 = 6;
const NFULNL_CFG_CMD_BIND: u8 = 1;
const NFULNL_COPY_PACKET: u8 = 2;
const NFULNL_CFG_F_SEQ: u16 = 0x0001;
const NFULA_PAYLOAD: u16 = 9;
const NFULA_PREFIX: u16 = 10;
const NFULA_UID: u16 = 11;
const NFULA_SEQ: u16 = 12;
const NFULA_GID: u16 = 14;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;

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
pub fn bind(group: u16) -> io::Result<OwnedFd> {
    let fd = crate::host::netlink_socket(NETLINK_NETFILTER, 0)?;
    // A large receive buffer rides out bursts.
    let size: libc::c_int = 4 << 20;
    // SAFETY: setsockopt with a c_int.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const size).cast(),
            size_of::<libc::c_int>() as u32,
        );
    }
    let mut cmd = Vec::new();
    attr(&mut cmd, NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND]);
    config(&fd, group, &cmd)?;
    let mut mode = Vec::new();
    // copy_range (be32) then copy_mode (u8), padded: the IP and transport
    // headers are all we read.
    let mut m = 128u32.to_be_bytes().to_vec();
    m.push(NFULNL_COPY_PACKET);
    m.push(0);
    attr(&mut mode, NFULA_CFG_MODE, &m);
    attr(&mut mode, NFULA_CFG_FLAGS, &NFULNL_CFG_F_SEQ.to_be_bytes());
    config(&fd, group, &mode)?;
    Ok(fd)
}

fn attr(buf: &mut Vec<u8>, kind: u16, data: &[u8]) {
    let len = 4 + data.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(data);
    buf.resize(buf.len() + (4 - len % 4) % 4, 0);
}

/// Sends one NFULNL_MSG_CONFIG and waits for its acknowledgement.
fn config(fd: &OwnedFd, group: u16, attrs: &[u8]) -> io::Result<()> {
    let mut msg = Vec::new();
    let len = 16 + 4 + attrs.len();
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&((NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG).to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: family AF_UNSPEC, version 0, res_id = group (big endian).
    msg.push(0);
    msg.push(0);
    msg.extend_from_slice(&group.to_be_bytes());
    msg.extend_from_slice(attrs);
    // SAFETY: send our buffer.
    if unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // The ack (an NLMSG_ERROR with error 0); the socket is non-blocking, so
    // poll briefly.
    let mut buf = [0u8; 512];
    for _ in 0..100 {
        // SAFETY: recv into our buffer.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                std::thread::sleep(std::time::Duration::from_millis(5));
                continue;
            }
            return Err(e);
        }
        let n = n as usize;
        if n >= 20 && u16::from_ne_bytes([buf[4], buf[5]]) == NLMSG_ERROR {
            let errno = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
            return if errno == 0 {
                Ok(())
            } else {
                Err(io::Error::from_raw_os_error(-errno))
            };
        }
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        "no answer from nfnetlink_log",
    ))
}

/// Decodes every NFULNL_MSG_PACKET in one datagram.
pub fn parse(datagram: &[u8]) -> Vec<PacketEvent> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 16 <= datagram.len() {
        let len = u32::from_ne_bytes([
            datagram[off],
            datagram[off + 1],
            datagram[off + 2],
            datagram[off + 3],
        ]) as usize;
        let kind = u16::from_ne_bytes([datagram[off + 4], datagram[off + 5]]);
        if len < 16 || off + len > datagram.len() {
            break;
        }
        if kind == ((NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET) && len >= 20 {
            out.push(parse_packet(&datagram[off + 20..off + len]));
        }
        off += (len + 3) & !3;
    }
    out
}

fn parse_packet(mut attrs: &[u8]) -> PacketEvent {
    let mut ev = PacketEvent {
        prefix: String::new(),
        uid: None,
        gid: None,
        seq: None,
        destination: None,
        port: None,
        protocol: None,
    };
    let be32 = |d: &[u8]| (d.len() >= 4).then(|| u32::from_be_bytes([d[0], d[1], d[2], d[3]]));
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
        if len < 4 || len > attrs.len() {
            break;
        }
        let data = &attrs[4..len];
        match kind {
            NFULA_PREFIX => {
                ev.prefix = String::from_utf8_lossy(data)
                    .trim_end_matches('\0')
                    .to_string()
            }
            NFULA_UID => ev.uid = be32(data),
            NFULA_GID => ev.gid = be32(data),
            NFULA_SEQ => ev.seq = be32(data),
            NFULA_PAYLOAD => {
                let (dst, port, proto) = parse_ip(data);
                ev.destination = dst;
                ev.port = port;
                ev.protocol = proto;
            }
            _ => {}
        }
        let step = (len + 3) & !3;
        if step > attrs.len() {
            break;
        }
        attrs = &attrs[step..];
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

    #[test]
    fn parses_a_logged_syn() {
        // nlmsghdr + nfgenmsg + prefix + uid + seq + payload (IPv4 TCP SYN).
        let mut attrs = Vec::new();
        attr(&mut attrs, NFULA_PREFIX, b"lg/x/0/d\0");
        attr(&mut attrs, NFULA_UID, &1005u32.to_be_bytes());
        attr(&mut attrs, NFULA_SEQ, &7u32.to_be_bytes());
        let mut ip = vec![
            0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0, 127, 0, 0, 1, 127, 0, 0, 2,
        ];
        ip.extend_from_slice(&[0x9c, 0x40, 0x15, 0x38, 0, 0, 0, 0]);
        attr(&mut attrs, NFULA_PAYLOAD, &ip);
        let mut msg = Vec::new();
        msg.extend_from_slice(&((20 + attrs.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&(NFNL_SUBSYS_ULOG << 8).to_ne_bytes());
        msg.extend_from_slice(&[0; 10]);
        msg.extend_from_slice(&[2, 0, 0, 1]);
        msg.extend_from_slice(&attrs);
        let evs = parse(&msg);
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].prefix, "lg/x/0/d");
        assert_eq!(evs[0].uid, Some(1005));
        assert_eq!(evs[0].seq, Some(7));
        assert_eq!(evs[0].destination, Some("127.0.0.2".parse().unwrap()));
        assert_eq!(evs[0].port, Some(5432));
        assert_eq!(evs[0].protocol, Some(6));
    }
}
