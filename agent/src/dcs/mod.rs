//! etcd: the cluster's only source of truth. Reads the cluster view, grants and renews
//! leases, and performs the transactions that create `initialize` and `leader` (the only way
//! leadership is granted), plus a watch that wakes the agent loop.

pub mod model;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    LeaseKeepAliveStream, LeaseKeeper, PutOptions, TlsOptions, Txn, TxnOp, WatchOptions,
};
use pgherd_config::{DynamicConfig, EtcdConfig};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::lsn::Lsn;
use model::{
    ClusterView, Handover, HistoryEntry, Initialize, LeaderKey, MemberInfo, RestoreKey, SlotsKey,
    SyncKey,
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
    #[error("{key} is unreadable ({why}); not overwriting it: repair or delete it")]
    Unreadable { key: String, why: String },
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
    memo: Arc<Mutex<Memo>>,
}

/// What `load` keeps between reads (shared by the clones of a `Dcs`): the last valid dynamic
/// config, which an unreadable one never replaces, and the value problems already logged, so
/// each is logged once rather than every loop.
#[derive(Default)]
struct Memo {
    last_config: Option<DynamicConfig>,
    /// Key -> the problem last logged for it; a key that reads cleanly again is forgotten.
    reported: HashMap<String, String>,
}

/// Parses a JSON value read from etcd, ignoring fields this version does not know (they are
/// added to `ignored`) and recording a value that cannot be read in `view.unreadable`.
fn read_value<T: DeserializeOwned>(
    view: &mut ClusterView,
    ignored: &mut BTreeMap<String, Vec<String>>,
    rel: &str,
    value: &[u8],
) -> Option<T> {
    match pgherd_config::lenient::from_json::<T>(value) {
        Ok(parsed) => {
            if !parsed.ignored.is_empty() {
                ignored.insert(rel.to_string(), parsed.ignored);
            }
            Some(parsed.value)
        }
        Err(problem) => {
            view.unreadable.insert(rel.to_string(), problem.to_string());
            None
        }
    }
}

/// The `history` value with `entry` appended. Stored entries stay as they are, with fields a
/// newer agent added; a stored value that is not readable history is an error (why).
fn appended_history(
    stored: Option<&[u8]>,
    entry: &serde_json::Value,
) -> std::result::Result<String, String> {
    let mut entries = match stored {
        None => Vec::new(),
        Some(raw) => {
            pgherd_config::lenient::from_json::<Vec<HistoryEntry>>(raw)
                .map_err(|p| p.to_string())?;
            match serde_json::from_slice(raw) {
                Ok(serde_json::Value::Array(entries)) => entries,
                _ => return Err("not a JSON array".into()),
            }
        }
    };
    entries.push(entry.clone());
    Ok(serde_json::Value::Array(entries).to_string())
}

/// What an unreadable key means for this member, for its ERROR line.
fn unreadable_consequence(rel: &str, have_config: bool) -> &'static str {
    match rel {
        "config" if have_config => {
            "the dynamic config in etcd is unreadable: keeping the last valid one until it is fixed"
        }
        "config" => {
            "the dynamic config in etcd is unreadable and none was read since this agent started: using the file's bootstrap.dcs and not racing for the leader key until it is fixed"
        }
        "sync" | "optime/leader" => {
            "unreadable: no member races for a vacant leader key until it is fixed or deleted"
        }
        "initialize" => {
            "unreadable: no member races for a vacant leader key and none checks its data directory against it until the leader's system identifier is put back"
        }
        "history" => "unreadable: no entry is appended until it is fixed",
        "slots" => {
            "unreadable: the leader creates member and permanent slots but drops and advances none, and does not overwrite it, until it is fixed or deleted"
        }
        "failsafe" => {
            "unreadable: while failsafe_mode is on no member races for a vacant leader key and the leader does not stay writable without etcd until its leader writes it again"
        }
        r if r.starts_with("members/") => {
            "unreadable: the member is left out (if it leads, the others cannot follow it)"
        }
        _ => "unreadable: ignoring it",
    }
}

