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
}

impl Event {
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Start => "on_start",
            Event::Stop => "on_stop",
            Event::Restart => "on_restart",
            Event::RoleChange => "on_role_change",
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
    let callback = run.event.as_str();
    let role = run.role.as_str();
    let mut words = run.command.split_whitespace();
    let Some(program) = words.next() else {
        return;
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(words)
        .args([callback, role, cluster])
        .stdin(Stdio::null())
        // Its output goes where the agent's goes.
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        // Its own group, so that a timeout kills whatever it started too.
        .process_group(0);
    let started = tokio::time::Instant::now();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(callback, role, command = %run.command, error = %e, "cannot run callback");
            return;
        }
    };
    let pid = child.id();
    tracing::info!(callback, role, command = %run.command, pid, "running callback");
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => tracing::info!(
            callback,
            pid,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "callback finished"
        ),
        Ok(Ok(status)) => tracing::warn!(
            callback,
            pid,
            %status,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "callback failed"
        ),
        Ok(Err(e)) => tracing::warn!(callback, pid, error = %e, "cannot wait for callback"),
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
        }
    }
}
