//! Coming from Patroni (issue 18 item 3): `pgherd-agent convert-patroni` as an operator runs
//! it, and a running Patroni 4 cluster handed over to pgherd on the same data directories:
//! no re-clone, no lost row, the same system identifier.
//!
//! Patroni comes from its own virtual environment (`scripts/install-deps` puts it in
//! /opt/pgherd-patroni; `PGHERD_PATRONI_DIR` points elsewhere) and runs as `postgres`.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use pgherd_tests::{
    agent_bin, current_wal_lsn, http_get, run_as_postgres, sql_batch, sql_value, wait_replayed,
    wait_streaming_from, wait_until, Cluster, Member, REPLICATION_PASSWORD, REPLICATION_USER,
    SUPERUSER, SUPERUSER_PASSWORD, TOKEN,
};

const PATRONI_UP: Duration = Duration::from_secs(120);
const PATRONI_STOP: Duration = Duration::from_secs(60);
const TAKEOVER: Duration = Duration::from_secs(120);
const REPLICATION: Duration = Duration::from_secs(60);

fn patroni_dir() -> PathBuf {
    std::env::var_os("PGHERD_PATRONI_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/pgherd-patroni"))
}

fn patroni_program(name: &str) -> Result<PathBuf> {
    let path = patroni_dir().join("bin").join(name);
    ensure!(
        path.is_file(),
        "{} does not exist: run scripts/install-deps (it installs Patroni into {}), or set PGHERD_PATRONI_DIR",
        path.display(),
        patroni_dir().display()
    );
    Ok(path)
}

/// `pgherd-agent <args>`, run to completion.
fn agent(args: &[&str]) -> Result<Output> {
    let bin = agent_bin()?;
    Command::new(&bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {} {}", bin.display(), args.join(" ")))
}

/// Patroni processes of the test, each in its own process group, killed with their group on
/// drop (PostgreSQL left behind is the harness members' to kill).
#[derive(Default)]
struct Patronis(Vec<(String, Child)>);

impl Patronis {
    /// Starts Patroni as `postgres` on `member`'s `patroni.yml`, output to `patroni.log`.
    fn start(&mut self, member: &Member) -> Result<()> {
        let program = patroni_program("patroni")?;
        let log = std::fs::File::create(member.dir().join("patroni.log"))?;
        let mut cmd = Command::new(&program);
        cmd.arg(member.dir().join("patroni.yml"))
            .env("HOME", member.dir())
            .current_dir(member.dir())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        if nix::unistd::geteuid().is_root() {
            let user = nix::unistd::User::from_name("postgres")?
                .context("OS user postgres does not exist")?;
            cmd.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        }
        // SAFETY: prctl is async-signal-safe; a test process that dies takes Patroni along.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        self.0.push((member.name().to_string(), child));
        Ok(())
    }

    /// SIGTERM for every Patroni (not its group), then waits until each exited.
    async fn stop_all(&mut self) -> Result<()> {
        for (_, child) in &self.0 {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            )?;
        }
        let children = &mut self.0;
        wait_until(PATRONI_STOP, "every Patroni to exit after SIGTERM", || {
            let running: Vec<String> = children
                .iter_mut()
                .filter_map(|(n, c)| matches!(c.try_wait(), Ok(None)).then(|| n.clone()))
                .collect();
            async move {
                ensure!(running.is_empty(), "still running: {running:?}");
                Ok(())
            }
        })
        .await?;
        self.0.clear();
        Ok(())
    }
}

impl Drop for Patronis {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = child.wait();
        }
    }
}

