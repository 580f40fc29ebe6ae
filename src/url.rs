//! URL pieces as Go's `net/url` writes and reads them, and the checks that keep a queued path
//! inside `/function/NAME/`.
//!
//! The gateway queues `r.URL.Path` (decoded) and `CallbackUrl` as Go's `url.URL` object. The
//! worker escapes a path the way `url.URL.EscapedPath` does, rebuilds a callback URL the way
//! `URL.String` does, and parses `publish --callback` the way `url.Parse` does. The tests'
//! `go_url` helper uses these same functions.

use std::fmt;

/// Which part of a URL a text is escaped for (Go's `encodePath`, `encodeFragment`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Path,
    Fragment,
}

/// Go's `shouldEscape` for paths and fragments.
fn should_escape(c: u8, mode: Mode) -> bool {
    if c.is_ascii_alphanumeric() {
        return false;
    }
    match c {
        b'-' | b'_' | b'.' | b'~' => return false,
        b'$' | b'&' | b'+' | b',' | b'/' | b':' | b';' | b'=' | b'?' | b'@' => {
            return match mode {
                Mode::Path => c == b'?',
                Mode::Fragment => false,
            }
        }
        _ => {}
    }
    !(mode == Mode::Fragment && matches!(c, b'!' | b'(' | b')' | b'*'))
}

/// Go's `escape(s, mode)`: every byte that should be escaped becomes `%XX`.
pub(crate) fn escape_into(out: &mut String, s: &str, mode: Mode) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in s.as_bytes() {
        if should_escape(b, mode) {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        } else {
            out.push(char::from(b));
        }
    }
}

pub(crate) fn escape(s: &str, mode: Mode) -> String {
    let mut out = String::with_capacity(s.len());
    escape_into(&mut out, s, mode);
    out
}

