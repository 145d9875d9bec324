//! Client errors: each says what happened and what to do next.

/// What went wrong, for a one-line message on stderr.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The daemon's socket cannot be reached.
    #[error("keybrokerd is not reachable at {socket} ({reason}); start it with `keybrokerd`, or point --socket / $KEYBROKER_SOCKET (or --broker URL) at it")]
    BrokerUnreachable {
        /// The socket tried.
        socket: String,
        /// The OS error.
        reason: String,
    },
    /// The daemon refused or failed the request.
    #[error("{}", broker_message(.0))]
    Broker(#[from] tonic::Status),
    /// The image reference does not parse.
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference {
        /// As given.
        reference: String,
        /// Why.
        reason: String,
    },
    /// The image (or tag) does not exist in the registry.
    #[error("image not found: {0}")]
    ImageNotFound(String),
    /// The registry wants credentials we do not have, or refused ours.
    #[error("registry authentication failed for {registry}: {reason}; log in with `docker login {registry}` or pass --registry-username/--registry-password")]
    RegistryAuth {
        /// Registry host.
        registry: String,
        /// Details.
        reason: String,
    },
    /// Any other registry failure.
    #[error("registry {registry}: {reason}")]
    Registry {
        /// Registry host.
        registry: String,
        /// Details.
        reason: String,
    },
    /// Nothing verified.
    #[error("{0}")]
    Verification(String),
    /// Local key or file problems.
    #[error("{0}")]
    Key(#[from] keybroker_providers::Error),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

fn broker_message(s: &tonic::Status) -> String {
    use tonic::Code;
    // A status made on our side from a transport error (the daemon went away
    // mid-call, or never answered) carries that error as its source; one the
    // daemon sent has none.
    if std::error::Error::source(s).is_some() {
        return format!(
            "lost the connection to keybrokerd (did it stop or restart?): {}",
            s.message()
        );
    }
    let what = match s.code() {
        Code::PermissionDenied => "the broker's policy refused this request",
        Code::NotFound => "not found in the broker",
        Code::InvalidArgument => "the broker rejected the request",
        Code::Unauthenticated => "the broker could not identify this caller",
        Code::Unavailable => "the broker or its key backend is unavailable (retry later)",
        Code::ResourceExhausted => "rate limited by the broker or its backend (retry later)",
        Code::Unimplemented => "not supported by this broker",
        _ => "the broker failed",
    };
    format!("{what}: {}", s.message())
}
