//! Who may take the leader key when nobody holds it (rule 4 of docs/architecture.md).

use std::fmt;

use crate::dcs::model::{ClusterView, MemberInfo};
use crate::lsn::Lsn;

use super::{HaConfig, PgStatus};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CandidateRefusal {
    NoFailover,
    /// Our position is unknown (PostgreSQL did not report one).
    NoPosition,
    TooFarBehind {
        lag: u64,
        limit: u64,
    },
    /// Another healthy eligible member should go first.
    Better {
        name: String,
    },
    /// Synchronous replication forbids it (see `sync::may_take_over`).
    Sync(String),
    /// A key that says who may take over exists but cannot be read (why).
    Unreadable {
        key: String,
        why: String,
    },
}

impl fmt::Display for CandidateRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CandidateRefusal::NoFailover => f.write_str("I am tagged nofailover"),
            CandidateRefusal::NoPosition => f.write_str("my WAL position is unknown"),
            CandidateRefusal::TooFarBehind { lag, limit } => write!(
                f,
                "I am {lag} bytes behind the leader's last position, more than maximum_lag_on_failover ({limit})"
            ),
            CandidateRefusal::Better { name } => {
                write!(f, "{name} is further ahead or preferred")
            }
            CandidateRefusal::Sync(why) => f.write_str(why),
            CandidateRefusal::Unreadable { key, why } => write!(
                f,
                "the {key} key is unreadable ({why}); nobody races for the leader key until it is fixed or deleted"
            ),
        }
    }
}

/// The ordering key among candidates: further WAL first, then higher failover_priority,
/// then the smaller name.
fn rank(position: Lsn, priority: u32, name: &str) -> (Lsn, u32, std::cmp::Reverse<String>) {
    (position, priority, std::cmp::Reverse(name.to_string()))
}

/// Keys whose value decides who may take over. While one exists but cannot be read, an
/// election could pick a member that lacks acknowledged commits (`sync`), is too far behind
/// (`optime/leader`), holds another cluster's data (`initialize`), or follows rules nobody
/// knows (`config`, unreadable since this agent started): fail closed, race for nothing.
fn unreadable_key(view: &ClusterView) -> Option<CandidateRefusal> {
    let refusal = |key: &str, why: &str| CandidateRefusal::Unreadable {
        key: key.to_string(),
        why: why.to_string(),
    };
    for key in ["sync", "optime/leader", "initialize"] {
        if let Some(why) = view.unreadable(key) {
            return Some(refusal(key, why));
        }
    }
    match &view.config {
        Some(Err(why)) => Some(refusal("config", why)),
        _ => None,
    }
}

/// This member's WAL position: the furthest it received, replayed or wrote.
fn position(me: &PgStatus) -> Result<Lsn, CandidateRefusal> {
    [me.receive_lsn, me.replay_lsn, me.wal_lsn]
        .into_iter()
        .flatten()
        .max()
        .ok_or(CandidateRefusal::NoPosition)
}

/// Whether synchronous replication lets this member at `mine` take over (rule 5).
fn sync_allows(view: &ClusterView, cfg: &HaConfig, mine: Lsn) -> Result<(), CandidateRefusal> {
    // For the quorum proof only members whose agents answered just now count: a crashed
    // member's key outlives it (until its lease expires) with a position that may predate
    // commits only it confirmed. Nobody asked (`reached` is None) means no witness, also
    // while a `switchover` key exists: its election may fall to these rules.
    let reachable: Vec<(String, Lsn)> = view
        .members
        .values()
        .filter(|m| m.name != cfg.name && m.state.is_healthy())
        .filter(|m| view.reached.as_ref().is_some_and(|r| r.contains(&m.name)))
        .filter_map(|m| m.wal_position().map(|p| (m.name.clone(), p)))
        .collect();
    super::sync::may_take_over(
        cfg.dcs.synchronous_mode,
        cfg.dcs.synchronous_mode_strict,
        view.sync.as_ref(),
        &cfg.name,
        mine,
        &reachable,
    )
    .map_err(CandidateRefusal::Sync)
}

/// `Ok` if this member may take the key for a manual failover to it. The operator chose
/// it, so neither `maximum_lag_on_failover` nor a better-placed member stops it; but an
/// operator's choice never trades an acknowledged commit: synchronous replication and an
/// unreadable key still do (rule 5; found by the simulation, where `failover --candidate`
/// to a member outside the `sync` key lost commits the key's members had confirmed).
pub fn manual_failover_allowed(
    view: &ClusterView,
    cfg: &HaConfig,
    me: &PgStatus,
) -> Result<(), CandidateRefusal> {
    sync_allows(view, cfg, may_lead(view, cfg, me)?)
}

/// What every taker of the key needs: readable keys that decide who may take over, no
/// `nofailover` tag and a known position, which it returns.
fn may_lead(view: &ClusterView, cfg: &HaConfig, me: &PgStatus) -> Result<Lsn, CandidateRefusal> {
    if let Some(refusal) = unreadable_key(view) {
        return Err(refusal);
    }
    if cfg.tags.nofailover {
        return Err(CandidateRefusal::NoFailover);
    }
    position(me)
}

/// `Ok` if this member may race for the leader key now.
pub fn best_candidate(
    view: &ClusterView,
    cfg: &HaConfig,
    me: &PgStatus,
) -> Result<(), CandidateRefusal> {
    let mine = may_lead(view, cfg, me)?;
    // A sync-key member holds every acknowledged commit (or, in quorum mode, proves it
    // below); the lag limit protects nothing for it and could leave the cluster leaderless.
    let sync_member = cfg.dcs.synchronous_mode != pgherd_config::SynchronousMode::Off
        && view
            .sync
            .as_ref()
            .is_some_and(|k| k.leader == cfg.name || k.members.iter().any(|m| m == &cfg.name));
    if let (Some(optime), false) = (view.leader_optime, sync_member) {
        let lag = optime.bytes_after(mine);
        if lag > cfg.dcs.maximum_lag_on_failover {
            return Err(CandidateRefusal::TooFarBehind {
                lag,
                limit: cfg.dcs.maximum_lag_on_failover,
            });
        }
    }
    sync_allows(view, cfg, mine)?;
    let mode = cfg.dcs.synchronous_mode;
    // In synchronous mode only the sync key's holders compete (see `sync::may_take_over`):
    // its leader, and its members where they may take over whatever they see: always in
    // `on` mode; in `quorum` mode not with q = 0, and not against the key's leader, which
    // needs no proof (deferring to a member whose proof fails would leave nobody leading).
    let holders: Option<&crate::dcs::model::SyncKey> = view
        .sync
        .as_ref()
        .filter(|_| mode != pgherd_config::SynchronousMode::Off);
    let members_compete = holders.is_none_or(|k| {
        mode != pgherd_config::SynchronousMode::Quorum || (k.quorum > 0 && k.leader != cfg.name)
    });
    let my_rank = rank(mine, cfg.tags.failover_priority, &cfg.name);
    let eligible = |m: &&MemberInfo| {
        m.name != cfg.name
            && m.state.is_healthy()
            && !m.tags.nofailover
            && holders.is_none_or(|k| {
                k.leader == m.name || (members_compete && k.members.contains(&m.name))
            })
    };
    for other in view.members.values().filter(eligible) {
        if let Some(pos) = other.wal_position() {
            if rank(pos, other.tags.failover_priority, &other.name) > my_rank {
                return Err(CandidateRefusal::Better {
                    name: other.name.clone(),
                });
            }
        }
    }
    Ok(())
}
