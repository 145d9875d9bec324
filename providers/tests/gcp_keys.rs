//! Google Cloud KMS keys against the fake Cloud KMS of tests/fakes/gcp_kms.py
//! (scripts/gcpkms.sh): Google's own Python message classes on the wire, real
//! P-256 keys, a bearer token on every call, an OAuth token endpoint that
//! verifies our service-account JWT, and a control API to rotate, disable and
//! corrupt replies.

#![cfg(feature = "gcp")]

mod conformance;

use std::{sync::Arc, time::Duration};

use keybroker_providers::{
    ecdsa::verify_digest,
    gcp_kms::{crc32c, GcpKmsKey, GcpOptions},
    open, Error, KeyProvider, KeyRef, OpenOptions, Sha256Digest,
};

struct Fake {
    endpoint: String,
    control: String,
    credentials: std::path::PathBuf,
    dir: std::path::PathBuf,
    http: reqwest::Client,
}

fn fake() -> Option<Fake> {
    let get = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    match (
        get("KEYBROKER_TEST_GCP_KMS_ENDPOINT"),
        get("KEYBROKER_TEST_GCP_KMS_CONTROL"),
        get("KEYBROKER_TEST_GCP_CREDENTIALS"),
        get("KEYBROKER_TEST_GCP_DIR"),
    ) {
        (Some(endpoint), Some(control), Some(credentials), Some(dir)) => Some(Fake {
            endpoint,
            control,
            credentials: credentials.into(),
            dir: dir.into(),
            http: reqwest::Client::new(),
        }),
        _ if std::env::var_os("CI").is_some() => {
            panic!("KEYBROKER_TEST_GCP_KMS_ENDPOINT not set: run through scripts/test.sh")
        }
        _ => {
            eprintln!(
                "SKIPPED: no fake Cloud KMS (scripts/gcpkms.sh start DIR; source DIR/gcpkms.env)"
            );
            None
        }
    }
}

impl Fake {
    async fn control(&self, op: &str, arg: serde_json::Value) -> serde_json::Value {
        let r = self
            .http
            .post(format!("{}/control/{op}", self.control))
            .body(arg.to_string())
            .send()
            .await
            .expect("control call");
        let status = r.status();
        let body = json(r).await;
        assert!(status.is_success(), "control {op}: {status} {body}");
        body
    }

    /// A fresh key with `versions` ENABLED versions; returns its resource name.
    async fn key(&self, tag: &str, versions: u32) -> String {
        let name = format!(
            "projects/kb-test/locations/global/keyRings/ring/cryptoKeys/{tag}-{}",
            unique()
        );
        self.control(
            "create_key",
            serde_json::json!({"name": name, "versions": versions}),
        )
        .await;
        name
    }

    /// A global counter of the fake.
    async fn stat(&self, what: &str) -> u64 {
        self.control("stats", serde_json::json!({})).await[what]
            .as_u64()
            .expect("counter")
    }

    /// A counter of calls about one key (0 if none yet).
    async fn key_stat(&self, key: &str, what: &str) -> u64 {
        self.control("stats", serde_json::json!({"key": key})).await[what]
            .as_u64()
            .unwrap_or(0)
    }

    async fn corrupt(&self, key: &str, kind: &str, count: u32) {
        self.control(
            "corrupt",
            serde_json::json!({"key": key, "kind": kind, "count": count}),
        )
        .await;
    }

    fn options(&self) -> GcpOptions {
        GcpOptions {
            endpoint: Some(self.endpoint.clone()),
            credentials_file: Some(self.credentials.clone()),
            ..Default::default()
        }
    }

    fn open_raw(&self, resource: &str) -> GcpKmsKey {
        GcpKmsKey::open(resource, &self.options()).expect("open")
    }

    async fn open_wrapped(&self, resource: &str) -> Arc<dyn KeyProvider> {
        let options = OpenOptions {
            gcp: self.options(),
            ..Default::default()
        };
        open(
            &KeyRef::parse(&format!("gcpkms://{resource}")).unwrap(),
            &options,
        )
        .await
        .expect("open")
    }
}

async fn json(r: reqwest::Response) -> serde_json::Value {
    let bytes = r.bytes().await.expect("body");
    serde_json::from_slice(&bytes).expect("JSON body")
}

fn unique() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

