//! The eBPF layer: loads the socket address programs, attaches and pins
//! them, and writes a [`Plan`] into their maps with one atomic flip.
//!
//! Layout under `/sys/fs/bpf/<instance>/`: `maps/LG_*`, `programs/<hook>`,
//! `links/<hook>`. The pinned links keep the programs attached after every
//! loopguard process has exited; the next `apply` reuses them and only
//! rewrites map contents.
//!
//! Minimum kernel: 5.7 (bpf_link for cgroup programs, so attachments can be
//! pinned).

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    fs, io,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    maps::{
        lpm_trie::Key, Array, HashMap, IterableMap, LpmTrie, Map, MapData, MapError, PerCpuArray,
    },
    programs::{
        cgroup_sock_addr::CgroupSockAddrAttachType,
        links::{FdLink, PinnedLink},
        CgroupAttachMode, CgroupSockAddr, ProgramError,
    },
    EbpfLoader,
};
use loopguard_common::{
    counter_index, AddrKey, BindEntry, CgroupKey, Config, DecisionKey, ServiceEntry, SlotConfig,
    UidKey, ABI_VERSION, ADDR_KEY_SLOT_BITS, COUNT_KINDS, DEFAULT_BUCKET, LIST_ALLOW, LIST_DENY,
    MAX_LOCAL_PREFIXES, MAX_SERVICES, MODE_AUDIT, MODE_ENFORCE, NO_SLOT, PORT_SPACE, PROTO_TCP,
    PROTO_UDP, SLOTS, SLOT_PRISTINE, SLOT_WRITING, SLOT_WRITTEN, VERDICT_ALLOW, VERDICT_DENY,
};

pub mod attest;
mod batch;

use crate::{
    compile::Plan,
    paths::InstancePaths,
    policy::{ListKind, Mode, Transport, Verdict},
    scope::LocalTable,
};

/// The object built by build.rs from loopguard-ebpf.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/loopguard-programs"));

/// Program names in the object, in attach order.
pub const PROGRAMS: [&str; 6] = [
    "loopguard_connect4",
    "loopguard_connect6",
    "loopguard_sendmsg4",
    "loopguard_sendmsg6",
    "loopguard_bind4",
    "loopguard_bind6",
];

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("failed to load the eBPF object")]
    Object(#[source] aya::EbpfError),
    #[error("the kernel refused program {name} (run with --verbose for the verifier log)")]
    Verifier {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("map {0} is missing")]
    MissingMap(&'static str),
    #[error("failed to attach {name} to {cgroup}")]
    Attach {
        name: &'static str,
        cgroup: PathBuf,
        #[source]
        source: ProgramError,
    },
    #[error("{context}")]
    Map {
        context: String,
        #[source]
        source: MapError,
    },
    #[error("{context}")]
    Pin {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "the kernel's local routing table has {count} prefixes; the eBPF layer holds at most {max}"
    )]
    LocalTooLarge { count: usize, max: u32 },
    #[error("instance {instance} already has programs attached to {cgroup} (program id {program}), but its pins are not visible under {pins} (bpffs mounted elsewhere, or another mount namespace); attaching again would leave two sets enforcing different policies. Run `loopguard --instance {instance} remove` where the pins are visible, or detach program {program} (bpftool cgroup detach)")]
    AttachedElsewhere {
        instance: String,
        cgroup: PathBuf,
        program: u32,
        pins: PathBuf,
    },
    #[error("instance {instance} was installed by a loopguard with another map layout (ABI {found}, this is {ABI_VERSION}); run `loopguard --instance {instance} remove` first")]
    Abi { instance: String, found: u32 },
}

impl EbpfError {
    /// The full chain, with the verifier log when there is one.
    pub fn verifier_log(&self) -> Option<String> {
        match self {
            EbpfError::Verifier { source, .. } => Some(format!("{source:?}")),
            _ => None,
        }
    }
}

fn map_err(context: impl Into<String>) -> impl FnOnce(MapError) -> EbpfError {
    let context = context.into();
    move |source| EbpfError::Map { context, source }
}

fn pin_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> EbpfError {
    let context = context.into();
    move |source| EbpfError::Pin { context, source }
}

/// Typed handles on the instance's maps.
pub struct Maps {
    pub config: Array<MapData, Config>,
    pub slot_config: Array<MapData, SlotConfig>,
    pub port_atoms: Array<MapData, u32>,
    pub addr_atoms: LpmTrie<MapData, AddrKey, u32>,
    pub decisions: HashMap<MapData, DecisionKey, u32>,
    pub services: Array<MapData, ServiceEntry>,
    pub uids: HashMap<MapData, UidKey, u8>,
    pub cgroups: HashMap<MapData, CgroupKey, u8>,
    pub binds: HashMap<MapData, DecisionKey, BindEntry>,
    pub local: LpmTrie<MapData, [u8; 16], u32>,
    pub counters: Array<MapData, u64>,
    /// Events lost to a full ring.
    pub dropped: PerCpuArray<MapData, u64>,
}

