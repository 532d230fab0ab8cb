//! Where each member's PostgreSQL is in the WAL and whom it streams from, asked with SQL.

use std::time::Duration;

use anyhow::{ensure, Context, Result};

use crate::member::Member;
use crate::pg::{sql, sql_batch, sql_value};
use crate::process::Paused;
use crate::wait::wait_until;

/// WAL positions are the agent's own type: the harness reads them as the agent publishes
/// them (`optime/leader`, `pgherdctl list`, log lines) and compares them with PostgreSQL's.
pub use pgherd_agent::lsn::Lsn;

async fn lsn_query(member: &Member, expr: &str) -> Result<Option<Lsn>> {
    let bytes: Option<i64> = sql_value(
        member,
        &format!("SELECT pg_wal_lsn_diff({expr}, '0/0')::bigint"),
    )
    .await?;
    Ok(bytes.map(|b| Lsn(b as u64)))
}

/// The primary's current write position (`pg_current_wal_lsn()`).
pub async fn current_wal_lsn(member: &Member) -> Result<Lsn> {
    lsn_query(member, "pg_current_wal_lsn()")
        .await?
        .with_context(|| format!("{} reports no current WAL position", member.name()))
}

/// How far a standby has replayed (`pg_last_wal_replay_lsn()`); `None` on a primary.
pub async fn replay_lsn(member: &Member) -> Result<Option<Lsn>> {
    lsn_query(member, "pg_last_wal_replay_lsn()").await
}

/// How far a standby has received and flushed WAL (`pg_last_wal_receive_lsn()`).
pub async fn receive_lsn(member: &Member) -> Result<Option<Lsn>> {
    lsn_query(member, "pg_last_wal_receive_lsn()").await
}

/// Waits until `member` has replayed at least up to `lsn`.
pub async fn wait_replayed(member: &Member, lsn: Lsn, timeout: Duration) -> Result<Lsn> {
    wait_until(
        timeout,
        format!("{} to replay up to {lsn}", member.name()),
        || async {
            let replayed = replay_lsn(member).await?;
            match replayed {
                Some(r) if r >= lsn => Ok(r),
                other => anyhow::bail!("replayed up to {other:?}"),
            }
        },
    )
    .await
}

pub async fn in_recovery(member: &Member) -> Result<bool> {
    sql_value(member, "SELECT pg_is_in_recovery()").await
}

/// The timeline `member` writes (a primary) or receives (a standby's WAL receiver).
pub async fn timeline(member: &Member) -> Result<u32> {
    if in_recovery(member).await? {
        let receiver = wal_receiver(member)
            .await?
            .with_context(|| format!("{} is a standby without a WAL receiver", member.name()))?;
        return Ok(receiver.received_tli);
    }
    let tli: i32 = sql_value(
        member,
        "SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int",
    )
    .await?;
    Ok(tli as u32)
}

/// A row of `pg_stat_wal_receiver`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalReceiver {
    pub pid: i32,
    pub status: String,
    pub received_tli: u32,
    pub sender_port: Option<i32>,
}

/// The standby's WAL receiver, if one runs.
pub async fn wal_receiver(member: &Member) -> Result<Option<WalReceiver>> {
    let rows = sql(
        member,
        "SELECT pid, status::text, received_tli, sender_port FROM pg_stat_wal_receiver",
    )
    .await?;
    Ok(rows.first().map(|r| WalReceiver {
        pid: r.get(0),
        status: r.get(1),
        received_tli: r.get::<_, i32>(2) as u32,
        sender_port: r.get(3),
    }))
}

/// Freezes `member`'s WAL receiver (SIGSTOP): it receives nothing more until the guard is
/// resumed or dropped, while its PostgreSQL and agent carry on.
pub async fn freeze_wal_receiver(member: &Member) -> Result<Paused> {
    let receiver = wal_receiver(member)
        .await?
        .with_context(|| format!("{} has no WAL receiver", member.name()))?;
    Paused::pause(receiver.pid, format!("WAL receiver of {}", member.name()))
}

/// Makes `replica` fall behind `leader`: freezes its WAL receiver, then writes a few MB on
/// the leader (a table `filler` of 5000 rows of 1000 bytes). Returns the frozen receiver's
/// guard and the leader's WAL position after the writes.
pub async fn lag_behind(leader: &Member, replica: &Member) -> Result<(Paused, Lsn)> {
    let frozen = freeze_wal_receiver(replica).await?;
    sql_batch(
        leader,
        "CREATE TABLE filler AS SELECT g, repeat('x', 1000) AS pad FROM generate_series(1, 5000) g",
    )
    .await?;
    let written = current_wal_lsn(leader).await?;
    Ok((frozen, written))
}

/// Waits until `member` streams from `upstream` on `timeline`.
pub async fn wait_streaming_from(
    member: &Member,
    upstream: &Member,
    timeline: u32,
    timeout: Duration,
) -> Result<WalReceiver> {
    wait_until(
        timeout,
        format!(
            "{} to stream from {} on timeline {timeline}",
            member.name(),
            upstream.name()
        ),
        || async {
            let receiver = wal_receiver(member)
                .await?
                .context("no WAL receiver runs")?;
            ensure!(
                receiver.status == "streaming"
                    && receiver.sender_port == Some(i32::from(upstream.pg_port()))
                    && receiver.received_tli == timeline,
                "WAL receiver: {receiver:?} (want streaming from port {})",
                upstream.pg_port()
            );
            Ok(receiver)
        },
    )
    .await
}

/// The port of the server `member`'s WAL receiver streams from (fails while it does not
/// stream).
pub async fn sender_port(member: &Member) -> Result<u16> {
    let r = wal_receiver(member)
        .await?
        .with_context(|| format!("{} has no WAL receiver", member.name()))?;
    ensure!(r.status == "streaming", "its WAL receiver is {}", r.status);
    Ok(u16::try_from(
        r.sender_port
            .context("its WAL receiver names no sender port")?,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trips_through_postgres_notation() {
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(lsn.0, 0x16_B374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert!("nonsense".parse::<Lsn>().is_err());
    }
}
