use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use pgherd_config::{DynamicConfig, IgnoreSlot, PermanentSlot, SlotType};

use super::*;
use crate::dcs::model::{MemberSlot, PermanentSlotState, SlotsKey};

fn now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-12-02T12:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

fn physical(name: &str, active: bool, app: Option<&str>) -> SlotRow {
    SlotRow {
        name: name.into(),
        kind: SlotType::Physical,
        database: None,
        plugin: None,
        active,
        active_application: app.map(String::from),
        restart_lsn: Some(Lsn(0x3000000)),
        confirmed_flush_lsn: None,
        retained_bytes: Some(100),
    }
}

fn logical(name: &str, confirmed: u64) -> SlotRow {
    SlotRow {
        name: name.into(),
        kind: SlotType::Logical,
        database: Some("app".into()),
        plugin: Some("test_decoding".into()),
        active: false,
        active_application: None,
        restart_lsn: Some(Lsn(confirmed - 0x100)),
        confirmed_flush_lsn: Some(Lsn(confirmed)),
        retained_bytes: Some(100),
    }
}

fn members(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn record(members: &[(&str, Option<&str>)]) -> Record {
    Record::Readable(SlotsKey {
        leader: "node1".into(),
        members: members
            .iter()
            .map(|(m, gone)| {
                (
                    m.to_string(),
                    MemberSlot {
                        gone_since: gone.map(String::from),
                    },
                )
            })
            .collect(),
        permanent: Default::default(),
    })
}

fn cdc() -> PermanentSlot {
    PermanentSlot {
        kind: SlotType::Logical,
        database: Some("app".into()),
        plugin: Some("test_decoding".into()),
    }
}

#[test]
fn a_foreign_slot_is_never_dropped_active_or_not() {
    // The report: a hand-made slot for an external archiver, inactive, not a member.
    let slots = [
        physical("external_archiver", false, None),
        physical("node2", true, Some("node2")),
    ];
    let plan = plan_leader(
        "node1",
        &members(&["node1", "node2"]),
        &slots,
        &record(&[("node2", None)]),
        &DynamicConfig::default(),
        now(),
    );
    assert!(plan.drop.is_empty(), "{plan:?}");
    assert!(plan.create.is_empty(), "{plan:?}");
    assert_eq!(
        owner(
            &slots[0],
            &record(&[("node2", None)]),
            &DynamicConfig::default()
        ),
        Owner::Foreign
    );
}

#[test]
fn a_members_slot_is_recorded_before_it_is_created() {
    let plan = plan_leader(
        "node1",
        &members(&["node1", "node2"]),
        &[],
        &Record::Absent,
        &DynamicConfig::default(),
        now(),
    );
    assert_eq!(plan.create.len(), 1);
    assert_eq!(plan.create[0].name, "node2");
    let before = plan.record_before.expect("the record is written first");
    assert!(before.members.contains_key("node2"));
    assert_eq!(before.leader, "node1");
}

#[test]
fn a_departed_members_slot_is_kept_for_member_slots_ttl_then_dropped() {
    let cfg = DynamicConfig::default(); // 1800 s
    let slots = [physical("node3", false, None)];
    // Just gone: stamped, kept.
    let plan = plan_leader(
        "node1",
        &members(&["node1"]),
        &slots,
        &record(&[("node3", None)]),
        &cfg,
        now(),
    );
    assert!(plan.drop.is_empty(), "{plan:?}");
    let stamped = plan.record_before.unwrap();
    assert_eq!(
        stamped.members["node3"].gone_since.as_deref(),
        Some("2026-12-02T12:00:00Z")
    );
    // 29 minutes later: kept.
    let r = record(&[("node3", Some("2026-12-02T11:31:00Z"))]);
    let plan = plan_leader("node1", &members(&["node1"]), &slots, &r, &cfg, now());
    assert!(plan.drop.is_empty(), "{plan:?}");
    // 30 minutes: dropped, and forgotten only after the drop.
    let r = record(&[("node3", Some("2026-12-02T11:30:00Z"))]);
    let plan = plan_leader("node1", &members(&["node1"]), &slots, &r, &cfg, now());
    assert_eq!(plan.drop.len(), 1, "{plan:?}");
    assert!(
        plan.record_before.is_none(),
        "nothing changes before the drop"
    );
    assert!(!plan.record_after.unwrap().members.contains_key("node3"));
    // Active (the member streams although its key is gone): kept.
    let active = [physical("node3", true, Some("node3"))];
    let plan = plan_leader("node1", &members(&["node1"]), &active, &r, &cfg, now());
    assert!(plan.drop.is_empty(), "{plan:?}");
    // It came back: the stamp goes.
    let plan = plan_leader(
        "node1",
        &members(&["node1", "node3"]),
        &slots,
        &r,
        &cfg,
        now(),
    );
    assert!(plan.record_before.unwrap().members["node3"]
        .gone_since
        .is_none());
    // A stamp that does not parse never expires.
    let r = record(&[("node3", Some("yesterday"))]);
    let plan = plan_leader("node1", &members(&["node1"]), &slots, &r, &cfg, now());
    assert!(plan.drop.is_empty(), "{plan:?}");
}

#[test]
fn a_new_leader_recreates_the_slot_of_a_member_gone_within_the_ttl() {
    let r = record(&[("node3", Some("2026-12-02T11:50:00Z")), ("node2", None)]);
    let plan = plan_leader(
        "node2",
        &members(&["node2"]),
        &[],
        &r,
        &DynamicConfig::default(),
        now(),
    );
    let names: Vec<_> = plan.create.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, vec!["node3"], "{plan:?}");
}

