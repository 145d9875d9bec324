//! End to end with a Kubernetes secret as the key (kmock from scripts/kmock.sh,
//! `KEYBROKER_TEST_KUBECONFIG`; the registry from scripts/registry.sh):
//! `keybroker generate-key-pair k8s://NS/SECRET` stores the key pair,
//! keybrokerd signs with it, sigstore-rs verifies from the registry; then the
//! key is regenerated and the running daemon signs with the new one.

mod common;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use common::*;
use sigstore::{
    cosign::verification_constraint::VerificationConstraint,
    cosign::{verification_constraint::PublicKeyVerifier, ClientBuilder, CosignCapabilities},
    crypto::SigningScheme,
    registry::{Auth, ClientConfig, ClientProtocol, OciReference},
};

fn kubeconfig() -> Option<String> {
    match std::env::var("KEYBROKER_TEST_KUBECONFIG") {
        Ok(v) if !v.is_empty() => Some(v),
        _ if std::env::var_os("CI").is_some() => {
            panic!("KEYBROKER_TEST_KUBECONFIG is not set (scripts/kmock.sh start DIR; source DIR/kmock.env)")
        }
        _ => {
            eprintln!("SKIPPED: KEYBROKER_TEST_KUBECONFIG not set (scripts/kmock.sh start DIR)");
            None
        }
    }
}

/// Signature layers on `image` that sigstore-rs verifies with `public_pem`.
async fn verified_by_sigstore(image: &str, digest: &str, public_pem: &str) -> usize {
    let mut client = ClientBuilder::default()
        .with_oci_client_config(ClientConfig {
            protocol: ClientProtocol::Http,
            ..Default::default()
        })
        .build()
        .expect("sigstore client");
    let reference: OciReference = image.parse().expect("reference");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_k8s_key_signs_images_sigstore_verifies_and_rotates() {
    let Some(reg) = anon_registry() else { return };
    let Some(kubeconfig) = kubeconfig() else {
        return;
    };
    let namespace = format!("e2e-{}", std::process::id());
    let reference = format!("k8s://{namespace}/release");
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("release");
    let pub_path = dir.path().join("release.pub");
    let no_broker = Path::new("/nonexistent.sock");
    // The client finds the cluster as cosign does (KUBECONFIG).
    let env = [
        ("KUBECONFIG", kubeconfig.as_str()),
        ("COSIGN_PASSWORD", "e2e-password"),
    ];
    let generate = |force: bool| {
        let mut args = vec![
            "generate-key-pair".to_string(),
            reference.clone(),
            "--output-key-prefix".into(),
            prefix.display().to_string(),
        ];
        if force {
            args.push("--force".into());
        }
        args
    };
    let run = |args: Vec<String>| async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        keybroker(no_broker, &args, &env).await
    };

    let out = run(generate(false)).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("Created secret release"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("e2e-password"));
    assert!(
        !dir.path().join("release.key").exists(),
        "the private key stays in the secret"
    );
    let first_pub = std::fs::read_to_string(&pub_path).unwrap();
    assert!(first_pub.starts_with("-----BEGIN PUBLIC KEY-----"));

    let broker = TestBroker::start(&format!(
        "[keys.k8s]\nref = \"{reference}\"\n[keys.k8s.kubernetes]\nkubeconfig = \"{kubeconfig}\"\n[[policy]]\ncallers = [\"uid:{}\"]\nkeys = [\"k8s\"]\nimages = [\"**\"]\n",
        uid()
    ))
    .await;
    let digest = reg.push_image("e2e/k8s", "v1").await;
    let image = format!("{}/e2e/k8s:v1", reg.addr);
    let out = keybroker(&broker.socket, &["sign", &image, "--key", "k8s"], &[]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(verified_by_sigstore(&image, &digest, &first_pub).await, 1);

    // Without --force the stored pair stays; with it, a new key replaces it
    // (delete + create: the secret is immutable) and the daemon, still
    // running, signs with the new key.
    let out = run(generate(false)).await;
    assert!(!out.status.success());
    let out = run(generate(true)).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let second_pub = std::fs::read_to_string(&pub_path).unwrap();
    assert_ne!(second_pub, first_pub);
    let start = Instant::now();
    loop {
        let out = keybroker(&broker.socket, &["public-key", "--key", "k8s"], &[]).await;
        if out.status.success() && stdout(&out).trim() == second_pub.trim() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the daemon kept the old key: {}",
            stderr(&out)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let digest2 = reg.push_image("e2e/k8s", "v2").await;
    let image2 = format!("{}/e2e/k8s:v2", reg.addr);
    let out = keybroker(&broker.socket, &["sign", &image2, "--key", "k8s"], &[]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        verified_by_sigstore(&image2, &digest2, &second_pub).await,
        1
    );
    assert_eq!(verified_by_sigstore(&image2, &digest2, &first_pub).await, 0);
}
