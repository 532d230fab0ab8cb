//! The root agent cannot be turned against its host through the processes it signals or the
//! secrets it holds (issue 13 items 4, 10 and 11). Each test plays the attacker who has the
//! `postgres` OS user's rights (any SQL superuser has them, through `COPY ... TO PROGRAM`):
//!
//! - `postmaster.pid` is that user's file: written with pid 1 or the pid of a process of
//!   another user (a root `sleep` the test owns), it must never make the agent (stop,
//!   restart, fencing) or its watchdog signal that process; the agent says it refused.
//! - That user runs `wal-push`/`wal-fetch`: they must work while the member's configuration
//!   (API token, passwords) is root's alone, reading a settings file with no secret in it.
//! - That user reads PostgreSQL's log: no password may be in it, even with every statement
//!   logged, and the roles still log in (SCRAM).

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use pgherd_tests::{
    is_alive, kill_postmaster, run_as_postgres, sql_batch, sql_value, wait_until, Cluster, Member,
    MemberOptions, PgConn, REPLICATION_PASSWORD, REPLICATION_USER, SUPERUSER_PASSWORD, TOKEN,
};

const BRINGUP: Duration = Duration::from_secs(120);
const RESTART: Duration = Duration::from_secs(60);
/// The harness's lease TTL (`bootstrap.dcs.ttl`), plus room for a slow machine.
const FENCED: Duration = Duration::from_secs(8);

/// A live process the agent must never signal: a `sleep` owned by root (the tests run as
/// root), outside any data directory; killed on drop.
struct Victim(Child);

impl Victim {
    fn spawn() -> Result<Victim> {
        let child = Command::new("sleep")
            .arg("600")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .current_dir("/")
            .spawn()
            .context("cannot start sleep")?;
        Ok(Victim(child))
    }

    /// A root copy of `sleep` named `postgres` (in `bin`), running in `dir`: all a name
    /// and working-directory check sees of a postmaster.
    fn disguised(bin: &Path, dir: &Path) -> Result<Victim> {
        let fake = bin.join("postgres");
        let sleep = ["/usr/bin/sleep", "/bin/sleep"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .context("sleep is not installed")?;
        std::fs::copy(sleep, &fake)?;
        let child = Command::new(&fake)
            .arg("600")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .current_dir(dir)
            .spawn()
            .with_context(|| format!("cannot start {}", fake.display()))?;
        wait_exec(child.id() as i32, &fake)?;
        Ok(Victim(child))
    }

    fn pid(&self) -> i32 {
        self.0.id() as i32
    }

    /// Alive, and not stopped either (the watchdog SIGSTOPs a postmaster before it kills).
    fn check(&mut self, what: &str) -> Result<()> {
        let pid = self.pid();
        ensure!(
            matches!(self.0.try_wait(), Ok(None)),
            "{what}: the victim process {pid} was killed"
        );
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let state = stat.rsplit_once(')').map(|(_, r)| r.trim_start());
        ensure!(
            !state.is_some_and(|s| s.starts_with('T')),
            "{what}: the victim process {pid} was stopped"
        );
        Ok(())
    }
}

impl Drop for Victim {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Writes `pid` on the first line of `member`'s `postmaster.pid`, as the `postgres` user
/// could: the rest of the file as PostgreSQL wrote it (or a plausible one), owner and mode
/// kept.
fn point_pid_file_at(member: &Member, pid: i32) -> Result<()> {
    let path = member.data_dir().join("postmaster.pid");
    let rest = match std::fs::read_to_string(&path) {
        Ok(text) => text.split_once('\n').map_or("", |(_, r)| r).to_string(),
        Err(_) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs();
            format!(
                "{}\n{now}\n{}\n{}\n127.0.0.1\n  5432001         0\nready   \n",
                member.data_dir().display(),
                member.pg_port(),
                member.dir().display()
            )
        }
    };
    std::fs::write(&path, format!("{pid}\n{rest}"))
        .with_context(|| format!("cannot write {}", path.display()))?;
    pgherd_tests::chown_to_postgres(&path)
}

async fn wait_log(member: &Member, needle: &str, timeout: Duration) -> Result<()> {
    wait_until(
        timeout,
        format!("{}'s agent to log {needle:?}", member.name()),
        || async {
            ensure!(
                member.agent_log().contains(needle),
                "not yet; last lines:\n{}",
                pgherd_tests::tail(member.agent_log_path(), 8)
            );
            Ok(())
        },
    )
    .await
}

async fn wait_gone(pid: i32, what: &str, timeout: Duration) -> Result<()> {
    wait_until(
        timeout,
        format!("{what} (pid {pid}) to be gone"),
        || async move {
            ensure!(!is_alive(pid), "still running");
            Ok(())
        },
    )
    .await
}

/// Item 4 while PostgreSQL runs: the agent stops (restart, fencing when etcd is gone) and
/// its watchdog fences the postmaster it started, whatever `postmaster.pid` says meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewritten_pid_file_never_redirects_a_stop_a_fence_or_the_watchdog() -> Result<()> {
    let cluster = Cluster::builder()
        .member(MemberOptions::new().through_etcd_proxy())
        .configure()
        .await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    let m = cluster.member("node1");
    let mut victim = Victim::spawn()?;

