//! Failsafe mode (issue 15 item 4, `failsafe_mode: true`): with etcd down for everyone the
//! leader stays writable while every member accepts it and nobody promotes; when a member
//! cannot answer, or when only the leader lost etcd, the leader stops taking writes before
//! its lease could have expired, as without failsafe mode. Failsafe mode off is
//! `fencing::with_etcd_stopped_no_member_stays_writable_past_the_lease_and_the_cluster_recovers`.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use pgherd_tests::{
    ensure_acked_rows_on, hold_for, in_recovery, timeline, wait_streaming_from, wait_until,
    Cluster, MemberOptions, Stamp, Writer,
};
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(6);
const BRINGUP: Duration = Duration::from_secs(90);
const RECOVERY: Duration = Duration::from_secs(60);
const REPLICATION: Duration = Duration::from_secs(30);
/// The longest a client may wait between two acknowledged writes while the leader stays.
const MAX_GAP: Duration = Duration::from_secs(2);

const FAILSAFE_YAML: &str = "bootstrap:\n  dcs:\n    ttl: 6\n    failsafe_mode: true\n";

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

/// A cluster of three with failsafe mode on, healthy, whose leader has written the
/// `failsafe` key naming every member.
async fn failsafe_cluster(through_proxy: bool) -> Result<Cluster> {
    let mut b = Cluster::builder().yaml(FAILSAFE_YAML);
    for _ in 0..3 {
        let m = MemberOptions::new();
        b = b.member(if through_proxy {
            m.through_etcd_proxy()
        } else {
            m
        });
    }
    let cluster = b.start().await?;
    let healthy = cluster.wait_healthy(BRINGUP).await?;
    wait_until(
        REPLICATION,
        "the leader writes the failsafe key naming all three",
        || async {
            let v = cluster.etcd_get("failsafe").await?.unwrap_or_default();
            let ok = v.contains(&format!("\"leader\":\"{}\"", healthy.leader))
                && cluster
                    .members()
                    .iter()
                    .all(|m| v.contains(&format!("\"{}\"", m.name())));
            ensure!(ok, "the failsafe key is {v:?}");
            Ok(())
        },
    )
    .await?;
    Ok(cluster)
}

