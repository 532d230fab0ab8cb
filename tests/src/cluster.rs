//! A pgherd cluster under test: one etcd and N members in one temp dir.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use etcd_client::KeyValue;
use tempfile::TempDir;

use crate::config::MemberSpec;
use crate::ctl::{ctl_direct, ctl_output, parse_list, CtlOutput, HistoryEntry, ListedMember};
use crate::etcd::{Etcd, EtcdSecurity};
use crate::member::{Member, MemberOptions};
use crate::ports::free_port;
use crate::proxy::EtcdProxy;
use crate::wait::wait_until;

/// Lines of each log printed when a cluster is dropped (`PGHERD_LOG_LINES` overrides).
const DEFAULT_LOG_LINES: usize = 80;

/// Builds a [`Cluster`]: members, their options, YAML shared by all, etcd size.
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    name: String,
    members: Vec<MemberOptions>,
    yaml: Vec<String>,
    etcd_size: usize,
    etcd_security: EtcdSecurity,
    backups: bool,
    /// Another cluster's etcd, shared instead of starting one.
    shared_etcd: Option<Arc<Etcd>>,
}

impl Default for ClusterBuilder {
    fn default() -> Self {
        ClusterBuilder {
            name: "test".to_string(),
            members: Vec::new(),
            yaml: Vec::new(),
            etcd_size: 1,
            etcd_security: EtcdSecurity::default(),
            backups: false,
            shared_etcd: None,
        }
    }
}

impl ClusterBuilder {
    /// The cluster name (etcd prefix `/pgherd/<name>/`); default `test`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Adds `n` members with default options.
    pub fn members(mut self, n: usize) -> Self {
        self.members
            .extend(std::iter::repeat_with(MemberOptions::default).take(n));
        self
    }

    /// Adds one member with `options`.
    pub fn member(mut self, options: MemberOptions) -> Self {
        self.members.push(options);
        self
    }

    /// YAML merged into every member's config, e.g. `"bootstrap: {dcs: {ttl: 20}}"`.
    pub fn yaml(mut self, yaml: impl Into<String>) -> Self {
        self.yaml.push(yaml.into());
        self
    }

    /// Gives every member a `backup` section with one shared repository in the cluster's
    /// temp dir (see [`Cluster::repository`]).
    pub fn backups(mut self) -> Self {
        self.backups = true;
        self
    }

    /// Number of etcd members (default 1).
    pub fn etcd_size(mut self, n: usize) -> Self {
        self.etcd_size = n;
        self
    }

    /// etcd with TLS, client certificates or authentication (default: none of them). The
    /// members' `etcd.endpoints` follow (`https://` with TLS); their credentials and
    /// certificates are the test's to add with [`ClusterBuilder::yaml`].
    pub fn etcd_security(mut self, security: EtcdSecurity) -> Self {
        self.etcd_security = security;
        self
    }

    /// Uses `other`'s etcd (two clusters with different names on one etcd, as two pgherd
    /// clusters of one organisation share it) instead of starting one; it stops when the
    /// last cluster using it is dropped.
    pub fn sharing_etcd_of(mut self, other: &Cluster) -> Self {
        self.shared_etcd = Some(other.etcd.clone());
        self
    }

    /// Starts etcd and writes every member's config, without starting any agent.
    pub async fn configure(self) -> Result<Cluster> {
        let etcd = match self.shared_etcd {
            Some(etcd) => etcd,
            None => Arc::new(Etcd::start_secured(self.etcd_size, self.etcd_security).await?),
        };
        let root = crate::temp_root("pgherd-cluster-")?;
        let mut yaml = self.yaml;
        if self.backups {
            let repo = root.path().join("repository");
            std::fs::create_dir(&repo)
                .with_context(|| format!("cannot create {}", repo.display()))?;
            yaml.insert(
                0,
                format!(
                    "backup: {{repository: {:?}, compression: zstd, retention: {{full: 2}}}}",
                    repo.display().to_string()
                ),
            );
        }
        let mut cluster = Cluster {
            members: Vec::new(),
            etcd,
            name: self.name,
            yaml,
            root: Some(root),
        };
        for options in self.members {
            cluster.add_member(options)?;
        }
        Ok(cluster)
    }

