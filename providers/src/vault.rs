//! HashiCorp Vault / OpenBao transit keys (`hashivault://KEY`, `openbao://KEY`).
//!
//! Signs a prehashed SHA-256 digest with `POST /v1/<mount>/sign/<key>/sha2-256`
//! (`prehashed=true`, ASN.1 signature) through `vaultrs`; strips `vault:vN:` and
//! reports N as the key version. The public key is the pinned version's, else the
//! newest version's. Auth: a fixed token (config or `VAULT_TOKEN`), or an AppRole
//! or Kubernetes service-account login that the provider renews by logging in
//! again before the lease runs out; callers of the broker never see a token.

use std::{
    fmt,
    sync::Arc,
    time::{Duration, Instant},
};

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use vaultrs::{
    api::transit::{requests::SignDataRequest, responses::ReadKeyData, HashAlgorithm},
    client::{VaultClient, VaultClientSettingsBuilder},
    error::ClientError,
};
use zeroize::Zeroizing;

use crate::{
    ecdsa::normalize_public_pem, Capabilities, Error, KeyProvider, PublicKey, Result, Sha256Digest,
    Signature,
};

/// Where and how to reach Vault. `Debug` never shows the token.
#[derive(Clone, Default)]
pub struct VaultOptions {
    /// Server address; default `VAULT_ADDR`.
    pub address: Option<String>,
    /// Transit mount; default `TRANSIT_SECRET_ENGINE_PATH` (cosign's name), else `transit`.
    pub mount: Option<String>,
    /// Vault Enterprise namespace; default `VAULT_NAMESPACE`.
    pub namespace: Option<String>,
    /// Token; default `VAULT_TOKEN`. Ignored when `approle` is set.
    pub token: Option<Zeroizing<String>>,
    /// Log in with AppRole instead of a fixed token; the broker logs in again
    /// before the token's lease runs out (and once on a 403).
    pub approle: Option<AppRole>,
    /// Log in with the Kubernetes auth method (a service-account token), renewed
    /// like AppRole. At most one of `approle` and `kubernetes`.
    pub kubernetes: Option<KubernetesAuth>,
    /// Pin a key version (sign and public key); default: the newest.
    pub key_version: Option<u64>,
    /// Per-request timeout; default 10 s.
    pub timeout: Option<Duration>,
}

impl fmt::Debug for VaultOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VaultOptions")
            .field("address", &self.address)
            .field("mount", &self.mount)
            .field("namespace", &self.namespace)
            .field("token", &self.token.as_ref().map(|_| "[redacted]"))
            .field("approle", &self.approle)
            .field("kubernetes", &self.kubernetes)
            .field("key_version", &self.key_version)
            .finish()
    }
}

/// AppRole credentials.
#[derive(Clone)]
pub struct AppRole {
    /// Auth mount (default `approle`).
    pub mount: String,
    /// Role id (not secret on its own).
    pub role_id: String,
    /// Secret id.
    pub secret_id: Zeroizing<String>,
}

impl fmt::Debug for AppRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppRole")
            .field("mount", &self.mount)
            .field("role_id", &self.role_id)
            .field("secret_id", &"[redacted]")
            .finish()
    }
}

/// Kubernetes auth method credentials: the pod's service-account token, read
/// from `token_path` at every login (projected tokens are rotated by the kubelet).
#[derive(Debug, Clone)]
pub struct KubernetesAuth {
    /// Auth mount (default `kubernetes`).
    pub mount: String,
    /// Vault role bound to the service account.
    pub role: String,
    /// Service-account token file (default
    /// `/var/run/secrets/kubernetes.io/serviceaccount/token`).
    pub token_path: std::path::PathBuf,
}

impl KubernetesAuth {
    /// The in-cluster default token path.
    pub const DEFAULT_TOKEN_PATH: &'static str =
        "/var/run/secrets/kubernetes.io/serviceaccount/token";
}

