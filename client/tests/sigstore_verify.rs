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
