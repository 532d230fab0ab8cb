//! Which replication slots are pgherd's, and what to do with them: pure planning, tested
//! without PostgreSQL; the agent's shell runs the plans (`agent/act/slots.rs`).
//!
//! A slot is pgherd's when the `slots` key in etcd records it (a member slot the leader
//! created, or one a member itself streamed through) or when the dynamic config's `slots`
//! lists it (a permanent slot). Every other slot is foreign: pgherd never creates, advances
//! or drops it, whatever its name, whether active or not. `ignore_slots` takes a slot out
//! of pgherd's hands even when it is recorded or configured.
//!
//! The leader writes the record before it creates a slot and removes an entry only after
//! the slot is dropped, so a crash between the two leaves a recorded slot that is absent
//! (created or forgotten next time), never an unrecorded slot of pgherd's.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use pgherd_config::{DynamicConfig, PermanentSlot, SlotType};

use crate::dcs::model::{MemberSlot, PermanentSlotState, SlotsKey};
use crate::lsn::Lsn;

/// One row of `pg_replication_slots` (temporary slots left out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRow {
    pub name: String,
    pub kind: SlotType,
    pub database: Option<String>,
    pub plugin: Option<String>,
    pub active: bool,
    /// `application_name` of the walsender streaming through the slot, while active.
    pub active_application: Option<String>,
    pub restart_lsn: Option<Lsn>,
    pub confirmed_flush_lsn: Option<Lsn>,
    /// WAL the slot holds back: the server's current (or, on a standby, replayed) position
    /// minus `restart_lsn`.
    pub retained_bytes: Option<u64>,
}

/// The `slots` key as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Absent,
    Readable(SlotsKey),
    /// The key exists but cannot be read: nothing is dropped, advanced or overwritten.
    Unreadable,
}

impl Record {
    fn key(&self) -> Option<&SlotsKey> {
        match self {
            Record::Readable(k) => Some(k),
            _ => None,
        }
    }
}

/// Whose a slot is, as `pgherdctl slots` and `/metrics` show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// A member's slot, recorded in the `slots` key.
    Member,
    /// A permanent slot of the dynamic config.
    Permanent,
    /// Matched by `ignore_slots`.
    Ignored,
    /// Not pgherd's.
    Foreign,
}

impl Owner {
    pub fn as_str(self) -> &'static str {
        match self {
            Owner::Member => "member",
            Owner::Permanent => "permanent",
            Owner::Ignored => "ignored",
            Owner::Foreign => "foreign",
        }
    }
}

fn ignored(cfg: &DynamicConfig, row: &SlotRow) -> bool {
    cfg.ignore_slots.iter().any(|i| {
        i.matches(
            &row.name,
            row.kind,
            row.database.as_deref(),
            row.plugin.as_deref(),
        )
    })
}

fn ignored_config(cfg: &DynamicConfig, name: &str, slot: &PermanentSlot) -> bool {
    cfg.ignore_slots.iter().any(|i| {
        i.matches(
            name,
            slot.kind,
            slot.database.as_deref(),
            slot.plugin.as_deref(),
        )
    })
}

fn ignored_member(cfg: &DynamicConfig, name: &str) -> bool {
    cfg.ignore_slots
        .iter()
        .any(|i| i.matches(name, SlotType::Physical, None, None))
}

/// Whose `row` is.
pub fn owner(row: &SlotRow, record: &Record, cfg: &DynamicConfig) -> Owner {
    if ignored(cfg, row) {
        Owner::Ignored
    } else if cfg.slots.contains_key(&row.name)
        || record
            .key()
            .is_some_and(|k| k.permanent.contains_key(&row.name))
    {
        Owner::Permanent
    } else if record
        .key()
        .is_some_and(|k| k.members.contains_key(&row.name))
    {
        Owner::Member
    } else {
        Owner::Foreign
    }
}

/// A slot to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Create {
    pub name: String,
    pub kind: SlotType,
    /// Logical slots: the database and the output plugin.
    pub database: Option<String>,
    pub plugin: Option<String>,
    pub why: String,
}

