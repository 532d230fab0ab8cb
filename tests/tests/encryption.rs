//! Encryption at rest of the backup repository (`backup.encryption`): the bytes of a row
//! are nowhere in the repository, verify and a point-in-time restore with the key work, and with
//! another key reading the archive fails naming the key it was written with.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use pgherd_agent::backup::crypt::Keys;
use pgherd_tests::{sql_batch, sql_value, timeline, wait_until, Cluster, Member};

const BRINGUP: Duration = Duration::from_secs(120);
const RESTORE: Duration = Duration::from_secs(180);
const MARKER: &str = "pgherd-plaintext-marker-7781";

/// Every file under `dir`.
fn files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let e = e?;
        if e.file_type()?.is_dir() {
            files(&e.path(), out)?;
        } else {
            out.push(e.path());
        }
    }
    Ok(())
}

async fn ids(member: &Member) -> Result<Vec<i32>> {
    let rows = pgherd_tests::sql(member, "SELECT id FROM t ORDER BY id").await?;
    Ok(rows.iter().map(|r| r.get::<_, i32>(0)).collect())
}

async fn insert(member: &Member, from: i32, to: i32) -> Result<()> {
    sql_batch(
        member,
        &format!("INSERT INTO t SELECT g, '{MARKER} ' || g FROM generate_series({from}, {to}) g"),
    )
    .await
}

fn write_key(path: &Path, key: &[u8; 32]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    writeln!(
        f,
        "# the key of the test's repository\n{}",
        hex::encode(key)
    )?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_repository_holds_no_plaintext_restores_with_the_key_and_refuses_another_key(
) -> Result<()> {
    let keys = tempfile::tempdir()?;
    let key_file = keys.path().join("backup.key");
    let first = [0x42u8; 32];
    write_key(&key_file, &first)?;
    let first_id = Keys::parse(&hex::encode(first), "test")
        .map_err(anyhow::Error::msg)?
        .current_id();
    let cluster = Cluster::builder()
        .members(1)
        .backups()
        .yaml(format!(
            "backup: {{compression: none, encryption: {{key_file: {}}}}}",
            key_file.display()
        ))
        .configure()
        .await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    let leader = cluster.member("node1");
    sql_batch(leader, "CREATE TABLE t (id int PRIMARY KEY, v text)").await?;
    insert(leader, 1, 100).await?;
    let out = cluster.ctl_output(&["backup", "--format", "json"]).await?;
    out.expect_success()?;
    insert(leader, 101, 200).await?;
    // verify unpacks the backup and recovers through the archive, all decrypted by the agent.
    let v = cluster.ctl_json(&["backup", "verify"]).await?;
    ensure!(v["passed"] == true, "verify failed: {v}");
    let noted: String = sql_value(
        leader,
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    )
    .await?;
    sql_batch(leader, "DELETE FROM t WHERE id > 50").await?;
    let old_tl = timeline(leader).await?;

    // The restore replays the archive up to `noted`: every row above went through it.
    cluster
        .ctl_output(&["restore", "--target-time", &noted, "--force"])
        .await?
        .expect_success()?;
    let healthy = cluster.wait_healthy(RESTORE).await?;
    let leader = cluster.member(&healthy.leader);
    ensure!(timeline(leader).await? > old_tl, "no restore happened");
    let want: Vec<i32> = (1..=200).collect();
    ensure!(
        ids(leader).await? == want,
        "restored ids {:?}",
        ids(leader).await?
    );

    // Not one byte of the rows in the repository; every object is pgherd's ciphertext.
    let mut all = Vec::new();
    files(&cluster.repository(), &mut all)?;
    let mut objects = 0;
    let mut wal = None;
    for path in &all {
        let data = std::fs::read(path)?;
        ensure!(
            !data.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()),
            "{} holds the row's bytes in the clear",
            path.display()
        );
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with('.') {
            continue;
        }
        ensure!(
            data.starts_with(b"pgherdEC"),
            "{} is not encrypted",
            path.display()
        );
        objects += 1;
        if name.len() > 25 && name.as_bytes()[24] == b'-' && wal.is_none() {
            wal = Some(name[..24].to_string());
        }
    }
    let wal = wal.with_context(|| format!("no archived segment in {all:?}"))?;
    ensure!(
        objects >= 3 && all.iter().any(|p| p.ends_with("base.tar")),
        "too few objects to mean anything: {all:?}"
    );
    // The same search finds the rows in the clear in PostgreSQL's own files.
    let mut data = Vec::new();
    files(&leader.data_dir(), &mut data)?;
    let mut found = false;
    for path in &data {
        if let Ok(bytes) = std::fs::read(path) {
            found |= bytes.windows(MARKER.len()).any(|w| w == MARKER.as_bytes());
        }
    }
    ensure!(
        found,
        "the marker is not even in the data directory: the search proves nothing"
    );
    ensure!(
        !leader.agent_log().contains(&hex::encode(first)),
        "the key reached the agent's log"
    );

    // Another key: the agent starts, but reading what the first key wrote fails, naming it.
    write_key(&key_file, &[0x17u8; 32])?;
    leader.stop().await?;
    leader.start()?;
    // Recovery on this member now aborts too (the archive's history files do not decrypt):
    // ask the agent's socket directly, once it serves.
    let dest = keys.path().join("RECOVERYXLOG");
    let config = leader.config_path().to_path_buf();
    let agent = pgherd_tests::agent_bin()?;
    let want = format!("encrypted with key {first_id}, which backup.encryption does not hold");
    wait_until(
        Duration::from_secs(60),
        "wal-fetch with another key to name the first one",
        || async {
            let out = tokio::process::Command::new(&agent)
                .args(["wal-fetch", "--config"])
                .arg(&config)
                .arg(&wal)
                .arg(&dest)
                .output()
                .await?;
            let stderr = String::from_utf8_lossy(&out.stderr);
            ensure!(stderr.contains(&want), "wal-fetch said: {stderr}");
            // Above 125: PostgreSQL aborts recovery rather than take it for the archive's end.
            ensure!(
                out.status.code().is_some_and(|c| c > 125),
                "wal-fetch with another key exited {:?}",
                out.status
            );
            Ok(())
        },
    )
    .await?;
    ensure!(!dest.exists(), "wal-fetch left a file");
    Ok(())
}
