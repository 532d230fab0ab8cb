//! One member: an agent process with its config file, data directory and logs.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, SystemTime};

use anyhow::{ensure, Context, Result};
use serde_yaml::{Mapping, Value};

use crate::config::{member_yaml, MemberSpec};
use crate::pg::{chown_to_postgres, kill_postmaster, postmaster_pid, PgConn};
use crate::process::{tail, Paused, Supervised};
use crate::proxy::EtcdProxy;
use crate::Signal;

/// How long an agent may take to exit after SIGTERM (it stops PostgreSQL fast first).
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// Starts the line the harness writes to `agent.log` before each start of the agent.
const START_MARKER: &str = "==== pgherd harness: starting ";

/// The time at the start of an agent log line (`2026-01-02T03:04:05.123456Z LOG:  ...`).
pub fn log_line_time(line: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339(line.split_whitespace().next()?).ok()
}

/// Per-member choices for [`crate::ClusterBuilder::member`] and [`crate::Cluster::add_member`].
#[derive(Debug, Clone, Default)]
pub struct MemberOptions {
    pub(crate) name: Option<String>,
    pub(crate) tags: Mapping,
    pub(crate) yaml: Vec<String>,
    pub(crate) etcd_proxy: bool,
}

impl MemberOptions {
    pub fn new() -> Self {
        Self::default()
    }

    /// The member name (default `node<N>`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// A `tags:` entry, e.g. `.tag("nofailover", true)` or `.tag("failover_priority", 2)`.
    pub fn tag(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.tags.insert(Value::from(key), value.into());
        self
    }

    /// YAML merged over the generated config, after the cluster-wide extra YAML; `null`
    /// deletes a key (see [`crate::merge_yaml`]).
    pub fn yaml(mut self, yaml: impl Into<String>) -> Self {
        self.yaml.push(yaml.into());
        self
    }

    /// The member reaches etcd through its own [`EtcdProxy`] (see [`Member::etcd_proxy`]), so
    /// a test can cut it off while the others still reach etcd.
    pub fn through_etcd_proxy(mut self) -> Self {
        self.etcd_proxy = true;
        self
    }
}

/// One member of a [`crate::Cluster`]. On drop its agent is killed with its process group and
/// any PostgreSQL left on its data directory is killed too.
#[derive(Debug)]
pub struct Member {
    spec: MemberSpec,
    config_path: PathBuf,
    agent_log: PathBuf,
    process: Supervised,
    /// Dropped after the agent is killed (see `Drop`).
    proxy: Option<EtcdProxy>,
    /// Failpoints every later start of the agent is armed with (`set_failpoints`).
    failpoints: std::sync::Mutex<Vec<String>>,
    /// Environment variables every later start of the agent gets (`set_env`).
    env: std::sync::Mutex<Vec<(String, String)>>,
}

