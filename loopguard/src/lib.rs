//! loopguard: decides which local users may reach which services on this
//! host's loopback, and enforces it with eBPF programs on the cgroup v2
//! socket address hooks.
//!
//! Data flows one way: policy file -> [`check`] and [`policy`] (parse,
//! validate, resolve) -> [`compile`] (a [`compile::Plan`]) -> [`engine`]
//! (the layers, [`ebpf`] and [`nft`], behind one seam) -> [`state`].

pub mod access;
pub mod audit;
pub mod change;
pub mod check;
pub mod ci;
pub mod compile;
pub mod daemon;
pub mod diag;
pub mod ebpf;
pub mod engine;
#[doc(hidden)]
pub mod exercise;
pub mod fault;
pub mod files;
pub mod host;
pub mod layer_kind;
pub mod learn;
pub mod nflog;
pub mod nft;
pub mod paths;
pub mod plan_diff;
pub mod policy;
pub mod scan;
pub mod scope;
pub mod state;

/// What the kernel enforces, read back: [`engine::health`].
pub use engine::health;
