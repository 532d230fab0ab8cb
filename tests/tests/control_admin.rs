//! Maintenance through pgherdctl: pause stops automatic failover until resume; a manual
//! failover names the new leader when the old one is dead (and is refused while it lives);
//! reinit clones a replica again (never the leader); disruptive commands need --force when
//! nobody can answer the confirmation.
//!
//! Switchovers are in `control.rs`.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use pgherd_tests::{
    current_wal_lsn, hold_no_takeover, same_key, sql_batch, sql_value, timeline, wait_replayed,
    wait_streaming_from, wait_until, Cluster, ListedMember, Writer,
};
use tokio::time::Instant;

const BRINGUP: Duration = Duration::from_secs(90);
/// Lease expiry (ttl 4) plus election and promotion, with room for a loaded machine.
const FAILOVER: Duration = Duration::from_secs(60);
/// A member cloning again or rejoining.
const REJOIN: Duration = Duration::from_secs(90);
const REPLICATION: Duration = Duration::from_secs(30);
/// The harness's lease TTL (`bootstrap.dcs.ttl`).
const TTL: Duration = Duration::from_secs(4);

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

fn paused(row: &ListedMember) -> Option<bool> {
    row.other.get("paused").and_then(|v| v.as_bool())
}

/// Waits until every listed member shows `paused` as `want`.
async fn wait_paused(cluster: &Cluster, want: bool) -> Result<()> {
    wait_until(
        REPLICATION,
        format!("every listed member to show paused: {want}"),
        || async {
            let list = cluster.list().await?;
            ensure!(!list.is_empty(), "no member is listed");
            for row in &list {
                ensure!(
                    paused(row) == Some(want),
                    "{} shows paused: {:?}",
                    row.name,
                    paused(row)
                );
            }
            Ok(())
        },
    )
    .await
}

