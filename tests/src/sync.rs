//! Synchronous replication seen from outside: the `sync` key, the leader's
//! `synchronous_standby_names` and `pg_stat_replication`, the sync role `pgherdctl list`
//! shows, dynamic config changes through `pgherdctl edit-config`, a writer whose commits go
//! through synchronous replication, and a statement run on its own connection in the
//! background, to see a commit block and unblock.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde::Deserialize;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::cluster::Cluster;
use crate::ctl::{ctl, ListedMember};
use crate::member::Member;
use crate::pg::{sql, sql_value};
use crate::wait::wait_until;
use crate::writer::Writer;

/// YAML for [`crate::ClusterBuilder::yaml`]: the cluster bootstraps with this synchronous
/// replication setup (`mode` is `off`, `on` or `quorum`).
pub fn sync_bootstrap_yaml(mode: &str, strict: bool, node_count: u32) -> String {
    format!(
        "bootstrap: {{dcs: {{synchronous_mode: \"{mode}\", synchronous_mode_strict: {strict}, \
         synchronous_node_count: {node_count}}}}}"
    )
}

/// The `sync` key: the members that may take over without losing an acknowledged commit.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SyncKey {
    pub leader: String,
    pub members: Vec<String>,
    pub quorum: u32,
}

/// The cluster's `sync` key, if it exists.
pub async fn sync_key(cluster: &Cluster) -> Result<Option<SyncKey>> {
    match cluster.etcd_get("sync").await? {
        None => Ok(None),
        Some(text) => serde_json::from_str(&text)
            .map(Some)
            .with_context(|| format!("the sync key is not {{leader, members, quorum}}: {text}")),
    }
}

/// A value of `synchronous_standby_names`, read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StandbyNames {
    /// `''`: asynchronous replication.
    None,
    /// `*`: any standby confirms; with none connected, commits wait.
    Any,
    /// `FIRST n (a, b)` (or the bare `n (a, b)` / `a, b` forms).
    First(u32, Vec<String>),
    /// `ANY q (a, b)`.
    Quorum(u32, Vec<String>),
    /// Anything this parser does not know.
    Other(String),
}

impl StandbyNames {
    pub fn parse(text: &str) -> StandbyNames {
        let t = text.trim();
        if t.is_empty() {
            return StandbyNames::None;
        }
        if t == "*" {
            return StandbyNames::Any;
        }
        let names = |list: &str| -> Vec<String> {
            let mut names: Vec<String> = list
                .split(',')
                .map(|n| n.trim().trim_matches('"').to_string())
                .filter(|n| !n.is_empty())
                .collect();
            names.sort();
            names
        };
        let Some((head, rest)) = t.split_once('(') else {
            let list = names(t);
            return StandbyNames::First(1, list);
        };
        let Some(list) = rest.trim_end().strip_suffix(')') else {
            return StandbyNames::Other(t.to_string());
        };
        let words: Vec<&str> = head.split_whitespace().collect();
        match words.as_slice() {
            [n] => n
                .parse()
                .map(|n| StandbyNames::First(n, names(list)))
                .unwrap_or_else(|_| StandbyNames::Other(t.to_string())),
            [method, n] => match (method.to_ascii_uppercase().as_str(), n.parse::<u32>()) {
                ("FIRST", Ok(n)) => StandbyNames::First(n, names(list)),
                ("ANY", Ok(n)) => StandbyNames::Quorum(n, names(list)),
                _ => StandbyNames::Other(t.to_string()),
            },
            _ => StandbyNames::Other(t.to_string()),
        }
    }

    /// The standbys listed, in name order.
    pub fn names(&self) -> &[String] {
        match self {
            StandbyNames::First(_, n) | StandbyNames::Quorum(_, n) => n,
            _ => &[],
        }
    }
}

/// `SHOW synchronous_standby_names` on `member`, parsed.
pub async fn synchronous_standby_names(member: &Member) -> Result<StandbyNames> {
    let text: String = sql_value(member, "SHOW synchronous_standby_names").await?;
    Ok(StandbyNames::parse(&text))
}

