//! pgherd's gRPC API, package `pgherd.v1`: the service every agent serves and `pgherdctl` calls.

pub mod v1 {
    tonic::include_proto!("pgherd.v1");
}

/// Metadata entry naming the leader's API address when a follower refuses a request that
/// only the leader's agent carries out; `pgherdctl` follows it once.
pub const LEADER_ADDRESS: &str = "pgherd-leader-address";
