//! pgherd's configuration: the per-member YAML file, the dynamic cluster configuration that
//! lives in etcd, their defaults (all in this file) and their validation.
//!
//! Validation never stops at the first problem: [`load`] and [`Config::validate`] return every
//! problem with its YAML path, so an operator fixes a file in one pass.

pub mod backup;
pub mod lenient;
pub mod patch;
pub mod patroni;
mod secret;
pub mod tls;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use backup::{
    ArchiveConfig, AzureConfig, BackupConfig, BootstrapMethod, BootstrapRestore, BootstrapTarget,
    Compression, EncryptionConfig, GcsConfig, Location, ObjectStoreKind, RepositoryUrl, Retention,
    S3Config,
};
pub use tls::PostgresTls;
pub use validate::{bounds, runs_code, valid_slot_name, Problem};

/// The last resort for `postgres.bin_dir` when neither `pg_config --bindir` nor any
/// `/usr/lib/postgresql/<major>/bin` holds `postgres`: Debian's directory of the oldest
/// major pgherd runs, so the agent's error names a place to install to.
pub const DEFAULT_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";

/// One member's configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Cluster name: the etcd prefix is `/pgherd/<cluster>/`.
    pub cluster: String,
    /// This member's name: its etcd key and its replication slot name.
    pub name: String,
    pub etcd: EtcdConfig,
    pub api: ApiConfig,
    pub postgres: PostgresConfig,
    #[serde(default)]
    pub bootstrap: Bootstrap,
    #[serde(default)]
    pub tags: Tags,
    /// WAL archive and base backups; without it nothing is archived.
    #[serde(default)]
    pub backup: Option<BackupConfig>,
    /// The file this configuration was loaded from (set by [`load`], never read from YAML);
    /// `archive_command` passes it to `pgherd-agent wal-push`.
    #[serde(skip)]
    pub source: Option<PathBuf>,
    /// Commands the agent runs when PostgreSQL starts, stops, restarts or changes role.
    #[serde(default)]
    pub callbacks: Callbacks,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// `http://host:port` or `https://host:port`.
    pub endpoints: Vec<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// CA bundle that signs the etcd server certificates.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Client certificate and key for etcd's client-certificate authentication.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// `host:port` the agent's API binds to.
    pub listen: String,
    /// `host:port` other members and pgherdctl use to reach this agent.
    pub connect_address: String,
    /// `host:port` of the HTTP health checks and metrics (`/primary`, `/replica`,
    /// `/metrics`, ...); none when absent. Served with `tls` when that is set, unless
    /// `http_tls` says otherwise.
    #[serde(default)]
    pub http_listen: Option<String>,
    /// TLS of the HTTP checks: absent or `true`, the gRPC API's `tls`; `false`, plain HTTP
    /// even when the gRPC API uses TLS (HAProxy's checks speak plain HTTP on a private
    /// network); `{cert, key, ca}`, a certificate of its own.
    #[serde(default)]
    pub http_tls: Option<HttpTls>,
    /// TLS for the API; required unless `plaintext` is set.
    #[serde(default)]
    pub tls: Option<ApiTls>,
    /// Serve without TLS. Only for loopback or otherwise private networks.
    #[serde(default)]
    pub plaintext: bool,
    /// Bearer token every request that changes something must carry. Without a token (here
    /// or in `auth_token_file`) such requests are refused.
    #[serde(default)]
    pub auth_token: Option<String>,
    /// File holding the bearer token (first line), instead of `auth_token`.
    #[serde(default)]
    pub auth_token_file: Option<PathBuf>,
    /// HTTP basic authentication for the REST API's requests that change something (as
    /// Patroni's `restapi.authentication`), besides the bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_auth: Option<HttpAuth>,
}

/// `api.http_auth`: the user name and password of HTTP basic authentication.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpAuth {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for HttpAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpAuth")
            .field("username", &self.username)
            .field("password", &"<hidden>")
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiTls {
    /// PEM certificate chain and key of this agent's API (also presented as the client
    /// certificate when this agent or pgherdctl calls another agent).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// PEM CA bundle. When set, clients must present a certificate it signed, and clients
    /// use it to verify the agents' certificates.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// The name (a DNS subject alternative name) other agents and pgherdctl accept on an
    /// agent's certificate in place of its member name. Without it an agent's certificate
    /// must name its member (`name`, as a DNS name); set it when the members share one
    /// certificate, or carry certificates issued for a common identity rather than per
    /// member. Only meaningful with `ca`.
    #[serde(default)]
    pub member_identity: Option<String>,
}

