//! The one place errors become gRPC status codes (DESIGN.md §3).

use keybroker_providers::Error;
use tonic::{Code, Status};

use crate::policy::Denied;

/// Maps a provider error to a status a caller can act on; never INTERNAL for
/// something the caller got wrong.
pub fn from_provider(err: &Error) -> Status {
    let code = match err {
        Error::NotFound(_) => Code::NotFound,
        Error::PermissionDenied(_) => Code::PermissionDenied,
        Error::InvalidArgument(_) | Error::InvalidReference { .. } => Code::InvalidArgument,
        Error::UnknownScheme { .. } | Error::NotBuilt { .. } | Error::Unsupported(_) => {
            Code::Unimplemented
        }
        Error::KeyFormat(_) | Error::WrongPassword => Code::FailedPrecondition,
        Error::Unavailable(_) => Code::Unavailable,
        Error::ResourceExhausted(_) => Code::ResourceExhausted,
        Error::Other(_) => Code::Internal,
    };
    Status::new(code, err.to_string())
}

/// A policy denial.
pub fn from_denied(d: &Denied) -> Status {
    Status::permission_denied(d.to_string())
}

/// A rate limit: RESOURCE_EXHAUSTED, saying when to retry.
pub fn from_limited(l: &crate::limits::Limited) -> Status {
    Status::resource_exhausted(l.to_string())
}
