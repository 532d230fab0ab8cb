//! One measured crash on a healthy three-member cluster: the leader's agent and PostgreSQL
//! killed together (a failover), or the leader's postmaster alone (a restart in place).
//!
//! Both start a [`Writer`] (one row every 20 ms through every member with
//! `target_session_attrs=read-write`), let it write for [`WRITES_BEFORE`], crash, wait until
//! writes have been acknowledged again for [`WRITES_AFTER`], stop it and look at what it saw.

use std::fmt;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use pgherd_tests::{
    current_wal_lsn, missing_rows, same_key, wait_replayed, wait_until, Cluster, Gap, Writer,
    WriterReport,
};
use tokio::time::Instant;

/// Three members from nothing (initdb, two base backups) on a 2-core machine that may be
/// doing other things.
pub const BRINGUP: Duration = Duration::from_secs(120);
/// Acknowledged writes before the crash.
pub const WRITES_BEFORE: Duration = Duration::from_secs(3);
/// Acknowledged writes after writing resumed, before the writer stops.
pub const WRITES_AFTER: Duration = Duration::from_secs(2);
/// Replicas replay a few ms of loopback WAL well within this.
const REPLAY: Duration = Duration::from_secs(10);
/// Beyond the ttl: election, promotion and the writer's reconnection on a loaded machine.
const RECOVERY_SLACK: Duration = Duration::from_secs(60);

/// The agent's default ttl (`bootstrap.dcs.ttl`), used for PostgreSQL-only crashes.
pub const DEFAULT_TTL: u64 = 10;

/// The `bootstrap.dcs` timings of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub ttl: u64,
    pub loop_wait: u64,
    pub retry_timeout: u64,
}

impl Timing {
    /// loop_wait 1 and the largest retry_timeout up to the default 3 that keeps
    /// `ttl >= loop_wait + 2 * retry_timeout` (ttl 10: 3, the defaults; ttl 5: 2; ttl 3: 1).
    pub fn for_ttl(ttl: u64) -> Timing {
        let loop_wait = 1;
        Timing {
            ttl,
            loop_wait,
            retry_timeout: (ttl.saturating_sub(loop_wait) / 2).clamp(1, 3),
        }
    }

    /// The YAML the cluster builder merges into every member's config.
    pub fn yaml(&self) -> String {
        format!(
            "bootstrap: {{dcs: {{ttl: {}, loop_wait: {}, retry_timeout: {}}}}}",
            self.ttl, self.loop_wait, self.retry_timeout
        )
    }
}

impl fmt::Display for Timing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ttl {} s (loop_wait {}, retry_timeout {})",
            self.ttl, self.loop_wait, self.retry_timeout
        )
    }
}

/// What one failover run measured.
#[derive(Debug, Clone)]
pub struct Failover {
    pub old_leader: String,
    pub new_leader: String,
    /// From the kill until `pgherdctl list` showed the new leader running (polled every
    /// ~100 ms, so up to that much late).
    pub new_leader_after: Duration,
    /// The longest time between two acknowledgements that ends after the kill.
    pub gap: Gap,
    /// Rows the old leader acknowledged (all committed before the kill).
    pub acked_before_kill: usize,
    /// Of those, rows acknowledged before a WAL position both replicas had replayed before
    /// the kill: provably on every survivor.
    pub proven: usize,
    /// From the moment up to which rows are proven replicated to the kill: rows acknowledged
    /// in this window may legitimately be lost with asynchronous replication.
    pub lag_window: Duration,
    /// Proven-replicated rows the new leader lacks (a bug if any).
    pub missing_proven: Vec<i64>,
    /// Lag-window rows the new leader lacks.
    pub missing_in_window: Vec<i64>,
    /// Acknowledgements from a server that is neither the old nor the new leader.
    pub acked_elsewhere: usize,
    pub summary: String,
}

impl Failover {
    pub fn missing(&self) -> usize {
        self.missing_proven.len() + self.missing_in_window.len()
    }
}

impl fmt::Display for Failover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -> {}, running after {:.2} s; write gap {:.2} s; {} acknowledged by the old leader \
             ({} proven replicated, {} in the {:.3} s lag window); missing on the new leader: {} \
             ({} proven replicated, {} in the lag window)",
            self.old_leader,
            self.new_leader,
            self.new_leader_after.as_secs_f64(),
            self.gap.length().as_secs_f64(),
            self.acked_before_kill,
            self.proven,
            self.acked_before_kill - self.proven,
            self.lag_window.as_secs_f64(),
            self.missing(),
            self.missing_proven.len(),
            self.missing_in_window.len(),
        )?;
        if !self.missing_proven.is_empty() || !self.missing_in_window.is_empty() {
            write!(
                f,
                " ids {:?}",
                [&self.missing_proven[..], &self.missing_in_window[..]].concat()
            )?;
        }
        if self.acked_elsewhere > 0 {
            write!(
                f,
                "; {} writes acknowledged by a server that was neither the old nor the new leader",
                self.acked_elsewhere
            )?;
        }
        Ok(())
    }
}

