//! `pgherd-bench slots`: what a member's replication slot saves when a replica is down for
//! a while. A three-member cluster with `wal_keep_size: 0` (only slots keep WAL) and a steady
//! writer on the leader; one replica's agent stops cleanly (its PostgreSQL stops with it)
//! and stays down; the leader's slot for it is sampled meanwhile; then it starts again and
//! the bench measures how long it takes to stream and to replay the leader's position at
//! the restart, and whether it was cloned again.
//!
//! Two runs, each on a fresh cluster: `member_slots_ttl: 1800` (the slot outlives the down
//! time, the replica catches up from the leader's WAL) and `member_slots_ttl: 0` (the slot
//! goes as soon as the member key does: the WAL it needs is removed at the next checkpoint,
//! the replica cannot catch up, and nothing but `pgherdctl reinit` brings it back; the bench
//! runs that as an operator would and times the re-clone).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use pgherd_tests::{
    current_wal_lsn, replay_lsn, sql_batch, sql_value, wait_replayed, wait_until, wal_receiver,
    Cluster, Member,
};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::failover::{drop_quietly, print_closing, LogKeeper};
use crate::machine::{load_average, Machine};
use crate::measure::{Timing, DEFAULT_TTL};

#[derive(Debug, Clone, Args)]
pub struct SlotsArgs {
    /// Seconds the replica stays down in the run with member_slots_ttl 1800.
    #[arg(long, value_name = "SECONDS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(10..=1790))]
    pub down: u64,
    /// Seconds the replica stays down in the comparison run with member_slots_ttl 0; 0
    /// skips that run. Shorter than --down by default: the slot is gone either way, and
    /// that run loads the rows the writer would have added in the difference first, so the
    /// re-clone copies a database of the same size.
    #[arg(long, value_name = "SECONDS", default_value_t = 120, value_parser = clap::value_parser!(u64).range(0..=1790))]
    pub compare_down: u64,
    /// Rows of 1000 bytes the writer inserts on the leader per second (in batches every
    /// 100 ms), from before the replica stops until it has caught up: about 1.1 KB of WAL
    /// per row.
    #[arg(long, value_name = "ROWS_PER_S", default_value_t = 500, value_parser = clap::value_parser!(u32).range(10..=20000))]
    pub rate: u32,
    /// MiB of rows loaded before the writer starts, so that a re-clone copies a database of
    /// some size.
    #[arg(long, value_name = "MIB", default_value_t = 256, value_parser = clap::value_parser!(u32).range(0..=8192))]
    pub data_mib: u32,
    /// Keep every run's agent and PostgreSQL logs in DIR/<run>/ (by default only failed
    /// runs keep theirs, in a new directory under /tmp).
    #[arg(long, value_name = "DIR")]
    pub logs: Option<PathBuf>,
}

const BRINGUP: Duration = Duration::from_secs(180);
const REPLICATION: Duration = Duration::from_secs(120);
/// At most this long for a restarted replica to catch up, or to show that it cannot.
const CATCH_UP: Duration = Duration::from_secs(900);
/// At most this long for a re-clone to catch up.
const RECLONE: Duration = Duration::from_secs(1200);
/// Between two samples of the slot while the replica is down.
const SAMPLE: Duration = Duration::from_secs(5);
/// Between two progress lines on stderr while the replica is down.
const PROGRESS: Duration = Duration::from_secs(60);
/// What the replica's PostgreSQL logs when its upstream no longer has the WAL it asks for.
const WAL_REMOVED: &str = "has already been removed";
const FAILED_LOG_LINES: usize = 40;

