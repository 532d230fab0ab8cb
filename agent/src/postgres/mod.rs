//! The local PostgreSQL: its data directory, its process (a child of the agent, so it dies
//! with it), the programs that create and change it (through [`command::run`]), and the
//! queries that tell the agent loop what it is doing.

pub mod bindir;
pub mod command;
pub mod conf;
pub mod process;
mod query;
mod source;
pub mod tls;
pub mod upgrade;
pub mod version;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use pgherd_config::{Config, ParamValue};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use tokio::sync::{Mutex, Notify};

use crate::fsutil::{self, Dir};
use crate::ha::{ControlData, DataDir, PgStatus, Upstream};
use crate::lsn::Lsn;
use crate::slots::{Create, SlotRow};
use command::OsUser;
use pgherd_config::SlotType;
use process::PidFile;
pub use source::SourceDown;

/// How PostgreSQL should be configured when it next starts or reloads.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    Primary,
    /// A standby streaming from the upstream, or replaying alone when there is none.
    Standby(Option<Upstream>),
}

/// Owns the local PostgreSQL instance.
pub struct Postgres {
    cfg: Arc<Config>,
    user: OsUser,
    bin_dir: bindir::BinDir,
    /// The major of the binaries in `bin_dir` (`postgres --version`), as its
    /// `server_version_num`; it moves with `bin_dir` ([`Postgres::set_binaries`]).
    major: std::sync::atomic::AtomicU32,
    data_dir: PathBuf,
    timeout: Duration,
    /// Whether the postmaster we started is still alive (its waiter task clears it).
    child_alive: Arc<AtomicBool>,
    /// The pid of the postmaster we started: known from the spawn, before PostgreSQL
    /// writes `postmaster.pid`, so the watchdog guards it from its first instant.
    child_pid: AtomicI32,
    /// A handle on the postmaster we started, taken at its spawn: stops go through it, not
    /// through the pid in `postmaster.pid`, which the OS user can rewrite (rule 8).
    child: std::sync::Mutex<Option<Arc<process::Handle>>>,
    /// The last pid (and why) the agent refused to signal or guard, so a refusal seen on
    /// every loop is logged once.
    refused: std::sync::Mutex<Option<(i32, String)>>,
    /// Woken when our postmaster exits, so the loop reacts at once.
    wake: Arc<Notify>,
    client: Mutex<Option<Arc<tokio_postgres::Client>>>,
    /// Parameters pgherd sets itself on top of everything else: archiving (with a `backup`
    /// section) and, during a point-in-time restore, the recovery target.
    archiving: BTreeMap<String, String>,
    recovery: std::sync::Mutex<BTreeMap<String, String>>,
}

/// Why the member's configuration file, which holds the API token, the etcd credentials and
/// both passwords, is open to users other than the agent's (`agent_uid`); empty when it
/// is not. When the agent is root, a group other than root's counts as other users.
fn config_exposure(md: &std::fs::Metadata, agent_uid: u32) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let group = || {
        nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(md.gid()))
            .ok()
            .flatten()
            .map_or_else(|| format!("gid {}", md.gid()), |g| g.name)
    };
    let mode = md.mode();
    let mut out = Vec::new();
    if md.uid() != agent_uid {
        out.push(format!(
            "it belongs to {}, who can change what this agent runs",
            process::user_name(md.uid())
        ));
    }
    if mode & 0o002 != 0 {
        out.push("every user can write it".to_string());
    } else if mode & 0o004 != 0 {
        out.push("every user can read it".to_string());
    }
    if mode & 0o020 != 0 {
        out.push(format!("group {} can write it", group()));
    } else if mode & 0o040 != 0 && agent_uid == 0 && md.gid() != 0 {
        out.push(format!("group {} can read it", group()));
    }
    out
}

/// Warns when the configuration file is open to other users: PostgreSQL's tools no longer
/// need to read it (issue 13 item 10), so it can be the agent's alone.
fn warn_if_config_exposed(path: &Path) {
    let Ok(md) = std::fs::metadata(path) else {
        return;
    };
    let me = nix::unistd::geteuid();
    let why = config_exposure(&md, me.as_raw());
    if !why.is_empty() {
        let owner = nix::unistd::User::from_uid(me)
            .ok()
            .flatten()
            .map_or_else(|| me.to_string(), |u| u.name);
        tracing::warn!(
            file = %path.display(),
            "the configuration file {} holds the API token, the etcd credentials and the database passwords, and {}; make it {owner}'s alone (chown {owner}: {}; chmod 0600 {})",
            path.display(),
            why.join(", "),
            path.display(),
            path.display()
        );
    }
}

/// Where Debian and Ubuntu install each major: `/usr/lib/postgresql/<major>/bin`.
const DEBIAN_MAJORS: &str = "/usr/lib/postgresql";

/// Finds PostgreSQL's binaries: the configured directory, else `pg_config --bindir` when it
/// holds `postgres`, else the newest `/usr/lib/postgresql/<major>/bin` that does, else
/// [`pgherd_config::DEFAULT_BIN_DIR`] (which [`Postgres::new`] then reports as missing).
pub fn find_bin_dir(configured: Option<&Path>) -> PathBuf {
    if let Some(p) = configured {
        return p.to_path_buf();
    }
    std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .filter(|p| p.is_absolute() && p.join("postgres").exists())
        .or_else(|| newest_bin_dir(Path::new(DEBIAN_MAJORS)))
        .unwrap_or_else(|| PathBuf::from(pgherd_config::DEFAULT_BIN_DIR))
}

/// The `<root>/<major>/bin` of the newest major (by number: 18 after 9.6) that holds
/// `postgres`; names that are no major are left alone.
fn newest_bin_dir(root: &Path) -> Option<PathBuf> {
    std::fs::read_dir(root)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let major = version::Major::from_pg_version(&name).ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((major, bin))
        })
        .max_by_key(|(major, _)| *major)
        .map(|(_, bin)| bin)
}

/// The database system identifier: the first field of `global/pg_control`.
fn read_system_identifier(data_dir: &Path) -> std::io::Result<u64> {
    // Read through descriptors: the OS user could leave a FIFO or a link there.
    let bytes = Dir::open(data_dir)?
        .open_dir("global")?
        .read("pg_control", 8192)?;
    let first: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| std::io::Error::other("global/pg_control is shorter than 8 bytes"))?;
    Ok(u64::from_ne_bytes(first))
}

/// The major of the binaries in `bin_dir`, refused when older than the agent supports and
/// warned about when newer than it knows.
fn binaries_major_checked(bin_dir: &Path, user: &OsUser) -> Result<version::Major> {
    let major = version::binaries_major(bin_dir, user)?
        .check_supported(&format!("postgres.bin_dir {}", bin_dir.display()))?;
    if major > version::NEWEST_KNOWN {
        tracing::warn!(
            bin_dir = %bin_dir.display(),
            "postgres.bin_dir {} is {major}, newer than the newest major this agent knows; it adapts to it as to {}",
            bin_dir.display(),
            version::NEWEST_KNOWN
        );
    } else {
        tracing::info!(bin_dir = %bin_dir.display(), "using {major} from {}", bin_dir.display());
    }
    Ok(major)
}

