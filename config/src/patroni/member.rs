//! The member's identity and its neighbours: `scope`, `name`, the etcd section, `restapi`
//! and `tags`.

use std::collections::BTreeSet;

use serde_yaml::{Mapping, Value};

use super::{
    known_reason, put, slot_name, with_host, Options, Section, Walk, API_PORT_OFFSET, OTHER_DCS,
};

impl Walk {
    /// The whole member file.
    pub(super) fn member(&mut self, map: &Mapping, opts: &Options) -> Mapping {
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
    pub(super) fn etcd(&mut self, top: &mut Section) -> Option<Mapping> {
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
    pub(super) fn restapi(&mut self, top: &mut Section, opts: &Options) -> Mapping {
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
        // Basic auth on the REST API's changing requests is api.http_auth, as Patroni's.
        let mut auth = self.section(&mut s, "authentication");
        let user = self.string(&mut auth, "username");
        let password = self.string(&mut auth, "password");
        match (user, password) {
            (Some(u), Some(p))
                if !u.is_empty() && !u.contains(':') && p.len() >= 8 && !p.contains(['\n', '\r']) =>
            {
                let mut basic = Mapping::new();
                put(&mut basic, "username", u);
                put(&mut basic, "password", p);
                put(&mut api, "http_auth", basic);
            }
            (None, None) => {}
            _ => self.report(
                auth.path.clone(),
                "pgherd's api.http_auth needs a user name without a colon and a password of at least 8 characters; not carried, so the REST API's changing requests need the bearer token (api.auth_token)",
            ),
        }
        self.header.push(
            "# No api.auth_token: pgherdctl's changing commands (switchover, pause, ...) are refused\n\
             # until every member's file has the same token (16 characters or more).\n"
                .to_string(),
        );
        self.rest(&auth);
        self.rest(&s);
        api
    }

    pub(super) fn tags(&mut self, top: &mut Section) -> Mapping {
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
        if let Some(v) = s.get("sync_priority") {
            match v.as_i64() {
                Some(n) => put(&mut out, "sync_priority", n),
                None => self.report(s.at("sync_priority"), "is not a number; not carried"),
            }
        }
        if let Some(r) = self.string(&mut s, "replicatefrom") {
            put(&mut out, "replicatefrom", slot_name(&r));
        }
        // Custom tags are kept as they are (shown by `pgherdctl list` and `/patroni`, matched
        // by `?tag_<name>=`).
        for key in s.keys() {
            if !s.taken.contains(&key) && known_reason(&s.at(&key)).is_none() {
                s.taken.insert(key.clone());
                if let Some(v) = s.get(&key).filter(|v| !v.is_null()) {
                    out.insert(Value::from(key.clone()), v.clone());
                }
            }
        }
        self.rest(&s);
        out
    }
}
