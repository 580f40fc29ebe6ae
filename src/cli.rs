//! Command-line arguments. The worker itself takes its settings from the environment only.

use std::ffi::OsString;
use std::path::PathBuf;

use lexopt::prelude::*;

pub const USAGE: &str = "\
Usage:
  queue-worker [run]                   run the worker (configured by environment variables)
  queue-worker publish FUNCTION [OPTIONS]
                                       enqueue an invocation as the OpenFaaS gateway does;
                                       prints the X-Call-Id of each
  queue-worker status [--json]         print the stream and consumer state
  queue-worker --help | --version

Options of publish:
  -d, --data TEXT          request body
  -f, --data-file PATH     request body from a file ('-' reads standard input)
  -H, --header 'NAME: VALUE'
                           a request header (repeatable)
  -X, --method METHOD      HTTP method [POST]
      --path PATH          path below the function, such as /sub/path
      --query QUERY        query string, such as a=1&b=2
      --callback URL       where the worker POSTs the function's result
  -n, --count N            enqueue N requests, each with its own X-Call-Id [1]
";

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Run,
    Publish(PublishArgs),
    Status { json: bool },
    Help,
    Version,
}

/// Where a request body comes from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) enum BodySource {
    #[default]
    Empty,
    Text(String),
    File(PathBuf),
    Stdin,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishArgs {
    pub(crate) function: String,
    pub(crate) body: BodySource,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) query: String,
    pub(crate) callback: Option<String>,
    pub(crate) count: usize,
}

/// Parses the arguments after the program name.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, String> {
    let mut parser = lexopt::Parser::from_args(args);
    let command = match parser.next().map_err(|e| e.to_string())? {
        None => return Ok(Command::Run),
        Some(Short('h') | Long("help")) => return Ok(Command::Help),
        Some(Short('V') | Long("version")) => return Ok(Command::Version),
        Some(Value(v)) => v.string().map_err(|e| e.to_string())?,
        Some(other) => return Err(other.unexpected().to_string()),
    };
    let result = match command.as_str() {
        "run" => {
            if let Some(arg) = parser.next().map_err(|e| e.to_string())? {
                return Err(arg.unexpected().to_string());
            }
            Command::Run
        }
        "publish" => parse_publish(&mut parser)?,
        "status" => {
            let mut json = false;
            while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
                match arg {
                    Long("json") => json = true,
                    Short('h') | Long("help") => return Ok(Command::Help),
                    other => return Err(other.unexpected().to_string()),
                }
            }
            Command::Status { json }
        }
        "help" => Command::Help,
        other => return Err(format!("unknown command {other:?}")),
    };
    Ok(result)
}

fn parse_publish(parser: &mut lexopt::Parser) -> Result<Command, String> {
    let err = |e: lexopt::Error| e.to_string();
    let mut function = None;
    let mut args = PublishArgs {
        function: String::new(),
        body: BodySource::Empty,
        headers: Vec::new(),
        method: "POST".into(),
        path: String::new(),
        query: String::new(),
        callback: None,
        count: 1,
    };
    while let Some(arg) = parser.next().map_err(err)? {
        match arg {
            Short('d') | Long("data") => {
                args.body = BodySource::Text(parser.value().map_err(err)?.string().map_err(err)?)
            }
            Short('f') | Long("data-file") => {
                let path = PathBuf::from(parser.value().map_err(err)?);
                args.body = if path.as_os_str() == "-" {
                    BodySource::Stdin
                } else {
                    BodySource::File(path)
                };
            }
            Short('H') | Long("header") => {
                let h = parser.value().map_err(err)?.string().map_err(err)?;
                let (name, value) = h
                    .split_once(':')
                    .filter(|(n, _)| !n.trim().is_empty())
                    .ok_or_else(|| format!("invalid header {h:?}: expected 'NAME: VALUE'"))?;
                args.headers
                    .push((name.trim().to_string(), value.trim().to_string()));
            }
            Short('X') | Long("method") => {
                args.method = parser
                    .value()
                    .map_err(err)?
                    .string()
                    .map_err(err)?
                    .to_ascii_uppercase()
            }
            Long("path") => args.path = parser.value().map_err(err)?.string().map_err(err)?,
            Long("query") => args.query = parser.value().map_err(err)?.string().map_err(err)?,
            Long("callback") => {
                args.callback = Some(parser.value().map_err(err)?.string().map_err(err)?)
            }
            Short('n') | Long("count") => {
                let n: usize = parser.value().map_err(err)?.parse().map_err(err)?;
                if n == 0 {
                    return Err("--count must be at least 1".into());
                }
                args.count = n;
            }
            Short('h') | Long("help") => return Ok(Command::Help),
            Value(v) if function.is_none() => function = Some(v.string().map_err(err)?),
            other => return Err(other.unexpected().to_string()),
        }
    }
    args.function = function.ok_or("publish needs a FUNCTION name")?;
    Ok(Command::Publish(args))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(args: &[&str]) -> Result<Command, String> {
        parse(args.iter().map(OsString::from))
    }

    #[test]
    fn commands() {
        assert_eq!(parse_str(&[]), Ok(Command::Run));
        assert_eq!(parse_str(&["run"]), Ok(Command::Run));
        assert_eq!(parse_str(&["--help"]), Ok(Command::Help));
        assert_eq!(parse_str(&["-V"]), Ok(Command::Version));
        assert_eq!(
            parse_str(&["status", "--json"]),
            Ok(Command::Status { json: true })
        );
        assert!(parse_str(&["frobnicate"]).is_err());
        assert!(parse_str(&["run", "extra"]).is_err());
    }

    #[test]
    fn publish_options() {
        let Ok(Command::Publish(p)) = parse_str(&[
            "publish",
            "figlet",
            "-d",
            "hi",
            "-H",
            "X-A: 1",
            "--header=Content-Type: text/plain",
            "-X",
            "put",
            "--path",
            "/sub",
            "--query",
            "a=1",
            "--callback",
            "http://cb/x",
            "-n",
            "3",
        ]) else {
            panic!("expected publish");
        };
        assert_eq!(p.function, "figlet");
        assert_eq!(p.body, BodySource::Text("hi".into()));
        assert_eq!(p.headers.len(), 2);
        assert_eq!(p.headers[1], ("Content-Type".into(), "text/plain".into()));
        assert_eq!(p.method, "PUT");
        assert_eq!((p.path.as_str(), p.query.as_str()), ("/sub", "a=1"));
        assert_eq!(p.callback.as_deref(), Some("http://cb/x"));
        assert_eq!(p.count, 3);
    }

    #[test]
    fn publish_errors() {
        assert!(parse_str(&["publish"]).is_err());
        assert!(parse_str(&["publish", "f", "-H", "novalue"]).is_err());
        assert!(parse_str(&["publish", "f", "-n", "0"]).is_err());
        assert!(parse_str(&["publish", "f", "g"]).is_err());
        let Ok(Command::Publish(p)) = parse_str(&["publish", "f", "-f", "-"]) else {
            panic!()
        };
        assert_eq!(p.body, BodySource::Stdin);
    }
}
