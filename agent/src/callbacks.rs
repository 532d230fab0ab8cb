//! User callbacks (`callbacks.on_start`, `on_stop`, `on_restart`, `on_role_change`), run the
//! way Patroni runs them: `<command> <action> <role> <cluster>`, e.g. `notify on_role_change
//! primary demo`.
//!
//! The loop only queues a run; one worker task runs them one after another, in the order
//! they happened, so a script sees `on_stop` before the `on_start` that follows it. Each run
//! is a process group of its own (as the agent's user); at `callbacks.timeout` the whole
//! group is killed with SIGKILL, so a hanging callback delays later callbacks by at most the
//! timeout and never the loop. One log line when a callback starts and one when it ends.

use std::process::Stdio;
use std::time::Duration;

use pgherd_config::Config;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// What happened to PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Start,
    Stop,
    Restart,
    RoleChange,
    Reload,
}

impl Event {
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Start => "on_start",
            Event::Stop => "on_stop",
            Event::Restart => "on_restart",
            Event::RoleChange => "on_role_change",
            Event::Reload => "on_reload",
        }
    }
}

/// The role PostgreSQL has (or had, for `on_stop`) when the callback fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgRole {
    Primary,
    Replica,
}

impl PgRole {
    pub fn as_str(self) -> &'static str {
        match self {
            PgRole::Primary => "primary",
            PgRole::Replica => "replica",
        }
    }

    pub fn of(in_recovery: bool) -> PgRole {
        if in_recovery {
            PgRole::Replica
        } else {
            PgRole::Primary
        }
    }
}

struct Run {
    event: Event,
    role: PgRole,
    command: String,
}

/// The callback runner: cheap to fire, owned by the loop.
pub struct Callbacks {
    cfg: pgherd_config::Callbacks,
    queue: Option<mpsc::UnboundedSender<Run>>,
    worker: Option<JoinHandle<()>>,
}

impl Callbacks {
    /// Starts the worker when at least one callback is configured.
    pub fn new(cfg: &Config) -> Callbacks {
        let callbacks = cfg.callbacks.clone();
        if callbacks.commands().iter().all(|(_, c)| c.is_none()) {
            return Callbacks {
                cfg: callbacks,
                queue: None,
                worker: None,
            };
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let timeout = callbacks.timeout();
        let worker = tokio::spawn(work(rx, cfg.cluster.clone(), timeout));
        Callbacks {
            cfg: callbacks,
            queue: Some(tx),
            worker: Some(worker),
        }
    }

    /// Queues `event`'s callback, if one is configured; never waits.
    pub fn fire(&self, event: Event, role: PgRole) {
        let command = match event {
            Event::Start => &self.cfg.on_start,
            Event::Stop => &self.cfg.on_stop,
            Event::Restart => &self.cfg.on_restart,
            Event::RoleChange => &self.cfg.on_role_change,
            Event::Reload => &self.cfg.on_reload,
        };
        let (Some(command), Some(queue)) = (command, &self.queue) else {
            return;
        };
        let run = Run {
            event,
            role,
            command: command.clone(),
        };
        if queue.send(run).is_err() {
            tracing::warn!(
                callback = event.as_str(),
                "the callback worker is gone; callback not run"
            );
        }
    }

    /// At shutdown: lets queued callbacks run (the last one is usually `on_stop`), for at
    /// most `limit`; whatever is still running then is left to finish on its own.
    pub async fn finish(&mut self, limit: Duration) {
        self.queue = None;
        if let Some(worker) = self.worker.take() {
            if tokio::time::timeout(limit, worker).await.is_err() {
                tracing::warn!(
                    limit_s = limit.as_secs(),
                    "callbacks still running at shutdown; not waiting for them"
                );
            }
        }
    }
}

async fn work(mut queue: mpsc::UnboundedReceiver<Run>, cluster: String, timeout: Duration) {
    while let Some(run) = queue.recv().await {
        execute(&run, &cluster, timeout).await;
    }
}

async fn execute(run: &Run, cluster: &str, timeout: Duration) {
    let args = [run.event.as_str(), run.role.as_str(), cluster].map(str::to_string);
    // Failures are logged by `run_and_wait`; the queue goes on.
    let _ = run_and_wait(run.event.as_str(), &run.command, &args, &[], timeout).await;
}

/// Runs `command` (a program and fixed arguments separated by spaces) with `args` and
/// `env` added, in its own process group, and waits for it at most `timeout` (then the
/// group is killed). One log line when it starts and one when it ends; `Err` says why it
/// did not succeed. Its output goes where the agent's goes.
pub async fn run_and_wait(
    callback: &str,
    command: &str,
    args: &[String],
    env: &[(String, String)],
    timeout: Duration,
) -> Result<(), String> {
    let mut words = command.split_whitespace();
    let Some(program) = words.next() else {
        return Err(format!("callbacks.{callback} names no program"));
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(words)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        // Its own group, so that a timeout kills whatever it started too.
        .process_group(0);
    let started = tokio::time::Instant::now();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(callback, command, error = %e, "cannot run callback");
            return Err(format!("cannot run {command:?}: {e}"));
        }
    };
    let pid = child.id();
    tracing::info!(callback, command, pid, "running callback");
    let elapsed_ms = || started.elapsed().as_millis() as u64;
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => {
            tracing::info!(
                callback,
                pid,
                elapsed_ms = elapsed_ms(),
                "callback finished"
            );
            Ok(())
        }
        Ok(Ok(status)) => {
            tracing::warn!(callback, pid, %status, elapsed_ms = elapsed_ms(), "callback failed");
            Err(format!("{command:?} ended with {status}"))
        }
        Ok(Err(e)) => {
            tracing::warn!(callback, pid, error = %e, "cannot wait for callback");
            Err(format!("cannot wait for {command:?}: {e}"))
        }
        Err(_) => {
            if let Some(pid) = pid {
                // The group's id is the leader's pid; it exists while the leader is unreaped.
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = child.wait().await;
            tracing::warn!(
                callback,
                pid,
                timeout_s = timeout.as_secs(),
                "callback timed out: killed its process group"
            );
            Err(format!(
                "{command:?} did not finish within callbacks.timeout ({} s); killed",
                timeout.as_secs()
            ))
        }
    }
}
