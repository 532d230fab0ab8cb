//! What pgherd stores in etcd under `/pgherd/<cluster>/`, as typed values.
//!
//! The structs deny unknown fields only so that `pgherd_config::lenient` can find and name
//! them: every JSON value read from etcd goes through it (see `Dcs::load`), which ignores
//! fields a newer agent added and fails only on what cannot be read at all.

use std::collections::BTreeMap;

use chrono::{DateTime, FixedOffset, Utc};
use pgherd_config::{Config, DynamicConfig, Tags};
use serde::{Deserialize, Serialize};

use crate::lsn::Lsn;

/// The version every member publishes, so mixed versions are visible in `pgherdctl list`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Leader,
    Replica,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Leader => "leader",
            Role::Replica => "replica",
        }
    }
}

/// What a member's PostgreSQL is doing, as shown to operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberState {
    /// The leader's PostgreSQL accepts writes.
    #[serde(rename = "running")]
    Running,
    /// A replica receiving WAL from the leader.
    #[serde(rename = "streaming")]
    Streaming,
    /// A replica replaying WAL without a live connection to the leader.
    #[serde(rename = "in recovery")]
    InRecovery,
    #[serde(rename = "starting")]
    Starting,
    #[serde(rename = "stopped")]
    Stopped,
    /// Running initdb for a new cluster.
    #[serde(rename = "initializing")]
    Initializing,
    /// Copying the leader with pg_basebackup.
    #[serde(rename = "creating replica")]
    CreatingReplica,
    /// Waiting for something it cannot do itself (a leader to clone from, ...).
    #[serde(rename = "waiting")]
    Waiting,
    /// Running pg_rewind onto the leader's history.
    #[serde(rename = "rewinding")]
    Rewinding,
    /// Replacing the data directory from a base backup and recovering to a target.
    #[serde(rename = "restoring")]
    Restoring,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Running => "running",
            MemberState::Streaming => "streaming",
            MemberState::InRecovery => "in recovery",
            MemberState::Starting => "starting",
            MemberState::Stopped => "stopped",
            MemberState::Initializing => "initializing",
            MemberState::CreatingReplica => "creating replica",
            MemberState::Waiting => "waiting",
            MemberState::Rewinding => "rewinding",
            MemberState::Restoring => "restoring",
        }
    }

    /// Whether PostgreSQL is up and serving (a candidate for failover must be).
    pub fn is_healthy(self) -> bool {
        matches!(
            self,
            MemberState::Running | MemberState::Streaming | MemberState::InRecovery
        )
    }
}

/// The value of `members/<name>`, bound to that member's own lease.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberInfo {
    pub name: String,
    pub role: Role,
    pub state: MemberState,
    /// `host:port` of the agent's API.
    pub api_address: String,
    /// PostgreSQL's connect address.
    pub host: String,
    pub port: u16,
    #[serde(default)]
    pub timeline: Option<u32>,
    /// The leader's current WAL write position.
    #[serde(default)]
    pub wal_lsn: Option<Lsn>,
    #[serde(default)]
    pub receive_lsn: Option<Lsn>,
    #[serde(default)]
    pub replay_lsn: Option<Lsn>,
    /// Bytes behind the leader's last published position.
    #[serde(default)]
    pub lag_bytes: Option<u64>,
    pub tags: Tags,
    pub version: String,
    /// PostgreSQL's database system identifier, once the data directory exists.
    #[serde(default)]
    pub system_identifier: Option<String>,
    /// The agent's last decision, in one sentence.
    #[serde(default)]
    pub decision: String,
    /// A changed parameter waits for a restart of this member's PostgreSQL.
    #[serde(default)]
    pub pending_restart: bool,
}

impl MemberInfo {
    /// The furthest WAL position this member is known to have.
    pub fn wal_position(&self) -> Option<Lsn> {
        [self.wal_lsn, self.receive_lsn, self.replay_lsn]
            .into_iter()
            .flatten()
            .max()
    }
}

/// The holder of the `leader` key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderKey {
    pub name: String,
    pub lease: i64,
}

/// The `initialize` key: claimed (empty, bound to the initialising member's lease) while
/// initdb runs, then the system identifier for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Initialize {
    Claimed,
    SystemIdentifier(String),
    /// Neither empty nor a system identifier (why). The cluster exists, but nobody can tell
    /// whose data belongs to it: nobody exits over it, nobody races for a vacant leader key.
    Unreadable(String),
}

