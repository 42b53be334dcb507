//! `cargo xtask bench`: loopguard against no filter and hand-written rules,
//! measured in one run, inside a network namespace and child cgroup it
//! creates, with load only on loopback and every loop bounded.
//!
//! Configurations alternate round by round so drift cancels out; each
//! figure is the median of the rounds, and ratios are to the baseline of the
//! same run. Results: a table on the terminal and target/bench/results.json.

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

const NETNS: &str = "lg-bench";
const INSTANCE: &str = "lg-bench";
const OK_USER: &str = "lg-bench-ok";
const NO_USER: &str = "lg-bench-no";
/// The measured service (last in file order) covers PORT (connects are
/// accepted and closed at once) and PORT + 1 (a sink for the stream test).
const PORT: u16 = 9000;
/// Classic iptables (Debian 12's `iptables` is the nftables-backed one,
/// which would measure nftables again).
const IPTABLES: &str = "iptables-legacy";

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Config {
    Baseline,
    Bpf,
    Both,
    HandNft,
    Iptables,
}

/// iptables has no uid sets: one rule per service and uid, walked in
/// order. Past this many services (100 rules each) loading takes many
/// seconds and each connect walks ~100,000 rules, so larger sizes are
/// measured with this many.
const IPTABLES_CAP: usize = 1_000;

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
    cgroup: PathBuf,
    dir: PathBuf,
    ok: (u32, u32),
    no: (u32, u32),
    servers: Vec<Child>,
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

impl Bench {
    fn new(root: &Path) -> Result<Bench> {
        let cgroup_root = crate::cgroup2_root()?;
        for u in [OK_USER, NO_USER] {
            crate::ensure_system_user(u)?;
        }
        let b = Bench {
            root: root.to_path_buf(),
            lg: root.join("target/release/loopguard"),
            probe: root.join("target/release/lg-probe"),
            cgroup: cgroup_root.join("lg-bench.scope"),
            dir: root.join("target/bench"),
            ok: (id(OK_USER, "-u")?, id(OK_USER, "-g")?),
            no: (id(NO_USER, "-u")?, id(NO_USER, "-g")?),
            servers: Vec::new(),
        };
        b.cleanup();
        status(Command::new("ip").args(["netns", "add", NETNS]))?;
        status(Command::new("ip").args(["-n", NETNS, "link", "set", "lo", "up"]))?;
        fs::create_dir_all(&b.cgroup)?;
        fs::create_dir_all(&b.dir)?;
        Ok(b)
    }

    fn netns(&self) -> String {
        format!("/run/netns/{NETNS}")
    }

    fn start_servers(&mut self) -> Result<()> {
        for (action, port) in [("listen", PORT), ("sink", PORT + 1), ("udp-sink", PORT)] {
            let child = Command::new(&self.probe)
                .args(["--netns", &self.netns(), action, &port.to_string()])
                .stdout(Stdio::null())
                .spawn()?;
            self.servers.push(child);
        }
        std::thread::sleep(Duration::from_millis(300));
        Ok(())
    }