    // Restart: the fast shutdown goes to the postmaster the agent started.
    let pm = wait_primary(&cluster, m).await?;
    point_pid_file_at(m, victim.pid())?;
    cluster
        .ctl_output(&["restart", "node1", "--force"])
        .await?
        .expect_success()?;
    wait_gone(pm, "the restarted postmaster", RESTART).await?;
    cluster.wait_healthy(RESTART).await?;
    victim.check("after a restart")?;
    let refused = format!(
        "refusing to signal pid {} named in postmaster.pid",
        victim.pid()
    );
    wait_log(m, &refused, Duration::from_secs(5)).await?;

    // Fencing: the leader cut off from etcd stops its primary by the time its lease runs out.
    let pm = wait_primary(&cluster, m).await?;
    let mut victim2 = Victim::spawn()?;
    point_pid_file_at(m, victim2.pid())?;
    m.etcd_proxy().context("node1 has no etcd proxy")?.sever();
    wait_gone(pm, "the fenced primary's postmaster", FENCED).await?;
    victim.check("after fencing")?;
    victim2.check("after fencing")?;
    // Whichever fenced first, the agent's stop or its watchdog at the lease's deadline, the
    // agent refused the file's pid (to signal it, or to arm the watchdog for it afterwards).
    let refused = format!("pid {} named in postmaster.pid", victim2.pid());
    wait_log(m, &refused, Duration::from_secs(5)).await?;
    m.etcd_proxy().context("node1 has no etcd proxy")?.heal();
    let pm = wait_primary(&cluster, m).await?;

    // The watchdog: armed with the postmaster the agent spawned, it fences that one when the
    // agent freezes, not pid 1 that the file names now.
    point_pid_file_at(m, 1)?;
    let frozen = m.pause_agent()?;
    wait_gone(pm, "the postmaster of the frozen agent", FENCED).await?;
    ensure!(is_alive(1), "pid 1 is gone");
    victim.check("after the watchdog fired")?;
    victim2.check("after the watchdog fired")?;
    let fenced = format!(
        "pgherd watchdog: the agent did not renew the leader lease before its deadline; killed PostgreSQL (postmaster {pm} and its children)"
    );
    wait_log(m, &fenced, Duration::from_secs(5)).await?;
    drop(frozen);
    // The file the fenced postmaster left names pid 1: refused, removed, PostgreSQL back.
    wait_primary(&cluster, m).await?;
    wait_log(
        m,
        "removed stale postmaster.pid naming pid 1",
        Duration::from_secs(5),
    )
    .await?;
    Ok(())
}

