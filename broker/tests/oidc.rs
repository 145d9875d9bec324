//! Bearer OIDC ID tokens on the real keybrokerd: a token signed by a key in the
//! issuer's JWKS, with the right audience and not expired, lets its claims
//! satisfy a rule's `claims`; a wrong audience, an expired token, a foreign key
//! or an unknown issuer are UNAUTHENTICATED; no token where a rule needs one is
//! PERMISSION_DENIED naming the claims family.

mod common;

use common::{client, Daemon};

use std::{
    process::{Command, Stdio},
    time::{SystemTime, UNIX_EPOCH},
};

use jsonwebtoken::{jwk::JwkSet, Algorithm, EncodingKey, Header};
use keybroker_proto::v1::{SignImageRequest, SignRequest};
use tonic::{Code, Request};

const ISS: &str = "https://token.actions.test";

fn signing_key() -> (EncodingKey, jsonwebtoken::jwk::Jwk) {
    let (_, der) = keybroker_providers::P256Signer::generate().unwrap();
    // PKCS#8 DER, as the key files are.
    let key = EncodingKey::from_ec_der(&der);
    let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&key, Algorithm::ES256).unwrap();
    jwk.common.key_id = Some("test-key".into());
    (key, jwk)
}

fn token(key: &EncodingKey, iss: &str, aud: &str, exp_in: i64, repo: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some("test-key".into());
    let claims = serde_json::json!({
        "iss": iss, "aud": aud, "sub": format!("repo:{repo}:ref:refs/heads/main"),
        "exp": now + exp_in, "iat": now - 10,
        "repository": repo, "ref": "refs/heads/main", "run_id": 42,
    });
    jsonwebtoken::encode(&h, &claims, key).unwrap()
}

