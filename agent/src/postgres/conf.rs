//! The files pgherd manages in the data directory: `postgresql.conf` (which includes the
//! original as `postgresql.base.conf`), `pg_hba.conf`, `standby.signal`, and the pgpass file
//! beside the data directory. Pure text generation, tested without PostgreSQL.

use std::collections::BTreeMap;

use pgherd_config::{Config, ParamValue};

use super::version::Major;
use crate::ha::Upstream;

/// Parameters every member needs for streaming replication and pg_rewind; the cluster's
/// and the member's own parameters override them.
const BASE_PARAMETERS: &[(&str, &str)] = &[
    ("wal_level", "replica"),
    ("hot_standby", "on"),
    ("max_wal_senders", "10"),
    ("max_replication_slots", "10"),
    ("wal_log_hints", "on"),
    ("wal_keep_size", "128MB"),
    ("hot_standby_feedback", "on"),
    ("password_encryption", "scram-sha-256"),
    // Retry a failed replication connection after 1 s, not 5 s: after a failover the new
    // leader may create our slot a moment after we point at it.
    ("wal_retrieve_retry_interval", "1s"),
];

/// Parameters that PostgreSQL added or removed between the majors the agent runs (15 to 18,
/// `super::version`): name, first major that has it, first major that no longer has it
/// (0: still there). A parameter a major does not know stops its postmaster ("unrecognized
/// configuration parameter"), so one set cluster-wide for another major (during an upgrade,
/// or `io_method` on a cluster still on 17) is left out of that member's postgresql.conf.
/// Checked against `postgres --describe-config` (and `-C` for developer options) of 15.18,
/// 17.12 and 18.6, and the release notes of 16; a unit test checks it against the installed
/// PostgreSQL.
const PARAMETER_MAJORS: &[(&str, u32, u32)] = &[
    // Gone in 16.
    ("force_parallel_mode", 0, 16),
    ("promote_trigger_file", 0, 16),
    ("vacuum_defer_cleanup_age", 0, 16),
    // New in 16.
    ("createrole_self_grant", 16, 0),
    ("debug_io_direct", 16, 0),
    ("debug_parallel_query", 16, 0),
    ("enable_presorted_aggregate", 16, 0),
    ("gss_accept_delegation", 16, 0),
    ("icu_validation_level", 16, 0),
    ("max_parallel_apply_workers_per_subscription", 16, 0),
    ("reserved_connections", 16, 0),
    ("scram_iterations", 16, 0),
    ("send_abort_for_crash", 16, 0),
    ("send_abort_for_kill", 16, 0),
    ("vacuum_buffer_usage_limit", 16, 0),
    // Gone in 17.
    ("db_user_namespace", 0, 17),
    ("old_snapshot_threshold", 0, 17),
    ("trace_recovery_messages", 0, 17),
    // New in 17: WAL summaries for incremental backups, slot synchronisation, SLRU sizes.
    ("allow_alter_system", 17, 0),
    ("commit_timestamp_buffers", 17, 0),
    ("enable_group_by_reordering", 17, 0),
    ("event_triggers", 17, 0),
    ("io_combine_limit", 17, 0),
    ("max_notify_queue_pages", 17, 0),
    ("multixact_member_buffers", 17, 0),
    ("multixact_offset_buffers", 17, 0),
    ("notify_buffers", 17, 0),
    ("serializable_buffers", 17, 0),
    ("subtransaction_buffers", 17, 0),
    ("summarize_wal", 17, 0),
    ("sync_replication_slots", 17, 0),
    ("synchronized_standby_slots", 17, 0),
    ("trace_connection_negotiation", 17, 0),
    ("transaction_buffers", 17, 0),
    ("transaction_timeout", 17, 0),
    ("wal_summary_keep_time", 17, 0),
    // New in 18: asynchronous I/O and more.
    ("autovacuum_vacuum_max_threshold", 18, 0),
    ("autovacuum_worker_slots", 18, 0),
    ("enable_distinct_reordering", 18, 0),
    ("enable_self_join_elimination", 18, 0),
    ("extension_control_path", 18, 0),
    ("file_copy_method", 18, 0),
    ("idle_replication_slot_timeout", 18, 0),
    ("io_max_combine_limit", 18, 0),
    ("io_max_concurrency", 18, 0),
    ("io_method", 18, 0),
    ("io_workers", 18, 0),
    ("log_lock_failures", 18, 0),
    ("max_active_replication_origins", 18, 0),
    ("md5_password_warnings", 18, 0),
    ("oauth_validator_libraries", 18, 0),
    ("ssl_groups", 18, 0),
    ("ssl_tls13_ciphers", 18, 0),
    ("track_cost_delay_timing", 18, 0),
    ("vacuum_max_eager_freeze_failure_rate", 18, 0),
    ("vacuum_truncate", 18, 0),
];

