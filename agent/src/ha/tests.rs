//! Table tests of `decide`: one scenario per rule, plus an exhaustive check that no
//! combination of observations lets a member without the leader key run writable.

use std::time::Duration;

use pgherd_config::{DynamicConfig, Tags};
use tokio::time::Instant;

use super::*;
use crate::dcs::model::{ClusterView, Initialize, LeaderKey, MemberInfo, MemberState, Role};
use crate::lsn::Lsn;

const SYSID: u64 = 7000;

fn member(name: &str, state: MemberState, lsn: u64) -> MemberInfo {
    MemberInfo {
        name: name.into(),
        role: Role::Replica,
        state,
        api_address: "127.0.0.1:8008".into(),
        host: "127.0.0.1".into(),
        port: 5432,
        timeline: Some(1),
        wal_lsn: None,
        receive_lsn: Some(Lsn(lsn)),
        replay_lsn: Some(Lsn(lsn)),
        lag_bytes: Some(0),
        tags: Tags::default(),
        version: "test".into(),
        system_identifier: Some(SYSID.to_string()),
        decision: String::new(),
        pending_restart: false,
    }
}

fn view(leader: Option<&str>, members: &[MemberInfo]) -> ClusterView {
    ClusterView {
        revision: 1,
        initialize: Some(Initialize::SystemIdentifier(SYSID.to_string())),
        leader: leader.map(|n| LeaderKey {
            name: n.into(),
            lease: 1,
        }),
        members: members
            .iter()
            .map(|m| (m.name.clone(), m.clone()))
            .collect(),
        config: None,
        leader_optime: None,
        handover: None,
        sync: None,
        restore: None,
        reached: None,
        unreadable: Default::default(),
    }
}

fn cfg(name: &str) -> HaConfig {
    HaConfig {
        name: name.into(),
        tags: Tags::default(),
        dcs: DynamicConfig::default(),
    }
}

fn standby_status(lsn: u64) -> PgStatus {
    PgStatus {
        in_recovery: true,
        timeline: Some(1),
        wal_lsn: None,
        receive_lsn: Some(Lsn(lsn)),
        replay_lsn: Some(Lsn(lsn)),
        streaming: true,
        pending_restart: false,
        standbys: Default::default(),
        replication: vec![],
    }
}

fn primary_status() -> PgStatus {
    PgStatus {
        in_recovery: false,
        timeline: Some(1),
        wal_lsn: Some(Lsn(1000)),
        ..PgStatus::default()
    }
}

fn initialized() -> DataDir {
    DataDir::Initialized {
        system_identifier: SYSID,
        standby: true,
    }
}

struct Obs(Observation);

impl Obs {
    fn new(cluster: Option<ClusterView>) -> Obs {
        Obs(Observation {
            now: Instant::now(),
            wall_now: std::time::SystemTime::now(),
            cluster,
            lease: LeaseView::default(),
            pg: PgView {
                data_dir: initialized(),
                running: false,
                status: None,
                control: Some(ControlData {
                    timeline: 1,
                    shut_down_cleanly: true,
                    checkpoint_lsn: None,
                }),
                config_stale: false,
            },
            job: JobView::Idle,
        })
    }
    fn data(mut self, d: DataDir) -> Obs {
        self.0.pg.data_dir = d;
        self
    }
    fn running(mut self, status: Option<PgStatus>) -> Obs {
        self.0.pg.running = true;
        self.0.pg.status = status;
        self
    }
    fn holding_lease(mut self, valid_for: Duration) -> Obs {
        self.0.lease = LeaseView {
            held: true,
            valid_until: Some(self.0.now + valid_for),
        };
        self
    }
    fn job(mut self, j: JobView) -> Obs {
        self.0.job = j;
        self
    }
    fn decide(&self, cfg: &HaConfig, mem: &Memory) -> Decision {
        decide(&self.0, cfg, mem)
    }
}

fn following(name: &str) -> Memory {
    Memory {
        upstream: Some(name.into()),
        ..Memory::default()
    }
}

#[test]
fn empty_cluster_and_empty_data_dir_races_to_initialise() {
    let mut v = view(None, &[]);
    v.initialize = None;
    let d = Obs::new(Some(v))
        .data(DataDir::Empty)
        .decide(&cfg("a"), &Memory::default());
    assert_eq!(d.actions, vec![Action::ClaimNewCluster]);
}

#[test]
fn a_claimed_initialisation_is_waited_for() {
    let mut v = view(Some("b"), &[]);
    v.initialize = Some(Initialize::Claimed);
    let d = Obs::new(Some(v))
        .data(DataDir::Empty)
        .decide(&cfg("a"), &Memory::default());
    assert!(d.actions.is_empty(), "{d:?}");
    assert!(d.reason.contains("waiting for b"), "{}", d.reason);
}

#[test]
fn an_existing_primary_data_dir_without_cluster_adopts_it() {
    let mut v = view(None, &[]);
    v.initialize = None;
    let d = Obs::new(Some(v))
        .data(DataDir::Initialized {
            system_identifier: 42,
            standby: false,
        })
        .decide(&cfg("a"), &Memory::default());
    assert_eq!(
        d.actions,
        vec![Action::AdoptCluster {
            system_identifier: 42
        }]
    );
}

#[test]
fn empty_data_dir_clones_from_a_running_leader_only() {
    let leader = member("b", MemberState::Running, 100);
    let d = Obs::new(Some(view(Some("b"), std::slice::from_ref(&leader))))
        .data(DataDir::Empty)
        .decide(&cfg("a"), &Memory::default());
    assert_eq!(
        d.actions,
        vec![Action::StartJob(JobKind::Clone { from: "b".into() })]
    );
    let starting = member("b", MemberState::Starting, 100);
    let d = Obs::new(Some(view(Some("b"), &[starting])))
        .data(DataDir::Empty)
        .decide(&cfg("a"), &Memory::default());
    assert!(d.actions.is_empty(), "{d:?}");
}

#[test]
fn a_foreign_data_directory_refuses_to_join() {
    let d = Obs::new(Some(view(
        Some("b"),
        &[member("b", MemberState::Running, 1)],
    )))
    .data(DataDir::Initialized {
        system_identifier: 1234,
        standby: false,
    })
    .decide(&cfg("a"), &Memory::default());
    assert_eq!(d.actions, vec![Action::Exit]);
    assert!(d.reason.contains("system identifier 1234"), "{}", d.reason);
    assert!(d.reason.contains(&SYSID.to_string()), "{}", d.reason);
}

#[test]
fn an_unusable_data_directory_is_never_touched() {
    let d = Obs::new(Some(view(Some("b"), &[])))
        .data(DataDir::Unusable("no PG_VERSION".into()))
        .decide(&cfg("a"), &Memory::default());
    assert_eq!(d.actions, vec![Action::Exit]);
}

#[test]
fn the_leader_starts_promotes_or_keeps_its_primary() {
    let v = view(Some("a"), &[]);
    let leader = Obs::new(Some(v.clone()))
        .holding_lease(Duration::from_secs(5))
        .data(DataDir::Initialized {
            system_identifier: SYSID,
            standby: false,
        });
    let d = leader.decide(&cfg("a"), &Memory::default());
    assert_eq!(d.actions, vec![Action::RenewLeader, Action::StartPrimary]);

    let d = Obs::new(Some(v.clone()))
        .holding_lease(Duration::from_secs(5))
        .running(Some(standby_status(5)))
        .decide(&cfg("a"), &Memory::default());
    assert_eq!(
        d.actions,
        vec![
            Action::RenewLeader,
            Action::Promote,
            Action::LeaderHousekeeping
        ]
    );

    let d = Obs::new(Some(v))
        .holding_lease(Duration::from_secs(5))
        .running(Some(primary_status()))
        .decide(&cfg("a"), &Memory::default());
    assert_eq!(
        d.actions,
        vec![Action::RenewLeader, Action::LeaderHousekeeping]
    );
    assert_eq!(d.reason, "I am the leader with the lease");
    assert_eq!(d.role, Role::Leader);
}

