//! Whether the instance's table holds what its plan renders, read from the
//! kernel.
//!
//! Two reads, the cheap one first:
//! - the ruleset generation of the network namespace (`NFT_MSG_GETGEN`),
//!   which every committed nftables transaction, by anyone, increments.
//!   Equal to the one recorded right after loopguard's own commit: nothing
//!   changed since, in any table. One netlink round trip.
//! - otherwise the table's content: every chain with its number of rules,
//!   every set and map with its number of elements, against the same tally
//!   of the batch the plan renders. A flushed or deleted chain, a deleted or
//!   added rule, element, set or map shows up. (Listing a 10,000-service
//!   table takes nft a second or more, so this runs only when the
//!   generation moved.)

use std::{collections::BTreeMap, io};

use serde_json::Value;

use super::{list_table, ruleset, NftError};
use crate::compile::Plan;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWGEN: u16 = 15;
const NFT_MSG_GETGEN: u16 = 16;
const NFTA_GEN_ID: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;

/// The nftables ruleset generation of this network namespace.
pub fn generation() -> io::Result<u32> {
    let sock = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_NETFILTER)?;
    // nlmsghdr (16 bytes) + nfgenmsg (4 bytes: family, version, res_id).
    let mut req = Vec::with_capacity(20);
    req.extend_from_slice(&20u32.to_ne_bytes());
    req.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN).to_ne_bytes());
    req.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    req.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    req.extend_from_slice(&[0, 0, 0, 0]); // AF_UNSPEC, NFNETLINK_V0, res_id 0
    sock.send_to(&req, &netlink_sys::SocketAddr::new(0, 0), 0)?;
    let mut buf = vec![0u8; 8192];
    let n = sock.recv(&mut &mut buf[..], 0)?;
    parse_generation(&buf[..n.min(buf.len())])
}

/// The generation id in a `NFT_MSG_NEWGEN` reply.
fn parse_generation(msg: &[u8]) -> io::Result<u32> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let u16_at = |i: usize| msg.get(i..i + 2).map(|b| u16::from_ne_bytes([b[0], b[1]]));
    let u32_at = |i: usize| {
        msg.get(i..i + 4)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    };
    let len = u32_at(0).ok_or_else(|| bad("short netlink reply"))? as usize;
    let kind = u16_at(4).ok_or_else(|| bad("short netlink reply"))?;
    if kind == NLMSG_ERROR {
        let errno = u32_at(16).map_or(0, |e| e as i32);
        return Err(io::Error::from_raw_os_error(-errno));
    }
    if kind != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN {
        return Err(bad("unexpected netlink reply to NFT_MSG_GETGEN"));
    }
    // Attributes after nlmsghdr and nfgenmsg, each 4-aligned.
    let end = len.min(msg.len());
    let mut at = 20;
    while at + 4 <= end {
        let alen = u16_at(at).unwrap_or(0) as usize;
        let atype = u16_at(at + 2).unwrap_or(0) & 0x3fff;
        if alen < 4 {
            break;
        }
        if atype == NFTA_GEN_ID {
            let b = msg
                .get(at + 4..at + 8)
                .ok_or_else(|| bad("short NFTA_GEN_ID"))?;
            return Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        }
        at += (alen + 3) & !3;
    }
    Err(bad("no NFTA_GEN_ID in the reply"))
}

/// What a table holds, counted: rules per chain, elements per set or map
/// (named counters by name).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tally {
    chains: BTreeMap<String, usize>,
    sets: BTreeMap<String, usize>,
    counters: BTreeMap<String, ()>,
    /// The uids of each uid set, sorted: who a verdict chain lets through
    /// (or refuses). A uid swapped for another keeps the count.
    uids: BTreeMap<String, Vec<u64>>,
    /// The table is switched off (`flags dormant`): it judges nothing.
    dormant: bool,
}

fn elems(obj: &Value) -> usize {
    obj.get("elem")
        .and_then(Value::as_array)
        .map_or(0, Vec::len)
}

