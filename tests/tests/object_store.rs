//! The backup repository in an object store (issue 16 items 1, 2 and 4; encrypted, item 3,
//! in the first test), against a real
//! S3-protocol server (moto) on loopback: the seed's point-in-time restore, retention and
//! verify; a corrupted object refused by wal-fetch; a server that goes away in the middle
//! of a multipart upload (no partial object taken for a complete one, archiving retries);
//! and the credentials never reaching PostgreSQL's OS user, a log or the WAL settings.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use pgherd_tests::s3::{S3Server, SECRET_ACCESS_KEY};
use pgherd_tests::{sql, sql_batch, sql_value, timeline, wait_until, Cluster, Member};

const BRINGUP: Duration = Duration::from_secs(120);
const RESTORE: Duration = Duration::from_secs(180);

async fn ids(member: &Member, table: &str) -> Result<Vec<i32>> {
    let rows = sql(member, &format!("SELECT id FROM {table} ORDER BY id")).await?;
    Ok(rows.iter().map(|r| r.get::<_, i32>(0)).collect())
}

/// The ids of the backups `pgherdctl backup list` shows.
async fn backup_ids(cluster: &Cluster) -> Result<Vec<String>> {
    let list = cluster.ctl_json(&["backups"]).await?;
    let arr = list["backups"]
        .as_array()
        .or_else(|| list.as_array())
        .with_context(|| format!("backup list printed {list}"))?;
    Ok(arr
        .iter()
        .filter_map(|b| b["id"].as_str().map(str::to_string))
        .collect())
}

