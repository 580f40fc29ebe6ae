//! The OpenFaaS `QueueRequest` (faas-provider types/queue.go) as the gateway writes it.
//!
//! Decoding accepts every layout the gateway has produced: the legacy one with every key and
//! `null`s, the current one with omitted keys, Go's `\u0026` escapes and unknown keys. `Body` is
//! standard base64 and `CallbackUrl` is Go's `url.URL` object. Encoding writes the current layout.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::url::{self as gourl, Mode, UrlError};

const BASE64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// An invocation taken off the queue, ready to be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Request {
    pub(crate) function: String,
    /// The queued method, `POST` when it was empty.
    pub(crate) method: String,
    /// Path below the function, always starting with `/`.
    pub(crate) path: String,
    pub(crate) query: String,
    /// Queued headers in order, one entry per value.
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
    pub(crate) callback_url: Option<String>,
    pub(crate) annotations: BTreeMap<String, String>,
}

/// Why a message is not a usable request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DecodeError {
    Json(String),
    NoFunction,
    BadFunction(String),
    BadBody(String),
    BadMethod(String),
    BadPath(UrlError),
    BadQuery(UrlError),
}

impl DecodeError {
    /// The `reason` label of `queue_worker_malformed_messages_total`.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            DecodeError::Json(_) => "json",
            DecodeError::NoFunction | DecodeError::BadFunction(_) => "function",
            DecodeError::BadBody(_) => "body",
            DecodeError::BadMethod(_) => "method",
            DecodeError::BadPath(_) => "path",
            DecodeError::BadQuery(_) => "query",
        }
    }
}

/// Methods a queued request may use; anything else (CONNECT, TRACE, inventions) is refused.
pub(crate) const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Json(e) => write!(f, "not a QueueRequest JSON object: {e}"),
            DecodeError::NoFunction => write!(f, "no Function in the request"),
            DecodeError::BadFunction(name) => write!(f, "invalid Function name {name:?}"),
            DecodeError::BadBody(e) => write!(f, "Body is not standard base64: {e}"),
            DecodeError::BadMethod(m) => {
                write!(f, "Method {m:?} is not one of {}", METHODS.join(", "))
            }
            DecodeError::BadPath(e) | DecodeError::BadQuery(e) => write!(f, "{e}"),
        }
    }
}

/// `BadPath` and `BadQuery` are their [`UrlError`] (its `Display` is theirs), not a cause.
impl std::error::Error for DecodeError {}

#[derive(Deserialize, Serialize, Default)]
#[serde(rename_all = "PascalCase")]
struct Wire {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    header: Option<BTreeMap<String, Option<Vec<String>>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    body: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    query_string: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    function: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    queue_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    callback_url: Option<GoUrl>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    annotations: Option<BTreeMap<String, String>>,
}

/// Go's `net/url.URL` as encoding/json writes it.
#[derive(Deserialize, Serialize, Default, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "PascalCase", default)]
pub struct GoUrl {
    pub(crate) scheme: String,
    opaque: String,
    /// `*Userinfo` has no exported fields: Go writes `{}` or `null`, never the credentials.
    pub(crate) user: Option<serde_json::Value>,
    pub(crate) host: String,
    pub(crate) path: String,
    raw_path: String,
    omit_host: bool,
    force_query: bool,
    raw_query: String,
    pub(crate) fragment: String,
    raw_fragment: String,
}

impl GoUrl {
    /// Rebuilds the URL as Go's `URL.String()` does for the forms the gateway produces
    /// (Go drops the password of a user, so none is written).
    fn to_url(&self) -> String {
        let mut out = String::new();
        if !self.scheme.is_empty() {
            out.push_str(&self.scheme);
            out.push(':');
        }
        if !self.opaque.is_empty() {
            out.push_str(&self.opaque);
        } else {
            if !self.host.is_empty() || !self.scheme.is_empty() {
                out.push_str("//");
                out.push_str(&self.host);
            }
            gourl::escaped_path_into(&mut out, &self.path, &self.raw_path);
        }
        if self.force_query || !self.raw_query.is_empty() {
            out.push('?');
            out.push_str(&self.raw_query);
        }
        if !self.fragment.is_empty() {
            out.push('#');
            let valid_raw = !self.raw_fragment.is_empty()
                && gourl::unescape(&self.raw_fragment).as_deref() == Some(self.fragment.as_str())
                && !self
                    .raw_fragment
                    .contains(|c: char| c.is_ascii_control() || c == ' ');
            if valid_raw {
                out.push_str(&self.raw_fragment);
            } else {
                gourl::escape_into(&mut out, &self.fragment, Mode::Fragment);
            }
        }
        out
    }