/// Why `major` does not know parameter `name`; `None` when it does (or the agent does not
/// know of a change: PostgreSQL then says what it thinks).
pub fn unknown_parameter(name: &str, major: Major) -> Option<String> {
    let (_, since, until) = PARAMETER_MAJORS.iter().find(|(n, _, _)| *n == name)?;
    if *since != 0 && !major.at_least(*since) {
        return Some(format!(
            "{name} exists from PostgreSQL {since} on and this member runs {major}"
        ));
    }
    if *until != 0 && major.at_least(*until) {
        return Some(format!(
            "{name} was removed in PostgreSQL {until} and this member runs {major}"
        ));
    }
    None
}

/// Removes from `params` what `major` does not know; returns why, one line per parameter.
pub fn keep_known(params: &mut BTreeMap<String, String>, major: Major) -> Vec<String> {
    let mut why = Vec::new();
    params.retain(|name, _| match unknown_parameter(name, major) {
        Some(w) => {
            why.push(w);
            false
        }
        None => true,
    });
    why
}

/// Quotes a value for postgresql.conf.
fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

/// Quotes a value inside a libpq connection string.
fn conninfo_quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// `listen_addresses` and `port` from `postgres.listen`.
pub fn listen_parts(cfg: &Config) -> (String, u16) {
    pgherd_config::split_host_port(&cfg.postgres.listen)
        .expect("postgres.listen was validated as host:port")
}

/// The `primary_conninfo` for streaming from `up`; the password comes from the pgpass file.
pub fn primary_conninfo(cfg: &Config, up: &Upstream) -> String {
    format!(
        "host={} port={} user={} passfile={} application_name={} {} connect_timeout=3",
        conninfo_quote(&up.host),
        up.port,
        conninfo_quote(&cfg.postgres.replication.username),
        conninfo_quote(&cfg.pgpass_path().to_string_lossy()),
        conninfo_quote(&cfg.name),
        super::tls::conninfo_options(cfg),
    )
}

