//! RFC 3161 timestamps end to end, judged by an independent strict verifier:
//! keybrokerd with a `[timestamp]` authority (the real local TSA of
//! scripts/tsa.sh: `openssl ts -reply`, its own CA), `keybroker sign` and
//! `keybroker attest --format bundle` into a real registry, the bundles read
//! back, and sigstore-rust's `sigstore-verify` (PublicKeyVerificationPolicy,
//! a trusted root holding only the TSA's chain) accepting them — and
//! sigstore-js (`tests/sigstore-js/verify.mjs --tsa-chain`) too. Without a TSA
//! the same bundle is refused for want of signing-time evidence, and a root
//! that trusts another TSA refuses the timestamped one.
//!
//! sigstore-verify 0.15 wants a Rekor inclusion proof in a v0.3 bundle unless
//! the policy says `skip_tlog_unsafe()` (cosign's `--insecure-ignore-tlog`);
//! with it, an RFC 3161 timestamp is what it accepts as the signing time, and
//! "at least one tlog entry or timestamp" is what it demands.

mod common;

use common::*;
use std::path::{Path, PathBuf};

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use keybroker_client::{bundle, registry::ImageRef};
use sigstore_verify::{
    trust_root::TrustedRoot,
    types::{Artifact, Bundle, DerPublicKey, Sha256Hash},
    PublicKeyVerificationPolicy,
};

/// The test TSA: its URL and chain (leaf, then root), or `None` (skipped;
/// a failure under CI).
fn tsa() -> Option<(String, PathBuf)> {
    let get = |name: &str| match std::env::var(name) {
        Ok(v) if !v.is_empty() => Some(v),
        _ if std::env::var_os("CI").is_some() => {
            panic!("{name} not set: run through scripts/test.sh, which starts the test TSA")
        }
        _ => {
            eprintln!("SKIPPED: {name} not set (scripts/tsa.sh starts the test TSA)");
            None
        }
    };
    Some((
        get("KEYBROKER_TEST_TSA_URL")?,
        get("KEYBROKER_TEST_TSA_CHAIN")?.into(),
    ))
}

/// A Sigstore trusted root with one timestamp authority and nothing else:
/// no Rekor, no Fulcio, no CT log.
fn trusted_root(url: &str, chain: &Path) -> TrustedRoot {
    let pem = std::fs::read_to_string(chain).unwrap();
    let certs: Vec<serde_json::Value> = pem
        .split("-----END CERTIFICATE-----")
        .filter_map(|b| b.split("-----BEGIN CERTIFICATE-----").nth(1))
        .map(|b64| {
            let der = B64
                .decode(b64.split_whitespace().collect::<String>())
                .unwrap();
            serde_json::json!({"rawBytes": B64.encode(der)})
        })
        .collect();
    assert!(certs.len() >= 2, "{}: leaf then root", chain.display());
    let root = serde_json::json!({
        "mediaType": "application/vnd.dev.sigstore.trustedroot+json;version=0.1",
        "tlogs": [],
        "certificateAuthorities": [],
        "ctlogs": [],
        "timestampAuthorities": [{
            "subject": {"organization": "keybroker test", "commonName": "keybroker test TSA"},
            "uri": url,
            "certChain": {"certificates": certs},
            "validFor": {"start": "2020-01-01T00:00:00Z"},
        }],
    });
    TrustedRoot::from_json(&root.to_string()).expect("sigstore-verify reads the trusted root")
}

fn config(key: &TestKey, timestamp: Option<(&str, &Path)>) -> String {
    let mut c = format!(
        "[keys.k]\nref = \"{}\"\n[[policy]]\ncallers = [\"uid:{}\"]\nkeys = [\"k\"]\nimages = [\"127.0.0.1:*/tse2e/**\"]\n",
        key.key_path.display(),
        uid()
    );
    if let Some((url, chain)) = timestamp {
        c.push_str(&format!(
            "[timestamp]\nurl = \"{url}\"\nca_chain = \"{}\"\n",
            chain.display()
        ));
    }
    c
}

/// The bundles stored for `repo@digest` (as cosign v3 finds them).
async fn bundles(reg: &TestRegistry, repo: &str, digest: &str) -> Vec<Vec<u8>> {
    let img = ImageRef::parse(&format!("{}/{repo}", reg.addr)).unwrap();
    let (_, found) = bundle::find(&reg.client(), &img, digest).await.unwrap();
    found.into_iter().map(|f| f.bundle.unwrap()).collect()
}

/// sigstore-verify's verdict on `bundle` for the image `digest`, signed by
/// `public_pem`, under `root`; Ok(number of verified timestamps).
fn sigstore_verify(
    bundle: &[u8],
    digest: &str,
    public_pem: &str,
    root: &TrustedRoot,
    skip_tlog: bool,
) -> Result<usize, String> {
    let bundle = Bundle::from_json(std::str::from_utf8(bundle).unwrap())
        .map_err(|e| format!("bundle: {e}"))?;
    let mut policy = PublicKeyVerificationPolicy::new(DerPublicKey::from_pem(public_pem).unwrap());
    if skip_tlog {
        policy = policy.skip_tlog_unsafe();
    }
    let artifact =
        Artifact::from(Sha256Hash::from_hex(digest.trim_start_matches("sha256:")).unwrap());
    sigstore_verify::verify(artifact, &bundle, &policy, root)
        .map(|r| r.verified_timestamps().len())
        .map_err(|e| e.to_string())
}

