//! Queries against the local PostgreSQL.

use anyhow::{Context, Result};
use pgherd_config::Credentials;
use tokio_postgres::Client;

use super::conf::{scram_verifier, sql_ident, sql_literal};
use crate::ha::sync::{Replication, Standbys};
use crate::ha::PgStatus;
use crate::lsn::Lsn;

const STATUS: &str = "\
SELECT pg_is_in_recovery(),
       CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END,
       CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_walfile_name(pg_current_wal_lsn()) END,
       pg_last_wal_receive_lsn()::text,
       pg_last_wal_replay_lsn()::text,
       (SELECT received_tli FROM pg_stat_wal_receiver),
       (SELECT status FROM pg_stat_wal_receiver),
       (SELECT timeline_id FROM pg_control_checkpoint()),
       EXISTS (SELECT 1 FROM pg_settings WHERE pending_restart),
       current_setting('synchronous_standby_names')";

const REPLICATION: &str = "\
SELECT application_name, COALESCE(sync_state, 'async'), flush_lsn::text
  FROM pg_stat_replication WHERE state = 'streaming'";

fn lsn(s: Option<String>) -> Option<Lsn> {
    s.and_then(|s| s.parse().ok())
}

pub async fn status(c: &Client) -> Result<PgStatus> {
    let row = c
        .query_one(STATUS, &[])
        .await
        .context("status query failed")?;
    let in_recovery: bool = row.get(0);
    let walfile: Option<String> = row.get(2);
    let received_tli: Option<i32> = row.get(5);
    let receiver: Option<String> = row.get(6);
    let checkpoint_tli: Option<i32> = row.get(7);
    // A primary's current timeline is the first 8 hex digits of its WAL file name; the
    // checkpoint's timeline lags behind a promotion.
    let timeline = walfile
        .as_deref()
        .and_then(|w| w.get(..8))
        .and_then(|t| u32::from_str_radix(t, 16).ok())
        .or(received_tli.map(|t| t as u32))
        .or(checkpoint_tli.map(|t| t as u32));
    Ok(PgStatus {
        in_recovery,
        timeline,
        wal_lsn: lsn(row.get(1)),
        receive_lsn: lsn(row.get(3)),
        replay_lsn: lsn(row.get(4)),
        streaming: receiver.as_deref() == Some("streaming"),
        pending_restart: row.get(8),
        standbys: Standbys::parse(row.get::<_, &str>(9)),
        replication: if in_recovery {
            vec![]
        } else {
            c.query(REPLICATION, &[])
                .await
                .context("pg_stat_replication query failed")?
                .iter()
                .map(|r| Replication {
                    application_name: r.get(0),
                    sync_state: r.get(1),
                    flush_lsn: lsn(r.get(2)),
                })
                .collect()
        },
    })
}

/// Creates (or updates) the replication role with its password. The password is sent as
/// its SCRAM verifier, never as cleartext (issue 13 item 11), and even that statement is
/// kept out of the server log: `log_statement` and `log_min_duration_statement` are turned
/// off for its transaction alone (the agent connects as a superuser, who may).
pub async fn create_replication_role(c: &mut Client, repl: &Credentials) -> Result<()> {
    let exists = c
        .query_opt(
            "SELECT 1 FROM pg_roles WHERE rolname = $1",
            &[&repl.username],
        )
        .await?
        .is_some();
    let verb = if exists { "ALTER" } else { "CREATE" };
    // Utility statements take no bind parameters; a verifier needs no escaping, but quote it.
    let sql = format!(
        "{verb} ROLE {} WITH REPLICATION LOGIN PASSWORD {}",
        sql_ident(&repl.username),
        sql_literal(&scram_verifier(&repl.password))
    );
    let tx = c.transaction().await?;
    tx.batch_execute("SET LOCAL log_statement = 'none'; SET LOCAL log_min_duration_statement = -1")
        .await
        .context("cannot turn statement logging off for the role change")?;
    tx.batch_execute(&sql)
        .await
        .with_context(|| format!("cannot create the replication role {}", repl.username))?;
    tx.commit()
        .await
        .with_context(|| format!("cannot create the replication role {}", repl.username))?;
    tracing::info!(role = %repl.username, "replication role ready");
    Ok(())
}

pub async fn sync_slots(c: &Client, members: &[String]) -> Result<()> {
    let rows = c
        .query(
            "SELECT slot_name::text, active FROM pg_replication_slots WHERE slot_type = 'physical'",
            &[],
        )
        .await?;
    let existing: Vec<(String, bool)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    for m in members {
        if !existing.iter().any(|(n, _)| n == m) {
            c.execute("SELECT pg_create_physical_replication_slot($1, true)", &[m])
                .await
                .with_context(|| format!("cannot create replication slot {m}"))?;
            tracing::info!(slot = %m, "created replication slot for member");
        }
    }
    for (name, active) in existing {
        if !active && !members.contains(&name) {
            c.execute("SELECT pg_drop_replication_slot($1)", &[&name])
                .await
                .with_context(|| format!("cannot drop replication slot {name}"))?;
            tracing::info!(slot = %name, "dropped replication slot of a member that left");
        }
    }
    Ok(())
}

/// The LSN at which `timeline` branched off its parent, from `<timeline>.history`.
pub async fn timeline_switch(c: &Client, timeline: u32) -> Result<Option<Lsn>> {
    if timeline <= 1 {
        return Ok(None);
    }
    let path = format!("pg_wal/{timeline:08X}.history");
    let row = c
        .query_one("SELECT pg_read_file($1, 0, 1048576, true)", &[&path])
        .await
        .with_context(|| format!("cannot read {path}"))?;
    let text: Option<String> = row.get(0);
    Ok(text.as_deref().and_then(last_switch_point))
}

/// The switch point on the last line of a timeline history file
/// (`<parent tli>\t<lsn>\t<reason>`).
fn last_switch_point(history: &str) -> Option<Lsn> {
    history
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|lsn| lsn.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switch_point_is_the_last_entry() {
        let h = "1\t0/5000060\tno recovery target specified\n\n2\t0/7000110\tno recovery target specified\n";
        assert_eq!(last_switch_point(h), Some("0/7000110".parse().unwrap()));
        assert_eq!(last_switch_point(""), None);
    }
}