/// One run: the slot while the replica was down, and its return.
#[derive(Debug, Clone)]
struct SlotRun {
    down: Duration,
    replica: String,
    /// WAL the leader wrote while the replica was down.
    wal_written: u64,
    /// The slot's retained WAL (current position minus restart_lsn) at the end of the down
    /// time, after a CHECKPOINT; `None` when the slot was gone.
    retained: Option<u64>,
    /// The same as `pgherdctl slots --format json` showed it.
    retained_ctl: Option<u64>,
    /// The largest retained WAL sampled.
    retained_peak: u64,
    /// Size of the leader's pg_wal at the end of the down time, after the CHECKPOINT.
    pg_wal: u64,
    /// When the slot was dropped, after the agent stopped.
    dropped_after: Option<Duration>,
    database_bytes: i64,
    /// From the agent's start until its WAL receiver streamed from the leader.
    streaming_after: Option<Duration>,
    /// From the agent's start until its PostgreSQL logged that the WAL it needs is gone.
    stuck_after: Option<Duration>,
    /// From `pgherdctl reinit` until the replica replayed the target (re-clone runs).
    reinit_took: Option<Duration>,
    /// From the agent's start until it replayed the leader's position at that start
    /// (including the re-clone, not including an operator's reaction time).
    caught_up_after: Duration,
    recloned: bool,
    rows_per_s: f64,
    writer_errors: u64,
    rows_match: bool,
}

impl std::fmt::Display for SlotRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let opt_s =
            |d: Option<Duration>| d.map_or("-".into(), |d| format!("{:.2} s", d.as_secs_f64()));
        write!(
            f,
            "{} down {} s: {} MiB WAL written; slot {}, retained {} (peak {} MiB, pgherdctl {}), pg_wal {} MiB; \
             streaming after {}, caught up after {:.2} s{}{}; re-cloned: {}; writer {:.0} rows/s, {} errors; rows match: {}",
            self.replica,
            self.down.as_secs(),
            mib(self.wal_written),
            match self.dropped_after {
                Some(d) => format!("dropped {:.1} s after the agent stopped", d.as_secs_f64()),
                None => "kept".into(),
            },
            self.retained.map_or("-".into(), |b| format!("{} MiB", mib(b))),
            mib(self.retained_peak),
            self.retained_ctl.map_or("-".into(), |b| format!("{} MiB", mib(b))),
            mib(self.pg_wal),
            opt_s(self.streaming_after),
            self.caught_up_after.as_secs_f64(),
            self.stuck_after.map_or(String::new(), |d| format!(
                " (WAL gone, logged after {:.2} s", d.as_secs_f64()
            )),
            self.reinit_took.map_or(String::new(), |d| format!(
                "; pgherdctl reinit to caught up {:.2} s, database {} MiB)",
                d.as_secs_f64(),
                mib(self.database_bytes.max(0) as u64)
            )),
            self.recloned,
            self.rows_per_s,
            self.writer_errors,
            self.rows_match
        )
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.0}", bytes as f64 / 1048576.0)
}

/// Runs both scenarios and prints the report; `Ok(false)` when a run failed or misbehaved.
pub async fn run(args: SlotsArgs) -> Result<bool> {
    let machine = Machine::describe();
    let load_start = load_average();
    let mut logs = LogKeeper::new(args.logs.clone())?;
    let command: Vec<String> = std::env::args().collect();
    println!("pgherd replication slot benchmark, {}", machine.date);
    println!("machine: {}", machine.line());
    println!("command: {}", command.join(" "));
    println!("load average at start: {load_start}");
    println!(
        "each run: fresh etcd and 3 members (ttl {DEFAULT_TTL}, wal_keep_size 0), {} MiB loaded, a writer inserting {} rows of 1000 bytes per second on the leader; \
         one replica's agent stopped (SIGTERM, PostgreSQL stops with it), down for the time given, CHECKPOINT on the leader, agent started again",
        args.data_mib, args.rate
    );
    println!();

    let mut scenarios = vec![(1800u64, args.down)];
    if args.compare_down > 0 {
        scenarios.push((0, args.compare_down));
    }
    let mut results: Vec<(u64, u64, Result<SlotRun, String>)> = Vec::new();
    for (ttl, down) in scenarios {
        let label = format!("member_slots_ttl={ttl} down={down}s");
        let result = match start_cluster(&label, ttl).await {
            Err(e) => Err(e),
            Ok(cluster) => {
                let extra_rows = u64::from(args.rate) * args.down.saturating_sub(down);
                let measured =
                    measure(&cluster, &args, Duration::from_secs(down), extra_rows).await;
                let keep = measured.is_err() || logs.keep_all();
                if let Err(e) = &measured {
                    eprintln!(
                        "pgherd-bench: {label} failed: {e:#}\n{}",
                        cluster.log_tails(FAILED_LOG_LINES)
                    );
                }
                if keep {
                    match logs.keep(&cluster, &format!("slots-ttl{ttl}")) {
                        Ok(dir) => {
                            eprintln!("pgherd-bench: {label}: logs kept in {}", dir.display())
                        }
                        Err(e) => {
                            eprintln!("pgherd-bench: {label}: could not keep the logs: {e:#}")
                        }
                    }
                }
                drop_quietly(cluster);
                measured.map_err(|e| format!("{e:#}"))
            }
        };
        match &result {
            Ok(r) => println!("{label}: {r}"),
            Err(e) => println!("{label}: FAILED: {e}"),
        }
        results.push((ttl, down, result));
    }

    println!();
    println!("{}", table(&results));
    let findings = findings(&results);
    print_closing("findings", &findings, &logs);
    Ok(findings.is_empty())
}

