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
    ("log", "pgherd-agent logs to stderr (level: the PGHERD_LOG environment variable, e.g. PGHERD_LOG=debug); send it to a file or journald from the service manager"),
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
    ("postgresql.pre_promote", "pgherd runs no pre-promote script; callbacks.on_role_change runs after a promotion"),
    ("postgresql.before_stop", "pgherd runs no before-stop script"),
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
    ("postgresql.callbacks.on_reload", "pgherd has no on_reload callback"),
    ("bootstrap.post_bootstrap", "pgherd runs no script after initdb; only a new cluster would run it"),
    ("bootstrap.post_init", "pgherd runs no script after initdb; only a new cluster would run it"),
    ("bootstrap.users", "pgherd creates only the superuser and the replication role; create others with SQL"),
    ("bootstrap.pg_hba", "Patroni's old place for pg_hba lines; put them in postgresql.pg_hba (carried to postgres.pg_hba)"),
    ("bootstrap.dcs.primary_stop_timeout", "pgherd stops the primary within its lease budget (rule 2); no separate stop timeout"),
    ("bootstrap.dcs.master_stop_timeout", "pgherd stops the primary within its lease budget (rule 2); no separate stop timeout"),
    ("bootstrap.dcs.maximum_lag_on_syncnode", "pgherd keeps a synchronous standby while it is connected; no lag limit for it"),
    ("bootstrap.dcs.check_timeline", "pgherd always compares timelines before a member follows or takes over"),
    ("bootstrap.dcs.max_timelines_history", "pgherd's history key keeps every promotion"),
    ("bootstrap.dcs.postgresql.pg_ident", "pgherd does not manage pg_ident.conf"),
    ("bootstrap.dcs.postgresql.recovery_conf", "pgherd writes the standby settings itself"),
    ("bootstrap.dcs.postgresql.remove_data_directory_on_diverged_timelines", "pgherd rewinds a diverged member with pg_rewind, or re-clones it only with remove_data_directory_on_rewind_failure"),
    ("bootstrap.dcs.standby_cluster.archive_cleanup_command", "pgherd sets no archive_cleanup_command for a standby cluster"),
    ("tags.nostream", "every pgherd replica streams; there is no archive-only replica"),
    ("tags.sync_priority", "pgherd picks synchronous standbys by position and name; use tags.nosync to exclude one"),
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

    /// The whole member file.
    fn member(&mut self, map: &Mapping, opts: &Options) -> Mapping {
        let mut top = Section {
            path: String::new(),
            map: Some(map),
            taken: BTreeSet::new(),
        };
        let mut out = Mapping::new();
        self.header.push(
            "# pgherd member configuration converted from a Patroni configuration by\n\
             # `pgherd-agent convert-patroni`. Settings it could not carry were listed on stderr.\n\
             # It holds passwords: keep it readable by root only (chmod 600).\n"
                .to_string(),
        );
        match self.string(&mut top, "scope") {
            Some(scope) => {
                if scope.is_empty()
                    || !scope
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
                {
                    self.problem(
                        "scope",
                        "pgherd's cluster name may only contain letters, digits, _, - and . (it is a segment of the etcd prefix /pgherd/<cluster>/)",
                    );
                }
                put(&mut out, "cluster", scope);
            }
            None => self.problem(
                "scope",
                "is missing (the PATRONI_SCOPE environment variable is not read): pgherd needs the cluster name",
            ),
        }
        match self.string(&mut top, "name") {
            Some(name) => {
                let slot = slot_name(&name);
                if slot != name {
                    self.report(
                        "name",
                        format!("pgherd's member name is also its replication slot's name, so {name:?} becomes {slot:?}, the slot name Patroni used for it"),
                    );
                }
                put(&mut out, "name", slot);
            }
            None => self.problem(
                "name",
                "is missing (the PATRONI_NAME environment variable is not read): pgherd needs the member name",
            ),
        }
        if let Some(etcd) = self.etcd(&mut top) {
            put(&mut out, "etcd", etcd);
        }
        let api = self.restapi(&mut top, opts);
        put(&mut out, "api", api);
        let mut bootstrap = self.section(&mut top, "bootstrap");
        let mut dcs_section = self.section(&mut bootstrap, "dcs");
        let mut dcs = self.dcs(&mut dcs_section);
        let (postgres, callbacks) = self.postgresql(&mut top, &mut dcs);
        put(&mut out, "postgres", postgres);
        let mut boot = Mapping::new();
        if !dcs.is_empty() {
            put(&mut boot, "dcs", dcs);
        }
        self.rest(&dcs_section);
        self.bootstrap(&mut bootstrap, &mut boot);
        if !boot.is_empty() {
            put(&mut out, "bootstrap", boot);
        }
        let tags = self.tags(&mut top);
        if !tags.is_empty() {
            put(&mut out, "tags", tags);
        }
        if !callbacks.is_empty() {
            put(&mut out, "callbacks", callbacks);
        }
        for dcs in OTHER_DCS {
            if top.get(dcs).is_some() {
                self.report(
                    *dcs,
                    "pgherd keeps its state in etcd (v3 API) only; this DCS cannot be used",
                );
            }
        }
        self.rest(&top);
        out
    }

    /// `etcd3` (or `etcd`, Patroni's v2 API client) to `etcd`.
    fn etcd(&mut self, top: &mut Section) -> Option<Mapping> {
        let key = if top.map.is_some_and(|m| m.contains_key("etcd3")) {
            "etcd3"
        } else if top.map.is_some_and(|m| m.contains_key("etcd")) {
            self.report(
                "etcd",
                "Patroni's etcd section uses etcd's v2 API; pgherd speaks the v3 API to the same hosts (etcd 3.4 and later serve both) and keeps its own keys, so nothing of the v2 data is read",
            );
            "etcd"
        } else {
            let other = OTHER_DCS
                .iter()
                .find(|d| top.map.is_some_and(|m| m.contains_key(**d)));
            self.problem(
                other.copied().unwrap_or("etcd3"),
                "pgherd needs etcd (an etcd3 section): it keeps its state in etcd only",
            );
            return None;
        };
        let mut s = self.section(top, key);
        let mut out = Mapping::new();
        let protocol = self.string(&mut s, "protocol");
        let has_tls = s.map.is_some_and(|m| m.contains_key("cacert"));
        let scheme = match protocol.as_deref() {
            Some("https") => "https",
            Some("http") => "http",
            Some(_) => {
                self.report(s.at("protocol"), "is neither http nor https; http is used");
                "http"
            }
            // Patroni's default is http; a CA alone does not turn TLS on there either.
            None => "http",
        };
        if has_tls && scheme == "http" {
            self.report(
                s.at("cacert"),
                "is set but protocol is not https: carried as etcd.ca, and the endpoints use http:// as Patroni did (pgherd uses TLS only with https:// endpoints)",
            );
        }
        // Patroni's precedence: url, else hosts, else host; `port` is the default port.
        let default_port = self.seconds(&mut s, "port").unwrap_or(2379);
        let with_scheme = |h: &str| {
            let h = h.trim();
            if h.contains("://") {
                h.to_string()
            } else if h
                .rsplit_once(':')
                .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
            {
                format!("{scheme}://{h}")
            } else {
                format!("{scheme}://{h}:{default_port}")
            }
        };
        let mut endpoints: Vec<String> = Vec::new();
        let mut url_credentials = false;
        if let Some(url) = self.string(&mut s, "url") {
            // Credentials in the URL are etcd.username/password in pgherd.
            let (scheme_part, rest) = url.split_once("://").unwrap_or(("http", url.as_str()));
            let authority = rest.split('/').next().unwrap_or(rest);
            let (creds, hostport) = match authority.rsplit_once('@') {
                Some((c, h)) => (Some(c), h),
                None => (None, authority),
            };
            if let Some(c) = creds {
                url_credentials = true;
                let (user, password) = c.split_once(':').unwrap_or((c, ""));
                put(&mut out, "username", user);
                put(&mut out, "password", password);
            }
            endpoints.push(with_scheme(&format!("{scheme_part}://{hostport}")));
        }
        for key in ["hosts", "host"] {
            let Some(v) = s.get(key) else { continue };
            if !endpoints.is_empty() {
                self.report(
                    s.at(key),
                    "Patroni ignores it when a url (or hosts) is set; not carried",
                );
                continue;
            }
            match v {
                Value::String(t) => endpoints.extend(t.split(',').map(with_scheme)),
                Value::Sequence(items) => {
                    for i in items {
                        match i.as_str() {
                            Some(t) => endpoints.push(with_scheme(t)),
                            None => self.report(s.at(key), "has an entry that is not host:port"),
                        }
                    }
                }
                _ => self.report(
                    s.at(key),
                    "is neither host:port, a list nor a comma-separated string",
                ),
            }
        }
        for key in ["srv", "srv_suffix", "proxy", "discovery_srv"] {
            if s.get(key).is_some() {
                self.report(
                    s.at(key),
                    "pgherd takes a fixed list of etcd endpoints (etcd.endpoints), not DNS SRV discovery or a proxy",
                );
            }
        }
        endpoints.dedup();
        if endpoints.is_empty() {
            self.problem(
                s.path.clone(),
                "names no etcd host (hosts, host or url): pgherd needs etcd.endpoints",
            );
        }
        put(
            &mut out,
            "endpoints",
            Value::Sequence(endpoints.into_iter().map(Value::from).collect()),
        );
        for key in ["username", "password"] {
            if let Some(v) = self.string(&mut s, key) {
                if url_credentials {
                    self.report(s.at(key), "the url's credentials are used, as Patroni does");
                } else {
                    put(&mut out, key, v);
                }
            }
        }
        for (from, to) in [("cacert", "ca"), ("cert", "cert"), ("key", "key")] {
            if let Some(v) = self.string(&mut s, from) {
                put(&mut out, to, v);
            }
        }
        if s.get("key_password").is_some() {
            self.report(
                s.at("key_password"),
                "pgherd reads an unencrypted client key (etcd.key); decrypt it and keep it readable by root only",
            );
        }
        self.rest(&s);
        Some(out)
    }

    /// `restapi` to `api`: Patroni's REST API port becomes the HTTP checks' (`/primary`,
    /// `/replica`, ... answer as Patroni's do), and the gRPC control API gets a port of its own.
    fn restapi(&mut self, top: &mut Section, opts: &Options) -> Mapping {
        let mut s = self.section(top, "restapi");
        let mut api = Mapping::new();
        let listen = self.string(&mut s, "listen");
        let connect = self.string(&mut s, "connect_address");
        let listen = listen.map(|l| with_host(&l, "0.0.0.0", false));
        let (listen_host, http_port) = match listen.as_deref().and_then(crate::split_host_port) {
            Some(hp) => hp,
            None => {
                self.problem(
                    s.at("listen"),
                    "is missing or not host:port: pgherd needs it for api.http_listen",
                );
                ("127.0.0.1".to_string(), 8008)
            }
        };
        let connect_host = connect
            .as_deref()
            .and_then(crate::split_host_port)
            .map(|(h, _)| h)
            .unwrap_or_else(|| {
                self.problem(
                    s.at("connect_address"),
                    "is missing or not host:port: pgherd needs it for api.connect_address",
                );
                listen_host.clone()
            });
        let api_port = match opts.api_port {
            Some(p) => p,
            None => match http_port.checked_add(API_PORT_OFFSET) {
                Some(p) => p,
                None => {
                    self.problem(
                        s.at("listen"),
                        "its port + 1000 is not a port: choose the control API's port with --api-port",
                    );
                    0
                }
            },
        };
        let join = |h: &str, p: u16| {
            if h.contains(':') {
                format!("[{h}]:{p}")
            } else {
                format!("{h}:{p}")
            }
        };
        put(&mut api, "listen", join(&listen_host, api_port));
        put(&mut api, "connect_address", join(&connect_host, api_port));
        put(&mut api, "http_listen", join(&listen_host, http_port));
        self.header.push(format!(
            "# api.http_listen is restapi.listen: load balancers keep checking /primary, /replica, ...\n\
             # there. api.listen (port {api_port}) is new: pgherd's control API (gRPC) for pgherdctl\n\
             # and the other agents; open it between members ({}).\n",
            if opts.api_port.is_some() {
                "chosen with --api-port"
            } else {
                "restapi's port + 1000; --api-port chooses another"
            }
        ));
        let cert = self.string(&mut s, "certfile");
        let key = self.string(&mut s, "keyfile");
        let ca = self.string(&mut s, "cafile");
        let verify = self.string(&mut s, "verify_client");
        match (cert, key) {
            (Some(cert), key) => {
                let mut tls = Mapping::new();
                put(&mut tls, "cert", cert.clone());
                // Patroni takes the key from the certificate file when keyfile is unset.
                put(&mut tls, "key", key.unwrap_or(cert));
                if let Some(ca) = ca {
                    if verify.as_deref() != Some("required") {
                        self.report(
                            s.at("verify_client"),
                            "with api.tls.ca pgherd requires a client certificate signed by it on every call (Patroni's verify_client: required); agents and pgherdctl present api.tls.cert",
                        );
                    }
                    put(&mut tls, "ca", ca);
                }
                self.report(
                    s.at("certfile"),
                    "carried as api.tls.cert; pgherd's clients check that an agent's certificate names its member (a DNS name equal to name) unless api.tls.member_identity names what it carries: certificates issued for host names need member_identity",
                );
                put(&mut api, "tls", tls);
            }
            (None, Some(_)) => {
                self.report(s.at("keyfile"), "without certfile; not carried");
                put(&mut api, "plaintext", true);
            }
            (None, None) => {
                if ca.is_some() {
                    self.report(s.at("cafile"), "without certfile; not carried");
                }
                if verify.is_some() {
                    self.report(s.at("verify_client"), "without certfile; not carried");
                }
                put(&mut api, "plaintext", true);
            }
        }
        let mut auth = self.section(&mut s, "authentication");
        let _ = self.string(&mut auth, "username");
        let no_token = || {
            "# No api.auth_token: pgherdctl's changing commands (switchover, pause, ...) are refused\n\
             # until every member's file has the same token (16 characters or more).\n"
                .to_string()
        };
        match self.string(&mut auth, "password") {
            Some(p) if p.chars().count() >= 16 && !p.contains(['\n', '\r']) => {
                self.report(
                    auth.path.clone(),
                    "pgherd protects changing requests with a bearer token, not basic auth: the password became api.auth_token (the username is not used); pgherdctl sends it from the member file",
                );
                put(&mut api, "auth_token", p);
            }
            Some(_) => {
                self.report(
                    auth.path.clone(),
                    "pgherd protects changing requests with a bearer token of at least 16 characters (api.auth_token), not basic auth; this password is too short to be one, so no token is set and pgherdctl's changing commands (switchover, pause, ...) are refused until every member has the same api.auth_token",
                );
                self.header.push(no_token());
            }
            None => self.header.push(no_token()),
        }
        self.rest(&auth);
        self.rest(&s);
        api
    }

    /// `postgresql` (and `authentication`, `callbacks`) to `postgres` and `callbacks`; the
    /// member-level settings pgherd has only cluster-wide go into `dcs` when it lacks them.
    fn postgresql(&mut self, top: &mut Section, dcs: &mut Mapping) -> (Mapping, Mapping) {
        let mut s = self.section(top, "postgresql");
        let mut pg = Mapping::new();
        for key in ["listen", "connect_address"] {
            match self.string(&mut s, key) {
                Some(v) if key == "listen" => put(&mut pg, key, with_host(&v, "*", true)),
                Some(v) => put(&mut pg, key, v),
                None => self.problem(
                    s.at(key),
                    "is missing: pgherd needs it (host:port, PostgreSQL's)",
                ),
            }
        }
        match self.string(&mut s, "data_dir") {
            Some(d) => put(&mut pg, "data_dir", d),
            None => self.problem(
                s.at("data_dir"),
                "is missing: pgherd needs the data directory",
            ),
        }
        if let Some(b) = self.string(&mut s, "bin_dir").filter(|b| !b.is_empty()) {
            put(&mut pg, "bin_dir", b);
        }
        let mut auth = self.section(&mut s, "authentication");
        for role in ["superuser", "replication"] {
            let mut r = self.section(&mut auth, role);
            let user = self.string(&mut r, "username");
            let password = self.string(&mut r, "password");
            match (user, password) {
                (Some(u), Some(p)) => {
                    let mut c = Mapping::new();
                    put(&mut c, "username", u);
                    put(&mut c, "password", p);
                    put(&mut pg, role, c);
                }
                (None, _) => self.problem(
                    r.at("username"),
                    "is missing (PATRONI_*_USERNAME environment variables are not read): pgherd needs it",
                ),
                (Some(_), None) => self.problem(
                    r.at("password"),
                    "is missing (PATRONI_*_PASSWORD environment variables are not read): pgherd connects with a password, add it to the file and convert again",
                ),
            }
            self.rest(&r);
        }
        if auth.get("rewind").is_some() {
            self.report(
                auth.at("rewind"),
                known_reason("postgresql.authentication.rewind").unwrap_or_default(),
            );
        }
        self.rest(&auth);
        let mut params = self.parameters(&mut s, "parameters");
        // Member-level settings pgherd has cluster-wide only.
        let dcs_pg = dcs
            .entry(Value::from("postgresql"))
            .or_insert_with(|| Value::Mapping(Mapping::new()));
        if let Value::Mapping(dcs_pg) = dcs_pg {
            for key in ["use_pg_rewind", "remove_data_directory_on_rewind_failure"] {
                if let Some(b) = self.boolean(&mut s, key) {
                    if dcs_pg.contains_key(key) {
                        self.report(
                            s.at(key),
                            format!("pgherd has it cluster-wide only: bootstrap.dcs.postgresql.{key} is kept"),
                        );
                    } else {
                        self.report(
                            s.at(key),
                            format!("pgherd has it cluster-wide only: carried to bootstrap.dcs.postgresql.{key}"),
                        );
                        put(dcs_pg, key, b);
                    }
                }
            }
            // Code-running parameters of the cluster-wide set move to the member's own.
            if let Some(Value::Mapping(dp)) = dcs_pg.get_mut("parameters") {
                let code: Vec<Value> = dp
                    .keys()
                    .filter(|k| k.as_str().and_then(crate::runs_code).is_some())
                    .cloned()
                    .collect();
                for k in code {
                    let name = key_text(&k);
                    if let Some(v) = dp.remove(&k) {
                        if !params.contains_key(&k) {
                            params.insert(k, v);
                        }
                        self.report(
                            format!("bootstrap.dcs.postgresql.parameters.{name}"),
                            "pgherd refuses a parameter that runs code in the cluster-wide configuration: carried to this member's postgres.parameters (convert every member's file)",
                        );
                    }
                }
                if dp.is_empty() {
                    dcs_pg.remove("parameters");
                }
            }
            if let Some(Value::Sequence(lines)) = dcs_pg.remove("pg_hba") {
                let why = if s.map.is_some_and(|m| m.contains_key("pg_hba")) {
                    "pgherd has pg_hba lines per member only: postgresql.pg_hba is kept, these are not carried"
                } else {
                    put(&mut pg, "pg_hba", Value::Sequence(lines));
                    "pgherd has pg_hba lines per member only: carried to postgres.pg_hba, placed before pgherd's own lines (convert every member's file)"
                };
                self.report("bootstrap.dcs.postgresql.pg_hba", why);
            }
            if let Some(t) = dcs_pg.remove("pg_ctl_timeout") {
                if !s.map.is_some_and(|m| m.contains_key("pg_ctl_timeout")) {
                    put(&mut pg, "command_timeout", t);
                }
            }
        }
        if dcs
            .get("postgresql")
            .is_some_and(|v| v.as_mapping().is_some_and(Mapping::is_empty))
        {
            dcs.remove("postgresql");
        }
        if !params.is_empty() {
            put(&mut pg, "parameters", params);
        }
        match s.get("pg_hba") {
            Some(Value::Sequence(lines)) => {
                let lines: Vec<Value> = lines
                    .iter()
                    .filter_map(|l| l.as_str().map(Value::from))
                    .collect();
                self.report(
                    s.at("pg_hba"),
                    "carried to postgres.pg_hba: pgherd places these lines before its own (the agent, replication and pg_rewind, all scram-sha-256), so a line here can still refuse or admit those connections first",
                );
                put(&mut pg, "pg_hba", Value::Sequence(lines));
            }
            Some(_) => self.report(s.at("pg_hba"), "is not a list of lines; not carried"),
            None => {}
        }
        if let Some(t) = self.seconds(&mut s, "pg_ctl_timeout") {
            if t == 0 {
                self.report(
                    s.at("pg_ctl_timeout"),
                    "is 0; pgherd's command_timeout is at least 1 s: the default (120 s) is kept",
                );
            } else {
                put(&mut pg, "command_timeout", t);
            }
        }
        let methods = self.replica_methods(&mut s);
        if let Some(m) = methods {
            self.report(
                s.at("create_replica_methods"),
                format!("pgherd has it cluster-wide only: {m}"),
            );
        }
        let callbacks = self.callbacks(&mut s);
        self.rest(&s);
        (pg, callbacks)
    }

    /// `postgresql.create_replica_methods`: only `basebackup` has a pgherd equivalent; the
    /// custom methods' sections are reported with it.
    fn replica_methods(&mut self, s: &mut Section) -> Option<String> {
        let v = s.get("create_replica_methods")?;
        let names: Vec<String> = v
            .as_sequence()
            .map(|l| {
                l.iter()
                    .filter_map(|i| i.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let mut custom = Vec::new();
        for n in &names {
            if n != "basebackup" {
                custom.push(n.clone());
                if s.get(n).is_some() {
                    self.report(
                        s.at(n),
                        "a custom replica creation method: pgherd runs no replica scripts (it creates replicas with pg_basebackup, or from its own backups with create_replica_methods: [backup])",
                    );
                }
            }
        }
        Some(if custom.is_empty() {
            "basebackup is pgherd's default (bootstrap.dcs.create_replica_methods)".to_string()
        } else {
            format!(
                "{} are custom scripts pgherd does not run; it creates replicas with pg_basebackup (and from its own backups with create_replica_methods: [backup])",
                custom.join(", ")
            )
        })
    }

    fn callbacks(&mut self, s: &mut Section) -> Mapping {
        let mut c = self.section(s, "callbacks");
        let mut out = Mapping::new();
        for key in ["on_start", "on_stop", "on_restart", "on_role_change"] {
            let Some(cmd) = self.string(&mut c, key) else {
                continue;
            };
            if cmd.contains(['"', '\'', '\\', '$', '|', ';', '&', '>', '<', '`']) {
                self.report(
                    c.at(key),
                    "pgherd runs a callback as a program and arguments split at spaces, without a shell or quoting: this command needs one; not carried (wrap it in a script)",
                );
                continue;
            }
            put(&mut out, key, cmd.trim().to_string());
        }
        self.rest(&c);
        if !out.is_empty() {
            self.header.push(
                "# callbacks: run as `<command> <action> <role> <cluster>` as Patroni's, with roles\n\
                 # primary and replica.\n"
                    .to_string(),
            );
        }
        out
    }

    /// A `parameters` mapping without the parameters pgherd sets itself (each reported).
    fn parameters(&mut self, s: &mut Section, key: &str) -> Mapping {
        let mut out = Mapping::new();
        let path = s.at(key);
        let Some(v) = s.get(key).filter(|v| !v.is_null()) else {
            return out;
        };
        let Some(m) = v.as_mapping() else {
            self.report(path, "is not a mapping; not carried");
            return out;
        };
        for (k, v) in m {
            let name = key_text(k);
            let lower = name.to_ascii_lowercase();
            if let Some((_, why)) = crate::validate::MANAGED_PARAMETERS
                .iter()
                .find(|(n, _)| *n == lower)
            {
                self.report(
                    format!("{path}.{name}"),
                    format!("pgherd sets this parameter itself ({why}); not carried"),
                );
                continue;
            }
            match v {
                Value::String(_) | Value::Number(_) | Value::Bool(_) => {
                    out.insert(Value::from(name), v.clone());
                }
                _ => self.report(
                    format!("{path}.{name}"),
                    "is not a single value; not carried",
                ),
            }
        }
        out
    }

    /// `bootstrap.dcs` to `bootstrap.dcs`.
    fn dcs(&mut self, s: &mut Section) -> Mapping {
        let mut out = Mapping::new();
        for key in [
            "ttl",
            "loop_wait",
            "retry_timeout",
            "maximum_lag_on_failover",
            "member_slots_ttl",
        ] {
            if let Some(v) = self.seconds(s, key) {
                put(&mut out, key, v);
            }
        }
        for key in ["primary_start_timeout", "master_start_timeout"] {
            if let Some(v) = self.seconds(s, key) {
                if !out.contains_key("primary_start_timeout") {
                    put(&mut out, "primary_start_timeout", v);
                }
            }
        }
        if let Some(v) = s.get("synchronous_mode") {
            let mode = match v {
                Value::Bool(true) => Some("on"),
                Value::Bool(false) => Some("off"),
                Value::String(t) if t.eq_ignore_ascii_case("quorum") => Some("quorum"),
                Value::String(t) => parse_bool(t).map(|b| if b { "on" } else { "off" }),
                _ => None,
            };
            match mode {
                Some(m) => put(&mut out, "synchronous_mode", m),
                None => self.report(
                    s.at("synchronous_mode"),
                    "is not on, off or quorum; not carried",
                ),
            }
        }
        for key in ["synchronous_mode_strict", "failsafe_mode", "pause"] {
            if let Some(b) = self.boolean(s, key) {
                put(&mut out, key, b);
            }
        }
        if let Some(n) = self.seconds(s, "synchronous_node_count") {
            put(&mut out, "synchronous_node_count", n);
        }
        let mut pg = self.section(s, "postgresql");
        let mut pg_out = Mapping::new();
        let params = self.parameters(&mut pg, "parameters");
        if !params.is_empty() {
            put(&mut pg_out, "parameters", params);
        }
        for key in ["use_pg_rewind", "remove_data_directory_on_rewind_failure"] {
            if let Some(b) = self.boolean(&mut pg, key) {
                put(&mut pg_out, key, b);
            }
        }
        if let Some(false) = self.boolean(&mut pg, "use_slots") {
            self.report(
                pg.at("use_slots"),
                "pgherd always gives each replica a replication slot on the leader (kept member_slots_ttl after the member leaves)",
            );
        }
        // Carried to the member's own settings by `postgresql`.
        for key in ["pg_hba", "pg_ctl_timeout"] {
            if let Some(v) = pg.get(key) {
                put(&mut pg_out, key, v.clone());
            }
        }
        self.rest(&pg);
        if !pg_out.is_empty() {
            put(&mut out, "postgresql", pg_out);
        }
        if let Some(slots) = self.slots(s) {
            put(&mut out, "slots", slots);
        }
        if let Some(v) = s.get("ignore_slots") {
            let mut list = Vec::new();
            for (i, item) in v.as_sequence().into_iter().flatten().enumerate() {
                let mut e = Mapping::new();
                for (k, v) in item.as_mapping().into_iter().flatten() {
                    let k = key_text(k);
                    if ["name", "type", "database", "plugin"].contains(&k.as_str()) {
                        put(&mut e, &k, v.clone());
                    } else {
                        self.report(
                            format!("{}[{i}].{k}", s.at("ignore_slots")),
                            "pgherd matches ignored slots by name, type, database and plugin only; not carried",
                        );
                    }
                }
                list.push(Value::Mapping(e));
            }
            put(&mut out, "ignore_slots", Value::Sequence(list));
        }
        if let Some(sc) = self.standby_cluster(s) {
            put(&mut out, "standby_cluster", sc);
        }
        out
    }

    fn slots(&mut self, s: &mut Section) -> Option<Mapping> {
        let path = s.at("slots");
        let v = s.get("slots")?;
        let mut out = Mapping::new();
        for (name, slot) in v.as_mapping().into_iter().flatten() {
            let name = key_text(name);
            let mut e = Mapping::new();
            for (k, v) in slot.as_mapping().into_iter().flatten() {
                let k = key_text(k);
                if ["type", "database", "plugin"].contains(&k.as_str()) {
                    put(&mut e, &k, v.clone());
                } else {
                    self.report(
                        format!("{path}.{name}.{k}"),
                        "pgherd's permanent slots have type, database and plugin only; not carried",
                    );
                }
            }
            if !e.contains_key("type") {
                put(&mut e, "type", "physical");
            }
            out.insert(Value::from(name), Value::Mapping(e));
        }
        Some(out)
    }

    fn standby_cluster(&mut self, s: &mut Section) -> Option<Mapping> {
        s.map?.get("standby_cluster")?;
        let mut sc = self.section(s, "standby_cluster");
        let mut out = Mapping::new();
        match self.string(&mut sc, "host") {
            Some(h) => put(&mut out, "host", h),
            None => self.problem(
                sc.at("host"),
                "is missing: a pgherd standby cluster streams from a host (restore_command alone is not enough)",
            ),
        }
        if let Some(p) = self.seconds(&mut sc, "port") {
            put(&mut out, "port", p);
        }
        for key in [
            "primary_slot_name",
            "restore_command",
            "recovery_min_apply_delay",
        ] {
            if let Some(v) = self.string(&mut sc, key) {
                put(&mut out, key, v);
            }
        }
        if let Some(v) = sc.get("create_replica_methods") {
            let names: Vec<&str> = v
                .as_sequence()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            if names.iter().any(|n| *n != "basebackup") {
                self.report(
                    sc.at("create_replica_methods"),
                    "pgherd copies the remote with pg_basebackup (or from its repository: repository + cluster); custom methods are not run",
                );
            }
            if names.contains(&"basebackup") {
                put(
                    &mut out,
                    "create_replica_methods",
                    Value::Sequence(vec![Value::from("basebackup")]),
                );
            }
        }
        if out.contains_key("restore_command") {
            self.report(
                sc.at("restore_command"),
                "carried; pgherd runs it only on members whose own file sets postgres.trust_cluster_restore_command: true",
            );
        }
        self.rest(&sc);
        Some(out)
    }

    /// `bootstrap` apart from `dcs`.
    fn bootstrap(&mut self, s: &mut Section, out: &mut Mapping) {
        if let Some(v) = s.get("initdb") {
            let mut opts = Vec::new();
            for (i, item) in v.as_sequence().into_iter().flatten().enumerate() {
                match item {
                    Value::String(flag) => opts.push(Value::from(flag.clone())),
                    Value::Mapping(m) => {
                        let mut e = Mapping::new();
                        for (k, v) in m {
                            let text = match v {
                                Value::String(t) => t.clone(),
                                Value::Number(n) => n.to_string(),
                                Value::Bool(b) => b.to_string(),
                                _ => {
                                    self.report(
                                        format!("bootstrap.initdb[{i}]"),
                                        "is not a flag or a name: value option; not carried",
                                    );
                                    continue;
                                }
                            };
                            e.insert(Value::from(key_text(k)), Value::from(text));
                        }
                        opts.push(Value::Mapping(e));
                    }
                    _ => self.report(
                        format!("bootstrap.initdb[{i}]"),
                        "is not a flag or a name: value option; not carried",
                    ),
                }
            }
            if !opts.is_empty() {
                put(out, "initdb", Value::Sequence(opts));
            }
        }
        if let Some(method) = self.string(s, "method") {
            if method != "initdb" {
                self.report(
                    s.at("method"),
                    format!("pgherd makes a new cluster with initdb or from pgherd backups (bootstrap.method: restore), and runs no custom bootstrap ({method:?}); this only matters for a new cluster: members adopting existing data directories never bootstrap"),
                );
                if s.get(&method).is_some() {
                    self.report(
                        s.at(&method),
                        "the custom bootstrap method's settings; not carried (see bootstrap.method)",
                    );
                }
            }
        }
        self.rest(s);
    }

    fn tags(&mut self, top: &mut Section) -> Mapping {
        let mut s = self.section(top, "tags");
        let mut out = Mapping::new();
        for key in ["nofailover", "noloadbalance", "nosync", "clonefrom"] {
            if let Some(b) = self.boolean(&mut s, key) {
                put(&mut out, key, b);
            }
        }
        if let Some(p) = self.seconds(&mut s, "failover_priority") {
            if p == 0 {
                // Patroni: priority 0 never takes over.
                put(&mut out, "nofailover", true);
            } else {
                put(&mut out, "failover_priority", p.min(u64::from(u32::MAX)));
            }
        }
        if let Some(r) = self.string(&mut s, "replicatefrom") {
            put(&mut out, "replicatefrom", slot_name(&r));
        }
        for key in s.keys() {
            if !s.taken.contains(&key) && known_reason(&s.at(&key)).is_none() {
                s.taken.insert(key.clone());
                self.report(
                    s.at(&key),
                    "a custom tag: pgherd's tags are a fixed set (nofailover, failover_priority, noloadbalance, nosync, clonefrom, replicatefrom); not carried",
                );
            }
        }
        self.rest(&s);
        out
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

#[cfg(test)]
mod tests;