/// The effective parameters: pgherd's base, then the cluster's (`cluster_params`), then the
/// member's own, then what pgherd derives and manages itself.
pub fn parameters(
    cfg: &Config,
    cluster_params: &BTreeMap<String, ParamValue>,
    upstream: Option<&Upstream>,
    managed: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut p: BTreeMap<String, String> = BASE_PARAMETERS
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for (k, v) in cluster_params.iter().chain(cfg.postgres.parameters.iter()) {
        p.insert(k.clone(), v.to_string());
    }
    let (host, port) = listen_parts(cfg);
    p.insert("listen_addresses".into(), host);
    p.insert("port".into(), port.to_string());
    p.insert("cluster_name".into(), cfg.name.clone());
    p.insert("recovery_target_timeline".into(), "latest".into());
    if let Some(up) = upstream {
        let mut conninfo = primary_conninfo(cfg, up);
        // PostgreSQL 17's slot synchronisation connects to a database of the primary.
        if p.get("sync_replication_slots").map(String::as_str) == Some("on") {
            conninfo.push_str(" dbname=postgres");
        }
        p.insert("primary_conninfo".into(), conninfo);
        match &up.remote {
            // A standby leader streams from another cluster with the slot that cluster keeps
            // for it (or none); it never names a slot after itself there.
            Some(sc) => {
                if let Some(slot) = &sc.primary_slot_name {
                    p.insert("primary_slot_name".into(), slot.clone());
                }
                if let Some(delay) = &sc.recovery_min_apply_delay {
                    p.insert("recovery_min_apply_delay".into(), delay.to_string());
                }
            }
            None => {
                p.insert("primary_slot_name".into(), cfg.name.clone());
            }
        }
    }
    // Archiving and recovery settings pgherd manages itself (see `archiving`).
    for (k, v) in managed {
        p.insert(k.clone(), v.clone());
    }
    // The standby cluster's restore_command runs code as the postgres user: only where the
    // member's own file trusts the cluster-wide configuration with it.
    if let Some(cmd) = upstream
        .and_then(|u| u.remote.as_ref())
        .and_then(|sc| sc.restore_command.as_ref())
        .filter(|_| cfg.postgres.trust_cluster_restore_command)
    {
        p.insert("restore_command".into(), cmd.clone());
    }
    p.extend(super::tls::server_parameters(cfg));
    p
}

/// With a `backup` section: every member archives (so archiving goes on after a failover)
/// through `pgherd-agent wal-push`, and can fetch archived WAL with `wal-fetch`, both given
/// the WAL settings file (`settings_file`, no secrets in it), not the member's configuration.
pub fn archiving(agent_exe: &str, settings_file: &str) -> BTreeMap<String, String> {
    let mut p = BTreeMap::new();
    p.insert("archive_mode".to_string(), "on".to_string());
    p.insert(
        "archive_command".to_string(),
        wal_command(agent_exe, settings_file, "wal-push", "%p"),
    );
    p.insert(
        "restore_command".to_string(),
        wal_command(agent_exe, settings_file, "wal-fetch", "%f %p"),
    );
    p
}

/// `<agent_exe> <subcommand> --config <settings_file> <args>`, quoted for the shell
/// PostgreSQL runs archive and restore commands through.
pub fn wal_command(agent_exe: &str, settings_file: &str, subcommand: &str, args: &str) -> String {
    let q = super::command::shell_quote;
    format!(
        "{} {subcommand} --config {} {args}",
        q(agent_exe),
        q(settings_file)
    )
}

pub fn postgresql_conf(params: &BTreeMap<String, String>) -> String {
    let mut s = String::from(
        "# Written by pgherd on every start; edits here are lost.\n\
         # Cluster-wide parameters: bootstrap.dcs.postgresql.parameters (etcd config);\n\
         # this member's: postgres.parameters in its pgherd config file.\n\
         include_if_exists 'postgresql.base.conf'\n",
    );
    for (k, v) in params {
        s.push_str(&format!("{k} = {}\n", quote(v)));
    }
    s
}

pub fn pg_hba_conf(cfg: &Config) -> String {
    let su = &cfg.postgres.superuser.username;
    let repl = &cfg.postgres.replication.username;
    // `hostssl` with postgres.tls: other members' password exchanges only over TLS.
    let host = super::tls::hba_type(cfg);
    let mut s = String::from(
        "# Written by pgherd on every start; add lines with postgres.pg_hba in its config.\n",
    );
    for line in &cfg.postgres.pg_hba {
        s.push_str(line);
        s.push('\n');
    }
    s.push_str(&format!(
        "# pgherd: the agent, replication between members, and pg_rewind.\n\
         local all all scram-sha-256\n\
         host all all 127.0.0.1/32 scram-sha-256\n\
         host all all ::1/128 scram-sha-256\n\
         {host} replication {repl} 0.0.0.0/0 scram-sha-256\n\
         {host} replication {repl} ::/0 scram-sha-256\n\
         {host} all {su} 0.0.0.0/0 scram-sha-256\n\
         {host} all {su} ::/0 scram-sha-256\n"
    ));
    s
}