/// Pinned under `maps/`. LG_EVENTS is opened by `loopguard run`.
pub const MAP_NAMES: [&str; 13] = [
    "LG_CONFIG",
    "LG_SLOT_CONFIG",
    "LG_PORT_ATOMS",
    "LG_ADDR_ATOMS",
    "LG_DECISIONS",
    "LG_SERVICES",
    "LG_UIDS",
    "LG_CGROUPS",
    "LG_BINDS",
    "LG_LOCAL",
    "LG_COUNTERS",
    "LG_EVENTS",
    "LG_DROPPED",
];

impl Maps {
    fn from_maps(
        mut get: impl FnMut(&'static str) -> Result<Map, EbpfError>,
    ) -> Result<Self, EbpfError> {
        macro_rules! typed {
            ($name:literal) => {
                get($name)?.try_into().map_err(map_err(concat!(
                    "map ",
                    $name,
                    " has an unexpected type"
                )))?
            };
        }
        Ok(Maps {
            config: typed!("LG_CONFIG"),
            slot_config: typed!("LG_SLOT_CONFIG"),
            port_atoms: typed!("LG_PORT_ATOMS"),
            addr_atoms: typed!("LG_ADDR_ATOMS"),
            decisions: typed!("LG_DECISIONS"),
            services: typed!("LG_SERVICES"),
            uids: typed!("LG_UIDS"),
            cgroups: typed!("LG_CGROUPS"),
            binds: typed!("LG_BINDS"),
            local: typed!("LG_LOCAL"),
            counters: typed!("LG_COUNTERS"),
            dropped: typed!("LG_DROPPED"),
        })
    }

    /// Opens the pinned maps of an installed instance. LG_CONFIG (whose
    /// layout every ABI keeps) is read first: maps pinned by a loopguard
    /// of another ABI are refused as such, not as a map "of an unexpected
    /// type" (LG_COUNTERS was per-CPU before ABI 6).
    pub fn open_pinned(paths: &InstancePaths) -> Result<Self, EbpfError> {
        let open = |name: &str| {
            let path = paths.maps_dir.join(name);
            let data = MapData::from_pin(&path).map_err(map_err(format!(
                "failed to open pinned map {}",
                path.display()
            )))?;
            Map::from_map_data(data).map_err(map_err(format!("map {name}")))
        };
        let config = open("LG_CONFIG")?;
        let view: Array<&MapData, Config> = (&config)
            .try_into()
            .map_err(map_err("map LG_CONFIG has an unexpected type"))?;
        let found = view
            .get(&0, 0)
            .map_err(map_err("failed to read LG_CONFIG"))?
            .abi_version;
        if found != ABI_VERSION {
            return Err(EbpfError::Abi {
                instance: paths.instance.clone(),
                found,
            });
        }
        let mut config = Some(config);
        Self::from_maps(|name| match config.take() {
            Some(map) if name == "LG_CONFIG" => Ok(map),
            kept => {
                config = kept;
                open(name)
            }
        })
    }

    pub fn config(&self) -> Result<Config, EbpfError> {
        self.config
            .get(&0, 0)
            .map_err(map_err("failed to read LG_CONFIG"))
    }

    /// Events lost to a full ring, summed over CPUs.
    pub fn dropped(&self) -> Result<u64, EbpfError> {
        let values = self
            .dropped
            .get(&0, 0)
            .map_err(map_err("failed to read LG_DROPPED"))?;
        Ok(values.iter().sum())
    }

    pub fn counter(&self, slot: u32, bucket: u32, kind: u32) -> Result<u64, EbpfError> {
        self.counters
            .get(&counter_index(slot, bucket, kind), 0)
            .map_err(map_err("failed to read LG_COUNTERS"))
    }
}

/// The plan id the eBPF layer enforces (its active slot's), `None` when no
/// slot is in force.
pub fn plan_in_force(maps: &Maps) -> Result<Option<u64>, EbpfError> {
    let config = maps.config()?;
    if config.active_slot >= SLOTS {
        return Ok(None);
    }
    let slot = maps
        .slot_config
        .get(&config.active_slot, 0)
        .map_err(map_err("failed to read LG_SLOT_CONFIG"))?;
    Ok(Some(slot.plan_id))
}

/// Whether the instance's programs are attached (all links pinned).
pub fn is_installed(paths: &InstancePaths) -> bool {
    PROGRAMS.iter().all(|p| paths.links_dir.join(p).exists())
}

/// What [`install`] did.
pub struct Installed {
    pub maps: Maps,
    /// Programs were loaded and attached now (not reused from pins).
    pub fresh: bool,
    /// Hooks whose pinned links were dead or elsewhere and were attached
    /// anew to the cgroup, each with what was wrong.
    pub reattached: Vec<(&'static str, attest::LinkFault)>,
}

/// Whether every map and program of the instance is pinned: links can
/// then be attached anew from the pins, keeping the maps' contents.
fn programs_and_maps_pinned(paths: &InstancePaths) -> bool {
    PROGRAMS.iter().all(|p| paths.progs_dir.join(p).exists())
        && MAP_NAMES.iter().all(|m| paths.maps_dir.join(m).exists())
}

/// The attach type of a hook in [`PROGRAMS`].
fn attach_type(hook: &str) -> CgroupSockAddrAttachType {
    match hook {
        "loopguard_connect4" => CgroupSockAddrAttachType::Connect4,
        "loopguard_connect6" => CgroupSockAddrAttachType::Connect6,
        "loopguard_sendmsg4" => CgroupSockAddrAttachType::UDPSendMsg4,
        "loopguard_sendmsg6" => CgroupSockAddrAttachType::UDPSendMsg6,
        "loopguard_bind4" => CgroupSockAddrAttachType::Bind4,
        _ => CgroupSockAddrAttachType::Bind6,
    }
}

/// Attaches the pinned program of `hook` to `cgroup` anew and pins the new
/// link in place of the old one, whose unpinning detaches it (from a
/// removed cgroup, another one, or nothing). The new link is attached
/// before the old one goes: a live hook is never left without one.
fn reattach(paths: &InstancePaths, hook: &'static str, cgroup: &Path) -> Result<(), EbpfError> {
    let attach_err = |source| EbpfError::Attach {
        name: hook,
        cgroup: cgroup.to_path_buf(),
        source,
    };
    let cgroup_dir = fs::File::open(cgroup).map_err(pin_err(format!(
        "failed to open cgroup {}",
        cgroup.display()
    )))?;
    let mut prog = CgroupSockAddr::from_pin(paths.progs_dir.join(hook), attach_type(hook))
        .map_err(attach_err)?;
    let id = prog
        .attach(&cgroup_dir, CgroupAttachMode::Single)
        .map_err(attach_err)?;
    let link = prog.take_link(id).map_err(attach_err)?;
    let link = FdLink::try_from(link).map_err(|e| EbpfError::Pin {
        context: format!("{hook} was attached without a bpf_link"),
        source: io::Error::other(e),
    })?;
    // Pinned under a temporary name, then renamed over the old pin (bpffs
    // renames atomically): at every moment a link is pinned for the hook,
    // and the old one detaches only once its pin is replaced.
    crate::files::private_dir(&paths.links_dir).map_err(pin_err(format!(
        "failed to create {}",
        paths.links_dir.display()
    )))?;
    let pin = paths.links_dir.join(hook);
    // bpffs refuses names with a dot.
    let fresh = paths.links_dir.join(format!("{hook}_new"));
    let _ = fs::remove_file(&fresh);
    link.pin(&fresh).map_err(|e| EbpfError::Pin {
        context: format!("failed to pin the link of {hook}"),
        source: io::Error::other(e),
    })?;
    fs::rename(&fresh, &pin).map_err(pin_err(format!(
        "failed to move the link of {hook} into place"
    )))?;
    Ok(())
}

/// A loader built before the policy was read ([`build_loader_early`]).
static EARLY_LOADER: Mutex<Option<EbpfLoader<'static>>> = Mutex::new(None);

/// A loader without the kernel's BTF: the programs use no CO-RE
/// relocations (they read only their context and helpers), and kernels
/// without BTF load them the same way. aya 0.14 reads and parses
/// /sys/kernel/btf/vmlinux in `EbpfLoader::new()` regardless (5.5 MB of
/// file, ~17 MB resident at the peak of the parse, measured on 6.18), and
/// has no constructor without it: `.btf(None)` frees it at once.
fn bare_loader() -> EbpfLoader<'static> {
    let mut loader = EbpfLoader::new();
    loader.btf(None);
    loader
}

fn loader() -> EbpfLoader<'static> {
    let early = EARLY_LOADER.lock().ok().and_then(|mut l| l.take());
    early.unwrap_or_else(bare_loader)
}