impl Postgres {
    pub fn new(cfg: Arc<Config>, wake: Arc<Notify>) -> Result<Postgres> {
        let user = OsUser::resolve(&cfg.postgres.os_user)?;
        let bin_dir = find_bin_dir(cfg.postgres.bin_dir.as_deref());
        for prog in [
            "postgres",
            "pg_ctl",
            "initdb",
            "pg_basebackup",
            "pg_rewind",
            "pg_controldata",
        ] {
            if !bin_dir.join(prog).exists() {
                bail!(
                    "{} not found in {}; install the PostgreSQL server (PostgreSQL {} or later; on Debian the postgresql-<major> package) or set postgres.bin_dir",
                    prog,
                    bin_dir.display(),
                    version::OLDEST_SUPPORTED.number()
                );
            }
        }
        let major = binaries_major_checked(&bin_dir, &user)?;
        if let Some(source) = &cfg.source {
            warn_if_config_exposed(source);
        }
        Ok(Postgres {
            archiving: BTreeMap::new(),
            recovery: std::sync::Mutex::new(BTreeMap::new()),
            data_dir: cfg.postgres.data_dir.clone(),
            timeout: cfg.postgres.command_timeout(),
            cfg,
            user,
            major: std::sync::atomic::AtomicU32::new(major.version_num()),
            bin_dir: bin_dir.into(),
            child_alive: Arc::new(AtomicBool::new(false)),
            child_pid: AtomicI32::new(0),
            child: std::sync::Mutex::new(None),
            refused: std::sync::Mutex::new(None),
            wake,
            client: Mutex::new(None),
        })
    }

    /// Archiving plus any recovery target set for a restore.
    fn managed(&self) -> BTreeMap<String, String> {
        let mut p = self.archiving.clone();
        p.extend(
            self.recovery
                .lock()
                .expect("recovery parameters lock is never poisoned")
                .clone(),
        );
        p
    }

    /// [`Self::managed`] for `upstream`: a standby leader reading the other cluster's
    /// repository (`standby_cluster.repository`) gets `restore_command` at `pgherd-agent
    /// wal-fetch` given the settings naming that archive ([`Self::write_standby_wal_settings`]).
    fn managed_for(&self, upstream: Option<&Upstream>) -> BTreeMap<String, String> {
        let mut p = self.managed();
        let reads_remote = upstream
            .and_then(|u| u.remote.as_ref())
            .and_then(|sc| sc.archive_root())
            .is_some();
        if let (true, Some(source)) = (reads_remote, &self.cfg.source) {
            let exe = std::env::current_exe()
                .map(|e| e.display().to_string())
                .unwrap_or_else(|_| "pgherd-agent".to_string());
            let settings = crate::backup::wal::WalSettings::standby_path_beside(source);
            p.insert(
                "restore_command".to_string(),
                conf::wal_command(&exe, &settings.display().to_string(), "wal-fetch", "%f %p"),
            );
        }
        p
    }

    /// Writes the WAL settings naming the other cluster's archive when `upstream` is a
    /// remote source with `repository`, for `restore_command` (run as the OS user; no
    /// secret in it).
    fn write_standby_wal_settings(&self, upstream: Option<&Upstream>) -> Result<()> {
        let Some(root) = upstream
            .and_then(|u| u.remote.as_ref())
            .and_then(|sc| sc.archive_root())
        else {
            return Ok(());
        };
        let source = self.cfg.source.as_ref().context(
            "standby_cluster.repository needs the configuration file's path for restore_command",
        )?;
        let path = crate::backup::wal::WalSettings::standby_path_beside(source);
        crate::backup::wal::WalSettings::read_only(&root, &self.cfg)
            .write(&path, self.user.switch_to.map(|(_, gid)| gid))
            .with_context(|| format!("cannot write the WAL settings {}", path.display()))?;
        if !self.user.can_reach(&path) {
            bail!(
                "standby_cluster.repository: restore_command (pgherd-agent wal-fetch) runs as postgres.os_user {:?} and cannot read {}; let that user search its directory",
                self.user.name,
                path.display()
            );
        }
        Ok(())
    }

    /// Sets the archiving parameters (`backup::wal::archiving_parameters`); they take effect
    /// at the next `write_config`.
    pub fn set_archiving(&mut self, params: BTreeMap<String, String>) {
        self.archiving = params;
    }

    /// Sets (or with an empty map clears) the recovery target parameters of a restore; they
    /// take effect at the next `write_config`.
    pub fn set_recovery_parameters(&self, params: BTreeMap<String, String>) {
        *self
            .recovery
            .lock()
            .expect("recovery parameters lock is never poisoned") = params;
    }

    pub fn os_user(&self) -> &OsUser {
        &self.user
    }

    pub fn bin_dir(&self) -> &bindir::BinDir {
        &self.bin_dir
    }

    /// The major of the binaries in [`Self::bin_dir`]; what the agent adapts to.
    pub fn major(&self) -> version::Major {
        version::Major::of_version_num(self.major.load(Ordering::SeqCst))
    }

    /// Moves this member to other binaries of `major` (a major-version upgrade): PostgreSQL
    /// and the backup code run them from now on.
    pub fn set_binaries(&self, dir: PathBuf, major: version::Major) {
        self.bin_dir.set(dir);
        self.major.store(major.version_num(), Ordering::SeqCst);
    }

    /// Fails, naming both majors, when the data directory is initialised by another major
    /// than the binaries': the agent then neither starts it, nor rewinds it, nor keeps a
    /// clone of another major.
    pub fn check_data_dir_major(&self) -> Result<()> {
        version::check_matches(&self.data_dir, &self.bin_dir.path(), self.major())?;
        Ok(())
    }

    /// A superuser connection to another member's PostgreSQL (e.g. the leader's).
    pub async fn connect_to(&self, host: &str, port: u16) -> Result<tokio_postgres::Client> {
        self.connect_as(host, port, tls::Peer::Remote).await
    }

    /// A superuser connection, over TLS to a remote member when `postgres.tls` is set.
    async fn connect_as(
        &self,
        host: &str,
        port: u16,
        peer: tls::Peer,
    ) -> Result<tokio_postgres::Client> {
        self.connect_db(host, port, peer, "postgres").await
    }

    async fn connect_db(
        &self,
        host: &str,
        port: u16,
        peer: tls::Peer,
        dbname: &str,
    ) -> Result<tokio_postgres::Client> {
        let mut pc = tokio_postgres::Config::new();
        pc.host(host)
            .port(port)
            .user(&self.cfg.postgres.superuser.username)
            .password(self.cfg.postgres.superuser.password.as_bytes())
            .dbname(dbname)
            .application_name("pgherd")
            .connect_timeout(Duration::from_secs(3));
        tls::connect(&self.cfg, pc, host, peer)
            .await
            .with_context(|| format!("cannot connect to PostgreSQL at {host}:{port}"))
    }

