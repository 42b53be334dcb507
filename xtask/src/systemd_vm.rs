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
const PACKAGES: &str = "systemd,systemd-sysv,dbus,kmod,iproute2,nftables,udev,procps,passwd,adduser,logrotate,ansible-core,python3-apt,python3-cffi-backend";

/// The checks, run as a oneshot unit once the system is up. Each prints
/// `LG-SYSTEMD-CHECK ok|FAIL <what>`; the last line is the result marker.
const CHECKS: &str = r#"#!/bin/bash
exec > /dev/ttyS0 2>&1 < /dev/null
export DEBIAN_FRONTEND=noninteractive
PS4='+ [$SECONDS s] '
set -x
fail=0
check() { local what="$1"; shift; if "$@"; then echo "LG-SYSTEMD-CHECK ok $what"; else echo "LG-SYSTEMD-CHECK FAIL $what"; fail=1; fi; }
# Polls a condition for up to 30 s (software emulation is slow).
until_true() { local n=0; until "$@"; do n=$((n+1)); [ "$n" -gt 300 ] && return 1; sleep 0.1; done; }
probe_as() { /usr/local/bin/lg-probe --uid "$(id -u "$1")" --gid "$(id -g "$1")" tcp-to 127.0.0.1:7031; }
says() { [ "$(probe_as "$1")" = "$2" ]; }
links() { ls -i /sys/fs/bpf/loopguard/links 2>/dev/null | sort; }
stopped_and_pinned() { ! systemctl is-active --quiet loopguard && [ -n "$(links)" ]; }
adopted() { systemctl is-active --quiet loopguard && [ "$(links)" = "$before" ]; }
echo "LG-SYSTEMD booted $(uname -r), $(systemctl --version | head -1)"
useradd --system --no-create-home lgt-app
useradd --system --no-create-home lgt-mallory
/usr/local/bin/lg-probe listen 7031 &

check "dpkg -i installs the package" timeout 300 dpkg -i /root/loopguard.deb
check "man page and completion in place" test -e /usr/share/man/man8/loopguard-apply.8.gz -a -e /usr/share/bash-completion/completions/loopguard
check "the shipped policy is a conffile that guards nothing" sh -c '/usr/sbin/loopguard check /etc/loopguard/policy.toml && grep -q /etc/loopguard/policy.toml /var/lib/dpkg/info/loopguard.conffiles'
cat > /etc/loopguard/policy.toml <<'EOF'
version = 1
log_allowed = true
[[service]]
name = "db"
port = 7031
allow_users = ["root", "lgt-app"]
EOF

systemctl start loopguard
check "systemctl start reaches active through Type=notify" sh -c 'systemctl is-active --quiet loopguard && [ "$(systemctl show -p Type --value loopguard)" = notify ]'
check "a listed user gets through" says lgt-app connect=ok
check "a denied user is refused" says lgt-mallory connect=EPERM

sed -i 's/"root", "lgt-app"/"root", "lgt-app", "lgt-mallory"/' /etc/loopguard/policy.toml
systemctl reload loopguard
check "systemctl reload applies an edit" until_true says lgt-mallory connect=ok
sed -i 's/, "lgt-mallory"//' /etc/loopguard/policy.toml
systemctl reload loopguard
check "and the edit back" until_true says lgt-mallory connect=EPERM
check "the refusal is in the journal as a warning" until_true sh -c 'journalctl -u loopguard -p warning -o cat | grep -q "\"event.action\":\"deny\""'
check "allowed attempts are there at info, not at warning" sh -c 'journalctl -u loopguard -p info -o cat | grep -q "\"event.action\":\"allow\"" && ! journalctl -u loopguard -p warning -o cat | grep -q "\"event.action\":\"allow\""'

before="$(links)"
systemctl stop loopguard
check "systemctl stop leaves enforcement pinned" stopped_and_pinned
check "and enforced" says lgt-mallory connect=EPERM
systemctl start loopguard
check "systemctl start again adopts the pins (the same links)" adopted
check "still enforced" says lgt-mallory connect=EPERM

