//! `pgherd-agent convert-patroni`: a Patroni configuration file (patroni.yml) turned into a
//! pgherd member configuration, and every setting that could not be carried, at its path in
//! the Patroni file with the reason.
//!
//! The walk consumes the Patroni file key by key: a key is either mapped or reported, and
//! whatever no rule took is reported as unknown, so nothing is dropped silently. Reports name
//! paths, never values of secrets. The result is validated as any member file is
//! ([`crate::parse`]), so what is printed passes `check-config`.

use std::collections::BTreeSet;

use serde_yaml::{Mapping, Value};

use crate::{Config, Problem};

/// Choices the Patroni file cannot make.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Port of pgherd's control API (gRPC, `api.listen`); default: restapi's port + 1000.
    pub api_port: Option<u16>,
}

/// A successful conversion.
#[derive(Debug)]
pub struct Conversion {
    /// The member file: a comment header, then YAML.
    pub yaml: String,
    /// The same, parsed and validated.
    pub config: Config,
    /// Settings not carried (or carried with a changed meaning), at their Patroni path.
    pub reports: Vec<Problem>,
}

/// Why there is no conversion.
#[derive(Debug)]
pub enum ConvertError {
    /// Not YAML, or not a Patroni configuration.
    NotPatroni(String),
    /// A Patroni configuration that cannot make a valid pgherd member file: `problems` say
    /// what is missing; `reports` are as in [`Conversion`].
    Unconvertible {
        problems: Vec<Problem>,
        reports: Vec<Problem>,
    },
}

/// Default distance of the gRPC port from restapi's (`--api-port` overrides it).
const API_PORT_OFFSET: u16 = 1000;

