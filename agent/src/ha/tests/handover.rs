//! Planned switchovers and manual failovers, from the leader's side and from the others';
//! also pause mode and a leader's configuration reload, which share this file's builders.

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
    let d =
        leader_obs(with_handover(view(Some("c"), &[b]), h)).decide(&cfg("c"), &Memory::default());
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
