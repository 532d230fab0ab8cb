//! A stale `postmaster.pid` never blocks a member (issue 12 item 12). After a crash the file
//! stays behind and its pid may belong to another process by now (pid reuse is the rule in
//! containers). Here the pid is a live `sleep` owned by the `postgres` OS user, so
//! PostgreSQL's own `kill(pid, 0)` check (and pg_rewind's crash recovery) takes it for a
//! running postmaster. The agent must see that it is not one, remove the file, leave the
//! process alone (rule 8: it signals only its own processes) and come back streaming. The
//! same for the socket's lock file (`.s.PGSQL.<port>.lock`), which PostgreSQL checks the
//! same way.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use pgherd_tests::{timeline, wait_streaming_from, Cluster, Member};

const BRINGUP: Duration = Duration::from_secs(120);
const FAILOVER: Duration = Duration::from_secs(60);
const REJOIN: Duration = Duration::from_secs(120);
const REPLICATION: Duration = Duration::from_secs(30);

/// An unrelated live process owned by `postgres` (when the tests run as root), killed on
/// drop.
struct Squatter(Child);

impl Squatter {
    fn spawn() -> Result<Squatter> {
        let mut cmd = Command::new("sleep");
        cmd.arg("600")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .current_dir("/");
        if nix::unistd::geteuid().is_root() {
            let user = nix::unistd::User::from_name("postgres")?
                .context("OS user postgres does not exist")?;
            cmd.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        }
        Ok(Squatter(cmd.spawn().context("cannot start sleep")?))
    }

    fn pid(&self) -> i32 {
        self.0.id() as i32
    }

    fn alive(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }
}

impl Drop for Squatter {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Puts `pid` on the first line of `member`'s `postmaster.pid` (left by the crash), keeping
/// the rest of the file as the dead postmaster wrote it.
fn point_pid_file_at(member: &Member, pid: i32) -> Result<()> {
    let path = member.data_dir().join("postmaster.pid");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("the crash left no {}", path.display()))?;
    let rest = text.split_once('\n').map_or("", |(_, r)| r);
    std::fs::write(&path, format!("{pid}\n{rest}"))
        .with_context(|| format!("cannot write {}", path.display()))
}

fn check_after_return(member: &Member, squatter: &mut Squatter) -> Result<()> {
    let pid = squatter.pid();
    ensure!(
        squatter.alive(),
        "the unrelated process {pid} named in {}'s stale postmaster.pid was killed",
        member.name()
    );
    let log = member.agent_log_of_last_start();
    let needle = format!("removed stale postmaster.pid naming pid {pid}");
    ensure!(
        log.contains(&needle),
        "{}'s agent log since its restart does not say {needle:?}:\n{log}",
        member.name()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_replica_whose_pid_file_names_another_process_comes_back_streaming() -> Result<()>
{
    let cluster = Cluster::start(2).await?;
    let healthy = cluster.wait_healthy(BRINGUP).await?;
    let leader = cluster.member(&healthy.leader);
    let replica = cluster.member(&healthy.replicas[0]);
    let tl = timeline(leader).await?;

    replica.crash()?;
    let mut squatter = Squatter::spawn()?;
    point_pid_file_at(replica, squatter.pid())?;
    replica.start()?;
    let healthy = cluster.wait_healthy(REJOIN).await?;
    ensure!(healthy.leader == leader.name(), "{healthy:?}");
    wait_streaming_from(replica, leader, tl, REPLICATION).await?;
    check_after_return(replica, &mut squatter)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_leader_whose_pid_file_names_another_process_rewinds_and_streams() -> Result<()> {
    let cluster = Cluster::start(2).await?;
    let healthy = cluster.wait_healthy(BRINGUP).await?;
    let old = cluster.member(&healthy.leader);

    old.crash()?;
    let new_name = cluster.wait_new_leader(old.name(), FAILOVER).await?;
    let new = cluster.member(&new_name);
    let new_timeline = timeline(new).await?;

    let mut squatter = Squatter::spawn()?;
    point_pid_file_at(old, squatter.pid())?;
    old.start()?;
    let healthy = cluster.wait_healthy(REJOIN).await?;
    ensure!(healthy.leader == new_name, "{healthy:?}");
    wait_streaming_from(old, new, new_timeline, REPLICATION).await?;
    old.ensure_rewound()?;
    check_after_return(old, &mut squatter)
}

/// The socket lock file a crash left names a live process of the OS user: PostgreSQL would
/// refuse to start ("lock file ... already exists"), as the upgrade test found with the
/// upgraded leader after a crash in a container. The agent removes it and the member comes
/// back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_replica_whose_socket_lock_names_another_process_comes_back_streaming(
) -> Result<()> {
    let cluster = Cluster::start(2).await?;
    let healthy = cluster.wait_healthy(BRINGUP).await?;
    let leader = cluster.member(&healthy.leader);
    let replica = cluster.member(&healthy.replicas[0]);
    let tl = timeline(leader).await?;

    replica.crash()?;
    let mut squatter = Squatter::spawn()?;
    let lock = replica
        .dir()
        .join(format!(".s.PGSQL.{}.lock", replica.pg_port()));
    let text = std::fs::read_to_string(&lock)
        .with_context(|| format!("the crash left no {}", lock.display()))?;
    let rest = text.split_once('\n').map_or("", |(_, r)| r);
    std::fs::write(&lock, format!("{}\n{rest}", squatter.pid()))?;
    replica.start()?;
    let healthy = cluster.wait_healthy(REJOIN).await?;
    ensure!(healthy.leader == leader.name(), "{healthy:?}");
    wait_streaming_from(replica, leader, tl, REPLICATION).await?;
    ensure!(squatter.alive(), "the unrelated process was killed");
    let log = replica.agent_log_of_last_start();
    let needle = format!(
        ".s.PGSQL.{}.lock naming pid {}",
        replica.pg_port(),
        squatter.pid()
    );
    ensure!(log.contains(&needle), "no {needle:?} in:\n{log}");
    Ok(())
}
