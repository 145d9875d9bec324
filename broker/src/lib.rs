//! keybrokerd: the signing daemon. A request reads top to bottom:
//! `listen` (socket) → `identity` (who) → `policy` (may they) → `service`
//! (payload, sign) → `status` (errors as gRPC codes). See ARCHITECTURE.md.

pub mod activation;
pub mod audit;
pub mod config;
pub mod identity;
pub mod keys;
pub mod listen;
pub mod payload;
pub mod policy;
pub mod service;
pub mod status;

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
    Ok(State {
        keys,
        policy,
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
/// `shutdown` completes; in-flight requests finish first.
pub async fn serve(
    socket: tokio::net::UnixListener,
    state: SharedState,
    max_request_bytes: usize,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), String> {
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
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection)
        .add_service(broker)
        .serve_with_incoming_shutdown(UnixListenerStream::new(socket), shutdown)
        .await
        .map_err(|e| format!("server: {e}"))
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
