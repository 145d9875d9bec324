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
    Ok(KeyBrokerClient::new(channel))
}
