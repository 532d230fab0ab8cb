//! Failsafe mode (issue 15 item 4): a leader cut off from etcd stays only on its members'
//! acceptances, a member that accepted does not race, a member the `failsafe` key does not
//! name does not race, the leader keeps the key and takes the leader key back first.

use super::*;
use crate::dcs::model::FailsafeKey;
use crate::ha::failsafe::{eligible, failsafe_key, members_to_ask};

fn failsafe_on(name: &str) -> HaConfig {
    let mut c = cfg(name);
    c.dcs.failsafe_mode = true;
    c
}

fn key(leader: &str, members: &[&str]) -> FailsafeKey {
    FailsafeKey {
        leader: leader.into(),
        members: members
            .iter()
            .map(|m| (m.to_string(), "127.0.0.1:8008".to_string()))
            .collect(),
    }
}

/// The leader "a" with etcd unreachable, its deadline `valid_for` away, after a round.
fn cut_off_leader(valid_for: Duration, round: FailsafeRound) -> Obs {
    let mut obs = Obs::new(None)
        .running(Some(primary_status()))
        .holding_lease(valid_for);
    obs.0.failsafe.round = Some(round);
    obs
}

#[test]
fn a_replica_that_accepted_a_leader_recently_does_not_race_for_its_vacant_key() {
    let others = [member("b", MemberState::Streaming, 90)];
    let mut obs = Obs::new(Some(view(None, &others))).running(Some(standby_status(100)));
    // Without the acceptance it is the best candidate.
    assert_eq!(
        obs.decide(&cfg("a"), &Memory::default()).actions,
        vec![Action::AcquireLeader]
    );
    obs.0.failsafe.accepted = Some(("b".into(), obs.0.now + Duration::from_secs(3)));
    let d = obs.decide(&cfg("a"), &Memory::default());
    assert!(d.actions.is_empty(), "{d:?}");
    assert!(
        d.reason
            .contains("accepted b as the leader in failsafe mode"),
        "{}",
        d.reason
    );
    // Whatever the config says now: the hold is about the leader it accepted.
    assert!(obs
        .decide(&failsafe_on("a"), &Memory::default())
        .actions
        .is_empty());
    // Once the hold has passed, the usual election applies.
    obs.0.failsafe.accepted = Some(("b".into(), obs.0.now));
    assert_eq!(
        obs.decide(&cfg("a"), &Memory::default()).actions,
        vec![Action::AcquireLeader]
    );
}

#[test]
fn an_acceptance_holds_back_a_manual_failover_too() {
    let mut v = view(None, &[member("b", MemberState::Stopped, 90)]);
    v.handover = Some((
        crate::dcs::model::Handover {
            kind: crate::dcs::model::HandoverKind::Failover,
            from: None,
            to: Some("a".into()),
            scheduled_at: None,
            final_lsn: None,
            handed_over_at: None,
            taken_by: None,
            requested_at: crate::now_rfc3339_millis(),
        },
        5,
    ));
    let mut obs = Obs::new(Some(v)).running(Some(standby_status(100)));
    obs.0.failsafe.accepted = Some(("b".into(), obs.0.now + Duration::from_secs(3)));
    let d = obs.decide(&cfg("a"), &Memory::default());
    assert!(
        !d.actions.contains(&Action::AcquireLeader),
        "an operator's failover beside a leader writable in failsafe mode: {d:?}"
    );
}

#[test]
fn with_failsafe_on_a_member_the_failsafe_key_does_not_name_does_not_race() {
    let mut v = view(None, &[member("b", MemberState::Stopped, 0)]);
    v.failsafe = Some(key("old", &["old", "b"]));
    let obs = Obs::new(Some(v.clone())).running(Some(standby_status(100)));
    let d = obs.decide(&failsafe_on("a"), &Memory::default());
    assert!(d.actions.is_empty(), "{d:?}");
    assert!(d.reason.contains("does not name me"), "{}", d.reason);
    // Named: it races as usual.
    v.failsafe = Some(key("old", &["old", "a", "b"]));
    let obs = Obs::new(Some(v.clone())).running(Some(standby_status(100)));
    assert_eq!(
        obs.decide(&failsafe_on("a"), &Memory::default()).actions,
        vec![Action::AcquireLeader]
    );
    // Unreadable: nobody races (fail closed).
    v.unreadable.insert("failsafe".into(), "not JSON".into());
    v.failsafe = None;
    let d = Obs::new(Some(v))
        .running(Some(standby_status(100)))
        .decide(&failsafe_on("a"), &Memory::default());
    assert!(d.actions.is_empty(), "{d:?}");
    assert!(d.reason.contains("unreadable"), "{}", d.reason);
}

#[test]
fn a_leader_cut_off_from_etcd_stays_while_every_member_accepts_it() {
    let round = FailsafeRound {
        asked: vec!["b".into(), "c".into()],
        ..FailsafeRound::default()
    };
    let d =
        cut_off_leader(Duration::from_secs(3), round).decide(&failsafe_on("a"), &Memory::default());
    assert_eq!(d.actions, vec![Action::RenewLeader]);
    assert_eq!(d.role, Role::Leader);
    assert!(
        d.reason
            .contains("every other member (b, c) accepts me as the leader"),
        "{}",
        d.reason
    );
}

