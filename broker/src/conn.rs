//! Bounds on connections, before any gRPC is spoken: how many at once in total
//! and per caller (uid on the unix socket), how long a new connection may stay
//! silent (a slowloris that never sends the HTTP/2 preface), and how long an
//! established one may go without a byte (HTTP/2 keepalive pings count as
//! bytes, so a live client is never cut). The HTTP/2 and gRPC limits (streams
//! per connection, header list size, message size, resets) are set on the
//! server in `lib.rs`; what to do with a non-gRPC request is [`GrpcOnly`].

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::{Instant, Sleep},
};
use tonic::codegen::http;

/// Connection limits (`[server]` in the config; defaults in [`Default`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Connections open at once, all callers together.
    pub max_connections: usize,
    /// Connections open at once per caller (uid on the unix socket).
    pub max_connections_per_caller: usize,
    /// A new connection that sends nothing for this long is closed.
    pub handshake_timeout: Duration,
    /// An established connection with no byte received for this long is closed.
    pub idle_timeout: Duration,
    /// Concurrent requests (HTTP/2 streams) per connection.
    pub max_streams_per_connection: u32,
    /// Largest request header list (metadata), bytes.
    pub max_header_bytes: u32,
    /// KeyBroker calls in flight at once on one listener; beyond, RESOURCE_EXHAUSTED.
    pub max_in_flight: usize,
    /// KeyBroker calls in flight at once per caller; beyond, RESOURCE_EXHAUSTED.
    pub max_in_flight_per_caller: usize,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            max_connections: 1024,
            max_connections_per_caller: 256,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_streams_per_connection: 64,
            max_header_bytes: 16 * 1024,
            max_in_flight: 512,
            max_in_flight_per_caller: 128,
        }
    }
}

/// Open connections per caller uid.
type PerCaller = Arc<Mutex<HashMap<u32, usize>>>;

/// Hands out connection slots: a global semaphore and a per-caller count.
#[derive(Debug, Clone)]
pub struct Admission {
    limits: ConnLimits,
    total: Arc<Semaphore>,
    per_caller: PerCaller,
}

/// One admitted connection's slots, given back on drop.
#[derive(Debug)]
pub struct Slot {
    _total: OwnedSemaphorePermit,
    caller: Option<(u32, PerCaller)>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some((uid, map)) = &self.caller {
            let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = m.get_mut(uid) {
                *n -= 1;
                if *n == 0 {
                    m.remove(uid);
                }
            }
        }
    }
}

impl Admission {
    /// Slots for `limits`.
    pub fn new(limits: ConnLimits) -> Self {
        Admission {
            limits,
            total: Arc::new(Semaphore::new(limits.max_connections)),
            per_caller: Arc::default(),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> ConnLimits {
        self.limits
    }

    /// A slot for a connection from `uid` (None: no per-caller identity at
    /// accept, as on the TLS listener), or why not.
    pub fn admit(&self, uid: Option<u32>) -> Result<Slot, &'static str> {
        let total = self
            .total
            .clone()
            .try_acquire_owned()
            .map_err(|_| "max_connections reached")?;
        let caller = match uid {
            Some(uid) => {
                let mut m = self.per_caller.lock().unwrap_or_else(|p| p.into_inner());
                let n = m.entry(uid).or_default();
                if *n >= self.limits.max_connections_per_caller {
                    return Err("max_connections_per_caller reached");
                }
                *n += 1;
                Some((uid, self.per_caller.clone()))
            }
            None => None,
        };
        Ok(Slot {
            _total: total,
            caller,
        })
    }
}

/// A connection that holds its slot and closes itself when silent too long.
pub struct Limited<S> {
    inner: S,
    _slot: Slot,
    deadline: Pin<Box<Sleep>>,
    heard: bool,
    handshake: Duration,
    idle: Duration,
}

impl<S> Limited<S> {
    /// Wraps `inner`, which holds `slot` until it is dropped.
    pub fn new(inner: S, slot: Slot, limits: &ConnLimits) -> Self {
        Limited {
            inner,
            _slot: slot,
            deadline: Box::pin(tokio::time::sleep(limits.handshake_timeout)),
            heard: false,
            handshake: limits.handshake_timeout,
            idle: limits.idle_timeout,
        }
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for Limited<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Limited<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.heard = true;
                    let idle = self.idle;
                    self.deadline.as_mut().reset(Instant::now() + idle);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                // The timer registers this task's waker: when it fires, the
                // server polls us again and the connection ends here.
                if self.deadline.as_mut().poll(cx).is_ready() {
                    let what = if self.heard {
                        format!("idle for {:?}", self.idle)
                    } else {
                        format!("nothing received within {:?}", self.handshake)
                    };
                    tracing::debug!("closing a connection: {what}");
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        what,
                    )));
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Limited<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Answers a request that is not gRPC (its content-type does not start with
/// `application/grpc`) with HTTP 415, as the gRPC-over-HTTP/2 spec says a
/// server should, instead of handing it to a service.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcOnlyLayer;

impl<S> tower::Layer<S> for GrpcOnlyLayer {
    type Service = GrpcOnly<S>;
    fn layer(&self, inner: S) -> GrpcOnly<S> {
        GrpcOnly(inner)
    }
}

/// See [`GrpcOnlyLayer`].
#[derive(Debug, Clone)]
pub struct GrpcOnly<S>(S);

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for GrpcOnly<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let grpc = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        if grpc {
            let fut = self.0.call(req);
            return Box::pin(async move {
                let mut resp = fut.await?;
                callers_fault(&mut resp);
                Ok(resp)
            });
        }
        let mut resp = http::Response::new(tonic::body::Body::empty());
        *resp.status_mut() = http::StatusCode::UNSUPPORTED_MEDIA_TYPE;
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain"),
        );
        Box::pin(std::future::ready(Ok(resp)))
    }
}