#[test]
fn a_slot_named_like_a_member_is_adopted_only_when_that_member_streams_through_it() {
    let cfg = DynamicConfig::default();
    let theirs = [physical("node2", true, Some("pg_receivewal"))];
    let plan = plan_leader(
        "node1",
        &members(&["node1", "node2"]),
        &theirs,
        &Record::Absent,
        &cfg,
        now(),
    );
    assert_eq!(plan.warnings.len(), 1, "{plan:?}");
    assert!(!plan.record_before.unwrap().members.contains_key("node2"));
    let ours = [physical("node2", true, Some("node2"))];
    let plan = plan_leader(
        "node1",
        &members(&["node1", "node2"]),
        &ours,
        &Record::Absent,
        &cfg,
        now(),
    );
    assert!(plan.record_before.unwrap().members.contains_key("node2"));
}

#[test]
fn an_unreadable_record_drops_and_overwrites_nothing() {
    let slots = [physical("node3", false, None)];
    let plan = plan_leader(
        "node1",
        &members(&["node1", "node2"]),
        &slots,
        &Record::Unreadable,
        &DynamicConfig::default(),
        now(),
    );
    assert!(plan.drop.is_empty());
    assert!(plan.record_before.is_none() && plan.record_after.is_none());
    assert_eq!(
        plan.create.len(),
        1,
        "member slots are still created: {plan:?}"
    );
}

#[test]
fn ignore_slots_take_a_slot_out_of_pgherds_hands() {
    let mut cfg = DynamicConfig::default();
    cfg.ignore_slots.push(IgnoreSlot {
        name: Some("node3".into()),
        ..Default::default()
    });
    let slots = [physical("node3", false, None)];
    let r = record(&[("node3", Some("2026-12-01T00:00:00Z"))]);
    let plan = plan_leader("node1", &members(&["node1"]), &slots, &r, &cfg, now());
    assert!(plan.drop.is_empty(), "{plan:?}");
    assert_eq!(owner(&slots[0], &r, &cfg), Owner::Ignored);
}

