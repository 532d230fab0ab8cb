//! Table tests of the synchronous-replication plan. The step order is the safety property:
//! each test asserts it exactly, so reversing an order in `plan` fails here, and
//! `replay` checks the key's guarantee after every single step.

use super::*;

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn sync_key(members: &[&str], quorum: u32) -> SyncKey {
    SyncKey {
        leader: "l".into(),
        members: names(members),
        quorum,
    }
}

fn rep(name: &str, state: &str, flush: u64) -> Replication {
    Replication {
        application_name: name.into(),
        sync_state: state.into(),
        flush_lsn: Some(Lsn(flush)),
    }
}

struct Case {
    mode: SynchronousMode,
    strict: bool,
    n: u32,
    key: Option<SyncKey>,
    current: Standbys,
    replication: Vec<Replication>,
    candidates: Vec<String>,
    changed_at: Option<Lsn>,
}

impl Case {
    fn on(key: &[&str], current: Standbys, candidates: &[&str]) -> Case {
        Case {
            mode: SynchronousMode::On,
            strict: false,
            n: 1,
            key: Some(sync_key(key, key.len() as u32)),
            current,
            replication: vec![],
            candidates: names(candidates),
            changed_at: None,
        }
    }
    fn plan(&self) -> Vec<SyncStep> {
        plan(&SyncInput {
            mode: self.mode,
            strict: self.strict,
            node_count: self.n,
            leader: "l",
            key: self.key.as_ref(),
            current: &self.current,
            replication: &self.replication,
            candidates: &self.candidates,
            changed_at: self.changed_at,
        })
    }
}

fn first(v: &[&str]) -> Standbys {
    Standbys::First(names(v))
}

/// Applies `steps` one at a time from (`key`, `current`) and checks after each one that the
/// key keeps its promise: in `on` mode every key member is listed in
/// synchronous_standby_names (so it confirms every commit); in `quorum` mode the key's set
/// contains every listed standby and its q is no larger than PostgreSQL's.
fn replay(mode: SynchronousMode, mut key: SyncKey, mut current: Standbys, steps: &[SyncStep]) {
    for (i, step) in steps.iter().enumerate() {
        match step {
            SyncStep::SetKey(k) => key = k.clone(),
            SyncStep::SetStandbys(s) => current = s.clone(),
        }
        let listed = current.names();
        match mode {
            SynchronousMode::On => assert!(
                key.members.iter().all(|m| listed.contains(m)),
                "after step {i} ({step:?}) the key {key:?} names a member not confirming commits ({current:?})"
            ),
            SynchronousMode::Quorum => {
                assert!(
                    listed.iter().all(|n| key.members.contains(n)),
                    "after step {i} ({step:?}) a listed standby is missing from the key {key:?} ({current:?})"
                );
                if let Standbys::Quorum(q, _) = &current {
                    assert!(key.quorum <= *q, "after step {i} the key claims q={} > {q}", key.quorum);
                }
                if current == Standbys::Any {
                    assert!(key.members.is_empty(), "'*' with a non-empty key {key:?}");
                }
            }
            SynchronousMode::Off => {}
        }
    }
}

#[test]
fn on_a_new_standby_is_listed_first_and_enters_the_key_only_once_postgres_confirms_it() {
    let mut c = Case::on(&[], Standbys::None, &["b"]);
    assert_eq!(c.plan(), vec![SyncStep::SetStandbys(first(&["b"]))]);
    // Listed, but PostgreSQL does not report it synchronous yet: the key waits.
    c.current = first(&["b"]);
    c.replication = vec![rep("b", "potential", 5)];
    assert_eq!(c.plan(), vec![]);
    c.replication = vec![rep("b", "sync", 5)];
    assert_eq!(c.plan(), vec![SyncStep::SetKey(sync_key(&["b"], 1))]);
}

#[test]
fn on_a_leaving_standby_leaves_the_key_before_synchronous_standby_names() {
    let c = Case::on(&["b"], first(&["b"]), &["c"]);
    let steps = c.plan();
    assert_eq!(
        steps,
        vec![
            SyncStep::SetKey(sync_key(&[], 0)),
            SyncStep::SetStandbys(first(&["c"])),
        ]
    );
    replay(
        SynchronousMode::On,
        sync_key(&["b"], 1),
        first(&["b"]),
        &steps,
    );
}

#[test]
fn on_the_reversed_order_would_break_the_guarantee() {
    // The replay check itself must catch a standby dropped from the list while still in
    // the key: what reversing the order in `plan` would do.
    let reversed = [
        SyncStep::SetStandbys(first(&["c"])),
        SyncStep::SetKey(sync_key(&[], 0)),
    ];
    let caught = std::panic::catch_unwind(|| {
        replay(
            SynchronousMode::On,
            sync_key(&["b"], 1),
            first(&["b"]),
            &reversed,
        )
    });
    assert!(caught.is_err(), "replay must reject the reversed order");
}