/// Builds the loader now, when the instance's programs are not installed
/// yet (the next apply will load them): called before the policy is read,
/// the parse of the kernel's BTF that aya does unasked peaks while the
/// process holds little, and the policy's memory reuses what it freed.
/// Built later, on top of a 10,000-service plan, it raised `run`'s peak
/// from 26 MiB to 39 MiB (measured).
pub fn build_loader_early(paths: &InstancePaths) {
    if is_installed(paths) {
        return;
    }
    let loader = bare_loader();
    if let Ok(mut early) = EARLY_LOADER.lock() {
        *early = Some(loader);
    }
}

/// Reuses the instance's pinned programs and maps, or loads, pins and
/// attaches them to `cgroup` with an empty policy (everything allowed).
pub fn install(
    paths: &InstancePaths,
    cgroup: &Path,
    netns_cookie: u64,
) -> Result<Installed, EbpfError> {
    if programs_and_maps_pinned(paths) {
        // Refuses maps of another ABI.
        let maps = Maps::open_pinned(paths)?;
        // Pins are a claim: each link is read back from the kernel, and one
        // that is gone, detached, or on another cgroup than the path names
        // now (systemd removed the cgroup and made it again) is attached
        // anew. The maps, and so the policy and counts, stay.
        let mut reattached = Vec::new();
        for report in attest::links(paths, cgroup) {
            if let Some(fault) = report.fault {
                reattach(paths, report.hook, cgroup)?;
                reattached.push((report.hook, fault));
            }
        }
        return Ok(Installed {
            maps,
            fresh: false,
            reattached,
        });
    }
    // Pins without links enforce nothing (a crash between pinning and
    // attaching, or a partial remove): start over.
    remove_pins(paths)?;
    if let Some(program) = attached_instance_program(cgroup, &paths.instance) {
        return Err(EbpfError::AttachedElsewhere {
            instance: paths.instance.clone(),
            cgroup: cgroup.to_path_buf(),
            program,
            pins: paths.pin_dir.clone(),
        });
    }
    match load_and_attach(paths, cgroup, netns_cookie) {
        Ok(maps) => Ok(Installed {
            maps,
            fresh: true,
            reattached: Vec::new(),
        }),
        Err(e) => {
            // Detach whatever was attached; the error is the one to report.
            let _ = remove_pins(paths);
            Err(e)
        }
    }
}

