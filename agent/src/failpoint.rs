//! Named steps where a test can stop the agent dead, to hit the window between two actions
//! of a multi-step change on purpose (rule 7 of docs/architecture.md).
//!
//! `PGHERD_FAILPOINTS=step[,step...]` in the agent's environment: when the agent reaches a
//! listed step it logs `failpoint <step> reached: stopping` and sends itself SIGSTOP, which
//! freezes every thread at once as a hung agent would. The test then SIGKILLs the agent (and,
//! for a node crash, PostgreSQL) or resumes it. Without the variable a step costs one load
//! of a cached empty list.
//!
//! A few steps [`stall`] instead: only the task that reaches them stops (an await that never
//! ends) and the rest of the agent runs on, as with a loop stuck on a call that never
//! answers. `loop-stall`: the loop, right after it finished its first cycle.

use std::sync::OnceLock;

fn armed() -> &'static [String] {
    static ARMED: OnceLock<Vec<String>> = OnceLock::new();
    ARMED.get_or_init(|| {
        std::env::var("PGHERD_FAILPOINTS")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    })
}

/// Stops the agent here if the test armed `step`.
pub fn hit(step: &str) {
    if !armed().iter().any(|s| s == step) {
        return;
    }
    // The log goes to stderr unbuffered: the line is written before the process freezes.
    tracing::warn!(step, "failpoint {step} reached: stopping");
    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
}

/// Stops the task that reaches `step` for good if the test armed it; the other tasks of the
/// agent (the API, the systemd notifications) go on.
pub async fn stall(step: &str) {
    if !armed().iter().any(|s| s == step) {
        return;
    }
    tracing::warn!(
        step,
        "failpoint {step} reached: stalling this task for good"
    );
    std::future::pending::<()>().await
}

/// Fails the step here with an error if the test armed `fail-<step>`: the agent goes on
/// and takes its error path (an upgrade undone before the point of no return).
pub fn fail(step: &str) -> anyhow::Result<()> {
    let name = format!("fail-{step}");
    if armed().contains(&name) {
        tracing::warn!(step, "failpoint {name} reached: failing this step");
        anyhow::bail!("failpoint {name}");
    }
    Ok(())
}
