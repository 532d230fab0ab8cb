//! The agent's side of its fencing watchdog (rule 3 of docs/architecture.md): [`Watchdog`] starts
//! `pgherd-watchdog` (the crate `pgherd-watchdog`, whose documentation says what it does)
//! from next to this executable and tells it over a pipe what to guard; [`revoke_lease`] is
//! `pgherd-agent revoke-lease`, which the watchdog starts to revoke the leader lease of an
//! agent that died, with this agent's etcd client.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::Duration;

use pgherd_config::EtcdConfig;
use pgherd_watchdog::{command, monotonic_ns, say, Command, REVOKE_FOR};

use tokio::time::Instant;

/// One revoke attempt (connect and request).
const REVOKE_ATTEMPT: Duration = Duration::from_secs(2);

/// Revokes leader lease `lease` (the agent died and PostgreSQL is dead), so the leader key
/// goes now rather than when the lease runs out; bounded retries for `REVOKE_FOR`.
fn revoke(etcd: &EtcdConfig, lease: i64) -> bool {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            say!("cannot revoke leader lease {lease:x}: no runtime: {e}");
            return false;
        }
    };
    let started = std::time::Instant::now();
    let mut attempt = 0;
    let outcome = rt.block_on(async {
        loop {
            attempt += 1;
            let once = async {
                let mut client = crate::dcs::connect(etcd, REVOKE_ATTEMPT)
                    .await
                    .map_err(|e| e.to_string())?;
                match client.lease_revoke(lease).await {
                    Ok(_) => Ok(()),
                    Err(etcd_client::Error::GRpcStatus(s))
                        if s.message().contains("lease not found") =>
                    {
                        Ok(())
                    }
                    Err(e) => Err(e.to_string()),
                }
            };
            let result = match tokio::time::timeout(REVOKE_ATTEMPT, once).await {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {REVOKE_ATTEMPT:?}")),
            };
            match result {
                Ok(()) => return Ok(()),
                Err(e) if started.elapsed() + REVOKE_ATTEMPT > REVOKE_FOR => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    match outcome {
        Ok(()) => {
            say!(
                "revoked leader lease {lease:x} of the dead agent after fencing PostgreSQL, so a replica can take over now"
            );
            true
        }
        Err(e) => {
            say!(
                "cannot revoke leader lease {lease:x} at {} ({attempt} attempts): {e}; it expires with its ttl",
                etcd.endpoints.join(",")
            );
            false
        }
    }
}

/// `pgherd-agent revoke-lease LEASE`, started by the watchdog once it fenced the PostgreSQL of
/// an agent that died: reads the etcd settings the agent gave the watchdog (JSON, one line)
/// from stdin and revokes leader lease `lease`; true when it is gone.
pub fn revoke_lease(lease: i64) -> bool {
    let mut json = String::new();
    if let Err(e) = std::io::stdin().lock().read_line(&mut json) {
        say!("cannot read the etcd settings from the watchdog ({e}); leader lease {lease:x} expires with its ttl");
        return false;
    }
    match serde_json::from_str::<EtcdConfig>(&json) {
        Ok(etcd) => revoke(&etcd, lease),
        // Neither the line nor serde's message, which may quote a value: the line holds the
        // etcd password.
        Err(e) => {
            say!(
                "the etcd settings from the agent are not valid (line {}, column {}); a dead agent's lease will expire with its ttl",
                e.line(),
                e.column()
            );
            false
        }
    }
}

/// `pgherd-watchdog` in this executable's directory, where every installation puts it beside
/// `pgherd-agent`; an error naming the path when it is not there.
fn executable() -> std::io::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let exe = me.with_file_name(pgherd_watchdog::EXECUTABLE);
    if !exe.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "{} is missing: install pgherd-watchdog in the same directory as {}",
                exe.display(),
                me.display()
            ),
        ));
    }
    Ok(exe)
}

/// The agent's handle on its watchdog process.
pub struct Watchdog {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    last: Option<Command>,
    /// One instant on both clocks, to turn a deadline into monotonic nanoseconds the same
    /// way every time (so an unchanged deadline is an unchanged command, not sent again).
    base: (Instant, i64),
}

impl Watchdog {
    /// Starts `pgherd-watchdog` from this executable's directory and hands it the etcd
    /// settings over the pipe (they include the password: never on its command line).
    pub fn spawn(etcd: &EtcdConfig) -> std::io::Result<Watchdog> {
        let exe = executable()?;
        let mut child = std::process::Command::new(&exe)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot start {}: {e}", exe.display()))
            })?;
        let mut stdin = child.stdin.take().expect("stdin was piped above");
        let json = serde_json::to_string(etcd).map_err(std::io::Error::other)?;
        stdin.write_all(format!("etcd {json}\n").as_bytes())?;
        Ok(Watchdog {
            child,
            stdin,
            last: None,
            base: (Instant::now(), monotonic_ns()),
        })
    }

    fn send(&mut self, cmd: Command) {
        if self.last == Some(cmd) {
            return;
        }
        match self.stdin.write_all(cmd.render().as_bytes()) {
            Ok(()) => self.last = Some(cmd),
            Err(e) => tracing::error!(error = %e, "cannot reach the fencing watchdog"),
        }
    }

    fn to_ns(&self, at: Instant) -> i64 {
        let (base, base_ns) = self.base;
        match at.checked_duration_since(base) {
            Some(after) => base_ns + after.as_nanos() as i64,
            None => base_ns - base.duration_since(at).as_nanos() as i64,
        }
    }

    /// Arms, keeps or disarms the watchdog (see [`command`]): `lease` is the leader lease
    /// held now (id, safe deadline), `pg_pid` the postmaster running on the data directory.
    pub fn update(&mut self, lease: Option<(i64, Instant)>, pg_pid: Option<i32>) {
        let lease = lease.map(|(id, until)| (id, self.to_ns(until)));
        let cmd = command(lease, pg_pid, self.last);
        if let (Command::Arm { pid, .. }, None, Some(Command::Arm { .. })) = (cmd, lease, self.last)
        {
            tracing::debug!(
                pid,
                "no leader lease but PostgreSQL may still accept writes: the watchdog stays armed with the old deadline"
            );
        }
        self.send(cmd);
    }

    pub fn disarm(&mut self) {
        self.send(Command::Disarm);
    }

    /// Disarms and stops the watchdog (planned shutdown).
    pub fn stop(mut self) {
        self.disarm();
        drop(self.stdin);
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    /// A test binary has no pgherd-watchdog beside it (cargo puts it in `deps/`): the error
    /// names the path where the agent looked.
    #[test]
    fn a_missing_watchdog_executable_is_named() {
        let me = std::env::current_exe().unwrap();
        let want = me.with_file_name("pgherd-watchdog");
        assert!(!want.exists(), "{} exists", want.display());
        let err = super::executable().unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
        let said = err.to_string();
        assert!(said.contains(&want.display().to_string()), "{said}");
    }
}
