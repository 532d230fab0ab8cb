//! etcd: the cluster's only source of truth. Reads the cluster view, grants and renews
//! leases, and performs the transactions that create `initialize` and `leader` (the only way
//! leadership is granted), plus a watch that wakes the agent loop.

pub mod model;

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    LeaseKeepAliveStream, LeaseKeeper, PutOptions, TlsOptions, Txn, TxnOp, WatchOptions,
};
use pgherd_config::EtcdConfig;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::lsn::Lsn;
use model::{
    ClusterView, Handover, HistoryEntry, Initialize, LeaderKey, MemberInfo, RestoreKey, SyncKey,
};

#[derive(Debug, thiserror::Error)]
pub enum DcsError {
    #[error("etcd: {0}")]
    Etcd(etcd_client::Error),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot read {path}: {source}")]
    Tls {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot encode {what}: {source}")]
    Encode {
        what: String,
        source: serde_json::Error,
    },
}

// Not `#[from]`: that would also make it the error's source, and a report of the chain
// would print etcd's message twice.
impl From<etcd_client::Error> for DcsError {
    fn from(e: etcd_client::Error) -> Self {
        DcsError::Etcd(e)
    }
}

pub type Result<T> = std::result::Result<T, DcsError>;

/// A connection to etcd scoped to one cluster and one member.
#[derive(Clone)]
pub struct Dcs {
    client: Client,
    prefix: String,
    member: String,
    timeout: Duration,
}

/// Connects to etcd; the connection is lazy, so this succeeds while etcd is down.
pub async fn connect(cfg: &EtcdConfig, timeout: Duration) -> Result<Client> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(timeout)
        .with_timeout(timeout)
        .with_keep_alive(Duration::from_secs(2), timeout);
    if let (Some(user), Some(password)) = (&cfg.username, &cfg.password) {
        opts = opts.with_user(user.clone(), password.clone());
    }
    let tls_wanted = cfg.ca.is_some()
        || cfg.cert.is_some()
        || cfg.endpoints.iter().any(|e| e.starts_with("https://"));
    if tls_wanted {
        let read = |p: &std::path::PathBuf| {
            std::fs::read(p).map_err(|source| DcsError::Tls {
                path: p.display().to_string(),
                source,
            })
        };
        let mut tls = TlsOptions::new();
        if let Some(ca) = &cfg.ca {
            tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&cfg.cert, &cfg.key) {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        opts = opts.with_tls(tls);
    }
    Ok(Client::connect(&cfg.endpoints, Some(opts)).await?)
}

impl Dcs {
    pub fn new(client: Client, cluster: &str, member: &str, timeout: Duration) -> Dcs {
        Dcs {
            client,
            prefix: format!("/pgherd/{cluster}/"),
            member: member.to_string(),
            timeout,
        }
    }

    pub fn key(&self, suffix: &str) -> String {
        format!("{}{}", self.prefix, suffix)
    }

