//! File and env keys: every fixture written by cosign and sigstore-rs, our own
//! writer, and the refusals (DESIGN.md §5). Then the conformance suite.

mod conformance;

use std::{path::PathBuf, sync::Arc};

use keybroker_providers::{
    cosign_key, ecdsa::normalize_public_pem, open, pem, EnvKey, Error, FileKey, KeyProvider,
    KeyRef, OpenOptions, P256Signer, Password,
};
use p256::pkcs8::EncodePrivateKey;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/keys")
}

/// (file stem, password) for every key in the fixtures; passwords are in the names.
const FIXTURES: &[(&str, &str)] = &[
    ("cosign_generated_empty_password", ""),
    ("legacy_cosign_label_password_123", "123"),
];

#[tokio::test]
async fn reads_every_fixture_key_and_matches_its_pub() {
    let mut seen = 0;
    for entry in std::fs::read_dir(fixtures()).expect("fixtures dir") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("key") {
            continue;
        }
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("stem")
            .to_string();
        let (_, password) = FIXTURES
            .iter()
            .find(|(s, _)| *s == stem)
            .unwrap_or_else(|| panic!("new fixture {stem}: add its password to FIXTURES"));
        let key = FileKey::open(&path, Some(&Password::new(*password))).expect("fixture key opens");
        let expected =
            std::fs::read_to_string(path.with_extension("pub")).expect(".pub next to key");
        let ours = key.public_key().await.expect("public key").pem;
        assert_eq!(
            ours,
            normalize_public_pem(&expected).expect("fixture pub parses"),
            "{stem}"
        );
        conformance::run_all(Arc::new(key), "").await;
        seen += 1;
    }
    assert_eq!(seen, FIXTURES.len());
}

#[tokio::test]
async fn missing_file_and_env_keys_are_not_found() {
    conformance::missing_key_is_not_found(
        open(
            &KeyRef::parse("/nonexistent/cosign.key").unwrap(),
            &OpenOptions::default(),
        )
        .await,
    )
    .await;
    conformance::missing_key_is_not_found(
        open(
            &KeyRef::parse("env://KB_TEST_NEVER_SET").unwrap(),
            &OpenOptions::default(),
        )
        .await,
    )
    .await;
}

#[test]
fn wrong_password_is_a_clear_error() {
    let path = fixtures().join("legacy_cosign_label_password_123.key");
    let err = FileKey::open(&path, Some(&Password::new("wrong"))).unwrap_err();
    assert!(matches!(err, Error::WrongPassword), "{err}");
    let err = FileKey::open(&path, None).unwrap_err().to_string();
    assert!(
        err.contains("encrypted") && err.contains("COSIGN_PASSWORD"),
        "{err}"
    );
}

#[test]
fn own_writer_round_trips() {
    let (signer, der) = P256Signer::generate().unwrap();
    let pem_text = cosign_key::encrypt_pem(&der, b"s3cret").unwrap();
    assert!(pem_text.starts_with("-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\n"));
    let back = P256Signer::from_pem(&pem_text, Some(&Password::new("s3cret"))).unwrap();
    assert_eq!(back.public_key_pem(), signer.public_key_pem());
}

#[test]
fn rejects_sec1_key_inside_encrypted_pem() {
    let secret = p256::SecretKey::random(&mut rand_core::OsRng);
    let sec1 = secret.to_sec1_der().unwrap();
    let pem_text = cosign_key::encrypt_pem(&sec1, b"").unwrap();
    let err = P256Signer::from_pem(&pem_text, Some(&Password::new("")))
        .unwrap_err()
        .to_string();
    assert!(err.contains("SEC1"), "{err}");
}

#[test]
fn reads_plain_pkcs8_and_sec1() {
    let secret = p256::SecretKey::random(&mut rand_core::OsRng);
    let pkcs8 = secret.to_pkcs8_der().unwrap();
    let sec1 = secret.to_sec1_der().unwrap();
    let a = P256Signer::from_pem(&pem::encode("PRIVATE KEY", pkcs8.as_bytes()), None).unwrap();
    let b = P256Signer::from_pem(&pem::encode("EC PRIVATE KEY", &sec1), None).unwrap();
    assert_eq!(a.public_key_pem(), b.public_key_pem());
}

#[test]
fn rejects_other_curves_and_garbage() {
    assert!(P256Signer::from_pem("hello", None).is_err());
    let err = P256Signer::from_pem(&pem::encode("RSA PRIVATE KEY", b"xx"), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("unsupported PEM block"), "{err}");
}

#[test]
fn debug_output_never_shows_key_material() {
    let (signer, der) = P256Signer::generate().unwrap();
    let pem_text = pem::encode("PRIVATE KEY", &der);
    let body_line = pem_text.lines().nth(1).unwrap().to_string();
    let shown = format!("{signer:?} {:?}", Password::new("hunter2"));
    assert!(
        !shown.contains(&body_line) && !shown.contains("hunter2"),
        "{shown}"
    );
    assert!(shown.contains("redacted"));
}

#[tokio::test]
async fn env_key_reads_pem_and_cosign_password() {
    let path = fixtures().join("legacy_cosign_label_password_123.key");
    let text = std::fs::read_to_string(&path).unwrap();
    // SAFETY: this is the only test in this binary touching these variables.
    unsafe {
        std::env::set_var("KB_TEST_ENV_KEY", &text);
        std::env::set_var("COSIGN_PASSWORD", "123");
    }
    let key = open(
        &KeyRef::parse("env://KB_TEST_ENV_KEY").unwrap(),
        &OpenOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(key.key_id(), "env://KB_TEST_ENV_KEY");
    conformance::run_all(key, "").await;
    let err = EnvKey::open("KB_TEST_UNSET_VARIABLE", None).unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err}");
}

#[tokio::test]
async fn unbuilt_schemes_say_so() {
    // Which schemes are unbuilt depends on this build's features (a workspace
    // build turns all of them on); each one that is says so, naming its feature.
    for scheme in keybroker_providers::SCHEMES.iter().filter(|s| !s.built) {
        if scheme.name == "github" {
            continue; // built or not, github:// is no signing source
        }
        let reference = KeyRef::parse(scheme.example.split(" or ").next().unwrap()).unwrap();
        let err = open(&reference, &OpenOptions::default()).await.unwrap_err();
        assert!(
            err.to_string().contains("not built into this binary"),
            "{}: {err}",
            scheme.name
        );
    }
}
