//! Synchronous and quorum replication: who may take over, and what the leader lists.

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
    let cfg = sync_cfg("a", SynchronousMode::On);
    let plan = |members: Vec<MemberInfo>| plan_with(members, &[], sync::Standbys::None, &cfg);
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

/// The leader `a` planning synchronous replication with `key` and `current` in effect,
/// each member flushed as far as its position says.
fn plan_with(
    members: Vec<MemberInfo>,
    key: &[&str],
    current: sync::Standbys,
    cfg: &HaConfig,
) -> Decision {
    let replication = members
        .iter()
        .map(|m| sync::Replication {
            application_name: m.name.clone(),
            sync_state: if key.contains(&m.name.as_str()) {
                "sync".into()
            } else {
                "async".into()
            },
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
        members: key.iter().map(|k| k.to_string()).collect(),
        quorum: key.len() as u32,
    });
    let mut status = primary_status();
    status.replication = replication;
    status.standbys = current;
    Obs::new(Some(v))
        .holding_lease(Duration::from_secs(5))
        .running(Some(status))
        .decide(cfg, &Memory::default())
}

/// `tags.sync_priority`: the higher is chosen before a further one; 0 never.
#[test]
fn sync_priority_chooses_the_synchronous_standby_and_zero_excludes() {
    let cfg = sync_cfg("a", SynchronousMode::On);
    let b = member("b", MemberState::Streaming, 900);
    let mut c = member("c", MemberState::Streaming, 800);
    c.tags.sync_priority = 5;
    let d = plan_with(vec![b.clone(), c.clone()], &[], sync::Standbys::None, &cfg);
    assert!(
        d.actions
            .contains(&Action::SetSyncStandbys(sync::Standbys::First(vec![
                "c".into()
            ]))),
        "{d:?}"
    );
    c.tags.sync_priority = 0;
    let d = plan_with(vec![c.clone()], &[], sync::Standbys::None, &cfg);
    assert!(
        !d.actions
            .iter()
            .any(|a| matches!(a, Action::SetSyncStandbys(sync::Standbys::First(_)))),
        "a sync_priority 0 member was chosen: {d:?}"
    );
}

/// `maximum_lag_on_syncnode`: a synchronous standby further behind is swapped for one within
/// it (out of the key first, as any member leaving), but kept when no other is healthy.
#[test]
fn a_lagging_synchronous_standby_is_swapped_for_a_healthy_one() {
    let mut cfg = sync_cfg("a", SynchronousMode::On);
    cfg.dcs.maximum_lag_on_syncnode = 100;
    // The leader is at 1000: b flushed to 500 (500 behind), c to 950.
    let b = member("b", MemberState::Streaming, 500);
    let c = member("c", MemberState::Streaming, 950);
    let current = sync::Standbys::First(vec!["b".into()]);
    let d = plan_with(vec![b.clone(), c.clone()], &["b"], current.clone(), &cfg);
    let key_without_b = Action::SetSyncKey(SyncKey {
        leader: "a".into(),
        members: vec![],
        quorum: 0,
    });
    let pos = |a: &Action| d.actions.iter().position(|x| x == a);
    let to_c = Action::SetSyncStandbys(sync::Standbys::First(vec!["c".into()]));
    assert!(
        pos(&key_without_b).is_some() && pos(&key_without_b) < pos(&to_c),
        "b leaves the key before the list changes to c: {d:?}"
    );
    // No healthy standby: the lagging one stays.
    let d = plan_with(vec![b.clone()], &["b"], current.clone(), &cfg);
    assert!(
        !d.actions
            .iter()
            .any(|a| matches!(a, Action::SetSyncStandbys(_) | Action::SetSyncKey(_))),
        "{d:?}"
    );
    // Off (the default, -1): never swapped for lag.
    cfg.dcs.maximum_lag_on_syncnode = -1;
    let d = plan_with(vec![b, c], &["b"], current, &cfg);
    assert!(
        !d.actions
            .iter()
            .any(|a| matches!(a, Action::SetSyncStandbys(_) | Action::SetSyncKey(_))),
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
