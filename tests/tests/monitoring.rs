//! docs/monitoring against the agent and promtool: every pgherd metric the Grafana
//! dashboard, the alert rules, their unit tests and the README name is one the agent's
//! `/metrics` exports, with the labels the queries select on; promtool accepts the rules,
//! passes their unit tests and parses every dashboard query. No cluster is started: the page
//! comes from the agent's own renderer, fed a board with every optional section filled.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use pgherd_agent::api::metrics;
use pgherd_agent::board::{BackupRun, BackupStatus, Board, LocalStatus, PgFacts};
use pgherd_agent::dcs::model::{
    ClusterView, LeaderKey, MemberInfo, MemberState, Role, SyncKey, VERSION,
};
use pgherd_agent::lsn::Lsn;
use pgherd_agent::slots::{Owner, SlotRow};
use tokio::time::Instant;

const DASHBOARD: &str = "pgherd-dashboard.json";
const RULES: &str = "pgherd-alerts.yml";
const RULE_TESTS: &str = "pgherd-alerts.test.yml";
const README: &str = "README.md";

/// Labels Prometheus adds to every scraped series (the scrape job and target).
const TARGET_LABELS: [&str; 2] = ["job", "instance"];

fn monitoring_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/monitoring")
}

fn read(file: &str) -> Result<String> {
    let path = monitoring_dir().join(file);
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

fn member(name: &str, role: Role, lag_bytes: Option<u64>) -> MemberInfo {
    MemberInfo {
        name: name.into(),
        role,
        state: MemberState::Running,
        api_address: "127.0.0.1:1".into(),
        host: "127.0.0.1".into(),
        port: 5432,
        timeline: Some(3),
        wal_lsn: None,
        receive_lsn: None,
        replay_lsn: None,
        lag_bytes,
        tags: Default::default(),
        version: VERSION.into(),
        system_identifier: None,
        decision: String::new(),
        pending_restart: true,
        upstream: None,
    }
}

/// A board on which every series of the page appears: `a` is the standby leader of a
/// standby cluster (its lag behind the remote source), `b` a replica with a lag, a slot,
/// and a backup and a verification run.
fn full_board(now: Instant) -> Result<Board> {
    let config = pgherd_config::DynamicConfig {
        standby_cluster: Some(
            serde_json::from_value(serde_json::json!({"host": "10.9.0.1", "port": 5432}))
                .context("a standby_cluster section")?,
        ),
        ..Default::default()
    };
    let me = member("a", Role::Leader, None);
    let view = ClusterView {
        leader: Some(LeaderKey {
            name: "a".into(),
            lease: 1,
        }),
        members: [
            ("a".to_string(), me.clone()),
            ("b".to_string(), member("b", Role::Replica, Some(4096))),
        ]
        .into_iter()
        .collect(),
        config: Some(Ok(config)),
        sync: Some(SyncKey {
            leader: "a".into(),
            members: vec!["b".into()],
            quorum: 1,
        }),
        ..Default::default()
    };
    let run = BackupRun {
        finished_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        success: true,
    };
    Ok(Board {
        cluster: "c".into(),
        me: Some(me.clone()),
        leader: Some("a".into()),
        members: view.members.values().cloned().collect(),
        paused: true,
        view: Some(view),
        local: Some(LocalStatus {
            at: now,
            loop_duration: Duration::from_millis(5),
            ttl: Duration::from_secs(10),
            leader_valid_until: Some(now + Duration::from_secs(9)),
            pg_running: true,
            pg: Some(PgFacts {
                in_recovery: true,
                streaming: true,
                replay_lsn: Some(Lsn(0x3000000)),
                latest_end_lsn: Some(Lsn(0x3000000 + 8192)),
            }),
            synchronous_mode: Default::default(),
        }),
        failovers: 1,
        switchovers: 1,
        backup: Some(BackupStatus {
            last_backup: Some(run.clone()),
            last_verify: Some(run),
        }),
        slots: vec![(
            SlotRow {
                name: "b".into(),
                kind: pgherd_config::SlotType::Physical,
                database: None,
                plugin: None,
                active: true,
                active_application: Some("b".into()),
                restart_lsn: None,
                confirmed_flush_lsn: None,
                retained_bytes: Some(16 << 20),
            },
            Owner::Member,
        )],
        ..Board::default()
    })
}

/// What the agent exports: each metric family (from the page's `# TYPE` lines) with the
/// label names its samples carry.
fn exported() -> Result<BTreeMap<String, BTreeSet<String>>> {
    let now = Instant::now();
    let page = metrics::render(&full_board(now)?, now);
    let mut families: BTreeMap<String, BTreeSet<String>> = page
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(|name| (name.to_string(), BTreeSet::new()))
        .collect();
    let scrape = prometheus_parse::Scrape::parse(page.lines().map(|l| Ok(l.to_string())))
        .context("the agent's /metrics page is not Prometheus text")?;
    for s in &scrape.samples {
        let labels = families.get_mut(&s.metric).with_context(|| {
            format!(
                "sample {} has no # TYPE line on the page:\n{page}",
                s.metric
            )
        })?;
        labels.extend(s.labels.keys().map(|k| k.to_string()));
    }
    ensure!(
        families.len() >= 20,
        "the page has only {} families; is the board missing a section?\n{page}",
        families.len()
    );
    Ok(families)
}

/// A pgherd metric named in an expression, with the label names its selector matches on.
#[derive(Debug)]
struct Selector {
    metric: String,
    labels: Vec<String>,
}

/// The names of an expression: pgherd metrics with their selectors' labels, and the labels
/// of `by`/`without`/`on`/`ignoring`/`group_left`/`group_right` clauses. A lexer, not a
/// parser (promtool parses): string literals, numbers and durations, and Grafana's
/// `$variables` are skipped so that nothing inside them reads as a name.
#[derive(Debug, Default)]
struct Names {
    selectors: Vec<Selector>,
    grouping: Vec<String>,
}

#[derive(Debug, PartialEq)]
enum Token {
    Ident(String),
    Punct(char),
}

fn lex(expr: &str) -> Vec<Token> {
    let chars: Vec<char> = expr.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                if chars[i] == '\\' && c != '`' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            tokens.push(Token::Punct('"'));
        } else if c == '$' {
            // $var, ${var}, $__range
            i += 1;
            if chars.get(i) == Some(&'{') {
                while i < chars.len() && chars[i] != '}' {
                    i += 1;
                }
                i += 1;
            } else {
                while i < chars.len() && word(chars[i]) {
                    i += 1;
                }
            }
        } else if c.is_ascii_digit() || c == '.' {
            while i < chars.len() && (word(chars[i]) || chars[i] == '.') {
                i += 1;
            }
        } else if word(c) {
            let start = i;
            while i < chars.len() && word(chars[i]) {
                i += 1;
            }
            tokens.push(Token::Ident(chars[start..i].iter().collect()));
        } else {
            if !c.is_whitespace() {
                tokens.push(Token::Punct(c));
            }
            i += 1;
        }
    }
    tokens
}