#[test]
fn on_without_candidates_non_strict_falls_back_to_async_key_first() {
    let c = Case::on(&["b"], first(&["b"]), &[]);
    let steps = c.plan();
    assert_eq!(
        steps,
        vec![
            SyncStep::SetKey(sync_key(&[], 0)),
            SyncStep::SetStandbys(Standbys::None),
        ]
    );
    replay(
        SynchronousMode::On,
        sync_key(&["b"], 1),
        first(&["b"]),
        &steps,
    );
}

#[test]
fn on_without_candidates_strict_blocks_commits_with_star() {
    let mut c = Case::on(&["b"], first(&["b"]), &[]);
    c.strict = true;
    assert_eq!(
        c.plan(),
        vec![
            SyncStep::SetKey(sync_key(&[], 0)),
            SyncStep::SetStandbys(Standbys::Any),
        ]
    );
    assert_eq!(Standbys::Any.render(), "*");
}

#[test]
fn on_node_count_two_lists_two_and_keeps_the_current_member() {
    let mut c = Case::on(&["c"], first(&["c"]), &["b", "c", "d"]);
    c.n = 2;
    c.replication = vec![rep("c", "sync", 1)];
    assert_eq!(c.plan(), vec![SyncStep::SetStandbys(first(&["b", "c"]))]);
    assert_eq!(first(&["b", "c"]).render(), "FIRST 2 (\"b\", \"c\")");
}

#[test]
fn a_key_written_for_another_leader_is_emptied_first() {
    let mut c = Case::on(&[], first(&["b"]), &["b"]);
    c.key = Some(SyncKey {
        leader: "old".into(),
        members: names(&["l", "b"]),
        quorum: 2,
    });
    c.replication = vec![rep("b", "sync", 1)];
    let steps = c.plan();
    assert_eq!(steps[0], SyncStep::SetKey(sync_key(&[], 0)));
    assert_eq!(steps.last(), Some(&SyncStep::SetKey(sync_key(&["b"], 1))));
}

#[test]
fn off_clears_the_key_before_synchronous_standby_names() {
    let mut c = Case::on(&["b"], first(&["b"]), &["b"]);
    c.mode = SynchronousMode::Off;
    assert_eq!(
        c.plan(),
        vec![
            SyncStep::SetKey(sync_key(&[], 0)),
            SyncStep::SetStandbys(Standbys::None),
        ]
    );
    // Asynchronous from the start: no key is written at all.
    let mut fresh = Case::on(&[], Standbys::None, &["b"]);
    fresh.mode = SynchronousMode::Off;
    fresh.key = None;
    assert_eq!(fresh.plan(), vec![]);
}

fn quorum(key: &[&str], q: u32, current: Standbys, candidates: &[&str]) -> Case {
    Case {
        mode: SynchronousMode::Quorum,
        strict: false,
        n: q.max(1),
        key: Some(sync_key(key, q)),
        current,
        replication: vec![],
        candidates: names(candidates),
        changed_at: None,
    }
}

#[test]
fn quorum_a_new_member_enters_the_key_before_synchronous_standby_names() {
    let any1 = |v: &[&str]| Standbys::Quorum(1, names(v));
    let c = quorum(&["b"], 1, any1(&["b"]), &["b", "c"]);
    let steps = c.plan();
    assert_eq!(steps, vec![SyncStep::SetKey(sync_key(&["b", "c"], 1))]);
    replay(
        SynchronousMode::Quorum,
        sync_key(&["b"], 1),
        any1(&["b"]),
        &steps,
    );
    let c = quorum(&["b", "c"], 1, any1(&["b"]), &["b", "c"]);
    let steps = c.plan();
    assert_eq!(steps, vec![SyncStep::SetStandbys(any1(&["b", "c"]))]);
    replay(
        SynchronousMode::Quorum,
        sync_key(&["b", "c"], 1),
        any1(&["b"]),
        &steps,
    );
    assert_eq!(any1(&["b", "c"]).render(), "ANY 1 (\"b\", \"c\")");
}