/// Waits until `m` leads with a writable PostgreSQL; returns its postmaster's pid.
async fn wait_primary(cluster: &Cluster, m: &Member) -> Result<i32> {
    cluster.wait_healthy(BRINGUP).await?;
    wait_until(
        BRINGUP,
        format!("{} to run a primary", m.name()),
        || async {
            let pm = m.postmaster_pid().context("no postmaster")?;
            let writable: bool = sql_value(m, "SELECT NOT pg_is_in_recovery()").await?;
            ensure!(writable, "still in recovery");
            Ok(pm)
        },
    )
    .await
}

/// Item 4 while PostgreSQL is down: a `postmaster.pid` naming pid 1 or another user's
/// process (a root `sleep`; a root copy of `sleep` named `postgres` running in the data
/// directory, which the name and directory checks alone took for a postmaster) is refused
/// for the watchdog, left alone by the agent's stops, and removed as stale when PostgreSQL
/// starts; the process lives on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pid_file_naming_init_or_a_root_process_while_postgres_is_down_is_refused() -> Result<()>
{
    let cluster = Cluster::builder().members(1).configure().await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    let m = cluster.member("node1");
    let mut victim = Victim::spawn()?;

    // Paused, the agent leaves a dead PostgreSQL down; its loop still arms the watchdog.
    cluster.ctl_output(&["pause"]).await?.expect_success()?;
    ensure!(kill_postmaster(&m.data_dir()), "node1 had no postmaster");
    point_pid_file_at(m, victim.pid())?;
    let refused = format!(
        "refusing to arm the watchdog for pid {} named in postmaster.pid: pid {} belongs to root (uid 0)",
        victim.pid(),
        victim.pid()
    );
    wait_log(m, &refused, Duration::from_secs(10)).await?;
    // A planned stop of the agent: nothing of ours runs, nothing is signalled.
    m.stop().await?;
    victim.check("after the agent stopped")?;

    // A root process that looks like this data directory's postmaster but for its owner.
    let bin = tempfile::tempdir()?;
    let mut disguised = Victim::disguised(bin.path(), &m.data_dir())?;
    point_pid_file_at(m, disguised.pid())?;
    m.start()?;
    let refused = format!(
        "refusing to arm the watchdog for pid {} named in postmaster.pid: pid {} belongs to root (uid 0)",
        disguised.pid(),
        disguised.pid()
    );
    wait_log(m, &refused, Duration::from_secs(30)).await?;
    cluster.ctl_output(&["resume"]).await?.expect_success()?;
    wait_primary(&cluster, m).await?;
    let removed = format!(
        "removed stale postmaster.pid naming pid {}",
        disguised.pid()
    );
    wait_log(m, &removed, Duration::from_secs(5)).await?;
    disguised.check("after the agent started PostgreSQL")?;

    // Pid 1 in the file of a cleanly stopped member.
    m.stop().await?;
    point_pid_file_at(m, 1)?;
    m.start()?;
    wait_primary(&cluster, m).await?;
    wait_log(
        m,
        "removed stale postmaster.pid naming pid 1 reason=pid 1 is the init process",
        Duration::from_secs(5),
    )
    .await?;
    ensure!(is_alive(1), "pid 1 is gone");
    victim.check("at the end")?;
    disguised.check("at the end")?;
    Ok(())
}

