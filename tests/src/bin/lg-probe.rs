//! The probe the integration tests run as a test user: it enters a network
//! namespace and a cgroup as root, drops to the given uid/gid, then makes one
//! real connection attempt and prints what the user saw, e.g.
//! `connect=ok`, `connect=EPERM`, `send=EPERM recv=no`.
//!
//! ```text
//! lg-probe [--netns PATH] [--cgroup DIR] [--uid N] [--gid N] [SOCKET FLAGS] ACTION
//!   socket flags (tcp, tcp-to, udp, udp-connected, bind, udp-sink):
//!   --src ADDR            bind the sending socket to ADDR (port 0) first
//!   --broadcast           SO_BROADCAST on the sender
//!   --mcast-if IFNAME     IP_MULTICAST_IF / IPV6_MULTICAST_IF (sender)
//!   --device IFNAME       SO_BINDTODEVICE on the sender
//!   --reuse               SO_REUSEADDR + SO_REUSEPORT (bind, udp-sink)
//!   --mptcp               tcp: listen and connect with IPPROTO_MPTCP
//!   tcp ADDR:PORT         listen on [::]:PORT (dual stack) as root, then connect
//!   tcp-to ADDR:PORT      connect to an existing listener
//!   tfo ADDR:PORT         listen, then sendto(MSG_FASTOPEN) (TCP Fast Open)
//!   udp ADDR:PORT         bind [::]:PORT as root, then sendto() a datagram
//!   udp-connected ADDR:PORT  same, with connect() + send()
//!   listen PORT           accept TCP on [::]:PORT until killed
//!   loop ADDR:PORT STOPFILE  connect until STOPFILE exists; prints
//!                         `ok=N eperm=N other=N`
//!   burst ADDR:PORT N     N connects as fast as possible; prints counts
//!   http ADDR:PORT PATH   GET over plain HTTP/1.0; prints the body
//!   sink PORT             accept TCP on [::]:PORT, read each stream to EOF
//!   udp-sink PORT         receive UDP on [::]:PORT until killed
//!   rate ADDR:PORT N      N connect+close (against `listen`); prints `ns=.. ok=.. err=..`
//!   stream ADDR:PORT MB   one connection, MB MiB written; prints `ns=..`
//!   udp-rate ADDR:PORT N  N datagrams; prints `ns=.. ok=.. err=..`
//!   exec CMD ARGS...      run a command as the user
//!   bind ADDR:PORT [tcp|udp]  bind() as the user; prints `bind=ok|EPERM|...`
//!   hold ADDR:PORT N      open N idle connections and keep them until killed
//!
//! The probe's pid goes to stderr as `pid=N` (audit events name it).
//! ```

use std::{
    ffi::CString,
    fs,
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::exit,
    time::Duration,
};

use nix::{
    sched::{setns, CloneFlags},
    unistd::{setgid, setgroups, setuid, Gid, Uid},
};

fn die(msg: &str) -> ! {
    eprintln!("lg-probe: {msg}");
    exit(2)
}

fn errno_name(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EPERM) => "EPERM".into(),
        Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
        Some(libc::ETIMEDOUT) => "ETIMEDOUT".into(),
        Some(libc::ENETUNREACH) => "ENETUNREACH".into(),
        Some(libc::EACCES) => "EACCES".into(),
        Some(libc::EADDRINUSE) => "EADDRINUSE".into(),
        Some(libc::EADDRNOTAVAIL) => "EADDRNOTAVAIL".into(),
        Some(n) => format!("errno{n}"),
        None => format!("{e}"),
    }
}

fn dual_stack_listener(port: u16) -> TcpListener {
    // std binds [::] dual-stack (bindv6only is 0 by default).
    TcpListener::bind(("::", port)).unwrap_or_else(|e| die(&format!("listen [::]:{port}: {e}")))
}

/// Outcomes of repeated connects, printed as `ok=N eperm=N other=N`.
#[derive(Default)]
struct Tally {
    ok: u64,
    eperm: u64,
    other: u64,
}

impl Tally {
    fn connect(&mut self, to: &SocketAddr) {
        match TcpStream::connect_timeout(to, Duration::from_secs(2)) {
            Ok(_) => self.ok += 1,
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => self.eperm += 1,
            Err(_) => self.other += 1,
        }
    }

