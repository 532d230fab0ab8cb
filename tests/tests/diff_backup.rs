//! Differential backups (issue 16 item 8) on real clusters: `backup --type diff` without a
//! full backup takes a full one and says so; after a small change a differential backup
//! stores under 10 % of the full's bytes, verifies, and restores exactly the rows it saw;
//! retention keeps a full backup while its differential is kept and removes them together;
//! a differential whose full backup is damaged or gone is refused with the full's id, and
//! the data directory is left as it was.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use pgherd_tests::{sql_batch, sql_value, timeline, Cluster};

const BRINGUP: Duration = Duration::from_secs(120);
const RESTORE: Duration = Duration::from_secs(180);
/// Tables the data is spread over: a differential backup copies changed files whole, so a
/// change to one table costs that table's file, not the others'.
const TABLES: u32 = 40;

/// `TABLES` tables of 15 000 rows (about 1.3 MB each), frozen and checkpointed, with
/// autovacuum off so that nothing but the test's own updates changes their files.
fn load_sql() -> String {
    let mut sql = String::new();
    for i in 0..TABLES {
        sql.push_str(&format!(
            "CREATE TABLE t{i} (id int PRIMARY KEY, v text) WITH (autovacuum_enabled = false);
             INSERT INTO t{i} SELECT g, md5(g::text) || md5((g * {i})::text) FROM generate_series(1, 15000) g;"
        ));
    }
    sql
}

/// One checksum over every row of every table.
async fn checksum(member: &pgherd_tests::Member) -> Result<String> {
    let parts: Vec<String> = (0..TABLES)
        .map(|i| format!("(SELECT md5(string_agg(id || ':' || v, ',' ORDER BY id)) FROM t{i})"))
        .collect();
    sql_value(member, &format!("SELECT md5({})", parts.join(" || "))).await
}

