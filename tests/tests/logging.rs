//! The agent's log as an operator's tools read it: with `--log-format json` (or
//! `PGHERD_LOG_FORMAT=json`) every line the process writes is one JSON object with the time,
//! tracing's level, PostgreSQL's severity (`error_severity`, as in PostgreSQL's jsonlog), the
//! target, the message and the same fields and member span the text line has; the text line
//! carries the severity as PostgreSQL's stderr log does (`LOG:  `, `FATAL:  `).

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use pgherd_tests::{wait_until, LoneAgent};

/// Start-up and a few loop cycles (1 s apart) on a loaded 2-core machine.
const CYCLES: Duration = Duration::from_secs(30);
const STOP: Duration = Duration::from_secs(30);

/// PostgreSQL's severity for each tracing level the agent logs at (`agent/src/logging.rs`).
fn expected_severity(level: &str, severity: &str) -> bool {
    matches!(
        (level, severity),
        ("ERROR", "ERROR" | "FATAL")
            | ("WARN", "WARNING")
            | ("INFO", "LOG")
            | ("DEBUG", "DEBUG1")
            | ("TRACE", "DEBUG2")
    )
}

/// Every line of `log` as a JSON object with the members every line has, checked.
fn json_lines(log: &str) -> Result<Vec<serde_json::Value>> {
    let mut out = Vec::new();
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("a log line is not JSON: {line}"))?;
        ensure!(v.is_object(), "a log line is not a JSON object: {line}");
        for key in ["timestamp", "level", "error_severity", "target", "message"] {
            ensure!(
                v[key].is_string(),
                "no string `{key}` in the log line {line}"
            );
        }
        let time = v["timestamp"].as_str().unwrap_or_default();
        ensure!(
            humantime::parse_rfc3339(time).is_ok(),
            "timestamp {time:?} is not RFC 3339 in {line}"
        );
        let (level, severity) = (
            v["level"].as_str().unwrap_or_default(),
            v["error_severity"].as_str().unwrap_or_default(),
        );
        ensure!(
            expected_severity(level, severity),
            "level {level} logged with severity {severity}: {line}"
        );
        out.push(v);
    }
    Ok(out)
}

async fn wait_for_lines(agent: &LoneAgent, needle: &str, count: usize) -> Result<()> {
    wait_until(
        CYCLES,
        format!("{count} log lines containing {needle:?}"),
        || {
            let seen = agent.log().matches(needle).count();
            async move {
                ensure!(seen >= count, "{seen} so far");
                Ok(())
            }
        },
    )
    .await
}

#[tokio::test]
async fn json_log_lines_are_objects_with_postgresql_severity_and_the_text_lines_fields(
) -> Result<()> {
    let agent = LoneAgent::new()?;
    agent.start(&["--log-format", "json"], &[])?;
    wait_for_lines(&agent, "cannot read the cluster state from etcd", 3).await?;
    let status = agent.stop(STOP).await?;
    ensure!(
        status.success(),
        "the agent exited with {status} after SIGTERM"
    );

    let log = agent.log();
    let lines = json_lines(&log)?;
    let severities: std::collections::BTreeSet<&str> = lines
        .iter()
        .filter_map(|v| v["error_severity"].as_str())
        .collect();
    ensure!(
        severities.contains("LOG") && severities.contains("WARNING"),
        "expected LOG and WARNING lines, saw {severities:?}:\n{log}"
    );
    // The decision line: its fields next to the message, the member's span as in the text
    // line's `agent{member=lone1}`.
    let decision = lines
        .iter()
        .find(|v| v["message"] == "decision")
        .with_context(|| format!("no decision line:\n{log}"))?;
    ensure!(
        decision["role"] == "replica"
            && decision["reason"]
                .as_str()
                .is_some_and(|r| r.contains("etcd is unreachable"))
            && decision["error_severity"] == "LOG"
            && decision["span"]["member"] == "lone1"
            && decision["spans"][0]["name"] == "agent",
        "unexpected decision line: {decision}"
    );
    let unreachable = lines
        .iter()
        .find(|v| v["message"] == "cannot read the cluster state from etcd")
        .context("no etcd warning")?;
    ensure!(
        unreachable["error_severity"] == "WARNING" && unreachable["error"].is_string(),
        "unexpected etcd warning: {unreachable}"
    );
    ensure!(
        lines
            .iter()
            .any(|v| v["message"] == "SIGTERM: shutting down"),
        "no line about SIGTERM:\n{log}"
    );
    // No secret of the configuration reaches the log.
    for secret in [
        pgherd_tests::TOKEN,
        pgherd_tests::SUPERUSER_PASSWORD,
        pgherd_tests::REPLICATION_PASSWORD,
    ] {
        ensure!(!log.contains(secret), "the log holds a secret:\n{log}");
    }
    Ok(())
}

/// An agent that cannot bind its API port exits with one FATAL line: in JSON (chosen by the
/// environment variable) nothing else is written, in text the severity starts the line.
#[tokio::test]
async fn an_agent_that_cannot_start_logs_fatal_in_json_and_in_text() -> Result<()> {
    let agent = LoneAgent::new()?;
    let _taken = std::net::TcpListener::bind(("127.0.0.1", agent.api_port()))
        .context("cannot hold the agent's API port")?;

    agent.start(&[], &[("PGHERD_LOG_FORMAT", "json")])?;
    let status = agent.wait_exit(CYCLES).await?;
    ensure!(!status.success(), "the agent exited with {status}");
    let json_log = agent.log();
    let lines = json_lines(&json_log)?;
    let last = lines
        .last()
        .with_context(|| "the agent wrote nothing".to_string())?;
    ensure!(
        last["error_severity"] == "FATAL"
            && last["level"] == "ERROR"
            && last["message"] == "pgherd-agent stopped"
            && last["error"].is_string(),
        "the last line is not the FATAL one: {last}"
    );
    ensure!(
        lines[0]["error_severity"] == "LOG" && lines[0]["message"] == "pgherd-agent starting",
        "the first line is not the LOG line of the start: {}",
        lines[0]
    );

    agent.start(&["--log-format", "text"], &[])?;
    let status = agent.wait_exit(CYCLES).await?;
    ensure!(!status.success(), "the agent exited with {status}");
    let log = agent.log();
    let text = log
        .strip_prefix(json_log.as_str())
        .context("the log was rewritten")?;
    let mut severities = Vec::new();
    for line in text.lines() {
        // The one plain line text mode adds for a person at a terminal.
        if line.starts_with("pgherd-agent: ") {
            continue;
        }
        let Some((time, rest)) = line.split_once(' ') else {
            bail!("a text log line without a time: {line}");
        };
        ensure!(
            humantime::parse_rfc3339(time).is_ok(),
            "a text log line does not start with the time: {line}"
        );
        let Some((severity, _)) = rest.split_once(":  ") else {
            bail!("a text log line without `SEVERITY:  `: {line}");
        };
        severities.push(severity.to_string());
    }
    ensure!(
        severities.first().map(String::as_str) == Some("LOG")
            && severities.last().map(String::as_str) == Some("FATAL"),
        "text severities {severities:?}:\n{text}"
    );
    ensure!(
        text.lines()
            .any(|l| l.contains("FATAL:  agent{member=lone1}: pgherd-agent stopped")),
        "no FATAL line with the member span:\n{text}"
    );
    Ok(())
}
