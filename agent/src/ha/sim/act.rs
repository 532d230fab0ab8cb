//! What the agent's act side does with each action (`agent.rs`), step by step where the
//! agent takes several (promotion, handover): the agent may crash between any two steps.

use super::*;

/// Whether a switchover key says who took the leader key after the release (`taken_by`,
/// read through JSON so the simulation builds with and without that field).
fn taken(h: &Handover) -> bool {
    serde_json::to_value(h)
        .ok()
        .and_then(|v| v.get("taken_by").cloned())
        .is_some_and(|v| !v.is_null())
}

fn mark_taken(h: &Handover, name: &str) -> Handover {
    let mut v = serde_json::to_value(h).expect("a switchover key serialises");
    v["taken_by"] = serde_json::Value::String(name.to_string());
    serde_json::from_value(v).expect("a switchover key with taken_by")
}

impl World {
    /// The leader key names `name`.
    fn key_names(&self, name: &str) -> bool {
        self.dcs.leader.as_ref().is_some_and(|(l, _)| l == name)
    }

    /// A crash at a point inside a multi-step action (only while faults run).
    fn crash_point(&mut self, i: usize) -> Result<(), String> {
        if self.faults && self.rng.chance(15) && self.may_kill(i) {
            self.stats.mid_decision_faults += 1;
            self.kill(i);
            return Err("crashed".into());
        }
        Ok(())
    }

    /// Rule 1 at the last moment (`ensure_lease_valid`).
    fn ensure_lease(&self, i: usize, what: &str) -> Result<(), String> {
        match self.nodes[i].lease {
            Some((_, until)) if self.now < until => Ok(()),
            _ => Err(format!("refusing to {what}: no live leader lease")),
        }
    }

    fn cut(&self, i: usize) -> bool {
        self.nodes[i].cut_off_until.is_some_and(|t| self.now < t)
    }

    /// `drop_leader_lease`: forget and disarm, then revoke (which deletes a key attached to
    /// it) if etcd answers.
    fn drop_lease(&mut self, i: usize) {
        self.nodes[i].standbys_set = None;
        if let Some((id, _)) = self.nodes[i].lease.take() {
            self.arm(i);
            if !self.cut(i) {
                self.dcs.leases.remove(&id);
                if self.dcs.leader.as_ref().is_some_and(|(_, l)| *l == id) {
                    self.dcs.leader = None;
                    self.bump();
                }
            }
        }
    }

    /// `synchronous_standby_names` as the agent writes it into the configuration.
    /// (`Agent::cluster_params`: what this leader chose; before it chose, what the `sync`
    /// key it still leads promises; else the mode's default.)
    pub(super) fn standbys_param(&self, i: usize) -> sync::Standbys {
        let mode = self.cfg.synchronous_mode;
        let default = if mode != SynchronousMode::Off && self.cfg.synchronous_mode_strict {
            sync::Standbys::Any
        } else {
            sync::Standbys::None
        };
        let key = self
            .dcs
            .sync
            .as_ref()
            .filter(|k| k.leader == self.nodes[i].name && !k.members.is_empty());
        match (&self.nodes[i].standbys_set, key, mode) {
            (Some(s), _, _) => s.clone(),
            (None, _, SynchronousMode::Off) | (None, None, _) => default,
            (None, Some(k), SynchronousMode::On) => sync::Standbys::First(k.members.clone()),
            (None, Some(k), SynchronousMode::Quorum) => {
                sync::Standbys::Quorum(k.quorum.max(1), k.members.clone())
            }
        }
    }

