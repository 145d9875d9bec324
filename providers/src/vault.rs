//! HashiCorp Vault / OpenBao transit keys (`hashivault://KEY`, `openbao://KEY`).
//!
//! Signs a prehashed SHA-256 digest with `POST /v1/<mount>/sign/<key>/sha2-256`
//! (`prehashed=true`, ASN.1 signature) through `vaultrs`; strips `vault:vN:` and
//! reports N as the key version. The public key is the pinned version's, else the
//! newest version's. Auth today: a token (config or `VAULT_TOKEN`); callers of the
//! broker never see it.

use std::{fmt, time::Duration};

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
    /// Token; default `VAULT_TOKEN`.
    pub token: Option<Zeroizing<String>>,
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
            .field("key_version", &self.key_version)
            .finish()
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// A transit key.
pub struct VaultKey {
    client: VaultClient,
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
        let token = options
            .token
            .clone()
            .or_else(|| env("VAULT_TOKEN").map(Zeroizing::new))
            .ok_or_else(|| {
                Error::PermissionDenied(format!(
                    "{scheme}://{key}: no Vault token (set VAULT_TOKEN or the key's token source)"
                ))
            })?;
        let mount = options
            .mount
            .clone()
            .or_else(|| env("TRANSIT_SECRET_ENGINE_PATH"))
            .unwrap_or_else(|| "transit".into());
        let mut settings = VaultClientSettingsBuilder::default();
        settings
            .address(&address)
            .token(token.as_str())
            .timeout(Some(options.timeout.unwrap_or(Duration::from_secs(10))));
        if let Some(ns) = options.namespace.clone().or_else(|| env("VAULT_NAMESPACE")) {
            settings.namespace(Some(ns));
        }
        let settings = settings.build().map_err(|e| {
            Error::InvalidArgument(format!("{scheme}://{key}: Vault settings: {e}"))
        })?;
        let client =
            VaultClient::new(settings).map_err(|e| map_err(&format!("{scheme}://{key}"), e))?;
        Ok(VaultKey {
            client,
            mount: mount.clone(),
            key: key.to_string(),
            id: format!("{scheme}://{key}"),
            key_version: options.key_version,
        })
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
        let mut req = SignDataRequest::builder();
        req.prehashed(true)
            .hash_algorithm(HashAlgorithm::Sha2_256)
            .marshaling_algorithm(vaultrs::api::transit::MarshalingAlgorithm::Asn1);
        if let Some(v) = self.key_version {
            req.key_version(v);
        }
        let input = B64.encode(digest.as_bytes());
        let resp = vaultrs::transit::data::sign(
            &self.client,
            &self.mount,
            &self.key,
            &input,
            Some(&mut req),
        )
        .await
        .map_err(|e| map_err(&format!("sign with {}", self.id), e))?;
        let (version, der) = parse_vault_signature(&resp.signature)?;
        Ok(Signature {
            der,
            key_version: version.to_string(),
        })
    }

    async fn public_key(&self) -> Result<PublicKey> {
        let resp = vaultrs::transit::key::read(&self.client, &self.mount, &self.key)
            .await
            .map_err(|e| map_err(&format!("read {}", self.id), e))?;
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
