//! `postgres.tls`: the certificate of this member's PostgreSQL, and the CA that signed every
//! member's. With it, PostgreSQL serves TLS (`ssl = on`), `pg_hba.conf` accepts replication
//! and remote superuser connections only over TLS (`hostssl`), and every connection to
//! another member (streaming, pg_basebackup, pg_rewind, the agent's own queries) checks that
//! member's certificate against `ca` and its address (`sslmode=verify-full`) and binds the
//! SCRAM exchange to the TLS channel (`channel_binding=require`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{Config, EtcdConfig, Problem};

/// `postgres.tls`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresTls {
    /// PEM certificate (chain) of this member's PostgreSQL. Other members reach it at the
    /// host of `postgres.connect_address`, so the certificate must name that host: a DNS
    /// subject alternative name for a host name, an IP address SAN for an address.
    pub cert: PathBuf,
    /// Its PEM private key; not readable by other users (the agent refuses it otherwise).
    pub key: PathBuf,
    /// PEM CA bundle that signed every member's certificate.
    pub ca: PathBuf,
}

/// Problems of `postgres.tls` that need no file system: relative paths.
pub(crate) fn validate(c: &Config) -> Vec<Problem> {
    let Some(tls) = &c.postgres.tls else {
        return Vec::new();
    };
    [("cert", &tls.cert), ("key", &tls.key), ("ca", &tls.ca)]
        .into_iter()
        .filter(|(_, p)| !p.is_absolute())
        .map(|(key, _)| Problem::new(format!("postgres.tls.{key}"), "must be an absolute path"))
        .collect()
}

/// Why etcd credentials would cross the network in clear text: a username and password
/// with an `http://` endpoint. `None` when they would not.
pub fn etcd_credentials_in_clear(etcd: &EtcdConfig) -> Option<String> {
    etcd.username.as_ref()?;
    let plain: Vec<&str> = etcd
        .endpoints
        .iter()
        .filter(|e| e.starts_with("http://"))
        .map(String::as_str)
        .collect();
    if plain.is_empty() {
        return None;
    }
    Some(format!(
        "etcd.username and etcd.password are sent in clear text to {} (http://): anyone on that network can read them and then write the cluster's keys; use https:// endpoints (etcd.ca), or client certificates (etcd.cert, etcd.key) instead of a password",
        plain.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        crate::parse(include_str!("../examples/minimal.yml")).expect("minimal example parses")
    }

    #[test]
    fn tls_paths_must_be_absolute_and_keys_are_exact() {
        let mut c = cfg();
        c.postgres.tls = Some(PostgresTls {
            cert: "server.crt".into(),
            key: "/etc/pgherd/server.key".into(),
            ca: "ca.crt".into(),
        });
        let paths: Vec<String> = validate(&c).into_iter().map(|p| p.path).collect();
        assert_eq!(paths, ["postgres.tls.cert", "postgres.tls.ca"]);

        let text = include_str!("../examples/minimal.yml").replace(
            "postgres:\n",
            "postgres:\n  tls: {cert: /c.pem, key: /k.pem, ca: /ca.pem, crt: /x}\n",
        );
        let problems = crate::parse(&text).unwrap_err();
        assert!(
            problems.iter().any(|p| p.path.starts_with("postgres.tls")),
            "{problems:?}"
        );
    }

    #[test]
    fn a_password_over_http_is_named_and_https_or_no_password_is_not() {
        let mut e = cfg().etcd;
        e.endpoints = vec![
            "http://10.0.0.1:2379".into(),
            "https://10.0.0.2:2379".into(),
        ];
        assert_eq!(
            etcd_credentials_in_clear(&e),
            None,
            "no username, nothing to leak"
        );
        e.username = Some("pgherd".into());
        e.password = Some("s3cret".into());
        let why = etcd_credentials_in_clear(&e).expect("a password over http is named");
        assert!(why.contains("http://10.0.0.1:2379"), "{why}");
        assert!(!why.contains("10.0.0.2"), "{why}");
        assert!(!why.contains("s3cret"), "never the password itself: {why}");
        e.endpoints = vec!["https://10.0.0.2:2379".into()];
        assert_eq!(etcd_credentials_in_clear(&e), None);
    }
}