/// What carries no meaning in pgherd, by Patroni path; `*` matches one segment.
const NOT_CARRIED: &[(&str, &str)] = &[
    ("namespace", "pgherd keeps its keys under /pgherd/<cluster>/; there is no namespace"),
    ("log", "pgherd-agent logs to stderr, as text or JSON lines (--log-format, PGHERD_LOG_FORMAT) filtered by PGHERD_LOG (e.g. debug); the service manager (journald) keeps it"),
    ("ctl", "pgherdctl reads a member's file (--config) for the API address, TLS files and token"),
    ("citus", "pgherd does not manage Citus"),
    ("thread_pool_size", "the agent has no thread pool setting"),
    ("thread_stack_size", "the agent has no thread stack setting"),
    ("watchdog", "pgherd fences with its own watchdog process (pgherd-watchdog, started by the agent and always armed while PostgreSQL may accept writes), not with /dev/watchdog"),
    ("restapi.keyfile_password", "pgherd reads an unencrypted key file; decrypt the key (kept readable by root only)"),
    ("restapi.ciphers", "pgherd's TLS (rustls) chooses its own cipher suites"),
    ("restapi.allowlist", "pgherd has no address allowlist: changing requests need api.auth_token; filter addresses with a firewall"),
    ("restapi.allowlist_include_members", "pgherd has no address allowlist"),
    ("restapi.http_extra_headers", "pgherd sends no extra HTTP headers"),
    ("restapi.https_extra_headers", "pgherd sends no extra HTTP headers"),
    ("restapi.request_queue_size", "no such setting in pgherd"),
    ("restapi.server_tokens", "no such setting in pgherd"),
    ("restapi.thread_pool_size", "no such setting in pgherd"),
    ("postgresql.pgpass", "pgherd writes its own password file (postgres.pgpass, default <data_dir>.pgpass)"),
    ("postgresql.config_dir", "pgherd keeps postgresql.conf and pg_hba.conf in the data directory"),
    ("postgresql.custom_conf", "pgherd's postgresql.conf includes postgresql.base.conf from the data directory; put settings in postgres.parameters"),
    ("postgresql.pg_ident", "pgherd does not manage pg_ident.conf; the data directory's file stays as it is"),
    ("postgresql.recovery_conf", "pgherd writes the standby settings itself"),
    ("postgresql.use_unix_socket", "the agent connects over TCP to postgres.listen"),
    ("postgresql.use_unix_socket_repl", "replication connections go over TCP"),
    ("postgresql.proxy_address", "pgherd publishes no proxy address"),
    ("postgresql.bin_name", "pgherd runs the programs of postgres.bin_dir under their own names"),
    ("postgresql.basebackup", "pgherd runs pg_basebackup with its own options (-X stream -c fast)"),
    ("postgresql.remove_data_directory_on_diverged_timelines", "pgherd rewinds a diverged member with pg_rewind (use_pg_rewind), or re-clones it only with remove_data_directory_on_rewind_failure"),
    ("postgresql.authentication.rewind", "pgherd runs pg_rewind as the superuser (postgres.superuser)"),
    ("postgresql.authentication.*.sslmode", "TLS between members is postgres.tls {cert, key, ca}: verify-full and channel binding for every connection"),
    ("postgresql.authentication.*.sslcert", "TLS between members is postgres.tls {cert, key, ca}"),
    ("postgresql.authentication.*.sslkey", "TLS between members is postgres.tls {cert, key, ca}"),
    ("postgresql.authentication.*.sslpassword", "TLS between members is postgres.tls {cert, key, ca}, with an unencrypted key"),
    ("postgresql.authentication.*.sslrootcert", "TLS between members is postgres.tls {cert, key, ca}"),
    ("postgresql.authentication.*.sslcrl", "TLS between members is postgres.tls {cert, key, ca}; no CRL"),
    ("postgresql.authentication.*.sslcrldir", "TLS between members is postgres.tls {cert, key, ca}; no CRL"),
    ("postgresql.authentication.*.sslnegotiation", "TLS between members is postgres.tls {cert, key, ca}"),
    ("postgresql.authentication.*.gssencmode", "pgherd authenticates members with SCRAM passwords, not GSSAPI"),
    ("postgresql.authentication.*.channel_binding", "pgherd requires channel binding whenever postgres.tls is set"),
    ("bootstrap.users", "pgherd creates only the superuser and the replication role; create others with SQL"),
    ("bootstrap.pg_hba", "Patroni's old place for pg_hba lines; put them in postgresql.pg_hba (carried to postgres.pg_hba)"),
    ("bootstrap.dcs.primary_stop_timeout", "pgherd stops the primary within its lease budget (rule 2); no separate stop timeout"),
    ("bootstrap.dcs.master_stop_timeout", "pgherd stops the primary within its lease budget (rule 2); no separate stop timeout"),
    ("bootstrap.dcs.check_timeline", "pgherd always compares timelines before a member follows or takes over"),
    ("bootstrap.dcs.max_timelines_history", "pgherd's history key keeps every promotion"),
    ("bootstrap.dcs.postgresql.pg_ident", "pgherd does not manage pg_ident.conf"),
    ("bootstrap.dcs.postgresql.recovery_conf", "pgherd writes the standby settings itself"),
    ("bootstrap.dcs.postgresql.remove_data_directory_on_diverged_timelines", "pgherd rewinds a diverged member with pg_rewind, or re-clones it only with remove_data_directory_on_rewind_failure"),
    ("bootstrap.dcs.standby_cluster.archive_cleanup_command", "pgherd sets no archive_cleanup_command for a standby cluster"),
    ("tags.nostream", "every pgherd replica streams; there is no archive-only replica"),
];

/// DCS sections pgherd cannot use.
const OTHER_DCS: &[&str] = &["consul", "zookeeper", "kubernetes", "raft", "exhibitor"];

/// The reason `path` is not carried, if it is one of [`NOT_CARRIED`].
fn known_reason(path: &str) -> Option<&'static str> {
    let segs: Vec<&str> = path.split('.').collect();
    NOT_CARRIED.iter().find_map(|(pattern, why)| {
        let p: Vec<&str> = pattern.split('.').collect();
        (p.len() == segs.len() && p.iter().zip(&segs).all(|(a, b)| *a == "*" || a == b))
            .then_some(*why)
    })
}

/// Patroni's slot name for a member name (lower case, `-` and `.` to `_`, other characters
/// as `u` and their code point, at most 63 characters): pgherd names a member's slot after
/// the member, so the converted name keeps the slot Patroni made.
pub fn slot_name(member: &str) -> String {
    let mut out = String::new();
    for c in member.to_lowercase().chars() {
        match c {
            'a'..='z' | '0'..='9' | '_' => out.push(c),
            '-' | '.' => out.push('_'),
            other => out.push_str(&format!("u{:04}", other as u32)),
        }
    }
    out.chars().take(63).collect()
}

