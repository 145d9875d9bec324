//! Keys in environment variables (`env://VAR`), as GitHub Actions injects secrets.

use zeroize::Zeroizing;

use crate::{
    Capabilities, Error, KeyProvider, P256Signer, Password, PublicKey, Result, Sha256Digest,
    Signature,
};

/// A PEM key read from an environment variable at open.
#[derive(Debug)]
pub struct EnvKey {
    id: String,
    signer: P256Signer,
}

impl EnvKey {
    /// Reads the variable and parses the PEM it holds. Without an explicit password,
    /// `COSIGN_PASSWORD` is used for encrypted keys, as cosign does.
    pub fn open(var: &str, password: Option<&Password>) -> Result<Self> {
        let text = Zeroizing::new(std::env::var(var).map_err(|_| {
            Error::NotFound(format!(
                "environment variable {var} is not set (or not UTF-8)"
            ))
        })?);
        let from_env = std::env::var("COSIGN_PASSWORD").ok().map(Password::new);
        let password = password.or(from_env.as_ref());
        let signer = P256Signer::from_pem(&text, password).map_err(|e| match e {
            Error::KeyFormat(m) => Error::KeyFormat(format!("env://{var}: {m}")),
            other => other,
        })?;
        Ok(EnvKey {
            id: format!("env://{var}"),
            signer,
        })
    }
}

#[async_trait::async_trait]
impl KeyProvider for EnvKey {
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
        Ok(Signature {
            der: self.signer.sign_digest(digest)?,
            key_version: String::new(),
        })
    }
    async fn public_key(&self) -> Result<PublicKey> {
        Ok(PublicKey {
            pem: self.signer.public_key_pem().to_string(),
            key_version: String::new(),
        })
    }
}
