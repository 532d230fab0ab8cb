//! One test per mapped section and per reported setting; every conversion's output is
//! validated as a member file (`convert` does it, and the tests parse the YAML again).

use super::*;
use crate::{ReplicaMethod, SynchronousMode};

/// A Patroni file of the shape its documentation shows: etcd3, REST API with basic auth,
/// PostgreSQL with authentication, parameters and callbacks, bootstrap.dcs.
const BASE: &str = r#"
scope: demo
name: node1
restapi:
  listen: 0.0.0.0:8008
  connect_address: 10.0.0.1:8008
  authentication:
    username: patroni
    password: rest-api-secret-0123456789
etcd3:
  hosts: 10.0.0.11:2379,10.0.0.12:2379
bootstrap:
  dcs:
    ttl: 30
    loop_wait: 10
    retry_timeout: 10
    maximum_lag_on_failover: 1048576
    postgresql:
      use_pg_rewind: true
      parameters:
        max_connections: 200
        wal_level: replica
  initdb:
  - encoding: UTF8
  - data-checksums
postgresql:
  listen: 0.0.0.0:5432
  connect_address: 10.0.0.1:5432
  data_dir: /var/lib/postgresql/15/main
  bin_dir: /usr/lib/postgresql/15/bin
  pgpass: /tmp/pgpass0
  authentication:
    replication:
      username: replicator
      password: repl-secret-4242
    superuser:
      username: postgres
      password: super-secret-4242
    rewind:
      username: rewind_user
      password: rewind-secret-4242
  parameters:
    unix_socket_directories: /var/run/postgresql
tags:
  nofailover: false
  noloadbalance: false
  clonefrom: false
  nosync: false
"#;

const SECRETS: &[&str] = &[
    "rest-api-secret-0123456789",
    "repl-secret-4242",
    "super-secret-4242",
    "rewind-secret-4242",
    "etcd-secret-4242",
    "keypass-4242",
];

/// `BASE` with `extra` merged over it (mappings key by key, `null` deletes).
fn patroni(extra: &str) -> String {
    let mut base: Value = serde_yaml::from_str(BASE).expect("BASE is YAML");
    let extra: Value = serde_yaml::from_str(extra).expect("extra is YAML");
    merge(&mut base, extra);
    serde_yaml::to_string(&base).expect("YAML")
}

fn merge(base: &mut Value, extra: Value) {
    match (base, extra) {
        (Value::Mapping(b), Value::Mapping(e)) => {
            for (k, v) in e {
                if v.is_null() {
                    b.remove(&k);
                } else if let Some(slot) = b.get_mut(&k) {
                    merge(slot, v);
                } else {
                    b.insert(k, v);
                }
            }
        }
        (b, e) => *b = e,
    }
}

/// Converts, checks the output passes the member file's validation and that no report
/// quotes a secret.
fn ok(text: &str) -> Conversion {
    let c = convert(text, &Options::default()).unwrap_or_else(|e| panic!("{e:?}"));
    crate::parse(&c.yaml).unwrap_or_else(|p| panic!("{}\n{}", Problem::list(&p), c.yaml));
    let shown = Problem::list(&c.reports);
    for s in SECRETS {
        assert!(!shown.contains(s), "a report shows a secret: {shown}");
    }
    c
}

/// The report at `path`, which must exist.
fn report<'a>(c: &'a Conversion, path: &str) -> &'a str {
    c.reports
        .iter()
        .find(|p| p.path == path)
        .map(|p| p.message.as_str())
        .unwrap_or_else(|| panic!("no report at {path}: {}", Problem::list(&c.reports)))
}

fn no_report(c: &Conversion, path: &str) {
    assert!(
        !c.reports.iter().any(|p| p.path == path),
        "unexpected report at {path}: {}",
        Problem::list(&c.reports)
    );
}

