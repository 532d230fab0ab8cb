//! Version awareness (issue 19 item 1): a member whose binaries are another PostgreSQL major
//! than its data directory refuses to run and says which majors; a `postgres.bin_dir`
//! without `postgres` is refused with what to do. Real PostgreSQL and etcd; the data
//! directory of "another major" is a real one whose PG_VERSION names that major, which is
//! what PostgreSQL and the agent read to tell.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use pgherd_tests::{
    kill_postmaster, pg_bin_dir, snapshot, snapshot_diff, wait_until, Cluster, Member,
    MemberOptions,
};
use tokio::time::Instant;

/// initdb and one PostgreSQL start on a 2-core machine.
const BRINGUP: Duration = Duration::from_secs(90);
/// An agent that refuses its configuration exits well within this.
const REFUSAL: Duration = Duration::from_secs(60);

/// Waits for `member`'s agent to exit on its own; fails if a postmaster ever ran on its data
/// directory meanwhile (it is watched every 10 ms from the agent's start).
async fn wait_refusal_without_postgres(member: &Member) -> Result<std::process::ExitStatus> {
    let pid_file = member.data_dir().join("postmaster.pid");
    let deadline = Instant::now() + REFUSAL;
    loop {
        ensure!(
            !pid_file.exists(),
            "{}'s agent started PostgreSQL ({} appeared)",
            member.name(),
            pid_file.display()
        );
        if let Some(status) = member.try_exit()? {
            return Ok(status);
        }
        ensure!(
            Instant::now() < deadline,
            "{}'s agent still runs {REFUSAL:?} after its start",
            member.name()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A major other than `major` that PostgreSQL really had.
fn another_major(major: u32) -> u32 {
    if major == 15 {
        17
    } else {
        15
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_of_another_major_than_the_binaries_is_refused_naming_both() -> Result<()>
{
    let cluster = Cluster::start(1).await?;
    cluster.wait_healthy(BRINGUP).await?;
    let member = &cluster.members()[0];
    let status = member.stop().await?;
    ensure!(status.success(), "{} stopped with {status}", member.name());

    let (original, binaries, other) = majors(member)?;
    let pg_version = member.data_dir().join("PG_VERSION");
    // Written in place, as initdb of that major would have: same owner and mode.
    std::fs::write(&pg_version, format!("{other}\n"))?;
    let before = snapshot(&member.data_dir())?;

    member.start()?;
    let status = wait_refusal_without_postgres(member).await?;
    ensure!(
        status.code() == Some(1),
        "{}'s agent exited with {status}, not 1",
        member.name()
    );
    let log = member.agent_log_of_last_start();
    let said = format!(
        "the data directory {} is PostgreSQL {other} (PG_VERSION) but postgres.bin_dir ",
        member.data_dir().display()
    );
    ensure!(
        log.contains(&said),
        "{}'s log does not say {said:?}:\n{log}",
        member.name()
    );
    let said = format!(
        " is PostgreSQL {binaries}: set postgres.bin_dir to a PostgreSQL {other} installation"
    );
    ensure!(
        log.contains(&said),
        "{}'s log does not say {said:?}:\n{log}",
        member.name()
    );
    let changes = snapshot_diff(&before, &snapshot(&member.data_dir())?);
    ensure!(
        changes.is_empty(),
        "{}'s agent changed the data directory it refused:\n{}",
        member.name(),
        changes.join("\n")
    );

    // The refusal was about the major alone: with its own PG_VERSION back, the member leads
    // again on its data.
    std::fs::write(&pg_version, &original)?;
    member.start()?;
    let healthy = cluster.wait_healthy(BRINGUP).await?;
    ensure!(healthy.leader == member.name(), "{healthy:?}");
    Ok(())
}

/// Reads `member`'s PG_VERSION as a major and the other major to write there.
fn majors(member: &Member) -> Result<(String, u32, u32)> {
    let pg_version = member.data_dir().join("PG_VERSION");
    let original = std::fs::read_to_string(&pg_version)
        .with_context(|| format!("cannot read {}", pg_version.display()))?;
    let binaries: u32 = original
        .trim()
        .parse()
        .with_context(|| format!("PG_VERSION holds {original:?}"))?;
    Ok((original, binaries, another_major(binaries)))
}

/// The data directory changes major under a running agent (what an upgrade does): when its
/// PostgreSQL must start again, the agent does not start it on a data directory of another
/// major and says which, every time; once the data directory is back to the binaries'
/// major, it starts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_agent_does_not_restart_postgres_on_a_data_directory_of_another_major(
) -> Result<()> {
    let cluster = Cluster::start(1).await?;
    cluster.wait_healthy(BRINGUP).await?;
    let member = &cluster.members()[0];
    let (original, binaries, other) = majors(member)?;
    let pg_version = member.data_dir().join("PG_VERSION");

    // The running postmaster read PG_VERSION at its start; only a new start reads it again.
    std::fs::write(&pg_version, format!("{other}\n"))?;
    ensure!(
        kill_postmaster(&member.data_dir()),
        "{} had no postmaster to kill",
        member.name()
    );
    let said = format!(
        "not starting PostgreSQL: the data directory {} is PostgreSQL {other} (PG_VERSION) but postgres.bin_dir ",
        member.data_dir().display()
    );
    let started_at = Instant::now();
    wait_until(
        REFUSAL,
        format!("{}'s agent refusing to start PostgreSQL", member.name()),
        || async {
            let log = member.agent_log_of_last_start();
            ensure!(log.contains(&said), "the log does not say {said:?} yet");
            Ok(())
        },
    )
    .await?;
    ensure!(member.is_running(), "{}'s agent exited", member.name());
    let log = member.agent_log_of_last_start();
    let binaries_said = format!("is PostgreSQL {binaries}: set postgres.bin_dir");
    ensure!(
        log.contains(&binaries_said),
        "{}'s log does not say {binaries_said:?}:\n{log}",
        member.name()
    );
    ensure!(
        member.postmaster_pid().is_none(),
        "a postmaster runs on the data directory of PostgreSQL {other} ({:?} after the kill)",
        started_at.elapsed()
    );

    std::fs::write(&pg_version, &original)?;
    let healthy = cluster.wait_healthy(BRINGUP).await?;
    ensure!(healthy.leader == member.name(), "{healthy:?}");
    Ok(())
}

/// A folder with links to every program of the installed PostgreSQL but `postgres`.
fn bin_dir_without_postgres(root: &Path) -> Result<PathBuf> {
    let dir = root.join("bin-without-postgres");
    std::fs::create_dir(&dir)?;
    for entry in std::fs::read_dir(pg_bin_dir())? {
        let entry = entry?;
        if entry.file_name() != "postgres" {
            std::os::unix::fs::symlink(entry.path(), dir.join(entry.file_name()))?;
        }
    }
    Ok(dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bin_dir_without_postgres_is_refused_with_what_to_do() -> Result<()> {
    let scratch = tempfile::tempdir()?;
    let bin_dir = bin_dir_without_postgres(scratch.path())?;
    let mut cluster = Cluster::builder().configure().await?;
    let member = cluster.add_member(
        MemberOptions::new().yaml(format!("postgres: {{bin_dir: {:?}}}", bin_dir.display())),
    )?;
    member.start()?;
    let status = wait_refusal_without_postgres(member).await?;
    ensure!(
        status.code() == Some(1),
        "{}'s agent exited with {status}, not 1",
        member.name()
    );
    let log = member.agent_log_of_last_start();
    let said = format!(
        "postgres not found in {}; install the PostgreSQL server (PostgreSQL 15 or later; on Debian the postgresql-<major> package) or set postgres.bin_dir",
        bin_dir.display()
    );
    ensure!(
        log.contains(&said),
        "{}'s log does not say {said:?}:\n{log}",
        member.name()
    );
    ensure!(
        !member.data_dir().exists(),
        "{}'s agent created its data directory though it cannot run PostgreSQL",
        member.name()
    );
    Ok(())
}
