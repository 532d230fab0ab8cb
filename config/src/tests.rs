use super::*;

const GOOD: &str = include_str!("../examples/minimal.yml");

/// Replaces the line starting with `from` (after indentation) in the minimal example.
fn with(replacements: &[(&str, &str)]) -> String {
    let mut text = GOOD.to_string();
    for (from, to) in replacements {
        assert!(text.contains(from), "fixture has no {from:?}");
        text = text.replacen(from, to, 1);
    }
    text
}

fn paths(text: &str) -> Vec<String> {
    match parse(text) {
        Ok(_) => vec![],
        Err(problems) => problems.into_iter().map(|p| p.path).collect(),
    }
}

#[test]
fn shipped_examples_are_valid() {
    for (name, text) in [
        ("node1.yml", include_str!("../examples/node1.yml")),
        ("minimal.yml", GOOD),
    ] {
        if let Err(p) = parse(text) {
            panic!("{name}: {}", Problem::list(&p));
        }
    }
}

#[test]
fn defaults_fill_what_the_file_leaves_out() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.postgres.os_user, "postgres");
    assert_eq!(c.bootstrap.dcs, DynamicConfig::default());
    assert_eq!(c.tags.failover_priority, 1);
    assert!(!c.tags.nofailover);
    assert_eq!(c.prefix(), "/pgherd/demo/");
    assert_eq!(c.api.http_listen, None);
    assert_eq!(c.callbacks, Callbacks::default());
    assert_eq!(c.callbacks.timeout, 30);
    assert_eq!(
        c.pgpass_path(),
        PathBuf::from("/var/lib/pgherd/node2/data.pgpass")
    );
}

