//! Callbacks (`callbacks.on_start`, `on_stop`, `on_role_change`, `on_restart`): run as
//! `<command> <action> <role> <cluster>` when the agent starts, stops, restarts or changes
//! the role of PostgreSQL; a hanging one is killed with its process group at its timeout
//! while the loop goes on.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use pgherd_tests::{is_alive, wait_until, Cluster, MemberOptions};

const BRINGUP: Duration = Duration::from_secs(120);
const REACT: Duration = Duration::from_secs(60);

/// Writes an executable shell script.
fn script(path: &Path, body: &str) -> Result<()> {
    std::fs::write(path, format!("#!/bin/sh\n{body}\n"))
        .with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("cannot chmod {}", path.display()))?;
    Ok(())
}

/// A scratch directory for scripts and their output, readable by everyone.
fn scratch() -> Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix("pgherd-callbacks-")
        .tempdir()
        .context("cannot create a temp dir")?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))?;
    Ok(dir)
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Waits until `path` holds exactly `want`, line by line.
async fn wait_lines(path: &Path, want: &[&str]) -> Result<()> {
    wait_until(
        REACT,
        format!("{} to read {want:?}", path.display()),
        || async {
            let got = lines(path);
            ensure!(got == want, "it reads {got:?}");
            Ok(())
        },
    )
    .await
}

