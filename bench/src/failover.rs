//! `pgherd-bench failover`: the runs in order (every ttl, then the PostgreSQL-only crashes,
//! then the agent-only kills), one line per run, then the figures table and every anomaly.
//!
//! Each run gets a fresh cluster; a run that fails is reported and the next one starts, so
//! one bad run does not cost the others. Failed and anomalous runs keep their logs.

use std::fmt;
use std::future::Future;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use anyhow::{Context, Result};
use pgherd_tests::Cluster;

use crate::machine::{load_average, Machine};
use crate::measure::{
    self, Failover, Kill, PgCrash, Timing, DEFAULT_TTL, WRITES_AFTER, WRITES_BEFORE,
};
use crate::summary::{table, Row, Unit};
use crate::FailoverArgs;

/// Lines of each log printed for a failed run.
const FAILED_LOG_LINES: usize = 40;

/// The results of one ttl's failover runs, or of the PostgreSQL-only crash runs.
struct Series<T> {
    timing: Timing,
    runs: Vec<Result<T, String>>,
}

impl<T> Series<T> {
    fn ok(&self) -> impl Iterator<Item = &T> {
        self.runs.iter().filter_map(|r| r.as_ref().ok())
    }

    fn values(&self, f: impl Fn(&T) -> f64) -> Vec<f64> {
        self.ok().map(f).collect()
    }
}

/// Runs every series and prints the report; `Ok(false)` when some run failed.
pub async fn run(args: FailoverArgs) -> Result<bool> {
    let machine = Machine::describe();
    let load_start = load_average();
    let mut logs = LogKeeper::new(args.logs.clone())?;
    let command: Vec<String> = std::env::args().collect();
    println!("pgherd failover benchmark, {}", machine.date);
    println!("machine: {}", machine.line());
    println!("command: {}", command.join(" "));
    println!("load average at start: {load_start}");
    println!(
        "each run: fresh etcd and 3 members; a writer commits a row every 20 ms through all members \
         (target_session_attrs=read-write) for {:.0} s; crash; stop {:.0} s after writes resumed",
        WRITES_BEFORE.as_secs_f64(),
        WRITES_AFTER.as_secs_f64()
    );
    println!();

    let mut failovers: Vec<Series<Failover>> = Vec::new();
    for &ttl in &args.ttl {
        let timing = Timing::for_ttl(ttl);
        failovers.push(
            series(
                &format!("failover ttl={ttl}"),
                &format!("failover-ttl{ttl}"),
                args.runs,
                timing,
                |cluster| Box::pin(measure::failover(cluster, timing, Kill::AgentAndPostgres)),
                |r| failover_anomalous(r, timing),
                &mut logs,
            )
            .await,
        );
    }

    let timing = Timing::for_ttl(DEFAULT_TTL);
    let pg = series(
        &format!("pg-crash ttl={DEFAULT_TTL}"),
        "pg-crash",
        args.pg_crash_runs,
        timing,
        |cluster| Box::pin(measure::pg_crash(cluster)),
        pg_crash_anomalous,
        &mut logs,
    )
    .await;
    let agent = series(
        &format!("agent-kill ttl={DEFAULT_TTL}"),
        "agent-kill",
        args.agent_kill_runs,
        timing,
        |cluster| Box::pin(measure::failover(cluster, timing, Kill::AgentOnly)),
        agent_kill_anomalous,
        &mut logs,
    )
    .await;

    println!();
    println!(
        "{} failover run(s) per ttl, {} PostgreSQL-only crash run(s), {} agent-only kill run(s); \
         write gap: the longest time between two acknowledged commits across the kill; rows \
         lost: acknowledged by the old leader, absent on the leader afterwards\n",
        args.runs, args.pg_crash_runs, args.agent_kill_runs
    );
    println!("{}", table(&rows(&failovers, &pg, &agent)));
    print_closing("anomalies", &anomalies(&failovers, &pg, &agent), &logs);
    let all_ok = failovers.iter().all(|s| s.runs.iter().all(Result::is_ok))
        && pg.runs.iter().all(Result::is_ok)
        && agent.runs.iter().all(Result::is_ok);
    Ok(all_ok)
}