    /// The host and port the agent itself uses to reach the local PostgreSQL.
    pub fn local_address(&self) -> (String, u16) {
        let (host, port) = conf::listen_parts(&self.cfg);
        let host = match host.as_str() {
            "*" | "0.0.0.0" | "" => "127.0.0.1".to_string(),
            "::" => "::1".to_string(),
            h => h.split(',').next().unwrap_or(h).trim().to_string(),
        };
        (host, port)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// PostgreSQL's own log: beside the data directory, so clones do not copy it.
    pub fn log_path(&self) -> PathBuf {
        let mut p = self.data_dir.clone().into_os_string();
        p.push(".log");
        PathBuf::from(p)
    }

    fn bin(&self, prog: &str) -> PathBuf {
        self.bin_dir.join(prog)
    }

    async fn run(&self, prog: &str, args: &[String]) -> Result<command::Output> {
        self.run_logged(prog, args, command::Log::Info).await
    }

    async fn run_logged(
        &self,
        prog: &str,
        args: &[String],
        log: command::Log,
    ) -> Result<command::Output> {
        let pgpass = self.cfg.pgpass_path();
        Ok(command::run(
            &self.user,
            &self.bin(prog),
            args,
            &[("PGPASSFILE", pgpass.as_path())],
            self.timeout,
            log,
        )
        .await?)
    }

    pub fn data_dir_state(&self) -> DataDir {
        let entries = match std::fs::read_dir(&self.data_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return DataDir::Empty,
            Err(e) => {
                return DataDir::Unusable(format!("cannot read {}: {e}", self.data_dir.display()))
            }
        };
        if entries.count() == 0 {
            return DataDir::Empty;
        }
        if !self.data_dir.join("PG_VERSION").exists() {
            return DataDir::Unusable(format!(
                "{} is not empty and has no PG_VERSION",
                self.data_dir.display()
            ));
        }
        match read_system_identifier(&self.data_dir) {
            Ok(id) => DataDir::Initialized {
                system_identifier: id,
                standby: self.data_dir.join("standby.signal").exists(),
            },
            Err(e) => DataDir::Unusable(format!(
                "cannot read {}/global/pg_control: {e}",
                self.data_dir.display()
            )),
        }
    }

    /// The postmaster's pid from `postmaster.pid`, if that process is alive and is a
    /// postmaster of this data directory (after a crash the pid may belong to anything, and
    /// the OS user can write any pid into the file).
    fn postmaster_pid(&self) -> Option<i32> {
        match self.pid_file()? {
            PidFile::Live(pid) => Some(pid),
            PidFile::NotOurs { .. } | PidFile::Stale { .. } => None,
        }
    }

    /// What a postmaster of this member looks like in /proc.
    fn postmaster(&self) -> process::Postmaster<'_> {
        process::Postmaster {
            data_dir: &self.data_dir,
            uid: self.user.uid(),
        }
    }

    /// The text of `postmaster.pid`, read without following a link and only from a regular
    /// file (a FIFO `postgres` planted there must not block the loop; rule 8).
    fn read_pid_file(&self) -> Option<String> {
        read_pid_file(&self.data_dir)
    }

    /// What `postmaster.pid` says, checked against /proc; `None` without the file.
    fn pid_file(&self) -> Option<PidFile> {
        let text = self.read_pid_file()?;
        Some(process::check_pid_file(&text, &self.postmaster()))
    }

    /// Logs (once for the same pid and reason) that the agent will not signal `pid` or
    /// guard it with the watchdog: it is not a postmaster of this member (rule 8).
    fn refuse(&self, pid: i32, why: &str, action: &str) {
        let mut last = self
            .refused
            .lock()
            .expect("refused-pid lock is never poisoned");
        if last.as_ref().is_some_and(|(p, w)| *p == pid && w == why) {
            return;
        }
        tracing::warn!(
            pid,
            reason = %why,
            "refusing to {action} pid {pid} named in postmaster.pid: {why}"
        );
        *last = Some((pid, why.to_string()));
    }

    /// The handle on the postmaster we spawned, while it runs.
    fn child_handle(&self) -> Option<Arc<process::Handle>> {
        if !self.is_our_child() {
            return None;
        }
        self.child
            .lock()
            .expect("child handle lock is never poisoned")
            .clone()
    }

    /// Sends `signal` to the postmaster, only ever to one that is ours (rule 8): the child
    /// we spawned, through the handle taken at its spawn, whatever `postmaster.pid` says;
    /// otherwise the process the file names, once /proc shows it is a postmaster of this
    /// data directory run by the OS user. Any other pid in the file is refused and logged.
    /// Returns the pid signalled, `None` when no postmaster of ours runs.
    fn signal_postmaster(
        &self,
        signal: nix::sys::signal::Signal,
        what: &str,
    ) -> Result<Option<i32>> {
        let say = |pid: i32| {
            if signal == nix::sys::signal::Signal::SIGQUIT {
                tracing::warn!(pid, "{what}");
            } else {
                tracing::info!(pid, "{what}");
            }
        };
        let text = self.read_pid_file();
        let named = text.as_deref().and_then(process::pid_of);
        if let Some(child) = self.child_handle() {
            if let Some(named) = named.filter(|p| *p != child.pid()) {
                self.refuse(
                    named,
                    &format!(
                        "it is not the postmaster this agent started (pid {})",
                        child.pid()
                    ),
                    "signal",
                );
            }
            say(child.pid());
            return match child.signal(Some(signal)) {
                Ok(()) => Ok(Some(child.pid())),
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(None),
                Err(e) => Err(e)
                    .with_context(|| format!("cannot signal the postmaster (pid {})", child.pid())),
            };
        }
        let (Some(text), Some(named)) = (text, named) else {
            return Ok(None);
        };
        // Opened before the checks: the signal reaches the process that was checked or none.
        let Ok(handle) = process::Handle::open(named) else {
            return Ok(None);
        };
        match process::check_pid_file(&text, &self.postmaster()) {
            PidFile::Live(pid) if pid == named && handle.is_live() => {
                say(pid);
                match handle.signal(Some(signal)) {
                    Ok(()) => Ok(Some(pid)),
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(None),
                    Err(e) => {
                        Err(e).with_context(|| format!("cannot signal the postmaster (pid {pid})"))
                    }
                }
            }
            PidFile::NotOurs { pid, why } => {
                self.refuse(pid, &why, "signal");
                Ok(None)
            }
            _ => Ok(None),
        }
    }

