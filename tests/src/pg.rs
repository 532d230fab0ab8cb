//! PostgreSQL from the outside: SQL over TCP as the superuser, the postmaster of a data
//! directory, commands run as OS user `postgres`, and a plain PostgreSQL started by hand.

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use nix::unistd::User;
use tempfile::TempDir;
use tokio_postgres::types::FromSqlOwned;
use tokio_postgres::{Client, NoTls, Row};

use crate::member::Member;
use crate::ports::free_port;
use crate::process::{command_line, is_alive, output_within, succeeded};
use crate::{SUPERUSER, SUPERUSER_PASSWORD};

/// Where Debian installs each PostgreSQL major's programs: `<PG_LIB_DIR>/<major>/bin`.
const PG_LIB_DIR: &str = "/usr/lib/postgresql";
/// The environment variable that picks the PostgreSQL the tests run (scripts/test-matrix).
pub const PG_BIN_DIR_ENV: &str = "PGHERD_TEST_PG_BIN_DIR";
/// OS user that runs PostgreSQL when the tests run as root.
const PG_OS_USER: &str = "postgres";
/// How long initdb and pg_ctl may take.
const PG_COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// The directory of the PostgreSQL programs the tests run: `PGHERD_TEST_PG_BIN_DIR` if set
/// (the version matrix runs the same tests against 15, 17 and 18), else the newest
/// `/usr/lib/postgresql/<major>/bin` that holds `postgres`. When no major is installed the
/// answer is 15's directory, and the first command run from it says what is missing.
pub fn pg_bin_dir() -> PathBuf {
    pg_bin_dir_from_env().unwrap_or_else(|| {
        newest_installed_bin_dir(Path::new(PG_LIB_DIR))
            .unwrap_or_else(|| Path::new(PG_LIB_DIR).join("15").join("bin"))
    })
}

/// The `<lib_dir>/<major>/bin` with the highest numeric major that holds `postgres`.
fn newest_installed_bin_dir(lib_dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(lib_dir)
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let major: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("postgres").is_file().then_some((major, bin))
        })
        .max_by_key(|(major, _)| *major)
        .map(|(_, bin)| bin)
}

/// Whether the tests were pointed at a PostgreSQL by `PGHERD_TEST_PG_BIN_DIR` (then member
/// configs name it as `postgres.bin_dir`; otherwise the agent finds its own).
pub fn pg_bin_dir_from_env() -> Option<PathBuf> {
    std::env::var_os(PG_BIN_DIR_ENV)
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
}

/// Where and as whom to connect to a PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgConn {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub dbname: String,
}

impl PgConn {
    /// The test superuser at `127.0.0.1:<port>`.
    pub fn superuser(port: u16) -> Self {
        PgConn {
            host: "127.0.0.1".into(),
            port,
            user: SUPERUSER.into(),
            password: SUPERUSER_PASSWORD.into(),
            dbname: "postgres".into(),
        }
    }

    /// A new connection; its driver task runs on the current tokio runtime.
    pub async fn connect(&self) -> Result<Client> {
        let (client, connection) = tokio_postgres::Config::new()
            .host(&self.host)
            .port(self.port)
            .user(&self.user)
            .password(&self.password)
            .dbname(&self.dbname)
            .application_name("pgherd-tests")
            .connect_timeout(Duration::from_secs(5))
            .connect(NoTls)
            .await
            .with_context(|| {
                format!(
                    "cannot connect to PostgreSQL at {}:{} as {}",
                    self.host, self.port, self.user
                )
            })?;
        tokio::spawn(async move {
            // The error, if any, surfaces on the client's next call.
            let _ = connection.await;
        });
        Ok(client)
    }

    /// Runs one statement and returns its rows.
    pub async fn query(&self, query: &str) -> Result<Vec<Row>> {
        let client = self.connect().await?;
        client
            .query(query, &[])
            .await
            .with_context(|| format!("{query:?} on PostgreSQL port {}", self.port))
    }

