//! Planned switchovers and manual failovers (the `switchover` key): the leader's side, the
//! side of the members while the key is vacant, and how long either may take.

use super::{candidate, decision, Action, DataDir, Decision, HaConfig, Situation};
use crate::dcs::model::{ClusterView, Handover, HandoverKind, MemberInfo, MemberState, Role};

impl Situation<'_> {
    /// A healthy leader with a switchover or failover key.
    pub(super) fn leader_handover(&self, steady: Decision) -> Decision {
        let Situation { view, cfg, me, .. } = *self;
        let Some((h, _)) = &view.handover else {
            return steady;
        };
        let to = h.to.clone().unwrap_or_else(|| "the best replica".into());
        match h.kind {
            HandoverKind::Failover => decision(
                vec![
                    Action::RenewLeader,
                    Action::LeaderHousekeeping,
                    Action::DeleteHandover,
                ],
                format!(
                    "a manual failover to {to} was requested but I am a healthy leader: discarding it"
                ),
                Role::Leader,
                MemberState::Running,
            ),
            HandoverKind::Switchover if h.final_lsn.is_some() && h.from.as_deref() == Some(me) => {
                decision(
                    vec![
                        Action::RenewLeader,
                        Action::LeaderHousekeeping,
                        Action::DeleteHandover,
                    ],
                    format!("the switchover to {to} did not complete; I am the leader again"),
                    Role::Leader,
                    MemberState::Running,
                )
            }
            HandoverKind::Switchover if h.final_lsn.is_some() => decision(
                vec![
                    Action::RenewLeader,
                    Action::LeaderHousekeeping,
                    Action::DeleteHandover,
                ],
                format!(
                    "the switchover from {} to {to} ended with me as the leader: removing its key",
                    h.from.as_deref().unwrap_or("?")
                ),
                Role::Leader,
                MemberState::Running,
            ),
            HandoverKind::Switchover if h.from.as_deref().is_some_and(|f| f != me) => decision(
                vec![
                    Action::RenewLeader,
                    Action::LeaderHousekeeping,
                    Action::DeleteHandover,
                ],
                format!(
                    "discarding a switchover requested of {}",
                    h.from.as_deref().unwrap_or("?")
                ),
                Role::Leader,
                MemberState::Running,
            ),
            HandoverKind::Switchover if !self.handover_due(h) => Decision {
                reason: format!(
                    "I am the leader with the lease; switchover to {to} scheduled at {}",
                    h.scheduled_at.as_deref().unwrap_or("?")
                ),
                ..steady
            },
            HandoverKind::Switchover => match switchover_target(view, cfg, h.to.as_deref()) {
                Ok(target) => decision(
                    vec![Action::RenewLeader, Action::HandOver { to: target.clone() }],
                    format!(
                        "planned switchover: stopping writes and handing the leader key to {target}"
                    ),
                    Role::Leader,
                    MemberState::Running,
                )
                .soon(),
                Err(why) => decision(
                    vec![
                        Action::RenewLeader,
                        Action::LeaderHousekeeping,
                        Action::DeleteHandover,
                    ],
                    format!("cancelled the switchover: {why}"),
                    Role::Leader,
                    MemberState::Running,
                ),
            },
        }
    }

    /// Without a leader, a pending handover decides who takes the key: the switchover's
    /// candidate once it has replayed past the old leader's final position, the old leader
    /// again if the candidate does not make it in time, a manual failover's named member.
    pub(super) fn leaderless_handover(&self) -> Option<Decision> {
        let Situation {
            obs,
            view,
            cfg,
            me,
            state,
            ..
        } = *self;
        let (h, _) = view.handover.as_ref()?;
        // When a switchover fails, its old leader has the first claim on the key: the others
        // wait one more ttl before the usual election.
        let grace = match h.from.as_deref() {
            Some(f) if f == me => std::time::Duration::ZERO,
            _ => std::time::Duration::from_secs(cfg.dcs.ttl),
        };
        let expired = self.handover_expired(h, grace);
        let from = h.from.as_deref().unwrap_or("the old leader");
        let to = h.to.as_deref();
        let position = obs
            .pg
            .status
            .as_ref()
            .and_then(|s| [s.receive_lsn, s.replay_lsn].into_iter().flatten().max());
        let replay = obs.pg.status.as_ref().and_then(|s| s.replay_lsn);
        match h.kind {
            // Someone took the key after the release (marked in the same transaction): the
            // switchover is past its point of no return. That member may have promoted and
            // acknowledged writes before it died, so neither the old leader's claim nor the
            // grace period applies: the usual election decides, and the next leader removes
            // the key (rule 7).
            HandoverKind::Switchover if h.taken_by.is_some() => None,
            HandoverKind::Switchover => {
                let final_lsn = h.final_lsn?;
                if expired {
                    // Belt and braces for a taker that could not mark the key (an older
                    // agent): a member on a newer timeline than my data has written after me.
                    let mine = obs.data_timeline();
                    let newer = view
                        .members
                        .values()
                        .filter(|m| m.name != me)
                        .find(|m| m.timeline.zip(mine).is_some_and(|(t, mine)| t > mine));
                    if let Some(m) = newer {
                        return (h.from.as_deref() == Some(me)).then(|| {
                            decision(
                                vec![],
                                format!(
                                    "the switchover to {} did not complete, but {} is on timeline {} after mine: not taking the leader key back",
                                    to.unwrap_or("the candidate"),
                                    m.name,
                                    m.timeline.unwrap_or_default()
                                ),
                                Role::Replica,
                                state,
                            )
                        });
                    }
                    return (h.from.as_deref() == Some(me)).then(|| {
                        decision(
                            vec![Action::AcquireLeader],
                            format!(
                                "the switchover to {} failed: it did not take over within {} s; taking the leader key back",
                                to.unwrap_or("the candidate"),
                                handover_timeout(cfg).as_secs()
                            ),
                            Role::Replica,
                            state,
                        )
                    });
                }
                if to == Some(me) {
                    return Some(match replay {
                        Some(r) if r > final_lsn => decision(
                            vec![Action::AcquireLeader],
                            format!("planned switchover from {from}: replayed past its final position {final_lsn}, taking the leader key"),
                            Role::Replica,
                            state,
                        ),
                        _ => decision(
                            vec![],
                            format!("planned switchover from {from}: waiting to replay past its final position {final_lsn} (at {})", replay.map(|r| r.to_string()).unwrap_or_else(|| "unknown".into())),
                            Role::Replica,
                            state,
                        )
                        .soon(),
                    });
                }
                Some(
                    decision(
                        vec![],
                        format!(
                            "planned switchover from {from} to {} in progress",
                            to.unwrap_or("?")
                        ),
                        Role::Replica,
                        state,
                    )
                    .soon(),
                )
            }
            HandoverKind::Failover => {
                let to = to?;
                if to == me {
                    if cfg.tags.nofailover {
                        return Some(decision(
                            vec![Action::DeleteHandover],
                            "a manual failover to me was requested but I am tagged nofailover: discarding it",
                            Role::Replica,
                            state,
                        ));
                    }
                    let allowed = obs
                        .pg
                        .status
                        .as_ref()
                        .map(|s| candidate::manual_failover_allowed(view, cfg, s));
                    if let Some(Err(why)) = &allowed {
                        if !matches!(why, candidate::CandidateRefusal::NoPosition) {
                            return Some(decision(
                                vec![Action::DeleteHandover],
                                format!("a manual failover to me was requested but I may not take over: {why}; discarding it"),
                                Role::Replica,
                                state,
                            ));
                        }
                    }
                    return Some(match (obs.pg.running, position) {
                        (true, Some(_)) if matches!(allowed, Some(Ok(()))) => decision(
                            vec![Action::AcquireLeader],
                            "manual failover to me requested: taking the leader key",
                            Role::Replica,
                            state,
                        ),
                        (false, _) if !matches!(obs.pg.data_dir, DataDir::Empty) => decision(
                            vec![Action::StartStandby(None)],
                            "manual failover to me requested: starting PostgreSQL read-only first",
                            Role::Replica,
                            state,
                        ),
                        _ => decision(
                            vec![],
                            "manual failover to me requested: waiting for my PostgreSQL to answer",
                            Role::Replica,
                            state,
                        )
                        .soon(),
                    });
                }
                (!expired).then(|| {
                    decision(
                        vec![],
                        format!("manual failover to {to} in progress"),
                        Role::Replica,
                        state,
                    )
                })
            }
        }
    }

    /// The candidate of a switchover from me whose final position I published and that no
    /// member has taken yet.
    pub(super) fn my_published_switchover(&self) -> Option<&str> {
        let Situation { view, me, .. } = *self;
        let (h, _) = view.handover.as_ref()?;
        (h.kind == HandoverKind::Switchover
            && h.from.as_deref() == Some(me)
            && h.final_lsn.is_some()
            && h.taken_by.is_none())
        .then(|| h.to.as_deref().unwrap_or("the best replica"))
    }

    /// A manual failover to another member that is healthy enough to take over.
    pub(super) fn failover_requested_elsewhere(&self) -> Option<String> {
        let Situation { view, cfg, .. } = *self;
        let (h, _) = view.handover.as_ref()?;
        let to = h.to.as_deref()?;
        let healthy = view.members.get(to).is_some_and(|m| m.state.is_healthy());
        (h.kind == HandoverKind::Failover && to != cfg.name && healthy).then(|| to.to_string())
    }

    /// Whether an in-flight handover has run out of time, plus `extra`.
    fn handover_expired(&self, h: &Handover, extra: std::time::Duration) -> bool {
        let Situation { obs, cfg, .. } = *self;
        let since = match h.kind {
            HandoverKind::Switchover => h.handed_over_at.as_deref(),
            HandoverKind::Failover => Some(h.requested_at.as_str()),
        };
        since.and_then(parse_time).is_some_and(|t| {
            obs.wall_now
                .duration_since(t)
                .is_ok_and(|d| d > handover_timeout(cfg) + extra)
        })
    }

    /// Whether a scheduled switchover is due.
    fn handover_due(&self, h: &Handover) -> bool {
        match h.scheduled_at.as_deref() {
            None => true,
            Some(at) => parse_time(at).is_none_or(|t| self.obs.wall_now >= t),
        }
    }
}