    /// Starts etcd, then every member's agent at once.
    pub async fn start(self) -> Result<Cluster> {
        let cluster = self.configure().await?;
        cluster.start_all()?;
        Ok(cluster)
    }
}

/// A cluster as `pgherdctl list` shows it when all is well.
#[derive(Debug, Clone)]
pub struct Healthy {
    /// The member holding the leader key, `running`.
    pub leader: String,
    /// Every other running member, `streaming`, in name order.
    pub replicas: Vec<String>,
    pub list: Vec<ListedMember>,
}

/// etcd plus members, in one temp dir. Dropping it prints the tail of every log (test
/// runners show that output only for failing tests), kills every agent and PostgreSQL, then
/// etcd, and removes the temp dirs.
#[derive(Debug)]
pub struct Cluster {
    members: Vec<Member>,
    etcd: Arc<Etcd>,
    name: String,
    yaml: Vec<String>,
    root: Option<TempDir>,
}

impl Cluster {
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    /// etcd and `n` members with default options, all agents started at once.
    pub async fn start(n: usize) -> Result<Cluster> {
        Self::builder().members(n).start().await
    }

    /// The backup repository of a cluster built with [`ClusterBuilder::backups`]: the
    /// cluster's folder in it (`<repository>/<cluster>`).
    pub fn repository(&self) -> PathBuf {
        self.root
            .as_ref()
            .expect("a cluster's temp root exists until the cluster is dropped")
            .path()
            .join("repository")
            .join(&self.name)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn etcd(&self) -> &Etcd {
        &self.etcd
    }

    /// The etcd prefix of this cluster, `/pgherd/<name>/`.
    pub fn prefix(&self) -> String {
        format!("/pgherd/{}/", self.name)
    }

    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The member called `name`. Panics if there is none: that is a mistake in the test.
    pub fn member(&self, name: &str) -> &Member {
        match self.members.iter().find(|m| m.name() == name) {
            Some(m) => m,
            None => panic!(
                "no member {name:?} in this cluster (members: {:?})",
                self.members.iter().map(Member::name).collect::<Vec<_>>()
            ),
        }
    }

    /// Every member but the one called `name`, in member order.
    pub fn others(&self, name: &str) -> Vec<&Member> {
        self.members.iter().filter(|m| m.name() != name).collect()
    }

    /// Adds a member (default name `node<N>`) and writes its config; its agent is not started.
    pub fn add_member(&mut self, options: MemberOptions) -> Result<&Member> {
        let root = self
            .root
            .as_ref()
            .expect("a cluster's temp root exists until the cluster is dropped");
        let name = options
            .name
            .unwrap_or_else(|| format!("node{}", self.members.len() + 1));
        if self.members.iter().any(|m| m.name() == name) {
            bail!("the cluster already has a member {name}");
        }
        let mut extra_yaml = self.yaml.clone();
        extra_yaml.extend(options.yaml);
        let proxy = if options.etcd_proxy {
            Some(EtcdProxy::start(&self.etcd.endpoints())?)
        } else {
            None
        };
        let etcd_endpoints = match &proxy {
            Some(p) => p.endpoints(),
            None => self.etcd.endpoints(),
        };
        let spec = MemberSpec {
            cluster: self.name.clone(),
            dir: root.path().join(&name),
            name,
            etcd_endpoints,
            api_port: free_port()?,
            http_port: free_port()?,
            pg_port: free_port()?,
            tags: options.tags,
            extra_yaml,
        };
        self.members.push(Member::create(spec, proxy)?);
        Ok(self.members.last().expect("a member was just pushed"))
    }

    /// Starts every member whose agent is not running, one right after the other.
    pub fn start_all(&self) -> Result<()> {
        for member in self.members.iter().filter(|m| !m.is_running()) {
            member.start()?;
        }
        Ok(())
    }

    /// Starts `first` alone and waits until it leads, then starts the others and waits until
    /// they stream from it: the leader is known in advance.
    pub async fn start_with_leader(&self, first: &str, timeout: Duration) -> Result<Healthy> {
        self.member(first).start()?;
        let healthy = self.wait_healthy(timeout).await?;
        ensure!(
            healthy.leader == first,
            "{first} did not become the leader: {healthy:?}"
        );
        self.start_all()?;
        let healthy = self.wait_healthy(timeout).await?;
        ensure!(
            healthy.leader == first,
            "{first} lost the lead: {healthy:?}"
        );
        Ok(healthy)
    }

    /// `pgherdctl --config <first member's config> <args>`, whatever its exit status (every
    /// member's config names the same cluster, etcd and token).
    pub async fn ctl_output<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Result<CtlOutput> {
        let member = self
            .members
            .first()
            .context("the cluster has no member whose config pgherdctl could read")?;
        ctl_output(member, args).await
    }

    /// Runs `pgherdctl <args> --format json`, expects success, parses stdout.
    pub async fn ctl_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--format", "json"]);
        let out = self.ctl_output(&all).await?;
        out.expect_success()?;
        serde_json::from_str(out.stdout.trim())
            .with_context(|| format!("`{}` printed no JSON: {}", out.command, out.stdout))
    }