    /// Runs statements separated by `;` (no rows returned).
    pub async fn batch(&self, statements: &str) -> Result<()> {
        let client = self.connect().await?;
        client
            .batch_execute(statements)
            .await
            .with_context(|| format!("{statements:?} on PostgreSQL port {}", self.port))
    }

    /// Runs a query returning one row and returns its first column.
    pub async fn value<T: FromSqlOwned>(&self, query: &str) -> Result<T> {
        let client = self.connect().await?;
        let row = client
            .query_one(query, &[])
            .await
            .with_context(|| format!("{query:?} on PostgreSQL port {}", self.port))?;
        row.try_get(0)
            .with_context(|| format!("first column of {query:?} on PostgreSQL port {}", self.port))
    }
}

/// Runs one statement on `member`'s PostgreSQL as the superuser and returns its rows.
pub async fn sql(member: &Member, query: &str) -> Result<Vec<Row>> {
    member
        .pg()
        .query(query)
        .await
        .with_context(|| format!("on member {}", member.name()))
}

/// Runs statements separated by `;` on `member`'s PostgreSQL.
pub async fn sql_batch(member: &Member, statements: &str) -> Result<()> {
    member
        .pg()
        .batch(statements)
        .await
        .with_context(|| format!("on member {}", member.name()))
}

/// Runs a one-row query on `member`'s PostgreSQL and returns the first column,
/// e.g. `sql_value::<i64>(m, "SELECT count(*) FROM t")`.
pub async fn sql_value<T: FromSqlOwned>(member: &Member, query: &str) -> Result<T> {
    member
        .pg()
        .value(query)
        .await
        .with_context(|| format!("on member {}", member.name()))
}

/// The pid of the live postmaster that owns `data_dir`, from the first line of its
/// `postmaster.pid`; `None` if there is no such file or the process is gone (a stale file's
/// pid may belong to something else by now, so the process must look like a postmaster).
pub fn postmaster_pid(data_dir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    if pid <= 0 || !is_alive(pid) {
        return None;
    }
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if !matches!(comm.trim(), "postgres" | "postmaster") {
        return None;
    }
    // The postmaster runs in its data directory; when that is readable it must match.
    if let (Ok(cwd), Ok(dir)) = (
        std::fs::read_link(format!("/proc/{pid}/cwd")),
        std::fs::canonicalize(data_dir),
    ) {
        if cwd != dir {
            return None;
        }
    }
    Some(pid)
}

/// SIGKILLs the postmaster of `data_dir` if one is alive, with its whole process group when
/// it leads one (the agent starts it so: then no backend, frozen or not, outlives it), and
/// waits briefly until it is gone. Returns whether there was one.
pub fn kill_postmaster(data_dir: &Path) -> bool {
    let Some(pid) = postmaster_pid(data_dir) else {
        return false;
    };
    // The postmaster and every backend (each runs in a session of its own).
    pgherd_watchdog::kill_postgres(pid);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while is_alive(pid) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// Runs `program` as OS user `postgres` (through `runuser` when the tests run as root,
/// directly otherwise), in `/`, with a timeout; fails with its stderr if it exits non-zero.
pub async fn run_as_postgres<S: AsRef<OsStr>>(program: &Path, args: &[S]) -> Result<Output> {
    let mut cmd = if nix::unistd::geteuid().is_root() {
        let mut c = tokio::process::Command::new("runuser");
        c.arg("-u").arg(PG_OS_USER).arg("--").arg(program);
        c
    } else {
        tokio::process::Command::new(program)
    };
    cmd.args(args)
        .current_dir("/")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let shown = command_line(program.display(), args);
    let output = output_within(&mut cmd, &shown, PG_COMMAND_TIMEOUT).await?;
    succeeded(&shown, output)
}

/// Gives `path` to OS user `postgres` when the tests run as root (a no-op otherwise).
pub fn chown_to_postgres(path: &Path) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let user = User::from_name(PG_OS_USER)
        .context("cannot look up OS user postgres")?
        .context("OS user postgres does not exist")?;
    nix::unistd::chown(path, Some(user.uid), Some(user.gid))
        .with_context(|| format!("cannot chown {} to postgres", path.display()))
}