    /// The probe as a user, in the namespace and cgroup.
    fn probe(&self, user: (u32, u32), args: &[&str]) -> Result<String> {
        let out = Command::new(&self.probe)
            .args(["--netns", &self.netns()])
            .arg("--cgroup")
            .arg(&self.cgroup)
            .args(["--uid", &user.0.to_string(), "--gid", &user.1.to_string()])
            .args(args)
            .stderr(Stdio::null())
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    fn lg(&self, args: &[&str]) -> Result<(bool, String)> {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", self.netns()))
            .arg(&self.lg)
            .args(["--instance", INSTANCE])
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

    fn nft(&self, script: &Path) -> Result<()> {
        status(
            Command::new("ip")
                .args(["netns", "exec", NETNS, "nft", "-f"])
                .arg(script),
        )
    }

    /// N services (the measured one last, on PORT, tcp+udp), each allowing
    /// 100 uids; services come in 100 teams that share a uid list.
    fn policy(&self, n: usize, variant: u32) -> Result<(PathBuf, PathBuf, PathBuf)> {
        let mut toml = String::from("version = 1\n");
        // The way an operator writes it: one rule per service, its uids as
        // an anonymous set, in a chain the base chain jumps to (so the
        // benchmark can switch it on and off without reloading it).
        let mut nft = String::from("table inet hand {\n chain rules {\n");
        // And as iptables rules (classic xtables: iptables-legacy), the
        // measured service last too, capped at IPTABLES_CAP services.
        let mut ipt = String::from("*filter\n:hand - [0:0]\n");
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
        nft.push_str(
            " }\n chain out {\n  type filter hook output priority 0; policy accept;\n }\n}\n",
        );
        let p = self.dir.join(format!("policy-{n}-{variant}.toml"));
        let h = self.dir.join(format!("hand-{n}.nft"));
        let i = self.dir.join(format!("iptables-{n}.rules"));
        ipt.push_str("COMMIT\n");
        fs::write(&p, toml)?;
        fs::write(&h, nft)?;
        fs::write(&i, ipt)?;
        Ok((p, h, i))
    }

    fn enable(&self, c: Config, policy: &Path) -> Result<()> {
        let cg = self.cgroup.to_string_lossy().into_owned();
        let p = policy.to_string_lossy().into_owned();
        match c {
            Config::Baseline => Ok(()),
            Config::Bpf | Config::Both => {
                let layers = if c == Config::Bpf { "bpf" } else { "both" };
                let (ok, out) =
                    self.lg(&["apply", &p, "--cgroup", &cg, "--layers", layers, "--force"])?;
                if !ok {
                    bail!("apply failed: {out}");
                }
                Ok(())
            }
            // Loaded once per size (10,000 rules take a while); enabling
            // is one jump rule.
            Config::HandNft => status(Command::new("ip").args([
                "netns", "exec", NETNS, "nft", "add", "rule", "inet", "hand", "out", "jump",
                "rules",
            ])),
            Config::Iptables => status(Command::new("ip").args([
                "netns", "exec", NETNS, IPTABLES, "-A", "OUTPUT", "-j", "hand",
            ])),
        }
    }

    fn disable(&self, c: Config) -> Result<()> {
        match c {
            Config::Baseline => Ok(()),
            Config::Bpf | Config::Both => self.lg(&["remove"]).map(drop),
            Config::HandNft => status(Command::new("ip").args([
                "netns", "exec", NETNS, "nft", "flush", "chain", "inet", "hand", "out",
            ])),
            Config::Iptables => status(Command::new("ip").args([
                "netns", "exec", NETNS, IPTABLES, "-D", "OUTPUT", "-j", "hand",
            ])),
        }
    }

    fn cleanup(&self) {
        let _ = Command::new("nsenter")
            .arg(format!("--net={}", self.netns()))
            .arg(&self.lg)
            .args(["--instance", INSTANCE, "remove"])
            .output();
        let _ = succeeds(Command::new("ip").args(["netns", "del", NETNS]));
        crate::remove_cgroup(&self.cgroup);
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

pub fn bench(quick: bool) -> Result<()> {
    let root = workspace_root();
    crate::build_bins(&root, true)?;
    let s = if quick {
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
            connects: 4_000,
            stream_mb: 512,
            datagrams: 40_000,
            rounds: 5,
            sizes: vec![1, 100, 10_000],
            flood: 100_000,
        }
    };
    let mut b = Bench::new(&root)?;
    b.start_servers()?;
    let target = format!("127.0.0.1:{PORT}");
    let sink = format!("127.0.0.1:{}", PORT + 1);
    // (size, config, metric) -> samples
    let mut samples: BTreeMap<(usize, Config, &str), Vec<f64>> = BTreeMap::new();
    let mut hand_load_s = BTreeMap::new();
    let mut ipt_load_s = BTreeMap::new();
    let have_iptables = succeeds(Command::new(IPTABLES).arg("--version"));
    if !have_iptables {
        eprintln!("xtask: {IPTABLES} not found: the iptables configuration is skipped (cargo xtask setup installs it)");
    }
    let configs: Vec<Config> = Config::ALL
        .into_iter()
        .filter(|c| *c != Config::Iptables || have_iptables)
        .collect();
    for &n in &s.sizes {
        let (policy, hand, ipt) = b.policy(n, 0)?;
        let t = Instant::now();
        b.nft(&hand)?;
        hand_load_s.insert(n, t.elapsed().as_secs_f64());
        if have_iptables {
            let t = Instant::now();
            let rules = fs::File::open(&ipt)?;
            status(
                Command::new("ip")
                    .args(["netns", "exec", NETNS, &format!("{IPTABLES}-restore")])
                    .stdin(rules),
            )?;
            ipt_load_s.insert(n.min(IPTABLES_CAP), t.elapsed().as_secs_f64());
        }
        for round in 0..s.rounds {
            eprintln!("xtask: bench size {n}, round {}/{}", round + 1, s.rounds);
            for &c in &configs {
                b.enable(c, &policy)?;
                // iptables walks its rules for every packet: at 1,000
                // services a connect takes ~15 ms, so it does fewer of
                // each (a rate needs no more) to keep the run bounded.
                let scale = if c == Config::Iptables {
                    (n.min(IPTABLES_CAP) as u64 / 25).max(1)
                } else {
                    1
                };
                let connects = (s.connects / scale).max(50);
                let stream_mb = (s.stream_mb / scale).max(8);
                let datagrams = (s.datagrams / scale).max(500);
                let rate = |out: String, n: u64| -> f64 {
                    field(&out, "ns").map_or(f64::NAN, |ns| n as f64 / (ns as f64 / 1e9))
                };
                let out = b.probe(b.ok, &["rate", &target, &connects.to_string()])?;
                if field(&out, "err") != Some(0) {
                    bail!("{}: allowed connects failed: {out}", c.name());
                }
                samples
                    .entry((n, c, "connect_per_s"))
                    .or_default()
                    .push(rate(out, connects));
                if c != Config::Baseline {
                    let out = b.probe(b.no, &["rate", &target, &connects.to_string()])?;
                    if field(&out, "ok") != Some(0) {
                        bail!("{}: the denied user got through: {out}", c.name());
                    }
                    samples
                        .entry((n, c, "refused_per_s"))
                        .or_default()
                        .push(rate(out, connects));
                }
                let out = b.probe(b.ok, &["stream", &sink, &stream_mb.to_string()])?;
                let mib_s =
                    field(&out, "ns").map_or(f64::NAN, |ns| stream_mb as f64 / (ns as f64 / 1e9));
                samples
                    .entry((n, c, "stream_mib_per_s"))
                    .or_default()
                    .push(mib_s);
                let out = b.probe(b.ok, &["udp-rate", &target, &datagrams.to_string()])?;
                samples
                    .entry((n, c, "udp_per_s"))
                    .or_default()
                    .push(rate(out, datagrams));
                b.disable(c)?;
            }
        }
        status(Command::new("ip").args([
            "netns", "exec", NETNS, "nft", "delete", "table", "inet", "hand",
        ]))?;
        if have_iptables {
            for args in [["-F", "hand"], ["-X", "hand"]] {
                status(
                    Command::new("ip")
                        .args(["netns", "exec", NETNS, IPTABLES])
                        .args(args),
                )?;
            }
        }
    }

    // apply and re-apply times, at the largest size.
    let big = *s.sizes.iter().max().unwrap_or(&1);
    let (policy, _, _) = b.policy(big, 0)?;
    let (changed, _, _) = b.policy(big, 1)?;
    let cg = b.cgroup.to_string_lossy().into_owned();
    let mut apply_s = Vec::new();
    let mut reapply_s = Vec::new();
    for _ in 0..s.rounds.min(3) {
        let t = Instant::now();
        let (ok, out) = b.lg(&[
            "apply",
            &policy.to_string_lossy(),
            "--cgroup",
            &cg,
            "--force",
        ])?;
        apply_s.push(t.elapsed().as_secs_f64());
        if !ok {
            bail!("apply: {out}");
        }
        let t = Instant::now();
        b.lg(&[
            "apply",
            &changed.to_string_lossy(),
            "--cgroup",
            &cg,
            "--force",
        ])?;
        reapply_s.push(t.elapsed().as_secs_f64());
        b.lg(&["remove"])?;
    }

    // `loopguard run`: peak memory with the largest policy, and the audit
    // stream during a flood of refused connects.
    let log = b.dir.join("audit.jsonl");
    let _ = fs::remove_file(&log);
    let notify = b.dir.join("notify.sock");
    let _ = fs::remove_file(&notify);
    let sock = std::os::unix::net::UnixDatagram::bind(&notify)?;
    sock.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut daemon = Command::new("nsenter")
        .arg(format!("--net={}", b.netns()))
        .arg(&b.lg)
        .args(["--instance", INSTANCE, "run"])
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
    let out = b.probe(b.no, &["burst", &target, &s.flood.to_string()])?;
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
    b.lg(&["remove"])?;
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
    println!("\nloopguard benchmark ({machine}); medians of {} rounds; ratio to baseline of the same size", s.rounds);
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
        let med = |c: Config, m: &str| {
            samples
                .get(&(n, c, m))
                .cloned()
                .map(median)
                .unwrap_or(f64::NAN)
        };
        for &c in &configs {
            let connect = med(c, "connect_per_s");
            let refused = med(c, "refused_per_s");
            let stream = med(c, "stream_mib_per_s");
            let udp = med(c, "udp_per_s");
            let r = |v: f64, m: &str| v / med(Config::Baseline, m);
            println!(
                "{n:>6} {:<17} {connect:>14.0} {:>7.3} {:>14} {stream:>12.0} {:>7.3} {udp:>12.0} {:>7.3}",
                if c == Config::Iptables && n > IPTABLES_CAP {
                    format!("iptables ({IPTABLES_CAP})")
                } else {
                    c.name().to_string()
                },
                r(connect, "connect_per_s"),
                if refused.is_nan() { "-".to_string() } else { format!("{refused:.0}") },
                r(stream, "stream_mib_per_s"),
                r(udp, "udp_per_s"),
            );
            rows.push(json!({
                "size": n, "config": c.name(),
                "services_loaded": if c == Config::Iptables { n.min(IPTABLES_CAP) } else { n },
                "connect_per_s": connect, "connect_ratio": r(connect, "connect_per_s"),
                "refused_per_s": if refused.is_nan() { serde_json::Value::Null } else { json!(refused) },
                "stream_mib_per_s": stream, "stream_ratio": r(stream, "stream_mib_per_s"),
                "udp_per_s": udp, "udp_ratio": r(udp, "udp_per_s"),
                "samples": {
                    "connect_per_s": samples.get(&(n, c, "connect_per_s")),
                    "stream_mib_per_s": samples.get(&(n, c, "stream_mib_per_s")),
                    "udp_per_s": samples.get(&(n, c, "udp_per_s")),
                },
            }));
        }
    }
    let apply_med = median(apply_s.clone());
    let reapply_med = median(reapply_s.clone());
    println!("\napply {big} services from nothing: {apply_med:.3} s; re-apply after changing one service: {reapply_med:.3} s");
    for (n, secs) in &hand_load_s {
        println!("hand-written nft with {n} services: loaded in {secs:.2} s");
    }
    for (n, secs) in &ipt_load_s {
        println!(
            "iptables owner with {n} services ({} rules): loaded in {secs:.2} s",
            n * 101
        );
    }
    if s.sizes.iter().any(|&n| n > IPTABLES_CAP) && have_iptables {
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
    let results = json!({
        "machine": machine,
        "quick": quick,
        "rounds": s.rounds,
        "rows": rows,
        "apply_seconds": apply_s, "apply_median_seconds": apply_med, "apply_services": big,
        "reapply_seconds": reapply_s, "reapply_median_seconds": reapply_med,
        "run_peak_rss_kib": rss_kib,
        "run_rss_after_flood_kib": steady_kib,
        "hand_nft_load_seconds": hand_load_s,
        "iptables_load_seconds": ipt_load_s,
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