/// Nothing secret where PostgreSQL's OS user or a log reader can see it.
fn ensure_no_secret(cluster: &Cluster, member: &Member) -> Result<()> {
    let log = member.agent_log();
    ensure!(
        !log.contains(SECRET_ACCESS_KEY),
        "the agent log shows the secret key"
    );
    let pg_log = std::fs::read_to_string(member.postgres_log_path()).unwrap_or_default();
    ensure!(
        !pg_log.contains(SECRET_ACCESS_KEY),
        "the PostgreSQL log shows the secret key"
    );
    let settings = member.config_path().with_file_name(format!(
        "{}.wal.yml",
        member
            .config_path()
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
    ));
    let text = std::fs::read_to_string(&settings)
        .with_context(|| format!("cannot read {}", settings.display()))?;
    ensure!(
        !text.contains(SECRET_ACCESS_KEY)
            && !text.contains("credentials")
            && text.contains("agent_socket"),
        "the WAL settings {} hold more than the agent's socket: {text}",
        settings.display()
    );
    let _ = cluster;
    // Only root and PostgreSQL's OS user (its group) reach the agent's socket.
    use std::os::unix::fs::MetadataExt;
    let socket = settings.with_extension("sock");
    let meta = std::fs::symlink_metadata(&socket)
        .with_context(|| format!("no socket at {}", socket.display()))?;
    let postgres_gid = nix::unistd::Group::from_name("postgres")?
        .context("no postgres group")?
        .gid
        .as_raw();
    ensure!(
        meta.mode() & 0o777 == 0o660 && meta.uid() == 0 && meta.gid() == postgres_gid,
        "{} has mode {:o}, owner {}:{}",
        socket.display(),
        meta.mode() & 0o777,
        meta.uid(),
        meta.gid()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn point_in_time_restore_retention_and_verify_on_an_s3_repository() -> Result<()> {
    let s3 = S3Server::start("pgherd-pitr").await?;
    // Encrypted too (item 3 on an object store): the key file is root's, 0600.
    let key_file = s3.dir().join("backup.key");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(&key_file)?;
        writeln!(f, "{}", "5a".repeat(32))?;
    }
    let cluster = Cluster::builder()
        .members(2)
        .yaml(s3.backup_yaml("team/prod")?)
        .yaml(format!(
            "backup: {{encryption: {{key_file: '{}'}}}}",
            key_file.display()
        ))
        .configure()
        .await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    let leader = cluster.member("node1");
    sql_batch(leader, "CREATE TABLE t (id int PRIMARY KEY, v text)").await?;
    sql_batch(
        leader,
        "INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 100) g",
    )
    .await?;
    let first = cluster.ctl_json(&["backup"]).await?;
    let first_id = first["id"]
        .as_str()
        .context("backup printed no id")?
        .to_string();
    let root = format!("team/prod/{}/", cluster.name());
    let keys = s3.keys(&root).await?;
    ensure!(
        keys.iter()
            .any(|k| k == &format!("{root}backups/{first_id}/backup.json")),
        "no backup.json in the bucket: {keys:?}"
    );
    for key in keys.iter().filter(|k| !k.ends_with("/started")) {
        let body = s3.get(key).await?;
        ensure!(
            body.starts_with(b"pgherdEC"),
            "{key} in the bucket is not encrypted"
        );
    }
    sql_batch(
        leader,
        "INSERT INTO t SELECT g, 'row ' || g FROM generate_series(101, 200) g",
    )
    .await?;
    let noted: String = sql_value(
        leader,
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    )
    .await?;
    sql_batch(leader, "DELETE FROM t WHERE id > 50").await?;
    let old_tl = timeline(leader).await?;
    ensure_no_secret(&cluster, leader)?;

    let out = cluster
        .ctl_output(&["restore", "--target-time", &noted, "--force"])
        .await?;
    out.expect_success()?;
    let healthy = cluster.wait_healthy(RESTORE).await?;
    let restored = cluster.member(&healthy.leader);
    let want: Vec<i32> = (1..=200).collect();
    wait_until(
        Duration::from_secs(60),
        "the restored rows on every member",
        || async {
            for name in std::iter::once(&healthy.leader).chain(healthy.replicas.iter()) {
                let got = ids(cluster.member(name), "t").await?;
                ensure!(got == want, "{name} has {} rows", got.len());
            }
            Ok(())
        },
    )
    .await?;
    ensure!(
        timeline(restored).await? > old_tl,
        "the restore did not start a new timeline"
    );
    ensure!(
        !s3.keys(&format!("{root}wal/history/")).await?.is_empty(),
        "no timeline history was archived to the bucket"
    );

    // Retention (full: 2): two more backups remove the first one, its objects included.
    let second = cluster.ctl_json(&["backup"]).await?;
    let third = cluster.ctl_json(&["backup"]).await?;
    let listed = backup_ids(&cluster).await?;
    let want_ids: Vec<String> = [&second, &third]
        .iter()
        .map(|b| b["id"].as_str().unwrap_or_default().to_string())
        .collect();
    ensure!(
        listed == want_ids,
        "backup list shows {listed:?}, not {want_ids:?}"
    );
    let left = s3.keys(&format!("{root}backups/{first_id}/")).await?;
    ensure!(left.is_empty(), "retention left {left:?}");

    // Verify restores the newest backup from the bucket into a scratch copy and checks it.
    let verify = cluster.ctl_output(&["backup", "verify"]).await?;
    verify.expect_success()?;
    ensure_no_secret(&cluster, restored)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_object_is_refused_and_a_server_lost_mid_upload_leaves_no_object_and_archiving_retries(
) -> Result<()> {
    let s3 = S3Server::start("pgherd-faults").await?;
    let cluster = Cluster::builder()
        .members(1)
        .yaml(s3.backup_yaml("")?)
        .configure()
        .await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    let leader = cluster.member("node1");
    let root = format!("{}/", cluster.name());
    sql_batch(
        leader,
        "CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 1000) g; SELECT pg_switch_wal()",
    )
    .await?;
    let segment_key = wait_until(Duration::from_secs(30), "an archived segment", || async {
        let keys = s3.keys(&format!("{root}wal/")).await?;
        keys.into_iter()
            .find(|k| {
                let file = k.rsplit('/').next().unwrap_or_default();
                file.len() > 24 && file.as_bytes()[24] == b'-'
            })
            .context("no segment archived yet")
    })
    .await?;
    let name = segment_key
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .chars()
        .take(24)
        .collect::<String>();

    // A corrupted object: wal-fetch (through the agent) refuses it with 126, which stops
    // recovery, and writes nothing.
    let mut body = s3.get(&segment_key).await?;
    let mid = body.len() / 2;
    body[mid] ^= 0xff;
    s3.put(&segment_key, &body).await?;
    let dest_dir = tempfile::tempdir()?;
    let dest = dest_dir.path().join("RECOVERYXLOG");
    let out = tokio::process::Command::new(pgherd_tests::agent_bin()?)
        .args(["wal-fetch", "--config"])
        .arg(leader.config_path())
        .arg(&name)
        .arg(&dest)
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(126),
        "wal-fetch of a corrupted object exited {:?}: {stderr}",
        out.status
    );
    ensure!(
        stderr.contains("corrupt")
            || stderr.contains("checksum")
            || stderr.contains("zstd")
            || stderr.contains("decompress")
            || stderr.contains("Unknown frame"),
        "wal-fetch said: {stderr}"
    );
    ensure!(!dest.exists(), "wal-fetch wrote {}", dest.display());
    // A name that is not archived: exit 1, the normal end of the archive.
    let out = tokio::process::Command::new(pgherd_tests::agent_bin()?)
        .args(["wal-fetch", "--config"])
        .arg(leader.config_path())
        .arg("0000000900000009000000AA")
        .arg(&dest)
        .output()
        .await?;
    ensure!(
        out.status.code() == Some(1),
        "wal-fetch of a missing file exited {:?}",
        out.status
    );

    // Enough incompressible data that the base backup is a multipart upload of several
    // parts, streamed over seconds.
    sql_batch(
        leader,
        "CREATE TABLE big AS SELECT g AS id, md5(g::text) || md5((g * 7)::text) || md5(random()::text) AS v FROM generate_series(1, 1200000) g",
    )
    .await?;
    // The server goes away once the base backup's multipart upload has started, and stays
    // away until archiving has failed too; pg_basebackup then waits for its WAL to be
    // archived, which happens once the server is back.
    let log = s3.log_path();
    let started_uploads = |log: &std::path::Path| {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("POST") && l.contains("base.tar") && l.contains("uploads"))
            .count()
    };
    let before = started_uploads(&log);
    let failed_before: i64 = sql_value(leader, "SELECT failed_count FROM pg_stat_archiver").await?;
    let outage = async {
        wait_until(
            Duration::from_secs(120),
            "the base backup's multipart upload to start",
            || async {
                ensure!(started_uploads(&log) > before, "not yet");
                Ok(())
            },
        )
        .await?;
        s3.proxy().sever();
        sql_batch(leader, "INSERT INTO t VALUES (0)").await?;
        let switched: String =
            sql_value(leader, "SELECT pg_walfile_name(pg_current_wal_lsn())").await?;
        sql_batch(leader, "SELECT pg_switch_wal()").await?;
        let waited = wait_until(Duration::from_secs(60), "an archiving failure", || async {
            let failed: i64 =
                sql_value(leader, "SELECT failed_count FROM pg_stat_archiver").await?;
            ensure!(failed > failed_before, "failed_count still {failed}");
            Ok(())
        })
        .await;
        s3.proxy().heal();
        waited.map(|_| switched)
    };
    let (out, switched) = tokio::join!(cluster.ctl_output(&["backup", "--format", "json"]), outage);
    let switched = switched?;
    let out = out?;
    ensure!(
        out.code != Some(0),
        "the backup succeeded although the server went away mid-upload: {}",
        out.stdout
    );
    let objects = s3.keys(&format!("{root}backups/")).await?;
    ensure!(
        !objects
            .iter()
            .any(|k| k.ends_with("/backup.json") || k.contains("/base.tar")),
        "the interrupted backup left {objects:?}"
    );
    ensure!(
        backup_ids(&cluster).await?.is_empty(),
        "an interrupted backup is listed"
    );
    // Archiving failed while the server was away and catches up now.
    wait_until(
        Duration::from_secs(120),
        "archiving to catch up",
        || async {
            let last: Option<String> =
                sql_value(leader, "SELECT last_archived_wal FROM pg_stat_archiver").await?;
            let last = last.unwrap_or_default();
            ensure!(
                last.as_str() >= switched.as_str(),
                "last archived {last}, waiting for {switched}"
            );
            Ok(())
        },
    )
    .await?;
    ensure!(
        s3.keys(&format!("{root}wal/"))
            .await?
            .iter()
            .any(|k| k.contains(&format!("/{switched}-"))),
        "{switched} is not in the bucket"
    );
    let ok = cluster.ctl_json(&["backup"]).await?;
    let id = ok["id"].as_str().context("no id")?.to_string();
    ensure!(
        backup_ids(&cluster).await? == vec![id.clone()],
        "backup list is not just {id}"
    );
    ensure_no_secret(&cluster, leader)?;
    Ok(())
}