fn names(expr: &str) -> Names {
    let tokens = lex(expr);
    let mut out = Names::default();
    let mut i = 0;
    while i < tokens.len() {
        let Token::Ident(id) = &tokens[i] else {
            i += 1;
            continue;
        };
        i += 1;
        let opens = tokens.get(i) == Some(&Token::Punct('{'));
        let list = tokens.get(i) == Some(&Token::Punct('('));
        let mut labels = Vec::new();
        if opens || (list && GROUPING.contains(&id.as_str())) {
            let close = if opens { '}' } else { ')' };
            i += 1;
            // A label name is an identifier at the start of the list or after a comma.
            let mut expect_label = true;
            while i < tokens.len() && tokens[i] != Token::Punct(close) {
                match &tokens[i] {
                    Token::Ident(l) if expect_label => labels.push(l.clone()),
                    Token::Punct(',') => {
                        expect_label = true;
                        i += 1;
                        continue;
                    }
                    _ => {}
                }
                expect_label = false;
                i += 1;
            }
            i += 1;
        }
        if id.starts_with("pgherd_") {
            out.selectors.push(Selector {
                metric: id.clone(),
                labels,
            });
        } else if list && GROUPING.contains(&id.as_str()) {
            out.grouping.extend(labels);
        }
    }
    out
}

const GROUPING: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// `pgherd_…` words in prose (descriptions, annotations, the README): names only.
fn prose_names(text: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut out = BTreeSet::new();
    let mut from = 0;
    while let Some(at) = text[from..].find("pgherd_").map(|p| p + from) {
        let mut end = at;
        while end < bytes.len() && word(bytes[end]) {
            end += 1;
        }
        if (at == 0 || !word(bytes[at - 1])) && !text[at..end].ends_with('_') {
            out.insert(text[at..end].to_string());
        }
        from = end.max(at + 1);
    }
    out
}

