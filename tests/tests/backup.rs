//! WAL archive, base backups and point-in-time restore on real clusters: the seed's
//! "restore to just before the DELETE" as a test, by time, restore point and LSN, across a
//! failover's timeline switch; the archive's refusals (different content, corruption);
//! retention; and `backup verify` passing on a good backup and failing on a broken archive.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use pgherd_tests::{sql_batch, sql_value, timeline, wait_until, Cluster, CtlOutput, Member};

/// initdb, PostgreSQL starts and base backups on a 2-core machine shared with other tests.
const BRINGUP: Duration = Duration::from_secs(120);
/// Unpack, recover and promote, then the replicas re-clone.
const RESTORE: Duration = Duration::from_secs(180);
const FAILOVER: Duration = Duration::from_secs(60);

async fn ctl(cluster: &Cluster, args: &[&str]) -> Result<CtlOutput> {
    cluster.ctl_output(args).await
}

/// Runs `pgherdctl <args> --format json`, expects success, parses stdout.
async fn ctl_json(cluster: &Cluster, args: &[&str]) -> Result<serde_json::Value> {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--format", "json"]);
    let out = ctl(cluster, &all).await?;
    out.expect_success()?;
    serde_json::from_str(out.stdout.trim())
        .with_context(|| format!("`{}` printed no JSON: {}", out.command, out.stdout))
}

/// The ids in `t`, in order.
async fn ids(member: &Member, table: &str) -> Result<Vec<i32>> {
    let rows = pgherd_tests::sql(member, &format!("SELECT id FROM {table} ORDER BY id")).await?;
    Ok(rows.iter().map(|r| r.get::<_, i32>(0)).collect())
}

async fn insert(member: &Member, table: &str, from: i32, to: i32) -> Result<()> {
    sql_batch(
        member,
        &format!("INSERT INTO {table} SELECT g, 'row ' || g FROM generate_series({from}, {to}) g"),
    )
    .await
}

/// The server's clock now, as RFC 3339 UTC with microseconds.
async fn server_time(member: &Member) -> Result<String> {
    sql_value(
        member,
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    )
    .await
}

/// The archived files' PostgreSQL names.
fn archived(cluster: &Cluster) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    let wal = cluster.repository().join("wal");
    for dir in std::fs::read_dir(&wal).with_context(|| format!("cannot read {}", wal.display()))? {
        let dir = dir?.path();
        for f in std::fs::read_dir(&dir)? {
            let path = f?.path();
            let file = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
            if file.starts_with('.') {
                continue;
            }
            let name = file.rsplit_once('-').map(|(n, _)| n.to_string()).unwrap_or(file);
            out.push((name, path));
        }
    }
    out.sort();
    Ok(out)
}

async fn take_backup(cluster: &Cluster) -> Result<serde_json::Value> {
    let b = ctl_json(cluster, &["backup"]).await?;
    ensure!(b["id"].is_string(), "backup printed {b}");
    Ok(b)
}

/// After a restore: one running leader, every other member a streaming replica on the
/// restored timeline with exactly `want` in `table`.
async fn wait_restored(cluster: &Cluster, table: &str, want: &[i32], old_tl: u32) -> Result<String> {
    let healthy = cluster.wait_healthy(RESTORE).await?;
    let leader = cluster.member(&healthy.leader);
    let tl = timeline(leader).await?;
    ensure!(tl > old_tl, "the restored leader runs on timeline {tl}, not after {old_tl}");
    ensure!(ids(leader, table).await? == want, "the leader has ids {:?}", ids(leader, table).await?);
    for r in &healthy.replicas {
        let m = cluster.member(r);
        wait_until(Duration::from_secs(30), format!("{r} to have the restored rows"), || async {
            let got = ids(m, table).await?;
            ensure!(got == want, "{r} has {} rows", got.len());
            Ok(())
        })
        .await?;
        let rtl = timeline(m).await?;
        ensure!(rtl >= tl, "{r} is on timeline {rtl}, the leader on {tl}");
    }
    let aside = format!("{}.pre-restore", leader.data_dir().display());
    ensure!(!Path::new(&aside).exists(), "{aside} was not removed after the restore");
    Ok(healthy.leader)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_to_a_time_before_a_delete_brings_back_exactly_the_rows_before_it() -> Result<()> {
    let cluster = Cluster::builder().members(3).backups().configure().await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    let leader = cluster.member("node1");
    sql_batch(leader, "CREATE TABLE t (id int PRIMARY KEY, v text)").await?;
    insert(leader, "t", 1, 100).await?;
    take_backup(&cluster).await?;
    insert(leader, "t", 101, 200).await?;
    let noted = server_time(leader).await?;
    sql_batch(leader, "DELETE FROM t WHERE id > 50").await?;
    ensure!(ids(leader, "t").await?.len() == 50);
    let old_tl = timeline(leader).await?;

    let out = ctl(&cluster, &["restore", "--target-time", &noted, "--force"]).await?;
    out.expect_success()?;
    let want: Vec<i32> = (1..=200).collect();
    wait_restored(&cluster, "t", &want, old_tl).await?;
    let history = cluster.history().await?;
    ensure!(
        history.iter().any(|h| h.reason.contains("point-in-time restore")),
        "the history does not record the restore: {history:?}"
    );
    Ok(())
}
