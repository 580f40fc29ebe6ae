//! Which callback URLs the worker may call (`callback_allowed_hosts`).
//!
//! A queued request names its own callback URL, so without a list anyone who can queue a
//! request can make the worker POST to any address it reaches, internal ones included. The
//! list holds `host`, `host:port` and `*.domain` patterns; whatever the list, only `http` and
//! `https` URLs are ever called.

use std::fmt;

/// One pattern of the list.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    /// `host`: that host on any port.
    Host(String),
    /// `host:port`: that host on that port only.
    HostPort(String, u16),
    /// `*.domain`: every name under `domain` (not `domain` itself), on any port.
    Under(String),
}

/// The callback hosts the worker may call; `None` in the config means every host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowlist(Vec<Pattern>);

/// Why a callback URL is not called.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not `http://` or `https://`.
    Scheme,
    /// No host could be read from the URL.
    NoHost,
    /// The host is not on the list.
    NotAllowed(String),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Scheme => write!(f, "only http and https callbacks are called"),
            Refusal::NoHost => write!(f, "the callback URL has no host"),
            Refusal::NotAllowed(host) => {
                write!(f, "callback host {host} is not in callback_allowed_hosts")
            }
        }
    }
}

impl std::error::Error for Refusal {}

impl Allowlist {
    /// Parses `a.example, b.example:8080, *.svc.cluster.local`. None for an empty list or a
    /// pattern that is not a host name, `host:port` or `*.domain`.
    pub fn parse(list: &str) -> Option<Allowlist> {
        let mut patterns = Vec::new();
        for item in list.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let item = item.to_ascii_lowercase();
            let pattern = if let Some(domain) = item.strip_prefix("*.") {
                valid_host(domain).then(|| Pattern::Under(domain.to_string()))?
            } else {
                let (host, port) = split_port(&item);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                match (host, port) {
                    (host, Some(port)) => {
                        let port: u16 = port.parse().ok().filter(|p| *p > 0)?;
                        valid_host(host).then(|| Pattern::HostPort(host.to_string(), port))?
                    }
                    (host, None) => valid_host(host).then(|| Pattern::Host(host.to_string()))?,
                }
            };
            patterns.push(pattern);
        }
        (!patterns.is_empty()).then_some(Allowlist(patterns))
    }

    /// Whether `host` (lower case, IPv6 without brackets) on `port` is on the list.
    fn allows(&self, host: &str, port: u16) -> bool {
        self.0.iter().any(|p| match p {
            Pattern::Host(h) => h == host,
            Pattern::HostPort(h, p) => h == host && *p == port,
            Pattern::Under(d) => host
                .strip_suffix(d.as_str())
                .is_some_and(|rest| rest.len() > 1 && rest.ends_with('.')),
        })
    }
}

/// Checks a callback URL: an `http`/`https` URL whose host is on `list` (every host when
/// there is no list).
pub fn check(url: &str, list: Option<&Allowlist>) -> Result<(), Refusal> {
    let (rest, default_port) = if let Some(rest) = strip_prefix_ci(url, "http://") {
        (rest, 80)
    } else if let Some(rest) = strip_prefix_ci(url, "https://") {
        (rest, 443)
    } else {
        return Err(Refusal::Scheme);
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    // User information is not part of the host.
    let hostport = authority.rsplit('@').next().unwrap_or_default();
    let hostport = hostport.to_ascii_lowercase();
    let (host, port) = split_port(&hostport);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(Refusal::NoHost);
    }
    let port = match port {
        None | Some("") => default_port,
        Some(p) => p.parse().map_err(|_| Refusal::NoHost)?,
    };
    match list {
        Some(list) if !list.allows(host, port) => {
            Err(Refusal::NotAllowed(format!("{host}:{port}")))
        }
        _ => Ok(()),
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// `host:port` into its parts; an IPv6 literal is bracketed (`[::1]:8080`).
fn split_port(s: &str) -> (&str, Option<&str>) {
    if let Some(end) = s.strip_prefix('[').and_then(|r| r.find(']')) {
        let host = &s[..end + 2];
        return match &s[end + 2..] {
            "" => (host, None),
            rest => (host, Some(rest.strip_prefix(':').unwrap_or(rest))),
        };
    }
    match s.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => (host, Some(port)),
        _ => (s, None),
    }
}

fn valid_host(h: &str) -> bool {
    let h = h.trim_start_matches('[').trim_end_matches(']');
    !h.is_empty()
        && h.len() <= 253
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'_'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn list(s: &str) -> Allowlist {
        Allowlist::parse(s).unwrap()
    }

    #[test]
    fn patterns() {
        let l = list("cb.example, hooks.example:8443, *.svc.cluster.local, [::1]:9000");
        let ok = |u: &str| check(u, Some(&l)).is_ok();
        assert!(ok("http://cb.example/x"));
        assert!(ok("https://CB.example:444/x?token=1"));
        assert!(ok("https://hooks.example:8443/"));
        assert!(!ok("https://hooks.example/"), "443 is not 8443");
        assert!(ok("http://a.svc.cluster.local/"));
        assert!(ok("http://a.b.svc.cluster.local:81/"));
        assert!(
            !ok("http://svc.cluster.local/"),
            "the domain itself is not under it"
        );
        assert!(!ok("http://evilsvc.cluster.local/"));
        assert!(ok("http://[::1]:9000/cb"));
        assert!(!ok("http://[::1]:9001/cb"));
        assert!(!ok("http://cb.example.evil/"));
        assert!(
            !ok("http://cb.example@169.254.169.254/"),
            "userinfo is not the host"
        );
        assert_eq!(
            check("http://10.0.0.1/", Some(&l)),
            Err(Refusal::NotAllowed("10.0.0.1:80".into()))
        );
    }

    #[test]
    fn only_http_and_https_whatever_the_list() {
        for url in [
            "file:///etc/passwd",
            "gopher://x/",
            "ftp://cb.example/",
            "cb.example/x",
        ] {
            assert_eq!(check(url, None), Err(Refusal::Scheme), "{url}");
        }
        assert_eq!(check("http:///x", None), Err(Refusal::NoHost));
        assert!(check("HTTP://anything:1/x", None).is_ok());
    }

    #[test]
    fn bad_lists_are_refused() {
        for bad in [
            "",
            " , ",
            "a b",
            "*.",
            "host:0",
            "host:99999",
            "http://host",
            "a/b",
        ] {
            assert_eq!(Allowlist::parse(bad), None, "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn never_panics(url in "\\PC{0,60}", pattern in "\\PC{0,20}") {
            let l = Allowlist::parse(&pattern);
            let _ = check(&url, l.as_ref());
        }
    }
}