/// A case: what it shows, replacements in the minimal example, the problem paths expected.
type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a [&'a str]);

#[test]
fn each_problem_is_reported_at_its_yaml_path() {
    let cases: &[Case] = &[
        (
            "unknown top-level key",
            &[("cluster: demo", "cluster: demo\nclustre: x")],
            &["clustre"],
        ),
        (
            "unknown nested key and wrong type together",
            &[
                (
                    "  listen: 127.0.0.1:5433",
                    "  listen: 127.0.0.1:5433\n  lisen: x",
                ),
                ("cluster: demo", "cluster: demo\ntags: {nofailover: maybe}"),
            ],
            &["tags.nofailover", "postgres.lisen"],
        ),
        (
            "port out of range",
            &[("127.0.0.1:5433\n  connect", "127.0.0.1:70000\n  connect")],
            &["postgres.listen"],
        ),
        (
            "port zero",
            &[("listen: 127.0.0.1:8009", "listen: 127.0.0.1:0")],
            &["api.listen"],
        ),
        (
            "no port",
            &[(
                "connect_address: 127.0.0.1:8009",
                "connect_address: localhost",
            )],
            &["api.connect_address"],
        ),
        (
            "relative data_dir",
            &[("/var/lib/pgherd/node2/data", "data")],
            &["postgres.data_dir"],
        ),
        (
            "name unusable as slot",
            &[("name: node2", "name: Node-2")],
            &["name"],
        ),
        (
            "replicatefrom naming the member itself",
            &[(
                "cluster: demo",
                "cluster: demo\ntags: {replicatefrom: node2}",
            )],
            &["tags.replicatefrom"],
        ),
        (
            "replicatefrom unusable as a member name",
            &[(
                "cluster: demo",
                "cluster: demo\ntags: {replicatefrom: Node-3}",
            )],
            &["tags.replicatefrom"],
        ),
        (
            "cluster with slash",
            &[("cluster: demo", "cluster: a/b")],
            &["cluster"],
        ),
        (
            "endpoint without scheme",
            &[("http://127.0.0.1:2379", "127.0.0.1:2379")],
            &["etcd.endpoints[0]"],
        ),
        (
            "wrong type in a list",
            &[("[http://127.0.0.1:2379]", "[http://127.0.0.1:2379, {a: 1}]")],
            &["etcd.endpoints[1]"],
        ),
        (
            "empty password",
            &[("password: change-me-superuser", "password: ''")],
            &["postgres.superuser.password"],
        ),
        (
            "ttl below two seconds",
            &[(
                "cluster: demo",
                "cluster: demo\nbootstrap: {dcs: {ttl: 1, loop_wait: 1, retry_timeout: 1}}",
            )],
            &["bootstrap.dcs.ttl", "bootstrap.dcs.ttl"],
        ),
        (
            "ttl shorter than loop_wait + 2 * retry_timeout",
            &[(
                "cluster: demo",
                "cluster: demo\nbootstrap: {dcs: {ttl: 10, loop_wait: 5, retry_timeout: 3}}",
            )],
            &["bootstrap.dcs.ttl"],
        ),
        (
            "managed parameter",
            &[("  data_dir:", "  parameters: {port: 1}\n  data_dir:")],
            &["postgres.parameters.port"],
        ),
        (
            "bad pg_hba line",
            &[("  data_dir:", "  pg_hba: ['allow everyone']\n  data_dir:")],
            &["postgres.pg_hba[0]"],
        ),
        (
            "initdb option pgherd owns",
            &[(
                "cluster: demo",
                "cluster: demo\nbootstrap: {initdb: [{pgdata: /x}]}",
            )],
            &["bootstrap.initdb[0]"],
        ),
        ("missing key", &[("cluster: demo\n", "")], &["(top level)"]),
        (
            "http_listen without a port",
            &[(
                "  plaintext: true",
                "  plaintext: true\n  http_listen: localhost",
            )],
            &["api.http_listen"],
        ),
        (
            "http_listen on the gRPC address",
            &[(
                "  plaintext: true",
                "  plaintext: true\n  http_listen: 127.0.0.1:8009",
            )],
            &["api.http_listen"],
        ),
        (
            "unknown callback and zero timeout",
            &[(
                "cluster: demo",
                "cluster: demo\ncallbacks: {on_promote: /bin/true, timeout: 0}",
            )],
            &["callbacks.on_promote", "callbacks.timeout"],
        ),
        (
            "empty callback command",
            &[("cluster: demo", "cluster: demo\ncallbacks: {on_start: ' '}")],
            &["callbacks.on_start"],
        ),
    ];
    for (what, replacements, expected) in cases {
        let got = paths(&with(replacements));
        assert_eq!(&got, expected, "case {what:?}");
    }
}

#[test]
fn every_semantic_problem_is_reported_not_just_the_first() {
    let text = with(&[
        ("name: node2", "name: Bad-Name"),
        ("listen: 127.0.0.1:8009", "listen: nowhere"),
        ("/var/lib/pgherd/node2/data", "relative"),
    ]);
    assert_eq!(
        paths(&text),
        vec!["name", "api.listen", "postgres.data_dir"],
    );
}

#[test]
fn structural_and_semantic_problems_are_reported_together() {
    let text = with(&[
        (
            "  listen: 127.0.0.1:5433",
            "  listen: 127.0.0.1:70000\n  shared_bufers: 1",
        ),
        ("/var/lib/pgherd/node2/data", "relative"),
    ]);
    assert_eq!(
        paths(&text),
        vec![
            "postgres.shared_bufers",
            "postgres.listen",
            "postgres.data_dir"
        ],
    );
}

#[test]
fn messages_name_the_reason() {
    let text = with(&[(
        "cluster: demo",
        "cluster: demo\nbootstrap: {dcs: {ttl: 10, loop_wait: 5, retry_timeout: 3}}",
    )]);
    let problems = parse(&text).unwrap_err();
    assert!(
        problems[0]
            .message
            .contains("loop_wait + 2 * retry_timeout = 11 s"),
        "{}",
        problems[0].message
    );
}

#[test]
fn invalid_yaml_is_reported_with_its_location() {
    let problems = parse("cluster: [unclosed").unwrap_err();
    assert_eq!(problems.len(), 1);
    assert!(problems[0].path.starts_with("line "), "{:?}", problems[0]);
}

#[test]
fn dynamic_config_from_etcd_is_validated() {
    assert!(parse_dynamic(br#"{"ttl": 20}"#).is_ok());
    let p = parse_dynamic(br#"{"ttl": 3, "loop_wait": 2}"#).unwrap_err();
    assert_eq!(p[0].path, "ttl");
    let p = parse_dynamic(br#"{"ttl": "long"}"#).unwrap_err();
    assert_eq!(p[0].path, "ttl");
}

#[test]
fn parameter_values_render_as_postgresql_expects() {
    assert_eq!(ParamValue::Bool(true).to_string(), "on");
    assert_eq!(ParamValue::Int(100).to_string(), "100");
    assert_eq!(ParamValue::Text("128MB".into()).to_string(), "128MB");
    assert_eq!(
        InitdbOption::Value([("encoding".to_string(), "UTF8".to_string())].into()).to_args(),
        vec!["--encoding=UTF8"]
    );
}

#[test]
fn host_port_parsing() {
    assert_eq!(
        split_host_port("127.0.0.1:5432"),
        Some(("127.0.0.1".into(), 5432))
    );
    assert_eq!(split_host_port("[::1]:8008"), Some(("::1".into(), 8008)));
    assert_eq!(split_host_port("host:0"), None);
    assert_eq!(split_host_port(":5432"), None);
    assert_eq!(split_host_port("host"), None);
}

#[test]
fn backup_section_problems_are_reported_at_their_paths() {
    let text = format!(
        "{GOOD}\nbackup:\n  repository: relative/dir\n  compression: zstd\n  compression_level: 30\n  retention: {{full: 0}}\n  schedule: 'every day'\n  verify_schedule: '0 5 * * 0'\n"
    );
    let mut got = paths(&text);
    got.sort();
    assert_eq!(
        got,
        vec![
            "backup.compression_level",
            "backup.repository",
            "backup.retention.full",
            "backup.schedule"
        ]
    );
    let good = format!("{GOOD}\nbackup: {{repository: /srv/b, compression: gzip}}\n");
    let c = parse(&good).unwrap();
    let b = c.backup.unwrap();
    assert_eq!(
        (b.compression, b.level(), b.retention.full),
        (Compression::Gzip, 6, 2)
    );
    let bad_kind = format!("{GOOD}\nbackup: {{repository: /srv/b, compression: lz4}}\n");
    assert_eq!(paths(&bad_kind), vec!["backup.compression"]);
}

#[test]
fn backup_encryption_needs_one_key_source_and_the_agent_for_wal() {
    let with = |enc: &str| format!("{GOOD}\nbackup: {{repository: /srv/b, encryption: {enc}}}\n");
    assert_eq!(paths(&with("{}")), vec!["backup.encryption"]);
    assert_eq!(
        paths(&with("{key_file: /k, key_command: 'cat /k'}")),
        vec!["backup.encryption"]
    );
    assert_eq!(
        paths(&with("{key_file: k}")),
        vec!["backup.encryption.key_file"]
    );
    assert_eq!(
        paths(&with("{key_command: ' '}")),
        vec!["backup.encryption.key_command"]
    );
    let refused = format!(
        "{GOOD}\nbackup: {{repository: /srv/b, archive: {{through_agent: false}}, encryption: {{key_file: /k}}}}\n"
    );
    assert_eq!(paths(&refused), vec!["backup.archive.through_agent"]);
    let b = parse(&with("{key_file: /etc/pgherd/backup.key}"))
        .unwrap()
        .backup
        .unwrap();
    assert!(b.archive_through_agent(), "the OS user never gets the key");
}

#[test]
fn every_duration_and_count_has_bounds_in_the_file() {
    let huge = u64::MAX;
    let cases: Vec<(String, &str)> = vec![
        (
            format!("bootstrap: {{dcs: {{ttl: {huge}}}}}"),
            "bootstrap.dcs.ttl",
        ),
        (
            "bootstrap: {dcs: {ttl: 3601, loop_wait: 1, retry_timeout: 1}}".into(),
            "bootstrap.dcs.ttl",
        ),
        (
            format!("bootstrap: {{dcs: {{loop_wait: {huge}}}}}"),
            "bootstrap.dcs.loop_wait",
        ),
        (
            "bootstrap: {dcs: {retry_timeout: 0}}".into(),
            "bootstrap.dcs.retry_timeout",
        ),
        (
            format!("bootstrap: {{dcs: {{primary_start_timeout: {huge}}}}}"),
            "bootstrap.dcs.primary_start_timeout",
        ),
        (
            "bootstrap: {dcs: {synchronous_node_count: 4294967295}}".into(),
            "bootstrap.dcs.synchronous_node_count",
        ),
        (
            format!("callbacks: {{timeout: {huge}}}"),
            "callbacks.timeout",
        ),
        (
            "backup: {repository: /srv/b, timeout: 0}".into(),
            "backup.timeout",
        ),
        (
            format!("backup: {{repository: /srv/b, timeout: {huge}}}"),
            "backup.timeout",
        ),
        (
            "backup: {repository: /srv/b, retention: {full: 4294967295}}".into(),
            "backup.retention.full",
        ),
    ];
    for (yaml, path) in cases {
        let text = with(&[("cluster: demo", &format!("cluster: demo\n{yaml}"))]);
        let got = paths(&text);
        assert!(got.iter().any(|p| p == path), "{yaml}: {got:?}");
    }
    // Negative values are not numbers of this kind at all.
    let text = with(&[("cluster: demo", "cluster: demo\ncallbacks: {timeout: -1}")]);
    assert_eq!(paths(&text), vec!["callbacks.timeout"]);
    let text = with(&[(
        "  data_dir:",
        &format!("  command_timeout: {huge}\n  data_dir:"),
    )]);
    assert_eq!(paths(&text), vec!["postgres.command_timeout"]);
    // The edges themselves are accepted.
    let text = with(&[(
        "cluster: demo",
        "cluster: demo\nbootstrap: {dcs: {ttl: 3600, loop_wait: 600, retry_timeout: 600, primary_start_timeout: 0, synchronous_node_count: 64}}\ncallbacks: {timeout: 86400}",
    )]);
    assert_eq!(paths(&text), Vec::<String>::new());
}

#[test]
fn a_bound_problem_says_the_allowed_range() {
    let p = parse_dynamic(br#"{"ttl": 18446744073709551615}"#).unwrap_err();
    assert_eq!(p[0].path, "ttl");
    assert!(
        p[0].message.contains("from 2 to 3600 s"),
        "{}",
        p[0].message
    );
}

#[test]
fn code_running_parameters_are_refused_in_bootstrap_dcs_and_allowed_in_the_members_file() {
    for name in [
        "archive_command",
        "restore_command",
        "archive_cleanup_command",
        "recovery_end_command",
        "ssl_passphrase_command",
        "shared_preload_libraries",
        "session_preload_libraries",
        "local_preload_libraries",
        "dynamic_library_path",
        "archive_library",
        "ARCHIVE_COMMAND",
        "include_dir",
        "plperl.on_init",
    ] {
        let text = with(&[(
            "cluster: demo",
            &format!(
                "cluster: demo\nbootstrap: {{dcs: {{postgresql: {{parameters: {{{name}: x}}}}}}}}"
            ),
        )]);
        let problems = parse(&text).unwrap_err();
        assert_eq!(
            problems.iter().map(|p| p.path.as_str()).collect::<Vec<_>>(),
            vec![format!("bootstrap.dcs.postgresql.parameters.{name}")],
            "{name}"
        );
        assert!(
            problems[0].message.contains("postgres.parameters"),
            "{}",
            problems[0].message
        );
        let own = with(&[(
            "  data_dir:",
            &format!("  parameters: {{{name}: x}}\n  data_dir:"),
        )]);
        assert!(parse(&own).is_ok(), "{name} in the member's own file");
    }
    for harmless in [
        "work_mem",
        "shared_buffers",
        "pg_stat_statements.max",
        "log_line_prefix",
    ] {
        assert_eq!(runs_code(harmless), None, "{harmless}");
    }
}

#[test]
fn managed_parameters_are_recognised_whatever_their_case() {
    let text = with(&[("  data_dir:", "  parameters: {PORT: 1}\n  data_dir:")]);
    assert_eq!(paths(&text), vec!["postgres.parameters.PORT"]);
}

#[test]
fn http_tls_is_true_false_or_a_certificate_of_its_own() {
    let tls =
        "  tls: {cert: /etc/pgherd/api.pem, key: /etc/pgherd/api.key, ca: /etc/pgherd/ca.pem}";
    let api = |extra: &str| {
        with(&[(
            "  plaintext: true",
            &format!("{tls}\n  http_listen: 0.0.0.0:8108\n{extra}"),
        )])
    };
    // Plain HTTP for HAProxy while gRPC uses TLS.
    let c = parse(&api("  http_tls: false")).unwrap();
    assert!(c.api.tls.is_some());
    assert_eq!(c.api.http_tls_settings(), None);
    // Default and true: the gRPC API's certificate.
    for extra in ["", "  http_tls: true"] {
        let c = parse(&api(extra)).unwrap();
        assert_eq!(c.api.http_tls_settings(), c.api.tls.as_ref());
    }
    // A certificate of its own.
    let c = parse(&api(
        "  http_tls: {cert: /etc/pgherd/http.pem, key: /etc/pgherd/http.key}",
    ))
    .unwrap();
    assert_eq!(
        c.api.http_tls_settings().map(|t| t.cert.clone()),
        Some(PathBuf::from("/etc/pgherd/http.pem"))
    );
    assert_eq!(
        paths(&api("  http_tls: {cert: http.pem, key: /k}")),
        vec!["api.http_tls.cert"]
    );
    let wrong = paths(&api("  http_tls: sometimes"));
    assert_eq!(wrong, vec!["api.http_tls"]);
    let msg = parse(&api("  http_tls: sometimes")).unwrap_err()[0]
        .message
        .clone();
    assert!(msg.contains("true") && msg.contains("false"), "{msg}");
    // true without api.tls, and http_tls without http_listen, make no sense.
    let text = with(&[(
        "  plaintext: true",
        "  plaintext: true\n  http_listen: 0.0.0.0:8108\n  http_tls: true",
    )]);
    assert_eq!(paths(&text), vec!["api.http_tls"]);
    let text = with(&[("  plaintext: true", "  plaintext: true\n  http_tls: false")]);
    assert_eq!(paths(&text), vec!["api.http_tls"]);
}

#[test]
fn member_identity_is_a_dns_name_and_needs_a_ca() {
    let tls = |extra: &str| {
        with(&[(
            "  plaintext: true",
            &format!("  tls: {{cert: /c.pem, key: /k.pem{extra}}}"),
        )])
    };
    assert!(parse(&tls(
        ", ca: /ca.pem, member_identity: pgherd-members.example"
    ))
    .is_ok());
    assert_eq!(
        paths(&tls(", member_identity: members")),
        vec!["api.tls.member_identity"]
    );
    assert_eq!(
        paths(&tls(", ca: /ca.pem, member_identity: 'a b'")),
        vec!["api.tls.member_identity"]
    );
}

#[test]
fn a_bootstrap_restore_section_is_checked_at_its_yaml_path() {
    let base = |bootstrap: &str| format!("{GOOD}\nbootstrap:\n{bootstrap}");
    let good = base(
        "  method: restore\n  restore:\n    repository: /srv/backups\n    cluster: prod\n    target: {xid: 1234, inclusive: false}\n    tablespace_map: {/srv/ts1: /srv/copy/ts1}\n",
    );
    let c = parse(&good).unwrap_or_else(|p| panic!("{}", Problem::list(&p)));
    assert_eq!(c.bootstrap.method, BootstrapMethod::Restore);
    let r = c.bootstrap.restore.unwrap();
    assert_eq!(r.backup, "latest");
    assert_eq!(r.target.unwrap().xid, Some(1234));
    let cases: &[(&str, &str)] = &[
        ("  method: clone\n", "bootstrap.method"),
        ("  method: restore\n", "bootstrap.restore"),
        (
            "  method: restore\n  restore: {cluster: prod}\n",
            "bootstrap.restore",
        ),
        (
            "  method: restore\n  restore: {repository: srv, cluster: prod}\n",
            "bootstrap.restore.repository",
        ),
        (
            "  method: restore\n  restore: {repository: /srv, cluster: demo}\n",
            "bootstrap.restore.cluster",
        ),
        (
            "  method: restore\n  restore: {repository: /srv, cluster: prod, target: {xid: 5, lsn: 0/1}}\n",
            "bootstrap.restore.target",
        ),
        (
            "  method: restore\n  restore: {repository: /srv, cluster: prod, target: {immediate: true, inclusive: false}}\n",
            "bootstrap.restore.target.inclusive",
        ),
        (
            "  restore: {repository: /srv, cluster: prod}\n",
            "bootstrap.restore",
        ),
    ];
    for (yaml, path) in cases {
        let problems = match parse(&base(yaml)) {
            Ok(_) => panic!("{yaml:?} was accepted"),
            Err(p) => p,
        };
        assert!(
            problems.iter().any(|p| p.path == *path),
            "{yaml:?}: expected a problem at {path}, got {}",
            Problem::list(&problems)
        );
    }
}

#[test]
fn backup_repository_is_a_path_or_an_object_store_url() {
    use crate::{Location, ObjectStoreKind, RepositoryUrl};
    let loc = |s: &str| RepositoryUrl(s.to_string()).location();
    assert_eq!(loc("/srv/b"), Ok(Location::Dir("/srv/b".into())));
    assert_eq!(
        loc("s3://bucket/team/prod/"),
        Ok(Location::Object {
            store: ObjectStoreKind::S3,
            bucket: "bucket".into(),
            prefix: "team/prod/".into()
        })
    );
    assert_eq!(
        loc("gs://b"),
        Ok(Location::Object {
            store: ObjectStoreKind::Gcs,
            bucket: "b".into(),
            prefix: String::new()
        })
    );
    for bad in ["srv/b", "s3://", "s3://b/../x", "ftp://b/x", "s3://b c/x"] {
        assert!(loc(bad).is_err(), "{bad} was accepted");
    }
    // Bad input names the key; the store's sections must match the repository.
    let problems = |yaml: &str| {
        let text = format!("{GOOD}\n{yaml}\n");
        match crate::parse(&text) {
            Ok(_) => Vec::new(),
            Err(problems) => {
                let mut paths: Vec<String> = problems.into_iter().map(|p| p.path).collect();
                paths.sort();
                paths
            }
        }
    };
    assert_eq!(
        problems("backup: {repository: 'ftp://x/y'}"),
        vec!["backup.repository"]
    );
    assert_eq!(
        problems("backup: {repository: /srv/b, s3: {region: x}}"),
        vec!["backup.s3"]
    );
    assert_eq!(
        problems("backup: {repository: 's3://b/p', archive: {through_agent: false, parallel: 0}}"),
        vec!["backup.archive.parallel", "backup.archive.through_agent"]
    );
    assert_eq!(
        problems("backup: {repository: 's3://b/p', s3: {endpoint: 'minio:9000'}}"),
        vec!["backup.s3.endpoint"]
    );
    assert!(problems("backup: {repository: 's3://b/p', s3: {endpoint: 'http://127.0.0.1:9000', force_path_style: true}}").is_empty());
}

#[test]
fn a_standby_cluster_section_is_checked_at_its_paths() {
    let d = parse_dynamic(
        br#"{"standby_cluster": {"host": "10.0.0.5", "primary_slot_name": "dr_site", "recovery_min_apply_delay": "5min"}}"#,
    )
    .expect("a valid standby_cluster section");
    let sc = d.standby_cluster.expect("the section is kept");
    assert_eq!((sc.host.as_str(), sc.port), ("10.0.0.5", 5432));
    assert_eq!(sc.primary_slot_name.as_deref(), Some("dr_site"));
    assert_eq!(sc.create_replica_methods, vec![ReplicaMethod::Basebackup]);
    let bad = parse_dynamic(
        br#"{"standby_cluster": {"host": "a b", "port": 0, "primary_slot_name": "Bad-Slot", "recovery_min_apply_delay": "soon", "create_replica_methods": ["basebackup", "basebackup"]}}"#,
    )
    .unwrap_err();
    let got: Vec<&str> = bad.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        got,
        [
            "standby_cluster.host",
            "standby_cluster.port",
            "standby_cluster.primary_slot_name",
            "standby_cluster.create_replica_methods",
            "standby_cluster.recovery_min_apply_delay",
        ]
    );
    assert!(bad[4].message.contains("soon"), "{}", bad[4].message);
    // The section needs its host; an unknown field in it is the writer's typo.
    let p = parse_dynamic(br#"{"standby_cluster": {"port": 5432}}"#).unwrap_err();
    assert!(p[0].message.contains("host"), "{:?}", p);
    // edit-config adds and removes the section with dotted keys.
    let on = patch::apply(
        &DynamicConfig::default(),
        &[
            ("standby_cluster.host".into(), "db.example".into()),
            ("standby_cluster.port".into(), "6432".into()),
        ],
    )
    .expect("dotted keys build the section");
    assert_eq!(on.standby_cluster.as_ref().map(|s| s.port), Some(6432));
    let off = patch::apply(&on, &[("standby_cluster".into(), String::new())]).unwrap();
    assert_eq!(off.standby_cluster, None);
}

#[test]
fn a_standby_cluster_reading_the_other_clusters_repository_is_checked() {
    let d = parse_dynamic(
        br#"{"standby_cluster": {"host": "10.0.0.5", "repository": "/srv/backups", "cluster": "site_a", "create_replica_methods": ["backup", "basebackup"]}}"#,
    )
    .expect("a valid section with a repository");
    let sc = d.standby_cluster.expect("the section is kept");
    assert_eq!(
        sc.archive_root().as_deref(),
        Some(std::path::Path::new("/srv/backups/site_a"))
    );
    assert_eq!(
        sc.create_replica_methods,
        vec![ReplicaMethod::Backup, ReplicaMethod::Basebackup]
    );
    for (section, path, needle) in [
        (
            r#""repository": "rel/dir", "cluster": "a""#,
            "standby_cluster.repository",
            "absolute",
        ),
        (
            r#""repository": "/srv/b""#,
            "standby_cluster.cluster",
            "required with repository",
        ),
        (
            r#""cluster": "a""#,
            "standby_cluster.cluster",
            "repository is not",
        ),
        (
            r#""repository": "/srv/b", "cluster": "../x""#,
            "standby_cluster.cluster",
            "plain name",
        ),
        (
            r#""repository": "/srv/b", "cluster": "a", "restore_command": "cp /a/%f %p""#,
            "standby_cluster.restore_command",
            "choose one",
        ),
        (
            r#""create_replica_methods": ["backup"]"#,
            "standby_cluster.create_replica_methods",
            "repository is not set",
        ),
        (
            r#""create_replica_methods": []"#,
            "standby_cluster.create_replica_methods",
            "empty",
        ),
        (
            r#""repository": "/srv/b", "cluster": "a", "create_replica_methods": ["backup", "backup"]"#,
            "standby_cluster.create_replica_methods",
            "twice",
        ),
    ] {
        let json = format!(r#"{{"standby_cluster": {{"host": "h", {section}}}}}"#);
        let p = parse_dynamic(json.as_bytes()).unwrap_err();
        assert!(
            p.len() == 1 && p[0].path == path && p[0].message.contains(needle),
            "{section}: {p:?}"
        );
    }
}

#[test]
fn custom_tags_are_accepted_beside_the_known_ones() {
    let text = with(&[(
        "cluster: demo",
        "cluster: demo\ntags: {nofailover: true, zone: eu-1, rack: 7}",
    )]);
    let c = parse(&text).unwrap_or_else(|p| panic!("{}", Problem::list(&p)));
    assert!(c.tags.nofailover);
    assert_eq!(c.tags.custom["zone"], serde_json::json!("eu-1"));
    assert_eq!(c.tags.custom["rack"], serde_json::json!(7));
}
