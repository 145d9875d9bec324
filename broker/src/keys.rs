//! The daemon's key ring: aliases from the config, each opened once at start.

use std::{collections::BTreeMap, sync::Arc};

use keybroker_providers::{open, KeyProvider, KeyRef, OpenOptions, Password, PublicKey};

use crate::config::KeyConfig;

/// One configured key.
#[derive(Debug)]
pub struct KeyEntry {
    /// The alias callers use.
    pub alias: String,
    /// The provider (remote ones wrapped with retries and a public-key cache).
    pub provider: Arc<dyn KeyProvider>,
    /// Public key of the version that signs now, so a signature costs exactly one
    /// backend call; re-read when a signature reports another version. `None`
    /// while a remote backend has not answered yet.
    public: std::sync::RwLock<Option<PublicKey>>,
}

impl KeyEntry {
    /// The public key as last seen, without asking the backend.
    pub fn cached_public(&self) -> Option<PublicKey> {
        self.public
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn remember(&self, public: &PublicKey) {
        *self.public.write().unwrap_or_else(|p| p.into_inner()) = Some(public.clone());
    }

    /// The current public key (remote providers answer from their TTL cache).
    pub async fn public_key(&self) -> Result<PublicKey, keybroker_providers::Error> {
        let fresh = self.provider.public_key().await?;
        self.remember(&fresh);
        Ok(fresh)
    }

    /// The public key of `version`: the cached one, or a fresh read when the
    /// backend has rotated since.
    pub async fn public_for_version(
        &self,
        version: &str,
    ) -> Result<PublicKey, keybroker_providers::Error> {
        if let Some(cached) = self.cached_public().filter(|c| c.key_version == version) {
            return Ok(cached);
        }
        self.public_key().await
    }
}

/// How long the daemon waits at start for a remote key's public key.
const START_BUDGET: std::time::Duration = std::time::Duration::from_secs(2);

/// How to treat a backend that does not answer at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Startup {
    /// `--check-config`: every key must answer.
    Strict,
    /// The daemon: serve the keys that work; a remote key whose backend is down
    /// is logged and served (with UNAVAILABLE) until it comes back.
    Lenient,
}

/// Opens every key of the config; any failure names the alias.
pub async fn open_all(
    keys: &BTreeMap<String, KeyConfig>,
    startup: Startup,
) -> Result<BTreeMap<String, Arc<KeyEntry>>, String> {
    let mut out = BTreeMap::new();
    for (alias, kc) in keys {
        let key_ref = KeyRef::parse(&kc.reference).map_err(|e| format!("key {alias:?}: {e}"))?;
        let options = OpenOptions {
            password: password_for(alias, kc)?,
            #[cfg(feature = "vault")]
            vault: vault_options(alias, kc)?,
            #[cfg(feature = "gitlab")]
            gitlab: gitlab_options(alias, kc)?,
            #[cfg(feature = "kubernetes")]
            kubernetes: kubernetes_options(kc),
            #[cfg(feature = "gcp")]
            gcp: gcp_options(kc),
        };
        let mut provider = open(&key_ref, &options)
            .await
            .map_err(|e| format!("key {alias:?}: {e}"))?;
        if let Some(path) = &kc.public_key_file {
            let pem = std::fs::read_to_string(path)
                .map_err(|e| format!("key {alias:?}: public_key_file {}: {e}", path.display()))?;
            let fixed = keybroker_providers::wrap::StaticPublicKey::new(provider, &pem, "")
                .map_err(|e| format!("key {alias:?}: public_key_file {}: {e}", path.display()))?;
            provider = Arc::new(fixed);
        }
        let local = matches!(key_ref.scheme(), "file" | "env");
        let fetch = provider.public_key();
        let fetched = if startup == Startup::Lenient && !local {
            // A hung backend must not hold up the daemon's start.
            tokio::time::timeout(START_BUDGET, fetch)
                .await
                .unwrap_or_else(|_| {
                    Err(keybroker_providers::Error::Unavailable(format!(
                        "no answer within {START_BUDGET:?}"
                    )))
                })
        } else {
            fetch.await
        };
        let public = match fetched {
            Ok(p) => Some(p),
            Err(e) if startup == Startup::Lenient && !local => {
                tracing::warn!(key = %alias, error = %e, "key backend not answering at start; serving other keys");
                None
            }
            Err(e) => return Err(format!("key {alias:?}: {e}")),
        };
        out.insert(
            alias.clone(),
            Arc::new(KeyEntry {
                alias: alias.clone(),
                provider,
                public: public.into(),
            }),
        );
    }
    Ok(out)
}

