//! What the GitLab and GitHub REST clients share: one HTTP client per key,
//! path-segment encoding, and turning an HTTP failure into an [`Error`] whose
//! message names the call and the status, never a token or a secret value.

use std::time::Duration;

use zeroize::Zeroizing;

use crate::{Error, Result};

/// Default per-request timeout.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// `User-Agent` of every request (GitHub refuses requests without one).
pub(crate) const USER_AGENT: &str = concat!("keybroker/", env!("CARGO_PKG_VERSION"));

/// A non-empty environment variable.
pub(crate) fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// The HTTP client: rustls, a timeout, our User-Agent.
pub(crate) fn http_client(timeout: Duration) -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .user_agent(USER_AGENT)
        .build()
        .map_err(|e| Error::Other(format!("building the HTTP client: {e}")))
}

/// Percent-encodes one path segment (RFC 3986: unreserved characters stay).
pub(crate) fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A base URL from a host name or a full URL: `gitlab.com` → `https://gitlab.com`,
/// `http://127.0.0.1:8080/` → `http://127.0.0.1:8080`.
pub(crate) fn base_url(host: &str) -> String {
    let host = host.trim().trim_end_matches('/');
    if host.contains("://") {
        host.to_string()
    } else {
        format!("https://{host}")
    }
}

/// A transport failure (connection refused, TLS, timeout): the backend is
/// unavailable. reqwest's message names the URL, which holds no secret.
pub(crate) fn transport_error(what: &str, e: reqwest::Error) -> Error {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    Error::Unavailable(format!("{what}: {kind}: {e}"))
}

/// The server's own explanation from an error body (`message` / `error`, as
/// GitLab and GitHub send them), shortened, with every value we sent in this
/// request replaced by `[redacted]` in case a server ever echoes one.
pub(crate) fn server_detail(body: &[u8], sent: &[&str]) -> String {
    let text = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v) => match v.get("message").or_else(|| v.get("error")) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => String::new(),
        },
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    let mut text = Zeroizing::new(text.split_whitespace().collect::<Vec<_>>().join(" "));
    for s in sent.iter().filter(|s| s.len() >= 4) {
        if text.contains(*s) {
            *text = text.replace(*s, "[redacted]");
        }
        // A multi-line value (a PEM) may come back line by line.
        for line in s.lines().filter(|l| l.len() >= 16) {
            if text.contains(line) {
                *text = text.replace(line, "[redacted]");
            }
        }
    }
    let mut short: String = text.chars().take(300).collect();
    if text.chars().count() > 300 {
        short.push('…');
    }
    short
}

/// Maps an HTTP status to the crate's error cases.
pub(crate) fn status_error(status: u16, message: String) -> Error {
    match status {
        401 | 403 => Error::PermissionDenied(message),
        404 => Error::NotFound(message),
        400 | 409 | 422 => Error::InvalidArgument(message),
        429 => Error::ResourceExhausted(message),
        s if s >= 500 => Error::Unavailable(message),
        _ => Error::Other(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_path_segments() {
        assert_eq!(encode_segment("group/sub/project"), "group%2Fsub%2Fproject");
        assert_eq!(encode_segment("a b~c.d-e_f"), "a%20b~c.d-e_f");
        assert_eq!(encode_segment("1234"), "1234");
    }

    #[test]
    fn base_urls() {
        assert_eq!(base_url("gitlab.com"), "https://gitlab.com");
        assert_eq!(base_url("http://127.0.0.1:8080/"), "http://127.0.0.1:8080");
    }

    #[test]
    fn server_detail_redacts_what_we_sent() {
        let body = br#"{"message":{"value":["hunter2hunter2 is invalid"]}}"#;
        let d = server_detail(body, &["hunter2hunter2"]);
        assert!(!d.contains("hunter2"), "{d}");
        assert!(d.contains("[redacted]"), "{d}");
        let pem = "-----BEGIN X-----\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n-----END X-----\n";
        let body = br#"{"message":"bad AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}"#;
        assert!(!server_detail(body, &[pem]).contains("AAAAAAAAAAAAAAAA"));
        assert_eq!(
            server_detail(br#"{"error":"404 Not Found"}"#, &[]),
            "404 Not Found"
        );
    }
}
