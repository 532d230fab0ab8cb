//! `pgherdctl`, run the way an operator runs it: against a member's config file.

use std::ffi::OsStr;
use std::process::{Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::member::Member;

/// How long one `pgherdctl` call may take.
const CTL_TIMEOUT: Duration = Duration::from_secs(20);

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
    let bin = crate::ctl_bin()?;
    let shown = format!(
        "pgherdctl {}",
        args.iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let output = tokio::time::timeout(
        CTL_TIMEOUT,
        tokio::process::Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .with_context(|| format!("`{shown}` did not finish within {CTL_TIMEOUT:?}"))?
    .with_context(|| format!("cannot run `{shown}`"))?;
    if !output.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
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
