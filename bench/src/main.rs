//! `pgherd-bench`: benchmarks that need a real cluster (etcd, three agents and PostgreSQL 15
//! on loopback), built on the integration-test harness `pgherd-tests`, which starts every
//! run in fresh temp dirs on free ports and removes everything when the run ends.
//!
//! `pgherd-bench failover` crashes the leader while a writer commits a row every 20 ms and
//! reports how long writes stopped and how many acknowledged rows were lost; `bench/failover`
//! builds the release binaries and runs it. The agent binaries are taken from the directory
//! of this executable (or `PGHERD_BIN_DIR`), so a release bench runs release agents.
//!
//! `pgherd-bench chaos` injects two faults at a time, round after round, on a synchronous
//! cluster and reports acknowledged rows lost, the longest write gap and whether two members
//! were ever writable at once; `bench/chaos` builds the release binaries and runs it.
//!
//! `pgherd-bench slots` stops a replica's agent for a while under a steady writer and
//! measures the WAL its slot keeps on the leader and how long the replica takes to catch up,
//! with `member_slots_ttl` 1800 and, for comparison, 0 (re-clone); `bench/slots` runs it.
//!
//! `pgherd-bench upgrade` upgrades a three-member cluster holding a pgbench database from
//! PostgreSQL 15 to 17 (`pgherdctl upgrade --to 17`, pg_upgrade --link) under a 20 ms
//! writer: the write outage and the time until the replicas stream again; `bench/upgrade`
//! runs it in the pgherd-test:upgrade image, which has both majors.
//!
//! `pgherd-bench drill-writer` is the writer of the docker-compose drills (docker/drills/):
//! it writes through HAProxy instead of starting a cluster of its own.