/// Appends a queued `QueryString` as a request line can carry it: printable ASCII as queued
/// (`%` escapes included; `#` is refused earlier), a space, a control byte or a non-ASCII byte
/// as `%XX`, so the request line stays one line of three parts.
pub(crate) fn escape_query_into(out: &mut String, query: &str) {
    for &c in query.as_bytes() {
        if c.is_ascii_graphic() {
            out.push(c as char);
        } else {
            out.push('%');
            out.push(char::from(b"0123456789ABCDEF"[usize::from(c >> 4)]));
            out.push(char::from(b"0123456789ABCDEF"[usize::from(c & 15)]));
        }
    }
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Go's `unescape` for paths and fragments: `None` on a bad `%` escape or a result that is not
/// UTF-8 (which a Rust string cannot hold).
pub(crate) fn unescape(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c == b'%' {
            let hi = hex(*b.get(i + 1)?)?;
            let lo = hex(*b.get(i + 2)?)?;
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(c);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Decodes the `%XX` escapes that are valid and keeps everything else as it is, the way a
/// lenient proxy might.
fn unescape_lenient(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while let Some(&c) = s.get(i) {
        let decoded = (c == b'%')
            .then(|| Some(hex(*s.get(i + 1)?)? << 4 | hex(*s.get(i + 2)?)?))
            .flatten();
        match decoded {
            Some(d) => {
                out.push(d);
                i += 3;
            }
            None => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// Go's `validEncoded(s, encodePath)`: whether `s` can stand as the escaped form of a path.
fn valid_encoded_path(s: &str) -> bool {
    s.bytes().all(|c| {
        matches!(
            c,
            b'!' | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b':'
                | b'@'
                | b'['
                | b']'
                | b'%'
        ) || !should_escape(c, Mode::Path)
    })
}

/// Go's `URL.EscapedPath`: `raw` when it is a valid encoding of `path`, else `path` escaped.
pub(crate) fn escaped_path_into(out: &mut String, path: &str, raw: &str) {
    if !raw.is_empty() && valid_encoded_path(raw) && unescape(raw).as_deref() == Some(path) {
        out.push_str(raw);
    } else if path == "*" {
        out.push('*');
    } else {
        escape_into(out, path, Mode::Path);
    }
}

/// Go's `setPath` / `setFragment`: the decoded text, and the original when re-escaping the
/// decoded text would not give it back (else empty).
pub(crate) fn decode_pair(escaped: &str, mode: Mode) -> Option<(String, String)> {
    let decoded = unescape(escaped)?;
    let raw = if escape(&decoded, mode) == escaped {
        String::new()
    } else {
        escaped.to_string()
    };
    Some((decoded, raw))
}

/// Why a queued `Path` or `QueryString` is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum UrlError {
    /// CR, LF or NUL (also `%0D`, `%0A`, `%00`).
    ControlInPath,
    /// `.`/`..` segments (also `%2e`, also with `\`) that would leave `/function/NAME/`.
    LeavesPrefix,
    /// CR, LF, NUL or `#` in the query.
    BadQuery,
}

impl fmt::Display for UrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UrlError::ControlInPath => write!(f, "Path holds CR, LF or NUL"),
            UrlError::LeavesPrefix => {
                write!(f, "Path has dot segments that leave /function/NAME/")
            }
            UrlError::BadQuery => write!(f, "QueryString holds CR, LF, NUL or '#'"),
        }
    }
}

impl std::error::Error for UrlError {}

/// How many times a path is decoded when looking for hidden dot segments (`%252e` is `%2e`
/// after one proxy and `.` after two).
const DECODE_ROUNDS: usize = 3;

/// Checks a queued (decoded) `Path` as it would be read by the gateway and by any proxy that
/// decodes escapes or treats `\` as `/`: none of these readings may climb out of the
/// function's prefix, and none may hold CR, LF or NUL.
pub(crate) fn check_path(path: &str) -> Result<(), UrlError> {
    let mut reading = path.as_bytes().to_vec();
    for round in 0..=DECODE_ROUNDS {
        if reading.iter().any(|c| matches!(c, b'\r' | b'\n' | 0)) {
            return Err(UrlError::ControlInPath);
        }
        if climbs_out(&reading) {
            return Err(UrlError::LeavesPrefix);
        }
        if round == DECODE_ROUNDS {
            break;
        }
        let next = unescape_lenient(&reading);
        if next == reading {
            break;
        }
        reading = next;
    }
    Ok(())
}

/// Whether normalising the dot segments of a path below `/function/NAME` would leave it.
/// Empty segments do not count as depth, as a proxy may merge slashes.
fn climbs_out(path: &[u8]) -> bool {
    let mut depth = 0usize;
    for segment in path.split(|c| *c == b'/' || *c == b'\\') {
        match segment {
            b"" | b"." => {}
            b".." => match depth.checked_sub(1) {
                Some(d) => depth = d,
                None => return true,
            },
            _ => depth += 1,
        }
    }
    false
}

/// A queued `QueryString` is sent as it is, but may not end the request line or cut it.
pub(crate) fn check_query(query: &str) -> Result<(), UrlError> {
    if query.bytes().any(|c| matches!(c, b'\r' | b'\n' | 0 | b'#')) {
        return Err(UrlError::BadQuery);
    }
    Ok(())
}

/// A URL for a log line: user information replaced by `***`, query and fragment left out
/// when `keep_query` is false (they may hold tokens).
pub(crate) fn redact(url: &str, keep_query: bool) -> String {
    let (before, after) = match url.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), url),
    };
    let end = after.find(['/', '?', '#']).unwrap_or(after.len());
    let (authority, rest) = after.split_at(end);
    // A user name helps whoever reads the log; a password or a token is shown as `***`.
    let host = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => format!("***@{host}"),
        },
        None => authority.to_string(),
    };
    let rest = if keep_query {
        rest
    } else {
        let cut = rest.find(['?', '#']).unwrap_or(rest.len());
        &rest[..cut]
    };
    format!("{before}{host}{rest}")
}

/// Whether a URL carries `user:password@` or `token@`.
pub(crate) fn has_userinfo(url: &str) -> bool {
    redact(url, true) != url
}