/// The elements of a set of uids, when it is one.
fn uid_elems(obj: &Value) -> Option<Vec<u64>> {
    if obj.get("type").and_then(Value::as_str) != Some("uid") {
        return None;
    }
    obj.get("elem")
        .and_then(Value::as_array)
        .map_or(Some(Vec::new()), |a| a.iter().map(Value::as_u64).collect())
}

fn name(obj: &Value, key: &str) -> String {
    obj.get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

impl Tally {
    /// The tally of a batch: its commands in order (`delete table` starts
    /// over; `flush chain` empties one).
    fn of_batch(batch: &Value) -> Tally {
        let mut t = Tally::default();
        for cmd in batch["nftables"].as_array().into_iter().flatten() {
            let Some((verb, body)) = cmd.as_object().and_then(|o| o.iter().next()) else {
                continue;
            };
            let Some((kind, obj)) = body.as_object().and_then(|o| o.iter().next()) else {
                continue;
            };
            match (verb.as_str(), kind.as_str()) {
                ("delete", "table") => t = Tally::default(),
                ("add" | "create", "chain") => {
                    t.chains.entry(name(obj, "name")).or_default();
                }
                ("flush", "chain") => {
                    t.chains.insert(name(obj, "name"), 0);
                }
                ("delete", "chain") => {
                    t.chains.remove(&name(obj, "name"));
                }
                ("add" | "insert" | "create", "rule") => {
                    *t.chains.entry(name(obj, "chain")).or_default() += 1;
                }
                ("add" | "create", "set" | "map") => {
                    *t.sets.entry(name(obj, "name")).or_default() += elems(obj);
                    if let Some(uids) = uid_elems(obj) {
                        t.uids.entry(name(obj, "name")).or_default().extend(uids);
                    }
                }
                ("add" | "create", "element") => {
                    *t.sets.entry(name(obj, "name")).or_default() += elems(obj);
                    if let Some(uids) = t.uids.get_mut(&name(obj, "name")) {
                        let added = obj.get("elem").and_then(Value::as_array);
                        uids.extend(added.into_iter().flatten().filter_map(Value::as_u64));
                    }
                }
                ("add" | "create", "counter") => {
                    t.counters.insert(name(obj, "name"), ());
                }
                _ => {}
            }
        }
        t.sort();
        t
    }

    fn sort(&mut self) {
        for uids in self.uids.values_mut() {
            uids.sort_unstable();
        }
    }

    /// The tally of `nft -j list table`.
    fn of_listing(listing: &Value) -> Tally {
        let mut t = Tally::default();
        for item in listing["nftables"].as_array().into_iter().flatten() {
            let Some((kind, obj)) = item.as_object().and_then(|o| o.iter().next()) else {
                continue;
            };
            match kind.as_str() {
                "table" => {
                    // loopguard sets no table flag; nft 1.0.6 prints
                    // `dormant` in JSON as a garbled string, so any flag
                    // counts.
                    t.dormant = obj
                        .get("flags")
                        .is_some_and(|f| !f.is_null() && f != "" && f != &serde_json::json!([]));
                }
                "chain" => {
                    t.chains.entry(name(obj, "name")).or_default();
                }
                "rule" => *t.chains.entry(name(obj, "chain")).or_default() += 1,
                "set" | "map" => {
                    *t.sets.entry(name(obj, "name")).or_default() += elems(obj);
                    if let Some(uids) = uid_elems(obj) {
                        t.uids.entry(name(obj, "name")).or_default().extend(uids);
                    }
                }
                "counter" => {
                    t.counters.insert(name(obj, "name"), ());
                }
                _ => {}
            }
        }
        t.sort();
        t
    }
}

/// How `got` differs from `want`, in words: at most `max` lines, the last
/// saying how many more there are.
fn differences(want: &Tally, got: &Tally, max: usize) -> Vec<String> {
    let mut out = Vec::new();
    if got.dormant && !want.dormant {
        out.push("the table is dormant, or has flags loopguard never sets (dormant: switched off, it judges nothing)".to_string());
    }
    let mut compare =
        |what: &str, unit: &str, w: &BTreeMap<String, usize>, g: &BTreeMap<String, usize>| {
            for (k, n) in w {
                match g.get(k) {
                    None => out.push(format!("{what} {k} is missing")),
                    Some(m) if m != n => out.push(format!("{what} {k} has {m} {unit}, not {n}")),
                    Some(_) => {}
                }
            }
            for k in g.keys().filter(|k| !w.contains_key(*k)) {
                out.push(format!("{what} {k} was added"));
            }
        };
    compare("chain", "rules", &want.chains, &got.chains);
    compare("set", "elements", &want.sets, &got.sets);
    for (k, uids) in &want.uids {
        if got
            .uids
            .get(k)
            .is_some_and(|g| g != uids && g.len() == uids.len())
        {
            out.push(format!("set {k} holds other uids than the plan's"));
        }
    }
    for k in want
        .counters
        .keys()
        .filter(|k| !got.counters.contains_key(*k))
    {
        out.push(format!("counter {k} is missing"));
    }
    for k in got
        .counters
        .keys()
        .filter(|k| !want.counters.contains_key(*k))
    {
        out.push(format!("counter {k} was added"));
    }
    if out.len() > max {
        let more = out.len() - (max - 1);
        out.truncate(max - 1);
        out.push(format!("and {more} more differences"));
    }
    out
}

/// How the table in force differs from what `plan` renders (empty: it
/// holds exactly that). Lists the whole table.
pub fn table_differences(table: &str, plan: &Plan) -> Result<Vec<String>, NftError> {
    let batch: Value = serde_json::from_str(&ruleset(table, plan)).map_err(NftError::Json)?;
    let want = Tally::of_batch(&batch);
    drop(batch);
    let got = Tally::of_listing(&list_table(table)?);
    Ok(differences(&want, &got, 5))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_batch_and_its_listing_tally_alike() {
        let batch = json!({"nftables": [
            {"add": {"table": {"family": "inet", "name": "t"}}},
            {"delete": {"table": {"family": "inet", "name": "t"}}},
            {"add": {"table": {"family": "inet", "name": "t"}}},
            {"add": {"chain": {"name": "output"}}},
            {"add": {"set": {"name": "u_1", "type": "uid", "elem": [1, 2, 3]}}},
            {"add": {"element": {"name": "u_1", "elem": [4]}}},
            {"add": {"counter": {"name": "default_allow"}}},
            {"add": {"rule": {"chain": "output", "expr": []}}},
            {"add": {"rule": {"chain": "output", "expr": []}}},
        ]});
        let listing = json!({"nftables": [
            {"metainfo": {}},
            {"table": {"name": "t"}},
            {"chain": {"name": "output", "handle": 1}},
            {"set": {"name": "u_1", "type": "uid", "elem": [4, 1, 2, 3], "handle": 2}},
            {"counter": {"name": "default_allow", "packets": 9}},
            {"rule": {"chain": "output", "handle": 3}},
            {"rule": {"chain": "output", "handle": 4}},
        ]});
        let want = Tally::of_batch(&batch);
        assert_eq!(want, Tally::of_listing(&listing));

        // `nft flush chain inet t output`, one element deleted, a counter gone.
        let damaged = json!({"nftables": [
            {"chain": {"name": "output"}},
            {"set": {"name": "u_1", "elem": [1, 2, 3]}},
        ]});
        let diff = differences(&want, &Tally::of_listing(&damaged), 5);
        assert_eq!(
            diff,
            [
                "chain output has 0 rules, not 2",
                "set u_1 has 3 elements, not 4",
                "counter default_allow is missing",
            ]
        );
    }

    #[test]
    fn a_uid_swapped_for_another_is_a_difference() {
        let batch = json!({"nftables": [
            {"add": {"set": {"name": "u_1", "type": "uid", "elem": [1000, 1001]}}},
        ]});
        let swapped = json!({"nftables": [
            {"set": {"name": "u_1", "type": "uid", "elem": [1000, 1002]}},
        ]});
        assert_eq!(
            differences(&Tally::of_batch(&batch), &Tally::of_listing(&swapped), 5),
            ["set u_1 holds other uids than the plan's"]
        );
    }

    #[test]
    fn differences_are_bounded() {
        let mut want = Tally::default();
        for i in 0..100 {
            want.chains.insert(format!("c{i}"), 1);
        }
        let diff = differences(&want, &Tally::default(), 5);
        assert_eq!(diff.len(), 5);
        assert_eq!(diff[4], "and 96 more differences");
    }

    #[test]
    fn the_generation_is_read_from_a_newgen_reply() {
        let mut msg = Vec::new();
        msg.extend_from_slice(&36u32.to_ne_bytes());
        msg.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN).to_ne_bytes());
        msg.extend_from_slice(&[0; 10]);
        msg.extend_from_slice(&[0, 0, 0, 0]);
        msg.extend_from_slice(&8u16.to_ne_bytes());
        msg.extend_from_slice(&NFTA_GEN_ID.to_ne_bytes());
        msg.extend_from_slice(&4242u32.to_be_bytes());
        msg.extend_from_slice(&8u16.to_ne_bytes());
        msg.extend_from_slice(&2u16.to_ne_bytes());
        msg.extend_from_slice(&7u32.to_be_bytes());
        assert_eq!(parse_generation(&msg).expect("generation"), 4242);
        assert!(parse_generation(&msg[..10]).is_err());
    }
}

