//! Independent verification: sigstore-rs (the `sigstore` crate) reads the
//! signatures keybroker wrote to a real registry and verifies them with the
//! public key, as `cosign verify --key` would (no Fulcio, no Rekor).

mod common;

use common::*;
use sigstore::{
    cosign::verification_constraint::VerificationConstraint,
    cosign::{verification_constraint::PublicKeyVerifier, ClientBuilder, CosignCapabilities},
    crypto::SigningScheme,
    registry::{Auth, ClientConfig, ClientProtocol, OciReference},
};

/// Number of signature layers on `image` that sigstore-rs verifies with `public_pem`
/// and whose payload names `digest`.
async fn sigstore_verified_layers(
    image: &str,
    digest: &str,
    public_pem: &str,
    auth: Auth,
) -> usize {
    let config = ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    };
    let mut client = ClientBuilder::default()
        .with_oci_client_config(config)
        .build()
        .expect("sigstore client");
    let reference: OciReference = image.parse().expect("sigstore parses the reference");
    let (sig_image, source_digest) = client
        .triangulate(&reference, &auth)
        .await
        .expect("triangulate");
    assert_eq!(source_digest, digest, "sigstore resolved another digest");
    assert!(
        sig_image
            .to_string()
            .ends_with(&format!("{}.sig", digest.replace(':', "-"))),
        "{sig_image}"
    );
    let layers = client
        .trusted_signature_layers(&auth, &reference)
        .await
        .expect("signature layers");
    let verifier = PublicKeyVerifier::new(
        public_pem.as_bytes(),
        &SigningScheme::ECDSA_P256_SHA256_ASN1,
    )
    .expect("key");
    layers
        .iter()
        .filter(|l| verifier.verify(l).unwrap_or(false))
        .filter(|l| l.simple_signing.critical.image.docker_manifest_digest == digest)
        .count()
}

#[tokio::test]
async fn sigstore_rs_verifies_what_keybroker_signed() {
    let Some(reg) = anon_registry() else { return };
    let dir = tempfile::tempdir().unwrap();
    let key = write_key(dir.path(), "release");
    let other = write_key(dir.path(), "other");
    let broker = TestBroker::start(&format!(
        "[keys.release]\nref = \"{}\"\n[keys.other]\nref = \"{}\"\n[[policy]]\ncallers = [\"uid:{}\"]\nkeys = [\"*\"]\nimages = [\"**\"]\n",
        key.key_path.display(),
        other.key_path.display(),
        uid()
    ))
    .await;
    let digest = reg.push_image("e2e/sigstore", "v1").await;
    let image = format!("{}/e2e/sigstore:v1", reg.addr);
    let out = keybroker(
        &broker.socket,
        &["sign", &image, "--key", "release", "-a", "commit=abc"],
        &[],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));

    assert_eq!(
        sigstore_verified_layers(&image, &digest, &key.public_pem, Auth::Anonymous).await,
        1
    );
    assert_eq!(
        sigstore_verified_layers(&image, &digest, &other.public_pem, Auth::Anonymous).await,
        0,
        "wrong key verified"
    );

    // A second signer appends: sigstore sees both, each verifies with its own key.
    let out = keybroker(&broker.socket, &["sign", &image, "--key", "other"], &[]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        sigstore_verified_layers(&image, &digest, &key.public_pem, Auth::Anonymous).await,
        1
    );
    assert_eq!(
        sigstore_verified_layers(&image, &digest, &other.public_pem, Auth::Anonymous).await,
        1
    );
}

#[tokio::test]
async fn sigstore_rs_verifies_on_the_htpasswd_registry() {
    let Some(reg) = auth_registry() else { return };
    let creds = reg.credentials.clone().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = write_key(dir.path(), "k");
    let broker = TestBroker::start(&format!(
        "[keys.k]\nref = \"{}\"\n[[policy]]\ncallers = [\"uid:{}\"]\nkeys = [\"k\"]\nimages = [\"**\"]\n",
        key.key_path.display(),
        uid()
    ))
    .await;
    let digest = reg.push_image("e2e/sigstore-auth", "v1").await;
    let image = format!("{}/e2e/sigstore-auth@{digest}", reg.addr);
    let env = [
        ("KEYBROKER_REGISTRY_USERNAME", creds.username.as_str()),
        ("KEYBROKER_REGISTRY_PASSWORD", creds.password.as_str()),
    ];
    let out = keybroker(&broker.socket, &["sign", &image, "--key", "k"], &env).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let auth = Auth::Basic(creds.username.clone(), creds.password.to_string());
    assert_eq!(
        sigstore_verified_layers(&image, &digest, &key.public_pem, auth).await,
        1
    );
}