/// `api.http_tls`: whether and with which certificate the HTTP checks use TLS.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum HttpTls {
    /// `true`: the gRPC API's `api.tls`; `false`: plain HTTP.
    Enabled(bool),
    /// A certificate (and optionally a client CA) of its own.
    Own(ApiTls),
}

impl<'de> Deserialize<'de> for HttpTls {
    /// `true`, `false` or `{cert, key, ca}`, with a message that says so.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Map(serde_yaml::Mapping),
        }
        let shape = "must be true (the api.tls certificate), false (plain HTTP) or {cert, key, ca}";
        match Raw::deserialize(d).map_err(|_| serde::de::Error::custom(shape))? {
            Raw::Bool(b) => Ok(HttpTls::Enabled(b)),
            Raw::Map(m) => serde_yaml::from_value(serde_yaml::Value::Mapping(m))
                .map(HttpTls::Own)
                .map_err(|e| serde::de::Error::custom(format!("{shape}: {e}"))),
        }
    }
}

impl ApiConfig {
    /// The TLS settings of the HTTP checks (`http_tls`, else `tls`); `None`: plain HTTP.
    pub fn http_tls_settings(&self) -> Option<&ApiTls> {
        match &self.http_tls {
            None | Some(HttpTls::Enabled(true)) => self.tls.as_ref(),
            Some(HttpTls::Enabled(false)) => None,
            Some(HttpTls::Own(t)) => Some(t),
        }
    }

    /// The bearer token, from `auth_token` or the first line of `auth_token_file`.
    pub fn token(&self) -> std::io::Result<Option<String>> {
        if let Some(t) = &self.auth_token {
            return Ok(Some(t.clone()));
        }
        match &self.auth_token_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)?;
                Ok(text
                    .lines()
                    .next()
                    .map(|l| l.trim().to_string())
                    .filter(|t| !t.is_empty()))
            }
            None => Ok(None),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// `host:port` PostgreSQL listens on (`listen_addresses` and `port`).
    pub listen: String,
    /// `host:port` other members and clients use to reach this PostgreSQL.
    pub connect_address: String,
    pub data_dir: PathBuf,
    /// Directory of `postgres`, `pg_ctl`, `initdb`, ...; default: `pg_config --bindir`, else
    /// the newest `/usr/lib/postgresql/<major>/bin` holding `postgres`, else
    /// [`DEFAULT_BIN_DIR`].
    #[serde(default)]
    pub bin_dir: Option<PathBuf>,
    /// OS user that runs PostgreSQL's programs when the agent runs as root.
    #[serde(default = "default_os_user")]
    pub os_user: String,
    pub superuser: Credentials,
    pub replication: Credentials,
    /// Password file the agent writes (mode 0600) for replication and rewind connections;
    /// default: `<data_dir>.pgpass`, beside the data directory.
    #[serde(default)]
    pub pgpass: Option<PathBuf>,
    /// PostgreSQL parameters for this member; they override the cluster-wide ones.
    #[serde(default)]
    pub parameters: BTreeMap<String, ParamValue>,
    /// Extra `pg_hba.conf` lines, placed before the ones pgherd needs.
    #[serde(default)]
    pub pg_hba: Vec<String>,
    /// Seconds `pg_ctl`, `initdb` and friends may take before they are considered hung.
    #[serde(default = "default_command_timeout")]
    pub command_timeout: u64,
    /// TLS for replication and rewind between members (see [`PostgresTls`]); without it
    /// that traffic, SCRAM exchanges included, crosses the network in clear text.
    #[serde(default)]
    pub tls: Option<PostgresTls>,
    /// Where this member keeps tablespaces that are elsewhere on the leader (leader's
    /// location -> this member's), for replicas made by `pg_basebackup`
    /// (`--tablespace-mapping`) or from a base backup; absent: the same paths.
    #[serde(default)]
    pub tablespace_map: BTreeMap<PathBuf, PathBuf>,
    /// Run the `restore_command` of the dynamic config's `standby_cluster` section on this
    /// member. Off by default: whoever can write etcd would otherwise run shell commands as
    /// the postgres user here.
    #[serde(default)]
    pub trust_cluster_restore_command: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

