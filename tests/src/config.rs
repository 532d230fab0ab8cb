//! Member configuration files as the harness writes them (see config/examples/minimal.yml),
//! plus merging of the extra YAML a test adds.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_yaml::{Mapping, Value};

use crate::{REPLICATION_PASSWORD, REPLICATION_USER, SUPERUSER, SUPERUSER_PASSWORD, TOKEN};

/// What a member's config file is made from.
#[derive(Debug, Clone)]
pub struct MemberSpec {
    pub cluster: String,
    pub name: String,
    pub etcd_endpoints: Vec<String>,
    pub api_port: u16,
    /// The agent's HTTP health checks and metrics (`api.http_listen`).
    pub http_port: u16,
    pub pg_port: u16,
    /// The member's directory: `data/`, `data.log`, `agent.log` and the socket live here.
    pub dir: PathBuf,
    /// `tags:` entries (`nofailover`, `failover_priority`, `noloadbalance`).
    pub tags: Mapping,
    /// YAML documents merged over the generated config, in order (see [`merge_yaml`]).
    pub extra_yaml: Vec<String>,
}

impl MemberSpec {
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }
}

/// The config file text for `spec`: free loopback ports, data dir and socket dir inside the
/// member's directory, test credentials, and small timings (ttl 4, loop_wait 1,
/// retry_timeout 1) so that tests are quick; then `spec.extra_yaml` merged over it.
///
/// When `PGHERD_TEST_PG_BIN_DIR` picks the PostgreSQL under test (scripts/test-matrix), the
/// config names it as `postgres.bin_dir`; otherwise the agent finds its own.
pub fn member_yaml(spec: &MemberSpec) -> Result<String> {
    member_yaml_with_bin_dir(spec, crate::pg_bin_dir_from_env().as_deref())
}

fn member_yaml_with_bin_dir(spec: &MemberSpec, pg_bin_dir: Option<&Path>) -> Result<String> {
    let api = format!("127.0.0.1:{}", spec.api_port);
    let http = format!("127.0.0.1:{}", spec.http_port);
    let pg = format!("127.0.0.1:{}", spec.pg_port);
    let base = serde_json::json!({
        "cluster": spec.cluster,
        "name": spec.name,
        "etcd": { "endpoints": spec.etcd_endpoints },
        // Tests talk to agents on loopback; TLS tests replace this with an `api.tls` block.
        "api": {
            "listen": api,
            "connect_address": api,
            "http_listen": http,
            "plaintext": true,
            "auth_token": TOKEN,
        },
        "postgres": {
            "listen": pg,
            "connect_address": pg,
            "data_dir": spec.data_dir(),
            "superuser": { "username": SUPERUSER, "password": SUPERUSER_PASSWORD },
            "replication": { "username": REPLICATION_USER, "password": REPLICATION_PASSWORD },
            // PostgreSQL's default socket directory (/var/run/postgresql) may not exist.
            "parameters": { "unix_socket_directories": spec.dir },
        },
        "bootstrap": { "dcs": { "ttl": 4, "loop_wait": 1, "retry_timeout": 1 } },
    });
    let mut config: Value =
        serde_yaml::to_value(base).context("the generated member config is not YAML")?;
    if let Some(bin_dir) = pg_bin_dir {
        // Before extra_yaml, so that a test can still name another bin_dir.
        merge_yaml(
            &mut config,
            serde_yaml::to_value(serde_json::json!({ "postgres": { "bin_dir": bin_dir } }))
                .context("the PostgreSQL bin_dir is not YAML")?,
        );
    }
    if !spec.tags.is_empty() {
        merge_yaml(
            &mut config,
            Value::Mapping(Mapping::from_iter([(
                Value::from("tags"),
                Value::Mapping(spec.tags.clone()),
            )])),
        );
    }
    for extra in &spec.extra_yaml {
        let extra: Value = serde_yaml::from_str(extra).with_context(|| {
            format!("extra YAML for member {} is not valid:\n{extra}", spec.name)
        })?;
        merge_yaml(&mut config, extra);
    }
    serde_yaml::to_string(&config).context("cannot write the member config as YAML")
}