/// What the leader does with slots in one loop.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaderPlan {
    /// The `slots` key to write before anything is created (`None`: leave it as it is).
    pub record_before: Option<SlotsKey>,
    pub create: Vec<Create>,
    /// Slots to drop, with why. Only inactive slots pgherd owns.
    pub drop: Vec<(String, String)>,
    /// The key to write once the drops succeeded (`None`: as `record_before`).
    pub record_after: Option<SlotsKey>,
    /// Things an operator should know (a foreign slot carrying a member's name, ...).
    pub warnings: Vec<String>,
    /// Things an operator must act on (a logical slot missing on this leader).
    pub errors: Vec<String>,
}

fn since(t: &Option<String>, now: DateTime<Utc>) -> Option<chrono::Duration> {
    let t = DateTime::parse_from_rfc3339(t.as_deref()?).ok()?;
    Some(now.signed_duration_since(t.with_timezone(&Utc)))
}

/// The members that stream from `me` by their `replicatefrom` tag: replicas only (a member
/// promoted since, its tag unchanged, streams from nobody, and its slot here must go).
pub fn downstream_of(me: &str, view: &crate::dcs::model::ClusterView) -> BTreeSet<String> {
    view.members
        .values()
        .filter(|m| {
            m.name != me
                && m.tags.replicatefrom.as_deref() == Some(me)
                && m.role == crate::dcs::model::Role::Replica
                && view.leader_name() != Some(m.name.as_str())
        })
        .map(|m| m.name.clone())
        .collect()
}

/// The leader keeps a slot for a member that streams from another replica (`replicatefrom`)
/// too, so that member can fall back to the leader and find its WAL; that slot is not in
/// use, so the leader moves it to the position the member reports (`positions`: its replay
/// position on the leader's timeline, from its member key; it has the WAL before that)
/// instead of holding WAL for ever. Returns the slots to advance and where, never backwards or past `current`.
///
/// Only pgherd's member slots move: a name the `slots` key records as a member's, not a
/// permanent slot of the config, not matched by `ignore_slots`.
pub fn advance_cascaded(
    slots: &[SlotRow],
    positions: &std::collections::BTreeMap<String, Lsn>,
    current: Lsn,
    record: &Record,
    cfg: &DynamicConfig,
) -> Vec<(String, Lsn)> {
    let mut out = Vec::new();
    let Some(key) = record.key() else {
        return out;
    };
    for (name, at) in positions {
        let Some(r) = slots.iter().find(|r| &r.name == name) else {
            continue;
        };
        if !key.members.contains_key(name) || cfg.slots.contains_key(name) || ignored(cfg, r) {
            continue;
        }
        let to = (*at).min(current);
        if r.kind == SlotType::Physical && !r.active && r.restart_lsn.is_some_and(|l| l < to) {
            out.push((name.clone(), to));
        }
    }
    out
}