/// The Patroni configuration of `member`, in the shape Patroni's documentation shows: the
/// harness's ports, data directory and credentials, so that the converted file lands on them.
fn patroni_yaml(cluster: &Cluster, member: &Member) -> String {
    let hosts: Vec<String> = cluster
        .etcd()
        .endpoints()
        .iter()
        .map(|e| e.trim_start_matches("http://").to_string())
        .collect();
    let dir = member.dir().display();
    format!(
        r#"scope: {scope}
name: {name}
restapi:
  listen: 127.0.0.1:{http}
  connect_address: 127.0.0.1:{http}
  authentication:
    username: patroni
    password: {token}
etcd3:
  hosts: {hosts}
bootstrap:
  dcs:
    ttl: 20
    loop_wait: 1
    retry_timeout: 5
    maximum_lag_on_failover: 1048576
    postgresql:
      use_pg_rewind: true
      use_slots: true
      parameters:
        wal_log_hints: 'on'
        max_wal_senders: 10
        max_replication_slots: 10
  initdb:
  - encoding: UTF8
  - data-checksums
postgresql:
  listen: 127.0.0.1:{pg}
  connect_address: 127.0.0.1:{pg}
  data_dir: {data}
  bin_dir: {pg_bin}
  pgpass: {dir}/patroni.pgpass
  authentication:
    superuser:
      username: {su}
      password: {su_password}
    replication:
      username: {repl}
      password: {repl_password}
  parameters:
    unix_socket_directories: {dir}
  pg_hba:
  - local all all trust
  - host all all 127.0.0.1/32 scram-sha-256
  - host replication {repl} 127.0.0.1/32 scram-sha-256
watchdog:
  mode: off
tags:
  nofailover: false
  noloadbalance: false
  clonefrom: false
  nosync: false
"#,
        scope = cluster.name(),
        name = member.name(),
        http = member.http_port(),
        token = TOKEN,
        hosts = hosts.join(","),
        pg = member.pg_port(),
        data = member.data_dir().display(),
        pg_bin = pgherd_tests::pg_bin_dir().display(),
        su = SUPERUSER,
        su_password = SUPERUSER_PASSWORD,
        repl = REPLICATION_USER,
        repl_password = REPLICATION_PASSWORD,
    )
}

async fn system_identifier(member: &Member) -> Result<i64> {
    sql_value(member, "SELECT system_identifier FROM pg_control_system()").await
}

async fn rows(member: &Member) -> Result<i64> {
    sql_value(member, "SELECT count(*) FROM handover").await
}

