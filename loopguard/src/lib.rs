//! loopguard: decides which local users may reach which services on this
//! host's loopback, and enforces it with eBPF programs on the cgroup v2
//! socket address hooks.
//!
//! Data flows one way: policy file -> [`policy`] (parse, validate, resolve)
//! -> [`compile`] (a [`compile::Plan`]) -> [`ebpf`] (maps in the kernel).

pub mod audit;
pub mod check;
pub mod compile;
pub mod diag;
pub mod ebpf;
#[doc(hidden)]
pub mod exercise;
pub mod health;
pub mod host;
pub mod nflog;
pub mod nft;
pub mod paths;
pub mod policy;
pub mod scope;
pub mod state;
