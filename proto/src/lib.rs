//! pgherd's gRPC API, package `pgherd.v1`: the service every agent serves and `pgherdctl` calls.

pub mod v1 {
    tonic::include_proto!("pgherd.v1");
}
