//! pgherd-agent: keeps one PostgreSQL member of a pgherd cluster in its right role.
//! See ARCHITECTURE.md for the shape: observe (etcd, PostgreSQL), decide (`ha`, pure), act.

pub mod agent;
pub mod api;
pub mod callbacks;
pub mod dcs;
pub mod ha;
pub mod listing;
pub mod lsn;
pub mod postgres;
pub mod watchdog;