    /// Parses a `scheme://[user@]host/path?query#fragment` URL into Go's fields as
    /// `url.Parse` does: `Path` and `Fragment` decoded, `RawPath` and `RawFragment` set only
    /// when re-escaping would not give the original back. The tests' `go_url` uses it too.
    pub fn parse(url: &str) -> Option<GoUrl> {
        if url.contains(|c: char| c.is_ascii_control() || c == ' ') {
            return None;
        }
        let (scheme, rest) = url.split_once("://")?;
        if !scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            || !scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        {
            return None;
        }
        let (rest, fragment) = match rest.split_once('#') {
            Some((r, f)) => (r, f),
            None => (rest, ""),
        };
        let (rest, raw_query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        // Go keeps the user, but encoding/json sees only unexported fields: `{}`.
        let (user, host) = match authority.rsplit_once('@') {
            Some((_, h)) => (Some(serde_json::json!({})), h),
            None => (None, authority),
        };
        if host.is_empty() {
            return None;
        }
        let (path, raw_path) = gourl::decode_pair(path, Mode::Path)?;
        let (fragment, raw_fragment) = gourl::decode_pair(fragment, Mode::Fragment)?;
        Some(GoUrl {
            scheme: scheme.to_ascii_lowercase(),
            user,
            host: host.to_string(),
            path,
            raw_path,
            force_query: raw_query == Some(""),
            raw_query: raw_query.unwrap_or_default().to_string(),
            fragment,
            raw_fragment,
            ..GoUrl::default()
        })
    }
}

/// A function name usable in a URL and as a metric label: `name` or `name.namespace`.
pub(crate) fn valid_function_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
}

impl Request {
    /// Decodes a queued message.
    pub(crate) fn decode(data: &[u8]) -> Result<Request, DecodeError> {
        let wire: Wire =
            serde_json::from_slice(data).map_err(|e| DecodeError::Json(e.to_string()))?;
        let function = wire.function.unwrap_or_default();
        if function.is_empty() {
            return Err(DecodeError::NoFunction);
        }
        if !valid_function_name(&function) {
            return Err(DecodeError::BadFunction(function));
        }
        let body = match wire.body.as_deref() {
            None | Some("") => Vec::new(),
            Some(b64) => BASE64
                .decode(b64)
                .map_err(|e| DecodeError::BadBody(e.to_string()))?,
        };
        let method = match wire.method.unwrap_or_default() {
            m if m.is_empty() => "POST".to_string(),
            m => match METHODS.iter().find(|known| known.eq_ignore_ascii_case(&m)) {
                Some(known) => known.to_string(),
                None => return Err(DecodeError::BadMethod(m)),
            },
        };
        let path = match wire.path.unwrap_or_default() {
            p if p.is_empty() => "/".to_string(),
            p if p.starts_with('/') => p,
            p => format!("/{p}"),
        };
        gourl::check_path(&path).map_err(DecodeError::BadPath)?;
        let query = wire.query_string.unwrap_or_default();
        gourl::check_query(&query).map_err(DecodeError::BadQuery)?;
        let headers = wire
            .header
            .unwrap_or_default()
            .into_iter()
            .flat_map(|(name, values)| {
                values
                    .unwrap_or_default()
                    .into_iter()
                    .map(move |v| (name.clone(), v))
            })
            .collect();
        Ok(Request {
            function,
            method,
            path,
            query,
            headers,
            body,
            callback_url: wire
                .callback_url
                .map(|u| u.to_url())
                .filter(|u| !u.is_empty()),
            annotations: wire.annotations.unwrap_or_default(),
        })
    }