/// Connects to etcd; the connection is lazy, so this succeeds while etcd is down.
pub async fn connect(cfg: &EtcdConfig, timeout: Duration) -> Result<Client> {
    crate::install_crypto_provider();
    // Once per process: the watchdog and pgherdctl connect again, the agent only at start.
    static CLEAR_TEXT_WARNED: std::sync::Once = std::sync::Once::new();
    if let Some(why) = pgherd_config::tls::etcd_credentials_in_clear(cfg) {
        CLEAR_TEXT_WARNED.call_once(|| tracing::warn!("{why}"));
    }
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
            memo: Arc::default(),
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
        let mut ignored = BTreeMap::new();
        // Parameters of the dynamic config this member refuses from etcd (issue 13 item 7).
        let mut refused = Vec::new();
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key());
            let Some(rel) = key.strip_prefix(&self.prefix) else {
                continue;
            };
            let value = kv.value();
            match rel {
                "initialize" => {
                    let init = Initialize::parse(value);
                    if let Initialize::Unreadable(why) = &init {
                        view.unreadable.insert(rel.to_string(), why.clone());
                    }
                    view.initialize = Some(init);
                }
                "leader" => {
                    view.leader = Some(LeaderKey {
                        name: String::from_utf8_lossy(value).into_owned(),
                        lease: kv.lease(),
                    })
                }
                "config" => match pgherd_config::lenient::dynamic(value) {
                    Ok(parsed) => {
                        if !parsed.ignored.is_empty() {
                            ignored.insert(rel.to_string(), parsed.ignored);
                        }
                        refused = parsed.refused;
                        view.config = Some(Ok(parsed.value));
                    }
                    Err(problems) => {
                        let why = problems
                            .iter()
                            .map(|p| p.to_string())
                            .collect::<Vec<_>>()
                            .join("; ");
                        view.unreadable.insert(rel.to_string(), why);
                    }
                },
                "switchover" => {
                    if let Some(h) = read_value::<Handover>(&mut view, &mut ignored, rel, value) {
                        view.handover = Some((h, kv.mod_revision()));
                    }
                }
                "sync" => view.sync = read_value(&mut view, &mut ignored, rel, value),
                "slots" => view.slots = read_value(&mut view, &mut ignored, rel, value),
                "failsafe" => view.failsafe = read_value(&mut view, &mut ignored, rel, value),
                "restore" => {
                    if let Some(r) = read_value::<RestoreKey>(&mut view, &mut ignored, rel, value) {
                        view.restore = Some((r, kv.mod_revision()));
                    }
                }
                "optime/leader" => {
                    match std::str::from_utf8(value).ok().and_then(|s| s.parse().ok()) {
                        Some(lsn) => view.leader_optime = Some(lsn),
                        None => {
                            view.unreadable.insert(
                                rel.to_string(),
                                format!(
                                    "{:?} is not an LSN",
                                    String::from_utf8_lossy(&value[..value.len().min(64)])
                                ),
                            );
                        }
                    }
                }
                other => {
                    if let Some(name) = other.strip_prefix("members/") {
                        if let Some(m) =
                            read_value::<MemberInfo>(&mut view, &mut ignored, rel, value)
                        {
                            view.members.insert(name.to_string(), m);
                        }
                    }
                }
            }
        }
        self.settle(&mut view, &ignored, &refused);
        Ok(view)
    }

    /// Keeps the last valid dynamic config in place of an unreadable one, and logs each new
    /// value problem once: unknown fields at WARN, unreadable values at ERROR.
    fn settle(
        &self,
        view: &mut ClusterView,
        ignored: &BTreeMap<String, Vec<String>>,
        refused: &[pgherd_config::Problem],
    ) {
        let mut memo = self.memo.lock().expect("the dcs memo is never poisoned");
        match (&view.config, view.unreadable.get("config")) {
            (Some(Ok(c)), _) => memo.last_config = Some(c.clone()),
            (None, Some(why)) => {
                view.config = Some(match &memo.last_config {
                    Some(c) => Ok(c.clone()),
                    None => Err(format!("{}config is unreadable: {why}", self.prefix)),
                })
            }
            // The key is gone from an initialised cluster (deleted by hand): the file's
            // bootstrap.dcs would silently replace it, and a cluster demoted to a standby
            // cluster, whose file has no standby_cluster, would promote (found by review).
            // Keep the last one read, as for an unreadable key.
            (None, None)
                if matches!(
                    view.initialize,
                    Some(model::Initialize::SystemIdentifier(_))
                ) =>
            {
                if let Some(c) = &memo.last_config {
                    view.config = Some(Ok(c.clone()));
                    view.unreadable.insert(
                        "config".to_string(),
                        "the key is missing; `pgherdctl edit-config` writes it again".to_string(),
                    );
                }
            }
            _ => {}
        }
        let have_config = memo.last_config.is_some();
        let mut now = HashMap::new();
        for (rel, why) in &view.unreadable {
            let key = self.key(rel);
            if memo.reported.get(rel) != Some(why) {
                tracing::error!(key = %key, error = %why, "{}", unreadable_consequence(rel, have_config));
            }
            now.insert(rel.clone(), why.clone());
        }
        for (rel, fields) in ignored {
            let fields = fields.join(", ");
            let key = self.key(rel);
            if memo.reported.get(rel) != Some(&fields) {
                tracing::warn!(key = %key, fields = %fields, "ignoring fields this version does not know (written by a newer agent?)");
            }
            now.insert(rel.clone(), fields);
        }
        if !refused.is_empty() {
            let what = refused
                .iter()
                .map(|p| p.path.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            let rel = "config (refused parameters)";
            if memo.reported.get(rel) != Some(&what) {
                tracing::error!(
                    key = %self.key("config"),
                    parameters = %what,
                    "ignoring parameters of the dynamic config that run programs or load code: pgherd takes them only from a member's own file (postgres.parameters); the rest of the config applies"
                );
            }
            now.insert(rel.to_string(), what);
        }
        memo.reported = now;
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

    /// Records the system identifier of a finished initdb, replacing our claim. Also `true`
    /// when the key already holds that identifier: an earlier attempt whose answer was lost
    /// may have written it, and the retry must not fail forever.
    pub async fn finish_initialize(&self, system_identifier: &str) -> Result<bool> {
        let init = self.key("initialize");
        let txn = Txn::new()
            .when([Compare::value(init.clone(), CompareOp::Equal, "")])
            .and_then([TxnOp::put(init.clone(), system_identifier, None)])
            .or_else([TxnOp::get(init, None)]);
        let mut c = self.client.clone();
        let resp = self.timed(c.txn(txn)).await?;
        if resp.succeeded() {
            return Ok(true);
        }
        Ok(resp.op_responses().iter().any(|op| match op {
            etcd_client::TxnOpResponse::Get(g) => g
                .kvs()
                .first()
                .is_some_and(|kv| kv.value() == system_identifier.as_bytes()),
            _ => false,
        }))
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

    /// Takes the leader key if nobody holds it (docs/architecture.md: the only way to become
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

    /// Takes the vacant leader key while a released switchover is pending, recording this
    /// member as its taker in the `switchover` key in the same transaction (only if that key
    /// is still at `revision`). Once the key is marked, the old leader never takes the key
    /// back: whoever took it may have promoted and acknowledged writes (rule 7).
    pub async fn acquire_leader_marking_handover(
        &self,
        leader_lease: i64,
        handover: &Handover,
        revision: i64,
    ) -> Result<bool> {
        let key = self.key("leader");
        let marked = Handover {
            taken_by: Some(self.member.clone()),
            ..handover.clone()
        };
        let json = serde_json::to_string(&marked).map_err(|source| DcsError::Encode {
            what: "switchover".into(),
            source,
        })?;
        let put = TxnOp::put(
            key.clone(),
            self.member.clone(),
            Some(PutOptions::new().with_lease(leader_lease)),
        );
        let txn = Txn::new()
            .when([
                Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                Compare::mod_revision(self.key("switchover"), CompareOp::Equal, revision),
            ])
            .and_then([put, TxnOp::put(self.key("switchover"), json, None)]);
        let mut c = self.client.clone();
        Ok(self.timed(c.txn(txn)).await?.succeeded())
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

    /// Publishes this member's scheduled restart (`restarts/<member>`, JSON) under its
    /// member lease, so it goes when the agent does (the agent keeps it in memory only).
    /// Agents that do not know the key ignore it.
    pub async fn put_scheduled_restart(&self, json: &str, lease: i64) -> Result<()> {
        let mut c = self.client.clone();
        self.timed(c.put(
            self.key(&format!("restarts/{}", self.member)),
            json,
            Some(PutOptions::new().with_lease(lease)),
        ))
        .await?;
        Ok(())
    }

    pub async fn delete_scheduled_restart(&self) -> Result<()> {
        let mut c = self.client.clone();
        self.timed(c.delete(self.key(&format!("restarts/{}", self.member)), None))
            .await?;
        Ok(())
    }

    /// Every member's published scheduled restart, by member name (a value that is not JSON
    /// is shown as its text).
    pub async fn scheduled_restarts(&self) -> Result<BTreeMap<String, serde_json::Value>> {
        let mut c = self.client.clone();
        let prefix = self.key("restarts/");
        let resp = self
            .timed(c.get(prefix.clone(), Some(GetOptions::new().with_prefix())))
            .await?;
        Ok(resp
            .kvs()
            .iter()
            .filter_map(|kv| {
                let key = String::from_utf8_lossy(kv.key());
                let name = key.strip_prefix(prefix.as_str())?.to_string();
                let value = serde_json::from_slice(kv.value()).unwrap_or_else(|_| {
                    serde_json::Value::String(String::from_utf8_lossy(kv.value()).into_owned())
                });
                Some((name, value))
            })
            .collect())
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

    /// Runs `op` only while the leader key still names this member; says whether it ran.
    async fn as_leader(&self, op: TxnOp) -> Result<bool> {
        let txn = Txn::new()
            .when([Compare::value(
                self.key("leader"),
                CompareOp::Equal,
                self.member.clone(),
            )])
            .and_then([op]);
        let mut c = self.client.clone();
        Ok(self.timed(c.txn(txn)).await?.succeeded())
    }

    /// `value` as JSON, for key `what`.
    fn encode<T: serde::Serialize>(what: &str, value: &T) -> Result<String> {
        serde_json::to_string(value).map_err(|source| DcsError::Encode {
            what: what.into(),
            source,
        })
    }

    /// Writes the sync key, only while the leader key still names this member.
    pub async fn put_sync(&self, key: &SyncKey) -> Result<bool> {
        let json = Self::encode("sync", key)?;
        self.as_leader(TxnOp::put(self.key("sync"), json, None))
            .await
    }

    /// Writes the `demoted` key, only while the leader key still names this member.
    pub async fn put_demoted(&self, key: &model::DemotedKey) -> Result<bool> {
        let json = Self::encode("demoted", key)?;
        self.as_leader(TxnOp::put(self.key("demoted"), json, None))
            .await
    }

    /// The `demoted` key and its revision (for waiting on a newer one), if it exists.
    pub async fn demoted(&self) -> Result<Option<(model::DemotedKey, i64)>> {
        let mut c = self.client.clone();
        let resp = self.timed(c.get(self.key("demoted"), None)).await?;
        let Some(kv) = resp.kvs().first() else {
            return Ok(None);
        };
        let parsed =
            pgherd_config::lenient::from_json::<model::DemotedKey>(kv.value()).map_err(|p| {
                DcsError::Unreadable {
                    key: self.key("demoted"),
                    why: p.to_string(),
                }
            })?;
        Ok(Some((parsed.value, kv.mod_revision())))
    }

    /// Writes the `slots` key, only while the leader key still names this member.
    pub async fn put_slots(&self, key: &SlotsKey) -> Result<bool> {
        let json = Self::encode("slots", key)?;
        self.as_leader(TxnOp::put(self.key("slots"), json, None))
            .await
    }

    /// The `upgrade` key and its revision, if it exists.
    pub async fn upgrade(&self) -> Result<Option<(model::UpgradeKey, i64)>> {
        let mut c = self.client.clone();
        let resp = self.timed(c.get(self.key("upgrade"), None)).await?;
        let Some(kv) = resp.kvs().first() else {
            return Ok(None);
        };
        let parsed =
            pgherd_config::lenient::from_json::<model::UpgradeKey>(kv.value()).map_err(|p| {
                DcsError::Unreadable {
                    key: self.key("upgrade"),
                    why: p.to_string(),
                }
            })?;
        Ok(Some((parsed.value, kv.mod_revision())))
    }

    /// Writes the `upgrade` key while the leader key names this member and the key is still
    /// at `revision` (0: absent); the key's new revision when it was written (the
    /// transaction's, whose only write it is), `None` when a condition failed.
    pub async fn put_upgrade(&self, key: &model::UpgradeKey, revision: i64) -> Result<Option<i64>> {
        let json = Self::encode("upgrade", key)?;
        let txn = Txn::new()
            .when([
                Compare::value(self.key("leader"), CompareOp::Equal, self.member.clone()),
                Compare::mod_revision(self.key("upgrade"), CompareOp::Equal, revision),
            ])
            .and_then([TxnOp::put(self.key("upgrade"), json, None)]);
        let mut c = self.client.clone();
        let resp = self.timed(c.txn(txn)).await?;
        Ok(resp
            .succeeded()
            .then(|| resp.header().map_or(0, |h| h.revision())))
    }

    /// Replaces the system identifier in `initialize` (a major-version upgrade made a new
    /// database system of the old one's data), only while it still holds `old` and the
    /// leader key names this member.
    pub async fn replace_system_identifier(&self, old: &str, new: &str) -> Result<bool> {
        let init = self.key("initialize");
        let txn = Txn::new()
            .when([
                Compare::value(init.clone(), CompareOp::Equal, old),
                Compare::value(self.key("leader"), CompareOp::Equal, self.member.clone()),
            ])
            .and_then([TxnOp::put(init, new, None)]);
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

    /// Deletes every key of the cluster (`pgherdctl remove`) in one transaction, only while
    /// no member key and no leader key exists: a live agent keeps its member key under its
    /// lease, so nothing is deleted under a running agent. `Ok(Err(names))`: the members
    /// whose keys stand (nothing deleted); `Ok(Ok(n))`: `n` keys deleted.
    pub async fn remove_cluster(&self) -> Result<std::result::Result<i64, Vec<String>>> {
        let members = self.key("members/");
        let txn = Txn::new()
            .when([
                Compare::version(members.clone(), CompareOp::Equal, 0).with_prefix(),
                Compare::version(self.key("leader"), CompareOp::Equal, 0),
            ])
            .and_then([TxnOp::delete(
                self.prefix.clone(),
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            )])
            .or_else([
                TxnOp::get(
                    members.clone(),
                    Some(GetOptions::new().with_prefix().with_keys_only()),
                ),
                TxnOp::get(self.key("leader"), None),
            ]);
        let mut c = self.client.clone();
        let resp = self.timed(c.txn(txn)).await?;
        let mut deleted = 0;
        let mut alive = Vec::new();
        for op in resp.op_responses() {
            match op {
                etcd_client::TxnOpResponse::Delete(d) => deleted += d.deleted(),
                etcd_client::TxnOpResponse::Get(g) => {
                    for kv in g.kvs() {
                        let key = String::from_utf8_lossy(kv.key());
                        match key.strip_prefix(members.as_str()) {
                            Some(name) => alive.push(name.to_string()),
                            None => alive.push(format!(
                                "{} (leader key)",
                                String::from_utf8_lossy(kv.value())
                            )),
                        }
                    }
                }
                _ => {}
            }
        }
        if resp.succeeded() {
            Ok(Ok(deleted))
        } else {
            alive.dedup();
            Ok(Err(alive))
        }
    }

    /// Every key under the cluster's prefix (`pgherdctl remove` shows how many it deletes).
    pub async fn count_keys(&self) -> Result<i64> {
        let mut c = self.client.clone();
        let resp = self
            .timed(c.get(
                self.prefix.clone(),
                Some(GetOptions::new().with_prefix().with_count_only()),
            ))
            .await?;
        Ok(resp.count())
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

    /// The failover history, oldest first (fields this version does not know are dropped).
    pub async fn history(&self) -> Result<Vec<HistoryEntry>> {
        let (raw, _) = self.history_with_revision().await?;
        let Some(raw) = raw else {
            return Ok(Vec::new());
        };
        pgherd_config::lenient::from_json::<Vec<HistoryEntry>>(&raw)
            .map(|parsed| parsed.value)
            .map_err(|p| DcsError::Unreadable {
                key: self.key("history"),
                why: p.to_string(),
            })
    }

    /// The raw `history` value (`None`: absent) and its revision (0 when absent).
    async fn history_with_revision(&self) -> Result<(Option<Vec<u8>>, i64)> {
        let mut c = self.client.clone();
        let resp = self.timed(c.get(self.key("history"), None)).await?;
        Ok(match resp.kvs().first() {
            None => (None, 0),
            Some(kv) => (Some(kv.value().to_vec()), kv.mod_revision()),
        })
    }

    /// Appends to `history` with a compare-and-swap on its revision (retried on conflict).
    /// Entries a newer agent wrote keep their fields; an unreadable `history` is never
    /// replaced (it is the only record of past timelines): the append fails and says so.
    pub async fn append_history(&self, entry: HistoryEntry) -> Result<()> {
        let key = self.key("history");
        let new = serde_json::to_value(&entry).map_err(|source| DcsError::Encode {
            what: "history".into(),
            source,
        })?;
        for _ in 0..5 {
            let (raw, revision) = self.history_with_revision().await?;
            let json = appended_history(raw.as_deref(), &new).map_err(|why| {
                tracing::error!(key = %key, error = %why, "the history key is unreadable: not appending to it (repair or delete it)");
                DcsError::Unreadable {
                    key: key.clone(),
                    why,
                }
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

/// Failsafe mode (issue 15 item 4): the `failsafe` key and the quick look at the leader key
/// a member takes before it accepts a leader that lost etcd.
impl Dcs {
    /// Writes the `failsafe` key (`None`: deletes it), only while the leader key still names
    /// this member; false when it does not.
    pub async fn put_failsafe(&self, key: Option<&model::FailsafeKey>) -> Result<bool> {
        let op = match key {
            Some(k) => TxnOp::put(self.key("failsafe"), Self::encode("failsafe", k)?, None),
            None => TxnOp::delete(self.key("failsafe"), None),
        };
        self.as_leader(op).await
    }

    /// Who the leader key names, asked now and bounded by `within` (not the loop's timeout):
    /// `Ok(None)` when it is vacant, an error when etcd does not answer in time.
    pub async fn leader_now(&self, within: Duration) -> Result<Option<String>> {
        let mut c = self.client.clone();
        let resp = match tokio::time::timeout(within, c.get(self.key("leader"), None)).await {
            Ok(r) => r?,
            Err(_) => return Err(DcsError::Timeout(within)),
        };
        Ok(resp
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
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
    /// Renews the lease once. Returns the instant the renewal was *sent* (rule 2 of
    /// docs/architecture.md measures from it), or `Ok(None)` when etcd says the lease has already
    /// expired.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(timeline: u32) -> serde_json::Value {
        serde_json::to_value(HistoryEntry {
            timeline,
            switch_lsn: None,
            time: "2026-12-01T00:00:00Z".into(),
            reason: "test".into(),
            leader: "node1".into(),
        })
        .expect("a history entry serializes")
    }

    #[test]
    fn history_appends_and_keeps_what_a_newer_agent_wrote() {
        let first = appended_history(None, &entry(2)).unwrap();
        let mut stored: serde_json::Value = serde_json::from_str(&first).unwrap();
        stored[0]["future_field"] = "kept".into();
        let next = appended_history(Some(stored.to_string().as_bytes()), &entry(3)).unwrap();
        let next: serde_json::Value = serde_json::from_str(&next).unwrap();
        assert_eq!(next[0]["future_field"], "kept");
        assert_eq!(next[1]["timeline"], 3);
    }

    #[test]
    fn unreadable_history_is_never_overwritten() {
        for garbage in [
            &b"{not json"[..],
            b"{\"timeline\": 2}",
            b"[{\"timeline\": \"two\"}]",
        ] {
            let err = appended_history(Some(garbage), &entry(3)).unwrap_err();
            assert!(!err.is_empty());
        }
    }

    #[test]
    fn member_keys_from_a_newer_agent_are_read_and_unknown_tags_kept_as_custom() {
        let json = br#"{"name": "node9", "role": "replica", "state": "streaming",
            "api_address": "127.0.0.1:8008", "host": "127.0.0.1", "port": 5432,
            "tags": {"nofailover": true, "future_tag": 1}, "version": "9.0.0",
            "future_field": {"x": [1]}}"#;
        let parsed = pgherd_config::lenient::from_json::<MemberInfo>(json).unwrap();
        assert_eq!(parsed.value.name, "node9");
        assert!(parsed.value.tags.nofailover);
        assert_eq!(parsed.value.tags.custom["future_tag"], 1);
        assert_eq!(parsed.ignored, vec!["future_field"]);
    }

    #[test]
    fn other_keys_from_a_newer_agent_are_read() {
        let sync = br#"{"leader": "a", "members": ["b"], "quorum": 1, "epoch": 7}"#;
        let parsed = pgherd_config::lenient::from_json::<SyncKey>(sync).unwrap();
        assert_eq!(parsed.value.members, vec!["b".to_string()]);
        let handover = br#"{"kind": "switchover", "from": "a", "to": "b",
            "requested_at": "2026-12-01T00:00:00Z", "reason": "maintenance"}"#;
        let parsed = pgherd_config::lenient::from_json::<Handover>(handover).unwrap();
        assert_eq!(parsed.value.to.as_deref(), Some("b"));
        let restore = br#"{"id": "r1", "leader": "a", "backup_id": "b1", "target": "latest",
            "phase": "done", "requested_at": "2026-12-01T00:00:00Z", "verified": true}"#;
        let parsed = pgherd_config::lenient::from_json::<RestoreKey>(restore).unwrap();
        assert_eq!(parsed.ignored, vec!["verified"]);
    }

    #[test]
    fn a_value_that_is_not_readable_says_where() {
        let json = br#"{"name": "node9", "role": "boss"}"#;
        let err = pgherd_config::lenient::from_json::<MemberInfo>(json).unwrap_err();
        assert_eq!(err.path, "role", "{err}");
    }
}
