//! The cluster's members as operators see them: one [`Row`] per member, shared by
//! `pgherdctl list --format json` and the agent's HTTP `/cluster`, so both print the same
//! fields.

use pgherd_config::SynchronousMode;
use serde::Serialize;

use crate::dcs::model::{ClusterView, MemberInfo, Role};

/// One row of `list --format json`; field names are a contract with operators' scripts.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub name: String,
    pub role: Role,
    pub state: String,
    pub host: String,
    pub port: u16,
    pub timeline: Option<u32>,
    pub lag_bytes: Option<u64>,
    pub receive_lsn: Option<String>,
    pub replay_lsn: Option<String>,
    pub api_address: String,
    pub tags: pgherd_config::Tags,
    pub version: String,
    pub decision: String,
    /// A changed parameter waits for a PostgreSQL restart on this member.
    pub pending_restart: bool,
    /// The cluster is in maintenance mode (`pgherdctl pause`).
    pub paused: bool,
    /// A replica's part in synchronous replication: `sync`, `quorum` or `async`; empty for
    /// the leader.
    pub sync_state: String,
}

/// Every member of `view`, in name order.
pub fn rows(view: &ClusterView) -> Vec<Row> {
    view.members.values().map(|m| row(view, m)).collect()
}

pub fn row(view: &ClusterView, m: &MemberInfo) -> Row {
    // Only the key decides who leads; a member's own claim does not.
    let role = if view.leader_name() == Some(m.name.as_str()) {
        Role::Leader
    } else {
        Role::Replica
    };
    Row {
        name: m.name.clone(),
        role,
        state: m.state.as_str().to_string(),
        host: m.host.clone(),
        port: m.port,
        timeline: m.timeline,
        lag_bytes: m.lag_bytes,
        receive_lsn: m.receive_lsn.map(|l| l.to_string()),
        replay_lsn: m.replay_lsn.map(|l| l.to_string()),
        api_address: m.api_address.clone(),
        tags: m.tags.clone(),
        version: m.version.clone(),
        decision: m.decision.clone(),
        pending_restart: m.pending_restart,
        paused: is_paused(view),
        sync_state: sync_state(view, &m.name, role),
    }
}

/// The cluster's synchronous mode (off when the config key is missing or invalid).
pub fn sync_mode(view: &ClusterView) -> SynchronousMode {
    match &view.config {
        Some(Ok(c)) => c.synchronous_mode,
        _ => SynchronousMode::Off,
    }
}

/// A replica's part in synchronous replication: `sync`, `quorum` or `async`; empty for the
/// leader.
pub fn sync_state(view: &ClusterView, member: &str, role: Role) -> String {
    if role == Role::Leader {
        return String::new();
    }
    let in_key = view.sync.as_ref().is_some_and(|k| {
        Some(k.leader.as_str()) == view.leader_name() && k.members.iter().any(|m| m == member)
    });
    match (sync_mode(view), in_key) {
        (SynchronousMode::On, true) => "sync",
        (SynchronousMode::Quorum, true) => "quorum",
        _ => "async",
    }
    .to_string()
}

pub fn is_paused(view: &ClusterView) -> bool {
    matches!(&view.config, Some(Ok(c)) if c.pause)
}
