//! The nftables layer: the same compiled plan, enforced per packet on `lo`.
//!
//! One table `inet <instance>` in the applying network namespace. Its base
//! chain hooks `output` and judges only TCP SYNs (new connections) and UDP
//! datagrams, and only destinations the kernel itself delivers to this
//! host: whatever leaves on `lo`, and on other interfaces what its fib
//! lookup calls local, broadcast, anycast or multicast (asked per packet,
//! so nothing needs copying when addresses change):
//!
//! ```text
//! output:        tcp flags & (syn | ack) != syn accept   # established: no lookup, no conntrack
//!                oif "lo" meta l4proto vmap { tcp : jump dispatch_tcp, udp : jump dispatch_udp }
//!                fib daddr type != { local, broadcast, anycast, multicast } accept
//!                meta l4proto vmap { tcp : jump dispatch_tcp, udp : jump dispatch_udp }
//! dispatch_tcp:  th dport vmap @decport_tcp       # one port: a hash lookup
//!                th dport vmap @dechost_tcp       # port ranges: an interval lookup
//!                (the default for the rest of the scope)
//! dispatch_udp:  the same, for udp
//! ```
//!
//! (With named addresses, `ip daddr 127.0.0.0/8` and `ip6 daddr ::1` are
//! looked up in `dec4_*` / `dec6_*` first, keyed on address . port.) The
//! verdict maps are keyed on disjoint (address range, port range) atoms per
//! transport, so a lookup or two finds the deciding service whatever the
//! policy size; atoms of one port are in hash maps (`decport_*`), because
//! nft reads every element of a table's plain interval sets before it
//! changes any element. Services with the
//! same uids, list kind and mode share one verdict chain checking `meta
//! skuid` against one uid set; both are named after their content
//! (`v_<hash>`, `u_<hash>`), so the table holds as many chains as the policy
//! has distinct uid lists, and a re-apply can tell what changed. A refusal
//! looks its key up once more in a set of the same atoms (`ref*`) whose
//! elements count and name their service (comment), so per-service counts
//! survive the sharing. A refused TCP SYN is answered with a reset (the
//! client fails fast with ECONNREFUSED); a refused datagram is dropped
//! (sendto fails with EPERM). Connection tracking is never used.
//!
//! [`ruleset`] builds the whole table (add, delete, add: atomic); [`update`]
//! turns the previous plan's table into the new one in one transaction.
//! The `nftables` crate runs `nft -j -f -` with the batch, written as JSON
//! text (its typed schema has no `uid` set type).

pub mod attest;
mod batch;
mod counts;
mod prefix;
mod spec;

use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, Ipv6Addr},
    rc::Rc,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{
    compile::Plan,
    policy::{ListKind, Mode, Transport, Verdict},
};