/// What a failover run kills on the leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kill {
    /// SIGKILL of the agent and PostgreSQL (every process of both groups): a node crash.
    AgentAndPostgres,
    /// SIGKILL of the agent process alone (a panic, the OOM killer): its watchdog fences
    /// PostgreSQL and revokes the leader lease.
    AgentOnly,
}

/// SIGKILL of the leader's agent (and with [`Kill::AgentAndPostgres`] its PostgreSQL) while
/// the writer runs; see [`Failover`] for what is measured.
pub async fn failover(cluster: &Cluster, timing: Timing, what: Kill) -> Result<Failover> {
    let healthy = cluster.wait_healthy(BRINGUP).await?;
    let old = cluster.member(&healthy.leader);
    let writer = Writer::start(cluster).await?;
    wait_writing(&writer, None, WRITES_BEFORE).await?;

    // Everything acknowledged by `cut` committed before `lsn` was read, so once both replicas
    // have replayed `lsn`, every such row is on both. The kill follows at once: rows
    // acknowledged after `cut` are the replication lag window.
    let cut = Instant::now();
    let lsn = current_wal_lsn(old).await?;
    for replica in cluster.others(old.name()) {
        wait_replayed(replica, lsn, REPLAY).await?;
    }
    let postmaster = match what {
        Kill::AgentAndPostgres => old.crash()?,
        Kill::AgentOnly => {
            let pid = old.postmaster_pid();
            old.kill()?;
            pid
        }
    };
    // Taken after the kill: no reply from the old leader can arrive later (with the agent
    // alone killed, its postmaster gets SIGQUIT from the kernel at once, the parent-death
    // signal, and the watchdog's SIGKILL).
    let killed = Instant::now();
    ensure!(
        postmaster.is_some(),
        "{} had no postmaster to kill",
        old.name()
    );

    let recovery = Duration::from_secs(timing.ttl) + RECOVERY_SLACK;
    let new_name = cluster.wait_new_leader(old.name(), recovery).await?;
    let new_leader_after = killed.elapsed();
    let resumed = writer.wait_ack_sent_after(killed, recovery).await?;
    wait_writing(&writer, Some(resumed.acked.instant), WRITES_AFTER).await?;
    let report = writer.stop().await;

    let new = cluster.member(&new_name);
    let gap =
        gap_ending_after(&report, killed).context("no write was acknowledged around the kill")?;
    // Everything the old leader acknowledged committed before the kill, even when its reply
    // was read a moment after `killed` was taken (it was already in the socket).
    let old_port = i32::from(old.pg_port());
    let new_port = i32::from(new.pg_port());
    let before_kill: Vec<i64> = report
        .acks
        .iter()
        .filter(|a| a.port == old_port)
        .map(|a| a.id)
        .collect();
    let proven = report.acked_before(cut);
    let missing = missing_rows(new, &report.table, &before_kill).await?;
    let (missing_proven, missing_in_window) = missing
        .into_iter()
        .partition(|id| proven.binary_search(id).is_ok());
    let acked_elsewhere = report
        .acks
        .iter()
        .filter(|a| a.port != old_port && a.port != new_port)
        .count();
    Ok(Failover {
        old_leader: old.name().to_string(),
        new_leader: new_name,
        new_leader_after,
        gap,
        acked_before_kill: before_kill.len(),
        proven: proven.len(),
        lag_window: killed.duration_since(cut),
        missing_proven,
        missing_in_window,
        acked_elsewhere,
        summary: report.summary(),
    })
}

/// What one PostgreSQL-only crash run measured.
#[derive(Debug, Clone)]
pub struct PgCrash {
    pub leader: String,
    /// The leader key is the same key (value, create revision, lease) after the restart.
    pub kept_key: bool,
    /// Who leads at the end (the same member unless a failover happened instead).
    pub leader_after: String,
    /// The longest time between two acknowledgements that ends after the kill.
    pub gap: Gap,
    /// From the kill until an insert committed in a session opened after it.
    pub new_session_after: Duration,
    /// Inserts sent after the kill and still committed by the orphaned backend.
    pub orphan_commits: usize,
    pub acked: usize,
    /// Acknowledged rows the leader lacks at the end (a bug if any: commits are flushed
    /// locally before they are acknowledged).
    pub missing: Vec<i64>,
    pub summary: String,
}

