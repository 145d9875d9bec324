//! The one error type every provider converts into. Its variants are the cases a
//! caller can act on; the broker maps them to gRPC status codes in exactly one place
//! (`broker/src/status.rs`). Messages never carry key material or credentials.

/// Result alias for provider operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, in terms a caller can act on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The key (or the secret holding it) does not exist.
    #[error("key not found: {0}")]
    NotFound(String),
    /// The backend refused us (credentials, ACL, file permissions).
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The caller's input is malformed (wrong digest length, bad parameter).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A key reference that cannot be parsed.
    #[error("invalid key reference {reference:?}: {reason}")]
    InvalidReference {
        /// The reference as given.
        reference: String,
        /// Why it was refused.
        reason: String,
    },
    /// A `scheme://` we have never heard of.
    #[error("unknown key scheme {scheme:?}: known schemes are {known}")]
    UnknownScheme {
        /// The scheme as given.
        scheme: String,
        /// Comma-separated list of the schemes we know.
        known: String,
    },
    /// A scheme we know but this binary was built without.
    #[error("key scheme {scheme}:// is not built into this binary{hint}")]
    NotBuilt {
        /// The scheme.
        scheme: &'static str,
        /// How to get it (a cargo feature), or empty.
        hint: String,
    },
    /// The provider cannot do this operation at all (e.g. read back a GitHub secret).
    #[error("not supported by this key source: {0}")]
    Unsupported(String),
    /// Key material that does not parse, or is of a kind we refuse.
    #[error("bad key material: {0}")]
    KeyFormat(String),
    /// Decryption of a cosign key failed: wrong password or a corrupted file.
    #[error("cannot decrypt key: wrong password or corrupted key file")]
    WrongPassword,
    /// The backend is down or timed out; retrying later may help.
    #[error("key backend unavailable: {0}")]
    Unavailable(String),
    /// The backend throttled us.
    #[error("key backend throttled: {0}")]
    ResourceExhausted(String),
    /// Anything else, with context.
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// Maps an I/O error on `what` (a path or name, never content) to the closest case.
    pub fn io(what: &str, err: &std::io::Error) -> Self {
        use std::io::ErrorKind;
        match err.kind() {
            ErrorKind::NotFound => Error::NotFound(format!("{what}: {err}")),
            ErrorKind::PermissionDenied => Error::PermissionDenied(format!("{what}: {err}")),
            _ => Error::Other(format!("{what}: {err}")),
        }
    }
}
