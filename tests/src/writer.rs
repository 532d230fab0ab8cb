//! Writers that record every acknowledged commit, to prove that nothing acknowledged is lost
//! and to measure when a cluster stops and resumes taking writes.
//!
//! - [`Writer::start`]: the application's view. One row every ~20 ms through a libpq-style
//!   multi-host connection to every member with `target_session_attrs=read-write`,
//!   reconnecting after any error.
//! - [`Writer::probe`]: one member only, any session: exactly when that member's PostgreSQL
//!   accepts a write and when it stops.
//!
//! Each writer inserts into its own table (`id bigint PRIMARY KEY, port int`, the port of the
//! server that committed), so writers never collide on ids. An insert whose reply came back
//! is *acknowledged*; one that failed or timed out after it was sent is *uncertain* (it may
//! or may not have committed). [`missing_rows`] then lists acknowledged ids a member lacks;
//! [`ensure_acked_rows_on`] fails unless a member has them all.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_postgres::config::TargetSessionAttrs;
use tokio_postgres::NoTls;

use crate::cluster::Cluster;
use crate::member::Member;
use crate::pg::{sql, sql_batch, PgConn};
use crate::report::{Ack, Stamp, WriteError, WriterReport};
use crate::wait::wait_until;

/// How a [`Writer`] writes.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// The writer's own table; created on the leader by [`Writer::start_with`].
    pub table: String,
    /// Time between two inserts (when the previous one was quick).
    pub interval: Duration,
    /// `ReadWrite` skips standbys when connecting, as libpq's `target_session_attrs` does.
    pub target_session_attrs: TargetSessionAttrs,
    /// Per host.
    pub connect_timeout: Duration,
    /// An insert without reply after this counts as failed (outcome uncertain).
    pub statement_timeout: Duration,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            table: "pgherd_writer".into(),
            interval: Duration::from_millis(20),
            target_session_attrs: TargetSessionAttrs::ReadWrite,
            connect_timeout: Duration::from_secs(1),
            statement_timeout: Duration::from_secs(3),
        }
    }
}

fn lock(m: &Mutex<WriterReport>) -> MutexGuard<'_, WriterReport> {
    // A panicking test thread may poison it; the report is still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A background task inserting rows until stopped; aborted on drop.
#[derive(Debug)]
pub struct Writer {
    report: Arc<Mutex<WriterReport>>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    grace: Duration,
}

/// Creates a writer's table on `leader` (if it does not exist yet).
pub async fn create_writer_table(leader: &Member, table: &str) -> Result<()> {
    sql_batch(
        leader,
        &format!(
            "CREATE TABLE IF NOT EXISTS {table} (id bigint PRIMARY KEY, port int NOT NULL, \
             at timestamptz NOT NULL DEFAULT clock_timestamp())"
        ),
    )
    .await
    .with_context(|| format!("cannot create the writer table {table}"))
}

impl Writer {
    /// One row every 20 ms into `pgherd_writer`, through every member, read-write sessions
    /// only. The table is created on the current leader first.
    pub async fn start(cluster: &Cluster) -> Result<Writer> {
        Self::start_with(cluster, WriterOptions::default()).await
    }

    /// A writer through every member of `cluster` with `options`; its table is created on
    /// the current leader first.
    pub async fn start_with(cluster: &Cluster, options: WriterOptions) -> Result<Writer> {
        create_writer_table(cluster.leader().await?, &options.table).await?;
        let targets: Vec<PgConn> = cluster.members().iter().map(Member::pg).collect();
        Ok(Self::spawn("all members", targets, options))
    }

    /// Tries an insert on `member` alone every 50 ms, whatever its role, into
    /// `pgherd_probe_<member>` (created on the current leader first): when did it accept
    /// writes?
    pub async fn probe(cluster: &Cluster, member: &Member) -> Result<Writer> {
        Self::probe_every(cluster, member, Duration::from_millis(50)).await
    }