mod chaos;
mod clone;
mod drill;
mod failover;
mod http;
mod machine;
mod measure;
mod slots;
mod standby;
mod summary;
mod upgrade;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "pgherd-bench",
    about = "Benchmarks of pgherd on a real three-member cluster on loopback",
    long_about = "Benchmarks of pgherd on a real three-member cluster on loopback (etcd, \
                  pgherd-agent and PostgreSQL 15), each run in its own temp dirs on free ports. \
                  The agent binaries are taken from this executable's directory or PGHERD_BIN_DIR."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Crash the leader under a 20 ms writer: longest gap between acknowledged commits and
    /// acknowledged rows missing afterwards, per ttl; then crash PostgreSQL alone.
    #[command(
        long_about = "Crash the leader while a writer commits one row every 20 ms through \
        a multi-host connection with target_session_attrs=read-write.\n\n\
        Failover runs (per --ttl, --runs each): SIGKILL of the leader's agent and PostgreSQL; \
        measures the longest gap between acknowledged commits across the kill and counts rows \
        acknowledged before the kill that the new leader lacks, separately for rows proven to \
        be on both replicas before the kill and for rows in the replication lag window \
        (asynchronous replication may lose those).\n\n\
        PostgreSQL crash runs (--pg-crash-runs, at ttl 10): SIGKILL of the leader's postmaster \
        alone, agent alive; measures the write gap and checks nothing acknowledged is lost.\n\n\
        Prints one line per run, then median/min/max as a Markdown table. Failed or anomalous \
        runs keep their agent and PostgreSQL logs (see --logs)."
    )]
    Failover(FailoverArgs),
    /// Two faults at a time, round after round, on a three-member synchronous cluster:
    /// acknowledged rows lost, the longest write gap, and whether two members were ever
    /// writable at once.
    #[command(
        long_about = "Compound faults on a three-member cluster in synchronous_mode on, then \
        quorum (a fresh cluster each, every member reaching etcd through its own proxy), while \
        a writer commits one row every 20 ms through all members \
        (target_session_attrs=read-write) and every member is probed every 100 ms with an \
        insert and with pg_is_in_recovery().\n\n\
        Each round draws two faults (from the seed) among: SIGKILL agent, SIGKILL postmaster, \
        SIGSTOP agent for ttl + 2 s, etcd proxy severed for ttl + 2 s (each on the leader or a \
        replica), pgherdctl switchover to a replica, restart of a sync standby's agent; \
        injects them at once (then two different ones) or the second 0.1 s to ttl after \
        the first; heals everything 0 to ttl + 2 s later; \
        and waits (at most 120 s) for one leader, two streaming replicas, synchronous \
        replication in place and a commit acknowledged under it. Then every acknowledged row \
        must be on the leader.\n\n\
        Prints one line per round, then per mode: rounds, acknowledged rows, rows lost, the \
        longest write gap, and whether two members were writable at once; and every finding \
        with its seed and round. Exit status 2 when there is a finding. A round that does not \
        recover within 120 s is a finding; the replicas that are not streaming are then \
        re-cloned (agent stopped, data directory removed, agent started) and the rounds go \
        on; if that does not help either, the mode ends there. A mode with a finding keeps \
        its logs (see --logs)."
    )]
    Chaos(chaos::ChaosArgs),
    /// Time to create a replica from the backup repository vs by pg_basebackup from the
    /// leader, with the leader's CPU seconds and bytes sent during each.
    #[command(
        long_about = "One leader with a backup section and pgbench data (-s N, default 70, about \
        1 GB); a base backup, then pgbench updates whose WAL is archived. Then, per run, a new \
        member is created with create_replica_methods [backup] and another with [basebackup] \
        (alternating which goes first), each measured from its agent's start until it streams \
        and has replayed the leader's position at that start, then stopped.\n\n\
        Leader CPU: utime+stime of the leader's postmaster and all its children (exited ones \
        through cutime/cstime), from /proc. Leader bytes sent: the leader's \
        postgres.connect_address is a counting TCP proxy in front of its port, so everything \
        members receive from it (pg_basebackup, streaming) is counted; the benchmark's own \
        clients use the real port."
    )]
    Clone(clone::CloneArgs),
    /// A replica down for a while under a steady writer: the WAL its slot keeps on the
    /// leader and its catch-up time, with member_slots_ttl 1800 and, for comparison, 0.
    #[command(
        long_about = "A replica down for a while under a steady writer, on a three-member \
        cluster with wal_keep_size 0 (only slots keep WAL on the leader).\n\n\
        Each run: a fresh cluster; --data-mib of rows loaded; a writer inserts --rate rows of \
        1000 bytes a second on the leader; one replica's agent stops cleanly (SIGTERM; its \
        PostgreSQL stops with it) and stays down; the leader's slot for it is sampled every \
        5 s; at the end a WAL switch and a CHECKPOINT on the leader, then the agent starts \
        again. Measures the WAL written and retained, the leader's pg_wal size, the time \
        until the replica streams and until it replayed the leader's position at its restart, and whether it \
        was cloned again (its agent log).\n\n\
        First with member_slots_ttl 1800 for --down seconds (the replica must catch up from \
        the leader's WAL); then, for comparison, member_slots_ttl 0 for --compare-down \
        seconds, after loading the rows the writer adds in the difference (so the database \
        has the same size): the slot goes with the member key, the WAL the replica needs \
        is removed, and once its PostgreSQL logs \"has already been removed\" the bench runs \
        `pgherdctl reinit` as an operator would and times the re-clone.\n\n\
        Prints one line per run, a Markdown table and every finding (exit status 2 when \
        there is one). Failed runs keep their logs (see --logs)."
    )]
    Slots(slots::SlotsArgs),
    /// Commit a row every 20 ms through one address (HAProxy's read-write port) until
    /// SIGTERM; then print, as one JSON line, the longest write outage and the acknowledged
    /// rows the table lacks. Used by docker/drills/.
    DrillWriter(drill::DrillWriterArgs),
    /// Two sites: the bytes the primary sends to a disaster-recovery site of three members
    /// as a standby cluster (cascading from its standby leader) and as three replicas of the
    /// primary; and the time of planned site switches (switch-site) under a writer.
    Standby(standby::StandbyArgs),
    /// The REST API under many health checkers (HAProxy-like: a new connection per check):
    /// requests per second, p50/p99 latency and the agent's RSS, paced and saturated.
    Http(http::HttpArgs),
    /// A major-version upgrade (15 -> 17, pg_upgrade --link) of a three-member cluster
    /// holding a pgbench database, under a 20 ms writer: the write outage and the time
    /// until every replica streams again. Needs both majors (bench/upgrade).
    #[command(
        long_about = "A major-version upgrade of a three-member cluster on PostgreSQL 15 \
        holding `pgbench -i -s N` (default 70, about 1 GB), with `pgherdctl upgrade --to 17 \
        --force --format json` (pg_upgrade --link), while a writer commits one row every \
        20 ms through every member with target_session_attrs=read-write.\n\n\
        Each run: a fresh cluster, pgbench -i, both replicas streaming with no lag, the \
        writer, the upgrade (up to 30 min), every member streaming on 17, then 3 s more of \
        writes. Reports the command's write_outage_ms and replicas_streaming_after_ms, the \
        writer's longest gap between acknowledged commits, acknowledged rows missing, the \
        command's time, pgbench_accounts' rows on every member, and as a reference from \
        the leader's agent log the pg_upgrade --link run alone and the stop-to-running-on-17 \
        span. Needs /usr/lib/postgresql/15 and 17: bench/upgrade runs it in the \
        pgherd-test:upgrade image."
    )]
    Upgrade(upgrade::UpgradeArgs),
}

