//! loopguard's programs on the cgroup v2 socket address hooks.
//!
//! One verdict per `connect()` (TCP, TCP Fast Open via its pre-connect hook,
//! connected UDP) and per unconnected UDP send, in the context of the process
//! that asks. Returning 0 makes the syscall fail with `EPERM` before any
//! packet exists.
//!
//! The scope is what the kernel delivers to this host: the loopback range,
//! else one lookup in `LG_LOCAL`, a copy of the kernel's `local` routing
//! table (interface addresses, AnyIP prefixes, broadcast and anycast
//! addresses) plus the multicast ranges. An unspecified destination is
//! judged as the address the kernel really sends to.
//!
//! Every lookup is a fixed number of map operations, independent of the
//! number of services, uids and local prefixes: port -> port atom (array),
//! address -> address atom (LPM trie, only when the policy names
//! addresses), (protocol, atoms) -> service (hash), (uid set, uid) ->
//! member (hash).
//!
//! The `bind4`/`bind6` programs guard who may listen: a `bind()` of a port
//! a service guards, on an in-scope address or the wildcard, by a uid not
//! in its bind list fails with `EPERM`.
//!
//! Minimum kernel: 5.7 for pinned bpf_link attachment of cgroup programs;
//! 5.14 for `SO_NETNS_COOKIE` (without it every namespace is guarded).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// The counters' atomic add (see `finish`): the eBPF build is nightly-only.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(
    target_arch = "bpf",
    allow(
        internal_features,
        reason = "core::intrinsics::atomic_xadd, see `finish`"
    )
)]

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::{bpf_sock, bpf_sock_addr},
        helpers::{
            bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
            generated::{
                bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id,
                bpf_get_netns_cookie, bpf_ktime_get_ns,
            },
        },
        macros::{cgroup_sock_addr, map},
        maps::{lpm_trie::Key, Array, HashMap, LpmTrie, PerCpuArray, RingBuf},
        programs::SockAddrContext,
        EbpfContext as _,
    };
    use loopguard_common::{
        counter_index, AddrKey, BindEntry, CgroupKey, Config, DecisionKey, Event, ServiceEntry,
        SlotConfig, UidKey, ADDR_KEY_SLOT_BITS, BIND_WILDCARD_ATOM, COUNTER_ENTRIES, COUNT_ALLOWED,
        COUNT_DENIED, COUNT_WOULD_DENY, DEFAULT_BUCKET, EVENTS_RING_BYTES, HOOK_BIND4, HOOK_BIND6,
        HOOK_CONNECT4, HOOK_CONNECT6, HOOK_SENDMSG4, HOOK_SENDMSG6, LIST_ALLOW, LOCAL_KEY_BITS,
        LOCAL_LOCAL, MAX_CGROUP_ENTRIES, MAX_CGROUP_LEVEL, MAX_DECISIONS, MAX_LOCAL_PREFIXES,
        MAX_NETS, MAX_SERVICES, MAX_UID_ENTRIES, MODE_AUDIT, MODE_ENFORCE, NO_SET, PORT_SPACE,
        PROTO_TCP, PROTO_UDP, SLOTS, VERDICT_DENY,
    };

    /// `BPF_F_NO_PREALLOC`: the big hash maps are sized for the largest
    /// policy but only pay for the entries a policy uses.
    const NO_PREALLOC: u32 = 1;

    #[map(name = "LG_CONFIG")]
    static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
    #[map(name = "LG_SLOT_CONFIG")]
    static SLOT_CONFIG: Array<SlotConfig> = Array::with_max_entries(SLOTS, 0);
    #[map(name = "LG_PORT_ATOMS")]
    static PORT_ATOMS: Array<u32> = Array::with_max_entries(SLOTS * PORT_SPACE, 0);
    #[map(name = "LG_ADDR_ATOMS")]
    static ADDR_ATOMS: LpmTrie<AddrKey, u32> = LpmTrie::with_max_entries(SLOTS * MAX_NETS, 0);
    #[map(name = "LG_DECISIONS")]
    static DECISIONS: HashMap<DecisionKey, u32> =
        HashMap::with_max_entries(SLOTS * MAX_DECISIONS, NO_PREALLOC);
    /// Bind guards: (protocol, port atom, address atom or wildcard) -> the
    /// uids that may bind there.
    #[map(name = "LG_BINDS")]
    static BINDS: HashMap<DecisionKey, BindEntry> =
        HashMap::with_max_entries(SLOTS * MAX_DECISIONS, NO_PREALLOC);
    #[map(name = "LG_SERVICES")]
    static SERVICES: Array<ServiceEntry> = Array::with_max_entries(SLOTS * MAX_SERVICES, 0);
    #[map(name = "LG_UIDS")]
    static UIDS: HashMap<UidKey, u8> =
        HashMap::with_max_entries(SLOTS * MAX_UID_ENTRIES, NO_PREALLOC);
    /// cgroups on a list: (slot, set, cgroup id) present when processes in
    /// that cgroup or below are on the set's list.
    #[map(name = "LG_CGROUPS")]
    static CGROUPS: HashMap<CgroupKey, u8> =
        HashMap::with_max_entries(SLOTS * MAX_CGROUP_ENTRIES, NO_PREALLOC);
    /// The kernel's `local` routing table (every prefix it delivers to this
    /// host: interface addresses, AnyIP routes, broadcast and anycast
    /// addresses) plus the multicast ranges and the limited broadcast,
    /// kept current by userspace. One LPM lookup, whatever its size.
    #[map(name = "LG_LOCAL")]
    static LOCAL: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(MAX_LOCAL_PREFIXES, 0);
    /// One array shared by the CPUs, added to atomically: a per-CPU array
    /// of this size took 123 ms to create (one per-CPU allocation per
    /// element, measured on 2 CPUs) and holds 8 bytes per element per CPU.
    #[map(name = "LG_COUNTERS")]
    static COUNTERS: Array<u64> = Array::with_max_entries(COUNTER_ENTRIES, 0);
    /// Audit events. A full ring never blocks a connection: the event is
    /// counted in LG_DROPPED instead.
    #[map(name = "LG_EVENTS")]
    static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);
    #[map(name = "LG_DROPPED")]
    static DROPPED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

    /// Set to 1 at load time when the kernel lets socket address programs
    /// read pid and comm (6.0+); at 0 the verifier never sees the event code,
    /// so the policy programs still load on 5.7.
    #[no_mangle]
    static LG_EVENTS_ENABLED: u8 = 0;

    const ALLOW: i32 = 1;
    const DENY: i32 = 0;

    const IPPROTO_TCP: u32 = 6;
    const IPPROTO_UDP: u32 = 17;
    const IPPROTO_MPTCP: u32 = 262;

    #[cgroup_sock_addr(connect4)]
    pub(crate) fn loopguard_connect4(ctx: SockAddrContext) -> i32 {
        check_v4(&ctx, HOOK_CONNECT4)
    }

    #[cgroup_sock_addr(sendmsg4)]
    pub(crate) fn loopguard_sendmsg4(ctx: SockAddrContext) -> i32 {
        check_v4(&ctx, HOOK_SENDMSG4)
    }

    #[cgroup_sock_addr(connect6)]
    pub(crate) fn loopguard_connect6(ctx: SockAddrContext) -> i32 {
        check_v6(&ctx, HOOK_CONNECT6)
    }

    #[cgroup_sock_addr(sendmsg6)]
    pub(crate) fn loopguard_sendmsg6(ctx: SockAddrContext) -> i32 {
        check_v6(&ctx, HOOK_SENDMSG6)
    }

    #[cgroup_sock_addr(bind4)]
    pub(crate) fn loopguard_bind4(ctx: SockAddrContext) -> i32 {
        // SAFETY: the kernel hands every sock_addr program a valid context.
        let sa: &bpf_sock_addr = unsafe { &*ctx.sock_addr };
        check_bind(&ctx, sa, mapped4(sa.user_ip4), HOOK_BIND4)
    }

    #[cgroup_sock_addr(bind6)]
    pub(crate) fn loopguard_bind6(ctx: SockAddrContext) -> i32 {
        // SAFETY: as in loopguard_bind4.
        let sa: &bpf_sock_addr = unsafe { &*ctx.sock_addr };
        check_bind(&ctx, sa, words6(&sa.user_ip6), HOOK_BIND6)
    }

    /// An IPv4 address (network byte order in a u32) as IPv4-mapped IPv6.
    #[inline(always)]
    fn mapped4(ip4: u32) -> [u8; 16] {
        let mut addr = [0u8; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12..16].copy_from_slice(&ip4.to_ne_bytes());
        addr
    }

    /// An IPv6 address from four context words. The verifier allows only
    /// 4-byte loads of them, so each is read on its own.
    #[inline(always)]
    fn words6(words: &[u32; 4]) -> [u8; 16] {
        // Context fields must be read at constant offsets: no loop.
        // SAFETY: fields of a live context or socket.
        let w = unsafe {
            [
                core::ptr::read_volatile(&words[0]),
                core::ptr::read_volatile(&words[1]),
                core::ptr::read_volatile(&words[2]),
                core::ptr::read_volatile(&words[3]),
            ]
        };
        let mut addr = [0u8; 16];
        addr[0..4].copy_from_slice(&w[0].to_ne_bytes());
        addr[4..8].copy_from_slice(&w[1].to_ne_bytes());
        addr[8..12].copy_from_slice(&w[2].to_ne_bytes());
        addr[12..16].copy_from_slice(&w[3].to_ne_bytes());
        addr
    }

    #[inline(always)]
    fn is_mapped(addr: &[u8; 16]) -> bool {
        addr[0..10] == [0u8; 10] && addr[10] == 0xff && addr[11] == 0xff
    }

    #[inline(always)]
    fn is_unspecified(addr: &[u8; 16]) -> bool {
        addr[0..16] == [0u8; 16] || (is_mapped(addr) && addr[12..16] == [0u8; 4])
    }

    /// The socket's bound source address as IPv4, or 0.
    #[inline(always)]
    fn bound_source4(sa: &bpf_sock_addr) -> u32 {
        // SAFETY: `sk` of a sock_addr context is the socket making the call.
        let sk: *const bpf_sock = unsafe { sa.__bindgen_anon_1.sk };
        if sk.is_null() {
            return 0;
        }
        // SAFETY: a readable field of a live socket.
        unsafe { core::ptr::read_volatile(&(*sk).src_ip4) }
    }

    /// Whether the socket is bound to an IPv4-mapped IPv6 address.
    #[inline(always)]
    fn bound_source_is_mapped(sa: &bpf_sock_addr) -> bool {
        // SAFETY: as in bound_source4.
        let sk: *const bpf_sock = unsafe { sa.__bindgen_anon_1.sk };
        if sk.is_null() {
            return false;
        }
        // SAFETY: readable fields of a live socket.
        let src = words6(unsafe { &(*sk).src_ip6 });
        is_mapped(&src)
    }

    /// Whether `addr` is one of the host's own unicast addresses (the
    /// loopback range or a `local` route), as opposed to a broadcast,
    /// anycast or multicast destination.
    #[inline(always)]
    fn is_own(addr: &[u8; 16]) -> bool {
        if is_mapped(addr) && addr[12] == 127 {
            return true;
        }
        let key = Key::new(LOCAL_KEY_BITS, *addr);
        matches!(LOCAL.get(&key), Some(kind) if *kind == LOCAL_LOCAL)
    }

    #[inline(always)]
    fn check_v4(ctx: &SockAddrContext, hook: u8) -> i32 {
        // SAFETY: the kernel hands every sock_addr program a valid context.
        let sa: &bpf_sock_addr = unsafe { &*ctx.sock_addr };
        let requested = mapped4(sa.user_ip4);
        let mut addr = requested;
        if sa.user_ip4 == 0 {
            // 0.0.0.0 goes to the source address the datagram or
            // connection carries, or to 127.0.0.1 when there is none. For
            // a send that is msg_src_ip4 (IP_PKTINFO, else the socket's
            // source); for a connect, the bound address when it is one of
            // the host's own (a socket bound to a broadcast or multicast
            // address has no source).
            let src = if hook == HOOK_SENDMSG4 {
                // SAFETY: msg_src_ip4 is readable in sendmsg4 programs.
                unsafe { core::ptr::read_volatile(&sa.msg_src_ip4) }
            } else {
                bound_source4(sa)
            };
            addr = if src != 0 && is_own(&mapped4(src)) {
                mapped4(src)
            } else {
                mapped4(u32::from_ne_bytes([127, 0, 0, 1]))
            };
        }
        decide(ctx, sa, addr, requested, hook)
    }

    #[inline(always)]
    fn check_v6(ctx: &SockAddrContext, hook: u8) -> i32 {
        // SAFETY: as in check_v4.
        let sa: &bpf_sock_addr = unsafe { &*ctx.sock_addr };
        let requested = words6(&sa.user_ip6);
        let mut addr = requested;
        if is_unspecified(&addr) {
            if is_mapped(&addr) {
                // ::ffff:0.0.0.0 on a dual-stack socket: the IPv4 rule.
                let src = bound_source4(sa);
                addr = if src != 0 && is_own(&mapped4(src)) {
                    mapped4(src)
                } else {
                    mapped4(u32::from_ne_bytes([127, 0, 0, 1]))
                };
            } else if bound_source_is_mapped(sa) {
                // :: from a socket bound to an IPv4-mapped address goes
                // to ::ffff:127.0.0.1.
                addr = mapped4(u32::from_ne_bytes([127, 0, 0, 1]));
            } else {
                // :: is ::1 (the kernel's BSD rule, for TCP and UDP alike).
                addr[15] = 1;
            }
        }
        decide(ctx, sa, addr, requested, hook)
    }

    /// Whether the kernel delivers `addr` to this host: the loopback range,
    /// else one lookup in its local table.
    #[inline(always)]
    fn in_scope(addr: &[u8; 16]) -> bool {
        if is_mapped(addr) {
            if addr[12] == 127 {
                return true;
            }
        } else if addr[0..15] == [0u8; 15] && addr[15] == 1 {
            return true;
        }
        let key = Key::new(LOCAL_KEY_BITS, *addr);
        LOCAL.get(&key).is_some()
    }

    /// The policy in force for this call's namespace and its transport, or
    /// `None` when loopguard has nothing to say.
    #[inline(always)]
    fn policy_for(ctx: &SockAddrContext, sa: &bpf_sock_addr) -> Option<(u32, SlotConfig, u32)> {
        let config = CONFIG.get(0)?;
        let slot = config.active_slot;
        if slot >= SLOTS {
            return None;
        }
        if config.netns_cookie != 0 {
            // SAFETY: the helper takes the program context.
            let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
            if cookie != config.netns_cookie {
                return None;
            }
        }
        let proto = match sa.protocol {
            IPPROTO_TCP | IPPROTO_MPTCP => PROTO_TCP,
            IPPROTO_UDP => PROTO_UDP,
            _ => return None,
        };
        let slot_config = *SLOT_CONFIG.get(slot)?;
        Some((slot, slot_config, proto))
    }

    /// The address atom of an in-scope address: its most specific named
    /// prefix, 0 when it is in none (or the policy names none).
    #[inline(always)]
    fn addr_atom(slot: u32, slot_config: &SlotConfig, addr: [u8; 16]) -> u32 {
        if slot_config.has_nets == 0 {
            return 0;
        }
        let key = Key::new(ADDR_KEY_SLOT_BITS + 128, AddrKey { slot, addr });
        match ADDR_ATOMS.get(&key) {
            Some(atom) => *atom,
            None => 0,
        }
    }

    #[inline(always)]
    fn port_atom(slot: u32, sa: &bpf_sock_addr) -> (u32, u32) {
        // user_port holds the port in network byte order in its low 16 bits.
        let port = u16::from_be(sa.user_port as u16) as u32;
        let atom = match PORT_ATOMS.get(slot * PORT_SPACE + port) {
            Some(atom) => *atom,
            None => 0,
        };
        (port, atom)
    }

    #[inline(always)]
    fn is_member(slot: u32, uid_set: u32, uid: u32) -> bool {
        UIDS.get_ptr(UidKey { slot, uid_set, uid }).is_some()
    }

    /// Whether the calling process is on a service's list: its uid is, or
    /// it runs in a listed cgroup or below one. One lookup per cgroup
    /// level the policy names (at most `MAX_CGROUP_LEVEL`), and only for
    /// a uid not listed already.
    #[inline(always)]
    fn is_listed(slot: u32, slot_config: &SlotConfig, uid_set: u32) -> bool {
        if is_member(slot, uid_set, bpf_get_current_uid_gid() as u32) {
            return true;
        }
        let levels = slot_config.cgroup_levels;
        let mut level = 1;
        while level <= MAX_CGROUP_LEVEL && levels >> level != 0 {
            if levels & (1 << level) != 0 {
                // SAFETY: a plain helper call; 0 when the process's cgroup
                // is above `level`.
                let cgroup_id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
                if cgroup_id == 0 {
                    return false;
                }
                let key = CgroupKey {
                    slot,
                    uid_set,
                    cgroup_id,
                };
                if CGROUPS.get_ptr(key).is_some() {
                    return true;
                }
            }
            level += 1;
        }
        false
    }

    /// `addr` is where the kernel will deliver (unspecified resolved);
    /// `requested` what the process asked for (for the event).
    #[inline(always)]
    fn decide(
        ctx: &SockAddrContext,
        sa: &bpf_sock_addr,
        addr: [u8; 16],
        requested: [u8; 16],
        hook: u8,
    ) -> i32 {
        let Some((slot, slot_config, proto)) = policy_for(ctx, sa) else {
            return ALLOW;
        };
        if !in_scope(&addr) {
            return ALLOW;
        }
        let (port, port_atom) = port_atom(slot, sa);

        let mut bucket = DEFAULT_BUCKET;
        let mut deny_verdict = slot_config.default_verdict == VERDICT_DENY;
        let mut mode = slot_config.default_mode;
        let mut log_allowed = slot_config.default_log_allowed;
        if port_atom != 0 {
            let key = DecisionKey {
                slot,
                proto,
                port_atom,
                addr_atom: addr_atom(slot, &slot_config, addr),
            };
            // SAFETY: values of LG_DECISIONS are plain u32s.
            if let Some(service) = unsafe { DECISIONS.get(&key) } {
                let service = *service;
                if service >= MAX_SERVICES {
                    return ALLOW;
                }
                let Some(entry) = SERVICES.get(slot * MAX_SERVICES + service) else {
                    return ALLOW;
                };
                let member = is_listed(slot, &slot_config, entry.uid_set);
                bucket = service;
                deny_verdict = member != (entry.list_kind == LIST_ALLOW);
                mode = entry.mode;
                log_allowed = entry.log_allowed;
            }
        }
        finish(
            slot,
            bucket,
            deny_verdict,
            mode,
            log_allowed,
            proto,
            hook,
            port,
            requested,
        )
    }

    /// A `bind()` of a port some service guards, on an address the kernel
    /// delivers to this host or on the wildcard: only the service's bind
    /// users may.
    #[inline(always)]
    fn check_bind(ctx: &SockAddrContext, sa: &bpf_sock_addr, addr: [u8; 16], hook: u8) -> i32 {
        let Some((slot, slot_config, proto)) = policy_for(ctx, sa) else {
            return ALLOW;
        };
        if slot_config.has_binds == 0 {
            return ALLOW;
        }
        let (port, port_atom) = port_atom(slot, sa);
        // Port 0 asks the kernel for an ephemeral port: nothing to guard.
        if port == 0 || port_atom == 0 {
            return ALLOW;
        }
        // Any other address is judged too, local or not yet:
        // IP_FREEBIND lets any uid bind an address before it is the
        // host's (a failover address, one still in DAD), and a bind of a
        // non-local address fails anyway without it.
        let addr_atom = if is_unspecified(&addr) {
            BIND_WILDCARD_ATOM
        } else {
            addr_atom(slot, &slot_config, addr)
        };
        let key = DecisionKey {
            slot,
            proto,
            port_atom,
            addr_atom,
        };
        // SAFETY: values of LG_BINDS are plain integers.
        let Some(guard) = (unsafe { BINDS.get(&key) }) else {
            return ALLOW;
        };
        let service = guard.service;
        if service >= MAX_SERVICES {
            return ALLOW;
        }
        let Some(entry) = SERVICES.get(slot * MAX_SERVICES + service) else {
            return ALLOW;
        };
        let uid = bpf_get_current_uid_gid() as u32;
        let enforced = guard.enforce_set == NO_SET || is_member(slot, guard.enforce_set, uid);
        let member = enforced && is_member(slot, guard.uid_set, uid);
        // An enforce-mode guard refuses; an audit-mode one only records.
        let mode = if enforced { MODE_AUDIT } else { MODE_ENFORCE };
        finish(
            slot,
            service,
            !member,
            mode,
            entry.log_allowed,
            proto,
            hook,
            port,
            addr,
        )
    }

    /// Counts the verdict, records the event the policy asks for, and
    /// returns what the hook answers.
    #[inline(always)]
    #[allow(
        clippy::too_many_arguments,
        reason = "inlined into each hook: one flat call, no struct on the eBPF stack"
    )]
    fn finish(
        slot: u32,
        bucket: u32,
        deny_verdict: bool,
        mode: u8,
        log_allowed: u8,
        proto: u32,
        hook: u8,
        port: u32,
        addr: [u8; 16],
    ) -> i32 {
        let (verdict, kind) = if !deny_verdict {
            (ALLOW, COUNT_ALLOWED)
        } else if mode == MODE_AUDIT {
            (ALLOW, COUNT_WOULD_DENY)
        } else {
            (DENY, COUNT_DENIED)
        };
        if let Some(counter) = COUNTERS.get_ptr_mut(counter_index(slot, bucket, kind)) {
            // SAFETY: an aligned u64 element of an array map, which lives as
            // long as the program. The add is atomic (BPF_ATOMIC, result
            // unused: the plain add every kernel since 5.7 takes); the
            // bpf target has no compare-and-swap, so core's AtomicU64
            // offers no fetch_add here.
            unsafe {
                core::intrinsics::atomic_xadd::<
                    u64,
                    u64,
                    { core::intrinsics::AtomicOrdering::Relaxed },
                >(counter, 1);
            }
        }
        // SAFETY: a read-only global the loader may set.
        let events = unsafe { core::ptr::read_volatile(&LG_EVENTS_ENABLED) };
        if events != 0 && (kind != COUNT_ALLOWED || log_allowed != 0) {
            record(slot, bucket, kind, proto, hook, port, addr);
        }
        verdict
    }

    /// Writes one event, or counts it as dropped when the ring is full.
    #[inline(always)]
    #[allow(
        clippy::too_many_arguments,
        reason = "inlined: the event fields, passed flat"
    )]
    fn record(slot: u32, bucket: u32, kind: u32, proto: u32, hook: u8, port: u32, addr: [u8; 16]) {
        match EVENTS.reserve::<Event>(0) {
            Some(mut entry) => {
                let comm = bpf_get_current_comm().unwrap_or([0u8; 16]);
                let uid_gid = bpf_get_current_uid_gid();
                // The plan that decided, so the daemon names the right
                // service even before the applier's state file is saved.
                let plan_id = SLOT_CONFIG.get(slot).map_or(0, |c| c.plan_id);
                entry.write(Event {
                    // SAFETY: plain helper calls.
                    ktime_ns: unsafe { bpf_ktime_get_ns() },
                    pid: (bpf_get_current_pid_tgid() >> 32) as u32,
                    uid: uid_gid as u32,
                    gid: (uid_gid >> 32) as u32,
                    bucket,
                    slot,
                    port: port as u16,
                    action: kind as u8,
                    proto: proto as u8,
                    hook,
                    _pad: [0; 7],
                    plan_id,
                    addr,
                    comm,
                    // SAFETY: a plain helper call.
                    cgroup_id: unsafe { bpf_get_current_cgroup_id() },
                });
                entry.submit(0);
            }
            None => {
                if let Some(dropped) = DROPPED.get_ptr_mut(0) {
                    // SAFETY: per-CPU slot.
                    unsafe { *dropped += 1 };
                }
            }
        }
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        // A reachable panic must fail verification (an unbounded loop),
        // never be undefined behaviour.
        #[allow(
            clippy::empty_loop,
            reason = "an infinite loop fails verification: a reachable panic cannot load"
        )]
        loop {}
    }
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
