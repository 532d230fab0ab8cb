//! Carrying out the slot plans of `crate::slots`: the leader's (member and permanent slots,
//! the `slots` key) and a replica's (copies of the permanent slots when it may lead).

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result};
use pgherd_config::SlotType;

use crate::agent::Agent;
use crate::dcs::model::{dynamic_config, ClusterView, MemberInfo};
use crate::ha::Observation;
use crate::lsn::Lsn;
use crate::postgres::Mode;
use crate::slots::{self, Owner, Record, SlotRow};

/// PostgreSQL 17 synchronises `failover` logical slots to standbys itself.
pub(crate) const NATIVE_SLOT_SYNC: u32 = 170000;

/// The `slots` key as `view` holds it.
pub(crate) fn record(view: &ClusterView) -> Record {
    if view.unreadable("slots").is_some() {
        Record::Unreadable
    } else {
        match &view.slots {
            Some(k) => Record::Readable(k.clone()),
            None => Record::Absent,
        }
    }
}

impl Agent {
    /// Logs a slot warning once while it stays the same.
    fn warn_slot_once(&mut self, what: String) {
        if self.warned_once.insert(what.clone()) {
            tracing::warn!("{what}");
        }
    }

    /// The leader's slots: a slot for every other member (kept `member_slots_ttl` after it
    /// left), the permanent slots, the `slots` key written before a slot is created and
    /// after one is dropped. Foreign slots are never touched.
    pub(super) async fn leader_slots(&mut self, view: &ClusterView) -> Result<()> {
        let dcs_cfg = dynamic_config(&self.cfg, Some(view));
        let rows = self.pg.slots().await?;
        let members: BTreeSet<String> = view.members.keys().cloned().collect();
        let record = record(view);
        let plan = slots::plan_leader(
            &self.cfg.name,
            &members,
            &rows,
            &record,
            &dcs_cfg,
            chrono::Utc::now(),
        );
        for w in plan.warnings.clone() {
            self.warn_slot_once(w);
        }
        for e in &plan.errors {
            if self.warned_once.insert(e.clone()) {
                tracing::error!("{e}");
            }
        }
        if let Some(key) = &plan.record_before {
            if !self.dcs.put_slots(key).await? {
                anyhow::bail!("the leader key no longer names this member: slots left as they are");
            }
        }
        let failover = self.pg.major().version_num() >= NATIVE_SLOT_SYNC;
        for c in &plan.create {
            // A standby leader is in recovery, where PostgreSQL creates no logical slot: the
            // permanent logical slots come with promote-cluster.
            if dcs_cfg.standby_cluster.is_some() && c.kind != pgherd_config::SlotType::Physical {
                self.warn_slot_once(format!(
                    "logical permanent slot {} is not created while this is a standby cluster; promote-cluster creates it",
                    c.name
                ));
                continue;
            }
            self.pg.create_slot(c, failover).await.with_context(|| {
                format!("cannot create replication slot {} ({})", c.name, c.why)
            })?;
            tracing::info!(slot = %c.name, kind = c.kind.as_str(), reason = %c.why, "created replication slot");
        }
        for (name, why) in &plan.drop {
            self.pg.drop_slot(name).await?;
            tracing::info!(slot = %name, reason = %why, "dropped replication slot");
        }
        if let Some(key) = &plan.record_after {
            self.dcs.put_slots(key).await?;
        }
        // The slots of members streaming from another replica (not in use here).
        let me = self.cfg.name.clone();
        if let Some((Some(current), Some(timeline))) =
            view.members.get(&me).map(|m| (m.wal_lsn, m.timeline))
        {
            let cascading =
                |m: &MemberInfo| m.tags.replicatefrom.as_deref().is_some_and(|f| f != me);
            // Not the slots just dropped.
            let rows: Vec<SlotRow> = rows
                .into_iter()
                .filter(|r| !plan.drop.iter().any(|(n, _)| n == &r.name))
                .collect();
            self.advance_cascaded(view, &rows, cascading, current, timeline)
                .await;
        }
        self.post_slots(view, &dcs_cfg).await;
        Ok(())
    }

    /// Moves this member's unused slots of the members `whose` says to where those members
    /// report they replayed on `timeline`, never past `current` (see
    /// [`slots::advance_cascaded`]).
    async fn advance_cascaded(
        &mut self,
        view: &ClusterView,
        rows: &[SlotRow],
        whose: impl Fn(&MemberInfo) -> bool,
        current: Lsn,
        timeline: u32,
    ) {
        let me = self.cfg.name.as_str();
        let positions: BTreeMap<String, Lsn> = view
            .members
            .values()
            .filter(|m| m.name != me && whose(m) && m.timeline == Some(timeline))
            .filter_map(|m| Some((m.name.clone(), m.replay_lsn?)))
            .collect();
        let dcs_cfg = dynamic_config(&self.cfg, Some(view));
        let record = record(view);
        for (name, to) in slots::advance_cascaded(rows, &positions, current, &record, &dcs_cfg) {
            let Some(row) = rows.iter().find(|r| r.name == name) else {
                continue;
            };
            match self.pg.advance_slot(row, to).await {
                Ok(_) => {
                    tracing::debug!(slot = %name, to = %to, "advanced the slot of a member streaming from elsewhere to its replay position")
                }
                Err(e) => {
                    self.warn_slot_once(format!("cannot advance replication slot {name}: {e:#}"))
                }
            }
        }
    }