    pub(super) fn act(&mut self, i: usize, a: &Action, obs: &Observation) -> Result<(), String> {
        match a {
            Action::StartPrimary => self.ensure_lease(i, "start PostgreSQL as the primary")?,
            Action::Promote => self.ensure_lease(i, "promote PostgreSQL")?,
            Action::SetSyncStandbys(_) => {
                self.ensure_lease(i, "change synchronous_standby_names")?
            }
            Action::EmptyDataDir => {
                let named = obs
                    .cluster
                    .as_ref()
                    .and_then(|v| v.leader_name())
                    .is_some_and(|l| l == self.nodes[i].name);
                if self.nodes[i].lease.is_some() || named {
                    return Err("refusing to empty the data directory of the leader".into());
                }
            }
            _ => {}
        }
        self.nodes[i].memory.acted(obs.now, a, &Outcome::Started);
        self.apply(i, a, obs)?;
        // `SetSyncStandbys` reports the position once the new list is in effect.
        let wal_lsn = match a {
            Action::SetSyncStandbys(_) => self.nodes[i].pg.data.as_ref().map(|d| d.lsn()),
            _ => obs.pg.status.as_ref().and_then(|s| s.wal_lsn),
        };
        self.nodes[i]
            .memory
            .acted(obs.now, a, &Outcome::Done { wal_lsn });
        Ok(())
    }

