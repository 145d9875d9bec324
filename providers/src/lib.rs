//! keybroker's key sources behind one trait.
//!
//! A [`KeyRef`] names a key (`/path/cosign.key`, `env://VAR`, `awskms:///alias/x`, …);
//! [`open`] turns it into an `Arc<dyn KeyProvider>`. Every provider signs a SHA-256
//! digest and returns an ASN.1 DER ECDSA P-256 signature, and reports its public key
//! as PEM. This crate knows nothing of gRPC, registries or policy: a test can drive
//! it alone. Key bytes never leave it.

#![warn(missing_docs)]

#[cfg(feature = "aws")]
pub mod aws_kms;
pub mod cosign_key;
pub mod ecdsa;
mod env;
mod error;
mod file;
#[cfg(feature = "gcp")]
pub mod gcp_kms;
#[cfg(feature = "github")]
pub mod github;
#[cfg(feature = "gitlab")]
pub mod gitlab;
pub mod keyref;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;
pub mod pem;
#[cfg(any(feature = "gitlab", feature = "github", feature = "gcp"))]
// gcp alone uses only part of it.
#[cfg_attr(not(any(feature = "gitlab", feature = "github")), allow(dead_code))]
mod rest;
#[cfg(feature = "vault")]
pub mod vault;
pub mod wrap;

use std::{fmt, sync::Arc};

pub use ecdsa::{P256Signer, Password};
pub use env::EnvKey;
pub use error::{Error, Result};
pub use file::FileKey;
pub use keyref::{KeyRef, SCHEMES};

/// The names cosign (and keybroker) give a key pair stored in a CI system
/// (GitLab CI/CD variables, GitHub Actions secrets).
pub mod ci_names {
    /// The cosign-encrypted private key (PEM).
    pub const PRIVATE_KEY: &str = "COSIGN_PRIVATE_KEY";
    /// Its password.
    pub const PASSWORD: &str = "COSIGN_PASSWORD";
    /// The public key (PEM).
    pub const PUBLIC_KEY: &str = "COSIGN_PUBLIC_KEY";
}

/// The only signature algorithm keybroker produces today.
pub const ALGORITHM: &str = "ecdsa-p256-sha256";

/// A SHA-256 digest: exactly 32 bytes, checked at construction.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Sha256Digest([u8; 32]);

impl Sha256Digest {
    /// Hashes `data`.
    pub fn of(data: &[u8]) -> Self {
        use sha2::Digest as _;
        Sha256Digest(sha2::Sha256::digest(data).into())
    }
    /// The digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl TryFrom<&[u8]> for Sha256Digest {
    type Error = Error;
    fn try_from(bytes: &[u8]) -> Result<Self> {
        let arr: [u8; 32] = bytes.try_into().map_err(|_| {
            Error::InvalidArgument(format!(
                "digest must be 32 bytes (SHA-256), got {}",
                bytes.len()
            ))
        })?;
        Ok(Sha256Digest(arr))
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_hex())
    }
}

/// A signature and the key version that made it.
#[derive(Debug, Clone)]
pub struct Signature {
    /// ASN.1 DER ECDSA signature.
    pub der: Vec<u8>,
    /// Backend key version ("" when the backend has none).
    pub key_version: String,
}

/// A public key and its version.
#[derive(Debug, Clone)]
pub struct PublicKey {
    /// PEM `PUBLIC KEY` (SPKI).
    pub pem: String,
    /// Backend key version ("" when the backend has none).
    pub key_version: String,
}

/// Counters of a public-key cache (what `keybrokerd`'s metrics report).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Answered from the cache.
    pub hits: u64,
    /// Had to ask the backend (first use, expired, or dropped after a rotation).
    pub misses: u64,
}

/// What a provider can do, so callers can explain instead of failing obscurely.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Can sign digests.
    pub sign: bool,
    /// Can report its public key.
    pub public_key: bool,
}

/// One key, wherever it lives.
#[async_trait::async_trait]
pub trait KeyProvider: Send + Sync + fmt::Debug {
    /// A stable, non-secret identifier (path, ARN, transit key name …).
    fn key_id(&self) -> &str;
    /// What this provider supports.
    fn capabilities(&self) -> Capabilities;
    /// Signs a SHA-256 digest; ASN.1 DER ECDSA P-256.
    async fn sign_digest(&self, digest: &Sha256Digest) -> Result<Signature>;
    /// The public key (PEM SPKI).
    async fn public_key(&self) -> Result<PublicKey>;
    /// Counters of the public-key cache in front of this provider, if it has one
    /// (wrappers forward their inner provider's).
    fn public_key_cache(&self) -> Option<CacheStats> {
        None
    }
}

/// How to open a key: secrets the reference itself does not carry.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Password for an encrypted key. `None`: the key must be unencrypted.
    pub password: Option<Password>,
    /// Vault / OpenBao connection (defaults from `VAULT_ADDR`, `VAULT_TOKEN`, …).
    #[cfg(feature = "vault")]
    pub vault: vault::VaultOptions,
    /// GitLab connection (defaults from `GITLAB_HOST`, `GITLAB_TOKEN`).
    #[cfg(feature = "gitlab")]
    pub gitlab: gitlab::GitLabOptions,
    /// Google Cloud KMS endpoint and credentials (defaults: ADC, cloudkms.googleapis.com).
    #[cfg(feature = "gcp")]
    pub gcp: gcp_kms::GcpOptions,
    /// Kubernetes connection (default: kube's inference, KUBECONFIG or in-cluster).
    #[cfg(feature = "kubernetes")]
    pub kubernetes: kubernetes::KubernetesOptions,
}