/// What is used only when the cluster is created.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bootstrap {
    /// Seeds `/pgherd/<cluster>/config` once; after that etcd wins over the file.
    #[serde(default)]
    pub dcs: DynamicConfig,
    /// Extra `initdb` options: `data-checksums` style flags or `{encoding: UTF8}` maps.
    /// Checksums are always enabled.
    #[serde(default)]
    pub initdb: Vec<InitdbOption>,
    /// How the first member makes the new cluster's data: `initdb` (default) or `restore`
    /// (from another cluster's backup repository, see `restore`).
    #[serde(default)]
    pub method: BootstrapMethod,
    /// With `method: restore`: where the source cluster's backups are, which one, and the
    /// recovery target.
    #[serde(default)]
    pub restore: Option<BootstrapRestore>,
    /// Run (and waited for, at most `callbacks.timeout`) once after initdb created the new
    /// cluster and its roles, before it is recorded as initialised, with a connection URL
    /// of the local PostgreSQL as the superuser as its argument and `PGPASSFILE` set
    /// (Patroni's `bootstrap.post_bootstrap`). A non-zero exit fails the bootstrap: the data
    /// directory is removed and the initialisation race runs again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_bootstrap: Option<String>,
}

/// Cluster-wide settings, stored as JSON in etcd under `/pgherd/<cluster>/config`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DynamicConfig {
    /// Seconds the leader lease lives without renewal.
    #[serde(default = "default_ttl")]
    pub ttl: u64,
    /// Seconds between two runs of the agent loop (etcd events wake it earlier).
    #[serde(default = "default_loop_wait")]
    pub loop_wait: u64,
    /// Seconds an etcd or PostgreSQL call may take before it is given up on.
    #[serde(default = "default_retry_timeout")]
    pub retry_timeout: u64,
    /// A replica further behind the leader's last known WAL position than this many bytes
    /// never takes over.
    #[serde(default = "default_maximum_lag_on_failover")]
    pub maximum_lag_on_failover: u64,
    /// A synchronous standby whose flush position is more than this many bytes behind the
    /// leader's WAL is swapped for a standby within it, when enough such standbys stream
    /// (Patroni's `maximum_lag_on_syncnode`). 0 or less: never swapped for lag.
    #[serde(default = "default_maximum_lag_on_syncnode")]
    pub maximum_lag_on_syncnode: i64,
    /// Seconds the leader may spend bringing a crashed PostgreSQL back (crash recovery)
    /// before it releases the leader key so a replica takes over.
    #[serde(default = "default_primary_start_timeout")]
    pub primary_start_timeout: u64,
    /// Maintenance mode: no automatic failover, no PostgreSQL starts or restarts by the
    /// agents (`pgherdctl pause` / `resume`).
    #[serde(default)]
    pub pause: bool,
    /// `off`: asynchronous replication. `on`: the leader keeps `synchronous_node_count`
    /// standbys synchronous (`FIRST n (...)`) and only they may take over. `quorum`: commits
    /// wait for any `synchronous_node_count` of the quorum set (`ANY n (...)`).
    #[serde(default)]
    pub synchronous_mode: SynchronousMode,
    /// With no synchronous standby available, block commits rather than fall back to
    /// asynchronous replication.
    #[serde(default)]
    pub synchronous_mode_strict: bool,
    /// How many standbys must confirm each commit.
    #[serde(default = "default_synchronous_node_count")]
    pub synchronous_node_count: u32,
    #[serde(default)]
    pub postgresql: DcsPostgresql,
    /// Seconds the leader keeps a member's replication slot after the member's key
    /// disappeared (agent stopped, node down), so the member catches up from the leader's
    /// WAL without a new clone. 0: dropped at once.
    #[serde(default = "default_member_slots_ttl")]
    pub member_slots_ttl: u64,
    /// Permanent replication slots for consumers outside the cluster (CDC, archivers):
    /// created on the leader and kept on every member that may become leader.
    #[serde(default)]
    pub slots: BTreeMap<String, PermanentSlot>,
    /// Slots pgherd must leave alone even where it would otherwise drop or change them. A
    /// slot matches an entry when every field the entry sets matches.
    #[serde(default)]
    pub ignore_slots: Vec<IgnoreSlot>,
    /// How a member without data becomes a replica, tried in order: `backup` (the newest
    /// base backup of the repository plus archived WAL, then streaming) and `basebackup`
    /// (pg_basebackup from a `clonefrom` member or the leader).
    #[serde(default = "default_create_replica_methods")]
    pub create_replica_methods: Vec<ReplicaMethod>,
    /// With etcd unreachable for everyone, the leader stays writable while every member
    /// etcd last listed answers that it accepts this leader (see the README's failsafe mode).
    #[serde(default)]
    pub failsafe_mode: bool,
    /// Set: this cluster is a standby cluster of another (a disaster-recovery site). Its
    /// leader-key holder, the standby leader, runs PostgreSQL as a standby of the remote
    /// source; the other members follow it; nobody promotes. Removing the section
    /// (`pgherdctl promote-cluster`) promotes the standby leader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby_cluster: Option<StandbyCluster>,
}

