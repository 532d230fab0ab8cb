//! Base backups the agent reads from the data directory itself (`backup::copy`,
//! docs/design/file-level-backups.md) on a real cluster: a page whose checksum fails on
//! disk fails the backup naming the file and block, and nothing is listed; a backup whose
//! session is ended between `pg_backup_start` and `pg_backup_stop` fails and leaves nothing
//! in the repository; with the page repaired a backup is taken, verified and listed.

use std::io::{Read, Seek, SeekFrom, Write};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use nix::sys::signal::Signal;
use pgherd_tests::{sql_batch, sql_value, Cluster};

const BRINGUP: Duration = Duration::from_secs(120);

/// The files stored under the repository's `backups/` folder.
fn stored_backup_files(cluster: &Cluster) -> Vec<String> {
    let mut out = Vec::new();
    let root = cluster.repository();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().contains("/backups/") {
                out.push(p.strip_prefix(&root).unwrap_or(&p).display().to_string());
            }
        }
    }
    out
}

/// No backup is listed, and no tar or `backup.json` is in the repository.
async fn nothing_stored(cluster: &Cluster, what: &str) -> Result<()> {
    let files = stored_backup_files(cluster);
    ensure!(
        !files
            .iter()
            .any(|f| f.ends_with("backup.json") || f.contains("base.tar")),
        "{what} left {files:?}"
    );
    let list = cluster.ctl_json(&["backups"]).await?;
    ensure!(
        list.as_array().is_some_and(|a| a.is_empty()),
        "{what} is listed: {list}"
    );
    Ok(())
}

/// Flips one byte at `offset` of `file`, returning what was there.
fn flip(file: &std::path::Path, offset: u64) -> Result<u8> {
    let mut f = std::fs::File::options()
        .read(true)
        .write(true)
        .open(file)
        .with_context(|| format!("cannot open {}", file.display()))?;
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(offset))?;
    f.read_exact(&mut b)?;
    f.seek(SeekFrom::Start(offset))?;
    f.write_all(&[b[0] ^ 0x40])?;
    f.sync_all()?;
    Ok(b[0])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_page_or_a_session_ended_mid_backup_fails_the_backup_and_stores_nothing(
) -> Result<()> {
    let cluster = Cluster::builder().members(1).backups().configure().await?;
    let node = cluster.member("node1");
    node.set_failpoints(&["backup-copied-before-stop"]);
    cluster.start_with_leader("node1", BRINGUP).await?;
    sql_batch(
        node,
        "CREATE TABLE t (id int PRIMARY KEY, v text) WITH (autovacuum_enabled = false);
         INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 2000) g;",
    )
    .await?;
    sql_batch(node, "VACUUM FREEZE t").await?;
    sql_batch(node, "CHECKPOINT").await?;
    let path: String = sql_value(node, "SELECT pg_relation_filepath('t')").await?;
    let file = node.data_dir().join(&path);

    // Block 1's tuple data, changed on disk under PostgreSQL (its buffer is clean, so it is
    // never written back): the copy reads it, checks it twice, and fails.
    let offset = 8192 + 8100;
    let was = flip(&file, offset)?;
    let out = cluster.ctl_output(&["backup"]).await?;
    ensure!(
        out.code != Some(0),
        "a backup of a corrupted page succeeded: {out:?}"
    );
    let expect = format!("page checksum failure in {path} block 1");
    ensure!(
        out.stderr.contains(&expect),
        "the failure does not name the file and block ({expect}): {}",
        out.stderr
    );
    nothing_stored(&cluster, "a failed backup").await?;

    // Repaired. The next backup stops (frozen agent) after the copy, before
    // pg_backup_stop; its session is ended meanwhile.
    let mut f = std::fs::File::options().write(true).open(&file)?;
    f.seek(SeekFrom::Start(offset))?;
    f.write_all(&[was])?;
    f.sync_all()?;
    let ctl = {
        let cluster_cfg = node.config_path().to_path_buf();
        tokio::spawn(async move {
            pgherd_tests::ctl_direct_output(&[
                std::ffi::OsStr::new("--config"),
                cluster_cfg.as_os_str(),
                std::ffi::OsStr::new("backup"),
            ])
            .await
        })
    };
    node.wait_failpoint("backup-copied-before-stop", Duration::from_secs(60))
        .await?;
    let ended: i64 = sql_value(
        node,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'pgherd backup'",
    )
    .await?;
    ensure!(ended == 1, "{ended} backup sessions ended, not one");
    node.signal(Signal::SIGCONT)?;
    let out = tokio::time::timeout(Duration::from_secs(120), ctl)
        .await
        .context("the backup did not end after its session was ended")???;
    ensure!(
        out.code != Some(0),
        "a backup without its session succeeded: {out:?}"
    );
    ensure!(
        out.stderr.contains("pg_backup_stop"),
        "the failure does not say the backup could not be stopped: {}",
        out.stderr
    );
    nothing_stored(&cluster, "a backup whose session ended").await?;
    let log = std::fs::read_to_string(node.postgres_log_path()).unwrap_or_default();
    ensure!(
        log.contains("aborting backup due to backend exiting before pg_backup_stop was called"),
        "PostgreSQL did not abort the backup of the ended session"
    );
    Ok(())
}
