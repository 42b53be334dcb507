// Lets loopguard depend on this crate from build.rs (so cargo rebuilds it when
// the programs change); the programs themselves are the `loopguard` binary.
#![no_std]