impl Member {
    /// Creates the member's directory and writes its config; the agent is not started. The
    /// directory is mode 0755 and owned by `postgres` (when the tests run as root): it is
    /// PostgreSQL's socket directory, where the postmaster creates its socket and lock file.
    pub(crate) fn create(spec: MemberSpec, proxy: Option<EtcdProxy>) -> Result<Member> {
        std::fs::create_dir_all(&spec.dir)
            .with_context(|| format!("cannot create {}", spec.dir.display()))?;
        std::fs::set_permissions(&spec.dir, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("cannot chmod 0755 {}", spec.dir.display()))?;
        chown_to_postgres(&spec.dir)?;
        let member = Member {
            config_path: spec.dir.join("pgherd.yml"),
            agent_log: spec.dir.join("agent.log"),
            process: Supervised::new(format!("pgherd-agent of {}", spec.name)),
            spec,
            proxy,
            failpoints: Default::default(),
            env: Default::default(),
        };
        member.write_config(&member_yaml(&member.spec)?)?;
        Ok(member)
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn cluster(&self) -> &str {
        &self.spec.cluster
    }

    /// The member's directory: config, logs, data directory and socket.
    pub fn dir(&self) -> &Path {
        &self.spec.dir
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// `<member dir>/data`, created by the agent.
    pub fn data_dir(&self) -> PathBuf {
        self.spec.data_dir()
    }

    /// The agent's stdout and stderr (appended to across restarts).
    pub fn agent_log_path(&self) -> &Path {
        &self.agent_log
    }

    /// PostgreSQL's own log, `<data_dir>.log`.
    pub fn postgres_log_path(&self) -> PathBuf {
        self.dir().join("data.log")
    }

    pub fn pg_port(&self) -> u16 {
        self.spec.pg_port
    }

    pub fn api_port(&self) -> u16 {
        self.spec.api_port
    }

    /// The port of the agent's HTTP health checks and metrics (`api.http_listen`).
    pub fn http_port(&self) -> u16 {
        self.spec.http_port
    }

    /// `GET <path>` on this member's HTTP port (see [`crate::http_get`]).
    pub async fn http_get(&self, path: &str) -> Result<crate::HttpResponse> {
        crate::http_get(self.spec.http_port, "GET", path).await
    }

    /// The spec the config file was generated from.
    pub fn spec(&self) -> &MemberSpec {
        &self.spec
    }

    /// Replaces the config file (takes effect at the agent's next start). Mode 0600, as in
    /// production: it holds the API token and the passwords, and PostgreSQL's tools read the
    /// WAL settings the agent writes beside it instead (issue 13 item 10).
    pub fn write_config(&self, text: &str) -> Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&self.config_path)?;
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            f.write_all(text.as_bytes())
        };
        write().with_context(|| format!("cannot write {}", self.config_path.display()))
    }

    /// Writes `<member dir>/<file_name>`: this member's config with `yaml` merged over it
    /// (`null` deletes a key, see [`crate::merge_yaml`]), e.g. a copy without
    /// `api.auth_token` for pgherdctl; returns its path. The agent keeps its own file.
    pub fn write_config_copy(&self, file_name: &str, yaml: &str) -> Result<PathBuf> {
        let text = std::fs::read_to_string(&self.config_path)
            .with_context(|| format!("cannot read {}", self.config_path.display()))?;
        let mut config: Value = serde_yaml::from_str(&text)
            .with_context(|| format!("{} is not YAML", self.config_path.display()))?;
        let extra: Value = serde_yaml::from_str(yaml)
            .with_context(|| format!("the YAML to merge is not valid:\n{yaml}"))?;
        crate::merge_yaml(&mut config, extra);
        let path = self.spec.dir.join(file_name);
        let text = serde_yaml::to_string(&config).context("cannot write a config as YAML")?;
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    }

    /// The superuser connection to this member's PostgreSQL.
    pub fn pg(&self) -> PgConn {
        PgConn::superuser(self.spec.pg_port)
    }

    /// Starts `pgherd-agent --config <config>`, output appended to `agent.log`; returns its
    /// pid. Fails if it is already running.
    pub fn start(&self) -> Result<u32> {
        let steps = self
            .failpoints
            .lock()
            .map(|f| f.join(","))
            .unwrap_or_default();
        self.start_armed(&steps)
    }

    /// Arms every later start of the agent (also the cluster's) to freeze itself (SIGSTOP)
    /// at the named steps (`agent/src/failpoint.rs`); an empty list disarms.
    pub fn set_failpoints(&self, steps: &[&str]) {
        if let Ok(mut f) = self.failpoints.lock() {
            *f = steps.iter().map(|s| s.to_string()).collect();
        }
    }

    /// Gives every later start of the agent these environment variables (e.g. systemd's
    /// `NOTIFY_SOCKET`), replacing the ones set before.
    pub fn set_env(&self, vars: &[(&str, &str)]) {
        if let Ok(mut env) = self.env.lock() {
            *env = vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        }
    }

    /// `set_failpoints` then `start`; `wait_failpoint` waits until the agent got there.
    pub fn start_with_failpoints(&self, steps: &[&str]) -> Result<u32> {
        self.set_failpoints(steps);
        self.start()
    }

    fn start_armed(&self, steps: &str) -> Result<u32> {
        let agent = crate::agent_bin()?;
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.agent_log)
            .with_context(|| format!("cannot open {}", self.agent_log.display()))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        writeln!(
            log,
            "{START_MARKER}{} --config {} (unix time {:.3}) ====",
            agent.display(),
            self.config_path.display(),
            now.as_secs_f64()
        )?;
        let mut cmd = Command::new(&agent);
        cmd.arg("--config")
            .arg(&self.config_path)
            .env("RUST_BACKTRACE", "1")
            .env("PGHERD_FAILPOINTS", steps)
            .envs(self.env.lock().map(|e| e.clone()).unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // If the test process dies, the agent gets SIGTERM: it stops PostgreSQL on its way out.
        self.process.spawn(&mut cmd, Signal::SIGTERM)
    }

    /// Waits until the agent (started with `start_with_failpoints`) froze itself at `step`.
    pub async fn wait_failpoint(&self, step: &str, timeout: Duration) -> Result<()> {
        let needle = format!("failpoint {step} reached");
        let what = format!("{} to reach failpoint {step}", self.name());
        crate::wait::wait_until(timeout, what, || {
            let found = self.agent_log_of_last_start().contains(&needle);
            async move {
                anyhow::ensure!(found, "not reached yet");
                Ok(())
            }
        })
        .await
    }

    /// The agent's pid while it runs (or has exited but is not yet reaped).
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    pub fn is_running(&self) -> bool {
        self.process.is_running()
    }

    /// `Some(status)` once the agent has exited.
    pub fn try_exit(&self) -> Result<Option<ExitStatus>> {
        self.process.try_exit()
    }

    /// Sends `signal` to the agent alone.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        self.process.signal(signal)
    }

    /// Waits for the agent to exit on its own, at most `timeout`.
    pub async fn wait_exit(&self, timeout: Duration) -> Result<ExitStatus> {
        self.process.wait_exit(timeout).await
    }

    /// SIGTERM and wait for the agent to exit (it stops PostgreSQL and removes its keys
    /// first); if it is still running after 60 s it is killed and this fails.
    pub async fn stop(&self) -> Result<ExitStatus> {
        self.signal(Signal::SIGTERM)?;
        match self.process.wait_exit(STOP_TIMEOUT).await {
            Ok(status) => Ok(status),
            Err(e) => {
                self.process.kill_group();
                Err(e.context(format!("{} did not stop after SIGTERM", self.name())))
            }
        }
    }

    /// SIGKILL for the agent alone, as in a crash: its PostgreSQL keeps running (unless the
    /// agent arranged otherwise).
    pub fn kill(&self) -> Result<Option<ExitStatus>> {
        self.process.kill()
    }

    /// Freezes the agent with SIGSTOP (its watchdog and PostgreSQL keep running); it is
    /// thawed when the guard drops, if the cleanup has not killed it first.
    pub fn pause_agent(&self) -> Result<Paused> {
        let pid = self
            .pid()
            .with_context(|| format!("{}'s agent is not running", self.name()))?;
        Paused::pause(pid as i32, format!("pgherd-agent of {}", self.name()))
    }

    /// As close to a power cut as processes get: SIGKILL for PostgreSQL's process group (the
    /// postmaster and every backend) and for the agent's (the agent and its watchdog), with
    /// no chance for either to react. Returns the postmaster's pid, if one ran.
    pub fn crash(&self) -> Result<Option<i32>> {
        let postmaster = self.postmaster_pid();
        if let Some(pid) = postmaster {
            // Every backend runs in a session of its own: kill them one by one, as a power
            // cut would, not just the postmaster's process group.
            pgherd_watchdog::kill_postgres(pid);
        }
        self.process.kill_group();
        Ok(postmaster)
    }

    /// The pid of the live postmaster on this member's data directory.
    pub fn postmaster_pid(&self) -> Option<i32> {
        postmaster_pid(&self.data_dir())
    }

    /// The proxy this member reaches etcd through, if it was created with
    /// [`MemberOptions::through_etcd_proxy`].
    pub fn etcd_proxy(&self) -> Option<&EtcdProxy> {
        self.proxy.as_ref()
    }

    /// The whole agent log.
    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(&self.agent_log).unwrap_or_default()
    }

    /// The agent log since the harness last started the agent.
    pub fn agent_log_of_last_start(&self) -> String {
        let log = self.agent_log();
        match log.rfind(START_MARKER) {
            Some(i) => log[i..].to_string(),
            None => log,
        }
    }

    /// Fails unless the agent log since the last start says pg_rewind ran: the member came
    /// back to a new timeline by rewinding its data.
    pub fn ensure_rewound(&self) -> Result<()> {
        let log = self.agent_log_of_last_start();
        ensure!(
            log.contains("pg_rewind finished"),
            "{}'s agent log since its restart does not say pg_rewind ran:\n{log}",
            self.name()
        );
        Ok(())
    }

    /// The timestamps of the agent log lines that contain `needle`, in order.
    pub fn agent_log_times(&self, needle: &str) -> Vec<SystemTime> {
        self.agent_log()
            .lines()
            .filter(|l| l.contains(needle))
            .filter_map(log_line_time)
            .collect()
    }

    /// The tails of `agent.log` and `data.log`, for failure reports.
    pub fn log_tails(&self, lines: usize) -> String {
        format!(
            "----- {} agent ({}) -----\n{}\n----- {} postgres ({}) -----\n{}\n",
            self.name(),
            self.agent_log.display(),
            tail(&self.agent_log, lines),
            self.name(),
            self.postgres_log_path().display(),
            tail(&self.postgres_log_path(), lines / 2),
        )
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        // The agent first, so that it cannot start PostgreSQL again behind our back.
        self.process.kill_group();
        kill_postmaster(&self.data_dir());
    }
}
