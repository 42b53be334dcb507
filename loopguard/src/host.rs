//! Facts about the host loopguard runs on: privileges, cgroup v2, bpffs,
//! the network namespace.

use aya::util::KernelVersion;
use std::{
    fs, io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use nix::sys::statfs::statfs;

/// Problems with the host rather than the policy; each has its exit code.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("{0} needs root (CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN)")]
    NotRoot(&'static str),
    #[error(
        "no cgroup v2 hierarchy is mounted (looked in /proc/mounts); mount one or pass --cgroup"
    )]
    NoCgroup2,
    #[error("{0} is not a cgroup v2 directory")]
    NotCgroup2(PathBuf),
    #[error("this kernel does not support cgroup socket address programs (needs Linux 5.7 or later with CONFIG_BPF_SYSCALL and CONFIG_CGROUP_BPF)")]
    NoBpf,
    #[error("Linux {found} is too old: loopguard needs 5.7 or later (pinned bpf_link attachments of cgroup programs)")]
    KernelTooOld { found: String },
    #[error("failed to mount bpffs at {path}")]
    MountBpffs {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cgroup ids here are not the kernel's own: {0}; a policy listing cgroups needs loopguard in the host's cgroup namespace, with cgroup2 mounted at its root")]
    CgroupView(String),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

pub fn require_root(what: &'static str) -> Result<(), HostError> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(HostError::NotRoot(what))
    }
}

fn fs_magic(path: &Path) -> Option<i64> {
    statfs(path).ok().map(|s| s.filesystem_type().0)
}

/// Mounts bpffs at `path` unless one is there already (a fresh host may
/// have none).
pub fn ensure_bpffs(path: &Path) -> Result<(), HostError> {
    if fs_magic(path) == Some(BPF_FS_MAGIC) {
        return Ok(());
    }
    // Two first applies at once must not stack two mounts: serialize on
    // /run (a directory lock, so no file is left behind) and look again.
    let run = fs::File::open("/run").map_err(|source| HostError::Io {
        context: "failed to open /run".into(),
        source,
    })?;
    let _guard =
        nix::fcntl::Flock::lock(run, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| {
            HostError::Io {
                context: "failed to lock /run".into(),
                source: io::Error::from(e),
            }
        })?;
    if fs_magic(path) == Some(BPF_FS_MAGIC) {
        return Ok(());
    }
    fs::create_dir_all(path).map_err(|source| HostError::Io {
        context: format!("failed to create {}", path.display()),
        source,
    })?;
    nix::mount::mount(
        Some("bpf"),
        path,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|source| HostError::MountBpffs {
        path: path.to_path_buf(),
        source,
    })
}

/// The cgroup v2 root: `/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones.
pub fn cgroup2_root() -> Result<PathBuf, HostError> {
    let mounts = fs::read_to_string("/proc/mounts").map_err(|source| HostError::Io {
        context: "failed to read /proc/mounts".into(),
        source,
    })?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount(dir)))
        })
        .min_by_key(|p| p.as_os_str().len())
        .ok_or(HostError::NoCgroup2)
}

/// The proc inode number of the initial cgroup namespace
/// (`PROC_CGROUP_INIT_INO`).
const INITIAL_CGROUP_NS: u64 = 0xEFFF_FFFB;

/// Whether cgroup paths under [`cgroup2_root`] are the ones the kernel's
/// ancestor levels count from: this process is in the initial cgroup
/// namespace and the cgroup2 mount shows the hierarchy's root (not a
/// subtree, as in a container or under `ProtectControlGroups=private`).
/// Otherwise path depth is not the level the eBPF programs look at.
pub fn cgroup_view_is_global() -> Result<(), HostError> {
    use std::os::unix::fs::MetadataExt as _;
    let ns = fs::metadata("/proc/self/ns/cgroup").map_err(|source| HostError::Io {
        context: "failed to read /proc/self/ns/cgroup".into(),
        source,
    })?;
    if ns.ino() != INITIAL_CGROUP_NS {
        return Err(HostError::CgroupView(
            "this process is in a cgroup namespace of its own".into(),
        ));
    }
    let root = cgroup2_root()?;
    let info = fs::read_to_string("/proc/self/mountinfo").map_err(|source| HostError::Io {
        context: "failed to read /proc/self/mountinfo".into(),
        source,
    })?;
    // Fields: id parent major:minor root mountpoint options... - fstype ...
    let shows_root = info.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let fstype = f.iter().position(|x| *x == "-").and_then(|i| f.get(i + 1));
        fstype == Some(&"cgroup2")
            && f.get(4).map(|m| PathBuf::from(unescape_mount(m))) == Some(root.clone())
            && f.get(3) == Some(&"/")
    });
    if shows_root {
        Ok(())
    } else {
        Err(HostError::CgroupView(format!(
            "the cgroup2 mount at {} shows a subtree, not the root",
            root.display()
        )))
    }
}

