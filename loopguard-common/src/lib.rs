//! `#[repr(C)]` types and constants shared by the loopguard eBPF programs and
//! the userspace loader. Every map key and value crosses the kernel boundary
//! as raw bytes, so field order, widths and padding here are an ABI: change
//! them only together with [`ABI_VERSION`].
#![no_std]

/// Bumped whenever a map layout below changes. A pinned instance with another
/// ABI is not reused by `apply` (it asks for `remove` first).
pub const ABI_VERSION: u32 = 7;

/// Two policy slots: `apply` fills the inactive one, then flips
/// [`Config::active_slot`]. Programs read the slot once per call, so each
/// verdict comes from one whole policy.
pub const SLOTS: u32 = 2;
/// [`Config::active_slot`] value meaning "no policy": everything is allowed.
/// Used while programs are attached for the first time and while removing.
pub const NO_SLOT: u32 = u32::MAX;

/// Most services a policy may hold.
pub const MAX_SERVICES: u32 = 16_384;
/// Counter bucket for traffic in scope that no service matches.
pub const DEFAULT_BUCKET: u32 = MAX_SERVICES;
/// Ports 0..=65535, one port-atom entry each, per slot.
pub const PORT_SPACE: u32 = 65_536;
/// Distinct address prefixes (CIDRs) a policy may name.
pub const MAX_NETS: u32 = 4_096;
/// (protocol, port atom, address atom) -> service entries per slot.
pub const MAX_DECISIONS: u32 = 1 << 18;
/// (uid set, uid) membership entries per slot.
pub const MAX_UID_ENTRIES: u32 = 1 << 20;
/// (set, cgroup id) membership entries per slot.
pub const MAX_CGROUP_ENTRIES: u32 = 1 << 16;
/// Deepest cgroup level a list may name. A verdict looks up the calling
/// process's ancestor at each level the policy names ([`SlotConfig::
/// cgroup_levels`]): at most this many lookups, and only when its uid is
/// not on the list already.
pub const MAX_CGROUP_LEVEL: u32 = 16;

/// Prefixes of the kernel's `local` routing table (and the fixed broadcast
/// and multicast ranges) the programs can hold: at least 65,536 (SPEC §1).
pub const MAX_LOCAL_PREFIXES: u32 = 1 << 17;
/// Bits of an address in an `LG_LOCAL` key: IPv4 as IPv4-mapped IPv6.
pub const LOCAL_KEY_BITS: u32 = 128;

/// What the kernel does with a destination of the `local` table (the value
/// of an `LG_LOCAL` entry).
pub const LOCAL_LOCAL: u32 = 1;
pub const LOCAL_BROADCAST: u32 = 2;
pub const LOCAL_ANYCAST: u32 = 3;
pub const LOCAL_MULTICAST: u32 = 4;

/// Address atom of a `bind()` to the wildcard (`0.0.0.0`, `::`), which
/// listens on every address: it is judged against every bind-guarded
/// service on the port, whatever their addresses.
pub const BIND_WILDCARD_ATOM: u32 = u32::MAX;

/// Counter kinds, per service bucket.
pub const COUNT_ALLOWED: u32 = 0;
pub const COUNT_DENIED: u32 = 1;
pub const COUNT_WOULD_DENY: u32 = 2;
pub const COUNT_KINDS: u32 = 3;
/// Entries of the counter array (one shared by the CPUs, added to
/// atomically).
pub const COUNTER_ENTRIES: u32 = SLOTS * (MAX_SERVICES + 1) * COUNT_KINDS;

/// Index into the counter array.
#[inline(always)]
pub const fn counter_index(slot: u32, bucket: u32, kind: u32) -> u32 {
    (slot * (MAX_SERVICES + 1) + bucket) * COUNT_KINDS + kind
}

/// Transport protocols loopguard distinguishes; the value is the key field.
pub const PROTO_TCP: u32 = 0;
pub const PROTO_UDP: u32 = 1;

pub const VERDICT_ALLOW: u8 = 0;
pub const VERDICT_DENY: u8 = 1;
pub const MODE_ENFORCE: u8 = 0;
pub const MODE_AUDIT: u8 = 1;
pub const LIST_ALLOW: u8 = 0;
pub const LIST_DENY: u8 = 1;

/// The one entry of the `LG_CONFIG` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Slot in force, or [`NO_SLOT`].
    pub active_slot: u32,
    pub abi_version: u32,
    /// Network namespace the policy guards (`SO_NETNS_COOKIE` of the
    /// applying process); 0 guards every namespace (kernels before 5.14).
    pub netns_cookie: u64,
    /// Which instance these programs belong to (a hash of its name), so
    /// its attachments are recognised when its pins are out of sight.
    pub instance_tag: u64,
}

/// Per-slot globals of a policy, `LG_SLOT_CONFIG[slot]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotConfig {
    /// Verdict for traffic in scope that no service matches.
    pub default_verdict: u8,
    /// Mode of that default verdict.
    pub default_mode: u8,
    pub default_log_allowed: u8,
    /// Whether any service names explicit addresses; when none does, the
    /// address trie lookup is skipped.
    pub has_nets: u8,
    /// Whether any service guards `bind()`; when none does, the bind hooks
    /// return at once.
    pub has_binds: u8,
    pub _pad: [u8; 3],
    /// Bit `n` set: some list names a cgroup at level `n` (1..=
    /// [`MAX_CGROUP_LEVEL`]); 0 when no list names a cgroup.
    pub cgroup_levels: u32,
    /// What userspace wrote into the slot: [`SLOT_PRISTINE`],
    /// [`SLOT_WRITING`] or [`SLOT_WRITTEN`]. Programs never read it.
    pub contents: u32,
    /// The plan this slot holds (`Plan::id`), so what is in force can be
    /// read back from the kernel.
    pub plan_id: u64,
}