    /// Removes `postmaster.pid` when no postmaster of this data directory runs under its
    /// pid. A crash leaves the file behind, and its pid may belong to another process by now
    /// (pid reuse is the rule in containers): PostgreSQL, and pg_rewind's crash recovery,
    /// would then refuse to start ("lock file ... already exists") and the member would stay
    /// down. Returns the pid of the file it removed.
    pub fn remove_stale_pid_file(&self) -> Result<Option<i32>> {
        if self.is_our_child() {
            return Ok(None);
        }
        let Some(file) = self.pid_file() else {
            return Ok(None);
        };
        let Some((pid, why)) = file.stale() else {
            return Ok(None);
        };
        let path = self.data_dir.join("postmaster.pid");
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot remove stale {}", path.display()))
            }
        }
        tracing::info!(reason = %why, "removed stale postmaster.pid naming pid {pid}");
        Ok(Some(pid))
    }

    /// Removes this data directory's socket lock files (`.s.PGSQL.<port>.lock`, and the
    /// socket beside it) that no postmaster of ours holds. A postmaster killed by a crash
    /// leaves them behind like `postmaster.pid`, and when their pid belongs to another
    /// process of the OS user by now (pid reuse, the rule in containers) PostgreSQL refuses
    /// to start ("lock file ... already exists"): found by the upgrade test, where the old
    /// leader crashed and never came back. Only a lock file whose second line names this
    /// data directory is touched; another cluster's lock on the same port is left alone
    /// (PostgreSQL's own check then says so).
    pub fn remove_stale_socket_locks(&self) -> Result<()> {
        if self.is_our_child() {
            return Ok(());
        }
        let conf = self.read_data_file("postgresql.conf");
        let dirs = conf
            .lines()
            .find_map(|l| l.strip_prefix("unix_socket_directories = "))
            .map(|v| v.trim().trim_matches('\'').replace("''", "'"))
            .unwrap_or_else(|| "/var/run/postgresql".to_string());
        let (_, port) = self.local_address();
        let lock = format!(".s.PGSQL.{port}.lock");
        for dir in dirs
            .split(',')
            .map(str::trim)
            .filter(|d| d.starts_with('/'))
        {
            let Ok(d) = Dir::open(Path::new(dir)) else {
                continue;
            };
            let Ok(bytes) = d.read(&lock, 4096) else {
                continue;
            };
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let names_us = text
                .lines()
                .nth(1)
                .is_some_and(|l| Path::new(l.trim()) == self.data_dir);
            if !names_us {
                continue;
            }
            let Some((pid, why)) = process::check_pid_file(&text, &self.postmaster())
                .stale()
                .map(|(p, w)| (p, w.to_string()))
            else {
                continue;
            };
            let socket = format!(".s.PGSQL.{port}");
            for name in [socket.as_str(), lock.as_str()] {
                match d.remove_file(name) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(e).with_context(|| format!("cannot remove stale {dir}/{name}"))
                    }
                }
            }
            tracing::info!(reason = %why, "removed stale {dir}/{lock} naming pid {pid}");
        }
        Ok(())
    }

    /// The status line of `postmaster.pid` ("ready", "standby", "starting", "stopping").
    fn postmaster_status(&self) -> Option<String> {
        let text = self.read_pid_file()?;
        text.lines().nth(7).map(|s| s.trim().to_string())
    }

    /// A postmaster runs on the data directory, or ours is still starting (before it has
    /// written postmaster.pid).
    pub fn is_running(&self) -> bool {
        self.is_our_child() || self.postmaster_pid().is_some()
    }

    /// The postmaster's pid, if one runs on the data directory: the child we spawned from
    /// the moment it is spawned (`postmaster.pid` is written later), else the file's when
    /// /proc shows it is a postmaster of ours. This is the pid the watchdog is armed with,
    /// so a file naming any other process is refused and logged (rule 8).
    pub fn pid(&self) -> Option<i32> {
        if self.is_our_child() {
            let pid = self.child_pid.load(Ordering::SeqCst);
            if pid > 0 {
                return Some(pid);
            }
        }
        match self.pid_file()? {
            PidFile::Live(pid) => Some(pid),
            PidFile::NotOurs { pid, why } => {
                self.refuse(pid, &why, "arm the watchdog for");
                None
            }
            PidFile::Stale { .. } => None,
        }
    }

    /// Whether the running postmaster is our child (and so dies with the agent).
    pub fn is_our_child(&self) -> bool {
        self.child_alive.load(Ordering::SeqCst)
    }

    /// Creates the data directory's parent chain (root's, 0755, so the OS user can pass)
    /// and the directory itself for the OS user (0700), giving it through its descriptor.
    fn ensure_data_dir(&self) -> Result<()> {
        self.ensure_user_dir(&self.data_dir)
    }

    /// [`Self::ensure_data_dir`] for any directory of the OS user's (the upgrade's new
    /// cluster and work directory beside the data directory).
    fn ensure_user_dir(&self, dir: &Path) -> Result<()> {
        let (parent, name) = fsutil::split_create(dir, 0o755)
            .with_context(|| format!("cannot create the folder of {}", dir.display()))?;
        let (data, _) = parent
            .ensure_dir(&name, 0o700)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        data.chmod(0o700)
            .with_context(|| format!("cannot set mode 0700 on {}", dir.display()))?;
        data.chown(self.user.switch_to)
            .with_context(|| format!("cannot give {} to {}", dir.display(), self.user.name))?;
        Ok(())
    }

    /// Writes `contents` to `path` atomically, owned by the OS user with `mode`: a new
    /// temporary file beside it, created with `O_EXCL | O_NOFOLLOW` (a link planted at the
    /// temporary name is removed, never written through), chowned and chmodded through its
    /// descriptor, fsynced, then renamed over `path` in the folder's descriptor. The folder
    /// (the data directory or its parent) is one the OS user can write.
    fn write_file(&self, path: &Path, contents: &str, mode: u32) -> Result<()> {
        let (dir, name) =
            fsutil::split(path).with_context(|| format!("cannot write {}", path.display()))?;
        dir.write_atomic(&name, contents.as_bytes(), mode, self.user.switch_to)
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// Reads one of PostgreSQL's files in the data directory for comparison (empty when it
    /// is missing or not a regular file).
    fn read_data_file(&self, name: &str) -> String {
        Dir::open(&self.data_dir)
            .and_then(|d| d.read(name, 16 << 20))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// PostgreSQL's log (`<data_dir>.log`), opened by root for the postmaster's output in the
    /// data directory's parent: never through a link, and only a regular file with one link
    /// (not a hard link to a file elsewhere).
    fn open_log(&self) -> Result<std::fs::File> {
        let path = self.log_path();
        fsutil::split(&path)
            .and_then(|(d, name)| d.open_append(name, 0o640))
            .with_context(|| format!("cannot open {}", path.display()))
    }

    /// The pgpass file with the replication and superuser passwords (mode 0600).
    pub fn write_pgpass(&self) -> Result<()> {
        let path = self.cfg.pgpass_path();
        fsutil::split_create(&path, 0o755)
            .with_context(|| format!("cannot create the folder of {}", path.display()))?;
        self.write_file(&path, &conf::pgpass(&self.cfg), 0o600)
    }

    /// The parameters postgresql.conf gets for `upstream`, without those the binaries'
    /// major does not know (returned as why each was left out).
    fn parameters(
        &self,
        cluster_params: &BTreeMap<String, ParamValue>,
        upstream: Option<&Upstream>,
    ) -> (BTreeMap<String, String>, Vec<String>) {
        let mut params = conf::parameters(
            &self.cfg,
            cluster_params,
            upstream,
            &self.managed_for(upstream),
        );
        let unknown = conf::keep_known(&mut params, self.major());
        (params, unknown)
    }

    /// Whether postgresql.conf or pg_hba.conf on disk differ from what `mode` and the
    /// current parameters ask for.
    pub fn config_stale(&self, mode: &Mode, cluster_params: &BTreeMap<String, ParamValue>) -> bool {
        let upstream = match mode {
            Mode::Standby(up) => up.as_ref(),
            Mode::Primary => None,
        };
        let (params, _) = self.parameters(cluster_params, upstream);
        self.read_data_file("postgresql.conf") != conf::postgresql_conf(&params)
            || self.read_data_file("pg_hba.conf") != conf::pg_hba_conf(&self.cfg)
    }

    /// Writes postgresql.conf, pg_hba.conf and the standby signal for `mode`.
    pub fn write_config(
        &self,
        mode: &Mode,
        cluster_params: &BTreeMap<String, ParamValue>,
    ) -> Result<()> {
        let upstream = match mode {
            Mode::Standby(up) => up.as_ref(),
            Mode::Primary => None,
        };
        self.write_standby_wal_settings(upstream)?;
        let (params, unknown) = self.parameters(cluster_params, upstream);
        for why in unknown {
            tracing::info!(reason = %why, "left a parameter out of postgresql.conf");
        }
        self.ensure_socket_dirs(&params)?;
        self.write_file(
            &self.data_dir.join("postgresql.conf"),
            &conf::postgresql_conf(&params),
            0o600,
        )?;
        self.write_file(
            &self.data_dir.join("pg_hba.conf"),
            &conf::pg_hba_conf(&self.cfg),
            0o600,
        )?;
        let signal = self.data_dir.join("standby.signal");
        match mode {
            Mode::Standby(_) => self.write_file(&signal, "", 0o600)?,
            Mode::Primary => match Dir::open(&self.data_dir)
                .and_then(|d| d.remove_file("standby.signal"))
            {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot remove {}", signal.display()))
                }
            },
        }
        Ok(())
    }

    /// The initdb arguments every new cluster of ours gets: `dir`, the configured superuser,
    /// its password as a SCRAM verifier in `pwfile` (written here, 0600; the caller removes
    /// it), scram-sha-256 for every connection.
    fn initdb_base_args(&self, dir: &Path, pwfile: &Path) -> Result<Vec<String>> {
        self.write_file(
            pwfile,
            &format!(
                "{}\n",
                conf::scram_verifier(&self.cfg.postgres.superuser.password)
            ),
            0o600,
        )?;
        Ok(vec![
            "-D".to_string(),
            dir.display().to_string(),
            format!("--username={}", self.cfg.postgres.superuser.username),
            format!("--pwfile={}", pwfile.display()),
            "--auth=scram-sha-256".to_string(),
        ])
    }

    /// initdb with data checksums. The superuser's password goes through a 0600 file as its
    /// SCRAM verifier (initdb stores a verifier as it is): the cleartext is never written
    /// to disk nor given to PostgreSQL (issue 13 item 11).
    pub async fn initdb(&self) -> Result<()> {
        self.ensure_data_dir()?;
        let pwfile = self.data_dir.with_extension("pgherd-pwfile");
        let mut args = self.initdb_base_args(&self.data_dir, &pwfile)?;
        args.push("--data-checksums".to_string());
        for opt in &self.cfg.bootstrap.initdb {
            for a in opt.to_args() {
                if a != "--data-checksums" {
                    args.push(a);
                }
            }
        }
        let result = self.run("initdb", &args).await;
        let _ = fsutil::split(&pwfile).and_then(|(d, name)| d.remove_file(name));
        result?;
        // Keep initdb's postgresql.conf as the base our managed file includes.
        Dir::open(&self.data_dir)
            .and_then(|d| d.rename("postgresql.conf", &d, "postgresql.base.conf"))
            .context("cannot keep initdb's postgresql.conf as postgresql.base.conf")?;
        Ok(())
    }

    /// Clones the upstream with pg_basebackup (WAL streamed alongside).
    pub async fn basebackup(&self, from: &Upstream) -> Result<()> {
        self.ensure_data_dir()?;
        let args = vec![
            "-D".to_string(),
            self.data_dir.display().to_string(),
            "-h".to_string(),
            from.host.clone(),
            "-p".to_string(),
            from.port.to_string(),
            "-U".to_string(),
            self.cfg.postgres.replication.username.clone(),
            // Host and port above complete this connection string (TLS options).
            "-d".to_string(),
            tls::conninfo_options(&self.cfg),
            "-X".to_string(),
            "stream".to_string(),
            "-c".to_string(),
            "fast".to_string(),
            "--no-password".to_string(),
        ];
        let mut args = args;
        for (old, new) in &self.cfg.postgres.tablespace_map {
            args.push(format!(
                "--tablespace-mapping={}={}",
                old.display(),
                new.display()
            ));
        }
        self.run("pg_basebackup", &args).await?;
        // pg_basebackup clones servers of older majors too: a clone of another major than
        // the binaries' is reported here, and never started.
        self.check_data_dir_major().with_context(|| {
            format!(
                "pg_basebackup from {} made a data directory of another major",
                from.name
            )
        })?;
        Ok(())
    }

    /// Removes everything inside the data directory (never the directory's parent), through
    /// descriptors: links in it are removed, never followed.
    pub fn empty_data_dir(&self) -> Result<()> {
        match Dir::open(&self.data_dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", self.data_dir.display())),
            Ok(dir) => dir
                .remove_contents()
                .with_context(|| format!("cannot empty {}", self.data_dir.display())),
        }
    }

    /// Creates the `unix_socket_directories` that do not exist yet, owned by the OS user, so
    /// a member can keep its sockets beside its data directory. Missing parents are root's
    /// 0755; the socket directory is made with `mkdirat` and given away through its own
    /// descriptor, so a link swapped in meanwhile is never chowned.
    fn ensure_socket_dirs(&self, params: &BTreeMap<String, String>) -> Result<()> {
        let Some(dirs) = params.get("unix_socket_directories") else {
            return Ok(());
        };
        for dir in dirs
            .split(',')
            .map(str::trim)
            .filter(|d| d.starts_with('/'))
        {
            let path = Path::new(dir);
            if !path.exists() {
                let (parent, name) = fsutil::split_create(path, 0o755).with_context(|| {
                    format!("cannot create the folder of unix_socket_directories entry {dir}")
                })?;
                let (sock, created) = parent.ensure_dir(&name, 0o755).with_context(|| {
                    format!("cannot create unix_socket_directories entry {dir}")
                })?;
                if created {
                    sock.chown(self.user.switch_to)
                        .with_context(|| format!("cannot give {dir} to {}", self.user.name))?;
                } else if !self.user.can_write(path) {
                    bail!(
                        "unix_socket_directories entry {dir} appeared meanwhile and is not writable by OS user {}",
                        self.user.name
                    );
                }
            } else if !self.user.can_write(path) {
                bail!(
                    "unix_socket_directories entry {dir} is not writable by OS user {}; give it to that user or name a directory that does not exist yet (pgherd creates it)",
                    self.user.name
                );
            }
        }
        Ok(())
    }

    /// Starts the postmaster as our child; the loop sees it come up.
    ///
    /// The child gets a parent-death signal (SIGQUIT: immediate shutdown), so if the agent
    /// dies its PostgreSQL stops rather than outliving the lease (rule 3 of docs/architecture.md).
    /// The runtime is single-threaded, so the spawning thread lives as long as the agent.
    pub async fn start(&self) -> Result<()> {
        self.check_data_dir_major()
            .context("not starting PostgreSQL")?;
        self.remove_stale_pid_file()?;
        self.remove_stale_socket_locks()?;
        if let Some(pid) = self.postmaster_pid() {
            bail!(
                "a postmaster (pid {pid}) already runs on {}",
                self.data_dir.display()
            );
        }
        let log = self.open_log()?;
        let log_err = log.try_clone()?;
        let mut cmd = tokio::process::Command::new(self.bin("postgres"));
        cmd.arg("-D")
            .arg(&self.data_dir)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .current_dir("/")
            // Own process group: a Ctrl-C aimed at the agent must not reach PostgreSQL.
            .process_group(0);
        self.user.apply(&mut cmd);
        let parent = std::process::id() as i32;
        // SAFETY: prctl and getppid are async-signal-safe; nothing else runs in pre_exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The agent may have died between fork and prctl.
                if libc::getppid() != parent {
                    return Err(std::io::Error::other("pgherd-agent exited during start"));
                }
                Ok(())
            });
        }
        tracing::info!(data_dir = %self.data_dir.display(), "starting PostgreSQL");
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin("postgres").display()))?;
        let pid = child.id().map_or(0, |p| p as i32);
        // The child is not reaped before its waiter below runs, so the handle names it.
        let handle = process::Handle::open(pid)
            .with_context(|| format!("cannot open a handle on the postmaster (pid {pid})"));
        let handle = match handle {
            Ok(h) => h,
            Err(e) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(e);
            }
        };
        *self
            .child
            .lock()
            .expect("child handle lock is never poisoned") = Some(Arc::new(handle));
        self.child_pid.store(pid, Ordering::SeqCst);
        self.child_alive.store(true, Ordering::SeqCst);
        let alive = self.child_alive.clone();
        let wake = self.wake.clone();
        let started = tokio::time::Instant::now();
        tokio::spawn(async move {
            match child.wait().await {
                Ok(status) => tracing::info!(%status, "PostgreSQL exited"),
                Err(e) => tracing::warn!(error = %e, "cannot wait for PostgreSQL"),
            }
            alive.store(false, Ordering::SeqCst);
            // A PostgreSQL that dies right after its start would be restarted in a tight
            // loop; leave that one to the loop's timer.
            if started.elapsed() >= Duration::from_secs(2) {
                wake.notify_one();
            }
        });
        Ok(())
    }

    /// Starts PostgreSQL and waits until it accepts connections.
    pub async fn start_and_wait(&self) -> Result<()> {
        self.start().await?;
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            if !self.is_our_child() {
                bail!(
                    "PostgreSQL exited during start; see {}",
                    self.log_path().display()
                );
            }
            if matches!(
                self.postmaster_status().as_deref(),
                Some("ready") | Some("standby")
            ) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "PostgreSQL did not accept connections within {:?}",
                    self.timeout
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (bounded by the command timeout) until our postmaster has exited.
    async fn wait_exit(&self) {
        let deadline = tokio::time::Instant::now() + self.timeout;
        while (self.is_our_child() || self.postmaster_pid().is_some())
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Fast shutdown: SIGINT to the postmaster (what `pg_ctl stop -m fast` sends), then
    /// wait for it to exit, polling every 20 ms rather than pg_ctl's 100 ms so a planned
    /// switchover loses no time here.
    pub async fn stop(&self) -> Result<()> {
        // callbacks.before_stop, waited for (bounded by callbacks.timeout); its failure is
        // logged by the runner and does not keep PostgreSQL running.
        if let (Some(cmd), true) = (&self.cfg.callbacks.before_stop, self.is_running()) {
            let _ = crate::callbacks::run_and_wait(
                "before_stop",
                cmd,
                &[],
                &[],
                self.cfg.callbacks.timeout(),
            )
            .await;
        }
        *self.client.lock().await = None;
        self.signal_postmaster(
            nix::sys::signal::Signal::SIGINT,
            "stopping PostgreSQL (fast shutdown)",
        )?;
        self.wait_exit().await;
        if self.is_running() {
            bail!(
                "PostgreSQL did not stop within {:?}; see {}",
                self.timeout,
                self.log_path().display()
            );
        }
        Ok(())
    }

    /// Immediate stop of our child postmaster (SIGQUIT), for fencing when a clean stop is
    /// too slow or impossible.
    pub async fn stop_immediately(&self) {
        *self.client.lock().await = None;
        if let Err(e) = self.signal_postmaster(
            nix::sys::signal::Signal::SIGQUIT,
            "stopping PostgreSQL immediately (SIGQUIT)",
        ) {
            tracing::warn!(error = %format!("{e:#}"), "cannot stop PostgreSQL immediately");
        }
        self.wait_exit().await;
    }

    /// What `pg_controldata` says of a stopped cluster.
    pub async fn control_data(&self) -> Result<ControlData> {
        let args = ["-D".to_string(), self.data_dir.display().to_string()];
        let out = self
            .run_logged("pg_controldata", &args, command::Log::Debug)
            .await?;
        parse_control_data(&out.stdout)
    }

    /// Rewinds this (stopped) data directory onto `from`'s history with pg_rewind. If the
    /// histories did not diverge, pg_rewind says so and changes nothing.
    pub async fn rewind(&self, from: &Upstream) -> Result<()> {
        let source = format!(
            "host={} port={} user={} dbname=postgres connect_timeout=5 {}",
            from.host,
            from.port,
            self.cfg.postgres.superuser.username,
            tls::conninfo_options(&self.cfg)
        );
        let args = vec![
            "-D".to_string(),
            self.data_dir.display().to_string(),
            format!("--source-server={source}"),
        ];
        self.check_data_dir_major()
            .context("not running pg_rewind")?;
        // pg_rewind runs a crash recovery in single-user mode first, which a stale lock file
        // stops.
        self.remove_stale_pid_file()?;
        let out = match self.run("pg_rewind", &args).await {
            Ok(out) => out,
            // A lock file that turned stale meanwhile: repaired, so worth one more try.
            Err(e) if format!("{e:#}").contains("postmaster.pid") => {
                match self.remove_stale_pid_file()? {
                    Some(pid) => {
                        tracing::info!(pid, error = %format!("{e:#}"), "pg_rewind failed on a stale postmaster.pid; removed it, trying once more");
                        self.run("pg_rewind", &args).await?
                    }
                    None => return Err(e),
                }
            }
            Err(e) => return Err(e),
        };
        let said = format!("{}{}", out.stdout, out.stderr);
        let summary = said
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("done");
        tracing::info!(from = %from.name, result = %summary.trim(), "pg_rewind finished");
        Ok(())
    }

    /// The switch point into `timeline`, from its `.history` file.
    pub async fn timeline_switch(&self, timeline: u32) -> Result<Option<crate::lsn::Lsn>> {
        self.with_client(|c| async move { query::timeline_switch(&c, timeline).await })
            .await
    }

    /// Promotes the standby: `pg_promote(wait => false)` (PostgreSQL replays all WAL it
    /// received first), then polls every 10 ms until it accepts writes.
    pub async fn promote(&self) -> Result<()> {
        self.request_promotion().await?;
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let in_recovery = self
                .with_client(|c| async move {
                    let row = c.query_one("SELECT pg_is_in_recovery()", &[]).await?;
                    Ok(row.get::<_, bool>(0))
                })
                .await?;
            if !in_recovery {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "PostgreSQL was still in recovery {:?} after pg_promote()",
                    self.timeout
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Asks PostgreSQL to end recovery (`pg_promote(false)`) without waiting for it: it first
    /// replays what the archive and `pg_wal` still hold, which may take longer than
    /// `postgres` timeouts allow.
    pub async fn request_promotion(&self) -> Result<()> {
        self.with_client(|c| async move {
            c.simple_query("SELECT pg_promote(false)").await?;
            Ok(())
        })
        .await
        .context("pg_promote() failed")
    }

    /// Whether recovery has paused (at a recovery target with `recovery_target_action =
    /// pause`, or by `pg_wal_replay_pause()`).
    pub async fn replay_paused(&self) -> Result<bool> {
        self.with_client(|c| async move {
            let row = c
                .query_one(
                    "SELECT pg_is_in_recovery() AND pg_get_wal_replay_pause_state() = 'paused'",
                    &[],
                )
                .await?;
            Ok(row.get::<_, bool>(0))
        })
        .await
    }

    /// Which of `names` only take effect after a restart (context `postmaster`).
    pub async fn restart_parameters(&self, names: Vec<String>) -> Result<Vec<String>> {
        if names.is_empty() {
            return Ok(names);
        }
        self.with_client(|c| async move {
            let rows = c
                .query(
                    "SELECT name FROM pg_settings WHERE name = ANY($1) AND context = 'postmaster'",
                    &[&names],
                )
                .await?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
        .await
    }

    /// Forces an immediate checkpoint (not spread out): before a clean shutdown, so it has
    /// little left to write, and after a promotion, so the control file shows the new timeline.
    pub async fn checkpoint(&self) -> Result<()> {
        self.with_client(|c| async move {
            c.simple_query("CHECKPOINT").await?;
            Ok(())
        })
        .await
    }

    /// Before pg_rewind from `from`: when it is a standby (a standby leader, or a standby
    /// cluster's source), a CHECKPOINT there (a restartpoint) so its pg_control shows the
    /// timeline it replays. pg_rewind reads the source's timeline from pg_control, and a
    /// standby's stays at its last restartpoint's: a source that followed a promotion but
    /// has not restarted since looks like an older timeline, and pg_rewind then rewinds onto
    /// the wrong history (found by bench/standby: the third site switch left a data
    /// directory whose minimum recovery point lies on timeline 1). Patroni does the same.
    pub async fn checkpoint_rewind_source(&self, from: &Upstream) -> Result<()> {
        let c = self.connect_to(&from.host, from.port).await?;
        let in_recovery: bool = c
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .with_context(|| format!("cannot ask {} whether it is a standby", from.name))?
            .get(0);
        if in_recovery {
            c.simple_query("CHECKPOINT")
                .await
                .with_context(|| format!("CHECKPOINT on the rewind source {} failed", from.name))?;
            tracing::info!(source = %from.name, "ran CHECKPOINT on the rewind source (a standby) so its pg_control shows its current timeline");
        }
        Ok(())
    }

    /// Ends the current WAL segment so it is archived; returns that segment's file name.
    pub async fn switch_wal(&self) -> Result<String> {
        self.with_client(|c| async move {
            let row = c
                .query_one("SELECT pg_walfile_name(pg_switch_wal())", &[])
                .await?;
            Ok(row.get(0))
        })
        .await
    }

    /// Re-reads the configuration files: SIGHUP to our postmaster (what pg_reload_conf() does).
    pub async fn reload(&self) -> Result<()> {
        // SIGHUP to the postmaster, as pg_reload_conf() sends it, but with no connection: a
        // standby that has not reached consistency accepts none, and is exactly the one that
        // may need a new primary_conninfo to get the WAL it waits for (a rewound former
        // leader started while etcd was unreachable, then told whom to follow).
        match self.signal_postmaster(
            nix::sys::signal::Signal::SIGHUP,
            "reloading PostgreSQL's configuration (SIGHUP)",
        )? {
            Some(_) => Ok(()),
            None => bail!("PostgreSQL is not running; nothing to reload"),
        }
    }

    /// Runs `f` with a connection to the local PostgreSQL as the superuser, connecting (or
    /// reconnecting) as needed.
    async fn with_client<F, Fut, T>(&self, f: F) -> Result<T>
    where
        F: FnOnce(Arc<tokio_postgres::Client>) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let client = {
            let mut guard = self.client.lock().await;
            let usable = guard.as_ref().is_some_and(|c| !c.is_closed());
            if !usable {
                *guard = Some(Arc::new(self.connect().await?));
            }
            guard.as_ref().expect("client was set just above").clone()
        };
        f(client).await
    }

    async fn connect(&self) -> Result<tokio_postgres::Client> {
        let (host, port) = self.local_address();
        self.connect_as(&host, port, tls::Peer::Local)
            .await
            .context("cannot connect to the local PostgreSQL")
    }

    /// What PostgreSQL says about itself; `None` if it does not answer within 3 s (a
    /// blocked server must not wedge the loop).
    pub async fn status(&self) -> Option<PgStatus> {
        let ask = self.with_client(|c| async move { query::status(&c).await });
        let answer = match tokio::time::timeout(Duration::from_secs(3), ask).await {
            Ok(a) => a,
            Err(_) => Err(anyhow::anyhow!(
                "PostgreSQL did not answer the status query within 3 s"
            )),
        };
        match answer {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::debug!(error = %format!("{e:#}"), "PostgreSQL status unavailable");
                *self.client.lock().await = None;
                None
            }
        }
    }

    /// Creates the replication role after initdb (the superuser exists already), on a
    /// connection of its own: its transaction turns statement logging off.
    pub async fn create_roles(&self) -> Result<()> {
        let mut c = self.connect().await?;
        query::create_replication_role(&mut c, &self.cfg.postgres.replication).await
    }

    /// The local server's replication slots (temporary ones left out).
    pub async fn slots(&self) -> Result<Vec<SlotRow>> {
        self.with_client(|c| async move { query::slots(&c).await })
            .await
    }

    /// `server_version_num` of the local server (150004, 170002, ...).
    pub async fn server_version_num(&self) -> Result<u32> {
        self.with_client(|c| async move {
            let v: String = c
                .query_one("SELECT current_setting('server_version_num')", &[])
                .await?
                .get(0);
            v.parse::<u32>()
                .with_context(|| format!("server_version_num {v:?} is not a number"))
        })
        .await
    }

    /// A connection to database `dbname` of the local server (logical slots live in one).
    async fn connect_local_db(&self, dbname: &str) -> Result<tokio_postgres::Client> {
        let (host, port) = self.local_address();
        self.connect_db(&host, port, tls::Peer::Local, dbname)
            .await
            .with_context(|| format!("cannot connect to database {dbname} of the local PostgreSQL"))
    }

    /// Creates `slot` on the local server; a logical one with `failover` on PostgreSQL 17+.
    pub async fn create_slot(&self, slot: &Create, failover: bool) -> Result<()> {
        match (slot.kind, &slot.database, &slot.plugin) {
            (SlotType::Logical, Some(db), Some(plugin)) => {
                let c = self.connect_local_db(db).await?;
                query::create_logical_slot(&c, &slot.name, plugin, failover).await
            }
            (SlotType::Logical, _, _) => Err(anyhow::anyhow!(
                "logical slot {} has no database or plugin",
                slot.name
            )),
            (SlotType::Physical, _, _) => {
                let name = slot.name.clone();
                self.with_client(|c| async move { query::create_physical_slot(&c, &name).await })
                    .await
            }
        }
    }

    pub async fn drop_slot(&self, name: &str) -> Result<()> {
        let name = name.to_string();
        self.with_client(|c| async move { query::drop_slot(&c, &name).await })
            .await
    }

    /// Moves `slot` forward to `to`; returns where it ended.
    pub async fn advance_slot(&self, slot: &SlotRow, to: Lsn) -> Result<Option<Lsn>> {
        match (&slot.kind, &slot.database) {
            (SlotType::Logical, Some(db)) => {
                let c = self.connect_local_db(db).await?;
                query::advance_slot(&c, &slot.name, to).await
            }
            _ => {
                let name = slot.name.clone();
                self.with_client(|c| async move { query::advance_slot(&c, &name, to).await })
                    .await
            }
        }
    }

    /// On the leader at `host:port`: logical slot `slot`'s on-disk state (`None`: the
    /// leader has no such slot).
    pub async fn leader_slot_state(
        &self,
        host: &str,
        port: u16,
        slot: &str,
    ) -> Result<Option<Vec<u8>>> {
        let c = self.connect_to(host, port).await?;
        query::logical_slot_state(&c, slot).await
    }

    /// Puts a logical slot's on-disk state (read from the leader) into this standby's
    /// `pg_replslot/<name>/state`, owned by the OS user, 0600, synced; PostgreSQL loads it
    /// at its next start. Written through descriptors (rule 8): `postgres` owns the
    /// directories walked.
    pub fn install_slot_state(&self, name: &str, state: &[u8]) -> Result<()> {
        install_slot_state(&self.data_dir, name, state, self.user.switch_to)
    }
}

/// [`Postgres::install_slot_state`] into `data_dir`, files owned by `owner`.
pub fn install_slot_state(
    data_dir: &Path,
    name: &str,
    state: &[u8],
    owner: fsutil::Owner,
) -> Result<()> {
    if !pgherd_config::valid_slot_name(name) {
        bail!("{name:?} is not a slot name");
    }
    let data =
        Dir::open(data_dir).with_context(|| format!("cannot open {}", data_dir.display()))?;
    let replslot = data.open_dir("pg_replslot")?;
    if replslot.exists(name)? {
        bail!("pg_replslot/{name} exists already");
    }
    // Built as `<name>.tmp` (PostgreSQL removes such directories at start, so a crash
    // half-way leaves nothing it would refuse to start with), then renamed into place.
    let tmp = format!("{name}.tmp");
    replslot.remove_tree(&tmp)?;
    let built = (|| -> Result<()> {
        let dir = replslot.create_dir(&tmp, 0o700)?;
        dir.chown(owner)?;
        dir.write_atomic("state", state, 0o600, owner)?;
        dir.sync()?;
        replslot.rename(&tmp, &replslot, name)?;
        replslot.sync()?;
        Ok(())
    })();
    if built.is_err() {
        let _ = replslot.remove_tree(&tmp);
    }
    built
}

/// Reads the fields pgherd needs from `pg_controldata` output.
/// [`Postgres::read_pid_file`] of `data_dir`.
fn read_pid_file(data_dir: &Path) -> Option<String> {
    let dir = Dir::open(data_dir).ok()?;
    let bytes = dir.read("postmaster.pid", 4096).ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

fn parse_control_data(text: &str) -> Result<ControlData> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim_start_matches(':').trim().to_string())
    };
    let timeline = field("Latest checkpoint's TimeLineID")
        .and_then(|v| v.parse().ok())
        .context("pg_controldata printed no \"Latest checkpoint's TimeLineID\"")?;
    let state = field("Database cluster state").unwrap_or_default();
    Ok(ControlData {
        timeline,
        shut_down_cleanly: state == "shut down" || state == "shut down in recovery",
        checkpoint_lsn: field("Latest checkpoint location").and_then(|v| v.parse().ok()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rule 8: the copy of a logical slot goes into `pg_replslot/<name>/state` through
    /// descriptors; a link the `postgres` user planted there is refused or replaced, never
    /// followed.
    #[test]
    fn a_slot_state_is_written_in_place_and_never_through_a_planted_link() {
        use std::os::unix::fs::{symlink, PermissionsExt};
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        let outside = root.path().join("outside");
        std::fs::create_dir_all(data.join("pg_replslot")).unwrap();
        std::fs::create_dir(&outside).unwrap();

        install_slot_state(&data, "cdc", b"state-bytes", None).unwrap();
        let file = data.join("pg_replslot/cdc/state");
        assert_eq!(std::fs::read(&file).unwrap(), b"state-bytes");
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );

        // The slot's directory is a link to elsewhere: refused, nothing written there.
        symlink(&outside, data.join("pg_replslot/evil")).unwrap();
        assert!(install_slot_state(&data, "evil", b"x", None).is_err());
        assert!(!outside.join("state").exists());

        // A slot that exists already is not overwritten.
        assert!(install_slot_state(&data, "cdc", b"new", None).is_err());
        assert_eq!(std::fs::read(&file).unwrap(), b"state-bytes");

        // A `<name>.tmp` left by a crash (or planted as a link) is removed, not followed.
        std::fs::write(outside.join("target"), b"keep").unwrap();
        symlink(&outside, data.join("pg_replslot/other.tmp")).unwrap();
        install_slot_state(&data, "other", b"o", None).unwrap();
        assert_eq!(std::fs::read(outside.join("target")).unwrap(), b"keep");
        assert!(!outside.join("state").exists());
        assert_eq!(
            std::fs::read(data.join("pg_replslot/other/state")).unwrap(),
            b"o"
        );
        assert!(!data.join("pg_replslot/other.tmp").exists());

        // pg_replslot itself a link: refused.
        let data2 = root.path().join("data2");
        std::fs::create_dir(&data2).unwrap();
        symlink(&outside, data2.join("pg_replslot")).unwrap();
        assert!(install_slot_state(&data2, "cdc", b"x", None).is_err());
        assert!(!outside.join("cdc").exists());

        // A name that is not a slot name never becomes a path.
        assert!(install_slot_state(&data, "../x", b"x", None).is_err());
    }

    /// Issue 13 item 10: the agent warns when its configuration file is open to others.
    #[test]
    fn a_configuration_file_open_to_others_is_reported() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pgherd.yml");
        std::fs::write(&path, "x").unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let md = |mode: u32| {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            std::fs::metadata(&path).unwrap()
        };
        assert_eq!(config_exposure(&md(0o600), me), Vec::<String>::new());
        assert_eq!(config_exposure(&md(0o400), me), Vec::<String>::new());
        let why = config_exposure(&md(0o644), me).join("; ");
        assert!(why.contains("every user can read it"), "{why}");
        let why = config_exposure(&md(0o666), me).join("; ");
        assert!(why.contains("every user can write it"), "{why}");
        assert!(why.contains("can write it"), "{why}");
        let why = config_exposure(&md(0o600), me + 1).join("; ");
        assert!(why.contains("belongs to"), "{why}");
    }

    /// Rule 8: `postgres` can put a FIFO or a link where `postmaster.pid` belongs; reading it
    /// must neither block the loop nor follow the link to a root file.
    #[test]
    fn a_planted_pid_file_is_neither_waited_on_nor_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "1\n").unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let pid = data.join("postmaster.pid");
        std::os::unix::fs::symlink(&victim, &pid).unwrap();
        assert_eq!(read_pid_file(&data), None, "followed a link");
        std::fs::remove_file(&pid).unwrap();
        nix::unistd::mkfifo(&pid, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let d = data.clone();
        std::thread::spawn(move || tx.send(read_pid_file(&d)));
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("reading a FIFO as postmaster.pid blocked");
        assert_eq!(got, None);
        std::fs::remove_file(&pid).unwrap();
        std::fs::write(&pid, "4242\n/data\n").unwrap();
        assert_eq!(read_pid_file(&data).as_deref(), Some("4242\n/data\n"));
    }

    #[test]
    fn the_newest_installed_major_is_found_by_number() {
        let root = tempfile::tempdir().unwrap();
        let install = |name: &str, with_postgres: bool| {
            let bin = root.path().join(name).join("bin");
            std::fs::create_dir_all(&bin).unwrap();
            if with_postgres {
                std::fs::write(bin.join("postgres"), "").unwrap();
            }
        };
        assert_eq!(newest_bin_dir(root.path()), None);
        install("9.6", true);
        assert_eq!(
            newest_bin_dir(root.path()),
            Some(root.path().join("9.6/bin"))
        );
        install("15", true);
        install("17", true);
        // Client programs only (postgresql-client-18): no server to run.
        install("18", false);
        // Not a major.
        install("latest", true);
        install("170", false);
        assert_eq!(
            newest_bin_dir(root.path()),
            Some(root.path().join("17/bin"))
        );
        install("18", true);
        assert_eq!(
            newest_bin_dir(root.path()),
            Some(root.path().join("18/bin"))
        );
        assert_eq!(newest_bin_dir(&root.path().join("missing")), None);
    }

    #[test]
    fn control_data_fields_are_read() {
        let text = "pg_control version number:            1300\n\
                    Database cluster state:               shut down in recovery\n\
                    Latest checkpoint location:           0/3000028\n\
                    Latest checkpoint's TimeLineID:       3\n\
                    Latest checkpoint's PrevTimeLineID:   3\n";
        let c = parse_control_data(text).unwrap();
        assert_eq!(c.timeline, 3);
        assert!(c.shut_down_cleanly);
        assert_eq!(c.checkpoint_lsn, Some("0/3000028".parse().unwrap()));
        assert!(parse_control_data("nonsense").is_err());
    }
}