    fn apply(&mut self, i: usize, a: &Action, obs: &Observation) -> Result<(), String> {
        let now = self.now;
        let cut = self.cut(i);
        let name = self.nodes[i].name.clone();
        let unreachable = || Err::<(), String>("etcd is unreachable".into());
        match a {
            Action::AcquireLeader => {
                if cut {
                    return unreachable();
                }
                self.drop_lease(i);
                let id = self.dcs.next_lease;
                self.dcs.next_lease += 1;
                self.dcs.leases.insert(id, now + self.ttl());
                let held_by_me = self.dcs.leader.as_ref().is_some_and(|(l, _)| *l == name);
                // After a switchover's release the taker marks the switchover key in the
                // same transaction (issue 12 item 2), if this build's key has `taken_by`.
                let released = obs
                    .cluster
                    .as_ref()
                    .filter(|v| v.leader.is_none())
                    .and_then(|v| v.handover.clone())
                    .filter(|(h, _)| h.final_lsn.is_some() && !taken(h));
                let lost = match &released {
                    Some((_, rev)) => {
                        self.dcs.leader.is_some()
                            || self.dcs.handover.as_ref().map(|(_, r)| *r) != Some(*rev)
                    }
                    None => self.dcs.leader.is_some() && !held_by_me,
                };
                if lost {
                    self.dcs.leases.remove(&id);
                    return Ok(());
                }
                if let Some((h, _)) = released {
                    let rev = self.bump();
                    self.dcs.handover = Some((mark_taken(&h, &name), rev));
                }
                self.check_eligible(i, obs, held_by_me);
                self.dcs.leader = Some((name, id));
                self.bump();
                self.nodes[i].lease =
                    Some((id, now + self.ttl() - lease_safety_margin(self.ttl())));
            }
            Action::RenewLeader => {
                let Some((id, _)) = self.nodes[i].lease else {
                    return Ok(());
                };
                if cut {
                    return Err("cannot renew the leader lease: etcd is unreachable".into());
                }
                if !self.dcs.leases.contains_key(&id) {
                    self.nodes[i].lease = None;
                    return Err("my leader lease expired before I could renew it".into());
                }
                self.dcs.leases.insert(id, now + self.ttl());
                self.nodes[i].lease =
                    Some((id, now + self.ttl() - lease_safety_margin(self.ttl())));
            }
            Action::ReleaseLeader => {
                self.drop_lease(i);
                if cut {
                    return unreachable();
                }
                if self.dcs.leader.as_ref().is_some_and(|(l, _)| *l == name) {
                    self.dcs.leader = None;
                    self.bump();
                }
            }
            Action::StartPrimary => {
                let standbys = self.standbys_param(i);
                let n = &mut self.nodes[i];
                let d = n.pg.data.as_mut().ok_or("no data directory")?;
                // The primary's configuration has no standby.signal.
                d.standby = false;
                n.pg.running = true;
                n.pg.in_recovery = false;
                n.pg.conninfo = None;
                n.pg.standbys = standbys;
            }
            Action::StartStandby(up) => {
                self.nodes[i].standbys_set = None;
                let n = &mut self.nodes[i];
                let d = n.pg.data.as_mut().ok_or("no data directory")?;
                d.standby = true;
                n.pg.conninfo = up.as_ref().map(|u| u.name.clone());
                n.pg.running = true;
                n.pg.in_recovery = true;
            }
            Action::FollowUpstream(up) => {
                let n = &mut self.nodes[i];
                if !n.pg.running {
                    return Err("cannot reload: PostgreSQL is not running".into());
                }
                n.pg.conninfo = Some(up.name.clone());
            }
            Action::Promote => self.promote(i, obs)?,
            Action::StopPostgres => {
                self.nodes[i].standbys_set = None;
                self.nodes[i].pg.running = false;
            }
            Action::LeaderHousekeeping => {
                if cut {
                    return unreachable();
                }
                if let Some(lsn) = obs.pg.status.as_ref().and_then(|s| s.wal_lsn) {
                    self.dcs.optime = Some(lsn);
                }
            }
            Action::HandOver { to } => self.hand_over(i, to, obs)?,
            Action::DeleteHandover => {
                if cut {
                    return unreachable();
                }
                let seen = obs
                    .cluster
                    .as_ref()
                    .and_then(|v| v.handover.as_ref())
                    .map(|(_, r)| *r);
                if seen.is_some() && self.dcs.handover.as_ref().map(|(_, r)| *r) == seen {
                    self.dcs.handover = None;
                    self.bump();
                }
            }
            Action::ApplyConfig => {}
            // The simulation runs with failsafe mode off: its etcd has no `failsafe` key.
            Action::SetFailsafeKey(_) => {}
            Action::SetSyncKey(k) => {
                if cut {
                    return unreachable();
                }
                if !self.key_names(&name) {
                    return Err(
                        "cannot write the sync key: the leader key no longer names me".into(),
                    );
                }
                // Falling back to asynchronous replication (not strict): the leader empties
                // its own key, and from then on synchronous mode promises nothing about
                // what was acknowledged before.
                let fallback = !self.cfg.synchronous_mode_strict
                    && k.members.is_empty()
                    && self
                        .dcs
                        .sync
                        .as_ref()
                        .is_some_and(|old| old.leader == name && !old.members.is_empty());
                if fallback {
                    for ack in &mut self.acked {
                        ack.protected = false;
                    }
                }
                self.dcs.sync = Some(k.clone());
                self.bump();
            }
            Action::SetSyncStandbys(s) => {
                self.nodes[i].standbys_set = Some(s.clone());
                let n = &mut self.nodes[i];
                if !n.pg.running {
                    return Err("cannot reload: PostgreSQL is not running".into());
                }
                n.pg.standbys = s.clone();
            }
            Action::StartJob(kind) => self.start_job(i, kind),
            Action::FinishRestore { id, error } => self.finish_restore(i, id, error.is_none())?,
            // `Agent::abandon_restore`: end another member's unfinished restore as failed.
            Action::AbandonRestore { id } => {
                if cut {
                    return unreachable();
                }
                let Some((mut key, _)) = self
                    .dcs
                    .restore
                    .clone()
                    .filter(|(k, _)| k.id == *id && k.phase == RestorePhase::Restoring)
                else {
                    return Ok(());
                };
                if !self.key_names(&name) {
                    return Err("cannot end the restore: the leader key no longer names me".into());
                }
                key.phase = RestorePhase::Failed;
                let rev = self.bump();
                self.dcs.restore = Some((key, rev));
                if let Some(run) = self.restores.get_mut(id) {
                    run.finished = true;
                }
            }
            Action::EmptyDataDir => {
                let n = &mut self.nodes[i];
                n.pg.running = false;
                n.pg.data = None;
            }
            other => {
                panic!("the simulation does not model {other:?}: add it to agent/src/ha/sim/act.rs")
            }
        }
        Ok(())
    }

