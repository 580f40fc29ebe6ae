//! The `publish` and `status` subcommands.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::broker::{Broker, FunctionConsumer, OutMessage, QueueSpec};
use crate::cli::{BodySource, PublishArgs};
use crate::config::Config;
use crate::request::{valid_function_name, GoUrl, Request};
use crate::Error;

const PUBLISH_ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// A random version-4 UUID, the form the gateway uses for `X-Call-Id`.
pub(crate) fn new_call_id() -> String {
    let mut b = fastrand::u128(..).to_be_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Enqueues `args.count` requests as the gateway would and prints their call ids.
pub fn publish(config: &Config, args: &PublishArgs) -> Result<(), Error> {
    if !valid_function_name(&args.function) {
        return Err(Error::Usage(format!(
            "invalid function name {:?}: letters, digits, '-', '_' and '.' only",
            args.function
        )));
    }
    if let Some(url) = &args.callback {
        if GoUrl::parse(url).is_none() {
            return Err(Error::Usage(format!(
                "invalid callback URL {url:?}: expected scheme://host/path"
            )));
        }
    }
    let body = match &args.body {
        BodySource::Empty => Vec::new(),
        BodySource::Text(t) => t.clone().into_bytes(),
        BodySource::File(path) => std::fs::read(path)
            .map_err(|e| Error::Command(format!("reading {}: {e}", path.display())))?,
        BodySource::Stdin => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .map_err(|e| Error::Command(format!("reading standard input: {e}")))?;
            buf
        }
    };
    let subject = publish_subject(&config.subject, &args.function).ok_or_else(|| {
        Error::Usage(format!(
            "invalid function name {:?}: NAME or NAME.NAMESPACE expected",
            args.function
        ))
    })?;
    let broker = Broker::connect_once(config.into(), None)?;
    // The stream, never the consumer: that is the worker's, with the worker's settings.
    let (_, warnings) = broker.provision_stream(&QueueSpec::from(config))?;
    for warning in warnings {
        log::warn!("{warning}");
    }
    let mut ids = Vec::with_capacity(args.count);
    let messages: Vec<OutMessage> = (0..args.count)
        .map(|_| {
            let id = new_call_id();
            let start = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            let mut headers = vec![
                ("X-Call-Id".to_string(), id.clone()),
                ("X-Start-Time".to_string(), start.to_string()),
            ];
            if let Some(url) = &args.callback {
                headers.push(("X-Callback-Url".into(), url.clone()));
            }
            headers.extend(args.headers.iter().cloned());
            let req = Request {
                function: args.function.clone(),
                method: args.method.clone(),
                path: args.path.clone(),
                query: args.query.clone(),
                headers,
                body: body.clone(),
                callback_url: args.callback.clone(),
                annotations: BTreeMap::new(),
            };
            ids.push(id.clone());
            OutMessage {
                id,
                headers: Vec::new(),
                data: req.encode(),
            }
        })
        .collect();
    broker.publish_all(&subject, &messages, PUBLISH_ACK_TIMEOUT)?;
    broker.shutdown(Duration::from_secs(2));
    let mut out = std::io::stdout().lock();
    for id in ids {
        let _ = writeln!(out, "{id}");
    }
    Ok(())
}

