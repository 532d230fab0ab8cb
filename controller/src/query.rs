//! `pgherdctl query` and `pgherdctl dsn`: SQL on a member chosen by name or role, and the
//! libpq connection string that reaches it. The member comes from etcd (its member key's
//! PostgreSQL address); pgherdctl connects to PostgreSQL itself, not through the agent.

use std::io::Read;
use std::path::Path;

use pgherd_agent::dcs::model::{ClusterView, MemberInfo, Role};
use tokio_postgres::SimpleQueryMessage;

use crate::agents::Target;
use crate::{Failure, Format, MemberRole};

/// The member `--member` names, or the first of `--role` (default `any`, as patronictl). A
/// replica is the least lagging healthy one (by name among equals); `any` is the leader,
/// else that replica.
pub fn choose<'a>(
    view: &'a ClusterView,
    member: Option<&str>,
    role: Option<MemberRole>,
) -> Result<&'a MemberInfo, Failure> {
    if let Some(name) = member {
        return view.members.get(name).ok_or_else(|| {
            Failure::Refused(format!(
                "--member {name}: no such member in this cluster (see pgherdctl list)"
            ))
        });
    }
    let mut healthy_replicas: Vec<&MemberInfo> = view
        .members
        .values()
        .filter(|m| m.role == Role::Replica && m.state.is_healthy())
        .collect();
    healthy_replicas.sort_by(|a, b| {
        (a.lag_bytes.unwrap_or(u64::MAX), &a.name).cmp(&(b.lag_bytes.unwrap_or(u64::MAX), &b.name))
    });
    match role.unwrap_or(MemberRole::Any) {
        MemberRole::Leader => view.leader_member().ok_or_else(|| {
            Failure::Refused("--role leader: the cluster has no leader right now".into())
        }),
        MemberRole::Replica => healthy_replicas.first().copied().ok_or_else(|| {
            Failure::Refused("--role replica: no replica is running right now".into())
        }),
        MemberRole::Any => view
            .leader_member()
            .or_else(|| healthy_replicas.first().copied())
            .ok_or_else(|| Failure::Refused("--role any: no member is running right now".into())),
    }
}

/// Quotes a libpq connection-string value when it needs it.
fn dsn_value(v: &str) -> String {
    if !v.is_empty() && !v.contains([' ', '\'', '\\', '=']) {
        return v.to_string();
    }
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// `pgherdctl dsn`: `host=H port=P`, with `dbname` and `user` when given.
pub fn dsn(m: &MemberInfo, dbname: Option<&str>, username: Option<&str>) -> String {
    let mut parts = vec![
        format!("host={}", dsn_value(&m.host)),
        format!("port={}", m.port),
    ];
    if let Some(d) = dbname {
        parts.push(format!("dbname={}", dsn_value(d)));
    }
    if let Some(u) = username {
        parts.push(format!("user={}", dsn_value(u)));
    }
    parts.join(" ")
}

/// The SQL text from `--command` or `--file` (`-`: standard input).
pub fn read_sql(command: Option<&str>, file: Option<&Path>) -> Result<String, Failure> {
    let sql = match (command, file) {
        (Some(c), None) => c.to_string(),
        (None, Some(p)) if p == Path::new("-") => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .map_err(|e| Failure::Usage(format!("cannot read SQL from standard input: {e}")))?;
            s
        }
        (None, Some(p)) => std::fs::read_to_string(p)
            .map_err(|e| Failure::Usage(format!("cannot read --file {}: {e}", p.display())))?,
        _ => {
            return Err(Failure::Usage(
                "give the SQL with --command or --file".into(),
            ))
        }
    };
    if sql.trim().is_empty() {
        return Err(Failure::Usage("the SQL to run is empty".into()));
    }
    Ok(sql)
}

/// One statement's result: its columns and rows (text as PostgreSQL sends it; `None`: NULL).
pub struct ResultSet {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Option<String>>>,
}