/// Escapes `:` and `\` as the pgpass format requires.
fn pgpass_field(s: &str) -> String {
    s.replace('\\', "\\\\").replace(':', "\\:")
}

pub fn pgpass(cfg: &Config) -> String {
    let mut s = String::new();
    for c in [&cfg.postgres.replication, &cfg.postgres.superuser] {
        s.push_str(&format!(
            "*:*:*:{}:{}\n",
            pgpass_field(&c.username),
            pgpass_field(&c.password)
        ));
    }
    s
}

/// The SCRAM-SHA-256 verifier of `password`, as PostgreSQL stores it in `pg_authid`:
/// `SCRAM-SHA-256$4096:<salt>$<StoredKey>:<ServerKey>` (RFC 5802/7677: PBKDF2-HMAC-SHA-256
/// over the SASLprep'd password with a random 16-byte salt and 4096 iterations), computed
/// as libpq's `PQencryptPasswordConn` does, by the crate tokio-postgres authenticates with.
/// PostgreSQL stores a verifier given as a password as it is, so the roles' passwords are
/// set without the cleartext ever reaching the server, its statement log or
/// `pg_stat_activity` (issue 13 item 11).
pub fn scram_verifier(password: &str) -> String {
    postgres_protocol::password::scram_sha_256(password.as_bytes())
}