/// Creates `data_dir` (mode 0700, owned by `postgres`) and runs [`pg_bin_dir`]'s `initdb` in
/// it as `postgres`, with superuser `postgres`; `args` are extra initdb options.
pub async fn initdb(data_dir: &Path, args: &[&str]) -> Result<()> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot chmod 0700 {}", data_dir.display()))?;
    chown_to_postgres(data_dir)?;
    let mut all: Vec<&OsStr> = vec![
        OsStr::new("-D"),
        data_dir.as_os_str(),
        OsStr::new("-U"),
        OsStr::new(SUPERUSER),
        OsStr::new("--no-sync"),
    ];
    all.extend(args.iter().map(OsStr::new));
    run_as_postgres(&pg_bin_dir().join("initdb"), &all).await?;
    Ok(())
}

/// A PostgreSQL started by hand with initdb + pg_ctl, without any agent: to check the
/// harness itself, or to stand in for a foreign server. Killed and removed on drop.
#[derive(Debug)]
pub struct PlainPostgres {
    port: u16,
    data_dir: PathBuf,
    log_path: PathBuf,
    root: Option<TempDir>,
}

impl PlainPostgres {
    /// initdb (superuser password [`SUPERUSER_PASSWORD`], scram over TCP) and start on a free
    /// loopback port; returns once PostgreSQL accepts connections.
    pub async fn start() -> Result<PlainPostgres> {
        let root = crate::temp_root("pgherd-plainpg-")?;
        let dir = root.path().to_path_buf();
        // The socket directory: the postmaster creates its socket and lock file there.
        chown_to_postgres(&dir)?;
        let pwfile = dir.join("pwfile");
        std::fs::write(&pwfile, SUPERUSER_PASSWORD)?;
        chown_to_postgres(&pwfile)?;
        let pg = PlainPostgres {
            port: free_port()?,
            data_dir: dir.join("data"),
            log_path: dir.join("data.log"),
            root: Some(root),
        };
        let pwfile_arg = format!("--pwfile={}", pwfile.display());
        initdb(
            &pg.data_dir,
            &[
                &pwfile_arg,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ],
        )
        .await?;
        std::fs::remove_file(&pwfile)?;
        // pg_ctl, running as postgres, must be able to create the log file.
        std::fs::write(&pg.log_path, "")?;
        chown_to_postgres(&pg.log_path)?;
        let options = format!(
            "-c port={} -c listen_addresses=127.0.0.1 -c unix_socket_directories={}",
            pg.port,
            dir.display()
        );
        let pg_ctl = pg_bin_dir().join("pg_ctl");
        let args: [&OsStr; 9] = [
            OsStr::new("start"),
            OsStr::new("-w"),
            OsStr::new("-D"),
            pg.data_dir.as_os_str(),
            OsStr::new("-l"),
            pg.log_path.as_os_str(),
            OsStr::new("-o"),
            OsStr::new(&options),
            OsStr::new("--timeout=60"),
        ];
        run_as_postgres(&pg_ctl, &args)
            .await
            .with_context(|| format!("log:\n{}", crate::tail(&pg.log_path, 20)))?;
        Ok(pg)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The superuser connection.
    pub fn pg(&self) -> PgConn {
        PgConn::superuser(self.port)
    }
}

impl Drop for PlainPostgres {
    fn drop(&mut self) {
        kill_postmaster(&self.data_dir);
        if let Some(root) = self.root.take() {
            crate::dispose_temp_root(root);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_installed_major_is_numeric_and_needs_a_postgres() {
        let lib = tempfile::tempdir().expect("a temp dir");
        for (major, with_postgres) in [("9", true), ("15", true), ("18", false), ("x", true)] {
            let bin = lib.path().join(major).join("bin");
            std::fs::create_dir_all(&bin).expect("create bin dir");
            if with_postgres {
                std::fs::write(bin.join("postgres"), "").expect("write postgres");
            }
        }
        assert_eq!(
            newest_installed_bin_dir(lib.path()),
            Some(lib.path().join("15").join("bin"))
        );
        assert_eq!(newest_installed_bin_dir(&lib.path().join("none")), None);
    }
}
