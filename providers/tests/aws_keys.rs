//! AWS KMS keys against moto's KMS server (scripts/moto.sh; its DIGEST defect
//! corrected by tests/aws/moto_kms_server.py). Signatures are checked with the
//! key from GetPublicKey, never with moto's own Verify.

#![cfg(feature = "aws")]

mod conformance;

use keybroker_providers::{
    aws_kms::AwsKmsKey, ecdsa::verify_digest, open, Error, KeyProvider, KeyRef, OpenOptions,
    Sha256Digest,
};

fn endpoint() -> Option<String> {
    match std::env::var("KEYBROKER_TEST_AWS_ENDPOINT") {
        Ok(e) if !e.is_empty() => Some(e),
        _ if std::env::var_os("CI").is_some() => {
            panic!("KEYBROKER_TEST_AWS_ENDPOINT not set: run through scripts/test.sh")
        }
        _ => {
            eprintln!("SKIPPED: no moto KMS server (run scripts/test.sh)");
            None
        }
    }
}

fn unique(name: &str) -> String {
    format!(
        "{name}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

#[tokio::test]
async fn kms_key_passes_the_conformance_suite_by_alias_and_by_id() {
    let Some(ep) = endpoint() else { return };
    let alias = format!("alias/{}", unique("kb"));
    let key_id = AwsKmsKey::create(Some(&ep), &alias)
        .await
        .expect("CreateKey + CreateAlias");
    for reference in [
        format!("awskms://{ep}/{alias}"),
        format!("awskms://{ep}/{key_id}"),
    ] {
        let key = open(&KeyRef::parse(&reference).unwrap(), &OpenOptions::default())
            .await
            .unwrap();
        assert_eq!(key.key_id(), reference);
        conformance::run_all(key, "").await;
    }
    let missing = open(
        &KeyRef::parse(&format!("awskms://{ep}/alias/no-such-key")).unwrap(),
        &OpenOptions::default(),
    )
    .await;
    conformance::missing_key_is_not_found(missing).await;
}

#[tokio::test]
async fn digest_signatures_verify_with_the_kms_public_key() {
    let Some(ep) = endpoint() else { return };
    let alias = format!("alias/{}", unique("digest"));
    AwsKmsKey::create(Some(&ep), &alias).await.unwrap();
    let key = AwsKmsKey::open(Some(&ep), &alias).await.unwrap();
    let pem = key.public_key().await.unwrap().pem;
    // A digest signed as DIGEST must verify as a prehash of exactly that digest.
    let d = Sha256Digest::of(b"cosign payload");
    let sig = key.sign_digest(&d).await.unwrap();
    verify_digest(&pem, &d, &sig.der).expect("KMS DIGEST signature verifies");
    assert!(
        verify_digest(&pem, &Sha256Digest::of(d.as_bytes()), &sig.der).is_err(),
        "the digest was hashed again"
    );
}

#[tokio::test]
async fn kms_errors_map_to_actionable_cases() {
    let Some(ep) = endpoint() else { return };
    let missing = AwsKmsKey::open(Some(&ep), "alias/does-not-exist")
        .await
        .unwrap();
    let err = missing.public_key().await.unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err}");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let down = AwsKmsKey::open(Some(&closed.to_string()), "alias/x")
        .await
        .unwrap();
    let err = down.sign_digest(&Sha256Digest::of(b"x")).await.unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err}");
    assert!(
        !err.to_string().contains("keybroker-test"),
        "credential in error: {err}"
    );
}
