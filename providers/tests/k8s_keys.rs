//! Kubernetes secrets (`k8s://NAMESPACE/SECRET`) as a signing source, against
//! kmock (scripts/kmock.sh; `KEYBROKER_TEST_KUBECONFIG` names its kubeconfig):
//! the conformance suite, rotation picked up without a restart, deletion and
//! re-creation, the errors of a malformed secret, and `create_secret`.
//!
//! kmock gives objects no resourceVersion, so the key versions seen here are
//! the public-key hashes; the resourceVersion path, 403 (kmock has no RBAC)
//! and the field selector RBAC needs are covered by the unit tests in
//! providers/src/kubernetes.rs. Every test uses a namespace of its own.

#![cfg(feature = "kubernetes")]

mod conformance;

use std::{
    collections::BTreeMap,
    future::Future,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use keybroker_providers::{
    cosign_key,
    ecdsa::verify_digest,
    kubernetes::{
        self, create_secret, data_keys,
        k8s_openapi::{api::core::v1::Secret, ByteString},
        key_version_of,
        kube_client::{
            api::{DeleteParams, ObjectMeta, PostParams},
            Api,
        },
        KubernetesOptions,
    },
    open, Error, KeyProvider, KeyRef, OpenOptions, P256Signer, Password, Sha256Digest,
};

/// How long a change may take to reach the provider.
const PICKUP: Duration = Duration::from_secs(10);

fn kubeconfig() -> Option<PathBuf> {
    match std::env::var_os("KEYBROKER_TEST_KUBECONFIG") {
        Some(p) => Some(PathBuf::from(p)),
        None if std::env::var_os("CI").is_some() => {
            panic!("KEYBROKER_TEST_KUBECONFIG is not set (scripts/kmock.sh start DIR; source DIR/kmock.env)")
        }
        None => {
            eprintln!("SKIPPED: KEYBROKER_TEST_KUBECONFIG not set (scripts/kmock.sh start DIR)");
            None
        }
    }
}

/// One test's corner of the shared kmock.
struct Cluster {
    options: KubernetesOptions,
    namespace: String,
    api: Api<Secret>,
}

async fn cluster(test: &str) -> Option<Cluster> {
    let options = KubernetesOptions {
        kubeconfig: Some(kubeconfig()?),
        ..Default::default()
    };
    let namespace = format!("{test}-{}", std::process::id());
    let client = kubernetes::client(&options).await.expect("client");
    Some(Cluster {
        api: Api::namespaced(client, &namespace),
        options,
        namespace,
    })
}

/// A key pair in cosign's format: (encrypted PEM, public PEM).
fn key_pair(password: &str) -> (String, String) {
    let (signer, der) = P256Signer::generate().expect("generate");
    let pem = cosign_key::encrypt_pem(&der, password.as_bytes()).expect("encrypt");
    (pem, signer.public_key_pem().to_string())
}

fn cosign_data(pem: &str, password: &str, public: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (data_keys::PRIVATE_KEY.to_string(), pem.to_string()),
        (data_keys::PASSWORD.to_string(), password.to_string()),
        (data_keys::PUBLIC_KEY.to_string(), public.to_string()),
    ])
}

impl Cluster {
    fn reference(&self, name: &str) -> KeyRef {
        KeyRef::parse(&format!("k8s://{}/{name}", self.namespace)).expect("reference")
    }

    async fn open(&self, name: &str) -> Arc<dyn KeyProvider> {
        let options = OpenOptions {
            kubernetes: self.options.clone(),
            ..Default::default()
        };
        open(&self.reference(name), &options).await.expect("open")
    }

    /// Creates the secret, or replaces it whole.
    async fn put(&self, name: &str, data: BTreeMap<String, String>) {
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            data: Some(
                data.into_iter()
                    .map(|(k, v)| (k, ByteString(v.into_bytes())))
                    .collect(),
            ),
            ..Default::default()
        };
        let pp = PostParams::default();
        match self.api.get_opt(name).await.expect("get") {
            None => {
                self.api.create(&pp, &secret).await.expect("create");
            }
            Some(_) => {
                self.api.replace(name, &pp, &secret).await.expect("replace");
            }
        }
    }

    async fn delete(&self, name: &str) {
        self.api
            .delete(name, &DeleteParams::default())
            .await
            .expect("delete");
    }

    async fn get(&self, name: &str) -> Secret {
        self.api.get(name).await.expect("get")
    }
}

fn text(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()?
        .get(key)
        .map(|v| String::from_utf8(v.0.clone()).expect("utf-8"))
}

