//! A standby cluster (the dynamic config's `standby_cluster`): its leader-key holder runs
//! PostgreSQL as a standby of the remote source and nobody promotes (rule 9); the others
//! follow the standby leader; a cluster demoted to a standby cluster stops, rewinds onto the
//! remote's history and follows it.

use super::*;

fn section() -> pgherd_config::StandbyCluster {
    pgherd_config::StandbyCluster {
        host: "10.9.0.1".into(),
        port: 5433,
        primary_slot_name: Some("dr".into()),
        restore_command: None,
        create_replica_methods: vec![pgherd_config::ReplicaMethod::Basebackup],
        recovery_min_apply_delay: None,
        repository: None,
        cluster: None,
    }
}

fn standby_cfg(name: &str) -> HaConfig {
    let mut c = cfg(name);
    c.dcs.standby_cluster = Some(section());
    c
}

fn remote() -> Upstream {
    Upstream::remote(&section())
}

fn primary_dir() -> DataDir {
    DataDir::Initialized {
        system_identifier: SYSID,
        standby: false,
    }
}

#[test]
fn the_standby_leader_follows_the_remote_source_and_never_promotes() {
    let v = view(Some("a"), &[]);
    let lease = Duration::from_secs(5);
    let d = Obs::new(Some(v.clone()))
        .holding_lease(lease)
        .decide(&standby_cfg("a"), &Memory::default());
    assert_eq!(
        d.actions,
        vec![Action::RenewLeader, Action::StartStandby(Some(remote()))]
    );
    assert_eq!(d.role, Role::Leader);
    assert!(d.reason.contains("10.9.0.1:5433"), "{}", d.reason);

    // In recovery, pointed elsewhere (it just took the key from a dead standby leader):
    // re-point to the remote source; a normal cluster would promote here.
    let running = Obs::new(Some(v.clone()))
        .holding_lease(lease)
        .running(Some(standby_status(5)));
    let d = running.decide(&standby_cfg("a"), &following("b"));
    assert_eq!(
        d.actions,
        vec![
            Action::RenewLeader,
            Action::FollowUpstream(remote()),
            Action::LeaderHousekeeping
        ]
    );
    let d = running.decide(&standby_cfg("a"), &following("10.9.0.1:5433"));
    assert_eq!(
        d.actions,
        vec![Action::RenewLeader, Action::LeaderHousekeeping]
    );
    assert_eq!(d.reason, "I am the standby leader, following 10.9.0.1:5433");
    // The same observation without the section promotes: the section alone prevents it.
    let d = running.decide(&cfg("a"), &following("10.9.0.1:5433"));
    assert!(d.actions.contains(&Action::Promote), "{d:?}");
}

#[test]
fn a_demoted_leader_stops_rewinds_onto_the_remote_and_follows_it() {
    let v = view(Some("a"), &[]);
    let lease = Duration::from_secs(5);
    let c = standby_cfg("a");
    // demote-cluster added the section while this primary led.
    let d = Obs::new(Some(v.clone()))
        .holding_lease(lease)
        .data(primary_dir())
        .running(Some(primary_status()))
        .decide(&c, &Memory::default());
    assert_eq!(d.actions, vec![Action::RenewLeader, Action::Demote]);
    assert_eq!(d.role, Role::Leader);
    // Stopped with a primary's data directory: pg_rewind onto the remote's history first.
    let d = Obs::new(Some(v.clone()))
        .holding_lease(lease)
        .data(primary_dir())
        .decide(&c, &Memory::default());
    let rewind = JobKind::Rewind {
        from: "10.9.0.1:5433".into(),
    };
    assert_eq!(
        d.actions,
        vec![Action::RenewLeader, Action::StartJob(rewind.clone())]
    );
    // Rewound: start as the standby leader.
    let d = Obs::new(Some(v.clone()))
        .holding_lease(lease)
        .data(primary_dir())
        .job(JobView::Succeeded(rewind.clone()))
        .decide(&c, &Memory::default());
    assert_eq!(
        d.actions,
        vec![Action::RenewLeader, Action::StartStandby(Some(remote()))]
    );
    // The remote does not answer: keep the key and wait (no promotion, no start).
    let d = Obs::new(Some(v.clone()))
        .holding_lease(lease)
        .data(primary_dir())
        .job(JobView::SourceDown(rewind.clone(), "down".into()))
        .decide(&c, &Memory::default());
    assert_eq!(d.actions, vec![Action::RenewLeader]);
    // The rewind failed: another member, already a standby, leads the standby cluster.
    let d = Obs::new(Some(v))
        .holding_lease(lease)
        .data(primary_dir())
        .job(JobView::Failed(rewind, "diverged".into()))
        .decide(&c, &Memory::default());
    assert_eq!(d.actions, vec![Action::ReleaseLeader]);
}

