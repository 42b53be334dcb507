//! Which qemu to install for the kernel matrix, so that it fits the qemu
//! packages already on the machine.
//!
//! The machine image may ship `qemu-utils` from a newer suite than the
//! system's own (Debian 12's image carries 10.0.2 from bookworm-backports,
//! which Breaks `qemu-system-common (<< 1:8.0)`), while Debian 12's own
//! `qemu-system-x86` is 7.2. Installing that one would remove qemu-utils.
//! Every qemu binary package comes from the one `qemu` source package, so
//! the rule is: take `qemu-system-x86` at the same upstream version as the
//! qemu packages that are installed, from whichever suite has it, adding the
//! Debian suite the installed version came from when apt does not list it.
//! Never remove or downgrade a package.
//!
//! The decision ([`choose`]) is a pure function of `apt-cache policy`'s
//! output, unit-tested with recorded outputs in `apt-policy/`.

use std::{fs, path::Path, process::Command};

use anyhow::{bail, Context as _, Result};

/// The package the matrix boots its kernels with.
const SYSTEM: &str = "qemu-system-x86";
/// Other binary packages of the `qemu` source package that an image may
/// already carry; `qemu-system-x86` must match their version.
const SIBLINGS: &[&str] = &["qemu-utils", "qemu-system-common", "qemu-block-extra"];
/// The apt source this file adds, when it adds one; named so that an
/// operator can tell where it came from and remove it.
const ADDED_SOURCE: &str = "/etc/apt/sources.list.d/loopguard-xtask-qemu.sources";

/// One package in `apt-cache policy`'s output.
#[derive(Debug, Default, PartialEq, Eq)]
struct Policy {
    name: String,
    installed: Option<String>,
    candidate: Option<String>,
    /// Each version apt knows, with the suites that offer it (`bookworm`,
    /// `bookworm-backports`); a version only in dpkg's status has none.
    versions: Vec<(String, Vec<String>)>,
}

/// What to do to have a `qemu-system-x86` that fits.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Choice {
    /// Installed already.
    Installed,
    /// `apt-get install qemu-system-x86` from the default suites.
    Default,
    /// `apt-get install -t SUITE qemu-system-x86`: the installed qemu
    /// packages came from that suite, which apt already lists.
    FromSuite(String),
    /// The suite is not among apt's sources: add it (same archive as the
    /// system's own suites), update, then decide again.
    AddSuite(String),
}

/// Parses `apt-cache policy PKG...`.
fn parse(text: &str) -> Vec<Policy> {
    let mut out: Vec<Policy> = Vec::new();
    let mut in_table = false;
    for line in text.lines() {
        if !line.starts_with(' ') {
            if let Some(name) = line.strip_suffix(':') {
                out.push(Policy {
                    name: name.to_string(),
                    ..Policy::default()
                });
                in_table = false;
            }
            continue;
        }
        let Some(p) = out.last_mut() else { continue };
        let trimmed = line.trim();
        let value = |key: &str| {
            trimmed
                .strip_prefix(key)
                .map(str::trim)
                .filter(|v| *v != "(none)")
                .map(String::from)
        };
        if let Some(v) = value("Installed:") {
            p.installed = Some(v);
        } else if trimmed.starts_with("Installed:") {
            p.installed = None;
        } else if let Some(v) = value("Candidate:") {
            p.candidate = Some(v);
        } else if trimmed == "Version table:" {
            in_table = true;
        } else if in_table {
            // A version line is indented less than its source lines and
            // may start with `***` (the installed one):
            //  *** 1:10.0.2+ds-2+deb13u1~bpo12+1 100
            //         100 /var/lib/dpkg/status
            //      1:7.2+dfsg-7+deb12u18+b3 500
            //         500 http://deb.debian.org/debian bookworm/main amd64 Packages
            let words: Vec<&str> = trimmed
                .trim_start_matches("***")
                .split_whitespace()
                .collect();
            let is_source = words.first().is_some_and(|w| w.parse::<i64>().is_ok());
            if is_source {
                // `PRIO URI SUITE/COMPONENT ARCH Packages`; dpkg's status
                // file names no suite.
                if let (Some(suite), Some(v)) = (words.get(2), p.versions.last_mut()) {
                    let suite = suite.split('/').next().unwrap_or(suite);
                    v.1.push(suite.to_string());
                }
            } else if let Some(version) = words.first() {
                p.versions.push(((*version).to_string(), Vec::new()));
            }
        }
    }
    out
}