fn with_token<T>(msg: T, token: Option<&str>) -> Request<T> {
    let mut r = Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

#[tokio::test]
async fn id_tokens_are_verified_and_their_claims_drive_policy() {
    let dir = tempfile::tempdir().unwrap();
    let (key, jwk) = signing_key();
    let (foreign, _) = signing_key();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(
        &jwks,
        serde_json::to_string(&JwkSet { keys: vec![jwk] }).unwrap(),
    )
    .unwrap();
    let signing = dir.path().join("k.pem");
    let (_, der) = keybroker_providers::P256Signer::generate().unwrap();
    std::fs::write(
        &signing,
        keybroker_providers::pem::encode("PRIVATE KEY", &der),
    )
    .unwrap();
    let socket = dir.path().join("o.sock");
    let cfg = dir.path().join("o.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nsocket = \"{}\"\n[[oidc]]\nissuer = \"{ISS}\"\naudience = \"keybroker\"\njwks_file = \"{}\"\n[keys.k]\nref = \"{}\"\n[[policy]]\ncallers = [\"*\"]\nkeys = [\"k\"]\nimages = [\"registry.test/acme/**\"]\nallow_raw_digest = true\nclaims = {{ repository = \"acme/*\", ref = \"refs/heads/main\" }}\n",
            socket.display(),
            jwks.display(),
            signing.display()
        ),
    )
    .unwrap();
    let _d = Daemon(
        Command::new(env!("CARGO_BIN_EXE_keybrokerd"))
            .arg("--config")
            .arg(&cfg)
            .env_remove("KEYBROKER_SOCKET")
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut c = client(&socket).await;
    let raw = || SignRequest {
        key: "k".into(),
        digest: vec![5; 32],
    };

    let good = token(&key, ISS, "keybroker", 300, "acme/api");
    c.sign(with_token(raw(), Some(&good)))
        .await
        .expect("valid token");
    let r = c
        .sign_image(with_token(
            SignImageRequest {
                key: "k".into(),
                docker_reference: "registry.test/acme/api".into(),
                manifest_digest: format!("sha256:{}", "cd".repeat(32)),
                annotations: Default::default(),
                ..Default::default()
            },
            Some(&good),
        ))
        .await
        .unwrap()
        .into_inner();
    let payload: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
    assert_eq!(
        payload["optional"]["keybroker.dev/oidc"],
        format!("iss={ISS} sub=repo:acme/api:ref:refs/heads/main").as_str()
    );

    // A verified token whose claims the rule does not accept.
    let other_repo = token(&key, ISS, "keybroker", 300, "evil/api");
    let e = c
        .sign(with_token(raw(), Some(&other_repo)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    assert!(e.message().contains("ID token"), "{e}");
    // No token at all.
    let e = c.sign(with_token(raw(), None)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");

    // The keybroker CLI sends $KEYBROKER_ID_TOKEN (or the file in
    // $KEYBROKER_ID_TOKEN_FILE): with it the key is listed, without it not.
    let cli =
        std::path::PathBuf::from(env!("CARGO_BIN_EXE_keybrokerd")).with_file_name("keybroker");
    if cli.exists() {
        let keys = |env: &[(&str, &str)]| {
            let mut cmd = Command::new(&cli);
            cmd.arg("--socket").arg(&socket).arg("keys");
            cmd.env_remove("KEYBROKER_ID_TOKEN")
                .env_remove("KEYBROKER_ID_TOKEN_FILE");
            for (k, v) in env {
                cmd.env(k, v);
            }
            let out = cmd.output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        assert!(keys(&[("KEYBROKER_ID_TOKEN", &good)]).starts_with("k\t"));
        let file = dir.path().join("token");
        std::fs::write(&file, format!("{good}\n")).unwrap();
        assert!(keys(&[("KEYBROKER_ID_TOKEN_FILE", file.to_str().unwrap())]).starts_with("k\t"));
        assert_eq!(keys(&[]), "");
    } else if std::env::var_os("CI").is_some() {
        panic!("{} missing: cargo build --workspace first", cli.display());
    }

    // Tokens that do not verify never reach the policy.
    for (what, t) in [
        (
            "wrong audience",
            token(&key, ISS, "someone-else", 300, "acme/api"),
        ),
        ("expired", token(&key, ISS, "keybroker", -3600, "acme/api")),
        (
            "foreign key",
            token(&foreign, ISS, "keybroker", 300, "acme/api"),
        ),
        (
            "unknown issuer",
            token(&key, "https://evil.test", "keybroker", 300, "acme/api"),
        ),
        ("garbage", "not.a.jwt".to_string()),
    ] {
        let e = c.sign(with_token(raw(), Some(&t))).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{what}: {e}");
        assert!(
            !e.message().contains(&t),
            "{what}: the token is echoed: {e}"
        );
    }
}

fn signing_key_with_kid(kid: &str) -> (EncodingKey, jsonwebtoken::jwk::Jwk) {
    let (key, mut jwk) = signing_key();
    jwk.common.key_id = Some(kid.into());
    (key, jwk)
}

fn token_with_kid(key: &EncodingKey, kid: &str, iss: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some(kid.into());
    let claims = serde_json::json!({
        "iss": iss, "aud": "keybroker", "sub": "system:serviceaccount:ci:builder",
        "exp": now + 300, "iat": now - 10,
    });
    jsonwebtoken::encode(&h, &claims, key).unwrap()
}

/// A JWKS endpoint on loopback: serves whatever `body` holds, counts requests.
async fn jwks_server(
    body: std::sync::Arc<std::sync::Mutex<String>>,
    hits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = l.accept().await else {
                return;
            };
            let body = body.clone();
            let hits = hits.clone();
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let b = body.lock().unwrap().clone();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
                    b.len()
                );
                let _ = conn.write_all(resp.as_bytes()).await;
            });
        }
    });
    port
}