/// SQL literal (utility statements such as `CREATE ROLE ... PASSWORD` take no bind
/// parameters).
pub fn sql_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// SQL identifier.
pub fn sql_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        pgherd_config::parse(include_str!("../../../config/examples/minimal.yml")).unwrap()
    }

    #[test]
    fn managed_parameters_win_and_local_overrides_cluster() {
        let mut c = cfg();
        c.postgres
            .parameters
            .insert("work_mem".into(), ParamValue::Text("8MB".into()));
        let cluster: BTreeMap<_, _> = [
            ("work_mem".to_string(), ParamValue::Text("4MB".into())),
            ("max_connections".to_string(), ParamValue::Int(50)),
        ]
        .into();
        let up = Upstream {
            name: "node1".into(),
            host: "10.0.0.1".into(),
            port: 5432,
            remote: None,
        };
        let p = parameters(&c, &cluster, Some(&up), &BTreeMap::new());
        assert_eq!(p["work_mem"], "8MB");
        assert_eq!(p["max_connections"], "50");
        assert_eq!(p["port"], "5433");
        assert_eq!(p["listen_addresses"], "127.0.0.1");
        assert_eq!(p["primary_slot_name"], "node2");
        assert!(p["primary_conninfo"].contains("application_name='node2'"));
        assert!(p["primary_conninfo"].contains("passfile='/var/lib/pgherd/node2/data.pgpass'"));
        assert!(
            !p["primary_conninfo"].contains("change-me"),
            "no password in conninfo"
        );
        assert!(!parameters(&c, &cluster, None, &BTreeMap::new()).contains_key("primary_conninfo"));
        assert!(!p["primary_conninfo"].contains("dbname"));
        // PostgreSQL 17's slot synchronisation needs a database in primary_conninfo.
        let mut synced = cluster.clone();
        synced.insert(
            "sync_replication_slots".to_string(),
            ParamValue::Text("on".into()),
        );
        let p = parameters(&c, &synced, Some(&up), &BTreeMap::new());
        assert!(
            p["primary_conninfo"].ends_with(" dbname=postgres"),
            "{}",
            p["primary_conninfo"]
        );
    }

    #[test]
    fn a_standby_leader_streams_with_the_sections_slot_delay_and_trusted_restore_command() {
        let mut c = cfg();
        let sc = pgherd_config::StandbyCluster {
            host: "dr.example".into(),
            port: 6432,
            primary_slot_name: Some("dr_site".into()),
            restore_command: Some("cp /archive/%f %p".into()),
            create_replica_methods: vec![pgherd_config::ReplicaMethod::Basebackup],
            recovery_min_apply_delay: Some(ParamValue::Text("5min".into())),
            repository: None,
            cluster: None,
        };
        let up = Upstream::remote(&sc);
        let managed: BTreeMap<String, String> =
            [("restore_command".to_string(), "wal-fetch".to_string())].into();
        let p = parameters(&c, &BTreeMap::new(), Some(&up), &managed);
        assert_eq!(up.name, "dr.example:6432");
        assert_eq!(p["primary_slot_name"], "dr_site");
        assert_eq!(p["recovery_min_apply_delay"], "5min");
        assert!(p["primary_conninfo"].contains("host='dr.example' port=6432"));
        // Not trusted by this member's file: the section's command does not run here.
        assert_eq!(p["restore_command"], "wal-fetch");
        c.postgres.trust_cluster_restore_command = true;
        let p = parameters(&c, &BTreeMap::new(), Some(&up), &managed);
        assert_eq!(p["restore_command"], "cp /archive/%f %p");
        // Without a slot in the section none is named (never the member's own name there),
        // and a member's upstream inside the cluster has no delay.
        let no_slot = Upstream::remote(&pgherd_config::StandbyCluster {
            primary_slot_name: None,
            ..sc
        });
        let p = parameters(&c, &BTreeMap::new(), Some(&no_slot), &BTreeMap::new());
        assert!(!p.contains_key("primary_slot_name"), "{p:?}");
        let member = Upstream {
            name: "node1".into(),
            host: "10.0.0.1".into(),
            port: 5432,
            remote: None,
        };
        let p = parameters(&c, &BTreeMap::new(), Some(&member), &BTreeMap::new());
        assert!(!p.contains_key("recovery_min_apply_delay"));
    }

    #[test]
    fn values_are_quoted_for_postgresql_conf() {
        let p: BTreeMap<_, _> = [("application_name".to_string(), "it's".to_string())].into();
        assert!(postgresql_conf(&p).contains("application_name = 'it''s'\n"));
    }

    /// HMAC-SHA-256 (RFC 2104), written out here so the verifier is checked against the
    /// RFC rather than against the crate that computed it.
    fn hmac(key: &[u8], msg: &[u8]) -> Vec<u8> {
        use sha2::{Digest, Sha256};
        let mut k = [0u8; 64];
        if key.len() > 64 {
            k[..32].copy_from_slice(&Sha256::digest(key));
        } else {
            k[..key.len()].copy_from_slice(key);
        }
        let pad = |b: u8| k.iter().map(|x| x ^ b).collect::<Vec<u8>>();
        let inner = Sha256::new()
            .chain_update(pad(0x36))
            .chain_update(msg)
            .finalize();
        Sha256::new()
            .chain_update(pad(0x5c))
            .chain_update(inner)
            .finalize()
            .to_vec()
    }

    #[test]
    fn scram_verifiers_follow_rfc_5802_with_a_fresh_salt() {
        use base64::Engine;
        use sha2::{Digest, Sha256};
        let b64 = base64::engine::general_purpose::STANDARD;
        let password = "s3cret:with'quote";
        let v = scram_verifier(password);
        let rest = v.strip_prefix("SCRAM-SHA-256$4096:").expect(&v);
        let (salt, keys) = rest.split_once('$').expect(&v);
        let (stored, server) = keys.split_once(':').expect(&v);
        let salt = b64.decode(salt).unwrap();
        assert_eq!(salt.len(), 16);
        // PBKDF2-HMAC-SHA-256, one block: U1 = HMAC(p, salt || 1), Ui = HMAC(p, Ui-1).
        let mut u = hmac(
            password.as_bytes(),
            &[salt.as_slice(), &[0, 0, 0, 1]].concat(),
        );
        let mut salted = u.clone();
        for _ in 1..4096 {
            u = hmac(password.as_bytes(), &u);
            salted.iter_mut().zip(&u).for_each(|(s, x)| *s ^= x);
        }
        let client_key = hmac(&salted, b"Client Key");
        assert_eq!(
            b64.decode(stored).unwrap(),
            Sha256::digest(&client_key).to_vec()
        );
        assert_eq!(b64.decode(server).unwrap(), hmac(&salted, b"Server Key"));
        assert!(!v.contains(password));
        assert_ne!(
            scram_verifier(password),
            v,
            "each verifier has its own salt"
        );
        // Nothing in it needs quoting in SQL or in initdb's password file.
        assert!(!v.contains(['\'', '\\', '\n']));
    }

    #[test]
    fn pgpass_escapes_separators() {
        let mut c = cfg();
        c.postgres.replication.password = "a:b\\c".into();
        assert!(pgpass(&c).starts_with("*:*:*:replicator:a\\:b\\\\c\n"));
    }

    #[test]
    fn user_hba_lines_come_first() {
        let mut c = cfg();
        c.postgres.pg_hba = vec!["host all all 10.0.0.0/8 md5".into()];
        let hba = pg_hba_conf(&c);
        let user = hba.find("10.0.0.0/8").unwrap();
        let ours = hba.find("replication replicator").unwrap();
        assert!(user < ours);
    }

    #[test]
    fn parameters_a_major_does_not_know_are_left_out_saying_why() {
        let mut params: BTreeMap<String, String> = [
            ("io_method", "worker"),
            ("sync_replication_slots", "on"),
            ("old_snapshot_threshold", "-1"),
            ("shared_buffers", "128MB"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let on = |major: u32| {
            let mut p = params.clone();
            let why = keep_known(&mut p, Major::new(major));
            (p.into_keys().collect::<Vec<_>>(), why)
        };
        let (kept, why) = on(15);
        assert_eq!(kept, ["old_snapshot_threshold", "shared_buffers"]);
        assert_eq!(
            why,
            [
                "io_method exists from PostgreSQL 18 on and this member runs PostgreSQL 15",
                "sync_replication_slots exists from PostgreSQL 17 on and this member runs PostgreSQL 15"
            ]
        );
        let (kept, why) = on(17);
        assert_eq!(kept, ["shared_buffers", "sync_replication_slots"]);
        assert!(why.contains(
            &"old_snapshot_threshold was removed in PostgreSQL 17 and this member runs PostgreSQL 17"
                .to_string()
        ));
        let (kept, _) = on(18);
        assert_eq!(
            kept,
            ["io_method", "shared_buffers", "sync_replication_slots"]
        );
        // The parameters pgherd itself always writes exist in every major it runs.
        for (name, _) in BASE_PARAMETERS {
            for major in 15..=18 {
                assert_eq!(unknown_parameter(name, Major::new(major)), None, "{name}");
            }
        }
        params.clear();
        assert!(keep_known(&mut params, Major::new(15)).is_empty());
    }

    /// The table agrees with the installed PostgreSQL (15 on the development host; 17 and
    /// 18 where the test images run this): every parameter it lists is known to that major
    /// exactly when the table says so. Developer options are left out of
    /// `--describe-config`, so they are checked by hand (docs/architecture.md).
    #[test]
    fn the_parameter_table_agrees_with_the_installed_postgresql() {
        let bin = super::super::find_bin_dir(None);
        if !bin.join("postgres").exists() {
            return;
        }
        let user = super::super::command::OsUser::current();
        let major = super::super::version::binaries_major(&bin, &user).unwrap();
        let out = std::process::Command::new(bin.join("postgres"))
            .arg("--describe-config")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let described: std::collections::BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split('\t').next())
            .map(str::to_string)
            .collect();
        assert!(described.contains("wal_level"), "{described:?}");
        let developer = |n: &str| {
            n.starts_with("debug_")
                || n.starts_with("trace_")
                || n.starts_with("send_abort_")
                || n == "force_parallel_mode"
        };
        for (name, _, _) in PARAMETER_MAJORS.iter().filter(|(n, _, _)| !developer(n)) {
            assert_eq!(
                unknown_parameter(name, major).is_none(),
                described.contains(*name),
                "{name} on {major}"
            );
        }
    }
}