/// The longest time between two consecutive acknowledgements in `[from, to]`.
fn longest_gap(acks: &[pgherd_tests::Ack], from: Instant, to: Instant) -> Duration {
    let mut prev = from;
    let mut gap = Duration::ZERO;
    for a in acks
        .iter()
        .filter(|a| a.acked.instant >= from && a.acked.instant <= to)
    {
        gap = gap.max(a.acked.instant - prev);
        prev = a.acked.instant;
    }
    gap.max(to.saturating_duration_since(prev))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_down_for_three_ttls_the_leader_keeps_writing_nobody_promotes_and_the_cluster_is_normal_after(
) -> Result<()> {
    let cluster = failsafe_cluster(false).await?;
    let leader = cluster.leader().await?;
    let tl = timeline(leader).await?;
    let writer = Writer::start(&cluster).await?;
    writer.wait_acks(20, REPLICATION).await?;

    let stopped = Stamp::now();
    cluster.etcd().stop().await?;
    let outage = 3 * TTL;
    hold_for(
        outage,
        "the leader acknowledging writes and every replica staying a standby",
        || async {
            let r = writer.report();
            let last = r.last_ack().context("no write acknowledged")?;
            ensure!(
                last.acked.instant.elapsed() < MAX_GAP + Duration::from_millis(500),
                "no write acknowledged for {} (etcd stopped {} ago)",
                secs(last.acked.instant.elapsed()),
                secs(stopped.instant.elapsed())
            );
            for m in cluster.others(leader.name()) {
                ensure!(
                    in_recovery(m).await?,
                    "{} promoted while etcd was down",
                    m.name()
                );
            }
            Ok(())
        },
    )
    .await?;
    let outage_end = Instant::now();
    // What the members say while it lasts.
    let fs = leader.http_get("/failsafe").await?;
    ensure!(
        fs.status == 200
            && fs.body.contains("\"failsafe_mode\":true")
            && fs.body.contains("\"active\":true"),
        "the leader's /failsafe: {}",
        fs.body
    );
    for m in cluster.others(leader.name()) {
        let fs = m.http_get("/failsafe").await?;
        ensure!(
            fs.body
                .contains(&format!("\"leader\":\"{}\"", leader.name())),
            "{}'s /failsafe names no accepted leader: {}",
            m.name(),
            fs.body
        );
    }

    let restarted = Instant::now();
    cluster.etcd().restart().await?;
    let healthy = cluster.wait_healthy(RECOVERY).await?;
    ensure!(
        healthy.leader == leader.name(),
        "after etcd returned {} leads, not {}",
        healthy.leader,
        leader.name()
    );
    ensure!(timeline(leader).await? == tl, "the leader changed timeline");
    for m in cluster.others(leader.name()) {
        wait_streaming_from(m, leader, tl, REPLICATION).await?;
    }
    let after = writer
        .wait_ack_sent_after(Instant::now(), REPLICATION)
        .await?;
    let report = writer.stop().await;
    let gap = longest_gap(&report.acks, stopped.instant, outage_end);
    ensure!(
        gap <= MAX_GAP,
        "the longest pause between acknowledged writes while etcd was down was {}",
        secs(gap)
    );
    let gap_return = longest_gap(&report.acks, restarted, after.acked.instant);
    ensure_acked_rows_on(leader, &report).await?;
    let during = report.acked_between(stopped.instant, outage_end).len();
    eprintln!(
        "figures: etcd stopped {}: {} writes acknowledged meanwhile, longest pause {}; etcd back -> healthy after {}, longest pause {}; {} rows acknowledged, all on the leader",
        secs(outage),
        during,
        secs(gap),
        secs(healthy_after(restarted)),
        secs(gap_return),
        report.acks.len()
    );
    Ok(())
}

fn healthy_after(t: Instant) -> Duration {
    t.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_down_and_one_replica_agent_dead_the_leader_stops_writes_before_its_lease_could_expire(
) -> Result<()> {
    let cluster = failsafe_cluster(false).await?;
    let leader = cluster.leader().await?;
    let replicas = cluster.others(leader.name());
    let (dead, live) = (replicas[0], replicas[1]);
    let writer = Writer::start(&cluster).await?;
    writer.wait_acks(20, REPLICATION).await?;

    // The dead agent's member key is still in etcd (its lease lives a TTL) when etcd stops:
    // the leader's last view names it, so it must ask it.
    dead.kill()?;
    cluster.etcd().stop().await?;
    // No renewal can succeed once etcd has exited: the lease expires by then + ttl.
    let etcd_gone = Stamp::now();
    let expiry = etcd_gone.instant + TTL;
    hold_for(2 * TTL, "the live replica staying a standby", || async {
        ensure!(
            in_recovery(live).await?,
            "{} promoted while etcd was down",
            live.name()
        );
        Ok(())
    })
    .await?;
    let report = writer.stop().await;
    let last = report.last_ack().context("no write acknowledged")?;
    ensure!(
        last.acked.instant < expiry,
        "the leader acknowledged a write {} after etcd stopped, past its lease ({})",
        secs(last.acked.instant - etcd_gone.instant),
        secs(TTL)
    );
    let log = leader.agent_log();
    ensure!(
        log.lines()
            .any(|l| l.contains("failsafe mode refused") && l.contains(dead.name())),
        "the leader's log does not say that {} did not answer:\n{}",
        dead.name(),
        leader.log_tails(40)
    );
    eprintln!(
        "figures: etcd stopped with {}'s agent dead -> leader's last write acknowledged {} after (lease at most {})",
        dead.name(),
        secs(last.acked.instant.saturating_duration_since(etcd_gone.instant)),
        secs(TTL)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_only_the_leader_cut_off_from_etcd_the_replicas_refuse_and_one_takes_over_losing_nothing(
) -> Result<()> {
    let cluster = failsafe_cluster(true).await?;
    let old = cluster.leader().await?;
    let writer = Writer::start(&cluster).await?;
    writer.wait_acks(20, REPLICATION).await?;

    let proxy = old
        .etcd_proxy()
        .context("members were built with a proxy")?;
    let cut = Stamp::now();
    proxy.sever();
    let new = cluster.wait_new_leader(old.name(), RECOVERY).await?;
    let new = cluster.member(&new);
    let new_port = i32::from(new.pg_port());
    wait_until(
        RECOVERY,
        "a write acknowledged by the new leader",
        || async {
            ensure!(
                writer.report().acks.iter().any(|a| a.port == new_port),
                "none yet"
            );
            Ok(())
        },
    )
    .await?;
    let report = writer.stop().await;
    let old_port = i32::from(old.pg_port());
    let old_last = report
        .acks
        .iter()
        .rfind(|a| a.port == old_port)
        .context("the old leader never acknowledged a write")?;
    ensure!(
        old_last.acked.instant < cut.instant + TTL,
        "the old leader acknowledged a write {} after it lost etcd, past its lease ({})",
        secs(old_last.acked.instant - cut.instant),
        secs(TTL)
    );
    let first = report
        .acks
        .iter()
        .find(|a| a.port == new_port)
        .context("the new leader acknowledged nothing")?;
    ensure!(
        first.sent.instant > old_last.acked.instant,
        "the new leader acknowledged a write sent before the old leader's last one"
    );
    let log = old.agent_log();
    ensure!(
        log.contains("I can read etcd"),
        "the old leader's log shows no refusal from a replica that reads etcd:\n{}",
        old.log_tails(40)
    );
    ensure_acked_rows_on(new, &report).await?;
    proxy.heal();
    eprintln!(
        "figures: leader cut off from etcd -> its last write acknowledged {} after; {} leads; {} rows acknowledged, all on it",
        secs(old_last.acked.instant.saturating_duration_since(cut.instant)),
        new.name(),
        report.acks.len()
    );
    Ok(())
}

/// An acceptance lives in the agent's memory. A member whose agent restarts during an
/// outage that keeps the members, not etcd, away (the leader's lease expires in etcd while
/// the members' acceptances keep it writable) must not take the vacant key when it reaches
/// etcd again while the old leader may still write: it holds back a ttl from its start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_restarted_during_a_failsafe_outage_does_not_take_the_key_while_the_old_leader_may_write(
) -> Result<()> {
    let cluster = failsafe_cluster(true).await?;
    let old = cluster.leader().await?;
    let replicas = cluster.others(old.name());
    let (restarted, other) = (replicas[0], replicas[1]);
    let writer = Writer::start(&cluster).await?;
    writer.wait_acks(20, REPLICATION).await?;
    for m in cluster.members() {
        m.etcd_proxy()
            .context("members were built with a proxy")?
            .sever();
    }
    // etcd runs on: the leader's lease expires there and the key goes.
    wait_until(RECOVERY, "the leader key to expire in etcd", || async {
        ensure!(cluster.etcd_get("leader").await?.is_none(), "still there");
        Ok(())
    })
    .await?;
    ensure!(
        !in_recovery(old).await?,
        "the old leader stopped although every member accepted it"
    );
    restarted.kill()?;
    restarted.start()?;
    restarted
        .etcd_proxy()
        .context("members were built with a proxy")?
        .heal();
    // Until the old leader has stopped, nobody else may be writable.
    let writable = || async {
        let mut n = Vec::new();
        for m in cluster.members() {
            if let Ok(false) = in_recovery(m).await {
                n.push(m.name().to_string());
            }
        }
        Ok::<_, anyhow::Error>(n)
    };
    let deadline = Instant::now() + 3 * TTL;
    while Instant::now() < deadline {
        let w = writable().await?;
        ensure!(w.len() <= 1, "two writable members at once: {w:?}");
        if w.is_empty() || w[0] != old.name() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    hold_for(TTL, "one writable member at most", || async {
        let w = writable().await?;
        ensure!(w.len() <= 1, "two writable members at once: {w:?}");
        Ok(())
    })
    .await?;
    let log = restarted.agent_log_of_last_start();
    ensure!(
        log.contains("may have accepted that leader in failsafe mode before"),
        "the restarted agent did not hold back:\n{}",
        restarted.log_tails(40)
    );
    for m in cluster.members() {
        m.etcd_proxy()
            .context("members were built with a proxy")?
            .heal();
    }
    let _ = writer.stop().await;
    let _ = other;
    Ok(())
}