/// Rule 9: in a standby cluster no observation makes any member promote or start writable.
#[test]
fn no_observation_makes_a_standby_cluster_member_promote_or_start_writable() {
    let members = [
        member("a", MemberState::Streaming, 10),
        member("b", MemberState::Streaming, 20),
    ];
    let dirs = [initialized(), primary_dir(), DataDir::Empty];
    let statuses = [
        None,
        Some(standby_status(30)),
        Some(PgStatus {
            streaming: false,
            ..standby_status(30)
        }),
    ];
    let jobs = [
        JobView::Idle,
        JobView::Succeeded(JobKind::Rewind {
            from: "10.9.0.1:5433".into(),
        }),
        JobView::Succeeded(JobKind::Bootstrap),
    ];
    let mut seen = 0;
    for leader in [Some("a"), Some("b"), None] {
        for holding in [true, false] {
            for dir in &dirs {
                for running in [false, true] {
                    for status in &statuses {
                        for job in &jobs {
                            for mem in [Memory::default(), following("b")] {
                                let mut o = Obs::new(Some(view(leader, &members)))
                                    .data(dir.clone())
                                    .job(job.clone());
                                if holding {
                                    o = o.holding_lease(Duration::from_secs(5));
                                }
                                if running {
                                    o = o.running(status.clone());
                                }
                                let d = o.decide(&standby_cfg("a"), &mem);
                                seen += 1;
                                assert!(
                                    !d.actions.iter().any(|a| matches!(
                                        a,
                                        Action::Promote | Action::StartPrimary
                                    )),
                                    "leader {leader:?} holding {holding} {dir:?} running {running} {status:?} {job:?}: {d:?}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(seen > 600, "{seen}");
}

#[test]
fn a_standby_cluster_member_clones_from_and_fails_over_to_a_standby_leader() {
    // The standby leader streams (in recovery): a new member clones from it; in a normal
    // cluster a leader in recovery is not cloned from.
    let v = view(
        Some("a"),
        &[MemberInfo {
            role: Role::Leader,
            ..member("a", MemberState::Streaming, 10)
        }],
    );
    let empty = Obs::new(Some(v)).data(DataDir::Empty);
    let d = empty.decide(&standby_cfg("b"), &Memory::default());
    assert!(
        matches!(&d.actions[..], [Action::StartJob(JobKind::Clone { from, .. })] if from == "a"),
        "{d:?}"
    );
    let d = empty.decide(&cfg("b"), &Memory::default());
    assert_eq!(d.actions, vec![]);
    // The standby leader is gone: the most advanced member takes the key as usual, and
    // once it holds it follows the remote source instead of promoting.
    let v = view(None, &[member("c", MemberState::Streaming, 10)]);
    let d = Obs::new(Some(v))
        .running(Some(standby_status(50)))
        .decide(&standby_cfg("b"), &following("a"));
    assert_eq!(d.actions, vec![Action::AcquireLeader]);
}

#[test]
fn a_standby_data_directory_races_to_lead_an_uninitialised_standby_cluster() {
    let mut v = view(None, &[]);
    v.initialize = None;
    let o = Obs::new(Some(v));
    let d = o.decide(&standby_cfg("a"), &Memory::default());
    assert_eq!(
        d.actions,
        vec![Action::AdoptCluster {
            system_identifier: SYSID
        }]
    );
    // Without the section a standby's data directory waits for a primary.
    assert_eq!(o.decide(&cfg("a"), &Memory::default()).actions, vec![]);
}

/// Rule 9 for restores: a point-in-time restore ends with a promotion, so a standby
/// cluster's leader ends a requested restore as refused instead of running it.
#[test]
fn a_standby_leader_refuses_a_requested_restore() {
    let mut v = view(Some("a"), &[]);
    v.restore = Some((
        restore_key("a", crate::dcs::model::RestorePhase::Restoring, None),
        3,
    ));
    let o = Obs::new(Some(v))
        .holding_lease(Duration::from_secs(5))
        .running(Some(standby_status(5)));
    let d = o.decide(&standby_cfg("a"), &following("10.9.0.1:5433"));
    assert!(
        matches!(&d.actions[..], [Action::RenewLeader, Action::FinishRestore { error: Some(e), .. }] if e.contains("standby cluster")),
        "{d:?}"
    );
    // Without the section the same request starts the restore.
    let d = o.decide(&cfg("a"), &following("10.9.0.1:5433"));
    assert!(
        d.actions
            .iter()
            .any(|a| matches!(a, Action::StartJob(JobKind::Restore { .. }))),
        "{d:?}"
    );
}
