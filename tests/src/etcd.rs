//! A real etcd (one member, or a three-member cluster) on free loopback ports in a temp dir.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use etcd_client::{
    Certificate, Client, ConnectOptions, GetOptions, Identity, KeyValue, Permission, TlsOptions,
};
use tempfile::TempDir;
use tokio::time::Instant;

use crate::ports::free_port;
use crate::process::{tail, Supervised};
use crate::Signal;

/// The etcd binary (3.4 on the CI image).
pub const ETCD_BIN: &str = "/usr/bin/etcd";

/// How long etcd may take to answer after start.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long etcd may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts at picking ports, in case another test process grabbed one meanwhile.
const START_ATTEMPTS: usize = 3;

/// How a test etcd protects its client port; the default is none of it (plain `http://`,
/// no authentication), as [`Etcd::start`] runs it.
#[derive(Debug, Clone, Default)]
pub struct EtcdSecurity {
    /// Serve clients over `https://` with this certificate.
    pub tls: Option<EtcdTls>,
    /// Accept only clients presenting a certificate signed by `tls.ca` (`--client-cert-auth`).
    pub client_cert_auth: bool,
    /// Turn authentication on (after start, as an operator does with `etcdctl`).
    pub auth: Option<EtcdAuth>,
}

/// PEM files of the server certificate, its key and the CA (which also signs clients').
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Users created before `auth enable`: `root` (role `root`), and `username` with a role of
/// the same name granted read and write on every key under `prefix`.
#[derive(Debug, Clone)]
pub struct EtcdAuth {
    pub root_password: String,
    pub username: String,
    pub password: String,
    pub prefix: String,
}

#[derive(Debug)]
struct Node {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log_path: PathBuf,
    process: Supervised,
}

impl Node {
    fn client_url(&self, https: bool) -> String {
        let scheme = if https { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }
    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }
}

/// A running etcd; every member is killed and its directory removed on drop.
#[derive(Debug)]
pub struct Etcd {
    nodes: Vec<Node>,
    security: EtcdSecurity,
    /// Set once authentication is on: the harness's own client logs in as root.
    auth_enabled: std::sync::atomic::AtomicBool,
    // Dropped after `nodes`, so the processes are gone before their files.
    root: Option<TempDir>,
}

impl Etcd {
    /// A single-member etcd, answering requests.
    pub async fn start() -> Result<Etcd> {
        Self::start_cluster(1).await
    }

    /// An etcd cluster of `size` members, answering requests.
    pub async fn start_cluster(size: usize) -> Result<Etcd> {
        Self::start_secured(size, EtcdSecurity::default()).await
    }

    /// An etcd cluster of `size` members with TLS, client certificates and authentication
    /// as `security` says, answering requests (authentication already on).
    pub async fn start_secured(size: usize, security: EtcdSecurity) -> Result<Etcd> {
        if size == 0 {
            bail!("an etcd cluster needs at least one member");
        }
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            let etcd = Self::configure(size, security.clone())?;
            match etcd.start_all().await {
                Ok(()) => {
                    etcd.enable_auth().await?;
                    return Ok(etcd);
                }
                // Most likely a port taken by another test process: new ports, new dirs.
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.expect("START_ATTEMPTS is not zero, so at least one attempt failed"))
    }

    fn configure(size: usize, security: EtcdSecurity) -> Result<Etcd> {
        let root = crate::temp_root("pgherd-etcd-")?;
        let mut nodes = Vec::with_capacity(size);
        for i in 1..=size {
            let name = format!("etcd{i}");
            nodes.push(Node {
                data_dir: root.path().join(format!("{name}.etcd")),
                log_path: root.path().join(format!("{name}.log")),
                client_port: free_port()?,
                peer_port: free_port()?,
                process: Supervised::new(format!("etcd member {name}")),
                name,
            });
        }
        Ok(Etcd {
            nodes,
            security,
            auth_enabled: std::sync::atomic::AtomicBool::new(false),
            root: Some(root),
        })
    }