/// A fresh three-member cluster at the default timing with `member_slots_ttl` = `ttl` and
/// no WAL kept but by slots.
async fn start_cluster(label: &str, ttl: u64) -> Result<Cluster, String> {
    eprintln!("pgherd-bench: {label}: starting a cluster");
    Cluster::builder()
        .name("bench")
        .members(3)
        .yaml(Timing::for_ttl(DEFAULT_TTL).yaml())
        .yaml(format!(
            "bootstrap: {{dcs: {{member_slots_ttl: {ttl}, postgresql: {{parameters: {{wal_keep_size: 0}}}}}}}}"
        ))
        .start()
        .await
        .map_err(|e| format!("cannot start the cluster: {e:#}"))
}

/// The steady writer: `rate` rows a second in batches every 100 ms, on its own connection,
/// until dropped (the task is aborted).
struct SteadyWriter {
    task: JoinHandle<()>,
    rows: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    started: Instant,
}

impl SteadyWriter {
    fn start(leader: &Member, rate: u32) -> SteadyWriter {
        let rows = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let pg = leader.pg();
        let (r, e) = (rows.clone(), errors.clone());
        let per_tick = u64::from(rate).div_ceil(10);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut client = None;
            loop {
                tick.tick().await;
                if client.is_none() {
                    match pg.connect().await {
                        Ok(c) => client = Some(c),
                        Err(_) => {
                            e.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                    }
                }
                let Some(c) = &client else { continue };
                let insert = format!(
                    "INSERT INTO bench_slots (pad) SELECT repeat('x', 1000) FROM generate_series(1, {per_tick})"
                );
                match c.batch_execute(&insert).await {
                    Ok(()) => {
                        r.fetch_add(per_tick, Ordering::Relaxed);
                    }
                    Err(_) => {
                        e.fetch_add(1, Ordering::Relaxed);
                        client = None;
                    }
                }
            }
        });
        SteadyWriter {
            task,
            rows,
            errors,
            started: Instant::now(),
        }
    }

    /// Stops it; returns (rows per second achieved, errors).
    async fn stop(mut self) -> (f64, u64) {
        self.task.abort();
        let _ = (&mut self.task).await;
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        (
            self.rows.load(Ordering::Relaxed) as f64 / secs,
            self.errors.load(Ordering::Relaxed),
        )
    }
}

impl Drop for SteadyWriter {
    /// A run that fails midway stops its writer too.
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The retained WAL of `slot` on `leader` (current position minus restart_lsn); `None`
/// when there is no such slot.
async fn retained(leader: &Member, slot: &str) -> Result<Option<u64>> {
    let rows = pgherd_tests::sql(
        leader,
        &format!(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint FROM pg_replication_slots WHERE slot_name = '{slot}'"
        ),
    )
    .await?;
    Ok(rows
        .first()
        .map(|r| r.get::<_, Option<i64>>(0).unwrap_or(0).max(0) as u64))
}

async fn pg_wal_bytes(leader: &Member) -> Result<u64> {
    let b: i64 = sql_value(
        leader,
        "SELECT coalesce(sum(size), 0)::bigint FROM pg_ls_waldir()",
    )
    .await?;
    Ok(b.max(0) as u64)
}

/// `retained_bytes` of `slot` in `pgherdctl --format json slots`.
async fn retained_by_ctl(cluster: &Cluster, slot: &str) -> Result<Option<u64>> {
    let out = cluster.ctl_output(&["--format", "json", "slots"]).await?;
    out.expect_success()?;
    let listed: serde_json::Value =
        serde_json::from_str(&out.stdout).context("pgherdctl slots printed no JSON")?;
    Ok(listed
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == slot))
        .and_then(|s| s["retained_bytes"].as_u64()))
}

