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
    /// The member a cascading replica streams from (`replicatefrom`); absent for the leader
    /// and for replicas streaming from it, so their keys read as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
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
    /// The replication slots pgherd owns.
    pub slots: Option<SlotsKey>,
    /// The members a leader in failsafe mode asks (`failsafe`), as its leader last wrote it.
    pub failsafe: Option<FailsafeKey>,
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

    /// The system identifier the `initialize` key records, once the cluster is initialised.
    pub fn system_identifier(&self) -> Option<&str> {
        match &self.initialize {
            Some(Initialize::SystemIdentifier(id)) => Some(id.as_str()),
            _ => None,
        }
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

/// The `demoted` key: the clean shutdown that ended this cluster's last primary when
/// `demote-cluster` made it a standby cluster, written by the leader that stopped. A planned
/// site switch (`pgherdctl switch-site`) promotes the other site only once its standby
/// leader has replayed past `checkpoint_lsn` on `timeline` of the same system: then it holds
/// every commit this site acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemotedKey {
    pub leader: String,
    /// Where the shutdown checkpoint record starts (pg_controldata's latest checkpoint).
    pub checkpoint_lsn: Lsn,
    pub timeline: u32,
    pub system_identifier: String,
    /// The remote source this cluster follows from then on, `host:port`.
    pub source: String,
    /// RFC 3339, UTC.
    pub time: String,
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

/// The `slots` key: the replication slots pgherd owns, written only by the leader it names.
/// A slot that is neither here nor in the dynamic config's `slots` is not pgherd's and is
/// never created, advanced or dropped (see slots.rs at the crate root).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotsKey {
    pub leader: String,
    /// Members whose physical slot pgherd created on the leader (or adopted because the
    /// member itself streamed through it).
    #[serde(default)]
    pub members: BTreeMap<String, MemberSlot>,
    /// Permanent slots of the dynamic config that the leader created or adopted, with the
    /// position replicas advance their copies to.
    #[serde(default)]
    pub permanent: BTreeMap<String, PermanentSlotState>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberSlot {
    /// RFC 3339: when the leader first saw the member's key gone. The slot is dropped
    /// `member_slots_ttl` later unless the member comes back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gone_since: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PermanentSlotState {
    #[serde(rename = "type")]
    pub kind: pgherd_config::SlotType,
    /// Logical: `confirmed_flush_lsn`; physical: `restart_lsn` on the leader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsn: Option<Lsn>,
    /// RFC 3339: when the slot left the dynamic config. The leader dropped its own; the
    /// entry stays `member_slots_ttl` so every replica drops its copy too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_since: Option<String>,
}

/// The `failsafe` key (issue 15, failsafe mode): the members the leader it names asks to
/// confirm it while etcd is unreachable, with their API addresses. Written by that leader
/// whenever its view of the members changes, kept without a lease (it must outlive an
/// outage). While `failsafe_mode` is on, a member it does not name never races for a vacant
/// leader key: a leader staying writable in failsafe mode asked every member that could.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailsafeKey {
    pub leader: String,
    /// Member name -> its agent's API address (`api.connect_address`).
    pub members: BTreeMap<String, String>,
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
    /// `recovery_target_inclusive`: whether recovery stops just after the target (true) or
    /// just before it. Absent in keys written before it existed (true); written only when
    /// false, so an older agent reads every key a newer one writes with the default.
    #[serde(default = "inclusive_default", skip_serializing_if = "is_inclusive")]
    pub target_inclusive: bool,
    /// Tablespaces restored elsewhere than their original location (original -> new).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tablespace_map: BTreeMap<std::path::PathBuf, std::path::PathBuf>,
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

fn inclusive_default() -> bool {
    true
}

fn is_inclusive(b: &bool) -> bool {
    *b
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
    /// A transaction id (`txid_current()`, with or without its epoch): recovery stops at its
    /// commit (or abort).
    Xid(u64),
    /// The end of the base backup (`recovery_target = 'immediate'`): the earliest consistent
    /// point.
    Immediate,
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
    #[error("--target-xid {0:?} is not a transaction id: give a number of 3 or more, e.g. what txid_current() returned")]
    BadXid(String),
    #[error("give exactly one of --target-time, --target-lsn, --target-xid, --target-name, --target-immediate, --latest")]
    NotOne,
    #[error("--target-inclusive {0:?} is not a boolean: give true or false")]
    BadInclusive(String),
    #[error("--target-inclusive applies only to --target-time, --target-lsn and --target-xid (PostgreSQL's recovery_target_inclusive), not to {0}")]
    InclusiveNotApplicable(String),
}

/// The restore target as typed (pgherdctl's flags, the gRPC request, `bootstrap.restore`):
/// at most one kind may be set; [`Target::from_options`] checks and parses it.
#[derive(Debug, Clone, Copy, Default)]
pub struct TargetOptions<'a> {
    pub time: Option<&'a str>,
    pub lsn: Option<&'a str>,
    pub name: Option<&'a str>,
    pub xid: Option<&'a str>,
    pub immediate: bool,
    pub latest: bool,
    /// `--target-inclusive`; `None`: true.
    pub inclusive: Option<&'a str>,
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
    /// From the CLI's options: exactly one target kind must be set. Returns the target and
    /// `recovery_target_inclusive`.
    pub fn from_options(o: TargetOptions<'_>) -> Result<(Target, bool), TargetError> {
        let given = o.time.is_some() as u8
            + o.lsn.is_some() as u8
            + o.name.is_some() as u8
            + o.xid.is_some() as u8
            + o.immediate as u8
            + o.latest as u8;
        if given != 1 {
            return Err(TargetError::NotOne);
        }
        let target = if let Some(t) = o.time {
            let utc = parse_time(t)?;
            Target::Time(utc.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
        } else if let Some(l) = o.lsn {
            l.trim()
                .parse()
                .map(Target::Lsn)
                .map_err(|_| TargetError::BadLsn(l.to_string()))?
        } else if let Some(n) = o.name {
            if n.is_empty() {
                return Err(TargetError::EmptyName);
            }
            Target::Name(n.to_string())
        } else if let Some(x) = o.xid {
            // 0, 1 and 2 are PostgreSQL's invalid, bootstrap and frozen ids, never a commit.
            match x.trim().parse::<u64>() {
                Ok(n) if n >= 3 => Target::Xid(n),
                _ => return Err(TargetError::BadXid(x.to_string())),
            }
        } else if o.immediate {
            Target::Immediate
        } else {
            Target::Latest
        };
        let inclusive = match o.inclusive.map(|s| s.trim().to_ascii_lowercase()) {
            None => true,
            Some(s) if matches!(s.as_str(), "true" | "on" | "yes" | "1") => true,
            Some(s) if matches!(s.as_str(), "false" | "off" | "no" | "0") => false,
            Some(_) => {
                return Err(TargetError::BadInclusive(
                    o.inclusive.unwrap_or_default().to_string(),
                ))
            }
        };
        if o.inclusive.is_some() && !target.takes_inclusive() {
            return Err(TargetError::InclusiveNotApplicable(target.describe()));
        }
        Ok((target, inclusive))
    }

    /// Whether `recovery_target_inclusive` means something for this target.
    pub fn takes_inclusive(&self) -> bool {
        matches!(self, Target::Time(_) | Target::Lsn(_) | Target::Xid(_))
    }

    /// How logs, messages and pgherdctl name the target.
    pub fn describe(&self) -> String {
        match self {
            Target::Time(t) => format!("time {t}"),
            Target::Lsn(l) => format!("LSN {l}"),
            Target::Name(n) => format!("restore point {n:?}"),
            Target::Xid(x) => format!("transaction {x}"),
            Target::Immediate => "the end of the base backup".to_string(),
            Target::Latest => "the end of the archive".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_normalise() {
        let time = |t| TargetOptions {
            time: Some(t),
            ..TargetOptions::default()
        };
        let (t, inclusive) = Target::from_options(time("2026-11-26 10:00:00+01:00")).unwrap();
        assert_eq!(t, Target::Time("2026-11-26T09:00:00Z".into()));
        assert!(inclusive);
        assert!(matches!(
            Target::from_options(time("yesterday")),
            Err(TargetError::BadTime(_))
        ));
        assert!(matches!(
            Target::from_options(time("2026-11-26 10:00:00")),
            Err(TargetError::BadTime(_))
        ));
        assert_eq!(
            Target::from_options(TargetOptions::default()),
            Err(TargetError::NotOne)
        );
        assert_eq!(
            Target::from_options(TargetOptions {
                lsn: Some("0/3000060"),
                latest: true,
                ..TargetOptions::default()
            }),
            Err(TargetError::NotOne)
        );
        assert_eq!(
            Target::from_options(TargetOptions {
                lsn: Some("0/3000060"),
                ..TargetOptions::default()
            })
            .unwrap(),
            (Target::Lsn(Lsn(0x3000060)), true)
        );
    }

    #[test]
    fn xid_immediate_and_inclusive_targets_are_checked() {
        let xid = |x, inclusive| TargetOptions {
            xid: Some(x),
            inclusive,
            ..TargetOptions::default()
        };
        assert_eq!(
            Target::from_options(xid("1234", Some("false"))).unwrap(),
            (Target::Xid(1234), false)
        );
        assert_eq!(
            Target::from_options(xid(" 1234 ", None)).unwrap(),
            (Target::Xid(1234), true)
        );
        for bad in ["", "abc", "-5", "2", "1.5"] {
            assert_eq!(
                Target::from_options(xid(bad, None)),
                Err(TargetError::BadXid(bad.to_string())),
                "{bad:?}"
            );
        }
        assert!(matches!(
            Target::from_options(xid("1234", Some("maybe"))),
            Err(TargetError::BadInclusive(_))
        ));
        assert!(TargetError::BadXid("x".into())
            .to_string()
            .contains("--target-xid"));
        let immediate = TargetOptions {
            immediate: true,
            ..TargetOptions::default()
        };
        assert_eq!(
            Target::from_options(immediate).unwrap(),
            (Target::Immediate, true)
        );
        assert!(matches!(
            Target::from_options(TargetOptions {
                inclusive: Some("false"),
                ..immediate
            }),
            Err(TargetError::InclusiveNotApplicable(_))
        ));
        assert_eq!(
            Target::from_options(TargetOptions {
                xid: Some("7"),
                ..immediate
            }),
            Err(TargetError::NotOne)
        );
    }

    #[test]
    fn restore_keys_of_older_agents_read_and_new_ones_stay_readable() {
        // A key written before xid, immediate and inclusive existed.
        let old = r#"{"id":"r1","leader":"m1","backup_id":"b1","target":{"lsn":"0/3000060"},"phase":"done","requested_at":"2026-11-26T10:00:00Z"}"#;
        let k: RestoreKey = serde_json::from_str(old).unwrap();
        assert!(k.target_inclusive);
        assert_eq!(k.target, Target::Lsn(Lsn(0x3000060)));
        // Inclusive (the default) is not written, so older agents read the key unchanged.
        assert!(!serde_json::to_string(&k).unwrap().contains("inclusive"));
        let mut k2 = k.clone();
        k2.target = Target::Xid(42);
        k2.target_inclusive = false;
        let json = serde_json::to_string(&k2).unwrap();
        assert!(json.contains(r#""target":{"xid":42}"#), "{json}");
        assert!(json.contains(r#""target_inclusive":false"#), "{json}");
        assert_eq!(serde_json::from_str::<RestoreKey>(&json).unwrap(), k2);
        k2.target = Target::Immediate;
        let json = serde_json::to_string(&k2).unwrap();
        assert!(json.contains(r#""target":"immediate""#), "{json}");
    }
}

/// Where a major-version upgrade (`pgherdctl upgrade`) is. The phases before
/// `LeaderStarted` can be undone (the old cluster put back); from it on the new major runs
/// and the upgrade can only go forward (`pgherdctl upgrade --resume`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpgradePhase {
    /// Checked, the cluster paused; the replicas are being stopped.
    Started,
    /// The leader is stopped and pg_upgrade runs (or ran) on its data directory.
    Upgrading,
    /// The point of no return: the leader runs on the new major.
    LeaderStarted,
    /// `vacuumdb --analyze-in-stages` ran on the new leader.
    Analyzed,
    /// The replicas were told to clone the new leader; the cluster runs again.
    Rebuilding,
    /// Every member streams on the new major.
    Done,
    /// Undone before the point of no return: the cluster runs on the old major.
    RolledBack,
}

impl UpgradePhase {
    pub fn as_str(self) -> &'static str {
        match self {
            UpgradePhase::Started => "started",
            UpgradePhase::Upgrading => "upgrading",
            UpgradePhase::LeaderStarted => "leader-started",
            UpgradePhase::Analyzed => "analyzed",
            UpgradePhase::Rebuilding => "rebuilding",
            UpgradePhase::Done => "done",
            UpgradePhase::RolledBack => "rolled-back",
        }
    }

    /// Whether the new major runs: agents take `to_bin_dir` for a data directory of that
    /// major (or an empty one) from here on.
    pub fn new_major_runs(self) -> bool {
        matches!(
            self,
            UpgradePhase::LeaderStarted
                | UpgradePhase::Analyzed
                | UpgradePhase::Rebuilding
                | UpgradePhase::Done
        )
    }

    /// Whether an upgrade in this phase is over (another may start).
    pub fn is_over(self) -> bool {
        matches!(self, UpgradePhase::Done | UpgradePhase::RolledBack)
    }
}

/// The `upgrade` key: the cluster's last major-version upgrade. Once done it records the
/// major the cluster runs and where its binaries are, which an agent whose configuration
/// still names the old major's `bin_dir` follows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpgradeKey {
    /// The leader that runs pg_upgrade.
    pub leader: String,
    pub from_major: u32,
    pub to_major: u32,
    pub from_bin_dir: std::path::PathBuf,
    pub to_bin_dir: std::path::PathBuf,
    /// pg_upgrade's transfer mode: link, clone or copy.
    pub method: String,
    pub phase: UpgradePhase,
    /// RFC 3339, UTC.
    pub started_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// Where the leader's old data directory was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_data_dir: Option<std::path::PathBuf>,
    /// Milliseconds from the leader's stop to the new major accepting writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outage_ms: Option<u64>,
    /// What happened last, in a sentence.
    #[serde(default)]
    pub message: String,
}