    /// A [`Writer::probe`] that tries an insert every `interval`.
    pub async fn probe_every(
        cluster: &Cluster,
        member: &Member,
        interval: Duration,
    ) -> Result<Writer> {
        let options = WriterOptions {
            table: format!("pgherd_probe_{}", member.name()),
            interval,
            target_session_attrs: TargetSessionAttrs::Any,
            ..WriterOptions::default()
        };
        create_writer_table(cluster.leader().await?, &options.table).await?;
        Ok(Self::spawn(member.name(), vec![member.pg()], options))
    }

    /// A [`Writer::probe`] on every member, in member order.
    pub async fn probe_all(cluster: &Cluster) -> Result<Vec<Writer>> {
        let mut probes = Vec::new();
        for member in cluster.members() {
            probes.push(Self::probe(cluster, member).await?);
        }
        Ok(probes)
    }

    /// Starts writing to `targets` (tried in order) into `options.table`, which must exist.
    pub fn spawn(label: &str, targets: Vec<PgConn>, options: WriterOptions) -> Writer {
        let report = Arc::new(Mutex::new(WriterReport::new(label, &options.table)));
        let (stop, stop_rx) = watch::channel(false);
        let grace = options.statement_timeout
            + options.connect_timeout * (targets.len() as u32).max(1)
            + Duration::from_secs(1);
        let task = tokio::spawn(write_loop(targets, options, report.clone(), stop_rx));
        Writer {
            report,
            stop,
            task: Some(task),
            grace,
        }
    }

    /// What the writer did so far.
    pub fn report(&self) -> WriterReport {
        lock(&self.report).clone()
    }

    pub fn label(&self) -> String {
        lock(&self.report).label.clone()
    }

    /// Waits until the writer has at least `n` acknowledgements.
    pub async fn wait_acks(&self, n: usize, timeout: Duration) -> Result<()> {
        wait_until(timeout, format!("{n} acknowledged writes"), || async {
            let report = self.report();
            anyhow::ensure!(
                report.acks.len() >= n,
                "{} so far; {}",
                report.acks.len(),
                report.summary()
            );
            Ok(())
        })
        .await
    }

    /// Waits until an insert sent at or after `t` is acknowledged, and returns it.
    pub async fn wait_ack_sent_after(&self, t: Instant, timeout: Duration) -> Result<Ack> {
        let label = self.label();
        wait_until(
            timeout,
            format!("writer {label} to get an insert acknowledged"),
            || async {
                let report = lock(&self.report);
                report.first_ack_sent_after(t).copied().with_context(|| {
                    format!(
                        "no acknowledgement yet; last error: {}",
                        report.errors.last().map_or("none", |e| e.message.as_str())
                    )
                })
            },
        )
        .await
    }

    /// Waits until an insert is acknowledged through a session opened after `session`
    /// (e.g. the session in use when its server was killed), and returns it.
    pub async fn wait_ack_after_session(&self, session: u64, timeout: Duration) -> Result<Ack> {
        let label = self.label();
        wait_until(
            timeout,
            format!("writer {label} to get an insert acknowledged in a session after #{session}"),
            || async {
                let report = lock(&self.report);
                report
                    .first_ack_after_session(session)
                    .copied()
                    .with_context(|| {
                        format!(
                            "no acknowledgement yet; last error: {}",
                            report.errors.last().map_or("none", |e| e.message.as_str())
                        )
                    })
            },
        )
        .await
    }

