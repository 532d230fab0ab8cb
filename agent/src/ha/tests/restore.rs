//! Point-in-time restores: the restorer leads alone, others wait, members on an older
//! timeline clone again afterwards, and an interrupted restore is ended (rules 6 and 7).

use super::*;

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
