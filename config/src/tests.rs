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