/// YAML that sends every callback of a member to `record <out>`.
fn recording(record: &Path, out: &Path) -> String {
    let cmd = format!("{} {}", record.display(), out.display());
    format!(
        "callbacks: {{on_start: '{cmd}', on_stop: '{cmd}', on_restart: '{cmd}', on_role_change: '{cmd}', timeout: 10}}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_get_action_role_and_cluster_on_start_switchover_restart_and_stop() -> Result<()>
{
    let dir = scratch()?;
    let record = dir.path().join("record.sh");
    // The first argument is the command's own (fixed) argument: where to write.
    script(&record, r#"out="$1"; shift; echo "$*" >> "$out""#)?;
    let out = |name: &str| -> PathBuf { dir.path().join(format!("{name}.calls")) };
    let cluster = Cluster::builder()
        .name("cbtest")
        .member(MemberOptions::new().yaml(recording(&record, &out("node1"))))
        .member(MemberOptions::new().yaml(recording(&record, &out("node2"))))
        .configure()
        .await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    wait_lines(&out("node1"), &["on_start primary cbtest"]).await?;
    wait_lines(&out("node2"), &["on_start replica cbtest"]).await?;

    cluster
        .ctl_output(&["switchover", "--candidate", "node2", "--force"])
        .await?
        .expect_success()?;
    cluster.wait_healthy(REACT).await?;
    wait_lines(
        &out("node2"),
        &["on_start replica cbtest", "on_role_change primary cbtest"],
    )
    .await?;
    wait_lines(
        &out("node1"),
        &[
            "on_start primary cbtest",
            "on_stop primary cbtest",
            "on_start replica cbtest",
            "on_role_change replica cbtest",
        ],
    )
    .await?;

    cluster
        .ctl_output(&["restart", "node1", "--force"])
        .await?
        .expect_success()?;
    // A planned stop runs on_stop before the agent exits.
    cluster.member("node1").stop().await?;
    let got = lines(&out("node1"));
    ensure!(
        got[4..] == ["on_restart replica cbtest", "on_stop replica cbtest"],
        "node1's callbacks after the restart and the stop: {got:?}"
    );
    Ok(())
}

fn pid_in(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_callback_is_killed_with_its_process_group_at_its_timeout_while_the_loop_goes_on(
) -> Result<()> {
    let dir = scratch()?;
    let hang = dir.path().join("hang.sh");
    // The script and a child of it both hang; the timeout must take both.
    script(
        &hang,
        r#"d="$1"; echo $$ > "$d/script.pid"; sleep 1000 & echo $! > "$d/child.pid"; wait"#,
    )?;
    let cluster = Cluster::builder()
        .member(MemberOptions::new().yaml(format!(
            "callbacks: {{on_start: '{} {}', timeout: 3}}",
            hang.display(),
            dir.path().display()
        )))
        .configure()
        .await?;
    let member = cluster.member("node1");
    member.start()?;
    let (script_pid, child_pid) = wait_until(BRINGUP, "the on_start callback to run", || async {
        let s = pid_in(&dir.path().join("script.pid")).context("no script.pid yet")?;
        let c = pid_in(&dir.path().join("child.pid")).context("no child.pid yet")?;
        Ok((s, c))
    })
    .await?;
    // While the callback hangs, the loop runs: the member leads and answers as primary.
    wait_until(
        REACT,
        "node1 to pass /primary while its callback hangs",
        || async {
            ensure!(
                is_alive(script_pid) && is_alive(child_pid),
                "the callback ended before the check passed"
            );
            let r = member.http_get("/primary").await?;
            ensure!(r.status == 200, "/primary answered {}", r.status);
            Ok(())
        },
    )
    .await?;
    wait_until(
        Duration::from_secs(15),
        "the timeout to kill the callback's group",
        || async {
            ensure!(!is_alive(script_pid), "the script (pid {script_pid}) lives");
            ensure!(!is_alive(child_pid), "its child (pid {child_pid}) lives");
            Ok(())
        },
    )
    .await?;
    let logged = member.agent_log().lines().any(|l| {
        l.contains("callback timed out: killed its process group") && l.contains("on_start")
    });
    ensure!(logged, "the agent did not log the killed on_start callback");
    wait_until(REACT, "the loop to keep running after the kill", || async {
        let r = member.http_get("/liveness").await?;
        ensure!(r.status == 200, "/liveness answered {}", r.status);
        let r = member.http_get("/primary").await?;
        ensure!(r.status == 200, "/primary answered {}", r.status);
        Ok(())
    })
    .await?;
    Ok(())
}

/// The callbacks Patroni has beside the four above (issue 18 item 5): `bootstrap.post_bootstrap`
/// gets a connection URL it can use before anyone else writes; `before_stop` runs while
/// PostgreSQL still runs; `on_reload` after a reload; `pre_promote` failing keeps a member
/// holding the key from promoting (it releases the key and stays a standby) until it succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_bootstrap_before_stop_on_reload_and_a_failing_pre_promote() -> Result<()> {
    let dir = scratch()?;
    let post = dir.path().join("post.sh");
    // Creates a table through the URL it is given, with the pgpass file it is told of.
    script(
        &post,
        &format!(
            r#"echo "$1 $PGPASSFILE" > {out}; exec psql -X -q "$1" -c 'CREATE TABLE made_by_post_bootstrap (id int)'"#,
            out = dir.path().join("post.calls").display()
        ),
    )?;
    let before = dir.path().join("before.sh");
    // Records whether PostgreSQL still ran (its postmaster.pid existed) when it was called.
    script(
        &before,
        r#"out="$1"; pid="$2/postmaster.pid"; if [ -e "$pid" ]; then echo "before_stop running $#" >> "$out"; else echo "before_stop stopped" >> "$out"; fi"#,
    )?;
    let record = dir.path().join("record.sh");
    script(&record, r#"out="$1"; shift; echo "$*" >> "$out""#)?;
    // pre_promote succeeds only once the test creates the flag file.
    let flag = dir.path().join("promote-allowed");
    let pre = dir.path().join("pre.sh");
    script(
        &pre,
        &format!(
            r#"echo "pre_promote $#" >> "$1"; test -e {}"#,
            flag.display()
        ),
    )?;
    let calls = |name: &str| dir.path().join(format!("{name}.calls"));
    let cluster = Cluster::builder()
        .name("cbhooks")
        .yaml(format!(
            "bootstrap: {{post_bootstrap: '{}'}}",
            post.display()
        ))
        .member(MemberOptions::new().name("node1"))
        .member(MemberOptions::new().name("node2"))
        .configure()
        .await?;
    let node2 = cluster.member("node2");
    let hooks = format!(
        "callbacks: {{before_stop: '{before} {out} {data}', on_reload: '{record} {out}', pre_promote: '{pre} {out}', timeout: 10}}",
        before = before.display(),
        record = record.display(),
        pre = pre.display(),
        out = calls("node2").display(),
        data = node2.data_dir().display(),
    );
    let merged = node2.write_config_copy("with-hooks.yml", &hooks)?;
    node2.write_config(&std::fs::read_to_string(&merged)?)?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    cluster.wait_healthy(BRINGUP).await?;
    let node1 = cluster.member("node1");

    // post_bootstrap ran once, on the member that ran initdb, with a usable URL.
    let post_calls = lines(&calls("post"));
    ensure!(
        post_calls.len() == 1
            && post_calls[0].starts_with("postgres://")
            && post_calls[0].contains(".pgpass"),
        "post_bootstrap calls: {post_calls:?}"
    );
    wait_until(REACT, "the table post_bootstrap made, on node2", || async {
        let n: i64 = pgherd_tests::sql_value(
            node2,
            "SELECT count(*) FROM pg_class WHERE relname = 'made_by_post_bootstrap'",
        )
        .await?;
        ensure!(n == 1, "not there");
        Ok(())
    })
    .await?;

    // on_reload after pgherdctl reload; before_stop (no arguments of its own) while
    // PostgreSQL still runs, at a restart.
    cluster
        .ctl_output(&["reload", "node2"])
        .await?
        .expect_success()?;
    wait_lines(&calls("node2"), &["on_reload replica cbhooks"]).await?;
    cluster
        .ctl_output(&["restart", "node2", "--force"])
        .await?
        .expect_success()?;
    wait_lines(
        &calls("node2"),
        &["on_reload replica cbhooks", "before_stop running 2"],
    )
    .await?;
    cluster.wait_healthy(BRINGUP).await?;

    // The leader dies; node2 takes the key, but its pre_promote fails: it must not promote.
    node1.kill()?;
    wait_until(REACT, "node2's pre_promote to run and fail", || async {
        ensure!(
            lines(&calls("node2")).iter().any(|l| l == "pre_promote 1"),
            "not yet"
        );
        Ok(())
    })
    .await?;
    pgherd_tests::hold_for(
        Duration::from_secs(6),
        "node2 to stay a standby",
        || async {
            ensure!(
                pgherd_tests::in_recovery(node2).await?,
                "node2 promoted although pre_promote failed"
            );
            Ok(())
        },
    )
    .await?;
    ensure!(
        node2
            .agent_log()
            .contains("callbacks.pre_promote did not succeed"),
        "node2's log does not say why it did not promote"
    );
    // Once the script succeeds, node2 promotes.
    std::fs::write(&flag, "")?;
    wait_until(REACT, "node2 to promote", || async {
        ensure!(!pgherd_tests::in_recovery(node2).await?, "still a standby");
        Ok(())
    })
    .await?;
    ensure!(
        cluster.leader_name().await?.as_deref() == Some("node2"),
        "node2 does not hold the leader key"
    );
    Ok(())
}