/// `backup.s3.ca_file`: an HTTPS server whose certificate a private CA signed is trusted with
/// the CA's certificate file, and refused without it (nothing stored, the backup fails).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_server_of_a_private_ca_is_trusted_with_ca_file_and_refused_without_it(
) -> Result<()> {
    let s3 = S3Server::start_tls("pgherd-ca").await?;
    let ca = s3
        .ca_file()
        .context("an HTTPS server has a CA")?
        .to_path_buf();
    let trusted = Cluster::builder()
        .members(1)
        .yaml(s3.backup_yaml("with-ca")?)
        .configure()
        .await?;
    let with_ca = s3.backup_yaml("without-ca")?;
    let without_ca = with_ca.replace(&format!(", ca_file: '{}'", ca.display()), "");
    ensure!(without_ca != with_ca, "no ca_file in {with_ca}");
    let untrusted = Cluster::builder()
        .members(1)
        .yaml(without_ca)
        .configure()
        .await?;
    trusted.start_with_leader("node1", BRINGUP).await?;
    untrusted.start_with_leader("node1", BRINGUP).await?;

    let b = trusted.ctl_json(&["backup"]).await?;
    let id = b["id"].as_str().context("backup printed no id")?;
    let keys = s3.keys(&format!("with-ca/{}/", trusted.name())).await?;
    ensure!(
        keys.iter()
            .any(|k| k.ends_with(&format!("backups/{id}/backup.json"))),
        "the backup over HTTPS stored no backup.json: {keys:?}"
    );
    ensure!(
        keys.iter().any(|k| k.contains("/wal/")),
        "no WAL archived over HTTPS: {keys:?}"
    );

    let out = untrusted.ctl_output(&["backup"]).await?;
    out.expect_failure(1, &["certificate"])?;
    let stored = s3.keys("without-ca/").await?;
    ensure!(
        stored.is_empty(),
        "an agent that does not trust the server stored {stored:?}"
    );
    Ok(())
}