/// Converts the text of a Patroni configuration file.
pub fn convert(text: &str, opts: &Options) -> Result<Conversion, ConvertError> {
    let root: Value = serde_yaml::from_str(text)
        .map_err(|e| ConvertError::NotPatroni(format!("not YAML: {e}")))?;
    let Value::Mapping(map) = &root else {
        return Err(ConvertError::NotPatroni(
            "not a Patroni configuration: the file is not a YAML mapping".into(),
        ));
    };
    let has = |k: &str| map.contains_key(k);
    if has("cluster") && has("api") {
        return Err(ConvertError::NotPatroni(
            "not a Patroni configuration: it has cluster and api, so it looks like a pgherd configuration already (check it with pgherd-agent check-config)".into(),
        ));
    }
    if !has("postgresql") || !(has("scope") || has("restapi") || has("name")) {
        return Err(ConvertError::NotPatroni(
            "not a Patroni configuration: it needs a postgresql section and scope, name or restapi"
                .into(),
        ));
    }
    let mut w = Walk::default();
    let out = w.member(map, opts);
    let body = serde_yaml::to_string(&Value::Mapping(out))
        .map_err(|e| ConvertError::NotPatroni(format!("cannot write the result as YAML: {e}")))?;
    let reports = std::mem::take(&mut w.reports);
    if !w.problems.is_empty() {
        return Err(ConvertError::Unconvertible {
            problems: w.problems,
            reports,
        });
    }
    let yaml = format!("{}{body}", w.header.join(""));
    match crate::parse(&yaml) {
        Ok(config) => Ok(Conversion {
            yaml,
            config,
            reports,
        }),
        Err(problems) => Err(ConvertError::Unconvertible {
            problems: problems
                .into_iter()
                .map(|p| {
                    Problem::new(
                        patroni_path(&p.path),
                        format!("{} (as pgherd's {})", p.message, p.path),
                    )
                })
                .collect(),
            reports,
        }),
    }
}

/// Where a key of the converted file came from in the Patroni file, so that a problem of
/// the result names the setting to fix there.
fn patroni_path(pgherd: &str) -> String {
    const ORIGIN: &[(&str, &str)] = &[
        ("cluster", "scope"),
        ("etcd", "etcd3"),
        ("api.http_listen", "restapi.listen"),
        ("api.listen", "restapi.listen"),
        ("api.connect_address", "restapi.connect_address"),
        ("api.tls.cert", "restapi.certfile"),
        ("api.tls.key", "restapi.keyfile"),
        ("api.tls.ca", "restapi.cafile"),
        ("api.tls", "restapi"),
        ("api.auth_token", "restapi.authentication.password"),
        ("api", "restapi"),
        ("postgres.superuser", "postgresql.authentication.superuser"),
        (
            "postgres.replication",
            "postgresql.authentication.replication",
        ),
        ("postgres.command_timeout", "postgresql.pg_ctl_timeout"),
        ("postgres", "postgresql"),
        ("callbacks", "postgresql.callbacks"),
    ];
    for (from, to) in ORIGIN {
        if let Some(rest) = pgherd.strip_prefix(from) {
            if rest.is_empty() || rest.starts_with('.') || rest.starts_with('[') {
                return format!("{to}{rest}");
            }
        }
    }
    pgherd.to_string()
}

/// One section of the Patroni file being read: what was taken from it, so that the rest is
/// reported.
struct Section<'a> {
    path: String,
    map: Option<&'a Mapping>,
    taken: BTreeSet<String>,
}

impl<'a> Section<'a> {
    fn at(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn get(&mut self, key: &str) -> Option<&'a Value> {
        let v = self.map?.get(key)?;
        self.taken.insert(key.to_string());
        Some(v)
    }

    fn keys(&self) -> Vec<String> {
        self.map
            .map(|m| m.keys().map(key_text).collect())
            .unwrap_or_default()
    }
}

fn key_text(k: &Value) -> String {
    match k {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        _ => "?".to_string(),
    }
}

#[derive(Default)]
struct Walk {
    reports: Vec<Problem>,
    problems: Vec<Problem>,
    header: Vec<String>,
}

