//! Keys that hold secrets, and problem messages that must not quote their values: serde's
//! type errors show the offending value (``invalid type: integer `12345`, expected a
//! string``), and a password written as a number, a map or a list must not end up in a
//! terminal, a log or CI output (issue 13 item 11).

use crate::validate::Problem;

/// The YAML paths of the member file's secrets.
const SECRETS: &[&str] = &[
    "postgres.superuser.password",
    "postgres.replication.password",
    "etcd.password",
    "api.auth_token",
    "api.http_auth.password",
];

/// Whether `path` is a secret or holds one (the top level, `postgres`, `etcd.password`...).
fn holds_secret(path: &str) -> bool {
    path == "(top level)"
        || SECRETS.iter().any(|s| {
            *s == path
                || s.strip_prefix(path)
                    .is_some_and(|rest| rest.starts_with('.'))
        })
}

/// `problems` with every message about the value of a secret (or of a section holding one)
/// replaced by one that says what was expected and nothing of what was found.
pub(crate) fn redact(problems: Vec<Problem>) -> Vec<Problem> {
    problems.into_iter().map(redact_one).collect()
}

fn redact_one(p: Problem) -> Problem {
    let about_value = p.message.starts_with("invalid ") || SECRETS.contains(&p.path.as_str());
    let about_key =
        p.message.starts_with("missing field") || p.message.starts_with("unknown field");
    if !holds_secret(&p.path) || !about_value || about_key {
        return p;
    }
    let message = match p.message.split_once(", expected ") {
        Some((_, expected)) => {
            format!("wrong type or value (not shown: it may be a secret), expected {expected}")
        }
        None => "invalid value (not shown: it may be a secret)".to_string(),
    };
    Problem::new(p.path, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = include_str!("../examples/minimal.yml");

    /// The example member file with `old` replaced by `new`.
    fn with(old: &str, new: &str) -> String {
        assert!(MINIMAL.contains(old), "{old:?} is not in minimal.yml");
        MINIMAL.replace(old, new)
    }

    #[test]
    fn a_secret_of_the_wrong_type_is_not_echoed() {
        let su = "password: change-me-superuser";
        let repl = "password: change-me-replication";
        let cases = [
            (su, "password: 987654321"),
            (su, "password: 9876.54321"),
            (su, "password: {x: 987654321}"),
            (su, "password: [987654321]"),
            (su, "password: true, x: 987654321"),
            (repl, "password: 987654321"),
            (
                "superuser: {username: postgres, password: change-me-superuser}",
                "superuser: 987654321",
            ),
        ];
        for (line, bad) in cases {
            let text = with(line, bad);
            let problems = crate::parse(&text).expect_err(bad);
            let shown = Problem::list(&problems);
            assert!(!shown.contains("987654321"), "{bad}: {shown}");
            assert!(!shown.contains("9876.54321"), "{bad}: {shown}");
            assert!(
                shown.contains("postgres."),
                "{bad}: the path is still named: {shown}"
            );
        }
        // Other keys keep their messages, value included.
        let text = with("listen: 127.0.0.1:5433", "listen: [987654321]");
        let shown = Problem::list(&crate::parse(&text).expect_err("listen"));
        assert!(shown.contains("postgres.listen"), "{shown}");
        assert!(!shown.contains("not shown"), "{shown}");
    }

    #[test]
    fn secret_paths_and_their_sections() {
        for p in [
            "postgres.superuser.password",
            "postgres.superuser",
            "postgres",
            "etcd",
            "etcd.password",
            "api.auth_token",
            "api.http_auth.password",
            "api.http_auth",
            "(top level)",
        ] {
            assert!(holds_secret(p), "{p}");
        }
        for p in [
            "postgres.superuser.username",
            "postgres.listen",
            "api.auth_token_file",
            "api.http_auth.username",
            "etcd.endpoints",
            "etcd.pass",
        ] {
            assert!(!holds_secret(p), "{p}");
        }
        let missing = Problem::new("postgres.superuser", "missing field `password`");
        assert_eq!(redact(vec![missing.clone()]), vec![missing]);
    }
}
