//! Values pgherd reads from etcd. A newer agent may have written fields this version does not
//! know; during a rolling upgrade that must not change what an older agent does, so such
//! fields are dropped and named (the caller warns once) instead of making the whole value
//! unreadable. Anything else wrong (not JSON, a wrong type, a missing field, an unknown enum
//! value) still fails, and the caller fails closed. The YAML file stays strict: a typo there
//! is the operator's, and they want to hear about it at once.
//!
//! Unknown fields are found the same way the file's validation finds them: the types deny
//! unknown fields, and each error of that kind removes the field and tries again.

use serde::de::DeserializeOwned;

use crate::validate::{display_path, parse_path, render, unknown_field, Segment};
use crate::{DynamicConfig, Problem};

/// A value parsed from etcd, and the fields (dotted paths) that were ignored.
#[derive(Debug, Clone, PartialEq)]
pub struct Lenient<T> {
    pub value: T,
    pub ignored: Vec<String>,
    /// Known fields that were dropped because this member refuses them from etcd (for the
    /// dynamic config: parameters that run programs or load code), with why. The caller
    /// logs them at ERROR; the rest of the value applies.
    pub refused: Vec<Problem>,
}

/// Parses JSON into `T` (whose structs deny unknown fields), ignoring fields `T` does not
/// know. The error names where the value stopped being readable and why.
pub fn from_json<T: DeserializeOwned>(json: &[u8]) -> Result<Lenient<T>, Problem> {
    let mut value: serde_json::Value = serde_json::from_slice(json)
        .map_err(|e| Problem::new("(top level)", format!("not valid JSON: {e}")))?;
    let mut ignored = Vec::new();
    // Every round removes one field from `value` or returns, so this ends.
    loop {
        let e = match serde_path_to_error::deserialize::<_, T>(&value) {
            Ok(v) => {
                return Ok(Lenient {
                    value: v,
                    ignored,
                    refused: Vec::new(),
                })
            }
            Err(e) => e,
        };
        let path = e.path().to_string();
        let message = e.inner().to_string();
        let Some(field) = unknown_field(&message) else {
            return Err(Problem::new(display_path(&path), message));
        };
        let mut segs = parse_path(&path);
        // serde_path_to_error includes the unknown key in the path in some cases.
        if segs.last() != Some(&Segment::Key(field.clone())) {
            segs.push(Segment::Key(field));
        }
        if !remove(&mut value, &segs) {
            return Err(Problem::new(render(&segs), message));
        }
        ignored.push(render(&segs));
    }
}

/// The dynamic configuration stored in etcd, read leniently and validated like the file's
/// `bootstrap.dcs`.
///
/// A parameter that runs a program or loads code (see [`crate::runs_code`]) can only have
/// been written by hand (pgherdctl and `bootstrap.dcs` refuse it): it is dropped and named in
/// `refused`, and the rest of the value applies. Refusing the whole value instead would
/// make it unreadable, and an unreadable config stops elections (docs/architecture.md): one
/// hand-written key would then keep the cluster leaderless after a failure. Dropping the
/// parameter takes from an etcd writer exactly what the rule denies (code run as `postgres`)
/// and nothing else; every member drops the same parameters, so they still agree.
pub fn dynamic(json: &[u8]) -> Result<Lenient<DynamicConfig>, Vec<Problem>> {
    let mut parsed = from_json::<DynamicConfig>(json).map_err(|p| vec![p])?;
    let params = &mut parsed.value.postgresql.parameters;
    let code: Vec<String> = params
        .keys()
        .filter(|name| crate::runs_code(name).is_some())
        .cloned()
        .collect();
    for name in code {
        params.remove(&name);
        let what = crate::runs_code(&name).unwrap_or_default();
        parsed.refused.push(crate::validate::code_parameter_problem(
            format!("postgresql.parameters.{name}"),
            what,
        ));
    }
    let problems = parsed.value.validate("");
    if problems.is_empty() {
        Ok(parsed)
    } else {
        Err(problems)
    }
}

/// Copies the fields `ignored` (as returned by [`from_json`] for `stored`) from `stored` into
/// `new`, the JSON of a value this version changed: rewriting a value must not drop what a
/// newer agent added to it. A field whose parent no longer exists in `new` stays dropped.
pub fn keep_ignored(stored: &serde_json::Value, ignored: &[String], new: &mut serde_json::Value) {
    for path in ignored {
        let segs = parse_path(path);
        let Some((Segment::Key(last), parents)) = segs.split_last() else {
            continue;
        };
        let mut parent = String::new();
        for seg in parents {
            match seg {
                Segment::Key(k) => {
                    parent.push_str(&format!("/{}", k.replace('~', "~0").replace('/', "~1")))
                }
                Segment::Index(i) => parent.push_str(&format!("/{i}")),
            }
        }
        let value = stored.pointer(&parent).and_then(|p| p.get(last.as_str()));
        if let (Some(v), Some(serde_json::Value::Object(to))) = (value, new.pointer_mut(&parent)) {
            to.insert(last.clone(), v.clone());
        }
    }
}