/// tonic's codec answers some caller mistakes before any handler runs, with
/// codes that blame the server: a message over `max_decoding_message_size` is
/// OUT_OF_RANGE (the caller asked for more than we give: RESOURCE_EXHAUSTED);
/// a body that ends inside a message, no message at all, or a bad
/// compressed-flag are INTERNAL (the gRPC core docs ask that for the flag; we
/// answer INVALID_ARGUMENT for all three, since only the caller can fix them).
/// They arrive as trailers-only responses, so the status is in the headers.
fn callers_fault(resp: &mut http::Response<tonic::body::Body>) {
    let h = resp.headers_mut();
    let status = h.get("grpc-status").map(|v| v.as_bytes().to_vec());
    let message = h
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .map(percent_decode)
        .unwrap_or_default();
    let (code, text) = match status.as_deref() {
        Some(b"11") if message.contains("message length too large") => (
            "8",
            "request message larger than the server accepts (server.max_request_bytes)",
        ),
        Some(b"13") if message.starts_with("Unexpected EOF decoding stream") => {
            ("3", "request body ends inside a gRPC message")
        }
        Some(b"13") if message.starts_with("Missing request message") => {
            ("3", "request carries no gRPC message")
        }
        Some(b"13") if message.starts_with("protocol error: received message with") => {
            ("3", "request message has an invalid compressed-flag")
        }
        _ => return,
    };
    h.insert("grpc-status", http::HeaderValue::from_static(code));
    if let Ok(v) = http::HeaderValue::from_str(&text.replace(' ', "%20")) {
        h.insert("grpc-message", v);
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Requests in flight, in total and per caller: past either bound a KeyBroker
/// call is answered RESOURCE_EXHAUSTED at once ("busy, retry with backoff")
/// instead of queueing, so at several times the sustainable load latency and
/// memory stay flat, and one noisy caller can hold at most its own share.
/// Health and reflection are never limited.
#[derive(Debug, Clone)]
pub struct InFlightLayer {
    total: Arc<Semaphore>,
    per_caller: Arc<Mutex<HashMap<CallerKey, usize>>>,
    max_per_caller: usize,
}

/// Who a request is from, as far as connection-level facts tell: the peer's
/// uid on the unix socket, its certificate on the mTLS listener.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum CallerKey {
    Uid(u32),
    Certificate(u64),
    Unknown,
}

impl InFlightLayer {
    /// At most `max_total` KeyBroker calls at once, `max_per_caller` per caller.
    pub fn new(max_total: usize, max_per_caller: usize) -> Self {
        InFlightLayer {
            total: Arc::new(Semaphore::new(max_total.max(1))),
            per_caller: Arc::default(),
            max_per_caller: max_per_caller.max(1),
        }
    }

    fn admit(&self, key: CallerKey) -> Result<InFlight, &'static str> {
        let total = self
            .total
            .clone()
            .try_acquire_owned()
            .map_err(|_| "too many requests in flight")?;
        let mut m = self.per_caller.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(key.clone()).or_default();
        if *n >= self.max_per_caller {
            return Err("too many requests in flight from this caller");
        }
        *n += 1;
        Ok(InFlight {
            _total: total,
            key,
            map: self.per_caller.clone(),
        })
    }
}