async fn sign_ok(p: &dyn KeyProvider, msg: &[u8]) -> String {
    let d = Sha256Digest::of(msg);
    let sig = p.sign_digest(&d).await.expect("sign");
    let public = p.public_key().await.expect("public key");
    assert_eq!(sig.key_version, public.key_version);
    verify_digest(&public.pem, &d, &sig.der).expect("signature verifies");
    sig.key_version
}

#[tokio::test]
async fn gcp_key_passes_the_conformance_suite() {
    let Some(f) = fake() else { return };
    let key = f.key("conf", 1).await;
    let p = f.open_wrapped(&key).await;
    assert_eq!(p.key_id(), format!("gcpkms://{key}"));
    conformance::run_all(p.clone(), "1").await;
    // Pinned, the same.
    let pinned = f.open_wrapped(&format!("{key}/cryptoKeyVersions/1")).await;
    conformance::run_all(pinned, "1").await;
    assert!(!format!("{p:?}").contains("ya29"), "{p:?}");
    let missing = f
        .open_wrapped("projects/kb-test/locations/global/keyRings/ring/cryptoKeys/no-such-key")
        .await;
    conformance::missing_key_is_not_found(Ok(missing)).await;
}

#[tokio::test]
async fn the_newest_enabled_version_signs_across_pages() {
    let Some(f) = fake() else { return };
    let key = f.key("newest", 5).await;
    // 5 is disabled, 4 destroyed: 3 is the newest ENABLED version.
    for (v, state) in [(5, "DISABLED"), (4, "DESTROYED")] {
        f.control(
            "set_state",
            serde_json::json!({"version": format!("{key}/cryptoKeyVersions/{v}"), "state": state}),
        )
        .await;
    }
    f.control("max_page_size", serde_json::json!({"key": key, "n": 1}))
        .await;
    let p = f.open_raw(&key);
    let version = sign_ok(&p, b"newest").await;
    assert_eq!(version, "3");
    // Its public key is version 3's, not version 1's.
    let v1 = f.open_raw(&format!("{key}/cryptoKeyVersions/1"));
    assert_ne!(
        v1.public_key().await.unwrap().pem,
        p.public_key().await.unwrap().pem
    );
}

#[tokio::test]
async fn a_pinned_version_signs_even_after_rotation() {
    let Some(f) = fake() else { return };
    let key = f.key("pinned", 2).await;
    let p = f.open_raw(&format!("{key}/cryptoKeyVersions/1"));
    assert_eq!(sign_ok(&p, b"a").await, "1");
    f.control("add_version", serde_json::json!({"key": key}))
        .await;
    assert_eq!(sign_ok(&p, b"b").await, "1");
    // Its public key was read once.
    let before = f.key_stat(&key, "GetPublicKey").await;
    for _ in 0..3 {
        p.public_key().await.unwrap();
        sign_ok(&p, b"c").await;
    }
    assert_eq!(f.key_stat(&key, "GetPublicKey").await, before);
    // A pinned version that is disabled: a clear FAILED_PRECONDITION-class error.
    f.control(
        "set_state",
        serde_json::json!({"version": format!("{key}/cryptoKeyVersions/1"), "state": "DISABLED"}),
    )
    .await;
    let err = p.sign_digest(&Sha256Digest::of(b"d")).await.unwrap_err();
    assert!(matches!(err, Error::KeyFormat(_)), "{err}");
    assert!(err.to_string().contains("DISABLED"), "{err}");
    // A version that is not a number is refused at open.
    let err =
        GcpKmsKey::open(&format!("{key}/cryptoKeyVersions/latest"), &f.options()).unwrap_err();
    assert!(matches!(err, Error::InvalidReference { .. }), "{err}");
}

#[tokio::test]
async fn rotation_is_picked_up_after_the_ttl() {
    let Some(f) = fake() else { return };
    let key = f.key("ttl", 1).await;
    let p = GcpKmsKey::open(
        &key,
        &GcpOptions {
            version_ttl: Some(Duration::from_millis(400)),
            ..f.options()
        },
    )
    .unwrap();
    assert_eq!(sign_ok(&p, b"before").await, "1");
    f.control("add_version", serde_json::json!({"key": key}))
        .await;
    // Within the TTL the resolved version is kept (version 1 is still enabled).
    assert_eq!(sign_ok(&p, b"within").await, "1");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sign_ok(&p, b"after").await, "2");
}

