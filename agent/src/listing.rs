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
    /// Whom a replica streams from: the member it cascades from (`replicatefrom`), else the
    /// leader; `null` for the leader.
    pub upstream: Option<String>,
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
        upstream: match role {
            Role::Leader => None,
            Role::Replica => m
                .upstream
                .clone()
                .or_else(|| view.leader_name().map(String::from)),
        },
    }
}

/// The members as a tree: the leader first, each member under whom it streams from
/// ([`Row::upstream`]); a member whose upstream is not listed, or whose chain of upstreams
/// loops, hangs from the leader. One line per member, indented two spaces per level.
pub fn topology(view: &ClusterView) -> Vec<(usize, Row)> {
    let rows = rows(view);
    let leader = view.leader_name();
    let known = |n: &str| rows.iter().any(|r| r.name == n);
    // The parent each member hangs from (`None`: a root).
    let parent = |r: &Row| -> Option<String> {
        if r.role == Role::Leader {
            return None;
        }
        let Some(up) = r.upstream.as_deref().filter(|u| known(u) && *u != r.name) else {
            return leader.map(String::from);
        };
        // A loop of upstreams (stale keys) is cut at the leader.
        let mut seen = vec![r.name.as_str()];
        let mut cur = up;
        while let Some(next) = rows.iter().find(|x| x.name == cur) {
            if seen.contains(&cur) {
                return leader.map(String::from);
            }
            seen.push(cur);
            match next.upstream.as_deref() {
                Some(n) if next.role != Role::Leader && known(n) => cur = n,
                _ => break,
            }
        }
        Some(up.to_string())
    };
    let parents: Vec<Option<String>> = rows.iter().map(parent).collect();
    let mut out: Vec<(usize, Row)> = Vec::new();
    fn walk(
        rows: &[Row],
        parents: &[Option<String>],
        of: Option<&str>,
        depth: usize,
        out: &mut Vec<(usize, Row)>,
    ) {
        for (i, r) in rows.iter().enumerate() {
            if parents[i].as_deref() == of
                && !out.iter().any(|(_, o): &(usize, Row)| o.name == r.name)
            {
                out.push((depth, r.clone()));
                walk(rows, parents, Some(r.name.as_str()), depth + 1, out);
            }
        }
    }
    // The leader (or, without one, every root) first.
    let roots: Vec<usize> = (0..rows.len()).filter(|&i| parents[i].is_none()).collect();
    let mut order: Vec<usize> = roots.clone();
    order.sort_by_key(|&i| rows[i].role != Role::Leader);
    for i in order {
        if !out.iter().any(|(_, o)| o.name == rows[i].name) {
            out.push((0, rows[i].clone()));
            walk(&rows, &parents, Some(rows[i].name.as_str()), 1, &mut out);
        }
    }
    // Anything not reached (its parent chain ends at a member that is not a root).
    for r in &rows {
        if !out.iter().any(|(_, o)| o.name == r.name) {
            out.push((0, r.clone()));
        }
    }
    out
}

/// The cluster's synchronous mode (off when the config key is missing or invalid).
pub fn sync_mode(view: &ClusterView) -> SynchronousMode {
    match &view.config {
        // A standby cluster replicates asynchronously until promotion (`HaConfig::new`).
        Some(Ok(c)) if c.standby_cluster.is_some() => SynchronousMode::Off,
        Some(Ok(c)) => c.synchronous_mode,
        _ => SynchronousMode::Off,
    }
}

/// `host:port` of the remote source when the cluster is a standby cluster.
pub fn standby_of(view: &ClusterView) -> Option<String> {
    match &view.config {
        Some(Ok(c)) => c.standby_cluster.as_ref().map(|sc| sc.address()),
        _ => None,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dcs::model::{LeaderKey, MemberState};

    fn member(name: &str, upstream: Option<&str>) -> MemberInfo {
        MemberInfo {
            name: name.into(),
            role: Role::Replica,
            state: MemberState::Streaming,
            api_address: String::new(),
            host: "127.0.0.1".into(),
            port: 5432,
            timeline: Some(1),
            wal_lsn: None,
            receive_lsn: None,
            replay_lsn: None,
            lag_bytes: Some(0),
            tags: Default::default(),
            version: String::new(),
            system_identifier: None,
            decision: String::new(),
            pending_restart: false,
            upstream: upstream.map(String::from),
        }
    }

    fn tree(members: &[MemberInfo]) -> Vec<(usize, String)> {
        let view = ClusterView {
            leader: Some(LeaderKey {
                name: "a".into(),
                lease: 1,
            }),
            members: members
                .iter()
                .map(|m| (m.name.clone(), m.clone()))
                .collect(),
            ..Default::default()
        };
        topology(&view)
            .into_iter()
            .map(|(d, r)| (d, r.name))
            .collect()
    }

    #[test]
    fn each_member_hangs_under_whom_it_streams_from_and_a_loop_or_an_unknown_upstream_under_the_leader(
    ) {
        let t = tree(&[
            member("a", None),
            member("b", None),
            member("c", Some("b")),
            member("d", Some("c")),
            member("e", Some("gone")),
        ]);
        let want: Vec<(usize, String)> = [(0, "a"), (1, "b"), (2, "c"), (3, "d"), (1, "e")]
            .into_iter()
            .map(|(d, n)| (d, n.to_string()))
            .collect();
        assert_eq!(t, want);
        // Stale keys that loop (c from d, d from c) are cut at the leader.
        let t = tree(&[
            member("a", None),
            member("c", Some("d")),
            member("d", Some("c")),
        ]);
        assert_eq!(t.len(), 3, "{t:?}");
        assert_eq!(t[0], (0, "a".to_string()));
        assert!(t.iter().all(|(d, _)| *d <= 2), "{t:?}");
    }

    #[test]
    fn a_standby_cluster_lists_no_synchronous_replication_and_names_its_source() {
        let sync_on = pgherd_config::DynamicConfig {
            synchronous_mode: SynchronousMode::On,
            ..Default::default()
        };
        let mut view = ClusterView {
            leader: Some(LeaderKey {
                name: "a".into(),
                lease: 1,
            }),
            sync: Some(crate::dcs::model::SyncKey {
                leader: "a".into(),
                members: vec!["b".into()],
                quorum: 1,
            }),
            config: Some(Ok(sync_on.clone())),
            ..Default::default()
        };
        assert_eq!(sync_state(&view, "b", Role::Replica), "sync");
        assert_eq!(standby_of(&view), None);
        // The same key left from when the site was primary: a standby cluster ignores it.
        view.config = Some(Ok(pgherd_config::DynamicConfig {
            standby_cluster: Some(pgherd_config::StandbyCluster {
                host: "10.0.0.9".into(),
                port: 5433,
                primary_slot_name: None,
                restore_command: None,
                create_replica_methods: vec![pgherd_config::ReplicaMethod::Basebackup],
                recovery_min_apply_delay: None,
                repository: None,
                cluster: None,
            }),
            ..sync_on
        }));
        assert_eq!(sync_mode(&view), SynchronousMode::Off);
        assert_eq!(sync_state(&view, "b", Role::Replica), "async");
        assert_eq!(standby_of(&view).as_deref(), Some("10.0.0.9:5433"));
    }
}
