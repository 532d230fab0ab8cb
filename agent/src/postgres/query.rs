//! Queries against the local PostgreSQL.

use anyhow::{Context, Result};
use pgherd_config::Credentials;
use tokio_postgres::Client;

use super::conf::{scram_verifier, sql_ident, sql_literal};
use crate::ha::sync::{Replication, Standbys};
use crate::ha::{PgDetails, PgStatus, Sender};
use crate::lsn::Lsn;
use crate::slots::SlotRow;
use pgherd_config::SlotType;

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
       current_setting('synchronous_standby_names'),
       (SELECT latest_end_lsn FROM pg_stat_wal_receiver)::text,
       current_setting('server_version_num')::int,
       to_char(pg_postmaster_start_time() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
       CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() ELSE false END,
       to_char(pg_last_xact_replay_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')";

const REPLICATION: &str = "\
SELECT application_name, COALESCE(sync_state, 'async'), flush_lsn::text, state, usename::text,
       host(client_addr), sync_priority
  FROM pg_stat_replication";

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
    let senders: Vec<Sender> = if in_recovery {
        vec![]
    } else {
        c.query(REPLICATION, &[])
            .await
            .context("pg_stat_replication query failed")?
            .iter()
            .map(|r| Sender {
                application_name: r.get(0),
                sync_state: r.get(1),
                flush_lsn: lsn(r.get(2)),
                state: r.get::<_, Option<String>>(3).unwrap_or_default(),
                usename: r.get::<_, Option<String>>(4).unwrap_or_default(),
                client_addr: r.get(5),
                sync_priority: r.get(6),
            })
            .collect()
    };
    Ok(PgStatus {
        in_recovery,
        timeline,
        wal_lsn: lsn(row.get(1)),
        receive_lsn: lsn(row.get(3)),
        replay_lsn: lsn(row.get(4)),
        streaming: receiver.as_deref() == Some("streaming"),
        pending_restart: row.get(8),
        standbys: Standbys::parse(row.get::<_, &str>(9)),
        latest_end_lsn: lsn(row.get(10)),
        replication: senders
            .iter()
            .filter(|s| s.state == "streaming")
            .map(|s| Replication {
                application_name: s.application_name.clone(),
                sync_state: s.sync_state.clone(),
                flush_lsn: s.flush_lsn,
            })
            .collect(),
        details: PgDetails {
            server_version: row.get::<_, Option<i32>>(11).map(|v| v as u32),
            postmaster_start_time: row.get(12),
            replay_paused: row.get::<_, Option<bool>>(13).unwrap_or(false),
            replayed_timestamp: row.get(14),
            senders,
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

const SLOTS: &str = "\
SELECT s.slot_name::text, s.slot_type::text, s.database::text, s.plugin::text, s.active,
       r.application_name::text, s.restart_lsn::text, s.confirmed_flush_lsn::text,
       pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
                            ELSE pg_current_wal_lsn() END, s.restart_lsn)::float8
  FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid
 WHERE NOT s.temporary ORDER BY 1";

/// The server's replication slots (temporary ones left out).
pub async fn slots(c: &Client) -> Result<Vec<SlotRow>> {
    let rows = c
        .query(SLOTS, &[])
        .await
        .context("cannot list the replication slots")?;
    Ok(rows
        .iter()
        .map(|r| SlotRow {
            name: r.get(0),
            kind: if r.get::<_, String>(1) == "logical" {
                SlotType::Logical
            } else {
                SlotType::Physical
            },
            database: r.get(2),
            plugin: r.get(3),
            active: r.get(4),
            active_application: r.get(5),
            restart_lsn: lsn(r.get(6)),
            confirmed_flush_lsn: lsn(r.get(7)),
            retained_bytes: r.get::<_, Option<f64>>(8).map(|b| b.max(0.0) as u64),
        })
        .collect())
}

/// Creates a physical slot that reserves WAL from now on.
pub async fn create_physical_slot(c: &Client, name: &str) -> Result<()> {
    c.execute(
        "SELECT pg_create_physical_replication_slot($1, true)",
        &[&name],
    )
    .await
    .with_context(|| format!("cannot create replication slot {name}"))?;
    Ok(())
}

/// Creates a logical slot on a connection to its database; `failover` (PostgreSQL 17+)
/// lets standbys with `sync_replication_slots` keep it synchronised.
pub async fn create_logical_slot(
    c: &Client,
    name: &str,
    plugin: &str,
    failover: bool,
) -> Result<()> {
    let sql = if failover {
        "SELECT pg_create_logical_replication_slot($1, $2, false, false, true)"
    } else {
        "SELECT pg_create_logical_replication_slot($1, $2)"
    };
    c.execute(sql, &[&name, &plugin]).await.with_context(|| {
        format!("cannot create logical replication slot {name} (plugin {plugin})")
    })?;
    Ok(())
}

pub async fn drop_slot(c: &Client, name: &str) -> Result<()> {
    c.execute("SELECT pg_drop_replication_slot($1)", &[&name])
        .await
        .with_context(|| format!("cannot drop replication slot {name}"))?;
    Ok(())
}

/// Moves a slot forward to `to` (a logical slot: on a connection to its database); returns
/// where it ended.
pub async fn advance_slot(c: &Client, name: &str, to: Lsn) -> Result<Option<Lsn>> {
    let row = c
        .query_one(
            "SELECT end_lsn::text FROM pg_replication_slot_advance($1, $2::text::pg_lsn)",
            &[&name, &to.to_string()],
        )
        .await
        .with_context(|| format!("cannot advance replication slot {name} to {to}"))?;
    Ok(lsn(row.get(0)))
}

/// On the leader: the on-disk state of logical slot `slot` (`None`: no such slot).
///
/// The copy starts at the leader's position, whose catalog rows the leader's own slot
/// keeps; once the standby runs with it, `hot_standby_feedback` carries its catalog_xmin
/// to the leader's slot of that standby. A consumer that confirms far ahead in the seconds
/// between the copy and the standby's restart could let the leader vacuum catalog rows the
/// copy still needs; Patroni, which copies slots the same way, has the same window.
pub async fn logical_slot_state(c: &Client, slot: &str) -> Result<Option<Vec<u8>>> {
    let row = c
        .query_opt(
            "SELECT pg_read_binary_file('pg_replslot/' || slot_name || '/state')
               FROM pg_replication_slots
              WHERE slot_name = $1 AND slot_type = 'logical' AND NOT temporary",
            &[&slot],
        )
        .await
        .with_context(|| format!("cannot read logical slot {slot} on the leader"))?;
    Ok(row.map(|r| r.get(0)))
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
