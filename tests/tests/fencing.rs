//! Fencing (rules 1-3 of docs/architecture.md): a leader that can no longer renew its lease,
//! because its agent is frozen, because it is cut off from etcd, or because etcd is down, stops
//! accepting writes before any other member can take over; and it comes back as a replica.
//!
//! Each member is probed with an INSERT every 50 ms on its own connection
//! ([`Writer::probe`]), so "stopped accepting writes" is what a client saw, and "before" is
//! measured on one clock: the old leader's last acknowledged write arrived before the new
//! leader's first write was even sent, and before the new leader's agent logged that it
//! acquired the key.

use std::time::{Duration, SystemTime};

use anyhow::{ensure, Context, Result};
use pgherd_tests::{
    hold_for, in_recovery, timeline, wait_streaming_from, Ack, Cluster, Member, MemberOptions,
    Stamp, Writer, WriterReport,
};
use tokio::time::Instant;

const BRINGUP: Duration = Duration::from_secs(90);
/// Lease expiry (ttl 4) plus election and promotion, with room for a loaded machine.
const FAILOVER: Duration = Duration::from_secs(60);
/// pg_rewind, start and catch-up of a returning leader.
const REJOIN: Duration = Duration::from_secs(90);
const REPLICATION: Duration = Duration::from_secs(30);
/// The harness's lease TTL (`bootstrap.dcs.ttl`).
const TTL: Duration = Duration::from_secs(4);

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

fn wall_delta(later: SystemTime, earlier: SystemTime) -> String {
    match later.duration_since(earlier) {
        Ok(d) => format!("{:.3} s", d.as_secs_f64()),
        Err(e) => format!("-{:.3} s", e.duration().as_secs_f64()),
    }
}

fn probe_of<'a>(cluster: &Cluster, probes: &'a [Writer], member: &Member) -> &'a Writer {
    let i = cluster
        .members()
        .iter()
        .position(|m| m.name() == member.name())
        .expect("the member belongs to the cluster");
    &probes[i]
}

/// A probe on every member (in member order), once `leader`'s has had a write acknowledged.
async fn probes_writing(cluster: &Cluster, leader: &Member) -> Result<Vec<Writer>> {
    let probes = Writer::probe_all(cluster).await?;
    probe_of(cluster, &probes, leader)
        .wait_ack_sent_after(Instant::now(), REPLICATION)
        .await?;
    Ok(probes)
}

/// How a leader was replaced after a fault at `fault`.
struct Takeover {
    new_leader: String,
    /// The old leader's last acknowledged write.
    old_last: Ack,
    /// The old leader's first refused write after that, if the probe tried one.
    old_refused: Option<Stamp>,
    /// The new leader's first acknowledged write.
    new_first: Ack,
    /// When the new leader's agent logged "acquired leader lease" (wall clock).
    acquired: SystemTime,
}

impl Takeover {
    fn figures(&self, fault: Stamp, fault_name: &str) -> String {
        format!(
            "{fault_name} -> old leader's last write acknowledged after {}, first refused after {}; \
             {} acquired the key after {}; its first write acknowledged after {}; \
             margin between the old leader's last write and the new leader's key: {}",
            secs(self.old_last.acked.instant.saturating_duration_since(fault.instant)),
            self.old_refused.map_or("-".into(), |s| secs(
                s.instant.saturating_duration_since(fault.instant)
            )),
            self.new_leader,
            wall_delta(self.acquired, fault.wall),
            secs(self.new_first.acked.instant.saturating_duration_since(fault.instant)),
            wall_delta(self.acquired, self.old_last.acked.wall),
        )
    }
}

/// Waits for another member to lead and take writes after `fault`, and checks the old
/// leader had stopped taking writes before: before the new leader acquired the key and
/// before the new leader's first write was sent.
async fn fenced_takeover(
    cluster: &Cluster,
    probes: &[Writer],
    old: &Member,
    fault: Stamp,
) -> Result<Takeover> {
    let new_leader = cluster.wait_new_leader(old.name(), FAILOVER).await?;
    let new = cluster.member(&new_leader);
    let new_first = probe_of(cluster, probes, new)
        .wait_ack_sent_after(fault.instant, FAILOVER)
        .await?;
    let old_report = probe_of(cluster, probes, old).report();
    let old_last = *old_report
        .last_ack()
        .context("the old leader's probe never got a write acknowledged")?;
    let old_refused = old_report
        .errors
        .iter()
        .find(|e| e.at.instant > old_last.acked.instant)
        .map(|e| e.at);
    let acquired = new
        .agent_log_times("acquired leader lease")
        .into_iter()
        .find(|t| *t >= fault.wall)
        .with_context(|| {
            format!("{new_leader}'s log has no \"acquired leader lease\" after the fault")
        })?;
    // Rule 1: never two writable members. On this process's clock: the old leader's last
    // reply arrived before the new leader's first insert left.
    ensure!(
        old_last.acked.instant < new_first.sent.instant,
        "{} acknowledged write {} at +{:.3} s, after {new_leader}'s first write {} was sent at +{:.3} s",
        old.name(),
        old_last.id,
        old_last.acked.secs_since(fault.instant),
        new_first.id,
        new_first.sent.secs_since(fault.instant)
    );
    // And against the agent's own log: fenced before the key changed hands.
    ensure!(
        old_last.acked.wall < acquired,
        "{} acknowledged a write {} after {new_leader} acquired the leader key",
        old.name(),
        wall_delta(old_last.acked.wall, acquired)
    );
    // Rules 2 and 3: the fencing deadline runs from the last renewal sent, which was before
    // the fault, so writes stop less than a TTL after it.
    let fenced_after = old_last
        .acked
        .instant
        .saturating_duration_since(fault.instant);
    ensure!(
        fenced_after < TTL,
        "{} still acknowledged writes {} after the fault (ttl {})",
        old.name(),
        secs(fenced_after),
        secs(TTL)
    );
    Ok(Takeover {
        new_leader,
        old_last,
        old_refused,
        new_first,
        acquired,
    })
}

