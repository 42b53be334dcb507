//! `cargo xtask vm-test`: the real-kernel integration tests on Debian's 6.1
//! and 6.12 kernels, booted in qemu under software emulation (TCG; nested
//! KVM is not available on this machine kind).
//!
//! The guest runs from an initramfs built here: busybox for init, the host's
//! own binaries (ip, nsenter, useradd, bpftool, ...) with their shared
//! libraries, the loopguard and lg-probe binaries, the integration test
//! binaries, and the kernel modules the tests need (from the kernel's own
//! package). Its init runs the tests and prints a result line on the serial
//! console, which this process reads to decide its exit code.

use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{status, workspace_root};

/// Integration test binaries (of the loopguard-tests package) run in the
/// guest. The Redis end-to-end test stays on the host: it needs a full
/// Debian service.
const GUEST_TESTS: &[&str] = &[
    "enforce",
    "lifecycle",
    "nft",
    "daemon",
    "routes",
    "crash",
    "scan",
    "cgroups",
    "attest",
    "start",
];

/// Host programs the tests call, copied into the guest with their libraries.
const GUEST_PROGRAMS: &[&str] = &[
    "/usr/bin/ip",
    "/usr/bin/ss",
    "/usr/bin/nsenter",
    "/usr/bin/unshare",
    "/usr/sbin/useradd",
    "/usr/sbin/userdel",
    "/usr/sbin/groupadd",
    "/usr/sbin/groupdel",
    "/usr/bin/getent",
    "/usr/bin/id",
    "/usr/sbin/bpftool",
    "/usr/sbin/nft",
    "/usr/bin/flock",
    "/usr/bin/timeout",
    "/usr/bin/kmod",
];

/// Kernel modules loaded at boot (dependencies are resolved from
/// modules.dep).
/// inet_diag, tcp_diag and udp_diag answer `loopguard scan`'s sock_diag
/// dumps (a stock kernel loads them on demand; the initramfs has only
/// what is listed here).
const GUEST_MODULES: &[&str] = &[
    "bridge",
    "nf_tables",
    "nft_reject_inet",
    "veth",
    "inet_diag",
    "tcp_diag",
    "udp_diag",
];

/// Module directories copied whole, so the kernel can autoload whatever
/// expression a ruleset uses.
const GUEST_MODULE_DIRS: &[&str] = &[
    "kernel/net/netfilter/",
    "kernel/net/ipv4/netfilter/",
    "kernel/net/ipv6/netfilter/",
    "kernel/net/bridge/",
];

pub(crate) const RESULT_MARKER: &str = "LOOPGUARD-VM-RESULT rc=";

/// Kernels to test: `6.1` and `6.12` (Debian packages), `host`, `all`, or
/// a comma-separated list.
pub(crate) fn vm_test(kernel: &str) -> Result<()> {
    let mut kernels: Vec<&str> = Vec::new();
    for k in kernel.split(',') {
        match k {
            "all" => kernels.extend(["6.1", "6.12", "host"]),
            "6.1" | "6.12" | "host" => kernels.push(k),
            other => bail!(
                "unknown kernel {other:?}: use 6.1, 6.12, host, all, or a comma-separated list"
            ),
        }
    }
    let root = workspace_root();
    let binaries = build(&root)?;
    let mut results = Vec::new();
    for k in kernels {
        let started = Instant::now();
        let outcome = if k == "host" {
            run_on_host(&binaries)
        } else {
            run_in_vm(&root, k, &binaries)
        };
        results.push((k, outcome, started.elapsed()));
    }
    println!("\nkernel matrix:");
    println!("{:<8} {:<34} {:>8}", "kernel", "result", "time");
    let mut failed = false;
    for (k, outcome, took) in &results {
        let text = match outcome {
            Ok(release) => format!("pass ({release})"),
            Err(e) => {
                failed = true;
                format!("FAIL: {e:#}")
            }
        };
        println!("{k:<8} {text:<34} {:>7.0}s", took.as_secs_f64());
    }
    if failed {
        bail!("the integration tests failed on at least one kernel");
    }
    Ok(())
}