/// Waits until `member` answers 200 on Patroni's (or pgherd's) `/primary`.
async fn wait_primary_check(member: &Member) -> Result<()> {
    let port = member.http_port();
    wait_until(
        PATRONI_UP,
        format!("{} to answer /primary", member.name()),
        || async move {
            let r = http_get(port, "GET", "/primary").await?;
            ensure!(r.status == 200, "status {}", r.status);
            Ok(())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn convert_patroni_prints_a_valid_file_reports_on_stderr_and_exits_by_the_documented_codes(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let patroni = dir.path().join("patroni.yml");
    std::fs::write(
        &patroni,
        "scope: demo\nname: pg-1\nrestapi: {listen: 0.0.0.0:8008, connect_address: 10.0.0.1:8008, authentication: {username: u, password: Zq9sh}}\netcd3: {hosts: [10.0.0.5:2379], protocol: https, cacert: /etc/etcd/ca.pem, username: patroni, password: etcd-secret-pw}\npostgresql: {listen: 0.0.0.0:5432, connect_address: 10.0.0.1:5432, data_dir: /var/lib/postgresql/15/main, authentication: {superuser: {username: postgres, password: su-secret-pw}, replication: {username: replicator, password: repl-secret-pw}}, callbacks: {on_reload: '/bin/sh -c true;'}}\nwatchdog: {mode: automatic}\ntags: {datacenter: east}\n",
    )?;
    let out = agent(&["convert-patroni", patroni.to_str().context("path")?])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "convert-patroni failed: {stderr}");
    for line in stderr.lines() {
        ensure!(line.contains(": "), "not `path: why`: {line}");
    }
    for path in [
        "name",
        "restapi.authentication",
        "postgresql.callbacks.on_reload",
        "watchdog",
    ] {
        ensure!(
            stderr.lines().any(|l| l.starts_with(&format!("{path}: "))),
            "no report at {path}: {stderr}"
        );
    }
    for secret in ["Zq9sh", "etcd-secret-pw", "su-secret-pw", "repl-secret-pw"] {
        ensure!(!stderr.contains(secret), "stderr shows a secret: {stderr}");
    }
    // A custom tag is carried as it is.
    ensure!(
        String::from_utf8_lossy(&out.stdout).contains("datacenter: east"),
        "the custom tag is not in the converted file"
    );
    let converted = dir.path().join("node1.yml");
    std::fs::write(&converted, &out.stdout)?;
    let check = agent(&["check-config", converted.to_str().context("path")?])?;
    ensure!(
        check.status.success(),
        "check-config refused the converted file: {}\n{}",
        String::from_utf8_lossy(&check.stderr),
        String::from_utf8_lossy(&out.stdout)
    );

    // A Patroni file that cannot make a member file (no password): 1, nothing on stdout.
    std::fs::write(
        &patroni,
        "scope: demo\nname: n1\nrestapi: {listen: 0.0.0.0:8008, connect_address: 10.0.0.1:8008}\netcd3: {host: 10.0.0.5:2379}\npostgresql: {listen: 0.0.0.0:5432, connect_address: 10.0.0.1:5432, data_dir: /d, authentication: {superuser: {username: postgres}, replication: {username: r, password: p}}}\n",
    )?;
    let out = agent(&["convert-patroni", patroni.to_str().context("path")?])?;
    ensure!(out.status.code() == Some(1), "{:?}", out.status);
    ensure!(out.stdout.is_empty());
    ensure!(String::from_utf8_lossy(&out.stderr)
        .contains("postgresql.authentication.superuser.password: "));

    // Not YAML, not Patroni's, missing: 2, naming the file.
    for text in ["scope: [", "cluster: x\n"] {
        std::fs::write(&patroni, text)?;
        let out = agent(&["convert-patroni", patroni.to_str().context("path")?])?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(2),
            "{text}: {:?} {stderr}",
            out.status
        );
        ensure!(stderr.contains(&*patroni.to_string_lossy()), "{stderr}");
    }
    let out = agent(&["convert-patroni", "/nonexistent/patroni.yml"])?;
    ensure!(out.status.code() == Some(2), "{:?}", out.status);
    Ok(())
}

/// A three-member Patroni 4 cluster on the harness's etcd is paused, Patroni stopped (its
/// PostgreSQL keeps running), each member's patroni.yml converted, and pgherd started on the
/// same data directories: the former Patroni leader leads, every row is on every member, the
/// replicas stream, nothing was cloned, and the cluster takes writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_patroni_cluster_is_taken_over_without_reclone_or_lost_rows() -> Result<()> {
    let patronictl = patroni_program("patronictl")?;
    let cluster = Cluster::builder().members(3).configure().await?;
    let mut patronis = Patronis::default();
    let result = takeover(&cluster, &mut patronis, &patronictl).await;
    if result.is_err() {
        for m in cluster.members() {
            eprintln!(
                "---- {} patroni.log\n{}",
                m.name(),
                pgherd_tests::tail(&m.dir().join("patroni.log"), 60)
            );
        }
    }
    drop(patronis);
    result
}

