//! Waiting on conditions with a deadline instead of sleeping blindly.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use anyhow::{bail, Result};
use tokio::time::Instant;

/// Time between two checks.
const POLL: Duration = Duration::from_millis(100);

/// Runs `check` until it returns `Ok`, at most for `timeout`, and returns its value.
///
/// `check` says why the condition does not hold yet by returning an error (`anyhow::ensure!`
/// is handy); on timeout the error names `what` was awaited and carries the last check's
/// error, e.g. "timed out after 90 s waiting for one leader and 2 streaming replicas; last
/// check: node2 is replica/starting". A check that hangs is cut off at the deadline.
pub async fn wait_until<T, F, Fut>(timeout: Duration, what: impl Display, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let start = Instant::now();
    let deadline = start + timeout;
    let mut checks = 0u32;
    loop {
        checks += 1;
        // Every check gets a chance, even one started right at the deadline.
        let budget = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(50));
        let last = match tokio::time::timeout(budget, check()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => format!("{e:#}"),
            Err(_) => "the check itself was still running at the deadline".to_string(),
        };
        if Instant::now() + POLL > deadline {
            bail!(
                "timed out after {:.1} s waiting for {what} ({checks} checks); last check: {last}",
                start.elapsed().as_secs_f64()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Checks `check` every 100 ms for `duration` and fails at the first check that fails: for
/// properties that must hold for a while ("no member takes the leader key for 12 s"), not
/// for conditions to wait for. A check that hangs past the window counts as a failure.
pub async fn hold_for<F, Fut>(duration: Duration, what: impl Display, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let start = Instant::now();
    let end = start + duration;
    let mut checks = 0u32;
    loop {
        checks += 1;
        let budget = end
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(5));
        match tokio::time::timeout(budget, check()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => bail!(
                "{what} stopped holding after {:.1} s (check {checks}): {e:#}",
                start.elapsed().as_secs_f64()
            ),
            Err(_) => bail!(
                "{what}: check {checks} hung for {:.1} s",
                budget.as_secs_f64()
            ),
        }
        if Instant::now() >= end {
            return Ok(());
        }
        tokio::time::sleep(POLL.min(end.saturating_duration_since(Instant::now()))).await;
    }
}