#[test]
fn a_leader_key_from_a_previous_run_is_reacquired_before_anything_writable() {
    let d = Obs::new(Some(view(Some("a"), &[])))
        .running(Some(primary_status()))
        .decide(&cfg("a"), &Memory::default());
    assert_eq!(d.actions, vec![Action::StopPostgres, Action::AcquireLeader]);
}

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
fn a_stopped_replica_starts_as_a_standby_of_the_leader() {
    let leader = member("b", MemberState::Running, 100);
    let d = Obs::new(Some(view(Some("b"), &[leader]))).decide(&cfg("a"), &Memory::default());
    assert_eq!(
        d.actions,
        vec![Action::StartStandby(Some(Upstream {
            name: "b".into(),
            host: "127.0.0.1".into(),
            port: 5432
        }))]
    );
}

#[test]
fn a_standby_following_the_old_leader_is_repointed() {
    let leader = member("b", MemberState::Running, 100);
    let obs = Obs::new(Some(view(Some("b"), &[leader]))).running(Some(standby_status(50)));
    let d = obs.decide(&cfg("a"), &following("c"));
    assert!(
        matches!(d.actions.as_slice(), [Action::FollowUpstream(u)] if u.name == "b"),
        "{d:?}"
    );
    let d = obs.decide(&cfg("a"), &following("b"));
    assert!(d.actions.is_empty());
    assert_eq!(d.reason, "following b");
    assert_eq!(d.state, MemberState::Streaming);
}

#[test]
fn without_a_leader_the_most_advanced_eligible_member_takes_the_key() {
    let others = [
        member("b", MemberState::Streaming, 90),
        member("c", MemberState::Streaming, 80),
    ];
    let obs = Obs::new(Some(view(None, &others))).running(Some(standby_status(100)));
    let d = obs.decide(&cfg("a"), &Memory::default());
    assert_eq!(d.actions, vec![Action::AcquireLeader]);

    let obs = Obs::new(Some(view(None, &others))).running(Some(standby_status(85)));
    let d = obs.decide(&cfg("a"), &Memory::default());
    assert!(d.actions.is_empty(), "{d:?}");
    assert!(d.reason.contains("b is further ahead"), "{}", d.reason);
}

#[test]
fn a_nofailover_member_never_takes_the_key() {
    let mut c = cfg("a");
    c.tags.nofailover = true;
    let d = Obs::new(Some(view(None, &[])))
        .running(Some(standby_status(100)))
        .decide(&c, &Memory::default());
    assert!(d.actions.is_empty(), "{d:?}");
    assert!(d.reason.contains("nofailover"));
}

#[test]
fn a_nofailover_or_unhealthy_member_does_not_block_others() {
    let mut ahead = member("b", MemberState::Streaming, 500);
    ahead.tags.nofailover = true;
    let stopped = member("c", MemberState::Stopped, 900);
    let d = Obs::new(Some(view(None, &[ahead, stopped])))
        .running(Some(standby_status(100)))
        .decide(&cfg("a"), &Memory::default());
    assert_eq!(d.actions, vec![Action::AcquireLeader]);
}

#[test]
fn a_member_beyond_maximum_lag_on_failover_does_not_take_the_key() {
    let mut v = view(None, &[]);
    v.leader_optime = Some(Lsn(10_000_000));
    let d = Obs::new(Some(v))
        .running(Some(standby_status(100)))
        .decide(&cfg("a"), &Memory::default());
    assert!(d.actions.is_empty(), "{d:?}");
    assert!(d.reason.contains("maximum_lag_on_failover"), "{}", d.reason);
}

