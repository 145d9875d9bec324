//! keybrokerd: the signing daemon. A request reads top to bottom:
//! `listen` (socket) → `identity` (who) → `policy` (may they) → `service`
//! (payload, sign) → `status` (errors as gRPC codes). See ARCHITECTURE.md.

pub mod activation;
pub mod attest;
pub mod audit;
pub mod config;
pub mod conn;
pub mod identity;
pub mod keys;
pub mod limits;
pub mod listen;
pub mod message;
pub mod metrics;
pub mod oidc;
pub mod payload;
pub mod policy;
pub mod service;
pub mod status;
pub mod timestamp;

use std::{future::Future, sync::Arc};

use keybroker_proto::v1::key_broker_server::KeyBrokerServer;
use tokio_stream::wrappers::UnixListenerStream;

use crate::{
    config::Config,
    policy::Policy,
    service::{BrokerService, State},
};

/// Opens every key and compiles the policy.
pub async fn build_state(config: &Config, startup: keys::Startup) -> Result<State, String> {
    let keys = keys::open_all(&config.keys, startup).await?;
    let policy = Policy::new(&config.policy)?;
    let limits = limits::Limiter::new(config.limits.as_ref())?;
    let oidc = oidc::Issuers::new(&config.oidc)?;
    let timestamp = match &config.timestamp {
        Some(t) => Some(Arc::new(timestamp::Tsa::new(t)?)),
        None => None,
    };
    Ok(State {
        keys,
        policy,
        limits,
        oidc,
        timestamp,
        audit: None,
    })
}

/// The daemon's current state. A reload swaps in a new one; requests in flight
/// keep the state they started with.
pub type SharedState = Arc<arc_swap::ArcSwap<State>>;

/// Wraps a state for [`serve`].
pub fn shared(state: State) -> SharedState {
    Arc::new(arc_swap::ArcSwap::from_pointee(state))
}

/// Serves the KeyBroker API, health and reflection on a bound unix socket until
/// `shutdown` completes; in-flight requests finish first. Default connection
/// limits; see [`serve_with`].
pub async fn serve(
    socket: tokio::net::UnixListener,
    state: SharedState,
    max_request_bytes: usize,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), String> {
    serve_with(
        socket,
        state,
        max_request_bytes,
        conn::ConnLimits::default(),
        shutdown,
    )
    .await
}

/// [`serve`] with explicit connection limits (`[server]` in the config).
pub async fn serve_with(
    socket: tokio::net::UnixListener,
    state: SharedState,
    max_request_bytes: usize,
    limits: conn::ConnLimits,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), String> {
    use tokio_stream::StreamExt;
    let admission = conn::Admission::new(limits);
    // Each connection carries what the kernel says about its peer (uid, gid,
    // pid, supplementary groups), read once at accept, and holds its slot.
    let incoming = UnixListenerStream::new(socket).filter_map(move |conn| match conn {
        Ok(stream) => match identity::PeerInfo::of(&stream) {
            Ok(info) => match admission.admit(Some(info.uid)) {
                Ok(slot) => Some(Ok::<_, std::io::Error>(conn::Limited::new(
                    PeerStream { stream, info },
                    slot,
                    &limits,
                ))),
                Err(why) => {
                    tracing::warn!(uid = info.uid, "connection refused: {why}");
                    None
                }
            },
            Err(e) => {
                tracing::warn!("peer credentials unavailable, connection dropped: {e}");
                None
            }
        },
        Err(e) => {
            tracing::warn!("accept: {e}");
            None
        }
    });
    routes(
        limited(tonic::transport::Server::builder(), &limits),
        state,
        max_request_bytes,
    )
    .await?
    .serve_with_incoming_shutdown(incoming, shutdown)
    .await
    .map_err(|e| format!("server: {e}"))
}

/// The HTTP/2 limits every listener gets: streams per connection, header list
/// size, keepalive pings (a peer that stops answering is dropped), a cap on
/// reset streams (the "rapid reset" attack); HTTP 415 for non-gRPC requests;
/// and the bound on KeyBroker calls in flight (per listener, and per caller).
fn limited(
    builder: tonic::transport::Server,
    limits: &conn::ConnLimits,
) -> tonic::transport::Server<
    tower::layer::util::Stack<
        conn::InFlightLayer,
        tower::layer::util::Stack<conn::GrpcOnlyLayer, tower::layer::util::Identity>,
    >,