/// The remote source of a standby cluster (`standby_cluster` in the dynamic config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StandbyCluster {
    /// The remote primary (or any member of the other cluster, or a proxy to its leader) the
    /// standby leader streams from and clones from.
    pub host: String,
    #[serde(default = "default_pg_port")]
    pub port: u16,
    /// The slot the standby leader streams with on the remote; pgherd never creates it
    /// there (the remote's `slots` keeps it). Unset: no slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_slot_name: Option<String>,
    /// The standby leader's `restore_command`. It runs a shell command as the postgres
    /// user, so a member uses it only when its own file says
    /// `postgres.trust_cluster_restore_command: true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_command: Option<String>,
    /// The other cluster's `backup.repository` (a directory both sites reach, read only):
    /// the standby leader's `restore_command` becomes `pgherd-agent wal-fetch` reading the
    /// other cluster's WAL archive, so it catches up from the archive whenever streaming
    /// from `host` cannot serve it, and `create_replica_methods: [backup]` copies the other
    /// cluster's newest base backup. Needs `cluster`; excludes `restore_command`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<PathBuf>,
    /// The other cluster's name in `repository` (its archive is `<repository>/<cluster>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// How the standby cluster's first member gets its data, tried in order: `backup` (the
    /// newest base backup in `repository`, recovered from its archive, then streaming from
    /// `host`) and `basebackup` (pg_basebackup from `host`:`port`).
    #[serde(default = "default_create_replica_methods")]
    pub create_replica_methods: Vec<ReplicaMethod>,
    /// The standby leader's `recovery_min_apply_delay` (`1h`, `30min`, milliseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_min_apply_delay: Option<ParamValue>,
}

impl StandbyCluster {
    /// The root of the other cluster's archive and backups (`<repository>/<cluster>`), when
    /// both are set.
    pub fn archive_root(&self) -> Option<PathBuf> {
        Some(self.repository.as_ref()?.join(self.cluster.as_ref()?))
    }

    /// `host:port` of the remote source (an IPv6 address in brackets): how decisions,
    /// messages and pgherdctl name it. It cannot be a member's name (those have no colon).
    pub fn address(&self) -> String {
        host_port(&self.host, self.port)
    }
}

/// `host:port`, an IPv6 address in brackets.
pub fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A permanent slot of the dynamic configuration: `{type: physical}` or
/// `{type: logical, database: D, plugin: P}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PermanentSlot {
    #[serde(rename = "type")]
    pub kind: SlotType,
    /// Logical slots: the database the slot decodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    /// Logical slots: the output plugin (`pgoutput`, `test_decoding`, `wal2json`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotType {
    Physical,
    Logical,
}

impl SlotType {
    pub fn as_str(self) -> &'static str {
        match self {
            SlotType::Physical => "physical",
            SlotType::Logical => "logical",
        }
    }
}

/// An `ignore_slots` entry; unset fields match anything.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IgnoreSlot {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<SlotType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin: Option<String>,
}

impl IgnoreSlot {
    /// Whether a slot with these properties is one to leave alone.
    pub fn matches(
        &self,
        name: &str,
        kind: SlotType,
        database: Option<&str>,
        plugin: Option<&str>,
    ) -> bool {
        self.name.as_deref().is_none_or(|n| n == name)
            && self.kind.is_none_or(|k| k == kind)
            && self.database.as_deref().is_none_or(|d| Some(d) == database)
            && self.plugin.as_deref().is_none_or(|p| Some(p) == plugin)
    }
}

