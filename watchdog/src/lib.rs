//! The fencing watchdog (ARCHITECTURE rule 3), as a crate of its own with no async runtime and
//! no gRPC; for now it holds what /proc says about a process and the pidfd [`process::Handle`],
//! which the agent and the watchdog share.

pub mod process;
