//! The integration-test harness: real etcd, real PostgreSQL and real `pgherd-agent`
//! processes on loopback, each test in its own temp dirs and on its own free ports, so tests
//! run in parallel (nextest runs each in its own process).
//!
//! - [`Etcd`]: a one- or three-member etcd, killed and removed on drop.
//! - [`Cluster`]: etcd plus N members, each an agent with its own config file, data directory
//!   and logs; started together by [`Cluster::start`] or [`ClusterBuilder::start`].
//! - [`Member`]: one agent: `start`, `stop` (SIGTERM + wait), `kill` (SIGKILL), paths, SQL.
//! - [`wait_until`]: polls a condition until a deadline; the error names what was awaited and
//!   what the last check saw. Tests wait on conditions, never on blind sleeps.
//! - [`sql`], [`list_json`], [`Cluster::etcd_get`]: look at the cluster the way an operator
//!   would; [`current_wal_lsn`], [`wal_receiver`], [`timeline`]: where replication stands;
//!   [`freeze_wal_receiver`], [`lag_behind`]: make a replica fall behind.
//! - [`Writer`]: inserts a row every few ms and records every acknowledged commit (the
//!   application's view, or one member's); [`missing_rows`] and [`ensure_acked_rows_on`] check
//!   none is lost.
//! - [`EtcdProxy`]: cuts one member off etcd ([`MemberOptions::through_etcd_proxy`]).
//! - [`Member::crash`], [`Member::pause_agent`], [`Paused`]: faults; paused processes are
//!   thawed when their guard drops.
//! - [`hold_no_takeover`], [`hold_not_leader`]: nobody (or not this member) takes the
//!   leader key for a while; [`same_key`], [`Cluster::leader_key`]: is it the same key.
//! - [`ctl`] / [`ctl_output`]: `pgherdctl` as an operator runs it (stdin not a terminal);
//!   [`CtlOutput::expect_failure`] checks a refusal's exit code and reason.
//! - [`TestPki`]: a CA and a certificate for 127.0.0.1, for the TLS API; [`TestCa`]: a CA
//!   that signs certificates for the names a test chooses.
//! - [`Member::http_get`] / [`http_get`]: the agent's HTTP health checks and metrics, asked
//!   the way HAProxy asks (plain HTTP/1.1, one request per connection).
//! - [`LoneAgent`]: one agent with no etcd to reach and no PostgreSQL, for what the process
//!   does around its loop (log format, systemd notifications); [`Member::set_env`] gives a
//!   cluster member extra environment (systemd's `NOTIFY_SOCKET`).
//!
//! Cleanup happens in `Drop`, so it also runs when a test panics or returns an error: every
//! agent is killed with its process group, any PostgreSQL it left is killed through its
//! `postmaster.pid`, then the temp dirs go (set `PGHERD_KEEP_TMP=1` to keep them). Before
//! that a cluster prints the tail of each member's `agent.log` and `data.log` (80 lines, or
//! `PGHERD_LOG_LINES`); test runners show it only for tests that fail.
//!
//! The binaries under test are found next to the test executable (`target/debug`), or in
//! `PGHERD_BIN_DIR`: build them first with `cargo build --workspace --bins`.
//!
//! The PostgreSQL under test is [`pg_bin_dir`]'s: `PGHERD_TEST_PG_BIN_DIR` (scripts/test-matrix
//! sets it per major), else the newest installed `/usr/lib/postgresql/<major>/bin`.
//!
//! Processes are started with a parent-death signal tied to the thread that starts them:
//! start them from the test's own task, not from `spawn_blocking`.

mod cluster;
mod config;
mod ctl;
mod etcd;
mod http;
mod leader;
mod lone;
mod member;
mod pg;
mod ports;
mod process;
mod proxy;
mod replication;
mod report;
pub mod s3;
mod snapshot;
pub mod sync;
mod tls;
mod wait;
mod writer;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