/// A way to create a replica (`create_replica_methods`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaMethod {
    /// Restore the newest base backup of `backup.repository`, recover from the archive,
    /// then stream from the leader.
    Backup,
    /// pg_basebackup from a member tagged `clonefrom` that streams, or from the leader.
    Basebackup,
}

impl ReplicaMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaMethod::Backup => "backup",
            ReplicaMethod::Basebackup => "basebackup",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SynchronousMode {
    #[default]
    Off,
    On,
    Quorum,
}

impl<'de> Deserialize<'de> for SynchronousMode {
    /// `off | on | quorum`; YAML booleans (`true`/`false`) are taken as `on`/`off`.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(true) => Ok(SynchronousMode::On),
            Raw::Bool(false) => Ok(SynchronousMode::Off),
            Raw::Text(t) => match t.as_str() {
                "off" => Ok(SynchronousMode::Off),
                "on" => Ok(SynchronousMode::On),
                "quorum" => Ok(SynchronousMode::Quorum),
                other => Err(serde::de::Error::custom(format!(
                    "{other:?} is not a synchronous_mode: use off, on or quorum"
                ))),
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DcsPostgresql {
    /// Parameters applied on every member.
    #[serde(default)]
    pub parameters: BTreeMap<String, ParamValue>,
    /// A former primary whose history diverged from the new leader's is rewound with
    /// pg_rewind before it follows.
    #[serde(default = "default_true")]
    pub use_pg_rewind: bool,
    /// When pg_rewind is off or fails, empty the data directory and clone the leader again.
    #[serde(default)]
    pub remove_data_directory_on_rewind_failure: bool,
}

impl Default for DcsPostgresql {
    fn default() -> Self {
        DcsPostgresql {
            parameters: BTreeMap::new(),
            use_pg_rewind: true,
            remove_data_directory_on_rewind_failure: false,
        }
    }
}

/// A member's tags. Any key besides the known ones is a custom tag (`zone: eu-1`), kept as
/// written and shown by `pgherdctl list`, as Patroni does; pgherd itself acts on none of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tags {
    /// Never promote this member.
    #[serde(default)]
    pub nofailover: bool,
    /// Among equally advanced candidates the higher priority wins.
    #[serde(default = "default_failover_priority")]
    pub failover_priority: u32,
    /// Exclude this member from read-only load balancing.
    #[serde(default)]
    pub noloadbalance: bool,
    /// Never make this member a synchronous standby.
    #[serde(default)]
    pub nosync: bool,
    /// `basebackup` clones from this member (when it streams) rather than from the leader.
    #[serde(default)]
    pub clonefrom: bool,
    /// Stream from this member (cascading replication) while it streams from the leader on
    /// its timeline or leads; from the leader otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicatefrom: Option<String>,
    /// Among standbys that may become synchronous, a higher priority is chosen first; 0 or
    /// less: never synchronous, as `nosync` (Patroni's `sync_priority`).
    #[serde(default = "default_sync_priority")]
    pub sync_priority: i64,
    /// Custom tags: every other key, with its value (a string, number, boolean, ...).
    #[serde(flatten)]
    pub custom: BTreeMap<String, serde_json::Value>,
}

/// Commands run on PostgreSQL events, Patroni style: `<command> <action> <role> <cluster>`,
/// e.g. `/usr/local/bin/notify on_role_change primary demo`. A command is a program and
/// fixed arguments separated by spaces (no shell), run as the agent's user in its own
/// process group, never waited for by the loop, and killed with its group at `timeout`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Callbacks {
    /// After the agent started PostgreSQL.
    #[serde(default)]
    pub on_start: Option<String>,
    /// After the agent stopped PostgreSQL.
    #[serde(default)]
    pub on_stop: Option<String>,
    /// After the agent restarted PostgreSQL (`pgherdctl restart`).
    #[serde(default)]
    pub on_restart: Option<String>,
    /// After this member's PostgreSQL became primary (promotion) or a replica (demotion).
    #[serde(default)]
    pub on_role_change: Option<String>,
    /// After the agent rewrote PostgreSQL's configuration and reloaded it (a changed
    /// dynamic config, `pgherdctl reload`, `POST /reload`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_reload: Option<String>,
    /// Run (and waited for, at most `timeout`) after this member took the leader key and
    /// before it promotes its PostgreSQL, with no arguments: a fencing step. A non-zero exit,
    /// or no exit within `timeout`, aborts the promotion: the member releases the key and
    /// stays a standby (Patroni's `postgresql.pre_promote`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_promote: Option<String>,
    /// Run (and waited for, at most `timeout`) right before the agent stops PostgreSQL
    /// cleanly, with no arguments; its exit status does not stop the stop (Patroni's
    /// `postgresql.before_stop`). Never before an immediate stop (fencing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before_stop: Option<String>,
    /// Seconds a callback may run before its process group is killed.
    #[serde(default = "default_callback_timeout")]
    pub timeout: u64,
}