/// How the provider gets its Vault token when it is not a fixed one.
#[derive(Debug, Clone)]
enum Login {
    AppRole(AppRole),
    Kubernetes(KubernetesAuth),
}

impl Login {
    fn name(&self) -> &'static str {
        match self {
            Login::AppRole(_) => "AppRole",
            Login::Kubernetes(_) => "Kubernetes",
        }
    }

    async fn login(&self, anonymous: &VaultClient, id: &str) -> Result<vaultrs::api::AuthInfo> {
        let what = format!("{id}: {} login", self.name());
        match self {
            Login::AppRole(a) => {
                vaultrs::auth::approle::login(anonymous, &a.mount, &a.role_id, &a.secret_id)
                    .await
                    .map_err(|e| map_err(&what, e))
            }
            Login::Kubernetes(k) => {
                let jwt = Zeroizing::new(
                    std::fs::read_to_string(&k.token_path)
                        .map_err(|e| {
                            Error::PermissionDenied(format!(
                                "{what}: service-account token {}: {e}",
                                k.token_path.display()
                            ))
                        })?
                        .trim()
                        .to_string(),
                );
                vaultrs::auth::kubernetes::login(anonymous, &k.mount, &k.role, &jwt)
                    .await
                    .map_err(|e| map_err(&what, e))
            }
        }
    }
}

/// A logged-in client and when to log in again.
struct Session {
    client: Arc<VaultClient>,
    relogin_at: Option<Instant>,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// A transit key.
pub struct VaultKey {
    settings: (String, Option<String>, Duration),
    login: Option<Login>,
    session: tokio::sync::RwLock<Session>,
    mount: String,
    key: String,
    id: String,
    key_version: Option<u64>,
}

impl fmt::Debug for VaultKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VaultKey")
            .field("id", &self.id)
            .field("key_version", &self.key_version)
            .finish()
    }
}

/// Maps a vaultrs error to ours, keeping Vault's message and never a credential.
fn map_err(what: &str, e: ClientError) -> Error {
    match e {
        ClientError::APIError { code, errors } => {
            let msg = format!("{what}: Vault answered {code}: {}", errors.join("; "));
            match code {
                // Transit answers 400 "signing key not found" for a missing key.
                400 if errors.iter().any(|e| e.contains("not found")) => Error::NotFound(msg),
                400 => Error::InvalidArgument(msg),
                401 | 403 => Error::PermissionDenied(msg),
                404 => Error::NotFound(msg),
                429 => Error::ResourceExhausted(msg),
                _ if code >= 500 => Error::Unavailable(msg),
                _ => Error::Other(msg),
            }
        }
        ClientError::RestClientError { source } => Error::Unavailable(format!("{what}: {source}")),
        other => Error::Other(format!("{what}: {other}")),
    }
}

impl VaultKey {
    /// Connects (lazily: no request is made here) to the key `key`.
    pub fn open(scheme: &str, key: &str, options: &VaultOptions) -> Result<Self> {
        let address = options.address.clone().or_else(|| env("VAULT_ADDR")).ok_or_else(|| {
            Error::InvalidArgument(format!("{scheme}://{key}: no Vault address (set VAULT_ADDR or the key's vault address)"))
        })?;
        let mount = options
            .mount
            .clone()
            .or_else(|| env("TRANSIT_SECRET_ENGINE_PATH"))
            .unwrap_or_else(|| "transit".into());
        let namespace = options.namespace.clone().or_else(|| env("VAULT_NAMESPACE"));
        let timeout = options.timeout.unwrap_or(Duration::from_secs(10));
        let id = format!("{scheme}://{key}");
        let settings = (address, namespace, timeout);
        let login = match (&options.approle, &options.kubernetes) {
            (Some(a), None) => Some(Login::AppRole(a.clone())),
            (None, Some(k)) => Some(Login::Kubernetes(k.clone())),
            (None, None) => None,
            (Some(_), Some(_)) => {
                return Err(Error::InvalidArgument(format!(
                    "{id}: choose one of AppRole and Kubernetes auth, not both"
                )))
            }
        };
        let (client, relogin_at) = match &login {
            // Logged in on first use: opening never blocks on the network.
            Some(_) => (client_with_token(&settings, "", &id)?, Some(Instant::now())),
            None => {
                let token = options
                    .token
                    .clone()
                    .or_else(|| env("VAULT_TOKEN").map(Zeroizing::new))
                    .ok_or_else(|| {
                        Error::PermissionDenied(format!(
                            "{id}: no Vault token (set VAULT_TOKEN, or the key's token, AppRole or Kubernetes auth)"
                        ))
                    })?;
                (client_with_token(&settings, &token, &id)?, None)
            }
        };
        Ok(VaultKey {
            settings,
            login,
            session: tokio::sync::RwLock::new(Session {
                client: Arc::new(client),
                relogin_at,
            }),
            mount,
            key: key.to_string(),
            id,
            key_version: options.key_version,
        })
    }