fn load_and_attach(
    paths: &InstancePaths,
    cgroup: &Path,
    netns_cookie: u64,
) -> Result<Maps, EbpfError> {
    // The pin directory is root's alone: bpffs is often world-writable
    // (1777) and a local user could otherwise create it first.
    for dir in [
        &paths.pin_dir,
        &paths.maps_dir,
        &paths.progs_dir,
        &paths.links_dir,
    ] {
        crate::files::private_dir(dir)
            .map_err(pin_err(format!("failed to create {}", dir.display())))?;
    }
    // Audit events read pid and comm, which socket address programs may
    // only from 6.0 on; older kernels load the programs without them.
    let events: u8 = u8::from(crate::host::kernel_at_least(6, 0));
    let mut ebpf = loader()
        .override_global("LG_EVENTS_ENABLED", &events, true)
        .load(EBPF_OBJECT)
        .map_err(EbpfError::Object)?;

    for name in MAP_NAMES {
        let map = ebpf.map(name).ok_or(EbpfError::MissingMap(name))?;
        map.pin(paths.maps_dir.join(name))
            .map_err(|e| EbpfError::Pin {
                context: format!("failed to pin map {name}"),
                source: io::Error::other(e),
            })?;
    }
    let mut maps = Maps::from_maps(|name| ebpf.take_map(name).ok_or(EbpfError::MissingMap(name)))?;
    maps.config
        .set(
            0,
            Config {
                active_slot: NO_SLOT,
                abi_version: ABI_VERSION,
                netns_cookie,
                instance_tag: instance_tag(&paths.instance),
            },
            0,
        )
        .map_err(map_err("failed to write LG_CONFIG"))?;

    let cgroup_dir = fs::File::open(cgroup).map_err(pin_err(format!(
        "failed to open cgroup {}",
        cgroup.display()
    )))?;
    for name in PROGRAMS {
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .ok_or(EbpfError::MissingProgram(name))?
            .try_into()
            .map_err(|source| EbpfError::Verifier { name, source })?;
        prog.load()
            .map_err(|source| EbpfError::Verifier { name, source })?;
        prog.pin(paths.progs_dir.join(name))
            .map_err(|e| EbpfError::Pin {
                context: format!("failed to pin program {name}"),
                source: io::Error::other(e),
            })?;
        // A bpf_link attachment always runs alongside other programs on the
        // same hook (systemd, container runtimes, other instances): the
        // kernel treats links as BPF_F_ALLOW_MULTI and rejects any flag, so
        // the mode passed is the flagless default. Every program must allow
        // for the syscall to proceed.
        let id = prog
            .attach(&cgroup_dir, CgroupAttachMode::Single)
            .map_err(|source| EbpfError::Attach {
                name,
                cgroup: cgroup.to_path_buf(),
                source,
            })?;
        let link = prog.take_link(id).map_err(|source| EbpfError::Attach {
            name,
            cgroup: cgroup.to_path_buf(),
            source,
        })?;
        let link = FdLink::try_from(link).map_err(|e| EbpfError::Pin {
            context: format!("{name} was attached without a bpf_link (kernel older than 5.7?)"),
            source: io::Error::other(e),
        })?;
        link.pin(paths.links_dir.join(name))
            .map_err(|e| EbpfError::Pin {
                context: format!("failed to pin the link of {name}"),
                source: io::Error::other(e),
            })?;
    }
    Ok(maps)
}

/// A stable 64-bit tag of an instance name (FNV-1a), never 0.
pub fn instance_tag(instance: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in instance.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h.max(1)
}