#[test]
fn scope_name_and_etcd3_hosts_become_cluster_name_and_endpoints() {
    let c = ok(BASE);
    assert_eq!(c.config.cluster, "demo");
    assert_eq!(c.config.name, "node1");
    assert_eq!(
        c.config.etcd.endpoints,
        ["http://10.0.0.11:2379", "http://10.0.0.12:2379"]
    );
    no_report(&c, "name");
    // hosts as a list, host alone, url
    let c = ok(&patroni("etcd3: {hosts: [a:2379, 'b:2380'], host: null}"));
    assert_eq!(c.config.etcd.endpoints, ["http://a:2379", "http://b:2380"]);
    let c = ok(&patroni(
        "etcd3: {url: 'https://pgherd:etcd-secret-4242@e:2379'}",
    ));
    assert_eq!(c.config.etcd.endpoints, ["https://e:2379"]);
    assert_eq!(c.config.etcd.password.as_deref(), Some("etcd-secret-4242"));
    assert!(report(&c, "etcd3.hosts").contains("ignores"));
    let c = ok(&patroni("etcd3: {hosts: [a, b], port: 2389}"));
    assert_eq!(c.config.etcd.endpoints, ["http://a:2389", "http://b:2389"]);
}

#[test]
fn a_member_name_becomes_the_slot_name_patroni_used() {
    let c = ok(&patroni("name: PG-1.dc1"));
    assert_eq!(c.config.name, "pg_1_dc1");
    assert!(report(&c, "name").contains("\"pg_1_dc1\""));
    assert_eq!(slot_name("node é"), "nodeu0032u0233");
}

#[test]
fn etcd3_tls_and_auth_are_carried_and_their_secrets_never_reported() {
    let c = ok(&patroni(
        "etcd3: {protocol: https, cacert: /etc/etcd/ca.pem, cert: /etc/etcd/c.pem, key: /etc/etcd/k.pem, key_password: keypass-4242, username: pgherd, password: etcd-secret-4242}",
    ));
    let e = &c.config.etcd;
    assert_eq!(
        e.endpoints,
        ["https://10.0.0.11:2379", "https://10.0.0.12:2379"]
    );
    assert_eq!(
        e.ca.as_deref(),
        Some(std::path::Path::new("/etc/etcd/ca.pem"))
    );
    assert_eq!(
        e.cert.as_deref(),
        Some(std::path::Path::new("/etc/etcd/c.pem"))
    );
    assert_eq!(
        e.key.as_deref(),
        Some(std::path::Path::new("/etc/etcd/k.pem"))
    );
    assert_eq!(e.username.as_deref(), Some("pgherd"));
    assert_eq!(e.password.as_deref(), Some("etcd-secret-4242"));
    assert!(report(&c, "etcd3.key_password").contains("unencrypted"));
    // The member file carries it (the pgherd way: the file is root's), stderr never.
    assert!(c.yaml.contains("etcd-secret-4242"));
}

