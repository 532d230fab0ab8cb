//! Whose cluster this is: initialising, adopting, and refusing a foreign or unusable data
//! directory.

use super::*;

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