/// `pgherdctl list` as a table.
async fn list_table(cluster: &Cluster) -> Result<String> {
    let out = cluster.ctl_output(&["list"]).await?;
    out.expect_success()?;
    Ok(out.stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_paused_a_crashed_leader_is_not_replaced_and_resume_lets_a_replica_take_over(
) -> Result<()> {
    let cluster = Cluster::builder().members(3).configure().await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    let old = cluster.member("node1");
    let history_before = cluster.history().await?.len();
    let replicas = cluster.others("node1");
    let mut probes = Vec::new();
    for r in &replicas {
        probes.push(Writer::probe(&cluster, r).await?);
    }

    let out = cluster.ctl_output(&["pause"]).await?;
    out.expect_success()?;
    wait_paused(&cluster, true).await?;
    let table = list_table(&cluster).await?;
    ensure!(
        table.contains("Maintenance mode: on"),
        "`pgherdctl list` does not show maintenance mode:\n{table}"
    );

    old.crash()?;
    let killed = Instant::now();
    hold_no_takeover(
        &cluster,
        "node1",
        &probes,
        killed,
        TTL * 3,
        "no new leader and no writable member while paused",
    )
    .await?;
    ensure!(
        cluster.history().await?.len() == history_before,
        "a promotion was recorded while paused"
    );
    let table = list_table(&cluster).await?;
    ensure!(
        table.contains("Maintenance mode: on"),
        "`pgherdctl list` without a leader does not show maintenance mode:\n{table}"
    );
    wait_paused(&cluster, true).await?;

    let out = cluster.ctl_output(&["resume"]).await?;
    out.expect_success().context("resume without a leader")?;
    let resumed = Instant::now();
    let new = cluster.wait_new_leader("node1", FAILOVER).await?;
    let took_over = resumed.elapsed();
    let probe = &probes[replicas
        .iter()
        .position(|m| m.name() == new)
        .context("the new leader is one of the replicas")?];
    probe.wait_ack_sent_after(resumed, FAILOVER).await?;
    wait_paused(&cluster, false).await?;
    cluster.wait_healthy(REPLICATION).await?;
    eprintln!(
        "figures: no takeover for {} after the crash while paused; resume said {:?}; {new} led {} after resume",
        secs(TTL * 3),
        out.stdout.trim(),
        secs(took_over)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_failover_is_refused_while_the_leader_is_healthy_and_promotes_the_named_replica_once_it_is_dead(
) -> Result<()> {
    let cluster = Cluster::builder().members(3).configure().await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    let old = cluster.member("node1");
    let chosen = cluster.member("node3");
    let key = cluster.leader_key().await?;
    let old_timeline = timeline(old).await?;

    let refused = cluster
        .ctl_output(&["failover", "--candidate", "node3", "--force"])
        .await?;
    refused.expect_failure(1, &["switchover"])?;
    ensure!(
        same_key(&cluster.leader_key().await?, &key),
        "the leader key changed after a refused failover"
    );
    ensure!(
        cluster.etcd_get("switchover").await?.is_none(),
        "a refused failover left a switchover key"
    );

    // Paused, so that nobody takes over on their own.
    cluster.ctl_output(&["pause"]).await?.expect_success()?;
    wait_paused(&cluster, true).await?;
    old.crash()?;
    wait_until(FAILOVER, "the dead leader's key to expire", || async {
        let holder = cluster.leader_name().await?;
        ensure!(holder.is_none(), "the leader key still names {holder:?}");
        Ok(())
    })
    .await?;

    let out = cluster
        .ctl_output(&["failover", "--candidate", "node3", "--force"])
        .await?;
    out.expect_success()?;
    ensure!(
        cluster.leader_name().await?.as_deref() == Some("node3"),
        "pgherdctl said {:?} but the leader key names {:?}",
        out.stdout.trim(),
        cluster.leader_name().await?
    );
    let new_timeline = timeline(chosen).await?;
    ensure!(
        new_timeline > old_timeline,
        "node3 writes on timeline {new_timeline}, not after {old_timeline}"
    );
    sql_batch(
        chosen,
        "CREATE TABLE after_failover (id int); INSERT INTO after_failover VALUES (1)",
    )
    .await
    .context("node3 does not take writes after the manual failover")?;
    wait_streaming_from(cluster.member("node2"), chosen, new_timeline, REPLICATION).await?;

    cluster.ctl_output(&["resume"]).await?.expect_success()?;
    let healthy = cluster.wait_healthy(REPLICATION).await?;
    ensure!(healthy.leader == "node3", "{healthy:?}");
    eprintln!(
        "figures: refused with {:?}; manual failover took pgherdctl {} and said {:?}",
        refused.stderr.trim(),
        secs(out.took),
        out.stdout.trim()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reinit_clones_a_replica_again_and_is_refused_for_the_leader() -> Result<()> {
    let cluster = Cluster::builder().members(3).configure().await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    let leader = cluster.member("node1");
    let replica = cluster.member("node3");
    sql_batch(
        leader,
        "CREATE TABLE before_reinit AS SELECT g AS id FROM generate_series(1, 1000) g",
    )
    .await?;
    wait_replayed(replica, current_wal_lsn(leader).await?, REPLICATION).await?;
    let marker = replica.data_dir().join("pgherd-test-marker");
    std::fs::write(&marker, "left by the test; a re-clone removes it\n")
        .with_context(|| format!("cannot write {}", marker.display()))?;
    let old_postmaster = replica.postmaster_pid();
    let key = cluster.leader_key().await?;

    let started = Instant::now();
    let out = cluster.ctl_output(&["reinit", "node3", "--force"]).await?;
    out.expect_success()?;
    wait_until(REJOIN, "node3 to be cloned again", || async {
        ensure!(!marker.exists(), "{} is still there", marker.display());
        ensure!(
            replica.postmaster_pid().is_some() && replica.postmaster_pid() != old_postmaster,
            "node3's PostgreSQL was not restarted"
        );
        Ok(())
    })
    .await?;
    let tl = timeline(leader).await?;
    wait_streaming_from(replica, leader, tl, REJOIN).await?;
    let cloned = started.elapsed();
    cluster.wait_healthy(REPLICATION).await?;
    sql_batch(leader, "INSERT INTO before_reinit VALUES (1001)").await?;
    wait_replayed(replica, current_wal_lsn(leader).await?, REPLICATION).await?;
    let rows: i64 = sql_value(replica, "SELECT count(*) FROM before_reinit").await?;
    ensure!(
        rows == 1001,
        "node3 has {rows} rows of 1001 after its re-clone"
    );
    let log = replica.agent_log();
    ensure!(
        log.contains("removing data directory contents"),
        "node3's agent log does not say why its data directory was removed"
    );

    let leader_postmaster = leader.postmaster_pid();
    let refused = cluster.ctl_output(&["reinit", "node1", "--force"]).await?;
    refused.expect_failure(1, &["leader"])?;
    ensure!(
        leader.postmaster_pid() == leader_postmaster && leader_postmaster.is_some(),
        "the leader's PostgreSQL was touched by a refused reinit"
    );
    ensure!(
        same_key(&cluster.leader_key().await?, &key),
        "the leader key changed"
    );
    eprintln!(
        "figures: reinit said {:?}; node3 streamed again {} after the request; reinit of the leader: {:?}",
        out.stdout.trim(),
        secs(cloned),
        refused.stderr.trim()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disruptive_commands_without_force_and_without_a_terminal_exit_2_and_change_nothing(
) -> Result<()> {
    let cluster = Cluster::builder().members(3).configure().await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    let replica = cluster.member("node3");
    let marker = replica.data_dir().join("pgherd-test-marker");
    std::fs::write(&marker, "must survive a reinit without --force\n")
        .with_context(|| format!("cannot write {}", marker.display()))?;
    let key = cluster.leader_key().await?;
    let postmasters: Vec<Option<i32>> = cluster
        .members()
        .iter()
        .map(|m| m.postmaster_pid())
        .collect();
    let config_before = cluster.ctl_output(&["show-config"]).await?;
    config_before.expect_success()?;

    let commands: [&[&str]; 6] = [
        &["switchover", "--candidate", "node2"],
        &["failover", "--candidate", "node2"],
        &["restart", "node2"],
        &["restart", "--all"],
        &["reinit", "node3"],
        &["edit-config", "--set", "loop_wait=2"],
    ];
    let mut messages = Vec::new();
    for args in commands {
        let out = cluster.ctl_output(args).await?;
        out.expect_failure(2, &["--force", "terminal"])?;
        messages.push(out.stderr.trim().to_string());
    }

    // Give a change that slipped through the time to show.
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(
        same_key(&cluster.leader_key().await?, &key),
        "the leader key changed"
    );
    ensure!(
        cluster.etcd_get("switchover").await?.is_none(),
        "a switchover key appeared"
    );
    let now: Vec<Option<i32>> = cluster
        .members()
        .iter()
        .map(|m| m.postmaster_pid())
        .collect();
    ensure!(
        now == postmasters,
        "a PostgreSQL was restarted: postmasters {postmasters:?} -> {now:?}"
    );
    ensure!(marker.exists(), "node3's data directory was removed");
    let config_after = cluster.ctl_output(&["show-config"]).await?;
    ensure!(
        config_after.stdout == config_before.stdout,
        "the configuration changed:\n{}\n->\n{}",
        config_before.stdout,
        config_after.stdout
    );
    cluster.wait_healthy(REPLICATION).await?;
    eprintln!("figures: refusals: {}", messages.join(" | "));
    Ok(())
}