    /// Rule 4: only eligible members race for a vacant key.
    fn check_eligible(&self, i: usize, obs: &Observation, held_by_me: bool) {
        let n = &self.nodes[i];
        assert!(
            !n.tags.nofailover,
            "{}: {} is tagged nofailover but took the key",
            self.label, n.name
        );
        let view = obs.cluster.as_ref();
        let special = view.is_some_and(|v| {
            v.handover.is_some()
                || v.restore
                    .as_ref()
                    .is_some_and(|(r, _)| r.phase == RestorePhase::Restoring)
                || (self.cfg.synchronous_mode != SynchronousMode::Off
                    && v.sync.as_ref().is_some_and(|k| k.members.contains(&n.name)))
        });
        if let (Some(optime), false, false) = (self.dcs.optime, held_by_me, special) {
            let lag = optime.bytes_after(n.pg.data.as_ref().map_or(Lsn(0), |d| d.lsn()));
            assert!(
                lag <= self.cfg.maximum_lag_on_failover,
                "{}: {} took the key {lag} bytes behind the leader's last position",
                self.label,
                n.name
            );
        }
    }

    /// `Agent::promote`: claim the sync key, promote, then end the handover that made us
    /// leader; a crash may come between any two.
    fn promote(&mut self, i: usize, obs: &Observation) -> Result<(), String> {
        let name = self.nodes[i].name.clone();
        if self.cfg.synchronous_mode != SynchronousMode::Off {
            if self.cut(i) || !self.key_names(&name) {
                return Err("cannot claim the sync key before promoting".into());
            }
            self.dcs.sync = Some(SyncKey {
                leader: name.clone(),
                members: vec![],
                quorum: 0,
            });
            self.bump();
            self.crash_point(i)?;
        }
        self.nodes[i].standbys_set = None;
        let standbys = self.standbys_param(i);
        let timeline = self.dcs.max_timeline + 1;
        let record = self.next_id;
        let n = &mut self.nodes[i];
        if !n.pg.running || !n.pg.in_recovery {
            return Err("PostgreSQL is not a running standby".into());
        }
        let d = n.pg.data.as_mut().ok_or("no data directory")?;
        d.promote(timeline, record);
        n.pg.in_recovery = false;
        n.pg.conninfo = None;
        n.pg.standbys = standbys;
        self.next_id += 1;
        self.dcs.max_timeline = timeline;
        self.stats.promotions += 1;
        self.crash_point(i)?;
        // The handover that made us leader is done.
        if let Some((h, rev)) = obs.cluster.as_ref().and_then(|v| v.handover.clone()) {
            let unchanged = self.dcs.handover.as_ref().map(|(_, r)| *r) == Some(rev);
            if h.to.as_deref() == Some(name.as_str()) && !self.cut(i) && unchanged {
                self.dcs.handover = None;
                self.bump();
            }
        }
        Ok(())
    }

    /// `Agent::hand_over`: stop cleanly (the walsenders send everything, the shutdown
    /// checkpoint last), publish the checkpoint as the final position, release the key.
    fn hand_over(&mut self, i: usize, to: &str, obs: &Observation) -> Result<(), String> {
        let Some((handover, rev)) = obs.cluster.as_ref().and_then(|v| v.handover.clone()) else {
            return Ok(());
        };
        let record = self.next_id;
        self.next_id += 1;
        let final_index = {
            let d = self.nodes[i].pg.data.as_mut().ok_or("no data directory")?;
            d.wal.push(record);
            d.wal.len() - 1
        };
        for s in 0..self.nodes.len() {
            if self.streams_from(s) == Some(i) {
                self.stream(s, i, usize::MAX)?;
            }
        }
        self.nodes[i].pg.running = false;
        self.crash_point(i)?;
        if self.cut(i) {
            return Err("etcd is unreachable".into());
        }
        if self.dcs.handover.as_ref().map(|(_, r)| *r) != Some(rev) {
            return Err("the switchover key changed under us; staying the leader".into());
        }
        let done = Handover {
            to: Some(to.to_string()),
            from: Some(self.nodes[i].name.clone()),
            final_lsn: Some(pg::record_lsn(final_index)),
            handed_over_at: Some(self.rfc3339()),
            ..handover
        };
        let rev = self.bump();
        self.dcs.handover = Some((done, rev));
        self.crash_point(i)?;
        self.drop_lease(i);
        let name = self.nodes[i].name.clone();
        if self.dcs.leader.as_ref().is_some_and(|(l, _)| *l == name) {
            self.dcs.leader = None;
            self.bump();
        }
        Ok(())
    }

