//! Keys in PEM files on disk.

use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::{
    Capabilities, KeyProvider, P256Signer, Password, PublicKey, Result, Sha256Digest, Signature,
};

/// A key loaded from a PEM file (plain PKCS#8, SEC1 or cosign-encrypted).
/// The file is read once, at open.
#[derive(Debug)]
pub struct FileKey {
    path: String,
    signer: P256Signer,
}

impl FileKey {
    /// Reads and parses the key file.
    pub fn open(path: &Path, password: Option<&Password>) -> Result<Self> {
        let shown = path.display().to_string();
        let text = Zeroizing::new(std::fs::read(path).map_err(|e| crate::Error::io(&shown, &e))?);
        let text = std::str::from_utf8(&text)
            .map_err(|_| crate::Error::KeyFormat(format!("{shown}: not a PEM text file")))?;
        let signer = P256Signer::from_pem(text, password).map_err(|e| match e {
            crate::Error::KeyFormat(m) => crate::Error::KeyFormat(format!("{shown}: {m}")),
            other => other,
        })?;
        Ok(FileKey {
            path: shown,
            signer,
        })
    }

    /// The path the key was read from.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(&self.path)
    }

    /// The in-process signer (for benchmarks of the raw signing rate).
    pub fn signer(&self) -> &P256Signer {
        &self.signer
    }
}

#[async_trait::async_trait]
impl KeyProvider for FileKey {
    fn key_id(&self) -> &str {
        &self.path
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
