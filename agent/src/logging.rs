//! The agent's log lines on stderr, in text (the default) or JSON (`--log-format json`,
//! `PGHERD_LOG_FORMAT=json`), one event per line, both carrying PostgreSQL's name for the
//! event's severity, so a line of the agent and one of its PostgreSQL can be filtered alike.
//!
//! ```text
//! 2026-01-02T03:04:05.123456Z LOG:  agent{member=node1}: decision role="leader" reason=...
//! {"error_severity":"LOG","timestamp":"2026-01-02T03:04:05.123456Z","level":"INFO","message":"decision","role":"leader","reason":"...","target":"pgherd_agent::agent","span":{"member":"node1","name":"agent"},"spans":[{"member":"node1","name":"agent"}]}
//! ```
//!
//! The text line is PostgreSQL's stderr convention (`SEVERITY:  message`) after the time and
//! before the spans and fields tracing writes; the JSON object is tracing-subscriber's JSON
//! format (event fields flattened next to `message`, the span fields in `span` and `spans`)
//! with PostgreSQL jsonlog's `error_severity` member put first. [`severity`] is the mapping.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, JsonFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// How the agent writes its log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `TIME SEVERITY:  spans: message fields`, one line per event.
    #[default]
    Text,
    /// One JSON object per line (see the module documentation for its members).
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// The name of the field that makes an ERROR event `FATAL`: the agent exits after it, as
/// PostgreSQL's FATAL ends a session (`tracing::error!(fatal = true, ...)`).
pub const FATAL_FIELD: &str = "fatal";

/// PostgreSQL's severity for a tracing level: its server log says `LOG` for what is worth
/// knowing in normal operation (tracing's INFO; PostgreSQL's own `INFO` is for messages a
/// client asked for), `WARNING`, `ERROR` and `FATAL` (an ERROR after which the agent exits),
/// and `DEBUG1`, `DEBUG2` for tracing's DEBUG and TRACE. `NOTICE` and `PANIC` are not used.
pub fn severity(level: Level, fatal: bool) -> &'static str {
    match level {
        Level::ERROR if fatal => "FATAL",
        Level::ERROR => "ERROR",
        Level::WARN => "WARNING",
        Level::INFO => "LOG",
        Level::DEBUG => "DEBUG1",
        Level::TRACE => "DEBUG2",
    }
}

fn severity_of(event: &Event<'_>) -> &'static str {
    let meta = event.metadata();
    severity(*meta.level(), meta.fields().field(FATAL_FIELD).is_some())
}

/// Sends every log line of this process to stderr in `format`; `PGHERD_LOG` filters them
/// (tracing's `EnvFilter` syntax, `info` by default).
pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGHERD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // No colours: the lines go to the journal or a file, and a field's escape codes would
    // end up in the JSON.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.event_format(TextFormat).init(),
        LogFormat::Json => builder
            .fmt_fields(JsonFields::new())
            .event_format(JsonFormat::new())
            .init(),
    }
}

/// `2026-01-02T03:04:05.123456Z WARNING:  agent{member=node1}: message field=value`.
#[derive(Debug, Default, Clone, Copy)]
pub struct TextFormat;

impl<S, N> FormatEvent<S, N> for TextFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        SystemTime.format_time(&mut writer)?;
        write!(writer, " {}:  ", severity_of(event))?;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                write!(writer, "{}", span.name())?;
                let extensions = span.extensions();
                if let Some(fields) = extensions.get::<FormattedFields<N>>() {
                    if !fields.is_empty() {
                        write!(writer, "{{{fields}}}")?;
                    }
                }
                write!(writer, ": ")?;
            }
        }
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// tracing-subscriber's JSON line with `error_severity` as its first member.
pub struct JsonFormat {
    inner: format::Format<format::Json>,
}

impl JsonFormat {
    pub fn new() -> JsonFormat {
        JsonFormat {
            inner: format::format()
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(true),
        }
    }
}

impl Default for JsonFormat {
    fn default() -> Self {
        JsonFormat::new()
    }
}

