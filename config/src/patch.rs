//! `pgherdctl edit-config --set key=value`: changes to the dynamic configuration as dotted
//! keys, applied to its JSON form, validated like the file, and described line by line.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::{DynamicConfig, Problem};

/// Applies `key=value` settings to a dynamic configuration. Values are YAML scalars
/// (`64MB`, `10`, `true`); an empty value removes the key. Returns the new configuration or
/// every problem with its path.
pub fn apply(
    current: &DynamicConfig,
    sets: &[(String, String)],
) -> Result<DynamicConfig, Vec<Problem>> {
    let mut json = serde_json::to_value(current).expect("a DynamicConfig serializes to JSON");
    let mut problems = Vec::new();
    for (key, raw) in sets {
        let path: Vec<&str> = key.split('.').collect();
        if key.is_empty() || path.iter().any(|p| p.is_empty()) {
            problems.push(Problem::new(
                key.clone(),
                "is not a dotted key like ttl or postgresql.parameters.work_mem",
            ));
            continue;
        }
        let value = if raw.is_empty() {
            None
        } else {
            match serde_yaml::from_str::<Value>(raw) {
                Ok(v @ Value::Object(_)) => {
                    problems.push(Problem::new(
                        key.clone(),
                        format!("{v} is not a single value; set nested keys one by one"),
                    ));
                    continue;
                }
                // A list (`create_replica_methods=[backup, basebackup]`) replaces the list.
                Ok(v) => Some(v),
                Err(e) => {
                    problems.push(Problem::new(
                        key.clone(),
                        format!("{raw:?} is not a value: {e}"),
                    ));
                    continue;
                }
            }
        };
        set(&mut json, &path, value);
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let text = serde_json::to_vec(&json).expect("JSON values serialize");
    crate::parse_dynamic(&text)
}

fn set(json: &mut Value, path: &[&str], value: Option<Value>) {
    let (last, parents) = path.split_last().expect("paths are not empty");
    let mut cur = json;
    for p in parents {
        if !cur.is_object() {
            *cur = Value::Object(Map::new());
        }
        cur = cur
            .as_object_mut()
            .expect("made an object just above")
            .entry(p.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
    }
    if !cur.is_object() {
        *cur = Value::Object(Map::new());
    }
    let obj = cur.as_object_mut().expect("made an object just above");
    match value {
        Some(v) => {
            obj.insert(last.to_string(), v);
        }
        None => {
            obj.remove(*last);
        }
    }
}

fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        Value::String(s) => {
            out.insert(prefix.to_string(), s.clone());
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

/// One line per changed key: `key: old -> new` (`(unset)` for absent).
pub fn changes(old: &DynamicConfig, new: &DynamicConfig) -> Vec<String> {
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten("", &serde_json::to_value(old).expect("serializes"), &mut a);
    flatten("", &serde_json::to_value(new).expect("serializes"), &mut b);
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            format!(
                "{k}: {} -> {}",
                a.get(k).map(String::as_str).unwrap_or("(unset)"),
                b.get(k).map(String::as_str).unwrap_or("(unset)")
            )
        })
        .collect()
}

/// The first of `expect` (dotted key, value) that `current` does not meet, as a sentence;
/// `None` when it meets them all. A value is compared as [`changes`] prints it (strings
/// without quotes); an empty value expects the key to be absent. This is the precondition
/// of a compare-and-swap: `pgherdctl promote-cluster` expects the standby_cluster it
/// showed, `demote-cluster` expects none.
pub fn unmet(current: &DynamicConfig, expect: &[(String, String)]) -> Option<String> {
    let json = serde_json::to_value(current).expect("a DynamicConfig serializes to JSON");
    for (key, want) in expect {
        let got = key
            .split('.')
            .try_fold(&json, |v, part| v.get(part))
            .filter(|v| !v.is_null());
        let got_text = got.map(|v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        });
        match (want.is_empty(), got_text) {
            (true, None) => {}
            (true, Some(g)) => return Some(format!("{key} is set ({g}), expected unset")),
            (false, None) => return Some(format!("{key} is unset, expected {want}")),
            (false, Some(g)) if &g == want => {}
            (false, Some(g)) => return Some(format!("{key} is {g}, expected {want}")),
        }
    }
    None
}