    fn member_key(&self) -> String {
        self.key(&format!("members/{}", self.member))
    }

    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    async fn timed<T, F>(&self, f: F) -> Result<T>
    where
        F: std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(DcsError::Timeout(self.timeout)),
        }
    }

    /// Reads everything under the cluster prefix at one revision.
    pub async fn load(&self) -> Result<ClusterView> {
        let mut c = self.client.clone();
        let resp = self
            .timed(c.get(self.prefix.clone(), Some(GetOptions::new().with_prefix())))
            .await?;
        let mut view = ClusterView {
            revision: resp.header().map(|h| h.revision()).unwrap_or(0),
            ..ClusterView::default()
        };
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key());
            let Some(rel) = key.strip_prefix(&self.prefix) else {
                continue;
            };
            let value = kv.value();
            match rel {
                "initialize" => {
                    view.initialize = Some(if value.is_empty() {
                        Initialize::Claimed
                    } else {
                        Initialize::SystemIdentifier(String::from_utf8_lossy(value).into_owned())
                    })
                }
                "leader" => {
                    view.leader = Some(LeaderKey {
                        name: String::from_utf8_lossy(value).into_owned(),
                        lease: kv.lease(),
                    })
                }
                "config" => {
                    view.config = Some(pgherd_config::parse_dynamic(value).map_err(|p| {
                        format!(
                            "{}config is invalid: {}",
                            self.prefix,
                            pgherd_config::Problem::list(&p)
                        )
                    }))
                }
                "switchover" => match serde_json::from_slice::<Handover>(value) {
                    Ok(h) => view.handover = Some((h, kv.mod_revision())),
                    Err(e) => {
                        tracing::warn!(key = %key, error = %e, "ignoring unreadable switchover key")
                    }
                },
                "sync" => match serde_json::from_slice::<SyncKey>(value) {
                    Ok(k) => view.sync = Some(k),
                    Err(e) => {
                        tracing::warn!(key = %key, error = %e, "ignoring unreadable sync key")
                    }
                },
                "restore" => match serde_json::from_slice::<RestoreKey>(value) {
                    Ok(k) => view.restore = Some((k, kv.mod_revision())),
                    Err(e) => {
                        tracing::warn!(key = %key, error = %e, "ignoring unreadable restore key")
                    }
                },
                "optime/leader" => {
                    view.leader_optime =
                        std::str::from_utf8(value).ok().and_then(|s| s.parse().ok())
                }
                other => {
                    if let Some(name) = other.strip_prefix("members/") {
                        match serde_json::from_slice::<MemberInfo>(value) {
                            Ok(m) => {
                                view.members.insert(name.to_string(), m);
                            }
                            Err(e) => {
                                tracing::warn!(key = %key, error = %e, "ignoring unreadable member key")
                            }
                        }
                    }
                }
            }
        }
        Ok(view)
    }

    pub async fn grant_lease(&self, ttl: Duration) -> Result<Lease> {
        let mut c = self.client.clone();
        let resp = self
            .timed(c.lease_grant(ttl.as_secs() as i64, None))
            .await?;
        Ok(Lease {
            id: resp.id(),
            ttl: Duration::from_secs(resp.ttl().max(0) as u64),
            stream: None,
            client: self.client.clone(),
            timeout: self.timeout,
        })
    }

    pub async fn revoke_lease(&self, id: i64) -> Result<()> {
        let mut c = self.client.clone();
        match self.timed(c.lease_revoke(id)).await {
            Ok(_) => Ok(()),
            // Already expired: nothing left to revoke.
            Err(DcsError::Etcd(etcd_client::Error::GRpcStatus(s)))
                if s.message().contains("lease not found") =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Claims a new cluster: creates `initialize` (empty, bound to `member_lease` so a crash
    /// during initdb frees it) and `leader` in one transaction that succeeds only if neither
    /// exists. With `system_identifier` the claim adopts an existing data directory and is
    /// permanent at once.
    pub async fn claim_cluster(
        &self,
        member_lease: i64,
        leader_lease: i64,
        system_identifier: Option<&str>,
    ) -> Result<bool> {
        let init = self.key("initialize");
        let leader = self.key("leader");
        let init_put = match system_identifier {
            Some(id) => TxnOp::put(init.clone(), id, None),
            None => TxnOp::put(
                init.clone(),
                "",
                Some(PutOptions::new().with_lease(member_lease)),
            ),
        };
        let txn = Txn::new()
            .when([
                Compare::create_revision(init, CompareOp::Equal, 0),
                Compare::create_revision(leader.clone(), CompareOp::Equal, 0),
            ])
            .and_then([
                init_put,
                TxnOp::put(
                    leader,
                    self.member.clone(),
                    Some(PutOptions::new().with_lease(leader_lease)),
                ),
            ]);
        let mut c = self.client.clone();
        Ok(self.timed(c.txn(txn)).await?.succeeded())
    }

    /// Records the system identifier of a finished initdb, replacing our claim.
    pub async fn finish_initialize(&self, system_identifier: &str) -> Result<bool> {
        let init = self.key("initialize");
        let txn = Txn::new()
            .when([Compare::value(init.clone(), CompareOp::Equal, "")])
            .and_then([TxnOp::put(init, system_identifier, None)]);
        let mut c = self.client.clone();
        Ok(self.timed(c.txn(txn)).await?.succeeded())
    }

    /// Deletes our claim on `initialize` after a failed initdb.
    pub async fn abandon_initialize(&self) -> Result<()> {
        let init = self.key("initialize");
        let txn = Txn::new()
            .when([Compare::value(init.clone(), CompareOp::Equal, "")])
            .and_then([TxnOp::delete(init, None)]);
        let mut c = self.client.clone();
        self.timed(c.txn(txn)).await?;
        Ok(())
    }

    /// Stores the dynamic config unless one exists (etcd wins over the file afterwards).
    pub async fn seed_config(&self, json: &str) -> Result<bool> {
        let key = self.key("config");
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, json, None)]);
        let mut c = self.client.clone();
        Ok(self.timed(c.txn(txn)).await?.succeeded())
    }

    /// Takes the leader key if nobody holds it (ARCHITECTURE: the only way to become
    /// leader), or if it still names this member from a previous run of the agent.
    pub async fn acquire_leader(&self, leader_lease: i64) -> Result<bool> {
        let key = self.key("leader");
        let put = TxnOp::put(
            key.clone(),
            self.member.clone(),
            Some(PutOptions::new().with_lease(leader_lease)),
        );
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([put.clone()])
            .or_else([TxnOp::txn(
                Txn::new()
                    .when([Compare::value(key, CompareOp::Equal, self.member.clone())])
                    .and_then([put]),
            )]);
        let mut c = self.client.clone();
        let resp = self.timed(c.txn(txn)).await?;
        if resp.succeeded() {
            return Ok(true);
        }
        // The nested transaction's outcome tells whether the key named us.
        Ok(resp.op_responses().iter().any(|op| match op {
            etcd_client::TxnOpResponse::Txn(t) => t.succeeded(),
            _ => false,
        }))
    }

    /// Whether the leader key still names this member under `lease`.
    pub async fn leader_is_mine(&self, lease: i64) -> Result<bool> {
        let mut c = self.client.clone();
        let resp = self.timed(c.get(self.key("leader"), None)).await?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| kv.value() == self.member.as_bytes() && kv.lease() == lease)
            .unwrap_or(false))
    }

    /// Deletes the leader key if it names this member.
    pub async fn release_leader(&self) -> Result<bool> {
        let key = self.key("leader");
        let txn = Txn::new()
            .when([Compare::value(
                key.clone(),
                CompareOp::Equal,
                self.member.clone(),
            )])
            .and_then([TxnOp::delete(key, None)]);
        let mut c = self.client.clone();
        Ok(self.timed(c.txn(txn)).await?.succeeded())
    }

    pub async fn put_member(&self, info: &MemberInfo, lease: i64) -> Result<()> {
        let json = serde_json::to_string(info).map_err(|source| DcsError::Encode {
            what: "member".into(),
            source,
        })?;
        let mut c = self.client.clone();
        self.timed(c.put(
            self.member_key(),
            json,
            Some(PutOptions::new().with_lease(lease)),
        ))
        .await?;
        Ok(())
    }

    pub async fn delete_member(&self) -> Result<()> {
        let mut c = self.client.clone();
        self.timed(c.delete(self.member_key(), None)).await?;
        Ok(())
    }

    pub async fn put_optime(&self, lsn: Lsn) -> Result<()> {
        let mut c = self.client.clone();
        self.timed(c.put(self.key("optime/leader"), lsn.to_string(), None))
            .await?;
        Ok(())
    }

    /// Writes the sync key, only while the leader key still names this member.
    pub async fn put_sync(&self, key: &SyncKey) -> Result<bool> {
        let json = serde_json::to_string(key).map_err(|source| DcsError::Encode {
            what: "sync".into(),
            source,
        })?;
        let txn = Txn::new()
            .when([Compare::value(
                self.key("leader"),
                CompareOp::Equal,
                self.member.clone(),
            )])
            .and_then([TxnOp::put(self.key("sync"), json, None)]);
        let mut c = self.client.clone();
        Ok(self.timed(c.txn(txn)).await?.succeeded())
    }

    /// Writes the restore key while the leader key names this member and the restore key is
    /// still at `revision` (0: absent).
    pub async fn put_restore(&self, key: &RestoreKey, revision: i64) -> Result<bool> {
        let json = serde_json::to_string(key).map_err(|source| DcsError::Encode {
            what: "restore".into(),
            source,
        })?;
        let txn = Txn::new()
            .when([
                Compare::value(self.key("leader"), CompareOp::Equal, self.member.clone()),
                Compare::mod_revision(self.key("restore"), CompareOp::Equal, revision),
            ])
            .and_then([TxnOp::put(self.key("restore"), json, None)]);
        let mut c = self.client.clone();
        Ok(self.timed(c.txn(txn)).await?.succeeded())
    }

    /// Records a switchover or failover request unless one is pending.
    pub async fn create_handover(&self, h: &Handover) -> Result<bool> {
        let key = self.key("switchover");
        let json = serde_json::to_string(h).map_err(|source| DcsError::Encode {
            what: "switchover".into(),
            source,
        })?;
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, json, None)]);
        let mut c = self.client.clone();
        Ok(self.timed(c.txn(txn)).await?.succeeded())
    }

    /// Replaces the switchover key if it is still at `revision`.
    pub async fn update_handover(&self, h: &Handover, revision: i64) -> Result<bool> {
        let key = self.key("switchover");
        let json = serde_json::to_string(h).map_err(|source| DcsError::Encode {
            what: "switchover".into(),
            source,
        })?;
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                revision,
            )])
            .and_then([TxnOp::put(key, json, None)]);
        let mut c = self.client.clone();
        Ok(self.timed(c.txn(txn)).await?.succeeded())
    }

    /// Deletes the switchover key if it is still at `revision` (any revision if `None`).
    pub async fn delete_handover(&self, revision: Option<i64>) -> Result<bool> {
        let key = self.key("switchover");
        let mut c = self.client.clone();
        match revision {
            None => {
                let resp = self.timed(c.delete(key, None)).await?;
                Ok(resp.deleted() > 0)
            }
            Some(rev) => {
                let txn = Txn::new()
                    .when([Compare::mod_revision(key.clone(), CompareOp::Equal, rev)])
                    .and_then([TxnOp::delete(key, None)]);
                Ok(self.timed(c.txn(txn)).await?.succeeded())
            }
        }
    }

    /// The stored dynamic config as JSON text, with its revision (0 when absent).
    pub async fn config_with_revision(&self) -> Result<(Option<String>, i64)> {
        let mut c = self.client.clone();
        let resp = self.timed(c.get(self.key("config"), None)).await?;
        Ok(match resp.kvs().first() {
            Some(kv) => (
                Some(String::from_utf8_lossy(kv.value()).into_owned()),
                kv.mod_revision(),
            ),
            None => (None, 0),
        })
    }

    /// Stores a new dynamic config if the stored one is still at `revision` (0: absent).
    pub async fn replace_config(&self, json: &str, revision: i64) -> Result<bool> {
        let key = self.key("config");
        let cmp = if revision == 0 {
            Compare::create_revision(key.clone(), CompareOp::Equal, 0)
        } else {
            Compare::mod_revision(key.clone(), CompareOp::Equal, revision)
        };
        let txn = Txn::new()
            .when([cmp])
            .and_then([TxnOp::put(key, json, None)]);
        let mut c = self.client.clone();
        Ok(self.timed(c.txn(txn)).await?.succeeded())
    }

    /// The failover history, oldest first.
    pub async fn history(&self) -> Result<Vec<HistoryEntry>> {
        Ok(self.history_with_revision().await?.0)
    }

    async fn history_with_revision(&self) -> Result<(Vec<HistoryEntry>, i64)> {
        let mut c = self.client.clone();
        let resp = self.timed(c.get(self.key("history"), None)).await?;
        match resp.kvs().first() {
            None => Ok((Vec::new(), 0)),
            Some(kv) => {
                let entries = serde_json::from_slice(kv.value()).unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "the history key is unreadable; starting it afresh");
                    Vec::new()
                });
                Ok((entries, kv.mod_revision()))
            }
        }
    }

    /// Appends to `history` with a compare-and-swap on its revision (retried on conflict).
    pub async fn append_history(&self, entry: HistoryEntry) -> Result<()> {
        let key = self.key("history");
        for _ in 0..5 {
            let (mut entries, revision) = self.history_with_revision().await?;
            entries.push(entry.clone());
            let json = serde_json::to_string(&entries).map_err(|source| DcsError::Encode {
                what: "history".into(),
                source,
            })?;
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    revision,
                )])
                .and_then([TxnOp::put(key.clone(), json, None)]);
            let mut c = self.client.clone();
            if self.timed(c.txn(txn)).await?.succeeded() {
                return Ok(());
            }
        }
        Err(DcsError::Etcd(etcd_client::Error::InvalidArgs(
            "the history key kept changing under us".into(),
        )))
    }

    /// Watches the cluster prefix and wakes `wake` on every change that is not this member's
    /// own bookkeeping. Reconnects by itself; ends when the returned task is aborted.
    pub fn spawn_watch(&self, wake: Arc<Notify>) -> tokio::task::JoinHandle<()> {
        let dcs = self.clone();
        tokio::spawn(async move {
            let own = [dcs.member_key(), dcs.key("optime/leader")];
            loop {
                let mut c = dcs.client.clone();
                match c
                    .watch(dcs.prefix.clone(), Some(WatchOptions::new().with_prefix()))
                    .await
                {
                    Ok(mut stream) => loop {
                        match stream.message().await {
                            Ok(Some(resp)) => {
                                let relevant = resp.events().iter().any(|ev| {
                                    let key = ev
                                        .kv()
                                        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
                                        .unwrap_or_default();
                                    // Deletions of anything matter (a lost leader key must be
                                    // acted on at once); our own puts do not.
                                    ev.event_type() == EventType::Delete || !own.contains(&key)
                                });
                                if relevant {
                                    wake.notify_one();
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                tracing::debug!(error = %e, "etcd watch broke; reconnecting");
                                break;
                            }
                        }
                    },
                    Err(e) => tracing::debug!(error = %e, "cannot watch etcd; retrying"),
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    }
}

/// An etcd lease this member keeps alive.
pub struct Lease {
    pub id: i64,
    pub ttl: Duration,
    stream: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    client: Client,
    timeout: Duration,
}

impl Lease {
    /// Renews the lease once. Returns the instant the renewal was *sent* (ARCHITECTURE rule 2
    /// measures from it), or `Ok(None)` when etcd says the lease has already expired.
    pub async fn refresh(&mut self) -> Result<Option<Instant>> {
        let timeout = self.timeout;
        let sent = Instant::now();
        let outcome = tokio::time::timeout(timeout, async {
            if self.stream.is_none() {
                let mut c = self.client.clone();
                self.stream = Some(c.lease_keep_alive(self.id).await?);
            }
            let (keeper, stream) = self.stream.as_mut().expect("stream was set just above");
            keeper.keep_alive().await?;
            stream.message().await
        })
        .await;
        match outcome {
            Ok(Ok(Some(resp))) if resp.ttl() > 0 => Ok(Some(sent)),
            Ok(Ok(Some(_))) => Ok(None),
            // Reopening the keep-alive stream of an expired lease fails with "lease not
            // found" rather than answering TTL 0: the lease is gone all the same.
            Ok(Err(etcd_client::Error::LeaseKeepAliveError(msg))) if msg.contains("not found") => {
                self.stream = None;
                Ok(None)
            }
            Ok(Ok(None)) => {
                self.stream = None;
                Err(DcsError::Etcd(etcd_client::Error::InvalidArgs(
                    "lease keep-alive stream closed".into(),
                )))
            }
            Ok(Err(e)) => {
                self.stream = None;
                Err(e.into())
            }
            Err(_) => {
                self.stream = None;
                Err(DcsError::Timeout(timeout))
            }
        }
    }
}
