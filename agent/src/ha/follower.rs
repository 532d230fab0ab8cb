//! Another member holds the leader key: clone it, follow it, or rewind onto its timeline
//! first (rule 5).

use pgherd_config::ReplicaMethod;

use super::{decision, Action, DataDir, Decision, JobKind, Situation, Upstream};
use crate::dcs::model::{ClusterView, MemberInfo, MemberState, Role};

/// Whom `basebackup` copies from, and why (for the decision's sentence): among the members
/// tagged `clonefrom`, one that is a healthy streaming replica of `leader` (state
/// streaming, on the leader's timeline, its lag known), the least lagging, by name among
/// equals; else the leader itself. Copying from a replica spares the leader the read and
/// the network traffic of a whole base backup.
pub(super) fn clone_source(view: &ClusterView, leader: &MemberInfo, me: &str) -> (String, String) {
    let tagged: Vec<&MemberInfo> = view
        .members
        .values()
        .filter(|m| m.tags.clonefrom && m.name != me && m.name != leader.name)
        .collect();
    let best = tagged
        .iter()
        .filter(|m| {
            m.role == Role::Replica
                && m.state == MemberState::Streaming
                && m.timeline.is_some()
                && m.timeline == leader.timeline
        })
        .filter_map(|m| Some((m.lag_bytes?, m.name.as_str())))
        .min();
    match best {
        Some((lag, name)) => (
            name.to_string(),
            format!(" (tagged clonefrom, streaming, {lag} bytes behind the leader)"),
        ),
        None if tagged.is_empty() => (leader.name.clone(), String::new()),
        None => (
            leader.name.clone(),
            format!(
                " (no member tagged clonefrom is a streaming replica on the leader's timeline: {})",
                tagged
                    .iter()
                    .map(|m| format!("{} {}", m.name, m.state.as_str()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
    }
}

/// Whom a replica streams from, and why (for the decision's sentence): the member its
/// `replicatefrom` tag names (`from`) while that member leads, or is a replica streaming on
/// the leader's timeline whose own `replicatefrom` chain does not lead back to `me`;
/// otherwise the leader. Unlike a member key alone, the state says its PostgreSQL streams, so
/// a stopped, diverged or cut-off upstream sends the replica to the leader at once, and
/// back once it streams again.
///
/// A member that may become leader while the dynamic config has logical permanent slots
/// (`logical_slots_to_keep`) streams from the leader too: PostgreSQL 17's slot
/// synchronisation refuses a standby as its source, so its copies of those slots come only
/// from the leader.
pub(super) fn stream_source<'a>(
    view: &'a ClusterView,
    leader: &'a MemberInfo,
    me: &str,
    from: Option<&str>,
    logical_slots_to_keep: bool,
) -> (&'a MemberInfo, String) {
    let Some(from) = from.filter(|f| *f != leader.name && *f != me) else {
        return (leader, String::new());
    };
    if logical_slots_to_keep {
        return (
            leader,
            format!(" (replicatefrom {from}: I may become leader and logical permanent slots are configured, whose copies only the leader's stream can keep)"),
        );
    }
    let Some(up) = view.members.get(from) else {
        return (
            leader,
            format!(" (replicatefrom {from}: it has no member key)"),
        );
    };
    let streams = up.role == Role::Replica
        && up.state == MemberState::Streaming
        && up.timeline.is_some()
        && up.timeline == leader.timeline;
    if !streams {
        return (
            leader,
            format!(
                " (replicatefrom {from}: it is {}{}, not streaming on the leader's timeline)",
                up.state.as_str(),
                up.timeline
                    .map(|t| format!(" on timeline {t}"))
                    .unwrap_or_default()
            ),
        );
    }
    // A ring of tags (a from b, b from a) would leave nobody streaming from the leader.
    let mut next = up.tags.replicatefrom.as_deref();
    for _ in 0..view.members.len() {
        match next {
            Some(n) if n == me => {
                return (
                    leader,
                    format!(" (replicatefrom {from}: its replicatefrom chain leads back to me)"),
                )
            }
            Some(n) if n != leader.name => {
                next = view
                    .members
                    .get(n)
                    .and_then(|m| m.tags.replicatefrom.as_deref())
            }
            _ => break,
        }
    }
    (
        up,
        format!(" (tagged replicatefrom, streaming; leader {})", leader.name),
    )
}

impl Situation<'_> {
    pub(super) fn follower_decision(&self, leader: &str) -> Decision {
        let Situation {
            obs,
            view,
            cfg,
            mem,
            state,
            primary_running,
            ..
        } = *self;
        let leader_member = view.members.get(leader);
        if primary_running || (obs.lease.held && obs.pg.running) {
            // Rule 1: only the holder of the leader key runs PostgreSQL writable.
            return decision(
                vec![Action::StopPostgres, Action::ReleaseLeader],
                format!("{leader} holds the leader key but my PostgreSQL is writable: stopping it"),
                Role::Replica,
                state,
            );
        }
        if obs.pg.data_dir == DataDir::Empty && cfg.dcs.pause {
            return decision(
                vec![],
                "paused: my data directory is empty and I will not clone until resumed",
                Role::Replica,
                MemberState::Waiting,
            );
        }
        if obs.pg.data_dir == DataDir::Empty {
            // A standby cluster's leader is a standby itself; it serves a clone while it
            // runs in recovery.
            let serves = |m: &MemberInfo| match cfg.dcs.standby_cluster {
                Some(_) => matches!(m.state, MemberState::Streaming | MemberState::InRecovery),
                None => m.state == MemberState::Running,
            };
            return match leader_member {
                Some(m) if serves(m) => {
                    let methods = cfg.dcs.create_replica_methods.clone();
                    let (from, why) = if methods.contains(&ReplicaMethod::Basebackup) {
                        clone_source(view, m, self.me)
                    } else {
                        (leader.to_string(), String::new())
                    };
                    let kind = JobKind::Clone { from, methods };
                    let reason = format!("{}{why}", kind.describe());
                    decision(
                        vec![Action::StartJob(kind)],
                        reason,
                        Role::Replica,
                        MemberState::CreatingReplica,
                    )
                }
                _ => decision(
                    vec![],
                    format!("waiting for {leader} to be running before cloning from it"),
                    Role::Replica,
                    MemberState::Waiting,
                ),
            };
        }
        let Some(leader_member) = leader_member else {
            // The leader key is bound to the leader's lease, so its agent is alive and nobody
            // may take over. Its member key (its address) exists but cannot be read: corrupt, or
            // written by a newer agent in a form this version cannot read. Nothing repairs that
            // by waiting, so say so in every member's decision (`pgherdctl list`; the key is
            // logged at ERROR) and serve reads meanwhile; following resumes once it is readable.
            if let Some(why) = view.unreadable(&format!("members/{leader}")) {
                let start = !obs.pg.running
                    && !cfg.dcs.pause
                    && matches!(obs.pg.data_dir, DataDir::Initialized { .. });
                return decision(
                    if start {
                        vec![Action::StartStandby(None)]
                    } else {
                        vec![]
                    },
                    format!(
                        "{leader} holds the leader key but its member key is unreadable ({why}): I cannot follow it until the key is repaired{}",
                        if start { "; starting read-only meanwhile" } else { "" }
                    ),
                    Role::Replica,
                    state,
                );
            }
            return decision(
                vec![],
                format!("{leader} holds the leader key but has not published its address yet"),
                Role::Replica,
                state,
            );
        };
        let logical_slots_to_keep = !cfg.tags.nofailover
            && cfg
                .dcs
                .slots
                .values()
                .any(|s| s.kind == pgherd_config::SlotType::Logical);
        let (source, why) = stream_source(
            view,
            leader_member,
            self.me,
            cfg.tags.replicatefrom.as_deref(),
            logical_slots_to_keep,
        );
        let upstream = Upstream::of(source);
        if !obs.pg.running && cfg.dcs.pause {
            return decision(
                vec![],
                format!(
                    "paused: PostgreSQL is not running and I will not start it (leader: {leader})"
                ),
                Role::Replica,
                state,
            );
        }
        if !obs.pg.running {
            return self.stopped_follower(leader_member, upstream, &why);
        }
        if let (Some(status), Some(since), Some(leader_tl)) = (
            &obs.pg.status,
            mem.not_streaming_since,
            leader_member.timeline,
        ) {
            let grace = std::time::Duration::from_secs(cfg.dcs.ttl);
            let stuck = obs.now.saturating_duration_since(since) > grace;
            if stuck && status.in_recovery && status.timeline != Some(leader_tl) {
                return decision(
                    vec![Action::StopPostgres],
                    format!(
                        "not streaming from {leader} for over {} s and my timeline {:?} differs from its {leader_tl}: stopping to check for divergence",
                        cfg.dcs.ttl, status.timeline
                    ),
                    Role::Replica,
                    state,
                );
            }
        }
        let up = upstream.name.clone();
        if mem.upstream.as_deref() != Some(up.as_str()) {
            return decision(
                vec![Action::FollowUpstream(upstream)],
                format!("following {up}{why}"),
                Role::Replica,
                state,
            );
        }
        let d = decision(vec![], format!("following {up}{why}"), Role::Replica, state);
        if obs.pg.config_stale {
            d.with(Action::ApplyConfig)
        } else {
            d
        }
    }

    /// Rule 5: a stopped member compares its timeline with the leader's before it streams;
    /// a different timeline goes through pg_rewind (which changes nothing if the histories did
    /// not diverge) or, if allowed, a fresh clone.
    /// `upstream` is whom it streams from (the leader, or the member `why` names).
    fn stopped_follower(&self, leader: &MemberInfo, upstream: Upstream, why: &str) -> Decision {
        let Situation {
            obs,
            cfg,
            mem,
            state,
            ..
        } = *self;
        let name = leader.name.as_str();
        let (Some(local), Some(theirs)) = (obs.pg.control.map(|c| c.timeline), leader.timeline)
        else {
            return decision(
                vec![],
                format!("waiting to compare my timeline with {name}'s before following it"),
                Role::Replica,
                state,
            );
        };
        if local == theirs {
            let up = upstream.name.clone();
            return decision(
                vec![Action::StartStandby(Some(upstream))],
                format!("starting as a standby of {up}{why}"),
                Role::Replica,
                state,
            );
        }
        // A standby that crashed shows the timeline of its last restartpoint, usually before a
        // switch it can simply follow; and pg_rewind cannot take its data anyway (its crash
        // recovery in single-user mode refuses a standby). Start it as a standby: PostgreSQL
        // follows the new timeline if its history allows, and refuses otherwise, in which case
        // the not-streaming rule stops it cleanly and the next start is a rewind.
        if let (DataDir::Initialized { standby: true, .. }, Some(c)) =
            (&obs.pg.data_dir, obs.pg.control)
        {
            if !c.shut_down_cleanly {
                return decision(
                    vec![Action::StartStandby(Some(upstream))],
                    format!("my standby data directory was not shut down cleanly (timeline {local}): starting it as a standby of {name} to follow its timeline {theirs}; pg_rewind needs a clean shutdown"),
                    Role::Replica,
                    state,
                );
            }
        }
        let pg = &cfg.dcs.postgresql;
        if mem.rewind_failed.as_ref() == Some(&(name.to_string(), theirs)) {
            return decision(
                vec![],
                format!("pg_rewind onto {name} (timeline {theirs}) failed before; not starting PostgreSQL until the data directory is repaired or remove_data_directory_on_rewind_failure is on"),
                Role::Replica,
                MemberState::Stopped,
            );
        }
        if pg.use_pg_rewind {
            return decision(
                vec![Action::StartJob(JobKind::Rewind { from: name.to_string() })],
                format!("my timeline {local} differs from {name}'s {theirs}: running pg_rewind before following it"),
                Role::Replica,
                MemberState::Rewinding,
            );
        }
        if pg.remove_data_directory_on_rewind_failure {
            return decision(
                vec![Action::EmptyDataDir],
                format!("my timeline {local} differs from {name}'s {theirs} and use_pg_rewind is off: removing the data directory to clone {name} again"),
                Role::Replica,
                MemberState::Stopped,
            );
        }
        decision(
            vec![],
            format!("my timeline {local} differs from {name}'s {theirs}, use_pg_rewind and remove_data_directory_on_rewind_failure are off: not starting PostgreSQL"),
            Role::Replica,
            MemberState::Stopped,
        )
    }
}