/// Paths of the binaries the guest runs.
struct Binaries {
    loopguard: PathBuf,
    probe: PathBuf,
    tests: Vec<PathBuf>,
}

/// The guest's test binaries among cargo's messages (`only`: a
/// comma-separated subset of [`GUEST_TESTS`]).
fn test_binaries(messages: &[u8], only: Option<&str>) -> Vec<PathBuf> {
    let mut tests = Vec::new();
    for msg in cargo_metadata::Message::parse_stream(messages) {
        let Ok(cargo_metadata::Message::CompilerArtifact(artifact)) = msg else {
            continue;
        };
        let name = artifact.target.name.as_str();
        let is_test = artifact
            .target
            .kind
            .contains(&cargo_metadata::TargetKind::Test);
        let chosen = only.is_none_or(|o| o.split(',').any(|t| t == name));
        if let (true, true, true, Some(exe)) = (
            is_test,
            GUEST_TESTS.contains(&name),
            chosen,
            artifact.executable,
        ) {
            tests.push(exe.into_std_path_buf());
        }
    }
    tests
}

fn build(root: &Path) -> Result<Binaries> {
    crate::build_bins(root, false)?;
    let out = Command::new("cargo")
        .current_dir(root)
        .args([
            "test",
            "-p",
            "loopguard-tests",
            "--no-run",
            "--message-format=json",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the test binaries failed");
    }
    // LG_VM_ONLY=daemon,scan: a subset, while chasing one failure.
    let only = std::env::var("LG_VM_ONLY").ok();
    let tests = test_binaries(&out.stdout, only.as_deref());
    if tests.len() != GUEST_TESTS.len() && std::env::var_os("LG_VM_ONLY").is_none() {
        bail!("expected test binaries {GUEST_TESTS:?}, found {tests:?}");
    }
    let debug = root.join("target/debug");
    Ok(Binaries {
        loopguard: debug.join("loopguard"),
        probe: debug.join("lg-probe"),
        tests,
    })
}

fn run_on_host(b: &Binaries) -> Result<String> {
    let threads = std::thread::available_parallelism().map_or(2, usize::from);
    for t in &b.tests {
        status(Command::new(t).arg(format!("--test-threads={threads}")))?;
    }
    let release = Command::new("uname").arg("-r").output()?;
    Ok(String::from_utf8_lossy(&release.stdout).trim().to_string())
}

/// The newest Debian package of a kernel series, downloaded and unpacked.
pub(crate) fn fetch_kernel(cache: &Path, series: &str) -> Result<(PathBuf, PathBuf, String)> {
    let pattern = match series {
        "6.1" => "^linux-image-6\\.1\\.0-[0-9]+-cloud-amd64-unsigned$",
        _ => "^linux-image-6\\.12\\.[0-9]+\\+deb12-cloud-amd64-unsigned$",
    };
    let found = Command::new("apt-cache")
        .args(["search", "--names-only", pattern])
        .output()?;
    let mut names: Vec<String> = String::from_utf8_lossy(&found.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .collect();
    if names.is_empty() {
        status(Command::new("apt-get").args(["update", "-q"]))?;
        let found = Command::new("apt-cache")
            .args(["search", "--names-only", pattern])
            .output()?;
        names = String::from_utf8_lossy(&found.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(String::from))
            .collect();
    }
    // Version order: compare the numbers in the name.
    names.sort_by_key(|n| {
        n.split(|c: char| !c.is_ascii_digit())
            .filter_map(|d| d.parse::<u64>().ok())
            .collect::<Vec<_>>()
    });
    let package = names
        .pop()
        .with_context(|| format!("no Debian package matches {pattern}"))?;
    let dir = cache.join(&package);
    let boot = dir.join("boot");
    if !boot.exists() {
        fs::create_dir_all(cache)?;
        status(
            Command::new("apt-get")
                .current_dir(cache)
                .args(["download", &package]),
        )?;
        let deb = fs::read_dir(cache)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
            })
            .context("downloaded .deb not found")?;
        status(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dir))?;
        let _ = fs::remove_file(&deb);
    }
    let vmlinuz = fs::read_dir(&boot)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .context("no vmlinuz in the package")?;
    let release = vmlinuz
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .trim_start_matches("vmlinuz-")
                .to_string()
        })
        .context("kernel release")?;
    Ok((vmlinuz, dir.join("lib/modules").join(&release), release))
}

