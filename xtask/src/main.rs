//! `cargo xtask`: what a fresh Debian 12 root machine needs to build, test
//! and demonstrate loopguard. Every step is idempotent: it checks first and
//! installs only what is missing.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

mod bench;
mod dist;
mod qemu;
mod systemd_vm;
mod vm;

/// What a task needs installed; each task installs only its own list,
/// says what before installing, and never removes a package.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Need {
    /// Building: the eBPF toolchain (LLVM 22 for bpf-linker).
    Build,
    /// The integration tests: nft, bpftool (attachments are inspected),
    /// iproute2 and util-linux (namespaces), passwd (test users and
    /// groups), redis (the end-to-end test).
    Test,
    /// The demo: a real Redis behind loopguard.
    Demo,
    /// The kernel matrix: Debian kernels under qemu from a busybox
    /// initramfs.
    Vm,
    /// The benchmark: classic iptables owner rules for comparison.
    Bench,
    /// `dist --check`: a Python virtualenv for kubernetes-validate, and
    /// promtool (Debian's prometheus) for the alert rules.
    Dist,
    /// `vm-test --systemd`: debootstrap for the guest's root file system,
    /// what `dist` needs to build the .deb (gzip for man pages), and
    /// shellcheck for the guest's check script.
    SystemdVm,
}

impl Need {
    fn packages(self) -> &'static [&'static str] {
        match self {
            Need::Build => &["llvm-22-dev", "libpolly-22-dev"],
            Need::Test => &[
                "nftables",
                "bpftool",
                "iproute2",
                "util-linux",
                "passwd",
                "redis-server",
                "redis-tools",
                // The clients whose words on EPERM the README quotes.
                "curl",
                "python3",
                "postgresql-client",
            ],
            Need::Demo => &[
                "nftables",
                "bpftool",
                "iproute2",
                "util-linux",
                "redis-server",
                "redis-tools",
            ],
            // qemu-system-x86 too, chosen to fit the installed qemu
            // packages: see `qemu`.
            Need::Vm => &[
                "busybox-static",
                "cpio",
                "kmod",
                "xz-utils",
                "zstd",
                "binutils",
            ],
            Need::Bench => &["nftables", "iptables", "iproute2", "util-linux", "passwd"],
            // prometheus: promtool, for the alert rules' unit tests.
            Need::Dist => &["python3-venv", "prometheus"],
            Need::SystemdVm => &["debootstrap", "cpio", "kmod", "gzip", "shellcheck"],
        }
    }
}

/// Accounts the integration tests create; removed after `test`.
const TEST_USERS: &[&str] = &[
    "lgt-alice",
    "lgt-bob",
    "lgt-carol",
    "lgt-dave",
    "lgt-gone",
    "lgt-late",
    "lgt-gone2",
];
const TEST_GROUPS: &[&str] = &[
    "lgt-alice",
    "lgt-bob",
    "lgt-carol",
    "lgt-devs",
    "lgt-gone",
    "lgt-late",
    "lgt-gone2",
];

