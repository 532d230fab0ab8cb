//! Failover: a crashed leader is replaced by a replica on a new timeline without losing any
//! replicated acknowledged write, and comes back as a standby through pg_rewind; a leader
//! whose PostgreSQL alone crashed restarts it in place, keeping the key and the timeline.
//!
//! Fencing (a leader that cannot renew stops taking writes first) is in `fencing.rs`; who
//! may be promoted is in `candidates.rs`.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use pgherd_tests::{
    current_wal_lsn, missing_rows, same_key, timeline, wait_replayed, wait_streaming_from, Cluster,
    Signal, Writer, WriterReport,
};
use tokio::time::Instant;

/// initdb, three PostgreSQL starts and two base backups on a 2-core machine shared with
/// other tests.
const BRINGUP: Duration = Duration::from_secs(90);
/// Lease expiry (ttl 4) plus election and promotion, with room for a loaded machine.
const FAILOVER: Duration = Duration::from_secs(60);
/// A standby catches up with a few seconds of writes well within this.
const REPLICATION: Duration = Duration::from_secs(30);
/// A member rejoining: pg_rewind, start, catch up.
const REJOIN: Duration = Duration::from_secs(90);

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

/// The longest gap between acknowledgements that spans `t`, if any.
fn gap_across(report: &WriterReport, t: Instant) -> Option<Duration> {
    report
        .longest_gap_where(|before, after| before.acked.instant <= t && after.acked.instant > t)
        .map(|g| g.length())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_agent_and_postmaster_promotes_a_replica_and_the_old_leader_rejoins_with_pg_rewind(
) -> Result<()> {
    let cluster = Cluster::start(3).await?;
    let healthy = cluster.wait_healthy(BRINGUP).await?;
    let old = cluster.member(&healthy.leader);
    let old_timeline = timeline(old).await?;
    let history_before = cluster.history().await?.len();

    let writer = Writer::start(&cluster).await?;
    let table = writer.report().table;
    writer.wait_acks(50, REPLICATION).await?;

    // Everything acknowledged by `cut` was committed before `lsn` was read, so once both
    // replicas have replayed `lsn` every one of those rows is provably on both.
    let cut = Instant::now();
    let lsn = current_wal_lsn(old).await?;
    for replica in cluster.others(old.name()) {
        wait_replayed(replica, lsn, REPLICATION).await?;
    }

    let postmaster = old.crash()?;
    // Taken after the kill: an insert sent later cannot reach the old leader.
    let killed = Instant::now();
    ensure!(
        postmaster.is_some(),
        "{} had no postmaster to kill",
        old.name()
    );

    let new_name = cluster.wait_new_leader(old.name(), FAILOVER).await?;
    let new_leader_after = killed.elapsed();
    let new = cluster.member(&new_name);
    let new_timeline = timeline(new).await?;
    ensure!(
        new_timeline > old_timeline,
        "{new_name} leads on timeline {new_timeline}, not after {}'s {old_timeline}",
        old.name()
    );
    let other = cluster
        .others(old.name())
        .into_iter()
        .find(|m| m.name() != new_name)
        .context("three members: one more replica")?;
    wait_streaming_from(other, new, new_timeline, REPLICATION).await?;

    let resumed = writer.wait_ack_sent_after(killed, FAILOVER).await?;
    ensure!(
        resumed.port == i32::from(new.pg_port()),
        "the first write after the kill was acknowledged by port {}, not by the new leader {new_name} (port {})",
        resumed.port,
        new.pg_port()
    );
    let writes_back_after = resumed.acked.instant.duration_since(killed);

    let history = cluster.history().await?;
    ensure!(
        history.len() == history_before + 1,
        "history should have one more entry after one failover: {history:?}"
    );
    let entry = history.last().context("history is not empty")?;
    ensure!(
        entry.timeline == new_timeline && entry.leader == new_name,
        "the last history entry {entry:?} is not {new_name}'s timeline {new_timeline}"
    );

    // The old leader comes back: rewound onto the new timeline, then a streaming standby.
    old.start()?;
    let healthy = cluster.wait_healthy(REJOIN).await?;
    ensure!(
        healthy.leader == new_name,
        "{} took over again from {new_name}: {healthy:?}",
        old.name()
    );
    wait_streaming_from(old, new, new_timeline, REPLICATION).await?;
    old.ensure_rewound()?;

    let report = writer.stop().await;
    eprintln!("{}", report.summary());
    let before_cut = report.acked_before(cut);
    let missing = missing_rows(new, &table, &before_cut).await?;
    ensure!(
        missing.is_empty(),
        "{} of {} rows acknowledged (and replicated) before the kill are missing on the new leader {new_name}: {missing:?}",
        missing.len(),
        before_cut.len()
    );
    // Acknowledged between the replication check and the kill: asynchronous replication
    // may lose these, so they are reported, not asserted.
    let unchecked = report.acked_between(cut, killed);
    let unchecked_missing = missing_rows(new, &table, &unchecked).await?;

    // Every row the new leader acknowledged is on every member once they catch up.
    let end = current_wal_lsn(new).await?;
    let after_kill = report.acked_after(killed);
    for member in cluster.others(&new_name) {
        wait_replayed(member, end, REPLICATION).await?;
        let lost = missing_rows(member, &table, &after_kill).await?;
        ensure!(
            lost.is_empty(),
            "{} lacks rows the new leader acknowledged: {lost:?}",
            member.name()
        );
        let lost = missing_rows(member, &table, &before_cut).await?;
        ensure!(
            lost.is_empty(),
            "{} lacks rows acknowledged before the kill: {lost:?}",
            member.name()
        );
    }

    eprintln!(
        "figures: new leader {new_name} running {} after the kill; first write acknowledged {} after the kill; \
         write gap across the failover {}; longest write gap {}; {} rows acknowledged before the replication check, \
         none lost; {} acknowledged in the {} between check and kill, {} of them lost",
        secs(new_leader_after),
        secs(writes_back_after),
        gap_across(&report, killed).map_or("-".into(), secs),
        report.longest_gap().map_or("-".into(), |g| secs(g.length())),
        before_cut.len(),
        unchecked.len(),
        secs(killed.duration_since(cut)),
        unchecked_missing.len(),
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_killed_on_the_leader_is_restarted_in_place_keeping_leader_and_timeline(
) -> Result<()> {
    let cluster = Cluster::start(3).await?;
    let healthy = cluster.wait_healthy(BRINGUP).await?;
    let leader = cluster.member(&healthy.leader);
    let tl = timeline(leader).await?;
    let history_before = cluster.history().await?.len();
    let key_before = cluster.leader_key().await?;

    let writer = Writer::start(&cluster).await?;
    writer.wait_acks(25, REPLICATION).await?;

    let postmaster = leader
        .postmaster_pid()
        .context("the leader's PostgreSQL is not running")?;
    let session = writer.report().connections;
    // The postmaster alone, as after an OOM kill: its backends notice and exit, though the
    // writer's own backend may still commit an insert or two before it does. Writes are
    // back when a new session commits one.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(postmaster), Signal::SIGKILL)?;
    let killed = Instant::now();

    let resumed = writer.wait_ack_after_session(session, FAILOVER).await?;
    let unavailable = resumed.acked.instant.duration_since(killed);
    ensure!(
        resumed.port == i32::from(leader.pg_port()),
        "writes resumed on port {}, not on the leader {} (port {})",
        resumed.port,
        leader.name(),
        leader.pg_port()
    );
    let restarted = leader
        .postmaster_pid()
        .context("writes resumed but the leader has no postmaster")?;
    ensure!(
        restarted != postmaster,
        "the killed postmaster is still there"
    );

    // The same key all along: never released, never re-created by anyone.
    let key_after = cluster
        .etcd_get_kv("leader")
        .await?
        .context("no leader key after the restart")?;
    ensure!(
        same_key(&key_after, &key_before),
        "the leader key changed: {:?} (created at revision {}, lease {}) -> {:?} (revision {}, lease {})",
        key_before.value_str().unwrap_or("?"),
        key_before.create_revision(),
        key_before.lease(),
        key_after.value_str().unwrap_or("?"),
        key_after.create_revision(),
        key_after.lease()
    );
    ensure!(
        timeline(leader).await? == tl,
        "the timeline changed across a restart in place"
    );
    let history = cluster.history().await?;
    ensure!(
        history.len() == history_before,
        "a restart in place added history entries: {history:?}"
    );
    let healthy = cluster.wait_healthy(REPLICATION).await?;
    ensure!(healthy.leader == leader.name(), "{healthy:?}");

    let report = writer.stop().await;
    eprintln!("{}", report.summary());
    let elsewhere: Vec<(i64, i32)> = report
        .acks
        .iter()
        .filter(|a| a.port != i32::from(leader.pg_port()))
        .map(|a| (a.id, a.port))
        .collect();
    ensure!(
        elsewhere.is_empty(),
        "writes acknowledged by another member: {elsewhere:?}"
    );
    let orphan = report
        .acks
        .iter()
        .filter(|a| a.session <= session && a.sent.instant >= killed)
        .count();
    eprintln!(
        "figures: writes unavailable for {} after SIGKILL of the leader's postmaster, until a new session committed \
         ({orphan} inserts sent after the kill were still committed by the orphaned backend; gap across the kill {}, longest gap {})",
        secs(unavailable),
        gap_across(&report, killed).map_or("-".into(), secs),
        report.longest_gap().map_or("-".into(), |g| secs(g.length())),
    );
    Ok(())
}