/// `extra_rows` more are loaded first: a shorter comparison run starts with the rows the
/// writer added in the longer one, so both re-clone databases of the same size.
async fn measure(
    cluster: &Cluster,
    args: &SlotsArgs,
    down: Duration,
    extra_rows: u64,
) -> Result<SlotRun> {
    let healthy = cluster.wait_healthy(BRINGUP).await?;
    let leader = cluster.member(&healthy.leader);
    let replica = cluster.others(leader.name())[0];
    sql_batch(
        leader,
        "CREATE TABLE bench_slots (id bigserial PRIMARY KEY, pad text)",
    )
    .await?;
    let started = Instant::now();
    let mut rows = u64::from(args.data_mib) * 1024 + extra_rows;
    while rows > 0 {
        let batch = rows.min(65536);
        sql_batch(
            leader,
            &format!("INSERT INTO bench_slots (pad) SELECT repeat('x', 1000) FROM generate_series(1, {batch})"),
        )
        .await?;
        rows -= batch;
    }
    sql_batch(leader, "CHECKPOINT").await?;
    let loaded = current_wal_lsn(leader).await?;
    for m in cluster.others(leader.name()) {
        wait_replayed(m, loaded, REPLICATION).await?;
    }
    eprintln!(
        "pgherd-bench: {} rows loaded and replicated in {:.1} s",
        u64::from(args.data_mib) * 1024 + extra_rows,
        started.elapsed().as_secs_f64()
    );
    // The slot must be pgherd's (recorded in the slots key) for member_slots_ttl to apply.
    wait_until(
        REPLICATION,
        "the slots key to record the replica",
        || async {
            let key = cluster.etcd_get("slots").await?;
            key.filter(|k| k.contains(&format!("\"{}\"", replica.name())))
                .context("not yet")
        },
    )
    .await?;

    let writer = SteadyWriter::start(leader, args.rate);
    tokio::time::sleep(Duration::from_secs(5)).await;

    // The replica's agent stops cleanly: PostgreSQL stops with it, the member key goes.
    let lsn_stop = current_wal_lsn(leader).await?;
    let stopped = Instant::now();
    replica.stop().await?;
    ensure!(
        replica.postmaster_pid().is_none(),
        "{}'s PostgreSQL still runs after its agent stopped",
        replica.name()
    );
    eprintln!(
        "pgherd-bench: {}'s agent stopped; down for {} s",
        replica.name(),
        down.as_secs()
    );
    let mut dropped_after = None;
    let mut peak = 0u64;
    let mut last_progress = Instant::now();
    while stopped.elapsed() < down {
        let r = retained(leader, replica.name()).await?;
        match r {
            Some(b) => peak = peak.max(b),
            None if dropped_after.is_none() => {
                dropped_after = Some(stopped.elapsed());
                eprintln!(
                    "pgherd-bench: the leader dropped {}'s slot {:.1} s after the agent stopped",
                    replica.name(),
                    stopped.elapsed().as_secs_f64()
                );
            }
            None => {}
        }
        if last_progress.elapsed() >= PROGRESS {
            last_progress = Instant::now();
            eprintln!(
                "pgherd-bench: down {:.0} s: slot retains {}, pg_wal {} MiB",
                stopped.elapsed().as_secs_f64(),
                r.map_or("nothing (dropped)".into(), |b| format!("{} MiB", mib(b))),
                mib(pg_wal_bytes(leader).await?)
            );
        }
        let left = down.saturating_sub(stopped.elapsed());
        tokio::time::sleep(SAMPLE.min(left)).await;
    }
    // A segment switch and a checkpoint remove every segment no slot keeps: both runs end
    // the down time alike, whatever checkpoint_timeout did meanwhile.
    sql_batch(leader, "SELECT pg_switch_wal(); CHECKPOINT").await?;
    let retained_end = retained(leader, replica.name()).await?;
    if let Some(b) = retained_end {
        peak = peak.max(b);
    }
    let retained_ctl = retained_by_ctl(cluster, replica.name()).await?;
    let pg_wal = pg_wal_bytes(leader).await?;
    let target = current_wal_lsn(leader).await?;
    let wal_written = target.0.saturating_sub(lsn_stop.0);
    let database_bytes: i64 =
        sql_value(leader, "SELECT pg_database_size(current_database())").await?;

    // Back: how long until it streams and has replayed the leader's position of now.
    let pg_log_offset = std::fs::metadata(replica.postgres_log_path()).map_or(0, |m| m.len());
    let back = Instant::now();
    replica.start()?;
    let streaming_after = std::cell::Cell::new(None);
    let leader_port = i32::from(leader.pg_port());
    enum Outcome {
        CaughtUp(Duration),
        Stuck(Duration),
    }
    let outcome = wait_until(
        CATCH_UP,
        format!(
            "{} to catch up to {target} or to log that WAL is gone",
            replica.name()
        ),
        || async {
            if let Ok(Some(rx)) = wal_receiver(replica).await {
                if streaming_after.get().is_none()
                    && rx.status == "streaming"
                    && rx.sender_port == Some(leader_port)
                {
                    streaming_after.set(Some(back.elapsed()));
                }
            }
            if let Ok(Some(r)) = replay_lsn(replica).await {
                if r >= target {
                    return Ok(Outcome::CaughtUp(back.elapsed()));
                }
            }
            if log_since(&replica.postgres_log_path(), pg_log_offset).contains(WAL_REMOVED) {
                return Ok(Outcome::Stuck(back.elapsed()));
            }
            bail!("not caught up yet")
        },
    )
    .await?;
    let (caught_up_after, stuck_after, reinit_took) = match outcome {
        Outcome::CaughtUp(d) => (d, None, None),
        Outcome::Stuck(stuck) => {
            eprintln!(
                "pgherd-bench: {} cannot catch up ({WAL_REMOVED}, {:.1} s after its start): pgherdctl reinit",
                replica.name(),
                stuck.as_secs_f64()
            );
            let reinit = Instant::now();
            cluster
                .ctl_output(&["reinit", replica.name(), "--force"])
                .await?
                .expect_success()?;
            wait_replayed(replica, target, RECLONE).await?;
            (back.elapsed(), Some(stuck), Some(reinit.elapsed()))
        }
    };
    let mut streaming_after = streaming_after.get();
    if streaming_after.is_none() {
        let rx = wait_until(
            REPLICATION,
            "the replica to stream from the leader",
            || async {
                let rx = wal_receiver(replica).await?.context("no WAL receiver")?;
                ensure!(
                    rx.status == "streaming" && rx.sender_port == Some(leader_port),
                    "{rx:?}"
                );
                Ok(back.elapsed())
            },
        )
        .await?;
        streaming_after = Some(rx);
    }
    let since_start = replica.agent_log_of_last_start();
    let recloned =
        since_start.contains("cloning from") || since_start.contains("removing the data directory");

    let (rows_per_s, writer_errors) = writer.stop().await;
    ensure!(
        cluster.leader_name().await?.as_deref() == Some(leader.name()),
        "the leader changed during the run"
    );
    let end = current_wal_lsn(leader).await?;
    wait_replayed(replica, end, REPLICATION).await?;
    let count = "SELECT count(*) FROM bench_slots";
    let on_leader: i64 = sql_value(leader, count).await?;
    let on_replica: i64 = sql_value(replica, count).await?;

    Ok(SlotRun {
        down,
        replica: replica.name().to_string(),
        wal_written,
        retained: retained_end,
        retained_ctl,
        retained_peak: peak,
        pg_wal,
        dropped_after,
        database_bytes,
        streaming_after,
        stuck_after,
        reinit_took,
        caught_up_after,
        recloned,
        rows_per_s,
        writer_errors,
        rows_match: on_leader == on_replica,
    })
}

