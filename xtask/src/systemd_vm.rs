//! `cargo xtask vm-test --systemd`: the .deb under a real systemd. A Debian
//! 12 root file system (debootstrap, from the Debian archive; cached in
//! target/vm/systemd-root) boots with systemd as PID 1 on a matrix kernel,
//! installs the package and checks, as an operator would, what the unit
//! promises: `Type=notify` readiness, a refused user, `reload`, `stop`
//! leaving enforcement pinned, `start` adopting the pins, the hardening
//! (`systemd-analyze security`), events in the journal with priorities, and
//! a purge that leaves nothing.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context as _, Result};

use crate::{status, vm, workspace_root};

/// Packages beyond debootstrap's minbase: systemd as init, what the unit
/// and the checks use (nft, ip, useradd), and logrotate for the snippet.
/// ansible-core and python3-apt run the role in deploy/ansible inside the
/// guest (`-c local`); python3-cffi-backend is named because debootstrap
/// does not resolve the virtual package python3-cryptography needs.
/// prometheus scrapes the daemon and evaluates the shipped alert rules.
const PACKAGES: &str = "systemd,systemd-sysv,dbus,kmod,iproute2,nftables,udev,procps,passwd,adduser,logrotate,ansible-core,python3-apt,python3-cffi-backend,prometheus";

/// The checks, run as a oneshot unit once the system is up. Each prints
/// `LG-SYSTEMD-CHECK ok|FAIL <what>` (a failure then the daemon's last 40
/// journal lines); the last line is the result marker.
const CHECKS: &str = include_str!("systemd-checks.sh");

const CHECK_UNIT: &str = "[Unit]
Description=loopguard package checks
After=multi-user.target
[Service]
Type=oneshot
ExecStart=/usr/local/sbin/lg-systemd-checks
[Install]
WantedBy=multi-user.target
";