#[test]
fn permanent_slots_are_created_recorded_with_their_position_and_dropped_when_removed() {
    let mut cfg = DynamicConfig::default();
    cfg.slots.insert("cdc".into(), cdc());
    let plan = plan_leader(
        "node1",
        &members(&["node1"]),
        &[],
        &Record::Absent,
        &cfg,
        now(),
    );
    assert_eq!(plan.create[0].kind, SlotType::Logical);
    assert_eq!(plan.create[0].database.as_deref(), Some("app"));
    let slots = [logical("cdc", 0x5000)];
    let plan = plan_leader(
        "node1",
        &members(&["node1"]),
        &slots,
        &Record::Absent,
        &cfg,
        now(),
    );
    assert_eq!(
        plan.record_before.clone().unwrap().permanent["cdc"].lsn,
        Some(Lsn(0x5000))
    );
    let r = Record::Readable(plan.record_before.unwrap());
    // Removed from the config: dropped, the entry kept as retired for the replicas.
    let plain = DynamicConfig::default();
    let plan = plan_leader("node1", &members(&["node1"]), &slots, &r, &plain, now());
    assert_eq!(plan.drop.len(), 1, "{plan:?}");
    assert!(plan.record_before.unwrap().permanent["cdc"]
        .retired_since
        .is_some());
    // A slot of the same name but another plugin is not taken over.
    let mut other = cfg.clone();
    other.slots.get_mut("cdc").unwrap().plugin = Some("pgoutput".into());
    let plan = plan_leader(
        "node1",
        &members(&["node1"]),
        &slots,
        &Record::Absent,
        &other,
        now(),
    );
    assert!(plan.create.is_empty() && plan.drop.is_empty());
    assert_eq!(plan.warnings.len(), 1, "{plan:?}");
}

#[test]
fn replicas_copy_logical_slots_advance_them_never_past_replay_and_drop_leftovers() {
    let mut cfg = DynamicConfig::default();
    cfg.slots.insert("cdc".into(), cdc());
    cfg.slots.insert(
        "archiver".into(),
        PermanentSlot {
            kind: SlotType::Physical,
            database: None,
            plugin: None,
        },
    );
    let mut key = SlotsKey {
        leader: "node1".into(),
        ..Default::default()
    };
    key.members.insert("node3".into(), MemberSlot::default());
    key.permanent.insert(
        "cdc".into(),
        PermanentSlotState {
            kind: SlotType::Logical,
            lsn: Some(Lsn(0x9000)),
            retired_since: None,
        },
    );
    let r = Record::Readable(key.clone());
    let plan = plan_replica(
        true,
        &[],
        &r,
        &cfg,
        Some(Lsn(0x8000)),
        false,
        &BTreeSet::new(),
    );
    assert_eq!(plan.copy, vec!["cdc".to_string()]);
    assert_eq!(plan.create, vec!["archiver".to_string()]);
    // Present: advanced to the leader's position, capped at replay.
    let slots = [logical("cdc", 0x6000), physical("node3", false, None)];
    let plan = plan_replica(
        true,
        &slots,
        &r,
        &cfg,
        Some(Lsn(0x8000)),
        false,
        &BTreeSet::new(),
    );
    assert_eq!(plan.advance, vec![("cdc".to_string(), Lsn(0x8000))]);
    assert_eq!(
        plan.drop.len(),
        1,
        "the member slot left from leading: {plan:?}"
    );
    // PostgreSQL 17 synchronises logical failover slots itself.
    let plan = plan_replica(
        true,
        &[],
        &r,
        &cfg,
        Some(Lsn(0x8000)),
        true,
        &BTreeSet::new(),
    );
    assert!(plan.copy.is_empty());
    // nofailover: no copies, and a copy it has goes.
    let plan = plan_replica(
        false,
        &slots,
        &r,
        &cfg,
        Some(Lsn(0x8000)),
        false,
        &BTreeSet::new(),
    );
    assert!(plan.copy.is_empty() && plan.create.is_empty() && plan.advance.is_empty());
    assert_eq!(plan.drop.len(), 2, "{plan:?}");
    // Unreadable record: nothing dropped or advanced.
    let plan = plan_replica(
        true,
        &slots,
        &Record::Unreadable,
        &cfg,
        Some(Lsn(0x8000)),
        false,
        &BTreeSet::new(),
    );
    assert!(plan.drop.is_empty() && plan.advance.is_empty() && plan.copy.is_empty());
    // A foreign slot on a replica is left alone.
    let foreign = [physical("someone_elses", false, None)];
    let plan = plan_replica(
        true,
        &foreign,
        &r,
        &cfg,
        Some(Lsn(0x8000)),
        false,
        &BTreeSet::new(),
    );
    assert!(plan.drop.is_empty());
}