impl<S, N> FormatEvent<S, N> for JsonFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        // tracing-subscriber writes one object per event; the severity is a fixed word, so
        // it needs no escaping.
        let members = line.strip_prefix('{').ok_or(fmt::Error)?;
        write!(
            writer,
            "{{\"error_severity\":\"{}\",{members}",
            severity_of(event)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    /// Collects what a subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn lines(&self) -> Vec<String> {
            String::from_utf8(self.0.lock().unwrap().clone())
                .unwrap()
                .lines()
                .map(str::to_string)
                .collect()
        }
    }

    /// One event of each kind the agent logs, inside the span main.rs opens.
    fn log_each_level() {
        let span = tracing::info_span!("agent", member = "node1");
        let _entered = span.enter();
        tracing::trace!("a trace line");
        tracing::debug!(elapsed_ms = 3u64, "loop done");
        tracing::info!(role = "leader", reason = "I hold \"the\" key", "decision");
        tracing::warn!(step = "x", "a warning");
        tracing::error!(error = "boom", "an error");
        tracing::error!(fatal = true, error = "gone", "pgherd-agent stopped");
    }

    fn capture(format: LogFormat) -> Vec<String> {
        let out = Captured::default();
        let writer = {
            let out = out.clone();
            move || out.clone()
        };
        let builder = tracing_subscriber::fmt()
            .with_max_level(Level::TRACE)
            .with_ansi(false)
            .with_writer(writer);
        match format {
            LogFormat::Text => tracing::subscriber::with_default(
                builder.event_format(TextFormat).finish(),
                log_each_level,
            ),
            LogFormat::Json => tracing::subscriber::with_default(
                builder
                    .fmt_fields(JsonFields::new())
                    .event_format(JsonFormat::new())
                    .finish(),
                log_each_level,
            ),
        }
        out.lines()
    }

    const SEVERITIES: [&str; 6] = ["DEBUG2", "DEBUG1", "LOG", "WARNING", "ERROR", "FATAL"];

    #[test]
    fn json_lines_carry_postgresql_severity_and_the_text_lines_fields() {
        let lines = capture(LogFormat::Json);
        assert_eq!(lines.len(), 6, "{lines:#?}");
        for (line, want) in lines.iter().zip(SEVERITIES) {
            let v: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            assert_eq!(v["error_severity"], want, "{line}");
            for key in ["timestamp", "level", "target", "message"] {
                assert!(v.get(key).is_some(), "no {key} in {line}");
            }
            assert_eq!(v["span"]["member"], "node1", "{line}");
            assert_eq!(v["spans"][0]["name"], "agent", "{line}");
            assert!(
                humantime::parse_rfc3339(v["timestamp"].as_str().unwrap()).is_ok(),
                "{line}"
            );
        }
        let decision: serde_json::Value = serde_json::from_str(&lines[2]).unwrap();
        assert_eq!(decision["level"], "INFO");
        assert_eq!(decision["message"], "decision");
        assert_eq!(decision["role"], "leader");
        assert_eq!(decision["reason"], "I hold \"the\" key");
        let fatal: serde_json::Value = serde_json::from_str(&lines[5]).unwrap();
        assert_eq!(fatal["level"], "ERROR");
        assert_eq!(fatal["error"], "gone");
    }

    #[test]
    fn text_lines_start_with_the_time_and_postgresql_severity() {
        let lines = capture(LogFormat::Text);
        assert_eq!(lines.len(), 6, "{lines:#?}");
        for (line, want) in lines.iter().zip(SEVERITIES) {
            let mut words = line.splitn(2, ' ');
            let time = words.next().unwrap();
            assert!(humantime::parse_rfc3339(time).is_ok(), "{line}");
            let rest = words.next().unwrap();
            assert!(
                rest.starts_with(&format!("{want}:  agent{{member=\"node1\"}}: ")),
                "{line}"
            );
        }
        assert!(
            lines[2].ends_with(r#"decision role="leader" reason="I hold \"the\" key""#),
            "{}",
            lines[2]
        );
    }
}