    fn spawn(&self, node: &Node) -> Result<()> {
        let initial_cluster = self
            .nodes
            .iter()
            .map(|n| format!("{}={}", n.name, n.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log_path)
            .with_context(|| format!("cannot open {}", node.log_path.display()))?;
        let mut cmd = Command::new(ETCD_BIN);
        cmd.arg("--name")
            .arg(&node.name)
            .arg("--data-dir")
            .arg(&node.data_dir)
            .arg("--listen-client-urls")
            .arg(node.client_url(self.https()))
            .arg("--advertise-client-urls")
            .arg(node.client_url(self.https()))
            .arg("--listen-peer-urls")
            .arg(node.peer_url())
            .arg("--initial-advertise-peer-urls")
            .arg(node.peer_url())
            .arg("--initial-cluster")
            .arg(initial_cluster)
            .arg("--initial-cluster-token")
            .arg(format!("pgherd-test-{}", self.nodes[0].peer_port))
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--logger")
            .arg("zap")
            .arg("--log-outputs")
            .arg("stderr");
        if let Some(tls) = &self.security.tls {
            cmd.arg("--cert-file")
                .arg(&tls.cert)
                .arg("--key-file")
                .arg(&tls.key);
            // etcd 3.4 asks every client for a certificate once it has a trusted CA.
            if self.security.client_cert_auth {
                cmd.arg("--client-cert-auth")
                    .arg("--trusted-ca-file")
                    .arg(&tls.ca);
            }
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        node.process.spawn(&mut cmd, Signal::SIGKILL)?;
        Ok(())
    }

    async fn start_all(&self) -> Result<()> {
        for node in &self.nodes {
            self.spawn(node)?;
        }
        self.wait_ready().await
    }

    /// Waits until a real request succeeds (a quorum read of a key).
    async fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            for node in &self.nodes {
                if let Some(status) = node.process.try_exit()? {
                    bail!(
                        "etcd member {} exited during start ({status}); its log ends with:\n{}",
                        node.name,
                        tail(&node.log_path, 20)
                    );
                }
            }
            let attempt = async {
                let mut client = self.client().await?;
                client.get("/pgherd-harness/ready", None).await?;
                anyhow::Ok(())
            };
            let error = match tokio::time::timeout(Duration::from_secs(2), attempt).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => format!("{e:#}"),
                Err(_) => "request timed out".to_string(),
            };
            if Instant::now() >= deadline {
                bail!(
                    "etcd at {} did not answer within {} s (last error: {error}); log of {} ends with:\n{}",
                    self.endpoints().join(","),
                    START_TIMEOUT.as_secs(),
                    self.nodes[0].name,
                    tail(&self.nodes[0].log_path, 20)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn https(&self) -> bool {
        self.security.tls.is_some()
    }

    /// Whether clients need a CA, a certificate or a password to talk to this etcd.
    pub fn secured(&self) -> bool {
        self.https() || self.security.auth.is_some()
    }

    /// Creates the users and roles of `security.auth` and turns authentication on.
    async fn enable_auth(&self) -> Result<()> {
        let Some(auth) = &self.security.auth else {
            return Ok(());
        };
        let mut c = self.client().await?;
        let steps = async {
            c.user_add("root", auth.root_password.clone(), None).await?;
            c.role_add("root").await?;
            c.user_grant_role("root", "root").await?;
            c.user_add(auth.username.clone(), auth.password.clone(), None)
                .await?;
            c.role_add(auth.username.clone()).await?;
            c.role_grant_permission(
                auth.username.clone(),
                Permission::read_write(auth.prefix.clone()).with_prefix(),
            )
            .await?;
            c.user_grant_role(auth.username.clone(), auth.username.clone())
                .await?;
            c.auth_enable().await?;
            anyhow::Ok(())
        };
        steps.await.context("cannot turn etcd authentication on")?;
        self.auth_enabled
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// Client URLs of every member, `http://127.0.0.1:<port>` (`https://` with TLS).
    pub fn endpoints(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| n.client_url(self.https()))
            .collect()
    }

    /// Number of etcd members.
    pub fn size(&self) -> usize {
        self.nodes.len()
    }

    /// The etcd log of member `i` (0-based).
    pub fn log_path(&self, i: usize) -> &Path {
        &self.nodes[i].log_path
    }

    /// A client of every member, with short timeouts.
    pub async fn client(&self) -> Result<Client> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5));
        if let Some(tls) = &self.security.tls {
            let read = |p: &PathBuf| {
                std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))
            };
            pgherd_agent::install_crypto_provider();
            let mut t = TlsOptions::new().ca_certificate(Certificate::from_pem(read(&tls.ca)?));
            if self.security.client_cert_auth {
                t = t.identity(Identity::from_pem(read(&tls.cert)?, read(&tls.key)?));
            }
            options = options.with_tls(t);
        }
        if let Some(auth) = &self.security.auth {
            if self.auth_enabled.load(std::sync::atomic::Ordering::SeqCst) {
                options = options.with_user("root", auth.root_password.clone());
            }
        }
        Client::connect(self.endpoints(), Some(options))
            .await
            .with_context(|| format!("cannot connect to etcd at {}", self.endpoints().join(",")))
    }

    /// The key-value pair at `key`, if the key exists.
    pub async fn get_kv(&self, key: &str) -> Result<Option<KeyValue>> {
        let mut client = self.client().await?;
        let resp = client
            .get(key, None)
            .await
            .with_context(|| format!("etcd get {key}"))?;
        Ok(resp.kvs().first().cloned())
    }

    /// The value at `key` as text, if the key exists.
    pub async fn get(&self, key: &str) -> Result<Option<String>> {
        match self.get_kv(key).await? {
            Some(kv) => Ok(Some(
                kv.value_str()
                    .with_context(|| format!("etcd key {key} is not UTF-8"))?
                    .to_string(),
            )),
            None => Ok(None),
        }
    }

    /// Every key under `prefix` with its value, in key order.
    pub async fn get_prefix(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        let mut client = self.client().await?;
        let resp = client
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .with_context(|| format!("etcd get --prefix {prefix}"))?;
        resp.kvs()
            .iter()
            .map(|kv| {
                Ok((
                    kv.key_str()?.to_string(),
                    String::from_utf8_lossy(kv.value()).into_owned(),
                ))
            })
            .collect()
    }

    /// Writes `value` at `key` (no lease).
    pub async fn put(&self, key: &str, value: &str) -> Result<()> {
        let mut client = self.client().await?;
        client
            .put(key, value, None)
            .await
            .with_context(|| format!("etcd put {key}"))?;
        Ok(())
    }

    /// Stops every member with SIGTERM and waits for them to exit; data is kept for
    /// [`Etcd::restart`].
    pub async fn stop(&self) -> Result<()> {
        for node in &self.nodes {
            if node.process.is_running() {
                node.process.signal(Signal::SIGTERM)?;
            }
        }
        for node in &self.nodes {
            if node.process.pid().is_some() {
                node.process.wait_exit(STOP_TIMEOUT).await?;
            }
        }
        Ok(())
    }

    /// Kills every member with SIGKILL; data is kept for [`Etcd::restart`].
    pub fn kill(&self) -> Result<()> {
        for node in &self.nodes {
            node.process.kill()?;
        }
        Ok(())
    }

    /// Freezes every member (SIGSTOP): connections stay open but nothing answers.
    pub fn pause(&self) -> Result<()> {
        self.nodes
            .iter()
            .try_for_each(|n| n.process.signal(Signal::SIGSTOP))
    }

    /// Thaws members frozen by [`Etcd::pause`].
    pub fn resume(&self) -> Result<()> {
        self.nodes
            .iter()
            .try_for_each(|n| n.process.signal(Signal::SIGCONT))
    }

    /// Starts the members that are not running, on the same ports and data, and waits until
    /// etcd answers again. Running members are stopped first.
    pub async fn restart(&self) -> Result<()> {
        self.stop().await?;
        self.start_all().await
    }

    /// Stops member `i` (0-based) with SIGTERM, for quorum-loss tests.
    pub async fn stop_member(&self, i: usize) -> Result<()> {
        let node = &self.nodes[i];
        node.process.signal(Signal::SIGTERM)?;
        node.process.wait_exit(STOP_TIMEOUT).await?;
        Ok(())
    }

    /// Starts member `i` (0-based) again after [`Etcd::stop_member`]; does not wait for it.
    pub fn start_member(&self, i: usize) -> Result<()> {
        self.spawn(&self.nodes[i])
    }

    /// The tail of every member's log, for failure reports.
    pub fn log_tails(&self, lines: usize) -> String {
        self.nodes
            .iter()
            .map(|n| {
                format!(
                    "----- etcd {} ({}) -----\n{}\n",
                    n.name,
                    n.log_path.display(),
                    tail(&n.log_path, lines)
                )
            })
            .collect()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for node in &self.nodes {
            node.process.kill_group();
        }
        if let Some(root) = self.root.take() {
            crate::dispose_temp_root(root);
        }
    }
}
