//! Who may be promoted when the leader dies (rule 4 of docs/architecture.md): never a member tagged
//! `nofailover`, never one further behind the leader's last published position than
//! `maximum_lag_on_failover`; among equally advanced members the higher
//! `failover_priority` wins.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use pgherd_tests::{
    current_wal_lsn, hold_no_takeover, lag_behind, receive_lsn, replay_lsn, wait_until, Cluster,
    Member, MemberOptions, Writer,
};
use tokio::time::Instant;

const BRINGUP: Duration = Duration::from_secs(90);
const FAILOVER: Duration = Duration::from_secs(60);
const REPLICATION: Duration = Duration::from_secs(30);
/// The harness's lease TTL (`bootstrap.dcs.ttl`).
const TTL: Duration = Duration::from_secs(4);
/// Small enough that a few MB of WAL put a replica out of the running.
const MAX_LAG: u64 = 65536;

/// Starts `first` alone until it leads, then the others: the leader is known in advance.
async fn start_with_leader(cluster: &Cluster, first: &str) -> Result<()> {
    cluster.member(first).start()?;
    let healthy = cluster.wait_healthy(BRINGUP).await?;
    ensure!(healthy.leader == first, "{healthy:?}");
    cluster.start_all()?;
    let healthy = cluster.wait_healthy(BRINGUP).await?;
    ensure!(healthy.leader == first, "{healthy:?}");
    Ok(())
}

/// The `decision` field `pgherdctl list` shows for `member`.
async fn listed_decision(cluster: &Cluster, member: &Member) -> Result<String> {
    let list = cluster.list().await?;
    let row = list
        .iter()
        .find(|m| m.name == member.name())
        .with_context(|| format!("{} is not listed", member.name()))?;
    Ok(row
        .other
        .get("decision")
        .and_then(|d| d.as_str())
        .unwrap_or_default()
        .to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nofailover_and_lagging_replicas_are_not_promoted() -> Result<()> {
    let cluster = Cluster::builder()
        .yaml(format!(
            "bootstrap: {{dcs: {{maximum_lag_on_failover: {MAX_LAG}}}}}"
        ))
        .member(MemberOptions::new().name("node1"))
        .member(MemberOptions::new().name("node2").tag("nofailover", true))
        .member(MemberOptions::new().name("node3"))
        .configure()
        .await?;
    start_with_leader(&cluster, "node1").await?;
    let (leader, nofailover, lagging) = (
        cluster.member("node1"),
        cluster.member("node2"),
        cluster.member("node3"),
    );
    let probes = [
        Writer::probe(&cluster, nofailover).await?,
        Writer::probe(&cluster, lagging).await?,
    ];

    // node3 falls behind: its WAL receiver frozen, it receives nothing more while the
    // leader writes a few MB and publishes its position.
    let (frozen, written) = lag_behind(leader, lagging).await?;
    let behind = wait_until(
        REPLICATION,
        format!("optime/leader to reach {written} with node3 more than {MAX_LAG} bytes behind"),
        || async {
            let optime = cluster.leader_optime().await?.context("no optime/leader")?;
            ensure!(optime >= written, "optime/leader is {optime}");
            let received = receive_lsn(lagging)
                .await?
                .context("node3 reports no receive LSN")?;
            let lag = optime.0.saturating_sub(received.0);
            ensure!(lag > MAX_LAG, "node3 is only {lag} bytes behind");
            Ok(lag)
        },
    )
    .await?;
    let nofailover_at = replay_lsn(nofailover).await?;

    let history_before = cluster.history().await?.len();
    let killed = Instant::now();
    leader.crash()?;
    // Safe without a candidate: no member takes the key, none takes writes.
    hold_no_takeover(
        &cluster,
        "node1",
        &probes,
        killed,
        TTL * 3,
        "no leader key and no writable member after the leader died",
    )
    .await?;
    ensure!(
        cluster.history().await?.len() == history_before,
        "a promotion was recorded in history"
    );
    let why_not = wait_until(
        REPLICATION,
        "the replicas to say why they do not take over",
        || async {
            let n2 = listed_decision(&cluster, nofailover).await?;
            let n3 = listed_decision(&cluster, lagging).await?;
            ensure!(
                n2.contains("nofailover"),
                "node2's decision does not mention nofailover: {n2:?}"
            );
            ensure!(
                n3.contains("maximum_lag_on_failover"),
                "node3's decision does not mention maximum_lag_on_failover: {n3:?}"
            );
            Ok((n2, n3))
        },
    )
    .await?;
    frozen.resume()?;
    eprintln!(
        "figures: node3 was {behind} bytes behind (limit {MAX_LAG}), node2 (nofailover) had replayed {:?}; \
         no takeover for {} s after the kill; decisions: node2: {:?}; node3: {:?}",
        nofailover_at.map(|l| l.to_string()),
        (TTL * 3).as_secs(),
        why_not.0,
        why_not.1
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_with_a_priority_tie_prefers_the_higher_failover_priority() -> Result<()> {
    // node3 would lose a tie on name to node2; its priority must win it.
    let cluster = Cluster::builder()
        .member(MemberOptions::new().name("node1"))
        .member(MemberOptions::new().name("node2"))
        .member(
            MemberOptions::new()
                .name("node3")
                .tag("failover_priority", 5),
        )
        .configure()
        .await?;
    start_with_leader(&cluster, "node1").await?;
    let leader = cluster.member("node1");
    let replicas = [cluster.member("node2"), cluster.member("node3")];

    // No writes: both replicas reach the leader's position, and publish it.
    let position = wait_until(
        REPLICATION,
        "both replicas at the leader's WAL position, in PostgreSQL and in etcd",
        || async {
            let lsn = current_wal_lsn(leader).await?;
            for r in replicas {
                let received = receive_lsn(r).await?;
                let replayed = replay_lsn(r).await?;
                ensure!(
                    received == Some(lsn) && replayed == Some(lsn),
                    "{} received {received:?} replayed {replayed:?}, leader at {lsn}",
                    r.name()
                );
            }
            let list = cluster.list().await?;
            let published: Vec<(Option<String>, Option<String>)> = replicas
                .iter()
                .map(|r| {
                    list.iter()
                        .find(|m| m.name == r.name())
                        .map(|m| {
                            let field = |k: &str| {
                                m.other.get(k).and_then(|v| v.as_str()).map(str::to_string)
                            };
                            (field("receive_lsn"), field("replay_lsn"))
                        })
                        .unwrap_or((None, None))
                })
                .collect();
            let want = (Some(lsn.to_string()), Some(lsn.to_string()));
            ensure!(
                published.iter().all(|p| *p == want),
                "published positions {published:?}, leader at {lsn}"
            );
            Ok(lsn)
        },
    )
    .await?;

    leader.crash()?;
    let new = cluster.wait_new_leader("node1", FAILOVER).await?;
    ensure!(
        new == "node3",
        "{new} was promoted although node3 (failover_priority 5) was as far ahead ({position})"
    );
    let node2 = listed_decision(&cluster, cluster.member("node2")).await?;
    eprintln!(
        "figures: both replicas at {position}; node3 promoted; node2's decision was: {node2:?}"
    );
    Ok(())
}
