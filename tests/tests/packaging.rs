//! Host packaging: the systemd unit passes `systemd-analyze verify` and says what the agent
//! needs (notify, watchdog, a stop that signals the agent alone); the Debian package built by
//! `scripts/build-deb` (cargo-deb, from the debug build the tests use, so it is quick) holds
//! the three programs, the unit, the conffile, the examples and the maintainer scripts that
//! make the `postgres` user and /etc/pgherd.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the repository root")
        .to_path_buf()
}

const UNIT: &str = "packaging/systemd/pgherd@.service";

/// Runs `cmd` to completion within `timeout` (it is killed after), failing with its output
/// unless it succeeds; returns stdout.
async fn run(cmd: Command, timeout: Duration) -> Result<String> {
    let shown = format!("{cmd:?}");
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    let output = tokio::time::timeout(timeout, cmd.output())
        .await
        .with_context(|| format!("{shown} did not finish within {timeout:?}"))?
        .with_context(|| format!("cannot run {shown}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    ensure!(
        output.status.success(),
        "{shown} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    Ok(stdout)
}

/// The unit's `Key=value` settings (the last one of each key).
fn unit_settings(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

#[tokio::test]
async fn the_systemd_unit_passes_systemd_analyze_verify_and_stops_the_agent_alone() -> Result<()> {
    let text = std::fs::read_to_string(repo_root().join(UNIT))
        .with_context(|| format!("cannot read {UNIT}"))?;
    let settings = unit_settings(&text);
    for (key, want) in [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("KillMode", "process"),
        ("Restart", "on-failure"),
        ("RestartPreventExitStatus", "2"),
        (
            "ExecStart",
            "/usr/bin/pgherd-agent --config /etc/pgherd/%i.yml",
        ),
        ("User", "root"),
    ] {
        ensure!(
            settings.get(key).map(String::as_str) == Some(want),
            "{UNIT}: {key}={:?}, expected {want}",
            settings.get(key)
        );
    }
    for key in ["WatchdogSec", "TimeoutStopSec", "TimeoutStartSec"] {
        let value = settings
            .get(key)
            .with_context(|| format!("{UNIT} sets no {key}"))?;
        let secs: u64 = value
            .parse()
            .with_context(|| format!("{key}={value} is not whole seconds"))?;
        // Above postgres.command_timeout's default (120 s): a healthy cycle or stop may last it.
        ensure!(
            secs > 120,
            "{key}={secs} is not above command_timeout (120 s)"
        );
    }

    // systemd-analyze checks that ExecStart's program exists: point it at the one built here.
    let dir = tempfile::tempdir()?;
    let unit = dir.path().join("pgherd@.service");
    let agent = pgherd_tests::agent_bin()?;
    std::fs::write(
        &unit,
        text.replace("/usr/bin/pgherd-agent", &agent.display().to_string()),
    )?;
    let mut cmd = Command::new("systemd-analyze");
    cmd.arg("verify").arg(&unit);
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::from(cmd).output(),
    )
    .await
    .context("systemd-analyze verify did not finish within 60 s")?
    .context("cannot run systemd-analyze (Debian: package systemd)")?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    // It reports every problem of the unit on stderr, some with exit status 0.
    let problems: Vec<&str> = stderr.lines().filter(|l| l.contains("pgherd@")).collect();
    ensure!(
        output.status.success() && problems.is_empty(),
        "systemd-analyze verify {} ({}):\n{stderr}",
        unit.display(),
        output.status
    );
    Ok(())
}

#[tokio::test]
async fn the_deb_holds_the_programs_the_unit_the_conffile_and_the_maintainer_scripts() -> Result<()>
{
    let root = repo_root();
    let out = tempfile::tempdir()?;
    let bin_dir = pgherd_tests::bin_dir()?;
    let target_dir = bin_dir
        .parent()
        .context("the binaries' directory has no parent (the target directory)")?;
    for program in ["pgherd-agent", "pgherd-watchdog", "pgherdctl"] {
        ensure!(
            bin_dir.join(program).is_file(),
            "{} is missing: run `cargo build --workspace --bins` first",
            bin_dir.join(program).display()
        );
    }
    let started = std::time::Instant::now();
    let mut build = Command::new(root.join("scripts/build-deb"));
    build
        .args(["--no-build", "--debug", "--output"])
        .arg(out.path())
        .env("CARGO_TARGET_DIR", target_dir)
        .current_dir(&root);
    run(build, Duration::from_secs(600)).await?;
    let built_in = started.elapsed();
    let deb = std::fs::read_dir(out.path())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .with_context(|| format!("scripts/build-deb left no .deb in {}", out.path().display()))?;

    let mut contents = Command::new("dpkg-deb");
    contents.arg("--contents").arg(&deb);
    let contents = run(contents, Duration::from_secs(60)).await?;
    let paths: Vec<&str> = contents
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .collect();
    for (path, mode) in [
        ("./usr/bin/pgherd-agent", "-rwxr-xr-x"),
        ("./usr/bin/pgherd-watchdog", "-rwxr-xr-x"),
        ("./usr/bin/pgherdctl", "-rwxr-xr-x"),
        ("./usr/lib/systemd/system/pgherd@.service", "-rw-r--r--"),
        ("./etc/default/pgherd", "-rw-r--r--"),
        ("./usr/share/doc/pgherd/examples/node1.yml", "-rw-r--r--"),
        ("./usr/share/doc/pgherd/examples/minimal.yml", "-rw-r--r--"),
        ("./usr/share/doc/pgherd/README.md", "-rw-r--r--"),
    ] {
        let line = contents
            .lines()
            .find(|l| l.split_whitespace().nth(5) == Some(path))
            .with_context(|| format!("{path} is not in the package:\n{contents}"))?;
        ensure!(line.starts_with(mode), "{path} is not {mode}: {line}");
    }
    ensure!(
        !paths.iter().any(|p| p.starts_with("./etc/pgherd/")),
        "the package ships files in /etc/pgherd, the members' own directory:\n{contents}"
    );

    let mut info = Command::new("dpkg-deb");
    info.arg("--info").arg(&deb);
    let info = run(info, Duration::from_secs(60)).await?;
    for needle in [
        "Package: pgherd",
        "Recommends: postgresql",
        "postinst",
        "prerm",
        "postrm",
        "conffiles",
    ] {
        ensure!(
            info.contains(needle),
            "dpkg-deb --info lacks {needle:?}:\n{info}"
        );
    }
    let depends = info
        .lines()
        .find(|l| l.trim_start().starts_with("Depends:"))
        .with_context(|| format!("no Depends:\n{info}"))?;
    ensure!(depends.contains("adduser"), "{depends}");

    // The control files as dpkg runs them.
    let control = tempfile::tempdir()?;
    let mut extract = Command::new("dpkg-deb");
    extract.arg("--control").arg(&deb).arg(control.path());
    run(extract, Duration::from_secs(60)).await?;
    let read = |name: &str| -> Result<String> {
        std::fs::read_to_string(control.path().join(name))
            .with_context(|| format!("no {name} in the package's control files"))
    };
    ensure!(
        read("conffiles")?
            .lines()
            .any(|l| l == "/etc/default/pgherd"),
        "/etc/default/pgherd is not a conffile"
    );
    let postinst = read("postinst")?;
    for needle in [
        "getent passwd postgres",
        "adduser --system",
        "install -d -m 0750 -o root -g",
        "/etc/pgherd",
        "daemon-reload",
    ] {
        ensure!(
            postinst.contains(needle),
            "postinst lacks {needle:?}:\n{postinst}"
        );
    }
    for script in ["postinst", "prerm", "postrm"] {
        let path = control.path().join(script);
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path)?.permissions());
        ensure!(
            mode & 0o111 == 0o111,
            "{script} is not executable ({mode:o})"
        );
        let mut check = Command::new("sh");
        check.arg("-n").arg(&path);
        run(check, Duration::from_secs(10))
            .await
            .with_context(|| format!("{script} is not valid sh"))?;
    }

    // The unit in the package is the repository's.
    let files = tempfile::tempdir()?;
    let mut unpack = Command::new("dpkg-deb");
    unpack.arg("--extract").arg(&deb).arg(files.path());
    run(unpack, Duration::from_secs(120)).await?;
    let packaged = std::fs::read(files.path().join("usr/lib/systemd/system/pgherd@.service"))?;
    if packaged != std::fs::read(root.join(UNIT))? {
        bail!("the packaged unit differs from {UNIT}");
    }
    eprintln!(
        "figures: scripts/build-deb --no-build --debug took {:.1} s; {}",
        built_in.as_secs_f64(),
        deb.display()
    );
    Ok(())
}