/// [`SlotConfig::contents`]: nothing was ever written into the slot since
/// the maps were created (arrays start zeroed, hash maps and tries empty).
pub const SLOT_PRISTINE: u32 = 0;
/// A stage began writing the slot and did not finish: anything may be in it.
pub const SLOT_WRITING: u32 = 1;
/// The slot holds exactly the plan [`SlotConfig::plan_id`].
pub const SLOT_WRITTEN: u32 = 2;

/// A compiled service, `LG_SERVICES[slot * MAX_SERVICES + id]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceEntry {
    /// [`LIST_ALLOW`] or [`LIST_DENY`].
    pub list_kind: u8,
    pub mode: u8,
    pub log_allowed: u8,
    pub _pad: u8,
    /// Interned uid set; services with equal sets share one.
    pub uid_set: u32,
}

/// Key of `LG_DECISIONS`: the innermost service for one atom of the
/// (protocol x port x address) space.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DecisionKey {
    pub slot: u32,
    pub proto: u32,
    pub port_atom: u32,
    pub addr_atom: u32,
}

/// Value of `LG_BINDS` (keyed like `LG_DECISIONS`, with
/// [`BIND_WILDCARD_ATOM`] for wildcard binds): the uids that may bind there
/// and the service named in events. Every bind-guarded service covering
/// the key must admit the uid: `enforce_set` intersects the enforce-mode
/// services' lists (not in it: deny; [`NO_SET`] when none is in enforce
/// mode), `uid_set` all of them (not in it: would-deny).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BindEntry {
    pub service: u32,
    pub uid_set: u32,
    pub enforce_set: u32,
}

/// "No uid set": nothing to check.
pub const NO_SET: u32 = u32::MAX;

/// Key of `LG_UIDS`: presence means `uid` is in `uid_set`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UidKey {
    pub slot: u32,
    pub uid_set: u32,
    pub uid: u32,
}

/// Key of `LG_CGROUPS`: presence means processes in cgroup `cgroup_id`
/// (the cgroup2 directory's inode number) or below it are in `uid_set`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CgroupKey {
    pub slot: u32,
    pub uid_set: u32,
    pub cgroup_id: u64,
}

/// Data of an `LG_ADDR_ATOMS` LPM-trie key. The prefix length counts the
/// 32 slot bits plus the address bits. Addresses are IPv6, IPv4 as
/// IPv4-mapped (`::ffff:a.b.c.d`), in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AddrKey {
    pub slot: u32,
    pub addr: [u8; 16],
}

/// Bits of [`AddrKey::slot`] in an LPM prefix length.
pub const ADDR_KEY_SLOT_BITS: u32 = 32;

/// Bytes of the `LG_EVENTS` ring buffer (a power of two, a multiple of the
/// page size): about 14,000 events before the reader must catch up.
pub const EVENTS_RING_BYTES: u32 = 1 << 20;

/// Which hook saw an attempt ([`Event::hook`]).
pub const HOOK_CONNECT4: u8 = 0;
pub const HOOK_CONNECT6: u8 = 1;
pub const HOOK_SENDMSG4: u8 = 2;
pub const HOOK_SENDMSG6: u8 = 3;
pub const HOOK_BIND4: u8 = 4;
pub const HOOK_BIND6: u8 = 5;

/// One audit record from the eBPF layer, written to the `LG_EVENTS` ring
/// buffer. `action` is a `COUNT_*` kind (allowed, denied, would-deny).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC.
    pub ktime_ns: u64,
    /// Thread group id (the process id users see).
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    /// Service index in the slot's plan, or [`DEFAULT_BUCKET`].
    pub bucket: u32,
    pub slot: u32,
    /// Destination port, host byte order.
    pub port: u16,
    pub action: u8,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    pub hook: u8,
    pub _pad: [u8; 7],
    /// [`SlotConfig::plan_id`] of the slot that decided (0: unknown).
    pub plan_id: u64,
    /// Destination as the process gave it (IPv4 as IPv4-mapped IPv6); for
    /// a bind hook, the address being bound.
    pub addr: [u8; 16],
    /// `comm` of the calling thread, NUL-padded.
    pub comm: [u8; 16],
    /// cgroup v2 id of the calling process (`bpf_get_current_cgroup_id`).
    pub cgroup_id: u64,
}

#[cfg(feature = "user")]
mod pod {
    //! All are #[repr(C)], Copy, made of integers, with explicit padding
    //! fields, so any bit pattern is valid.
    // SAFETY: repr(C) integers with explicit padding: any bits are valid.
    unsafe impl aya::Pod for super::Config {}
    // SAFETY: repr(C) integers with explicit padding: any bits are valid.
    unsafe impl aya::Pod for super::SlotConfig {}
    // SAFETY: repr(C) integers with explicit padding: any bits are valid.
    unsafe impl aya::Pod for super::ServiceEntry {}
    // SAFETY: repr(C) integers with explicit padding: any bits are valid.
    unsafe impl aya::Pod for super::DecisionKey {}
    // SAFETY: repr(C) integers with explicit padding: any bits are valid.
    unsafe impl aya::Pod for super::UidKey {}
    // SAFETY: repr(C) integers with explicit padding: any bits are valid.
    unsafe impl aya::Pod for super::CgroupKey {}
    // SAFETY: repr(C) integers with explicit padding: any bits are valid.
    unsafe impl aya::Pod for super::BindEntry {}
    // SAFETY: repr(C) integers with explicit padding: any bits are valid.
    unsafe impl aya::Pod for super::AddrKey {}
    // SAFETY: repr(C) integers with explicit padding: any bits are valid.
    unsafe impl aya::Pod for super::Event {}
}