/// Polls `check` every 20 ms until it returns `Some`, for at most `PICKUP`.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> (T, Duration)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return (v, start.elapsed());
        }
        assert!(start.elapsed() < PICKUP, "{what}: not within {PICKUP:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether `p` signs now with the key whose public PEM is `public`.
async fn signs_with(p: &dyn KeyProvider, public: &str) -> bool {
    let d = Sha256Digest::of(b"which key?");
    match p.sign_digest(&d).await {
        Ok(sig) => verify_digest(public, &d, &sig.der).is_ok(),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite() {
    let Some(c) = cluster("conformance").await else {
        return;
    };
    let (pem, public) = key_pair("123");
    c.put("cosign", cosign_data(&pem, "123", &public)).await;
    let p = c.open("cosign").await;
    conformance::run_all(p.clone(), &key_version_of(&public)).await;
    assert_eq!(p.public_key().await.expect("public").pem, public);
    let shown = format!("{p:?}");
    assert!(!shown.contains(&pem[40..80]), "{shown}");
    conformance::missing_key_is_not_found(Ok(c.open("no-such-secret").await)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_key_signs_the_next_request_without_restart() {
    let Some(c) = cluster("rotation").await else {
        return;
    };
    let (old_pem, old_public) = key_pair("old-pw");
    c.put("cosign", cosign_data(&old_pem, "old-pw", &old_public))
        .await;
    let p = c.open("cosign").await;
    assert!(signs_with(p.as_ref(), &old_public).await);
    let old_version = p.public_key().await.expect("public").key_version;

    let (new_pem, new_public) = key_pair("new-pw");
    c.put("cosign", cosign_data(&new_pem, "new-pw", &new_public))
        .await;
    let ((), took) = eventually("the rotated key", || async {
        signs_with(p.as_ref(), &new_public).await.then_some(())
    })
    .await;
    eprintln!("secret update → first signature with the new key: {took:?}");
    // scripts/kmock.sh ends every watch after 5 s, and each reconnect lists
    // the secret again; well under that, the watch event itself delivered it.
    assert!(took < Duration::from_secs(4), "rotation took {took:?}");
    // From then on the old key is never used, and the version says so.
    for _ in 0..20 {
        assert!(!signs_with(p.as_ref(), &old_public).await);
    }
    let sig = p.sign_digest(&Sha256Digest::of(b"v")).await.expect("sign");
    assert_eq!(sig.key_version, key_version_of(&new_public));
    assert_ne!(sig.key_version, old_version);
    let public = p.public_key().await.expect("public");
    assert_eq!(public.pem, new_public);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_secret_is_not_found_and_recreated_secret_works_again() {
    let Some(c) = cluster("deletion").await else {
        return;
    };
    let (pem, public) = key_pair("pw");
    c.put("cosign", cosign_data(&pem, "pw", &public)).await;
    let p = c.open("cosign").await;
    assert!(signs_with(p.as_ref(), &public).await);

    c.delete("cosign").await;
    let (err, _) = eventually("NotFound after deletion", || async {
        p.sign_digest(&Sha256Digest::of(b"x")).await.err()
    })
    .await;
    assert!(matches!(err, Error::NotFound(_)), "{err}");
    assert!(err.to_string().contains("generate-key-pair"), "{err}");
    assert!(matches!(p.public_key().await, Err(Error::NotFound(_))));

    let (pem2, public2) = key_pair("pw2");
    c.put("cosign", cosign_data(&pem2, "pw2", &public2)).await;
    eventually("the re-created secret", || async {
        signs_with(p.as_ref(), &public2).await.then_some(())
    })
    .await;
    assert!(!signs_with(p.as_ref(), &public).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_a_clear_error_without_secrets() {
    let Some(c) = cluster("wrong-password").await else {
        return;
    };
    let (pem, public) = key_pair("right-password-42");
    c.put("cosign", cosign_data(&pem, "wrong-password-17", &public))
        .await;
    let p = c.open("cosign").await;
    let err = p
        .sign_digest(&Sha256Digest::of(b"x"))
        .await
        .expect_err("signed with a wrong password");
    let msg = err.to_string();
    assert!(matches!(err, Error::KeyFormat(_)), "{msg}");
    assert!(
        msg.contains("does not decrypt with cosign.password"),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("k8s://{}/cosign", c.namespace)),
        "{msg}"
    );
    for secret in ["right-password-42", "wrong-password-17", &pem[60..100]] {
        assert!(!msg.contains(secret), "{msg}");
        assert!(!format!("{p:?}").contains(secret));
    }
    // Fixing the secret fixes the key, without a restart.
    c.put("cosign", cosign_data(&pem, "right-password-42", &public))
        .await;
    eventually("the corrected secret", || async {
        signs_with(p.as_ref(), &public).await.then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_mismatched_data_keys_are_named() {
    let Some(c) = cluster("missing-keys").await else {
        return;
    };
    let (pem, public) = key_pair("pw");
    let (_, other_public) = key_pair("pw");
    let cases = [
        (BTreeMap::new(), "no data key cosign.key"),
        (
            BTreeMap::from([(data_keys::PRIVATE_KEY.to_string(), pem.clone())]),
            "no data key cosign.password",
        ),
        (cosign_data("not a pem", "pw", &public), "cosign.key"),
        (
            cosign_data(&pem, "pw", &other_public),
            "cosign.pub does not match",
        ),
    ];
    let p = c.open("cosign").await;
    for (i, (data, expected)) in cases.into_iter().enumerate() {
        c.put("cosign", data).await;
        let (err, _) = eventually(expected, || async {
            match p.sign_digest(&Sha256Digest::of(b"x")).await {
                Err(e) if e.to_string().contains(expected) => Some(e),
                _ => None,
            }
        })
        .await;
        assert!(matches!(err, Error::KeyFormat(_)), "case {i}: {err}");
    }
    // Only cosign.pub absent is fine: it is checked when present.
    let mut data = cosign_data(&pem, "pw", &public);
    data.remove(data_keys::PUBLIC_KEY);
    c.put("cosign", data).await;
    eventually("a key without cosign.pub", || async {
        signs_with(p.as_ref(), &public).await.then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_secret_creates_then_updates_keeping_other_data() {
    let Some(c) = cluster("generate").await else {
        return;
    };
    let password = Password::new("gen-pw");

    // Created from nothing: cosign's three keys, immutable (kmock says 1.26).
    let made = create_secret(&c.namespace, "fresh", &password, false, &c.options)
        .await
        .expect("create");
    assert!(!made.updated && made.immutable);
    let s = c.get("fresh").await;
    assert_eq!(s.immutable, Some(true));
    assert_eq!(text(&s, data_keys::PASSWORD).as_deref(), Some("gen-pw"));
    assert_eq!(
        text(&s, data_keys::PUBLIC_KEY).as_deref(),
        Some(made.public_pem.as_str())
    );
    let pem = text(&s, data_keys::PRIVATE_KEY).expect("cosign.key");
    assert!(pem.starts_with("-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----"));
    let signer = P256Signer::from_pem(&pem, Some(&password)).expect("decrypts");
    assert_eq!(signer.public_key_pem(), made.public_pem);

    // An existing (mutable) secret with other data: updated, other data kept.
    c.put(
        "shared",
        BTreeMap::from([("other.txt".to_string(), "keep me".to_string())]),
    )
    .await;
    let first = create_secret(&c.namespace, "shared", &password, false, &c.options)
        .await
        .expect("update");
    assert!(first.updated && first.immutable);
    let s = c.get("shared").await;
    assert_eq!(text(&s, "other.txt").as_deref(), Some("keep me"));
    assert_eq!(
        text(&s, data_keys::PUBLIC_KEY).as_deref(),
        Some(first.public_pem.as_str())
    );
    assert_eq!(s.immutable, Some(true));

    // A stored key pair is replaced only with force; the now immutable secret
    // is then deleted and created again, other data still kept.
    let err = create_secret(&c.namespace, "shared", &password, false, &c.options)
        .await
        .expect_err("replaced a key pair without --force");
    assert!(err.to_string().contains("--force"), "{err}");
    let p = c.open("shared").await;
    assert!(signs_with(p.as_ref(), &first.public_pem).await);
    let second = create_secret(&c.namespace, "shared", &password, true, &c.options)
        .await
        .expect("forced replace");
    assert_ne!(second.public_pem, first.public_pem);
    let s = c.get("shared").await;
    assert_eq!(text(&s, "other.txt").as_deref(), Some("keep me"));
    assert_eq!(
        text(&s, data_keys::PUBLIC_KEY).as_deref(),
        Some(second.public_pem.as_str())
    );
    // A watching provider follows the delete + create.
    eventually("the regenerated key", || async {
        signs_with(p.as_ref(), &second.public_pem)
            .await
            .then_some(())
    })
    .await;
    assert_eq!(
        kubernetes::read_public_key(&c.namespace, "shared", &c.options)
            .await
            .expect("read cosign.pub"),
        second.public_pem
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signs_per_second_through_the_provider() {
    let Some(c) = cluster("rate").await else {
        return;
    };
    let (pem, public) = key_pair("pw");
    c.put("cosign", cosign_data(&pem, "pw", &public)).await;
    let p = c.open("cosign").await;
    assert!(signs_with(p.as_ref(), &public).await);
    let n = 2000u32;
    let start = Instant::now();
    for i in 0..n {
        p.sign_digest(&Sha256Digest::of(&i.to_be_bytes()))
            .await
            .expect("sign");
    }
    let rate = f64::from(n) / start.elapsed().as_secs_f64();
    eprintln!("k8s:// provider: {rate:.0} signatures/s (one task)");
    assert!(rate > 100.0, "{rate:.0}/s");
}
