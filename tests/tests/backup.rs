//! WAL archive, base backups and point-in-time restore on real clusters: the seed's
//! "restore to just before the DELETE" as a test, by time, restore point and LSN, across a
//! failover's timeline switch; the archive's refusals (different content, corruption);
//! retention; and `backup verify` passing on a good backup and failing on a broken archive.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use pgherd_agent::backup::wal::{WalName, SEGMENT_SIZE};
use pgherd_tests::{sql_batch, sql_value, timeline, wait_until, Cluster, CtlOutput, Member};

/// initdb, PostgreSQL starts and base backups on a 2-core machine shared with other tests.
const BRINGUP: Duration = Duration::from_secs(120);
/// Unpack, recover and promote, then the replicas re-clone.
const RESTORE: Duration = Duration::from_secs(180);
const FAILOVER: Duration = Duration::from_secs(60);

async fn ctl(cluster: &Cluster, args: &[&str]) -> Result<CtlOutput> {
    cluster.ctl_output(args).await
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

/// The segment number of a full WAL segment's file name (`None` for other files).
fn segment_no(name: &str) -> Option<u64> {
    match WalName::parse(name) {
        Ok(WalName::Segment { segno, .. }) => Some(segno),
        _ => None,
    }
}

/// The archived files' PostgreSQL names.
fn archived(cluster: &Cluster) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    let wal = cluster.repository().join("wal");
    for dir in std::fs::read_dir(&wal).with_context(|| format!("cannot read {}", wal.display()))? {
        let dir = dir?.path();
        for f in std::fs::read_dir(&dir)? {
            let path = f?.path();
            let file = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            if file.starts_with('.') {
                continue;
            }
            let name = file
                .rsplit_once('-')
                .map(|(n, _)| n.to_string())
                .unwrap_or(file);
            out.push((name, path));
        }
    }
    out.sort();
    Ok(out)
}

/// `pgherd-agent <verb> --config <config> <args...>` (wal-push, wal-fetch), its output.
async fn agent_wal(
    verb: &str,
    config: &Path,
    args: &[&std::ffi::OsStr],
) -> Result<std::process::Output> {
    Ok(tokio::process::Command::new(pgherd_tests::agent_bin()?)
        .args([verb, "--config"])
        .arg(config)
        .args(args)
        .output()
        .await?)
}

async fn take_backup(cluster: &Cluster) -> Result<serde_json::Value> {
    let b = cluster.ctl_json(&["backup"]).await?;
    ensure!(b["id"].is_string(), "backup printed {b}");
    Ok(b)
}