impl Default for Callbacks {
    fn default() -> Self {
        Callbacks {
            on_start: None,
            on_stop: None,
            on_restart: None,
            on_role_change: None,
            on_reload: None,
            pre_promote: None,
            before_stop: None,
            timeout: default_callback_timeout(),
        }
    }
}

impl Callbacks {
    /// How long a callback may run (`timeout`, in seconds).
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout)
    }

    /// The configured command of each action, with its key name.
    pub fn commands(&self) -> [(&'static str, Option<&str>); 7] {
        [
            ("on_start", self.on_start.as_deref()),
            ("on_stop", self.on_stop.as_deref()),
            ("on_restart", self.on_restart.as_deref()),
            ("on_role_change", self.on_role_change.as_deref()),
            ("on_reload", self.on_reload.as_deref()),
            ("pre_promote", self.pre_promote.as_deref()),
            ("before_stop", self.before_stop.as_deref()),
        ]
    }
}

/// A PostgreSQL parameter value as written in YAML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ParamValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

impl fmt::Display for ParamValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamValue::Bool(b) => f.write_str(if *b { "on" } else { "off" }),
            ParamValue::Int(i) => write!(f, "{i}"),
            ParamValue::Float(x) => write!(f, "{x}"),
            ParamValue::Text(s) => f.write_str(s),
        }
    }
}

/// One `initdb` option: a flag (`data-checksums`) or a single `name: value` pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InitdbOption {
    Flag(String),
    Value(BTreeMap<String, String>),
}

impl InitdbOption {
    /// The option as `initdb` arguments (`--name` or `--name=value`).
    pub fn to_args(&self) -> Vec<String> {
        match self {
            InitdbOption::Flag(f) => vec![format!("--{f}")],
            InitdbOption::Value(m) => m.iter().map(|(k, v)| format!("--{k}={v}")).collect(),
        }
    }
}

fn default_os_user() -> String {
    "postgres".to_string()
}
fn default_command_timeout() -> u64 {
    120
}
fn default_ttl() -> u64 {
    10
}
fn default_loop_wait() -> u64 {
    1
}
fn default_retry_timeout() -> u64 {
    3
}
fn default_maximum_lag_on_syncnode() -> i64 {
    -1
}

fn default_maximum_lag_on_failover() -> u64 {
    1024 * 1024
}
fn default_primary_start_timeout() -> u64 {
    30
}
fn default_synchronous_node_count() -> u32 {
    1
}
fn default_member_slots_ttl() -> u64 {
    1800
}
fn default_create_replica_methods() -> Vec<ReplicaMethod> {
    vec![ReplicaMethod::Basebackup]
}
fn default_pg_port() -> u16 {
    5432
}
fn default_callback_timeout() -> u64 {
    30
}
fn default_true() -> bool {
    true
}
fn default_failover_priority() -> u32 {
    1
}

impl Default for DynamicConfig {
    fn default() -> Self {
        DynamicConfig {
            ttl: default_ttl(),
            loop_wait: default_loop_wait(),
            retry_timeout: default_retry_timeout(),
            maximum_lag_on_failover: default_maximum_lag_on_failover(),
            maximum_lag_on_syncnode: default_maximum_lag_on_syncnode(),
            primary_start_timeout: default_primary_start_timeout(),
            pause: false,
            synchronous_mode: SynchronousMode::Off,
            synchronous_mode_strict: false,
            synchronous_node_count: default_synchronous_node_count(),
            postgresql: DcsPostgresql::default(),
            member_slots_ttl: default_member_slots_ttl(),
            slots: BTreeMap::new(),
            ignore_slots: Vec::new(),
            create_replica_methods: default_create_replica_methods(),
            failsafe_mode: false,
            standby_cluster: None,
        }
    }
}

