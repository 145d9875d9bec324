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
    /// Public key read at start (file and env keys cannot change under us).
    pub public: PublicKey,
}

/// Opens every key of the config; any failure names the alias.
pub async fn open_all(
    keys: &BTreeMap<String, KeyConfig>,
) -> Result<BTreeMap<String, Arc<KeyEntry>>, String> {
    let mut out = BTreeMap::new();
    for (alias, kc) in keys {
        let key_ref = KeyRef::parse(&kc.reference).map_err(|e| format!("key {alias:?}: {e}"))?;
        let password = password_for(alias, kc)?;
        let provider = open(&key_ref, &OpenOptions { password })
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
                public,
            }),
        );
    }
    Ok(out)
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
