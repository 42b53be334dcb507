//! The NFLOG side of the table: the log prefix and group refusals are
//! logged with.

#[allow(unused_imports, reason = "the layer's common imports")]
use super::*;

/// The NFLOG prefix of the nftables layer's log rules,
/// `lg/<table>/<verdict chain|default>/<d|w>`: written here, parsed by
/// [`crate::audit`]. (Services share verdict chains, so the prefix says
/// only which chain refused; the packet's destination names the
/// service.)
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogPrefix {
    pub table: String,
    pub bucket: PrefixBucket,
    /// An audit-mode refusal (the packet went through).
    pub would_deny: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PrefixBucket {
    /// A service's verdict chain (shared by services of one uid set, list
    /// kind and mode).
    Chain(String),
    Default,
}

impl LogPrefix {
    pub(super) const START: &'static str = "lg/";

    pub fn parse(text: &str) -> Option<LogPrefix> {
        let rest = text.strip_prefix(Self::START)?;
        let (table, rest) = rest.split_once('/')?;
        let (bucket, action) = rest.split_once('/')?;
        let bucket = match bucket {
            "default" => PrefixBucket::Default,
            "" => return None,
            chain => PrefixBucket::Chain(chain.to_string()),
        };
        let would_deny = match action {
            "w" => true,
            "d" => false,
            _ => return None,
        };
        Some(LogPrefix {
            table: table.to_string(),
            bucket,
            would_deny,
        })
    }
}

impl std::fmt::Display for LogPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bucket = match &self.bucket {
            PrefixBucket::Chain(chain) => chain.as_str(),
            PrefixBucket::Default => "default",
        };
        let action = if self.would_deny { "w" } else { "d" };
        write!(f, "{}{}/{bucket}/{action}", Self::START, self.table)
    }
}

/// The NFLOG group of an instance: stable, in 20000..60000, derived from
/// its name (FNV-1a) so instances side by side rarely share one (and the
/// prefix tells them apart when they do).
pub fn log_group(table: &str) -> u16 {
    let mut h: u32 = 0x811c_9dc5;
    for b in table.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    20_000 + (h % 40_000) as u16
}