fn default_sync_priority() -> i64 {
    1
}

impl Default for Tags {
    fn default() -> Self {
        Tags {
            nofailover: false,
            failover_priority: default_failover_priority(),
            noloadbalance: false,
            nosync: false,
            clonefrom: false,
            replicatefrom: None,
            sync_priority: default_sync_priority(),
            custom: BTreeMap::new(),
        }
    }
}

impl Config {
    /// Every semantic problem of an already well-typed configuration.
    pub fn validate(&self) -> Vec<Problem> {
        let mut problems = validate::config(self);
        problems.extend(tls::validate(self));
        problems
    }

    /// The etcd prefix of this member's cluster, with a trailing slash.
    pub fn prefix(&self) -> String {
        format!("/pgherd/{}/", self.cluster)
    }

    /// The password file path (see [`PostgresConfig::pgpass`]).
    pub fn pgpass_path(&self) -> PathBuf {
        self.postgres.pgpass.clone().unwrap_or_else(|| {
            let mut p = self.postgres.data_dir.clone().into_os_string();
            p.push(".pgpass");
            PathBuf::from(p)
        })
    }
}

impl DynamicConfig {
    /// Every problem of a dynamic configuration; paths start with `prefix`
    /// (`bootstrap.dcs` in the file, empty for the etcd copy).
    pub fn validate(&self, prefix: &str) -> Vec<Problem> {
        validate::dynamic(self, prefix)
    }

    /// The leader lease's TTL (`ttl`, in seconds).
    pub fn ttl(&self) -> Duration {
        Duration::from_secs(self.ttl)
    }

    /// The time between two runs of the agent loop (`loop_wait`, in seconds).
    pub fn loop_wait(&self) -> Duration {
        Duration::from_secs(self.loop_wait)
    }

    /// How long an etcd call may take (`retry_timeout`, in seconds).
    pub fn retry_timeout(&self) -> Duration {
        Duration::from_secs(self.retry_timeout)
    }

    /// How long the leader may bring a crashed PostgreSQL back (`primary_start_timeout`,
    /// in seconds).
    pub fn primary_start_timeout(&self) -> Duration {
        Duration::from_secs(self.primary_start_timeout)
    }
}

impl PostgresConfig {
    /// How long one of PostgreSQL's programs may run (`command_timeout`, in seconds).
    pub fn command_timeout(&self) -> Duration {
        Duration::from_secs(self.command_timeout)
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} has {} problem(s):\n{}", problems.len(), Problem::list(problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

/// Reads, parses and validates a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut config = parse(&text).map_err(|problems| ConfigError::Invalid {
        path: path.to_path_buf(),
        problems,
    })?;
    config.source = Some(std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()));
    Ok(config)
}

/// Parses and validates configuration text; the error lists every problem found, none
/// quoting the value of a secret.
pub fn parse(text: &str) -> Result<Config, Vec<Problem>> {
    let config: Config = validate::deserialize_all(text).map_err(secret::redact)?;
    let problems = config.validate();
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(secret::redact(problems))
    }
}

/// Parses JSON dynamic configuration strictly (unknown fields are problems) and validates
/// it: for what an operator writes. What the agents read from etcd goes through
/// [`lenient::dynamic`].
pub fn parse_dynamic(json: &[u8]) -> Result<DynamicConfig, Vec<Problem>> {
    let de = &mut serde_json::Deserializer::from_slice(json);
    let dcs: DynamicConfig = serde_path_to_error::deserialize(de).map_err(|e| {
        vec![Problem::new(
            validate::display_path(&e.path().to_string()),
            e.inner().to_string(),
        )]
    })?;
    let problems = dcs.validate("");
    if problems.is_empty() {
        Ok(dcs)
    } else {
        Err(problems)
    }
}

/// Splits `host:port` (IPv6 as `[::1]:5432`).
pub fn split_host_port(addr: &str) -> Option<(String, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return None;
    }
    let port: u16 = port.parse().ok()?;
    if port == 0 {
        return None;
    }
    Some((host.to_string(), port))
}

#[cfg(test)]
mod tests;