    fn start_job(&mut self, i: usize, kind: &JobKind) {
        let (lo, hi) = match kind {
            JobKind::Clone { .. } => (10, 30),
            JobKind::Rewind { .. } => (3, 10),
            JobKind::Restore { id } => {
                let live = self.nodes[i]
                    .lease
                    .is_some_and(|(_, until)| self.now < until);
                if !live {
                    // `run_restore` checks the lease before it starts (a decision resumed
                    // after a freeze may ask for it late).
                    self.nodes[i].finished = Some(JobView::Failed(
                        kind.clone(),
                        "refusing to start the restore: no live leader lease".into(),
                    ));
                    return;
                }
                // `run_restore` recognises its own promoted result (the agent stopped
                // before the key recorded it) and runs it instead of restoring again.
                let promoted_here = self.nodes[i]
                    .pg
                    .data
                    .as_ref()
                    .is_some_and(|d| d.restored_by.as_deref() == Some(id.as_str()));
                if promoted_here {
                    let n = &mut self.nodes[i];
                    n.pg.running = true;
                    n.pg.in_recovery = false;
                    n.pg.conninfo = None;
                    n.finished = Some(JobView::Succeeded(kind.clone()));
                    return;
                }
                // A restore whose job started here before and did not end with its promoted
                // result (interrupted, or failed before its end was recorded) is ended as
                // failed, never run again over what may have been written since.
                if self.nodes[i].pg.restore_attempted.as_deref() == Some(id.as_str()) {
                    self.nodes[i].finished = Some(JobView::Failed(
                        kind.clone(),
                        format!("restore {id} was started here before and did not finish"),
                    ));
                    return;
                }
                self.nodes[i].pg.restore_attempted = Some(id.clone());
                let seed = self.label.clone();
                let run = self.restores.entry(id.clone()).or_default();
                let why = if run.finished {
                    Some("it finished")
                } else if run.others_wrote {
                    Some("another member accepted writes since it was requested")
                } else if run.starts > 0 && run.written_since {
                    Some("commits were written since its last start")
                } else {
                    None
                };
                if let Some(why) = why {
                    panic!(
                        "{seed}: restore {id} runs on {} after {why} (rule 7: a restore never runs again against newer data)",
                        self.nodes[i].name
                    );
                }
                run.starts += 1;
                run.written_since = false;
                // The restore stops PostgreSQL first.
                self.nodes[i].pg.running = false;
                (20, 80)
            }
            JobKind::Bootstrap => panic!("the simulation does not model bootstrap"),
        };
        let done_at = self.now + STEP * self.rng.range(lo, hi) as u32;
        let fails = self.rng.chance(100);
        self.nodes[i].job = Some(Job {
            kind: kind.clone(),
            done_at,
            fails,
        });
    }