    /// Stops writing (the insert in flight finishes or times out) and returns the report.
    pub async fn stop(mut self) -> WriterReport {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(self.grace, task).await.is_err() {
                abort.abort();
            }
        }
        lock(&self.report).clone()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

fn config(targets: &[PgConn], options: &WriterOptions) -> tokio_postgres::Config {
    let mut config = tokio_postgres::Config::new();
    for t in targets {
        config.host(&t.host).port(t.port);
    }
    if let Some(t) = targets.first() {
        config.user(&t.user).password(&t.password).dbname(&t.dbname);
    }
    config
        .application_name("pgherd-tests-writer")
        .connect_timeout(options.connect_timeout)
        .target_session_attrs(options.target_session_attrs);
    config
}

async fn write_loop(
    targets: Vec<PgConn>,
    options: WriterOptions,
    report: Arc<Mutex<WriterReport>>,
    mut stop: watch::Receiver<bool>,
) {
    let config = config(&targets, &options);
    let connect_budget =
        options.connect_timeout * (targets.len() as u32).max(1) + Duration::from_secs(1);
    let insert = format!(
        "INSERT INTO {} (id, port) VALUES ($1, inet_server_port()) RETURNING port",
        options.table
    );
    let mut ticker = tokio::time::interval(options.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut client: Option<tokio_postgres::Client> = None;
    let mut next_id: i64 = 1;
    let error = |id: Option<i64>, message: String| {
        let mut r = lock(&report);
        if let Some(id) = id {
            r.uncertain.push(id);
        }
        r.errors.push(WriteError {
            id,
            at: Stamp::now(),
            message,
        });
    };
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = ticker.tick() => {}
        }
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = None;
            match tokio::time::timeout(connect_budget, config.connect(NoTls)).await {
                Ok(Ok((c, connection))) => {
                    tokio::spawn(async move {
                        // Errors surface on the client's next call.
                        let _ = connection.await;
                    });
                    client = Some(c);
                    lock(&report).connections += 1;
                }
                Ok(Err(e)) => {
                    error(None, format!("connect: {}", one_line(&e)));
                    continue;
                }
                Err(_) => {
                    error(None, "connect: timed out".into());
                    continue;
                }
            }
        }
        let c = client.as_ref().expect("a client was connected just above");
        let id = next_id;
        next_id += 1;
        lock(&report).attempts += 1;
        let sent = Stamp::now();
        match tokio::time::timeout(options.statement_timeout, c.query_one(&insert, &[&id])).await {
            Ok(Ok(row)) => {
                let acked = Stamp::now();
                let port: i32 = row.try_get(0).unwrap_or(-1);
                let mut r = lock(&report);
                let session = r.connections;
                r.acks.push(Ack {
                    id,
                    sent,
                    acked,
                    port,
                    session,
                });
            }
            Ok(Err(e)) => {
                // A read-only standby keeps a probe's session; anything else reconnects.
                let keep = e.as_db_error().is_some()
                    && options.target_session_attrs == TargetSessionAttrs::Any;
                if !keep {
                    client = None;
                }
                error(Some(id), format!("insert: {}", one_line(&e)));
            }
            Err(_) => {
                client = None;
                error(Some(id), "insert: timed out".into());
            }
        }
    }
}

/// An error with its causes on one line (tokio-postgres puts the server's message in the
/// source).
fn one_line(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {}", db.severity(), db.message());
    }
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let _ = write!(s, ": {cause}");
        source = cause.source();
    }
    s
}

/// The ids among `ids` that `member`'s copy of `table` lacks, in order.
pub async fn missing_rows(member: &Member, table: &str, ids: &[i64]) -> Result<Vec<i64>> {
    let rows = sql(member, &format!("SELECT id FROM {table}")).await?;
    let present: HashSet<i64> = rows.iter().map(|r| r.get::<_, i64>(0)).collect();
    Ok(ids
        .iter()
        .copied()
        .filter(|id| !present.contains(id))
        .collect())
}

/// Waits until `member` (a replica) holds every row the writer of `report` saw
/// acknowledged; the number of those rows. Fails when there were none.
pub async fn wait_acked_rows_on(
    member: &Member,
    report: &WriterReport,
    timeout: std::time::Duration,
) -> Result<usize> {
    let acked = report.acked_ids();
    ensure!(!acked.is_empty(), "the writer had no acknowledged row");
    crate::wait_until(
        timeout,
        format!(
            "{} to hold all {} acknowledged rows",
            member.name(),
            acked.len()
        ),
        || async {
            let missing = missing_rows(member, &report.table, &acked).await?;
            ensure!(missing.is_empty(), "{} rows missing", missing.len());
            Ok(())
        },
    )
    .await?;
    Ok(acked.len())
}

/// Fails unless `member` has every row the writer of `report` saw acknowledged (after a
/// failover: none was lost).
pub async fn ensure_acked_rows_on(member: &Member, report: &WriterReport) -> Result<()> {
    let missing = missing_rows(member, &report.table, &report.acked_ids()).await?;
    ensure!(
        missing.is_empty(),
        "acknowledged rows missing on {}: {missing:?}",
        member.name()
    );
    Ok(())
}
