//! cosign v3's format end to end against the real registry (Debian's
//! docker-registry 2.8, which has no referrers API, so the tag schema is
//! used) and against the referrers-API emulation of
//! `tests/fakes/registry_proxy.py --referrers` in front of it. Every bundle is
//! also checked by an independent verifier, sigstore-js's `@sigstore/verify`
//! (`tests/sigstore-js/verify.mjs`).

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use common::*;
use keybroker_client::{
    bundle,
    formats::{verify_signatures, Prefer, Source},
    registry::{referrers_tag, Discovery, ImageRef, Registry, RegistryOptions, OCI_INDEX},
};
use serde_json::Value;

fn config_for(keys: &[(&str, &TestKey)]) -> String {
    let mut c = String::new();
    for (alias, k) in keys {
        c.push_str(&format!(
            "[keys.{alias}]\nref = \"{}\"\n",
            k.key_path.display()
        ));
    }
    c.push_str(&format!(
        "[[policy]]\ncallers = [\"uid:{}\"]\nkeys = [{}]\nimages = [\"127.0.0.1:*/bundle/**\"]\n",
        uid(),
        keys.iter()
            .map(|(a, _)| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    c
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs sigstore-js on a bundle; returns its JSON answer and whether it accepted.
fn sigstore_js(bundle: &[u8], key: &TestKey, digest: &str) -> (bool, Value) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bundle.json");
    std::fs::write(&path, bundle).unwrap();
    let script = repo_root().join("tests/sigstore-js/verify.mjs");
    let out = Command::new("node")
        .arg(&script)
        .arg("--bundle")
        .arg(&path)
        .arg("--key")
        .arg(&key.pub_path)
        .arg("--digest")
        .arg(digest)
        .output()
        .expect("node runs (scripts/install-test-deps.sh installs it)");
    assert_ne!(
        out.status.code(),
        Some(2),
        "verify.mjs usage error: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "verify.mjs printed no JSON ({e}): {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), v)
}

/// The bundles stored for an image, read with the library (the CLI's path).
async fn bundles_of(reg: &Registry, image: &str, digest: &str) -> (Discovery, Vec<Vec<u8>>) {
    let img = ImageRef::parse(image).unwrap().with_digest(digest);
    let (via, found) = bundle::find(reg, &img, digest).await.unwrap();
    (via, found.into_iter().map(|f| f.bundle.unwrap()).collect())
}

fn plain_client() -> Registry {
    Registry::new(RegistryOptions::default()).unwrap()
}

#[tokio::test]
async fn both_formats_are_written_and_each_verifies_independently() {
    let Some(reg) = anon_registry() else { return };
    let dir = tempfile::tempdir().unwrap();
    let key = write_key(dir.path(), "release");
    let broker = TestBroker::start(&config_for(&[("release", &key)])).await;
    let digest = reg.push_image("bundle/app", "v1").await;
    let image = format!("{}/bundle/app:v1", reg.addr);

    let out = keybroker(
        &broker.socket,
        &[
            "sign",
            &image,
            "--key",
            "release",
            "-a",
            "commit=abc",
            "--format",
            "both",
        ],
        &[],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("in .sig"), "{}", stderr(&out));
    assert!(stderr(&out).contains("(tag-schema)"), "{}", stderr(&out));

    // The bundle: cosign v3's statement, checked by sigstore-js.
    let client = plain_client();
    let (via, bundles) = bundles_of(&client, &image, &digest).await;
    assert_eq!(via, Discovery::TagSchema);
    assert_eq!(bundles.len(), 1);
    let (ok, js) = sigstore_js(&bundles[0], &key, &digest);
    assert!(ok, "sigstore-js refused our bundle: {js}");
    assert_eq!(js["predicateType"], bundle::COSIGN_SIGN_V1);
    assert_eq!(js["hintIsCosignKeyDigest"], true);
    assert_eq!(js["subjects"][0]["annotations"]["commit"], "abc");
    assert!(js["subjects"][0]["annotations"]["keybroker.dev/caller"]
        .as_str()
        .unwrap()
        .starts_with(&format!("unix:uid={}", uid())));

    // The referrer manifest and the tag-schema index are cosign v3's layout.
    let img = ImageRef::parse(&image).unwrap();
    let (index, _) = client
        .get_manifest(&img, &referrers_tag(&digest), OCI_INDEX)
        .await
        .unwrap()
        .expect("the sha256-HEX referrers tag exists");
    let index: Value = serde_json::from_slice(&index).unwrap();
    assert_eq!(index["mediaType"], OCI_INDEX);
    let entry = &index["manifests"][0];
    assert_eq!(entry["artifactType"], bundle::BUNDLE_MEDIA_TYPE);
    assert_eq!(
        entry["annotations"][bundle::CONTENT_ANNOTATION],
        "dsse-envelope"
    );
    assert_eq!(
        entry["annotations"][bundle::PREDICATE_TYPE_ANNOTATION],
        bundle::COSIGN_SIGN_V1
    );
    let (m, _) = client
        .get_manifest(
            &img,
            entry["digest"].as_str().unwrap(),
            "application/vnd.oci.image.manifest.v1+json",
        )
        .await
        .unwrap()
        .unwrap();
    let m: Value = serde_json::from_slice(&m).unwrap();
    assert_eq!(m["subject"]["digest"], digest.as_str());
    assert_eq!(
        m["config"]["mediaType"],
        "application/vnd.oci.empty.v1+json"
    );

    // Classic and bundle each verify, and say which they are.
    for (prefer, expect) in [("bundle", "bundle (tag-schema)"), ("classic", "classic")] {
        let out = keybroker(
            &broker.socket,
            &[
                "verify",
                &image,
                "--key",
                key.pub_path.to_str().unwrap(),
                "--prefer",
                prefer,
            ],
            &[],
        )
        .await;
        assert!(out.status.success(), "{prefer}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!("verified: {expect}")),
            "{}",
            stderr(&out)
        );
    }
    let out = keybroker(
        &broker.socket,
        &[
            "verify",
            &image,
            "--key",
            key.pub_path.to_str().unwrap(),
            "--prefer",
            "any",
        ],
        &[],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let shown: Vec<Value> = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(shown.len(), 2, "one classic payload and one statement");

    // tree lists both, with the bundle's key hint.
    let out = keybroker(&broker.socket, &["tree", &image, "--json"], &[]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let t: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let entries = t["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{t}");
    assert_eq!(entries[0]["format"], "classic");
    assert_eq!(entries[1]["format"], "bundle");
    assert_eq!(entries[1]["kind"], "signature");
    assert_eq!(
        entries[1]["key_hint"],
        bundle::key_hint(&key.public_pem).unwrap()
    );
    assert_eq!(entries[1]["discovery"], "tag-schema");
}

#[tokio::test]
async fn a_bundle_hides_classic_signatures_from_a_cosign_v3_reader_unless_told_otherwise() {
    let Some(reg) = anon_registry() else { return };
    let dir = tempfile::tempdir().unwrap();
    let old = write_key(dir.path(), "old");
    let new = write_key(dir.path(), "new");
    let broker = TestBroker::start(&config_for(&[("old", &old), ("new", &new)])).await;
    let digest = reg.push_image("bundle/mixed", "v1").await;
    let image = format!("{}/bundle/mixed:v1", reg.addr);
    for (k, f) in [("old", "classic"), ("new", "bundle")] {
        let out = keybroker(
            &broker.socket,
            &["sign", &image, "--key", k, "--format", f],
            &[],
        )
        .await;
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let client = plain_client();
    let img = ImageRef::parse(&image).unwrap();
    // cosign v3's rule: there is a bundle, so only bundles count.
    let e = verify_signatures(&client, &img, &old.public_pem, Prefer::Bundle)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("bundle names another key"), "{e}");
    let v = verify_signatures(&client, &img, &new.public_pem, Prefer::Bundle)
        .await
        .unwrap();
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].source, Source::Bundle(Discovery::TagSchema));
    // classic: .sig exists, so only .sig counts.
    let v = verify_signatures(&client, &img, &old.public_pem, Prefer::Classic)
        .await
        .unwrap();
    assert_eq!(v[0].source, Source::Classic);
    assert!(
        verify_signatures(&client, &img, &new.public_pem, Prefer::Classic)
            .await
            .is_err()
    );
    // any: each key finds its own.
    for k in [&old, &new] {
        assert_eq!(
            verify_signatures(&client, &img, &k.public_pem, Prefer::Any)
                .await
                .unwrap()
                .len(),
            1
        );
    }
    let _ = digest;
}

#[tokio::test]
async fn concurrent_bundle_signers_all_end_up_listed() {
    let Some(reg) = anon_registry() else { return };
    let dir = tempfile::tempdir().unwrap();
    let key = write_key(dir.path(), "release");
    let broker = TestBroker::start(&config_for(&[("release", &key)])).await;
    let digest = reg.push_image("bundle/race", "v1").await;
    let image = format!("{}/bundle/race:v1", reg.addr);
    let mut runs = Vec::new();
    for i in 0..8 {
        let socket = broker.socket.clone();
        let image = image.clone();
        runs.push(tokio::spawn(async move {
            let a = format!("n={i}");
            keybroker(
                &socket,
                &[
                    "sign", &image, "--key", "release", "--format", "bundle", "-a", &a,
                ],
                &[],
            )
            .await
        }));
    }
    for r in runs {
        let out = r.await.unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let client = plain_client();
    let (_, bundles) = bundles_of(&client, &image, &digest).await;
    assert_eq!(
        bundles.len(),
        8,
        "every concurrent signer's referrer is listed"
    );
    let mut seen: Vec<String> = bundles
        .iter()
        .map(|b| {
            let (ok, js) = sigstore_js(b, &key, &digest);
            assert!(ok, "{js}");
            js["subjects"][0]["annotations"]["n"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    seen.sort();
    assert_eq!(seen, (0..8).map(|i| i.to_string()).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_tampered_bundle_is_refused_by_us_and_by_sigstore_js() {
    let Some(reg) = anon_registry() else { return };
    let dir = tempfile::tempdir().unwrap();
    let key = write_key(dir.path(), "release");
    let broker = TestBroker::start(&config_for(&[("release", &key)])).await;
    let digest = reg.push_image("bundle/tamper", "v1").await;
    let other = reg.push_image("bundle/tamper", "v2").await;
    let image = format!("{}/bundle/tamper:v1", reg.addr);
    let out = keybroker(
        &broker.socket,
        &["sign", &image, "--key", "release", "--format", "bundle"],
        &[],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let client = plain_client();
    let (_, bundles) = bundles_of(&client, &image, &digest).await;
    // Point the statement at another image, keep the signature: store it as a
    // referrer of that image.
    let mut b: Value = serde_json::from_slice(&bundles[0]).unwrap();
    let payload = b["dsseEnvelope"]["payload"].as_str().unwrap();
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let st = String::from_utf8(b64.decode(payload).unwrap()).unwrap();
    let forged = st.replace(&digest[7..], &other[7..]);
    b["dsseEnvelope"]["payload"] = Value::from(b64.encode(forged));
    let forged = serde_json::to_vec(&b).unwrap();
    let img = ImageRef::parse(&image).unwrap();
    bundle::store(&client, &img, &other, &forged, bundle::COSIGN_SIGN_V1)
        .await
        .unwrap();
    let (ok, js) = sigstore_js(&forged, &key, &other);
    assert!(!ok, "sigstore-js accepted a forged bundle: {js}");
    let out = keybroker(
        &broker.socket,
        &[
            "verify",
            &format!("{}/bundle/tamper:v2", reg.addr),
            "--key",
            key.pub_path.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no envelope signature matches the key"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn attestations_in_bundles_and_migrate_is_idempotent() {
    let Some(reg) = anon_registry() else { return };
    let dir = tempfile::tempdir().unwrap();
    let key = write_key(dir.path(), "release");
    let broker = TestBroker::start(&config_for(&[("release", &key)])).await;
    let digest = reg.push_image("bundle/att", "v1").await;
    let image = format!("{}/bundle/att:v1", reg.addr);
    let predicate = dir.path().join("vuln.json");
    std::fs::write(&predicate, br#"{"scanner":{"uri":"x"}}"#).unwrap();
    let out = keybroker(
        &broker.socket,
        &[
            "attest",
            &image,
            "--key",
            "release",
            "--type",
            "vuln",
            "--predicate",
            predicate.to_str().unwrap(),
            "--format",
            "bundle",
        ],
        &[],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let client = plain_client();
    let (_, bundles) = bundles_of(&client, &image, &digest).await;
    assert_eq!(bundles.len(), 1);
    let (ok, js) = sigstore_js(&bundles[0], &key, &digest);
    assert!(ok, "{js}");
    assert_eq!(
        js["predicateType"],
        "https://cosign.sigstore.dev/attestation/vuln/v1"
    );
    let out = keybroker(
        &broker.socket,
        &[
            "verify-attestation",
            &image,
            "--key",
            key.pub_path.to_str().unwrap(),
            "--type",
            "vuln",
        ],
        &[],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("verified: bundle (tag-schema)"),
        "{}",
        stderr(&out)
    );

    // migrate: a classic-only image gains a bundle, once; an unsigned one is left alone.
    let signed = format!("{}/bundle/att:v2", reg.addr);
    let signed_digest = reg.push_image("bundle/att", "v2").await;
    let unsigned = format!("{}/bundle/att:v3", reg.addr);
    reg.push_image("bundle/att", "v3").await;
    let out = keybroker(
        &broker.socket,
        &[
            "sign", &signed, "--key", "release", "--format", "classic", "-a", "team=x",
        ],
        &[],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let out = keybroker(
        &broker.socket,
        &["migrate", &signed, &unsigned, "--key", "release"],
        &[],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("1 migrated, 0 already done, 1 without a signature"),
        "{}",
        stderr(&out)
    );
    let (_, bundles) = bundles_of(&client, &signed, &signed_digest).await;
    assert_eq!(bundles.len(), 1);
    let (ok, js) = sigstore_js(&bundles[0], &key, &signed_digest);
    assert!(ok, "{js}");
    assert_eq!(
        js["subjects"][0]["annotations"]["team"], "x",
        "annotations carried over"
    );
    let out = keybroker(
        &broker.socket,
        &["migrate", &signed, "--key", "release"],
        &[],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("0 migrated, 1 already done"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        bundles_of(&client, &signed, &signed_digest).await.1.len(),
        1
    );
}

/// `tests/fakes/registry_proxy.py --referrers` in front of the real registry.
struct ReferrersProxy {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl ReferrersProxy {
    fn start(upstream: &str) -> ReferrersProxy {
        let dir = tempfile::tempdir().unwrap();
        let port_file = dir.path().join("port");
        let child = Command::new("python3")
            .arg(repo_root().join("tests/fakes/registry_proxy.py"))
            .args([
                "--upstream",
                &format!("http://{upstream}"),
                "--referrers",
                "--port-file",
            ])
            .arg(&port_file)
            .stdout(Stdio::null())
            .spawn()
            .expect("python3");
        for _ in 0..100 {
            if let Ok(p) = std::fs::read_to_string(&port_file) {
                if !p.trim().is_empty() {
                    return ReferrersProxy {
                        child,
                        addr: format!("127.0.0.1:{}", p.trim()),
                        _dir: dir,
                    };
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let mut child = child;
        let _ = child.kill();
        let _ = child.wait();
        panic!("registry_proxy.py did not start");
    }
}

impl Drop for ReferrersProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn a_registry_with_the_referrers_api_is_used_and_no_tag_is_written() {
    let Some(reg) = anon_registry() else { return };
    let proxy = ReferrersProxy::start(&reg.addr);
    let api = TestRegistry {
        addr: proxy.addr.clone(),
        credentials: None,
    };
    let dir = tempfile::tempdir().unwrap();
    let key = write_key(dir.path(), "release");
    let broker = TestBroker::start(&config_for(&[("release", &key)])).await;
    let digest = api.push_image("bundle/api", "v1").await;
    let image = format!("{}/bundle/api:v1", api.addr);
    let out = keybroker(
        &broker.socket,
        &["sign", &image, "--key", "release", "--format", "bundle"],
        &[],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("(referrers-api)"), "{}", stderr(&out));
    let client = plain_client();
    let (via, bundles) = bundles_of(&client, &image, &digest).await;
    assert_eq!(via, Discovery::Api);
    assert_eq!(bundles.len(), 1);
    let (ok, js) = sigstore_js(&bundles[0], &key, &digest);
    assert!(ok, "{js}");
    // No tag-schema index was written: the registry lists referrers itself.
    let img = ImageRef::parse(&image).unwrap();
    assert!(client
        .get_manifest(&img, &referrers_tag(&digest), OCI_INDEX)
        .await
        .unwrap()
        .is_none());
    let out = keybroker(
        &broker.socket,
        &["verify", &image, "--key", key.pub_path.to_str().unwrap()],
        &[],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("verified: bundle (referrers-api)"),
        "{}",
        stderr(&out)
    );
}

/// The real keybrokerd, next to the keybroker binary cargo built.
fn keybrokerd() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_keybroker")).with_file_name("keybrokerd");
    assert!(
        p.exists(),
        "{} missing: cargo build --workspace first",
        p.display()
    );
    p
}

#[tokio::test]
async fn kill_9_of_the_daemon_mid_signing_leaves_nothing_half_written() {
    let Some(reg) = anon_registry() else { return };
    let dir = tempfile::tempdir().unwrap();
    let key = write_key(dir.path(), "release");
    let socket = dir.path().join("d.sock");
    let cfg = dir.path().join("d.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nsocket = \"{}\"\n{}",
            socket.display(),
            config_for(&[("release", &key)])
        ),
    )
    .unwrap();
    let spawn = || {
        std::process::Command::new(keybrokerd())
            .arg("--config")
            .arg(&cfg)
            .env_remove("KEYBROKER_SOCKET")
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let wait_for = |socket: PathBuf| async move {
        for _ in 0..500 {
            if tokio::net::UnixStream::connect(&socket).await.is_ok() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("keybrokerd did not serve");
    };
    let mut daemon = spawn();
    wait_for(socket.clone()).await;
    let mut images = Vec::new();
    for i in 0..4 {
        let d = reg.push_image(&format!("bundle/kill{i}"), "v1").await;
        images.push((format!("{}/bundle/kill{i}:v1", reg.addr), d));
    }
    // Four CLI signers in a loop (both formats), bounded to 40 runs each; the
    // daemon is killed once 6 runs have succeeded (at most 60 s).
    let ok = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (image, _) in &images {
        let (socket, image, ok) = (socket.clone(), image.clone(), ok.clone());
        tasks.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            for _ in 0..40 {
                let out = keybroker(&socket, &["sign", &image, "--key", "release"], &[]).await;
                if out.status.success() {
                    ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                } else {
                    failures.push(stderr(&out));
                    break;
                }
            }
            failures
        }));
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while ok.load(std::sync::atomic::Ordering::Relaxed) < 6 && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    daemon.kill().unwrap(); // SIGKILL
    daemon.wait().unwrap();
    let mut failures = Vec::new();
    for t in tasks {
        failures.extend(t.await.unwrap());
    }
    assert!(ok.load(std::sync::atomic::Ordering::Relaxed) >= 6);
    assert!(!failures.is_empty(), "no signer noticed the kill");
    for f in &failures {
        // Either no daemon to connect to, or the connection cut mid-call.
        assert!(
            f.contains("keybrokerd is not reachable")
                || f.contains("lost the connection to keybrokerd"),
            "unclear error after kill -9: {f}"
        );
    }
    // Whatever reached the registry is whole: every .sig layer verifies, every
    // listed bundle referrer exists and verifies (ours and sigstore-js).
    let client = plain_client();
    for (image, digest) in &images {
        let img = ImageRef::parse(image).unwrap().with_digest(digest);
        let layers = match client
            .get_manifest(
                &img,
                &keybroker_client::cosign::signature_tag(digest),
                "application/vnd.oci.image.manifest.v1+json",
            )
            .await
            .unwrap()
        {
            Some((body, _)) => serde_json::from_slice::<Value>(&body).unwrap()["layers"]
                .as_array()
                .unwrap()
                .len(),
            None => 0,
        };
        if layers > 0 {
            let v = keybroker_client::cosign::verify_image(&client, &img, &key.public_pem)
                .await
                .unwrap();
            assert_eq!(v.len(), layers, "{image}: a .sig layer does not verify");
        }
        let (_, found) = bundle::find(&client, &img, digest).await.unwrap();
        for f in found {
            let b = f
                .bundle
                .unwrap_or_else(|e| panic!("{image}: listed referrer unreadable: {e}"));
            bundle::verify(&b, &key.public_pem, digest).unwrap();
            let (ok, js) = sigstore_js(&b, &key, digest);
            assert!(ok, "{js}");
        }
    }
    // The restarted daemon takes over the stale socket and signs again.
    assert!(
        socket.exists(),
        "the killed daemon's socket file is left behind"
    );
    let mut daemon = spawn();
    wait_for(socket.clone()).await;
    let out = keybroker(&socket, &["sign", &images[0].0, "--key", "release"], &[]).await;
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

/// sigstore-rs 0.15 finds bundles with oci-client's `pull_referrers` (API,
/// else the tag schema on a 404); it only accepts keyless bundles, so it
/// proves discovery here, and sigstore-js proves the signatures.
#[tokio::test]
async fn oci_client_as_sigstore_rs_uses_it_discovers_our_referrers_both_ways() {
    let Some(reg) = anon_registry() else { return };
    let proxy = ReferrersProxy::start(&reg.addr);
    let dir = tempfile::tempdir().unwrap();
    let key = write_key(dir.path(), "release");
    let broker = TestBroker::start(&config_for(&[("release", &key)])).await;
    let oci = oci_client::Client::new(oci_client::client::ClientConfig {
        protocol: oci_client::client::ClientProtocol::Http,
        ..Default::default()
    });
    for (addr, how) in [
        (reg.addr.clone(), "tag schema"),
        (proxy.addr.clone(), "API"),
    ] {
        let target = TestRegistry {
            addr: addr.clone(),
            credentials: None,
        };
        let digest = target.push_image("bundle/discovery", "v1").await;
        let image = format!("{addr}/bundle/discovery:v1");
        let out = keybroker(
            &broker.socket,
            &["sign", &image, "--key", "release", "--format", "bundle"],
            &[],
        )
        .await;
        assert!(out.status.success(), "{}", stderr(&out));
        let reference: oci_client::Reference =
            format!("{addr}/bundle/discovery@{digest}").parse().unwrap();
        let index = oci
            .pull_referrers(&reference, Some(bundle::BUNDLE_MEDIA_TYPE))
            .await
            .unwrap();
        assert_eq!(index.manifests.len(), 1, "{how}: {:?}", index.manifests);
        let entry = &index.manifests[0];
        assert_eq!(
            entry.artifact_type.as_deref(),
            Some(bundle::BUNDLE_MEDIA_TYPE),
            "{how}"
        );
        let predicate = entry
            .annotations
            .as_ref()
            .and_then(|a| a.get(bundle::PREDICATE_TYPE_ANNOTATION));
        assert_eq!(
            predicate.map(String::as_str),
            Some(bundle::COSIGN_SIGN_V1),
            "{how}"
        );
        // Other artifact types are filtered out, as a verifier asking for SBOMs sees none.
        let none = oci
            .pull_referrers(&reference, Some("application/spdx+json"))
            .await
            .unwrap();
        assert!(none.manifests.is_empty(), "{how}");
    }
}