/// Item 11: with every statement logged from the first start on, neither password is in
/// PostgreSQL's log (bootstrap, role creation, a replica's clone and streaming), the roles
/// hold SCRAM verifiers, and both log in with their passwords.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_never_reach_the_postgresql_log_and_the_roles_log_in_with_scram() -> Result<()> {
    let cluster = Cluster::builder()
        .members(2)
        .yaml(
            "postgres: {parameters: {log_statement: all, log_min_duration_statement: 0, \
             log_connections: 'on', log_replication_commands: 'on'}}",
        )
        .configure()
        .await?;
    let healthy = cluster.start_with_leader("node1", BRINGUP).await?;
    let leader = cluster.member(&healthy.leader);
    cluster.start_all()?;
    cluster.wait_healthy(BRINGUP).await?;
    // Something that logs the superuser's connection once more.
    sql_batch(leader, "CREATE TABLE logged (id int); DROP TABLE logged").await?;

    let verifiers: Vec<String> = pgherd_tests::sql(
        leader,
        "SELECT rolpassword FROM pg_authid WHERE rolname IN ('postgres', 'replicator') ORDER BY rolname",
    )
    .await?
    .iter()
    .map(|r| r.get::<_, String>(0))
    .collect();
    ensure!(verifiers.len() == 2, "{verifiers:?}");
    for v in &verifiers {
        ensure!(
            v.starts_with("SCRAM-SHA-256$4096:"),
            "not a SCRAM verifier: {v}"
        );
    }
    // The replicator logs in with its password (pg_hba allows it on loopback).
    let repl = PgConn {
        user: REPLICATION_USER.into(),
        password: REPLICATION_PASSWORD.into(),
        ..PgConn::superuser(leader.pg_port())
    };
    let me: String = repl.value("SELECT current_user::text").await?;
    ensure!(me == REPLICATION_USER, "{me}");
    let wrong = PgConn {
        password: "not-the-password".into(),
        ..repl.clone()
    };
    ensure!(
        wrong.connect().await.is_err(),
        "a wrong password was accepted"
    );

    for m in cluster.members() {
        let log = std::fs::read_to_string(m.postgres_log_path())
            .with_context(|| format!("cannot read {}", m.postgres_log_path().display()))?;
        ensure!(
            log.contains("statement: CREATE TABLE logged") || m.name() != leader.name(),
            "{}'s log does not show statements: log_statement was not in effect",
            m.name()
        );
        for secret in [SUPERUSER_PASSWORD, REPLICATION_PASSWORD, TOKEN] {
            if let Some(line) = log.lines().find(|l| l.contains(secret)) {
                bail!("{}'s PostgreSQL log holds a secret: {line}", m.name());
            }
        }
        for v in &verifiers {
            ensure!(
                !log.contains(v.as_str()),
                "{}'s log holds a verifier",
                m.name()
            );
        }
    }
    ensure!(
        sql_value::<i64>(leader, "SELECT count(*) FROM pg_stat_replication").await? == 1,
        "the replica does not stream (the replicator's login)"
    );
    Ok(())
}

/// Item 11: a secret written with the wrong YAML type is named by its key, never echoed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_of_the_wrong_type_is_not_echoed_by_check_config() -> Result<()> {
    let cluster = Cluster::builder().members(1).configure().await?;
    let m = cluster.member("node1");
    for (i, bad) in ["98765432123", "{nested: 98765432123}", "[98765432123]"]
        .iter()
        .enumerate()
    {
        let path = m.write_config_copy(
            &format!("bad-{i}.yml"),
            &format!("postgres: {{superuser: {{password: {bad}}}}}"),
        )?;
        let out = Command::new(pgherd_tests::agent_bin()?)
            .arg("check-config")
            .arg(&path)
            .output()?;
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(
            out.status.code() == Some(2),
            "{bad}: {:?} {said}",
            out.status
        );
        ensure!(
            said.contains("postgres.superuser.password"),
            "{bad}: {said}"
        );
        ensure!(
            !said.contains("98765432123"),
            "{bad}: the value was echoed: {said}"
        );
    }
    Ok(())
}