fn run_in_vm(root: &Path, series: &str, b: &Binaries) -> Result<String> {
    let work = root.join("target/vm");
    let (vmlinuz, modules, release) = fetch_kernel(&work.join("kernels"), series)?;
    let initrd = work.join(format!("initrd-{release}.cpio"));
    build_initramfs(
        &work.join(format!("root-{release}")),
        &initrd,
        &modules,
        &release,
        b,
    )?;

    let log_path = work.join(format!("console-{release}.log"));
    let lines = boot(
        &vmlinuz,
        &initrd,
        "console=ttyS0 panic=-1 oops=panic rdinit=/init loglevel=4",
        series,
        &log_path,
    )?;
    let rc = lines
        .iter()
        .find_map(|l| l.trim().strip_prefix(RESULT_MARKER))
        .and_then(|c| c.trim().parse::<i32>().ok());
    match rc {
        Some(0) => Ok(release),
        Some(n) => bail!(
            "tests failed in the VM (rc={n}); see {}",
            log_path.display()
        ),
        None => bail!(
            "the VM stopped without a result line; see {}",
            log_path.display()
        ),
    }
}

/// Boots `vmlinuz` with `initrd` under qemu (software emulation), echoes
/// and logs the serial console, and returns its lines once the guest
/// powers off (at most 40 minutes).
pub(crate) fn boot(
    vmlinuz: &Path,
    initrd: &Path,
    append: &str,
    label: &str,
    log_path: &Path,
) -> Result<Vec<String>> {
    let mut log = fs::File::create(log_path)?;
    eprintln!(
        "xtask: booting {label} under qemu (TCG); console in {}",
        log_path.display()
    );
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            "max",
            "-smp",
            "2",
            "-m",
            "3072",
        ])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", append])
        .args([
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            "stdio",
            "-nic",
            "none",
            "-no-reboot",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("start qemu-system-x86_64")?;
    let stdout = child.stdout.take().context("qemu stdout")?;
    let deadline = Instant::now() + Duration::from_secs(40 * 60);
    let mut lines = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap_or_default();
        println!("[{label}] {line}");
        writeln!(log, "{line}")?;
        lines.push(line);
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("the VM did not finish in 40 minutes");
        }
    }
    let _ = child.wait();
    Ok(lines)
}

/// Copies `src` to `dst`, creating parents; ELF files are stripped of debug
/// info to keep the initramfs small.
fn install(src: &Path, dst: &Path) -> Result<()> {
    if let Some(p) = dst.parent() {
        fs::create_dir_all(p)?;
    }
    if dst.exists() {
        return Ok(());
    }
    let stripped = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(dst)
        .arg(src)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !stripped {
        fs::copy(src, dst).with_context(|| format!("copy {}", src.display()))?;
    }
    Ok(())
}

/// Shared libraries of an executable, as ldd resolves them.
fn libraries(exe: &Path) -> Result<BTreeSet<PathBuf>> {
    let out = Command::new("ldd").arg(exe).output()?;
    let mut libs = BTreeSet::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.insert(PathBuf::from(p));
        }
    }
    Ok(libs)
}