fn remove(value: &mut serde_json::Value, segs: &[Segment]) -> bool {
    use serde_json::Value;
    let Some((last, parents)) = segs.split_last() else {
        return false;
    };
    let mut cur = value;
    for seg in parents {
        cur = match (seg, cur) {
            (Segment::Key(k), Value::Object(m)) => match m.get_mut(k.as_str()) {
                Some(v) => v,
                None => return false,
            },
            (Segment::Index(i), Value::Array(a)) => match a.get_mut(*i) {
                Some(v) => v,
                None => return false,
            },
            _ => return false,
        };
    }
    match (last, cur) {
        (Segment::Key(k), Value::Object(m)) => m.remove(k.as_str()).is_some(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SynchronousMode, Tags};

    #[test]
    fn unknown_fields_at_any_depth_are_ignored_and_named() {
        let json = br#"{"synchronous_mode": "on", "future_field": 1,
            "postgresql": {"future_field": {"x": [1]}, "parameters": {"work_mem": "8MB"}}}"#;
        let parsed = dynamic(json).unwrap();
        assert_eq!(parsed.value.synchronous_mode, SynchronousMode::On);
        assert_eq!(
            parsed.value.postgresql.parameters["work_mem"],
            crate::ParamValue::Text("8MB".into())
        );
        let mut ignored = parsed.ignored.clone();
        ignored.sort();
        assert_eq!(ignored, vec!["future_field", "postgresql.future_field"]);
    }

    #[test]
    fn a_value_without_unknown_fields_ignores_nothing() {
        let json = serde_json::to_vec(&DynamicConfig::default()).unwrap();
        let parsed = dynamic(&json).unwrap();
        assert_eq!(parsed.value, DynamicConfig::default());
        assert!(parsed.ignored.is_empty());
    }

    #[test]
    fn the_strict_parse_still_refuses_unknown_fields() {
        let problems = crate::parse_dynamic(br#"{"future_field": 1}"#).unwrap_err();
        assert!(
            problems[0].message.contains("unknown field"),
            "{problems:?}"
        );
    }

    #[test]
    fn garbage_is_unreadable_with_the_reason() {
        let p = dynamic(b"{not json").unwrap_err();
        assert!(p[0].message.contains("not valid JSON"), "{p:?}");
        let p = dynamic(br#"{"ttl": "ten"}"#).unwrap_err();
        assert_eq!(p[0].path, "ttl", "{p:?}");
        let p = dynamic(br#"{"synchronous_mode": "sometimes"}"#).unwrap_err();
        assert_eq!(p[0].path, "synchronous_mode", "{p:?}");
    }

    #[test]
    fn an_invalid_value_is_unreadable_even_when_well_typed() {
        let p = dynamic(br#"{"ttl": 0, "future_field": true}"#).unwrap_err();
        assert!(p.iter().any(|p| p.path == "ttl"), "{p:?}");
    }

    #[test]
    fn a_rewritten_value_keeps_what_a_newer_agent_added() {
        let stored: serde_json::Value = serde_json::from_str(
            r#"{"ttl": 10, "future_field": 1,
                "postgresql": {"future_field": [2], "parameters": {"work_mem": "8MB"}}}"#,
        )
        .unwrap();
        let parsed = dynamic(stored.to_string().as_bytes()).unwrap();
        let mut changed = parsed.value.clone();
        changed.ttl = 20;
        changed.postgresql.parameters.clear();
        let mut json = serde_json::to_value(&changed).unwrap();
        keep_ignored(&stored, &parsed.ignored, &mut json);
        assert_eq!(json["ttl"], 20);
        assert_eq!(json["future_field"], 1);
        assert_eq!(json["postgresql"]["future_field"], serde_json::json!([2]));
        // A parameter the change removed stays removed (it was known, not ignored).
        assert_eq!(json["postgresql"]["parameters"], serde_json::json!({}));
        assert_eq!(dynamic(json.to_string().as_bytes()).unwrap().value, changed);
    }

    #[test]
    fn a_hand_written_code_parameter_is_dropped_and_named_and_the_rest_applies() {
        let json = br#"{"ttl": 20, "postgresql": {"parameters": {
            "work_mem": "8MB",
            "archive_command": "/bin/sh -c 'id > /tmp/owned'",
            "Shared_Preload_Libraries": "evil",
            "session_preload_libraries": "evil",
            "include_dir": "/tmp"}}}"#;
        let parsed = dynamic(json).unwrap();
        assert_eq!(parsed.value.ttl, 20);
        let params: Vec<&String> = parsed.value.postgresql.parameters.keys().collect();
        assert_eq!(params, vec!["work_mem"]);
        let mut refused: Vec<&str> = parsed.refused.iter().map(|p| p.path.as_str()).collect();
        refused.sort();
        assert_eq!(
            refused,
            vec![
                "postgresql.parameters.Shared_Preload_Libraries",
                "postgresql.parameters.archive_command",
                "postgresql.parameters.include_dir",
                "postgresql.parameters.session_preload_libraries",
            ]
        );
        assert!(parsed.refused[0].message.contains("postgres.parameters"));
        assert!(parsed.ignored.is_empty());
    }

    #[test]
    fn a_hand_written_out_of_bounds_value_stays_unreadable() {
        // Fails closed as before: the last valid config is kept by the caller.
        for json in [
            &br#"{"ttl": 18446744073709551615}"#[..],
            br#"{"ttl": 10, "loop_wait": 100000}"#,
            br#"{"primary_start_timeout": 99999999999}"#,
            br#"{"synchronous_node_count": 4294967295}"#,
            br#"{"ttl": -1}"#,
        ] {
            assert!(dynamic(json).is_err(), "{}", String::from_utf8_lossy(json));
        }
    }

    #[test]
    fn tags_keep_the_known_ones_and_custom_ones_as_written() {
        let parsed = from_json::<Tags>(
            br#"{"nofailover": true, "zone": "eu-1", "rack": 7, "failover_priority": 3}"#,
        )
        .unwrap();
        assert!(parsed.value.nofailover);
        assert_eq!(parsed.value.failover_priority, 3);
        assert!(parsed.ignored.is_empty(), "{:?}", parsed.ignored);
        assert_eq!(parsed.value.custom["zone"], serde_json::json!("eu-1"));
        assert_eq!(parsed.value.custom["rack"], serde_json::json!(7));
    }
}
