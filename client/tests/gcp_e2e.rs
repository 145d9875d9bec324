//! End to end with a Google Cloud KMS key: keybrokerd holds a `gcpkms://` key
//! served by the fake Cloud KMS (tests/fakes/gcp_kms.py, scripts/gcpkms.sh),
//! `keybroker sign` stores the signature in the real test registry, and
//! sigstore-rs verifies it with the key's public key, as `cosign verify --key`
//! would. Then the key is rotated (version 1 disabled) and signed again.

mod common;

use common::*;
use sigstore::{
    cosign::verification_constraint::VerificationConstraint,
    cosign::{verification_constraint::PublicKeyVerifier, ClientBuilder, CosignCapabilities},
    crypto::SigningScheme,
    registry::{Auth, ClientConfig, ClientProtocol, OciReference},
};

/// Signature layers of `image` that verify with `public_pem` and name `digest`.
async fn sigstore_verified_layers(image: &str, digest: &str, public_pem: &str) -> usize {
    let mut client = ClientBuilder::default()
        .with_oci_client_config(ClientConfig {
            protocol: ClientProtocol::Http,
            ..Default::default()
        })
        .build()
        .expect("sigstore client");
    let reference: OciReference = image.parse().expect("sigstore parses the reference");
    let (_, source_digest) = client
        .triangulate(&reference, &Auth::Anonymous)
        .await
        .expect("triangulate");
    assert_eq!(source_digest, digest);
    let layers = client
        .trusted_signature_layers(&Auth::Anonymous, &reference)
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

async fn control(base: &str, op: &str, arg: serde_json::Value) {
    let r = reqwest::Client::new()
        .post(format!("{base}/control/{op}"))
        .body(arg.to_string())
        .send()
        .await
        .expect("control call");
    assert!(r.status().is_success(), "control {op}: {}", r.status());
}

#[tokio::test]
async fn gcp_kms_key_signs_images_that_sigstore_rs_verifies() {
    let Some(reg) = anon_registry() else { return };
    let get = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
    let (Some(endpoint), Some(control_url), Some(credentials)) = (
        get("KEYBROKER_TEST_GCP_KMS_ENDPOINT"),
        get("KEYBROKER_TEST_GCP_KMS_CONTROL"),
        get("KEYBROKER_TEST_GCP_CREDENTIALS"),
    ) else {
        if std::env::var_os("CI").is_some() {
            panic!("KEYBROKER_TEST_GCP_KMS_ENDPOINT not set: run through scripts/test.sh");
        }
        eprintln!("SKIPPED: no fake Cloud KMS (scripts/gcpkms.sh)");
        return;
    };
    let key = format!(
        "projects/kb-e2e/locations/global/keyRings/ring/cryptoKeys/e2e-{}",
        std::process::id()
    );
    control(&control_url, "create_key", serde_json::json!({"name": key})).await;
    let broker = TestBroker::start(&format!(
        "[keys.gcp]\nref = \"gcpkms://{key}\"\n[keys.gcp.gcp]\nendpoint = \"{endpoint}\"\ncredentials_file = \"{credentials}\"\n[[policy]]\ncallers = [\"uid:{}\"]\nkeys = [\"gcp\"]\nimages = [\"**\"]\n",
        uid()
    ))
    .await;

    let digest = reg.push_image("e2e/gcpkms", "v1").await;
    let image = format!("{}/e2e/gcpkms:v1", reg.addr);
    let out = keybroker(
        &broker.socket,
        &["sign", &image, "--key", "gcp", "-a", "commit=gcp"],
        &[],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let v1_pem = stdout(&keybroker(&broker.socket, &["public-key", "--key", "gcp"], &[]).await);
    assert!(v1_pem.starts_with("-----BEGIN PUBLIC KEY-----"), "{v1_pem}");
    assert_eq!(sigstore_verified_layers(&image, &digest, &v1_pem).await, 1);
    let out = keybroker(&broker.socket, &["keys"], &[]).await;
    assert!(
        stdout(&out).contains(&format!("gcp\tecdsa-p256-sha256\t1\tgcpkms://{key}")),
        "{}",
        stdout(&out)
    );

    // Rotation: version 2, version 1 disabled. The next signature comes from
    // version 2 (refreshed once inside the provider) and verifies with its key.
    control(&control_url, "add_version", serde_json::json!({"key": key})).await;
    control(
        &control_url,
        "set_state",
        serde_json::json!({"version": format!("{key}/cryptoKeyVersions/1"), "state": "DISABLED"}),
    )
    .await;
    let out = keybroker(&broker.socket, &["sign", &image, "--key", "gcp"], &[]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let v2_pem = stdout(&keybroker(&broker.socket, &["public-key", "--key", "gcp"], &[]).await);
    assert_ne!(v1_pem, v2_pem, "the public key did not follow the rotation");
    assert_eq!(sigstore_verified_layers(&image, &digest, &v1_pem).await, 1);
    assert_eq!(sigstore_verified_layers(&image, &digest, &v2_pem).await, 1);
}
