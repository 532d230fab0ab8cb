//! Restore targets beyond time, LSN and restore point (issue 16 item 7): a transaction id,
//! inclusive and not, and the end of the base backup; and their refusals. One member, one
//! cluster, three restores in a row.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use pgherd_tests::{sql, sql_batch, sql_value, timeline, Cluster, Member};

/// initdb, PostgreSQL starts and base backups on a 2-core machine shared with other tests.
const BRINGUP: Duration = Duration::from_secs(120);
/// Unpack, recover and promote.
const RESTORE: Duration = Duration::from_secs(180);

async fn ids(member: &Member) -> Result<Vec<i32>> {
    let rows = sql(member, "SELECT id FROM t ORDER BY id").await?;
    Ok(rows.iter().map(|r| r.get::<_, i32>(0)).collect())
}

/// Inserts ids `from..=to` in one transaction and returns its transaction id.
async fn insert_xid(member: &Member, from: i32, to: i32) -> Result<String> {
    sql_value(
        member,
        &format!(
            "WITH i AS (INSERT INTO t SELECT g, 'row ' || g FROM generate_series({from}, {to}) g RETURNING 1) \
             SELECT txid_current()::text FROM (SELECT count(*) FROM i) c"
        ),
    )
    .await
}

/// Runs `pgherdctl restore <args> --force` and waits for the leader to run on a timeline
/// after `old_tl` with exactly `want`.
async fn restore(cluster: &Cluster, args: &[&str], want: &[i32], old_tl: u32) -> Result<u32> {
    let mut all = vec!["restore"];
    all.extend(args);
    all.push("--force");
    cluster.ctl_output(&all).await?.expect_success()?;
    let healthy = cluster.wait_healthy(RESTORE).await?;
    let leader = cluster.member(&healthy.leader);
    let tl = timeline(leader).await?;
    ensure!(tl > old_tl, "restore {args:?}: still on timeline {tl}");
    let got = ids(leader).await?;
    ensure!(
        got == want,
        "restore {args:?}: the leader has {} rows ({:?}..{:?}), expected {} ({:?}..{:?})",
        got.len(),
        got.first(),
        got.last(),
        want.len(),
        want.first(),
        want.last()
    );
    Ok(tl)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_to_an_xid_inclusive_and_not_and_to_the_end_of_the_backup() -> Result<()> {
    let cluster = Cluster::builder().members(1).backups().configure().await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    let leader = cluster.member("node1");
    sql_batch(leader, "CREATE TABLE t (id int PRIMARY KEY, v text)").await?;
    sql_batch(
        leader,
        "INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 100) g",
    )
    .await?;
    let out = cluster.ctl_output(&["backup", "--format", "json"]).await?;
    out.expect_success()?;
    let backup: serde_json::Value =
        serde_json::from_str(out.stdout.trim()).context("backup printed no JSON")?;
    let backup_id = backup["id"].as_str().unwrap_or_default().to_string();
    insert_xid(leader, 101, 120).await?;
    let xid = insert_xid(leader, 121, 150).await?;
    insert_xid(leader, 151, 200).await?;
    sql_batch(leader, "DELETE FROM t").await?;
    let tl1 = timeline(leader).await?;

    // Refusals name the flag, exit 2 and change nothing.
    for (args, needle) in [
        (vec!["--target-xid", "abc"], "--target-xid"),
        (vec!["--target-xid", "2"], "--target-xid"),
        (
            vec!["--target-xid", &xid, "--target-inclusive", "maybe"],
            "--target-inclusive",
        ),
        (
            vec!["--target-immediate", "--target-inclusive", "false"],
            "--target-inclusive",
        ),
        (
            vec!["--target-name", "p", "--target-inclusive", "false"],
            "--target-inclusive",
        ),
    ] {
        let mut all = vec!["restore"];
        all.extend(args);
        all.push("--force");
        cluster
            .ctl_output(&all)
            .await?
            .expect_failure(2, &[needle])?;
    }
    cluster
        .ctl_output(&["restore", "--target-xid", &xid, "--latest", "--force"])
        .await?
        .expect_failure(2, &[])?;
    ensure!(
        cluster.etcd_get("restore").await?.is_none(),
        "a refused restore left a restore key"
    );
    ensure!(
        ids(leader).await?.is_empty(),
        "a refused restore changed the data"
    );

    // Inclusive (the default): the rows of the transaction are there.
    let want: Vec<i32> = (1..=150).collect();
    let tl2 = restore(&cluster, &["--target-xid", &xid], &want, tl1).await?;
    // Not inclusive: recovery stops just before that transaction's commit.
    let want: Vec<i32> = (1..=120).collect();
    let tl3 = restore(
        &cluster,
        &[
            "--target-xid",
            &xid,
            "--target-inclusive",
            "false",
            "--backup",
            &backup_id,
        ],
        &want,
        tl2,
    )
    .await?;
    // The end of the base backup: the rows it copied, nothing committed after it.
    let want: Vec<i32> = (1..=100).collect();
    restore(
        &cluster,
        &["--target-immediate", "--backup", &backup_id],
        &want,
        tl3,
    )
    .await?;
    let key: serde_json::Value = serde_json::from_str(
        &cluster
            .etcd_get("restore")
            .await?
            .context("no restore key")?,
    )?;
    ensure!(key["target"] == "immediate", "restore key: {key}");
    // The restored cluster takes writes.
    sql_batch(leader, "INSERT INTO t VALUES (1000, 'after')").await?;
    Ok(())
}