/// The leader's plan: a slot for every other member (kept `member_slots_ttl` after its key
/// disappears), every permanent slot of the config, nothing else touched.
pub fn plan_leader(
    me: &str,
    members: &BTreeSet<String>,
    slots: &[SlotRow],
    record: &Record,
    cfg: &DynamicConfig,
    now: DateTime<Utc>,
) -> LeaderPlan {
    let mut plan = LeaderPlan::default();
    let row = |name: &str| slots.iter().find(|r| r.name == name);
    let old = record.key().cloned().unwrap_or_default();
    let mut new = SlotsKey {
        leader: me.to_string(),
        ..old.clone()
    };
    if old.leader != me {
        // A new leader counts member_slots_ttl from now on its own clock: a stamp from
        // another machine's clock could make it drop a slot early.
        for m in new.members.values_mut() {
            if m.gone_since.is_some() {
                m.gone_since = Some(now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
            }
        }
    }
    let ttl = chrono::Duration::seconds(cfg.member_slots_ttl.min(i64::MAX as u64) as i64);
    let stamp = now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);

    // Members with a key: their slot exists and is recorded.
    for m in members.iter().filter(|m| m.as_str() != me) {
        if cfg.slots.contains_key(m) {
            plan.warnings.push(format!(
                "member {m} has the name of a permanent slot of the dynamic config: it streams through that slot"
            ));
            continue;
        }
        if ignored_member(cfg, m) {
            continue;
        }
        match (row(m), new.members.contains_key(m)) {
            (None, _) => {
                new.members.insert(m.clone(), MemberSlot::default());
                plan.create.push(Create {
                    name: m.clone(),
                    kind: SlotType::Physical,
                    database: None,
                    plugin: None,
                    why: format!("member {m} has no slot"),
                });
            }
            (Some(_), true) => {
                new.members.insert(m.clone(), MemberSlot::default());
            }
            (Some(r), false) => {
                if r.kind == SlotType::Physical
                    && r.active
                    && r.active_application.as_deref() == Some(m.as_str())
                {
                    // The member itself streams through it (a slot made before pgherd
                    // recorded its slots): it is the member's slot.
                    new.members.insert(m.clone(), MemberSlot::default());
                } else {
                    plan.warnings.push(format!(
                        "slot {m} has member {m}'s name but is not pgherd's (not recorded, and the member does not stream through it): leaving it alone"
                    ));
                }
            }
        }
    }

    // Members whose key is gone: kept for member_slots_ttl, then dropped.
    let gone: Vec<String> = new
        .members
        .keys()
        .filter(|m| !members.contains(*m) || m.as_str() == me)
        .cloned()
        .collect();
    for m in gone {
        if m == me {
            // The leader's own slot from when it was a replica of another: nobody streams
            // through it any more.
            match row(&m) {
                Some(r) if !r.active && !ignored(cfg, r) => {
                    plan.drop
                        .push((m.clone(), "it is the leader's own name".into()));
                }
                Some(_) => {}
                None => {
                    new.members.remove(&m);
                }
            }
            continue;
        }
        let entry = new.members.get_mut(&m).expect("listed just above");
        if entry.gone_since.is_none() {
            entry.gone_since = Some(stamp.clone());
        }
        // A stamp that does not parse never expires: keeping WAL is the safe side.
        let expired = since(&entry.gone_since, now).is_some_and(|d| d >= ttl);
        match row(&m) {
            Some(r) if expired && !r.active && !ignored(cfg, r) => plan.drop.push((
                m.clone(),
                format!(
                    "member {m} has been gone for member_slots_ttl ({} s)",
                    cfg.member_slots_ttl
                ),
            )),
            Some(_) => {}
            None if expired => {
                new.members.remove(&m);
            }
            None => {
                if !ignored_member(cfg, &m) && !cfg.slots.contains_key(&m) {
                    plan.create.push(Create {
                        name: m.clone(),
                        kind: SlotType::Physical,
                        database: None,
                        plugin: None,
                        why: format!(
                            "member {m} is gone but within member_slots_ttl: its slot is kept on this leader too"
                        ),
                    });
                }
            }
        }
    }

    // Permanent slots.
    for (name, slot) in &cfg.slots {
        if ignored_config(cfg, name, slot) {
            continue;
        }
        let had = old.permanent.get(name).filter(|p| {
            p.kind == SlotType::Logical && p.lsn.is_some() && p.retired_since.is_none()
        });
        match row(name) {
            // A logical slot that existed on an earlier leader and is missing here (its copy
            // was never loaded on this member): a new one would start at the current
            // position, and its consumer would silently skip what it had not confirmed.
            // Left to the operator, loudly; the recorded position stays.
            None if slot.kind == SlotType::Logical && had.is_some() => {
                plan.errors.push(format!(
                    "logical slot {name} existed on an earlier leader (at {}) and is missing on this one: not creating it at the current position, which would make its consumer skip changes silently; recreate it by hand (pg_create_logical_replication_slot) once the consumer can start afresh",
                    had.and_then(|p| p.lsn).expect("filtered on lsn")
                ));
            }
            None => {
                new.permanent.insert(
                    name.clone(),
                    PermanentSlotState {
                        kind: slot.kind,
                        lsn: None,
                        retired_since: None,
                    },
                );
                plan.create.push(Create {
                    name: name.clone(),
                    kind: slot.kind,
                    database: slot.database.clone(),
                    plugin: slot.plugin.clone(),
                    why: "a permanent slot of the dynamic config".into(),
                });
            }
            Some(r)
                if r.kind == slot.kind
                    && (slot.kind == SlotType::Physical
                        || (r.database == slot.database && r.plugin == slot.plugin)) =>
            {
                let lsn = match r.kind {
                    SlotType::Logical => r.confirmed_flush_lsn,
                    SlotType::Physical => r.restart_lsn,
                };
                new.permanent.insert(
                    name.clone(),
                    PermanentSlotState {
                        kind: slot.kind,
                        lsn,
                        retired_since: None,
                    },
                );
            }
            Some(r) => plan.warnings.push(format!(
                "slot {name} exists as a {} slot{} but the dynamic config asks for a {} slot{}: leaving it alone (drop it, or change the config)",
                r.kind.as_str(),
                describe(r.database.as_deref(), r.plugin.as_deref()),
                slot.kind.as_str(),
                describe(slot.database.as_deref(), slot.plugin.as_deref()),
            )),
        }
    }
    // Permanent slots that left the config: dropped (inactive only), the entry kept
    // member_slots_ttl so replicas drop their copies as well.
    let retired: Vec<String> = new
        .permanent
        .keys()
        .filter(|n| !cfg.slots.contains_key(*n))
        .cloned()
        .collect();
    for name in retired {
        let entry = new.permanent.get_mut(&name).expect("listed just above");
        if entry.retired_since.is_none() {
            entry.retired_since = Some(stamp.clone());
        }
        match row(&name) {
            Some(r) if !r.active && !ignored(cfg, r) => plan.drop.push((
                name.clone(),
                "permanent slot no longer in the dynamic config".into(),
            )),
            Some(r) if r.active => plan.warnings.push(format!(
                "permanent slot {name} left the dynamic config but a consumer still streams through it: dropping it once it is inactive"
            )),
            Some(_) => {}
            None => {
                if since(&entry.retired_since, now).is_some_and(|d| d >= ttl) {
                    new.permanent.remove(&name);
                }
            }
        }
    }

    if let Record::Unreadable = record {
        // Fail closed: create what is missing, drop and overwrite nothing.
        plan.drop.clear();
        return plan;
    }
    let mut after = new.clone();
    for (name, _) in &plan.drop {
        if after.members.contains_key(name) {
            after.members.remove(name);
        }
        // A retired permanent entry stays until its ttl (replicas drop their copies).
    }
    if *record != Record::Readable(new.clone()) {
        plan.record_before = Some(new.clone());
    }
    if after != new {
        plan.record_after = Some(after);
    }
    plan
}