    fn print(&self) {
        println!("ok={} eperm={} other={}", self.ok, self.eperm, self.other);
    }
}

/// Socket options of the sender (or binder), from the command line.
#[derive(Default)]
struct SockOpts {
    src: Option<std::net::IpAddr>,
    broadcast: bool,
    mcast_if: Option<String>,
    device: Option<String>,
    reuse: bool,
    mptcp: bool,
}

fn ifindex(name: &str) -> u32 {
    nix::net::if_::if_nametoindex(name).unwrap_or_else(|e| die(&format!("interface {name}: {e}")))
}

impl SockOpts {
    /// A socket of `kind` for talking to (or binding) `to`, options set.
    fn socket(&self, to: &SocketAddr, kind: socket2::Type) -> socket2::Socket {
        use socket2::{Domain, Protocol, Socket};
        let domain = if to.is_ipv4() {
            Domain::IPV4
        } else {
            Domain::IPV6
        };
        let proto = if kind == socket2::Type::STREAM && self.mptcp {
            Protocol::MPTCP
        } else if kind == socket2::Type::STREAM {
            Protocol::TCP
        } else {
            Protocol::UDP
        };
        let s =
            Socket::new(domain, kind, Some(proto)).unwrap_or_else(|e| die(&format!("socket: {e}")));
        let check = |what: &str, r: std::io::Result<()>| {
            r.unwrap_or_else(|e| die(&format!("{what}: {e}")));
        };
        if self.broadcast {
            check("SO_BROADCAST", s.set_broadcast(true));
        }
        if let Some(dev) = &self.device {
            check("SO_BINDTODEVICE", s.bind_device(Some(dev.as_bytes())));
        }
        if let Some(name) = &self.mcast_if {
            let index = ifindex(name);
            if to.is_ipv4() {
                // ip_mreqn picks the interface by index (socket2 takes
                // only an address for IPv4).
                let mreq = libc::ip_mreqn {
                    imr_multiaddr: libc::in_addr { s_addr: 0 },
                    imr_address: libc::in_addr { s_addr: 0 },
                    imr_ifindex: index as i32,
                };
                use std::os::fd::AsRawFd as _;
                // SAFETY: a valid fd and an option value of the stated size.
                let rc = unsafe {
                    libc::setsockopt(
                        s.as_raw_fd(),
                        libc::IPPROTO_IP,
                        libc::IP_MULTICAST_IF,
                        (&raw const mreq).cast(),
                        size_of::<libc::ip_mreqn>() as libc::socklen_t,
                    )
                };
                if rc != 0 {
                    die(&format!(
                        "IP_MULTICAST_IF: {}",
                        std::io::Error::last_os_error()
                    ));
                }
            } else {
                check("IPV6_MULTICAST_IF", s.set_multicast_if_v6(index));
            }
        }
        if self.reuse {
            check("SO_REUSEADDR", s.set_reuse_address(true));
            check("SO_REUSEPORT", s.set_reuse_port(true));
        }
        if let Some(src) = self.src {
            let src = match (src, to.is_ipv4()) {
                (std::net::IpAddr::V4(v4), false) => std::net::IpAddr::V6(v4.to_ipv6_mapped()),
                (ip, _) => ip,
            };
            check("bind source", s.bind(&SocketAddr::new(src, 0).into()));
        }
        s
    }
}