/// `runs` runs named `<label> run i/n` (logs in `<dir_name>-run<i>`), each on a fresh
/// cluster at `timing`: `measure` on it, its logs kept per [`finish`] and `anomalous`, one
/// line printed.
async fn series<T: fmt::Display>(
    label: &str,
    dir_name: &str,
    runs: u32,
    timing: Timing,
    measure: impl Fn(&Cluster) -> Pin<Box<dyn Future<Output = Result<T>> + '_>>,
    anomalous: impl Fn(&T) -> bool,
    logs: &mut LogKeeper,
) -> Series<T> {
    let mut series = Series {
        timing,
        runs: Vec::new(),
    };
    for run in 1..=runs {
        let label = format!("{label} run {run}/{runs}");
        let dir_name = format!("{dir_name}-run{run}");
        let result = match start_cluster(&label, timing).await {
            Err(e) => Err(e),
            Ok(cluster) => {
                let measured = measure(&cluster).await;
                finish(&label, &dir_name, cluster, measured, &anomalous, logs)
            }
        };
        match &result {
            Ok(r) => println!("{label}: {r}"),
            Err(e) => println!("{label}: FAILED: {e}"),
        }
        series.runs.push(result);
    }
    series
}

/// The target for a failover: the writer's gap at most ttl + 1 s.
fn anomaly_gap(timing: Timing) -> Duration {
    Duration::from_secs(timing.ttl + 1)
}

/// The target for a PostgreSQL-only crash on the leader.
const PG_CRASH_TARGET: Duration = Duration::from_secs(3);

/// Whether a failover run deserves a look at its logs: the gap missed the target or a
/// row that was provably replicated got lost. Rows lost in the lag window do not count:
/// asynchronous replication allows that.
fn failover_anomalous(r: &Failover, timing: Timing) -> bool {
    r.gap.length() > anomaly_gap(timing) || !r.missing_proven.is_empty() || r.acked_elsewhere > 0
}

/// The target for the leader's agent alone killed: its watchdog fences PostgreSQL
/// and revokes the leader lease, so a replica takes over without waiting for the ttl.
const AGENT_KILL_TARGET: Duration = Duration::from_millis(1500);

/// Whether an agent-only kill run deserves a look: slow (the lease was not revoked), a
/// provably replicated row lost, or a write acknowledged by a third server.
fn agent_kill_anomalous(r: &Failover) -> bool {
    r.gap.length() > AGENT_KILL_TARGET || !r.missing_proven.is_empty() || r.acked_elsewhere > 0
}

/// Whether a PostgreSQL-only crash run deserves a look: slow, lossy, or not in place.
fn pg_crash_anomalous(r: &PgCrash) -> bool {
    r.gap.length() > PG_CRASH_TARGET
        || !r.missing.is_empty()
        || !r.kept_key
        || r.leader_after != r.leader
}

/// A fresh cluster of three members at `timing`; the error as text.
async fn start_cluster(label: &str, timing: Timing) -> Result<Cluster, String> {
    eprintln!("pgherd-bench: {label}: starting a cluster at {timing}");
    Cluster::builder()
        .name("bench")
        .members(3)
        .yaml(timing.yaml())
        .start()
        .await
        .map_err(|e| format!("cannot start the cluster: {e:#}"))
}

/// Ends a run: its logs kept if it failed or is `anomalous` (or always with `--logs`), a
/// failed run's log tails on stderr, the cluster removed. The error comes back as text.
fn finish<T>(
    label: &str,
    dir_name: &str,
    cluster: Cluster,
    result: Result<T>,
    anomalous: impl Fn(&T) -> bool,
    logs: &mut LogKeeper,
) -> Result<T, String> {
    let keep = result.as_ref().map_or(true, &anomalous);
    if let Err(e) = &result {
        eprintln!(
            "pgherd-bench: {label} failed: {e:#}\n{}",
            cluster.log_tails(FAILED_LOG_LINES)
        );
    }
    if keep || logs.keep_all() {
        match logs.keep(&cluster, dir_name) {
            Ok(dir) => eprintln!("pgherd-bench: {label}: logs kept in {}", dir.display()),
            Err(e) => eprintln!("pgherd-bench: {label}: could not keep the logs: {e:#}"),
        }
    }
    drop_quietly(cluster);
    result.map_err(|e| format!("{e:#}"))
}

