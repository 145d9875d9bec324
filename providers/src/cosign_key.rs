//! cosign's encrypted private-key format (DESIGN.md §5).
//!
//! PEM label `ENCRYPTED SIGSTORE PRIVATE KEY` (older: `ENCRYPTED COSIGN PRIVATE KEY`);
//! the body is compact JSON naming scrypt and nacl/secretbox; the plaintext is a
//! PKCS#8 DER private key. We accept only the scrypt costs cosign and sigstore-rs
//! write, so a hostile file cannot make us burn gigabytes of memory.

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use crypto_secretbox::{
    aead::{Aead, KeyInit},
    XSalsa20Poly1305,
};
use rand_core::{OsRng, RngCore};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::{Error, Result};

/// The PEM label cosign writes today.
pub const SIGSTORE_PEM_LABEL: &str = "ENCRYPTED SIGSTORE PRIVATE KEY";
/// The PEM label of older cosign releases and sigstore-rs.
pub const COSIGN_PEM_LABEL: &str = "ENCRYPTED COSIGN PRIVATE KEY";

/// scrypt N values we accept (log2: 15, 16, 17). Anything else is refused.
pub const ACCEPTED_SCRYPT_N: [u64; 3] = [32768, 65536, 131072];
/// The N we write, as cosign does.
pub const WRITE_SCRYPT_N: u64 = 65536;

#[derive(Serialize, Deserialize)]
struct Envelope {
    kdf: Kdf,
    cipher: Cipher,
    ciphertext: String,
}

#[derive(Serialize, Deserialize)]
struct Kdf {
    name: String,
    params: ScryptParams,
    salt: String,
}

#[derive(Serialize, Deserialize)]
struct ScryptParams {
    #[serde(rename = "N")]
    n: u64,
    r: u32,
    p: u32,
}

#[derive(Serialize, Deserialize)]
struct Cipher {
    name: String,
    nonce: String,
}

fn derive_key(password: &[u8], salt: &[u8], n: u64) -> Result<Zeroizing<[u8; 32]>> {
    let log_n = n.trailing_zeros() as u8;
    let params = scrypt::Params::new(log_n, 8, 1, 32)
        .map_err(|e| Error::KeyFormat(format!("scrypt parameters: {e}")))?;
    let mut key = Zeroizing::new([0u8; 32]);
    scrypt::scrypt(password, salt, &params, key.as_mut())
        .map_err(|e| Error::KeyFormat(format!("scrypt: {e}")))?;
    Ok(key)
}

/// Decrypts the JSON envelope (the PEM body) and returns the plaintext DER.
pub fn decrypt(envelope_json: &[u8], password: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
    let env: Envelope = serde_json::from_slice(envelope_json).map_err(|e| {
        Error::KeyFormat(format!("encrypted key envelope is not cosign's JSON: {e}"))
    })?;
    if env.kdf.name != "scrypt" {
        return Err(Error::KeyFormat(format!(
            "unsupported kdf {:?} (only scrypt)",
            env.kdf.name
        )));
    }
    let ScryptParams { n, r, p } = env.kdf.params;
    if !ACCEPTED_SCRYPT_N.contains(&n) || r != 8 || p != 1 {
        return Err(Error::KeyFormat(format!(
            "refusing scrypt parameters N={n} r={r} p={p}: only N in {ACCEPTED_SCRYPT_N:?} with r=8, p=1 are accepted"
        )));
    }
    if env.cipher.name != "nacl/secretbox" {
        return Err(Error::KeyFormat(format!(
            "unsupported cipher {:?} (only nacl/secretbox)",
            env.cipher.name
        )));
    }
    let b64 = |what: &str, s: &str| {
        B64.decode(s)
            .map_err(|e| Error::KeyFormat(format!("encrypted key {what} is not base64: {e}")))
    };
    let salt = b64("salt", &env.kdf.salt)?;
    let nonce = b64("nonce", &env.cipher.nonce)?;
    let ciphertext = b64("ciphertext", &env.ciphertext)?;
    if nonce.len() != 24 {
        return Err(Error::KeyFormat(format!(
            "nonce is {} bytes, expected 24",
            nonce.len()
        )));
    }
    let key = derive_key(password, &salt, n)?;
    let cipher = XSalsa20Poly1305::new(key.as_ref().into());
    let plaintext = cipher
        .decrypt(nonce.as_slice().into(), ciphertext.as_slice())
        .map_err(|_| Error::WrongPassword)?;
    Ok(Zeroizing::new(plaintext))
}

/// Encrypts a PKCS#8 DER key the way cosign does and returns the JSON envelope.
pub fn encrypt(pkcs8_der: &[u8], password: &[u8]) -> Result<Vec<u8>> {
    let mut salt = [0u8; 32];
    let mut nonce = [0u8; 24];
    OsRng.fill_bytes(&mut salt);
    OsRng.fill_bytes(&mut nonce);
    let key = derive_key(password, &salt, WRITE_SCRYPT_N)?;
    let cipher = XSalsa20Poly1305::new(key.as_ref().into());
    let ciphertext = cipher
        .encrypt((&nonce).into(), pkcs8_der)
        .map_err(|_| Error::Other("secretbox encryption failed".into()))?;
    let env = Envelope {
        kdf: Kdf {
            name: "scrypt".into(),
            params: ScryptParams {
                n: WRITE_SCRYPT_N,
                r: 8,
                p: 1,
            },
            salt: B64.encode(salt),
        },
        cipher: Cipher {
            name: "nacl/secretbox".into(),
            nonce: B64.encode(nonce),
        },
        ciphertext: B64.encode(ciphertext),
    };
    serde_json::to_vec(&env).map_err(|e| Error::Other(format!("encoding key envelope: {e}")))
}

/// Encrypts `pkcs8_der` and wraps it in PEM with the current cosign label.
pub fn encrypt_pem(pkcs8_der: &[u8], password: &[u8]) -> Result<String> {
    let json = encrypt(pkcs8_der, password)?;
    Ok(crate::pem::encode(SIGSTORE_PEM_LABEL, &json))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_keeps_cosigns_key_order() {
        let json = encrypt(b"not really a key", b"").unwrap();
        let text = String::from_utf8(json).unwrap();
        assert!(
            text.starts_with(
                r#"{"kdf":{"name":"scrypt","params":{"N":65536,"r":8,"p":1},"salt":""#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#""cipher":{"name":"nacl/secretbox","nonce":""#),
            "{text}"
        );
    }

    #[test]
    fn round_trips_and_detects_wrong_password() {
        let json = encrypt(b"secret der", b"pw").unwrap();
        assert_eq!(decrypt(&json, b"pw").unwrap().as_slice(), b"secret der");
        assert!(matches!(
            decrypt(&json, b"other"),
            Err(Error::WrongPassword)
        ));
    }

    #[test]
    fn refuses_out_of_range_scrypt_cost() {
        let json = encrypt(b"x", b"").unwrap();
        let text = String::from_utf8(json).unwrap();
        for (from, to) in [
            (r#""N":65536"#, r#""N":1048576"#),
            (r#""N":65536"#, r#""N":1024"#),
            (r#""r":8"#, r#""r":16"#),
        ] {
            let bad = text.replace(from, to);
            let err = decrypt(bad.as_bytes(), b"").unwrap_err().to_string();
            assert!(err.contains("refusing scrypt parameters"), "{err}");
        }
    }
}