/// Item 10: the member's configuration is root's alone (0600) and `wal-push`/`wal-fetch`
/// still work as `postgres`: PostgreSQL archives, and a segment fetched by hand comes back,
/// through the settings the agent wrote (0640 root:postgres, no secret in it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_push_and_fetch_run_as_postgres_without_reading_the_member_config() -> Result<()> {
    let cluster = Cluster::builder().members(1).backups().configure().await?;
    let m = cluster.member("node1");
    let config = m.config_path().to_path_buf();
    std::os::unix::fs::chown(&config, Some(0), Some(0))?;
    let md = std::fs::metadata(&config)?;
    ensure!(
        md.mode() & 0o777 == 0o600,
        "the harness wrote {:o}",
        md.mode()
    );
    cluster.start_with_leader("node1", BRINGUP).await?;

    let settings = m.dir().join("pgherd.wal.yml");
    let md = std::fs::metadata(&settings)
        .with_context(|| format!("the agent wrote no {}", settings.display()))?;
    let postgres = nix::unistd::User::from_name("postgres")?.context("no user postgres")?;
    ensure!(
        md.mode() & 0o777 == 0o640,
        "{} is {:o}",
        settings.display(),
        md.mode()
    );
    ensure!(
        md.uid() == 0,
        "{} belongs to uid {}",
        settings.display(),
        md.uid()
    );
    ensure!(
        md.gid() == postgres.gid.as_raw(),
        "{} has group {}",
        settings.display(),
        md.gid()
    );
    let text = std::fs::read_to_string(&settings)?;
    let keys: Vec<String> = match serde_yaml::from_str::<serde_yaml::Value>(&text)? {
        serde_yaml::Value::Mapping(map) => map
            .keys()
            .filter_map(|k| k.as_str().map(str::to_string))
            .collect(),
        other => bail!("{} is not a mapping: {other:?}", settings.display()),
    };
    ensure!(
        keys == [
            "repository",
            "agent_socket",
            "compression",
            "compression_level",
            "parallel"
        ],
        "{}: {keys:?}",
        settings.display()
    );
    for secret in [
        SUPERUSER_PASSWORD,
        REPLICATION_PASSWORD,
        TOKEN,
        "password",
        "token",
    ] {
        ensure!(
            !text.contains(secret),
            "{} holds {secret:?}:\n{text}",
            settings.display()
        );
    }
    let command: String = sql_value(m, "SELECT current_setting('archive_command')").await?;
    ensure!(
        command.contains(&settings.display().to_string()) && !command.contains("pgherd.yml "),
        "archive_command does not read the WAL settings: {command}"
    );
    ensure!(
        !m.agent_log().contains("holds the API token"),
        "the agent warned about a root-only configuration file"
    );

    // PostgreSQL archives as postgres.
    sql_batch(
        m,
        "CREATE TABLE t AS SELECT 1 AS id; SELECT pg_switch_wal()",
    )
    .await?;
    let name = wait_until(Duration::from_secs(30), "a segment archived", || async {
        let rows = pgherd_tests::sql(
            m,
            "SELECT archived_count, failed_count, coalesce(last_archived_wal, '') FROM pg_stat_archiver",
        )
        .await?;
        let (archived, failed, last): (i64, i64, String) =
            (rows[0].get(0), rows[0].get(1), rows[0].get(2));
        ensure!(failed == 0, "archive_command failed {failed} times; see node1's log");
        ensure!(archived > 0 && last.len() == 24, "nothing archived yet");
        Ok(last)
    })
    .await?;

    // wal-fetch by hand as postgres, with the settings file; the member file is unreadable.
    let scratch = tempfile::tempdir()?;
    std::fs::set_permissions(
        scratch.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )?;
    let dest = scratch.path().join("RECOVERYXLOG");
    let agent = pgherd_tests::agent_bin()?;
    let settings_arg = settings.display().to_string();
    let dest_arg = dest.display().to_string();
    run_as_postgres(
        &agent,
        &["wal-fetch", "--config", &settings_arg, &name, &dest_arg],
    )
    .await?;
    ensure!(
        std::fs::metadata(&dest)?.len() == 16 * 1024 * 1024,
        "wal-fetch restored a short file"
    );
    let config_arg = config.display().to_string();
    let denied = run_as_postgres(
        &agent,
        &["wal-fetch", "--config", &config_arg, &name, &dest_arg],
    )
    .await;
    let said = format!(
        "{:#}",
        denied
            .as_ref()
            .err()
            .context("postgres read the member config")?
    );
    ensure!(said.contains("Permission denied"), "{said}");
    ensure!(!said.contains(SUPERUSER_PASSWORD), "{said}");

    // Opened to every user, the member file is reported at the next start.
    std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    m.stop().await?;
    m.start()?;
    wait_log(m, "every user can read it", Duration::from_secs(30)).await?;
    cluster.wait_healthy(BRINGUP).await?;
    Ok(())
}