    /// The value of `/pgherd/<cluster>/<key>`, if it exists.
    pub async fn etcd_get(&self, key: &str) -> Result<Option<String>> {
        self.etcd.get(&format!("{}{key}", self.prefix())).await
    }

    /// The key-value pair (with its lease and revisions) of `/pgherd/<cluster>/<key>`.
    pub async fn etcd_get_kv(&self, key: &str) -> Result<Option<KeyValue>> {
        self.etcd.get_kv(&format!("{}{key}", self.prefix())).await
    }

    /// Every key of the cluster (without the prefix) with its value.
    pub async fn etcd_dump(&self) -> Result<Vec<(String, String)>> {
        let prefix = self.prefix();
        Ok(self
            .etcd
            .get_prefix(&prefix)
            .await?
            .into_iter()
            .map(|(k, v)| (k.strip_prefix(&prefix).unwrap_or(&k).to_string(), v))
            .collect())
    }

    /// The name in the `leader` key, if there is one.
    pub async fn leader_name(&self) -> Result<Option<String>> {
        self.etcd_get("leader").await
    }

    /// The member named by the `leader` key.
    pub async fn leader(&self) -> Result<&Member> {
        let name = self
            .leader_name()
            .await?
            .context("the cluster has no leader key")?;
        self.members
            .iter()
            .find(|m| m.name() == name)
            .with_context(|| format!("the leader key names {name:?}, which is not a member"))
    }

    /// `pgherdctl --endpoints <etcd> --cluster <name> list --format json`: straight to etcd,
    /// so it works whichever member is cut off from etcd or stopped.
    pub async fn list(&self) -> Result<Vec<ListedMember>> {
        if self.etcd.secured() {
            // pgherdctl takes etcd's CA, client certificate and password only from a
            // member's config.
            let member = self
                .members
                .first()
                .context("pgherdctl needs a member's config for a secured etcd")?;
            let config = member.config_path().display().to_string();
            let output = ctl_direct(&["--config", &config, "list", "--format", "json"]).await?;
            return parse_list(&output.stdout);
        }
        let endpoints = self.etcd.endpoints().join(",");
        let output = ctl_direct(&[
            "--endpoints",
            &endpoints,
            "--cluster",
            &self.name,
            "list",
            "--format",
            "json",
        ])
        .await?;
        parse_list(&output.stdout)
    }

    /// The `history` key: one entry per promotion, oldest first (empty if there is none).
    pub async fn history(&self) -> Result<Vec<HistoryEntry>> {
        match self.etcd_get("history").await? {
            None => Ok(Vec::new()),
            Some(text) => serde_json::from_str(&text)
                .with_context(|| format!("the history key is not a JSON array of entries: {text}")),
        }
    }