#[tokio::test]
async fn a_disabled_version_is_refreshed_once_and_the_signature_retried() {
    let Some(f) = fake() else { return };
    let key = f.key("disabled", 1).await;
    let p = f.open_raw(&key); // TTL 5 min: only the refresh can pick up v2
    assert_eq!(sign_ok(&p, b"v1").await, "1");
    f.control("add_version", serde_json::json!({"key": key}))
        .await;
    f.control(
        "set_state",
        serde_json::json!({"version": format!("{key}/cryptoKeyVersions/1"), "state": "DISABLED"}),
    )
    .await;
    let lists = f.key_stat(&key, "ListCryptoKeyVersions").await;
    assert_eq!(sign_ok(&p, b"v2").await, "2");
    assert_eq!(f.key_stat(&key, "ListCryptoKeyVersions").await, lists + 1);
    // With no enabled version left: NOT_FOUND, saying so.
    f.control(
        "set_state",
        serde_json::json!({"version": format!("{key}/cryptoKeyVersions/2"), "state": "DESTROYED"}),
    )
    .await;
    let err = p.sign_digest(&Sha256Digest::of(b"none")).await.unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err}");
    assert!(err.to_string().contains("no ENABLED version"), "{err}");
}

#[tokio::test]
async fn a_signature_that_does_not_verify_triggers_one_refresh() {
    let Some(f) = fake() else { return };
    let key = f.key("verify", 1).await;
    let p = f.open_raw(&key);
    sign_ok(&p, b"warm").await;
    let keys_read = f.key_stat(&key, "GetPublicKey").await;
    // One bad signature (its CRC matches): refreshed, signed again, verified.
    f.corrupt(&key, "signature", 1).await;
    assert_eq!(sign_ok(&p, b"once").await, "1");
    assert_eq!(f.key_stat(&key, "GetPublicKey").await, keys_read + 1);
    // Always bad: refused (retryable), never returned.
    f.corrupt(&key, "signature", 2).await;
    let err = p.sign_digest(&Sha256Digest::of(b"bad")).await.unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err}");
    assert!(err.to_string().contains("does not verify"), "{err}");
}

#[tokio::test]
async fn every_kind_of_corrupted_reply_is_refused_and_retried() {
    let Some(f) = fake() else { return };
    let key = f.key("corrupt", 1).await;
    for (kind, words) in [
        ("signature_crc32c", "signature_crc32c does not match"),
        ("verified_digest_crc32c", "did not verify our digest_crc32c"),
        ("sign_name", "the reply is for"),
        ("pem_crc32c", "pem_crc32c does not match"),
        ("pem_name", "the reply is for"),
    ] {
        // Without the retry wrapper: refused, UNAVAILABLE-class, with a reason.
        let raw = f.open_raw(&key);
        f.corrupt(&key, kind, 1).await;
        let err = if kind.starts_with("pem") {
            raw.public_key().await.unwrap_err()
        } else {
            raw.public_key().await.unwrap(); // warm the key cache first
            raw.sign_digest(&Sha256Digest::of(kind.as_bytes()))
                .await
                .unwrap_err()
        };
        assert!(matches!(err, Error::Unavailable(_)), "{kind}: {err}");
        assert!(err.to_string().contains(words), "{kind}: {err}");
        // Through open(): the retry wrapper gets a clean reply next time.
        let wrapped = f.open_wrapped(&key).await;
        f.corrupt(&key, kind, 1).await;
        assert_eq!(sign_ok(wrapped.as_ref(), kind.as_bytes()).await, "1");
    }
}

