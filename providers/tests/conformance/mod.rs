//! One conformance suite for every key provider (DESIGN.md §7). Each provider's
//! test file opens a real key and calls [`run_all`]; a provider that cannot do
//! something says so through `capabilities()` and the suite skips that part.

#![allow(dead_code)]

use std::sync::Arc;

use keybroker_providers::{ecdsa::verify_digest, KeyProvider, Sha256Digest};

/// Signs and verifies with the provider's own public key; a different digest fails.
pub async fn sign_verifies_with_own_public_key(p: &dyn KeyProvider) {
    let digest = Sha256Digest::of(b"conformance payload");
    let sig = p.sign_digest(&digest).await.expect("sign");
    let public = p.public_key().await.expect("public key");
    verify_digest(&public.pem, &digest, &sig.der)
        .expect("signature must verify with the provider's public key");
    let other = Sha256Digest::of(b"another payload");
    assert!(
        verify_digest(&public.pem, &other, &sig.der).is_err(),
        "signature verified for the wrong digest"
    );
}

/// A digest that is not 32 bytes never reaches a provider.
pub fn wrong_digest_length_is_rejected() {
    for len in [0usize, 31, 33, 64] {
        let bytes = vec![7u8; len];
        let err =
            Sha256Digest::try_from(bytes.as_slice()).expect_err("accepted a bad digest length");
        assert!(err.to_string().contains("32 bytes"), "{err}");
    }
}

/// Many signatures at once all verify.
pub async fn concurrent_signing_all_verify(p: Arc<dyn KeyProvider>) {
    let public = p.public_key().await.expect("public key");
    let mut tasks = Vec::new();
    for i in 0..32u32 {
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            let d = Sha256Digest::of(&i.to_be_bytes());
            (d, p.sign_digest(&d).await)
        }));
    }
    for t in tasks {
        let (d, sig) = t.await.expect("task");
        verify_digest(&public.pem, &d, &sig.expect("sign").der)
            .expect("concurrent signature verifies");
    }
}

/// The version a signature reports matches the public key's version.
pub async fn key_version_is_reported(p: &dyn KeyProvider, expected: &str) {
    let sig = p.sign_digest(&Sha256Digest::of(b"v")).await.expect("sign");
    assert_eq!(sig.key_version, expected);
    assert_eq!(
        p.public_key().await.expect("public key").key_version,
        expected
    );
}

/// A key that does not exist is NOT_FOUND, whether opening or first use says so.
pub async fn missing_key_is_not_found(opened: keybroker_providers::Result<Arc<dyn KeyProvider>>) {
    let err = match opened {
        Err(e) => e,
        Ok(p) => p
            .sign_digest(&Sha256Digest::of(b"x"))
            .await
            .expect_err("signed with a missing key"),
    };
    assert!(
        matches!(err, keybroker_providers::Error::NotFound(_)),
        "{err}"
    );
}

/// Everything above.
pub async fn run_all(p: Arc<dyn KeyProvider>, expected_version: &str) {
    sign_verifies_with_own_public_key(p.as_ref()).await;
    wrong_digest_length_is_rejected();
    concurrent_signing_all_verify(p.clone()).await;
    key_version_is_reported(p.as_ref(), expected_version).await;
    assert!(!p.key_id().is_empty());
    assert!(!format!("{p:?}").contains("PRIVATE KEY"));
}