    /// The client to use now, logging in (again) first when the token is due.
    async fn client(&self, force_login: bool) -> Result<Arc<VaultClient>> {
        {
            let s = self.session.read().await;
            if !force_login && s.relogin_at.is_none_or(|at| Instant::now() < at) {
                return Ok(s.client.clone());
            }
        }
        let Some(login) = &self.login else {
            return Ok(self.session.read().await.client.clone());
        };
        let mut s = self.session.write().await;
        // Another request may have logged in while we waited for the lock.
        if !force_login && s.relogin_at.is_some_and(|at| Instant::now() < at) {
            return Ok(s.client.clone());
        }
        let anonymous = client_with_token(&self.settings, "", &self.id)?;
        let auth = login.login(&anonymous, &self.id).await?;
        let token = Zeroizing::new(auth.client_token);
        // Log in again after two thirds of the lease, well before it runs out.
        let lease = Duration::from_secs(auth.lease_duration.max(3));
        s.client = Arc::new(client_with_token(&self.settings, &token, &self.id)?);
        s.relogin_at = Some(Instant::now() + lease * 2 / 3);
        tracing::debug!(key = %self.id, ?lease, method = login.name(), "logged in to Vault");
        Ok(s.client.clone())
    }

    /// Runs `op` with a current client; with a login method, a 403 triggers one
    /// fresh login and a retry (the token may have been revoked early).
    async fn with_client<T, F, Fut>(&self, op: F) -> Result<T>
    where
        F: Fn(Arc<VaultClient>) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        match op(self.client(false).await?).await {
            Err(Error::PermissionDenied(_)) if self.login.is_some() => {
                op(self.client(true).await?).await
            }
            other => other,
        }
    }
}

fn client_with_token(
    settings: &(String, Option<String>, Duration),
    token: &str,
    id: &str,
) -> Result<VaultClient> {
    let (address, namespace, timeout) = settings;
    let mut b = VaultClientSettingsBuilder::default();
    b.address(address).token(token).timeout(Some(*timeout));
    if let Some(ns) = namespace {
        b.namespace(Some(ns.clone()));
    }
    let built = b
        .build()
        .map_err(|e| Error::InvalidArgument(format!("{id}: Vault settings: {e}")))?;
    VaultClient::new(built).map_err(|e| map_err(id, e))
}

impl VaultKey {
    /// Creates the transit key as `ecdsa-p256`, refusing to touch an existing one.
    pub async fn create(&self) -> Result<()> {
        match self.public_key().await {
            Ok(_) => {
                return Err(Error::InvalidArgument(format!(
                    "{} already exists; not touching it",
                    self.id
                )))
            }
            Err(Error::NotFound(_)) => {}
            Err(other) => return Err(other),
        }
        self.with_client(|client| async move {
            let mut req = vaultrs::api::transit::requests::CreateKeyRequest::builder();
            req.key_type(vaultrs::api::transit::KeyType::EcdsaP256);
            vaultrs::transit::key::create(client.as_ref(), &self.mount, &self.key, Some(&mut req))
                .await
                .map_err(|e| map_err(&format!("create {}", self.id), e))
        })
        .await
    }
}

