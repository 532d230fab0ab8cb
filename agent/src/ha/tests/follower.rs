//! Another member leads: clone it, follow it, and check timelines before streaming (rule 5).

use pgherd_config::ReplicaMethod;

use super::*;

#[test]
fn empty_data_dir_clones_from_a_running_leader_only() {
    let leader = member("b", MemberState::Running, 100);
    let d = Obs::new(Some(view(Some("b"), std::slice::from_ref(&leader))))
        .data(DataDir::Empty)
        .decide(&cfg("a"), &Memory::default());
    assert_eq!(
        d.actions,
        vec![Action::StartJob(JobKind::Clone {
            from: "b".into(),
            methods: vec![ReplicaMethod::Basebackup]
        })]
    );
    assert_eq!(d.reason, "cloning from b");
    let starting = member("b", MemberState::Starting, 100);
    let d = Obs::new(Some(view(Some("b"), &[starting])))
        .data(DataDir::Empty)
        .decide(&cfg("a"), &Memory::default());
    assert!(d.actions.is_empty(), "{d:?}");
}

/// The clone job for an empty data directory, and its reason, with `create_replica_methods`
/// `methods` and the members `others` beside the running leader `b`.
fn clone_job(methods: &[ReplicaMethod], others: &[MemberInfo]) -> (JobKind, String) {
    let mut leader = member("b", MemberState::Running, 100);
    leader.role = Role::Leader;
    let mut all = vec![leader];
    all.extend_from_slice(others);
    let mut c = cfg("a");
    c.dcs.create_replica_methods = methods.to_vec();
    let d = Obs::new(Some(view(Some("b"), &all)))
        .data(DataDir::Empty)
        .decide(&c, &Memory::default());
    match d.actions.as_slice() {
        [Action::StartJob(kind)] => (kind.clone(), d.reason),
        other => panic!("expected one clone job, got {other:?} ({})", d.reason),
    }
}

fn clonefrom(name: &str, state: MemberState, lag: Option<u64>) -> MemberInfo {
    let mut m = member(name, state, 100);
    m.tags.clonefrom = true;
    m.lag_bytes = lag;
    m
}

#[test]
fn basebackup_clones_from_the_least_lagging_streaming_member_tagged_clonefrom() {
    use ReplicaMethod::{Backup, Basebackup};
    let methods = [Backup, Basebackup];
    let (kind, reason) = clone_job(
        &methods,
        &[
            clonefrom("c", MemberState::Streaming, Some(300)),
            clonefrom("d", MemberState::Streaming, Some(20)),
            clonefrom("e", MemberState::Streaming, Some(20)),
            // Not tagged: never a source, however close.
            member("f", MemberState::Streaming, 100),
        ],
    );
    assert_eq!(
        kind,
        JobKind::Clone {
            from: "d".into(),
            methods: methods.to_vec()
        }
    );
    assert_eq!(
        reason,
        "creating a replica by restoring the backup repository's newest base backup, else cloning from d (tagged clonefrom, streaming, 20 bytes behind the leader)"
    );
}

#[test]
fn basebackup_clones_from_the_leader_when_no_clonefrom_member_streams_on_its_timeline() {
    let mut other_tl = clonefrom("e", MemberState::Streaming, Some(0));
    other_tl.timeline = Some(2);
    let (kind, reason) = clone_job(
        &[ReplicaMethod::Basebackup],
        &[
            clonefrom("c", MemberState::Stopped, Some(0)),
            clonefrom("d", MemberState::Streaming, None),
            other_tl,
        ],
    );
    assert_eq!(
        kind,
        JobKind::Clone {
            from: "b".into(),
            methods: vec![ReplicaMethod::Basebackup]
        }
    );
    assert_eq!(
        reason,
        "cloning from b (no member tagged clonefrom is a streaming replica on the leader's timeline: c stopped, d streaming, e streaming)"
    );
    // A member never picks itself, even when tagged.
    let (kind, _) = clone_job(
        &[ReplicaMethod::Basebackup],
        &[clonefrom("a", MemberState::Streaming, Some(0))],
    );
    assert!(matches!(kind, JobKind::Clone { from, .. } if from == "b"));
}

#[test]
fn with_the_repository_alone_no_clonefrom_member_is_chosen() {
    let (kind, reason) = clone_job(
        &[ReplicaMethod::Backup],
        &[clonefrom("c", MemberState::Streaming, Some(0))],
    );
    assert!(matches!(kind, JobKind::Clone { from, .. } if from == "b"));
    assert_eq!(
        reason,
        "restoring the backup repository's newest base backup"
    );
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
            port: 5432,
            remote: None,
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
    // Nor does the member say it streams (the partition-leader drill saw a former leader
    // "streaming" and called the cluster healthy ten seconds before it was rewound).
    let d = decide(&at(1, status(true, 100)), &cfg("c"), &mem);
    assert_eq!(d.state, MemberState::InRecovery, "{d:?}");
    mem.observed(&at(2, status(true, 200)));
    assert_eq!(
        mem.not_streaming_since, None,
        "a standby receiving WAL is streaming"
    );
    let d = decide(&at(2, status(true, 200)), &cfg("c"), &mem);
    assert_eq!(d.state, MemberState::Streaming, "{d:?}");
}