impl Initialize {
    /// Reads the key's value: empty (a claim) or a decimal system identifier.
    pub fn parse(value: &[u8]) -> Initialize {
        if value.is_empty() {
            return Initialize::Claimed;
        }
        match std::str::from_utf8(value).ok().map(str::trim) {
            Some(id) if id.parse::<u64>().is_ok() => Initialize::SystemIdentifier(id.to_string()),
            _ => Initialize::Unreadable(format!(
                "{:?} is not a database system identifier",
                String::from_utf8_lossy(&value[..value.len().min(64)])
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HandoverKind {
    /// Planned: the leader stops cleanly and hands its key to a caught-up replica.
    Switchover,
    /// Manual: a named replica takes over when there is no healthy leader.
    Failover,
}

/// The `switchover` key: a pending planned switchover or manual failover.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Handover {
    pub kind: HandoverKind,
    /// The leader when it was requested.
    #[serde(default)]
    pub from: Option<String>,
    /// The replica to hand over to; `None`: the best eligible one when it runs.
    #[serde(default)]
    pub to: Option<String>,
    /// RFC 3339; `None`: at once.
    #[serde(default)]
    pub scheduled_at: Option<String>,
    /// Set by the old leader once it has stopped: the position the candidate must have
    /// replayed past before it takes the key (its shutdown checkpoint).
    #[serde(default)]
    pub final_lsn: Option<Lsn>,
    /// RFC 3339 with milliseconds: when the old leader released the key.
    #[serde(default)]
    pub handed_over_at: Option<String>,
    /// The member that took the leader key after the old leader released it, written in the
    /// same etcd transaction as the leader key. From then on the old leader has no claim to
    /// take the key back: the taker may have promoted and acknowledged writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub taken_by: Option<String>,
    pub requested_at: String,
}

/// Everything under the cluster prefix, read in one request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterView {
    pub revision: i64,
    pub initialize: Option<Initialize>,
    pub leader: Option<LeaderKey>,
    pub members: BTreeMap<String, MemberInfo>,
    /// The dynamic config, or why it could not be used.
    pub config: Option<Result<DynamicConfig, String>>,
    /// The leader's last published WAL position (`optime/leader`).
    pub leader_optime: Option<Lsn>,
    /// A pending switchover or manual failover, and its key's revision.
    pub handover: Option<(Handover, i64)>,
    /// The synchronous replication key.
    pub sync: Option<SyncKey>,
    /// The last point-in-time restore of the cluster, and its key's revision.
    pub restore: Option<(RestoreKey, i64)>,
    /// Not stored in etcd: the members whose agents answered this member just now (asked
    /// before racing for a vacant leader key). `None` when nobody was asked.
    pub reached: Option<std::collections::BTreeSet<String>>,
    /// Keys (relative to the cluster prefix, e.g. `sync`, `members/node2`) whose value
    /// exists but cannot be read, with why. Their field above is `None` (or, for `config`,
    /// the last valid one): unreadable is not absent, and decide fails closed on it.
    pub unreadable: BTreeMap<String, String>,
}

impl ClusterView {
    pub fn leader_name(&self) -> Option<&str> {
        self.leader.as_ref().map(|l| l.name.as_str())
    }

    pub fn leader_member(&self) -> Option<&MemberInfo> {
        self.leader_name().and_then(|n| self.members.get(n))
    }

    /// Why `key` (relative to the cluster prefix) cannot be read, if it cannot.
    pub fn unreadable(&self, key: &str) -> Option<&str> {
        self.unreadable.get(key).map(String::as_str)
    }
}

/// The dynamic config in effect: etcd's, or while it is unreadable the last valid one this
/// agent read (`Dcs::load` keeps it in the view and logs the problem at ERROR). The file's
/// `bootstrap.dcs` only before the cluster has a config key, or when the key has been
/// unreadable since this agent started (logged at ERROR too, and decide then races for no
/// vacant leader key).
pub fn dynamic_config(cfg: &Config, view: Option<&ClusterView>) -> DynamicConfig {
    match view.and_then(|v| v.config.as_ref()) {
        Some(Ok(d)) => d.clone(),
        Some(Err(_)) | None => cfg.bootstrap.dcs.clone(),
    }
}

/// One entry of `history`: a promotion that started a new timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryEntry {
    pub timeline: u32,
    /// Where the new timeline branched off the old one.
    pub switch_lsn: Option<Lsn>,
    /// RFC 3339, UTC.
    pub time: String,
    pub reason: String,
    pub leader: String,
}

/// The `sync` key: the members that may take over without losing an acknowledged commit
/// (see `ha::sync`), written only by the leader it names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncKey {
    pub leader: String,
    pub members: Vec<String>,
    /// Every acknowledged commit is on at least this many of `members`.
    pub quorum: u32,
}

/// Where a point-in-time restore of the cluster is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RestorePhase {
    /// The named leader is replacing its data directory; nobody else may take over.
    Restoring,
    /// The leader runs on the restored data; members whose timeline is older re-clone.
    Done,
    /// The restore failed and the leader's previous data directory was put back.
    Failed,
}