#[test]
fn a_logical_slot_an_earlier_leader_had_is_not_recreated_at_the_current_position() {
    let mut cfg = DynamicConfig::default();
    cfg.slots.insert("cdc".into(), cdc());
    let mut key = SlotsKey {
        leader: "node1".into(),
        ..Default::default()
    };
    key.permanent.insert(
        "cdc".into(),
        PermanentSlotState {
            kind: SlotType::Logical,
            lsn: Some(Lsn(0x9000)),
            retired_since: None,
        },
    );
    let r = Record::Readable(key);
    let plan = plan_leader("node2", &members(&["node2"]), &[], &r, &cfg, now());
    assert!(plan.create.is_empty(), "{plan:?}");
    assert!(plan.errors.iter().any(|w| w.contains("cdc")), "{plan:?}");
    // The recorded position stays for the replicas and the operator.
    if let Some(k) = plan.record_before {
        assert_eq!(k.permanent["cdc"].lsn, Some(Lsn(0x9000)));
    }
}

#[test]
fn a_new_leader_counts_member_slots_ttl_on_its_own_clock() {
    let slots = [physical("node3", false, None)];
    // Stamped by node1 an hour ago (its clock, or ours, is off): node2 starts again.
    let r = record(&[("node3", Some("2026-12-02T11:00:00Z"))]);
    let plan = plan_leader(
        "node2",
        &members(&["node2"]),
        &slots,
        &r,
        &DynamicConfig::default(),
        now(),
    );
    assert!(plan.drop.is_empty(), "{plan:?}");
    assert_eq!(
        plan.record_before.unwrap().members["node3"]
            .gone_since
            .as_deref(),
        Some("2026-12-02T12:00:00Z")
    );
}

#[test]
fn a_replicas_logical_copy_ahead_of_the_leader_is_dropped_to_be_copied_again() {
    let mut cfg = DynamicConfig::default();
    cfg.slots.insert("cdc".into(), cdc());
    let mut key = SlotsKey {
        leader: "node2".into(),
        ..Default::default()
    };
    key.permanent.insert(
        "cdc".into(),
        PermanentSlotState {
            kind: SlotType::Logical,
            lsn: Some(Lsn(0x5000)),
            retired_since: None,
        },
    );
    let r = Record::Readable(key);
    // The old leader's own slot, further on its old timeline than the new leader's.
    let mine = [logical("cdc", 0x7000)];
    let plan = plan_replica(
        true,
        &mine,
        &r,
        &cfg,
        Some(Lsn(0x8000)),
        false,
        &BTreeSet::new(),
    );
    assert_eq!(plan.drop.len(), 1, "{plan:?}");
    assert!(plan.advance.is_empty());
}

/// Cascading: a replica holds the slot of each member tagged `replicatefrom` it, creates it
/// only for a member the leader records, keeps it while that member is its downstream and
/// drops it (unused) once it is not.
#[test]
fn a_replica_keeps_a_slot_for_each_member_streaming_from_it_and_drops_it_after() {
    let cfg = DynamicConfig::default();
    let r = record(&[("node3", None), ("node4", None)]);
    let down = members(&["node3", "node5"]);
    let plan = plan_replica(false, &[], &r, &cfg, Some(Lsn(0x8000)), false, &down);
    // node5 is not recorded by the leader: its name is not pgherd's to take here.
    assert_eq!(plan.create, vec!["node3".to_string()]);
    let slots = [
        physical("node3", false, None),
        physical("node4", false, None),
    ];
    let plan = plan_replica(false, &slots, &r, &cfg, Some(Lsn(0x8000)), false, &down);
    assert!(plan.create.is_empty(), "{plan:?}");
    let dropped: Vec<&str> = plan.drop.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(dropped, vec!["node4"], "{plan:?}");
    // node3 no longer streams from here: its slot goes, unless in use.
    let plan = plan_replica(
        false,
        &slots,
        &r,
        &cfg,
        Some(Lsn(0x8000)),
        false,
        &members(&[]),
    );
    assert_eq!(plan.drop.len(), 2, "{plan:?}");
    let busy = [physical("node3", true, Some("node3"))];
    let plan = plan_replica(
        false,
        &busy,
        &r,
        &cfg,
        Some(Lsn(0x8000)),
        false,
        &members(&[]),
    );
    assert!(plan.drop.is_empty(), "{plan:?}");
    // An unreadable record drops nothing and creates nothing for downstream members.
    let plan = plan_replica(false, &slots, &Record::Unreadable, &cfg, None, false, &down);
    assert!(plan.drop.is_empty() && plan.create.is_empty(), "{plan:?}");
}