/// Merges `extra` into `base`: mappings merge key by key, recursively; a `null` value deletes
/// the key; anything else replaces what was there.
pub fn merge_yaml(base: &mut Value, extra: Value) {
    match (base, extra) {
        (Value::Mapping(base), Value::Mapping(extra)) => {
            for (key, value) in extra {
                if value.is_null() {
                    base.remove(&key);
                } else if let Some(existing) = base.get_mut(&key) {
                    merge_yaml(existing, value);
                } else {
                    base.insert(key, value);
                }
            }
        }
        (base, extra) => *base = extra,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> MemberSpec {
        MemberSpec {
            cluster: "c".into(),
            name: "node1".into(),
            etcd_endpoints: vec!["http://127.0.0.1:1".into()],
            api_port: 2,
            http_port: 4,
            pg_port: 3,
            dir: PathBuf::from("/tmp/x/node1"),
            tags: Mapping::new(),
            extra_yaml: vec![],
        }
    }

    fn parse(text: &str) -> Value {
        serde_yaml::from_str(text).expect("test YAML parses")
    }

    #[test]
    fn generated_config_has_ports_paths_and_small_timings() {
        let v = parse(&member_yaml(&spec()).unwrap());
        assert_eq!(v["postgres"]["listen"], Value::from("127.0.0.1:3"));
        assert_eq!(v["api"]["connect_address"], Value::from("127.0.0.1:2"));
        assert_eq!(v["api"]["http_listen"], Value::from("127.0.0.1:4"));
        assert_eq!(v["postgres"]["data_dir"], Value::from("/tmp/x/node1/data"));
        assert_eq!(
            v["postgres"]["parameters"]["unix_socket_directories"],
            Value::from("/tmp/x/node1")
        );
        assert_eq!(v["bootstrap"]["dcs"]["ttl"], Value::from(4));
        assert!(v.get("tags").is_none());
    }

    #[test]
    fn bin_dir_is_named_only_when_the_tests_pick_a_postgresql() {
        let v = parse(&member_yaml_with_bin_dir(&spec(), None).unwrap());
        assert!(v["postgres"].get("bin_dir").is_none());
        let pg17 = Path::new("/usr/lib/postgresql/17/bin");
        let v = parse(&member_yaml_with_bin_dir(&spec(), Some(pg17)).unwrap());
        assert_eq!(
            v["postgres"]["bin_dir"],
            Value::from("/usr/lib/postgresql/17/bin")
        );
        let mut s = spec();
        s.extra_yaml = vec!["postgres: {bin_dir: /opt/pg/bin}".into()];
        let v = parse(&member_yaml_with_bin_dir(&s, Some(pg17)).unwrap());
        assert_eq!(v["postgres"]["bin_dir"], Value::from("/opt/pg/bin"));
    }

    #[test]
    fn extra_yaml_merges_deeply_and_null_deletes() {
        let mut s = spec();
        s.tags.insert("nofailover".into(), true.into());
        s.extra_yaml = vec![
            "bootstrap: {dcs: {ttl: 20}}".into(),
            "postgres: {parameters: {unix_socket_directories: null, work_mem: 8MB}}".into(),
        ];
        let v = parse(&member_yaml(&s).unwrap());
        assert_eq!(v["bootstrap"]["dcs"]["ttl"], Value::from(20));
        assert_eq!(v["bootstrap"]["dcs"]["loop_wait"], Value::from(1));
        assert_eq!(v["tags"]["nofailover"], Value::from(true));
        assert!(v["postgres"]["parameters"]
            .get("unix_socket_directories")
            .is_none());
        assert_eq!(v["postgres"]["parameters"]["work_mem"], Value::from("8MB"));
        assert_eq!(v["postgres"]["listen"], Value::from("127.0.0.1:3"));
    }
}