/// The `restore` key: the cluster's last point-in-time restore.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreKey {
    pub id: String,
    /// The member that restores (the leader when it was requested).
    pub leader: String,
    pub backup_id: String,
    pub target: Target,
    pub phase: RestorePhase,
    /// RFC 3339, UTC.
    pub requested_at: String,
    #[serde(default)]
    pub finished_at: Option<String>,
    /// The timeline the restored cluster runs on.
    #[serde(default)]
    pub timeline: Option<u32>,
    #[serde(default)]
    pub message: String,
}

/// What a point-in-time restore recovers to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// RFC 3339 with an offset, stored normalised to UTC.
    Time(String),
    Lsn(Lsn),
    /// A restore point made with `pg_create_restore_point(name)`.
    Name(String),
    /// The end of the archive.
    Latest,
}

/// Why what the operator typed is not a restore target.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TargetError {
    #[error("--target-time {0:?} is not a time: use RFC 3339 with a zone, e.g. 2026-11-26T10:00:00Z or 2026-11-26 10:00:00+01:00")]
    BadTime(String),
    #[error("--target-lsn {0:?} is not an LSN like 0/3000060")]
    BadLsn(String),
    #[error("--target-name must not be empty")]
    EmptyName,
    #[error("give exactly one of --target-time, --target-lsn, --target-name, --latest")]
    NotOne,
}

/// Parses a time as RFC 3339 (`T` or a space between date and time; a zone is required).
pub fn parse_time(s: &str) -> Result<DateTime<Utc>, TargetError> {
    let t = s.trim();
    let normalised = if t.len() > 10 && t.as_bytes()[10] == b' ' {
        format!("{}T{}", &t[..10], &t[11..])
    } else {
        t.to_string()
    };
    let normalised = normalised.replace(" +", "+").replace(" -", "-");
    DateTime::<FixedOffset>::parse_from_rfc3339(&normalised)
        .map(|d| d.with_timezone(&Utc))
        .map_err(|_| TargetError::BadTime(s.to_string()))
}

impl Target {
    /// From the CLI's options (exactly one must be set).
    pub fn from_options(
        time: Option<&str>,
        lsn: Option<&str>,
        name: Option<&str>,
        latest: bool,
    ) -> Result<Target, TargetError> {
        let given =
            time.is_some() as u8 + lsn.is_some() as u8 + name.is_some() as u8 + latest as u8;
        if given != 1 {
            return Err(TargetError::NotOne);
        }
        if let Some(t) = time {
            let utc = parse_time(t)?;
            return Ok(Target::Time(
                utc.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            ));
        }
        if let Some(l) = lsn {
            return l
                .trim()
                .parse()
                .map(Target::Lsn)
                .map_err(|_| TargetError::BadLsn(l.to_string()));
        }
        if let Some(n) = name {
            if n.is_empty() {
                return Err(TargetError::EmptyName);
            }
            return Ok(Target::Name(n.to_string()));
        }
        Ok(Target::Latest)
    }

    /// How logs, messages and pgherdctl name the target.
    pub fn describe(&self) -> String {
        match self {
            Target::Time(t) => format!("time {t}"),
            Target::Lsn(l) => format!("LSN {l}"),
            Target::Name(n) => format!("restore point {n:?}"),
            Target::Latest => "the end of the archive".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_normalise() {
        let t = Target::from_options(Some("2026-11-26 10:00:00+01:00"), None, None, false).unwrap();
        assert_eq!(t, Target::Time("2026-11-26T09:00:00Z".into()));
        assert!(matches!(
            Target::from_options(Some("yesterday"), None, None, false),
            Err(TargetError::BadTime(_))
        ));
        assert!(matches!(
            Target::from_options(Some("2026-11-26 10:00:00"), None, None, false),
            Err(TargetError::BadTime(_))
        ));
        assert_eq!(
            Target::from_options(None, None, None, false),
            Err(TargetError::NotOne)
        );
        assert_eq!(
            Target::from_options(None, Some("0/3000060"), None, true),
            Err(TargetError::NotOne)
        );
        assert_eq!(
            Target::from_options(None, Some("0/3000060"), None, false).unwrap(),
            Target::Lsn(Lsn(0x3000060))
        );
    }
}