    /// Encodes the request in the gateway's current layout.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut header: BTreeMap<String, Option<Vec<String>>> = BTreeMap::new();
        for (name, value) in &self.headers {
            header
                .entry(name.clone())
                .or_insert_with(|| Some(Vec::new()))
                .get_or_insert_with(Vec::new)
                .push(value.clone());
        }
        let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_string());
        let wire = Wire {
            header: (!header.is_empty()).then_some(header),
            body: (!self.body.is_empty()).then(|| BASE64.encode(&self.body)),
            method: Some(self.method.clone()),
            path: non_empty(if self.path == "/" { "" } else { &self.path }),
            query_string: non_empty(&self.query),
            function: Some(self.function.clone()),
            callback_url: self.callback_url.as_deref().and_then(GoUrl::parse),
            annotations: (!self.annotations.is_empty()).then(|| self.annotations.clone()),
            ..Wire::default()
        };
        serde_json::to_vec(&wire).expect("a request always serializes")
    }

    /// `/function/{name}{path}` plus `?query` when there is one, the path escaped as Go's
    /// `url.URL.EscapedPath` does (the gateway queues it decoded).
    pub(crate) fn invoke_path(&self) -> String {
        let mut p = String::with_capacity(10 + self.function.len() + self.path.len());
        p.push_str("/function/");
        p.push_str(&self.function);
        gourl::escape_into(&mut p, &self.path, Mode::Path);
        if !self.query.is_empty() {
            p.push('?');
            gourl::escape_query_into(&mut p, &self.query);
        }
        p
    }

    /// The first value of a header, by case-insensitive name.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The `X-Call-Id` the gateway gave this invocation.
    pub(crate) fn call_id(&self) -> Option<&str> {
        self.header("X-Call-Id")
    }
}

/// The gateway test vectors and Go's JSON encoding: one loader, shared with tests/core.rs.
#[cfg(test)]
#[path = "../tests/support/vectors.rs"]
mod vectors;

#[cfg(test)]
mod tests {
    use super::vectors::{self, go_json as go_style_json};
    use super::*;

    #[derive(Deserialize)]
    struct Case {
        case: String,
        message: serde_json::Value,
        expect: Expect,
    }

    #[derive(Deserialize)]
    struct Expect {
        invoke: String,
        method: String,
        body_b64: String,
        callback: Option<String>,
    }

    fn cases() -> Vec<Case> {
        vectors::vectors()
            .into_iter()
            .map(|v| serde_json::from_value(v).expect("vector has case, message and expect"))
            .collect()
    }

    #[test]
    fn decodes_every_gateway_vector() {
        let cases = cases();
        assert!(cases.len() >= 7);
        for case in cases {
            // Go's encoder escapes &, < and >; decode the bytes exactly as Go wrote them.
            let bytes = go_style_json(&case.message);
            let req = Request::decode(&bytes).unwrap_or_else(|e| panic!("{}: {e}", case.case));
            assert_eq!(req.invoke_path(), case.expect.invoke, "{}", case.case);
            assert_eq!(req.method, case.expect.method, "{}", case.case);
            assert_eq!(
                BASE64.encode(&req.body),
                case.expect.body_b64,
                "{}",
                case.case
            );
            assert_eq!(req.callback_url, case.expect.callback, "{}", case.case);
        }
    }

    #[test]
    fn go_escapes_decode() {
        let json = br#"{"Function":"f","QueryString":"a=1\u0026b=\u003cx\u003e","Body":null}"#;
        let req = Request::decode(json).unwrap();
        assert_eq!(req.query, "a=1&b=<x>");
        assert_eq!(req.invoke_path(), "/function/f/?a=1&b=<x>");
    }

    #[test]
    fn multi_valued_headers_and_annotations() {
        let case = cases()
            .into_iter()
            .find(|c| c.case == "current-annotations-multi-header")
            .unwrap();
        let req = Request::decode(&go_style_json(&case.message)).unwrap();
        let accepts: Vec<_> = req.headers.iter().filter(|(n, _)| n == "Accept").collect();
        assert_eq!(accepts.len(), 2);
        assert_eq!(req.call_id(), Some("3333"));
        assert_eq!(req.annotations["com.openfaas.retry.attempts"], "3");
    }

