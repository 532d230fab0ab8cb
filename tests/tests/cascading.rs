//! Cascading replication (issue 17 item 1) on a real cluster: a replica tagged
//! `replicatefrom` streams from that member through a slot the member holds for it, follows
//! the leader while that member is down, and returns once it streams again; the leader's
//! slot for it follows the position it reports instead of holding WAL.

use std::time::Duration;

use anyhow::{ensure, Result};
use pgherd_tests::{
    sender_port, sql_value, wait_acked_rows_on, wait_until, Cluster, Member, MemberOptions, Writer,
};

/// initdb, PostgreSQL starts and clones on a 2-core machine shared with other tests.
const BRINGUP: Duration = Duration::from_secs(120);

async fn wait_streams_from(member: &Member, upstream: &Member) -> Result<()> {
    wait_until(
        BRINGUP,
        format!("{} to stream from {}", member.name(), upstream.name()),
        || async {
            let port = sender_port(member).await?;
            ensure!(port == upstream.pg_port(), "it streams from port {port}");
            Ok(())
        },
    )
    .await
}

/// Rows acknowledged by a writer on the leader, all found on `member`.
async fn rows_reach(cluster: &Cluster, member: &Member) -> Result<()> {
    let writer = Writer::start(cluster).await?;
    writer.wait_acks(20, BRINGUP).await?;
    let report = writer.stop().await;
    wait_acked_rows_on(member, &report, BRINGUP).await?;
    Ok(())
}

/// The slot named `slot` on `member`: (active, restart_lsn).
async fn slot(member: &Member, slot: &str) -> Result<(bool, String)> {
    let row: String = sql_value(
        member,
        &format!(
            "SELECT active::text || ' ' || coalesce(restart_lsn::text, '') FROM pg_replication_slots WHERE slot_name = '{slot}'"
        ),
    )
    .await?;
    let (active, lsn) = row.split_once(' ').unwrap_or((&row, ""));
    Ok((active == "true", lsn.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cascaded_replica_streams_from_its_member_falls_back_to_the_leader_and_returns(
) -> Result<()> {
    let cluster = Cluster::builder()
        .member(MemberOptions::new().name("node1"))
        .member(MemberOptions::new().name("node2"))
        .member(
            MemberOptions::new()
                .name("node3")
                .tag("replicatefrom", "node2"),
        )
        .configure()
        .await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    let (node1, node2, node3) = (
        cluster.member("node1"),
        cluster.member("node2"),
        cluster.member("node3"),
    );

    // node3 streams from node2, through the slot node2 holds for it; writes reach it.
    wait_streams_from(node3, node2).await?;
    let (active, _) = slot(node2, "node3").await?;
    ensure!(active, "node2's slot for node3 is not in use");
    // The leader keeps node3's slot unused, moving it to where node3 replayed (read before
    // the writes, which must move it).
    let (active, before) = slot(node1, "node3").await?;
    ensure!(!active, "node3 streams through the leader's slot too");
    rows_reach(&cluster, node3).await?;
    wait_until(
        BRINGUP,
        "the leader's slot for node3 to move forward",
        || async {
            let (_, now) = slot(node1, "node3").await?;
            let moved: String = sql_value(
                node1,
                &format!("SELECT (pg_lsn '{now}' > pg_lsn '{before}')::text"),
            )
            .await?;
            ensure!(moved == "true", "still at {now}");
            Ok(())
        },
    )
    .await?;
    // topology shows the tree: node3 under node2 under the leader.
    let tree = wait_until(BRINGUP, "topology to show node3 under node2", || async {
        let out = cluster.ctl_output(&["topology"]).await?;
        let lines: Vec<&str> = out.stdout.lines().skip(1).collect();
        ensure!(
            lines.len() == 3
                && lines[0].starts_with("node1 (leader")
                && lines[1].starts_with("  └─ node2 (replica, streaming")
                && lines[2].starts_with("    └─ node3 (replica, streaming"),
            "topology:\n{}",
            out.stdout
        );
        Ok(out.stdout)
    })
    .await?;
    let listed = cluster.ctl_json(&["list"]).await?;
    let upstream_of = |name: &str| {
        listed
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["name"] == name))
            .map(|r| r["upstream"].clone())
    };
    ensure!(
        upstream_of("node3") == Some("node2".into())
            && upstream_of("node2") == Some("node1".into())
            && upstream_of("node1") == Some(serde_json::Value::Null),
        "list's upstream fields: {listed}\n{tree}"
    );
    let decision = node3.agent_log();
    ensure!(
        decision.contains("following node2 (tagged replicatefrom, streaming; leader node1)"),
        "node3's decisions do not say why it follows node2"
    );

    // node2 stops: node3 follows the leader and still receives every acknowledged row.
    node2.stop().await?;
    wait_streams_from(node3, node1).await?;
    rows_reach(&cluster, node3).await?;
    let why = node3.agent_log();
    ensure!(
        why.contains("following node1 (replicatefrom node2: it has no member key)")
            || why.contains("following node1 (replicatefrom node2: it is "),
        "node3's decisions do not say why it left node2"
    );

    // node2 back: node3 returns to it.
    node2.start()?;
    wait_streams_from(node3, node2).await?;
    rows_reach(&cluster, node3).await?;
    Ok(())
}