# A unit by name (allow_units): its processes get through whatever their
# uid, from a cgroup that did not exist when the policy was applied, and
# again after the unit runs anew (a new cgroup at the same path).
sed -i 's/allow_users = \["root", "lgt-app"\]/allow_users = ["root", "lgt-app"]\nallow_units = ["lg-client.service"]/' /etc/loopguard/policy.toml
systemctl reload loopguard
client() { systemd-run --quiet --wait --pipe --unit=lg-client -p User=lgt-mallory /bin/bash -c 'for i in $(seq 100); do r=$(/usr/local/bin/lg-probe tcp-to 127.0.0.1:7031 2>/dev/null); [ "$r" = connect=ok ] && break; sleep 0.1; done; echo "$r"'; }
client_ok() { [ "$(client)" = connect=ok ]; }
check "allow_units: the unit's processes get through" client_ok
check "allow_units: and again when the unit runs anew" client_ok
check "allow_units: the same user outside the unit is refused" says lgt-mallory connect=EPERM
# Between runs the unit has no cgroup: explain says so.
check "explain --unit names the unit's cgroup" sh -c 'loopguard explain --uid "$(id -u lgt-mallory)" --unit lg-client.service --to 127.0.0.1:7031 | grep -q "cgroup system.slice/lg-client.service"'
check "the daemon said it followed the unit's cgroup" until_true sh -c 'journalctl -u loopguard -o cat | grep -q "cgroup system.slice/lg-client.service of service db exists now"'

score="$(systemd-analyze security loopguard --no-pager 2>&1 | grep -i 'overall exposure')"
echo "LG-SYSTEMD-SECURITY $score"
exposure="$(echo "$score" | grep -o '[0-9]*\.[0-9]' | head -1)"
check "systemd-analyze security: exposure 5.0 or less" awk -v e="$exposure" 'BEGIN { exit !(e != "" && e <= 5.0) }'
check "loopguard neither failed nor restarted" sh -c '! systemctl is-failed --quiet loopguard && [ "$(systemctl show -p NRestarts --value loopguard)" = 0 ]'

dpkg -P loopguard >/dev/null
check "dpkg -P leaves no pins" test ! -e /sys/fs/bpf/loopguard
check "dpkg -P leaves no table" sh -c '! nft list tables | grep -q loopguard'
check "dpkg -P leaves no files" sh -c '! ls /etc/loopguard /usr/sbin/loopguard /run/loopguard /var/log/loopguard 2>/dev/null | grep -q .'
check "and enforcement is lifted" says lgt-mallory connect=ok
# The Ansible role (deploy/ansible), as a fleet rollout would run it.
play() { ansible-playbook -c local -i localhost, /root/ansible/site.yml -e loopguard_deb=/root/loopguard.deb -e "@$1" "${@:2}"; }
services() { printf '{"loopguard_services": [{"name": "db", "port": %s, "allow_users": [%s]}]}' "$1" "$2" > "/root/$3.json"; }
services 7031 '"root", "lgt-app"' v1
services 7031 '"root", "lgt-app", "lgt-mallory"' v2
services 99999 '"root"' broken
check "ansible: the role installs, templates and starts" play /root/v1.json
check "ansible: the daemon runs the templated policy" sh -c 'systemctl is-active --quiet loopguard && grep -q lgt-app /etc/loopguard/policy.toml'
check "ansible: enforced" until_true says lgt-mallory connect=EPERM
check "ansible: --check --diff succeeds" sh -c 'ansible-playbook -c local -i localhost, /root/ansible/site.yml -e loopguard_deb=/root/loopguard.deb -e @/root/v2.json --check --diff > /root/check.out 2>&1 || { tail -n 40 /root/check.out; false; }'
check "ansible: --check --diff shows loopguard diff" grep -q "user lgt-mallory gains access" /root/check.out
check "ansible: --check changes nothing" sh -c '! grep -q lgt-mallory /etc/loopguard/policy.toml'
play /root/v2.json
check "ansible: the new policy is enforced after the handler's reload" until_true says lgt-mallory connect=ok
check "ansible: a policy that fails loopguard check is not installed" sh -c '! ansible-playbook -c local -i localhost, /root/ansible/site.yml -e loopguard_deb=/root/loopguard.deb -e @/root/broken.json > /root/broken.out 2>&1 && grep -q "port 99999 is out of range" /root/broken.out'
check "ansible: and the one in force stays" sh -c 'grep -q "port = 7031" /etc/loopguard/policy.toml'
check "ansible: still enforced" says lgt-mallory connect=ok
dpkg -P loopguard >/dev/null
echo "LOOPGUARD-VM-RESULT rc=$fail"
echo 1 > /proc/sys/kernel/sysrq
echo o > /proc/sysrq-trigger
"#;

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
        fs::remove_dir_all(&tmp)?;
    }
    eprintln!(
        "xtask: building a Debian 12 root file system with debootstrap (once; cached in {})",
        base.display()
    );
    status(
        Command::new("debootstrap")
            .args(["--variant=minbase", &format!("--include={PACKAGES}")])
            .arg("bookworm")
            .arg(&tmp)
            .arg("http://deb.debian.org/debian"),
    )?;
    fs::write(tmp.join(".loopguard-packages"), PACKAGES)?;
    fs::rename(&tmp, &base)?;
    Ok(base)
}