    /// A job that has run its time ends (the agent's task finishes), with its effect.
    pub(super) fn finish_job(&mut self, i: usize) {
        let Some(job) = self.nodes[i].job.clone() else {
            return;
        };
        if self.now < job.done_at {
            return;
        }
        self.nodes[i].job = None;
        let result = match &job.kind {
            JobKind::Clone { from, .. } | JobKind::Rewind { from } => {
                // A rewind fails only when its source does not answer (`SourceDown`, not
                // remembered): a rewind that fails for good is remembered by design and
                // leaves the member down.
                let fails = job.fails && matches!(job.kind, JobKind::Clone { .. });
                let answers = |s: usize| {
                    self.nodes[s].pg.running
                        || (matches!(job.kind, JobKind::Rewind { .. })
                            && !gate!(REWIND_FAILS_WHEN_SOURCE_DOWN))
                };
                let src = self
                    .index(from)
                    .filter(|&s| answers(s) && !fails)
                    .and_then(|s| self.nodes[s].pg.data.clone());
                match src {
                    Some(mut d) if !self.nodes[i].pg.running => {
                        d.standby = true;
                        self.nodes[i].pg.data = Some(d);
                        Ok(())
                    }
                    _ => Err(format!("{from} did not answer")),
                }
            }
            JobKind::Restore { id } => {
                // The job promotes only under a live lease (`LeaseCheck`): recovery pauses
                // at the target, or a `--latest` replay runs as a standby, until the job
                // has checked it.
                let live = self.nodes[i]
                    .lease
                    .is_some_and(|(_, until)| self.now < until);
                let name = self.nodes[i].name.clone();
                let sync_on = self.cfg.synchronous_mode != SynchronousMode::Off;
                if job.fails {
                    Err("recovery did not reach the target".to_string())
                } else if !live {
                    Err(format!(
                        "refusing to promote the data of restore {id}: no live leader lease"
                    ))
                } else if sync_on && !self.key_names(&name) {
                    // `SyncClaim`: the job writes `{me, []}` (leader key checked) before it
                    // promotes; the members the old key names hold data from before it.
                    Err("cannot claim the sync key: the leader key no longer names me".into())
                } else {
                    if sync_on {
                        self.dcs.sync = Some(SyncKey {
                            leader: name.clone(),
                            members: vec![],
                            quorum: 0,
                        });
                        self.bump();
                    }
                    let cut = self.restores.get(id).map_or(1, |r| r.cut);
                    let timeline = self.dcs.max_timeline + 1;
                    let record = self.next_id;
                    self.next_id += 1;
                    self.dcs.max_timeline = timeline;
                    let n = &mut self.nodes[i];
                    let d =
                        n.pg.data
                            .as_mut()
                            .expect("a restore keeps a data directory");
                    d.truncate(cut);
                    d.promote(timeline, record);
                    d.restored_by = Some(id.clone());
                    // The restored PostgreSQL runs as a primary with
                    // synchronous_standby_names '' (no standby on its timeline yet).
                    n.pg.running = true;
                    n.pg.in_recovery = false;
                    n.pg.conninfo = None;
                    n.pg.standbys = sync::Standbys::None;
                    // What the restore removed was removed on purpose.
                    self.acked.clear();
                    Ok(())
                }
            }
            JobKind::Bootstrap => unreachable!("never started"),
        };
        if let JobKind::Restore { id } = &job.kind {
            if let Some(run) = self.restores.get_mut(id) {
                run.finished = true;
            }
        }
        self.nodes[i].finished = Some(match result {
            Ok(()) => JobView::Succeeded(job.kind),
            Err(e) if matches!(job.kind, JobKind::Rewind { .. }) => {
                JobView::SourceDown(job.kind, e)
            }
            Err(e) => JobView::Failed(job.kind, e),
        });
    }

    /// `Agent::finish_restore`: record the end in the `restore` key (leader key and
    /// revision checked).
    fn finish_restore(&mut self, i: usize, id: &str, ok: bool) -> Result<(), String> {
        if self.cut(i) {
            return Err("etcd is unreachable".into());
        }
        let name = self.nodes[i].name.clone();
        let Some((mut key, _)) = self.dcs.restore.clone().filter(|(k, _)| k.id == id) else {
            return Ok(());
        };
        let timeline = if ok {
            let n = &self.nodes[i];
            // From the running server, or from pg_control while it is down.
            let tl =
                n.pg.data
                    .as_ref()
                    .map(|d| d.timeline)
                    .ok_or("the restored data directory is gone")?;
            Some(tl)
        } else {
            None
        };
        if !self.key_names(&name) {
            return Err("the restore key changed meanwhile".into());
        }
        key.phase = if ok {
            RestorePhase::Done
        } else {
            RestorePhase::Failed
        };
        key.timeline = timeline;
        let rev = self.bump();
        self.dcs.restore = Some((key, rev));
        Ok(())
    }
}