pub(crate) fn systemd_test(series: &str) -> Result<String> {
    let root = workspace_root();
    // The checks are a shell script: linted before a boot that costs minutes.
    status(
        Command::new("shellcheck")
            .args(["--shell=bash", "--severity=info"])
            .arg(root.join("xtask/src/systemd-checks.sh")),
    )
    .context("shellcheck xtask/src/systemd-checks.sh")?;
    let work = root.join("target/vm");
    let base = rootfs(&work)?;
    crate::dist::dist(false)?;
    let deb = fs::read_dir(root.join("target/dist"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("no .deb in target/dist")?;
    status(Command::new("cargo").current_dir(&root).args([
        "build",
        "-p",
        "loopguard-tests",
        "--bin",
        "lg-probe",
    ]))?;
    let (vmlinuz, modules, release) = vm::fetch_kernel(&work.join("kernels"), series)?;

    // A fresh copy of the base each run: the guest's changes never reach it.
    let stage = work.join("systemd-stage");
    if stage.exists() {
        fs::remove_dir_all(&stage)?;
    }
    status(Command::new("cp").arg("-a").arg(&base).arg(&stage))?;
    fs::copy(&deb, stage.join("root/loopguard.deb"))?;
    fs::copy(
        root.join("target/debug/lg-probe"),
        stage.join("usr/local/bin/lg-probe"),
    )?;
    status(
        Command::new("cp")
            .arg("-a")
            .arg(root.join("deploy/ansible"))
            .arg(stage.join("root/ansible")),
    )?;
    let checks = stage.join("usr/local/sbin/lg-systemd-checks");
    fs::write(&checks, CHECKS)?;
    fs::set_permissions(&checks, fs::Permissions::from_mode(0o755))?;
    let units = stage.join("etc/systemd/system");
    fs::write(units.join("lg-systemd-checks.service"), CHECK_UNIT)?;
    // No login prompt on the console: agetty's vhangup() would cut the
    // checks' output off the serial line.
    std::os::unix::fs::symlink("/dev/null", units.join("serial-getty@ttyS0.service"))?;
    let wants = units.join("multi-user.target.wants");
    fs::create_dir_all(&wants)?;
    std::os::unix::fs::symlink(
        "/etc/systemd/system/lg-systemd-checks.service",
        wants.join("lg-systemd-checks.service"),
    )?;
    // The kernel's modules, indexed, so nf_tables and friends autoload.
    let mod_dst = stage.join("lib/modules").join(&release);
    fs::create_dir_all(mod_dst.parent().context("modules dir")?)?;
    status(Command::new("cp").arg("-a").arg(&modules).arg(&mod_dst))?;
    status(Command::new("depmod").arg("-b").arg(&stage).arg(&release))?;
    fs::write(stage.join("etc/hostname"), "lg-systemd\n")?;
    let _ = fs::remove_file(stage.join("etc/machine-id"));
    fs::write(stage.join("etc/machine-id"), "")?;

    let initrd = work.join(format!("systemd-{release}.cpio"));
    let packed = Command::new("sh")
        .current_dir(&stage)
        .arg("-c")
        .arg(format!(
            "find . | cpio -o -H newc --quiet > {}",
            initrd.display()
        ))
        .status()?;
    if !packed.success() {
        bail!("cpio failed");
    }
    fs::remove_dir_all(&stage)?;
    let log = work.join(format!("console-systemd-{release}.log"));
    let started = Instant::now();
    let lines = vm::boot(
        &vmlinuz,
        &initrd,
        "console=ttyS0 panic=-1 rdinit=/sbin/init systemd.show_status=0 loglevel=4",
        &format!("systemd {series}"),
        &log,
    )?;
    let _ = fs::remove_file(&initrd);
    println!(
        "\nsystemd checks ({release}, {:.0} s):",
        started.elapsed().as_secs_f64()
    );
    let mut failed = 0;
    for l in &lines {
        if let Some(rest) = l.trim().strip_prefix("LG-SYSTEMD-CHECK ") {
            println!("  {rest}");
            failed += usize::from(rest.starts_with("FAIL"));
        }
        if let Some(score) = l.trim().strip_prefix("LG-SYSTEMD-SECURITY ") {
            println!("  {score}");
        }
    }
    let rc = lines
        .iter()
        .find_map(|l| l.trim().strip_prefix(vm::RESULT_MARKER))
        .and_then(|c| c.trim().parse::<i32>().ok());
    match rc {
        Some(0) if failed == 0 => Ok(release),
        Some(_) => bail!("{failed} systemd checks failed; see {}", log.display()),
        None => bail!(
            "the systemd VM stopped without a result line; see {}",
            log.display()
        ),
    }
}

/// Unmounts every mount point at or below `dir` (deepest first, lazily):
/// what an interrupted debootstrap left mounted in its target.
fn unmount_under(dir: &Path) {
    let Ok(dir) = fs::canonicalize(dir) else {
        return;
    };
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    // Field 5 is the mount point (octal escapes for spaces and the like).
    let mut points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(&dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        eprintln!(
            "xtask: unmounting {} (left by an interrupted debootstrap)",
            p.display()
        );
        let _ = Command::new("umount").arg("-l").arg(&p).status();
    }
}

/// The cached Debian 12 root file system, made by debootstrap once.
fn rootfs(work: &Path) -> Result<PathBuf> {
    let base = work.join("systemd-root");
    let marker = base.join(".loopguard-packages");
    if fs::read_to_string(&marker).is_ok_and(|p| p == PACKAGES) {
        return Ok(base);
    }
    if base.exists() {
        fs::remove_dir_all(&base)?;
    }
    let tmp = work.join("systemd-root.tmp");
    if tmp.exists() {
        // A debootstrap that was killed leaves its /proc (and more)
        // mounted inside: unmounted first, or nothing can be removed.
        unmount_under(&tmp);
        fs::remove_dir_all(&tmp)?;
    }
    eprintln!(
        "xtask: building a Debian 12 root file system with debootstrap (once; cached in {})",
        base.display()
    );
    let built = status(
        Command::new("debootstrap")
            .args(["--variant=minbase", &format!("--include={PACKAGES}")])
            .arg("bookworm")
            .arg(&tmp)
            .arg("http://deb.debian.org/debian"),
    );
    unmount_under(&tmp);
    built?;
    fs::write(tmp.join(".loopguard-packages"), PACKAGES)?;
    fs::rename(&tmp, &base)?;
    Ok(base)
}