    /// A replica's slots: copies of the permanent slots when it may become leader, kept at
    /// the leader's position (never past its own replay); pgherd's slots it must not hold
    /// dropped. A logical slot copied from the leader is loaded by a restart of this
    /// standby (PostgreSQL before 17 reads slots only at start).
    pub(in crate::agent) async fn replica_slots(&mut self, obs: &Observation) -> Result<()> {
        let Some(view) = &obs.cluster else {
            return Ok(());
        };
        let Some(status) = obs.pg.status.as_ref().filter(|s| s.in_recovery) else {
            return Ok(());
        };
        let dcs_cfg = dynamic_config(&self.cfg, Some(view));
        let record = record(view);
        let may_lead = !self.cfg.tags.nofailover;
        let native = self.pg.major().version_num() >= NATIVE_SLOT_SYNC;
        let rows = self.pg.slots().await?;
        let me = self.cfg.name.clone();
        let me = me.as_str();
        let downstream = slots::downstream_of(me, view);
        let plan = slots::plan_replica(
            may_lead,
            &rows,
            &record,
            &dcs_cfg,
            status.replay_lsn,
            native,
            &downstream,
        );
        for name in &plan.create {
            let c = slots::Create {
                name: name.clone(),
                kind: SlotType::Physical,
                database: None,
                plugin: None,
                why: if downstream.contains(name) {
                    format!("member {name} streams from me (replicatefrom)")
                } else {
                    "a copy of a permanent slot on a member that may become leader".into()
                },
            };
            self.pg.create_slot(&c, false).await?;
            tracing::info!(slot = %name, reason = %c.why, "created replication slot");
        }
        for (name, to) in &plan.advance {
            let Some(row) = rows.iter().find(|r| &r.name == name) else {
                continue;
            };
            match self.pg.advance_slot(row, *to).await {
                Ok(end) => {
                    tracing::debug!(slot = %name, to = %to, end = ?end, "advanced replication slot to the leader's position")
                }
                Err(e) => {
                    self.warn_slot_once(format!("cannot advance replication slot {name}: {e:#}"))
                }
            }
        }
        for (name, why) in &plan.drop {
            self.pg.drop_slot(name).await?;
            tracing::info!(slot = %name, reason = %why, "dropped replication slot");
        }
        if !plan.copy.is_empty() {
            self.copy_logical_slots(view, &plan.copy).await?;
        }
        // A downstream member's slot here while it streams from the leader instead.
        if let (Some(replay), Some(timeline)) = (status.replay_lsn, status.timeline) {
            let rows = self.pg.slots().await?;
            let mine = |m: &MemberInfo| downstream.contains(&m.name);
            self.advance_cascaded(view, &rows, mine, replay, timeline)
                .await;
        }
        self.post_slots(view, &dcs_cfg).await;
        Ok(())
    }

    /// Copies logical slots from the leader (their on-disk state), then restarts this
    /// standby so PostgreSQL loads them.
    async fn copy_logical_slots(&mut self, view: &ClusterView, names: &[String]) -> Result<()> {
        let Some(leader) = view.leader_member() else {
            return Ok(());
        };
        let mut copied = Vec::new();
        for name in names {
            match self
                .pg
                .leader_slot_state(&leader.host, leader.port, name)
                .await?
            {
                Some(state) => {
                    self.pg.install_slot_state(name, &state)?;
                    copied.push(name.clone());
                }
                None => self.warn_slot_once(format!(
                    "logical slot {name} is not copied yet: the leader has no such slot"
                )),
            }
        }
        if copied.is_empty() {
            return Ok(());
        }
        tracing::info!(
            slots = %copied.join(", "),
            reason = "logical slots copied from the leader are loaded only at start",
            "decision: restarting this standby"
        );
        let mode = self.current_mode(true, Some(view));
        debug_assert!(mode != Mode::Primary);
        self.pg.stop().await?;
        self.pg.write_config(&mode, &self.cluster_params())?;
        self.pg.start_and_wait().await?;
        self.callbacks.fire(
            crate::callbacks::Event::Restart,
            crate::callbacks::PgRole::Replica,
        );
        Ok(())
    }

    /// Posts this member's slots with their owners for the API and `/metrics`.
    async fn post_slots(&self, view: &ClusterView, dcs_cfg: &pgherd_config::DynamicConfig) {
        let rows: Vec<SlotRow> = match self.pg.slots().await {
            Ok(r) => r,
            Err(_) => return,
        };
        let record = record(view);
        let listed = rows
            .into_iter()
            .map(|r| {
                let owner: Owner = slots::owner(&r, &record, dcs_cfg);
                (r, owner)
            })
            .collect();
        self.board.set_slots(listed);
    }
}
