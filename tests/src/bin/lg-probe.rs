//! The probe the integration tests run as a test user: it enters a network
//! namespace and a cgroup as root, drops to the given uid/gid, then makes one
//! real connection attempt and prints what the user saw, e.g.
//! `connect=ok`, `connect=EPERM`, `send=EPERM recv=no`.
//!
//! ```text
//! lg-probe [--netns PATH] [--cgroup DIR] [--uid N] [--gid N] ACTION
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

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut netns = None;
    let mut cgroup = None;
    let mut uid = None;
    let mut gid = None;
    while args.first().is_some_and(|a| a.starts_with("--")) {
        let flag = args.remove(0);
        if args.is_empty() {
            die(&format!("{flag} needs a value"));
        }
        let value = args.remove(0);
        match flag.as_str() {
            "--netns" => netns = Some(value),
            "--cgroup" => cgroup = Some(value),
            "--uid" => uid = Some(value.parse::<u32>().unwrap_or_else(|_| die("bad uid"))),
            "--gid" => gid = Some(value.parse::<u32>().unwrap_or_else(|_| die("bad gid"))),
            _ => die(&format!("unknown flag {flag}")),
        }
    }
    if let Some(ns) = &netns {
        let f = fs::File::open(ns).unwrap_or_else(|e| die(&format!("open {ns}: {e}")));
        setns(f, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| die(&format!("setns {ns}: {e}")));
    }
    let action = args.first().cloned().unwrap_or_else(|| die("no action"));
    let target = || -> SocketAddr {
        args.get(1)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| die("expected ADDR:PORT"))
    };

    // Sockets that must exist before the switch (listeners) are made here,
    // as root and outside the cgroup.
    let mut listener = None;
    let mut receiver = None;
    match action.as_str() {
        "tcp" | "tfo" => listener = Some(dual_stack_listener(target().port())),
        "udp" | "udp-connected" => {
            let r = UdpSocket::bind(("::", target().port()))
                .unwrap_or_else(|e| die(&format!("bind udp: {e}")));
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
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))
                .unwrap_or_else(|e| die(&format!("connect: {e}")));
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
            let res = TcpStream::connect_timeout(&target(), Duration::from_secs(2));
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
            let s = UdpSocket::bind(bind).unwrap_or_else(|e| die(&format!("bind sender: {e}")));
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
            let s = UdpSocket::bind(("::", port)).unwrap_or_else(|e| die(&format!("bind: {e}")));
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