/// Drops `cluster` with stderr pointed at /dev/null meanwhile: the harness prints the tail
/// of every log when a cluster drops, for test runners that show it only for failed tests;
/// the bench has already printed or kept what matters. With `PGHERD_KEEP_TMP` set the drop
/// stays loud, since it then says where the temp dir was kept.
pub(crate) fn drop_quietly(cluster: Cluster) {
    let root = cluster
        .members()
        .first()
        .and_then(|m| m.dir().parent().map(Path::to_path_buf));
    let loud = std::env::var_os("PGHERD_KEEP_TMP").is_some_and(|v| !v.is_empty() && v != "0");
    let devnull = std::fs::OpenOptions::new().write(true).open("/dev/null");
    let saved = nix::unistd::dup(2);
    match (loud, devnull, saved) {
        (false, Ok(devnull), Ok(saved)) if nix::unistd::dup2(devnull.as_raw_fd(), 2).is_ok() => {
            drop(cluster);
            let _ = nix::unistd::dup2(saved, 2);
            let _ = nix::unistd::close(saved);
        }
        (_, _, saved) => {
            drop(cluster);
            if let Ok(fd) = saved {
                let _ = nix::unistd::close(fd);
            }
        }
    }
    if let Some(root) = root.filter(|r| r.exists() && !loud) {
        eprintln!(
            "pgherd-bench: the run's temp dir {} is still there; remove it by hand",
            root.display()
        );
    }
}

/// The figures table: per ttl the failover gap, the new leader's delay and the missing rows;
/// then the PostgreSQL-only crash and the agent-only kill.
fn rows(
    failovers: &[Series<Failover>],
    pg: &Series<PgCrash>,
    agent: &Series<Failover>,
) -> Vec<Row> {
    let mut rows = Vec::new();
    for s in failovers {
        let t = s.timing;
        rows.push(Row {
            figure: format!("write gap, leader's agent and PostgreSQL killed, {t}"),
            unit: Unit::Seconds,
            values: s.values(|r| r.gap.length().as_secs_f64()),
            runs: s.runs.len(),
        });
        rows.push(Row {
            figure: format!("new leader listed running, ttl {} s", t.ttl),
            unit: Unit::Seconds,
            values: s.values(|r| r.new_leader_after.as_secs_f64()),
            runs: s.runs.len(),
        });
        rows.push(Row {
            figure: format!("acknowledged rows lost, ttl {} s", t.ttl),
            unit: Unit::Count,
            values: s.values(|r| r.missing() as f64),
            runs: s.runs.len(),
        });
    }
    if !pg.runs.is_empty() {
        rows.push(Row {
            figure: format!("write gap, leader's PostgreSQL alone killed, {}", pg.timing),
            unit: Unit::Seconds,
            values: pg.values(|r| r.gap.length().as_secs_f64()),
            runs: pg.runs.len(),
        });
        rows.push(Row {
            figure: "acknowledged rows lost, PostgreSQL alone killed".into(),
            unit: Unit::Count,
            values: pg.values(|r| r.missing.len() as f64),
            runs: pg.runs.len(),
        });
    }
    if !agent.runs.is_empty() {
        rows.push(Row {
            figure: format!(
                "write gap, leader's agent alone killed (SIGKILL), {}",
                agent.timing
            ),
            unit: Unit::Seconds,
            values: agent.values(|r| r.gap.length().as_secs_f64()),
            runs: agent.runs.len(),
        });
        rows.push(Row {
            figure: "new leader listed running, agent alone killed".into(),
            unit: Unit::Seconds,
            values: agent.values(|r| r.new_leader_after.as_secs_f64()),
            runs: agent.runs.len(),
        });
        rows.push(Row {
            figure: "acknowledged rows lost, agent alone killed".into(),
            unit: Unit::Count,
            values: agent.values(|r| r.missing() as f64),
            runs: agent.runs.len(),
        });
    }
    rows
}