pub use cluster::{Cluster, ClusterBuilder, Healthy};
pub use config::{member_yaml, merge_yaml, MemberSpec};
pub use ctl::{
    ctl, ctl_direct, ctl_direct_output, ctl_direct_output_env, ctl_output, ctl_output_with_input,
    list_json, CtlOutput, HistoryEntry, ListedMember,
};
pub use etcd::{Etcd, EtcdAuth, EtcdSecurity, EtcdTls};
pub use http::{http_get, http_request, HttpResponse};
pub use leader::{hold_no_takeover, hold_not_leader, same_key};
pub use lone::LoneAgent;
pub use member::{log_line_time, Member, MemberOptions};
pub use nix::sys::signal::Signal;
pub use pg::{
    chown_to_postgres, initdb, kill_postmaster, pg_bin_dir, pg_bin_dir_from_env, postmaster_pid,
    run_as_postgres, sql, sql_batch, sql_value, PgConn, PlainPostgres, PG_BIN_DIR_ENV,
};
pub use ports::free_port;
pub use process::{is_alive, tail, Paused};
pub use proxy::{EtcdProxy, ProxyMode};
pub use replication::{
    current_wal_lsn, freeze_wal_receiver, in_recovery, lag_behind, receive_lsn, replay_lsn,
    sender_port, timeline, wait_replayed, wait_streaming_from, wal_receiver, Lsn, WalReceiver,
};
pub use report::{Ack, Gap, Stamp, WriteError, WriterReport};
pub use snapshot::{snapshot, snapshot_diff, FileFacts};
pub use tls::{TestCa, TestPki};
pub use tokio_postgres::config::TargetSessionAttrs;
pub use tokio_postgres::Row;
pub use wait::{hold_for, wait_until};
pub use writer::{
    create_writer_table, ensure_acked_rows_on, missing_rows, wait_acked_rows_on, Writer,
    WriterOptions,
};

/// Superuser every member's config names.
pub const SUPERUSER: &str = "postgres";
pub const SUPERUSER_PASSWORD: &str = "pgherd-test-superuser";
/// The bearer token every test member's API requires for changes.
pub const TOKEN: &str = "pgherd-test-token-0123456789";
/// Replication user every member's config names.
pub const REPLICATION_USER: &str = "replicator";
pub const REPLICATION_PASSWORD: &str = "pgherd-test-replication";

/// Directory holding `pgherd-agent`, `pgherd-watchdog` and `pgherdctl`: `PGHERD_BIN_DIR`, else the cargo target
/// directory of the running test (`target/debug/deps/<test>` -> `target/debug`).
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PGHERD_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().context("cannot find the running test executable")?;
    let mut dir = exe
        .parent()
        .context("the test executable has no parent directory")?
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    Ok(dir)
}

fn binary(name: &str) -> Result<PathBuf> {
    let path = bin_dir()?.join(name);
    if !path.is_file() {
        bail!(
            "{} does not exist: run `cargo build --workspace --bins` first (or point PGHERD_BIN_DIR at the directory holding {name})",
            path.display()
        );
    }
    Ok(path)
}

/// Path of the `pgherd-agent` binary under test.
pub fn agent_bin() -> Result<PathBuf> {
    binary("pgherd-agent")
}

/// Path of the `pgherd-watchdog` binary under test (the agent starts the one next to it).
pub fn watchdog_bin() -> Result<PathBuf> {
    binary("pgherd-watchdog")
}

/// Path of the `pgherdctl` binary under test.
pub fn ctl_bin() -> Result<PathBuf> {
    binary("pgherdctl")
}

/// Makes a temp dir the harness owns; mode 0755 so that user `postgres` can traverse it
/// (the agent runs PostgreSQL as `postgres` when the tests run as root).
pub(crate) fn temp_root(prefix: &str) -> Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .context("cannot create a temp dir")?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("cannot chmod 0755 {}", dir.path().display()))?;
    Ok(dir)
}

/// Removes a harness temp dir, or keeps it and says where when `PGHERD_KEEP_TMP` is set.
pub(crate) fn dispose_temp_root(dir: tempfile::TempDir) {
    if std::env::var_os("PGHERD_KEEP_TMP").is_some_and(|v| !v.is_empty() && v != "0") {
        let path = dir.keep();
        eprintln!("pgherd harness: kept {} (PGHERD_KEEP_TMP)", path.display());
    } else if let Err(e) = dir.close() {
        eprintln!("pgherd harness: could not remove a temp dir: {e}");
    }
}
