//! The leader key names me: start, promote or keep the primary, and give the key up when
//! PostgreSQL does not come up.

use super::*;

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