/// A program of `instance` attached to `cgroup`, found through the kernel
/// (its config map names the instance), not through pins.
fn attached_instance_program(cgroup: &Path, instance: &str) -> Option<u32> {
    let ids = attest::attached_ids(cgroup, attest::ATTACH_TYPES[0]).unwrap_or_default();
    if ids.is_empty() {
        return None;
    }
    let tag = instance_tag(instance);
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| ids.contains(&p.id()))
        .filter(|p| p.name_as_str().is_some_and(|n| n.starts_with("loopguard_")))
        .find(|p| {
            p.map_ids()
                .ok()
                .flatten()
                .into_iter()
                .flatten()
                .any(|map_id| {
                    let Ok(data) = MapData::from_id(map_id) else {
                        return false;
                    };
                    if !data
                        .info()
                        .is_ok_and(|i| i.name_as_str() == Some("LG_CONFIG"))
                    {
                        return false;
                    }
                    Array::<MapData, Config>::try_from(Map::Array(data))
                        .and_then(|a| a.get(&0, 0))
                        .is_ok_and(|c| c.instance_tag == tag)
                })
        })
        .map(|p| p.id())
}

/// Detaches and unpins everything of the instance. Returns whether there
/// was anything.
pub fn remove_pins(paths: &InstancePaths) -> Result<bool, EbpfError> {
    if !paths.pin_dir.exists() {
        return Ok(false);
    }
    // Stop enforcing first, so no hook runs a half-torn-down policy.
    if let Ok(mut maps) = Maps::open_pinned(paths) {
        if let Ok(mut config) = maps.config() {
            config.active_slot = NO_SLOT;
            let _ = maps.config.set(0, config, 0);
        }
    }
    for name in PROGRAMS {
        let path = paths.links_dir.join(name);
        if path.exists() {
            // Unpinning drops the last reference: the kernel detaches.
            let link = PinnedLink::from_pin(&path).map_err(|e| EbpfError::Pin {
                context: format!("failed to open pinned link {}", path.display()),
                source: io::Error::other(e),
            })?;
            link.unpin()
                .map_err(pin_err(format!("failed to unpin {}", path.display())))?;
        }
    }
    fs::remove_dir_all(&paths.pin_dir).map_err(pin_err(format!(
        "failed to remove {}",
        paths.pin_dir.display()
    )))?;
    Ok(true)
}

fn proto_key(t: Transport) -> u32 {
    match t {
        Transport::Tcp => PROTO_TCP,
        Transport::Udp => PROTO_UDP,
    }
}

fn mode_byte(m: Mode) -> u8 {
    match m {
        Mode::Enforce => MODE_ENFORCE,
        Mode::Audit => MODE_AUDIT,
    }
}

/// Keeps `LG_LOCAL` equal to the kernel's local table: removes what is
/// gone, then adds what is new (a prefix is never missing while it is in
/// both). Returns how many entries changed.
pub fn sync_local(maps: &mut Maps, table: &LocalTable) -> Result<usize, EbpfError> {
    let want: StdHashMap<(u32, [u8; 16]), u32> = table
        .prefixes()
        .iter()
        .map(|(net, kind)| (local_key(net), kind.code()))
        .collect();
    if want.len() > MAX_LOCAL_PREFIXES as usize {
        return Err(EbpfError::LocalTooLarge {
            count: want.len(),
            max: MAX_LOCAL_PREFIXES,
        });
    }
    let have: StdHashMap<(u32, [u8; 16]), u32> = maps
        .local
        .iter()
        .filter_map(Result::ok)
        .map(|(k, v)| ((k.prefix_len(), k.data()), v))
        .collect();
    let mut changed = 0;
    for (&(len, addr), v) in &have {
        if want.get(&(len, addr)) != Some(v) {
            maps.local
                .remove(&Key::new(len, addr))
                .map_err(map_err("failed to update LG_LOCAL"))?;
            changed += 1;
        }
    }
    for (&(len, addr), v) in &want {
        if have.get(&(len, addr)) != Some(v) {
            maps.local
                .insert(&Key::new(len, addr), v, 0)
                .map_err(map_err("failed to update LG_LOCAL"))?;
            changed += 1;
        }
    }
    Ok(changed)
}

/// An `LG_LOCAL` key (prefix length, address): IPv4 as IPv4-mapped IPv6.
fn local_key(net: &ipnet::IpNet) -> (u32, [u8; 16]) {
    match net {
        ipnet::IpNet::V4(n) => (
            96 + u32::from(n.prefix_len()),
            n.network().to_ipv6_mapped().octets(),
        ),
        ipnet::IpNet::V6(n) => (u32::from(n.prefix_len()), n.network().octets()),
    }
}