#[derive(Parser)]
#[command(about = "loopguard's development tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (apt packages, rust-src for
    /// nightly, bpf-linker against LLVM 22). Idempotent.
    Setup,
    /// Setup, then build and run the whole test suite (unit, snapshot and
    /// real-kernel integration tests). Needs root.
    Test {
        /// Extra arguments for the test binaries, e.g. a test name filter.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Setup, then run the real-kernel integration tests on Debian 12's
    /// kernels booted in qemu (software emulation), and/or on the host.
    VmTest {
        /// 6.1, 6.12, host, all, or a comma-separated list (6.1,6.12).
        #[arg(long, default_value = "6.1")]
        kernel: String,
        /// Instead of the test suite: boot a Debian 12 root file system
        /// (debootstrap, cached) with systemd as PID 1 on one matrix kernel
        /// and check the .deb and its unit as an operator would.
        #[arg(long)]
        systemd: bool,
    },
    /// Measure loopguard against no filter and hand-written nftables rules
    /// (root; minutes, or under one with --quick).
    Bench {
        /// Smallest size, fewer rounds: checks the harness, under a minute.
        #[arg(long)]
        quick: bool,
        /// Policy sizes (services) to measure, e.g. `10000` to check one
        /// target without the others [default: 1,100,10000; --quick: 1].
        #[arg(long, value_delimiter = ',', value_name = "N,...")]
        sizes: Vec<usize>,
    },
    /// Fuzz the policy reader, validator and compiler (cargo fuzz,
    /// libFuzzer) for --time seconds, seeded with examples/ and the bad
    /// policies; installs cargo-fuzz when missing. A crash fails, leaving
    /// its input in fuzz/artifacts/policy/.
    Fuzz {
        #[arg(long, default_value_t = 60, value_name = "SECONDS")]
        time: u64,
    },
    /// Build the release binary, man pages (clap_mangen), shell completions
    /// (clap_complete) and a .deb (cargo-deb, installed when missing) into
    /// target/dist/. `--check` (root) then installs the .deb, checks what
    /// it put in place, purges it and checks nothing is left.
    Dist {
        #[arg(long)]
        check: bool,
    },
    /// Setup, then show loopguard refusing and allowing real connections to
    /// a real Redis, inside a network namespace and child cgroup it creates
    /// and removes. Needs root.
    Demo,
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::Setup => setup(&[
            Need::Build,
            Need::Test,
            Need::Demo,
            Need::Vm,
            Need::Bench,
            Need::Dist,
            Need::SystemdVm,
        ]),
        Task::Test { args } => {
            setup(&[Need::Build, Need::Test])?;
            test(&args)
        }
        Task::VmTest {
            kernel,
            systemd: true,
        } => {
            setup(&[Need::Build, Need::Test, Need::Vm, Need::SystemdVm])?;
            let release = systemd_vm::systemd_test(&kernel)?;
            println!("systemd checks: pass ({release})");
            Ok(())
        }
        Task::VmTest {
            kernel,
            systemd: false,
        } => {
            setup(&[Need::Build, Need::Test, Need::Vm])?;
            vm::vm_test(&kernel)
        }
        Task::Bench { quick, sizes } => {
            setup(&[Need::Build, Need::Bench])?;
            bench::bench(quick, &sizes)
        }
        Task::Demo => {
            setup(&[Need::Build, Need::Demo])?;
            demo()
        }
        Task::Fuzz { time } => fuzz(time),
        Task::Dist { check } => {
            setup(&[Need::Build, Need::Dist])?;
            dist::dist(check)
        }
    }
}

/// Builds the loopguard and lg-probe binaries (debug or release).
fn build_bins(root: &Path, release: bool) -> Result<()> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root).arg("build");
    if release {
        cmd.arg("--release");
    }
    status(cmd.args(["-p", "loopguard", "-p", "loopguard-tests", "--bins"]))
}

/// Root of the cgroup v2 hierarchy.
fn cgroup2_root() -> Result<PathBuf> {
    std::fs::read_to_string("/proc/mounts")?
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
        })
        .min_by_key(|p| p.as_os_str().len())
        .context("no cgroup v2 hierarchy is mounted")
}

/// Creates a login-less system user (and its group) unless it exists.
fn ensure_system_user(name: &str) -> Result<()> {
    if succeeds(Command::new("id").arg("-u").arg(name)) {
        return Ok(());
    }
    status(Command::new("useradd").args([
        "--system",
        "--user-group",
        "--no-create-home",
        "--shell",
        "/usr/sbin/nologin",
        name,
    ]))
}