/// Whether `cgroup` is the root of the cgroup v2 hierarchy.
pub fn is_cgroup2_root(cgroup: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let id = |p: &Path| fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    cgroup2_root().is_ok_and(|root| id(&root).is_some() && id(&root) == id(cgroup))
}

/// /proc/mounts escapes space, tab, newline and backslash as octal.
fn unescape_mount(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// The cgroup to attach to: `--cgroup` (checked to be cgroup v2), else the
/// root of the v2 hierarchy.
pub fn attach_cgroup(requested: Option<&Path>) -> Result<PathBuf, HostError> {
    match requested {
        None => cgroup2_root(),
        Some(p) => {
            let p = fs::canonicalize(p).map_err(|source| HostError::Io {
                context: format!("cgroup {}", p.display()),
                source,
            })?;
            if fs_magic(&p) == Some(CGROUP2_SUPER_MAGIC) {
                Ok(p)
            } else {
                Err(HostError::NotCgroup2(p))
            }
        }
    }
}

/// Makes a missing attach cgroup (and missing parents) under a cgroup2
/// mount, as a daemon that must not start unguarded does: systemd uses a
/// slice's directory that exists as it is, and processes placed there are
/// guarded from their start. `Ok(false)`: it existed.
pub fn make_cgroup(path: &Path) -> Result<bool, HostError> {
    if path.exists() {
        return Ok(false);
    }
    let mut ancestor = path;
    while let Some(parent) = ancestor.parent() {
        ancestor = parent;
        if ancestor.exists() {
            break;
        }
    }
    if fs_magic(ancestor) != Some(CGROUP2_SUPER_MAGIC) {
        return Err(HostError::NotCgroup2(path.to_path_buf()));
    }
    fs::create_dir_all(path).map_err(|source| HostError::Io {
        context: format!("make cgroup {}", path.display()),
        source,
    })?;
    Ok(true)
}

/// The running kernel's release string, and its version as aya reads it
/// (Ubuntu's and Debian's version signatures included; 0.0.0 if unknown).
pub fn kernel_version() -> (String, KernelVersion) {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let version = KernelVersion::current().unwrap_or(KernelVersion::new(0, 0, 0));
    (release, version)
}

/// Whether the running kernel is at least `major.minor`.
pub fn kernel_at_least(major: u8, minor: u8) -> bool {
    kernel_version().1 >= KernelVersion::new(major, minor, 0)
}

/// Refuses kernels without what the eBPF layer needs, and warns about
/// what only narrows the guarantee. Minimums: 5.7 (bpf_link for cgroup
/// programs, `bpf_get_netns_cookie` in sock_addr programs); 5.14
/// (`SO_NETNS_COOKIE`, to guard one network namespace only).
pub fn check_kernel() -> Result<(), HostError> {
    let (release, version) = kernel_version();
    if version < KernelVersion::new(5, 7, 0) {
        return Err(HostError::KernelTooOld { found: release });
    }
    match aya::sys::is_program_supported(aya::programs::ProgramType::CgroupSockAddr) {
        Ok(true) => {}
        Ok(false) => return Err(HostError::NoBpf),
        // The probe itself failed (e.g. seccomp): let loading report it.
        Err(e) => log::debug!("cgroup sock_addr probe failed: {e}"),
    }
    if version < KernelVersion::new(5, 14, 0) {
        log::warn!(
            "Linux {release} cannot tell network namespaces apart (SO_NETNS_COOKIE needs 5.14): the policy applies to loopback connections in every namespace"
        );
    }
    Ok(())
}

/// `SO_NETNS_COOKIE` of the current network namespace; `None` before 5.14.
pub fn netns_cookie() -> Option<u64> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))
        .ok()?;
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, and a buffer of the size passed.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    (rc == 0).then_some(cookie)
}

/// The systemd unit a cgroup path belongs to: its innermost `.service` or
/// `.scope` component (`/system.slice/redis-server.service` ->
/// `redis-server.service`).
pub fn unit_of(cgroup: &str) -> Option<String> {
    cgroup
        .split('/')
        .rev()
        .find(|c| c.ends_with(".service") || c.ends_with(".scope"))
        .map(str::to_string)
}

/// The id a cgroup2 directory has now (its inode number: the kernel's
/// cgroup id, as bpf links and `BPF_PROG_QUERY` report it); `None` when the
/// path is gone or no directory.
pub fn cgroup_id(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    fs::metadata(path)
        .ok()
        .filter(fs::Metadata::is_dir)
        .map(|m| m.ino())
}

/// A non-blocking netlink socket of `protocol`, bound to the multicast
/// `groups` (0 for none).
pub fn netlink_socket(protocol: isize, groups: u32) -> io::Result<netlink_sys::Socket> {
    let mut sock = netlink_sys::Socket::new(protocol)?;
    sock.bind(&netlink_sys::SocketAddr::new(0, groups))?;
    sock.set_non_blocking(true)?;
    Ok(sock)
}
