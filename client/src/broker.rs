//! Connecting to keybrokerd over its unix socket.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use keybroker_proto::v1::key_broker_client::KeyBrokerClient;
use tonic::transport::{Channel, Endpoint};

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

/// Connects now (not lazily), so "the broker is not running" is reported up front.
pub async fn connect(socket: &Path) -> Result<KeyBrokerClient<Channel>, Error> {
    Ok(KeyBrokerClient::new(channel(socket).await?))
}

/// `keybroker health`: asks the daemon's standard gRPC health service whether
/// `service` ("" = the whole server) is SERVING, within `timeout`.
pub async fn health(
    socket: &Path,
    service: &str,
    timeout: std::time::Duration,
) -> Result<(), Error> {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    let check = async {
        let mut c = HealthClient::new(channel(socket).await?);
        c.check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .map_err(|e| match e.code() {
            tonic::Code::NotFound => Error::Other(format!(
                "{}: keybrokerd reports no health for service {service:?}",
                socket.display()
            )),
            _ => Error::from(e),
        })
    };
    let resp = tokio::time::timeout(timeout, check).await.map_err(|_| {
        Error::Other(format!(
            "{}: no health answer within {timeout:?}",
            socket.display()
        ))
    })??;
    match resp.into_inner().status() {
        ServingStatus::Serving => Ok(()),
        other => Err(Error::Other(format!(
            "{}: {} is {}",
            socket.display(),
            if service.is_empty() {
                "keybrokerd"
            } else {
                service
            },
            other.as_str_name()
        ))),
    }
}

async fn channel(socket: &Path) -> Result<Channel, Error> {
    let path = socket.to_path_buf();
    // The URI is required by tonic but unused: the connector dials the socket.
    let endpoint = Endpoint::from_static("http://keybrokerd.invalid");
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await
        .map_err(|e| Error::BrokerUnreachable {
            socket: socket.display().to_string(),
            reason: std::error::Error::source(&e)
                .map(|s| s.to_string())
                .unwrap_or_else(|| e.to_string()),
        })?;
    Ok(channel)
}