/// PostgreSQL parameters whose values differ between the two configurations.
pub fn changed_parameters(old: &DynamicConfig, new: &DynamicConfig) -> Vec<String> {
    let (a, b) = (&old.postgresql.parameters, &new.postgresql.parameters);
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sets(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn settings_apply_with_yaml_typed_values() {
        let old = DynamicConfig::default();
        let new = apply(
            &old,
            &sets(&[
                ("ttl", "20"),
                ("postgresql.parameters.work_mem", "64MB"),
                ("pause", "true"),
            ]),
        )
        .unwrap();
        assert_eq!(new.ttl, 20);
        assert!(new.pause);
        assert_eq!(new.postgresql.parameters["work_mem"].to_string(), "64MB");
        let lines = changes(&old, &new);
        assert!(lines.contains(&"ttl: 10 -> 20".to_string()), "{lines:?}");
        assert!(
            lines.contains(&"postgresql.parameters.work_mem: (unset) -> 64MB".to_string()),
            "{lines:?}"
        );
        assert_eq!(changed_parameters(&old, &new), vec!["work_mem"]);
        let back = apply(&new, &sets(&[("postgresql.parameters.work_mem", "")])).unwrap();
        assert!(back.postgresql.parameters.is_empty());
    }

    #[test]
    fn expectations_compare_values_as_printed_and_empty_means_unset() {
        let plain = DynamicConfig::default();
        assert_eq!(unmet(&plain, &sets(&[("standby_cluster", "")])), None);
        assert_eq!(
            unmet(&plain, &sets(&[("ttl", "10"), ("pause", "false")])),
            None
        );
        let why = unmet(&plain, &sets(&[("standby_cluster.host", "db1")])).unwrap();
        assert!(why.contains("standby_cluster.host is unset"), "{why}");
        let standby = apply(
            &plain,
            &sets(&[
                ("standby_cluster.host", "db1"),
                ("standby_cluster.port", "5433"),
            ]),
        )
        .unwrap();
        assert_eq!(
            unmet(
                &standby,
                &sets(&[
                    ("standby_cluster.host", "db1"),
                    ("standby_cluster.port", "5433")
                ])
            ),
            None
        );
        let why = unmet(&standby, &sets(&[("standby_cluster", "")])).unwrap();
        assert!(why.contains("standby_cluster is set"), "{why}");
        let why = unmet(&standby, &sets(&[("standby_cluster.port", "5432")])).unwrap();
        assert!(why.contains("is 5433, expected 5432"), "{why}");
        // An optional field left out is unset, not null.
        assert_eq!(
            unmet(
                &standby,
                &sets(&[("standby_cluster.primary_slot_name", "")])
            ),
            None
        );
    }

    #[test]
    fn synchronous_mode_takes_off_on_quorum() {
        let old = DynamicConfig::default();
        let new = apply(
            &old,
            &sets(&[
                ("synchronous_mode", "quorum"),
                ("synchronous_node_count", "2"),
            ]),
        )
        .unwrap();
        assert_eq!(new.synchronous_mode, crate::SynchronousMode::Quorum);
        assert_eq!(new.synchronous_node_count, 2);
        let on = apply(&old, &sets(&[("synchronous_mode", "on")])).unwrap();
        assert_eq!(on.synchronous_mode, crate::SynchronousMode::On);
        let p = apply(&old, &sets(&[("synchronous_mode", "sometimes")])).unwrap_err();
        assert_eq!(p[0].path, "synchronous_mode");
        let p = apply(&old, &sets(&[("synchronous_node_count", "0")])).unwrap_err();
        assert_eq!(p[0].path, "synchronous_node_count");
    }

    #[test]
    fn bad_values_are_refused_with_their_path() {
        let old = DynamicConfig::default();
        let p = apply(&old, &sets(&[("ttl", "abc")])).unwrap_err();
        assert_eq!(p[0].path, "ttl");
        let p = apply(&old, &sets(&[("ttl", "3")])).unwrap_err();
        assert_eq!(p[0].path, "ttl");
        assert!(
            p[0].message.contains("loop_wait + 2 * retry_timeout"),
            "{}",
            p[0].message
        );
        let p = apply(&old, &sets(&[("loop_wiat", "2")])).unwrap_err();
        assert!(p[0].message.contains("unknown field"), "{p:?}");
        let p = apply(&old, &sets(&[("postgresql.parameters.port", "5")])).unwrap_err();
        assert_eq!(p[0].path, "postgresql.parameters.port");
        let p = apply(&old, &sets(&[("a..b", "1")])).unwrap_err();
        assert_eq!(p[0].path, "a..b");
    }

    #[test]
    fn out_of_bounds_durations_and_counts_are_refused() {
        let old = DynamicConfig::default();
        for (key, value) in [
            ("ttl", "18446744073709551615"),
            ("ttl", "18446744073709551616"),
            ("ttl", "0"),
            ("ttl", "-1"),
            ("loop_wait", "0"),
            ("loop_wait", "100000"),
            ("retry_timeout", "99999999999"),
            ("primary_start_timeout", "18446744073709551615"),
            ("synchronous_node_count", "4294967295"),
            ("synchronous_node_count", "-3"),
        ] {
            let p = apply(&old, &sets(&[(key, value)])).unwrap_err();
            assert!(p.iter().any(|p| p.path == key), "{key}={value}: {p:?}");
        }
        // Retention lives in each member's file, not in the dynamic config.
        let p = apply(&old, &sets(&[("backup.retention.full", "-1")])).unwrap_err();
        assert!(p[0].message.contains("unknown field"), "{p:?}");
    }

    #[test]
    fn parameters_that_run_programs_or_load_code_are_refused() {
        let old = DynamicConfig::default();
        for name in [
            "archive_command",
            "restore_command",
            "shared_preload_libraries",
            "Shared_Preload_Libraries",
            "local_preload_libraries",
            "dynamic_library_path",
            "ssl_passphrase_command",
            "include",
        ] {
            let key = format!("postgresql.parameters.{name}");
            let p = apply(&old, &[(key.clone(), "/bin/true".into())]).unwrap_err();
            assert_eq!(p.len(), 1, "{p:?}");
            assert_eq!(p[0].path, key);
            assert!(
                p[0].message.contains("member's own file"),
                "{}",
                p[0].message
            );
        }
    }

    #[test]
    fn slots_replica_methods_and_failsafe_are_set_and_checked() {
        let old = DynamicConfig::default();
        assert_eq!(old.member_slots_ttl, 1800);
        assert_eq!(
            old.create_replica_methods,
            vec![crate::ReplicaMethod::Basebackup]
        );
        let new = apply(
            &old,
            &sets(&[
                ("slots.cdc.type", "logical"),
                ("slots.cdc.database", "app"),
                ("slots.cdc.plugin", "test_decoding"),
                ("slots.archiver.type", "physical"),
                ("create_replica_methods", "[backup, basebackup]"),
                ("member_slots_ttl", "600"),
                ("failsafe_mode", "true"),
            ]),
        )
        .unwrap();
        assert_eq!(new.slots["cdc"].kind, crate::SlotType::Logical);
        assert_eq!(new.slots["cdc"].database.as_deref(), Some("app"));
        assert_eq!(new.slots["archiver"].kind, crate::SlotType::Physical);
        assert_eq!(
            new.create_replica_methods,
            vec![
                crate::ReplicaMethod::Backup,
                crate::ReplicaMethod::Basebackup
            ]
        );
        assert_eq!(new.member_slots_ttl, 600);
        assert!(new.failsafe_mode);
        let gone = apply(&new, &sets(&[("slots.cdc", "")])).unwrap();
        assert!(!gone.slots.contains_key("cdc"));

        for (pairs, path, says) in [
            (
                &[("slots.cdc.type", "logical"), ("slots.cdc.plugin", "p")][..],
                "slots.cdc.database",
                "required",
            ),
            (
                &[("slots.a.type", "physical"), ("slots.a.database", "app")][..],
                "slots.a.database",
                "only for logical",
            ),
            (
                &[("slots.Bad-Name.type", "physical")][..],
                "slots.Bad-Name",
                "not a slot name",
            ),
            (
                &[("create_replica_methods", "[]")][..],
                "create_replica_methods",
                "empty",
            ),
            (
                &[("create_replica_methods", "[backup, backup]")][..],
                "create_replica_methods[1]",
                "twice",
            ),
            (
                &[("member_slots_ttl", "99999999")][..],
                "member_slots_ttl",
                "must be from",
            ),
        ] {
            let p = apply(&old, &sets(pairs)).unwrap_err();
            assert!(
                p.iter().any(|p| p.path == path && p.message.contains(says)),
                "{pairs:?}: {p:?}"
            );
        }
        let p = apply(&old, &sets(&[("create_replica_methods", "[tape]")])).unwrap_err();
        assert!(p[0].message.contains("tape"), "{p:?}");
    }

    #[test]
    fn ignore_slots_match_on_the_fields_they_set() {
        let any_logical = crate::IgnoreSlot {
            kind: Some(crate::SlotType::Logical),
            ..Default::default()
        };
        assert!(any_logical.matches("x", crate::SlotType::Logical, Some("db"), Some("p")));
        assert!(!any_logical.matches("x", crate::SlotType::Physical, None, None));
        let named = crate::IgnoreSlot {
            name: Some("keep".into()),
            database: Some("app".into()),
            ..Default::default()
        };
        assert!(named.matches("keep", crate::SlotType::Logical, Some("app"), Some("p")));
        assert!(!named.matches("keep", crate::SlotType::Physical, None, None));
        assert!(!named.matches("other", crate::SlotType::Logical, Some("app"), None));
    }
}