/// `(application_name, sync_state)` of every streaming standby in `member`'s
/// `pg_stat_replication`, in name order.
pub async fn replication_states(member: &Member) -> Result<Vec<(String, String)>> {
    let rows = sql(
        member,
        "SELECT application_name, sync_state FROM pg_stat_replication \
         WHERE state = 'streaming' ORDER BY application_name",
    )
    .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// `pgherdctl --config <member's config> edit-config --set k=v ... --force`.
pub async fn edit_config(member: &Member, sets: &[(&str, &str)]) -> Result<()> {
    let mut args: Vec<String> = vec!["edit-config".into()];
    for (k, v) in sets {
        args.push("--set".into());
        args.push(format!("{k}={v}"));
    }
    args.push("--force".into());
    ctl(member, &args).await.map(|_| ())
}

/// `pgherdctl list` as a table (the "Synchronous mode: ..." line is only there).
pub async fn list_table(member: &Member) -> Result<String> {
    let output = ctl(member, &["list"]).await?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The `sync_state` column of a `pgherdctl list --format json` row (`sync`, `quorum`,
/// `async`; empty for the leader), if the row has one.
pub fn listed_sync_state(m: &ListedMember) -> Option<&str> {
    m.other.get("sync_state").and_then(|v| v.as_str())
}

/// Synchronous replication in place for the current leader.
#[derive(Debug, Clone)]
pub struct Synchronous {
    pub leader: String,
    /// Every other running member, streaming, in name order.
    pub replicas: Vec<String>,
    pub key: SyncKey,
    pub standbys: StandbyNames,
    /// When the check that saw all this started: commits sent later wait for the key's
    /// members (or a quorum of them).
    pub seen_at: Instant,
}

/// Waits until the cluster is healthy and synchronous replication is in place: the `sync`
/// key names the current leader and `members` standbys; the leader's
/// `synchronous_standby_names` lists exactly those (`FIRST n` with n = `members`, or
/// `ANY q` with the key's q); and its `pg_stat_replication` reports each of them `sync`
/// (`FIRST`) or `quorum` (`ANY`).
pub async fn wait_synchronous(
    cluster: &Cluster,
    members: usize,
    timeout: Duration,
) -> Result<Synchronous> {
    let deadline = Instant::now() + timeout;
    let healthy = cluster.wait_healthy(timeout).await?;
    let remaining = deadline.saturating_duration_since(Instant::now());
    wait_until(
        remaining.max(Duration::from_secs(1)),
        format!(
            "synchronous replication to {members} standby(s) of leader {}",
            healthy.leader
        ),
        || async {
            let seen_at = Instant::now();
            let leader_name = cluster.leader_name().await?.context("no leader key")?;
            ensure!(
                leader_name == healthy.leader,
                "the leader changed from {} to {leader_name}",
                healthy.leader
            );
            let leader = cluster.member(&leader_name);
            let key = sync_key(cluster).await?.context("no sync key")?;
            ensure!(
                key.leader == leader_name,
                "the sync key was written for {}, not {leader_name}: {key:?}",
                key.leader
            );
            ensure!(
                key.members.len() == members,
                "the sync key has {} member(s), want {members}: {key:?}",
                key.members.len()
            );
            let standbys = synchronous_standby_names(leader).await?;
            let mut in_key = key.members.clone();
            in_key.sort();
            let want_state = match &standbys {
                StandbyNames::First(n, names) if *n as usize == members && *names == in_key => {
                    "sync"
                }
                StandbyNames::Quorum(q, names) if *q == key.quorum && *names == in_key => "quorum",
                other => anyhow::bail!(
                    "synchronous_standby_names on {leader_name} is {other:?}, the sync key {key:?}"
                ),
            };
            let states = replication_states(leader).await?;
            for m in &in_key {
                ensure!(
                    states.iter().any(|(n, s)| n == m && s == want_state),
                    "pg_stat_replication on {leader_name} does not show {m} as {want_state}: {states:?}"
                );
            }
            Ok(Synchronous {
                leader: leader_name,
                replicas: healthy.replicas.clone(),
                key,
                standbys,
                seen_at,
            })
        },
    )
    .await
}

/// Starts a [`Writer`] on `cluster` and waits until an insert it sent after `sync` was seen
/// is acknowledged. That insert waited for the key's members (`FIRST n`), or for q of them
/// (`ANY q`); its WAL follows every earlier commit's, so once it is acknowledged every
/// earlier acknowledged commit is there too.
pub async fn write_under_sync(
    cluster: &Cluster,
    sync: &Synchronous,
    timeout: Duration,
) -> Result<Writer> {
    let writer = Writer::start(cluster).await?;
    writer.wait_ack_sent_after(sync.seen_at, timeout).await?;
    Ok(writer)
}

/// The running members whose PostgreSQL answers and is not in recovery, in member order.
pub async fn writable_members(cluster: &Cluster) -> Vec<String> {
    let mut out = Vec::new();
    for m in cluster.members().iter().filter(|m| m.is_running()) {
        if let Ok(false) = sql_value::<bool>(m, "SELECT pg_is_in_recovery()").await {
            out.push(m.name().to_string());
        }
    }
    out
}

/// How a [`BackgroundStatement`] ended well.
#[derive(Debug, Clone)]
pub struct Returned {
    pub at: Instant,
    /// Notices and warnings PostgreSQL sent on the connection, as `SEVERITY: message`.
    pub notices: Vec<String>,
}

/// One statement on its own connection, running in a task: whether it returned, when, and
/// with which notices. A commit whose wait for synchronous standbys is cancelled (by a
/// statement timeout, say) returns success with a WARNING, so callers check the notices.
#[derive(Debug)]
pub struct BackgroundStatement {
    task: Option<JoinHandle<Result<Returned>>>,
    pub started: Instant,
}

impl BackgroundStatement {
    /// Connects to `member` as the superuser, sets `statement_timeout`, then runs
    /// `statement` in a task. Fails now if it cannot connect.
    pub async fn start(
        member: &Member,
        statement: &str,
        statement_timeout: Duration,
    ) -> Result<BackgroundStatement> {
        let pg = member.pg();
        let (client, mut connection) = tokio_postgres::Config::new()
            .host(&pg.host)
            .port(pg.port)
            .user(&pg.user)
            .password(&pg.password)
            .dbname(&pg.dbname)
            .application_name("pgherd-tests-statement")
            .connect_timeout(Duration::from_secs(5))
            .connect(NoTls)
            .await
            .with_context(|| format!("cannot connect to {}", member.name()))?;
        let notices = Arc::new(Mutex::new(Vec::new()));
        let sink = notices.clone();
        tokio::spawn(async move {
            while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                match message {
                    Ok(AsyncMessage::Notice(n)) => sink
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(format!("{}: {}", n.severity(), n.message())),
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
        client
            .batch_execute(&format!(
                "SET statement_timeout = {}",
                statement_timeout.as_millis()
            ))
            .await
            .with_context(|| format!("cannot set statement_timeout on {}", member.name()))?;
        let statement = statement.to_string();
        let name = member.name().to_string();
        let started = Instant::now();
        let task = tokio::spawn(async move {
            client
                .batch_execute(&statement)
                .await
                .with_context(|| format!("{statement:?} on {name}"))?;
            let at = Instant::now();
            let notices = notices.lock().unwrap_or_else(|e| e.into_inner()).clone();
            Ok(Returned { at, notices })
        });
        Ok(BackgroundStatement {
            task: Some(task),
            started,
        })
    }

    /// Waits at most `timeout` for the statement: `Ok(None)` if it is still running,
    /// `Ok(Some(..))` once it returned success, an error if it failed (or was already
    /// collected).
    pub async fn wait(&mut self, timeout: Duration) -> Result<Option<Returned>> {
        let task = self
            .task
            .as_mut()
            .context("the statement's outcome was already collected")?;
        match tokio::time::timeout(timeout, task).await {
            Err(_) => Ok(None),
            Ok(joined) => {
                self.task = None;
                joined.context("the statement's task panicked")?.map(Some)
            }
        }
    }
}

impl Drop for BackgroundStatement {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The `synchronous_standby_names` line of `member`'s `postgresql.conf` (what PostgreSQL
/// starts or reloads with), unquoted; `None` if the file or the line is missing.
pub fn configured_standby_names(member: &Member) -> Option<String> {
    let text = std::fs::read_to_string(member.data_dir().join("postgresql.conf")).ok()?;
    text.lines().find_map(|line| {
        let value = line
            .trim()
            .strip_prefix("synchronous_standby_names")?
            .trim_start()
            .strip_prefix('=')?
            .trim();
        let inner = value.strip_prefix('\'')?.strip_suffix('\'')?;
        Some(inner.replace("''", "'"))
    })
}

/// The pids of the `pgherd-watchdog` processes the agent `agent_pid` started.
pub fn watchdog_pids(agent_pid: u32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // The parent pid is the second field after the parenthesised command name.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            // Its program's file name, from the first argument.
            let program = cmdline.split(|b| *b == 0).next().unwrap_or_default();
            ppid == Some(agent_pid)
                && program.rsplit(|b| *b == b'/').next() == Some(b"pgherd-watchdog".as_slice())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standby_names_parse_the_forms_pgherd_and_postgres_use() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(StandbyNames::parse(""), StandbyNames::None);
        assert_eq!(StandbyNames::parse("*"), StandbyNames::Any);
        assert_eq!(
            StandbyNames::parse("FIRST 2 (\"node3\", \"node2\")"),
            StandbyNames::First(2, s(&["node2", "node3"]))
        );
        assert_eq!(
            StandbyNames::parse("ANY 1 (node2,node3)"),
            StandbyNames::Quorum(1, s(&["node2", "node3"]))
        );
        assert_eq!(
            StandbyNames::parse("node2"),
            StandbyNames::First(1, s(&["node2"]))
        );
        assert!(matches!(
            StandbyNames::parse("FIRST x (a)"),
            StandbyNames::Other(_)
        ));
    }

    #[test]
    fn bootstrap_yaml_is_valid_yaml() {
        let v: serde_yaml::Value =
            serde_yaml::from_str(&sync_bootstrap_yaml("quorum", true, 2)).unwrap();
        assert_eq!(
            v["bootstrap"]["dcs"]["synchronous_mode"],
            serde_yaml::Value::from("quorum")
        );
        assert_eq!(
            v["bootstrap"]["dcs"]["synchronous_mode_strict"],
            serde_yaml::Value::from(true)
        );
        assert_eq!(
            v["bootstrap"]["dcs"]["synchronous_node_count"],
            serde_yaml::Value::from(2)
        );
    }
}