fn put(m: &mut Mapping, key: &str, v: impl Into<Value>) {
    m.insert(Value::from(key), v.into());
}

impl Walk {
    fn report(&mut self, path: impl Into<String>, why: impl Into<String>) {
        self.reports.push(Problem::new(path, why));
    }

    fn problem(&mut self, path: impl Into<String>, why: impl Into<String>) {
        self.problems.push(Problem::new(path, why));
    }

    /// A sub-section at `key` of `parent` (absent: an empty one); a value that is not a
    /// mapping is reported.
    fn section<'a>(&mut self, parent: &mut Section<'a>, key: &str) -> Section<'a> {
        let path = parent.at(key);
        let map = match parent.get(key) {
            Some(Value::Mapping(m)) => Some(m),
            Some(Value::Null) | None => None,
            Some(_) => {
                self.report(path.clone(), "is not a mapping; not carried");
                None
            }
        };
        Section {
            path,
            map,
            taken: BTreeSet::new(),
        }
    }

    /// Reports every key of `s` no rule took: with its known reason, or as unknown.
    fn rest(&mut self, s: &Section) {
        for key in s.keys() {
            if s.taken.contains(&key) {
                continue;
            }
            let path = s.at(&key);
            let why = known_reason(&path).map(str::to_string).unwrap_or_else(|| {
                "not a setting convert-patroni knows; not carried (pgherd has no such key)"
                    .to_string()
            });
            self.report(path, why);
        }
    }

    fn string(&mut self, s: &mut Section, key: &str) -> Option<String> {
        match s.get(key)? {
            Value::String(v) => Some(v.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            Value::Null => None,
            _ => {
                self.report(s.at(key), "is not a string; not carried");
                None
            }
        }
    }

    fn boolean(&mut self, s: &mut Section, key: &str) -> Option<bool> {
        match s.get(key)? {
            Value::Bool(b) => Some(*b),
            Value::String(t) => match parse_bool(t) {
                Some(b) => Some(b),
                None => {
                    self.report(s.at(key), "is not a boolean; not carried");
                    None
                }
            },
            Value::Number(n) if n.as_u64().is_some_and(|n| n <= 1) => n.as_u64().map(|n| n == 1),
            _ => {
                self.report(s.at(key), "is not a boolean; not carried");
                None
            }
        }
    }

    /// A count or a duration in seconds (`30`, `"30"`, `"30s"`, `"5min"`, `"1h"`, `"1d"`).
    fn seconds(&mut self, s: &mut Section, key: &str) -> Option<u64> {
        let v = s.get(key)?;
        let parsed = match v {
            Value::Number(n) => n.as_u64(),
            Value::String(t) => parse_seconds(t),
            _ => None,
        };
        if parsed.is_none() {
            self.report(
                s.at(key),
                "is not a whole number (of seconds or bytes); not carried",
            );
        }
        parsed
    }
}

/// `:8008` (and, for a socket the agent binds, `*:8008`) has no host pgherd can use as it
/// is: `default` listens everywhere. PostgreSQL takes `*` itself.
fn with_host(addr: &str, default: &str, star_ok: bool) -> String {
    match addr.rsplit_once(':') {
        Some(("", port)) => format!("{default}:{port}"),
        Some(("*", port)) if !star_ok => format!("{default}:{port}"),
        _ => addr.to_string(),
    }
}

/// Patroni's booleans: true/false, on/off, yes/no, 1/0 (any case).
fn parse_bool(t: &str) -> Option<bool> {
    match t.trim().to_ascii_lowercase().as_str() {
        "true" | "on" | "yes" | "1" => Some(true),
        "false" | "off" | "no" | "0" => Some(false),
        _ => None,
    }
}

/// Whole seconds from `30`, `30s`, `5min`, `2h`, `1d`, `1500ms` (rounded down).
fn parse_seconds(t: &str) -> Option<u64> {
    let t = t.trim();
    let digits = t.trim_end_matches(|c: char| c.is_ascii_alphabetic()).trim();
    let unit = t[digits.len()..].trim();
    let n: u64 = digits.parse().ok()?;
    let factor = match unit {
        "" | "s" => return Some(n),
        "ms" => return Some(n / 1000),
        "min" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    n.checked_mul(factor)
}

mod dcs;
mod member;
mod postgresql;

#[cfg(test)]
mod tests;
