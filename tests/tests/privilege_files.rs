//! The root agent's file operations, played against as the attacker would (issue 13 items
//! 1, 2, 3 and 9): links planted by the PostgreSQL OS user where the agent writes, the
//! repository's privacy, crafted backup metadata, and a database owner's functions waiting
//! for `backup verify`'s superuser session. The victims are files the test owns (root's,
//! 0600, in a root-only folder), never a system file.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use pgherd_tests::{sql_batch, wait_until, Cluster, CtlOutput, Member, MemberOptions};

/// initdb, PostgreSQL starts and base backups on a 2-core machine shared with other tests.
const BRINGUP: Duration = Duration::from_secs(120);
const CHANGE: Duration = Duration::from_secs(30);

/// OS user `postgres`'s uid and gid (the tests run as root).
fn postgres_ids() -> Result<(u32, u32)> {
    let u = nix::unistd::User::from_name("postgres")?.context("no OS user postgres")?;
    Ok((u.uid.as_raw(), u.gid.as_raw()))
}

/// A file only root can reach: 0600 in a 0700 folder, with known content.
struct Victim {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

const VICTIM_TEXT: &str = "root's secret, must stay as it is\n";

impl Victim {
    fn new() -> Result<Victim> {
        let dir = tempfile::Builder::new()
            .prefix("pgherd-victim-")
            .tempdir()?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))?;
        let path = dir.path().join("secret");
        std::fs::write(&path, VICTIM_TEXT)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        Ok(Victim { _dir: dir, path })
    }

    fn dir(&self) -> &Path {
        self._dir.path()
    }

    /// Content, owner and mode as made.
    fn check(&self) -> Result<()> {
        let md = std::fs::symlink_metadata(&self.path)?;
        ensure!(md.is_file(), "{} is no longer a file", self.path.display());
        ensure!(
            md.uid() == 0 && md.gid() == 0,
            "{} was chowned to {}:{}",
            self.path.display(),
            md.uid(),
            md.gid()
        );
        ensure!(
            md.mode() & 0o7777 == 0o600,
            "{} has mode {:o}",
            self.path.display(),
            md.mode() & 0o7777
        );
        let text = std::fs::read_to_string(&self.path)?;
        ensure!(
            text == VICTIM_TEXT,
            "{} was changed: {text:?}",
            self.path.display()
        );
        Ok(())
    }
}

/// A symlink at `at` to `target`, owned by `postgres` as if that user had made it.
fn plant(at: &Path, target: &Path) -> Result<()> {
    let _ = std::fs::remove_file(at);
    std::os::unix::fs::symlink(target, at)
        .with_context(|| format!("cannot plant {}", at.display()))?;
    let (uid, gid) = postgres_ids()?;
    std::os::unix::fs::lchown(at, Some(uid), Some(gid))?;
    Ok(())
}

fn is_symlink(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink())
}