/// `[epoch:]upstream`: a Debian version without its revision, so that
/// qemu-system-data's `7.2+dfsg-7+deb12u18` and qemu-system-x86's binNMU
/// `7.2+dfsg-7+deb12u18+b3` agree.
fn upstream(version: &str) -> &str {
    version.rsplit_once('-').map_or(version, |(u, _)| u)
}

/// The Debian suite a version was built for, when its version says so:
/// `~bpo12+1` is bookworm-backports.
fn suite_of(version: &str, codename: &str) -> Option<String> {
    let bpo = version.split('~').find_map(|p| p.strip_prefix("bpo"))?;
    let release: String = bpo.chars().take_while(char::is_ascii_digit).collect();
    let named = match release.as_str() {
        "11" => "bullseye",
        "12" => "bookworm",
        "13" => "trixie",
        _ => codename,
    };
    Some(format!("{named}-backports"))
}

/// Decides from `apt-cache policy qemu-system-x86 SIBLINGS...` on a system
/// whose codename is `codename`. An error names the conflicting package and
/// versions, and what would resolve it.
pub(crate) fn choose(policy_text: &str, codename: &str) -> Result<Choice> {
    let policies = parse(policy_text);
    let system = policies
        .iter()
        .find(|p| p.name == SYSTEM)
        .with_context(|| format!("apt-cache policy printed nothing for {SYSTEM}"))?;
    if system.installed.is_some() {
        return Ok(Choice::Installed);
    }
    // The installed siblings, the newest first: qemu-system-x86 must match
    // them all, and they all come from one source package.
    let installed: Vec<(&str, &str)> = policies
        .iter()
        .filter(|p| SIBLINGS.contains(&p.name.as_str()))
        .filter_map(|p| Some((p.name.as_str(), p.installed.as_deref()?)))
        .collect();
    let Some(&(sibling, version)) = installed.first() else {
        return Ok(Choice::Default);
    };
    if let Some(&(other, other_version)) = installed
        .iter()
        .find(|(_, v)| upstream(v) != upstream(version))
    {
        bail!(
            "{sibling} {version} and {other} {other_version} are installed: two qemu versions \
             from one source package; align them first (apt-get install {other}={version})"
        );
    }
    let wanted = upstream(version);
    if system
        .candidate
        .as_deref()
        .is_some_and(|c| upstream(c) == wanted)
    {
        return Ok(Choice::Default);
    }
    if let Some((_, suites)) = system
        .versions
        .iter()
        .find(|(v, suites)| upstream(v) == wanted && !suites.is_empty())
    {
        return Ok(Choice::FromSuite(suites[0].clone()));
    }
    let available: Vec<&str> = system.versions.iter().map(|(v, _)| v.as_str()).collect();
    match suite_of(version, codename) {
        Some(suite)
            if !policies
                .iter()
                .any(|p| p.versions.iter().any(|(_, s)| s.contains(&suite))) =>
        {
            Ok(Choice::AddSuite(suite))
        }
        Some(suite) => bail!(
            "{sibling} {version} is installed, and {suite} is among apt's sources, but it \
             offers no {SYSTEM} {wanted} (apt knows {available:?}); run `apt-get update`, or \
             install {SYSTEM} from where {sibling} came from"
        ),
        None => bail!(
            "{sibling} {version} is installed, and no suite apt knows offers {SYSTEM} {wanted} \
             (apt knows {available:?}); installing one of those would remove {sibling}. Add the \
             suite {sibling} came from to apt's sources, or downgrade it first \
             (apt-get install --allow-downgrades {sibling}={})",
            system.candidate.as_deref().unwrap_or("VERSION")
        ),
    }
}

