//! Nobody holds the leader key: who may take it (rule 4).

use super::*;

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
