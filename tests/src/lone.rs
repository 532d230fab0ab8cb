//! One agent on its own, pointed at an etcd endpoint where nothing listens: it starts, serves
//! its API and loops ("etcd is unreachable; waiting") with neither etcd nor PostgreSQL, for
//! tests of what the process does around the loop (its log lines, systemd notifications).
//! Killed with its process group (its watchdog) and its temp dir removed on drop.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::process::Supervised;
use crate::Signal;

#[derive(Debug)]
pub struct LoneAgent {
    dir: Option<tempfile::TempDir>,
    config: PathBuf,
    log: PathBuf,
    api_port: u16,
    http_port: u16,
    process: Supervised,
}

impl LoneAgent {
    /// Writes the configuration (free loopback ports, an etcd port nobody listens on); the
    /// agent is not started.
    pub fn new() -> Result<LoneAgent> {
        let dir = crate::temp_root("pgherd-lone-")?;
        let (etcd, api, http, pg) = (
            crate::free_port()?,
            crate::free_port()?,
            crate::free_port()?,
            crate::free_port()?,
        );
        let data = dir.path().join("data");
        let yaml = format!(
            "cluster: lone\nname: lone1\n\
             etcd: {{endpoints: ['http://127.0.0.1:{etcd}']}}\n\
             api: {{listen: '127.0.0.1:{api}', connect_address: '127.0.0.1:{api}', plaintext: true, \
             auth_token: '{token}', http_listen: '127.0.0.1:{http}'}}\n\
             postgres: {{listen: '127.0.0.1:{pg}', connect_address: '127.0.0.1:{pg}', data_dir: '{data}', \
             superuser: {{username: postgres, password: '{su}'}}, \
             replication: {{username: replicator, password: '{repl}'}}}}\n\
             bootstrap: {{dcs: {{ttl: 4, loop_wait: 1, retry_timeout: 1}}}}\n",
            token = crate::TOKEN,
            data = data.display(),
            su = crate::SUPERUSER_PASSWORD,
            repl = crate::REPLICATION_PASSWORD,
        );
        let config = dir.path().join("lone1.yml");
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&config)
                .with_context(|| format!("cannot create {}", config.display()))?;
            f.write_all(yaml.as_bytes())
                .with_context(|| format!("cannot write {}", config.display()))?;
        }
        Ok(LoneAgent {
            log: dir.path().join("agent.log"),
            config,
            api_port: api,
            http_port: http,
            process: Supervised::new("pgherd-agent lone1"),
            dir: Some(dir),
        })
    }

    /// The agent's directory (config, log): a place for sockets the test binds.
    pub fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .expect("the temp dir lives as long as the LoneAgent")
            .path()
    }

    pub fn api_port(&self) -> u16 {
        self.api_port
    }

    pub fn http_port(&self) -> u16 {
        self.http_port
    }

    /// Starts `pgherd-agent --config <file> ARGS` with `env` added to the test's environment
    /// (`PGHERD_LOG_FORMAT` and `NOTIFY_SOCKET` removed first, so only `env` sets them);
    /// stdout and stderr go to one log file.
    pub fn start(&self, args: &[&str], env: &[(&str, &str)]) -> Result<u32> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        let mut cmd = Command::new(crate::agent_bin()?);
        cmd.arg("--config")
            .arg(&self.config)
            .args(args)
            .env_remove("PGHERD_LOG_FORMAT")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.process.spawn(&mut cmd, Signal::SIGKILL)
    }

    /// Everything the agent wrote on stdout and stderr.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_running(&self) -> bool {
        self.process.is_running()
    }

    /// SIGTERM, then waits for the exit at most `timeout` (then kills it and fails).
    pub async fn stop(&self, timeout: Duration) -> Result<ExitStatus> {
        self.process.signal(Signal::SIGTERM)?;
        match self.process.wait_exit(timeout).await {
            Ok(status) => Ok(status),
            Err(e) => {
                self.process.kill_group();
                Err(e.context("the lone agent did not stop after SIGTERM"))
            }
        }
    }

    /// Waits for the agent to exit on its own, at most `timeout`.
    pub async fn wait_exit(&self, timeout: Duration) -> Result<ExitStatus> {
        self.process.wait_exit(timeout).await
    }
}

impl Drop for LoneAgent {
    fn drop(&mut self) {
        self.process.kill_group();
        if let Some(dir) = self.dir.take() {
            crate::dispose_temp_root(dir);
        }
    }
}