/// sigstore-js's verdict (`tests/sigstore-js/verify.mjs`) on `bundle` with
/// `chain` as its one timestamp authority, which it then requires.
fn sigstore_js(
    bundle: &[u8],
    key: &TestKey,
    digest: &str,
    chain: &Path,
) -> (bool, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bundle.json");
    std::fs::write(&path, bundle).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/sigstore-js/verify.mjs");
    let out = std::process::Command::new("node")
        .arg(&script)
        .arg("--bundle")
        .arg(&path)
        .arg("--key")
        .arg(&key.pub_path)
        .arg("--digest")
        .arg(digest)
        .arg("--tsa-chain")
        .arg(chain)
        .output()
        .expect("node runs (scripts/install-test-deps.sh installs it)");
    assert_ne!(
        out.status.code(),
        Some(2),
        "verify.mjs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "verify.mjs printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    (out.status.success(), v)
}

#[tokio::test]
async fn timestamped_bundles_pass_sigstore_verify_and_unstamped_ones_do_not() {
    let Some(reg) = anon_registry() else { return };
    let Some((url, chain)) = tsa() else { return };
    let dir = tempfile::tempdir().unwrap();
    let key = write_key(dir.path(), "k");
    let root = trusted_root(&url, &chain);

    // A daemon with the TSA: sign and attest, bundles only.
    let broker = TestBroker::start(&config(&key, Some((&url, &chain)))).await;
    let digest = reg.push_image("tse2e/stamped", "v1").await;
    let image = format!("{}/tse2e/stamped:v1", reg.addr);
    let out = keybroker(
        &broker.socket,
        &["sign", &image, "--key", "k", "--format", "bundle"],
        &[],
    )
    .await;
    assert!(out.status.success(), "sign: {}", stderr(&out));
    let predicate = dir.path().join("predicate.json");
    std::fs::write(&predicate, r#"{"tested":true}"#).unwrap();
    let out = keybroker(
        &broker.socket,
        &[
            "attest",
            &image,
            "--key",
            "k",
            "--predicate",
            predicate.to_str().unwrap(),
            "--type",
            "https://example.com/tse2e/v1",
            "--format",
            "bundle",
        ],
        &[],
    )
    .await;
    assert!(out.status.success(), "attest: {}", stderr(&out));

    let stored = bundles(&reg, "tse2e/stamped", &digest).await;
    assert_eq!(stored.len(), 2, "one signature and one attestation bundle");
    for b in &stored {
        let parsed = bundle::parse(b).unwrap();
        assert_eq!(parsed.tlog_entries, 0);
        assert_eq!(parsed.timestamps.len(), 1, "one RFC 3161 token");
        assert_eq!(
            sigstore_verify(b, &digest, &key.public_pem, &root, true),
            Ok(1),
            "{}",
            String::from_utf8_lossy(b)
        );
        let (ok, js) = sigstore_js(b, &key, &digest, &chain);
        assert!(ok && js["timestamps"] == 1, "sigstore-js: {js}");
        // A Rekor inclusion proof is still demanded by the default policy.
        let err = sigstore_verify(b, &digest, &key.public_pem, &root, false).unwrap_err();
        assert!(err.contains("inclusion proof"), "{err}");
        // Another image's digest: refused (the statement binds this one).
        let other = format!("sha256:{}", "0".repeat(64));
        assert!(sigstore_verify(b, &other, &key.public_pem, &root, true).is_err());
    }

    // A root that trusts another TSA (the test TSA's rogue CA) refuses the token.
    let rogue = dir.path().join("rogue-chain.pem");
    let tsa_dir = chain.parent().unwrap();
    let mut pem = std::fs::read_to_string(tsa_dir.join("rogue-tsa.pem")).unwrap();
    pem.push_str(&std::fs::read_to_string(tsa_dir.join("rogue-root.pem")).unwrap());
    std::fs::write(&rogue, pem).unwrap();
    let err = sigstore_verify(
        &stored[0],
        &digest,
        &key.public_pem,
        &trusted_root(&url, &rogue),
        true,
    )
    .unwrap_err();
    assert!(err.to_lowercase().contains("timestamp"), "{err}");
    let (ok, js) = sigstore_js(&stored[0], &key, &digest, &rogue);
    assert!(!ok, "sigstore-js accepted another TSA's token: {js}");

    // A daemon without a TSA: the bundle has no signing-time evidence.
    let plain = TestBroker::start(&config(&key, None)).await;
    let digest = reg.push_image("tse2e/plain", "v1").await;
    let image = format!("{}/tse2e/plain:v1", reg.addr);
    let out = keybroker(
        &plain.socket,
        &["sign", &image, "--key", "k", "--format", "bundle"],
        &[],
    )
    .await;
    assert!(out.status.success(), "sign: {}", stderr(&out));
    let stored = bundles(&reg, "tse2e/plain", &digest).await;
    assert_eq!(stored.len(), 1);
    assert!(bundle::parse(&stored[0]).unwrap().timestamps.is_empty());
    let err = sigstore_verify(&stored[0], &digest, &key.public_pem, &root, true).unwrap_err();
    assert!(
        err.contains("bundle must have at least one tlog entry or timestamp verification data"),
        "{err}"
    );
    let (ok, js) = sigstore_js(&stored[0], &key, &digest, &chain);
    assert!(
        !ok,
        "sigstore-js accepted a bundle without the timestamp it requires: {js}"
    );
}