/// Waits until `member`'s agent log since its last start mentions `needle`.
async fn wait_log(member: &Member, needle: &str, timeout: Duration) -> Result<()> {
    wait_until(
        timeout,
        format!("{}'s log to say {needle:?}", member.name()),
        || {
            let found = member.agent_log_of_last_start().contains(needle);
            async move {
                ensure!(found, "not yet");
                Ok(())
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_planted_where_the_agent_writes_never_reach_a_root_file() -> Result<()> {
    let victim = Victim::new()?;
    // node2 keeps its sockets under a folder the OS user swapped for a link to a root-only
    // folder: the agent must not create and chown a directory in there.
    let cluster = Cluster::builder()
        .member(MemberOptions::new())
        .member(
            MemberOptions::new().yaml("postgres: {parameters: {unix_socket_directories: SOCKDIR}}"),
        )
        .configure()
        .await?;
    let node1 = cluster.member("node1");
    let node2 = cluster.member("node2");
    let sock_dir = node2.dir().join("sockets/pg");
    let config = std::fs::read_to_string(node2.config_path())?
        .replace("SOCKDIR", &sock_dir.display().to_string());
    node2.write_config(&config)?;
    plant(&node2.dir().join("sockets"), victim.dir())?;

    // Before the first start: the pgpass file's and initdb's password file's temporary
    // names, and the password file's final name, all in the data directory's parent.
    let dir = node1.dir();
    for name in [
        "data.pgpass.pgherd-tmp",
        "data.pgherd-pwfile.pgherd-tmp",
        "data.pgherd-pwfile",
        "data.pgpass",
        // The temporary name an earlier version used for both files.
        "data.pgherd-tmp",
    ] {
        plant(&dir.join(name), &victim.path)?;
    }
    cluster.member("node1").start()?;
    let healthy = cluster.wait_healthy(BRINGUP).await?;
    ensure!(healthy.leader == "node1", "{healthy:?}");
    victim.check()?;
    for name in ["data.pgpass.pgherd-tmp", "data.pgherd-pwfile.pgherd-tmp"] {
        ensure!(!dir.join(name).exists(), "{name} is left");
    }
    ensure!(
        !is_symlink(&dir.join("data.pgpass")),
        "the pgpass link was written through, not replaced"
    );

    // The reported attack: links at the config files' temporary names, then a config rewrite.
    let data = node1.data_dir();
    let planted: Vec<PathBuf> = [
        "postgresql.conf.pgherd-tmp",
        "pg_hba.conf.pgherd-tmp",
        "standby.signal.pgherd-tmp",
        // The names an earlier version used.
        "postgresql.pgherd-tmp",
        "pg_hba.pgherd-tmp",
    ]
    .iter()
    .map(|n| data.join(n))
    .collect();
    for p in &planted {
        plant(p, &victim.path)?;
    }
    plant(&dir.join("data.pgpass.pgherd-tmp"), &victim.path)?;
    cluster
        .ctl_output(&[
            "edit-config",
            "--set",
            "postgresql.parameters.work_mem=9MB",
            "--force",
        ])
        .await?
        .expect_success()?;
    wait_until(CHANGE, "postgresql.conf to carry work_mem 9MB", || {
        let text = std::fs::read_to_string(data.join("postgresql.conf")).unwrap_or_default();
        async move {
            ensure!(text.contains("9MB"), "not yet");
            Ok(())
        }
    })
    .await?;
    victim.check()?;
    ensure!(
        !planted[0].exists() && !planted[1].exists(),
        "the planted links at the temporary names are still there"
    );
    let (uid, _) = postgres_ids()?;
    for f in ["postgresql.conf", "pg_hba.conf"] {
        let md = std::fs::symlink_metadata(data.join(f))?;
        ensure!(
            md.is_file() && md.uid() == uid && md.mode() & 0o777 == 0o600,
            "{f}: file {} uid {} mode {:o}",
            md.is_file(),
            md.uid(),
            md.mode() & 0o777
        );
    }

    // node2's socket folder: refused, nothing made in the root-only folder.
    node2.start()?;
    wait_log(node2, "does not follow it", BRINGUP).await?;
    ensure!(
        !victim.dir().join("pg").exists(),
        "a socket directory was created through the planted link"
    );
    node2.stop().await?;

    // PostgreSQL's log swapped for a link: the agent refuses to open it.
    node1.stop().await?;
    let log = node1.postgres_log_path();
    std::fs::rename(&log, dir.join("data.log.old"))?;
    plant(&log, &victim.path)?;
    node1.start()?;
    wait_log(node1, "data.log is a symlink", BRINGUP).await?;
    victim.check()?;
    println!(
        "figures: links planted at 11 names in the data directory and its parent, 1 socket-folder link, 1 log link: the victim kept content, owner 0:0 and mode 0600"
    );
    Ok(())
}

/// Every entry under `dir` (and `dir` itself) with its mode.
fn walk(dir: &Path, out: &mut Vec<(PathBuf, std::fs::Metadata)>) -> Result<()> {
    let md = std::fs::symlink_metadata(dir)?;
    out.push((dir.to_path_buf(), md.clone()));
    if md.is_dir() {
        for e in std::fs::read_dir(dir)? {
            walk(&e?.path(), out)?;
        }
    }
    Ok(())
}

/// The archived WAL segments' count.
fn archived(repo: &Path) -> usize {
    let mut all = Vec::new();
    let _ = walk(&repo.join("wal"), &mut all);
    all.iter()
        .filter(|(p, m)| {
            m.is_file()
                && p.file_name()
                    .is_some_and(|n| !n.to_string_lossy().starts_with('.'))
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_repository_is_private_after_a_backup_and_archived_wal() -> Result<()> {
    let cluster = Cluster::builder().members(1).backups().configure().await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    let leader = cluster.member("node1");
    sql_batch(
        leader,
        "CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 1000) g",
    )
    .await?;
    let out = cluster.ctl_output(&["backup", "--format", "json"]).await?;
    out.expect_success()?;
    for _ in 0..3 {
        sql_batch(leader, "INSERT INTO t SELECT 1; SELECT pg_switch_wal()").await?;
    }
    let repo = cluster.repository();
    wait_until(CHANGE, "4 archived WAL files", || {
        let n = archived(&repo);
        async move {
            ensure!(n >= 4, "{n} archived");
            Ok(())
        }
    })
    .await?;

    let mut all = Vec::new();
    walk(&repo, &mut all)?;
    let (pg_uid, pg_gid) = postgres_ids()?;
    let mut files = 0;
    for (path, md) in &all {
        let mode = md.mode() & 0o7777;
        ensure!(
            mode & 0o007 == 0,
            "{} has mode {mode:04o}: others may use it",
            path.display()
        );
        let rel = path.strip_prefix(&repo)?;
        let in_wal = rel.starts_with("wal");
        if md.is_file() {
            files += 1;
            ensure!(mode == 0o600, "{} has mode {mode:04o}", path.display());
        } else if rel.as_os_str().is_empty() {
            ensure!(
                md.uid() == 0 && md.gid() == pg_gid && mode == 0o710,
                "the cluster folder is {}:{} {mode:04o}, want root:postgres 0710",
                md.uid(),
                md.gid()
            );
        } else {
            ensure!(mode == 0o700, "{} has mode {mode:04o}", path.display());
        }
        // Backups are root's; the archive is the OS user's (it runs archive_command).
        let want = if in_wal { pg_uid } else { 0 };
        if !rel.as_os_str().is_empty() {
            ensure!(
                md.uid() == want,
                "{} belongs to uid {}, want {want}",
                path.display(),
                md.uid()
            );
        }
    }

    // A repository folder others can read is named in the agent's log.
    std::fs::set_permissions(&repo, std::fs::Permissions::from_mode(0o755))?;
    cluster
        .ctl_output(&["backup", "--format", "json"])
        .await?
        .expect_success()?;
    wait_log(leader, "readable by every user", CHANGE).await?;
    println!(
        "figures: {} entries under the repository after a backup and {} archived files, none with a permission bit for others",
        all.len(),
        archived(&repo)
    );
    let _ = files;
    Ok(())
}

/// Writes a `backup.json` as a repository writer would, copying a real backup's fields.
fn craft(repo: &Path, folder: &str, real: &serde_json::Value, id: &str, file: &str) -> Result<()> {
    let dir = repo.join("backups").join(folder);
    std::fs::create_dir_all(&dir)?;
    let mut v = real.clone();
    v["id"] = id.into();
    v["file"] = file.into();
    // Newer than every real backup, so "the newest" would pick it.
    v["start_time"] = "2099-01-01T00:00:00Z".into();
    v["stop_time"] = "2099-01-01T00:00:01Z".into();
    std::fs::write(dir.join("backup.json"), serde_json::to_vec_pretty(&v)?)?;
    Ok(())
}

fn expect_refused(out: &CtlOutput, needles: &[&str]) -> Result<()> {
    ensure!(
        !out.success(),
        "`{}` succeeded: {}",
        out.command,
        out.stdout
    );
    let stderr = out.stderr.to_lowercase();
    for n in needles {
        ensure!(
            stderr.contains(&n.to_lowercase()),
            "`{}` did not say {n:?}: {}",
            out.command,
            out.stderr.trim()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_backup_metadata_is_refused_and_touches_nothing_outside_its_folder() -> Result<()> {
    let cluster = Cluster::builder().members(1).backups().configure().await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    let leader = cluster.member("node1");
    let repo = cluster.repository();
    let real = cluster.ctl_json(&["backup"]).await?;
    let real_id = real["id"].as_str().context("no id")?.to_string();

    // What `backups/<id>/../../` and `../../../` would reach: files the test owns.
    let outside = repo
        .parent()
        .context("no repository parent")?
        .join("victim-dir");
    std::fs::create_dir_all(&outside)?;
    for f in ["backup.json", "base.tar.zst", "verify.json"] {
        std::fs::write(outside.join(f), "keep")?;
    }
    let victim = Victim::new()?;
    craft(
        &repo,
        "20990101T000000Z",
        &real,
        "../../victim-dir",
        &format!("backups/{real_id}/base.tar.zst"),
    )?;
    craft(
        &repo,
        "20990101T000001Z",
        &real,
        "20990101T000001Z",
        "backups/20990101T000001Z/../../../victim-dir/base.tar.zst",
    )?;
    craft(
        &repo,
        "20990101T000002Z",
        &real,
        "20990101T000002Z",
        &victim.path.display().to_string(),
    )?;

    // list: only the real backup; the agent log names each refused folder.
    let list = cluster.ctl_output(&["backups", "--format", "json"]).await?;
    list.expect_success()?;
    let listed: Vec<serde_json::Value> = serde_json::from_str(list.stdout.trim())?;
    let ids: Vec<&str> = listed.iter().filter_map(|b| b["id"].as_str()).collect();
    ensure!(ids == [real_id.as_str()], "backups lists {ids:?}");
    wait_log(leader, "backup folder ignored", CHANGE).await?;
    ensure!(
        leader
            .agent_log_of_last_start()
            .contains("names backup \\\"../../victim-dir\\\"")
            || leader
                .agent_log_of_last_start()
                .contains("names backup \"../../victim-dir\""),
        "the log does not say which id the folder's metadata names"
    );

    // verify: by id refused with the reason; the newest valid one is the real backup.
    for (id, why) in [
        ("20990101T000000Z", "refused"),
        ("20990101T000001Z", "refused"),
        ("20990101T000002Z", "refused"),
        ("../../victim-dir", "not a backup id"),
    ] {
        let out = cluster.ctl_output(&["backup", "verify", id]).await?;
        expect_refused(&out, &[why])?;
    }
    // restore: refused before anything is stopped.
    for (id, why) in [
        ("20990101T000001Z", "refused"),
        ("../../victim-dir", "not a backup id"),
    ] {
        let out = cluster
            .ctl_output(&["restore", "--latest", "--backup", id, "--force"])
            .await?;
        expect_refused(&out, &[why])?;
    }
    ensure!(
        cluster.etcd_get("restore").await?.is_none(),
        "a restore was requested"
    );

    // retention (full: 2): two more backups remove the real one, never a crafted folder.
    for _ in 0..2 {
        cluster
            .ctl_output(&["backup", "--format", "json"])
            .await?
            .expect_success()?;
    }
    ensure!(
        !repo.join("backups").join(&real_id).exists(),
        "retention did not remove the oldest backup"
    );
    for folder in ["20990101T000000Z", "20990101T000001Z", "20990101T000002Z"] {
        ensure!(
            repo.join("backups")
                .join(folder)
                .join("backup.json")
                .exists(),
            "retention removed crafted folder {folder}"
        );
    }
    for f in ["backup.json", "base.tar.zst", "verify.json"] {
        ensure!(
            std::fs::read_to_string(outside.join(f))? == "keep",
            "{f} outside the repository was changed"
        );
    }
    victim.check()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_owner_cannot_hijack_the_verify_session() -> Result<()> {
    let cluster = Cluster::builder().members(1).backups().configure().await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    let leader = cluster.member("node1");
    // Where a hijacked superuser session would write (the OS user can write there).
    let marker = leader.dir().join("hijacked");
    let marker_sql = marker.display().to_string().replace('\'', "''");
    sql_batch(leader, "CREATE ROLE app LOGIN PASSWORD 'app'").await?;
    sql_batch(leader, "CREATE DATABASE appdb OWNER app").await?;
    let mut conn = leader.pg();
    conn.dbname = "appdb".into();
    // As the database owner: functions that out-match the built-ins verify calls (an exact
    // signature beats pg_catalog's variadic one), and a search_path that puts them first.
    conn.batch(&format!(
        "SET ROLE app;
         CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 10) g;
         CREATE FUNCTION public.format(text, name, name) RETURNS text LANGUAGE plpgsql AS $f$
           BEGIN
             BEGIN EXECUTE 'COPY (SELECT 1) TO ''{marker_sql}'''; EXCEPTION WHEN OTHERS THEN NULL; END;
             RETURN pg_catalog.format($1, $2, $3);
           END $f$;
         CREATE FUNCTION public.query_to_xml(text, boolean, boolean, text) RETURNS xml LANGUAGE plpgsql AS $f$
           BEGIN
             BEGIN EXECUTE 'COPY (SELECT 1) TO ''{marker_sql}'''; EXCEPTION WHEN OTHERS THEN NULL; END;
             RETURN pg_catalog.query_to_xml($1, $2, $3, $4);
           END $f$;
         ALTER DATABASE appdb SET search_path = public, pg_catalog;"
    ))
    .await?;
    cluster
        .ctl_output(&["backup", "--format", "json"])
        .await?
        .expect_success()?;
    let started = Instant::now();
    let v = cluster.ctl_json(&["backup", "verify"]).await?;
    ensure!(v["passed"] == true, "verify failed: {v}");
    ensure!(
        v["rows"].as_u64().is_some_and(|r| r >= 10),
        "verify did not count appdb's rows: {v}"
    );
    ensure!(
        !marker.exists(),
        "a function of the database owner ran in verify's superuser session"
    );
    println!(
        "figures: verify with a hostile database owner passed in {:.1} s, no owner function ran",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Seconds `pgherdctl <args>` took and what it printed, failing unless it succeeded.
async fn timed(cluster: &Cluster, args: &[&str]) -> Result<(f64, String)> {
    let out = cluster.ctl_output(args).await?;
    out.expect_success()?;
    Ok((out.took.as_secs_f64(), out.stdout))
}

/// The seconds verify's message gives its unpack step (`unpack 0.8 s`).
fn unpack_seconds(verify_json: &str) -> Option<f64> {
    let v: serde_json::Value = serde_json::from_str(verify_json.trim()).ok()?;
    let msg = v["message"].as_str()?;
    let rest = &msg[msg.find("(unpack ")? + "(unpack ".len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// The cost of the checks above on backups: `backup` and `backup verify` timed on the same
/// data. Not part of the suite (it measures); run it against two builds and compare:
///
/// ```text
/// PGHERD_BIN_DIR=<build>/target/release cargo nextest run -p pgherd-tests \
///     --test privilege_files --run-ignored ignored-only --no-capture
/// ```
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, run by hand"]
async fn measure_backup_and_verify_time() -> Result<()> {
    let runs: usize = std::env::var("PGHERD_MEASURE_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let rows: u64 = std::env::var("PGHERD_MEASURE_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000_000);
    let cluster = Cluster::builder()
        .members(1)
        .backups()
        .yaml("backup: {retention: {full: 10}}")
        .configure()
        .await?;
    // An agent from before issue 13 item 10 has wal-push read the member's own config.
    std::fs::set_permissions(
        cluster.member("node1").config_path(),
        std::fs::Permissions::from_mode(0o644),
    )?;
    let started = Instant::now();
    cluster.start_with_leader("node1", BRINGUP).await?;
    let bringup = started.elapsed().as_secs_f64();
    let leader = cluster.member("node1");
    sql_batch(
        leader,
        &format!(
            "CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, {rows}) g"
        ),
    )
    .await?;
    // Many files too, not only bytes: the unpack's per-entry checks.
    for i in 0..200 {
        sql_batch(leader, &format!("CREATE TABLE s{i} (id int PRIMARY KEY)")).await?;
    }
    let mut backups = Vec::new();
    let mut verifies = Vec::new();
    let mut unpacks = Vec::new();
    for _ in 0..runs {
        backups.push(timed(&cluster, &["backup", "--format", "json"]).await?.0);
        let (s, out) = timed(&cluster, &["backup", "verify", "--format", "json"]).await?;
        verifies.push(s);
        unpacks.extend(unpack_seconds(&out));
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    println!(
        "figures: {} rows + 200 tables, {runs} runs: backup {:?} s (median {:.2}), verify {:?} s (median {:.2}), its unpack step {:?} s (median {:.1}); first start to a healthy leader {bringup:.1} s; binaries from {}",
        rows,
        backups,
        median(&backups),
        verifies,
        median(&verifies),
        unpacks,
        median(&unpacks),
        pgherd_tests::bin_dir()?.display()
    );
    Ok(())
}