#[tokio::test]
async fn openbao_transit_key_signs_images_that_sigstore_rs_verifies() {
    let Some(reg) = anon_registry() else { return };
    let (addr, token) = match (
        std::env::var("KEYBROKER_TEST_VAULT_ADDR"),
        std::env::var("KEYBROKER_TEST_VAULT_TOKEN"),
    ) {
        (Ok(a), Ok(t)) if !a.is_empty() => (a, t),
        _ if std::env::var_os("CI").is_some() => {
            panic!("KEYBROKER_TEST_VAULT_ADDR not set: run through scripts/test.sh")
        }
        _ => return,
    };
    let name = format!("e2e-{}", std::process::id());
    let created = reqwest::Client::new()
        .post(format!("{addr}/v1/transit/keys/{name}"))
        .header("X-Vault-Token", &token)
        .header("Content-Type", "application/json")
        .body(r#"{"type":"ecdsa-p256"}"#)
        .send()
        .await
        .unwrap();
    assert!(created.status().is_success(), "{}", created.status());
    let broker = TestBroker::start(&format!(
        "[keys.bao]\nref = \"openbao://{name}\"\n[keys.bao.vault]\naddress = \"{addr}\"\ntoken_env = \"KEYBROKER_TEST_VAULT_TOKEN\"\n[[policy]]\ncallers = [\"uid:{}\"]\nkeys = [\"bao\"]\nimages = [\"**\"]\n",
        uid()
    ))
    .await;
    let digest = reg.push_image("e2e/openbao", "v1").await;
    let image = format!("{}/e2e/openbao:v1", reg.addr);
    let out = keybroker(&broker.socket, &["sign", &image, "--key", "bao"], &[]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let out = keybroker(&broker.socket, &["public-key", "--key", "bao"], &[]).await;
    let public_pem = stdout(&out);
    assert!(
        public_pem.starts_with("-----BEGIN PUBLIC KEY-----"),
        "{public_pem}"
    );
    assert_eq!(
        sigstore_verified_layers(&image, &digest, &public_pem, Auth::Anonymous).await,
        1
    );
    let out = keybroker(&broker.socket, &["keys"], &[]).await;
    assert!(
        stdout(&out).contains(&format!("bao\tecdsa-p256-sha256\t1\topenbao://{name}")),
        "{}",
        stdout(&out)
    );
}

#[tokio::test]
async fn aws_kms_key_signs_images_that_sigstore_rs_verifies() {
    let Some(reg) = anon_registry() else { return };
    let endpoint = match std::env::var("KEYBROKER_TEST_AWS_ENDPOINT") {
        Ok(e) if !e.is_empty() => e,
        _ if std::env::var_os("CI").is_some() => {
            panic!("KEYBROKER_TEST_AWS_ENDPOINT not set: run through scripts/test.sh")
        }
        _ => return,
    };
    let alias = format!("alias/e2e-{}", std::process::id());
    keybroker_providers::aws_kms::AwsKmsKey::create(Some(&endpoint), &alias)
        .await
        .expect("create KMS key in moto");
    let broker = TestBroker::start(&format!(
        "[keys.kms]\nref = \"awskms://{endpoint}/{alias}\"\n[[policy]]\ncallers = [\"uid:{}\"]\nkeys = [\"kms\"]\nimages = [\"**\"]\n",
        uid()
    ))
    .await;
    let digest = reg.push_image("e2e/kms", "v1").await;
    let image = format!("{}/e2e/kms:v1", reg.addr);
    let out = keybroker(
        &broker.socket,
        &["sign", &image, "--key", "kms", "-a", "commit=kms"],
        &[],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let public_pem = stdout(&keybroker(&broker.socket, &["public-key", "--key", "kms"], &[]).await);
    assert_eq!(
        sigstore_verified_layers(&image, &digest, &public_pem, Auth::Anonymous).await,
        1
    );
}
