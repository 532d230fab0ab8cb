//! `/metrics`: the [`Board`] in Prometheus's text exposition format (version 0.0.4). Every
//! series carries `cluster` and `member` labels; `member` names the member the value is
//! about (for `pgherd_replication_lag_bytes`, each replica this agent knows of).

use std::fmt::Write as _;
use std::time::SystemTime;

use pgherd_config::SynchronousMode;
use tokio::time::Instant;

use crate::board::Board;
use crate::dcs::model::Role;
use crate::listing;

/// The content type Prometheus expects for the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Escapes a label value (backslash, double quote, line feed).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Page {
    out: String,
    base: Vec<(&'static str, String)>,
}

impl Page {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    /// One sample with the base labels (`cluster`, `member`) plus `extra`.
    fn sample(&mut self, name: &str, extra: &[(&str, &str)], value: f64) {
        let labels: Vec<String> = self
            .base
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .chain(extra.iter().copied())
            .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
            .collect();
        let _ = writeln!(self.out, "{name}{{{}}} {value}", labels.join(","));
    }

    fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.family(name, "gauge", help);
        self.sample(name, &[], value);
    }
}

fn flag(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Renders the page; `now` is the monotonic time of the request.
pub fn render(b: &Board, now: Instant) -> String {
    let me = b.me.as_ref();
    let name = me.map(|m| m.name.clone()).unwrap_or_default();
    let mut p = Page {
        out: String::new(),
        base: vec![("cluster", b.cluster.clone()), ("member", name.clone())],
    };
    let local = b.local.as_ref();

    p.family(
        "pgherd_role",
        "gauge",
        "1 for this member's role: primary (holds the leader key) or replica.",
    );
    let leader = me.is_some_and(|m| m.role == Role::Leader);
    p.sample("pgherd_role", &[("role", "primary")], flag(leader));
    p.sample(
        "pgherd_role",
        &[("role", "replica")],
        flag(me.is_some() && !leader),
    );

    let answered = local.and_then(|l| l.pg);
    p.gauge(
        "pgherd_postgres_running",
        "1 when PostgreSQL runs and answered the agent's last status query.",
        flag(local.is_some_and(|l| l.pg_running) && answered.is_some()),
    );
    if let Some(pg) = answered {
        p.gauge(
            "pgherd_postgres_in_recovery",
            "1 when PostgreSQL is in recovery (a standby).",
            flag(pg.in_recovery),
        );
        p.gauge(
            "pgherd_postgres_streaming",
            "1 when the standby's WAL receiver is streaming from its upstream.",
            flag(pg.streaming),
        );
    }
    let standby_cluster = super::http::standby_cluster(b).ok().flatten();
    p.gauge(
        "pgherd_standby_cluster",
        "1 when the dynamic config in effect has a standby_cluster section: this cluster is a standby (disaster-recovery) site of a remote source and no member accepts writes.",
        flag(standby_cluster.is_some()),
    );
    // The standby leader only: the other members of a standby cluster stream from it, and
    // their lag is pgherd_replication_lag_bytes. Absent while its WAL receiver is not
    // running (pgherd_postgres_streaming says so), since the remote's position is unknown.
    if let (Some(_), Some(pg), true) = (standby_cluster, answered, leader) {
        if let (true, Some(end), Some(replay)) = (pg.in_recovery, pg.latest_end_lsn, pg.replay_lsn)
        {
            p.gauge(
                "pgherd_standby_leader_lag_bytes",
                "Bytes the standby leader's replay is behind the end of WAL its remote source last reported (pg_stat_wal_receiver.latest_end_lsn - pg_last_wal_replay_lsn()).",
                end.bytes_after(replay) as f64,
            );
        }
    }
    if let Some(tl) = me.and_then(|m| m.timeline) {
        p.gauge(
            "pgherd_timeline",
            "The timeline this member's PostgreSQL is on.",
            f64::from(tl),
        );
    }
    if let Some(view) = &b.view {
        let replicas: Vec<_> = view
            .members
            .values()
            .filter(|m| view.leader_name() != Some(m.name.as_str()))
            .filter_map(|m| m.lag_bytes.map(|l| (m.name.clone(), l)))
            .collect();
        if !replicas.is_empty() {
            p.family(
                "pgherd_replication_lag_bytes",
                "gauge",
                "Bytes each replica is behind the leader's last published WAL position, as published in its member key.",
            );
            let saved = p.base.clone();
            for (replica, lag) in replicas {
                p.base = vec![("cluster", b.cluster.clone()), ("member", replica)];
                p.sample("pgherd_replication_lag_bytes", &[], lag as f64);
            }
            p.base = saved;
        }
    }
    let remaining = local
        .and_then(|l| l.leader_valid_until)
        .map(|u| u.saturating_duration_since(now).as_secs_f64())
        .unwrap_or(0.0);
    p.gauge(
        "pgherd_lease_remaining_seconds",
        "Seconds the leader lease is certainly alive without another renewal (0 unless this member holds it).",
        remaining,
    );
    if let Some(l) = local {
        p.gauge(
            "pgherd_loop_duration_seconds",
            "How long the agent loop's last cycle took.",
            l.loop_duration.as_secs_f64(),
        );
        p.gauge(
            "pgherd_loop_age_seconds",
            "Seconds since the agent loop last finished a cycle.",
            now.saturating_duration_since(l.at).as_secs_f64(),
        );
    }
    p.family(
        "pgherd_failovers_total",
        "counter",
        "Failovers (automatic or manual) that promoted this member since the agent started.",
    );
    p.sample("pgherd_failovers_total", &[], b.failovers as f64);
    p.family(
        "pgherd_switchovers_total",
        "counter",
        "Planned switchovers that promoted this member since the agent started.",
    );
    p.sample("pgherd_switchovers_total", &[], b.switchovers as f64);
    p.gauge(
        "pgherd_pending_restart",
        "1 when a changed parameter waits for a PostgreSQL restart.",
        flag(me.is_some_and(|m| m.pending_restart)),
    );
    p.gauge(
        "pgherd_paused",
        "1 when the cluster is in maintenance mode (pgherdctl pause).",
        flag(b.paused),
    );
    let mode = b
        .view
        .as_ref()
        .map(listing::sync_mode)
        .or(local.map(|l| l.synchronous_mode))
        .unwrap_or_default();
    p.family(
        "pgherd_synchronous_mode",
        "gauge",
        "1 for the cluster's synchronous_mode: off, on or quorum.",
    );
    for (m, label) in [
        (SynchronousMode::Off, "off"),
        (SynchronousMode::On, "on"),
        (SynchronousMode::Quorum, "quorum"),
    ] {
        p.sample(
            "pgherd_synchronous_mode",
            &[("mode", label)],
            flag(mode == m),
        );
    }
    let sync_standby = b.view.as_ref().is_some_and(|v| {
        !name.is_empty() && {
            let state = listing::sync_state(v, &name, Role::Replica);
            v.leader_name() != Some(name.as_str()) && (state == "sync" || state == "quorum")
        }
    });
    p.gauge(
        "pgherd_sync_standby",
        "1 when this member is in the sync key: it may take over without losing an acknowledged commit.",
        flag(sync_standby),
    );
    if !b.slots.is_empty() {
        let name = "pgherd_replication_slot_retained_bytes";
        p.family(
            name,
            "gauge",
            "WAL each replication slot on this member holds back, bytes (owner: member, permanent, ignored or foreign).",
        );
        for (row, owner) in &b.slots {
            p.sample(
                name,
                &[
                    ("slot", &row.name),
                    ("type", row.kind.as_str()),
                    ("owner", owner.as_str()),
                ],
                row.retained_bytes.unwrap_or(0) as f64,
            );
        }
        let name = "pgherd_replication_slot_active";
        p.family(
            name,
            "gauge",
            "1 while a consumer streams through the slot.",
        );
        for (row, owner) in &b.slots {
            p.sample(
                name,
                &[
                    ("slot", &row.name),
                    ("type", row.kind.as_str()),
                    ("owner", owner.as_str()),
                ],
                flag(row.active),
            );
        }
    }
    if let Some(backup) = &b.backup {
        if let Some(run) = &backup.last_backup {
            p.gauge(
                "pgherd_last_backup_timestamp_seconds",
                "When the last base backup finished (Unix time).",
                unix_seconds(run.finished_at),
            );
            p.gauge(
                "pgherd_last_backup_success",
                "1 when the last base backup succeeded.",
                flag(run.success),
            );
        }
        if let Some(run) = &backup.last_verify {
            p.gauge(
                "pgherd_last_verify_timestamp_seconds",
                "When the last verification of the backups finished (Unix time).",
                unix_seconds(run.finished_at),
            );
            p.gauge(
                "pgherd_last_verify_success",
                "1 when the last verification of the backups succeeded.",
                flag(run.success),
            );
        }
    }
    p.out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::board::{BackupRun, BackupStatus, LocalStatus, PgFacts};
    use crate::dcs::model::{ClusterView, MemberInfo, MemberState, VERSION};
    use crate::lsn::Lsn;

    #[test]
    fn backup_series_appear_only_with_backup_information() {
        let mut b = Board {
            cluster: "c".into(),
            ..Board::default()
        };
        let now = Instant::now();
        assert!(!render(&b, now).contains("pgherd_last_backup"));
        b.backup = Some(BackupStatus {
            last_backup: Some(BackupRun {
                finished_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1000),
                success: true,
            }),
            last_verify: None,
        });
        let page = render(&b, now);
        assert!(
            page.contains("pgherd_last_backup_timestamp_seconds{cluster=\"c\",member=\"\"} 1000\n")
        );
        assert!(page.contains("pgherd_last_backup_success{cluster=\"c\",member=\"\"} 1\n"));
        assert!(!page.contains("pgherd_last_verify"));
    }

    #[test]
    fn each_slot_has_its_retained_wal_and_owner() {
        let now = Instant::now();
        let mut b = Board {
            cluster: "c".into(),
            ..Board::default()
        };
        assert!(!render(&b, now).contains("pgherd_replication_slot"));
        b.slots.push((
            crate::slots::SlotRow {
                name: "external_archiver".into(),
                kind: pgherd_config::SlotType::Physical,
                database: None,
                plugin: None,
                active: false,
                active_application: None,
                restart_lsn: None,
                confirmed_flush_lsn: None,
                retained_bytes: Some(16777216),
            },
            crate::slots::Owner::Foreign,
        ));
        let page = render(&b, now);
        assert!(
            page.contains("pgherd_replication_slot_retained_bytes{cluster=\"c\",member=\"\",slot=\"external_archiver\",type=\"physical\",owner=\"foreign\"} 16777216\n"),
            "{page}"
        );
        assert!(page.contains("pgherd_replication_slot_active{cluster=\"c\",member=\"\",slot=\"external_archiver\",type=\"physical\",owner=\"foreign\"} 0\n"));
    }

    /// `a` holds the key; `me` is `a` or the replica `b`; the dynamic config has a
    /// `standby_cluster` section when `standby`.
    fn board(me: &str, standby: bool, pg: PgFacts) -> Board {
        let mut config = pgherd_config::DynamicConfig::default();
        if standby {
            config.standby_cluster = Some(pgherd_config::StandbyCluster {
                host: "10.9.0.1".into(),
                port: 5432,
                primary_slot_name: None,
                restore_command: None,
                create_replica_methods: vec![pgherd_config::ReplicaMethod::Basebackup],
                recovery_min_apply_delay: None,
                repository: None,
                cluster: None,
            });
        }
        let member = MemberInfo {
            name: me.into(),
            role: if me == "a" {
                Role::Leader
            } else {
                Role::Replica
            },
            state: MemberState::Running,
            api_address: "127.0.0.1:1".into(),
            host: "127.0.0.1".into(),
            port: 5432,
            timeline: Some(1),
            wal_lsn: None,
            receive_lsn: None,
            replay_lsn: None,
            lag_bytes: None,
            tags: Default::default(),
            version: VERSION.into(),
            system_identifier: None,
            decision: String::new(),
            pending_restart: false,
            upstream: None,
        };
        let now = Instant::now();
        Board {
            cluster: "c".into(),
            me: Some(member),
            leader: Some("a".into()),
            view: Some(ClusterView {
                config: Some(Ok(config)),
                ..Default::default()
            }),
            local: Some(LocalStatus {
                at: now,
                loop_duration: Duration::from_millis(5),
                ttl: Duration::from_secs(10),
                leader_valid_until: (me == "a").then(|| now + Duration::from_secs(9)),
                pg_running: true,
                pg: Some(pg),
                synchronous_mode: Default::default(),
            }),
            ..Board::default()
        }
    }

    const LAG: &str = "pgherd_standby_leader_lag_bytes";

    #[test]
    fn the_standby_cluster_gauge_follows_the_dynamic_config() {
        let now = Instant::now();
        let standby = PgFacts {
            in_recovery: true,
            streaming: true,
            replay_lsn: Some(Lsn(1000)),
            latest_end_lsn: Some(Lsn(1000)),
        };
        let page = render(&board("a", false, PgFacts::default()), now);
        assert!(
            page.contains("pgherd_standby_cluster{cluster=\"c\",member=\"a\"} 0\n"),
            "{page}"
        );
        assert!(!page.contains(LAG), "{page}");
        for me in ["a", "b"] {
            let page = render(&board(me, true, standby), now);
            assert!(
                page.contains(&format!(
                    "pgherd_standby_cluster{{cluster=\"c\",member=\"{me}\"}} 1\n"
                )),
                "{page}"
            );
        }
        // Before the first read of etcd: not known to be a standby cluster.
        let page = render(&Board::default(), now);
        assert!(page.contains("pgherd_standby_cluster{cluster=\"\",member=\"\"} 0\n"));
    }

    #[test]
    fn only_the_standby_leader_reports_its_lag_behind_the_remote_source() {
        let now = Instant::now();
        let facts = PgFacts {
            in_recovery: true,
            streaming: true,
            replay_lsn: Some(Lsn(0x3000000)),
            latest_end_lsn: Some(Lsn(0x3000000 + 8192)),
        };
        let page = render(&board("a", true, facts), now);
        assert!(
            page.contains("pgherd_standby_leader_lag_bytes{cluster=\"c\",member=\"a\"} 8192\n"),
            "{page}"
        );
        assert!(page.contains(&format!("# TYPE {LAG} gauge\n")));
        // A member following the standby leader, the leader of a normal cluster, a standby
        // leader without a WAL receiver, and one just demoted (still out of recovery).
        for b in [
            board("b", true, facts),
            board("a", false, facts),
            board(
                "a",
                true,
                PgFacts {
                    latest_end_lsn: None,
                    streaming: false,
                    ..facts
                },
            ),
            board(
                "a",
                true,
                PgFacts {
                    in_recovery: false,
                    ..facts
                },
            ),
        ] {
            let page = render(&b, now);
            assert!(!page.contains(LAG), "{page}");
        }
        // Replay ahead of the last report (the report is older): 0, never negative.
        let ahead = PgFacts {
            latest_end_lsn: Some(Lsn(0x2000000)),
            ..facts
        };
        let page = render(&board("a", true, ahead), now);
        assert!(page.contains("pgherd_standby_leader_lag_bytes{cluster=\"c\",member=\"a\"} 0\n"));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