/// Prints the stream and consumer counters, and function mode's consumers when there are any
/// (whatever `scaling_mode` says: they may be left by another worker).
pub fn status(config: &Config, json: bool) -> Result<(), Error> {
    let broker = Broker::connect_once(config.into(), None)?;
    let stream = broker.queue_stream(&QueueSpec::from(config))?;
    let state = broker.queue_state(&stream, &config.durable)?;
    let functions = broker.function_consumers(&stream, &config.durable, &config.subject)?;
    let dead = match &config.dead_letter_subject {
        Some(subject) => broker.dead_letter_count(subject)?,
        None => None,
    };
    broker.shutdown(Duration::from_secs(2));
    if json {
        println!(
            "{}",
            serde_json::to_string(&StatusJson {
                state: &state,
                function_consumers: &functions,
                dead_letter_stream: dead.as_ref().map(|(name, _)| name.as_str()),
                dead_letters: dead.as_ref().map(|(_, n)| *n),
            })
            .map_err(|e| Error::Command(e.to_string()))?
        );
    } else {
        println!(
            "stream {} (subjects: {})\n  messages     {}\n  bytes        {}\n  last seq     {}\nconsumer {}{}\n  pending      {}\n  ack pending  {}\n  redelivered  {}\n  waiting      {}",
            state.stream,
            state.subjects.join(", "),
            state.messages,
            state.bytes,
            state.last_seq,
            state.consumer,
            if state.consumer_created {
                ""
            } else {
                " (not created yet: the worker creates it when it starts)"
            },
            state.pending,
            state.ack_pending,
            state.redelivered,
            state.waiting
        );
        if !functions.is_empty() {
            print!("{}", function_table(&functions));
        }
        match (&config.dead_letter_subject, &dead) {
            (Some(_), Some((name, n))) => {
                println!("dead letters {name}\n  messages     {n}")
            }
            (Some(subject), None) => println!("dead letters: no stream captures {subject}"),
            (None, _) => {}
        }
    }
    Ok(())
}

/// The subject the gateway publishes a request for `function` to: `Q.NAME` or
/// `Q.NAME.NAMESPACE`. None for a name that cannot be one or two subject tokens.
fn publish_subject(queue: &str, function: &str) -> Option<String> {
    crate::broker::routable_function(function).then(|| format!("{queue}.{function}"))
}

/// Function mode's consumers, one line each: function, pending, ack pending, consumer.
fn function_table(consumers: &[FunctionConsumer]) -> String {
    let name = |c: &FunctionConsumer| c.function.clone().unwrap_or_else(|| "(plain)".into());
    let width = consumers
        .iter()
        .map(|c| name(c).len())
        .max()
        .unwrap_or(0)
        .max(8);
    let mut out = format!(
        "function consumers ({})\n  {:<width$}  {:>10}  {:>11}  consumer\n",
        consumers.len(),
        "function",
        "pending",
        "ack pending"
    );
    for c in consumers {
        out.push_str(&format!(
            "  {:<width$}  {:>10}  {:>11}  {}\n",
            name(c),
            c.pending,
            c.ack_pending,
            c.name
        ));
    }
    out
}

/// `status --json`: the queue counters and, with `dead_letter_subject`, the dead letters.
#[derive(serde::Serialize)]
struct StatusJson<'a> {
    #[serde(flatten)]
    state: &'a crate::broker::QueueState,
    /// Function mode's consumers (`function` null: the plain subject).
    #[serde(skip_serializing_if = "<[FunctionConsumer]>::is_empty")]
    function_consumers: &'a [FunctionConsumer],
    #[serde(skip_serializing_if = "Option::is_none")]
    dead_letter_stream: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dead_letters: Option<u64>,
}

#[cfg(test)]
mod tests {
    #[test]
    fn requests_are_published_under_the_queue() {
        use super::publish_subject as p;
        assert_eq!(p("q", "figlet").as_deref(), Some("q.figlet"));
        assert_eq!(
            p("q", "figlet.openfaas-fn").as_deref(),
            Some("q.figlet.openfaas-fn")
        );
        for bad in ["", "a..b", "a.", "a.b.c", "a*", "a>", "a b"] {
            assert_eq!(p("q", bad), None, "{bad:?}");
        }
    }

    #[test]
    fn function_consumers_are_listed_one_a_line() {
        let c = |function: Option<&str>, pending, ack_pending| super::FunctionConsumer {
            name: crate::broker::consumer_name("w", function),
            function: function.map(String::from),
            pending,
            ack_pending,
            waiting: 0,
            redelivered: 0,
        };
        let table =
            super::function_table(&[c(None, 1, 0), c(Some("figlet.openfaas-fn"), 20000, 16)]);
        assert_eq!(
            table,
            "function consumers (2)\n\
             \x20 function               pending  ack pending  consumer\n\
             \x20 (plain)                      1            0  w-plain\n\
             \x20 figlet.openfaas-fn       20000           16  w-fn-figlet_openfaas-fn\n"
        );
    }

    #[test]
    fn call_ids_are_uuid_v4() {
        let id = super::new_call_id();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!("89ab".contains(&id[19..20]));
        assert_ne!(id, super::new_call_id());
    }
}