#[allow(unused_imports, reason = "the parts share one namespace")]
use self::{batch::*, spec::*};
pub use self::{
    batch::{ruleset, update, Update},
    counts::{counters, refusal_counts, PacketCounts},
    prefix::{log_group, LogPrefix, PrefixBucket},
    spec::LAYOUT,
};

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("nft refused the ruleset")]
    Rejected(#[source] nftables::helper::NftablesError),
    #[error("failed to read table inet {table}")]
    List {
        table: String,
        #[source]
        source: nftables::helper::NftablesError,
    },
    #[error("nft printed JSON loopguard cannot read")]
    Json(#[source] serde_json::Error),
}

impl NftError {
    /// nft's own words, for `--verbose`.
    pub fn detail(&self) -> Option<String> {
        match self {
            NftError::Rejected(nftables::helper::NftablesError::NftFailed { stderr, .. })
            | NftError::List {
                source: nftables::helper::NftablesError::NftFailed { stderr, .. },
                ..
            } => Some(stderr.clone()),
            _ => None,
        }
    }
}

const NO_ARGS: &[&str] = &[];

fn nft(payload: &str, extra: &[&str]) -> Result<String, nftables::helper::NftablesError> {
    nftables::helper::apply_ruleset_raw(
        payload,
        nftables::helper::DEFAULT_NFT,
        extra.iter().copied(),
    )
}

/// The named counters of the default's verdicts.
const DEFAULT_ALLOW_COUNTER: &str = "default_allow";
const DEFAULT_DENY_COUNTER: &str = "default_deny";

const BASE_CHAIN: &str = "output";

/// The empty chain whose name says which plan the table holds.
fn plan_chain(id: &str) -> String {
    format!("{PLAN_CHAIN_PREFIX}{id}")
}
const PLAN_CHAIN_PREFIX: &str = "plan_";

/// What the instance's table holds, read back from the kernel: `None`
/// when there is no table, else the plan id its plan chain names (`None`
/// inside: an altered table without one); `Err` when nft cannot be asked.
/// One cheap `nft list chains`.
pub fn plan_in_force(table: &str) -> Result<Option<Option<String>>, NftError> {
    let chains = chains(table)?;
    if chains.is_empty() {
        return Ok(None);
    }
    Ok(Some(
        chains
            .iter()
            .find_map(|c| c.strip_prefix(PLAN_CHAIN_PREFIX))
            .map(str::to_string),
    ))
}

/// Whether `nft` runs and the kernel has nf_tables (lists the tables).
pub fn available() -> Result<(), NftError> {
    nftables::helper::get_current_ruleset_raw(nftables::helper::DEFAULT_NFT, ["list", "tables"])
        .map(drop)
        .map_err(NftError::Rejected)
}

/// Commits a batch: one transaction.
pub fn commit(batch: &str) -> Result<(), NftError> {
    nft(batch, NO_ARGS).map(drop).map_err(NftError::Rejected)
}

/// Deletes the instance's table, and nothing else. Returns whether it
/// existed.
pub fn remove(table: &str) -> Result<bool, NftError> {
    // Without a working nft there is no table of ours (nft made it).
    let Ok(chains) = chains(table) else {
        return Ok(false);
    };
    let existed = !chains.is_empty();
    // Add-then-delete needs no look first: a table nobody can list (no
    // chains left) goes too, and a missing one is no error.
    let t = json!({"family": "inet", "name": table});
    let batch = json!({"nftables": [{"add": {"table": t}}, {"delete": {"table": t}}]});
    nft(&batch.to_string(), NO_ARGS).map_err(NftError::Rejected)?;
    Ok(existed)
}

fn list_table(table: &str) -> Result<Value, NftError> {
    let out = nftables::helper::get_current_ruleset_raw(
        nftables::helper::DEFAULT_NFT,
        ["list", "table", "inet", table],
    )
    .map_err(|source| NftError::List {
        table: table.to_string(),
        source,
    })?;
    serde_json::from_str(&out).map_err(NftError::Json)
}

/// Whether the instance's table exists. Asks for chain names only: `nft
/// list tables` loads far more into nft's cache (0.12 s with a
/// 10,000-service table), `list chains` next to nothing, and the table
/// always has its base chain.
pub fn table_exists(table: &str) -> bool {
    chains(table).is_ok_and(|c| !c.is_empty())
}

/// The names of the table's chains (empty: no such table).
fn chains(table: &str) -> Result<Vec<String>, NftError> {
    let out = nftables::helper::get_current_ruleset_raw(
        nftables::helper::DEFAULT_NFT,
        ["list", "chains", "inet"],
    )
    .map_err(|source| NftError::List {
        table: table.to_string(),
        source,
    })?;
    let doc: Value = serde_json::from_str(&out).map_err(NftError::Json)?;
    Ok(doc["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o.get("chain"))
        .filter(|c| c["table"] == table && c["family"] == "inet")
        .filter_map(|c| c["name"].as_str().map(str::to_string))
        .collect())
}

#[cfg(test)]
mod tests {

    /// Names are persisted in tables: a change of encoding or hash must
    /// be a new [`LAYOUT`], never a silent rename.
    #[test]
    fn content_names_are_pinned() {
        assert_eq!(uid_set_name(&[0, 1000]), uid_set_name(&[0, 1000]));
        assert_ne!(uid_set_name(&[0, 1000]), uid_set_name(&[1000]));
        assert_eq!(uid_set_name(&[]), "u_e3b0c44298fc1c14", "sha256 of nothing");
        let set = uid_set_name(&[1000]);
        assert_ne!(
            verdict_chain_name(&set, ListKind::Allow, Mode::Enforce),
            verdict_chain_name(&set, ListKind::Allow, Mode::Audit)
        );
        assert_eq!(LAYOUT, 9, "names below are of layout 9 (same names as 8)");
        assert_eq!(set, "u_79ff7fbc96a0a611");
    }

    use super::*;

    #[test]
    fn regions_are_disjoint_and_cover_127_8() {
        let nets: Vec<IpNet> = ["127.0.0.0/16", "127.0.0.0/24", "127.0.0.53/32", "::1/128"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let r = address_regions(&nets);
        let mut all: Vec<(u32, u32)> = r
            .values()
            .flat_map(|(v4, _)| v4.iter().map(|(a, b)| (u32::from(*a), u32::from(*b))))
            .collect();
        all.sort_unstable();
        assert_eq!(
            all.first().map(|x| x.0),
            Some(u32::from(Ipv4Addr::new(127, 0, 0, 0)))
        );
        assert_eq!(
            all.last().map(|x| x.1),
            Some(u32::from(Ipv4Addr::new(127, 255, 255, 255)))
        );
        assert!(all.windows(2).all(|w| w[0].1 + 1 == w[1].0), "{all:?}");
        // 127.0.0.53 is its own atom (3), inside /24 (atom 2) inside /16 (1).
        assert_eq!(
            r[&3].0,
            vec![(Ipv4Addr::new(127, 0, 0, 53), Ipv4Addr::new(127, 0, 0, 53))]
        );
        assert_eq!(r[&2].0.len(), 2, "/24 minus .53: {:?}", r[&2].0);
        assert_eq!(r[&4].1, vec![(Ipv6Addr::LOCALHOST, Ipv6Addr::LOCALHOST)]);
        assert!(r[&0].1.is_empty());
    }
}