#[test]
fn an_unused_slot_of_a_cascading_member_follows_its_reported_position_only_forward() {
    let slots = [
        physical("node3", false, None),         // restart 0x3000000
        physical("node4", true, Some("node4")), // in use: left to the walsender
        physical("node5", false, None),
    ];
    let positions: std::collections::BTreeMap<String, Lsn> = [
        ("node3".to_string(), Lsn(0x5000000)),
        ("node4".to_string(), Lsn(0x5000000)),
        ("node5".to_string(), Lsn(0x2000000)), // behind the slot: never moved back
        ("node6".to_string(), Lsn(0x5000000)), // no slot here
    ]
    .into();
    let cfg = DynamicConfig::default();
    let r = record(&[("node3", None), ("node4", None), ("node5", None)]);
    assert_eq!(
        advance_cascaded(&slots, &positions, Lsn(0x4000000), &r, &cfg),
        vec![("node3".to_string(), Lsn(0x4000000))],
        "capped at the current position"
    );
    // Only pgherd's member slots move: not an unrecorded name, an ignored slot, a permanent
    // slot of the config, nor anything under an unreadable record.
    let unrecorded = record(&[("node4", None)]);
    assert!(advance_cascaded(&slots, &positions, Lsn(0x4000000), &unrecorded, &cfg).is_empty());
    let mut ignoring = DynamicConfig::default();
    ignoring.ignore_slots.push(IgnoreSlot {
        name: Some("node3".into()),
        ..Default::default()
    });
    assert!(advance_cascaded(&slots, &positions, Lsn(0x4000000), &r, &ignoring).is_empty());
    let mut permanent = DynamicConfig::default();
    permanent.slots.insert(
        "node3".into(),
        PermanentSlot {
            kind: SlotType::Physical,
            database: None,
            plugin: None,
        },
    );
    assert!(advance_cascaded(&slots, &positions, Lsn(0x4000000), &r, &permanent).is_empty());
    assert!(advance_cascaded(
        &slots,
        &positions,
        Lsn(0x4000000),
        &Record::Unreadable,
        &cfg
    )
    .is_empty());
}

fn member_info(name: &str, from: Option<&str>) -> crate::dcs::model::MemberInfo {
    use crate::dcs::model::{MemberInfo, MemberState, Role};
    MemberInfo {
        name: name.into(),
        role: Role::Replica,
        state: MemberState::Streaming,
        api_address: String::new(),
        host: "127.0.0.1".into(),
        port: 5432,
        timeline: Some(1),
        wal_lsn: None,
        receive_lsn: None,
        replay_lsn: None,
        lag_bytes: Some(0),
        tags: pgherd_config::Tags {
            replicatefrom: from.map(String::from),
            ..Default::default()
        },
        version: String::new(),
        system_identifier: None,
        decision: String::new(),
        pending_restart: false,
        upstream: None,
    }
}

/// A member promoted since keeps its tag but streams from nobody: the slot its old upstream
/// held for it is no longer a downstream slot (else it would hold WAL for ever).
#[test]
fn the_downstream_of_a_member_is_the_replicas_tagged_to_it_not_a_promoted_one() {
    use crate::dcs::model::{ClusterView, LeaderKey, Role};
    let mut promoted = member_info("node4", Some("node2"));
    promoted.role = Role::Leader;
    let view = ClusterView {
        leader: Some(LeaderKey {
            name: "node5".into(),
            lease: 1,
        }),
        members: [
            member_info("node3", Some("node2")),
            promoted,
            // Holds the leader key; its published role may lag behind.
            member_info("node5", Some("node2")),
            member_info("node6", Some("node1")),
            member_info("node2", None),
        ]
        .into_iter()
        .map(|m| (m.name.clone(), m))
        .collect(),
        ..Default::default()
    };
    assert_eq!(downstream_of("node2", &view), members(&["node3"]));
    assert_eq!(downstream_of("node1", &view), members(&["node6"]));
}