/// After a restore: one running leader, every other member a streaming replica on the
/// restored timeline with exactly `want` in `table`.
async fn wait_restored(
    cluster: &Cluster,
    table: &str,
    want: &[i32],
    old_tl: u32,
) -> Result<String> {
    let healthy = cluster.wait_healthy(RESTORE).await?;
    let leader = cluster.member(&healthy.leader);
    let tl = timeline(leader).await?;
    ensure!(
        tl > old_tl,
        "the restored leader runs on timeline {tl}, not after {old_tl}"
    );
    ensure!(
        ids(leader, table).await? == want,
        "the leader has ids {:?}",
        ids(leader, table).await?
    );
    for r in &healthy.replicas {
        let m = cluster.member(r);
        wait_until(
            Duration::from_secs(30),
            format!("{r} to have the restored rows"),
            || async {
                let got = ids(m, table).await?;
                ensure!(got == want, "{r} has {} rows", got.len());
                Ok(())
            },
        )
        .await?;
        let rtl = timeline(m).await?;
        ensure!(rtl >= tl, "{r} is on timeline {rtl}, the leader on {tl}");
    }
    let aside = format!("{}.pre-restore", leader.data_dir().display());
    ensure!(
        !Path::new(&aside).exists(),
        "{aside} was not removed after the restore"
    );
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
        history
            .iter()
            .any(|h| h.reason.contains("point-in-time restore")),
        "the history does not record the restore: {history:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_to_a_named_point_then_to_an_lsn_across_the_restored_timeline_and_refusals_change_nothing(
) -> Result<()> {
    let cluster = Cluster::builder().members(2).backups().configure().await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    let leader = cluster.member("node1");
    sql_batch(leader, "CREATE TABLE t (id int PRIMARY KEY, v text)").await?;
    insert(leader, "t", 1, 100).await?;
    let backup = take_backup(&cluster).await?;
    insert(leader, "t", 101, 150).await?;
    sql_batch(leader, "SELECT pg_create_restore_point('before_delete')").await?;
    sql_batch(leader, "DELETE FROM t").await?;
    let tl1 = timeline(leader).await?;

    // Refusals: no confirmation without a terminal, a target before the backup ended, a
    // target after the archive's end, two targets. None of them touches the cluster.
    ctl(&cluster, &["restore", "--latest"])
        .await?
        .expect_failure(2, &["--force"])?;
    ctl(
        &cluster,
        &[
            "restore",
            "--target-time",
            "2001-01-01T00:00:00Z",
            "--force",
        ],
    )
    .await?
    .expect_failure(1, &["before the end of"])?;
    ctl(
        &cluster,
        &[
            "restore",
            "--target-time",
            "2099-01-01T00:00:00Z",
            "--force",
        ],
    )
    .await?
    .expect_failure(1, &["after the last archived WAL"])?;
    ctl(&cluster, &["restore", "--target-lsn", "FFFF/0", "--force"])
        .await?
        .expect_failure(1, &["after the last archived WAL"])?;
    ctl(
        &cluster,
        &["restore", "--target-time", "yesterday", "--force"],
    )
    .await?
    .expect_failure(2, &["RFC 3339"])?;
    ensure!(
        cluster.etcd_get("restore").await?.is_none(),
        "a refused restore left a restore key"
    );
    ensure!(
        ids(leader, "t").await?.is_empty(),
        "a refused restore changed the data"
    );
    ensure!(
        timeline(leader).await? == tl1,
        "a refused restore changed the timeline"
    );

    let out = ctl(
        &cluster,
        &[
            "restore",
            "--target-name",
            "before_delete",
            "--backup",
            backup["id"].as_str().unwrap_or_default(),
            "--force",
        ],
    )
    .await?;
    out.expect_success()?;
    let want: Vec<i32> = (1..=150).collect();
    let leader_name = wait_restored(&cluster, "t", &want, tl1).await?;
    let leader = cluster.member(&leader_name);
    let tl2 = timeline(leader).await?;

    // On the restored timeline: a backup taken from the replica, more rows, note the LSN,
    // lose everything, restore by LSN from the replica's backup.
    let from_replica = cluster.ctl_json(&["backup", "--from-replica"]).await?;
    ensure!(
        from_replica["from_replica"] == true && from_replica["member"] != leader_name.as_str(),
        "the backup was not taken on the replica: {from_replica}"
    );
    insert(leader, "t", 151, 300).await?;
    let lsn: String = sql_value(leader, "SELECT pg_current_wal_lsn()::text").await?;
    sql_batch(leader, "TRUNCATE t").await?;
    let out = ctl(
        &cluster,
        &[
            "restore",
            "--target-lsn",
            &lsn,
            "--backup",
            from_replica["id"].as_str().unwrap_or_default(),
            "--force",
        ],
    )
    .await?;
    out.expect_success()?;
    let want: Vec<i32> = (1..=300).collect();
    wait_restored(&cluster, "t", &want, tl2).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archiving_continues_across_a_failover_and_a_restore_crosses_the_timeline_switch(
) -> Result<()> {
    let cluster = Cluster::builder().members(3).backups().configure().await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    let old = cluster.member("node1");
    sql_batch(old, "CREATE TABLE t (id int PRIMARY KEY, v text)").await?;
    insert(old, "t", 1, 100).await?;
    take_backup(&cluster).await?;
    let tl1 = timeline(old).await?;
    // Wait for node2 and node3 to have the rows, then crash the leader.
    for r in cluster.others("node1") {
        wait_until(
            Duration::from_secs(30),
            format!("{} to replay", r.name()),
            || async {
                ensure!(ids(r, "t").await?.len() == 100);
                Ok(())
            },
        )
        .await?;
    }
    old.crash()?;
    let new_name = cluster.wait_new_leader("node1", FAILOVER).await?;
    let new = cluster.member(&new_name);
    let tl2 = timeline(new).await?;
    ensure!(tl2 > tl1);
    insert(new, "t", 101, 200).await?;
    let noted = server_time(new).await?;
    sql_batch(new, "DELETE FROM t WHERE id % 2 = 0").await?;
    sql_batch(new, "SELECT pg_switch_wal()").await?;

    wait_until(
        Duration::from_secs(30),
        "segments of both timelines in the archive",
        || async {
            let names: Vec<String> = archived(&cluster)?.into_iter().map(|(n, _)| n).collect();
            let tl_prefix = |tl: u32| format!("{tl:08X}");
            ensure!(
                names
                    .iter()
                    .any(|n| n.len() == 24 && n.starts_with(&tl_prefix(tl1))),
                "no timeline {tl1} segment: {names:?}"
            );
            ensure!(
                names
                    .iter()
                    .any(|n| n.len() == 24 && n.starts_with(&tl_prefix(tl2))),
                "no timeline {tl2} segment: {names:?}"
            );
            ensure!(
                names.iter().any(|n| *n == format!("{tl2:08X}.history")),
                "no {tl2:08X}.history: {names:?}"
            );
            Ok(())
        },
    )
    .await?;

    // The crashed member stays down: the restore runs on the two that are up.
    let out = ctl(&cluster, &["restore", "--target-time", &noted, "--force"]).await?;
    out.expect_success()?;
    let want: Vec<i32> = (1..=200).collect();
    wait_restored(&cluster, "t", &want, tl2).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_push_refuses_different_content_and_wal_fetch_detects_a_corrupted_segment() -> Result<()>
{
    let cluster = Cluster::builder().members(1).backups().configure().await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    let leader = cluster.member("node1");
    sql_batch(
        leader,
        "CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 1000) g",
    )
    .await?;
    for _ in 0..2 {
        sql_batch(leader, "INSERT INTO t VALUES (0); SELECT pg_switch_wal()").await?;
    }
    let segs = wait_until(Duration::from_secs(30), "two archived segments", || async {
        let segs: Vec<(String, PathBuf)> = archived(&cluster)?
            .into_iter()
            .filter(|(n, _)| n.len() == 24)
            .collect();
        ensure!(segs.len() >= 2, "{segs:?}");
        Ok(segs)
    })
    .await?;
    let config = leader.config_path().to_path_buf();
    let scratch = tempfile::tempdir()?;

    // Same name, different content: refused loudly, the archive unchanged.
    let (name, stored) = &segs[0];
    let before = std::fs::read(stored)?;
    let fake = scratch.path().join(name);
    std::fs::write(&fake, vec![0x55u8; 16 * 1024 * 1024])?;
    let out = agent_wal("wal-push", &config, &[fake.as_ref()]).await?;
    ensure!(
        !out.status.success(),
        "wal-push of different content succeeded"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        stderr.contains("different content"),
        "wal-push said: {stderr}"
    );
    ensure!(
        std::fs::read(stored)? == before,
        "the archived segment changed"
    );
    let after: Vec<String> = archived(&cluster)?.into_iter().map(|(n, _)| n).collect();
    ensure!(
        after.iter().filter(|n| *n == name).count() == 1,
        "a second copy of {name} appeared"
    );

    // The same content again: accepted (PostgreSQL retries after a crash).
    let real = scratch.path().join("real");
    std::fs::create_dir(&real)?;
    let fetched = real.join(name);
    let out = agent_wal("wal-fetch", &config, &[name.as_ref(), fetched.as_ref()]).await?;
    ensure!(
        out.status.success(),
        "wal-fetch failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = agent_wal("wal-push", &config, &[fetched.as_ref()]).await?;
    ensure!(
        out.status.success(),
        "re-pushing identical content failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Corruption: another segment's (valid) file under this segment's name.
    let (other_name, other_stored) = &segs[1];
    std::fs::copy(other_stored, stored)?;
    let dest = scratch.path().join("RECOVERYXLOG");
    let out = agent_wal("wal-fetch", &config, &[name.as_ref(), dest.as_ref()]).await?;
    ensure!(
        !out.status.success(),
        "wal-fetch of a corrupted segment succeeded"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(stderr.contains("corrupted"), "wal-fetch said: {stderr}");
    ensure!(!dest.exists(), "wal-fetch left a file under the final name");
    ensure!(name != other_name);
    // Not in the archive at all: a clean non-zero exit PostgreSQL reads as "not found".
    let out = agent_wal(
        "wal-fetch",
        &config,
        &["0000000900000000000000AA".as_ref(), dest.as_ref()],
    )
    .await?;
    ensure!(
        out.status.code() == Some(1),
        "missing file: {:?}",
        out.status
    );
    // wal-fetch asks the running agent first; with no agent it reads the directory itself.
    leader.stop().await?;
    let dest = scratch.path().join("without-agent");
    let out = agent_wal("wal-fetch", &config, &[other_name.as_ref(), dest.as_ref()]).await?;
    ensure!(
        out.status.success(),
        "wal-fetch without the agent failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        std::fs::metadata(&dest)?.len() == SEGMENT_SIZE,
        "a short segment came back"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_what_the_newest_backups_need_and_verify_fails_without_a_wal_segment(
) -> Result<()> {
    let cluster = Cluster::builder().members(1).backups().configure().await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    let leader = cluster.member("node1");
    sql_batch(leader, "CREATE TABLE t (id int PRIMARY KEY, v text)").await?;
    let mut backups = Vec::new();
    for round in 0..3 {
        insert(leader, "t", round * 100 + 1, round * 100 + 100).await?;
        sql_batch(leader, "SELECT pg_switch_wal()").await?;
        backups.push(take_backup(&cluster).await?);
    }
    // retention.full is 2: the first backup and the WAL before the second one's start go.
    let listed = cluster.ctl_json(&["backups"]).await?;
    let listed_ids: Vec<&str> = listed
        .as_array()
        .context("backups printed no array")?
        .iter()
        .filter_map(|b| b["id"].as_str())
        .collect();
    let want: Vec<&str> = backups[1..]
        .iter()
        .filter_map(|b| b["id"].as_str())
        .collect();
    ensure!(listed_ids == want, "listed {listed_ids:?}, want {want:?}");
    let second_start: pgherd_agent::lsn::Lsn = backups[1]["start_lsn"]
        .as_str()
        .context("no start_lsn")?
        .parse()?;
    let first_needed = second_start.0 / SEGMENT_SIZE;
    let segnos: Vec<u64> = archived(&cluster)?
        .iter()
        .filter_map(|(n, _)| segment_no(n))
        .collect();
    ensure!(
        segnos.iter().all(|s| *s >= first_needed),
        "WAL before {first_needed} kept: {segnos:?}"
    );
    ensure!(
        segnos.contains(&first_needed),
        "segment {first_needed} the second backup needs was removed: {segnos:?}"
    );

    // The oldest kept backup still restores: verify recovers it through all later WAL.
    insert(leader, "t", 1001, 1100).await?;
    // Archiving is asynchronous: verify recovers only what the archive holds, so the
    // segment with the last rows must be there first (without this wait verify sometimes
    // counted 300 rows under load, on 15 and on 18 in the matrix).
    let last: String = sql_value(leader, "SELECT pg_walfile_name(pg_switch_wal())").await?;
    wait_until(
        Duration::from_secs(60),
        format!("{last} archived"),
        || async {
            ensure!(
                archived(&cluster)?
                    .iter()
                    .any(|(name, _)| name.starts_with(&last)),
                "not yet"
            );
            Ok(())
        },
    )
    .await?;
    let oldest = want[0];
    let v = cluster.ctl_json(&["backup", "verify", oldest]).await?;
    ensure!(v["passed"] == true, "verify of {oldest} failed: {v}");
    ensure!(
        v["rows"].as_u64() == Some(400),
        "verify counted {} rows, want 400: {v}",
        v["rows"]
    );

    // A segment the recovery needs goes missing: verify fails and says so.
    let newest = want[1];
    let newest_start: pgherd_agent::lsn::Lsn = backups[2]["start_lsn"]
        .as_str()
        .context("no start_lsn")?
        .parse()?;
    let seg = newest_start.0 / SEGMENT_SIZE;
    let (victim, path) = archived(&cluster)?
        .into_iter()
        .find(|(n, _)| segment_no(n) == Some(seg))
        .with_context(|| format!("no archived segment {seg}"))?;
    std::fs::remove_file(&path)?;
    let out = ctl(&cluster, &["backup", "verify", newest, "--format", "json"]).await?;
    out.expect_failure(1, &["verify failed"])?;
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim())?;
    ensure!(v["passed"] == false, "{v}");
    let listed = cluster.ctl_json(&["backups"]).await?;
    let entry = listed
        .as_array()
        .and_then(|a| a.iter().find(|b| b["id"] == newest))
        .context("the newest backup is not listed")?;
    ensure!(
        entry["verify"]["passed"] == false,
        "backups does not show the failed verify: {entry}"
    );
    let _ = victim;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_takes_and_verifies_scheduled_backups_and_list_shows_the_result() -> Result<()> {
    let cluster = Cluster::builder()
        .members(2)
        .backups()
        .yaml("backup: {schedule: '*/5 * * * * *', verify_schedule: '*/5 * * * * *'}")
        .configure()
        .await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    sql_batch(
        cluster.member("node1"),
        "CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 10) g",
    )
    .await?;
    let verified = wait_until(
        Duration::from_secs(150),
        "a scheduled backup and its verification",
        || async {
            let listed = cluster.ctl_json(&["backups"]).await?;
            let verified: Vec<serde_json::Value> = listed
                .as_array()
                .context("no array")?
                .iter()
                .filter(|b| b["verify"]["passed"] == true)
                .cloned()
                .collect();
            ensure!(!verified.is_empty(), "no verified backup yet: {listed}");
            Ok(verified)
        },
    )
    .await?;
    for b in &verified {
        ensure!(
            b["member"] == "node1",
            "a scheduled backup was taken by {} and not the leader",
            b["member"]
        );
    }
    // /metrics reports the backup and the verification (the agent refreshes it every 10 s).
    wait_until(
        Duration::from_secs(30),
        "backup metrics on the leader",
        || async {
            let page = cluster.member("node1").http_get("/metrics").await?.body;
            for series in ["pgherd_last_backup_success", "pgherd_last_verify_success"] {
                ensure!(
                    page.lines()
                        .any(|l| l.starts_with(series) && l.ends_with(" 1")),
                    "no {series} ... 1 in /metrics"
                );
            }
            Ok(())
        },
    )
    .await?;
    let out = ctl(&cluster, &["list"]).await?;
    out.expect_success()?;
    if !(out.stdout.contains("Backups: ") && out.stdout.contains("passed")) {
        bail!(
            "list does not show the backups and the verification:\n{}",
            out.stdout
        );
    }
    Ok(())
}

/// One member with table `t` holding ids 1 to 10 in a base backup and 11 to 20 after it:
/// the cluster, the backup `pgherdctl backup` printed, and the timeline.
async fn a_backup_and_rows_after_it() -> Result<(Cluster, serde_json::Value, u32)> {
    let cluster = Cluster::builder().members(1).backups().configure().await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    let leader = cluster.member("node1");
    sql_batch(leader, "CREATE TABLE t (id int PRIMARY KEY, v text)").await?;
    insert(leader, "t", 1, 10).await?;
    let backup = take_backup(&cluster).await?;
    insert(leader, "t", 11, 20).await?;
    let tl = timeline(leader).await?;
    Ok((cluster, backup, tl))
}

/// After a restore that failed on node1: the `restore` key says failed (returned), node1
/// leads again on timeline `tl` with ids 1 to 20, and no `.pre-restore` copy is left.
async fn the_previous_data_is_back(cluster: &Cluster, tl: u32) -> Result<serde_json::Value> {
    let leader = cluster.member("node1");
    let key: serde_json::Value = serde_json::from_str(
        &cluster
            .etcd_get("restore")
            .await?
            .context("no restore key")?,
    )?;
    ensure!(key["phase"] == "failed", "restore key: {key}");
    let healthy = cluster.wait_healthy(RESTORE).await?;
    ensure!(healthy.leader == "node1");
    let want: Vec<i32> = (1..=20).collect();
    let got = ids(leader, "t").await?;
    ensure!(got == want, "rows after the failed restore: {got:?}");
    ensure!(
        timeline(leader).await? == tl,
        "the failed restore changed the timeline"
    );
    let aside = format!("{}.pre-restore", leader.data_dir().display());
    ensure!(!Path::new(&aside).exists(), "{aside} is still there");
    Ok(key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_that_cannot_reach_its_target_puts_the_previous_data_back() -> Result<()> {
    let (cluster, _, tl) = a_backup_and_rows_after_it().await?;
    // No such restore point: recovery reaches the archive's end without finding it and
    // PostgreSQL refuses to promote.
    let out = ctl(
        &cluster,
        &["restore", "--target-name", "never_created", "--force"],
    )
    .await?;
    out.expect_failure(1, &["failed"])?;
    the_previous_data_is_back(&cluster, tl).await?;
    insert(cluster.member("node1"), "t", 21, 21).await?;
    Ok(())
}

/// The restore hashes the stored file while it unpacks it (one read, issue 16 item 5): a
/// flipped byte must still stop it before PostgreSQL sees the unpacked copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_base_backup_is_refused_and_the_previous_data_is_put_back() -> Result<()> {
    let (cluster, b, tl) = a_backup_and_rows_after_it().await?;
    let id = b["id"].as_str().context("no backup id")?;
    let folder = cluster.repository().join("backups").join(id);
    let stored = std::fs::read_dir(&folder)
        .with_context(|| format!("cannot read {}", folder.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("base.tar"))
        })
        .with_context(|| format!("no base.tar* in {}", folder.display()))?;
    let mut bytes = std::fs::read(&stored)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&stored, &bytes)?;

    let out = ctl(&cluster, &["restore", "--latest", "--force"]).await?;
    out.expect_failure(1, &["failed"])?;
    let key = the_previous_data_is_back(&cluster, tl).await?;
    let message = key["message"].as_str().unwrap_or_default();
    ensure!(
        message.contains("is corrupted") && message.contains(id),
        "the failed restore does not say the backup is corrupted: {key}"
    );
    Ok(())
}

/// A writer to the repository (a broken or rogue agent) replaces a backup's tar and records
/// its new SHA-256, so the stored file's own check passes: the restore still refuses it,
/// because the files it unpacked differ from the backup's manifest, and names them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_whose_files_differ_from_its_manifest_is_refused_naming_them() -> Result<()> {
    let (cluster, b, tl) = a_backup_and_rows_after_it().await?;
    let id = b["id"].as_str().context("no backup id")?;
    let folder = cluster.repository().join("backups").join(id);
    let stored = folder.join("base.tar.zst");
    let tar = zstd::decode_all(&std::fs::read(&stored)?[..])
        .with_context(|| format!("cannot decompress {}", stored.display()))?;
    // Every entry again, PG_VERSION with other content of the same size, and one more file.
    let mut out = tar::Builder::new(Vec::new());
    let mut changed = false;
    for entry in tar::Archive::new(&tar[..]).entries()? {
        let mut entry = entry?;
        let mut header = entry.header().clone();
        let path = entry.path()?.into_owned();
        let mut body = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut body)?;
        if path.as_os_str() == "PG_VERSION" {
            body.iter_mut().take(2).for_each(|b| *b = b'9');
            changed = true;
        }
        out.append_data(&mut header, &path, &body[..])?;
    }
    ensure!(changed, "the backup's tar holds no PG_VERSION");
    let mut planted = tar::Header::new_gnu();
    planted.set_size(7);
    planted.set_mode(0o600);
    planted.set_entry_type(tar::EntryType::Regular);
    out.append_data(&mut planted, "base/1/99999", &b"planted"[..])?;
    let rewritten = zstd::encode_all(&out.into_inner()?[..], 3)?;
    std::fs::write(&stored, &rewritten)?;
    let meta_path = folder.join("backup.json");
    let mut meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta_path)?)?;
    meta["sha256"] = pgherd_agent::backup::compress::sha256_hex(&rewritten).into();
    std::fs::write(&meta_path, serde_json::to_vec(&meta)?)?;

    let out = ctl(&cluster, &["restore", "--latest", "--force"]).await?;
    out.expect_failure(1, &["failed"])?;
    let key = the_previous_data_is_back(&cluster, tl).await?;
    let message = key["message"].as_str().unwrap_or_default();
    for said in [
        "does not match its manifest",
        "PG_VERSION has checksum",
        "base/1/99999 is in the backup but not in its manifest",
    ] {
        ensure!(
            message.contains(said),
            "the failed restore does not say {said:?}: {key}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restore_to_an_older_point_a_backup_from_the_abandoned_history_is_not_used(
) -> Result<()> {
    let cluster = Cluster::builder().members(1).backups().configure().await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    let leader = cluster.member("node1");
    sql_batch(leader, "CREATE TABLE t (id int PRIMARY KEY, v text)").await?;
    insert(leader, "t", 1, 10).await?;
    let b1 = take_backup(&cluster).await?;
    insert(leader, "t", 11, 20).await?;
    let noted = server_time(leader).await?;
    insert(leader, "t", 21, 30).await?;
    let b2 = take_backup(&cluster).await?;
    let b1_id = b1["id"].as_str().unwrap_or_default();
    let b2_id = b2["id"].as_str().unwrap_or_default();
    let tl1 = timeline(leader).await?;

    // Back to before b2: the cluster's history now leaves timeline 1 before b2 started.
    ctl(
        &cluster,
        &[
            "restore",
            "--target-time",
            &noted,
            "--backup",
            b1_id,
            "--force",
        ],
    )
    .await?
    .expect_success()?;
    wait_restored(&cluster, "t", &(1..=20).collect::<Vec<i32>>(), tl1).await?;
    let tl2 = timeline(leader).await?;
    insert(leader, "t", 100, 105).await?;

    // b2 is the newest backup but lies on the abandoned part of timeline 1.
    ctl(
        &cluster,
        &["restore", "--latest", "--backup", b2_id, "--force"],
    )
    .await?
    .expect_failure(1, &["branched off"])?;
    let out = ctl(
        &cluster,
        &["restore", "--latest", "--force", "--format", "json"],
    )
    .await?;
    out.expect_success()?;
    let key: serde_json::Value = serde_json::from_str(out.stdout.trim())?;
    ensure!(
        key["backup_id"] == b1_id,
        "restore --latest chose {} instead of {b1_id}",
        key["backup_id"]
    );
    let mut want: Vec<i32> = (1..=20).collect();
    want.extend(100..=105);
    wait_restored(&cluster, "t", &want, tl2).await?;
    Ok(())
}

/// The pid of the running background pusher of `pg_wal` (`wal-push --pusher <pg_wal>`).
fn pusher_of(pg_wal: &Path) -> Option<i32> {
    let want = pg_wal.as_os_str().as_encoded_bytes();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.contains(&&b"--pusher"[..]) && args.contains(&want) {
            return Some(pid);
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_push_answers_from_a_background_pusher_that_pushes_ahead_and_survives_being_killed(
) -> Result<()> {
    // A pg_wal with eight segments waiting (.ready), archived one archive_command call each
    // in order as PostgreSQL's archiver does, by the real binary with archive.parallel 2.
    let scratch = tempfile::tempdir()?;
    let pg_wal = scratch.path().join("pg_wal");
    std::fs::create_dir_all(pg_wal.join("archive_status"))?;
    // The data directory's PostgreSQL "runs": its pid file names a live process (this
    // test). A pusher works only while it does.
    let pid_file = scratch.path().join("postmaster.pid");
    std::fs::write(
        &pid_file,
        format!("{}\n{}\n", std::process::id(), scratch.path().display()),
    )?;
    let repo = scratch.path().join("repo");
    std::fs::create_dir(&repo)?;
    let settings = scratch.path().join("wal.yml");
    std::fs::write(
        &settings,
        format!(
            "repository: {}\ncompression: zstd\ncompression_level: 3\nparallel: 2\n",
            repo.display()
        ),
    )?;
    let names: Vec<String> = (1..=10)
        .map(|n| format!("0000000100000000000000{n:02X}"))
        .collect();
    let mut contents = Vec::new();
    for (i, n) in names.iter().enumerate() {
        // Different, poorly compressible content per segment.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ (i as u64 + 1);
        let data: Vec<u8> = (0..4 * 1024 * 1024)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::fs::write(pg_wal.join(n), &data)?;
        // The last two wait only later.
        if i < 8 {
            std::fs::write(pg_wal.join("archive_status").join(format!("{n}.ready")), "")?;
        }
        contents.push(data);
    }
    let push = |name: &str| {
        let (settings, file) = (settings.clone(), pg_wal.join(name));
        async move {
            let out = agent_wal("wal-push", &settings, &[file.as_ref()]).await?;
            ensure!(
                out.status.success(),
                "wal-push {} failed: {}",
                file.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            let status = file.parent().unwrap().join("archive_status");
            let n = file.file_name().unwrap().to_string_lossy().into_owned();
            std::fs::rename(
                status.join(format!("{n}.ready")),
                status.join(format!("{n}.done")),
            )?;
            anyhow::Ok(())
        }
    };
    push(&names[0]).await?;
    // The pusher went on with the files PostgreSQL had not asked for yet.
    let spool = pg_wal.join("pgherd_archive");
    wait_until(
        Duration::from_secs(30),
        "the pusher to store 03 ahead",
        || async {
            ensure!(spool.join(format!("{}.ok", names[2])).exists());
            Ok(())
        },
    )
    .await?;
    // Killed mid-way (between storing a file and writing its status, or anywhere): every
    // later wal-push still answers only once its file is stored.
    if let Some(pid) = pusher_of(&pg_wal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL)?;
    }
    for n in &names[1..8] {
        push(n).await?;
    }
    // Everything is in the archive with its exact content.
    for (n, data) in names[..8].iter().zip(&contents) {
        let dest = scratch.path().join("fetched");
        let out = agent_wal("wal-fetch", &settings, &[n.as_ref(), dest.as_ref()]).await?;
        ensure!(
            out.status.success(),
            "wal-fetch {n}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(std::fs::read(&dest)? == *data, "{n} came back different");
    }
    // Nothing waits any more: the pusher leaves, and with it the status of acknowledged
    // files.
    wait_until(
        Duration::from_secs(30),
        "the pusher to leave and clean up",
        || async {
            ensure!(pusher_of(&pg_wal).is_none(), "a pusher still runs");
            let left: Vec<String> = std::fs::read_dir(&spool)?
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|f| f != "pusher.lock")
                .collect();
            ensure!(left.is_empty(), "status files left: {left:?}");
            Ok(())
        },
    )
    .await?;
    // PostgreSQL stopped (no pid file): a pusher started now leaves at once and takes no
    // file ahead; wal-push still stores its own file itself.
    std::fs::remove_file(&pid_file)?;
    for n in &names[8..] {
        std::fs::write(pg_wal.join("archive_status").join(format!("{n}.ready")), "")?;
    }
    push(&names[8]).await?;
    wait_until(Duration::from_secs(30), "the pusher to leave", || async {
        ensure!(pusher_of(&pg_wal).is_none(), "a pusher still runs");
        Ok(())
    })
    .await?;
    let archived = |n: &str| {
        let dir = repo.join("wal").join(&n[..16]);
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with(n))
            })
            .unwrap_or(false)
    };
    ensure!(archived(&names[8]), "wal-push did not store its own file");
    ensure!(
        !archived(&names[9]),
        "a pusher pushed ahead for a PostgreSQL that is not running"
    );
    ensure!(
        !spool.join(format!("{}.ok", names[9])).exists(),
        "a pusher wrote a status for a PostgreSQL that is not running"
    );
    Ok(())
}