/// Whether a buffer of nftables netlink events may concern `table`: an
/// event naming another table does not (every nftables object message
/// carries its table's name as attribute 1); one that cannot be read does.
pub fn events_touch(buf: &[u8], table: &str) -> bool {
    let mut at = 0;
    while at + 16 <= buf.len() {
        let len = buf
            .get(at..at + 4)
            .map_or(0, |b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize);
        if len < 16 || at + len > buf.len() {
            return true;
        }
        let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
        let msg = &buf[at..at + len];
        at += (len + 3) & !3;
        if kind >> 8 != NFNL_SUBSYS_NFTABLES || kind & 0xff == NFT_MSG_NEWGEN {
            continue;
        }
        match attr_str(msg, 1) {
            Some(name) if name != table => continue,
            _ => return true,
        }
    }
    at < buf.len()
}

/// A NUL-terminated string attribute of a nftables message.
fn attr_str(msg: &[u8], want: u16) -> Option<&str> {
    let mut at = 20;
    while at + 4 <= msg.len() {
        let alen = u16::from_ne_bytes([msg[at], msg[at + 1]]) as usize;
        let atype = u16::from_ne_bytes([msg[at + 2], msg[at + 3]]) & 0x3fff;
        if alen < 4 || at + alen > msg.len() {
            return None;
        }
        if atype == want {
            let raw = &msg[at + 4..at + alen];
            let raw = raw.split(|b| *b == 0).next().unwrap_or(raw);
            return std::str::from_utf8(raw).ok();
        }
        at += (alen + 3) & !3;
    }
    None
}