    /// Waits until the leader key names a member other than `old` whose agent lists it as
    /// `running`; returns its name.
    pub async fn wait_new_leader(&self, old: &str, timeout: Duration) -> Result<String> {
        wait_until(
            timeout,
            format!("a member other than {old} to hold the leader key and run"),
            || async {
                let leader = self.leader_name().await?.context("no leader key")?;
                ensure!(leader != old, "the leader key still names {old}");
                let list = self.list().await?;
                let listed = list
                    .iter()
                    .find(|m| m.name == leader)
                    .with_context(|| format!("{leader} holds the key but is not listed"))?;
                ensure!(
                    listed.state == "running",
                    "{leader} holds the key but is {}",
                    listed.state
                );
                Ok(leader)
            },
        )
        .await
    }

    /// Waits until `pgherdctl list` shows exactly the members whose agents run: one leader
    /// `running`, holding the leader key, and every other one a `streaming` replica.
    pub async fn wait_healthy(&self, timeout: Duration) -> Result<Healthy> {
        let expected: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.is_running())
            .map(|m| m.name().to_string())
            .collect();
        ensure!(!expected.is_empty(), "no agent is running");
        let what = format!(
            "one running leader and {} streaming replica(s) among {}",
            expected.len() - 1,
            expected.join(", ")
        );
        wait_until(timeout, what, || async {
            let list = self.list().await?;
            let leader_key = self.leader_name().await?;
            check_healthy(list, &expected, leader_key.as_deref())
        })
        .await
    }

    /// The tail of every member's logs and of etcd's.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for member in &self.members {
            out.push_str(&member.log_tails(lines));
        }
        out.push_str(&self.etcd.log_tails(lines / 4));
        out
    }
}

/// Whether `list` is one running leader (named by the leader key) plus streaming replicas,
/// exactly the `expected` members.
fn check_healthy(
    list: Vec<ListedMember>,
    expected: &[String],
    leader_key: Option<&str>,
) -> Result<Healthy> {
    let summary = list.iter().fold(String::new(), |mut s, m| {
        let _ = write!(s, "{} {}/{}; ", m.name, m.role, m.state);
        s
    });
    let mut names: Vec<&str> = list.iter().map(|m| m.name.as_str()).collect();
    names.sort_unstable();
    let mut want: Vec<&str> = expected.iter().map(String::as_str).collect();
    want.sort_unstable();
    ensure!(names == want, "listed {names:?}, want {want:?} ({summary})");
    let leaders: Vec<&ListedMember> = list.iter().filter(|m| m.role == "leader").collect();
    ensure!(leaders.len() == 1, "{} leaders ({summary})", leaders.len());
    let leader = leaders[0];
    ensure!(leader.state == "running", "leader not running ({summary})");
    ensure!(
        leader_key == Some(leader.name.as_str()),
        "leader key is {leader_key:?} but {} is listed as leader ({summary})",
        leader.name
    );
    let mut replicas = Vec::new();
    for m in list.iter().filter(|m| m.name != leader.name) {
        ensure!(
            m.role == "replica" && m.state == "streaming",
            "{} is {}/{} ({summary})",
            m.name,
            m.role,
            m.state
        );
        replicas.push(m.name.clone());
    }
    replicas.sort();
    Ok(Healthy {
        leader: leader.name.clone(),
        replicas,
        list,
    })
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let lines = std::env::var("PGHERD_LOG_LINES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_LOG_LINES);
        let why = if std::thread::panicking() {
            "the test panicked"
        } else {
            "shown by the test runner only if the test failed"
        };
        eprintln!(
            "===== pgherd harness: logs of cluster {} ({why}) =====\n{}",
            self.name,
            self.log_tails(lines)
        );
        // Agents and their PostgreSQL first, while etcd still runs; etcd drops after this.
        self.members.clear();
        if let Some(root) = self.root.take() {
            crate::dispose_temp_root(root);
        }
    }
}