/// One admitted request's slots, given back when its response is produced.
struct InFlight {
    _total: OwnedSemaphorePermit,
    key: CallerKey,
    map: Arc<Mutex<HashMap<CallerKey, usize>>>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

fn caller_key<B>(req: &http::Request<B>) -> CallerKey {
    use std::hash::{Hash, Hasher};
    if let Some(p) = req.extensions().get::<crate::identity::PeerInfo>() {
        return CallerKey::Uid(p.uid);
    }
    if let Some(tls) = req
        .extensions()
        .get::<tonic::transport::server::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>>()
    {
        if let Some(leaf) = tls.peer_certs().and_then(|c| c.first().cloned()) {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            leaf.as_ref().hash(&mut h);
            return CallerKey::Certificate(h.finish());
        }
    }
    CallerKey::Unknown
}

impl<S> tower::Layer<S> for InFlightLayer {
    type Service = InFlightLimit<S>;
    fn layer(&self, inner: S) -> InFlightLimit<S> {
        InFlightLimit {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`InFlightLayer`].
#[derive(Debug, Clone)]
pub struct InFlightLimit<S> {
    inner: S,
    layer: InFlightLayer,
}

impl<S, B> tower::Service<http::Request<B>> for InFlightLimit<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if !req.uri().path().starts_with("/keybroker.v1.KeyBroker/") {
            return Box::pin(self.inner.call(req));
        }
        match self.layer.admit(caller_key(&req)) {
            Ok(slot) => {
                let fut = self.inner.call(req);
                Box::pin(async move {
                    let r = fut.await;
                    drop(slot);
                    r
                })
            }
            Err(why) => {
                crate::metrics::count_request("(any)", "(any)", "overloaded");
                let status = tonic::Status::resource_exhausted(format!(
                    "keybrokerd is busy: {why}; retry with backoff"
                ));
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b%2Cc%"), "a b,c%");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("%é"), "%é");
    }

    #[test]
    fn in_flight_is_bounded_in_total_and_per_caller() {
        let l = InFlightLayer::new(3, 2);
        let a1 = l.admit(CallerKey::Uid(1)).unwrap();
        let _a2 = l.admit(CallerKey::Uid(1)).unwrap();
        // The noisy caller is at its share; another caller still gets in.
        assert!(l.admit(CallerKey::Uid(1)).is_err());
        let _b1 = l.admit(CallerKey::Uid(2)).unwrap();
        assert_eq!(
            l.admit(CallerKey::Uid(3)).err(),
            Some("too many requests in flight")
        );
        drop(a1);
        let _a3 = l.admit(CallerKey::Uid(1)).unwrap();
    }

    #[test]
    fn slots_are_bounded_in_total_and_per_caller_and_come_back() {
        let a = Admission::new(ConnLimits {
            max_connections: 3,
            max_connections_per_caller: 2,
            ..ConnLimits::default()
        });
        let s1 = a.admit(Some(1)).unwrap();
        let _s2 = a.admit(Some(1)).unwrap();
        assert_eq!(
            a.admit(Some(1)).unwrap_err(),
            "max_connections_per_caller reached"
        );
        let _s3 = a.admit(Some(2)).unwrap();
        assert_eq!(a.admit(Some(3)).unwrap_err(), "max_connections reached");
        drop(s1);
        let _s4 = a.admit(Some(1)).unwrap();
    }

    #[tokio::test]
    async fn a_silent_connection_is_closed_after_the_handshake_timeout() {
        use tokio::io::AsyncReadExt;
        let (ours, _theirs) = tokio::io::duplex(64);
        let limits = ConnLimits {
            handshake_timeout: Duration::from_millis(50),
            ..ConnLimits::default()
        };
        let slot = Admission::new(limits).admit(None).unwrap();
        let mut conn = Limited::new(ours, slot, &limits);
        let mut buf = [0u8; 8];
        let started = std::time::Instant::now();
        let err = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn bytes_keep_a_connection_open_until_it_goes_idle() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (ours, mut theirs) = tokio::io::duplex(64);
        let limits = ConnLimits {
            handshake_timeout: Duration::from_millis(100),
            idle_timeout: Duration::from_millis(300),
            ..ConnLimits::default()
        };
        let slot = Admission::new(limits).admit(None).unwrap();
        let mut conn = Limited::new(ours, slot, &limits);
        let mut buf = [0u8; 8];
        // Talk every 50 ms for longer than the handshake timeout.
        for _ in 0..4 {
            theirs.write_all(b"x").await.unwrap();
            assert_eq!(conn.read(&mut buf).await.unwrap(), 1);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let err = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("idle"), "{err}");
    }
}