/// Kills what is left in a child cgroup and removes it.
fn remove_cgroup(cgroup: &Path) {
    if let Ok(procs) = std::fs::read_to_string(cgroup.join("cgroup.procs")) {
        for pid in procs.split_whitespace() {
            let _ = succeeds(Command::new("kill").args(["-9", pid]));
        }
    }
    for _ in 0..50 {
        if !cgroup.exists() || std::fs::remove_dir(cgroup).is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `cargo fuzz run policy` for `secs` seconds, on nightly (rust-src is
/// not needed: libFuzzer builds for the host).
fn fuzz(secs: u64) -> Result<()> {
    let root = workspace_root();
    if !succeeds(Command::new("cargo").args(["fuzz", "--version"])) {
        status(Command::new("cargo").args(["install", "--locked", "cargo-fuzz"]))?;
    }
    // The corpus starts from every policy the project has, good and bad.
    let corpus = root.join("fuzz/corpus/policy");
    std::fs::create_dir_all(&corpus)?;
    for dir in ["examples", "loopguard/tests/bad"] {
        for entry in std::fs::read_dir(root.join(dir))?.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "toml") {
                let name = format!(
                    "seed-{}-{}",
                    dir.replace('/', "-"),
                    entry.file_name().to_string_lossy()
                );
                std::fs::copy(&path, corpus.join(name))?;
            }
        }
    }
    status(
        Command::new("cargo")
            .current_dir(&root)
            .args(["+nightly", "fuzz", "run", "policy"])
            .arg(&corpus)
            .args([
                "--",
                &format!("-max_total_time={secs}"),
                "-timeout=10",
                "-rss_limit_mb=2048",
                "-max_len=262144",
                "-print_final_stats=1",
            ]),
    )
    .context("the fuzzer found a crash: its input is in fuzz/artifacts/policy/; make it a regression test in loopguard/tests/fuzz/")
}

pub(crate) fn status(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let s = cmd
        .status()
        .with_context(|| format!("failed to start {cmd:?}"))?;
    if !s.success() {
        bail!("{cmd:?} failed with {s}");
    }
    Ok(())
}

pub(crate) fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub(crate) fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn setup(needs: &[Need]) -> Result<()> {
    let mut missing: Vec<&str> = needs
        .iter()
        .flat_map(|n| n.packages().iter().copied())
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    missing.sort_unstable();
    missing.dedup();
    if !missing.is_empty() {
        if !is_root() {
            bail!("missing Debian packages {missing:?}; run as root to install them");
        }
        eprintln!(
            "xtask: installing {} (apt-get, never removing a package)",
            missing.join(", ")
        );
        status(Command::new("apt-get").args(["update", "-q"]))?;
        status(
            Command::new("apt-get")
                // --no-remove: abort rather than remove anything installed.
                .args([
                    "install",
                    "-y",
                    "-q",
                    "--no-install-recommends",
                    "--no-remove",
                ])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }

    if needs.contains(&Need::Vm) {
        if !is_root() && !succeeds(Command::new("qemu-system-x86_64").arg("--version")) {
            bail!("qemu-system-x86 is missing; run as root to install it");
        }
        qemu::ensure()?;
    }

    let has_rust_src = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.starts_with("rust-src"))
        });
    if !has_rust_src {
        status(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    if !succeeds(Command::new("bpf-linker").arg("--version")) {
        status(
            Command::new("cargo")
                .args([
                    "install",
                    "--locked",
                    "bpf-linker",
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ])
                .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
        )?;
    }
    eprintln!("xtask: setup complete ({needs:?}: apt packages, rust-src for nightly, bpf-linker)");
    Ok(())
}

const TEST_PACKAGES: &[&str] = &[
    "-p",
    "loopguard",
    "-p",
    "loopguard-common",
    "-p",
    "loopguard-tests",
    "-p",
    "xtask",
];

fn test(args: &[String]) -> Result<()> {
    if !is_root() {
        bail!("the integration tests need root: they attach eBPF programs under child cgroups and create namespaces and users");
    }
    let root = workspace_root();
    status(
        Command::new("cargo")
            .current_dir(&root)
            .arg("build")
            .args(TEST_PACKAGES)
            .arg("--bins"),
    )?;
    // As many tests at a time as the machine has cores.
    let threads = std::thread::available_parallelism().map_or(2, usize::from);
    let result = status(
        Command::new("cargo")
            .current_dir(&root)
            .arg("test")
            .args(TEST_PACKAGES)
            .arg("--")
            .arg(format!("--test-threads={threads}"))
            .args(args),
    );
    remove_test_accounts();
    result
}

fn remove_test_accounts() {
    for u in TEST_USERS {
        if succeeds(Command::new("id").arg("-u").arg(u)) {
            let _ = succeeds(Command::new("userdel").arg(u));
        }
    }
    for g in TEST_GROUPS {
        if succeeds(Command::new("getent").args(["group", g])) {
            let _ = succeeds(Command::new("groupdel").arg(g));
        }
    }
}

fn demo() -> Result<()> {
    if !is_root() {
        bail!("the demo needs root: it loads eBPF programs into a child cgroup");
    }
    let root = workspace_root();
    build_bins(&root, false)?;
    // Dropping the demo removes what it made, whether or not a step failed.
    Demo::new(&root)?.run()
}

/// A network namespace, child cgroup, instance and two users, removed on
/// drop (also when a step failed).
struct Demo {
    loopguard: PathBuf,
    probe: PathBuf,
    netns: &'static str,
    cgroup: PathBuf,
    dir: PathBuf,
    redis: Option<std::process::Child>,
}

const DEMO_INSTANCE: &str = "lg-demo";
const DEMO_USERS: [&str; 2] = ["lg-demo-app", "lg-demo-guest"];

impl Demo {
    fn new(root: &Path) -> Result<Demo> {
        let cgroup_root = cgroup2_root()?;
        let demo = Demo {
            loopguard: root.join("target/debug/loopguard"),
            probe: root.join("target/debug/lg-probe"),
            netns: DEMO_INSTANCE,
            cgroup: cgroup_root.join("lg-demo.scope"),
            dir: std::env::temp_dir().join("lg-demo"),
            redis: None,
        };
        demo.cleanup();
        for u in DEMO_USERS {
            ensure_system_user(u)?;
        }
        status(Command::new("ip").args(["netns", "add", demo.netns]))?;
        status(Command::new("ip").args(["-n", demo.netns, "link", "set", "lo", "up"]))?;
        std::fs::create_dir_all(&demo.cgroup)
            .with_context(|| format!("create {}", demo.cgroup.display()))?;
        std::fs::create_dir_all(&demo.dir)?;
        Ok(demo)
    }

    fn in_netns(&self, program: &Path) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.netns))
            .arg(program);
        c
    }

    fn loopguard(&self, args: &[&str]) -> Result<()> {
        let mut c = self.in_netns(&self.loopguard);
        c.args(["--instance", DEMO_INSTANCE]).args(args);
        println!("\n$ loopguard {}", args.join(" "));
        let s = c.status()?;
        if !s.success() {
            bail!("loopguard {args:?} failed with {s}");
        }
        Ok(())
    }

    /// redis-cli as `user`, from inside the guarded cgroup.
    fn redis_cli(&self, user: &str, host: &str) -> Result<()> {
        let uid = id(user, "-u")?;
        let gid = id(user, "-g")?;
        println!("\n$ sudo -u {user} redis-cli -h {host} -p 6379 PING");
        let out = Command::new(&self.probe)
            .args(["--netns", &format!("/run/netns/{}", self.netns)])
            .arg("--cgroup")
            .arg(&self.cgroup)
            .args([
                "--uid",
                &uid,
                "--gid",
                &gid,
                "exec",
                "redis-cli",
                "-h",
                host,
                "-p",
                "6379",
                "PING",
            ])
            .output()?;
        print!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    fn run(mut self) -> Result<()> {
        println!("== loopguard demo: a Redis on 127.0.0.1:6379 that only lg-demo-app may reach");
        println!(
            "   (network namespace {}, cgroup {})",
            self.netns,
            self.cgroup.display()
        );
        let redis = self
            .in_netns(Path::new("redis-server"))
            .args([
                "--bind",
                "127.0.0.1 ::1",
                "--port",
                "6379",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("start redis-server")?;
        self.redis = Some(redis);
        std::thread::sleep(std::time::Duration::from_millis(500));

        println!("\nBefore: \"bound to localhost\" is no access control; both users get in.");
        self.redis_cli("lg-demo-app", "127.0.0.1")?;
        self.redis_cli("lg-demo-guest", "127.0.0.1")?;

        let policy = self.dir.join("policy.toml");
        std::fs::write(
            &policy,
            "version = 1\n\n[[service]]\nname = \"redis\"\nport = 6379\nallow_users = [\"lg-demo-app\"]\n",
        )?;
        println!("\n$ cat {}", policy.display());
        print!("{}", std::fs::read_to_string(&policy)?);
        let policy = policy.to_string_lossy().into_owned();
        let cgroup = self.cgroup.to_string_lossy().into_owned();
        self.loopguard(&["check", &policy])?;
        self.loopguard(&["apply", &policy, "--cgroup", &cgroup])?;

        println!(
            "\nAfter: the guest gets EPERM on every route to the service; the app still gets in."
        );
        self.redis_cli("lg-demo-app", "127.0.0.1")?;
        self.redis_cli("lg-demo-guest", "127.0.0.1")?;
        self.redis_cli("lg-demo-guest", "::1")?;
        self.redis_cli("lg-demo-guest", "127.0.0.2")?;
        self.loopguard(&[
            "explain",
            "--user",
            "lg-demo-guest",
            "--to",
            "127.0.0.1:6379",
        ])?;
        self.loopguard(&["status"])?;
        self.loopguard(&["remove"])?;
        println!(
            "\nRemoved: nothing of loopguard is left; the demo namespace, cgroup and users go too."
        );
        Ok(())
    }

    fn cleanup(&self) {
        if Path::new("/run/netns").join(self.netns).exists() {
            let mut c = self.in_netns(&self.loopguard);
            let _ = succeeds(c.args(["--instance", DEMO_INSTANCE, "remove"]));
            let _ = succeeds(Command::new("ip").args(["netns", "del", self.netns]));
        }
        remove_cgroup(&self.cgroup);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Some(mut r) = self.redis.take() {
            let _ = r.kill();
            let _ = r.wait();
        }
        self.cleanup();
        for u in DEMO_USERS {
            let _ = succeeds(Command::new("userdel").arg(u));
        }
    }
}

fn id(user: &str, flag: &str) -> Result<String> {
    let o = Command::new("id").arg(flag).arg(user).output()?;
    if !o.status.success() {
        bail!("no user {user}");
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}