/// Everything that misses a target or should not happen, one sentence each.
fn anomalies(
    failovers: &[Series<Failover>],
    pg: &Series<PgCrash>,
    agent: &Series<Failover>,
) -> Vec<String> {
    let mut out = Vec::new();
    for s in failovers {
        let ttl = s.timing.ttl;
        for (i, run) in s.runs.iter().enumerate() {
            let name = format!("failover ttl={ttl} run {}", i + 1);
            match run {
                Err(e) => out.push(format!("{name} failed: {e}")),
                Ok(r) => {
                    if r.gap.length() > anomaly_gap(s.timing) {
                        out.push(format!(
                            "{name}: write gap {:.2} s is above ttl + 1 s = {} s; {}",
                            r.gap.length().as_secs_f64(),
                            ttl + 1,
                            r.summary
                        ));
                    }
                    failover_losses(&name, r, &mut out);
                }
            }
        }
    }
    for (i, run) in pg.runs.iter().enumerate() {
        let name = format!("pg-crash run {}", i + 1);
        match run {
            Err(e) => out.push(format!("{name} failed: {e}")),
            Ok(r) => {
                if r.gap.length() > PG_CRASH_TARGET {
                    out.push(format!(
                        "{name}: write gap {:.2} s is above the 3 s target; {}",
                        r.gap.length().as_secs_f64(),
                        r.summary
                    ));
                }
                if !r.kept_key || r.leader_after != r.leader {
                    out.push(format!(
                        "{name}: the leader key changed ({} -> {}) instead of a restart in place",
                        r.leader, r.leader_after
                    ));
                }
                if !r.missing.is_empty() {
                    out.push(format!(
                        "{name}: {} acknowledged rows missing after the restart: {:?}",
                        r.missing.len(),
                        r.missing
                    ));
                }
            }
        }
    }
    for (i, run) in agent.runs.iter().enumerate() {
        let name = format!("agent-kill run {}", i + 1);
        match run {
            Err(e) => out.push(format!("{name} failed: {e}")),
            Ok(r) => {
                if r.gap.length() > AGENT_KILL_TARGET {
                    out.push(format!(
                        "{name}: write gap {:.2} s is above the 1.5 s target; {}",
                        r.gap.length().as_secs_f64(),
                        r.summary
                    ));
                }
                failover_losses(&name, r, &mut out);
            }
        }
    }
    out
}

/// What a failover run lost or acknowledged where it should not have, one sentence each.
fn failover_losses(name: &str, r: &Failover, out: &mut Vec<String>) {
    if !r.missing_proven.is_empty() {
        out.push(format!(
            "{name}: {} rows proven replicated before the kill are missing on the new leader: {:?}",
            r.missing_proven.len(),
            r.missing_proven
        ));
    }
    if !r.missing_in_window.is_empty() {
        out.push(format!(
            "{name}: {} rows acknowledged in the {:.3} s replication lag window are missing on the new leader (asynchronous replication): {:?}",
            r.missing_in_window.len(),
            r.lag_window.as_secs_f64(),
            r.missing_in_window
        ));
    }
    if r.acked_elsewhere > 0 {
        out.push(format!(
            "{name}: {} writes acknowledged by a server that was neither the old nor the new leader; {}",
            r.acked_elsewhere, r.summary
        ));
    }
}

/// The end of a report: the load average now, the `title` list (one line each, or "none")
/// and where run logs were kept.
pub(crate) fn print_closing(title: &str, items: &[String], logs: &LogKeeper) {
    println!("load average at end: {}", load_average());
    if items.is_empty() {
        println!("{title}: none");
    } else {
        println!("{title}:");
        for item in items {
            println!("  - {item}");
        }
    }
    if let Some(dir) = logs.root() {
        println!("logs kept in {}", dir.display());
    }
}

/// Where run logs go: `--logs DIR` (every run), else a directory under /tmp created for the
/// first failed or anomalous run.
pub(crate) struct LogKeeper {
    dir: Option<PathBuf>,
    all: bool,
}

impl LogKeeper {
    pub(crate) fn new(dir: Option<PathBuf>) -> Result<LogKeeper> {
        if let Some(d) = &dir {
            std::fs::create_dir_all(d)
                .with_context(|| format!("cannot create --logs {}", d.display()))?;
        }
        Ok(LogKeeper {
            all: dir.is_some(),
            dir,
        })
    }

    pub(crate) fn keep_all(&self) -> bool {
        self.all
    }

    pub(crate) fn root(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Copies every member's `agent.log` and `data.log` to `<dir>/<run>/`.
    pub(crate) fn keep(&mut self, cluster: &Cluster, run: &str) -> Result<PathBuf> {
        let root = match &self.dir {
            Some(d) => d.clone(),
            None => {
                let d =
                    std::env::temp_dir().join(format!("pgherd-bench-logs-{}", std::process::id()));
                std::fs::create_dir_all(&d)
                    .with_context(|| format!("cannot create {}", d.display()))?;
                self.dir = Some(d.clone());
                d
            }
        };
        let dest = root.join(run);
        std::fs::create_dir_all(&dest)
            .with_context(|| format!("cannot create {}", dest.display()))?;
        for m in cluster.members() {
            for (from, name) in [
                (
                    m.agent_log_path().to_path_buf(),
                    format!("{}.agent.log", m.name()),
                ),
                (m.postgres_log_path(), format!("{}.data.log", m.name())),
            ] {
                if from.exists() {
                    std::fs::copy(&from, dest.join(&name)).with_context(|| {
                        format!("cannot copy {} to {}", from.display(), dest.display())
                    })?;
                }
            }
        }
        Ok(dest)
    }
}