async fn takeover(cluster: &Cluster, patronis: &mut Patronis, patronictl: &Path) -> Result<()> {
    let [node1, node2, node3] = cluster.members() else {
        anyhow::bail!("three members expected");
    };
    for m in cluster.members() {
        let path = m.dir().join("patroni.yml");
        std::fs::write(&path, patroni_yaml(cluster, m))?;
        pgherd_tests::chown_to_postgres(&path)?;
    }
    // node1 bootstraps and leads; the others clone it.
    patronis.start(node1)?;
    wait_primary_check(node1).await?;
    patronis.start(node2)?;
    patronis.start(node3)?;
    for r in [node2, node3] {
        wait_streaming_from(r, node1, 1, PATRONI_UP).await?;
    }
    sql_batch(
        node1,
        "CREATE TABLE handover (id int PRIMARY KEY, v text);
         INSERT INTO handover SELECT g, 'under patroni' FROM generate_series(1, 1000) g;",
    )
    .await?;
    let sysid = system_identifier(node1).await?;
    for r in [node2, node3] {
        ensure!(system_identifier(r).await? == sysid);
    }

    // Patroni's maintenance mode, then Patroni stops: PostgreSQL keeps running, unmanaged.
    let config = node1.dir().join("patroni.yml");
    let config = config.to_str().context("path")?;
    run_as_postgres(patronictl, &["-c", config, "pause", "--wait"]).await?;
    patronis.stop_all().await?;
    for m in cluster.members() {
        ensure!(
            pgherd_tests::postmaster_pid(&m.data_dir()).is_some(),
            "{}'s PostgreSQL stopped with Patroni under pause",
            m.name()
        );
    }
    // The application goes on writing meanwhile.
    sql_batch(
        node1,
        "INSERT INTO handover SELECT g, 'no manager' FROM generate_series(1001, 1100) g;",
    )
    .await?;
    let lsn = current_wal_lsn(node1).await?;
    for r in [node2, node3] {
        wait_replayed(r, lsn, REPLICATION).await?;
    }

    // Each member's file converted as the README says, checked, and the marker that a
    // re-clone (which empties the data directory) would remove.
    for m in cluster.members() {
        let patroni = m.dir().join("patroni.yml");
        let port = m.api_port().to_string();
        let out = agent(&[
            "convert-patroni",
            "--api-port",
            &port,
            patroni.to_str().context("path")?,
        ])?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.success(),
            "convert-patroni {}: {stderr}",
            m.name()
        );
        for secret in [TOKEN, SUPERUSER_PASSWORD, REPLICATION_PASSWORD] {
            ensure!(!stderr.contains(secret), "stderr shows a secret: {stderr}");
        }
        m.write_config(&String::from_utf8(out.stdout)?)?;
        let check = agent(&["check-config", m.config_path().to_str().context("path")?])?;
        ensure!(
            check.status.success(),
            "check-config {}: {}",
            m.name(),
            String::from_utf8_lossy(&check.stderr)
        );
        let marker = m.data_dir().join("pgherd-takeover-marker");
        std::fs::write(&marker, m.name())?;
    }

    cluster.start_all()?;
    let healthy = cluster.wait_healthy(TAKEOVER).await?;
    ensure!(
        healthy.leader == node1.name(),
        "the former Patroni leader node1 should lead (the only data directory that is not a standby's): {healthy:?}"
    );
    let initialize = cluster.etcd_get("initialize").await?;
    ensure!(
        initialize.as_deref() == Some(sysid.to_string().as_str()),
        "initialize holds {initialize:?}, not {sysid}"
    );
    for r in [node2, node3] {
        wait_streaming_from(r, node1, 1, REPLICATION).await?;
    }
    // Load balancers and scripts keep asking the same port as under Patroni.
    let status = http_get(node1.http_port(), "GET", "/patroni").await?;
    let body = status.json()?;
    ensure!(
        status.status == 200
            && body["role"] == "primary"
            && body["database_system_identifier"] == sysid.to_string().as_str(),
        "node1's /patroni after the move: {} {}",
        status.status,
        status.body
    );
    sql_batch(
        node1,
        "INSERT INTO handover SELECT g, 'under pgherd' FROM generate_series(1101, 1200) g;",
    )
    .await?;
    let lsn = current_wal_lsn(node1).await?;
    for m in cluster.members() {
        if m.name() != node1.name() {
            wait_replayed(m, lsn, REPLICATION).await?;
        }
        ensure!(system_identifier(m).await? == sysid, "{}", m.name());
        let n = rows(m).await?;
        ensure!(n == 1200, "{} has {n} rows, not 1200", m.name());
        let marker = std::fs::read_to_string(m.data_dir().join("pgherd-takeover-marker"))
            .with_context(|| format!("{}'s data directory was replaced", m.name()))?;
        ensure!(
            marker == m.name(),
            "{}'s data directory is another's copy",
            m.name()
        );
        // The command runner logs every program it runs as `running command=<line>`.
        let log = m.agent_log();
        let clones: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("running command=") && l.contains("pg_basebackup"))
            .collect();
        ensure!(clones.is_empty(), "{} cloned: {clones:?}", m.name());
    }
    Ok(())
}
