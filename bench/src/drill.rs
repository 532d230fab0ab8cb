//! `pgherd-bench drill-writer`: the application's view during a docker-compose drill
//! (docker/drills/). It commits one row every 20 ms through one address (HAProxy's
//! read-write port), reconnecting after every error, until SIGTERM, SIGINT or
//! `--max-duration`. Then it reconnects through the same address and counts the acknowledged
//! ids the table lacks, and prints one JSON line: how many rows were acknowledged, lost and
//! uncertain, and the longest time between two acknowledgements (the write outage).
//!
//! While it runs, `--status FILE` is rewritten every 100 ms with `acks=N last_ack_ms=T
//! errors=N` (T: wall-clock milliseconds since the epoch of the last acknowledgement, 0 if
//! none), so a drill script can wait for writes to stop or to resume.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::Args;
use pgherd_tests::{PgConn, TargetSessionAttrs, Writer, WriterOptions, WriterReport};
use tokio::signal::unix::{signal, SignalKind};
use tokio::time::Instant;

#[derive(Debug, Clone, Args)]
pub struct DrillWriterArgs {
    /// Host to write through (HAProxy).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to write through (HAProxy's read-write port).
    #[arg(long, default_value_t = 5000)]
    pub port: u16,
    #[arg(long, default_value = "postgres")]
    pub user: String,
    /// File whose first line is the password (docker/secrets/superuser).
    #[arg(long, value_name = "FILE")]
    pub password_file: PathBuf,
    #[arg(long, default_value = "postgres")]
    pub dbname: String,
    /// Table to write into; dropped and created again at the start.
    #[arg(long, default_value = "drill_writer")]
    pub table: String,
    /// Stop writing after this long even without a signal.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub max_duration: Duration,
    /// How long to keep trying to create the table at the start, and to read it back at the
    /// end.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub connect_deadline: Duration,
    /// Rewritten every 100 ms with `acks=N last_ack_ms=T errors=N`.
    #[arg(long, value_name = "FILE")]
    pub status: Option<PathBuf>,
}

/// Writes until told to stop, then checks; `Ok(true)` when the check could be made.
pub async fn run(args: DrillWriterArgs) -> Result<bool> {
    let password = std::fs::read_to_string(&args.password_file)
        .with_context(|| format!("cannot read the password file {:?}", args.password_file))?;
    let conn = PgConn {
        host: args.host.clone(),
        port: args.port,
        user: args.user.clone(),
        password: password.lines().next().unwrap_or("").trim().to_string(),
        dbname: args.dbname.clone(),
    };
    anyhow::ensure!(
        args.table
            .chars()
            .all(|c| c.is_ascii_lowercase() || c == '_'),
        "--table {:?}: use a-z and _ only",
        args.table
    );
    let table = &args.table;
    let create = format!(
        "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (id bigint PRIMARY KEY, \
         port int NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())"
    );
    retry(args.connect_deadline, "create the writer table", || {
        conn.batch(&create)
    })
    .await?;

    let options = WriterOptions {
        table: table.clone(),
        interval: Duration::from_millis(20),
        target_session_attrs: TargetSessionAttrs::ReadWrite,
        connect_timeout: Duration::from_secs(1),
        statement_timeout: Duration::from_secs(3),
    };
    let label = format!("{}:{}", args.host, args.port);
    let writer = Writer::spawn(&label, vec![conn.clone()], options);

    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let end = Instant::now() + args.max_duration;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let stopped_by = loop {
        tokio::select! {
            _ = interrupt.recv() => break "SIGINT",
            _ = terminate.recv() => break "SIGTERM",
            _ = tokio::time::sleep_until(end) => break "max-duration",
            _ = tick.tick() => {
                if let Some(path) = &args.status {
                    write_status(path, &writer.report())?;
                }
            }
        }
    };
    let report = writer.stop().await;
    if let Some(path) = &args.status {
        write_status(path, &report)?;
    }
    eprintln!(
        "drill-writer: stopped by {stopped_by}; {}",
        report.summary()
    );

    let acked = report.acked_ids();
    let select = format!("SELECT id FROM {table}");
    let rows = retry(args.connect_deadline, "read the writer table back", || {
        conn.query(&select)
    })
    .await;
    let (verified, lost) = match rows {
        Ok(rows) => {
            let present: HashSet<i64> = rows.iter().map(|r| r.get::<_, i64>(0)).collect();
            let lost: Vec<i64> = acked
                .iter()
                .copied()
                .filter(|id| !present.contains(id))
                .collect();
            (true, lost)
        }
        Err(e) => {
            eprintln!("drill-writer: error: {e:#}");
            (false, Vec::new())
        }
    };
    let origin = report.started.instant;
    let (outage, outage_at) = report.longest_gap().map_or((0.0, 0.0), |g| {
        (
            g.length().as_secs_f64(),
            g.last_before.acked.secs_since(origin),
        )
    });
    let shown: Vec<String> = lost.iter().take(20).map(i64::to_string).collect();
    println!(
        "{{\"acked\":{},\"uncertain\":{},\"errors\":{},\"sessions\":{},\
         \"write_outage_s\":{outage:.3},\"outage_started_at_s\":{outage_at:.3},\
         \"verified\":{verified},\"acked_rows_lost\":{},\"lost_ids\":[{}]}}",
        acked.len(),
        report.uncertain.len(),
        report.errors.len(),
        report.connections,
        lost.len(),
        shown.join(",")
    );
    Ok(verified)
}

/// Calls `f` every 500 ms until it succeeds or `deadline` has passed; returns the last error.
async fn retry<T, F, Fut>(deadline: Duration, what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let end = Instant::now() + deadline;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= end => {
                return Err(e).with_context(|| format!("could not {what} within {deadline:?}"))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

fn epoch_ms(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis())
}

/// Replaces `path` with the writer's status line (a rename, so readers see whole lines).
fn write_status(path: &Path, report: &WriterReport) -> Result<()> {
    let last = report.last_ack().map_or(0, |a| epoch_ms(a.acked.wall));
    let line = format!(
        "acks={} last_ack_ms={last} errors={}\n",
        report.acks.len(),
        report.errors.len()
    );
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, line).with_context(|| format!("cannot write {tmp:?}"))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename {tmp:?} to {path:?}"))
}