#[cfg(feature = "vault")]
fn vault_options(
    alias: &str,
    kc: &KeyConfig,
) -> Result<keybroker_providers::vault::VaultOptions, String> {
    let Some(v) = &kc.vault else {
        return Ok(Default::default());
    };
    let token = match (&v.token_env, &v.token_file) {
        (Some(_), Some(_)) => {
            return Err(format!(
                "key {alias:?}: set vault.token_env or vault.token_file, not both"
            ))
        }
        (Some(var), None) => Some(
            std::env::var(var)
                .map_err(|_| format!("key {alias:?}: vault.token_env {var} is not set"))?,
        ),
        (None, Some(path)) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| format!("key {alias:?}: vault.token_file {}: {e}", path.display()))?
                .trim_end()
                .to_string(),
        ),
        (None, None) => None,
    };
    let approle = match &v.approle {
        None => None,
        Some(a) => {
            let secret_id = match (&a.secret_id_env, &a.secret_id_file) {
                (Some(var), None) => std::env::var(var).map_err(|_| format!("key {alias:?}: vault.approle.secret_id_env {var} is not set"))?,
                (None, Some(path)) => std::fs::read_to_string(path)
                    .map_err(|e| format!("key {alias:?}: vault.approle.secret_id_file {}: {e}", path.display()))?
                    .trim_end()
                    .to_string(),
                _ => return Err(format!("key {alias:?}: vault.approle needs exactly one of secret_id_env, secret_id_file")),
            };
            Some(keybroker_providers::vault::AppRole {
                mount: a.mount.clone().unwrap_or_else(|| "approle".into()),
                role_id: a.role_id.clone(),
                secret_id: zeroize::Zeroizing::new(secret_id),
            })
        }
    };
    let kubernetes = v
        .kubernetes
        .as_ref()
        .map(|k| keybroker_providers::vault::KubernetesAuth {
            mount: k.mount.clone().unwrap_or_else(|| "kubernetes".into()),
            role: k.role.clone(),
            token_path: k.token_path.clone().unwrap_or_else(|| {
                keybroker_providers::vault::KubernetesAuth::DEFAULT_TOKEN_PATH.into()
            }),
        });
    Ok(keybroker_providers::vault::VaultOptions {
        approle,
        kubernetes,
        address: v.address.clone(),
        mount: v.mount.clone(),
        namespace: v.namespace.clone(),
        token: token.map(zeroize::Zeroizing::new),
        key_version: v.key_version,
        timeout: v.timeout_ms.map(std::time::Duration::from_millis),
    })
}

#[cfg(feature = "gitlab")]
fn gitlab_options(
    alias: &str,
    kc: &KeyConfig,
) -> Result<keybroker_providers::gitlab::GitLabOptions, String> {
    let Some(g) = &kc.gitlab else {
        return Ok(Default::default());
    };
    let token = match (&g.token_env, &g.token_file) {
        (Some(var), None) => Some(
            std::env::var(var)
                .map_err(|_| format!("key {alias:?}: gitlab.token_env {var} is not set"))?,
        ),
        (None, Some(path)) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| format!("key {alias:?}: gitlab.token_file {}: {e}", path.display()))?
                .trim_end()
                .to_string(),
        ),
        (None, None) => None,
        (Some(_), Some(_)) => {
            return Err(format!(
                "key {alias:?}: set gitlab.token_env or gitlab.token_file, not both"
            ))
        }
    };
    Ok(keybroker_providers::gitlab::GitLabOptions {
        host: g.host.clone(),
        token: token.map(zeroize::Zeroizing::new),
        cache_ttl: g.cache_ttl_secs.map(std::time::Duration::from_secs),
        timeout: g.timeout_ms.map(std::time::Duration::from_millis),
    })
}

#[cfg(feature = "kubernetes")]
fn kubernetes_options(kc: &KeyConfig) -> keybroker_providers::kubernetes::KubernetesOptions {
    let k = kc.kubernetes.clone().unwrap_or_default();
    keybroker_providers::kubernetes::KubernetesOptions {
        kubeconfig: k.kubeconfig,
        context: k.context,
        ..Default::default()
    }
}

#[cfg(feature = "gcp")]
fn gcp_options(kc: &KeyConfig) -> keybroker_providers::gcp_kms::GcpOptions {
    let g = kc.gcp.clone().unwrap_or_default();
    keybroker_providers::gcp_kms::GcpOptions {
        endpoint: g.endpoint,
        credentials_file: g.credentials_file,
        timeout: g.timeout_ms.map(std::time::Duration::from_millis),
        version_ttl: g.version_ttl_secs.map(std::time::Duration::from_secs),
    }
}

/// `password_env`, else `password_file`, else `COSIGN_PASSWORD` if set (as cosign).
fn password_for(alias: &str, kc: &KeyConfig) -> Result<Option<Password>, String> {
    if let Some(var) = &kc.password_env {
        let v = std::env::var(var)
            .map_err(|_| format!("key {alias:?}: password_env {var} is not set"))?;
        return Ok(Some(Password::new(v)));
    }
    if let Some(path) = &kc.password_file {
        let mut v = std::fs::read(path)
            .map_err(|e| format!("key {alias:?}: password_file {}: {e}", path.display()))?;
        while v.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            v.pop();
        }
        return Ok(Some(Password::new(v)));
    }
    Ok(std::env::var("COSIGN_PASSWORD").ok().map(Password::new))
}
