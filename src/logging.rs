//! Logging to stderr: readable console lines (coloured only on a terminal) or one JSON object a
//! line for Loki or ELK. Structured fields (`call_id`, `function`, `status`, `duration_ms`,
//! `attempt`, `stream_seq`) travel as `log` key-values and appear in both forms.

use std::io::Write as _;

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
            builder
                .write_style(env_logger::WriteStyle::Never)
                .format(format_json);
        }
        LogEncoding::Console => {
            builder.format(format_console);
        }
    }
    let _ = builder.try_init();
}

fn format_json(buf: &mut Formatter, record: &log::Record<'_>) -> std::io::Result<()> {
    let mut line = serde_json::Map::new();
    line.insert("ts".into(), buf.timestamp_millis().to_string().into());
    line.insert(
        "level".into(),
        record.level().as_str().to_lowercase().into(),
    );
    line.insert("msg".into(), record.args().to_string().into());
    line.insert("target".into(), record.target().into());
    let mut fields = JsonFields(&mut line);
    let _ = record.key_values().visit(&mut fields);
    let text = serde_json::to_string(&line).map_err(std::io::Error::other)?;
    writeln!(buf, "{text}")
}

struct JsonFields<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl<'kvs> VisitSource<'kvs> for JsonFields<'_> {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), log::kv::Error> {
        let v = if let Some(n) = value.to_u64() {
            n.into()
        } else if let Some(n) = value.to_i64() {
            n.into()
        } else if let Some(f) = value.to_f64() {
            f.into()
        } else if let Some(b) = value.to_bool() {
            b.into()
        } else {
            value.to_string().into()
        };
        self.0.insert(key.as_str().to_string(), v);
        Ok(())
    }
}

fn format_console(buf: &mut Formatter, record: &log::Record<'_>) -> std::io::Result<()> {
    let style = buf.default_level_style(record.level());
    write!(
        buf,
        "{} {style}{:<5}{style:#} {}",
        buf.timestamp_millis(),
        record.level(),
        record.args()
    )?;
    let mut fields = ConsoleFields(String::new());
    let _ = record.key_values().visit(&mut fields);
    writeln!(buf, "{}", fields.0)
}

struct ConsoleFields(String);

impl<'kvs> VisitSource<'kvs> for ConsoleFields {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), log::kv::Error> {
        self.0.push_str(&format!(" {key}={value}"));
        Ok(())
    }
}
