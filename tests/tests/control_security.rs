//! Who may change the cluster: every mutating request needs the cluster's bearer token;
//! over TLS with a client CA, also a client certificate that CA signed, and plain text does
//! not reach the API at all. Reading the cluster's state (from etcd) needs neither.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use pgherd_tests::{ctl_direct_output, Cluster, CtlOutput, TestPki, TOKEN};

const BRINGUP: Duration = Duration::from_secs(90);
const REJOIN: Duration = Duration::from_secs(90);

/// Whether the dynamic configuration says `pause: true`.
async fn is_paused(cluster: &Cluster) -> Result<bool> {
    let out = cluster
        .ctl_output(&["show-config", "--format", "json"])
        .await?;
    out.expect_success()?;
    let config: serde_json::Value = serde_json::from_str(&out.stdout)
        .with_context(|| format!("show-config printed no JSON: {}", out.stdout))?;
    Ok(config
        .get("pause")
        .and_then(|p| p.as_bool())
        .unwrap_or(false))
}

async fn leader_unchanged(cluster: &Cluster, leader: &str) -> Result<()> {
    let now = cluster.leader_name().await?;
    ensure!(
        now.as_deref() == Some(leader),
        "the leader key names {now:?}, not {leader}"
    );
    ensure!(
        cluster.etcd_get("switchover").await?.is_none(),
        "a switchover key appeared"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_without_the_token_or_with_a_wrong_one_are_not_allowed_while_list_and_history_work(
) -> Result<()> {
    let cluster = Cluster::builder().members(2).configure().await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    let node1 = cluster.member("node1");
    let config = node1.config_path().display().to_string();
    let no_token = node1
        .write_config_copy("pgherdctl-no-token.yml", "api: {auth_token: null}")?
        .display()
        .to_string();
    let endpoints = cluster.etcd().endpoints().join(",");

    let attempts: Vec<(&str, Vec<&str>, &[&str])> = vec![
        (
            "config without a token: pause",
            vec!["--config", &no_token, "pause"],
            &["not allowed", "token"],
        ),
        (
            "config without a token: switchover",
            vec![
                "--config",
                &no_token,
                "switchover",
                "--candidate",
                "node2",
                "--force",
            ],
            &["not allowed", "token"],
        ),
        (
            "no config, no token: pause",
            vec!["--endpoints", &endpoints, "--cluster", "test", "pause"],
            &["not allowed", "token"],
        ),
        (
            "wrong token: pause",
            vec![
                "--config",
                &config,
                "--token",
                "wrong-token-xxxxxxxx",
                "pause",
            ],
            &["not allowed", "wrong bearer token"],
        ),
        (
            "wrong token: switchover",
            vec![
                "--config",
                &config,
                "--token",
                "wrong-token-xxxxxxxx",
                "switchover",
                "--candidate",
                "node2",
                "--force",
            ],
            &["not allowed", "wrong bearer token"],
        ),
        (
            "empty token: pause",
            vec!["--config", &config, "--token", "", "pause"],
            &["not allowed", "token"],
        ),
    ];
    let mut refusals = Vec::new();
    for (what, args, needles) in attempts {
        let out: CtlOutput = ctl_direct_output(&args).await?;
        out.expect_failure(1, needles).context(what)?;
        refusals.push(format!("{what}: {}", out.stderr.trim()));
        ensure!(
            !is_paused(&cluster).await?,
            "{what}: the cluster got paused"
        );
        leader_unchanged(&cluster, "node1").await.context(what)?;
    }

    // Reading needs no token: it comes from etcd.
    let list = ctl_direct_output(&["--config", &no_token, "list", "--format", "json"]).await?;
    list.expect_success()?;
    let rows: serde_json::Value = serde_json::from_str(&list.stdout)
        .with_context(|| format!("list printed no JSON: {}", list.stdout))?;
    ensure!(
        rows.as_array().is_some_and(|a| a.len() == 2),
        "list without a token shows {rows}"
    );
    ctl_direct_output(&["--config", &no_token, "history"])
        .await?
        .expect_success()?;

    // And the right token is what makes the difference.
    ctl_direct_output(&["--config", &config, "pause"])
        .await?
        .expect_success()?;
    ensure!(
        is_paused(&cluster).await?,
        "pause with the token did not pause"
    );
    ctl_direct_output(&["--config", &no_token, "--token", TOKEN, "resume"])
        .await?
        .expect_success()?;
    ensure!(
        !is_paused(&cluster).await?,
        "resume with --token did not resume"
    );
    eprintln!("figures: refusals: {}", refusals.join(" | "));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_only_a_client_with_a_certificate_from_the_cluster_ca_can_switch_over(
) -> Result<()> {
    // Dropped after the cluster: the agents read these files.
    let pki_dir = tempfile::tempdir()?;
    let pki = TestPki::generate(pki_dir.path())?;
    let cluster = Cluster::builder()
        .yaml(pki.api_yaml())
        // The members share one certificate (for 127.0.0.1 and localhost), so it names no
        // member: they accept each other by this identity (issue 13 item 5).
        .yaml("api: {tls: {member_identity: localhost}}")
        .members(2)
        .configure()
        .await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    let endpoints = cluster.etcd().endpoints().join(",");
    let ca = pki.ca.display().to_string();

    // The right CA and token, but no client certificate.
    let no_cert = ctl_direct_output(&[
        "--endpoints",
        &endpoints,
        "--cluster",
        "test",
        "--cacert",
        &ca,
        "--token",
        TOKEN,
        "switchover",
        "--candidate",
        "node2",
        "--force",
    ])
    .await?;
    no_cert.expect_failure(1, &[])?;
    leader_unchanged(&cluster, "node1").await?;
    let no_cert_pause = ctl_direct_output(&[
        "--endpoints",
        &endpoints,
        "--cluster",
        "test",
        "--cacert",
        &ca,
        "--token",
        TOKEN,
        "pause",
    ])
    .await?;
    no_cert_pause.expect_failure(1, &[])?;
    ensure!(
        !is_paused(&cluster).await?,
        "a client without a certificate paused the cluster"
    );

    // Plain text against the TLS API.
    let plain = ctl_direct_output(&[
        "--endpoints",
        &endpoints,
        "--cluster",
        "test",
        "--token",
        TOKEN,
        "pause",
    ])
    .await?;
    plain.expect_failure(1, &[])?;
    ensure!(
        !is_paused(&cluster).await?,
        "a plain-text client paused the cluster"
    );

    // Reading the state comes from etcd and needs no certificate.
    ctl_direct_output(&["--endpoints", &endpoints, "--cluster", "test", "list"])
        .await?
        .expect_success()?;

    // The member's config presents the member certificate as the client certificate.
    let out = cluster
        .ctl_output(&["switchover", "--candidate", "node2", "--force"])
        .await?;
    out.expect_success()?;
    leader_unchanged(&cluster, "node2").await?;
    let healthy = cluster.wait_healthy(REJOIN).await?;
    ensure!(healthy.leader == "node2", "{healthy:?}");
    eprintln!(
        "figures: without a client certificate: {:?} / {:?}; plain text: {:?}; with the member's config: {:?}",
        no_cert.stderr.trim(),
        no_cert_pause.stderr.trim(),
        plain.stderr.trim(),
        out.stdout.trim()
    );
    Ok(())
}
