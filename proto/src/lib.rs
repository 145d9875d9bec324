//! The keybroker.v1 gRPC API: generated types, client and server, plus the one
//! fact client and daemon must agree on without talking: where the socket is.

use std::path::PathBuf;

pub mod codec;

pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("keybroker.v1");

    /// Encoded file descriptor set, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("keybroker_descriptor");
}

/// Metadata every KeyBroker call must carry (`keybroker-request: true`), like
/// SPIFFE's Workload API header: a confused HTTP client (SSRF) cannot add it,
/// so it cannot be turned into a signer. The health service does not need it.
pub const REQUEST_HEADER: &str = "keybroker-request";
/// The only accepted value of [`REQUEST_HEADER`].
pub const REQUEST_HEADER_VALUE: &str = "true";

/// Adds [`REQUEST_HEADER`] to every request.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestHeader;

impl tonic::service::Interceptor for RequestHeader {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert(
            REQUEST_HEADER,
            tonic::metadata::MetadataValue::from_static(REQUEST_HEADER_VALUE),
        );
        Ok(req)
    }
}

/// A KeyBroker client that sends [`REQUEST_HEADER`].
pub type Client = v1::key_broker_client::KeyBrokerClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, RequestHeader>,
>;

/// Wraps a connected channel into a [`Client`].
pub fn client(channel: tonic::transport::Channel) -> Client {
    v1::key_broker_client::KeyBrokerClient::with_interceptor(channel, RequestHeader)
}

/// Environment variable naming the daemon's socket (as `SSH_AUTH_SOCK` does for ssh-agent).
pub const SOCKET_ENV: &str = "KEYBROKER_SOCKET";

/// Where the daemon keeps its state when run without a config file:
/// `$XDG_DATA_HOME/keybroker`, else `~/.local/share/keybroker`, else `/var/lib/keybroker`.
pub fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("keybroker");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h).join(".local/share/keybroker");
    }
    PathBuf::from("/var/lib/keybroker")
}

/// The socket the daemon serves on by default and the client tries by default:
/// `$XDG_RUNTIME_DIR/keybroker/keybroker.sock`, else `<data dir>/keybroker.sock`.
pub fn default_socket_path() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d).join("keybroker/keybroker.sock"),
        None => default_data_dir().join("keybroker.sock"),
    }
}
