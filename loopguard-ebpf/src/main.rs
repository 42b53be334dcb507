//! loopguard's programs on the cgroup v2 socket address hooks.
//!
//! One verdict per `connect()` (TCP, TCP Fast Open via its pre-connect hook,
//! connected UDP) and per unconnected UDP send, in the context of the process
//! that asks. Returning 0 makes the syscall fail with `EPERM` before any
//! packet exists.
//!
//! Every lookup is a fixed number of map operations, independent of the
//! number of services and uids: port -> port atom (array), address -> address
//! atom (LPM trie, only when the policy names addresses), (protocol, atoms)
//! -> service (hash), (uid set, uid) -> member (hash).
//!
//! Minimum kernel: 5.7 for pinned bpf_link attachment of cgroup programs;
//! 5.14 for `SO_NETNS_COOKIE` (without it every namespace is guarded).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::bpf_sock_addr,
        helpers::{
            bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
            generated::{bpf_get_netns_cookie, bpf_ktime_get_ns},
        },
        macros::{cgroup_sock_addr, map},
        maps::{lpm_trie::Key, Array, HashMap, LpmTrie, PerCpuArray, RingBuf},
        programs::SockAddrContext,
        EbpfContext as _,
    };
    use loopguard_common::{
        counter_index, AddrKey, Config, DecisionKey, Event, ServiceEntry, SlotConfig, UidKey,
        ADDR_KEY_SLOT_BITS, COUNTER_ENTRIES, COUNT_ALLOWED, COUNT_DENIED, COUNT_WOULD_DENY,
        DEFAULT_BUCKET, EVENTS_RING_BYTES, HOOK_CONNECT4, HOOK_CONNECT6, HOOK_SENDMSG4,
        HOOK_SENDMSG6, LIST_ALLOW, MAX_DECISIONS, MAX_HOST_ADDRS, MAX_NETS, MAX_SERVICES,
        MAX_UID_ENTRIES, MODE_AUDIT, PORT_SPACE, PROTO_TCP, PROTO_UDP, SLOTS, VERDICT_DENY,
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
    #[map(name = "LG_SERVICES")]
    static SERVICES: Array<ServiceEntry> = Array::with_max_entries(SLOTS * MAX_SERVICES, 0);
    #[map(name = "LG_UIDS")]
    static UIDS: HashMap<UidKey, u8> =
        HashMap::with_max_entries(SLOTS * MAX_UID_ENTRIES, NO_PREALLOC);
    /// Addresses of the host's interfaces: traffic to them is routed over lo.
    #[map(name = "LG_HOST_ADDRS")]
    static HOST_ADDRS: HashMap<[u8; 16], u32> = HashMap::with_max_entries(MAX_HOST_ADDRS, 0);
    #[map(name = "LG_COUNTERS")]
    static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_ENTRIES, 0);
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
    pub fn loopguard_connect4(ctx: SockAddrContext) -> i32 {
        check_v4(&ctx, HOOK_CONNECT4)
    }

    #[cgroup_sock_addr(sendmsg4)]
    pub fn loopguard_sendmsg4(ctx: SockAddrContext) -> i32 {
        check_v4(&ctx, HOOK_SENDMSG4)
    }

    #[cgroup_sock_addr(connect6)]
    pub fn loopguard_connect6(ctx: SockAddrContext) -> i32 {
        check_v6(&ctx, HOOK_CONNECT6)
    }

    #[cgroup_sock_addr(sendmsg6)]
    pub fn loopguard_sendmsg6(ctx: SockAddrContext) -> i32 {
        check_v6(&ctx, HOOK_SENDMSG6)
    }

    #[inline(always)]
    fn check_v4(ctx: &SockAddrContext, hook: u8) -> i32 {
        // SAFETY: the kernel hands every sock_addr program a valid context.
        let sa: &bpf_sock_addr = unsafe { &*ctx.sock_addr };
        let mut addr = [0u8; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12..16].copy_from_slice(&sa.user_ip4.to_ne_bytes());
        decide(ctx, sa, addr, hook)
    }

    #[inline(always)]
    fn check_v6(ctx: &SockAddrContext, hook: u8) -> i32 {
        // SAFETY: as in check_v4.
        let sa: &bpf_sock_addr = unsafe { &*ctx.sock_addr };
        let mut addr = [0u8; 16];
        // The verifier allows only 4-byte loads of user_ip6.
        addr[0..4].copy_from_slice(&sa.user_ip6[0].to_ne_bytes());
        addr[4..8].copy_from_slice(&sa.user_ip6[1].to_ne_bytes());
        addr[8..12].copy_from_slice(&sa.user_ip6[2].to_ne_bytes());
        addr[12..16].copy_from_slice(&sa.user_ip6[3].to_ne_bytes());
        decide(ctx, sa, addr, hook)
    }

    /// Where loopguard looks an address up, and whether it is in scope.
    #[inline(always)]
    fn normalize(addr: &mut [u8; 16]) -> bool {
        let mapped = addr[0..10] == [0u8; 10] && addr[10] == 0xff && addr[11] == 0xff;
        if mapped {
            // 0.0.0.0 (also as ::ffff:0.0.0.0) is delivered to 127.0.0.1.
            if addr[12..16] == [0u8; 4] {
                addr[12] = 127;
                addr[15] = 1;
            }
            if addr[12] == 127 {
                return true;
            }
        } else if addr[0..15] == [0u8; 15] && (addr[15] == 0 || addr[15] == 1) {
            // :: is delivered to ::1.
            addr[15] = 1;
            return true;
        }
        HOST_ADDRS.get_ptr(*addr).is_some()
    }

    #[inline(always)]
    fn decide(ctx: &SockAddrContext, sa: &bpf_sock_addr, mut addr: [u8; 16], hook: u8) -> i32 {
        let requested = addr;
        let Some(config) = CONFIG.get(0) else {
            return ALLOW;
        };
        let slot = config.active_slot;
        if slot >= SLOTS {
            return ALLOW;
        }
        if config.netns_cookie != 0 {
            // SAFETY: the helper takes the program context.
            let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
            if cookie != config.netns_cookie {
                return ALLOW;
            }
        }
        let proto = match sa.protocol {
            IPPROTO_TCP | IPPROTO_MPTCP => PROTO_TCP,
            IPPROTO_UDP => PROTO_UDP,
            _ => return ALLOW,
        };
        if !normalize(&mut addr) {
            return ALLOW;
        }
        let Some(slot_config) = SLOT_CONFIG.get(slot) else {
            return ALLOW;
        };
        // user_port holds the port in network byte order in its low 16 bits.
        let port = u16::from_be(sa.user_port as u16) as u32;
        let port_atom = match PORT_ATOMS.get(slot * PORT_SPACE + port) {
            Some(atom) => *atom,
            None => 0,
        };

        let mut bucket = DEFAULT_BUCKET;
        let mut deny_verdict = slot_config.default_verdict == VERDICT_DENY;
        let mut mode = slot_config.default_mode;
        let mut log_allowed = slot_config.default_log_allowed;
        if port_atom != 0 {
            let mut addr_atom = 0;
            if slot_config.has_nets != 0 {
                let key = Key::new(ADDR_KEY_SLOT_BITS + 128, AddrKey { slot, addr });
                if let Some(atom) = ADDR_ATOMS.get(&key) {
                    addr_atom = *atom;
                }
            }
            let key = DecisionKey {
                slot,
                proto,
                port_atom,
                addr_atom,
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
                let uid = bpf_get_current_uid_gid() as u32;
                let member = UIDS
                    .get_ptr(UidKey {
                        slot,
                        uid_set: entry.uid_set,
                        uid,
                    })
                    .is_some();
                bucket = service;
                deny_verdict = member != (entry.list_kind == LIST_ALLOW);
                mode = entry.mode;
                log_allowed = entry.log_allowed;
            }
        }

        let (verdict, kind) = if !deny_verdict {
            (ALLOW, COUNT_ALLOWED)
        } else if mode == MODE_AUDIT {
            (ALLOW, COUNT_WOULD_DENY)
        } else {
            (DENY, COUNT_DENIED)
        };
        if let Some(counter) = COUNTERS.get_ptr_mut(counter_index(slot, bucket, kind)) {
            // SAFETY: per-CPU slot; programs do not migrate CPUs mid-run.
            unsafe { *counter += 1 };
        }
        // SAFETY: a read-only global the loader may set.
        let events = unsafe { core::ptr::read_volatile(&LG_EVENTS_ENABLED) };
        if events != 0 && (kind != COUNT_ALLOWED || log_allowed != 0) {
            record(slot, bucket, kind, proto, hook, port, requested);
        }
        verdict
    }

    /// Writes one event, or counts it as dropped when the ring is full.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn record(slot: u32, bucket: u32, kind: u32, proto: u32, hook: u8, port: u32, addr: [u8; 16]) {
        match EVENTS.reserve::<Event>(0) {
            Some(mut entry) => {
                let comm = bpf_get_current_comm().unwrap_or([0u8; 16]);
                let uid_gid = bpf_get_current_uid_gid();
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
                    addr,
                    comm,
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
        // SAFETY: the verifier proves no panic path is reachable.
        unsafe { core::hint::unreachable_unchecked() }
    }
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