#[tokio::test]
async fn jwks_from_a_url_is_cached_and_refetched_when_the_issuer_rotates() {
    use std::sync::{atomic::Ordering, Arc, Mutex};
    const K8S: &str = "https://kubernetes.default.svc.test";
    const DEAD: &str = "https://dead-issuer.test";
    let (key_a, jwk_a) = signing_key_with_kid("a");
    let (key_b, jwk_b) = signing_key_with_kid("b");
    let set = |jwk: &jsonwebtoken::jwk::Jwk| {
        serde_json::to_string(&JwkSet {
            keys: vec![jwk.clone()],
        })
        .unwrap()
    };
    let body = Arc::new(Mutex::new(set(&jwk_a)));
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let port = jwks_server(body.clone(), hits.clone()).await;
    // A port nothing listens on: the dead issuer's JWKS cannot be had.
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();

    let dir = tempfile::tempdir().unwrap();
    let signing = dir.path().join("k.pem");
    let (_, der) = keybroker_providers::P256Signer::generate().unwrap();
    std::fs::write(
        &signing,
        keybroker_providers::pem::encode("PRIVATE KEY", &der),
    )
    .unwrap();
    let socket = dir.path().join("u.sock");
    let cfg = dir.path().join("u.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nsocket = \"{}\"\n\
             [[oidc]]\nissuer = \"{K8S}\"\naudience = \"keybroker\"\njwks_url = \"http://127.0.0.1:{port}/openid/v1/jwks\"\n\
             [[oidc]]\nissuer = \"{DEAD}\"\naudience = \"keybroker\"\njwks_url = \"http://127.0.0.1:{dead_port}/jwks\"\n\
             [keys.k]\nref = \"{}\"\n[[policy]]\ncallers = [\"*\"]\nkeys = [\"k\"]\nimages = [\"**\"]\nallow_raw_digest = true\n\
             claims = {{ sub = \"system:serviceaccount:ci:*\" }}\n",
            socket.display(),
            signing.display()
        ),
    )
    .unwrap();
    let _d = Daemon(
        Command::new(env!("CARGO_BIN_EXE_keybrokerd"))
            .arg("--config")
            .arg(&cfg)
            .env_remove("KEYBROKER_SOCKET")
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut c = client(&socket).await;
    let raw = || SignRequest {
        key: "k".into(),
        digest: vec![5; 32],
    };

    let with_a = token_with_kid(&key_a, "a", K8S);
    for _ in 0..3 {
        c.sign(with_token(raw(), Some(&with_a)))
            .await
            .expect("a token signed by the key the JWKS URL serves");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 1, "the JWKS is fetched once");

    // The issuer rotates to key b: the first token naming kid "b" makes the
    // broker fetch again, and key a stops being trusted.
    *body.lock().unwrap() = set(&jwk_b);
    let with_b = token_with_kid(&key_b, "b", K8S);
    c.sign(with_token(raw(), Some(&with_b)))
        .await
        .expect("a token signed by the rotated-in key");
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    let e = c.sign(with_token(raw(), Some(&with_a))).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");

    // Made-up key ids cannot make the broker fetch again and again.
    let (key_x, _) = signing_key_with_kid("x");
    for n in 0..5 {
        let t = token_with_kid(&key_x, &format!("made-up-{n}"), K8S);
        let e = c.sign(with_token(raw(), Some(&t))).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e}");
        assert!(e.message().contains("no key of"), "{e}");
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        2,
        "unknown kids re-fetch at most once per 30 s"
    );

    // An issuer whose keys cannot be fetched: UNAVAILABLE (try again), not a
    // verdict on the token.
    let dead = token_with_kid(&key_a, "a", DEAD);
    let e = c.sign(with_token(raw(), Some(&dead))).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    assert!(e.message().contains("not available"), "{e}");
}

#[test]
fn jwks_url_must_be_https_unless_loopback_and_one_source_only() {
    let dir = tempfile::tempdir().unwrap();
    let check = |oidc: &str| {
        let cfg = dir.path().join("c.toml");
        std::fs::write(
            &cfg,
            format!(
                "[server]\nsocket = \"{}\"\n[[oidc]]\nissuer = \"{ISS}\"\naudience = \"keybroker\"\n{oidc}\n",
                dir.path().join("s.sock").display()
            ),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_keybrokerd"))
            .arg("--check-config")
            .arg(&cfg)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = check("jwks_url = \"http://issuer.example/jwks\"");
    assert!(!ok && err.contains("must be https://"), "{err}");
    let (ok, err) = check("jwks_url = \"https://issuer.example/jwks\"\njwks_file = \"/x\"");
    assert!(
        !ok && err.contains("exactly one of jwks_file and jwks_url"),
        "{err}"
    );
    let (ok, err) = check("");
    assert!(
        !ok && err.contains("exactly one of jwks_file and jwks_url"),
        "{err}"
    );
    let (ok, err) = check("jwks_url = \"https://issuer.example/jwks\"");
    assert!(ok, "{err}");
}