#[cfg(test)]
mod event_tests {
    use super::*;

    fn message(kind: u16, table: Option<&str>) -> Vec<u8> {
        let mut attrs = Vec::new();
        if let Some(t) = table {
            let mut v = t.as_bytes().to_vec();
            v.push(0);
            attrs.extend_from_slice(&((4 + v.len()) as u16).to_ne_bytes());
            attrs.extend_from_slice(&1u16.to_ne_bytes());
            attrs.extend_from_slice(&v);
            while attrs.len() % 4 != 0 {
                attrs.push(0);
            }
        }
        let len = 20 + attrs.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | kind).to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&[1, 0, 0, 0]);
        m.extend_from_slice(&attrs);
        m
    }

    #[test]
    fn only_events_of_our_table_wake_a_read_back() {
        // NFT_MSG_NEWRULE = 6, NFT_MSG_DELTABLE = 2.
        let mut theirs = message(6, Some("docker"));
        theirs.extend(message(NFT_MSG_NEWGEN, None));
        assert!(!events_touch(&theirs, "loopguard"));
        let mut ours = theirs.clone();
        ours.extend(message(2, Some("loopguard")));
        assert!(events_touch(&ours, "loopguard"));
        // Unreadable: ours, to be safe.
        assert!(events_touch(&message(6, None), "loopguard"));
        assert!(events_touch(&theirs[..18], "loopguard"));
    }
}
