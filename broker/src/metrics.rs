//! Prometheus metrics on an optional plain-HTTP listener (`server.metrics_listen`):
//! requests by rpc / key / decision, and the latency of each key's backend
//! signing call. Nothing here is secret; nothing here can sign.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{Mutex, OnceLock},
    time::Duration,
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Upper bounds (seconds) of the backend latency histogram buckets.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

#[derive(Default)]
struct Registry {
    requests: BTreeMap<(String, String, String), u64>,
    backend: BTreeMap<(String, &'static str), Histogram>,
}

fn registry() -> &'static Mutex<Registry> {
    static R: OnceLock<Mutex<Registry>> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// Counts one decision (`allowed`, `denied`, `failed`, `rate_limited`).
pub fn count_request(rpc: &str, key: &str, decision: &str) {
    if let Ok(mut r) = registry().lock() {
        *r.requests
            .entry((rpc.to_string(), key.to_string(), decision.to_string()))
            .or_default() += 1;
    }
}

/// Records how long one backend signing call took (`ok` or `error`).
pub fn observe_backend(key: &str, ok: bool, took: Duration) {
    let secs = took.as_secs_f64();
    if let Ok(mut r) = registry().lock() {
        let h = r
            .backend
            .entry((key.to_string(), if ok { "ok" } else { "error" }))
            .or_default();
        for (i, le) in BUCKETS.iter().enumerate() {
            if secs <= *le {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += secs;
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The text exposition format (version 0.0.4).
pub fn render() -> String {
    let mut out = String::new();
    let Ok(r) = registry().lock() else {
        return out;
    };
    out.push_str(
        "# HELP keybroker_requests_total Signing decisions by RPC, key alias and decision.\n",
    );
    out.push_str("# TYPE keybroker_requests_total counter\n");
    for ((rpc, key, decision), n) in &r.requests {
        let _ = writeln!(
            out,
            "keybroker_requests_total{{rpc=\"{}\",key=\"{}\",decision=\"{}\"}} {n}",
            escape(rpc),
            escape(key),
            escape(decision)
        );
    }
    out.push_str("# HELP keybroker_backend_sign_seconds Time the key's backend took to sign.\n");
    out.push_str("# TYPE keybroker_backend_sign_seconds histogram\n");
    for ((key, result), h) in &r.backend {
        let labels = format!("key=\"{}\",result=\"{result}\"", escape(key));
        for (i, le) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "keybroker_backend_sign_seconds_bucket{{{labels},le=\"{le}\"}} {}",
                h.counts[i]
            );
        }
        let _ = writeln!(
            out,
            "keybroker_backend_sign_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
            h.count
        );
        let _ = writeln!(
            out,
            "keybroker_backend_sign_seconds_sum{{{labels}}} {}",
            h.sum
        );
        let _ = writeln!(
            out,
            "keybroker_backend_sign_seconds_count{{{labels}}} {}",
            h.count
        );
    }
    out
}

/// The public-key cache counters of every key in `state` (read at scrape time
/// from the providers, so they cost the signing path nothing). A reload builds
/// new providers, so these counters restart from zero then, as Prometheus
/// counters may.
pub fn render_public_key_cache(state: &crate::service::State) -> String {
    let mut out = String::new();
    out.push_str("# HELP keybroker_public_key_cache_total Public-key lookups answered from the cache (hit) or by the backend (miss).\n");
    out.push_str("# TYPE keybroker_public_key_cache_total counter\n");
    for (alias, entry) in &state.keys {
        if let Some(stats) = entry.provider.public_key_cache() {
            for (result, n) in [("hit", stats.hits), ("miss", stats.misses)] {
                let _ = writeln!(
                    out,
                    "keybroker_public_key_cache_total{{key=\"{}\",result=\"{result}\"}} {n}",
                    escape(alias)
                );
            }
        }
    }
    out
}

/// Serves `GET /metrics` (HTTP/1.x, one request per connection) until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: crate::SharedState,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    tokio::pin!(shutdown);
    loop {
        let (mut conn, _) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("metrics listener: {e}");
                    continue;
                }
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            // One small read is enough for a scraper's request line; a slow or
            // silent client gets 2 s.
            let n = match tokio::time::timeout(Duration::from_secs(2), conn.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let head = String::from_utf8_lossy(&buf[..n]);
            let (status, body, ctype) = if head.starts_with("GET /metrics ") {
                let mut body = render();
                body.push_str(&render_public_key_cache(&state.load()));
                ("200 OK", body, "text/plain; version=0.0.4")
            } else {
                (
                    "404 Not Found",
                    "only GET /metrics here\n".to_string(),
                    "text/plain",
                )
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(resp.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        count_request("Sign", "metrics-test-key", "allowed");
        count_request("Sign", "metrics-test-key", "allowed");
        observe_backend("metrics-test-key", true, Duration::from_millis(3));
        let text = render();
        assert!(text.contains(
            "keybroker_requests_total{rpc=\"Sign\",key=\"metrics-test-key\",decision=\"allowed\"} 2"
        ));
        assert!(text.contains(
            "keybroker_backend_sign_seconds_bucket{key=\"metrics-test-key\",result=\"ok\",le=\"0.0025\"} 0"
        ));
        assert!(text.contains(
            "keybroker_backend_sign_seconds_bucket{key=\"metrics-test-key\",result=\"ok\",le=\"0.005\"} 1"
        ));
        assert!(text.contains(
            "keybroker_backend_sign_seconds_count{key=\"metrics-test-key\",result=\"ok\"} 1"
        ));
    }
}
