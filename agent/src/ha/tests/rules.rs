//! Rules that hold whatever the situation: rule 1 (also over every combination of
//! observations), rule 2 without etcd, and a running job that blocks everything but the
//! leader's renewal.

use super::*;

#[test]
fn rule1_a_writable_member_without_the_key_stops() {
    let leader = member("b", MemberState::Running, 100);
    let d = Obs::new(Some(view(Some("b"), &[leader])))
        .running(Some(primary_status()))
        .decide(&cfg("a"), &Memory::default());
    assert!(d.actions.contains(&Action::StopPostgres), "{d:?}");

    let d = Obs::new(Some(view(None, &[])))
        .running(Some(primary_status()))
        .decide(&cfg("a"), &Memory::default());
    assert_eq!(d.actions, vec![Action::StopPostgres]);
}

#[test]
fn rule2_without_etcd_the_leader_stops_once_its_lease_may_have_expired() {
    let obs = Obs::new(None)
        .holding_lease(Duration::from_secs(2))
        .running(Some(primary_status()));
    let d = obs.decide(&cfg("a"), &Memory::default());
    assert_eq!(
        d.actions,
        vec![Action::RenewLeader],
        "still valid: keep trying"
    );

    let mut late = obs.0.clone();
    late.now += Duration::from_secs(3);
    let d = decide(&late, &cfg("a"), &Memory::default());
    assert!(d.actions.contains(&Action::StopPostgres), "{d:?}");
}

#[test]
fn jobs_in_progress_block_other_actions_but_not_renewal() {
    let d = Obs::new(Some(view(Some("a"), &[])))
        .holding_lease(Duration::from_secs(5))
        .data(DataDir::Empty)
        .job(JobView::Running(JobKind::Bootstrap))
        .decide(&cfg("a"), &Memory::default());
    assert_eq!(d.actions, vec![Action::RenewLeader]);
    assert_eq!(d.state, MemberState::Initializing);

    let d = Obs::new(Some(view(Some("b"), &[])))
        .data(DataDir::Empty)
        .job(JobView::Failed(
            JobKind::Clone {
                from: "b".into(),
                methods: vec![pgherd_config::ReplicaMethod::Basebackup],
            },
            "boom".into(),
        ))
        .decide(&cfg("a"), &Memory::default());
    assert_eq!(d.actions, vec![Action::EmptyDataDir]);

    let d = Obs::new(Some(view(Some("a"), &[])))
        .holding_lease(Duration::from_secs(5))
        .job(JobView::Succeeded(JobKind::Bootstrap))
        .decide(&cfg("a"), &Memory::default());
    assert_eq!(
        d.actions,
        vec![Action::RenewLeader, Action::FinishBootstrap]
    );
}

/// Rule 1 over every combination: a decision that makes or keeps PostgreSQL writable
/// (StartPrimary, Promote, or leaving a running primary alone) happens only while this member
/// holds the leader key with a live lease.
#[test]
fn rule1_no_combination_of_observations_runs_writable_without_the_key() {
    let leaders = [None, Some("a"), Some("b")];
    let lease_states = [
        LeaseView::default(),
        LeaseView {
            held: true,
            valid_until: None,
        },
    ];
    let pgs = [
        (false, None),
        (true, None),
        (true, Some(primary_status())),
        (true, Some(standby_status(10))),
    ];
    let datas = [DataDir::Empty, initialized()];
    let jobs = [JobView::Idle, JobView::Succeeded(JobKind::Bootstrap)];
    let now = Instant::now();
    for leader in leaders {
        for reachable in [true, false] {
            for lease in lease_states {
                for (running, status) in &pgs {
                    for data in &datas {
                        for job in &jobs {
                            let cluster = reachable
                                .then(|| view(leader, &[member("b", MemberState::Running, 5)]));
                            let mut lease = lease;
                            if lease.held {
                                lease.valid_until = Some(now + Duration::from_secs(1));
                            }
                            let obs = Observation {
                                now,
                                wall_now: std::time::SystemTime::now(),
                                cluster,
                                lease,
                                pg: PgView {
                                    data_dir: data.clone(),
                                    running: *running,
                                    status: status.clone(),
                                    control: None,
                                    config_stale: false,
                                },
                                job: job.clone(),
                                failsafe: Default::default(),
                            };
                            let d = decide(&obs, &cfg("a"), &Memory::default());
                            let makes_writable = d
                                .actions
                                .iter()
                                .any(|a| matches!(a, Action::StartPrimary | Action::Promote));
                            let keeps_writable = status.as_ref().is_some_and(|s| !s.in_recovery)
                                && !d.actions.iter().any(|a| {
                                    matches!(a, Action::StopPostgres | Action::AbortBootstrap)
                                });
                            if makes_writable || keeps_writable {
                                let holds = lease.held && (leader == Some("a") || !reachable);
                                assert!(
                                    holds,
                                    "writable without the key: leader={leader:?} reachable={reachable} lease={lease:?} pg={status:?} -> {d:?}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