fn listed_ids(list: &serde_json::Value) -> Vec<String> {
    list.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|b| b["id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_differential_backup_after_a_small_change_is_small_restores_exactly_and_expires_with_its_full(
) -> Result<()> {
    let cluster = Cluster::builder().members(1).backups().configure().await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    let leader = cluster.member("node1");
    sql_batch(leader, &load_sql()).await?;
    // Statements that cannot run in the batch's implicit transaction.
    sql_batch(leader, "VACUUM (FREEZE, ANALYZE)").await?;
    sql_batch(leader, "CHECKPOINT").await?;

    // No full backup yet: a full one is taken, and the output says so.
    let full = cluster.ctl_json(&["backup", "--type", "diff"]).await?;
    ensure!(full["type"] == "full", "fallback backup: {full}");
    ensure!(full["requested_type"] == "diff", "fallback backup: {full}");
    ensure!(
        full["note"]
            .as_str()
            .is_some_and(|n| n.contains("took a full backup")),
        "the fallback does not say so: {full}"
    );
    let full_id = full["id"].as_str().context("no id")?.to_string();
    ensure!(
        cluster
            .member("node1")
            .agent_log()
            .contains("took a full backup instead"),
        "the agent's log does not say the diff became a full backup"
    );

    // A few rows change in one table.
    sql_batch(
        leader,
        "UPDATE t7 SET v = 'changed ' || id WHERE id IN (3, 500, 14000)",
    )
    .await?;
    sql_batch(leader, "CHECKPOINT").await?;
    let at_diff = checksum(leader).await?;
    let diff = cluster.ctl_json(&["backup", "--type", "diff"]).await?;
    ensure!(diff["type"] == "diff", "diff backup: {diff}");
    ensure!(diff["parent"] == full_id.as_str(), "diff backup: {diff}");
    ensure!(diff.get("note").is_none(), "diff backup: {diff}");
    let diff_id = diff["id"].as_str().context("no id")?.to_string();
    let (full_stored, diff_stored) = (
        full["stored_bytes"].as_u64().context("no stored_bytes")?,
        diff["stored_bytes"].as_u64().context("no stored_bytes")?,
    );
    eprintln!(
        "full backup {full_id}: {} bytes raw, {full_stored} stored; diff {diff_id}: {} raw, {diff_stored} stored",
        full["size_bytes"], diff["size_bytes"]
    );
    ensure!(
        diff_stored * 10 < full_stored,
        "the diff stores {diff_stored} bytes, not under 10 % of the full's {full_stored}"
    );

    // The list shows type and parent; verify restores the pair.
    let list = cluster.ctl_json(&["backups"]).await?;
    let entry = list
        .as_array()
        .and_then(|a| a.iter().find(|b| b["id"] == diff_id.as_str()))
        .context("the diff is not listed")?;
    ensure!(
        entry["type"] == "diff" && entry["parent"] == full_id.as_str(),
        "listed as {entry}"
    );
    let table = cluster.ctl_output(&["backups"]).await?;
    ensure!(
        table.stdout.contains("diff") && table.stdout.contains(&full_id),
        "the table does not show type and parent: {}",
        table.stdout
    );
    let v = cluster.ctl_json(&["backup", "verify", &diff_id]).await?;
    ensure!(v["passed"] == true, "verify of the diff: {v}");
    ensure!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains(&format!("with full backup {full_id}"))),
        "verify does not name the full backup: {v}"
    );

    // More changes after the diff; a restore to the diff's end brings back exactly what it
    // saw.
    sql_batch(leader, "UPDATE t1 SET v = 'later' WHERE id = 1").await?;
    let old_tl = timeline(leader).await?;
    cluster
        .ctl_output(&[
            "restore",
            "--target-immediate",
            "--backup",
            &diff_id,
            "--force",
        ])
        .await?
        .expect_success()?;
    let healthy = cluster.wait_healthy(RESTORE).await?;
    let leader = cluster.member(&healthy.leader);
    ensure!(timeline(leader).await? > old_tl, "no new timeline");
    let restored = checksum(leader).await?;
    ensure!(
        restored == at_diff,
        "the restored rows differ from the diff's ({restored} vs {at_diff})"
    );

    // Retention (full: 2) counts full backups: a second full keeps the first with its diff;
    // a third removes the first and its diff together.
    let f2 = cluster.ctl_json(&["backup"]).await?;
    let ids = listed_ids(&cluster.ctl_json(&["backups"]).await?);
    ensure!(
        ids.contains(&full_id) && ids.contains(&diff_id),
        "retention broke the chain after a second full: {ids:?}"
    );
    let d2 = cluster.ctl_json(&["backup", "--type", "diff"]).await?;
    ensure!(d2["parent"] == f2["id"], "second diff: {d2}");
    let f3 = cluster.ctl_json(&["backup"]).await?;
    let ids = listed_ids(&cluster.ctl_json(&["backups"]).await?);
    let want: Vec<String> = [&f2["id"], &d2["id"], &f3["id"]]
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    ensure!(
        ids == want,
        "after a third full the first and its diff should be gone together: {ids:?}"
    );
    ensure!(
        !cluster.repository().join("backups").join(&full_id).exists(),
        "the first full's folder is still there"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_differential_backup_without_its_full_is_refused_naming_it_and_the_data_stays(
) -> Result<()> {
    let cluster = Cluster::builder().members(1).backups().configure().await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    let leader = cluster.member("node1");
    sql_batch(
        leader,
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 20000) g; CHECKPOINT;",
    )
    .await?;
    let full = cluster.ctl_json(&["backup"]).await?;
    let full_id = full["id"].as_str().context("no id")?.to_string();
    sql_batch(leader, "UPDATE t SET v = 'x' WHERE id = 5").await?;
    let diff = cluster.ctl_json(&["backup", "--type", "diff"]).await?;
    ensure!(diff["parent"] == full_id.as_str(), "diff: {diff}");
    let diff_id = diff["id"].as_str().context("no id")?.to_string();
    let rows = |m| async move {
        sql_value::<String>(m, "SELECT md5(string_agg(id || v, ',' ORDER BY id)) FROM t").await
    };
    let before = rows(leader).await?;
    let tl = timeline(leader).await?;
    let data_unchanged = || async {
        let healthy = cluster.wait_healthy(RESTORE).await?;
        ensure!(healthy.leader == "node1");
        ensure!(rows(leader).await? == before, "the rows changed");
        ensure!(timeline(leader).await? == tl, "the timeline changed");
        let aside = format!("{}.pre-restore", leader.data_dir().display());
        ensure!(!Path::new(&aside).exists(), "{aside} is still there");
        Ok(())
    };

    // The full's stored tar damaged: the restore fails naming it, the old data comes back.
    let folder = cluster.repository().join("backups").join(&full_id);
    let tar = folder.join("base.tar.zst");
    let mut bytes = std::fs::read(&tar)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&tar, &bytes)?;
    let out = cluster
        .ctl_output(&["restore", "--latest", "--backup", &diff_id, "--force"])
        .await?;
    out.expect_failure(1, &[&full_id, "corrupted"])?;
    data_unchanged().await?;

    // The full gone: refused before anything stops, naming it.
    std::fs::remove_dir_all(&folder)?;
    let out = cluster
        .ctl_output(&["restore", "--latest", "--backup", &diff_id, "--force"])
        .await?;
    out.expect_failure(1, &[&full_id, "missing"])?;
    data_unchanged().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diff_schedule_takes_differential_backups_on_the_newest_full_and_a_full_when_there_is_none(
) -> Result<()> {
    // Full backups once a year (never during the test), differential ones every 5 s.
    let cluster = Cluster::builder()
        .members(1)
        .backups()
        .yaml("backup: {schedule: '0 0 0 1 1 *', diff_schedule: '*/5 * * * * *'}")
        .configure()
        .await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    sql_batch(
        cluster.member("node1"),
        "CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 10) g",
    )
    .await?;
    let listed = pgherd_tests::wait_until(
        Duration::from_secs(150),
        "a scheduled full backup (none to build on) and a differential one on it",
        || async {
            let listed = cluster.ctl_json(&["backups"]).await?;
            let all = listed.as_array().context("backups is no array")?.clone();
            ensure!(
                all.iter().any(|b| b["type"] == "diff"),
                "no differential yet: {listed}"
            );
            Ok(all)
        },
    )
    .await?;
    // One full backup (the diff schedule's first, with none to build on), then only
    // differential ones on it.
    let first = &listed[0];
    ensure!(
        first["type"] == "full",
        "the first backup is not a full one: {first}"
    );
    for b in &listed[1..] {
        ensure!(
            b["parent"] == first["id"],
            "a differential not on the full: {b}"
        );
        ensure!(
            b["member"] == "node1",
            "taken by {} and not the leader",
            b["member"]
        );
    }
    Ok(())
}