/// Writes `plan` into the inactive slot and returns it; [`flip`] then puts
/// it in force. Until the flip the previous policy is enforced whole.
/// `previous` (the plan in force) carries per-service counters over by name.
pub fn stage(maps: &mut Maps, plan: &Plan, previous: Option<&Plan>) -> Result<u32, EbpfError> {
    let config = maps.config()?;
    let slot = if config.active_slot == 0 { 1 } else { 0 };
    // A slot nothing was ever written into (the second slot, until the
    // second apply) is all zeros and empty: only what the plan sets is
    // written, and nothing is read back. Any other slot is marked as being
    // written first, so a stage that stops half way is never mistaken for
    // a pristine one.
    let mut slot_config = maps
        .slot_config
        .get(&slot, 0)
        .map_err(map_err("failed to read LG_SLOT_CONFIG"))?;
    let pristine = slot_config.contents == SLOT_PRISTINE;
    slot_config.contents = SLOT_WRITING;
    maps.slot_config
        .set(slot, slot_config, 0)
        .map_err(map_err("failed to write LG_SLOT_CONFIG"))?;
    if !pristine {
        clear_slot(maps, slot)?;
    }

    let services: Vec<(u32, ServiceEntry)> = plan
        .services
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let entry = ServiceEntry {
                list_kind: match s.list {
                    ListKind::Allow => LIST_ALLOW,
                    ListKind::Deny => LIST_DENY,
                },
                mode: mode_byte(s.mode),
                log_allowed: u8::from(s.log_allowed),
                _pad: 0,
                uid_set: s.uid_set,
            };
            (slot * MAX_SERVICES + i as u32, entry)
        })
        .collect();
    write_array(&mut maps.services, &services, "LG_SERVICES")?;
    let uids: Vec<(UidKey, u8)> = plan
        .uid_sets
        .iter()
        .enumerate()
        .flat_map(|(set, uids)| {
            uids.iter().map(move |&uid| {
                let key = UidKey {
                    slot,
                    uid_set: set as u32,
                    uid,
                };
                (key, 1)
            })
        })
        .collect();
    sync_hash(
        &mut maps.uids,
        &uids,
        pristine,
        |k| k.slot == slot,
        "LG_UIDS",
    )?;
    crate::fault::at("mid-stage");
    let mut cgroup_levels = 0u32;
    let cgroups: Vec<(CgroupKey, u8)> = plan
        .cgroup_sets
        .iter()
        .enumerate()
        .flat_map(|(set, cgroups)| {
            cgroups.iter().filter_map(move |c| {
                let key = CgroupKey {
                    slot,
                    uid_set: set as u32,
                    cgroup_id: c.id?,
                };
                Some(((key, 1), c.path.level()))
            })
        })
        .map(|(entry, level)| {
            cgroup_levels |= 1 << level;
            entry
        })
        .collect();
    sync_hash(
        &mut maps.cgroups,
        &cgroups,
        pristine,
        |k| k.slot == slot,
        "LG_CGROUPS",
    )?;
    for (i, net) in plan.nets.iter().enumerate() {
        let (addr, bits) = match net {
            ipnet::IpNet::V4(n) => (
                n.addr().to_ipv6_mapped().octets(),
                96 + u32::from(n.prefix_len()),
            ),
            ipnet::IpNet::V6(n) => (n.addr().octets(), u32::from(n.prefix_len())),
        };
        let key = Key::new(ADDR_KEY_SLOT_BITS + bits, AddrKey { slot, addr });
        maps.addr_atoms
            .insert(&key, i as u32 + 1, 0)
            .map_err(map_err("failed to write LG_ADDR_ATOMS"))?;
    }
    let decisions: Vec<(DecisionKey, u32)> = plan
        .decisions
        .iter()
        .map(|d| {
            let key = DecisionKey {
                slot,
                proto: proto_key(d.transport),
                port_atom: d.port_atom,
                addr_atom: d.addr_atom,
            };
            (key, d.service)
        })
        .collect();
    sync_hash(
        &mut maps.decisions,
        &decisions,
        pristine,
        |k| k.slot == slot,
        "LG_DECISIONS",
    )?;
    let binds: Vec<(DecisionKey, BindEntry)> = plan
        .binds
        .iter()
        .map(|b| {
            let key = DecisionKey {
                slot,
                proto: proto_key(b.transport),
                port_atom: b.port_atom,
                addr_atom: b.addr_atom,
            };
            let entry = BindEntry {
                service: b.service,
                uid_set: b.uid_set,
                enforce_set: b.enforce_set.unwrap_or(loopguard_common::NO_SET),
            };
            (key, entry)
        })
        .collect();
    sync_hash(
        &mut maps.binds,
        &binds,
        pristine,
        |k| k.slot == slot,
        "LG_BINDS",
    )?;
    let mut atom_of_port: Vec<(u32, u32)> = (0..PORT_SPACE)
        .map(|port| (slot * PORT_SPACE + port, 0))
        .collect();
    for (i, a) in plan.port_atoms.iter().enumerate() {
        for p in a.first..=a.last {
            atom_of_port[p as usize].1 = i as u32 + 1;
        }
    }
    // Written whole: reading the slot back to write only the differences
    // costs as much as the write (~18 ms for 65,536 entries, measured).
    // A pristine slot is zeros already.
    if pristine {
        atom_of_port.retain(|&(_, atom)| atom != 0);
    }
    write_array(&mut maps.port_atoms, &atom_of_port, "LG_PORT_ATOMS")?;
    write_counters(maps, slot, config.active_slot, plan, previous, pristine)?;
    maps.slot_config
        .set(
            slot,
            SlotConfig {
                default_verdict: match plan.default {
                    Verdict::Allow => VERDICT_ALLOW,
                    Verdict::Deny => VERDICT_DENY,
                },
                default_mode: mode_byte(plan.mode),
                default_log_allowed: u8::from(plan.log_allowed),
                has_nets: u8::from(!plan.nets.is_empty()),
                has_binds: u8::from(!plan.binds.is_empty()),
                _pad: [0; 3],
                cgroup_levels,
                contents: SLOT_WRITTEN,
                plan_id: plan.id_number(),
            },
            0,
        )
        .map_err(map_err("failed to write LG_SLOT_CONFIG"))?;
    Ok(slot)
}