impl fmt::Display for PgCrash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "postmaster of {} killed; {}; write gap {:.2} s (first commit in a new session {:.2} s \
             after the kill; {} inserts sent after the kill committed by the orphaned backend); \
             {} acknowledged, {} missing on {}",
            self.leader,
            if self.kept_key && self.leader_after == self.leader {
                "restarted in place, same leader key".to_string()
            } else {
                format!("leader key changed, now {}", self.leader_after)
            },
            self.gap.length().as_secs_f64(),
            self.new_session_after.as_secs_f64(),
            self.orphan_commits,
            self.acked,
            self.missing.len(),
            self.leader_after,
        )?;
        if !self.missing.is_empty() {
            write!(f, " ids {:?}", self.missing)?;
        }
        Ok(())
    }
}

/// SIGKILL of the leader's postmaster alone (as the OOM killer does), agent alive; its
/// backends notice and exit. See [`PgCrash`] for what is measured.
pub async fn pg_crash(cluster: &Cluster) -> Result<PgCrash> {
    let healthy = cluster.wait_healthy(BRINGUP).await?;
    let leader = cluster.member(&healthy.leader);
    let key_before = cluster.leader_key().await?;
    let writer = Writer::start(cluster).await?;
    wait_writing(&writer, None, WRITES_BEFORE).await?;

    let postmaster = leader
        .postmaster_pid()
        .with_context(|| format!("{}'s PostgreSQL is not running", leader.name()))?;
    let session = writer.report().connections;
    kill(Pid::from_raw(postmaster), Signal::SIGKILL)
        .with_context(|| format!("cannot kill {}'s postmaster {postmaster}", leader.name()))?;
    let killed = Instant::now();

    let recovery = Duration::from_secs(DEFAULT_TTL) + RECOVERY_SLACK;
    let resumed = writer.wait_ack_after_session(session, recovery).await?;
    wait_writing(&writer, Some(resumed.acked.instant), WRITES_AFTER).await?;
    let report = writer.stop().await;

    let key_after = cluster.etcd_get_kv("leader").await?;
    let kept_key = key_after.as_ref().is_some_and(|k| same_key(k, &key_before));
    let now_leading = cluster.leader().await?;
    let gap =
        gap_ending_after(&report, killed).context("no write was acknowledged around the kill")?;
    let missing = missing_rows(now_leading, &report.table, &report.acked_ids()).await?;
    Ok(PgCrash {
        leader: leader.name().to_string(),
        kept_key,
        leader_after: now_leading.name().to_string(),
        gap,
        new_session_after: resumed.acked.instant.duration_since(killed),
        orphan_commits: report
            .acks
            .iter()
            .filter(|a| a.session <= session && a.sent.instant >= killed)
            .count(),
        acked: report.acks.len(),
        missing,
        summary: report.summary(),
    })
}

/// Waits until the writer has acknowledged writes for `span` since `from` (default: its
/// first acknowledgement).
pub(crate) async fn wait_writing(
    writer: &Writer,
    from: Option<Instant>,
    span: Duration,
) -> Result<()> {
    wait_until(
        span + Duration::from_secs(30),
        format!("{:.0} s of acknowledged writes", span.as_secs_f64()),
        || async {
            let report = writer.report();
            let start = from
                .or_else(|| report.first_ack().map(|a| a.acked.instant))
                .with_context(|| format!("no write acknowledged yet; {}", report.summary()))?;
            let last = report.last_ack().map(|a| a.acked.instant);
            ensure!(
                last.is_some_and(|l| l >= start + span),
                "not yet; {}",
                report.summary()
            );
            Ok(())
        },
    )
    .await
}

/// The longest time between two consecutive acknowledgements whose second one came after
/// `t`: the outage a crash at `t` caused, also when an orphaned backend still acknowledged
/// an insert or two after `t`.
fn gap_ending_after(report: &WriterReport, t: Instant) -> Option<Gap> {
    report.longest_gap_where(|_, first_after| first_after.acked.instant > t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_timeout_is_the_largest_that_fits_the_ttl() {
        let rt = |ttl| Timing::for_ttl(ttl).retry_timeout;
        assert_eq!(
            (rt(3), rt(4), rt(5), rt(6), rt(7), rt(10), rt(30)),
            (1, 1, 2, 2, 3, 3, 3)
        );
        for ttl in 3..40 {
            let t = Timing::for_ttl(ttl);
            assert!(t.ttl >= t.loop_wait + 2 * t.retry_timeout, "{t}");
        }
        assert_eq!(
            Timing::for_ttl(5).yaml(),
            "bootstrap: {dcs: {ttl: 5, loop_wait: 1, retry_timeout: 2}}"
        );
    }
}
