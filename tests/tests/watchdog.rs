//! The fencing watchdog around the agent (rule 3 of docs/architecture.md, issue 12 items 6 and 11):
//! it guards PostgreSQL for as long as it may accept writes, also after the lease is gone and
//! before PostgreSQL has stopped; when the agent dies (its node lives) it fences PostgreSQL
//! and then revokes the leader lease, so a replica takes over at once; when the agent is only
//! frozen, the key stays until the lease runs out.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use pgherd_tests::{
    current_wal_lsn, hold_for, missing_rows, wait_replayed, wait_until, Cluster, Writer,
};
use tokio::time::Instant;

const BRINGUP: Duration = Duration::from_secs(120);
const REPLICATION: Duration = Duration::from_secs(30);
const FAILOVER: Duration = Duration::from_secs(60);
/// The harness's lease TTL (`bootstrap.dcs.ttl`).
const TTL: Duration = Duration::from_secs(4);

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

/// Item 6: the leader's key is taken from it (here: deleted) and its agent freezes right
/// after it dropped its lease, before it could stop PostgreSQL. The watchdog must stay
/// armed with the old deadline and kill the postmaster by then; before the fix dropping the
/// lease disarmed it and the primary stayed writable for as long as the agent was frozen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_frozen_right_after_losing_its_key_is_fenced_by_the_old_deadline() -> Result<()> {
    let cluster = Cluster::builder().members(3).configure().await?;
    let old = &cluster.members()[0];
    old.start_with_failpoints(&["leader-lease-dropped"])?;
    let healthy = cluster.wait_healthy(BRINGUP).await?;
    ensure!(healthy.leader == old.name(), "{healthy:?}");
    cluster.start_all()?;
    let healthy = cluster.wait_healthy(BRINGUP).await?;
    ensure!(healthy.leader == old.name(), "{healthy:?}");
    let postmaster = old
        .postmaster_pid()
        .context("the leader has no postmaster")?;

    // "The leader key no longer carries my lease": the agent drops its lease, then freezes.
    let fault = Instant::now();
    let mut etcd = cluster.etcd().client().await?;
    etcd.delete(format!("{}leader", cluster.prefix()), None)
        .await
        .context("cannot delete the leader key")?;
    old.wait_failpoint("leader-lease-dropped", Duration::from_secs(10))
        .await?;
    ensure!(
        pgherd_tests::is_alive(postmaster),
        "{}'s postmaster {postmaster} died before the agent froze: the window was not hit",
        old.name()
    );
    // Its deadline ran from its last renewal, before the fault: at most a ttl later.
    let limit = TTL + Duration::from_secs(2);
    wait_until(
        limit.saturating_sub(fault.elapsed()),
        format!(
            "{}'s postmaster {postmaster} to be fenced by its old lease deadline",
            old.name()
        ),
        || async move {
            ensure!(
                !pgherd_tests::is_alive(postmaster),
                "postmaster {postmaster} still runs"
            );
            Ok(())
        },
    )
    .await?;
    let fenced = fault.elapsed();
    let new_leader = cluster.wait_new_leader(old.name(), FAILOVER).await?;
    eprintln!(
        "figures: leader key deleted -> {}'s agent froze after dropping its lease; its postmaster was fenced {} after the fault (ttl {}); {new_leader} leads",
        old.name(),
        secs(fenced),
        secs(TTL)
    );
    Ok(())
}

