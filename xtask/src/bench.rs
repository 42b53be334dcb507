//! `cargo xtask bench`: loopguard against no filter and hand-written rules,
//! measured in one run, with load only on loopback and every loop bounded.
//!
//! Each configuration lives in a network namespace and child cgroup of its
//! own, configured once per policy size, so samples of all configurations
//! interleave (one metric at a time, the order rotating every round)
//! without reconfiguring anything between them: drift and noise fall on
//! all of them alike. Each rate is the median of the rounds; each ratio is
//! the median of the rounds' ratios to the baseline sample of the same
//! round. Results: a table on the terminal and target/bench/results.json.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde_json::json;

use crate::{status, succeeds, workspace_root};

const OK_USER: &str = "lg-bench-ok";
const NO_USER: &str = "lg-bench-no";
/// The measured service (last in file order) covers PORT (connects are
/// accepted and closed at once) and PORT + 1 (a sink for the stream test).
const PORT: u16 = 9000;
/// Classic iptables (Debian 12's `iptables` is the nftables-backed one,
/// which would measure nftables again).
const IPTABLES: &str = "iptables-legacy";
/// iptables has no uid sets: one rule per service and uid, walked in
/// order. Past this many services (100 rules each) every packet walks
/// ~100,000 rules, so larger sizes are measured with this many.
const IPTABLES_CAP: usize = 1_000;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Config {
    Baseline,
    Bpf,
    Both,
    HandNft,
    Iptables,
}

impl Config {
    const ALL: [Config; 5] = [
        Config::Baseline,
        Config::Bpf,
        Config::Both,
        Config::HandNft,
        Config::Iptables,
    ];

    fn name(self) -> &'static str {
        match self {
            Config::Baseline => "baseline",
            Config::Bpf => "loopguard bpf",
            Config::Both => "loopguard both",
            Config::HandNft => "hand-written nft",
            Config::Iptables => "iptables owner",
        }
    }

    /// Names its namespace, cgroup and loopguard instance.
    fn slug(self) -> &'static str {
        match self {
            Config::Baseline => "lg-bench-base",
            Config::Bpf => "lg-bench-bpf",
            Config::Both => "lg-bench-both",
            Config::HandNft => "lg-bench-nft",
            Config::Iptables => "lg-bench-ipt",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Metric {
    Connect,
    Refused,
    Stream,
    Udp,
}

impl Metric {
    const ALL: [Metric; 4] = [
        Metric::Connect,
        Metric::Refused,
        Metric::Stream,
        Metric::Udp,
    ];

    fn key(self) -> &'static str {
        match self {
            Metric::Connect => "connect_per_s",
            Metric::Refused => "refused_per_s",
            Metric::Stream => "stream_mib_per_s",
            Metric::Udp => "udp_per_s",
        }
    }
}

struct Sizes {
    connects: u64,
    stream_mb: u64,
    datagrams: u64,
    rounds: usize,
    sizes: Vec<usize>,
    flood: u64,
}

struct Bench {
    root: PathBuf,
    lg: PathBuf,
    probe: PathBuf,
    cgroup_root: PathBuf,
    dir: PathBuf,
    ok: (u32, u32),
    no: (u32, u32),
    configs: Vec<Config>,
    servers: Vec<Child>,
    /// The CPU every server and probe runs on. Client and server on one
    /// CPU measure the work per connection, steadily (±2% from sample to
    /// sample here); left to the scheduler, the same rate moves by ±20%
    /// with where wakeups land.
    cpu: String,
}

fn id(user: &str, flag: &str) -> Result<u32> {
    let o = Command::new("id").arg(flag).arg(user).output()?;
    String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .with_context(|| format!("id {flag} {user}"))
}