/// Puts a staged slot in force: one 16-byte array element, written by one
/// syscall, read once by every program run.
pub fn flip(maps: &mut Maps, slot: u32, netns_cookie: u64) -> Result<(), EbpfError> {
    let config = maps.config()?;
    maps.config
        .set(
            0,
            Config {
                active_slot: slot,
                netns_cookie,
                ..config
            },
            0,
        )
        .map_err(map_err("failed to write LG_CONFIG"))
}

/// Removes a slot's entries from the hash maps and trie (arrays are
/// overwritten whole). The slot is inactive, so no program reads it; its
/// contents are from the apply before the previous one.
/// Entries of a slot's LPM trie (the hash maps are synced, the arrays
/// overwritten whole).
fn clear_slot(maps: &mut Maps, slot: u32) -> Result<(), EbpfError> {
    let stale: Vec<Key<AddrKey>> = maps
        .addr_atoms
        .keys()
        .filter_map(Result::ok)
        .filter(|k| k.data().slot == slot)
        .collect();
    for k in &stale {
        maps.addr_atoms
            .remove(k)
            .map_err(map_err("failed to clear LG_ADDR_ATOMS"))?;
    }
    Ok(())
}

fn batch_err(context: String) -> impl FnOnce(io::Error) -> EbpfError {
    move |source| EbpfError::Pin { context, source }
}

/// Writes array entries: one batch, or one by one where the kernel has no
/// batch command.
fn write_array<V: aya::Pod>(
    map: &mut Array<MapData, V>,
    entries: &[(u32, V)],
    name: &str,
) -> Result<(), EbpfError> {
    let (keys, values): (Vec<u32>, Vec<V>) = entries.iter().copied().unzip();
    match batch::update(IterableMap::map(map), &keys, &values) {
        Ok(()) => Ok(()),
        Err(e) if batch::unsupported(&e) => {
            for (k, v) in entries {
                map.set(*k, v, 0)
                    .map_err(map_err(format!("failed to write {name}")))?;
            }
            Ok(())
        }
        Err(e) => Err(batch_err(format!("failed to write {name}"))(e)),
    }
}

fn write_hash<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    entries: &[(K, V)],
    name: &str,
) -> Result<(), EbpfError> {
    let (keys, values): (Vec<K>, Vec<V>) = entries.iter().copied().unzip();
    match batch::update(IterableMap::map(map), &keys, &values) {
        Ok(()) => Ok(()),
        Err(e) if batch::unsupported(&e) => {
            for (k, v) in entries {
                map.insert(k, v, 0)
                    .map_err(map_err(format!("failed to write {name}")))?;
            }
            Ok(())
        }
        Err(e) => Err(batch_err(format!("failed to write {name}"))(e)),
    }
}

fn hash_entries<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &str,
) -> Result<Vec<(K, V)>, EbpfError> {
    match batch::entries::<K, V>(IterableMap::map(map), 4096) {
        Ok(entries) => Ok(entries),
        Err(e) if batch::unsupported(&e) => Ok(map.iter().filter_map(Result::ok).collect()),
        Err(e) => Err(batch_err(format!("failed to read {name}"))(e)),
    }
}

/// Makes a slot's entries of a hash map exactly `wanted`: deletes the
/// others and writes only what is missing or different, so re-applying a
/// similar policy touches few entries (the inactive slot holds the policy
/// before last).
fn sync_hash<K, V>(
    map: &mut HashMap<MapData, K, V>,
    wanted: &[(K, V)],
    pristine: bool,
    in_slot: impl Fn(&K) -> bool,
    name: &str,
) -> Result<(), EbpfError>
where
    K: aya::Pod + Eq + std::hash::Hash,
    V: aya::Pod + PartialEq,
{
    if pristine {
        // Nothing of the slot is in the map.
        return write_hash(map, wanted, name);
    }
    // foldhash: these are tens of thousands of fixed-size keys of our own.
    let current: StdHashMap<K, V, foldhash::fast::RandomState> = hash_entries(map, name)?
        .into_iter()
        .filter(|(k, _)| in_slot(k))
        .collect();
    let keep: HashSet<&K, foldhash::fast::RandomState> = wanted.iter().map(|(k, _)| k).collect();
    let stale: Vec<K> = current
        .keys()
        .filter(|k| !keep.contains(k))
        .copied()
        .collect();
    delete_hash(map, &stale, name)?;
    let changed: Vec<(K, V)> = wanted
        .iter()
        .filter(|(k, v)| current.get(k) != Some(v))
        .copied()
        .collect();
    write_hash(map, &changed, name)
}