/// Runs `sql` (one or more statements) on `m`'s PostgreSQL as `username` (default: the
/// configuration's superuser, whose password it uses; another user's comes from
/// `PGPASSWORD`). Returns the result sets of the statements that return rows.
pub async fn run(
    target: &Target,
    m: &MemberInfo,
    dbname: &str,
    username: Option<&str>,
    sql: &str,
) -> Result<Vec<ResultSet>, Failure> {
    let superuser = target.config.as_ref().map(|c| &c.postgres.superuser);
    let user = username
        .map(str::to_string)
        .or_else(|| superuser.map(|s| s.username.clone()))
        .ok_or_else(|| {
            Failure::Usage(
                "without --config, give --username (and its password in PGPASSWORD)".into(),
            )
        })?;
    let password = match superuser {
        Some(s) if s.username == user => Some(s.password.clone()),
        _ => std::env::var("PGPASSWORD").ok(),
    };
    let mut pc = tokio_postgres::Config::new();
    pc.host(&m.host)
        .port(m.port)
        .user(&user)
        .dbname(dbname)
        .application_name("pgherdctl")
        .connect_timeout(std::time::Duration::from_secs(5));
    if let Some(p) = &password {
        pc.password(p.as_bytes());
    }
    let failed = |e: &dyn std::fmt::Display| {
        Failure::Refused(format!(
            "cannot connect to {}'s PostgreSQL at {}:{} as {user} (database {dbname}): {e}",
            m.name, m.host, m.port
        ))
    };
    let client = match &target.config {
        Some(cfg) => pgherd_agent::postgres::tls::connect(
            cfg,
            pc,
            &m.host,
            pgherd_agent::postgres::tls::Peer::Remote,
        )
        .await
        .map_err(|e| failed(&format!("{e:#}")))?,
        None => {
            let (client, connection) = pc
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(|e| failed(&e))?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            client
        }
    };
    let messages = client.simple_query(sql).await.map_err(|e| {
        let detail = e
            .as_db_error()
            .map(|d| format!("{}: {}", d.severity(), d.message()))
            .unwrap_or_else(|| e.to_string());
        Failure::Refused(format!("the query failed on {}: {detail}", m.name))
    })?;
    let mut sets = Vec::new();
    let mut current: Option<ResultSet> = None;
    for msg in messages {
        match msg {
            SimpleQueryMessage::RowDescription(cols) => {
                current = Some(ResultSet {
                    columns: cols.iter().map(|c| c.name().to_string()).collect(),
                    rows: Vec::new(),
                });
            }
            SimpleQueryMessage::Row(row) => {
                let set = current.get_or_insert_with(|| ResultSet {
                    columns: row.columns().iter().map(|c| c.name().to_string()).collect(),
                    rows: Vec::new(),
                });
                set.rows.push(
                    (0..row.len())
                        .map(|i| row.get(i).map(String::from))
                        .collect(),
                );
            }
            SimpleQueryMessage::CommandComplete(_) => {
                if let Some(set) = current.take() {
                    sets.push(set);
                }
            }
            _ => {}
        }
    }
    if let Some(set) = current.take() {
        sets.push(set);
    }
    Ok(sets)
}

/// One CSV field (RFC 4180): quoted when it holds a comma, a quote or a line break; NULL is
/// an empty field.
fn csv_field(v: Option<&str>) -> String {
    match v {
        None => String::new(),
        Some(s) if s.contains([',', '"', '\n', '\r']) => format!("\"{}\"", s.replace('"', "\"\"")),
        Some(s) => s.to_string(),
    }
}

/// The result sets as a table, CSV (header line, then rows; sets one after the other) or
/// JSON (an array of row objects per set; one set: that array alone).
pub fn render(sets: &[ResultSet], format: Format) -> String {
    match format {
        Format::Json => {
            let arrays: Vec<serde_json::Value> = sets
                .iter()
                .map(|set| {
                    serde_json::Value::Array(
                        set.rows
                            .iter()
                            .map(|row| {
                                serde_json::Value::Object(
                                    set.columns
                                        .iter()
                                        .zip(row)
                                        .map(|(c, v)| (c.clone(), v.clone().into()))
                                        .collect(),
                                )
                            })
                            .collect(),
                    )
                })
                .collect();
            let value = match arrays.len() {
                1 => arrays.into_iter().next().expect("one element"),
                0 => serde_json::Value::Array(vec![]),
                _ => serde_json::Value::Array(arrays),
            };
            let mut s = serde_json::to_string_pretty(&value).expect("rows serialize to JSON");
            s.push('\n');
            s
        }
        Format::Csv => {
            let mut out = String::new();
            for set in sets {
                let header: Vec<String> = set.columns.iter().map(|c| csv_field(Some(c))).collect();
                out.push_str(&header.join(","));
                out.push('\n');
                for row in &set.rows {
                    let line: Vec<String> = row.iter().map(|v| csv_field(v.as_deref())).collect();
                    out.push_str(&line.join(","));
                    out.push('\n');
                }
            }
            out
        }
        Format::Table => {
            let mut out = String::new();
            for set in sets {
                let header: Vec<&str> = set.columns.iter().map(String::as_str).collect();
                let rows = set
                    .rows
                    .iter()
                    .map(|r| {
                        r.iter()
                            .map(|v| v.clone().unwrap_or_else(|| "NULL".into()))
                            .collect()
                    })
                    .collect();
                out.push_str(&crate::list::table(&header, rows));
                out.push_str(&format!(
                    "({} row{})\n",
                    set.rows.len(),
                    if set.rows.len() == 1 { "" } else { "s" }
                ));
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_what_needs_it_and_null_is_empty() {
        let sets = vec![ResultSet {
            columns: vec!["a".into(), "b,c".into()],
            rows: vec![
                vec![Some("1".into()), None],
                vec![Some("say \"hi\"".into()), Some("x\ny".into())],
            ],
        }];
        assert_eq!(
            render(&sets, Format::Csv),
            "a,\"b,c\"\n1,\n\"say \"\"hi\"\"\",\"x\ny\"\n"
        );
    }

    #[test]
    fn json_is_one_array_of_row_objects_with_nulls() {
        let sets = vec![ResultSet {
            columns: vec!["a".into(), "b".into()],
            rows: vec![vec![Some("1".into()), None]],
        }];
        let v: serde_json::Value = serde_json::from_str(&render(&sets, Format::Json)).unwrap();
        assert_eq!(v, serde_json::json!([{"a": "1", "b": null}]));
    }

    #[test]
    fn dsn_values_with_spaces_or_quotes_are_quoted() {
        assert_eq!(dsn_value("10.0.0.1"), "10.0.0.1");
        assert_eq!(dsn_value("my db"), "'my db'");
        assert_eq!(dsn_value("o'k"), "'o\\'k'");
        assert_eq!(dsn_value(""), "''");
    }
}
