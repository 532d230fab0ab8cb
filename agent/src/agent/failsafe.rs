//! Failsafe mode (issue 15 item 4), the shell's part: the leader's round of `Failsafe` calls
//! when etcd is unreachable and the deadline arithmetic (rule 2 as amended for failsafe
//! mode), the `failsafe` key, what the loop tells decide, and the gate before taking the
//! leader key after accepting another leader.

use std::time::{Duration, SystemTime};

use anyhow::{bail, Result};
use tokio::time::Instant;

use super::Agent;
use crate::board::{FailsafeGate, FailsafeRoundReport};
use crate::dcs::model::{ClusterView, FailsafeKey};
use crate::ha::failsafe::{eligible, members_to_ask};
use crate::ha::{lease_safety_margin, FailsafeRound, FailsafeView, PgStatus};

/// How long a leader waits for the members' answers: a quarter of the TTL, between 1 and
/// 3 s, so a round fits in a loop and leaves the lease's margin alone.
fn round_timeout(ttl: Duration) -> Duration {
    (ttl / 4).clamp(Duration::from_secs(1), Duration::from_secs(3))
}

impl Agent {
    /// What decide sees of failsafe mode this cycle; runs the leader's round when etcd could
    /// not be read (`cluster` is `None`) while this member holds the leader lease.
    pub(super) async fn observe_failsafe(
        &mut self,
        cluster: Option<&ClusterView>,
        status: Option<&PgStatus>,
    ) -> FailsafeView {
        let mode = self.ha_config().dcs.failsafe_mode;
        self.board.set_failsafe_mode(mode);
        if mode && self.cfg.api.auth_token.is_none() && self.cfg.api.auth_token_file.is_none() {
            let w = "failsafe_mode is on but this member has no api.auth_token: Failsafe calls carry the token, so it can neither ask nor accept, and a leader demotes on an etcd outage as without failsafe mode".to_string();
            if self.warned_once.insert(w.clone()) {
                tracing::warn!("{w}");
            }
        }
        let now = Instant::now();
        // Back on a lease (renewed, or the key taken back): the extension has done its job.
        if cluster.is_some() && self.leader_lease.is_some() && self.failsafe_until.take().is_some()
        {
            tracing::info!(
                reason = "etcd answers again and I hold the leader key with a live lease: failsafe mode ends",
                "decision"
            );
        }
        if self.failsafe_until.is_some_and(|u| now >= u) {
            self.failsafe_until = None;
        }
        // An acceptance lives in memory only: an agent that restarted may have accepted a
        // leader that is still writable on its extension. While the failsafe key names
        // another leader, hold back as if it had, a ttl from this agent's start.
        if mode && self.board.failsafe().accepted.is_none() {
            let ttl = self.ha_config().dcs.ttl();
            let hold_until = self.started_at + ttl;
            if let Some(key) = cluster.and_then(|v| v.failsafe.as_ref()) {
                if key.leader != self.cfg.name && now < hold_until {
                    tracing::info!(
                        leader = %key.leader,
                        reason = "this agent started less than a ttl ago and may have accepted that leader in failsafe mode before: not racing for the leader key until a ttl after the start",
                        "decision"
                    );
                    self.board
                        .set_failsafe_accepted(crate::board::FailsafeAcceptance {
                            leader: key.leader.clone(),
                            at: self.started_at,
                            at_wall: SystemTime::now(),
                            hold_until,
                            timeline: 0,
                            wal_lsn: String::new(),
                        });
                }
            }
        }
        let round = match (cluster, &self.leader_lease) {
            (None, Some(_)) if mode => Some(self.failsafe_round(status).await),
            _ => None,
        };
        self.board.set_failsafe_leading_until(self.failsafe_until);
        FailsafeView {
            round,
            leading_until: self.failsafe_until,
            accepted: self
                .board
                .failsafe()
                .accepted
                .map(|a| (a.leader, a.hold_until)),
        }
    }