fn describe(database: Option<&str>, plugin: Option<&str>) -> String {
    match (database, plugin) {
        (Some(d), Some(p)) => format!(" (database {d}, plugin {p})"),
        _ => String::new(),
    }
}

/// What a replica does with slots in one loop.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicaPlan {
    /// Physical permanent slots to create here.
    pub create: Vec<String>,
    /// Logical permanent slots to copy from the leader (PostgreSQL before 17 cannot create
    /// a logical slot on a standby, and a new one could not go back to the consumer's
    /// position anyway); a restart loads them.
    pub copy: Vec<String>,
    /// Copies to move forward to the leader's position (never past this standby's replay).
    pub advance: Vec<(String, Lsn)>,
    /// pgherd's slots this replica holds but must not (with why): copies of slots that left
    /// the config, member slots left from when it led.
    pub drop: Vec<(String, String)>,
}

/// A replica keeps a copy of every permanent slot when it may become leader, a slot for
/// each member that streams from it (`downstream`: members tagged `replicatefrom` it), and
/// no other slot of pgherd's. `native_sync`: PostgreSQL 17+ synchronises failover slots
/// itself.
pub fn plan_replica(
    may_lead: bool,
    slots: &[SlotRow],
    record: &Record,
    cfg: &DynamicConfig,
    replay: Option<Lsn>,
    native_sync: bool,
    downstream: &BTreeSet<String>,
) -> ReplicaPlan {
    let mut plan = ReplicaPlan::default();
    // A member slot is made here only for a member the leader records (it records every
    // member with a key): a recorded name is pgherd's to drop once nobody streams from here.
    for d in downstream {
        let recorded = record.key().is_some_and(|k| k.members.contains_key(d));
        if recorded
            && !ignored_member(cfg, d)
            && !cfg.slots.contains_key(d)
            && !slots.iter().any(|r| &r.name == d)
        {
            plan.create.push(d.clone());
        }
    }
    let Record::Readable(key) = record else {
        // Without the leader's record there are no positions to follow and no ownership to
        // drop by: only physical permanent slots are created.
        if may_lead {
            for (name, slot) in &cfg.slots {
                if slot.kind == SlotType::Physical
                    && !ignored_config(cfg, name, slot)
                    && !slots.iter().any(|r| &r.name == name)
                {
                    plan.create.push(name.clone());
                }
            }
        }
        return plan;
    };
    let wanted = |name: &str| -> bool {
        may_lead
            && cfg.slots.get(name).is_some_and(|s| {
                let synced_by_postgres = native_sync && s.kind == SlotType::Logical;
                !synced_by_postgres && !ignored_config(cfg, name, s)
            })
    };
    if may_lead {
        for (name, slot) in &cfg.slots {
            if !wanted(name) || slots.iter().any(|r| &r.name == name) {
                continue;
            }
            match slot.kind {
                SlotType::Physical => plan.create.push(name.clone()),
                // The leader must have it (and its position) before there is anything to copy.
                SlotType::Logical => {
                    if key.permanent.get(name).is_some_and(|s| {
                        s.kind == SlotType::Logical && s.lsn.is_some() && s.retired_since.is_none()
                    }) {
                        plan.copy.push(name.clone())
                    }
                }
            }
        }
    }
    for r in slots {
        if ignored(cfg, r) {
            continue;
        }
        if wanted(&r.name) {
            let Some(target) = key.permanent.get(&r.name).and_then(|s| s.lsn) else {
                continue;
            };
            // A logical copy ahead of the leader's slot (this member's own slot from when it
            // led, on an older timeline) would skip changes after a failover: copy it again.
            if r.kind == SlotType::Logical
                && !r.active
                && r.confirmed_flush_lsn.is_some_and(|c| c > target)
            {
                plan.drop.push((
                    r.name.clone(),
                    format!("the copy is ahead of the leader's slot ({target}): copying it again"),
                ));
                continue;
            }
            let target = match replay {
                Some(replay) => target.min(replay),
                None => continue,
            };
            let current = match r.kind {
                SlotType::Logical => r.confirmed_flush_lsn,
                SlotType::Physical => r.restart_lsn,
            };
            if current.is_none_or(|c| c < target) && !r.active {
                plan.advance.push((r.name.clone(), target));
            }
            continue;
        }
        if r.active || downstream.contains(&r.name) {
            continue;
        }
        let retired = key
            .permanent
            .get(&r.name)
            .is_some_and(|s| s.retired_since.is_some());
        let configured = cfg
            .slots
            .get(&r.name)
            .is_some_and(|s| !(native_sync && s.kind == SlotType::Logical));
        if retired || configured {
            plan.drop.push((
                r.name.clone(),
                if retired {
                    "permanent slot no longer in the dynamic config".into()
                } else {
                    "this member may not become leader (nofailover): it keeps no copy".into()
                },
            ));
        } else if key.members.contains_key(&r.name) && !cfg.slots.contains_key(&r.name) {
            plan.drop.push((
                r.name.clone(),
                "a member slot no member streams through from here (left from when this member led, or from a member that cascaded from it)".into(),
            ));
        }
    }
    plan
}

#[cfg(test)]
mod tests;
