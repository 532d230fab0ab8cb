//! `bootstrap`: the cluster-wide `dcs` settings (slots, standby cluster included), initdb
//! and the bootstrap method.

use serde_yaml::{Mapping, Value};

use super::{key_text, parse_bool, put, Section, Walk};

impl Walk {
    /// `bootstrap.dcs` to `bootstrap.dcs`.
    pub(super) fn dcs(&mut self, s: &mut Section) -> Mapping {
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
        if let Some(v) = s.get("maximum_lag_on_syncnode") {
            match v.as_i64() {
                Some(n) => put(&mut out, "maximum_lag_on_syncnode", n),
                None => self.report(
                    s.at("maximum_lag_on_syncnode"),
                    "is not a number of bytes; not carried",
                ),
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

    pub(super) fn slots(&mut self, s: &mut Section) -> Option<Mapping> {
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

    pub(super) fn standby_cluster(&mut self, s: &mut Section) -> Option<Mapping> {
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
    pub(super) fn bootstrap(&mut self, s: &mut Section, out: &mut Mapping) {
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
        // Patroni's post_bootstrap (or its older name post_init) gets the superuser's
        // connection URL and PGPASSFILE, as pgherd's does.
        for key in ["post_bootstrap", "post_init"] {
            if let Some(cmd) = self.command(s, key) {
                put(out, "post_bootstrap", cmd);
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
}