/// Several comma-separated URLs, each redacted (query kept).
pub(crate) fn redact_list(urls: &[String]) -> String {
    urls.iter()
        .map(|u| redact(u, true))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn escapes_like_go() {
        assert_eq!(escape("/a b/ü#?%", Mode::Path), "/a%20b/%C3%BC%23%3F%25");
        assert_eq!(escape("/a!b(c)*'", Mode::Path), "/a%21b%28c%29%2A%27");
        assert_eq!(escape("/x:y@z;a=b&c+d,$", Mode::Path), "/x:y@z;a=b&c+d,$");
        assert_eq!(escape("f!(x)?", Mode::Fragment), "f!(x)?");
        let mut out = String::new();
        escaped_path_into(&mut out, "/a b", "/a%20b");
        escaped_path_into(&mut out, "/a!b", "/a!b");
        escaped_path_into(&mut out, "/a b", "/bogus");
        assert_eq!(out, "/a%20b/a!b/a%20b");
    }

    #[test]
    fn dot_segments_that_leave_the_prefix_are_refused() {
        for bad in [
            "/../../admin",
            "/..",
            "/x/../..",
            "/%2e%2e/%2e%2e/admin",
            "/%2E%2E",
            "/.%2e/x",
            "/%252e%252e/admin",
            "\\..\\admin",
            "/a//..//../b",
            "/..\\x",
        ] {
            assert_eq!(check_path(bad), Err(UrlError::LeavesPrefix), "{bad:?}");
        }
        for ok in [
            "/", "", "/a/../b", "/./x", "/a b", "/ü", "/..a", "/a..", "/a/.../b", "/%zz",
        ] {
            assert_eq!(check_path(ok), Ok(()), "{ok:?}");
        }
        for bad in ["/a\r\nHost: x", "/a\0", "/a%0d%0aX: y", "/%2500"] {
            assert_eq!(check_path(bad), Err(UrlError::ControlInPath), "{bad:?}");
        }
        assert_eq!(check_query("a=1&b=2"), Ok(()));
        for bad in ["a=1#x", "a\r\n", "a\0"] {
            assert_eq!(check_query(bad), Err(UrlError::BadQuery), "{bad:?}");
        }
    }

    #[test]
    fn queries_are_sent_as_queued_unless_a_request_line_cannot_carry_them() {
        let q = |s: &str| {
            let mut out = String::new();
            escape_query_into(&mut out, s);
            out
        };
        assert_eq!(q("a=1&b=%2F&c=x:y/z?w"), "a=1&b=%2F&c=x:y/z?w");
        assert_eq!(q("a b"), "a%20b");
        assert_eq!(q("q=ü"), "q=%C3%BC");
        assert_eq!(q("x=<\"\t>"), "x=<\"%09>");
    }

    #[test]
    fn redaction() {
        assert_eq!(
            redact("nats://user:secret@h:4222", true),
            "nats://user:***@h:4222"
        );
        assert_eq!(redact("http://h/cb?token=abc#f", false), "http://h/cb");
        assert_eq!(redact("http://u:p@h?token=abc", false), "http://u:***@h");
        assert_eq!(redact("nats://h:4222", true), "nats://h:4222");
    }

    proptest! {
        #[test]
        fn escape_then_unescape_is_identity(s in "\\PC{0,40}") {
            for mode in [Mode::Path, Mode::Fragment] {
                let e = escape(&s, mode);
                prop_assert!(e.is_ascii());
                prop_assert_eq!(unescape(&e), Some(s.clone()));
                let (decoded, raw) = decode_pair(&e, mode).unwrap();
                prop_assert_eq!(&decoded, &s);
                prop_assert_eq!(raw, "");
            }
        }

        #[test]
        fn checks_never_panic(s in "[./\\\\%2eE0adAD\r\n a-z]{0,40}") {
            let _ = check_path(&s);
            let _ = check_query(&s);
            let _ = unescape(&s);
            let _ = redact(&s, false);
        }

        #[test]
        fn an_accepted_path_never_climbs_out(segments in proptest::collection::vec("(\\.|\\.\\.|%2e%2e|%2e|a|b\\\\)", 0..8)) {
            let path = format!("/{}", segments.join("/"));
            if check_path(&path).is_ok() {
                // Resolve as a decoding, backslash-folding proxy would.
                let decoded = String::from_utf8(unescape_lenient(path.as_bytes())).unwrap();
                let mut stack: Vec<&str> = Vec::new();
                for seg in decoded.split(['/', '\\']) {
                    match seg {
                        "" | "." => {}
                        ".." => prop_assert!(stack.pop().is_some(), "{} climbs out", path),
                        s => stack.push(s),
                    }
                }
            }
        }
    }
}