/// After the fault at `since` only the new leader acknowledged writes: the old leader none
/// after the last one `fenced_takeover` saw (not even once it rejoined), the others none.
fn check_single_writer(
    cluster: &Cluster,
    reports: &[WriterReport],
    old: &str,
    takeover: &Takeover,
    since: Instant,
) -> Result<()> {
    for (member, report) in cluster.members().iter().zip(reports) {
        let name = member.name();
        if name == takeover.new_leader {
            continue;
        }
        let late: Vec<(i64, f64)> = report
            .acks
            .iter()
            .filter(|a| {
                if name == old {
                    a.acked.instant > takeover.old_last.acked.instant
                } else {
                    a.acked.instant > since
                }
            })
            .map(|a| (a.id, a.acked.secs_since(since)))
            .collect();
        ensure!(
            late.is_empty(),
            "{name} acknowledged writes it should not have (id, s after the fault): {late:?}"
        );
    }
    Ok(())
}

async fn stop_all(probes: Vec<Writer>) -> Vec<WriterReport> {
    let mut reports = Vec::new();
    for p in probes {
        reports.push(p.stop().await);
    }
    reports
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigstopped_leader_agent_stops_accepting_writes_before_another_member_is_promoted(
) -> Result<()> {
    let cluster = Cluster::start(3).await?;
    let healthy = cluster.wait_healthy(BRINGUP).await?;
    let old = cluster.member(&healthy.leader);
    let probes = probes_writing(&cluster, old).await?;

    let fault = Stamp::now();
    let frozen = old.pause_agent()?;
    let takeover = fenced_takeover(&cluster, &probes, old, fault).await?;
    ensure!(
        old.postmaster_pid().is_none(),
        "{}'s PostgreSQL still runs after the takeover: the watchdog did not fence it",
        old.name()
    );
    eprintln!(
        "figures: {}",
        takeover.figures(fault, "SIGSTOP of the leader's agent")
    );
    let new = cluster.member(&takeover.new_leader);
    let history = cluster.history().await?;
    let new_timeline = timeline(new).await?;
    ensure!(
        history
            .iter()
            .any(|e| e.timeline == new_timeline && e.leader == takeover.new_leader),
        "no history entry for {}'s timeline {new_timeline}: {history:?}",
        takeover.new_leader
    );

    // Thawed, the old leader finds another leader and rejoins as its standby.
    let thawed = Instant::now();
    frozen.resume()?;
    let healthy = cluster.wait_healthy(REJOIN).await?;
    ensure!(healthy.leader == takeover.new_leader, "{healthy:?}");
    wait_streaming_from(old, new, new_timeline, REPLICATION).await?;
    let rejoined = thawed.elapsed();

    let reports = stop_all(probes).await;
    check_single_writer(&cluster, &reports, old.name(), &takeover, fault.instant)?;
    eprintln!(
        "figures: old leader streaming again {} after SIGCONT",
        secs(rejoined)
    );
    Ok(())
}

/// How the leader loses etcd in [`leader_cut_off_from_etcd`].
#[derive(Debug, Clone, Copy)]
enum Cut {
    /// Connections closed and refused: every etcd call fails at once.
    Severed,
    /// Nothing answers: every etcd call hangs until the agent's own timeout.
    Blackholed,
}

/// The leader loses etcd (the others keep it); it must stop taking writes before its lease
/// can expire, another member takes over, and once etcd is back the old leader rejoins.
async fn leader_cut_off_from_etcd(cut: Cut) -> Result<()> {
    // Every member behind its own proxy: whichever becomes leader can be cut off alone.
    let cluster = Cluster::builder()
        .member(MemberOptions::new().through_etcd_proxy())
        .member(MemberOptions::new().through_etcd_proxy())
        .member(MemberOptions::new().through_etcd_proxy())
        .start()
        .await?;
    let healthy = cluster.wait_healthy(BRINGUP).await?;
    let old = cluster.member(&healthy.leader);
    let proxy = old
        .etcd_proxy()
        .context("members were built with a proxy")?;
    ensure!(
        proxy.connections_accepted() > 0,
        "{}'s agent never connected through its proxy",
        old.name()
    );
    let probes = probes_writing(&cluster, old).await?;

    let fault = Stamp::now();
    match cut {
        Cut::Severed => proxy.sever(),
        Cut::Blackholed => proxy.blackhole(),
    }
    let takeover = fenced_takeover(&cluster, &probes, old, fault).await?;
    eprintln!(
        "figures: {}",
        takeover.figures(fault, &format!("etcd {cut:?} from the leader"))
    );
    let new = cluster.member(&takeover.new_leader);
    let new_timeline = timeline(new).await?;

    let healed = Instant::now();
    proxy.heal();
    let healthy = cluster.wait_healthy(REJOIN).await?;
    ensure!(healthy.leader == takeover.new_leader, "{healthy:?}");
    wait_streaming_from(old, new, new_timeline, REPLICATION).await?;
    let rejoined = healed.elapsed();

    let reports = stop_all(probes).await;
    check_single_writer(&cluster, &reports, old.name(), &takeover, fault.instant)?;
    eprintln!(
        "figures: old leader streaming again {} after the proxy healed",
        secs(rejoined)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_etcd_demotes_itself_before_its_lease_expires() -> Result<()> {
    leader_cut_off_from_etcd(Cut::Severed).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_etcd_requests_hang_demotes_itself_before_its_lease_expires() -> Result<()> {
    leader_cut_off_from_etcd(Cut::Blackholed).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_stopped_no_member_stays_writable_past_the_lease_and_the_cluster_recovers(
) -> Result<()> {
    let cluster = Cluster::start(3).await?;
    let healthy = cluster.wait_healthy(BRINGUP).await?;
    let old = cluster.member(&healthy.leader);
    let probes = probes_writing(&cluster, old).await?;

    let stopped = Stamp::now();
    cluster.etcd().stop().await?;
    let cutoff = stopped.instant + TTL + Duration::from_secs(2);
    // Watch through the cutoff and 3 s beyond: after it, no member may take a write.
    let window = cutoff + Duration::from_secs(3) - Instant::now();
    hold_for(
        window,
        "no member acknowledging writes later than ttl + 2 s after etcd stopped",
        || async {
            for p in &probes {
                let r = p.report();
                if let Some(late) = r.acks.iter().find(|a| a.acked.instant > cutoff) {
                    anyhow::bail!(
                        "{} acknowledged write {} {:.3} s after etcd stopped",
                        r.label,
                        late.id,
                        late.acked.secs_since(stopped.instant)
                    );
                }
            }
            Ok(())
        },
    )
    .await?;
    let old_report = probe_of(&cluster, &probes, old).report();
    let last = old_report
        .last_ack()
        .context("the leader's probe never got a write acknowledged")?;
    let writes_stopped = last
        .acked
        .instant
        .saturating_duration_since(stopped.instant);
    let refused = old_report
        .errors
        .iter()
        .find(|e| e.at.instant > last.acked.instant)
        .map(|e| e.at.instant.saturating_duration_since(stopped.instant));
    for member in cluster.others(old.name()) {
        let late = probe_of(&cluster, &probes, member)
            .report()
            .acks
            .iter()
            .filter(|a| a.acked.instant > stopped.instant)
            .count();
        ensure!(
            late == 0,
            "{} (a replica) acknowledged {late} writes while etcd was down",
            member.name()
        );
    }

    let restarted = Instant::now();
    cluster.etcd().restart().await?;
    let healthy = cluster.wait_healthy(FAILOVER).await?;
    let recovered = restarted.elapsed();
    let leader = cluster.member(&healthy.leader);
    let settled = Instant::now();
    let first = probe_of(&cluster, &probes, leader)
        .wait_ack_sent_after(settled, REPLICATION)
        .await?;
    for member in cluster.others(leader.name()) {
        ensure!(
            in_recovery(member).await?,
            "{} is not a standby after recovery",
            member.name()
        );
    }

    let reports = stop_all(probes).await;
    for (member, report) in cluster.members().iter().zip(&reports) {
        let during: Vec<i64> = report
            .acks
            .iter()
            .filter(|a| a.acked.instant > cutoff && a.sent.instant < restarted)
            .map(|a| a.id)
            .collect();
        ensure!(
            during.is_empty(),
            "{} acknowledged writes while etcd was down past the lease: {during:?}",
            member.name()
        );
        if member.name() != leader.name() {
            let late = report
                .acks
                .iter()
                .filter(|a| a.acked.instant > cutoff)
                .count();
            ensure!(
                late == 0,
                "{} acknowledged {late} writes after etcd stopped without leading after it came back",
                member.name()
            );
        }
    }
    eprintln!(
        "figures: etcd stopped -> {}'s last write acknowledged after {}, first refused after {}; \
         etcd restarted -> healthy after {}, leader {} (was {}), first write acknowledged {} after the restart",
        old.name(),
        secs(writes_stopped),
        refused.map_or("-".into(), secs),
        secs(recovered),
        leader.name(),
        old.name(),
        secs(first.acked.instant.saturating_duration_since(restarted)),
    );
    Ok(())
}
