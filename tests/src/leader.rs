//! The leader key seen from outside: which key it is (holder, revision, lease), the position
//! its holder publishes, and watching over a window that nobody, or not a given member,
//! takes it.

use std::fmt::Display;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use etcd_client::KeyValue;
use tokio::time::Instant;

use crate::cluster::Cluster;
use crate::member::Member;
use crate::replication::Lsn;
use crate::wait::hold_for;
use crate::writer::Writer;

impl Cluster {
    /// The `leader` key with its lease and revisions; an error if there is none.
    pub async fn leader_key(&self) -> Result<KeyValue> {
        self.etcd_get_kv("leader")
            .await?
            .context("there is no leader key")
    }

    /// The leader's last published WAL position (`optime/leader`), if it published one.
    pub async fn leader_optime(&self) -> Result<Option<Lsn>> {
        Ok(self
            .etcd_get("optime/leader")
            .await?
            .map(|v| v.parse())
            .transpose()?)
    }
}

/// Whether `a` and `b` are the very same leader key: the same holder, never released and
/// created again, under the same lease.
pub fn same_key(a: &KeyValue, b: &KeyValue) -> bool {
    a.value() == b.value() && a.create_revision() == b.create_revision() && a.lease() == b.lease()
}

/// Holds for `window` that nobody takes over from `dead_leader`: the leader key names nobody
/// else, and none of `probes` (writers pinned to the other members) has a write acknowledged
/// after `since`; then checks that the dead leader's key is gone, so `window` must outlast its
/// lease. `what` names the property in the error.
pub async fn hold_no_takeover(
    cluster: &Cluster,
    dead_leader: &str,
    probes: &[Writer],
    since: Instant,
    window: Duration,
    what: impl Display,
) -> Result<()> {
    hold_for(window, what, move || async move {
        if let Some(holder) = cluster.leader_name().await? {
            // The dead leader's key lives until its lease expires.
            ensure!(holder == dead_leader, "{holder} took the leader key");
        }
        for probe in probes {
            let report = probe.report();
            let late = report.acked_after(since);
            ensure!(
                late.is_empty(),
                "{} acknowledged writes {late:?}",
                report.label
            );
        }
        Ok(())
    })
    .await?;
    ensure!(
        cluster.leader_name().await?.is_none(),
        "the dead leader's key outlived its lease"
    );
    Ok(())
}

/// Holds for `window` that `member` does not hold the leader key (whoever else may). On
/// failure the error says "`member` took the leader key `when()`": `when` tells when, or
/// under which circumstances, relative to what the test did.
pub async fn hold_not_leader(
    cluster: &Cluster,
    member: &Member,
    window: Duration,
    what: impl Display,
    when: impl Fn() -> String,
) -> Result<()> {
    let when = &when;
    hold_for(window, what, move || async move {
        match cluster.leader_name().await? {
            Some(l) if l == member.name() => {
                bail!("{} took the leader key {}", member.name(), when())
            }
            _ => Ok(()),
        }
    })
    .await
}