#[test]
fn quorum_a_leaving_member_leaves_synchronous_standby_names_first_and_the_key_after_catch_up() {
    let any1 = |v: &[&str]| Standbys::Quorum(1, names(v));
    let mut c = quorum(&["b", "c"], 1, any1(&["b", "c"]), &["b"]);
    let steps = c.plan();
    assert_eq!(steps, vec![SyncStep::SetStandbys(any1(&["b"]))]);
    replay(
        SynchronousMode::Quorum,
        sync_key(&["b", "c"], 1),
        any1(&["b", "c"]),
        &steps,
    );
    // Listed no more, but b has not flushed past the change yet: c stays in the key.
    c.current = any1(&["b"]);
    c.changed_at = Some(Lsn(100));
    c.replication = vec![rep("b", "quorum", 50)];
    assert_eq!(c.plan(), vec![]);
    c.replication = vec![rep("b", "quorum", 100)];
    assert_eq!(c.plan(), vec![SyncStep::SetKey(sync_key(&["b"], 1))]);
}

#[test]
fn quorum_q_is_lowered_in_the_key_first_and_raised_in_it_last() {
    let any = |q: u32, v: &[&str]| Standbys::Quorum(q, names(v));
    // Lower 2 -> 1.
    let mut c = quorum(&["b", "c"], 2, any(2, &["b", "c"]), &["b", "c"]);
    c.n = 1;
    let steps = c.plan();
    assert_eq!(
        steps,
        vec![
            SyncStep::SetKey(sync_key(&["b", "c"], 1)),
            SyncStep::SetStandbys(any(1, &["b", "c"])),
        ]
    );
    replay(
        SynchronousMode::Quorum,
        sync_key(&["b", "c"], 2),
        any(2, &["b", "c"]),
        &steps,
    );
    // Raise 1 -> 2: PostgreSQL first, the key after the standbys caught up.
    let mut c = quorum(&["b", "c"], 1, any(1, &["b", "c"]), &["b", "c"]);
    c.n = 2;
    assert_eq!(c.plan(), vec![SyncStep::SetStandbys(any(2, &["b", "c"]))]);
    c.current = any(2, &["b", "c"]);
    c.changed_at = Some(Lsn(10));
    c.replication = vec![rep("b", "quorum", 10), rep("c", "quorum", 10)];
    assert_eq!(c.plan(), vec![SyncStep::SetKey(sync_key(&["b", "c"], 2))]);
}

#[test]
fn sync_members_only_take_over_and_quorum_needs_enough_reachable_members() {
    let on = SynchronousMode::On;
    let k = sync_key(&["b"], 1);
    assert!(may_take_over(on, false, Some(&k), "b", Lsn(1), &[]).is_ok());
    let refused = may_take_over(on, false, Some(&k), "c", Lsn(9), &[]).unwrap_err();
    assert!(
        refused.contains("only members of the sync key"),
        "{refused}"
    );
    // Fallen back to async (non-strict): the commits since are on the key's leader alone
    // (see the_key_leader_is_a_holder_and_an_empty_key_makes_no_other_member_eligible).
    let empty = sync_key(&[], 0);
    assert!(may_take_over(on, false, Some(&empty), "c", Lsn(1), &[]).is_err());
    assert!(may_take_over(on, true, Some(&empty), "c", Lsn(1), &[]).is_err());

    let q = SynchronousMode::Quorum;
    let k = sync_key(&["a", "b", "c"], 1);
    let pos = |v: &[(&str, u64)]| -> Vec<(String, Lsn)> {
        v.iter().map(|(n, l)| (n.to_string(), Lsn(*l))).collect()
    };
    // |M| - q + 1 = 3: a must see all three.
    assert!(may_take_over(q, false, Some(&k), "a", Lsn(5), &pos(&[("b", 5)])).is_err());
    assert!(may_take_over(q, false, Some(&k), "a", Lsn(5), &pos(&[("b", 5), ("c", 4)])).is_ok());
    let behind =
        may_take_over(q, false, Some(&k), "a", Lsn(5), &pos(&[("b", 6), ("c", 4)])).unwrap_err();
    assert!(behind.contains("b is further ahead"), "{behind}");
    let k2 = sync_key(&["a", "b", "c"], 2);
    assert!(may_take_over(q, false, Some(&k2), "a", Lsn(5), &pos(&[("b", 5)])).is_ok());
}

#[test]
fn synchronous_standby_names_round_trips() {
    for s in [
        Standbys::None,
        Standbys::Any,
        first(&["a", "b"]),
        Standbys::Quorum(2, names(&["a", "b", "c"])),
    ] {
        assert_eq!(Standbys::parse(&s.render()), s.clone(), "{s:?}");
    }
    let other = Standbys::parse("FIRST 1 (a, b)");
    assert_eq!(
        other,
        Standbys::Other("FIRST 1 (a, b)".into()),
        "not ours: replaced"
    );
    let c = Case::on(&[], other, &[]);
    assert_eq!(c.plan(), vec![SyncStep::SetStandbys(Standbys::None)]);
}