#[test]
fn etcd_v2_section_is_used_with_a_report_and_other_dcs_cannot_be() {
    let c = ok(&patroni("etcd3: null\netcd: {host: 10.0.0.5:2379}"));
    assert_eq!(c.config.etcd.endpoints, ["http://10.0.0.5:2379"]);
    assert!(report(&c, "etcd").contains("v2"));
    match convert(
        &patroni("etcd3: null\nconsul: {host: c:8500}"),
        &Options::default(),
    ) {
        Err(ConvertError::Unconvertible { problems, .. }) => {
            assert_eq!(problems[0].path, "consul", "{problems:?}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn restapi_becomes_the_http_checks_and_its_authentication_http_auth() {
    let c = ok(BASE);
    let a = &c.config.api;
    assert_eq!(a.http_listen.as_deref(), Some("0.0.0.0:8008"));
    assert_eq!(a.listen, "0.0.0.0:9008");
    assert_eq!(a.connect_address, "10.0.0.1:9008");
    assert!(a.plaintext);
    let basic = a.http_auth.as_ref().expect("http_auth");
    assert_eq!(basic.username, "patroni");
    assert_eq!(basic.password, "rest-api-secret-0123456789");
    // No token is made up: the header says what is refused without one.
    assert_eq!(a.auth_token, None);
    assert!(c.yaml.contains("# No api.auth_token"), "{}", c.yaml);
    no_report(&c, "restapi.authentication");
    let c = convert(
        BASE,
        &Options {
            api_port: Some(7000),
        },
    )
    .expect("converts");
    assert_eq!(c.config.api.listen, "0.0.0.0:7000");
    // Too short for pgherd's basic auth: not carried, and the report says why.
    let c = ok(&patroni("restapi: {authentication: {password: short}}"));
    assert_eq!(c.config.api.http_auth, None);
    assert!(report(&c, "restapi.authentication").contains("at least 8"));
    assert!(!Problem::list(&c.reports).contains("short"));
}

#[test]
fn restapi_tls_becomes_api_tls() {
    let c = ok(&patroni(
        "restapi: {certfile: /etc/p/c.pem, keyfile: /etc/p/k.pem, cafile: /etc/p/ca.pem, verify_client: optional, allowlist: [10.0.0.0/8]}",
    ));
    let tls = c.config.api.tls.as_ref().expect("tls");
    assert_eq!(tls.cert, std::path::Path::new("/etc/p/c.pem"));
    assert_eq!(
        tls.ca.as_deref(),
        Some(std::path::Path::new("/etc/p/ca.pem"))
    );
    assert!(!c.config.api.plaintext);
    assert!(report(&c, "restapi.verify_client").contains("client certificate"));
    assert!(report(&c, "restapi.certfile").contains("member_identity"));
    assert!(report(&c, "restapi.allowlist").contains("allowlist"));
}

#[test]
fn postgresql_section_and_authentication_are_carried() {
    let c = ok(BASE);
    let p = &c.config.postgres;
    assert_eq!(p.listen, "0.0.0.0:5432");
    assert_eq!(p.connect_address, "10.0.0.1:5432");
    assert_eq!(
        p.data_dir,
        std::path::Path::new("/var/lib/postgresql/15/main")
    );
    assert_eq!(
        p.bin_dir.as_deref(),
        Some(std::path::Path::new("/usr/lib/postgresql/15/bin"))
    );
    assert_eq!(p.superuser.username, "postgres");
    assert_eq!(p.superuser.password, "super-secret-4242");
    assert_eq!(p.replication.username, "replicator");
    assert_eq!(p.replication.password, "repl-secret-4242");
    assert!(p.parameters.contains_key("unix_socket_directories"));
    assert!(report(&c, "postgresql.authentication.rewind").contains("superuser"));
    assert!(report(&c, "postgresql.pgpass").contains("password file"));
    // `*` stays PostgreSQL's; an empty host listens everywhere.
    let c = ok(&patroni("postgresql: {listen: '*:5433'}"));
    assert_eq!(c.config.postgres.listen, "*:5433");
    // Several addresses, as Patroni's listen allows: PostgreSQL's listen_addresses.
    let c = ok(&patroni("postgresql: {listen: '127.0.0.1,10.0.0.1:5432'}"));
    assert_eq!(c.config.postgres.listen, "127.0.0.1,10.0.0.1:5432");
    let c = ok(&patroni("postgresql: {listen: ':5432'}"));
    assert_eq!(c.config.postgres.listen, "*:5432");
    let c = ok(&patroni(
        "restapi: {listen: '[::]:8008', connect_address: '[fd00::1]:8008'}",
    ));
    assert_eq!(c.config.api.listen, "[::]:9008");
    assert_eq!(c.config.api.connect_address, "[fd00::1]:9008");
}

#[test]
fn a_missing_password_cannot_be_converted_and_is_not_guessed() {
    let text = patroni("postgresql: {authentication: {superuser: {password: null}}}");
    match convert(&text, &Options::default()) {
        Err(ConvertError::Unconvertible { problems, .. }) => assert_eq!(
            problems[0].path,
            "postgresql.authentication.superuser.password"
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn ssl_settings_of_a_role_are_reported_without_their_values() {
    let c = ok(&patroni(
        "postgresql: {authentication: {replication: {sslmode: verify-full, sslpassword: keypass-4242}}}",
    ));
    assert!(report(&c, "postgresql.authentication.replication.sslmode").contains("postgres.tls"));
    report(&c, "postgresql.authentication.replication.sslpassword");
}

#[test]
fn managed_parameters_are_reported_and_code_parameters_move_to_the_member() {
    let c = ok(&patroni(
        "postgresql: {parameters: {port: 5432, hba_file: /etc/hba.conf, archive_command: 'cp %p /a/%f'}}\nbootstrap: {dcs: {postgresql: {parameters: {restore_command: 'cp /a/%f %p', synchronous_standby_names: '*'}}}}",
    ));
    assert!(report(&c, "postgresql.parameters.port").contains("postgres.listen"));
    report(&c, "postgresql.parameters.hba_file");
    report(
        &c,
        "bootstrap.dcs.postgresql.parameters.synchronous_standby_names",
    );
    assert!(
        report(&c, "bootstrap.dcs.postgresql.parameters.restore_command")
            .contains("postgres.parameters")
    );
    let p = &c.config.postgres.parameters;
    assert!(p.contains_key("archive_command") && p.contains_key("restore_command"));
    let d = &c.config.bootstrap.dcs.postgresql.parameters;
    assert!(!d.contains_key("restore_command"));
    assert_eq!(d.get("max_connections"), Some(&crate::ParamValue::Int(200)));
}

#[test]
fn bootstrap_dcs_timings_and_flags_are_carried() {
    let c = ok(&patroni(
        "bootstrap: {dcs: {master_start_timeout: 45, failsafe_mode: true, member_slots_ttl: 30min, primary_stop_timeout: 20, check_timeline: true, postgresql: {use_slots: false, remove_data_directory_on_rewind_failure: true}}}",
    ));
    let d = &c.config.bootstrap.dcs;
    assert_eq!((d.ttl, d.loop_wait, d.retry_timeout), (30, 10, 10));
    assert_eq!(d.primary_start_timeout, 45);
    assert_eq!(d.member_slots_ttl, 1800);
    assert!(d.failsafe_mode);
    assert!(d.postgresql.remove_data_directory_on_rewind_failure);
    report(&c, "bootstrap.dcs.primary_stop_timeout");
    report(&c, "bootstrap.dcs.check_timeline");
    assert!(report(&c, "bootstrap.dcs.postgresql.use_slots").contains("slot"));
    assert_eq!(
        c.config.bootstrap.initdb,
        [
            crate::InitdbOption::Value([("encoding".to_string(), "UTF8".to_string())].into()),
            crate::InitdbOption::Flag("data-checksums".into()),
        ]
    );
}

#[test]
fn synchronous_settings_are_carried() {
    for (mode, want) in [
        ("true", SynchronousMode::On),
        ("'on'", SynchronousMode::On),
        ("false", SynchronousMode::Off),
        ("quorum", SynchronousMode::Quorum),
    ] {
        let c = ok(&patroni(&format!(
            "bootstrap: {{dcs: {{synchronous_mode: {mode}, synchronous_mode_strict: true, synchronous_node_count: 2}}}}"
        )));
        let d = &c.config.bootstrap.dcs;
        assert_eq!(d.synchronous_mode, want, "{mode}");
        assert!(d.synchronous_mode_strict);
        assert_eq!(d.synchronous_node_count, 2);
    }
    let c = ok(&patroni(
        "bootstrap: {dcs: {maximum_lag_on_syncnode: 100}}\ntags: {sync_priority: 3}",
    ));
    assert_eq!(c.config.bootstrap.dcs.maximum_lag_on_syncnode, 100);
    assert_eq!(c.config.tags.sync_priority, 3);
}

#[test]
fn member_level_rewind_settings_go_cluster_wide() {
    let c = ok(&patroni(
        "postgresql: {use_pg_rewind: false, remove_data_directory_on_rewind_failure: true}\nbootstrap: {dcs: {postgresql: {use_pg_rewind: null}}}",
    ));
    let d = &c.config.bootstrap.dcs.postgresql;
    assert!(!d.use_pg_rewind);
    assert!(d.remove_data_directory_on_rewind_failure);
    assert!(report(&c, "postgresql.use_pg_rewind").contains("carried to"));
}

#[test]
fn slots_ignore_slots_and_standby_cluster_are_carried() {
    let c = ok(&patroni(
        "bootstrap: {dcs: {slots: {cdc: {type: logical, database: app, plugin: pgoutput}, keep: {type: physical}}, ignore_slots: [{name: foreign, type: physical}], standby_cluster: {host: 10.1.0.1, port: 5433, primary_slot_name: dr, create_replica_methods: [basebackup, wal_e], archive_cleanup_command: x}}}",
    ));
    let d = &c.config.bootstrap.dcs;
    assert_eq!(d.slots.len(), 2);
    assert_eq!(d.slots["cdc"].plugin.as_deref(), Some("pgoutput"));
    assert_eq!(d.ignore_slots[0].name.as_deref(), Some("foreign"));
    let sc = d.standby_cluster.as_ref().expect("standby_cluster");
    assert_eq!((sc.host.as_str(), sc.port), ("10.1.0.1", 5433));
    assert_eq!(sc.primary_slot_name.as_deref(), Some("dr"));
    assert_eq!(sc.create_replica_methods, [ReplicaMethod::Basebackup]);
    report(&c, "bootstrap.dcs.standby_cluster.create_replica_methods");
    report(&c, "bootstrap.dcs.standby_cluster.archive_cleanup_command");
}

#[test]
fn tags_are_carried_custom_ones_too() {
    let c = ok(&patroni(
        "tags: {nofailover: null, failover_priority: 3, noloadbalance: true, nosync: true, clonefrom: true, replicatefrom: node-2, nostream: false, datacenter: east}",
    ));
    let t = &c.config.tags;
    assert_eq!(t.failover_priority, 3);
    assert!(t.noloadbalance && t.nosync && t.clonefrom && !t.nofailover);
    assert_eq!(t.replicatefrom.as_deref(), Some("node_2"));
    assert_eq!(t.custom.get("datacenter"), Some(&serde_json::json!("east")));
    assert!(!c.reports.iter().any(|r| r.path == "tags.datacenter"));
    report(&c, "tags.nostream");
    // Patroni: priority 0 never takes over.
    let c = ok(&patroni("tags: {nofailover: null, failover_priority: 0}"));
    assert!(c.config.tags.nofailover);
}

#[test]
fn callbacks_are_carried_unless_they_need_a_shell() {
    let c = ok(&patroni(
        "postgresql: {callbacks: {on_start: /usr/local/bin/cb.sh, on_role_change: /usr/local/bin/cb.sh --verbose, on_stop: \"/bin/sh -c 'echo $1'\", on_reload: /usr/local/bin/cb.sh}}",
    ));
    let cb = &c.config.callbacks;
    assert_eq!(cb.on_start.as_deref(), Some("/usr/local/bin/cb.sh"));
    assert_eq!(
        cb.on_role_change.as_deref(),
        Some("/usr/local/bin/cb.sh --verbose")
    );
    assert_eq!(cb.on_stop, None);
    assert!(report(&c, "postgresql.callbacks.on_stop").contains("shell"));
    assert_eq!(cb.on_reload.as_deref(), Some("/usr/local/bin/cb.sh"));
    // pre_promote and before_stop (postgresql's, in Patroni) are waited-for callbacks.
    let c = ok(&patroni(
        "postgresql: {pre_promote: /usr/local/bin/fence.sh --hard, before_stop: /usr/local/bin/drain.sh}\nbootstrap: {post_init: /usr/local/bin/setup.sh}",
    ));
    assert_eq!(
        c.config.callbacks.pre_promote.as_deref(),
        Some("/usr/local/bin/fence.sh --hard")
    );
    assert_eq!(
        c.config.callbacks.before_stop.as_deref(),
        Some("/usr/local/bin/drain.sh")
    );
    assert_eq!(
        c.config.bootstrap.post_bootstrap.as_deref(),
        Some("/usr/local/bin/setup.sh")
    );
    assert!(
        !c.reports.iter().any(|r| r.path.contains("pre_promote")
            || r.path.contains("before_stop")
            || r.path.contains("post_init")),
        "{:?}",
        c.reports
    );
}

#[test]
fn watchdog_is_reported() {
    let c = ok(&patroni(
        "watchdog: {mode: required, device: /dev/watchdog, safety_margin: 5}",
    ));
    assert!(report(&c, "watchdog").contains("pgherd-watchdog"));
}

#[test]
fn custom_bootstrap_and_replica_methods_are_reported() {
    let c = ok(&patroni(
        "bootstrap: {method: clone_from_s3, clone_from_s3: {command: /usr/local/bin/restore.sh, recovery_conf: {restore_command: x}}, post_bootstrap: /usr/local/bin/setup.sh}\npostgresql: {create_replica_methods: [pgbackrest, basebackup], pgbackrest: {command: /usr/bin/pgbackrest restore, keep_data: true}, basebackup: {max-rate: 100M}}",
    ));
    assert!(report(&c, "bootstrap.method").contains("clone_from_s3"));
    report(&c, "bootstrap.clone_from_s3");
    assert_eq!(
        c.config.bootstrap.post_bootstrap.as_deref(),
        Some("/usr/local/bin/setup.sh")
    );
    assert!(report(&c, "postgresql.create_replica_methods").contains("pgbackrest"));
    report(&c, "postgresql.pgbackrest");
    report(&c, "postgresql.basebackup");
    assert_eq!(c.config.bootstrap.method, crate::BootstrapMethod::Initdb);
}

#[test]
fn unknown_keys_are_reported_at_their_path() {
    let c = ok(&patroni(
        "namespace: /db/\nlog: {level: INFO}\nsomething: 1\npostgresql: {frobnicate: true}\nbootstrap: {dcs: {wibble: 2}}",
    ));
    report(&c, "namespace");
    report(&c, "log");
    assert!(report(&c, "something").contains("not carried"));
    report(&c, "postgresql.frobnicate");
    report(&c, "bootstrap.dcs.wibble");
}

#[test]
fn not_yaml_or_not_patroni_is_refused_with_the_reason() {
    for (text, why) in [
        ("scope: [", "not YAML"),
        ("- a\n- b\n", "not a YAML mapping"),
        (
            include_str!("../../examples/minimal.yml"),
            "pgherd configuration",
        ),
        ("foo: bar\n", "postgresql section"),
    ] {
        match convert(text, &Options::default()) {
            Err(ConvertError::NotPatroni(m)) => assert!(m.contains(why), "{m}"),
            other => panic!("{text}: {other:?}"),
        }
    }
}

#[test]
fn the_header_says_what_to_review() {
    let c = ok(BASE);
    assert!(c.yaml.starts_with("# pgherd member configuration"));
    assert!(c.yaml.contains("port 9008"));
    assert!(c.yaml.contains("chmod 600"));
}

#[test]
fn problems_of_the_result_name_the_patroni_setting() {
    match convert(
        &patroni("postgresql: {data_dir: data/pg0}"),
        &Options::default(),
    ) {
        Err(ConvertError::Unconvertible { problems, .. }) => {
            assert_eq!(problems[0].path, "postgresql.data_dir", "{problems:?}");
            assert!(
                problems[0].message.contains("postgres.data_dir"),
                "{problems:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(patroni_path("api.tls.cert"), "restapi.certfile");
    assert_eq!(patroni_path("bootstrap.dcs.ttl"), "bootstrap.dcs.ttl");
    assert_eq!(patroni_path("etcd.endpoints[0]"), "etcd3.endpoints[0]");
}

#[test]
fn cluster_wide_pg_hba_and_empty_sections_are_carried_quietly_or_reported() {
    let empty = "      parameters:\n        max_connections: 200\n        wal_level: replica\n";
    assert!(BASE.contains(empty));
    let text = BASE.replace(
        empty,
        "      parameters:\n      pg_hba: [host all all 0.0.0.0/0 md5]\n",
    );
    let c = ok(&text);
    assert_eq!(c.config.postgres.pg_hba, ["host all all 0.0.0.0/0 md5"]);
    assert!(report(&c, "bootstrap.dcs.postgresql.pg_hba").contains("per member"));
    no_report(&c, "bootstrap.dcs.postgresql.parameters");
}
