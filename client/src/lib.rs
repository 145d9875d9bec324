//! keybroker's client library: ask keybrokerd for signatures, store and verify
//! them in OCI registries in cosign's format. Links no cloud SDK and holds no
//! signing key (generate-key-pair aside, which writes one to disk for the user).

pub mod attest;
pub mod audit;
pub mod broker;
pub mod bundle;
pub mod ci_env;
pub mod cosign;
mod error;
pub mod formats;
pub mod migrate;
pub mod plugin;
pub mod provenance;
pub mod provision;
pub mod registry;
pub mod sign;
pub mod tree;

pub use error::Error;
