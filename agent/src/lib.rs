//! pgherd-agent: keeps one PostgreSQL member of a pgherd cluster in its right role.
//! See ARCHITECTURE.md for the shape: observe (etcd, PostgreSQL), decide (`ha`, pure), act.

pub mod agent;
pub mod api;
pub mod backup;
pub mod board;
pub mod callbacks;
pub mod dcs;
pub mod failpoint;
pub mod fsutil;
pub mod ha;
pub mod listing;
pub mod lsn;
pub mod postgres;
pub mod watchdog;

/// Now as RFC 3339 (UTC, whole seconds), for what humans and etcd keys read.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}