/// Where a string sits in a document: an expression (checked with its labels) or prose.
enum Kind {
    Expression,
    Prose,
}

/// Every string of a JSON/YAML document with its path and kind: the values of `expr`
/// (panel targets, rules, promtool's expression tests), `series` (promtool's input series),
/// and a Grafana variable's `query`/`definition` are expressions; every other string is
/// prose. Grafana's `label_values(m{…}, label)` reads as a selector plus a name.
fn strings(v: &serde_json::Value, path: &str, out: &mut Vec<(String, Kind, String)>) {
    match v {
        serde_json::Value::String(s) => {
            let key = path.rsplit('.').next().unwrap_or_default();
            let kind = match key {
                "expr" | "series" | "query" | "definition" => Kind::Expression,
                _ => Kind::Prose,
            };
            out.push((path.to_string(), kind, s.clone()));
        }
        serde_json::Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                strings(item, &format!("{path}[{i}]"), out);
            }
        }
        serde_json::Value::Object(map) => {
            for (k, item) in map {
                strings(item, &format!("{path}.{k}"), out);
            }
        }
        _ => {}
    }
}

/// What `file` uses that the agent does not export, one line each.
fn problems(
    file: &str,
    doc: &serde_json::Value,
    exported: &BTreeMap<String, BTreeSet<String>>,
) -> Vec<String> {
    let mut found = Vec::new();
    strings(doc, "", &mut found);
    let mut wrong = Vec::new();
    let mut used = 0;
    for (path, kind, text) in found {
        match kind {
            Kind::Expression => {
                let n = names(&text);
                let mut known: BTreeSet<&str> = TARGET_LABELS.into_iter().collect();
                let mut all_known = true;
                for s in &n.selectors {
                    used += 1;
                    let Some(labels) = exported.get(&s.metric) else {
                        all_known = false;
                        wrong.push(format!(
                            "docs/monitoring/{file} {path}: {} is not a metric the agent exports",
                            s.metric
                        ));
                        continue;
                    };
                    known.extend(labels.iter().map(String::as_str));
                    for l in &s.labels {
                        if !labels.contains(l) && !TARGET_LABELS.contains(&l.as_str()) {
                            wrong.push(format!(
                                "docs/monitoring/{file} {path}: {} has no label {l} (it has {labels:?})",
                                s.metric
                            ));
                        }
                    }
                }
                // Grouping labels of an expression on pgherd series: some series must
                // carry them. (`up` and Grafana's label_values are not pgherd's.)
                if !n.selectors.is_empty() && all_known {
                    for l in &n.grouping {
                        if !known.contains(l.as_str()) {
                            wrong.push(format!(
                                "docs/monitoring/{file} {path}: groups by {l}, which none of its pgherd metrics has"
                            ));
                        }
                    }
                }
            }
            Kind::Prose => {
                for metric in prose_names(&text) {
                    if !exported.contains_key(&metric) {
                        wrong.push(format!(
                            "docs/monitoring/{file} {path}: {metric} is not a metric the agent exports"
                        ));
                    }
                }
            }
        }
    }
    if used == 0 {
        wrong.push(format!(
            "docs/monitoring/{file}: no pgherd metric found in its expressions"
        ));
    }
    wrong
}

#[test]
fn monitoring_docs_use_only_metrics_and_labels_the_agent_exports() -> Result<()> {
    let exported = exported()?;
    let dashboard: serde_json::Value =
        serde_json::from_str(&read(DASHBOARD)?).with_context(|| format!("parsing {DASHBOARD}"))?;
    let rules: serde_json::Value =
        serde_yaml::from_str(&read(RULES)?).with_context(|| format!("parsing {RULES}"))?;
    let tests: serde_json::Value = serde_yaml::from_str(&read(RULE_TESTS)?)
        .with_context(|| format!("parsing {RULE_TESTS}"))?;
    let mut wrong = Vec::new();
    wrong.extend(problems(DASHBOARD, &dashboard, &exported));
    wrong.extend(problems(RULES, &rules, &exported));
    wrong.extend(problems(RULE_TESTS, &tests, &exported));
    for metric in prose_names(&read(README)?) {
        if !exported.contains_key(&metric) {
            wrong.push(format!(
                "docs/monitoring/{README}: {metric} is not a metric the agent exports"
            ));
        }
    }
    ensure!(
        wrong.is_empty(),
        "docs/monitoring uses what the agent does not export:\n{}\nexported: {:?}",
        wrong.join("\n"),
        exported
    );
    Ok(())
}

