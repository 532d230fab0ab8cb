//! The agent under systemd (`Type=notify`, `WatchdogSec=`): the test binds the notification
//! socket systemd would and passes `NOTIFY_SOCKET` and `WATCHDOG_USEC` as systemd does. The
//! agent says READY=1 once its loop finished a cycle (member key published, API up), STATUS=
//! with its role, WATCHDOG=1 every half interval while the loop runs, and STOPPING=1 on
//! SIGTERM; a loop that is stuck (the rest of the process running) gets no more pings.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use pgherd_tests::{http_get, wait_until, Cluster, LoneAgent};
use tokio::time::Instant;

/// initdb and the first start of PostgreSQL on a loaded 2-core machine.
const BRINGUP: Duration = Duration::from_secs(90);
/// The watchdog interval the tests pass (`WATCHDOG_USEC`): above loop_wait (1 s) plus a
/// cycle's work, so a healthy loop is never taken for a stuck one.
const WATCHDOG: Duration = Duration::from_secs(3);

/// The datagrams the agent sent, each with when it arrived.
struct NotifySocket {
    path: std::path::PathBuf,
    received: Arc<Mutex<Vec<(Instant, String)>>>,
    reader: tokio::task::JoinHandle<()>,
}

impl NotifySocket {
    fn bind(dir: &std::path::Path) -> Result<NotifySocket> {
        let path = dir.join("notify.sock");
        let socket = tokio::net::UnixDatagram::bind(&path)
            .with_context(|| format!("cannot bind {}", path.display()))?;
        let received: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
        let sink = received.clone();
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf).await {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                if let Ok(mut r) = sink.lock() {
                    r.push((Instant::now(), text));
                }
            }
        });
        Ok(NotifySocket {
            path,
            received,
            reader,
        })
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("NOTIFY_SOCKET", self.path.display().to_string()),
            ("WATCHDOG_USEC", WATCHDOG.as_micros().to_string()),
        ]
    }

    /// Every `KEY=value` line received, with its arrival time.
    fn lines(&self) -> Vec<(Instant, String)> {
        let received = self.received.lock().map(|r| r.clone()).unwrap_or_default();
        received
            .into_iter()
            .flat_map(|(at, text)| {
                text.lines()
                    .map(|l| (at, l.to_string()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn times_of(&self, line: &str) -> Vec<Instant> {
        self.lines()
            .into_iter()
            .filter(|(_, l)| l == line)
            .map(|(at, _)| at)
            .collect()
    }

    async fn wait_for(&self, line: &str, timeout: Duration) -> Result<Instant> {
        wait_until(
            timeout,
            format!("{line} on the notification socket"),
            || {
                let first = self.times_of(line).first().copied();
                let seen = self.lines();
                async move { first.with_context(|| format!("received so far: {seen:?}")) }
            },
        )
        .await
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_systemd_the_agent_is_ready_after_its_first_cycle_pings_while_it_loops_and_says_stopping(
) -> Result<()> {
    let cluster = Cluster::builder().members(1).configure().await?;
    let member = cluster.member("node1");
    let socket = NotifySocket::bind(member.dir())?;
    let env = socket.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    member.set_env(&env);
    let started = Instant::now();
    cluster.start_all()?;

    let ready = socket.wait_for("READY=1", BRINGUP).await?;
    // By READY=1 the first cycle published the member key and the HTTP API answers.
    ensure!(
        cluster.etcd_get("members/node1").await?.is_some(),
        "READY=1 came before node1's member key was published"
    );
    http_get(member.http_port(), "GET", "/liveness")
        .await
        .context("READY=1 came before the HTTP API answered")?;
    cluster.wait_healthy(BRINGUP).await?;
    wait_until(BRINGUP, "a STATUS= line for the running leader", || {
        let statuses: Vec<String> = socket
            .lines()
            .into_iter()
            .map(|(_, l)| l)
            .filter(|l| l.starts_with("STATUS="))
            .collect();
        async move {
            ensure!(
                statuses
                    .iter()
                    .any(|s| s.starts_with("STATUS=leader (running): ")),
                "statuses so far: {statuses:?}"
            );
            Ok(())
        }
    })
    .await?;

    // A healthy loop: a ping every half interval. Watch 3 intervals: 6 pings expected, at
    // least 4 demanded (a slow cycle may hold one back).
    let window_start = Instant::now();
    tokio::time::sleep(WATCHDOG * 3).await;
    let pings = socket
        .times_of("WATCHDOG=1")
        .into_iter()
        .filter(|t| *t >= window_start)
        .count();
    ensure!(
        pings >= 4,
        "{pings} watchdog pings in {:?} with WATCHDOG_USEC {:?}:\n{}",
        WATCHDOG * 3,
        WATCHDOG,
        member.log_tails(40)
    );

    let stop_sent = Instant::now();
    let status = member.stop().await?;
    ensure!(status.success(), "node1 exited with {status}");
    let stopping = socket
        .wait_for("STOPPING=1", Duration::from_secs(5))
        .await?;
    ensure!(
        stopping >= stop_sent,
        "STOPPING=1 arrived before the agent was stopped"
    );
    ensure!(
        socket.times_of("READY=1").len() == 1,
        "READY=1 sent more than once: {:?}",
        socket.lines()
    );
    eprintln!(
        "figures: READY=1 {:.1} s after start; {pings} pings in {:?}",
        (ready - started).as_secs_f64(),
        WATCHDOG * 3
    );
    Ok(())
}

/// The pings follow the loop, not a timer: with the loop stuck on an await that never ends
/// (failpoint `loop-stall`, right after its first cycle) the process still answers HTTP, but
/// the pings stop within one interval, so systemd would kill and restart it.
#[tokio::test]
async fn watchdog_pings_stop_when_the_loop_is_stuck_though_the_process_runs() -> Result<()> {
    let agent = LoneAgent::new()?;
    let socket = NotifySocket::bind(agent.dir())?;
    let mut env = socket.env();
    env.push(("PGHERD_FAILPOINTS", "loop-stall".to_string()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    agent.start(&[], &env)?;

    socket.wait_for("READY=1", Duration::from_secs(30)).await?;
    wait_until(Duration::from_secs(30), "the loop-stall failpoint", || {
        let reached = agent.log().contains("failpoint loop-stall reached");
        async move {
            ensure!(reached, "not yet");
            Ok(())
        }
    })
    .await?;
    let stalled = Instant::now();
    // Two more intervals: the process lives and serves HTTP; no ping after the first interval
    // (plus the notifier's 0.2 s tick and some slack).
    let quiet_from = stalled + WATCHDOG + Duration::from_millis(700);
    tokio::time::sleep_until(stalled + WATCHDOG * 3).await;
    ensure!(agent.is_running(), "the agent exited:\n{}", agent.log());
    http_get(agent.http_port(), "GET", "/liveness")
        .await
        .context("the stuck agent's HTTP server does not answer")?;
    let pings = socket.times_of("WATCHDOG=1");
    ensure!(!pings.is_empty(), "no ping at all before the stall");
    let late: Vec<f64> = pings
        .iter()
        .filter(|t| **t > quiet_from)
        .map(|t| (*t - stalled).as_secs_f64())
        .collect();
    ensure!(
        late.is_empty(),
        "pings went on {late:?} s after the loop stalled (WATCHDOG_USEC {WATCHDOG:?})"
    );
    ensure!(
        agent
            .log()
            .contains("the loop has not finished a cycle within the systemd watchdog interval"),
        "no ERROR line about the stuck loop:\n{}",
        agent.log()
    );
    eprintln!(
        "figures: {} pings, the last {:.1} s after the failpoint line was seen",
        pings.len(),
        pings
            .last()
            .map(|t| t.saturating_duration_since(stalled).as_secs_f64())
            .unwrap_or_default()
    );
    Ok(())
}
