//! Validation: structural problems (unknown keys, wrong types, missing keys) found by repeated
//! deserialisation, and semantic ones (ranges, relations between keys) found on the typed
//! config. Both report YAML paths such as `postgres.listen` or `etcd.endpoints[1]`.

use std::fmt;

use serde_yaml::Value;

use crate::{split_host_port, Config, DynamicConfig, HttpTls, ParamValue};

/// One thing wrong with a configuration, at a YAML path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl Problem {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Problem {
            path: path.into(),
            message: message.into(),
        }
    }

    /// One problem per line, indented, for error messages.
    pub fn list(problems: &[Problem]) -> String {
        problems
            .iter()
            .map(|p| format!("  {p}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// serde_path_to_error writes the root as `.`; we call it `(top level)`.
pub(crate) fn display_path(path: &str) -> String {
    if path == "." || path.is_empty() {
        "(top level)".to_string()
    } else {
        path.to_string()
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// Deserialises `text`, collecting every structural problem: after each error the offending
/// key is removed from the tree and deserialisation is tried again, so one run reports all
/// unknown keys and wrongly typed values.
pub(crate) fn deserialize_all(text: &str) -> Result<Config, Vec<Problem>> {
    let mut value: Value = serde_yaml::from_str(text).map_err(|e| {
        let at = e
            .location()
            .map(|l| format!("line {} column {}", l.line(), l.column()))
            .unwrap_or_else(|| "(top level)".to_string());
        vec![Problem::new(at, format!("not valid YAML: {e}"))]
    })?;
    if value.is_null() {
        return Err(vec![Problem::new("(top level)", "the file is empty")]);
    }
    let mut problems = Vec::new();
    // Each round removes one key, so the number of rounds is bounded by the file's size.
    for _ in 0..200 {
        match serde_path_to_error::deserialize::<_, Config>(value.clone()) {
            Ok(config) if problems.is_empty() => return Ok(config),
            Ok(config) => {
                // The well-typed rest of the file still gets its semantic checks.
                problems.extend(config.validate());
                return Err(problems);
            }
            Err(e) => {
                let path = e.path().to_string();
                let message = e.inner().to_string();
                let segments = parse_path(&path);
                let unknown = unknown_field(&message);
                let (problem_path, removal) = match &unknown {
                    Some(field) => {
                        let mut segs = segments.clone();
                        // serde_path_to_error already includes the unknown key in some cases.
                        if segs
                            .last()
                            .map(|s| s != &Segment::Key(field.clone()))
                            .unwrap_or(true)
                        {
                            segs.push(Segment::Key(field.clone()));
                        }
                        (render(&segs), Some(segs))
                    }
                    None if message.starts_with("missing field") => (display_path(&path), None),
                    None => (display_path(&path), Some(segments)),
                };
                let problem = Problem::new(problem_path, message);
                if problems.contains(&problem) {
                    return Err(problems);
                }
                problems.push(problem);
                match removal {
                    Some(segs) if !segs.is_empty() && remove(&mut value, &segs) => {}
                    // A missing key cannot be repaired by removal: report what we have.
                    _ => return Err(problems),
                }
            }
        }
    }
    Err(problems)
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Segment {
    Key(String),
    Index(usize),
}

pub(crate) fn parse_path(path: &str) -> Vec<Segment> {
    let mut out = Vec::new();
    if path == "." {
        return out;
    }
    for part in path.split('.') {
        let mut rest = part;
        if let Some(i) = rest.find('[') {
            if i > 0 {
                out.push(Segment::Key(rest[..i].to_string()));
            }
            rest = &rest[i..];
            while let Some(end) = rest.find(']') {
                if let Ok(n) = rest[1..end].parse() {
                    out.push(Segment::Index(n));
                }
                rest = &rest[end + 1..];
            }
        } else if !rest.is_empty() {
            out.push(Segment::Key(rest.to_string()));
        }
    }
    out
}

pub(crate) fn render(segs: &[Segment]) -> String {
    let mut s = String::new();
    for seg in segs {
        match seg {
            Segment::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Segment::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    display_path(&s)
}

pub(crate) fn unknown_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    Some(rest[..rest.find('`')?].to_string())
}

fn remove(value: &mut Value, segs: &[Segment]) -> bool {
    let (last, parents) = match segs.split_last() {
        Some(x) => x,
        None => return false,
    };
    let mut cur = value;
    for seg in parents {
        cur = match (seg, cur) {
            (Segment::Key(k), Value::Mapping(m)) => match m.get_mut(k.as_str()) {
                Some(v) => v,
                None => return false,
            },
            (Segment::Index(i), Value::Sequence(s)) => match s.get_mut(*i) {
                Some(v) => v,
                None => return false,
            },
            _ => return false,
        };
    }
    match (last, cur) {
        (Segment::Key(k), Value::Mapping(m)) => m.remove(k.as_str()).is_some(),
        (Segment::Index(i), Value::Sequence(s)) if *i < s.len() => {
            s.remove(*i);
            true
        }
        _ => false,
    }
}

/// Names that are etcd key segments and PostgreSQL replication slot names at once.
fn check_member_name(path: &str, name: &str, out: &mut Vec<Problem>) {
    if name.is_empty() || name.len() > 63 {
        out.push(Problem::new(path, "must be 1 to 63 characters long"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        out.push(Problem::new(
            path,
            format!(
                "{name:?} may only contain a-z, 0-9 and _ (it names the member's etcd key and its replication slot)"
            ),
        ));
    }
}

fn check_address(path: &str, addr: &str, out: &mut Vec<Problem>) {
    if split_host_port(addr).is_none() {
        out.push(Problem::new(
            path,
            format!("{addr:?} is not host:port with a port from 1 to 65535"),
        ));
    }
}

/// Absolute paths and a usable `member_identity` in a TLS block at `path`.
fn check_tls(path: &str, tls: &crate::ApiTls, out: &mut Vec<Problem>) {
    for (key, p) in [
        ("cert", Some(&tls.cert)),
        ("key", Some(&tls.key)),
        ("ca", tls.ca.as_ref()),
    ] {
        if let Some(p) = p {
            if !p.is_absolute() {
                out.push(Problem::new(join(path, key), "must be an absolute path"));
            }
        }
    }
    if let Some(id) = &tls.member_identity {
        let p = join(path, "member_identity");
        let dns = !id.is_empty()
            && id.len() <= 253
            && id.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .chars()
                        .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
            });
        if !dns {
            out.push(Problem::new(
                p.clone(),
                format!("{id:?} is not a DNS name (the certificates' subject alternative name)"),
            ));
        }
        if tls.ca.is_none() {
            out.push(Problem::new(
                p,
                "needs ca: without a CA no certificate, and so no name on it, is verified",
            ));
        }
    }
}

fn check_credentials(path: &str, c: &crate::Credentials, out: &mut Vec<Problem>) {
    if c.username.is_empty()
        || !c
            .username
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
    {
        out.push(Problem::new(
            join(path, "username"),
            "must be a non-empty role name of letters, digits and _",
        ));
    }
    if c.password.is_empty() {
        out.push(Problem::new(join(path, "password"), "must not be empty"));
    }
    if c.password.contains(['\n', '\r']) {
        out.push(Problem::new(
            join(path, "password"),
            "must not contain a line break",
        ));
    }
}

/// Parameters pgherd derives from other keys; setting them directly would fight the agent.
const MANAGED_PARAMETERS: &[(&str, &str)] = &[
    ("port", "set postgres.listen instead"),
    ("listen_addresses", "set postgres.listen instead"),
    ("data_directory", "set postgres.data_dir instead"),
    (
        "hba_file",
        "pgherd writes pg_hba.conf; add lines with postgres.pg_hba",
    ),
    ("ident_file", "pgherd manages the data directory's files"),
    ("config_file", "pgherd writes postgresql.conf"),
    ("primary_conninfo", "pgherd points replicas at the leader"),
    ("primary_slot_name", "pgherd names slots after members"),
    ("cluster_name", "pgherd sets it to the member name"),
    (
        "synchronous_standby_names",
        "pgherd manages it: set synchronous_mode and synchronous_node_count",
    ),
];

/// Bounds of the durations (seconds) and counts in the file and the dynamic config. Every
/// value inside them keeps the agent's arithmetic on deadlines (`Instant + Duration`,
/// `ttl * 3 + 30`, ...) far from overflow, so no accepted value can make an agent panic or
/// crash-loop; the upper ends are beyond any sensible setting, not tuning advice.
pub mod bounds {
    /// The leader lease, seconds. etcd grants leases of up to 9e9 s (its `MaxLeaseTTL`) and
    /// rounds very short ones up; a lease of more than an hour would leave the cluster
    /// without a writable primary for that long after a node dies.
    pub const TTL: (u64, u64) = (2, 3600);
    /// Seconds between two loops; below `ttl` anyway (see the relation with `ttl`).
    pub const LOOP_WAIT: (u64, u64) = (1, 600);
    /// Seconds an etcd or PostgreSQL call may take.
    pub const RETRY_TIMEOUT: (u64, u64) = (1, 600);
    /// Seconds a leader may spend bringing a crashed PostgreSQL back (0: release at once).
    pub const PRIMARY_START_TIMEOUT: (u64, u64) = (0, 86_400);
    /// Standbys that confirm each commit.
    pub const SYNCHRONOUS_NODE_COUNT: (u64, u64) = (1, 64);
    /// `postgres.command_timeout`, `callbacks.timeout`: seconds.
    pub const COMMAND_TIMEOUT: (u64, u64) = (1, 86_400);
    pub const CALLBACK_TIMEOUT: (u64, u64) = (1, 86_400);
    /// `backup.timeout`: a base backup, a restore's recovery or a verification, seconds.
    pub const BACKUP_TIMEOUT: (u64, u64) = (1, 7 * 86_400);
    /// `member_slots_ttl`: seconds (up to 30 days; retained WAL grows all that time).
    pub const MEMBER_SLOTS_TTL: (u64, u64) = (0, 30 * 86_400);
    /// `backup.retention.full`: base backups kept.
    pub const RETENTION_FULL: (u64, u64) = (1, 1000);
}

/// Adds a problem at `path` unless `min <= value <= max`.
pub(crate) fn check_range(
    path: impl Into<String>,
    value: u64,
    (min, max): (u64, u64),
    unit: &str,
    out: &mut Vec<Problem>,
) {
    if value < min || value > max {
        let unit = if unit.is_empty() {
            String::new()
        } else {
            format!(" {unit}")
        };
        out.push(Problem::new(
            path,
            format!("is {value}{unit}; it must be from {min} to {max}{unit}"),
        ));
    }
}

/// PostgreSQL parameters that run a program or load code into the server (as the
/// `postgres` OS user), with what they do. Anyone who can write the cluster's configuration
/// in etcd must not gain that: they are taken only from a member's own file.
const CODE_PARAMETERS: &[(&str, &str)] = &[
    (
        "archive_command",
        "runs a shell command for every WAL segment",
    ),
    (
        "archive_library",
        "loads a shared library into the archiver",
    ),
    ("restore_command", "runs a shell command during recovery"),
    (
        "archive_cleanup_command",
        "runs a shell command at every restartpoint",
    ),
    (
        "recovery_end_command",
        "runs a shell command at the end of recovery",
    ),
    (
        "ssl_passphrase_command",
        "runs a shell command to unlock the TLS key",
    ),
    (
        "dynamic_library_path",
        "chooses where shared libraries are loaded from",
    ),
    ("jit_provider", "loads a shared library"),
    ("include", "includes another configuration file"),
    ("include_dir", "includes other configuration files"),
    ("include_if_exists", "includes another configuration file"),
    ("plperl.on_init", "runs Perl code in the server"),
    ("plperl.on_plperl_init", "runs Perl code in the server"),
    ("plperl.on_plperlu_init", "runs Perl code in the server"),
    ("pltcl.start_proc", "runs a function when Tcl starts"),
    ("pltclu.start_proc", "runs a function when Tcl starts"),
    ("plv8.start_proc", "runs a function when V8 starts"),
    ("pljava.libjvm_location", "loads a shared library"),
];

/// What `name` does if it is a parameter that runs a program or loads code (PostgreSQL's
/// parameter names are case-insensitive): such parameters are refused in the cluster-wide
/// configuration (etcd, `bootstrap.dcs`) and accepted only from a member's own file.
pub fn runs_code(name: &str) -> Option<&'static str> {
    let name = name.to_ascii_lowercase();
    if let Some((_, what)) = CODE_PARAMETERS.iter().find(|(n, _)| *n == name) {
        return Some(what);
    }
    // shared_, session_ and local_preload_libraries, and any later sibling.
    name.ends_with("_preload_libraries")
        .then_some("loads shared libraries into the server")
}

/// The problem of a code-running parameter in the cluster-wide configuration.
pub(crate) fn code_parameter_problem(path: String, what: &str) -> Problem {
    Problem::new(
        path,
        format!(
            "{what} as the postgres user: pgherd refuses it in the cluster-wide configuration (etcd); set it in each member's own file (postgres.parameters)"
        ),
    )
}

fn check_parameters(
    path: &str,
    params: &std::collections::BTreeMap<String, ParamValue>,
    out: &mut Vec<Problem>,
) {
    for (name, value) in params {
        let p = join(path, name);
        // PostgreSQL's parameter names are case-insensitive.
        let lower = name.to_ascii_lowercase();
        if let Some((_, why)) = MANAGED_PARAMETERS.iter().find(|(n, _)| *n == lower) {
            out.push(Problem::new(
                p.clone(),
                format!("is managed by pgherd: {why}"),
            ));
        }
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        {
            out.push(Problem::new(
                p.clone(),
                "is not a PostgreSQL parameter name",
            ));
        }
        if let ParamValue::Text(s) = value {
            if s.contains(['\n', '\r']) {
                out.push(Problem::new(p, "value must not contain a line break"));
            }
        }
    }
}

pub(crate) fn dynamic(d: &DynamicConfig, prefix: &str) -> Vec<Problem> {
    let mut out = Vec::new();
    check_range(join(prefix, "ttl"), d.ttl, bounds::TTL, "s", &mut out);
    check_range(
        join(prefix, "loop_wait"),
        d.loop_wait,
        bounds::LOOP_WAIT,
        "s",
        &mut out,
    );
    check_range(
        join(prefix, "retry_timeout"),
        d.retry_timeout,
        bounds::RETRY_TIMEOUT,
        "s",
        &mut out,
    );
    check_range(
        join(prefix, "primary_start_timeout"),
        d.primary_start_timeout,
        bounds::PRIMARY_START_TIMEOUT,
        "s",
        &mut out,
    );
    let needed = d
        .loop_wait
        .saturating_add(d.retry_timeout.saturating_mul(2));
    if d.ttl < needed {
        out.push(Problem::new(
            join(prefix, "ttl"),
            format!(
                "is {} s but must be at least loop_wait + 2 * retry_timeout = {} s, otherwise the leader lease can lapse between two renewals",
                d.ttl, needed
            ),
        ));
    }
    check_range(
        join(prefix, "synchronous_node_count"),
        u64::from(d.synchronous_node_count),
        bounds::SYNCHRONOUS_NODE_COUNT,
        "",
        &mut out,
    );
    if d.postgresql
        .parameters
        .contains_key("synchronous_standby_names")
    {
        out.push(Problem::new(
            join(
                &join(&join(prefix, "postgresql"), "parameters"),
                "synchronous_standby_names",
            ),
            "is managed by pgherd: set synchronous_mode and synchronous_node_count instead",
        ));
    }
    let params = join(&join(prefix, "postgresql"), "parameters");
    check_parameters(&params, &d.postgresql.parameters, &mut out);
    check_range(
        join(prefix, "member_slots_ttl"),
        d.member_slots_ttl,
        bounds::MEMBER_SLOTS_TTL,
        "s",
        &mut out,
    );
    check_slots(prefix, d, &mut out);
    if let Some(sc) = &d.standby_cluster {
        check_standby_cluster(&join(prefix, "standby_cluster"), sc, &mut out);
    }
    for name in d.postgresql.parameters.keys() {
        if let Some(what) = runs_code(name) {
            out.push(code_parameter_problem(join(&params, name), what));
        }
    }
    out
}

fn check_standby_cluster(path: &str, sc: &crate::StandbyCluster, out: &mut Vec<Problem>) {
    if sc.host.is_empty()
        || sc
            .host
            .contains(|c: char| c.is_whitespace() || c == '\'' || c == '\\')
    {
        out.push(Problem::new(
            join(path, "host"),
            "is not a host name or address (empty, or with spaces, quotes or backslashes)",
        ));
    }
    if sc.port == 0 {
        out.push(Problem::new(
            join(path, "port"),
            "is 0; give the remote PostgreSQL's port",
        ));
    }
    if let Some(slot) = &sc.primary_slot_name {
        if !valid_slot_name(slot) {
            out.push(Problem::new(
                join(path, "primary_slot_name"),
                "is not a slot name: use lower-case letters, digits and underscores, at most 63",
            ));
        }
    }
    if sc
        .restore_command
        .as_deref()
        .is_some_and(|c| c.contains('\0') || c.contains('\n'))
    {
        out.push(Problem::new(
            join(path, "restore_command"),
            "contains a NUL or a line break",
        ));
    }
    match (&sc.repository, &sc.cluster) {
        (Some(repo), _) if !repo.is_absolute() => out.push(Problem::new(
            join(path, "repository"),
            "must be an absolute path (the other cluster's backup.repository, a directory)",
        )),
        (Some(_), None) => out.push(Problem::new(
            join(path, "cluster"),
            "is required with repository: the other cluster's name (its archive is <repository>/<cluster>)",
        )),
        (None, Some(_)) => out.push(Problem::new(
            join(path, "cluster"),
            "is set but repository is not; give the other cluster's backup.repository",
        )),
        _ => {}
    }
    if let Some(c) = &sc.cluster {
        if c.is_empty() || c.contains('/') || c == "." || c == ".." {
            out.push(Problem::new(
                join(path, "cluster"),
                "must be the other cluster's name (a plain name)",
            ));
        }
    }
    if sc.repository.is_some() && sc.restore_command.is_some() {
        out.push(Problem::new(
            join(path, "restore_command"),
            "is set with repository, which makes restore_command pgherd-agent wal-fetch reading that repository: choose one",
        ));
    }
    let methods = join(path, "create_replica_methods");
    let list = &sc.create_replica_methods;
    if list.is_empty() {
        out.push(Problem::new(
            methods,
            "is empty: list basebackup, backup or both",
        ));
    } else if list.iter().enumerate().any(|(i, m)| list[..i].contains(m)) {
        out.push(Problem::new(methods, "lists a method twice"));
    } else if list.contains(&crate::ReplicaMethod::Backup) && sc.repository.is_none() {
        out.push(Problem::new(
            methods,
            "lists backup, which copies the other cluster's base backup from standby_cluster.repository, but repository is not set",
        ));
    }
    if let Some(v) = &sc.recovery_min_apply_delay {
        let ok = match v {
            crate::ParamValue::Int(ms) => *ms >= 0,
            crate::ParamValue::Text(t) => {
                let t = t.trim();
                let digits = t
                    .trim_end_matches(|c: char| c.is_ascii_alphabetic())
                    .trim_end();
                let unit = &t[digits.len()..].trim();
                !digits.is_empty()
                    && digits.bytes().all(|b| b.is_ascii_digit())
                    && ["", "ms", "s", "min", "h", "d"].contains(unit)
            }
            _ => false,
        };
        if !ok {
            out.push(Problem::new(
                join(path, "recovery_min_apply_delay"),
                format!(
                    "is {v}, not a delay: give milliseconds or a number with ms, s, min, h or d"
                ),
            ));
        }
    }
}

/// PostgreSQL's rule for slot names: lower-case letters, digits and underscores, at most 63.
pub fn valid_slot_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn check_slots(prefix: &str, d: &DynamicConfig, out: &mut Vec<Problem>) {
    let slots = join(prefix, "slots");
    for (name, slot) in &d.slots {
        let path = join(&slots, name);
        if !valid_slot_name(name) {
            out.push(Problem::new(
                path.clone(),
                "is not a slot name: use lower-case letters, digits and underscores, at most 63",
            ));
        }
        match slot.kind {
            crate::SlotType::Physical => {
                for (field, v) in [("database", &slot.database), ("plugin", &slot.plugin)] {
                    if v.is_some() {
                        out.push(Problem::new(
                            join(&path, field),
                            "is only for logical slots (this one is physical)",
                        ));
                    }
                }
            }
            crate::SlotType::Logical => {
                for (field, v) in [("database", &slot.database), ("plugin", &slot.plugin)] {
                    match v.as_deref() {
                        None | Some("") => out.push(Problem::new(
                            join(&path, field),
                            "is required for a logical slot",
                        )),
                        Some(s) if s.len() > 63 || s.contains('\0') => out.push(Problem::new(
                            join(&path, field),
                            "is not a PostgreSQL name (at most 63 bytes)",
                        )),
                        Some(_) => {}
                    }
                }
            }
        }
    }
    let methods = join(prefix, "create_replica_methods");
    if d.create_replica_methods.is_empty() {
        out.push(Problem::new(
            methods.clone(),
            "is empty: list at least one of backup, basebackup",
        ));
    }
    for (i, m) in d.create_replica_methods.iter().enumerate() {
        if d.create_replica_methods[..i].contains(m) {
            out.push(Problem::new(
                format!("{methods}[{i}]"),
                format!("lists {} twice", m.as_str()),
            ));
        }
    }
}

pub(crate) fn config(c: &Config) -> Vec<Problem> {
    let mut out = Vec::new();
    if c.bootstrap.method == crate::BootstrapMethod::Restore
        && c.bootstrap.dcs.standby_cluster.is_some()
    {
        out.push(Problem::new(
            "bootstrap.method",
            "is restore, which ends with a promotion, but bootstrap.dcs.standby_cluster makes this a standby cluster, whose first member copies the remote source: choose one",
        ));
    }
    if c.cluster.is_empty()
        || !c
            .cluster
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-' || ch == '.')
        || c.cluster.starts_with('.')
    {
        out.push(Problem::new(
            "cluster",
            format!(
                "{:?} may only contain letters, digits, _, - and . (it is an etcd key segment)",
                c.cluster
            ),
        ));
    }
    check_member_name("name", &c.name, &mut out);
    if let Some(from) = &c.tags.replicatefrom {
        check_member_name("tags.replicatefrom", from, &mut out);
        if from == &c.name {
            out.push(Problem::new(
                "tags.replicatefrom",
                format!("names this member itself ({from:?}); name the member to stream from"),
            ));
        }
    }

    if c.etcd.endpoints.is_empty() {
        out.push(Problem::new(
            "etcd.endpoints",
            "needs at least one endpoint",
        ));
    }
    for (i, ep) in c.etcd.endpoints.iter().enumerate() {
        let path = format!("etcd.endpoints[{i}]");
        match ep
            .strip_prefix("http://")
            .or_else(|| ep.strip_prefix("https://"))
        {
            Some(rest) => check_address(&path, rest.trim_end_matches('/'), &mut out),
            None => out.push(Problem::new(
                path,
                format!("{ep:?} must start with http:// or https://"),
            )),
        }
    }
    if c.etcd.username.is_some() != c.etcd.password.is_some() {
        out.push(Problem::new(
            "etcd",
            "username and password must be given together",
        ));
    }
    if c.etcd.cert.is_some() != c.etcd.key.is_some() {
        out.push(Problem::new("etcd", "cert and key must be given together"));
    }
    for (key, p) in [
        ("ca", &c.etcd.ca),
        ("cert", &c.etcd.cert),
        ("key", &c.etcd.key),
    ] {
        if let Some(p) = p {
            if !p.is_absolute() {
                out.push(Problem::new(
                    format!("etcd.{key}"),
                    "must be an absolute path",
                ));
            }
        }
    }

    check_address("api.listen", &c.api.listen, &mut out);
    match (&c.api.tls, c.api.plaintext) {
        (None, false) => out.push(Problem::new(
            "api.tls",
            "TLS is required: set api.tls.cert and api.tls.key, or api.plaintext: true to serve plain text on a private network",
        )),
        (Some(_), true) => out.push(Problem::new(
            "api.plaintext",
            "cannot be true together with api.tls",
        )),
        _ => {}
    }
    if let Some(tls) = &c.api.tls {
        check_tls("api.tls", tls, &mut out);
    }
    match (&c.api.http_tls, &c.api.http_listen, &c.api.tls) {
        (None, _, _) => {}
        (Some(_), None, _) => out.push(Problem::new(
            "api.http_tls",
            "has no effect without api.http_listen",
        )),
        (Some(HttpTls::Enabled(true)), Some(_), None) => out.push(Problem::new(
            "api.http_tls",
            "true means the api.tls certificate, but api.tls is not set: give http_tls its own {cert, key}, or leave it out",
        )),
        (Some(HttpTls::Own(tls)), Some(_), _) => check_tls("api.http_tls", tls, &mut out),
        (Some(HttpTls::Enabled(_)), Some(_), _) => {}
    }
    if c.api.auth_token.is_some() && c.api.auth_token_file.is_some() {
        out.push(Problem::new(
            "api.auth_token",
            "give either api.auth_token or api.auth_token_file, not both",
        ));
    }
    if let Some(t) = &c.api.auth_token {
        if t.len() < 16 || t.chars().any(|ch| ch.is_whitespace()) {
            out.push(Problem::new(
                "api.auth_token",
                "must be at least 16 characters without whitespace",
            ));
        }
    }
    if let Some(p) = &c.api.auth_token_file {
        if !p.is_absolute() {
            out.push(Problem::new(
                "api.auth_token_file",
                "must be an absolute path",
            ));
        }
    }
    if let Some(a) = &c.api.http_auth {
        if a.username.is_empty() || a.username.contains(':') {
            out.push(Problem::new(
                "api.http_auth.username",
                "must be a user name without a colon (HTTP basic authentication joins name:password)",
            ));
        }
        if a.password.len() < 8 {
            out.push(Problem::new(
                "api.http_auth.password",
                "must be at least 8 characters",
            ));
        }
        if c.api.http_listen.is_none() {
            out.push(Problem::new(
                "api.http_auth",
                "has no effect without api.http_listen",
            ));
        }
    }
    check_address("api.connect_address", &c.api.connect_address, &mut out);
    if let Some(http) = &c.api.http_listen {
        check_address("api.http_listen", http, &mut out);
        if *http == c.api.listen {
            out.push(Problem::new(
                "api.http_listen",
                "must differ from api.listen (gRPC and HTTP are two listeners)",
            ));
        }
    }
    check_address("postgres.listen", &c.postgres.listen, &mut out);
    check_address(
        "postgres.connect_address",
        &c.postgres.connect_address,
        &mut out,
    );
    if !c.postgres.data_dir.is_absolute() {
        out.push(Problem::new(
            "postgres.data_dir",
            format!("{:?} must be an absolute path", c.postgres.data_dir),
        ));
    }
    if c.postgres.data_dir.parent().is_none() {
        out.push(Problem::new(
            "postgres.data_dir",
            "must not be the root directory",
        ));
    }
    if let Some(b) = &c.postgres.bin_dir {
        if !b.is_absolute() {
            out.push(Problem::new("postgres.bin_dir", "must be an absolute path"));
        }
    }
    if let Some(p) = &c.postgres.pgpass {
        if !p.is_absolute() {
            out.push(Problem::new("postgres.pgpass", "must be an absolute path"));
        }
    }
    if c.postgres.os_user.is_empty() {
        out.push(Problem::new("postgres.os_user", "must not be empty"));
    }
    check_range(
        "postgres.command_timeout",
        c.postgres.command_timeout,
        bounds::COMMAND_TIMEOUT,
        "s",
        &mut out,
    );
    check_credentials("postgres.superuser", &c.postgres.superuser, &mut out);
    check_credentials("postgres.replication", &c.postgres.replication, &mut out);
    if c.postgres.superuser.username == c.postgres.replication.username {
        out.push(Problem::new(
            "postgres.replication.username",
            "must differ from postgres.superuser.username",
        ));
    }
    check_parameters("postgres.parameters", &c.postgres.parameters, &mut out);
    const HBA_TYPES: &[&str] = &[
        "local",
        "host",
        "hostssl",
        "hostnossl",
        "hostgssenc",
        "hostnogssenc",
    ];
    for (i, line) in c.postgres.pg_hba.iter().enumerate() {
        let first = line.split_whitespace().next().unwrap_or("");
        if !HBA_TYPES.contains(&first) || line.contains(['\n', '\r']) {
            out.push(Problem::new(
                format!("postgres.pg_hba[{i}]"),
                format!(
                    "{line:?} is not a pg_hba.conf line (it must start with one of {HBA_TYPES:?})"
                ),
            ));
        }
    }

    for (key, command) in c.callbacks.commands() {
        if let Some(command) = command {
            if command.split_whitespace().next().is_none() {
                out.push(Problem::new(
                    format!("callbacks.{key}"),
                    "must name a program (leave the key out for no callback)",
                ));
            }
        }
    }
    check_range(
        "callbacks.timeout",
        c.callbacks.timeout,
        bounds::CALLBACK_TIMEOUT,
        "s",
        &mut out,
    );
    out.extend(dynamic(&c.bootstrap.dcs, "bootstrap.dcs"));
    for (i, opt) in c.bootstrap.initdb.iter().enumerate() {
        let names: Vec<&str> = match opt {
            crate::InitdbOption::Flag(f) => vec![f.as_str()],
            crate::InitdbOption::Value(m) => m.keys().map(|k| k.as_str()).collect(),
        };
        for n in names {
            if matches!(
                n,
                "pgdata" | "D" | "username" | "U" | "pwfile" | "pwprompt" | "W" | "waldir" | "X"
            ) {
                out.push(Problem::new(
                    format!("bootstrap.initdb[{i}]"),
                    format!("{n:?} is set by pgherd from postgres.data_dir and postgres.superuser"),
                ));
            } else if n.is_empty() || !n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                out.push(Problem::new(
                    format!("bootstrap.initdb[{i}]"),
                    format!("{n:?} is not an initdb option name"),
                ));
            }
        }
    }
    if let Some(b) = &c.backup {
        b.validate(&mut out);
    }
    crate::backup::validate_bootstrap(&c.bootstrap, &c.cluster, &mut out);
    for (old, new) in &c.postgres.tablespace_map {
        if !old.is_absolute() || !new.is_absolute() {
            out.push(Problem::new(
                "postgres.tablespace_map",
                format!(
                    "{} -> {}: both must be absolute paths",
                    old.display(),
                    new.display()
                ),
            ));
        }
    }
    out
}
