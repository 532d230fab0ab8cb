//! `pgherdctl`, run the way an operator runs it: against a member's config file.

use std::ffi::OsStr;
use std::process::{Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::member::Member;
use crate::process::{command_line, output_within, succeeded};

/// How long one `pgherdctl` call may take: a switchover or failover waits for the handover
/// (pgherdctl itself gives an agent 120 s).
const CTL_TIMEOUT: Duration = Duration::from_secs(150);

/// One row of `pgherdctl list --format json`.
#[derive(Debug, Clone, Deserialize)]
pub struct ListedMember {
    pub name: String,
    /// `leader` or `replica`.
    pub role: String,
    /// `running` for the leader, `streaming` for a healthy replica.
    pub state: String,
    #[serde(default)]
    pub timeline: Option<i64>,
    #[serde(default)]
    pub lag_bytes: Option<i64>,
    pub host: String,
    pub port: u16,
    /// Every other field, as pgherdctl printed it.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// One entry of the `history` key: a promotion that started a new timeline.
#[derive(Debug, Clone, Deserialize)]
pub struct HistoryEntry {
    pub timeline: u32,
    #[serde(default)]
    pub switch_lsn: Option<String>,
    pub time: String,
    pub reason: String,
    pub leader: String,
}

/// How a `pgherdctl` run ended, whatever its exit status.
#[derive(Debug, Clone)]
pub struct CtlOutput {
    /// The command line, for messages.
    pub command: String,
    /// The exit code; `None` if a signal ended it.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// How long it ran.
    pub took: Duration,
}

impl CtlOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Fails unless it exited with `code` and its stderr mentions every one of `needles`
    /// (case-insensitive): a refusal that says why.
    pub fn expect_failure(&self, code: i32, needles: &[&str]) -> Result<()> {
        if self.code != Some(code) {
            bail!(
                "`{}` exited with {:?}, expected {code}; stdout: {}; stderr: {}",
                self.command,
                self.code,
                self.stdout.trim(),
                self.stderr.trim()
            );
        }
        let stderr = self.stderr.to_lowercase();
        for needle in needles {
            if !stderr.contains(&needle.to_lowercase()) {
                bail!(
                    "`{}` exited with {code} but its stderr does not mention {needle:?}: {}",
                    self.command,
                    self.stderr.trim()
                );
            }
        }
        Ok(())
    }

    /// Fails with its stderr unless it exited 0.
    pub fn expect_success(&self) -> Result<&Self> {
        if !self.success() {
            bail!(
                "`{}` failed ({:?}): {}",
                self.command,
                self.code,
                self.stderr.trim()
            );
        }
        Ok(self)
    }
}

/// Runs `pgherdctl --config <member's config> <args>`; fails with its stderr if it exits
/// non-zero.
pub async fn ctl<S: AsRef<OsStr>>(member: &Member, args: &[S]) -> Result<Output> {
    let mut all: Vec<&OsStr> = vec![OsStr::new("--config"), member.config_path().as_os_str()];
    all.extend(args.iter().map(AsRef::as_ref));
    ctl_direct(&all).await
}

/// Runs `pgherdctl <args>` (give `--config` or `--endpoints` and `--cluster` yourself);
/// fails with its stderr if it exits non-zero.
pub async fn ctl_direct<S: AsRef<OsStr>>(args: &[S]) -> Result<Output> {
    let (shown, output) = run(args, &[]).await?;
    succeeded(&shown, output)
}

/// Runs `pgherdctl --config <member's config> <args>` and returns how it ended, without
/// judging its exit status.
pub async fn ctl_output<S: AsRef<OsStr>>(member: &Member, args: &[S]) -> Result<CtlOutput> {
    let mut all: Vec<&OsStr> = vec![OsStr::new("--config"), member.config_path().as_os_str()];
    all.extend(args.iter().map(AsRef::as_ref));
    ctl_direct_output(&all).await
}

/// Runs `pgherdctl <args>` and returns how it ended, without judging its exit status.
pub async fn ctl_direct_output<S: AsRef<OsStr>>(args: &[S]) -> Result<CtlOutput> {
    ctl_direct_output_env(args, &[]).await
}

/// Runs `pgherdctl <args>` with `env` set (e.g. `PGHERD_TOKEN`) and returns how it ended,
/// without judging its exit status.
pub async fn ctl_direct_output_env<S: AsRef<OsStr>>(
    args: &[S],
    env: &[(&str, &str)],
) -> Result<CtlOutput> {
    let started = std::time::Instant::now();
    let (command, output) = run(args, env).await?;
    Ok(CtlOutput {
        command,
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        took: started.elapsed(),
    })
}

/// Runs `pgherdctl --config <member's config> <args>` with `input` on its standard input (a
/// pipe, not a terminal) and `env` set (e.g. `EDITOR`), and returns how it ended.
pub async fn ctl_output_with_input<S: AsRef<OsStr>>(
    member: &Member,
    args: &[S],
    input: &str,
    env: &[(&str, &str)],
) -> Result<CtlOutput> {
    use tokio::io::AsyncWriteExt;
    let mut all: Vec<&OsStr> = vec![OsStr::new("--config"), member.config_path().as_os_str()];
    all.extend(args.iter().map(AsRef::as_ref));
    let bin = crate::ctl_bin()?;
    let shown = command_line("pgherdctl", &all);
    let started = std::time::Instant::now();
    let mut child = tokio::process::Command::new(bin)
        .args(&all)
        .env_remove("PGHERD_TOKEN")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot run `{shown}`"))?;
    let mut stdin = child.stdin.take().context("the child's stdin is piped")?;
    // pgherdctl may exit before reading everything (a refusal): a broken pipe is fine.
    let _ = stdin.write_all(input.as_bytes()).await;
    drop(stdin);
    let output = tokio::time::timeout(CTL_TIMEOUT, child.wait_with_output())
        .await
        .with_context(|| format!("`{shown}` did not finish within {CTL_TIMEOUT:?}"))?
        .with_context(|| format!("cannot run `{shown}`"))?;
    Ok(CtlOutput {
        command: shown,
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        took: started.elapsed(),
    })
}

/// Runs pgherdctl with standard input from /dev/null (not a terminal: it never asks) and
/// without `PGHERD_TOKEN` from the test's environment (each test says which token it uses,
/// in `args` or in `env`).
async fn run<S: AsRef<OsStr>>(args: &[S], env: &[(&str, &str)]) -> Result<(String, Output)> {
    let bin = crate::ctl_bin()?;
    let shown = command_line("pgherdctl", args);
    let output = output_within(
        tokio::process::Command::new(bin)
            .args(args)
            .env_remove("PGHERD_TOKEN")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .kill_on_drop(true),
        &shown,
        CTL_TIMEOUT,
    )
    .await?;
    Ok((shown, output))
}

/// `pgherdctl --config <member's config> list --format json`, parsed.
pub async fn list_json(member: &Member) -> Result<Vec<ListedMember>> {
    let output = ctl(member, &["list", "--format", "json"]).await?;
    parse_list(&output.stdout)
}

/// The output of `pgherdctl list --format json`.
pub(crate) fn parse_list(stdout: &[u8]) -> Result<Vec<ListedMember>> {
    serde_json::from_slice(stdout).with_context(|| {
        format!(
            "`pgherdctl list --format json` printed something else than a JSON array of members: {}",
            String::from_utf8_lossy(stdout).trim()
        )
    })
}