#[test]
fn one_refusal_and_the_leader_demotes_at_its_lease_deadline_as_without_failsafe() {
    let round = FailsafeRound {
        asked: vec!["b".into(), "c".into()],
        refused: vec![("c".into(), "I can read etcd".into())],
        not_eligible: None,
    };
    // Before the deadline: leader still, and the reason names the refusal.
    let d = cut_off_leader(Duration::from_secs(2), round.clone())
        .decide(&failsafe_on("a"), &Memory::default());
    assert_eq!(d.actions, vec![Action::RenewLeader]);
    assert!(
        d.reason
            .contains("failsafe mode refused (c: I can read etcd)")
            && d.reason.contains("only while my lease is still valid"),
        "{}",
        d.reason
    );
    // At the deadline (which no acceptance extended): stop PostgreSQL, give the key up.
    let d = cut_off_leader(Duration::ZERO, round).decide(&failsafe_on("a"), &Memory::default());
    assert_eq!(d.actions, vec![Action::StopPostgres, Action::ReleaseLeader]);
    assert_eq!(d.role, Role::Replica);
    assert!(d.reason.contains("c: I can read etcd"), "{}", d.reason);
}

#[test]
fn when_etcd_returns_the_failsafe_leader_takes_the_vacant_key_back_instead_of_stopping() {
    let others = [member("b", MemberState::Streaming, 100)];
    let mut obs = Obs::new(Some(view(None, &others))).running(Some(primary_status()));
    // Without failsafe: a writable PostgreSQL without the key is stopped (rule 1).
    assert_eq!(
        obs.decide(&failsafe_on("a"), &Memory::default()).actions,
        vec![Action::StopPostgres]
    );
    obs.0.failsafe.leading_until = Some(obs.0.now + Duration::from_secs(2));
    let d = obs.decide(&failsafe_on("a"), &Memory::default());
    assert_eq!(d.actions, vec![Action::AcquireLeader]);
    assert!(d.reason.contains("taking the key back"), "{}", d.reason);
    // Past the failsafe deadline: stopped as usual.
    obs.0.failsafe.leading_until = Some(obs.0.now);
    assert_eq!(
        obs.decide(&failsafe_on("a"), &Memory::default()).actions,
        vec![Action::StopPostgres]
    );
    // Someone else holds the key: it demotes as usual.
    let mut obs = Obs::new(Some(view(Some("b"), &others))).running(Some(primary_status()));
    obs.0.failsafe.leading_until = Some(obs.0.now + Duration::from_secs(2));
    let d = obs.decide(&failsafe_on("a"), &Memory::default());
    assert!(d.actions.contains(&Action::StopPostgres), "{d:?}");
}

#[test]
fn the_leader_keeps_the_failsafe_key_naming_every_member_while_failsafe_mode_is_on() {
    let mut me = member("a", MemberState::Running, 1000);
    me.role = Role::Leader;
    let members = [me, member("b", MemberState::Streaming, 1000)];
    let mut v = view(Some("a"), &members);
    let leading = |v: &ClusterView, c: &HaConfig| {
        Obs::new(Some(v.clone()))
            .running(Some(primary_status()))
            .holding_lease(Duration::from_secs(3))
            .decide(c, &Memory::default())
    };
    let want = key("a", &["a", "b"]);
    let d = leading(&v, &failsafe_on("a"));
    assert!(
        d.actions
            .contains(&Action::SetFailsafeKey(Some(want.clone()))),
        "{d:?}"
    );
    v.failsafe = Some(want);
    let d = leading(&v, &failsafe_on("a"));
    assert!(
        !d.actions
            .iter()
            .any(|a| matches!(a, Action::SetFailsafeKey(_))),
        "{d:?}"
    );
    // Failsafe mode off: the key goes.
    let d = leading(&v, &cfg("a"));
    assert!(d.actions.contains(&Action::SetFailsafeKey(None)), "{d:?}");
}

#[test]
fn a_leader_asks_every_member_of_its_view_and_of_the_failsafe_key_and_only_with_its_own_key() {
    let members = [
        member("a", MemberState::Running, 0),
        member("b", MemberState::Streaming, 0),
    ];
    let mut v = view(Some("a"), &members);
    assert!(eligible(&v, "a").unwrap_err().contains("not written"));
    v.failsafe = Some(key("z", &["z", "a"]));
    assert!(eligible(&v, "a").unwrap_err().contains("for z"));
    v.failsafe = Some(key("a", &["a", "c"]));
    assert_eq!(eligible(&v, "a"), Ok(()));
    let asked: Vec<String> = members_to_ask(&v, "a").into_keys().collect();
    // c left the view (its key expired) but could race once etcd answers: asked too.
    assert_eq!(asked, vec!["b".to_string(), "c".to_string()]);
    assert_eq!(failsafe_key(&v, "a"), key("a", &["a", "b"]));
    v.unreadable.insert("failsafe".into(), "bad".into());
    assert!(eligible(&v, "a").unwrap_err().contains("unreadable"));
}