fn build_initramfs(
    dir: &Path,
    out: &Path,
    modules: &Path,
    release: &str,
    b: &Binaries,
) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir)?;
    }
    for d in [
        "bin",
        "sbin",
        "etc",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "root",
        "lg/target/debug/deps",
    ] {
        fs::create_dir_all(dir.join(d))?;
    }
    // busybox for init and the shell the tests use (sh -c).
    install(Path::new("/bin/busybox"), &dir.join("bb/busybox"))?;
    for applet in [
        "sh", "mount", "umount", "mkdir", "modprobe", "poweroff", "grep", "echo", "cat", "uname",
        "ln", "sleep", "sysctl",
    ] {
        std::os::unix::fs::symlink("/bb/busybox", dir.join("bb").join(applet))?;
    }
    let mut exes: Vec<(PathBuf, PathBuf)> = GUEST_PROGRAMS
        .iter()
        .map(|p| (PathBuf::from(p), dir.join(p.trim_start_matches('/'))))
        .collect();
    let deps = dir.join("lg/target/debug/deps");
    exes.push((b.loopguard.clone(), dir.join("lg/target/debug/loopguard")));
    exes.push((b.probe.clone(), dir.join("lg/target/debug/lg-probe")));
    for t in &b.tests {
        let name = t.file_name().context("test name")?;
        exes.push((t.clone(), deps.join(name)));
    }
    let mut libs = BTreeSet::new();
    for (src, dst) in &exes {
        if !src.exists() {
            bail!(
                "{} is missing (cargo xtask setup installs it)",
                src.display()
            );
        }
        install(src, dst)?;
        libs.extend(libraries(src)?);
    }
    for lib in libs {
        let real = fs::canonicalize(&lib)?;
        install(&real, &dir.join(lib.strip_prefix("/")?))?;
    }
    // Scripts (the tests' fake nft) expect /bin/sh.
    std::os::unix::fs::symlink("/bb/busybox", dir.join("bin/sh"))?;
    // Debian's modprobe is kmod under another name.
    std::os::unix::fs::symlink("/usr/bin/kmod", dir.join("usr/sbin/modprobe"))?;
    for f in [
        "passwd",
        "group",
        "shadow",
        "gshadow",
        "login.defs",
        "nsswitch.conf",
    ] {
        let src = Path::new("/etc").join(f);
        if src.exists() {
            fs::copy(&src, dir.join("etc").join(f))?;
        }
    }
    fs::create_dir_all(dir.join("etc/default"))?;

    // Kernel modules and their dependencies, decompressed for busybox.
    let mods_dst = dir.join("lib/modules").join(release);
    fs::create_dir_all(&mods_dst)?;
    status(
        Command::new("depmod")
            .arg("-b")
            .arg(
                modules
                    .parent()
                    .and_then(Path::parent)
                    .and_then(Path::parent)
                    .context("modules root")?,
            )
            .arg(release),
    )?;
    let dep = fs::read_to_string(modules.join("modules.dep"))?;
    let mut wanted = BTreeSet::new();
    for line in dep.lines() {
        if GUEST_MODULE_DIRS.iter().any(|d| line.starts_with(d)) {
            for p in line.split([':', ' ']).filter(|p| !p.is_empty()) {
                wanted.insert(p.to_string());
            }
        }
    }
    for m in GUEST_MODULES {
        let line = dep
            .lines()
            .find(|l| {
                l.split(':').next().is_some_and(|p| {
                    let file = p.rsplit('/').next().unwrap_or_default();
                    file.split('.').next() == Some(m)
                })
            })
            .with_context(|| format!("module {m} not in {release}'s modules.dep"))?;
        for p in line.split([':', ' ']).filter(|p| !p.is_empty()) {
            wanted.insert(p.to_string());
        }
    }
    for m in &wanted {
        let plain = m.trim_end_matches(".xz").trim_end_matches(".zst");
        let src = modules.join(m);
        let dst = mods_dst.join(plain);
        fs::create_dir_all(dst.parent().context("module dir")?)?;
        let tool = if m.ends_with(".xz") {
            Some("xz")
        } else if m.ends_with(".zst") {
            Some("zstd")
        } else {
            None
        };
        match tool {
            Some(tool) => fs::write(
                &dst,
                Command::new(tool).arg("-dc").arg(&src).output()?.stdout,
            )?,
            None => {
                fs::copy(&src, &dst)?;
            }
        }
    }
    for f in [
        "modules.order",
        "modules.builtin",
        "modules.builtin.modinfo",
    ] {
        if modules.join(f).exists() {
            fs::copy(modules.join(f), mods_dst.join(f))?;
        }
    }
    // Index the subset, aliases included, so the guest kernel can autoload
    // nft expressions through kmod's modprobe.
    status(Command::new("depmod").arg("-b").arg(dir).arg(release))?;

    let tests: Vec<String> = b
        .tests
        .iter()
        .filter_map(|t| {
            t.file_name()
                .map(|n| format!("/lg/target/debug/deps/{}", n.to_string_lossy()))
        })
        .collect();
    let init = format!(
        r#"#!/bb/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:/bb
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
mount -t cgroup2 cgroup2 /sys/fs/cgroup
# Let the kernel autoload modules (nft expressions) through kmod.
echo /usr/sbin/modprobe > /proc/sys/kernel/modprobe
for m in {modules}; do modprobe $m || echo "modprobe $m failed"; done
echo "LOOPGUARD-VM-KERNEL $(uname -r)"
# Software emulation (TCG) runs tens of times slower than the hardware the
# tests' timing targets are for: they scale their bounds (and say so).
export LG_TEST_EMULATED=1
# The guest is thrown away: tests may attach at its cgroup2 root.
export LG_TEST_DISPOSABLE=1
rc=0
for t in {tests}; do
  echo "== $t"
  RUST_BACKTRACE=1 $t --test-threads=2 --include-ignored || rc=1
done
echo "{RESULT_MARKER}$rc"
poweroff -f
"#,
        modules = GUEST_MODULES.join(" "),
        tests = tests.join(" ")
    );
    let init_path = dir.join("init");
    fs::write(&init_path, init)?;
    fs::set_permissions(&init_path, fs::Permissions::from_mode(0o755))?;

    // newc cpio, uncompressed: the kernel unpacks it without a decompressor.
    let list = Command::new("sh")
        .current_dir(dir)
        .arg("-c")
        .arg(format!(
            "find . | cpio -o -H newc --quiet > {}",
            out.display()
        ))
        .status()?;
    if !list.success() {
        bail!("cpio failed");
    }
    Ok(())
}