fn delete_hash<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    keys: &[K],
    name: &str,
) -> Result<(), EbpfError> {
    match batch::delete(IterableMap::map(map), keys) {
        Ok(()) => Ok(()),
        Err(e) if batch::unsupported(&e) => {
            for k in keys {
                map.remove(k)
                    .map_err(map_err(format!("failed to clear {name}")))?;
            }
            Ok(())
        }
        Err(e) => Err(batch_err(format!("failed to clear {name}"))(e)),
    }
}

/// Zeroes the new slot's counters, then carries over the counts of services
/// kept by name or renamed (and of the default bucket) from the slot in
/// force. In a
/// `pristine` slot, zeros are there already: only counts are written.
fn write_counters(
    maps: &mut Maps,
    slot: u32,
    active: u32,
    plan: &Plan,
    previous: Option<&Plan>,
    pristine: bool,
) -> Result<(), EbpfError> {
    let old_index: StdHashMap<&str, u32> = match (previous, active < SLOTS) {
        (Some(prev), true) => prev
            .services
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i as u32))
            .collect(),
        _ => StdHashMap::new(),
    };
    // A renamed service's counts follow it.
    let renames = previous
        .map(|p| crate::plan_diff::renames(p, plan))
        .unwrap_or_default();
    let buckets: Vec<(u32, Option<u32>)> = plan
        .services
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let old = old_index.get(s.name.as_str()).or_else(|| {
                renames
                    .get(&s.name)
                    .and_then(|was| old_index.get(was.as_str()))
            });
            (i as u32, old.copied())
        })
        .chain([(DEFAULT_BUCKET, (active < SLOTS).then_some(DEFAULT_BUCKET))])
        .collect();
    // The slot in force, read when anything carries over: the buckets of
    // its services (not all MAX_SERVICES), then the default bucket.
    let old = if buckets.iter().any(|(_, o)| o.is_some()) {
        let used = previous
            .map_or(0, |p| p.services.len() as u32)
            .min(MAX_SERVICES);
        let wanted = (0..used)
            .chain([DEFAULT_BUCKET])
            .flat_map(|b| (0..COUNT_KINDS).map(move |k| counter_index(active, b, k)));
        read_counters(
            maps,
            counter_index(active, 0, 0),
            used * COUNT_KINDS,
            wanted,
        )?
    } else {
        StdHashMap::default()
    };
    let entries: Vec<(u32, u64)> = buckets
        .iter()
        .flat_map(|&(bucket, old_bucket)| {
            (0..COUNT_KINDS).map(move |kind| (bucket, old_bucket, kind))
        })
        .map(|(bucket, old_bucket, kind)| {
            let carried = old_bucket
                .and_then(|b| old.get(&counter_index(active, b, kind)))
                .copied()
                .unwrap_or(0);
            (counter_index(slot, bucket, kind), carried)
        })
        .filter(|&(_, count)| !pristine || count != 0)
        .collect();
    write_array(&mut maps.counters, &entries, "LG_COUNTERS")
}

/// The counters at the indexes `wanted`: one batch read of the `len`
/// indexes from `start` (where most of them are), then one by one what the
/// batch did not return (the rest, or all where the kernel has no batch
/// command).
fn read_counters(
    maps: &Maps,
    start: u32,
    len: u32,
    wanted: impl Iterator<Item = u32>,
) -> Result<StdHashMap<u32, u64, foldhash::fast::RandomState>, EbpfError> {
    let map = IterableMap::map(&maps.counters);
    let mut read: StdHashMap<u32, u64, foldhash::fast::RandomState> = match len {
        0 => StdHashMap::default(),
        _ => match batch::array_range::<u64>(map, start, len as usize) {
            Ok(entries) => entries.into_iter().collect(),
            Err(e) if batch::unsupported(&e) => StdHashMap::default(),
            Err(e) => return Err(batch_err("failed to read LG_COUNTERS".into())(e)),
        },
    };
    for index in wanted {
        if let std::collections::hash_map::Entry::Vacant(v) = read.entry(index) {
            let value = maps
                .counters
                .get(&index, 0)
                .map_err(map_err("failed to read LG_COUNTERS"))?;
            v.insert(value);
        }
    }
    Ok(read)
}

/// The pinned ring buffer the programs write audit events to.
pub fn event_ring(paths: &InstancePaths) -> anyhow::Result<aya::maps::RingBuf<MapData>> {
    use anyhow::Context as _;
    let data =
        MapData::from_pin(paths.maps_dir.join("LG_EVENTS")).context("failed to open LG_EVENTS")?;
    aya::maps::RingBuf::try_from(Map::RingBuf(data)).context("LG_EVENTS is not a ring buffer")
}