#[derive(Debug, Clone, Args)]
pub struct FailoverArgs {
    /// Failover runs per ttl.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub runs: u32,
    /// Leader lease ttls to measure, in seconds, comma-separated. loop_wait is 1 and
    /// retry_timeout the largest of 1..=3 that fits ttl >= loop_wait + 2 * retry_timeout
    /// (ttl 10: 3, ttl 5: 2, ttl 3: 1).
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "10,5,3",
        value_parser = clap::value_parser!(u64).range(3..=300)
    )]
    pub ttl: Vec<u64>,
    /// Runs that SIGKILL only the leader's postmaster (agent alive), at ttl 10; 0 skips them.
    #[arg(long, value_name = "N", default_value_t = 5, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub pg_crash_runs: u32,
    /// Runs that SIGKILL only the leader's agent process (the node lives), at ttl 10: its
    /// watchdog fences PostgreSQL and revokes the leader lease; 0 skips them.
    #[arg(long, value_name = "N", default_value_t = 5, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub agent_kill_runs: u32,
    /// Keep every run's agent and PostgreSQL logs in DIR/<run>/ (by default only failed or
    /// anomalous runs keep theirs, in a new directory under /tmp).
    #[arg(long, value_name = "DIR")]
    pub logs: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Two workers, as in the integration tests: the writer's task keeps its 20 ms pace while
    // the bench polls the cluster. Agents and etcd are started from the main thread (inside
    // block_on), which lives as long as the bench: their parent-death signal is tied to it.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgherd-bench: error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        match cli.command {
            Command::Failover(args) => interruptible(failover::run(args)).await,
            Command::Chaos(args) => interruptible(chaos::run(args)).await,
            Command::Clone(args) => interruptible(clone::run(args)).await,
            Command::Slots(args) => interruptible(slots::run(args)).await,
            Command::Standby(args) => interruptible(standby::run(args)).await,
            Command::Http(args) => interruptible(http::run(args)).await,
            Command::Upgrade(args) => interruptible(upgrade::run(args)).await,
            // Handles SIGTERM itself: it is how a drill stops it before the check.
            Command::DrillWriter(args) => drill::run(args).await,
        }
    });
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        // Every run was measured, but at least one failed: the figures are incomplete.
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            eprintln!("pgherd-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `bench` until it ends or SIGINT/SIGTERM arrives; on a signal the bench future is
/// dropped first, which kills and removes the cluster of the run in progress.
async fn interruptible(bench: impl std::future::Future<Output = Result<bool>>) -> Result<bool> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    tokio::select! {
        result = bench => result,
        _ = interrupt.recv() => anyhow::bail!("interrupted (SIGINT); the run in progress was stopped and removed"),
        _ = terminate.recv() => anyhow::bail!("terminated (SIGTERM); the run in progress was stopped and removed"),
    }
}
