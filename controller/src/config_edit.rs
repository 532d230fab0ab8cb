//! `pgherdctl edit-config`: the cluster-wide configuration changed by `--set KEY=VALUE`,
//! by editing its YAML in `$EDITOR`, or by a whole YAML file (`--apply FILE`). An edited or
//! applied document becomes the `--set` list of what differs, so the leader's agent
//! validates and applies it the one way it applies every change (dry run, confirmation,
//! compare-and-swap on the `config` key).

use std::collections::HashMap;
use std::io::{IsTerminal, Read};
use std::path::Path;

use pgherd_config::DynamicConfig;
use pgherd_proto::v1::*;
use serde_json::Value;

use crate::agents::Target;
use crate::commands::print_message;
use crate::prompt::confirm;
use crate::{Failure, Format};

/// Where the new configuration comes from.
pub enum Source<'a> {
    Sets(&'a [String]),
    Editor,
    /// `--apply FILE`: a patch, as patronictl's: the keys it gives are set, `null` removes
    /// one, keys it leaves out stay.
    Patch(&'a Path),
    /// `--replace FILE`: the whole configuration; keys it leaves out are removed.
    Replace(&'a Path),
}

/// `patch` merged into `base` (RFC 7396): an object merges key by key, `null` removes the
/// key, anything else replaces it.
pub fn merge_patch(base: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !base.is_object() {
                *base = Value::Object(serde_json::Map::new());
            }
            let b = base.as_object_mut().expect("made an object just above");
            for (k, v) in p {
                if v.is_null() {
                    b.remove(k);
                } else {
                    merge_patch(b.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *base = other.clone(),
    }
}

/// The `--set` list that turns `old` into `new`: each changed leaf as JSON text (which is
/// YAML), each removed key with an empty value. A key with a dot in its name cannot be
/// told from a path, so it is refused.
pub fn sets_between(old: &Value, new: &Value) -> Result<Vec<(String, String)>, Failure> {
    fn walk(
        path: &mut Vec<String>,
        old: Option<&Value>,
        new: Option<&Value>,
        out: &mut Vec<(String, String)>,
    ) -> Result<(), Failure> {
        let emit = |path: &[String], value: String, out: &mut Vec<(String, String)>| {
            if let Some(seg) = path.iter().find(|s| s.contains('.') || s.is_empty()) {
                return Err(Failure::Refused(format!(
                    "key {seg:?} has a dot in its name or is empty: edit-config cannot change it (it would be read as a path); nothing changed"
                )));
            }
            out.push((path.join("."), value));
            Ok(())
        };
        match (old, new) {
            (Some(Value::Object(o)), Some(Value::Object(n))) => {
                let mut keys: Vec<&String> = o.keys().chain(n.keys()).collect();
                keys.sort();
                keys.dedup();
                for k in keys {
                    path.push(k.clone());
                    walk(path, o.get(k), n.get(k), out)?;
                    path.pop();
                }
            }
            (_, Some(Value::Object(n))) => {
                if old.is_some_and(|o| !o.is_null()) {
                    // A value became a section: remove it, then set the section's leaves.
                    emit(path, String::new(), out)?;
                }
                for (k, v) in n {
                    path.push(k.clone());
                    walk(path, None, Some(v), out)?;
                    path.pop();
                }
            }
            (Some(o), None | Some(Value::Null)) if !o.is_null() => {
                emit(path, String::new(), out)?;
            }
            (_, None | Some(Value::Null)) => {}
            (o, Some(n)) if o != Some(n) => {
                emit(path, n.to_string(), out)?;
            }
            _ => {}
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(&mut Vec::new(), Some(old), Some(new), &mut out)?;
    Ok(out)
}

/// Reads a YAML mapping: refused, naming `what`, when it is not one.
fn parse_yaml(text: &str, what: &str) -> Result<Value, Failure> {
    let value: Value = serde_yaml::from_str(text)
        .map_err(|e| Failure::Refused(format!("{what} is not valid YAML: {e}; nothing changed")))?;
    if !value.is_object() {
        return Err(Failure::Refused(format!(
            "{what} is not a YAML mapping of configuration keys; nothing changed"
        )));
    }
    Ok(value)
}

/// Removes every key whose value is `null`, in mappings at any depth: in a whole document
/// (`--replace`, the editor) an empty or null key means the key is not set, as in a patch;
/// `parameters:` left with no entries is YAML's null.
fn drop_nulls(v: &mut Value) {
    if let Value::Object(m) = v {
        m.retain(|_, x| !x.is_null());
        m.values_mut().for_each(drop_nulls);
    }
}

/// Checks the new configuration as the agents will read it: refused, naming `what` and
/// every problem's path, when it is not valid.
fn check_document(mut value: Value, what: &str) -> Result<Value, Failure> {
    drop_nulls(&mut value);
    let bytes = serde_json::to_vec(&value).expect("JSON values serialize");
    pgherd_config::parse_dynamic(&bytes).map_err(|p| {
        Failure::Refused(format!(
            "{what} is not a valid configuration; nothing changed:\n{}",
            pgherd_config::Problem::list(&p)
        ))
    })?;
    Ok(value)
}

/// Opens `$EDITOR` (else `$VISUAL`, else `vi`) on the configuration's YAML and returns the
/// edited text; `None` when the editor left it unchanged.
fn edit(current_yaml: &str) -> Result<Option<String>, Failure> {
    let chosen = ["EDITOR", "VISUAL"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|e| !e.trim().is_empty()));
    if chosen.is_none() && !std::io::stdin().is_terminal() {
        // vi on a pipe would wait for keys nobody types.
        return Err(Failure::Usage(
            "edit-config without --set, --apply or --replace opens an editor: set EDITOR, or run it from a terminal"
                .into(),
        ));
    }
    let file = tempfile::Builder::new()
        .prefix("pgherd-config-")
        .suffix(".yaml")
        .tempfile()
        .map_err(|e| Failure::Refused(format!("cannot create a file to edit: {e}")))?;
    std::fs::write(file.path(), current_yaml)
        .map_err(|e| Failure::Refused(format!("cannot write {}: {e}", file.path().display())))?;
    let editor = chosen.unwrap_or_else(|| "vi".to_string());
    // Through the shell, as git does, so EDITOR may carry arguments ("code --wait").
    let status = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("{editor} \"$1\""))
        .arg("sh")
        .arg(file.path())
        .status()
        .map_err(|e| Failure::Refused(format!("cannot run the editor {editor:?}: {e}")))?;
    if !status.success() {
        return Err(Failure::Refused(format!(
            "the editor {editor:?} failed ({status}); nothing changed"
        )));
    }
    let edited = std::fs::read_to_string(file.path()).map_err(|e| {
        Failure::Refused(format!(
            "cannot read the edited {}: {e}",
            file.path().display()
        ))
    })?;
    Ok((edited != current_yaml).then_some(edited))
}

/// The text of `--apply FILE` or `--replace FILE` (`-`: standard input) and how to name it.
fn read_file(flag: &str, path: &Path) -> Result<(String, String), Failure> {
    if path == Path::new("-") {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| Failure::Usage(format!("cannot read {flag} - (standard input): {e}")))?;
        Ok((s, format!("{flag} - (standard input)")))
    } else {
        let s = std::fs::read_to_string(path)
            .map_err(|e| Failure::Usage(format!("cannot read {flag} {}: {e}", path.display())))?;
        Ok((s, format!("{flag} {}", path.display())))
    }
}

pub async fn edit_config(
    target: &Target,
    format: Format,
    source: Source<'_>,
    force: bool,
) -> Result<(), Failure> {
    let sets: Vec<(String, String)> = match source {
        Source::Sets(set) => {
            let mut sets = Vec::new();
            for s in set {
                let (k, v) = s
                    .split_once('=')
                    .ok_or_else(|| Failure::Usage(format!("--set {s:?} is not KEY=VALUE")))?;
                sets.push((k.trim().to_string(), v.trim().to_string()));
            }
            sets
        }
        Source::Editor | Source::Patch(_) | Source::Replace(_) => {
            let view = target.view().await?;
            let current: DynamicConfig = match &view.config {
                Some(Ok(c)) => c.clone(),
                Some(Err(why)) => return Err(Failure::Refused(why.clone())),
                None => {
                    return Err(Failure::Refused(
                        "the cluster has no configuration in etcd yet".into(),
                    ))
                }
            };
            let old = serde_json::to_value(&current).expect("a DynamicConfig serializes");
            let new = match source {
                Source::Patch(path) => {
                    let (text, what) = read_file("--apply", path)?;
                    let mut new = old.clone();
                    merge_patch(&mut new, &parse_yaml(&text, &what)?);
                    check_document(new, &what)?
                }
                Source::Replace(path) => {
                    let (text, what) = read_file("--replace", path)?;
                    check_document(parse_yaml(&text, &what)?, &what)?
                }
                _ => {
                    let yaml = serde_yaml::to_string(&current)
                        .map_err(|e| Failure::Refused(e.to_string()))?;
                    match edit(&yaml)? {
                        Some(text) => {
                            let what = "the edited configuration";
                            check_document(parse_yaml(&text, what)?, what)?
                        }
                        None => old.clone(),
                    }
                }
            };
            sets_between(&old, &new)?
        }
    };
    if sets.is_empty() {
        print_message(
            format,
            &[("changes", serde_json::json!([]))],
            "no change: the configuration already says that",
        );
        return Ok(());
    }
    let sets: HashMap<String, String> = sets.into_iter().collect();
    let patch = |dry_run: bool| {
        let set = sets.clone();
        target.on_leader(move |mut c| {
            let set = set.clone();
            async move {
                c.patch_config(PatchConfigRequest {
                    set,
                    dry_run,
                    expect: HashMap::new(),
                })
                .await
            }
        })
    };
    let dry = patch(true).await?;
    if dry.changes.is_empty() {
        print_message(
            format,
            &[("changes", serde_json::json!([]))],
            "no change: the configuration already says that",
        );
        return Ok(());
    }
    if format != Format::Json {
        println!("Changes:");
        for line in &dry.changes {
            println!("  {line}");
        }
    }
    confirm("Apply these changes to every member?", force)?;
    let done = patch(false).await?;
    match format {
        Format::Json => println!(
            "{}",
            serde_json::json!({"changes": done.changes, "pending_restart": done.pending_restart})
        ),
        _ => {
            println!("Applied.");
            if !done.pending_restart.is_empty() {
                println!(
                    "A changed parameter needs a PostgreSQL restart on: {} (pgherdctl restart --all --pending)",
                    done.pending_restart.join(", ")
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sets(old: Value, new: Value) -> Vec<(String, String)> {
        let mut s = match sets_between(&old, &new) {
            Ok(s) => s,
            Err(Failure::Refused(m) | Failure::Usage(m)) => panic!("{m}"),
        };
        s.sort();
        s
    }

    #[test]
    fn the_difference_of_two_documents_is_one_set_per_changed_leaf() {
        let old = json!({"ttl": 30, "postgresql": {"parameters": {"work_mem": "4MB", "a": "1"}}, "m": ["x"]});
        let new = json!({"ttl": 20, "postgresql": {"parameters": {"work_mem": "64MB", "b": 2}}, "m": ["x", "y"]});
        assert_eq!(
            sets(old, new),
            vec![
                ("m".to_string(), r#"["x","y"]"#.to_string()),
                ("postgresql.parameters.a".to_string(), String::new()),
                ("postgresql.parameters.b".to_string(), "2".to_string()),
                (
                    "postgresql.parameters.work_mem".to_string(),
                    r#""64MB""#.to_string()
                ),
                ("ttl".to_string(), "20".to_string()),
            ]
        );
    }

    #[test]
    fn a_patch_sets_what_it_gives_removes_nulls_and_keeps_the_rest() {
        let mut base =
            json!({"ttl": 30, "loop_wait": 10, "postgresql": {"parameters": {"a": "1", "b": "2"}}});
        merge_patch(
            &mut base,
            &json!({"ttl": 20, "postgresql": {"parameters": {"a": null, "c": "3"}}}),
        );
        assert_eq!(
            base,
            json!({"ttl": 20, "loop_wait": 10, "postgresql": {"parameters": {"b": "2", "c": "3"}}})
        );
    }

    #[test]
    fn equal_documents_give_nothing_and_changed_dotted_names_are_refused() {
        assert!(sets(json!({"a": {"b": 1}}), json!({"a": {"b": 1}})).is_empty());
        assert!(sets(json!({"p": {"x.y": 1}}), json!({"p": {"x.y": 1}, "q": 2})).len() == 1);
        assert!(sets_between(
            &json!({"postgresql": {"parameters": {}}}),
            &json!({"postgresql": {"parameters": {"auto_explain.log_min_duration": "1s"}}})
        )
        .is_err());
    }
}
