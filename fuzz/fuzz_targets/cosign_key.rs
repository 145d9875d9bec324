//! Key files: cosign's encrypted private keys (the PEM wrapper and the scrypt /
//! secretbox JSON envelope inside), plain PKCS#8 / SEC1 PEM, PKCS#8 DER, and
//! SPKI public keys.
//!
//! Properties: PEM decode → encode → decode is the identity; a key that parses
//! signs, and its signature verifies with the public key it reports; public
//! key normalization is idempotent; a decrypted cosign key re-encrypts and
//! decrypts to the same bytes.
#![no_main]

use keybroker_providers::{
    cosign_key,
    ecdsa::{normalize_public_pem, verify_digest, P256Signer, Password},
    pem, Sha256Digest,
};
use libfuzzer_sys::fuzz_target;

/// The password the seed key (`legacy_cosign_label_password_123.key`) has.
const PASSWORD: &[u8] = b"123";

fn check_signer(signer: &P256Signer, data: &[u8]) {
    let public = signer.public_key_pem();
    assert_eq!(
        normalize_public_pem(public).as_deref().ok(),
        Some(public),
        "a signer's public key must be in normal form"
    );
    let digest = Sha256Digest::of(data);
    let sig = signer
        .sign_digest(&digest)
        .expect("signing with a parsed key");
    verify_digest(public, &digest, &sig).expect("own signature must verify");
    let other = Sha256Digest::of(&[data, b"x"].concat());
    assert!(verify_digest(public, &other, &sig).is_err());
}

fuzz_target!(|data: &[u8]| {
    // The JSON envelope alone (the PEM body), so mutations reach its fields directly.
    if let Ok(plain) = cosign_key::decrypt(data, PASSWORD) {
        if let Ok(signer) = P256Signer::from_pkcs8_der(&plain) {
            check_signer(&signer, data);
        }
    }
    if let Ok(signer) = P256Signer::from_pkcs8_der(data) {
        check_signer(&signer, data);
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok((label, der)) = pem::decode(text) {
        let again = pem::encode(&label, &der);
        let (label2, der2) = pem::decode(&again).expect("encoded PEM must decode");
        assert_eq!(label, label2);
        assert_eq!(*der, *der2);
        // Re-encrypting is two more scrypt runs: only now and then.
        let rare = Sha256Digest::of(data).as_bytes()[0] == 0;
        if rare
            && (label == cosign_key::SIGSTORE_PEM_LABEL || label == cosign_key::COSIGN_PEM_LABEL)
        {
            if let Ok(plain) = cosign_key::decrypt(&der, PASSWORD) {
                let env = cosign_key::encrypt(&plain, PASSWORD).expect("encrypt");
                let back = cosign_key::decrypt(&env, PASSWORD).expect("own envelope decrypts");
                assert_eq!(*plain, *back);
                assert!(cosign_key::decrypt(&env, b"not the password").is_err());
            }
        }
    }
    let password = Password::new(PASSWORD);
    if let Ok(signer) = P256Signer::from_pem(text, Some(&password)) {
        check_signer(&signer, data);
    }
    if let Ok(normal) = normalize_public_pem(text) {
        assert_eq!(
            normalize_public_pem(&normal).as_deref().ok(),
            Some(normal.as_str()),
            "normalizing a public key twice must change nothing"
        );
    }
});