#[test]
fn the_lexer_finds_metrics_labels_and_groupings_but_not_strings_or_variables() {
    let n = names(
        r#"sum by (cluster) (pgherd_role{cluster=~"$cluster", role="primary"}) * on (cluster, member) group_left pgherd_x{a!~"pgherd_not_me"}[$__rate_interval] > 16 * 1024 and up{job="pgherd"}"#,
    );
    let got: Vec<(&str, Vec<&str>)> = n
        .selectors
        .iter()
        .map(|s| {
            (
                s.metric.as_str(),
                s.labels.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("pgherd_role", vec!["cluster", "role"]),
            ("pgherd_x", vec!["a"])
        ]
    );
    assert_eq!(n.grouping, vec!["cluster", "cluster", "member"]);
    assert_eq!(
        prose_names("see pgherd_role and `pgherd_*`, not mypgherd_x"),
        ["pgherd_role".to_string()].into_iter().collect()
    );
}

/// promtool from `PGHERD_PROMTOOL`, the PATH, or Debian's `/usr/bin/promtool`.
fn promtool() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("PGHERD_PROMTOOL") {
        return Ok(PathBuf::from(p));
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("promtool"))
                .find(|p| p.is_file())
        })
        .unwrap_or_default();
    match on_path {
        Some(p) => Ok(p),
        None if Path::new("/usr/bin/promtool").is_file() => Ok("/usr/bin/promtool".into()),
        None => bail!(
            "promtool not found (PATH, /usr/bin, PGHERD_PROMTOOL): run scripts/install-deps, which installs Debian's prometheus package for it"
        ),
    }
}

/// Runs promtool with `args` in `dir`; fails with its output unless it exits 0.
fn run_promtool(dir: &Path, args: &[&str]) -> Result<String> {
    let tool = promtool()?;
    let out = Command::new(&tool)
        .args(args)
        .current_dir(dir)
        .output()
        .with_context(|| format!("running {} {}", tool.display(), args.join(" ")))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success(),
        "{} {} in {} failed ({}):\n{text}",
        tool.display(),
        args.join(" "),
        dir.display(),
        out.status
    );
    Ok(text)
}

#[test]
fn promtool_accepts_the_rules_passes_their_tests_and_parses_the_dashboard_queries() -> Result<()> {
    let dir = monitoring_dir();
    let check = run_promtool(&dir, &["check", "rules", RULES])?;
    ensure!(check.contains("SUCCESS"), "promtool check rules:\n{check}");
    let test = run_promtool(&dir, &["test", "rules", RULE_TESTS])?;
    ensure!(test.contains("SUCCESS"), "promtool test rules:\n{test}");

    // Each panel query as a recording rule, Grafana's variables replaced by what they
    // expand to, so that promtool parses it as Prometheus will.
    let dashboard: serde_json::Value =
        serde_json::from_str(&read(DASHBOARD)?).with_context(|| format!("parsing {DASHBOARD}"))?;
    let mut found = Vec::new();
    strings(&dashboard, "", &mut found);
    let rules: Vec<serde_json::Value> = found
        .iter()
        .filter(|(path, _, _)| path.ends_with(".expr"))
        .enumerate()
        .map(|(i, (_, _, expr))| {
            let expr = expr
                .replace("$cluster", ".*")
                .replace("$member", ".*")
                .replace("$__rate_interval", "1m")
                .replace("$__range", "6h");
            serde_json::json!({"record": format!("dashboard:query_{i}"), "expr": expr})
        })
        .collect();
    ensure!(!rules.is_empty(), "{DASHBOARD} has no panel queries");
    let tmp = tempfile::tempdir()?;
    let file = tmp.path().join("dashboard-queries.yml");
    let doc = serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]});
    std::fs::write(&file, serde_yaml::to_string(&doc)?)?;
    let parsed = run_promtool(tmp.path(), &["check", "rules", "dashboard-queries.yml"])
        .with_context(|| format!("a query of {DASHBOARD} is not valid PromQL"))?;
    ensure!(
        parsed.contains(&format!("SUCCESS: {} rules found", rules.len())),
        "promtool check rules (dashboard queries):\n{parsed}"
    );
    Ok(())
}
