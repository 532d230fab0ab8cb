//! The leases: this member's own (its member key lives under it) and, while it leads, the
//! leader lease with its safe deadline (rule 2), renewals during long steps, and the
//! watchdog armed with that deadline (rule 3).

use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use tokio::time::Instant;

use super::Agent;
use crate::ha::lease_safety_margin;

impl Agent {
    /// Rule 3: while PostgreSQL may accept writes it must be fenced when the lease's safe
    /// deadline passes without a renewal, whatever happens to this process: armed with the
    /// lease's deadline while we hold it, and with the last deadline after the lease is gone
    /// until that postmaster has stopped (`watchdog::command`).
    pub(super) fn arm_watchdog(&mut self) {
        self.lease_deadline
            .send_replace(self.leader_lease.as_ref().and(self.leader_valid_until));
        let Some(wd) = self.watchdog.as_mut() else {
            return;
        };
        let lease = match (&self.leader_lease, self.leader_valid_until) {
            (Some(l), Some(until)) => Some((l.id, until)),
            _ => None,
        };
        wd.update(lease, self.pg.pid());
    }

    /// Keeps this member's own lease alive; a new one (and the member key published again)
    /// when it expired.
    pub(super) async fn keep_member_lease(&mut self, ttl: Duration) {
        if let Some(lease) = &mut self.member_lease {
            match lease.refresh().await {
                Ok(Some(_)) => return,
                Ok(None) => tracing::warn!("my member lease expired; publishing again"),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot renew my member lease");
                    return;
                }
            }
            self.member_lease = None;
            self.published = None;
        }
        match self.dcs.grant_lease(ttl).await {
            Ok(l) => {
                self.member_lease = Some(l);
                self.published = None;
            }
            Err(e) => tracing::warn!(error = %e, "cannot create my member lease"),
        }
    }

    /// Forgets (and revokes) the leader lease. A PostgreSQL that still runs as the primary
    /// stays guarded by the watchdog with the old deadline until it has stopped (rule 3).
    pub(super) async fn drop_leader_lease(&mut self) {
        self.leader_valid_until = None;
        self.standbys_set = None;
        if let Some(lease) = self.leader_lease.take() {
            self.arm_watchdog();
            self.failsafe_gate_release();
            crate::failpoint::hit("leader-lease-dropped");
            if let Err(e) = self.dcs.revoke_lease(lease.id).await {
                tracing::debug!(error = %e, "cannot revoke my old leader lease; it will expire");
            }
        }
    }

    /// Grants a fresh leader lease; returns the instant the grant was sent.
    pub(super) async fn fresh_leader_lease(&mut self) -> Result<Instant> {
        self.drop_leader_lease().await;
        let ttl = self.ha_config().dcs.ttl();
        let sent = Instant::now();
        self.leader_lease = Some(self.dcs.grant_lease(ttl).await?);
        Ok(sent)
    }

    /// Whether we hold the lease and its last renewal was sent less than a third of the TTL
    /// ago (at the start of this cycle, usually).
    pub(super) fn renewed_recently(&self) -> bool {
        let ttl = self.ha_config().dcs.ttl();
        self.leader_lease.is_some()
            && self
                .last_renewal_sent
                .is_some_and(|sent| sent.elapsed() < ttl / 3)
    }

    /// Rule 2: the lease is safe until `sent + ttl - margin`, `sent` being when the request
    /// that (re)started its TTL left this process.
    pub(super) fn lease_valid_from(&mut self, sent: Instant) {
        self.last_renewal_sent = Some(sent);
        let ttl = self
            .leader_lease
            .as_ref()
            .map(|l| l.ttl)
            .unwrap_or(Duration::ZERO);
        self.leader_valid_until = Some(sent + ttl.saturating_sub(lease_safety_margin(ttl)));
    }

    /// Renews the leader lease now (rule 2); an error when it is gone or etcd does not
    /// answer, which stops the rest of a decision (a StartPrimary after a failed renewal
    /// must not run).
    pub(super) async fn renew_leader(&mut self) -> Result<()> {
        let Some(lease) = &mut self.leader_lease else {
            return Ok(());
        };
        match lease.refresh().await {
            Ok(Some(sent)) => {
                self.lease_valid_from(sent);
                self.arm_watchdog();
                Ok(())
            }
            Ok(None) => {
                self.leader_lease = None;
                self.leader_valid_until = None;
                self.failsafe_gate_release();
                Err(anyhow!("my leader lease expired before I could renew it"))
            }
            Err(e) => Err(e).context("cannot renew the leader lease"),
        }
    }

    /// Runs `work` (which must not borrow the agent) until it finishes or `until`, renewing
    /// the leader lease every third of its TTL meanwhile, so a long step of a leader's
    /// action neither starves the lease nor makes the watchdog fence a healthy primary.
    pub(super) async fn with_renewal<T>(
        &mut self,
        until: Instant,
        work: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let ttl = self.ha_config().dcs.ttl();
        let every = (ttl / 3).max(Duration::from_millis(200));
        let budget = until.saturating_duration_since(Instant::now());
        tokio::pin!(work);
        loop {
            let tick = Instant::now() + every;
            tokio::select! {
                out = &mut work => return out,
                _ = tokio::time::sleep_until(until) => {
                    return Err(anyhow!("did not finish within {:.1} s", budget.as_secs_f64()));
                }
                _ = tokio::time::sleep_until(tick) => {
                    self.renew_leader().await?;
                    // The member key too: a step longer than the TTL (pg_upgrade) must not
                    // leave the leader key's holder without a member key (no address).
                    self.keep_member_lease(ttl).await;
                }
            }
        }
    }

    /// Rule 1, checked again at the last moment: nothing becomes writable unless we hold a
    /// leader lease that is certainly alive.
    pub(super) fn ensure_lease_valid(&self, what: &str) -> Result<()> {
        match (&self.leader_lease, self.leader_valid_until) {
            (Some(_), Some(until)) if Instant::now() < until => Ok(()),
            _ => Err(anyhow!(
                "refusing to {what}: I do not hold a live leader lease"
            )),
        }
    }
}