/// The file from byte `offset` on (empty if unreadable).
fn log_since(path: &std::path::Path, offset: u64) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    String::from_utf8_lossy(text.get(offset as usize..).unwrap_or_default()).into_owned()
}

/// One column per run.
fn table(results: &[(u64, u64, Result<SlotRun, String>)]) -> String {
    use std::fmt::Write as _;
    let mut out = String::from("| figure |");
    for (ttl, down, _) in results {
        let _ = write!(out, " member_slots_ttl {ttl} s, down {down} s |");
    }
    out.push_str("\n|---|");
    for _ in results {
        out.push_str("---|");
    }
    out.push('\n');
    let secs = |d: Duration| format!("{:.2} s", d.as_secs_f64());
    type Show = Box<dyn Fn(&SlotRun) -> String>;
    fn row(
        figure: &'static str,
        show: impl Fn(&SlotRun) -> String + 'static,
    ) -> (&'static str, Show) {
        (figure, Box::new(show))
    }
    let rows = vec![
        row("WAL written on the leader while the replica was down", |r| {
            format!("{} MiB", mib(r.wal_written))
        }),
        row("its slot on the leader", |r| match r.dropped_after {
            Some(d) => format!("dropped {:.1} s after the agent stopped", d.as_secs_f64()),
            None => "kept".into(),
        }),
        row(
            "WAL retained by its slot at the end of the down time (pgherdctl slots)",
            |r| match (r.retained, r.retained_ctl) {
                (Some(b), Some(c)) => format!("{} MiB ({} MiB)", mib(b), mib(c)),
                (Some(b), None) => format!("{} MiB (not listed)", mib(b)),
                (None, _) => "no slot".into(),
            },
        ),
        row(
            "leader's pg_wal at the end of the down time, after a CHECKPOINT (pg_ls_waldir, recycled segments included)",
            |r| format!("{} MiB", mib(r.pg_wal)),
        ),
        row(
            "replica streaming from the leader, after its agent started",
            move |r| r.streaming_after.map_or("-".into(), secs),
        ),
        row(
            "replica cannot catch up (\"has already been removed\" logged), after its agent started",
            move |r| r.stuck_after.map_or("no".into(), secs),
        ),
        row("`pgherdctl reinit` to caught up (database size)", move |r| {
            r.reinit_took.map_or("-".into(), |d| {
                format!("{} ({} MiB)", secs(d), mib(r.database_bytes.max(0) as u64))
            })
        }),
        row(
            "replica replayed the leader's position at its restart, after its agent started",
            move |r| secs(r.caught_up_after),
        ),
        row("re-cloned", |r| if r.recloned { "yes".into() } else { "no".into() }),
        row(
            "writer on the leader (rows of 1000 bytes per second, errors)",
            |r| format!("{:.0}/s, {} errors", r.rows_per_s, r.writer_errors),
        ),
    ];
    for (figure, show) in rows {
        let _ = write!(out, "| {figure} |");
        for (_, _, r) in results {
            let cell = match r {
                Ok(r) => show(r),
                Err(_) => "failed".into(),
            };
            let _ = write!(out, " {cell} |");
        }
        out.push('\n');
    }
    out
}

/// What should not happen: a failed run, a slot dropped within member_slots_ttl, a re-clone
/// although the slot was kept, rows missing on the replica, writer errors.
fn findings(results: &[(u64, u64, Result<SlotRun, String>)]) -> Vec<String> {
    let mut out = Vec::new();
    for (ttl, down, r) in results {
        let name = format!("member_slots_ttl={ttl} down={down}s");
        let r = match r {
            Err(e) => {
                out.push(format!("{name} failed: {e}"));
                continue;
            }
            Ok(r) => r,
        };
        if *ttl > *down {
            if let Some(d) = r.dropped_after {
                out.push(format!(
                    "{name}: the slot was dropped {:.1} s after the agent stopped, within member_slots_ttl",
                    d.as_secs_f64()
                ));
            }
            if r.recloned || r.stuck_after.is_some() {
                out.push(format!("{name}: the replica could not catch up from the leader's WAL although its slot was kept"));
            }
        }
        if !r.rows_match {
            out.push(format!(
                "{name}: the replica's row count differs from the leader's after catching up"
            ));
        }
        if r.writer_errors > 0 {
            out.push(format!(
                "{name}: the writer saw {} errors on the leader",
                r.writer_errors
            ));
        }
    }
    out
}