/// The system's codename (`bookworm`).
fn codename() -> Result<String> {
    let text = fs::read_to_string("/etc/os-release").context("read /etc/os-release")?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_string())
        .context("/etc/os-release names no VERSION_CODENAME")
}

fn apt_policy() -> Result<String> {
    let out = Command::new("apt-cache")
        .arg("policy")
        .arg(SYSTEM)
        .args(SIBLINGS)
        .output()
        .context("run apt-cache policy")?;
    if !out.status.success() {
        bail!(
            "apt-cache policy failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The archive URI the system's own suites come from (deb822 or one-line
/// sources), for adding a sibling suite of the same archive.
fn debian_uri(codename: &str) -> String {
    let mut texts = Vec::new();
    for path in ["/etc/apt/sources.list", "/etc/apt/sources.list.d"] {
        let p = Path::new(path);
        if p.is_dir() {
            for e in fs::read_dir(p).into_iter().flatten().flatten() {
                texts.extend(fs::read_to_string(e.path()).ok());
            }
        } else {
            texts.extend(fs::read_to_string(p).ok());
        }
    }
    for text in &texts {
        // deb822: a stanza with `Suites: CODENAME ...` and its `URIs:`.
        for stanza in text.split("\n\n") {
            let field = |k: &str| {
                stanza
                    .lines()
                    .find_map(|l| l.strip_prefix(k))
                    .map(str::trim)
            };
            if field("Suites:").is_some_and(|s| s.split_whitespace().any(|s| s == codename)) {
                if let Some(uri) = field("URIs:").and_then(|u| u.split_whitespace().next()) {
                    return uri.to_string();
                }
            }
        }
        // One-line: `deb URI CODENAME main`.
        for l in text.lines() {
            let w: Vec<&str> = l.split_whitespace().collect();
            if w.first() == Some(&"deb") && w.get(2) == Some(&codename) {
                if let Some(uri) = w.get(1) {
                    return (*uri).to_string();
                }
            }
        }
    }
    "http://deb.debian.org/debian".to_string()
}

fn install(suite: Option<&str>) -> Result<()> {
    let mut cmd = Command::new("apt-get");
    cmd.args([
        "install",
        "-y",
        "-q",
        "--no-install-recommends",
        "--no-remove",
    ])
    .env("DEBIAN_FRONTEND", "noninteractive");
    if let Some(s) = suite {
        cmd.args(["-t", s]);
    }
    cmd.arg(SYSTEM);
    let status = cmd.status().context("run apt-get install")?;
    if !status.success() {
        bail!(
            "apt-get could not install {SYSTEM}{} without removing a package (exit {status}); \
             `apt-cache policy {SYSTEM} {}` shows the versions it knows",
            suite.map(|s| format!(" from {s}")).unwrap_or_default(),
            SIBLINGS.join(" ")
        );
    }
    Ok(())
}

/// Installs a `qemu-system-x86` that fits the installed qemu packages,
/// saying what it does first. Idempotent.
pub(crate) fn ensure() -> Result<()> {
    let codename = codename()?;
    let mut added = false;
    loop {
        match choose(&apt_policy()?, &codename)? {
            Choice::Installed => return Ok(()),
            Choice::Default => {
                eprintln!("xtask: installing {SYSTEM} from the system's own suites");
                return install(None);
            }
            Choice::FromSuite(suite) => {
                eprintln!(
                    "xtask: installing {SYSTEM} from {suite}, the suite the installed qemu \
                     packages come from (a {codename} {SYSTEM} would remove them)"
                );
                return install(Some(&suite));
            }
            Choice::AddSuite(suite) => {
                if added {
                    bail!("added {suite} to apt's sources ({ADDED_SOURCE}), but apt still does not offer it");
                }
                let uri = debian_uri(&codename);
                eprintln!(
                    "xtask: the installed qemu packages come from {suite}, which apt does not \
                     list; adding it ({uri}, main, in {ADDED_SOURCE}) to install a {SYSTEM} \
                     that matches them"
                );
                fs::write(
                    ADDED_SOURCE,
                    format!(
                        "# Added by loopguard's `cargo xtask setup`: {SYSTEM} to match the\n\
                         # installed qemu packages, which came from {suite}.\n\
                         Types: deb\nURIs: {uri}\nSuites: {suite}\nComponents: main\n\
                         Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
                    ),
                )
                .with_context(|| format!("write {ADDED_SOURCE}"))?;
                crate::status(Command::new("apt-get").args(["update", "-q"]))?;
                added = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BPO: &str = "1:10.0.2+ds-2+deb13u1~bpo12+1";

    #[test]
    fn parses_installed_candidate_and_suites() {
        let p = parse(include_str!("apt-policy/backports-utils-no-source.txt"));
        let utils = p
            .iter()
            .find(|p| p.name == "qemu-utils")
            .expect("qemu-utils");
        assert_eq!(utils.installed.as_deref(), Some(BPO));
        assert_eq!(utils.versions[0], (BPO.to_string(), vec![]));
        assert_eq!(utils.versions[1].1, vec!["bookworm".to_string()]);
        let system = p.iter().find(|p| p.name == SYSTEM).expect(SYSTEM);
        assert_eq!(system.installed, None);
        assert_eq!(
            system.candidate.as_deref(),
            Some("1:7.2+dfsg-7+deb12u18+b3")
        );
    }

    #[test]
    fn plain_debian_12_installs_from_its_own_suites() {
        let text = include_str!("apt-policy/plain-debian-12.txt");
        assert_eq!(choose(text, "bookworm").expect("choice"), Choice::Default);
        let text = include_str!("apt-policy/plain-debian-12-utils-installed.txt");
        assert_eq!(choose(text, "bookworm").expect("choice"), Choice::Default);
    }

    #[test]
    fn backports_qemu_utils_without_the_source_adds_backports() {
        let text = include_str!("apt-policy/backports-utils-no-source.txt");
        assert_eq!(
            choose(text, "bookworm").expect("choice"),
            Choice::AddSuite("bookworm-backports".into())
        );
    }

    #[test]
    fn backports_qemu_utils_with_the_source_installs_from_backports() {
        let text = include_str!("apt-policy/backports-utils-with-source.txt");
        assert_eq!(
            choose(text, "bookworm").expect("choice"),
            Choice::FromSuite("bookworm-backports".into())
        );
    }

    #[test]
    fn qemu_already_installed_does_nothing() {
        let text = include_str!("apt-policy/qemu-installed.txt");
        assert_eq!(choose(text, "bookworm").expect("choice"), Choice::Installed);
    }

    #[test]
    fn an_unknown_suite_stops_with_the_package_versions_and_a_command() {
        let text = include_str!("apt-policy/unknown-suite.txt");
        let err = format!(
            "{:#}",
            choose(text, "bookworm").expect_err("no consistent set")
        );
        assert!(err.contains("qemu-utils 1:9.2.0+ds-1"), "{err}");
        assert!(err.contains("1:7.2+dfsg-7+deb12u18+b3"), "{err}");
        assert!(err.contains("apt-get install"), "{err}");
        assert!(!err.contains('\n'), "one line: {err}");
    }

    #[test]
    fn versions_compare_without_their_revision() {
        assert_eq!(upstream("1:7.2+dfsg-7+deb12u18+b3"), "1:7.2+dfsg");
        assert_eq!(upstream(BPO), "1:10.0.2+ds");
        assert_eq!(
            suite_of(BPO, "bookworm").as_deref(),
            Some("bookworm-backports")
        );
        assert_eq!(suite_of("1:7.2+dfsg-7+deb12u18", "bookworm"), None);
    }
}
