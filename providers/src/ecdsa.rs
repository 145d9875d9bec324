//! ECDSA P-256 keys: parsing every PEM form we accept, and the in-process signer.
//!
//! `p256` parses and validates key material and renders public keys; the hot path
//! signs with aws-lc-rs, which is ~8× faster than `p256` here (docs/PERFORMANCE.md).
//! Private key bytes live only in zeroizing buffers and inside AWS-LC, which
//! cleanses its key memory when the key is freed.

use std::fmt;

use aws_lc_rs::{
    digest::{Digest, SHA256},
    signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING},
};
use p256::{
    ecdsa::{signature::hazmat::PrehashVerifier, Signature as P256Signature, VerifyingKey},
    pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, LineEnding},
    SecretKey,
};
use sha2::Digest as _;
use zeroize::Zeroizing;

use crate::{cosign_key, pem, Error, Result, Sha256Digest};

/// A password for an encrypted key. Zeroized on drop, never printed.
#[derive(Clone, Default)]
pub struct Password(Zeroizing<Vec<u8>>);

impl Password {
    /// Wraps password bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Password(Zeroizing::new(bytes.into()))
    }
    /// The bytes, for the KDF.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password([redacted])")
    }
}

/// An in-process ECDSA P-256 signing key.
pub struct P256Signer {
    key_pair: EcdsaKeyPair,
    public_pem: String,
}

impl fmt::Debug for P256Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("P256Signer")
            .field("private_key", &"[redacted]")
            .field(
                "public_key_sha256",
                &hex_prefix(&sha2::Sha256::digest(self.public_pem.as_bytes())),
            )
            .finish()
    }
}

fn hex_prefix(bytes: &[u8]) -> String {
    bytes.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

impl P256Signer {
    /// Builds a signer from a validated P-256 secret key.
    fn from_secret(secret: &SecretKey) -> Result<Self> {
        // Re-encode through p256 so AWS-LC always sees a canonical PKCS#8 document
        // that includes the public key, whatever form the input took.
        let pkcs8 = secret
            .to_pkcs8_der()
            .map_err(|e| Error::KeyFormat(format!("encoding PKCS#8: {e}")))?;
        let key_pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_bytes())
            .map_err(|e| Error::KeyFormat(format!("AWS-LC rejected the key: {e}")))?;
        let public_pem = secret
            .public_key()
            .to_public_key_pem(LineEnding::LF)
            .map_err(|e| Error::KeyFormat(format!("encoding public key: {e}")))?;
        Ok(P256Signer {
            key_pair,
            public_pem,
        })
    }

    /// Parses a PKCS#8 DER P-256 private key.
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self> {
        let secret = SecretKey::from_pkcs8_der(der)
            .map_err(|e| Error::KeyFormat(format!("not a PKCS#8 P-256 private key: {e}")))?;
        Self::from_secret(&secret)
    }

    /// Parses any PEM form we accept: `PRIVATE KEY` (PKCS#8), `EC PRIVATE KEY` (SEC1),
    /// and cosign's encrypted keys (which must hold PKCS#8; SEC1 inside is refused).
    pub fn from_pem(text: &str, password: Option<&Password>) -> Result<Self> {
        let (label, der) = pem::decode(text)?;
        match label.as_str() {
            "PRIVATE KEY" => Self::from_pkcs8_der(&der),
            "EC PRIVATE KEY" => {
                let secret = SecretKey::from_sec1_der(&der)
                    .map_err(|e| Error::KeyFormat(format!("not a SEC1 P-256 private key: {e}")))?;
                Self::from_secret(&secret)
            }
            cosign_key::SIGSTORE_PEM_LABEL | cosign_key::COSIGN_PEM_LABEL => {
                let password = password.ok_or_else(|| {
                    Error::KeyFormat(
                        "the key is encrypted and no password was given (set COSIGN_PASSWORD, or password_env / password_file in the key's config)".into(),
                    )
                })?;
                let plain = cosign_key::decrypt(&der, password.expose())?;
                if SecretKey::from_pkcs8_der(&plain).is_err() && SecretKey::from_sec1_der(&plain).is_ok() {
                    return Err(Error::KeyFormat(
                        "the encrypted key holds a SEC1 key; cosign's format requires PKCS#8 inside".into(),
                    ));
                }
                Self::from_pkcs8_der(&plain)
            }
            "ENCRYPTED PRIVATE KEY" => Err(Error::KeyFormat(
                "PKCS#8-encrypted keys are not supported; use cosign's encrypted format or a plain key with file permissions".into(),
            )),
            other => Err(Error::KeyFormat(format!(
                "unsupported PEM block {other:?}: expected PRIVATE KEY, EC PRIVATE KEY or {}",
                cosign_key::SIGSTORE_PEM_LABEL
            ))),
        }
    }

    /// Generates a fresh key; returns the signer and its PKCS#8 DER (zeroized on drop).
    pub fn generate() -> Result<(Self, Zeroizing<Vec<u8>>)> {
        let secret = SecretKey::random(&mut rand_core::OsRng);
        let der = secret
            .to_pkcs8_der()
            .map_err(|e| Error::KeyFormat(format!("encoding PKCS#8: {e}")))?;
        let der = Zeroizing::new(der.as_bytes().to_vec());
        Ok((Self::from_secret(&secret)?, der))
    }

    /// Signs a SHA-256 digest; returns the ASN.1 DER signature.
    pub fn sign_digest(&self, digest: &Sha256Digest) -> Result<Vec<u8>> {
        let digest = Digest::import_less_safe(digest.as_bytes(), &SHA256)
            .map_err(|_| Error::InvalidArgument("digest is not 32 bytes".into()))?;
        let sig = self
            .key_pair
            .sign_digest(&digest)
            .map_err(|_| Error::Other("ECDSA signing failed".into()))?;
        Ok(sig.as_ref().to_vec())
    }

    /// The public key as PEM `PUBLIC KEY` (SPKI).
    pub fn public_key_pem(&self) -> &str {
        &self.public_pem
    }

    /// The raw uncompressed public point, as AWS-LC holds it (for tests).
    pub fn public_point(&self) -> &[u8] {
        self.key_pair.public_key().as_ref()
    }
}

/// Verifies an ASN.1 DER ECDSA P-256 signature over a SHA-256 digest against a PEM
/// public key. Used by tests and by the client's `verify`.
pub fn verify_digest(public_pem: &str, digest: &Sha256Digest, der_signature: &[u8]) -> Result<()> {
    let key = VerifyingKey::from_public_key_pem(public_pem)
        .map_err(|e| Error::KeyFormat(format!("not a P-256 public key: {e}")))?;
    let sig = P256Signature::from_der(der_signature)
        .map_err(|e| Error::InvalidArgument(format!("signature is not ASN.1 DER ECDSA: {e}")))?;
    key.verify_prehash(digest.as_bytes(), &sig)
        .map_err(|_| Error::InvalidArgument("signature does not verify".into()))
}

/// Renders a public key PEM after checking it is a P-256 SPKI key.
pub fn normalize_public_pem(public_pem: &str) -> Result<String> {
    let key = p256::PublicKey::from_public_key_pem(public_pem)
        .map_err(|e| Error::KeyFormat(format!("not a P-256 public key: {e}")))?;
    key.to_public_key_pem(LineEnding::LF)
        .map_err(|e| Error::KeyFormat(format!("encoding public key: {e}")))
}