/// Members b (leader), c and d, all on timeline 1; `a` is tagged `replicatefrom` `from`.
fn cascading(from: &str, c: MemberInfo, d: MemberInfo, upstream_now: &str) -> Decision {
    let mut leader = member("b", MemberState::Running, 100);
    leader.role = Role::Leader;
    let obs = Obs::new(Some(view(Some("b"), &[leader, c, d]))).running(Some(standby_status(50)));
    let mut config = cfg("a");
    config.tags.replicatefrom = Some(from.into());
    obs.decide(&config, &following(upstream_now))
}

fn tagged(name: &str, state: MemberState, from: Option<&str>) -> MemberInfo {
    let mut m = member(name, state, 90);
    m.tags.replicatefrom = from.map(String::from);
    m
}

#[test]
fn a_replica_tagged_replicatefrom_streams_from_that_member_while_it_streams_on_the_leaders_timeline(
) {
    let d = cascading(
        "c",
        tagged("c", MemberState::Streaming, None),
        tagged("d", MemberState::Streaming, None),
        "b",
    );
    assert!(
        matches!(d.actions.as_slice(), [Action::FollowUpstream(u)] if u.name == "c"),
        "{d:?}"
    );
    assert_eq!(
        d.reason,
        "following c (tagged replicatefrom, streaming; leader b)"
    );
    // Already there: nothing to do.
    let d = cascading(
        "c",
        tagged("c", MemberState::Streaming, None),
        tagged("d", MemberState::Streaming, None),
        "c",
    );
    assert!(d.actions.is_empty(), "{d:?}");
    // A chain: c streams from d, which streams from the leader.
    let d = cascading(
        "c",
        tagged("c", MemberState::Streaming, Some("d")),
        tagged("d", MemberState::Streaming, None),
        "b",
    );
    assert!(
        matches!(d.actions.as_slice(), [Action::FollowUpstream(u)] if u.name == "c"),
        "{d:?}"
    );
}

#[test]
fn a_replica_goes_to_the_leader_when_its_upstream_stops_streaming_diverges_is_gone_or_loops_back() {
    let to_leader = |d: Decision, why: &str| {
        assert!(
            matches!(d.actions.as_slice(), [Action::FollowUpstream(u)] if u.name == "b"),
            "{d:?}"
        );
        assert_eq!(d.reason, format!("following b (replicatefrom c: {why})"));
    };
    let d_ok = || tagged("d", MemberState::Streaming, None);
    to_leader(
        cascading("c", tagged("c", MemberState::Stopped, None), d_ok(), "c"),
        "it is stopped on timeline 1, not streaming on the leader's timeline",
    );
    let mut diverged = tagged("c", MemberState::Streaming, None);
    diverged.timeline = Some(2);
    to_leader(
        cascading("c", diverged, d_ok(), "c"),
        "it is streaming on timeline 2, not streaming on the leader's timeline",
    );
    to_leader(
        cascading("c", tagged("e", MemberState::Streaming, None), d_ok(), "c"),
        "it has no member key",
    );
    // A ring: a from c, c from d, d from a.
    to_leader(
        cascading(
            "c",
            tagged("c", MemberState::Streaming, Some("d")),
            tagged("d", MemberState::Streaming, Some("a")),
            "c",
        ),
        "its replicatefrom chain leads back to me",
    );
    // Naming the leader is following the leader, with nothing more to say.
    let d = cascading("b", tagged("c", MemberState::Streaming, None), d_ok(), "b");
    assert_eq!(d.reason, "following b");
}

/// PostgreSQL 17 synchronises logical failover slots only from a primary: a member that may
/// lead streams from the leader while logical permanent slots are configured; a nofailover
/// one may cascade.
#[test]
fn with_logical_permanent_slots_only_a_nofailover_member_cascades() {
    let mut leader = member("b", MemberState::Running, 100);
    leader.role = Role::Leader;
    let obs = Obs::new(Some(view(
        Some("b"),
        &[leader, tagged("c", MemberState::Streaming, None)],
    )))
    .running(Some(standby_status(50)));
    let mut config = cfg("a");
    config.tags.replicatefrom = Some("c".into());
    config.dcs.slots.insert(
        "cdc".into(),
        pgherd_config::PermanentSlot {
            kind: pgherd_config::SlotType::Logical,
            database: Some("app".into()),
            plugin: Some("pgoutput".into()),
        },
    );
    let d = obs.decide(&config, &following("c"));
    assert!(
        matches!(d.actions.as_slice(), [Action::FollowUpstream(u)] if u.name == "b"),
        "{d:?}"
    );
    assert!(
        d.reason.contains("logical permanent slots are configured"),
        "{}",
        d.reason
    );
    config.tags.nofailover = true;
    let d = obs.decide(&config, &following("b"));
    assert!(
        matches!(d.actions.as_slice(), [Action::FollowUpstream(u)] if u.name == "c"),
        "{d:?}"
    );
}
