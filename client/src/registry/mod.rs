//! Registry I/O: references, credentials, and the distribution API calls.

mod client;
mod credentials;
mod reference;

pub use client::{sha256_digest, Registry, RegistryOptions, MANIFEST_ACCEPT, OCI_MANIFEST};
pub use credentials::Credentials;
pub use reference::ImageRef;
