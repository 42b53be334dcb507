//! `cargo xtask dist`: the release binary, man pages, completions and a
//! .deb, into target/dist/; `--check` installs the package, checks it,
//! purges it and checks nothing is left.

use std::{fs, path::Path, process::Command};

use anyhow::{bail, Context as _, Result};

use crate::{is_root, status, succeeds, workspace_root};

pub(crate) fn dist(check: bool) -> Result<()> {
    let root = workspace_root();
    let out = root.join("target/dist");
    status(Command::new("cargo").current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "loopguard",
    ]))?;
    let bin = root.join("target/release/loopguard");
    // Man pages, gzipped as Debian ships them (-n: no timestamp, so the
    // package is reproducible).
    let man = out.join("man");
    let _ = fs::remove_dir_all(&man);
    status(Command::new(&bin).arg("manpages").arg(&man))?;
    for page in fs::read_dir(&man).context("man pages")? {
        status(Command::new("gzip").args(["-9nf"]).arg(page?.path()))?;
    }
    let completions = out.join("completions");
    fs::create_dir_all(&completions)?;
    for (shell, file) in [
        ("bash", "loopguard.bash"),
        ("zsh", "_loopguard"),
        ("fish", "loopguard.fish"),
    ] {
        let text = Command::new(&bin)
            .args(["completions", shell])
            .output()
            .with_context(|| format!("loopguard completions {shell}"))?;
        if !text.status.success() {
            bail!("loopguard completions {shell} failed");
        }
        fs::write(completions.join(file), text.stdout)?;
    }
    if !succeeds(Command::new("cargo").args(["deb", "--version"])) {
        eprintln!("xtask: installing cargo-deb (cargo install --locked cargo-deb)");
        status(Command::new("cargo").args(["install", "--locked", "cargo-deb"]))?;
    }
    status(
        Command::new("cargo")
            .current_dir(&root)
            .args(["deb", "-p", "loopguard", "--no-build", "--output"])
            .arg(&out),
    )?;
    let deb = fs::read_dir(&out)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("no .deb in target/dist")?;
    eprintln!("xtask: built {}", deb.display());
    if check {
        check_package(&deb)?;
        check_manifests(&root)?;
        check_alert_rules(&root)?;
    }
    Ok(())
}

/// The Prometheus alert rules the package ships: valid, and each firing
/// on the series that should fire it (promtool's unit tests).
fn check_alert_rules(root: &Path) -> Result<()> {
    let dir = root.join("deploy/prometheus");
    status(
        Command::new("promtool")
            .args(["check", "rules"])
            .arg(dir.join("loopguard.rules.yml")),
    )?;
    status(Command::new("promtool").current_dir(&dir).args([
        "test",
        "rules",
        "loopguard.rules.test.yml",
    ]))
}

/// The Kubernetes manifest against the Kubernetes schemas, strictly (an
/// unknown field is an error): kubernetes-validate, from PyPI, in a
/// virtualenv of its own under target/ (Debian's Python is externally
/// managed: PEP 668).
fn check_manifests(root: &Path) -> Result<()> {
    let venv = root.join("target/tools/venv");
    let python = venv.join("bin/python3");
    let module = || {
        let mut c = Command::new(&python);
        c.args(["-m", "kubernetes_validate"]);
        c
    };
    if !succeeds(module().arg("--version")) {
        eprintln!(
            "xtask: installing kubernetes-validate (PyPI) into {}",
            venv.display()
        );
        status(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        status(Command::new(&python).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "kubernetes-validate",
        ]))?;
    }
    status(
        module()
            .arg("--strict")
            .arg(root.join("deploy/kubernetes/loopguard.yaml")),
    )
}

/// Installs `deb`, checks what it put in place, purges it and checks that
/// nothing of it is left.
fn check_package(deb: &Path) -> Result<()> {
    if !is_root() {
        bail!("dist --check installs the package: run as root");
    }
    if succeeds(Command::new("dpkg").args(["-s", "loopguard"])) {
        bail!("a loopguard package is installed already; dist --check will not touch it");
    }
    status(Command::new("dpkg").arg("-i").arg(deb))?;
    let files = Command::new("dpkg").args(["-L", "loopguard"]).output()?;
    let files: Vec<String> = String::from_utf8_lossy(&files.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    let result = (|| -> Result<()> {
        let version = Command::new("/usr/sbin/loopguard")
            .arg("--version")
            .output()?;
        let version = String::from_utf8_lossy(&version.stdout);
        if !version.starts_with("loopguard ") {
            bail!("/usr/sbin/loopguard --version printed {version:?}");
        }
        if !succeeds(Command::new("man").args(["-w", "loopguard-apply"])) {
            bail!("man -w loopguard-apply finds no page");
        }
        for f in [
            "/usr/share/bash-completion/completions/loopguard",
            "/usr/share/zsh/vendor-completions/_loopguard",
            "/usr/share/fish/vendor_completions.d/loopguard.fish",
            "/lib/systemd/system/loopguard.service",
            "/etc/logrotate.d/loopguard",
            "/etc/loopguard/policy.toml",
            "/usr/share/loopguard/prometheus/loopguard.rules.yml",
        ] {
            if !Path::new(f).exists() {
                bail!("{f} is not installed");
            }
        }
        if !succeeds(Command::new("getent").args(["group", "loopguard-audit"])) {
            bail!("postinst did not create the loopguard-audit group");
        }
        // The shipped policy is one the installed binary accepts.
        status(Command::new("/usr/sbin/loopguard").args(["check", "/etc/loopguard/policy.toml"]))?;
        Ok(())
    })();
    // Another instance's files: a purge takes only the packaged
    // instance's own.
    let others = [
        "/run/loopguard/lg-dist-other.lock",
        "/var/log/loopguard/lg-dist-other.jsonl",
        "/var/lib/loopguard/lg-dist-other/state.json",
    ];
    for f in others {
        let p = Path::new(f);
        if let Some(dir) = p.parent() {
            fs::create_dir_all(dir)?;
        }
        fs::write(p, "")?;
    }
    status(Command::new("dpkg").args(["-P", "loopguard"]))?;
    let kept = others.iter().all(|f| Path::new(f).exists());
    for f in others {
        let _ = fs::remove_file(f);
    }
    let _ = fs::remove_dir("/var/lib/loopguard/lg-dist-other");
    for dir in ["/var/log/loopguard", "/var/lib/loopguard"] {
        let _ = fs::remove_dir(dir);
    }
    result?;
    if !kept {
        bail!("dpkg -P deleted another instance's files ({others:?})");
    }
    let left: Vec<&String> = files
        .iter()
        .filter(|f| {
            let p = Path::new(f.as_str());
            // Directories other packages share stay (/usr/share/man/...).
            p.exists() && !p.is_dir()
        })
        .collect();
    if !left.is_empty() {
        bail!("dpkg -P left {left:?}");
    }
    for gone in [
        "/etc/loopguard",
        "/var/log/loopguard/loopguard.jsonl",
        "/var/lib/loopguard/loopguard",
        "/run/loopguard/loopguard",
        "/sys/fs/bpf/loopguard",
    ] {
        if Path::new(gone).exists() {
            bail!("dpkg -P left {gone}");
        }
    }
    if succeeds(Command::new("getent").args(["group", "loopguard-audit"])) {
        bail!("dpkg -P left the loopguard-audit group");
    }
    eprintln!("xtask: dist check: installed, checked, purged; nothing left");
    Ok(())
}