/// Splits `vault:vN:BASE64` into (N, DER bytes).
pub fn parse_vault_signature(s: &str) -> Result<(u64, Vec<u8>)> {
    let bad = || {
        Error::Other(format!(
            "unexpected Vault signature format {:?}",
            s.chars().take(24).collect::<String>()
        ))
    };
    let rest = s.strip_prefix("vault:v").ok_or_else(bad)?;
    let (version, b64) = rest.split_once(':').ok_or_else(bad)?;
    let version: u64 = version.parse().map_err(|_| bad())?;
    let der = B64.decode(b64).map_err(|_| bad())?;
    Ok((version, der))
}

#[async_trait::async_trait]
impl KeyProvider for VaultKey {
    fn key_id(&self) -> &str {
        &self.id
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            sign: true,
            public_key: true,
        }
    }

    async fn sign_digest(&self, digest: &Sha256Digest) -> Result<Signature> {
        let input = B64.encode(digest.as_bytes());
        let resp = self
            .with_client(|client| {
                let input = input.clone();
                async move {
                    let mut req = SignDataRequest::builder();
                    req.prehashed(true)
                        .hash_algorithm(HashAlgorithm::Sha2_256)
                        .marshaling_algorithm(vaultrs::api::transit::MarshalingAlgorithm::Asn1);
                    if let Some(v) = self.key_version {
                        req.key_version(v);
                    }
                    vaultrs::transit::data::sign(
                        client.as_ref(),
                        &self.mount,
                        &self.key,
                        &input,
                        Some(&mut req),
                    )
                    .await
                    .map_err(|e| map_err(&format!("sign with {}", self.id), e))
                }
            })
            .await?;
        let (version, der) = parse_vault_signature(&resp.signature)?;
        Ok(Signature {
            der,
            key_version: version.to_string(),
        })
    }

    async fn public_key(&self) -> Result<PublicKey> {
        let resp = self
            .with_client(|client| async move {
                vaultrs::transit::key::read(client.as_ref(), &self.mount, &self.key)
                    .await
                    .map_err(|e| map_err(&format!("read {}", self.id), e))
            })
            .await?;
        let ReadKeyData::Asymmetric(versions) = resp.keys else {
            return Err(Error::KeyFormat(format!(
                "{} is a symmetric transit key; keybroker needs ecdsa-p256",
                self.id
            )));
        };
        let wanted = match self.key_version {
            Some(v) => v,
            None => versions
                .keys()
                .filter_map(|k| k.parse::<u64>().ok())
                .max()
                .ok_or_else(|| Error::NotFound(format!("{} has no versions", self.id)))?,
        };
        let entry = versions
            .get(&wanted.to_string())
            .ok_or_else(|| Error::NotFound(format!("{} has no version {wanted}", self.id)))?;
        let pem = normalize_public_pem(&entry.public_key).map_err(|e| {
            Error::KeyFormat(format!(
                "{} (type {:?}): {e}; keybroker needs ecdsa-p256",
                self.id, resp.key_type
            ))
        })?;
        Ok(PublicKey {
            pem,
            key_version: wanted.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vault_signatures() {
        let (v, der) = parse_vault_signature("vault:v3:MEUCIQ==").unwrap();
        assert_eq!((v, der), (3, vec![0x30, 0x45, 0x02, 0x21]));
        assert!(parse_vault_signature("MEUC").is_err());
        assert!(parse_vault_signature("vault:vx:MEUC").is_err());
    }

    #[test]
    fn debug_hides_the_token() {
        let o = VaultOptions {
            token: Some(Zeroizing::new("s.supersecret".into())),
            ..Default::default()
        };
        assert!(!format!("{o:?}").contains("supersecret"));
    }
}
