//! Items 9 and 10 of the compound-fault review: values that cannot be read and claims that
//! were never finished. Unreadable keys fail closed (no race for a vacant key), and nothing
//! waits for ever without saying why.

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