/// The replica a switchover should hand over to: the requested one if it qualifies, else
/// the most advanced eligible one. The error says why there is none.
pub fn switchover_target(
    view: &ClusterView,
    cfg: &HaConfig,
    requested: Option<&str>,
) -> Result<String, String> {
    let limit = cfg.dcs.maximum_lag_on_failover;
    let check = |m: &MemberInfo| -> Result<(), String> {
        if m.tags.nofailover {
            return Err(format!("{} is tagged nofailover", m.name));
        }
        if m.state != MemberState::Streaming {
            return Err(format!(
                "{} is not streaming (it is {})",
                m.name,
                m.state.as_str()
            ));
        }
        let lag = match (view.leader_optime, m.wal_position()) {
            (Some(o), Some(p)) => o.bytes_after(p),
            _ => m.lag_bytes.unwrap_or(0),
        };
        if lag > limit {
            return Err(format!(
                "{} lags {lag} bytes behind the leader, more than maximum_lag_on_failover ({limit})",
                m.name
            ));
        }
        Ok(())
    };
    match requested {
        Some(name) if name == cfg.name => Err(format!("{name} is already the leader")),
        Some(name) => {
            let m = view
                .members
                .get(name)
                .ok_or_else(|| format!("{name} is not a member of this cluster"))?;
            check(m).map(|()| name.to_string())
        }
        None => view
            .members
            .values()
            .filter(|m| m.name != cfg.name && check(m).is_ok())
            .max_by_key(|m| {
                (
                    m.wal_position(),
                    m.tags.failover_priority,
                    std::cmp::Reverse(m.name.clone()),
                )
            })
            .map(|m| m.name.clone())
            .ok_or_else(|| {
                "no replica is streaming, eligible and within maximum_lag_on_failover".to_string()
            }),
    }
}

/// How long a handover may take before it is given up: the lease TTL, at least 10 s.
pub fn handover_timeout(cfg: &HaConfig) -> std::time::Duration {
    std::time::Duration::from_secs(cfg.dcs.ttl.max(10))
}

/// Parses an RFC 3339 time from the switchover key.
fn parse_time(s: &str) -> Option<std::time::SystemTime> {
    humantime::parse_rfc3339_weak(s).ok()
}