/// Item 11: SIGKILL of the leader's agent alone (the node lives). Its watchdog fences
/// PostgreSQL and then revokes the leader lease, so a replica holds the key well before the
/// ttl (10 s here) and nothing replicated before the kill is lost. Then SIGSTOP of the new
/// leader's agent: its pipe stays open, so the key is not taken before the lease's deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_agent_hands_over_at_once_and_a_frozen_one_only_at_its_deadline(
) -> Result<()> {
    let ttl = Duration::from_secs(10);
    let cluster = Cluster::builder()
        .members(3)
        .yaml("bootstrap: {dcs: {ttl: 10, loop_wait: 1, retry_timeout: 3}}")
        .start()
        .await?;
    let healthy = cluster.wait_healthy(BRINGUP).await?;
    let old = cluster.member(&healthy.leader);
    let postmaster = old
        .postmaster_pid()
        .context("the leader has no postmaster")?;

    let writer = Writer::start(&cluster).await?;
    let table = writer.report().table;
    writer.wait_acks(50, REPLICATION).await?;
    // Everything acknowledged by `cut` is on both replicas once they replayed `lsn`.
    let cut = Instant::now();
    let lsn = current_wal_lsn(old).await?;
    for replica in cluster.others(old.name()) {
        wait_replayed(replica, lsn, REPLICATION).await?;
    }

    old.kill()?;
    let killed = Instant::now();
    let new_name = wait_until(
        FAILOVER,
        format!("a member other than {} to hold the leader key", old.name()),
        || async {
            let leader = cluster.leader_name().await?;
            ensure!(
                leader.as_deref().is_some_and(|l| l != old.name()),
                "the leader key is {leader:?}"
            );
            Ok(leader.unwrap_or_default())
        },
    )
    .await?;
    let took_over = killed.elapsed();
    ensure!(
        took_over < Duration::from_secs(5),
        "{new_name} took the leader key {} after {}'s agent was killed: not well before the ttl of {}",
        secs(took_over),
        old.name(),
        secs(ttl)
    );
    ensure!(
        !pgherd_tests::is_alive(postmaster),
        "{}'s postmaster {postmaster} still runs after its agent died",
        old.name()
    );
    let log = old.agent_log_of_last_start();
    ensure!(
        log.contains("revoked leader lease"),
        "{}'s watchdog did not log that it revoked the leader lease:\n{log}",
        old.name()
    );
    let resumed = writer.wait_ack_sent_after(killed, FAILOVER).await?;
    let report = writer.stop().await;
    let before_cut = report.acked_before(cut);
    let new = cluster.member(&new_name);
    let missing = missing_rows(new, &table, &before_cut).await?;
    ensure!(
        missing.is_empty(),
        "{} of {} rows acknowledged and replicated before the kill are missing on {new_name}: {missing:?}",
        missing.len(),
        before_cut.len()
    );
    let unchecked = report.acked_between(cut, killed);
    let unchecked_missing = missing_rows(new, &table, &unchecked).await?;
    eprintln!(
        "figures: SIGKILL of {}'s agent -> {new_name} held the leader key after {}, first write acknowledged after {}; \
         {} rows acknowledged before the replication check, none lost; {} acknowledged between check and kill, {} of them lost",
        old.name(),
        secs(took_over),
        secs(resumed.acked.instant.saturating_duration_since(killed)),
        before_cut.len(),
        unchecked.len(),
        unchecked_missing.len()
    );

    // A frozen agent keeps its watchdog's pipe open: no revoke, the key stays until the
    // lease's deadline (ttl minus the safety margin after its last renewal).
    cluster.wait_healthy(FAILOVER).await?;
    let frozen = new.pause_agent()?;
    let paused = Instant::now();
    let hold = ttl - Duration::from_secs(4);
    hold_for(
        hold,
        format!("the leader key to keep naming {new_name} while its agent is frozen"),
        || async {
            let leader = cluster.leader_name().await?;
            ensure!(
                leader.as_deref() == Some(new_name.as_str()),
                "the leader key is {leader:?} {} after {new_name}'s agent was frozen",
                secs(paused.elapsed())
            );
            Ok(())
        },
    )
    .await?;
    let next = cluster.wait_new_leader(&new_name, FAILOVER).await?;
    let taken = paused.elapsed();
    ensure!(
        taken >= hold,
        "{next} took the key {} after the freeze",
        secs(taken)
    );
    drop(frozen);
    eprintln!(
        "figures: SIGSTOP of {new_name}'s agent -> the key stayed {} and more; {next} leads {} after the freeze",
        secs(hold),
        secs(taken)
    );
    Ok(())
}