    /// One round: ask every member of the last view (and of the `failsafe` key) in parallel.
    /// If all accept, the write deadline becomes (when the round started) + ttl - margin,
    /// when that is later than the current one, and the watchdog gets it (rule 3): each
    /// member that accepted does not race before its own receipt of the call + ttl, which is
    /// after the round started. Any refusal or silence: no extension, the deadline stays.
    async fn failsafe_round(&mut self, status: Option<&PgStatus>) -> FailsafeRound {
        let started = Instant::now();
        let started_wall = SystemTime::now();
        let me = self.cfg.name.clone();
        let ttl = self
            .leader_lease
            .as_ref()
            .map(|l| l.ttl)
            .unwrap_or_else(|| self.ha_config().dcs.ttl());
        let mut round = FailsafeRound::default();
        let view = match &self.last_view {
            None => Err("I have not read the cluster from etcd since I started".to_string()),
            Some(v) => eligible(v, &me).map(|()| v.clone()),
        };
        let view = view.and_then(|v| match self.leader_valid_until {
            Some(d) if started < d => Ok(v),
            _ => Err("my lease deadline has passed".to_string()),
        });
        let view = match view {
            Ok(v) => v,
            Err(why) => {
                round.not_eligible = Some(why.clone());
                tracing::warn!(reason = %why, "failsafe mode: not asking the members");
                self.board.set_failsafe_round(FailsafeRoundReport {
                    started,
                    started_wall,
                    answers: vec![],
                    not_eligible: Some(why),
                    extended_to: None,
                });
                return round;
            }
        };
        let sysid = view.system_identifier().unwrap_or_default().to_string();
        let timeline = status
            .and_then(|s| s.timeline)
            .or(self.known_timeline)
            .unwrap_or(0);
        let wal_lsn = status
            .and_then(|s| s.wal_lsn)
            .map(|l| l.to_string())
            .unwrap_or_default();
        let timeout = round_timeout(ttl);
        let mut opts = self.peer_client.clone();
        opts.timeout = timeout;
        let mut asks = tokio::task::JoinSet::new();
        for (name, address) in members_to_ask(&view, &me) {
            round.asked.push(name.clone());
            let req = pgherd_proto::v1::FailsafeRequest {
                member: name.clone(),
                leader: me.clone(),
                cluster: self.cfg.cluster.clone(),
                system_identifier: sysid.clone(),
                timeline,
                wal_lsn: wal_lsn.clone(),
                ttl_ms: ttl.as_millis() as u64,
                answer_within_ms: timeout.as_millis() as u64,
            };
            let opts = opts.clone();
            asks.spawn(async move {
                let answer = crate::api::failsafe::ask(&name, &address, req, &opts).await;
                (name, answer)
            });
        }
        let mut answers = Vec::new();
        while let Some(joined) = asks.join_next().await {
            match joined {
                Ok((name, Ok(()))) => answers.push((name, Ok(()))),
                Ok((name, Err(e))) => {
                    round.refused.push((name.clone(), e.to_string()));
                    answers.push((name, Err(e.to_string())));
                }
                Err(e) => round
                    .refused
                    .push(("?".into(), format!("the call's task failed: {e}"))),
            }
        }
        answers.sort_by(|a, b| a.0.cmp(&b.0));
        round.refused.sort();
        let mut extended_to = None;
        if round.all_accepted() {
            let until = started + ttl.saturating_sub(lease_safety_margin(ttl));
            if self.leader_valid_until.is_none_or(|d| until > d) {
                self.leader_valid_until = Some(until);
            }
            self.failsafe_until = Some(self.failsafe_until.map_or(until, |u| u.max(until)));
            extended_to = Some(until);
            // Rule 3: the watchdog fences at whatever deadline the agent last gave it.
            self.arm_watchdog();
            tracing::info!(
                members = %round.asked.join(","),
                lsn = %wal_lsn,
                writable_for_s = until.saturating_duration_since(Instant::now()).as_secs_f64(),
                reason = "failsafe mode: etcd is unreachable and every member accepts me as the leader; staying writable",
                "decision"
            );
        } else {
            tracing::warn!(
                reason = %round.describe(),
                "failsafe mode: no extension; demoting at my lease deadline unless etcd answers"
            );
        }
        self.board.set_failsafe_round(FailsafeRoundReport {
            started,
            started_wall,
            answers,
            not_eligible: None,
            extended_to,
        });
        round
    }

    /// `SetFailsafeKey`: writes (or deletes) the `failsafe` key while the leader key names me.
    pub(super) async fn set_failsafe_key(&mut self, key: Option<&FailsafeKey>) -> Result<()> {
        if !self.dcs.put_failsafe(key).await? {
            bail!("the leader key no longer names me: not writing the failsafe key");
        }
        match key {
            Some(k) => tracing::info!(
                members = %k.members.keys().cloned().collect::<Vec<_>>().join(","),
                "failsafe mode: wrote the failsafe key (the members I ask while etcd is unreachable)"
            ),
            None => tracing::info!("failsafe mode is off: removed the failsafe key"),
        }
        Ok(())
    }

    /// Taken before the leader key: refuses while a leader this member accepted in failsafe
    /// mode may still be writable, even if this cycle's decision predates the acceptance.
    /// The guard keeps the `Failsafe` handler from accepting until the acquisition is done.
    pub(super) async fn failsafe_gate(&self) -> Result<tokio::sync::OwnedMutexGuard<FailsafeGate>> {
        let gate = self.board.failsafe_gate().lock_owned().await;
        if let Some(a) = self.board.failsafe().accepted {
            let now = Instant::now();
            if a.leader != self.cfg.name && now < a.hold_until {
                bail!(
                    "refusing to take the leader key: I accepted {} as the leader in failsafe mode and it may be writable for {:.1} s more",
                    a.leader,
                    (a.hold_until - now).as_secs_f64()
                );
            }
        }
        Ok(gate)
    }

    /// The lease this agent leads with is gone: the `Failsafe` handler may accept again.
    pub(super) fn failsafe_gate_release(&self) {
        self.board.set_failsafe_leading(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_waits_a_quarter_of_the_ttl_between_one_and_three_seconds() {
        assert_eq!(
            round_timeout(Duration::from_secs(2)),
            Duration::from_secs(1)
        );
        assert_eq!(
            round_timeout(Duration::from_secs(6)),
            Duration::from_millis(1500)
        );
        assert_eq!(
            round_timeout(Duration::from_secs(30)),
            Duration::from_secs(3)
        );
    }
}