/// Where a datagram to `to` is delivered: IPv4 (and IPv4-mapped) to an
/// IPv4 socket, else IPv6.
fn receiver_for(to: &SocketAddr, reuse: bool) -> UdpSocket {
    let v4 = match to.ip() {
        std::net::IpAddr::V4(_) => true,
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().is_some(),
    };
    let bind: SocketAddr = if v4 {
        SocketAddr::from(([0, 0, 0, 0], to.port()))
    } else {
        SocketAddr::from(([0u16; 8], to.port()))
    };
    let opts = SockOpts {
        reuse,
        ..SockOpts::default()
    };
    let s = opts.socket(&bind, socket2::Type::DGRAM);
    s.bind(&bind.into())
        .unwrap_or_else(|e| die(&format!("bind receiver {bind}: {e}")));
    UdpSocket::from(s)
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut netns = None;
    let mut cgroup = None;
    let mut uid = None;
    let mut gid = None;
    let mut opts = SockOpts::default();
    while args.first().is_some_and(|a| a.starts_with("--")) {
        let flag = args.remove(0);
        match flag.as_str() {
            "--broadcast" => {
                opts.broadcast = true;
                continue;
            }
            "--reuse" => {
                opts.reuse = true;
                continue;
            }
            "--mptcp" => {
                opts.mptcp = true;
                continue;
            }
            _ => {}
        }
        if args.is_empty() {
            die(&format!("{flag} needs a value"));
        }
        let value = args.remove(0);
        match flag.as_str() {
            "--netns" => netns = Some(value),
            "--cgroup" => cgroup = Some(value),
            "--uid" => uid = Some(value.parse::<u32>().unwrap_or_else(|_| die("bad uid"))),
            "--gid" => gid = Some(value.parse::<u32>().unwrap_or_else(|_| die("bad gid"))),
            "--src" => opts.src = Some(value.parse().unwrap_or_else(|_| die("bad --src"))),
            "--mcast-if" => opts.mcast_if = Some(value),
            "--device" => opts.device = Some(value),
            _ => die(&format!("unknown flag {flag}")),
        }
    }
    if let Some(ns) = &netns {
        let f = fs::File::open(ns).unwrap_or_else(|e| die(&format!("open {ns}: {e}")));
        setns(f, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| die(&format!("setns {ns}: {e}")));
    }
    let action = args.first().cloned().unwrap_or_else(|| die("no action"));
    // `[ff02::1%lg0]:P`: a link-local or link-scope multicast address
    // with its interface.
    let target = || -> SocketAddr {
        let a = args.get(1).unwrap_or_else(|| die("expected ADDR:PORT"));
        if let Some((head, tail)) = a.split_once('%') {
            let (ifname, port) = tail
                .split_once("]:")
                .unwrap_or_else(|| die("expected [ADDR%IF]:PORT"));
            let ip: std::net::Ipv6Addr = head
                .trim_start_matches('[')
                .parse()
                .unwrap_or_else(|_| die("bad IPv6 address"));
            let port: u16 = port.parse().unwrap_or_else(|_| die("bad port"));
            return SocketAddr::V6(std::net::SocketAddrV6::new(ip, port, 0, ifindex(ifname)));
        }
        a.parse().unwrap_or_else(|_| die("expected ADDR:PORT"))
    };

    // Sockets that must exist before the switch (listeners) are made here,
    // as root and outside the cgroup.
    let mut listener = None;
    let mut receiver = None;
    match action.as_str() {
        "tcp" if opts.mptcp => {
            let at = SocketAddr::from(([0u16; 8], target().port()));
            let l = opts.socket(&at, socket2::Type::STREAM);
            l.bind(&at.into())
                .and_then(|()| l.listen(16))
                .unwrap_or_else(|e| die(&format!("listen mptcp {at}: {e}")));
            listener = Some(TcpListener::from(l));
        }
        "tcp" | "tfo" => listener = Some(dual_stack_listener(target().port())),
        "udp" | "udp-connected" => {
            let r = receiver_for(&target(), false);
            r.set_read_timeout(Some(Duration::from_millis(300))).ok();
            receiver = Some(r);
        }
        _ => {}
    }

    if let Some(cg) = &cgroup {
        let procs = format!("{cg}/cgroup.procs");
        fs::write(&procs, std::process::id().to_string())
            .unwrap_or_else(|e| die(&format!("join {procs}: {e}")));
    }
    if let Some(gid) = gid.or(uid) {
        setgroups(&[]).unwrap_or_else(|e| die(&format!("setgroups: {e}")));
        setgid(Gid::from_raw(gid)).unwrap_or_else(|e| die(&format!("setgid: {e}")));
    }
    if let Some(uid) = uid {
        setuid(Uid::from_raw(uid)).unwrap_or_else(|e| die(&format!("setuid: {e}")));
    }

    if action != "exec" {
        eprintln!("pid={}", std::process::id());
    }
    match action.as_str() {
        "burst" => {
            let to = target();
            let n: u64 = args
                .get(2)
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| die("burst ADDR:PORT N"));
            let mut tally = Tally::default();
            for _ in 0..n {
                tally.connect(&to);
            }
            tally.print();
        }
        "http" => {
            use std::io::{Read as _, Write as _};
            let to = target();
            let path = args.get(2).cloned().unwrap_or_else(|| "/".into());
            // A refused or timed-out connection is an answer too.
            let mut s = match TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
                Ok(s) => s,
                Err(e) => {
                    println!("http={}", errno_name(&e));
                    return;
                }
            };
            let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n");
            let mut body = String::new();
            let _ = s.read_to_string(&mut body);
            print!(
                "{}",
                body.split_once("\r\n\r\n")
                    .map_or(body.as_str(), |(_, b)| b)
            );
        }
        "tcp" | "tcp-to" => {
            let to = target();
            let s = opts.socket(&to, socket2::Type::STREAM);
            let res = s.connect_timeout(&to.into(), Duration::from_secs(2));
            println!(
                "connect={}",
                res.map_or_else(|e| errno_name(&e), |_| "ok".into())
            );
        }
        "tfo" => {
            let to = target();
            let fam = if to.is_ipv4() {
                libc::AF_INET
            } else {
                libc::AF_INET6
            };
            // SAFETY: plain socket(2).
            let fd = unsafe { libc::socket(fam, libc::SOCK_STREAM, 0) };
            if fd < 0 {
                die("socket");
            }
            let addr = nix::sys::socket::SockaddrStorage::from(to);
            let data = b"hello";
            // SAFETY: valid fd, buffer and sockaddr of the stated length.
            let rc = unsafe {
                libc::sendto(
                    fd,
                    data.as_ptr().cast(),
                    data.len(),
                    libc::MSG_FASTOPEN,
                    nix::sys::socket::SockaddrLike::as_ptr(&addr),
                    nix::sys::socket::SockaddrLike::len(&addr),
                )
            };
            if rc < 0 {
                println!("connect={}", errno_name(&std::io::Error::last_os_error()));
            } else {
                println!("connect=ok");
            }
        }
        "udp" | "udp-connected" => {
            let to = target();
            let bind: SocketAddr = if to.is_ipv4() {
                "0.0.0.0:0".parse().unwrap_or_else(|_| die("addr"))
            } else {
                "[::]:0".parse().unwrap_or_else(|_| die("addr"))
            };
            let s = opts.socket(&to, socket2::Type::DGRAM);
            if opts.src.is_none() {
                s.bind(&bind.into())
                    .unwrap_or_else(|e| die(&format!("bind sender: {e}")));
            }
            let s = UdpSocket::from(s);
            let payload = format!("probe-{}", std::process::id());
            let sent = if action == "udp" {
                s.send_to(payload.as_bytes(), to).map(|_| ())
            } else {
                s.connect(to)
                    .and_then(|()| s.send(payload.as_bytes()).map(|_| ()))
            };
            let mut buf = [0u8; 128];
            let got = receiver
                .as_ref()
                .and_then(|r| r.recv_from(&mut buf).ok())
                .is_some_and(|(n, _)| &buf[..n] == payload.as_bytes());
            println!(
                "send={} recv={}",
                sent.map_or_else(|e| errno_name(&e), |()| "ok".into()),
                if got { "yes" } else { "no" }
            );
        }
        "sink" => {
            use std::io::Read as _;
            let port: u16 = args
                .get(1)
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| die("sink PORT"));
            let l = dual_stack_listener(port);
            for conn in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut conn = conn;
                    let mut buf = vec![0u8; 1 << 20];
                    while conn.read(&mut buf).is_ok_and(|n| n > 0) {}
                });
            }
        }
        "udp-sink" => {
            let port: u16 = args
                .get(1)
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| die("udp-sink PORT"));
            let s = receiver_for(&SocketAddr::from(([0u16; 8], port)), opts.reuse);
            let mut buf = [0u8; 2048];
            while s.recv(&mut buf).is_ok() {}
        }
        "rate" => {
            let to = target();
            let n: u64 = args
                .get(2)
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| die("rate ADDR:PORT N"));
            let (mut ok, mut err) = (0u64, 0u64);
            let start = std::time::Instant::now();
            for _ in 0..n {
                match TcpStream::connect(to) {
                    Ok(mut s) => {
                        // The server (`listen`) closes first, so TIME_WAIT
                        // stays on its side and client ports never run out.
                        use std::io::Read as _;
                        let _ = s.read(&mut [0u8; 1]);
                        ok += 1;
                    }
                    Err(_) => err += 1,
                }
            }
            println!("ns={} ok={ok} err={err}", start.elapsed().as_nanos());
        }
        "stream" => {
            use std::io::Write as _;
            let to = target();
            let mb: u64 = args
                .get(2)
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| die("stream ADDR:PORT MB"));
            let mut s = TcpStream::connect(to).unwrap_or_else(|e| die(&format!("connect: {e}")));
            let chunk = vec![7u8; 1 << 20];
            let start = std::time::Instant::now();
            for _ in 0..mb {
                s.write_all(&chunk)
                    .unwrap_or_else(|e| die(&format!("write: {e}")));
            }
            let _ = s.shutdown(std::net::Shutdown::Write);
            println!("ns={}", start.elapsed().as_nanos());
        }
        "udp-rate" => {
            let to = target();
            let n: u64 = args
                .get(2)
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| die("udp-rate ADDR:PORT N"));
            let bind = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
            let s = UdpSocket::bind(bind).unwrap_or_else(|e| die(&format!("bind: {e}")));
            let (mut ok, mut err) = (0u64, 0u64);
            let start = std::time::Instant::now();
            for _ in 0..n {
                match s.send_to(b"0123456789abcdef", to) {
                    Ok(_) => ok += 1,
                    Err(_) => err += 1,
                }
            }
            println!("ns={} ok={ok} err={err}", start.elapsed().as_nanos());
        }
        "listen" => {
            let port: u16 = args
                .get(1)
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| die("listen PORT"));
            let l = dual_stack_listener(port);
            for conn in l.incoming() {
                drop(conn);
            }
        }
        "loop" => {
            let to = target();
            let stop = args
                .get(2)
                .cloned()
                .unwrap_or_else(|| die("loop ADDR:PORT STOPFILE"));
            let mut tally = Tally::default();
            while !std::path::Path::new(&stop).exists() {
                tally.connect(&to);
            }
            tally.print();
        }
        "serve" => {
            // serve ADDR:PORT [tcp|udp]: listen (or bind, for UDP) there
            // and stay, for `scan` to find.
            let at = target();
            let udp = args.get(2).map(String::as_str) == Some("udp");
            let kind = if udp {
                socket2::Type::DGRAM
            } else {
                socket2::Type::STREAM
            };
            let s = opts.socket(&at, kind);
            s.set_reuse_address(true).ok();
            if let Err(e) = s.bind(&at.into()) {
                die(&format!("serve: bind: {}", errno_name(&e)));
            }
            if !udp {
                s.listen(16)
                    .unwrap_or_else(|e| die(&format!("serve: listen: {e}")));
            }
            println!("serving");
            loop {
                std::thread::sleep(Duration::from_secs(60));
            }
        }
        "hold" => {
            let to = target();
            let n: usize = args
                .get(2)
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| die("hold ADDR:PORT N"));
            let held: Vec<TcpStream> = (0..n)
                .filter_map(|_| TcpStream::connect_timeout(&to, Duration::from_secs(2)).ok())
                .collect();
            println!("held={}", held.len());
            loop {
                std::thread::sleep(Duration::from_secs(60));
            }
        }
        "bind" => {
            let at = target();
            let kind = match args.get(2).map(String::as_str) {
                None | Some("tcp") => socket2::Type::STREAM,
                Some("udp") => socket2::Type::DGRAM,
                Some(other) => die(&format!("bind: unknown protocol {other}")),
            };
            let s = opts.socket(&at, kind);
            let res = s.bind(&at.into());
            println!(
                "bind={}",
                res.map_or_else(|e| errno_name(&e), |()| "ok".into())
            );
        }
        "exec" => {
            let argv: Vec<CString> = args[1..]
                .iter()
                .map(|a| CString::new(a.as_bytes()).unwrap_or_else(|_| die("NUL in argument")))
                .collect();
            if argv.is_empty() {
                die("exec needs a command");
            }
            let e = nix::unistd::execvp(&argv[0], &argv).unwrap_err();
            die(&format!("exec {}: {e}", args[1]));
        }
        other => die(&format!("unknown action {other}")),
    }
    // Listeners live until the attempt is over.
    drop((receiver, listener));
}
