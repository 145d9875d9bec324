//! Registry I/O: references, credentials, and the distribution API calls.

#[doc(hidden)]
pub mod client;
mod credentials;
mod reference;
mod referrers;

pub use client::{
    sha256_digest, Registry, RegistryOptions, RetryPolicy, MANIFEST_ACCEPT, OCI_MANIFEST,
    RETRIES_ENV,
};
pub use credentials::Credentials;
pub use reference::ImageRef;
pub use referrers::{
    referrer_manifest, referrers_tag, Descriptor, Discovery, NewReferrer, EMPTY_CONFIG_MEDIA_TYPE,
    OCI_INDEX,
};