#[test]
fn ties_go_to_the_higher_priority_then_the_smaller_name() {
    let mut b = member("b", MemberState::Streaming, 100);
    b.tags.failover_priority = 2;
    let d = Obs::new(Some(view(None, &[b])))
        .running(Some(standby_status(100)))
        .decide(&cfg("a"), &Memory::default());
    assert!(d.actions.is_empty(), "priority 2 beats priority 1: {d:?}");

    let b = member("b", MemberState::Streaming, 100);
    let d = Obs::new(Some(view(None, std::slice::from_ref(&b))))
        .running(Some(standby_status(100)))
        .decide(&cfg("a"), &Memory::default());
    assert_eq!(d.actions, vec![Action::AcquireLeader], "a sorts before b");
    let a = member("a", MemberState::Streaming, 100);
    let d = Obs::new(Some(view(None, &[a])))
        .running(Some(standby_status(100)))
        .decide(&cfg("b"), &Memory::default());
    assert!(d.actions.is_empty(), "b yields to a: {d:?}");
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
            JobKind::Clone { from: "b".into() },
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

mod handover {
    use super::*;
    use crate::dcs::model::{Handover, HandoverKind};
    use std::time::SystemTime;

    fn rfc3339(t: SystemTime) -> String {
        humantime::format_rfc3339_millis(t).to_string()
    }

    pub(super) fn switchover(from: &str, to: Option<&str>) -> Handover {
        Handover {
            kind: HandoverKind::Switchover,
            from: Some(from.into()),
            to: to.map(str::to_string),
            scheduled_at: None,
            final_lsn: None,
            handed_over_at: None,
            taken_by: None,
            requested_at: rfc3339(SystemTime::now()),
        }
    }

    pub(super) fn with_handover(mut v: ClusterView, h: Handover) -> ClusterView {
        v.handover = Some((h, 7));
        v
    }

    fn leader_obs(v: ClusterView) -> Obs {
        Obs::new(Some(v))
            .holding_lease(Duration::from_secs(5))
            .running(Some(primary_status()))
    }

    fn paused() -> HaConfig {
        let mut c = cfg("a");
        c.dcs.pause = true;
        c
    }

    #[test]
    fn the_leader_hands_over_to_a_streaming_candidate() {
        let b = member("b", MemberState::Streaming, 1000);
        let v = with_handover(view(Some("a"), &[b]), switchover("a", Some("b")));
        let d = leader_obs(v).decide(&cfg("a"), &Memory::default());
        assert!(
            d.actions.contains(&Action::HandOver { to: "b".into() }),
            "{d:?}"
        );
        assert!(d.retry_soon);
    }

    #[test]
    fn the_leader_cancels_a_switchover_to_an_unfit_candidate() {
        let cases = [
            (member("b", MemberState::InRecovery, 1000), "not streaming"),
            (
                {
                    let mut m = member("b", MemberState::Streaming, 1000);
                    m.tags.nofailover = true;
                    m
                },
                "nofailover",
            ),
            (
                member("b", MemberState::Streaming, 10),
                "maximum_lag_on_failover",
            ),
        ];
        for (b, why) in cases {
            let mut v = with_handover(view(Some("a"), &[b]), switchover("a", Some("b")));
            v.leader_optime = Some(Lsn(10_000_000));
            let d = leader_obs(v).decide(&cfg("a"), &Memory::default());
            assert!(d.actions.contains(&Action::DeleteHandover), "{why}: {d:?}");
            assert!(
                !d.actions
                    .iter()
                    .any(|a| matches!(a, Action::HandOver { .. })),
                "{why}: {d:?}"
            );
            assert!(d.reason.contains(why), "{why}: {}", d.reason);
        }
    }

    #[test]
    fn a_scheduled_switchover_waits_for_its_time() {
        let b = member("b", MemberState::Streaming, 1000);
        let mut h = switchover("a", Some("b"));
        h.scheduled_at = Some(rfc3339(SystemTime::now() + Duration::from_secs(3600)));
        let v = with_handover(view(Some("a"), std::slice::from_ref(&b)), h.clone());
        let d = leader_obs(v).decide(&cfg("a"), &Memory::default());
        assert_eq!(
            d.actions,
            vec![Action::RenewLeader, Action::LeaderHousekeeping]
        );
        assert!(d.reason.contains("scheduled at"), "{}", d.reason);

        h.scheduled_at = Some(rfc3339(SystemTime::now() - Duration::from_secs(1)));
        let v = with_handover(view(Some("a"), &[b]), h);
        let d = leader_obs(v).decide(&cfg("a"), &Memory::default());
        assert!(
            d.actions.contains(&Action::HandOver { to: "b".into() }),
            "{d:?}"
        );
    }

    fn handed_over(from: &str, to: &str, final_lsn: u64, ago: Duration) -> Handover {
        Handover {
            final_lsn: Some(Lsn(final_lsn)),
            taken_by: None,
            handed_over_at: Some(rfc3339(SystemTime::now() - ago)),
            ..switchover(from, Some(to))
        }
    }

    #[test]
    fn the_candidate_takes_the_key_only_after_replaying_past_the_final_position() {
        let a = member("a", MemberState::Stopped, 500);
        let v = with_handover(
            view(None, std::slice::from_ref(&a)),
            handed_over("a", "b", 500, Duration::ZERO),
        );
        let d = Obs::new(Some(v.clone()))
            .running(Some(standby_status(400)))
            .decide(&cfg("b"), &Memory::default());
        assert!(d.actions.is_empty(), "{d:?}");
        assert!(d.retry_soon);
        let d = Obs::new(Some(v))
            .running(Some(standby_status(600)))
            .decide(&cfg("b"), &Memory::default());
        assert_eq!(d.actions, vec![Action::AcquireLeader]);
    }

    #[test]
    fn other_members_stay_out_of_a_switchover_even_when_further_ahead() {
        let v = with_handover(view(None, &[]), handed_over("a", "b", 500, Duration::ZERO));
        let d = Obs::new(Some(v))
            .running(Some(standby_status(9_000)))
            .decide(&cfg("c"), &Memory::default());
        assert!(d.actions.is_empty(), "{d:?}");
        assert!(d.reason.contains("in progress"), "{}", d.reason);
    }

    #[test]
    fn the_old_leader_takes_the_key_back_when_the_candidate_does_not_come() {
        let fresh = with_handover(view(None, &[]), handed_over("a", "b", 500, Duration::ZERO));
        let d = Obs::new(Some(fresh)).decide(&cfg("a"), &Memory::default());
        assert!(
            d.actions.is_empty(),
            "waits while the candidate may still come: {d:?}"
        );
        let late = with_handover(
            view(None, &[]),
            handed_over("a", "b", 500, Duration::from_secs(60)),
        );
        let d = Obs::new(Some(late)).decide(&cfg("a"), &Memory::default());
        assert_eq!(d.actions, vec![Action::AcquireLeader]);
        assert!(
            d.reason.contains("taking the leader key back"),
            "{}",
            d.reason
        );
    }

    /// Item 2: once the candidate took the key (marked in the switchover key), the old
    /// leader never takes it back, however late: the candidate may have promoted and
    /// acknowledged writes before it died.
    #[test]
    fn the_old_leader_never_takes_back_a_key_the_candidate_took() {
        let late = Handover {
            taken_by: Some("b".into()),
            ..handed_over("a", "b", 500, Duration::from_secs(60))
        };
        let v = with_handover(view(None, &[]), late);
        let d = Obs::new(Some(v.clone())).decide(&cfg("a"), &Memory::default());
        assert!(
            !d.actions.contains(&Action::AcquireLeader),
            "the old leader took back a key its candidate had taken: {d:?}"
        );
        // The others are not held back by the old leader's claim either: the usual election.
        let d = Obs::new(Some(v))
            .running(Some(standby_status(9_000)))
            .decide(&cfg("c"), &Memory::default());
        assert_eq!(d.actions, vec![Action::AcquireLeader], "{}", d.reason);
    }

    /// Item 2, for a taker that could not mark the key: a member on a newer timeline than
    /// the old leader's data has written after it.
    #[test]
    fn the_old_leader_does_not_take_the_key_back_behind_a_newer_timeline() {
        let mut b = member("b", MemberState::Streaming, 9_000);
        b.timeline = Some(2);
        let late = handed_over("a", "b", 500, Duration::from_secs(60));
        let v = with_handover(view(None, &[b]), late);
        let d = Obs::new(Some(v)).decide(&cfg("a"), &Memory::default());
        assert!(
            !d.actions.contains(&Action::AcquireLeader),
            "the old leader (timeline 1) took the key back behind b's timeline 2: {d:?}"
        );
        assert!(
            d.reason.contains("not taking the leader key back"),
            "{}",
            d.reason
        );
    }

    /// A later leader removes a switchover key whose taker died, naming what happened.
    #[test]
    fn a_third_leader_removes_the_key_of_a_switchover_taken_by_another() {
        let b = member("b", MemberState::Streaming, 1000);
        let h = Handover {
            taken_by: Some("b".into()),
            ..handed_over("a", "b", 500, Duration::from_secs(60))
        };
        let d = leader_obs(with_handover(view(Some("c"), &[b]), h))
            .decide(&cfg("c"), &Memory::default());
        assert!(d.actions.contains(&Action::DeleteHandover), "{d:?}");
        assert!(
            d.reason.contains("ended with me as the leader"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn after_a_failed_switchover_the_old_leader_has_the_first_claim() {
        // Timed out (20 s ago, timeout 10 s) but within the others' extra ttl: c waits.
        let late = with_handover(
            view(None, &[]),
            handed_over("a", "b", 500, Duration::from_secs(15)),
        );
        let d = Obs::new(Some(late))
            .running(Some(standby_status(9_000)))
            .decide(&cfg("c"), &Memory::default());
        assert!(d.actions.is_empty(), "{d:?}");
        // Long after: the usual election.
        let later = with_handover(
            view(None, &[]),
            handed_over("a", "b", 500, Duration::from_secs(60)),
        );
        let d = Obs::new(Some(later))
            .running(Some(standby_status(9_000)))
            .decide(&cfg("c"), &Memory::default());
        assert_eq!(d.actions, vec![Action::AcquireLeader]);
    }

    #[test]
    fn a_leader_again_after_a_failed_switchover_clears_the_key() {
        let b = member("b", MemberState::Streaming, 1000);
        let v = with_handover(
            view(Some("a"), &[b]),
            handed_over("a", "b", 500, Duration::from_secs(60)),
        );
        let d = leader_obs(v).decide(&cfg("a"), &Memory::default());
        assert!(d.actions.contains(&Action::DeleteHandover), "{d:?}");
        assert!(!d
            .actions
            .iter()
            .any(|a| matches!(a, Action::HandOver { .. })));
    }

    #[test]
    fn paused_no_automatic_failover_and_no_postgres_start() {
        let d = Obs::new(Some(view(None, &[])))
            .running(Some(standby_status(100)))
            .decide(&paused(), &Memory::default());
        assert!(d.actions.is_empty(), "{d:?}");
        assert!(d.reason.contains("paused"), "{}", d.reason);

        let leader = member("b", MemberState::Running, 100);
        let d = Obs::new(Some(view(Some("b"), &[leader]))).decide(&paused(), &Memory::default());
        assert!(
            d.actions.is_empty(),
            "a stopped replica stays stopped: {d:?}"
        );

        let d = Obs::new(Some(view(Some("a"), &[])))
            .holding_lease(Duration::from_secs(5))
            .decide(&paused(), &Memory::default());
        assert_eq!(
            d.actions,
            vec![Action::RenewLeader],
            "no StartPrimary: {d:?}"
        );
    }

    #[test]
    fn paused_rule1_still_stops_a_writable_member_without_the_key() {
        let leader = member("b", MemberState::Running, 100);
        let d = Obs::new(Some(view(Some("b"), &[leader])))
            .running(Some(primary_status()))
            .decide(&paused(), &Memory::default());
        assert!(d.actions.contains(&Action::StopPostgres), "{d:?}");
    }

    /// I stopped for a switchover and published my final position, but the key is still
    /// mine (the release failed, or my agent restarted): the switchover is cancelled before
    /// PostgreSQL starts writable, since the candidate would take over from that position
    /// and lose what I write after it (found by the simulation).
    #[test]
    fn a_leader_that_published_its_final_position_cancels_the_switchover_before_it_starts() {
        let b = member("b", MemberState::Streaming, 100);
        let h = Handover {
            final_lsn: Some(Lsn(100)),
            ..switchover("a", Some("b"))
        };
        let mut obs = Obs::new(Some(with_handover(view(Some("a"), &[b]), h)))
            .holding_lease(Duration::from_secs(5));
        obs.0.pg.data_dir = DataDir::Initialized {
            system_identifier: SYSID,
            standby: false,
        };
        let d = obs.decide(&cfg("a"), &Memory::default());
        assert_eq!(
            d.actions,
            vec![Action::RenewLeader, Action::DeleteHandover],
            "{d:?}"
        );
        assert!(d.reason.contains("cancelling it"), "{}", d.reason);
    }

    #[test]
    fn a_manual_failover_to_me_takes_the_key_even_while_paused() {
        let h = Handover {
            kind: HandoverKind::Failover,
            ..switchover("x", Some("a"))
        };
        let d = Obs::new(Some(with_handover(view(None, &[]), h)))
            .running(Some(standby_status(1)))
            .decide(&paused(), &Memory::default());
        assert_eq!(d.actions, vec![Action::AcquireLeader]);
    }

    #[test]
    fn a_leader_with_postgres_down_releases_the_key_for_a_requested_failover() {
        let b = member("b", MemberState::Streaming, 100);
        let h = Handover {
            kind: HandoverKind::Failover,
            ..switchover("a", Some("b"))
        };
        let d = Obs::new(Some(with_handover(view(Some("a"), &[b]), h)))
            .holding_lease(Duration::from_secs(5))
            .decide(&cfg("a"), &Memory::default());
        assert_eq!(d.actions, vec![Action::ReleaseLeader]);
    }

    #[test]
    fn config_changes_are_applied_by_reload() {
        let mut obs = leader_obs(view(Some("a"), &[]));
        obs.0.pg.config_stale = true;
        let d = obs.decide(&cfg("a"), &Memory::default());
        assert!(d.actions.contains(&Action::ApplyConfig), "{d:?}");
    }
}

mod synchronous {
    use super::handover::{switchover, with_handover};
    use super::*;
    use crate::dcs::model::{Handover, HandoverKind, SyncKey};
    use pgherd_config::SynchronousMode;

    fn sync_cfg(name: &str, mode: SynchronousMode) -> HaConfig {
        let mut c = cfg(name);
        c.dcs.synchronous_mode = mode;
        c
    }

    fn with_key(mut v: ClusterView, members: &[&str], quorum: u32) -> ClusterView {
        v.sync = Some(SyncKey {
            leader: "old".into(),
            members: members.iter().map(|m| m.to_string()).collect(),
            quorum,
        });
        v
    }

    #[test]
    fn a_non_sync_member_is_not_promoted_even_when_further_ahead() {
        let b = member("b", MemberState::Streaming, 100);
        let v = with_key(view(None, &[b]), &["b"], 1);
        let d = Obs::new(Some(v))
            .running(Some(standby_status(500)))
            .decide(&sync_cfg("c", SynchronousMode::On), &Memory::default());
        assert!(d.actions.is_empty(), "{d:?}");
        assert!(
            d.reason.contains("only members of the sync key"),
            "{}",
            d.reason
        );
    }

    /// An operator's `failover --candidate` never trades an acknowledged commit: a member
    /// outside the `sync` key discards the request; a member of it takes the key even
    /// though another is further ahead (found by the simulation).
    #[test]
    fn a_manual_failover_goes_only_to_a_member_that_holds_every_acknowledged_commit() {
        let failover_to = |to: &str| Handover {
            kind: HandoverKind::Failover,
            ..switchover("old", Some(to))
        };
        let b = member("b", MemberState::Streaming, 100);
        let v = with_key(view(None, &[b]), &["b"], 1);
        let d = Obs::new(Some(with_handover(v, failover_to("c"))))
            .running(Some(standby_status(500)))
            .decide(&sync_cfg("c", SynchronousMode::On), &Memory::default());
        assert_eq!(d.actions, vec![Action::DeleteHandover], "{d:?}");
        assert!(
            d.reason.contains("I may not take over")
                && d.reason.contains("only members of the sync key"),
            "{}",
            d.reason
        );

        let c = member("c", MemberState::Streaming, 500);
        let v = with_key(view(None, &[c]), &["b"], 1);
        let d = Obs::new(Some(with_handover(v, failover_to("b"))))
            .running(Some(standby_status(100)))
            .decide(&sync_cfg("b", SynchronousMode::On), &Memory::default());
        assert_eq!(d.actions, vec![Action::AcquireLeader], "{d:?}");

        // Quorum: a member of the set that cannot prove it holds every commit discards it.
        let c = member("c", MemberState::Streaming, 500);
        let v = with_key(view(None, &[c]), &["b", "c"], 1);
        let d = Obs::new(Some(with_handover(v, failover_to("b"))))
            .running(Some(standby_status(100)))
            .decide(&sync_cfg("b", SynchronousMode::Quorum), &Memory::default());
        assert_eq!(d.actions, vec![Action::DeleteHandover], "{d:?}");
    }

    #[test]
    fn the_sync_member_takes_over_although_a_non_sync_one_is_further_ahead() {
        let c = member("c", MemberState::Streaming, 500);
        let v = with_key(view(None, &[c]), &["b"], 1);
        let d = Obs::new(Some(v))
            .running(Some(standby_status(100)))
            .decide(&sync_cfg("b", SynchronousMode::On), &Memory::default());
        assert_eq!(d.actions, vec![Action::AcquireLeader]);
    }

    #[test]
    fn quorum_needs_enough_of_the_set_in_sight() {
        // Set {a, b, c}, q = 1: a needs to see all three.
        let b = member("b", MemberState::Streaming, 100);
        let mut v = with_key(view(None, std::slice::from_ref(&b)), &["a", "b", "c"], 1);
        v.reached = Some(["b".to_string()].into());
        let d = Obs::new(Some(v))
            .running(Some(standby_status(100)))
            .decide(&sync_cfg("a", SynchronousMode::Quorum), &Memory::default());
        assert!(d.actions.is_empty(), "{d:?}");
        let c = member("c", MemberState::Streaming, 90);
        let mut v = with_key(view(None, &[b, c]), &["a", "b", "c"], 1);
        v.reached = Some(["b".to_string(), "c".to_string()].into());
        let d = Obs::new(Some(v))
            .running(Some(standby_status(100)))
            .decide(&sync_cfg("a", SynchronousMode::Quorum), &Memory::default());
        assert_eq!(d.actions, vec![Action::AcquireLeader]);
    }

    #[test]
    fn quorum_counts_only_members_that_answered_not_stale_keys() {
        let b = member("b", MemberState::Streaming, 100);
        let c = member("c", MemberState::Streaming, 90);
        let mut v = with_key(view(None, &[b, c]), &["a", "b", "c"], 1);
        // b's key is still there, but b's agent did not answer.
        v.reached = Some(["c".to_string()].into());
        let d = Obs::new(Some(v))
            .running(Some(standby_status(100)))
            .decide(&sync_cfg("a", SynchronousMode::Quorum), &Memory::default());
        assert!(d.actions.is_empty(), "{d:?}");
        assert!(d.reason.contains("need 3"), "{}", d.reason);
    }

    #[test]
    fn the_leader_plans_synchronous_standbys_and_says_when_it_falls_back() {
        let mut b = member("b", MemberState::Streaming, 100);
        b.role = Role::Replica;
        let mut v = view(Some("a"), &[b]);
        v.sync = Some(SyncKey {
            leader: "a".into(),
            members: vec!["b".into()],
            quorum: 1,
        });
        let mut status = primary_status();
        status.standbys = sync::Standbys::First(vec!["b".into()]);
        // b is gone from pg_stat_replication: out of the key, then async.
        let d = Obs::new(Some(v))
            .holding_lease(Duration::from_secs(5))
            .running(Some(status))
            .decide(&sync_cfg("a", SynchronousMode::On), &Memory::default());
        let tail: Vec<&Action> = d.actions.iter().rev().take(2).collect();
        assert_eq!(
            tail[0],
            &Action::SetSyncStandbys(sync::Standbys::None),
            "{d:?}"
        );
        assert!(
            matches!(tail[1], Action::SetSyncKey(k) if k.members.is_empty()),
            "{d:?}"
        );
        assert!(
            d.reason.contains("falling back to asynchronous"),
            "{}",
            d.reason
        );
    }

    /// A `nofailover` standby is picked as the synchronous one only when nobody else
    /// streams: as the only member of the `sync` key it would be the only one allowed to
    /// take over, and it never does (found by the simulation, gate
    /// NOFAILOVER_SYNC_STANDBY).
    #[test]
    fn a_nofailover_standby_is_the_last_choice_for_synchronous_standby() {
        let plan = |members: Vec<MemberInfo>| {
            let replication = members
                .iter()
                .map(|m| sync::Replication {
                    application_name: m.name.clone(),
                    sync_state: "async".into(),
                    flush_lsn: m.wal_position(),
                })
                .collect();
            let mut members = members;
            for m in &mut members {
                m.role = Role::Replica;
            }
            let mut v = view(Some("a"), &members);
            v.sync = Some(SyncKey {
                leader: "a".into(),
                members: vec![],
                quorum: 0,
            });
            let mut status = primary_status();
            status.replication = replication;
            Obs::new(Some(v))
                .holding_lease(Duration::from_secs(5))
                .running(Some(status))
                .decide(&sync_cfg("a", SynchronousMode::On), &Memory::default())
        };
        let mut b = member("b", MemberState::Streaming, 200);
        b.tags.nofailover = true;
        let c = member("c", MemberState::Streaming, 100);
        let d = plan(vec![b.clone(), c]);
        assert!(
            d.actions
                .contains(&Action::SetSyncStandbys(sync::Standbys::First(vec![
                    "c".into()
                ]))),
            "{d:?}"
        );
        let d = plan(vec![b]);
        assert!(
            d.actions
                .contains(&Action::SetSyncStandbys(sync::Standbys::First(vec![
                    "b".into()
                ]))),
            "{d:?}"
        );
    }

    fn strict_cfg(name: &str, mode: SynchronousMode) -> HaConfig {
        let mut c = sync_cfg(name, mode);
        c.dcs.synchronous_mode_strict = true;
        c
    }

    /// b took over from the old leader (whose commits only b had), claimed `{b, []}`,
    /// promoted, acknowledged writes on its own and died before listing a standby.
    fn claimed_by_b(members: &[MemberInfo]) -> ClusterView {
        let mut v = view(None, members);
        v.sync = Some(SyncKey {
            leader: "b".into(),
            members: vec![],
            quorum: 0,
        });
        v
    }

    #[test]
    fn an_empty_sync_key_of_a_new_leader_makes_no_other_member_eligible() {
        for cfg in [
            sync_cfg("c", SynchronousMode::On),
            strict_cfg("c", SynchronousMode::On),
            sync_cfg("c", SynchronousMode::Quorum),
        ] {
            let d = Obs::new(Some(claimed_by_b(&[])))
                .running(Some(standby_status(500)))
                .decide(&cfg, &Memory::default());
            assert!(d.actions.is_empty(), "{:?}: {d:?}", cfg.dcs);
            assert!(d.reason.contains("only b"), "{}", d.reason);
        }
    }

    #[test]
    fn the_sync_keys_leader_takes_its_key_back_and_goes_first() {
        // b's agent comes back after its lease expired: b holds every commit it
        // acknowledged, in strict mode too.
        let d = Obs::new(Some(claimed_by_b(&[])))
            .running(Some(standby_status(100)))
            .decide(&strict_cfg("b", SynchronousMode::On), &Memory::default());
        assert_eq!(d.actions, vec![Action::AcquireLeader], "{}", d.reason);
        // A key member defers to the key's leader when that one is healthy and ahead.
        let b = member("b", MemberState::Running, 600);
        let mut v = claimed_by_b(std::slice::from_ref(&b));
        v.sync.as_mut().expect("set above").members = vec!["c".into()];
        let d = Obs::new(Some(v))
            .running(Some(standby_status(500)))
            .decide(&sync_cfg("c", SynchronousMode::On), &Memory::default());
        assert!(d.actions.is_empty(), "{d:?}");
    }

    #[test]
    fn quorum_witnesses_are_live_answers_also_while_a_switchover_key_exists() {
        // A switchover whose old leader died before publishing its final position: the
        // usual election runs, and published positions may predate commits only a crashed
        // member confirmed. Nobody was asked (`reached` is None): no witness counts.
        let b = member("b", MemberState::Streaming, 100);
        let c = member("c", MemberState::Streaming, 90);
        let mut v = with_key(view(None, &[b, c]), &["a", "b", "c"], 1);
        let pending: crate::dcs::model::Handover = serde_json::from_value(serde_json::json!({
            "kind": "switchover",
            "from": "old",
            "to": "a",
            "requested_at": "2026-12-01T10:00:00Z",
        }))
        .expect("a switchover key");
        v.handover = Some((pending, 7));
        let d = Obs::new(Some(v.clone()))
            .running(Some(standby_status(100)))
            .decide(&sync_cfg("a", SynchronousMode::Quorum), &Memory::default());
        assert!(d.actions.is_empty(), "{d:?}");
        assert!(d.reason.contains("need 3"), "{}", d.reason);
        // With both answering live, a takes over.
        v.reached = Some(["b".to_string(), "c".to_string()].into());
        let d = Obs::new(Some(v))
            .running(Some(standby_status(100)))
            .decide(&sync_cfg("a", SynchronousMode::Quorum), &Memory::default());
        assert_eq!(d.actions, vec![Action::AcquireLeader], "{}", d.reason);
    }
}

fn restore_key(
    leader: &str,
    phase: crate::dcs::model::RestorePhase,
    timeline: Option<u32>,
) -> crate::dcs::model::RestoreKey {
    crate::dcs::model::RestoreKey {
        id: "r1".into(),
        leader: leader.into(),
        backup_id: "b1".into(),
        target: crate::backup::target::Target::Latest,
        phase,
        requested_at: "2026-11-26T10:00:00Z".into(),
        finished_at: None,
        timeline,
        message: String::new(),
    }
}

#[test]
fn the_leader_named_in_a_restore_key_starts_the_restore_job_and_keeps_its_lease() {
    use crate::dcs::model::RestorePhase;
    let me = member("a", MemberState::Running, 100);
    let mut v = view(Some("a"), std::slice::from_ref(&me));
    v.restore = Some((restore_key("a", RestorePhase::Restoring, None), 7));
    let d = Obs::new(Some(v.clone()))
        .running(Some(primary_status()))
        .holding_lease(Duration::from_secs(5))
        .decide(&cfg("a"), &Memory::default());
    assert_eq!(
        d.actions,
        vec![
            Action::RenewLeader,
            Action::StartJob(JobKind::Restore { id: "r1".into() })
        ]
    );
    // While it runs, only the lease is renewed; when it ends, the outcome is recorded.
    let d = Obs::new(Some(v.clone()))
        .holding_lease(Duration::from_secs(5))
        .job(JobView::Running(JobKind::Restore { id: "r1".into() }))
        .decide(&cfg("a"), &Memory::default());
    assert_eq!(d.actions, vec![Action::RenewLeader]);
    let d = Obs::new(Some(v.clone()))
        .holding_lease(Duration::from_secs(5))
        .job(JobView::Failed(
            JobKind::Restore { id: "r1".into() },
            "boom".into(),
        ))
        .decide(&cfg("a"), &Memory::default());
    assert_eq!(
        d.actions,
        vec![Action::FinishRestore {
            id: "r1".into(),
            error: Some("boom".into())
        }]
    );
    // A recorded outcome whose key write failed is written again, never restored twice.
    let mem = Memory {
        restore_outcome: Some(("r1".into(), None)),
        ..Memory::default()
    };
    let d = Obs::new(Some(v))
        .running(Some(primary_status()))
        .holding_lease(Duration::from_secs(5))
        .decide(&cfg("a"), &mem);
    assert_eq!(
        d.actions,
        vec![
            Action::RenewLeader,
            Action::FinishRestore {
                id: "r1".into(),
                error: None
            }
        ]
    );
}

#[test]
fn nobody_but_the_restoring_member_takes_a_vacant_leader_key_during_a_restore() {
    use crate::dcs::model::RestorePhase;
    let other = member("b", MemberState::Streaming, 100);
    // a's agent is alive (its member key exists) while it restores.
    let restorer = member("a", MemberState::Restoring, 0);
    let mut v = view(None, &[other, restorer]);
    v.restore = Some((restore_key("a", RestorePhase::Restoring, None), 7));
    let d = Obs::new(Some(v))
        .running(Some(standby_status(100)))
        .decide(&cfg("b"), &following("a"));
    assert!(
        !d.actions.contains(&Action::AcquireLeader),
        "b took the key during a's restore: {d:?}"
    );
    assert!(d.reason.contains("restoring"), "{}", d.reason);
}

#[test]
fn after_a_restore_members_on_an_older_timeline_reclone_but_never_the_leader() {
    use crate::dcs::model::RestorePhase;
    let mut leader = member("a", MemberState::Running, 100);
    leader.timeline = Some(5);
    let mut v = view(Some("a"), std::slice::from_ref(&leader));
    v.restore = Some((restore_key("a", RestorePhase::Done, Some(5)), 9));
    let mut old = standby_status(100);
    old.timeline = Some(3);
    let d = Obs::new(Some(v.clone()))
        .running(Some(old))
        .decide(&cfg("b"), &following("a"));
    assert_eq!(d.actions, vec![Action::StopPostgres, Action::EmptyDataDir]);
    assert!(d.reason.contains("restored"), "{}", d.reason);
    // Already on the restored timeline: nothing to do.
    let mut new = standby_status(100);
    new.timeline = Some(5);
    let d = Obs::new(Some(v.clone()))
        .running(Some(new))
        .decide(&cfg("b"), &following("a"));
    assert!(!d.actions.contains(&Action::EmptyDataDir), "{d:?}");
    // Rule 6: the leader never empties its data directory, whatever its timeline says.
    let mut p = primary_status();
    p.timeline = Some(3);
    let d = Obs::new(Some(v))
        .running(Some(p))
        .holding_lease(Duration::from_secs(5))
        .decide(&cfg("a"), &Memory::default());
    assert!(!d.actions.contains(&Action::EmptyDataDir), "{d:?}");
}

#[test]
fn a_restoring_member_takes_its_vacant_key_back_and_an_old_timeline_member_never_takes_it() {
    use crate::dcs::model::RestorePhase;
    // The restorer lost its lease mid-restore: it re-takes the key, candidate checks aside.
    let mut me = member("a", MemberState::Stopped, 0);
    me.timeline = Some(1);
    let mut v = view(None, std::slice::from_ref(&me));
    v.restore = Some((restore_key("a", RestorePhase::Restoring, None), 7));
    let d = Obs::new(Some(v.clone()))
        .job(JobView::Running(JobKind::Restore { id: "r1".into() }))
        .decide(&cfg("a"), &Memory::default());
    assert_eq!(d.actions, vec![Action::AcquireLeader]);
    let d = Obs::new(Some(v)).decide(&cfg("a"), &Memory::default());
    assert_eq!(d.actions, vec![Action::AcquireLeader]);

    // After the restore, with no leader, a member still on the old timeline waits.
    let other = member("a", MemberState::Stopped, 0);
    let mut v = view(None, std::slice::from_ref(&other));
    v.restore = Some((restore_key("a", RestorePhase::Done, Some(5)), 9));
    let mut old = standby_status(1 << 30);
    old.timeline = Some(3);
    let d = Obs::new(Some(v))
        .running(Some(old))
        .decide(&cfg("b"), &following("a"));
    assert!(!d.actions.contains(&Action::AcquireLeader), "{d:?}");

    // The member the leader key names (even without a lease in this process) never
    // empties its data directory because of a restore.
    let mut leader = member("b", MemberState::Running, 100);
    leader.timeline = Some(5);
    let mut v = view(Some("b"), std::slice::from_ref(&leader));
    v.restore = Some((restore_key("b", RestorePhase::Done, Some(5)), 9));
    let mut old = standby_status(100);
    old.timeline = Some(3);
    let d = Obs::new(Some(v))
        .running(Some(old))
        .decide(&cfg("b"), &Memory::default());
    assert!(!d.actions.contains(&Action::EmptyDataDir), "{d:?}");
}

/// Item 4 of the compound-fault review: a member that holds the key with a standby's data
/// directory (it took the key, then PostgreSQL or the agent died before the promotion)
/// starts it read-only and promotes it, so its writes go to a new timeline; it never starts
/// writable on the old leader's timeline.
#[test]
fn a_leader_with_a_standby_data_directory_promotes_instead_of_starting_writable() {
    let v = view(Some("a"), &[]);
    let d = Obs::new(Some(v.clone()))
        .holding_lease(Duration::from_secs(5))
        .decide(&cfg("a"), &Memory::default());
    assert_eq!(
        d.actions,
        vec![Action::RenewLeader, Action::StartStandby(None)],
        "{}",
        d.reason
    );
    assert!(d.reason.contains("promote"), "{}", d.reason);
    // Once it answers in recovery, the leader promotes it.
    let d = Obs::new(Some(v))
        .holding_lease(Duration::from_secs(5))
        .running(Some(standby_status(5)))
        .decide(&cfg("a"), &Memory::default());
    assert!(d.actions.contains(&Action::Promote), "{d:?}");
}

/// Items 9 and 10 of the compound-fault review: values that cannot be read and claims that
/// were never finished. Unreadable keys fail closed (no race for a vacant key), and nothing
/// waits for ever without saying why.
mod unreadable_and_stuck {
    use super::*;

    /// b and c are behind `a`, which would take a vacant key (the control case).
    fn leaderless() -> (ClusterView, Obs) {
        let others = [
            member("b", MemberState::Streaming, 90),
            member("c", MemberState::Streaming, 80),
        ];
        let v = view(None, &others);
        let obs = Obs::new(Some(v.clone())).running(Some(standby_status(100)));
        (v, obs)
    }

    fn with_view(mut obs: Obs, v: ClusterView) -> Obs {
        obs.0.cluster = Some(v);
        obs
    }

    #[test]
    fn the_control_case_takes_the_vacant_key() {
        let (_, obs) = leaderless();
        let d = obs.decide(&cfg("a"), &Memory::default());
        assert_eq!(d.actions, vec![Action::AcquireLeader], "{}", d.reason);
    }

    #[test]
    fn an_unreadable_sync_key_stops_the_election() {
        let (mut v, obs) = leaderless();
        v.unreadable
            .insert("sync".into(), "(top level): not valid JSON".into());
        let d = with_view(obs, v).decide(&cfg("a"), &Memory::default());
        assert!(d.actions.is_empty(), "{d:?}");
        assert!(d.reason.contains("sync key is unreadable"), "{}", d.reason);
    }

    #[test]
    fn an_unreadable_leader_optime_stops_the_election() {
        let (mut v, obs) = leaderless();
        v.unreadable
            .insert("optime/leader".into(), "\"zz\" is not an LSN".into());
        let d = with_view(obs, v).decide(&cfg("a"), &Memory::default());
        assert!(d.actions.is_empty(), "{d:?}");
        assert!(
            d.reason.contains("optime/leader key is unreadable"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn a_config_unreadable_since_the_agent_started_stops_the_election() {
        let (mut v, obs) = leaderless();
        v.config = Some(Err("/pgherd/c/config is unreadable: not valid JSON".into()));
        let d = with_view(obs, v).decide(&cfg("a"), &Memory::default());
        assert!(d.actions.is_empty(), "{d:?}");
        assert!(
            d.reason.contains("config key is unreadable"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn a_malformed_initialize_key_neither_exits_nor_races() {
        let init = Initialize::parse(b"{not json");
        assert!(matches!(init, Initialize::Unreadable(_)), "{init:?}");
        // Before this rule the key was taken as system identifier "{not json" and every
        // member exited over the mismatch.
        let (mut v, obs) = leaderless();
        v.initialize = Some(init.clone());
        if let Initialize::Unreadable(why) = &init {
            v.unreadable.insert("initialize".into(), why.clone());
        }
        let d = with_view(obs, v).decide(&cfg("a"), &Memory::default());
        assert!(d.actions.is_empty(), "{d:?}");
        assert!(
            d.reason.contains("initialize key is unreadable"),
            "{}",
            d.reason
        );
        // With a leader, the others go on following it.
        let mut v = view(Some("b"), &[member("b", MemberState::Running, 100)]);
        v.initialize = Some(init);
        let d = Obs::new(Some(v))
            .running(Some(standby_status(100)))
            .decide(&cfg("a"), &following("b"));
        assert!(!d.actions.contains(&Action::Exit), "{d:?}");
        assert_eq!(d.reason, "following b");
    }

    #[test]
    fn initialize_values_parse_as_claim_identifier_or_unreadable() {
        assert_eq!(Initialize::parse(b""), Initialize::Claimed);
        assert_eq!(
            Initialize::parse(b"7301234567890123456"),
            Initialize::SystemIdentifier("7301234567890123456".into())
        );
        assert!(matches!(
            Initialize::parse(b"-1"),
            Initialize::Unreadable(_)
        ));
    }

    /// Item 9a: the bootstrap succeeded, recording its identifier failed once; the job's
    /// success is gone, the claim stays. The leader records it on a later loop.
    #[test]
    fn a_leader_whose_bootstrap_claim_was_not_recorded_records_it() {
        let mut v = view(Some("a"), &[]);
        v.initialize = Some(Initialize::Claimed);
        let d = Obs::new(Some(v))
            .data(DataDir::Initialized {
                system_identifier: SYSID,
                standby: false,
            })
            .holding_lease(Duration::from_secs(5))
            .running(Some(primary_status()))
            .decide(&cfg("a"), &Memory::default());
        assert!(d.actions.contains(&Action::FinishBootstrap), "{d:?}");
        assert!(d.actions.contains(&Action::RenewLeader), "{d:?}");
        assert_eq!(d.role, Role::Leader);
    }

    /// Item 9b: the leader's lease is alive but its member key cannot be read. Nobody takes
    /// over; a stopped member says why in its decision and starts read-only.
    #[test]
    fn a_leader_with_an_unreadable_member_key_is_named_and_followers_serve_reads() {
        let mut v = view(Some("b"), &[]);
        v.unreadable.insert(
            "members/b".into(),
            "state: unknown variant `draining`".into(),
        );
        let d = Obs::new(Some(v.clone())).decide(&cfg("a"), &Memory::default());
        assert_eq!(d.actions, vec![Action::StartStandby(None)], "{}", d.reason);
        assert!(
            d.reason.contains("member key is unreadable") && d.reason.contains("draining"),
            "{}",
            d.reason
        );
        // Already running: it keeps what it has and still says why.
        let d = Obs::new(Some(v))
            .running(Some(standby_status(10)))
            .decide(&cfg("a"), &Memory::default());
        assert!(d.actions.is_empty(), "{d:?}");
        assert!(
            d.reason.contains("member key is unreadable"),
            "{}",
            d.reason
        );
    }

    /// Item 9c: a `restore` key left in phase `restoring` by a restorer that lost the key
    /// long ago (another member has led since) still makes everybody wait for that restorer
    /// whenever the key is vacant and its agent lives, here a planned switchover to `a`
    /// whose candidate has replayed the old leader's final position.
    /// Item 9c: an old `restore` key cannot block a switchover, because the state where one
    /// could (a leader other than the restorer, handing over while the key still says
    /// `restoring`) is not reached: that leader ends the restore before anything else,
    /// handing over included (item 1).
    #[test]
    fn a_leader_ends_an_old_restore_before_it_hands_over() {
        use crate::dcs::model::{Handover, HandoverKind, RestorePhase};
        let members = [member("a", MemberState::Streaming, 100)];
        let mut v = view(Some("b"), &members);
        v.restore = Some((restore_key("c", RestorePhase::Restoring, None), 3));
        let now = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        v.handover = Some((
            Handover {
                kind: HandoverKind::Switchover,
                from: Some("b".into()),
                to: Some("a".into()),
                scheduled_at: None,
                final_lsn: None,
                handed_over_at: None,
                taken_by: None,
                requested_at: now,
            },
            7,
        ));
        let d = Obs::new(Some(v))
            .running(Some(primary_status()))
            .holding_lease(Duration::from_secs(5))
            .decide(&cfg("b"), &Memory::default());
        assert_eq!(
            d.actions,
            vec![
                Action::RenewLeader,
                Action::AbandonRestore { id: "r1".into() }
            ],
            "{}",
            d.reason
        );
    }
}

/// Item 1: a member that leads while another member's restore is still `restoring` (its
/// restorer lost the key) ends it before anything writable, even with a standby to promote.
#[test]
fn a_new_leader_ends_an_interrupted_restore_before_it_promotes() {
    use crate::dcs::model::RestorePhase;
    let mut v = view(Some("c"), &[]);
    v.restore = Some((restore_key("a", RestorePhase::Restoring, None), 7));
    let d = Obs::new(Some(v))
        .running(Some(standby_status(100)))
        .holding_lease(Duration::from_secs(5))
        .decide(&cfg("c"), &Memory::default());
    assert_eq!(
        d.actions,
        vec![
            Action::RenewLeader,
            Action::AbandonRestore { id: "r1".into() }
        ],
        "{}",
        d.reason
    );
}

/// Item 1: once the restore was ended, its old restorer has no claim to a vacant key: it
/// competes like any member (here it is behind b, so it does not take the key).
#[test]
fn an_abandoned_restorer_has_no_claim_to_a_vacant_key() {
    use crate::dcs::model::RestorePhase;
    let b = member("b", MemberState::Streaming, 5_000);
    let mut v = view(None, &[b]);
    v.restore = Some((restore_key("a", RestorePhase::Failed, None), 7));
    let d = Obs::new(Some(v))
        .running(Some(standby_status(100)))
        .decide(&cfg("a"), &Memory::default());
    assert!(
        !d.actions.contains(&Action::AcquireLeader),
        "the old restorer took the vacant key: {d:?}"
    );
}

/// A crashed standby on an older timeline starts as a standby of the leader (PostgreSQL
/// follows the switch if it can) instead of pg_rewind, which cannot run on it; a cleanly
/// stopped one is rewound as before (item 12; found by bench/chaos).
#[test]
fn a_crashed_standby_on_an_older_timeline_starts_as_a_standby_before_any_rewind() {
    let mut b = member("b", MemberState::Running, 100);
    b.timeline = Some(2);
    let v = view(Some("b"), std::slice::from_ref(&b));
    let mut obs = Obs::new(Some(v.clone()));
    obs.0.pg.control = Some(ControlData {
        timeline: 1,
        shut_down_cleanly: false,
        checkpoint_lsn: None,
    });
    let d = obs.decide(&cfg("c"), &Memory::default());
    assert!(
        matches!(d.actions.as_slice(), [Action::StartStandby(Some(u))] if u.name == "b"),
        "{d:?}"
    );
    let mut obs = Obs::new(Some(v));
    obs.0.pg.control = Some(ControlData {
        timeline: 1,
        shut_down_cleanly: true,
        checkpoint_lsn: None,
    });
    let d = obs.decide(&cfg("c"), &Memory::default());
    assert!(
        matches!(
            d.actions.as_slice(),
            [Action::StartJob(JobKind::Rewind { .. })]
        ),
        "{d:?}"
    );
}

/// A pg_rewind whose source did not answer changed nothing and is not remembered: once the
/// leader answers again on the same timeline the member rewinds, while a rewind that
/// really failed stays remembered (found by the simulation, gate
/// REWIND_FAILS_WHEN_SOURCE_DOWN).
#[test]
fn a_rewind_whose_source_did_not_answer_is_tried_again() {
    let mut b = member("b", MemberState::Running, 100);
    b.timeline = Some(2);
    let v = view(Some("b"), std::slice::from_ref(&b));
    let stopped_cleanly = |job: JobView| {
        let mut obs = Obs::new(Some(v.clone())).job(job);
        obs.0.pg.control = Some(ControlData {
            timeline: 1,
            shut_down_cleanly: true,
            checkpoint_lsn: None,
        });
        obs
    };
    let from = || JobKind::Rewind { from: "b".into() };

    let mut mem = Memory::default();
    let obs = stopped_cleanly(JobView::SourceDown(from(), "b does not answer".into()));
    mem.observed(&obs.0);
    let d = obs.decide(&cfg("c"), &mem);
    assert!(d.actions.is_empty(), "{d:?}");
    assert!(d.reason.contains("not started"), "{}", d.reason);
    let d = stopped_cleanly(JobView::Idle).decide(&cfg("c"), &mem);
    assert!(
        matches!(
            d.actions.as_slice(),
            [Action::StartJob(JobKind::Rewind { .. })]
        ),
        "the rewind was not tried again: {d:?}"
    );

    let mut mem = Memory::default();
    let obs = stopped_cleanly(JobView::Failed(from(), "pg_rewind failed".into()));
    mem.observed(&obs.0);
    let d = stopped_cleanly(JobView::Idle).decide(&cfg("c"), &mem);
    assert!(d.actions.is_empty(), "a failed rewind was run again: {d:?}");
}

/// A walreceiver that PostgreSQL restarts against a leader whose history it cannot follow is
/// "streaming" for a moment now and then without receiving anything: the not-streaming clock
/// keeps running, so the member stops to be rewound; a lagging standby that receives WAL on
/// the old timeline is streaming (found by bench/chaos: a former leader followed the new one
/// without pg_rewind and never streamed).
#[test]
fn a_walreceiver_that_connects_but_receives_nothing_is_not_streaming() {
    let mut b = member("b", MemberState::Running, 100);
    b.timeline = Some(2);
    let v = view(Some("b"), &[b]);
    let status = |streaming: bool, received: u64| PgStatus {
        streaming,
        receive_lsn: Some(Lsn(received)),
        ..standby_status(received)
    };
    let start = Instant::now();
    let at = |secs: u64, s: PgStatus| {
        let mut o = Obs::new(Some(v.clone())).running(Some(s)).0;
        o.now = start + Duration::from_secs(secs);
        o
    };
    let mut mem = Memory::default();
    mem.observed(&at(0, status(false, 100)));
    let since = mem.not_streaming_since.expect("not streaming");
    mem.observed(&at(1, status(true, 100)));
    assert_eq!(
        mem.not_streaming_since,
        Some(since),
        "a connect that received nothing reset the clock"
    );
    mem.observed(&at(2, status(true, 200)));
    assert_eq!(
        mem.not_streaming_since, None,
        "a standby receiving WAL is streaming"
    );
}

/// A key holder whose data directory is a standby's starts it read-only to promote it; if
/// it never comes up, primary_start_timeout releases the key as for any start as the
/// primary (it was not counted on this path).
#[test]
fn a_key_holder_whose_standby_never_comes_up_releases_the_key_after_primary_start_timeout() {
    let b = member("b", MemberState::Streaming, 100);
    let start = Instant::now();
    let obs_at = |secs: u64| {
        let mut o = Obs::new(Some(view(Some("a"), std::slice::from_ref(&b))))
            .holding_lease(Duration::from_secs(5));
        o.0.now = start + Duration::from_secs(secs);
        o
    };
    let cfg = cfg("a");
    let mut mem = Memory::default();
    let d = obs_at(0).decide(&cfg, &mem);
    assert!(d.actions.contains(&Action::StartStandby(None)), "{d:?}");
    mem.acted(
        start,
        &Action::StartStandby(None),
        &memory::Outcome::Started,
    );
    let late = cfg.dcs.primary_start_timeout + 1;
    let obs = obs_at(late);
    mem.observed(&obs.0);
    let d = obs.decide(&cfg, &mem);
    assert!(d.actions.contains(&Action::ReleaseLeader), "{d:?}");
}
