//! Connecting to keybrokerd: its unix socket (the usual case, a build agent on
//! the same host), or its mutual-TLS listener (`--broker https://…` with a
//! client certificate, e.g. the central service on Kubernetes).

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use keybroker_proto::v1::key_broker_client::KeyBrokerClient;
use tonic::{
    service::interceptor::InterceptedService,
    transport::{Channel, Endpoint},
};

use crate::Error;

/// The socket to use: `--socket`, else `$KEYBROKER_SOCKET`, else the daemon's default.
pub fn socket_path(flag: Option<&Path>) -> PathBuf {
    flag.map(Path::to_path_buf)
        .or_else(|| {
            std::env::var_os(keybroker_proto::SOCKET_ENV)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(keybroker_proto::default_socket_path)
}

/// Where the daemon is: its local unix socket, or its mTLS listener.
#[derive(Debug, Clone)]
pub enum Target {
    /// The unix socket (the caller is identified by the kernel).
    Unix(PathBuf),
    /// `https://HOST:PORT`, with this client certificate as the caller's identity.
    Tls {
        /// The daemon's URL.
        url: String,
        /// Client certificate chain (PEM).
        cert: PathBuf,
        /// Client private key (PEM).
        key: PathBuf,
        /// CA that issued the daemon's certificate (PEM).
        ca: PathBuf,
    },
}

impl From<&Path> for Target {
    fn from(p: &Path) -> Self {
        Target::Unix(p.to_path_buf())
    }
}

impl From<&PathBuf> for Target {
    fn from(p: &PathBuf) -> Self {
        Target::Unix(p.clone())
    }
}

impl From<&Target> for Target {
    fn from(t: &Target) -> Self {
        t.clone()
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Unix(p) => write!(f, "{}", p.display()),
            Target::Tls { url, .. } => f.write_str(url),
        }
    }
}

/// A connected client; every request carries the caller's ID token, if any.
pub type Client = KeyBrokerClient<InterceptedService<Channel, IdToken>>;

/// Adds `authorization: Bearer ID-TOKEN` to each request (an OIDC ID token from
/// the CI system, verified by the daemon against its issuer's keys).
#[derive(Clone, Default)]
pub struct IdToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl std::fmt::Debug for IdToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "IdToken([redacted])"
        } else {
            "IdToken(None)"
        })
    }
}

impl IdToken {
    /// From the token text (whitespace trimmed); `None` sends none.
    pub fn new(token: Option<&str>) -> Result<IdToken, Error> {
        match token.map(str::trim).filter(|t| !t.is_empty()) {
            None => Ok(IdToken(None)),
            Some(t) => {
                let mut v: tonic::metadata::MetadataValue<_> = format!("Bearer {t}")
                    .parse()
                    .map_err(|_| Error::Other("the ID token is not a valid header value".into()))?;
                v.set_sensitive(true);
                Ok(IdToken(Some(v)))
            }
        }
    }

    /// `$KEYBROKER_ID_TOKEN`, else the file `$KEYBROKER_ID_TOKEN_FILE`, else none.
    pub fn from_env() -> Result<IdToken, Error> {
        if let Ok(t) = std::env::var("KEYBROKER_ID_TOKEN") {
            return IdToken::new(Some(&t));
        }
        match std::env::var_os("KEYBROKER_ID_TOKEN_FILE").filter(|p| !p.is_empty()) {
            Some(p) => {
                let t = zeroize::Zeroizing::new(std::fs::read_to_string(&p).map_err(|e| {
                    Error::Other(format!(
                        "KEYBROKER_ID_TOKEN_FILE {}: {e}",
                        Path::new(&p).display()
                    ))
                })?);
                IdToken::new(Some(&t))
            }
            None => Ok(IdToken(None)),
        }
    }
}

impl tonic::service::Interceptor for IdToken {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let mut req = keybroker_proto::RequestHeader.call(req)?;
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// Connects now (not lazily), so "the broker is not running" is reported up
/// front. Requests carry the ID token of `IdToken::from_env`, if there is one.
pub async fn connect(target: impl Into<Target>) -> Result<Client, Error> {
    let token = IdToken::from_env()?;
    Ok(KeyBrokerClient::with_interceptor(
        channel(&target.into()).await?,
        token,
    ))
}

/// `keybroker health`: asks the daemon's standard gRPC health service whether
/// `service` ("" = the whole server) is SERVING, within `timeout`.
pub async fn health(
    target: impl Into<Target>,
    service: &str,
    timeout: std::time::Duration,
) -> Result<(), Error> {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    let target = target.into();
    let check = async {
        let mut c = HealthClient::new(channel(&target).await?);
        c.check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .map_err(|e| match e.code() {
            tonic::Code::NotFound => Error::Other(format!(
                "{target}: keybrokerd reports no health for service {service:?}"
            )),
            _ => Error::from(e),
        })
    };
    let resp = tokio::time::timeout(timeout, check)
        .await
        .map_err(|_| Error::Other(format!("{target}: no health answer within {timeout:?}")))??;
    match resp.into_inner().status() {
        ServingStatus::Serving => Ok(()),
        other => Err(Error::Other(format!(
            "{target}: {} is {}",
            if service.is_empty() {
                "keybrokerd"
            } else {
                service
            },
            other.as_str_name()
        ))),
    }
}

/// The innermost cause: what is actually wrong (refused, no such file, bad
/// certificate), not tonic's "transport error".
fn root_cause(e: &dyn std::error::Error) -> String {
    let mut reason = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        reason = s.to_string();
        source = s.source();
    }
    reason
}

async fn channel(target: &Target) -> Result<Channel, Error> {
    let unreachable = |e: tonic::transport::Error| Error::BrokerUnreachable {
        socket: target.to_string(),
        reason: root_cause(&e),
    };
    let socket = match target {
        Target::Unix(p) => p.clone(),
        Target::Tls { url, cert, key, ca } => {
            let read = |what: &str, p: &Path| {
                std::fs::read(p).map_err(|e| Error::Other(format!("{what} {}: {e}", p.display())))
            };
            let key_pem = zeroize::Zeroizing::new(read("--tls-key", key)?);
            let tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(read(
                    "--tls-ca", ca,
                )?))
                .identity(tonic::transport::Identity::from_pem(
                    read("--tls-cert", cert)?,
                    key_pem.as_slice(),
                ));
            let ch = Endpoint::from_shared(url.clone())
                .map_err(|e| Error::Other(format!("--broker {url}: {e}")))?
                .tls_config(tls)
                .map_err(unreachable)?
                .connect_timeout(std::time::Duration::from_secs(10))
                .connect()
                .await
                .map_err(unreachable)?;
            // With TLS 1.3 a rejected client certificate only shows on the first
            // request, as a bare "operation was canceled": ask the health service
            // (no policy involved) now, so the error can say what is wrong.
            let probe = tonic_health::pb::health_client::HealthClient::new(ch.clone())
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await;
            if let Err(s) = probe {
                if matches!(
                    s.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                ) {
                    return Err(Error::BrokerUnreachable {
                        socket: target.to_string(),
                        reason: format!(
                            "{}; keybrokerd ended the TLS session: is your client certificate issued by the CA it trusts, and still valid?",
                            s.message()
                        ),
                    });
                }
            }
            return Ok(ch);
        }
    };
    // The URI is required by tonic but unused: the connector dials the socket.
    Endpoint::from_static("http://keybrokerd.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = socket.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await
        .map_err(unreachable)
}