#[cfg(test)]
mod binaries_tests {
    use super::*;

    #[test]
    fn test_binaries_are_read_from_cargo_messages() {
        let line = |name: &str, kind: &str| {
            format!(
                r#"{{"reason":"compiler-artifact","package_id":"path+file:///w/tests#loopguard-tests@0.1.0","manifest_path":"/w/tests/Cargo.toml","target":{{"kind":["{kind}"],"crate_types":["bin"],"name":"{name}","src_path":"/w/tests/tests/{name}.rs","edition":"2021","doc":false,"doctest":false,"test":true}},"profile":{{"opt_level":"0","debuginfo":2,"debug_assertions":true,"overflow_checks":true,"test":true}},"features":[],"filenames":["/w/target/debug/deps/{name}-1"],"executable":"/w/target/debug/deps/{name}-1","fresh":true}}"#
            )
        };
        let guest = GUEST_TESTS[0];
        let out = [
            line(guest, "test"),
            line("not-a-guest-test", "test"),
            line(guest, "bin"),
            "not json".into(),
        ]
        .join("\n");
        let want = vec![PathBuf::from(format!("/w/target/debug/deps/{guest}-1"))];
        assert_eq!(test_binaries(out.as_bytes(), None), want);
        assert_eq!(test_binaries(out.as_bytes(), Some(guest)), want);
        assert!(test_binaries(out.as_bytes(), Some("other")).is_empty());
    }
}