> {
    builder
        .max_concurrent_streams(Some(limits.max_streams_per_connection))
        .http2_max_header_list_size(Some(limits.max_header_bytes))
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        .http2_max_pending_accept_reset_streams(Some(32))
        .initial_stream_window_size(Some(256 * 1024))
        .initial_connection_window_size(Some(1024 * 1024))
        .layer(conn::GrpcOnlyLayer)
        .layer(conn::InFlightLayer::new(
            limits.max_in_flight,
            limits.max_in_flight_per_caller,
        ))
}

/// Loads `[server.tls]`'s certificate, key and client CA into a server config
/// that requires a client certificate (mutual TLS).
pub fn tls_server_config(
    tls: &config::TlsConfig,
) -> Result<tonic::transport::ServerTlsConfig, String> {
    let read = |what: &str, p: &std::path::Path| {
        std::fs::read(p).map_err(|e| format!("server.tls.{what} {}: {e}", p.display()))
    };
    let cert = read("cert_file", &tls.cert_file)?;
    let key = zeroize::Zeroizing::new(read("key_file", &tls.key_file)?);
    let ca = read("client_ca_file", &tls.client_ca_file)?;
    Ok(tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(cert, key.as_slice()))
        .client_ca_root(tonic::transport::Certificate::from_pem(ca))
        .client_auth_optional(false))
}

/// A TLS set-up error with its causes (tonic's own message is only "transport error").
pub fn tls_error(e: &dyn std::error::Error) -> String {
    let mut msg = format!("server.tls: {e}");
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    msg
}

/// Serves the same API on a TCP listener with mutual TLS: the handshake fails
/// without a client certificate from the configured CA (expired or foreign
/// certificates included), and the caller is that certificate's identity.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    tls: tonic::transport::ServerTlsConfig,
    state: SharedState,
    max_request_bytes: usize,
    limits: conn::ConnLimits,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), String> {
    use tokio_stream::StreamExt;
    let builder = limited(tonic::transport::Server::builder(), &limits)
        .tls_config(tls)
        .map_err(|e| tls_error(&e))?;
    // The caller is only known after the TLS handshake (its certificate), so
    // here the limit is the total; the silent-connection timeout covers a
    // handshake that never starts.
    let admission = conn::Admission::new(limits);
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).filter_map(
        move |conn| match conn {
            Ok(stream) => match admission.admit(None) {
                Ok(slot) => Some(Ok::<_, std::io::Error>(conn::Limited::new(
                    stream, slot, &limits,
                ))),
                Err(why) => {
                    tracing::warn!(peer = ?stream.peer_addr().ok(), "connection refused: {why}");
                    None
                }
            },
            Err(e) => {
                tracing::warn!("accept: {e}");
                None
            }
        },
    );
    routes(builder, state, max_request_bytes)
        .await?
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| format!("TLS server: {e}"))
}

/// Plaintext grpc.health.v1 and nothing else (`server.tls.health_listen`).
pub async fn serve_health_only(
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), String> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    tonic::transport::Server::builder()
        .add_service(health)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await
        .map_err(|e| format!("health server: {e}"))
}

/// Health (the whole server and the KeyBroker service SERVING), reflection and
/// the KeyBroker service, on `builder`.
async fn routes<L: Clone>(
    mut builder: tonic::transport::Server<L>,
    state: SharedState,
    max_request_bytes: usize,
) -> Result<tonic::transport::server::Router<L>, String> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<KeyBrokerServer<BrokerService>>()
        .await;
    // "" is the whole server, what probes (`keybroker health`, grpc_health_probe,
    // the kubelet's gRPC probe) ask about by default.
    health_reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(keybroker_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| format!("reflection service: {e}"))?;
    let broker = KeyBrokerServer::new(BrokerService::new(state))
        .max_decoding_message_size(max_request_bytes);
    Ok(builder
        .add_service(health)
        .add_service(reflection)
        .add_service(broker))
}

/// Keeps key material out of core dumps and away from ptrace by other users.
pub fn harden_process() {
    // SAFETY: plain syscalls with constant arguments.
    unsafe {
        let zero = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &zero);
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
}

/// A unix connection and its peer's credentials (tonic puts `info` into every
/// request's extensions, where `identity::Caller::from_request` finds it).
struct PeerStream {
    stream: tokio::net::UnixStream,
    info: identity::PeerInfo,
}

impl tonic::transport::server::Connected for PeerStream {
    type ConnectInfo = identity::PeerInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl tokio::io::AsyncRead for PeerStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for PeerStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
