//! What the table counted: refusals per service (element counters) and
//! the default's packets.

#[allow(unused_imports, reason = "the layer's common imports")]
use super::*;

/// Packet counts of the nftables layer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PacketCounts {
    /// Refused (or, in audit mode, would-be refused) packets by service
    /// name.
    pub refused: HashMap<String, u64>,
    pub default_allowed: u64,
    pub default_denied: u64,
}

impl PacketCounts {
    /// `self` plus `other`.
    pub fn plus(mut self, other: &PacketCounts) -> PacketCounts {
        for (name, v) in &other.refused {
            *self.refused.entry(name.clone()).or_insert(0) += v;
        }
        self.default_allowed += other.default_allowed;
        self.default_denied += other.default_denied;
        self
    }

    /// Counts of renamed services (`renames`: new name -> old) under their
    /// new names.
    pub fn renamed(mut self, renames: &HashMap<String, String>) -> PacketCounts {
        for (new, old) in renames {
            if let Some(v) = self.refused.remove(old) {
                *self.refused.entry(new.clone()).or_insert(0) += v;
            }
        }
        self
    }

    /// Only the services `plan` has (a removed service's count goes).
    pub fn kept_for(mut self, plan: &Plan) -> PacketCounts {
        let names: std::collections::HashSet<&str> =
            plan.services.iter().map(|s| s.name.as_str()).collect();
        self.refused.retain(|name, _| names.contains(name.as_str()));
        self
    }

    /// Per service of `plan`, by index.
    pub fn refused_by_index(&self, plan: &Plan) -> Vec<u64> {
        plan.services
            .iter()
            .map(|s| self.refused.get(&s.name).copied().unwrap_or(0))
            .collect()
    }
}

/// Sums refusal-set element counters by service (the element comment).
pub(super) fn add_refusals(set: &Value, out: &mut HashMap<String, u64>) {
    for e in set["elem"].as_array().into_iter().flatten() {
        let e = &e["elem"];
        if let (Some(service), Some(packets)) =
            (e["comment"].as_str(), e["counter"]["packets"].as_u64())
        {
            *out.entry(service.to_string()).or_insert(0) += packets;
        }
    }
}

/// The counts the table in force holds (without what earlier tables
/// counted: see `State::packet_base`).
pub fn counters(table: &str) -> Result<PacketCounts, NftError> {
    let doc = list_table(table)?;
    let mut out = PacketCounts::default();
    for obj in doc["nftables"].as_array().into_iter().flatten() {
        if let Some(c) = obj.get("counter") {
            let packets = c["packets"].as_u64().unwrap_or(0);
            match c["name"].as_str() {
                Some(DEFAULT_ALLOW_COUNTER) => out.default_allowed += packets,
                Some(DEFAULT_DENY_COUNTER) => out.default_denied += packets,
                _ => {}
            }
        } else if let Some(set) = obj.get("set") {
            add_refusals(set, &mut out.refused);
        }
    }
    Ok(out)
}

/// Refusal counts by service in the named sets only.
pub fn refusal_counts(table: &str, sets: &[String]) -> Result<HashMap<String, u64>, NftError> {
    let mut out = HashMap::new();
    for set in sets {
        let text = nftables::helper::get_current_ruleset_raw(
            nftables::helper::DEFAULT_NFT,
            ["list", "set", "inet", table, set],
        )
        .map_err(|source| NftError::List {
            table: table.to_string(),
            source,
        })?;
        let doc: Value = serde_json::from_str(&text).map_err(NftError::Json)?;
        for obj in doc["nftables"].as_array().into_iter().flatten() {
            if let Some(set) = obj.get("set") {
                add_refusals(set, &mut out);
            }
        }
    }
    Ok(out)
}