#[test]
fn the_key_leader_is_a_holder_and_an_empty_key_makes_no_other_member_eligible() {
    // A new leader claims `{l, []}` before its first write: whatever it acknowledged since
    // is on l alone (asynchronously in non-strict mode, under '*' in strict mode), so
    // nobody else may take over, strict or not, in either mode.
    let empty = sync_key(&[], 0);
    for mode in [SynchronousMode::On, SynchronousMode::Quorum] {
        for strict in [false, true] {
            let refused = may_take_over(mode, strict, Some(&empty), "c", Lsn(9), &[]);
            assert!(
                refused
                    .as_ref()
                    .is_err_and(|why| why.contains("only l, the leader that wrote it")),
                "{mode:?} strict={strict}: {refused:?}"
            );
            assert_eq!(
                may_take_over(mode, strict, Some(&empty), "l", Lsn(1), &[]),
                Ok(()),
                "{mode:?} strict={strict}: the key's own leader holds every commit"
            );
        }
    }
    // The key's leader also when the key has members (its agent restarted after its lease
    // expired); in quorum mode it needs no witnesses.
    let k = sync_key(&["b", "c"], 1);
    assert_eq!(
        may_take_over(SynchronousMode::Quorum, false, Some(&k), "l", Lsn(1), &[]),
        Ok(())
    );
    assert_eq!(
        may_take_over(SynchronousMode::On, true, Some(&k), "l", Lsn(1), &[]),
        Ok(())
    );
    // No key at all: no guarantee was ever given, so non-strict mode keeps the usual rules.
    assert_eq!(
        may_take_over(SynchronousMode::On, false, None, "c", Lsn(1), &[]),
        Ok(())
    );
}

#[test]
fn on_a_standby_enters_the_key_only_after_flushing_past_the_last_change() {
    // Strict mode with '*': any standby confirmed, a nosync one included. b becomes the
    // listed synchronous standby; PostgreSQL calls it `sync` at once, but the commits '*'
    // let the nosync member confirm are on b only once b flushed past the change.
    let mut c = Case::on(&[], Standbys::Any, &["b"]);
    c.strict = true;
    assert_eq!(c.plan(), vec![SyncStep::SetStandbys(first(&["b"]))]);
    c.current = first(&["b"]);
    c.changed_at = Some(Lsn(100));
    c.replication = vec![rep("b", "sync", 60), rep("nosync", "async", 100)];
    assert_eq!(c.plan(), vec![]);
    c.replication = vec![rep("b", "sync", 100)];
    assert_eq!(c.plan(), vec![SyncStep::SetKey(sync_key(&["b"], 1))]);
    // The same after an asynchronous fallback (''), and for a second standby joining.
    let mut c = Case::on(&["b"], first(&["b", "c"]), &["b", "c"]);
    c.n = 2;
    c.changed_at = Some(Lsn(100));
    c.replication = vec![rep("b", "sync", 100), rep("c", "sync", 99)];
    assert_eq!(c.plan(), vec![]);
}

#[test]
fn quorum_members_joining_an_empty_key_count_only_once_caught_up() {
    // From '*' (strict) or '' (fallback), acknowledged commits are on the leader and maybe
    // one unlisted standby: the set joins with q = 0 (no member is a witness yet), and q is
    // raised once every member flushed past the change to ANY.
    let any1 = |v: &[&str]| Standbys::Quorum(1, names(v));
    let mut c = quorum(&[], 0, Standbys::Any, &["b", "c"]);
    c.strict = true;
    c.n = 1;
    assert_eq!(c.plan(), vec![SyncStep::SetKey(sync_key(&["b", "c"], 0))]);
    let k = sync_key(&["b", "c"], 0);
    let refused = may_take_over(
        SynchronousMode::Quorum,
        true,
        Some(&k),
        "b",
        Lsn(9),
        &[("c".into(), Lsn(9))],
    );
    assert!(refused.is_err(), "{refused:?}");
    c.key = Some(k);
    assert_eq!(c.plan(), vec![SyncStep::SetStandbys(any1(&["b", "c"]))]);
    c.current = any1(&["b", "c"]);
    c.changed_at = Some(Lsn(100));
    c.replication = vec![rep("b", "quorum", 100), rep("c", "quorum", 40)];
    assert_eq!(c.plan(), vec![]);
    c.replication = vec![rep("b", "quorum", 100), rep("c", "quorum", 100)];
    assert_eq!(c.plan(), vec![SyncStep::SetKey(sync_key(&["b", "c"], 1))]);
}