#[tokio::test]
async fn the_digest_crc32c_is_sent_and_checked_by_the_service() {
    let Some(f) = fake() else { return };
    let key = f.key("crc", 1).await;
    let p = f.open_raw(&key);
    let bad = f.key_stat(&key, "bad_digest_crc32c").await;
    sign_ok(&p, b"crc").await;
    // The fake refuses a wrong digest_crc32c; ours was right.
    assert_eq!(f.key_stat(&key, "bad_digest_crc32c").await, bad);
    assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    // A plain gRPC request with a wrong CRC gets INVALID_ARGUMENT from the fake,
    // so the check above is not vacuous.
    use keybroker_providers::gcp_kms::pb;
    let token = {
        let body = f
            .http
            .get(format!(
                "{}/computeMetadata/v1/instance/service-accounts/default/token",
                f.control
            ))
            .header("Metadata-Flavor", "Google")
            .send()
            .await
            .unwrap();
        let body = json(body).await;
        body["access_token"].as_str().unwrap().to_string()
    };
    let channel = tonic::transport::Endpoint::from_shared(f.endpoint.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = pb::key_management_service_client::KeyManagementServiceClient::new(channel);
    let digest = Sha256Digest::of(b"crc");
    let mut req = tonic::Request::new(pb::AsymmetricSignRequest {
        name: format!("{key}/cryptoKeyVersions/1"),
        digest: Some(pb::Digest {
            digest: Some(pb::digest::Digest::Sha256(digest.as_bytes().to_vec())),
        }),
        digest_crc32c: Some(i64::from(crc32c(digest.as_bytes()) ^ 1)),
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let status = client.asymmetric_sign(req).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert_eq!(f.key_stat(&key, "bad_digest_crc32c").await, bad + 1);
}

#[tokio::test]
async fn the_service_account_jwt_flow_gets_a_token_and_caches_it() {
    let Some(f) = fake() else { return };
    let key = f.key("sa", 1).await;
    let issued = f.stat("token_issued").await;
    let p = f.open_raw(&key);
    for i in 0..5u8 {
        sign_ok(&p, &[i]).await;
    }
    // One JWT exchange for all those calls (other tests may run in parallel,
    // so at least one and far fewer than the calls made).
    let now = f.stat("token_issued").await;
    assert!(now > issued, "no token was issued");
    // A revoked token: UNAUTHENTICATED, dropped, a new one fetched, call succeeds.
    f.control("revoke_tokens", serde_json::json!({})).await;
    let before = f.stat("token_issued").await;
    sign_ok(&p, b"after revoke").await;
    assert!(f.stat("token_issued").await > before);
}

#[tokio::test]
async fn a_wrong_credential_is_permission_denied_without_secrets() {
    let Some(f) = fake() else { return };
    let key = f.key("wrong", 1).await;
    let wrong = f.dir.join("wrong_service_account.json");
    let secret_text = std::fs::read_to_string(&wrong).unwrap();
    let sa: serde_json::Value = serde_json::from_str(&secret_text).unwrap();
    let private_key = sa["private_key"].as_str().unwrap();
    let p = GcpKmsKey::open(
        &key,
        &GcpOptions {
            credentials_file: Some(wrong.clone()),
            ..f.options()
        },
    )
    .unwrap();
    let refused = f.stat("token_refused").await;
    let err = p.sign_digest(&Sha256Digest::of(b"x")).await.unwrap_err();
    assert!(matches!(err, Error::PermissionDenied(_)), "{err}");
    assert!(err.to_string().contains("Invalid JWT Signature"), "{err}");
    assert!(f.stat("token_refused").await > refused);
    let text = format!("{err} {err:?} {p:?}");
    for line in private_key.lines().filter(|l| l.len() > 20) {
        assert!(!text.contains(line), "private key in {text}");
    }
    assert!(!text.contains("eyJ"), "JWT in {text}");
    // Through the wrapper: not retried, same error.
    let wrapped = open(
        &KeyRef::parse(&format!("gcpkms://{key}")).unwrap(),
        &OpenOptions {
            gcp: GcpOptions {
                credentials_file: Some(wrong),
                ..f.options()
            },
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let err = wrapped.public_key().await.unwrap_err();
    assert!(matches!(err, Error::PermissionDenied(_)), "{err}");
    // A key the account may not use: PERMISSION_DENIED from the service.
    let denied = f.key("denied", 1).await;
    f.control("deny", serde_json::json!({"key": denied})).await;
    let err = f.open_raw(&denied).public_key().await.unwrap_err();
    assert!(matches!(err, Error::PermissionDenied(_)), "{err}");
    assert!(!err.to_string().contains("ya29"), "{err}");
}

#[tokio::test]
async fn application_default_credentials_in_order() {
    let Some(f) = fake() else { return };
    let key = f.key("adc", 1).await;
    let empty = tempfile::tempdir().unwrap();
    let options = GcpOptions {
        endpoint: Some(f.endpoint.clone()),
        ..Default::default()
    };
    // Only this test changes these variables; every other test passes
    // credentials_file, which is read before any of them.
    // 1. GOOGLE_APPLICATION_CREDENTIALS: an authorized_user file (refresh token).
    std::env::set_var("CLOUDSDK_CONFIG", empty.path());
    std::env::set_var(
        "GOOGLE_APPLICATION_CREDENTIALS",
        f.dir.join("authorized_user.json"),
    );
    let p = GcpKmsKey::open(&key, &options).unwrap();
    assert!(format!("{p:?}").contains("authorized user"), "{p:?}");
    sign_ok(&p, b"user").await;
    // 2. gcloud's well-known file.
    std::env::remove_var("GOOGLE_APPLICATION_CREDENTIALS");
    std::fs::copy(
        &f.credentials,
        empty.path().join("application_default_credentials.json"),
    )
    .unwrap();
    let p = GcpKmsKey::open(&key, &options).unwrap();
    assert!(format!("{p:?}").contains("service account"), "{p:?}");
    sign_ok(&p, b"gcloud").await;
    // 3. The metadata server.
    std::fs::remove_file(empty.path().join("application_default_credentials.json")).unwrap();
    std::env::set_var("GCE_METADATA_HOST", f.control.trim_start_matches("http://"));
    let p = GcpKmsKey::open(&key, &options).unwrap();
    assert!(format!("{p:?}").contains("metadata server"), "{p:?}");
    sign_ok(&p, b"metadata").await;
    std::env::remove_var("GCE_METADATA_HOST");
    std::env::remove_var("CLOUDSDK_CONFIG");
}

#[tokio::test]
async fn create_key_makes_a_p256_signing_key_once() {
    let Some(f) = fake() else { return };
    let key = format!(
        "projects/kb-test/locations/global/keyRings/ring/cryptoKeys/created-{}",
        unique()
    );
    let options = OpenOptions {
        gcp: f.options(),
        ..Default::default()
    };
    let key_ref = KeyRef::parse(&format!("gcpkms://{key}")).unwrap();
    let public = keybroker_providers::create_key(&key_ref, &options)
        .await
        .expect("create");
    assert_eq!(public.key_version, "1");
    let p = open(&key_ref, &options).await.unwrap();
    assert_eq!(p.public_key().await.unwrap().pem, public.pem);
    sign_ok(p.as_ref(), b"created").await;
    let err = keybroker_providers::create_key(&key_ref, &options)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
}

#[tokio::test]
async fn other_algorithms_are_refused_clearly() {
    let Some(f) = fake() else { return };
    let key = format!(
        "projects/kb-test/locations/global/keyRings/ring/cryptoKeys/p384-{}",
        unique()
    );
    f.control(
        "create_key",
        serde_json::json!({"name": key, "algorithm": "EC_SIGN_P384_SHA384"}),
    )
    .await;
    let err = f.open_raw(&key).public_key().await.unwrap_err();
    assert!(matches!(err, Error::KeyFormat(_)), "{err}");
    assert!(err.to_string().contains("EC_SIGN_P384_SHA384"), "{err}");
}

#[tokio::test]
async fn an_unreachable_service_is_unavailable() {
    let Some(f) = fake() else { return };
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let p = GcpKmsKey::open(
        "projects/p/locations/l/keyRings/r/cryptoKeys/k",
        &GcpOptions {
            endpoint: Some(format!("http://{closed}")),
            ..f.options()
        },
    )
    .unwrap();
    let err = p.sign_digest(&Sha256Digest::of(b"x")).await.unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err}");
}

/// Not a test of behaviour: prints signatures per second through the provider
/// (with the retry and cache wrappers) against the fake. `--ignored` to run.
#[tokio::test]
#[ignore]
async fn measure_signs_per_second() {
    let Some(f) = fake() else { return };
    let key = f.key("bench", 1).await;
    let p = f.open_wrapped(&key).await;
    sign_ok(p.as_ref(), b"warm").await;
    // What the provider's own check of each signature costs in this build.
    let d = Sha256Digest::of(b"verify cost");
    let sig = p.sign_digest(&d).await.unwrap();
    let pem = p.public_key().await.unwrap().pem;
    let started = std::time::Instant::now();
    for _ in 0..50 {
        verify_digest(&pem, &d, &sig.der).unwrap();
    }
    eprintln!(
        "gcpkms: verify_digest {:.2} ms each",
        started.elapsed().as_secs_f64() * 1000.0 / 50.0
    );
    for in_flight in [1usize, 8] {
        let n = 400;
        let started = std::time::Instant::now();
        let mut tasks = Vec::new();
        for t in 0..in_flight {
            let p = p.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..n / in_flight {
                    p.sign_digest(&Sha256Digest::of(format!("{t}-{i}").as_bytes()))
                        .await
                        .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let secs = started.elapsed().as_secs_f64();
        eprintln!(
            "gcpkms fake: {in_flight} in flight: {:.0} signs/s",
            n as f64 / secs
        );
    }
}