    #[test]
    fn unknown_keys_and_null_header_values_are_ignored() {
        let json = br#"{"Function":"f","Header":{"X-A":null,"X-B":["1"]},"NewField":{"x":1}}"#;
        let req = Request::decode(json).unwrap();
        assert_eq!(req.headers, vec![("X-B".to_string(), "1".to_string())]);
    }

    #[test]
    fn malformed_messages_say_why() {
        type Check = fn(&DecodeError) -> bool;
        let cases: &[(&[u8], Check)] = &[
            (b"not json", |e| matches!(e, DecodeError::Json(_))),
            (b"[1,2]", |e| matches!(e, DecodeError::Json(_))),
            (b"", |e| matches!(e, DecodeError::Json(_))),
            (br#"{"Body":"dGVzdA=="}"#, |e| *e == DecodeError::NoFunction),
            (br#"{"Function":""}"#, |e| *e == DecodeError::NoFunction),
            (br#"{"Function":null}"#, |e| *e == DecodeError::NoFunction),
            (br#"{"Function":"a/b"}"#, |e| {
                matches!(e, DecodeError::BadFunction(_))
            }),
            (br#"{"Function":"f?x=1"}"#, |e| {
                matches!(e, DecodeError::BadFunction(_))
            }),
            (br#"{"Function":"f","Body":"not base64!"}"#, |e| {
                matches!(e, DecodeError::BadBody(_))
            }),
            (br#"{"Function":"f","Body":"dGVzdA"}"#, |e| {
                matches!(e, DecodeError::BadBody(_))
            }),
            (br#"{"Function":"f","Method":"GE T"}"#, |e| {
                matches!(e, DecodeError::BadMethod(_))
            }),
            (br#"{"Function":"f","Body":5}"#, |e| {
                matches!(e, DecodeError::Json(_))
            }),
        ];
        for (data, check) in cases {
            let err = Request::decode(data).expect_err(&String::from_utf8_lossy(data));
            assert!(check(&err), "{}: {err:?}", String::from_utf8_lossy(data));
            assert!(!err.to_string().is_empty());
        }
    }

    #[test]
    fn encode_round_trips_in_the_current_layout() {
        let req = Request {
            function: "figlet".into(),
            method: "PUT".into(),
            path: "/sub".into(),
            query: "a=1&b=2".into(),
            headers: vec![
                ("Accept".into(), "text/html".into()),
                ("Accept".into(), "application/json".into()),
                ("X-Call-Id".into(), "abc".into()),
            ],
            body: vec![0, 1, 2, 255],
            callback_url: Some("http://cb.example:8080/hook?x=1#f".into()),
            annotations: BTreeMap::new(),
        };
        let bytes = req.encode();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["Body"], "AAEC/w==");
        assert_eq!(v["Header"]["Accept"][1], "application/json");
        assert_eq!(v["CallbackUrl"]["Host"], "cb.example:8080");
        assert_eq!(v["CallbackUrl"]["RawQuery"], "x=1");
        assert!(v.get("Host").is_none() && v.get("Annotations").is_none());
        assert_eq!(Request::decode(&bytes).unwrap(), req);
    }

    #[test]
    fn hostile_paths_queries_and_methods_are_refused() {
        let decode = |v: serde_json::Value| Request::decode(v.to_string().as_bytes());
        for path in [
            "/../../admin",
            "/%2e%2e/%2e%2e/admin",
            "\\..\\admin",
            "/a\r\nX: y",
            "/\0",
        ] {
            let err = decode(serde_json::json!({"Function": "f", "Path": path})).unwrap_err();
            assert_eq!(err.reason(), "path", "{path:?}: {err}");
        }
        for query in ["a=1#frag", "a=1\r\nX: y"] {
            let err =
                decode(serde_json::json!({"Function": "f", "QueryString": query})).unwrap_err();
            assert_eq!(err.reason(), "query", "{query:?}");
        }
        for method in ["CONNECT", "TRACE", "PROPFIND", "GE T"] {
            let err = decode(serde_json::json!({"Function": "f", "Method": method})).unwrap_err();
            assert_eq!(err.reason(), "method", "{method}");
            assert!(err.to_string().contains("GET, HEAD, POST"), "{err}");
        }
        let ok = decode(serde_json::json!({"Function": "f", "Method": "patch"})).unwrap();
        assert_eq!(ok.method, "PATCH");
    }

    #[test]
    fn paths_are_escaped_like_go() {
        let req = Request::decode(
            r#"{"Function":"echo","Path":"/a b/\u00fc#x?y","QueryString":"q=1"}"#.as_bytes(),
        )
        .unwrap();
        assert_eq!(req.invoke_path(), "/function/echo/a%20b/%C3%BC%23x%3Fy?q=1");
        let inside = Request::decode(br#"{"Function":"echo","Path":"/a/../b"}"#).unwrap();
        assert_eq!(inside.invoke_path(), "/function/echo/a/../b");
    }

    #[test]
    fn callback_urls_round_trip_escaped_paths() {
        for url in [
            "http://h/cb/a%20b",
            "http://h:8080/cb/%C3%BC?x=1&y=%20#frag",
            "http://h/a!b",
            "http://h/a%2Fb",
            "https://h/",
            "http://h",
        ] {
            let parsed = GoUrl::parse(url).unwrap_or_else(|| panic!("{url}"));
            assert_eq!(parsed.to_url(), url);
        }
        // `publish --callback` queues the decoded path; the rebuild escapes it once.
        let u = GoUrl::parse("http://h/cb/a%20b").unwrap();
        assert_eq!((u.path.as_str(), u.raw_path.as_str()), ("/cb/a b", ""));
        let u = GoUrl::parse("http://user:pw@h/x").unwrap();
        assert_eq!(u.host, "h");
        assert_eq!(u.to_url(), "http://h/x");
        assert_eq!(GoUrl::parse("http://h/a%zz"), None);
        assert_eq!(GoUrl::parse("http://h/a b"), None);
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics_on_bytes(data in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = Request::decode(&data);
        }

        #[test]
        fn decode_never_panics_on_near_valid_json(
            function in "[a-z.-]{0,8}",
            path in "\\PC{0,20}|[./%2e\\\\]{0,20}",
            query in "\\PC{0,20}",
            method in "[A-Za-z ]{0,8}",
            body in "[A-Za-z0-9+/=]{0,12}",
            header in "\\PC{0,20}",
        ) {
            let json = serde_json::json!({
                "Function": function, "Path": path, "QueryString": query, "Method": method,
                "Body": body, "Header": {"X-A": [header]},
                "Annotations": {"com.openfaas.retry.min_wait": path},
            });
            if let Ok(req) = Request::decode(json.to_string().as_bytes()) {
                let p = req.invoke_path();
                let prefix = format!("/function/{}/", req.function);
                proptest::prop_assert!(p.starts_with(&prefix), "{}", p);
                proptest::prop_assert!(!p.contains(['\r', '\n', '\0', '#', ' ']), "{}", p);
            }
        }

        #[test]
        fn rebuilt_urls_parse_back(
            host in "[a-z0-9]{1,8}(:[0-9]{1,5})?",
            path in "(/\\PC{0,8}){0,3}",
            query in "([a-z0-9=&]{0,8})",
            fragment in "\\PC{0,6}",
        ) {
            let u = GoUrl { scheme: "http".into(), host, path, raw_query: query, fragment, ..GoUrl::default() };
            let url = u.to_url();
            let back = GoUrl::parse(&url).unwrap();
            proptest::prop_assert_eq!(&back.path, &u.path);
            proptest::prop_assert_eq!(&back.fragment, &u.fragment);
            proptest::prop_assert_eq!(back.to_url(), url);
        }
    }

    #[test]
    fn go_url_rebuild() {
        let u = GoUrl {
            scheme: "http".into(),
            host: "h:1".into(),
            path: "/a b".into(),
            ..GoUrl::default()
        };
        assert_eq!(u.to_url(), "http://h:1/a%20b");
        let forced = GoUrl {
            force_query: true,
            ..u.clone()
        };
        assert_eq!(forced.to_url(), "http://h:1/a%20b?");
        assert_eq!(GoUrl::parse("no-scheme"), None);
        assert_eq!(GoUrl::parse("http://"), None);
    }
}
