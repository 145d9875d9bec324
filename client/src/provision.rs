//! `generate-key-pair` for key sources that create keys remotely. The client links
//! no cloud SDK, so these are the few plain HTTP calls each needs.

pub mod ci;

use std::path::Path;

use serde_json::Value;

use crate::Error;

/// Where a Vault / OpenBao transit engine is, from cosign's environment variables.
#[derive(Debug, Clone)]
pub struct VaultTarget {
    /// `VAULT_ADDR`.
    pub address: String,
    /// `TRANSIT_SECRET_ENGINE_PATH`, else `transit`.
    pub mount: String,
    /// `VAULT_NAMESPACE`, if set.
    pub namespace: Option<String>,
}

impl VaultTarget {
    /// Reads `VAULT_ADDR`, `TRANSIT_SECRET_ENGINE_PATH` and `VAULT_NAMESPACE`.
    pub fn from_env() -> Result<Self, Error> {
        let get = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
        Ok(VaultTarget {
            address: get("VAULT_ADDR").ok_or_else(|| {
                Error::Other("set VAULT_ADDR to the Vault / OpenBao address".into())
            })?,
            mount: get("TRANSIT_SECRET_ENGINE_PATH").unwrap_or_else(|| "transit".into()),
            namespace: get("VAULT_NAMESPACE"),
        })
    }
}

/// Creates an `ecdsa-p256` transit key `name` (refusing to touch an existing one)
/// and returns its public key PEM.
pub async fn create_vault_key(
    target: &VaultTarget,
    token: &str,
    name: &str,
) -> Result<String, Error> {
    let http = reqwest::Client::new();
    let url = format!(
        "{}/v1/{}/keys/{name}",
        target.address.trim_end_matches('/'),
        target.mount
    );
    let request = |method: reqwest::Method| {
        let mut rb = http.request(method, &url).header("X-Vault-Token", token);
        if let Some(ns) = &target.namespace {
            rb = rb.header("X-Vault-Namespace", ns);
        }
        rb
    };
    let vault_err = |what: &str, e: reqwest::Error| Error::Other(format!("Vault {what}: {e}"));
    let existing = request(reqwest::Method::GET)
        .send()
        .await
        .map_err(|e| vault_err("read key", e))?;
    match existing.status().as_u16() {
        404 => {}
        200 => {
            return Err(Error::Other(format!(
                "transit key {name} already exists in {}; not touching it",
                target.mount
            )))
        }
        403 => {
            return Err(Error::Other(
                "Vault refused the token (403): it needs create and read on the transit key".into(),
            ))
        }
        s => {
            return Err(Error::Other(format!(
                "Vault answered {s} when reading transit key {name}"
            )))
        }
    }
    let created = request(reqwest::Method::POST)
        .header("Content-Type", "application/json")
        .body(r#"{"type":"ecdsa-p256"}"#)
        .send()
        .await
        .map_err(|e| vault_err("create key", e))?;
    if !created.status().is_success() {
        return Err(Error::Other(format!(
            "Vault answered {} when creating transit key {name}",
            created.status()
        )));
    }
    let read = request(reqwest::Method::GET)
        .send()
        .await
        .map_err(|e| vault_err("read key", e))?;
    let body: Value =
        serde_json::from_slice(&read.bytes().await.map_err(|e| vault_err("read key", e))?)
            .map_err(|e| Error::Other(format!("Vault key reply is not JSON: {e}")))?;
    let version = body
        .pointer("/data/latest_version")
        .and_then(Value::as_u64)
        .unwrap_or(1);
    let pem = body
        .pointer(&format!("/data/keys/{version}/public_key"))
        .and_then(Value::as_str)
        .ok_or_else(|| Error::Other("Vault key reply has no public key".into()))?;
    Ok(keybroker_providers::ecdsa::normalize_public_pem(pem)?)
}

/// Writes the public key where cosign would (`<prefix>.pub`).
pub fn write_public(path: &Path, pem: &str) -> Result<(), Error> {
    std::fs::write(path, pem).map_err(|e| Error::Other(format!("{}: {e}", path.display())))
}
