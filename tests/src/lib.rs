//! Harness for loopguard's real-kernel integration tests.
//!
//! Every test gets a [`Sandbox`]: its own network namespace (with `lo` up and
//! a dummy interface carrying host addresses), its own child cgroup v2
//! directory, and its own `--instance`, so tests run side by side and never
//! touch the host's cgroup root, namespace or another test's pins. Dropping
//! the sandbox removes all of it, also when the test panicked.
//!
//! Tests need root and a kernel with cgroup BPF; without them they fail
//! loudly, never pass silently.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::OnceLock,
    thread,
    time::{Duration, Instant},
};

/// IPv4 address of the sandbox's dummy interface (TEST-NET-1, inside the
/// sandbox's own namespace only).
pub const HOST_V4: &str = "192.0.2.1";
/// IPv6 address of the sandbox's dummy interface (documentation prefix).
pub const HOST_V6: &str = "2001:db8::1";

/// Every route to a local listener on `port` that SPEC §1 lists: the
/// loopback range, ::1, IPv4-mapped, the unspecified addresses and the
/// sandbox's own interface addresses.
pub fn routes(port: u16) -> Vec<String> {
    [
        "127.0.0.1",
        "127.45.6.7",
        "[::1]",
        "[::ffff:127.0.0.1]",
        "0.0.0.0",
        "[::]",
        "[::ffff:0.0.0.0]",
        HOST_V4,
        &format!("[{HOST_V6}]"),
        &format!("[::ffff:{HOST_V4}]"),
    ]
    .iter()
    .map(|a| format!("{a}:{port}"))
    .collect()
}

/// A timing target of SPEC ("within a second"): as it is on real
/// hardware; under software emulation (the VM matrix sets
/// `LG_TEST_EMULATED`), ten times as long, which the test prints.
pub fn timing_target(target: Duration) -> Duration {
    if std::env::var_os("LG_TEST_EMULATED").is_some() {
        let scaled = target * 10;
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| {
            eprintln!("emulated machine: timing targets checked ten times as long");
        });
        scaled
    } else {
        target
    }
}

/// A local account made for the tests.
#[derive(Clone, Debug)]
pub struct TestUser {
    pub name: &'static str,
    pub uid: u32,
    pub gid: u32,
}

pub struct Users {
    pub alice: TestUser,
    pub bob: TestUser,
    /// Member of `lgt-devs` as a supplementary group.
    pub carol: TestUser,
    /// Member of `lgt-devs` as the primary group.
    pub dave: TestUser,
}

pub const DEVS_GROUP: &str = "lgt-devs";

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("failed to run {cmd:?}: {e}"));
    out
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn id_of(flag: &str, name: &str) -> Option<u32> {
    let out = run(Command::new("id").args([flag, name]));
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
        .flatten()
}

/// Creates the test accounts once per machine (useradd is serialized with a
/// file lock: test binaries run in parallel).
/// The last `max` bytes of `text` (at a char boundary): what an assertion
/// prints of a log, never the whole of it.
/// Runs `probe` until it answers `want`, within `target` (a timing the
/// product promises, scaled under emulation) plus half a second of slack;
/// panics with the last answer and the tail of `log()` otherwise.
pub fn wait_until_probe(
    probe: impl Fn() -> String,
    want: &str,
    target: Duration,
    what: &str,
    log: impl Fn() -> String,
) {
    let deadline = Instant::now() + timing_target(target) + Duration::from_millis(500);
    loop {
        let got = probe();
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still {got}; daemon log: {}",
            tail(&log(), 2000)
        );
        thread::sleep(Duration::from_millis(50));
    }
}

pub fn tail(text: &str, max: usize) -> &str {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

pub fn users() -> &'static Users {
    static USERS: OnceLock<Users> = OnceLock::new();
    USERS.get_or_init(|| {
        require_root();
        let lock = fs::File::create("/tmp/loopguard-test-users.lock").expect("lock file");
        let _guard = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .expect("lock /tmp/loopguard-test-users.lock");
        if !run(Command::new("getent").args(["group", DEVS_GROUP]))
            .status
            .success()
        {
            run_ok(Command::new("groupadd").args(["--system", DEVS_GROUP]));
        }
        let mk = |name: &'static str, extra: &[&str]| {
            if id_of("-u", name).is_none() {
                run_ok(
                    Command::new("useradd")
                        .args([
                            "--system",
                            "--no-create-home",
                            "--shell",
                            "/usr/sbin/nologin",
                        ])
                        .args(extra)
                        .arg(name),
                );
            }
            TestUser {
                name,
                uid: id_of("-u", name).expect("uid"),
                gid: id_of("-g", name).expect("gid"),
            }
        };
        Users {
            alice: mk("lgt-alice", &["--user-group"]),
            bob: mk("lgt-bob", &["--user-group"]),
            carol: mk("lgt-carol", &["--user-group", "--groups", DEVS_GROUP]),
            dave: mk("lgt-dave", &["--no-user-group", "--gid", DEVS_GROUP]),
        }
    })
}

pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "loopguard's integration tests must run as root: they attach eBPF programs under a child \
         cgroup and create network namespaces and users. Run `cargo xtask test` as root."
    );
}

/// Root of the cgroup v2 hierarchy.
pub fn cgroup2_root() -> PathBuf {
    let mounts = fs::read_to_string("/proc/mounts").expect("read /proc/mounts");
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
        })
        .min_by_key(|p| p.as_os_str().len())
        .expect(
            "NO CGROUP V2 HIERARCHY MOUNTED: loopguard's tests need one (cgroup2 in /proc/mounts)",
        )
}

fn target_dir_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary under target/<profile>/deps");
    dir.join(name)
}

/// The loopguard binary under test: `$LOOPGUARD_BIN`, else next to the
/// test binary's profile directory.
pub fn loopguard_bin() -> PathBuf {
    let p = std::env::var_os("LOOPGUARD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir_bin("loopguard"));
    assert!(
        p.exists(),
        "loopguard binary not found at {} (build it first: `cargo build -p loopguard`; `cargo xtask test` does)",
        p.display()
    );
    p
}

pub fn probe_bin() -> PathBuf {
    // Cargo builds the package's binaries before its integration tests.
    target_dir_bin("lg-probe")
}

/// The output of one command, for assertions.
pub struct Ran {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    fn from(out: Output) -> Self {
        Ran {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub fn ok(self) -> Self {
        assert_eq!(
            self.code, 0,
            "expected success\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }
}

/// One test's namespace, cgroup, instance and files.
pub struct Sandbox {
    pub instance: String,
    pub netns: String,
    pub netns_path: PathBuf,
    /// The test's own cgroup: probes run in it (or below).
    pub cgroup: PathBuf,
    /// Where `apply` and `run` attach the programs: `cgroup`, or the
    /// cgroup2 root for [`Sandbox::on_root`].
    pub attach: PathBuf,
    pub dir: PathBuf,
    children: Vec<Child>,
}

impl Sandbox {
    /// `name`: short, [a-z0-9-], unique among the tests.
    pub fn new(name: &str) -> Sandbox {
        require_root();
        users();
        let instance = format!("lgt-{name}");
        assert!(instance.len() <= 32, "sandbox name too long");
        let netns = instance.clone();
        let cgroup = cgroup2_root().join(format!("{instance}.test"));
        let dir = std::env::temp_dir().join(format!("{instance}.test"));
        let mut sb = Sandbox {
            netns_path: PathBuf::from("/run/netns").join(&netns),
            instance,
            netns,
            attach: cgroup.clone(),
            cgroup,
            dir,
            children: Vec::new(),
        };
        // Leftovers of a run that was killed.
        sb.teardown();
        run_ok(Command::new("ip").args(["netns", "add", &sb.netns]));
        let ip = |args: &[&str]| {
            run_ok(Command::new("ip").arg("-n").arg(&sb.netns).args(args));
        };
        ip(&["link", "set", "lo", "up"]);
        // A portless bridge stands in for a LAN interface (this kernel has
        // no dummy driver); its addresses are local all the same.
        ip(&["link", "add", "lg0", "type", "bridge"]);
        ip(&["link", "set", "lg0", "up"]);
        ip(&["addr", "add", &format!("{HOST_V4}/24"), "dev", "lg0"]);
        ip(&[
            "addr",
            "add",
            &format!("{HOST_V6}/64"),
            "dev",
            "lg0",
            "nodad",
        ]);
        fs::create_dir_all(&sb.cgroup)
            .unwrap_or_else(|e| panic!("create cgroup {}: {e}", sb.cgroup.display()));
        fs::create_dir_all(&sb.dir).expect("sandbox dir");
        // Test users read policy files for `check` and `explain --policy`.
        fs::set_permissions(&sb.dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        sb
    }

    /// A sandbox whose programs attach at the cgroup2 root (guarding every
    /// process of its namespace), which only a disposable machine may
    /// have: the VM matrix sets `LG_TEST_DISPOSABLE`. Elsewhere `None`,
    /// said loudly.
    pub fn on_root(name: &str) -> Option<Sandbox> {
        if std::env::var_os("LG_TEST_DISPOSABLE").is_none() {
            eprintln!(
                "SKIPPED {name}: it attaches programs at the cgroup2 root, which tests do only on a \
                 disposable machine (`cargo xtask vm-test` runs it); this host's root cgroup is not touched"
            );
            return None;
        }
        let mut sb = Sandbox::new(name);
        sb.attach = cgroup2_root();
        Some(sb)
    }

    /// Writes a policy file into the sandbox directory.
    pub fn policy(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.join(name);
        fs::write(&p, text).expect("write policy");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).expect("chmod");
        p
    }

    /// `loopguard --instance <ours> ARGS` inside the sandbox's namespace.
    pub fn lg(&self, args: &[&str]) -> Ran {
        Ran::from(run(Command::new("nsenter")
            .arg(format!("--net={}", self.netns_path.display()))
            .arg(loopguard_bin())
            .arg("--instance")
            .arg(&self.instance)
            .args(args)))
    }

    /// `loopguard ARGS` with extra environment (e.g. a PATH with a fake nft).
    pub fn lg_env(&self, env: &[(&str, &str)], args: &[&str]) -> Ran {
        Ran::from(run(Command::new("nsenter")
            .arg(format!("--net={}", self.netns_path.display()))
            .arg(loopguard_bin())
            .arg("--instance")
            .arg(&self.instance)
            .args(args)
            .envs(env.iter().copied())))
    }

    /// The nftables table of our instance, as `nft -j` lists it.
    pub fn nft_table(&self) -> Option<serde_json::Value> {
        let out = run(Command::new("nsenter")
            .arg(format!("--net={}", self.netns_path.display()))
            .args(["nft", "-j", "list", "table", "inet", &self.instance]));
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).expect("nft json"))
    }

    /// Runs a command as root in our namespace (nft, ip).
    pub fn in_netns(&self, argv: &[&str]) -> Ran {
        Ran::from(run(Command::new("nsenter")
            .arg(format!("--net={}", self.netns_path.display()))
            .args(argv)))
    }

    /// `apply FILE --cgroup <ours> EXTRA...`
    pub fn apply(&self, file: &Path, extra: &[&str]) -> Ran {
        let mut args = vec![
            "apply",
            file.to_str().expect("utf-8 path"),
            "--cgroup",
            self.attach.to_str().expect("utf-8 path"),
        ];
        args.extend_from_slice(extra);
        self.lg(&args)
    }

    /// Writes and applies a policy; panics if apply fails.
    pub fn apply_text(&self, text: &str) -> Ran {
        let p = self.policy("policy.toml", text);
        self.apply(&p, &[]).ok()
    }

    fn probe_cmd(&self, user: Option<&TestUser>, args: &[&str]) -> Command {
        let mut cmd = self.probe_cmd_outside(user, &[]);
        cmd.arg("--cgroup").arg(&self.cgroup);
        cmd.args(args);
        cmd
    }

    /// The probe in our namespace, outside our cgroup.
    fn probe_cmd_outside(&self, user: Option<&TestUser>, args: &[&str]) -> Command {
        let mut cmd = Command::new(probe_bin());
        cmd.arg("--netns").arg(&self.netns_path);
        if let Some(u) = user {
            cmd.args(["--uid", &u.uid.to_string(), "--gid", &u.gid.to_string()]);
        }
        cmd.args(args);
        cmd
    }

    /// Runs the probe as `user` (root when `None`) inside our namespace and
    /// cgroup; returns what it printed, e.g. `connect=EPERM`.
    pub fn probe(&self, user: Option<&TestUser>, args: &[&str]) -> String {
        probe_output(self.probe_cmd(user, args), args)
    }

    /// Runs the probe as `user` in our namespace, in `cgroup` (a cgroup
    /// below ours, or another one).
    pub fn probe_in(&self, user: Option<&TestUser>, cgroup: &Path, args: &[&str]) -> String {
        let mut cmd = self.probe_cmd_outside(user, &[]);
        cmd.arg("--cgroup").arg(cgroup);
        cmd.args(args);
        probe_output(cmd, args)
    }

    /// Runs the probe as `user` in our namespace but outside our cgroup.
    pub fn probe_outside(&self, user: Option<&TestUser>, args: &[&str]) -> String {
        probe_output(self.probe_cmd_outside(user, args), args)
    }

    /// Runs a command as `user` inside our namespace and cgroup.
    pub fn exec_as(&self, user: Option<&TestUser>, argv: &[&str]) -> Ran {
        let mut args = vec!["exec"];
        args.extend_from_slice(argv);
        Ran::from(run(&mut self.probe_cmd(user, &args)))
    }

    /// Starts a long-running process as root in our namespace (outside the
    /// cgroup); killed when the sandbox drops.
    pub fn spawn_in_netns(&mut self, argv: &[&str]) {
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.netns_path.display()))
            .args(argv)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {argv:?}: {e}"));
        self.children.push(child);
    }

    /// Starts the probe as `user` in our namespace and cgroup, in the
    /// background; its stdout is returned by [`Sandbox::wait_probe`].
    pub fn spawn_probe(&self, user: Option<&TestUser>, args: &[&str]) -> Child {
        self.probe_cmd(user, args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn probe {args:?}: {e}"))
    }

    /// Starts the probe as root in our namespace, outside the cgroup
    /// (listeners); killed when the sandbox drops.
    pub fn spawn_listener(&mut self, port: u16) {
        let child = self
            .probe_cmd_outside(None, &["listen", &port.to_string()])
            .spawn()
            .unwrap_or_else(|e| panic!("spawn listener: {e}"));
        self.children.push(child);
        self.wait_listening(&format!("127.0.0.1:{port}"));
    }

    /// Starts the probe as `user` (root when `None`) in our namespace,
    /// outside the cgroup, in the background; killed when the sandbox
    /// drops.
    pub fn spawn_outside(&mut self, user: Option<&TestUser>, args: &[&str]) {
        let child = self
            .probe_cmd_outside(user, args)
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn probe {args:?}: {e}"));
        self.children.push(child);
    }

    /// Waits until a UDP socket is bound to `port` in our namespace.
    pub fn wait_udp_bound(&self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let filter = format!("sport = :{port}");
        while self
            .in_netns(&["ss", "-Hunl", &filter])
            .ok()
            .stdout
            .trim()
            .is_empty()
        {
            assert!(Instant::now() < deadline, "nothing bound UDP port {port}");
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts `loopguard run POLICY --cgroup <ours> --audit-log <dir>/audit.jsonl
    /// EXTRA...` in our namespace and waits for its sd_notify READY=1.
    /// Killed when the sandbox drops.
    pub fn start_daemon(&mut self, policy: &Path, extra: &[&str]) -> Daemon {
        self.start_daemon_env(policy, extra, &[])
    }

    /// [`Sandbox::start_daemon`] with extra environment.
    pub fn start_daemon_env(
        &mut self,
        policy: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        let notify = self.dir.join("notify.sock");
        let _ = fs::remove_file(&notify);
        let sock = std::os::unix::net::UnixDatagram::bind(&notify).expect("notify socket");
        sock.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let audit_log = self.dir.join("audit.jsonl");
        let stderr = self.dir.join("daemon.err");
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns_path.display()))
            .arg(loopguard_bin())
            .args(["--instance", &self.instance, "run"])
            .arg(policy)
            .arg("--cgroup")
            .arg(&self.attach)
            .arg("--audit-log")
            .arg(&audit_log)
            .args(extra)
            .envs(env.iter().copied().filter(|(k, _)| *k != "LG_TEST_NOFILE"))
            .env("NOTIFY_SOCKET", &notify)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&stderr).expect("stderr file"));
        // LG_TEST_NOFILE=N: run the daemon under RLIMIT_NOFILE N, like a
        // unit's LimitNOFILE.
        if let Some(n) = env
            .iter()
            .find(|(k, _)| *k == "LG_TEST_NOFILE")
            .and_then(|(_, v)| v.parse::<u64>().ok())
        {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: setrlimit is async-signal-safe; nothing else runs
            // between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("spawn loopguard run");
        let pid = child.id();
        self.children.push(child);
        let mut buf = [0u8; 256];
        loop {
            let n = sock.recv(&mut buf).unwrap_or_else(|e| {
                panic!(
                    "loopguard run never said READY=1 ({e}): {}",
                    fs::read_to_string(&stderr).unwrap_or_default()
                )
            });
            if String::from_utf8_lossy(&buf[..n]).contains("READY=1") {
                break;
            }
        }
        Daemon {
            pid,
            audit_log,
            stderr,
        }
    }

    /// Waits up to `secs` for the process we started as `pid` (a daemon) to
    /// exit; its exit code (`None`: killed by a signal).
    pub fn wait_child(&mut self, pid: u32, secs: u64) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let child = self
            .children
            .iter_mut()
            .find(|c| c.id() == pid)
            .expect("a process this sandbox started");
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "pid {pid} still runs after {secs} s"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs the probe as `user` in our namespace and cgroup; returns what it
    /// printed and its pid.
    pub fn probe_with_pid(&self, user: Option<&TestUser>, args: &[&str]) -> (String, u32) {
        let out = run(&mut self.probe_cmd(user, args));
        assert!(
            out.status.success(),
            "probe {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pid = String::from_utf8_lossy(&out.stderr)
            .lines()
            .find_map(|l| l.strip_prefix("pid=").and_then(|p| p.trim().parse().ok()))
            .expect("probe prints its pid");
        (String::from_utf8_lossy(&out.stdout).trim().to_string(), pid)
    }

    /// Waits until something accepts TCP connections on `addr` in our
    /// namespace (probed as root, which no test policy denies... unless it
    /// does: call before applying).
    pub fn wait_listening(&self, addr: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = run(&mut self.probe_cmd_outside(None, &["tcp-to", addr]));
            if String::from_utf8_lossy(&out.stdout).contains("connect=ok") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nothing listens on {addr} after 10 s"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Everything of this instance the kernel and filesystem hold.
    pub fn leftovers(&self) -> Vec<String> {
        let mut found = Vec::new();
        let pins = Path::new("/sys/fs/bpf").join(&self.instance);
        if pins.exists() {
            found.push(format!("pins at {}", pins.display()));
        }
        let state = Path::new("/run/loopguard").join(&self.instance);
        if state.exists() {
            found.push(format!("state at {}", state.display()));
        }
        let good = Path::new("/var/lib/loopguard").join(&self.instance);
        if good.exists() {
            found.push(format!("last known good at {}", good.display()));
        }
        if self.netns_path.exists() {
            let table = run(Command::new("nsenter")
                .arg(format!("--net={}", self.netns_path.display()))
                .args(["nft", "list", "table", "inet", &self.instance]));
            if table.status.success() {
                found.push(format!("nftables table inet {}", self.instance));
            }
        }
        let attached = attached_programs(&self.cgroup);
        if !attached.is_empty() {
            found.push(format!(
                "programs attached to {}: {attached:?}",
                self.cgroup.display()
            ));
        }
        found
    }

    fn teardown(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
        let pins = Path::new("/sys/fs/bpf").join(&self.instance);
        let removed = if self.netns_path.exists() {
            // --force: a daemon of a test that failed may still hold the
            // instance.
            Some(run(Command::new("nsenter")
                .arg(format!("--net={}", self.netns_path.display()))
                .arg(loopguard_bin())
                .args(["--instance", &self.instance, "remove", "--force"])))
        } else if pins.exists() {
            Some(run(Command::new(loopguard_bin()).args([
                "--instance",
                &self.instance,
                "remove",
                "--force",
            ])))
        } else {
            // Nothing of ours outside a namespace: the host's own nftables
            // are never touched.
            None
        };
        if let Some(removed) = removed.filter(|r| !r.status.success()) {
            // A leftover of a run that was killed, whose namespace is gone
            // (remove refuses another namespace's instance): its table went
            // with the namespace; unpinning detaches the programs.
            eprintln!(
                "teardown of {}: remove failed ({}); deleting its pins and state",
                self.instance,
                String::from_utf8_lossy(&removed.stderr).trim()
            );
            let _ = fs::remove_dir_all(&pins);
            let _ = fs::remove_dir_all(Path::new("/run/loopguard").join(&self.instance));
        }
        let _ = fs::remove_dir_all(Path::new("/var/lib/loopguard").join(&self.instance));
        if self.cgroup.exists() {
            remove_cgroup(&self.cgroup);
        }
        if self.netns_path.exists() {
            let _ = run(Command::new("ip").args(["netns", "del", &self.netns]));
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Sandbox {
    /// What a reboot does to an instance: the kernel objects (pins, links,
    /// the table) and /run are gone; /var/lib (the last known good) stays.
    pub fn reboot(&self) {
        let pins = Path::new("/sys/fs/bpf").join(&self.instance);
        if pins.exists() {
            // Unpinning the links detaches the programs.
            fs::remove_dir_all(&pins).expect("unpin");
        }
        let _ = self.in_netns(&["nft", "delete", "table", "inet", &self.instance]);
        let _ = fs::remove_dir_all(Path::new("/run/loopguard").join(&self.instance));
    }
}

/// Kills every process in a cgroup and below, then removes the cgroups,
/// deepest first (a test's own child cgroups included).
pub fn remove_cgroup(cgroup: &Path) {
    if let Ok(entries) = fs::read_dir(cgroup) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&e.path());
            }
        }
    }
    if let Ok(procs) = fs::read_to_string(cgroup.join("cgroup.procs")) {
        for pid in procs
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
        }
    }
    for _ in 0..50 {
        if fs::remove_dir(cgroup).is_ok() || !cgroup.exists() {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// A `loopguard run` started by [`Sandbox::start_daemon`].
pub struct Daemon {
    pub pid: u32,
    pub audit_log: PathBuf,
    pub stderr: PathBuf,
}

impl Daemon {
    /// Every JSON record in the audit log so far.
    pub fn events(&self) -> Vec<serde_json::Value> {
        fs::read_to_string(&self.audit_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Polls the daemon's log until it contains `line` (or panics after
    /// `secs` seconds, with the log's tail).
    pub fn wait_log(&self, line: &str, secs: u64, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !self.log().contains(line) {
            assert!(
                Instant::now() < deadline,
                "{what}: {line:?} not logged in {secs} s; {}",
                tail(&self.log(), 2000)
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls the audit log until `pred` holds for the events (or panics
    /// after `secs` seconds).
    pub fn wait_events(
        &self,
        secs: u64,
        what: &str,
        pred: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let events = self.events();
            if pred(&events) {
                return events;
            }
            assert!(
                Instant::now() < deadline,
                "{what} not seen in {secs} s; {} events, the last ones: {:?}",
                events.len(),
                &events[events.len().saturating_sub(3)..]
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the daemon process has exited (killed, aborted).
    pub fn wait_exit(&self, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            // A dead child not yet reaped is a zombie: state `Z`.
            let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap_or_default();
            let state = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.chars().next());
            if matches!(state, None | Some('Z') | Some('X')) {
                return;
            }
            assert!(Instant::now() < deadline, "the daemon is still running");
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), sig)
            .expect("signal daemon");
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Peak resident memory (VmHWM) in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        fs::read_to_string(format!("/proc/{}/status", self.pid))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
            .unwrap_or(0)
    }
}

/// Runs a probe command; returns what it printed (a failed probe is a
/// failed test).
fn probe_output(mut cmd: Command, args: &[&str]) -> String {
    let out = run(&mut cmd);
    assert!(
        out.status.success(),
        "probe {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Waits for a background probe and returns what it printed.
pub fn wait_probe(child: Child) -> String {
    let out = child.wait_with_output().expect("wait probe");
    assert!(
        out.status.success(),
        "probe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The programs attached to a cgroup, as `bpftool cgroup show` lists them.
fn cgroup_programs(cgroup: &Path) -> Vec<serde_json::Value> {
    if !cgroup.exists() {
        return Vec::new();
    }
    let out = run(Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cgroup));
    match serde_json::from_slice(&out.stdout) {
        Ok(serde_json::Value::Array(programs)) => programs,
        _ => Vec::new(),
    }
}

/// Ids of the programs attached to a cgroup.
pub fn attached_program_ids(cgroup: &Path) -> Vec<u64> {
    cgroup_programs(cgroup)
        .iter()
        .filter_map(|p| p.get("id").and_then(serde_json::Value::as_u64))
        .collect()
}

/// Names of the programs attached to a cgroup.
pub fn attached_programs(cgroup: &Path) -> Vec<String> {
    cgroup_programs(cgroup)
        .iter()
        .filter_map(|p| p.get("name").and_then(|n| n.as_str()).map(String::from))
        .collect()
}
