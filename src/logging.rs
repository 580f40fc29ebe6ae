//! Logging to stderr: readable console lines (coloured only on a terminal) or one JSON object a
//! line for Loki or ELK. Structured fields (`call_id`, `function`, `status`, `duration_ms`,
//! `attempt`, `stream_seq`) travel as `log` key-values and appear in both forms.

use std::io::{IsTerminal as _, Write as _};

use env_logger::fmt::Formatter;
use log::kv::{Key, Value, VisitSource};

use crate::config::{LogConfig, LogEncoding};

/// Installs the logger. `debug` raises this crate to debug level; `RUST_LOG` still applies on
/// top. Chatty dependencies stay at warn.
pub fn init(config: &LogConfig) {
    let mut builder = env_logger::Builder::new();
    builder
        .filter_level(log::LevelFilter::Info)
        .filter_module("ureq", log::LevelFilter::Warn)
        .filter_module("ureq_proto", log::LevelFilter::Warn)
        .filter_module("rustls", log::LevelFilter::Warn)
        .filter_module("nats", log::LevelFilter::Warn)
        // The crate logs every JetStream API error (such as "stream not found" on first start)
        // at error level; the worker reports the ones that matter itself.
        .filter_module("nats::jetstream", log::LevelFilter::Off)
        .target(env_logger::Target::Stderr);
    if config.debug {
        builder.filter_module("queue_worker", log::LevelFilter::Debug);
    }
    if let Ok(directives) = std::env::var("RUST_LOG") {
        builder.parse_filters(&directives);
    }
    match config.encoding {
        LogEncoding::Json => {
            // The JSON formatter never styles its output. "Always" passes lines straight to
            // stderr; "Never" would scan every byte for escape codes to strip.
            builder
                .write_style(env_logger::WriteStyle::Always)
                .format(format_json);
        }
        LogEncoding::Console => {
            // Coloured only on a terminal, decided once: with "Auto" every line would be
            // checked against the terminal and scanned for escape codes to strip.
            let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            builder
                .write_style(env_logger::WriteStyle::Always)
                .format(move |buf, record| format_console(buf, record, colour));
        }
    }
    if builder.try_init().is_ok() {
        log_panics();
    }
}

/// Panics go to the log (one JSON object with `log_encoding=json`) instead of raw stderr
/// lines. A panic while handling a message is then also logged with its stream sequence by
/// the worker, which terminates that message and goes on.
fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
            .unwrap_or("unknown panic");
        let thread = std::thread::current();
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        log::error!(
            "thread {} panicked at {at}: {what}",
            thread.name().unwrap_or("unnamed")
        );
    }));
}

/// One JSON object a line, written straight into the buffer (no intermediate map): the worker
/// logs every invocation, so this is on the hot path.
fn format_json(buf: &mut Formatter, record: &log::Record<'_>) -> std::io::Result<()> {
    let mut line = Vec::with_capacity(256);
    write!(line, "{{\"ts\":\"{}\",\"level\":\"", buf.timestamp_millis())?;
    line.extend_from_slice(level_name(record.level()).as_bytes());
    line.extend_from_slice(b"\",\"msg\":");
    match record.args().as_str() {
        Some(text) => json_string(&mut line, text),
        None => json_string(&mut line, &record.args().to_string()),
    }
    line.extend_from_slice(b",\"target\":");
    json_string(&mut line, record.target());
    let _ = record.key_values().visit(&mut JsonFields(&mut line));
    line.extend_from_slice(b"}\n");
    buf.write_all(&line)
}

fn level_name(level: log::Level) -> &'static str {
    match level {
        log::Level::Error => "error",
        log::Level::Warn => "warn",
        log::Level::Info => "info",
        log::Level::Debug => "debug",
        log::Level::Trace => "trace",
    }
}

fn json_string(out: &mut Vec<u8>, s: &str) {
    // Writing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

struct JsonFields<'a>(&'a mut Vec<u8>);

impl<'kvs> VisitSource<'kvs> for JsonFields<'_> {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), log::kv::Error> {
        let out = &mut *self.0;
        out.push(b',');
        json_string(out, key.as_str());
        out.push(b':');
        if let Some(n) = value.to_u64() {
            let _ = write!(out, "{n}");
        } else if let Some(n) = value.to_i64() {
            let _ = write!(out, "{n}");
        } else if let Some(f) = value.to_f64().filter(|f| f.is_finite()) {
            let _ = write!(out, "{f}");
        } else if let Some(b) = value.to_bool() {
            let _ = write!(out, "{b}");
        } else if let Some(text) = value.to_borrowed_str() {
            json_string(out, text);
        } else {
            json_string(out, &value.to_string());
        }
        Ok(())
    }
}

fn format_console(
    buf: &mut Formatter,
    record: &log::Record<'_>,
    colour: bool,
) -> std::io::Result<()> {
    let style = if colour {
        buf.default_level_style(record.level())
    } else {
        env_logger::fmt::style::Style::new()
    };
    // Messages and fields may carry queued text: one record is one line, whatever it holds.
    let message = match record.args().as_str() {
        Some(text) => std::borrow::Cow::Borrowed(text),
        None => std::borrow::Cow::Owned(record.args().to_string()),
    };
    write!(
        buf,
        "{} {style}{:<5}{style:#} {}",
        buf.timestamp_millis(),
        record.level(),
        one_line(&message)
    )?;
    let mut fields = ConsoleFields(String::new());
    let _ = record.key_values().visit(&mut fields);
    writeln!(buf, "{}", one_line(&fields.0))
}

/// `s` with control characters written as escapes (`\n`, `\u{1b}`), so that no text can start
/// a log line of its own or restyle the terminal.
fn one_line(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.contains(char::is_control) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

struct ConsoleFields(String);

impl<'kvs> VisitSource<'kvs> for ConsoleFields {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), log::kv::Error> {
        use std::fmt::Write as _;
        let _ = write!(self.0, " {key}={value}");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn console_lines_stay_one_line() {
        assert_eq!(super::one_line("plain ü"), "plain ü");
        assert_eq!(
            super::one_line("a\r\nINFO forged\u{1b}[31m"),
            "a\\r\\nINFO forged\\u{1b}[31m"
        );
    }
}
