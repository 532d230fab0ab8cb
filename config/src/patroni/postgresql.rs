//! `postgresql` (with `authentication` and `callbacks`) to `postgres` and `callbacks`.

use serde_yaml::{Mapping, Value};

use super::{key_text, known_reason, put, with_host, Section, Walk};

impl Walk {
    /// `postgresql` (and `authentication`, `callbacks`) to `postgres` and `callbacks`; the
    /// member-level settings pgherd has only cluster-wide go into `dcs` when it lacks them.
    pub(super) fn postgresql(
        &mut self,
        top: &mut Section,
        dcs: &mut Mapping,
    ) -> (Mapping, Mapping) {
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
    pub(super) fn replica_methods(&mut self, s: &mut Section) -> Option<String> {
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

    /// A command pgherd can run (a program and arguments split at spaces), or `None` after
    /// reporting why not.
    pub(super) fn command(&mut self, s: &mut Section, key: &str) -> Option<String> {
        let cmd = self.string(s, key)?;
        if cmd.contains(['"', '\'', '\\', '$', '|', ';', '&', '>', '<', '`']) {
            self.report(
                s.at(key),
                "pgherd runs a callback as a program and arguments split at spaces, without a shell or quoting: this command needs one; not carried (wrap it in a script)",
            );
            return None;
        }
        Some(cmd.trim().to_string())
    }

    pub(super) fn callbacks(&mut self, s: &mut Section) -> Mapping {
        let mut out = Mapping::new();
        // Patroni's `postgresql.pre_promote` and `before_stop` are pgherd callbacks (waited
        // for, no arguments, as Patroni runs them).
        for key in ["pre_promote", "before_stop"] {
            if let Some(cmd) = self.command(s, key) {
                put(&mut out, key, cmd);
            }
        }
        let mut c = self.section(s, "callbacks");
        for key in [
            "on_start",
            "on_stop",
            "on_restart",
            "on_role_change",
            "on_reload",
        ] {
            if let Some(cmd) = self.command(&mut c, key) {
                put(&mut out, key, cmd);
            }
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
    pub(super) fn parameters(&mut self, s: &mut Section, key: &str) -> Mapping {
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
}