/// Item 4, the watchdog's kill path on its own: told to guard a root process, even one that
/// runs a program named `postgres` (as a confused agent could ask), it refuses and fences
/// nothing, at the deadline or when the agent's pipe closes; a `postgres` process of the
/// `postgres` user is still fenced (the control that shows the arm was real). Pid 1 is not
/// offered here: with this layer alone broken, the watchdog would SIGKILL the children of
/// init; its refusal is a unit test of `watchdog::guardable`, and the agent tests above
/// offer it behind the agent's own check.
#[test]
fn the_watchdog_refuses_to_guard_a_root_process() -> Result<()> {
    use std::io::Write;
    use std::os::unix::process::CommandExt;
    let now = || -> Result<i64> {
        let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)?;
        Ok(t.tv_sec() * 1_000_000_000 + t.tv_nsec())
    };
    let stderr = tempfile::NamedTempFile::new()?;
    let mut wd = Command::new(pgherd_tests::watchdog_bin()?)
        .stdin(Stdio::piped())
        .stderr(stderr.reopen()?)
        .spawn()
        .context("cannot start the watchdog")?;
    let mut pipe = wd.stdin.take().context("no stdin")?;
    let mut victim = Victim::spawn()?;
    let bin = tempfile::tempdir()?;
    let mut disguised = Victim::disguised(bin.path(), Path::new("/"))?;
    for pid in [victim.pid(), disguised.pid()] {
        writeln!(pipe, "arm {pid} {} 0", now()? + 200_000_000)?;
    }
    std::thread::sleep(Duration::from_millis(600));
    drop(pipe);
    wd.wait()?;
    let said = std::fs::read_to_string(stderr.path())?;
    victim.check("after the watchdog's deadline and exit")?;
    disguised.check("after the watchdog's deadline and exit")?;
    for (pid, why) in [
        (victim.pid(), "runs as root"),
        (disguised.pid(), "runs as root"),
    ] {
        let needle = format!("refusing to arm for pid {pid}: ");
        let line = said
            .lines()
            .find(|l| l.contains(&needle))
            .with_context(|| format!("the watchdog did not refuse pid {pid}:\n{said}"))?;
        ensure!(line.contains(why), "{line}");
    }
    ensure!(!said.contains("killed PostgreSQL"), "{said}");

    // The control: the same binary run by the postgres user is guarded and fenced.
    let postgres = nix::unistd::User::from_name("postgres")?.context("no user postgres")?;
    std::fs::set_permissions(
        bin.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let mut theirs = Command::new(bin.path().join("postgres"))
        .arg("600")
        .current_dir("/")
        .uid(postgres.uid.as_raw())
        .gid(postgres.gid.as_raw())
        .spawn()?;
    let pid = theirs.id() as i32;
    wait_exec(pid, &bin.path().join("postgres"))?;
    let mut wd = Command::new(pgherd_tests::watchdog_bin()?)
        .stdin(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut pipe = wd.stdin.take().context("no stdin")?;
    writeln!(pipe, "arm {pid} {} 0", now()? + 100_000_000)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let fenced = loop {
        if theirs.try_wait()?.is_some() {
            break true;
        }
        if std::time::Instant::now() > deadline {
            let _ = theirs.kill();
            break false;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    drop(pipe);
    wd.wait()?;
    let _ = theirs.wait();
    ensure!(
        fenced,
        "the watchdog did not fence a postgres process of postgres"
    );
    Ok(())
}

/// Waits until `pid` runs `exe` (a fresh child may not have exec'd yet).
fn wait_exec(pid: i32, exe: &Path) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .as_deref()
        != Some(exe)
    {
        ensure!(
            std::time::Instant::now() < deadline,
            "pid {pid} never ran {}",
            exe.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}