fn field(out: &str, key: &str) -> Option<u64> {
    out.split_whitespace().find_map(|f| {
        f.strip_prefix(&format!("{key}="))
            .and_then(|v| v.parse().ok())
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The policy of one size, three ways.
struct PolicyFiles {
    toml: PathBuf,
    nft: PathBuf,
    iptables: PathBuf,
}

impl Bench {
    fn new(root: &Path, configs: Vec<Config>) -> Result<Bench> {
        for u in [OK_USER, NO_USER] {
            crate::ensure_system_user(u)?;
        }
        let b = Bench {
            root: root.to_path_buf(),
            lg: root.join("target/release/loopguard"),
            probe: root.join("target/release/lg-probe"),
            cgroup_root: crate::cgroup2_root()?,
            dir: root.join("target/bench"),
            ok: (id(OK_USER, "-u")?, id(OK_USER, "-g")?),
            no: (id(NO_USER, "-u")?, id(NO_USER, "-g")?),
            configs,
            servers: Vec::new(),
            cpu: std::thread::available_parallelism()
                .map_or(0, |n| n.get() - 1)
                .to_string(),
        };
        b.cleanup();
        fs::create_dir_all(&b.dir)?;
        for &c in &b.configs {
            status(Command::new("ip").args(["netns", "add", c.slug()]))?;
            status(Command::new("ip").args(["-n", c.slug(), "link", "set", "lo", "up"]))?;
            fs::create_dir_all(b.cgroup(c))?;
        }
        Ok(b)
    }

    fn netns(c: Config) -> String {
        format!("/run/netns/{}", c.slug())
    }

    fn cgroup(&self, c: Config) -> PathBuf {
        self.cgroup_root.join(format!("{}.scope", c.slug()))
    }

    /// The listeners of every configuration's namespace.
    fn start_servers(&mut self) -> Result<()> {
        for &c in &self.configs {
            for (action, port) in [("listen", PORT), ("sink", PORT + 1), ("udp-sink", PORT)] {
                let child = self
                    .pinned_probe()
                    .args(["--netns", &Self::netns(c), action, &port.to_string()])
                    .stdout(Stdio::null())
                    .spawn()?;
                self.servers.push(child);
            }
        }
        std::thread::sleep(Duration::from_millis(300));
        Ok(())
    }

    fn pinned_probe(&self) -> Command {
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", &self.cpu]).arg(&self.probe);
        cmd
    }

    /// The probe as a user, in the configuration's namespace and cgroup.
    fn probe(&self, c: Config, user: (u32, u32), args: &[&str]) -> Result<String> {
        let out = self
            .pinned_probe()
            .args(["--netns", &Self::netns(c)])
            .arg("--cgroup")
            .arg(self.cgroup(c))
            .args(["--uid", &user.0.to_string(), "--gid", &user.1.to_string()])
            .args(args)
            .stderr(Stdio::null())
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// loopguard in the configuration's namespace, as its instance.
    fn lg(&self, c: Config, args: &[&str]) -> Result<(bool, String)> {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", Self::netns(c)))
            .arg(&self.lg)
            .args(["--instance", c.slug()])
            .args(args)
            .output()?;
        Ok((
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ))
    }

    fn apply(&self, c: Config, policy: &Path, layers: &str) -> Result<()> {
        let cg = self.cgroup(c).to_string_lossy().into_owned();
        let (ok, out) = self.lg(
            c,
            &[
                "apply",
                &policy.to_string_lossy(),
                "--cgroup",
                &cg,
                "--layers",
                layers,
                "--force",
            ],
        )?;
        if !ok {
            bail!("apply failed: {out}");
        }
        Ok(())
    }

    /// N services (the measured one last, on PORT, tcp+udp), each allowing
    /// 100 uids; services come in 100 teams that share a uid list.
    fn policy(&self, n: usize, variant: u32) -> Result<PolicyFiles> {
        let mut toml = String::from("version = 1\n");
        // The way an operator writes it: one rule per service, its uids as
        // an anonymous set.
        let mut nft = String::from(
            "table inet hand {\n chain out {\n  type filter hook output priority 0; policy accept;\n",
        );
        // And as iptables rules, the measured service last too, capped at
        // IPTABLES_CAP services.
        let mut ipt = String::from("*filter\n:hand - [0:0]\n-A OUTPUT -j hand\n");
        let ipt_from = n.saturating_sub(IPTABLES_CAP);
        let team = |i: usize| -> Vec<u32> {
            (0..100)
                .map(|k| 30_000 + (i % 100) as u32 * 100 + k)
                .collect()
        };
        for i in 0..n {
            let last = i + 1 == n;
            let (port, uids) = if last {
                let mut u: Vec<u32> = (0..99).map(|k| 40_000 + k).collect();
                u.push(self.ok.0);
                u[0] += variant;
                (format!("{PORT}-{}", PORT + 1), u)
            } else {
                ((10_000 + i).to_string(), team(i))
            };
            let list = uids
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            toml.push_str(&format!(
                "[[service]]\nname = \"s{i}\"\nport = \"{port}\"\n{}allow_users = [{list}]\n",
                if last { "protocol = \"any\"\n" } else { "" }
            ));
            nft.push_str(&format!(
                "  oif \"lo\" tcp dport {port} meta skuid != {{ {list} }} reject with tcp reset\n"
            ));
            if last {
                nft.push_str(&format!(
                    "  oif \"lo\" udp dport {port} meta skuid != {{ {list} }} drop\n"
                ));
            }
            if i >= ipt_from {
                let ports = port.replace('-', ":");
                let protos: &[(&str, &str)] = if last {
                    &[("tcp", "REJECT --reject-with tcp-reset"), ("udp", "DROP")]
                } else {
                    &[("tcp", "REJECT --reject-with tcp-reset")]
                };
                for (proto, refuse) in protos {
                    for uid in &uids {
                        ipt.push_str(&format!(
                            "-A hand -o lo -p {proto} --dport {ports} -m owner --uid-owner {uid} -j ACCEPT\n"
                        ));
                    }
                    ipt.push_str(&format!(
                        "-A hand -o lo -p {proto} --dport {ports} -j {refuse}\n"
                    ));
                }
            }
        }
        nft.push_str(" }\n}\n");
        ipt.push_str("COMMIT\n");
        let files = PolicyFiles {
            toml: self.dir.join(format!("policy-{n}-{variant}.toml")),
            nft: self.dir.join(format!("hand-{n}.nft")),
            iptables: self.dir.join(format!("iptables-{n}.rules")),
        };
        fs::write(&files.toml, toml)?;
        fs::write(&files.nft, nft)?;
        fs::write(&files.iptables, ipt)?;
        Ok(files)
    }

    /// Puts the configuration in force; returns how long loading took for
    /// the hand-written rulesets.
    fn configure(&self, c: Config, files: &PolicyFiles) -> Result<Option<f64>> {
        let t = Instant::now();
        match c {
            Config::Baseline => return Ok(None),
            Config::Bpf => self.apply(c, &files.toml, "bpf")?,
            Config::Both => self.apply(c, &files.toml, "both")?,
            Config::HandNft => status(
                Command::new("ip")
                    .args(["netns", "exec", c.slug(), "nft", "-f"])
                    .arg(&files.nft),
            )?,
            Config::Iptables => status(
                Command::new("ip")
                    .args(["netns", "exec", c.slug(), &format!("{IPTABLES}-restore")])
                    .stdin(fs::File::open(&files.iptables)?),
            )?,
        }
        Ok(matches!(c, Config::HandNft | Config::Iptables).then(|| t.elapsed().as_secs_f64()))
    }

    fn unconfigure(&self, c: Config) -> Result<()> {
        let in_ns = |args: &[&str]| {
            status(
                Command::new("ip")
                    .args(["netns", "exec", c.slug()])
                    .args(args),
            )
        };
        match c {
            Config::Baseline => Ok(()),
            Config::Bpf | Config::Both => self.lg(c, &["remove"]).map(drop),
            Config::HandNft => in_ns(&["nft", "delete", "table", "inet", "hand"]),
            Config::Iptables => {
                in_ns(&[IPTABLES, "-F"])?;
                in_ns(&[IPTABLES, "-X"])
            }
        }
    }

    /// One sample of one metric; `None` where it does not apply.
    fn sample(&self, c: Config, m: Metric, s: &Sizes, n: usize) -> Result<Option<f64>> {
        // iptables walks its rules for every packet: at 1,000 services a
        // connect takes ~15 ms, so it does fewer of each (a rate needs no
        // more) to keep the run bounded.
        let scale = if c == Config::Iptables {
            (n.min(IPTABLES_CAP) as u64 / 25).max(1)
        } else {
            1
        };
        let target = format!("127.0.0.1:{PORT}");
        let per_s =
            |out: &str, count: u64| field(out, "ns").map(|ns| count as f64 / (ns as f64 / 1e9));
        Ok(match m {
            Metric::Connect => {
                let count = (s.connects / scale).max(50);
                let out = self.probe(c, self.ok, &["rate", &target, &count.to_string()])?;
                if field(&out, "err") != Some(0) {
                    bail!("{}: allowed connects failed: {out}", c.name());
                }
                per_s(&out, count)
            }
            Metric::Refused if c == Config::Baseline => None,
            Metric::Refused => {
                let count = (s.connects / scale).max(50);
                let out = self.probe(c, self.no, &["rate", &target, &count.to_string()])?;
                if field(&out, "ok") != Some(0) {
                    bail!("{}: the denied user got through: {out}", c.name());
                }
                per_s(&out, count)
            }
            Metric::Stream => {
                let mb = (s.stream_mb / scale).max(8);
                let sink = format!("127.0.0.1:{}", PORT + 1);
                let out = self.probe(c, self.ok, &["stream", &sink, &mb.to_string()])?;
                per_s(&out, mb)
            }
            Metric::Udp => {
                let count = (s.datagrams / scale).max(500);
                let out = self.probe(c, self.ok, &["udp-rate", &target, &count.to_string()])?;
                per_s(&out, count)
            }
        })
    }

    fn cleanup(&self) {
        for c in Config::ALL {
            let _ = Command::new("nsenter")
                .arg(format!("--net={}", Self::netns(c)))
                .arg(&self.lg)
                .args(["--instance", c.slug(), "remove"])
                .output();
            let _ = succeeds(Command::new("ip").args(["netns", "del", c.slug()]));
            crate::remove_cgroup(&self.cgroup(c));
        }
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        self.cleanup();
        for u in [OK_USER, NO_USER] {
            let _ = succeeds(Command::new("userdel").arg(u));
        }
    }
}

pub(crate) fn bench(quick: bool, sizes: &[usize]) -> Result<()> {
    let root = workspace_root();
    crate::build_bins(&root, true)?;
    let mut s = if quick {
        Sizes {
            connects: 500,
            stream_mb: 64,
            datagrams: 5_000,
            rounds: 3,
            sizes: vec![1],
            flood: 20_000,
        }
    } else {
        Sizes {
            connects: 2_000,
            stream_mb: 1024,
            datagrams: 20_000,
            rounds: 9,
            sizes: vec![1, 100, 10_000],
            flood: 100_000,
        }
    };
    if !sizes.is_empty() {
        s.sizes = sizes.to_vec();
    }
    let have_iptables = succeeds(Command::new(IPTABLES).arg("--version"));
    if !have_iptables {
        eprintln!("xtask: {IPTABLES} not found: the iptables configuration is skipped (cargo xtask setup installs it)");
    }
    let configs: Vec<Config> = Config::ALL
        .into_iter()
        .filter(|c| *c != Config::Iptables || have_iptables)
        .collect();
    let mut b = Bench::new(&root, configs.clone())?;
    b.start_servers()?;
    // (size, config, metric) -> samples
    let mut samples: BTreeMap<(usize, Config, Metric), Vec<f64>> = BTreeMap::new();
    let mut load_s: BTreeMap<(Config, usize), f64> = BTreeMap::new();
    for &n in &s.sizes {
        let files = b.policy(n, 0)?;
        for &c in &configs {
            if let Some(secs) = b.configure(c, &files)? {
                let loaded = if c == Config::Iptables {
                    n.min(IPTABLES_CAP)
                } else {
                    n
                };
                load_s.insert((c, loaded), secs);
            }
        }
        // Let the kernel finish what loading left behind (freeing the
        // objects a replaced table held, RCU) before timing anything.
        std::thread::sleep(Duration::from_secs(1));
        for round in 0..s.rounds {
            eprintln!("xtask: bench size {n}, round {}/{}", round + 1, s.rounds);
            for m in Metric::ALL {
                for k in 0..configs.len() {
                    let c = configs[(k + round) % configs.len()];
                    if let Some(v) = b.sample(c, m, &s, n)? {
                        samples.entry((n, c, m)).or_default().push(v);
                    }
                }
            }
        }
        for &c in &configs {
            b.unconfigure(c)?;
        }
    }

    // apply and re-apply times, at the largest size, both layers.
    let big = *s.sizes.iter().max().unwrap_or(&1);
    let policy = b.policy(big, 0)?.toml;
    let changed = b.policy(big, 1)?.toml;
    let both = Config::Both;
    let mut apply_s = Vec::new();
    let mut reapply_s = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        b.apply(both, &policy, "both")?;
        apply_s.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        b.apply(both, &changed, "both")?;
        reapply_s.push(t.elapsed().as_secs_f64());
        b.lg(both, &["remove"])?;
    }

    // `loopguard run`: peak memory with the largest policy, and the audit
    // stream during a flood of refused connects.
    let log = b.dir.join("audit.jsonl");
    let _ = fs::remove_file(&log);
    let notify = b.dir.join("notify.sock");
    let _ = fs::remove_file(&notify);
    let sock = std::os::unix::net::UnixDatagram::bind(&notify)?;
    sock.set_read_timeout(Some(Duration::from_secs(60)))?;
    let cg = b.cgroup(both).to_string_lossy().into_owned();
    let mut daemon = Command::new("nsenter")
        .arg(format!("--net={}", Bench::netns(both)))
        .arg(&b.lg)
        .args(["--instance", both.slug(), "run"])
        .arg(&policy)
        .args(["--cgroup", &cg, "--force", "--audit-log"])
        .arg(&log)
        .env("NOTIFY_SOCKET", &notify)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let mut buf = [0u8; 64];
    sock.recv(&mut buf)
        .context("loopguard run did not become ready")?;
    let t = Instant::now();
    let target = format!("127.0.0.1:{PORT}");
    let out = b.probe(both, b.no, &["burst", &target, &s.flood.to_string()])?;
    let flood_s = t.elapsed().as_secs_f64();
    let count = || -> (u64, u64) {
        let text = fs::read_to_string(&log).unwrap_or_default();
        let delivered = text
            .lines()
            .filter(|l| l.contains("\"event.action\":\"deny\""))
            .count() as u64;
        let dropped = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["loopguard.dropped"].as_u64())
            .sum();
        (delivered, dropped)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while count().0 + count().1 < s.flood && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let (delivered, dropped) = count();
    let proc_status =
        fs::read_to_string(format!("/proc/{}/status", daemon.id())).unwrap_or_default();
    let kib = |key: &str| -> u64 {
        proc_status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
            .unwrap_or(0)
    };
    // Peak (the start, reading the policy) and now (after the flood).
    let (rss_kib, steady_kib) = (kib("VmHWM:"), kib("VmRSS:"));
    let _ = daemon.kill();
    let _ = daemon.wait();
    b.lg(both, &["remove"])?;
    if field(&out, "eperm") != Some(s.flood) {
        bail!("flood: {out}");
    }

    // Report.
    let machine = format!(
        "{} cores, {}, Linux {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l
                .strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string()))
            .unwrap_or_default(),
        String::from_utf8_lossy(&Command::new("uname").arg("-r").output()?.stdout).trim()
    );
    let mut rows = Vec::new();
    println!("\nloopguard benchmark ({machine}); medians of {} rounds; ratio: median of each round's ratio to that round's baseline", s.rounds);
    println!(
        "{:>6} {:<17} {:>14} {:>7} {:>14} {:>12} {:>7} {:>12} {:>7}",
        "size",
        "config",
        "connect/s",
        "ratio",
        "refused/s",
        "stream MiB/s",
        "ratio",
        "udp/s",
        "ratio"
    );
    for &n in &s.sizes {
        let med = |c: Config, m: Metric| {
            samples
                .get(&(n, c, m))
                .cloned()
                .map(median)
                .unwrap_or(f64::NAN)
        };
        for &c in &configs {
            let connect = med(c, Metric::Connect);
            let refused = med(c, Metric::Refused);
            let stream = med(c, Metric::Stream);
            let udp = med(c, Metric::Udp);
            // Paired: each round's sample over the baseline's of the same
            // round (taken moments apart), then the median. The machine's
            // speed drifts between rounds more than loopguard costs.
            let r = |_: f64, m: Metric| {
                let (Some(xs), Some(bs)) = (
                    samples.get(&(n, c, m)),
                    samples.get(&(n, Config::Baseline, m)),
                ) else {
                    return f64::NAN;
                };
                median(xs.iter().zip(bs).map(|(x, b)| x / b).collect())
            };
            let capped = c == Config::Iptables && n > IPTABLES_CAP;
            println!(
                "{n:>6} {:<17} {connect:>14.0} {:>7.3} {:>14} {stream:>12.0} {:>7.3} {udp:>12.0} {:>7.3}",
                if capped {
                    format!("iptables ({IPTABLES_CAP})")
                } else {
                    c.name().to_string()
                },
                r(connect, Metric::Connect),
                if refused.is_nan() { "-".to_string() } else { format!("{refused:.0}") },
                r(stream, Metric::Stream),
                r(udp, Metric::Udp),
            );
            let all = |m: Metric| samples.get(&(n, c, m));
            rows.push(json!({
                "size": n, "config": c.name(),
                "services_loaded": if c == Config::Iptables { n.min(IPTABLES_CAP) } else { n },
                "connect_per_s": connect, "connect_ratio": r(connect, Metric::Connect),
                "refused_per_s": if refused.is_nan() { serde_json::Value::Null } else { json!(refused) },
                "stream_mib_per_s": stream, "stream_ratio": r(stream, Metric::Stream),
                "udp_per_s": udp, "udp_ratio": r(udp, Metric::Udp),
                "samples": Metric::ALL.iter().map(|m| (m.key().to_string(), json!(all(*m)))).collect::<serde_json::Map<_, _>>(),
            }));
        }
    }
    let apply_med = median(apply_s.clone());
    let reapply_med = median(reapply_s.clone());
    println!("\napply {big} services from nothing: {apply_med:.3} s; re-apply after changing one service: {reapply_med:.3} s");
    for ((c, n), secs) in &load_s {
        match c {
            Config::Iptables => println!(
                "iptables owner with {n} services ({} rules): loaded in {secs:.2} s",
                n * 101
            ),
            _ => println!("{} with {n} services: loaded in {secs:.2} s", c.name()),
        }
    }
    if have_iptables && s.sizes.iter().any(|&n| n > IPTABLES_CAP) {
        println!("iptables owner is capped at {IPTABLES_CAP} services (100 rules each, walked in order); rows of larger sizes measure the cap");
    }
    println!(
        "loopguard run with {big} services: peak RSS {:.1} MiB, {:.1} MiB after the flood",
        rss_kib as f64 / 1024.0,
        steady_kib as f64 / 1024.0
    );
    println!(
        "audit flood: {} refused connects in {flood_s:.2} s ({:.0}/s); {delivered} events delivered, {dropped} reported dropped",
        s.flood,
        s.flood as f64 / flood_s
    );
    let load_json: Vec<_> = load_s
        .iter()
        .map(|((c, n), secs)| json!({"config": c.name(), "services": n, "seconds": secs}))
        .collect();
    let results = json!({
        "machine": machine,
        "quick": quick,
        "rounds": s.rounds,
        "rows": rows,
        "apply_seconds": apply_s, "apply_median_seconds": apply_med, "apply_services": big,
        "reapply_seconds": reapply_s, "reapply_median_seconds": reapply_med,
        "run_peak_rss_kib": rss_kib,
        "run_rss_after_flood_kib": steady_kib,
        "ruleset_load_seconds": load_json,
        "iptables_cap_services": IPTABLES_CAP,
        "flood": {"attempts": s.flood, "seconds": flood_s, "delivered": delivered, "dropped": dropped},
    });
    let path = b.root.join("target/bench/results.json");
    fs::write(&path, serde_json::to_string_pretty(&results)?)?;
    println!("results: {}", path.display());
    if delivered + dropped != s.flood {
        bail!(
            "audit accounting: {delivered} delivered + {dropped} dropped != {} attempts",
            s.flood
        );
    }
    Ok(())
}