/// What every remote key source gets: a circuit breaker around retries with
/// jittered backoff around a public-key cache (5 minutes, one fetch in flight
/// per key).
#[cfg(any(
    feature = "vault",
    feature = "aws",
    feature = "gitlab",
    feature = "gcp"
))]
fn remote(provider: Arc<dyn KeyProvider>) -> Arc<dyn KeyProvider> {
    let cached = Arc::new(wrap::CachedPublicKey::new(
        provider,
        std::time::Duration::from_secs(300),
    ));
    let retrying = Arc::new(wrap::Retrying::new(cached, wrap::RetryConfig::default()));
    Arc::new(wrap::CircuitBreaker::new(
        retrying,
        wrap::BreakerConfig::default(),
    ))
}

/// Opens a key that lives on this machine (`file`, `env`) without touching any
/// remote backend code: what the client uses, so a workspace build that unifies
/// cloud features into this crate still links none of them into `keybroker`.
pub fn open_local(key_ref: &KeyRef, password: Option<&Password>) -> Result<Arc<dyn KeyProvider>> {
    match key_ref {
        KeyRef::File(path) => Ok(Arc::new(FileKey::open(path, password)?)),
        KeyRef::Env(var) => Ok(Arc::new(EnvKey::open(var, password)?)),
        other => Err(Error::Unsupported(format!(
            "{other} is not a local key; ask the broker for its public key with --key ALIAS"
        ))),
    }
}

/// Creates a key in its backend (where the scheme can) and returns its public key.
/// Existing keys are never replaced.
pub async fn create_key(key_ref: &KeyRef, options: &OpenOptions) -> Result<PublicKey> {
    match key_ref {
        #[cfg(feature = "aws")]
        KeyRef::AwsKms { endpoint, key_id } => {
            let id = aws_kms::AwsKmsKey::create(endpoint.as_deref(), key_id).await?;
            aws_kms::AwsKmsKey::open(endpoint.as_deref(), &id)
                .await?
                .public_key()
                .await
        }
        #[cfg(feature = "vault")]
        KeyRef::Vault { scheme, key } => {
            let key = vault::VaultKey::open(scheme, key, &options.vault)?;
            key.create().await?;
            key.public_key().await
        }
        #[cfg(feature = "gcp")]
        KeyRef::GcpKms { resource } => gcp_kms::GcpKmsKey::create(resource, &options.gcp).await,
        other => {
            let _ = options;
            Err(Error::Unsupported(format!(
                "creating {}:// keys here (files, gitlab://, github:// and k8s://: keybroker generate-key-pair)",
                other.scheme()
            )))
        }
    }
}

/// Why `github://` cannot be a signing source: GitHub never returns a secret's
/// value, so a workflow signs with the secrets GitHub puts in its environment.
pub fn github_is_no_signing_source(key_ref: &KeyRef) -> Error {
    Error::Unsupported(format!(
        "{key_ref} names GitHub Actions secrets, which GitHub never returns through its API, so they cannot be a signing key here; inside the workflow, pass the secrets to the job as environment variables and use ref = \"env://{}\" with password_env = \"{}\" (keybroker generate-key-pair {key_ref} stores them)",
        ci_names::PRIVATE_KEY,
        ci_names::PASSWORD
    ))
}

/// Opens the key a reference names.
pub async fn open(key_ref: &KeyRef, options: &OpenOptions) -> Result<Arc<dyn KeyProvider>> {
    match key_ref {
        KeyRef::File(path) => Ok(Arc::new(FileKey::open(path, options.password.as_ref())?)),
        KeyRef::Env(var) => Ok(Arc::new(EnvKey::open(var, options.password.as_ref())?)),
        #[cfg(feature = "aws")]
        KeyRef::AwsKms { endpoint, key_id } => {
            let key = aws_kms::AwsKmsKey::open(endpoint.as_deref(), key_id).await?;
            Ok(remote(Arc::new(key)))
        }
        #[cfg(feature = "vault")]
        KeyRef::Vault { scheme, key } => {
            let key = vault::VaultKey::open(scheme, key, &options.vault)?;
            Ok(remote(Arc::new(key)))
        }
        #[cfg(feature = "gitlab")]
        KeyRef::GitLab { path } => {
            let key = gitlab::GitLabKey::open(path, &options.gitlab)?;
            Ok(remote(Arc::new(key)))
        }
        #[cfg(feature = "gcp")]
        KeyRef::GcpKms { resource } => {
            let key = gcp_kms::GcpKmsKey::open(resource, &options.gcp)?;
            Ok(remote(Arc::new(key)))
        }
        // Answered from memory and kept current by a watch, so neither the
        // public-key cache (a rotation must show at once) nor retries apply.
        #[cfg(feature = "kubernetes")]
        KeyRef::Kubernetes { namespace, name } => Ok(Arc::new(
            kubernetes::KubernetesKey::open(namespace, name, &options.kubernetes).await?,
        )),
        // Whatever the features: GitHub never gives a secret back.
        KeyRef::GitHub { .. } => Err(github_is_no_signing_source(key_ref)),
        // Reached only for a scheme whose feature is off.
        #[allow(unreachable_patterns)]
        other => {
            let scheme = other.scheme();
            let hint = SCHEMES
                .iter()
                .find(|s| s.name == scheme)
                .and_then(|s| s.feature)
                .map(|f| format!(" (it needs keybroker-providers' cargo feature \"{f}\")"))
                .unwrap_or_default();
            Err(Error::NotBuilt { scheme, hint })
        }
    }
}
