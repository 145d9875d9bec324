//! The daemon's key ring: aliases from the config, each opened once at start.

use std::{collections::BTreeMap, sync::Arc};

use keybroker_providers::{open, KeyProvider, KeyRef, OpenOptions, Password, PublicKey};

use crate::config::KeyConfig;

/// One configured key.
#[derive(Debug)]
pub struct KeyEntry {
    /// The alias callers use.
    pub alias: String,
    /// The provider.
    pub provider: Arc<dyn KeyProvider>,
    /// Public key read at start; refreshed when a signature reports another
    /// version (a rotated remote key), so signing never calls the backend twice.
    public: std::sync::RwLock<PublicKey>,
}

impl KeyEntry {
    /// The cached public key.
    pub fn public(&self) -> PublicKey {
        self.public
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The public key matching `version`: the cached one, or a fresh read when the
    /// backend has rotated since.
    pub async fn public_for_version(
        &self,
        version: &str,
    ) -> Result<PublicKey, keybroker_providers::Error> {
        let cached = self.public();
        if cached.key_version == version {
            return Ok(cached);
        }
        let fresh = self.provider.public_key().await?;
        if fresh.key_version == version {
            *self.public.write().unwrap_or_else(|p| p.into_inner()) = fresh.clone();
        }
        Ok(fresh)
    }
}

/// Opens every key of the config; any failure names the alias.
pub async fn open_all(
    keys: &BTreeMap<String, KeyConfig>,
) -> Result<BTreeMap<String, Arc<KeyEntry>>, String> {
    let mut out = BTreeMap::new();
    for (alias, kc) in keys {
        let key_ref = KeyRef::parse(&kc.reference).map_err(|e| format!("key {alias:?}: {e}"))?;
        let options = OpenOptions {
            password: password_for(alias, kc)?,
            #[cfg(feature = "vault")]
            vault: vault_options(alias, kc)?,
        };
        let provider = open(&key_ref, &options)
            .await
            .map_err(|e| format!("key {alias:?}: {e}"))?;
        let public = provider
            .public_key()
            .await
            .map_err(|e| format!("key {alias:?}: {e}"))?;
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
    Ok(keybroker_providers::vault::VaultOptions {
        address: v.address.clone(),
        mount: v.mount.clone(),
        namespace: v.namespace.clone(),
        token: token.map(zeroize::Zeroizing::new),
        key_version: v.key_version,
        timeout: v.timeout_ms.map(std::time::Duration::from_millis),
    })
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
