//! Whether the member a job copies from answers, checked before the job changes anything:
//! a pg_rewind that fails because its source is down says nothing about the data directory
//! and must not be remembered as final (the source may come back on the same timeline).

use anyhow::Result;

use super::command::{self, CommandError};
use super::Postgres;
use crate::ha::Upstream;

/// The source of a rewind did not accept connections, so nothing was attempted.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SourceDown(pub String);

impl Postgres {
    /// `Ok` when `from` accepts connections (`pg_isready`); [`SourceDown`] when it does not
    /// answer, rejects connections (starting up, shutting down) or cannot be reached.
    pub async fn check_source(&self, from: &Upstream) -> Result<()> {
        let args = [
            "-h".to_string(),
            from.host.clone(),
            "-p".to_string(),
            from.port.to_string(),
            "-d".to_string(),
            "postgres".to_string(),
            "-t".to_string(),
            "5".to_string(),
        ];
        match self
            .run_logged("pg_isready", &args, command::Log::Debug)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => match e.downcast_ref::<CommandError>() {
                Some(CommandError::Failed { status, .. }) => {
                    let what = match status.code() {
                        Some(1) => "rejects connections (starting up or shutting down)",
                        Some(2) => "does not answer",
                        _ => "cannot be asked",
                    };
                    Err(SourceDown(format!(
                        "{} ({}:{}) {what}",
                        from.name, from.host, from.port
                    ))
                    .into())
                }
                _ => Err(e),
            },
        }
    }
}
