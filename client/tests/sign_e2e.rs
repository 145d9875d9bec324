//! End to end against a real registry (Debian docker-registry on 127.0.0.1, started
//! by scripts/test.sh): the broker signs, the `keybroker` CLI stores and verifies.

mod common;

use common::*;
use keybroker_client::{
    cosign::{append_signature, signature_tag, SignatureLayer, SIGNATURE_ANNOTATION},
    registry::{sha256_digest, ImageRef, OCI_MANIFEST},
};
use serde_json::Value;
use std::path::Path;

fn config_for(keys: &[(&str, &TestKey)], extra_rule: &str) -> String {
    let mut c = String::new();
    for (alias, k) in keys {
        c.push_str(&format!(
            "[keys.{alias}]\nref = \"{}\"\n",
            k.key_path.display()
        ));
    }
    c.push_str(&format!(
        "[[policy]]\ncallers = [\"uid:{}\"]\nkeys = [{}]\nimages = [\"127.0.0.1:*/e2e/**\"]\n{extra_rule}\n",
        uid(),
        keys.iter().map(|(a, _)| format!("\"{a}\"")).collect::<Vec<_>>().join(", ")
    ));
    c
}

async fn sig_layers(reg: &TestRegistry, repo: &str, digest: &str) -> Vec<Value> {
    let img = ImageRef::parse(&format!("{}/{repo}", reg.addr)).unwrap();
    let (body, _) = reg
        .client()
        .get_manifest(&img, &signature_tag(digest), OCI_MANIFEST)
        .await
        .unwrap()
        .expect(".sig exists");
    let m: Value = serde_json::from_slice(&body).unwrap();
    m["layers"].as_array().unwrap().clone()
}

#[tokio::test]
async fn signs_by_tag_and_verifies_and_records_the_caller() {
    let Some(reg) = anon_registry() else { return };
    let dir = tempfile::tempdir().unwrap();
    let key = write_key(dir.path(), "release");
    let other = write_key(dir.path(), "other");
    let broker = TestBroker::start(&config_for(&[("release", &key)], "")).await;
    let digest = reg.push_image("e2e/app", "v1").await;
    let image = format!("{}/e2e/app:v1", reg.addr);

    let out = keybroker(
        &broker.socket,
        &[
            "sign",
            &image,
            "--key",
            "release",
            "-a",
            "commit=abc123",
            "-a",
            "repo=github.com/x/y",
        ],
        &[],
    )
    .await;
    assert!(out.status.success(), "sign failed: {}", stderr(&out));
    assert_eq!(
        stdout(&out).trim(),
        format!("{}/e2e/app@{digest}", reg.addr)
    );

    let out = keybroker(
        &broker.socket,
        &[
            "verify",
            &image,
            "--key",
            key.pub_path.to_str().unwrap(),
            "--prefer",
            "classic",
        ],
        &[],
    )
    .await;
    assert!(out.status.success(), "verify failed: {}", stderr(&out));
    let payloads: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let p = &payloads[0];
    assert_eq!(
        p["critical"]["image"]["docker-manifest-digest"],
        digest.as_str()
    );
    assert_eq!(
        p["critical"]["identity"]["docker-reference"],
        format!("{}/e2e/app", reg.addr)
    );
    assert_eq!(p["optional"]["commit"], "abc123");
    assert_eq!(
        p["optional"]["keybroker.dev/caller"],
        format!("unix:uid={},gid={}", uid(), gid())
    );

    // Verifying by broker alias works too; a different key does not verify.
    let out = keybroker(&broker.socket, &["verify", &image, "--key", "release"], &[]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let out = keybroker(
        &broker.socket,
        &[
            "verify",
            &image,
            "--key",
            other.pub_path.to_str().unwrap(),
            "--prefer",
            "classic",
        ],
        &[],
    )
    .await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no signature") && stderr(&out).contains("does not match the key"),
        "{}",
        stderr(&out)
    );

    // The stored layout is cosign's.
    let layers = sig_layers(&reg, "e2e/app", &digest).await;
    assert_eq!(layers.len(), 1);
    assert_eq!(
        layers[0]["mediaType"],
        "application/vnd.dev.cosign.simplesigning.v1+json"
    );
    assert!(
        layers[0]["annotations"][SIGNATURE_ANNOTATION]
            .as_str()
            .unwrap()
            .len()
            > 60
    );
}

#[tokio::test]
async fn tampered_payload_does_not_verify() {
    let Some(reg) = anon_registry() else { return };
    let dir = tempfile::tempdir().unwrap();
    let key = write_key(dir.path(), "k");
    let broker = TestBroker::start(&config_for(&[("k", &key)], "")).await;
    let digest = reg.push_image("e2e/tamper", "v1").await;
    let image = format!("{}/e2e/tamper@{digest}", reg.addr);
    let out = keybroker(
        &broker.socket,
        &["sign", &image, "--key", "k", "-a", "env=prod"],
        &[],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));

    // Rewrite the stored payload (env=prod → env=dev) keeping the original signature.
    let client = reg.client();
    let img = ImageRef::parse(&image).unwrap();
    let tag = signature_tag(&digest);
    let (body, _) = client
        .get_manifest(&img, &tag, OCI_MANIFEST)
        .await
        .unwrap()
        .unwrap();
    let mut manifest: Value = serde_json::from_slice(&body).unwrap();
    let old = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let payload = client.get_blob(&img, &old).await.unwrap();
    let forged = String::from_utf8(payload)
        .unwrap()
        .replace("\"env\":\"prod\"", "\"env\":\"dev\"");
    let new_digest = client.push_blob(&img, forged.as_bytes()).await.unwrap();
    manifest["layers"][0]["digest"] = Value::from(new_digest);
    manifest["layers"][0]["size"] = Value::from(forged.len());
    client
        .put_manifest(
            &img,
            &tag,
            &serde_json::to_vec(&manifest).unwrap(),
            OCI_MANIFEST,
        )
        .await
        .unwrap();

    let out = keybroker(
        &broker.socket,
        &[
            "verify",
            &image,
            "--key",
            key.pub_path.to_str().unwrap(),
            "--prefer",
            "classic",
        ],
        &[],
    )
    .await;
    assert!(!out.status.success(), "tampered payload verified");
    assert!(
        stderr(&out).contains("does not match the key"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn concurrent_signers_keep_every_signature() {
    let Some(reg) = anon_registry() else { return };
    let dir = tempfile::tempdir().unwrap();
    let keys: Vec<TestKey> = (0..3)
        .map(|i| write_key(dir.path(), &format!("k{i}")))
        .collect();
    let aliases = [("k0", &keys[0]), ("k1", &keys[1]), ("k2", &keys[2])];
    let broker = TestBroker::start(&config_for(&aliases, "")).await;
    let digest = reg.push_image("e2e/race", "v1").await;
    let image = format!("{}/e2e/race:v1", reg.addr);
    let runs = ["k0", "k1", "k2"].map(|k| {
        let socket = broker.socket.clone();
        let image = image.clone();
        tokio::spawn(async move { keybroker(&socket, &["sign", &image, "--key", k], &[]).await })
    });
    for r in runs {
        let out = r.await.unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
    assert_eq!(
        sig_layers(&reg, "e2e/race", &digest).await.len(),
        3,
        "a concurrent signer's signature was lost"
    );
    for k in &keys {
        let out = keybroker(
            &broker.socket,
            &["verify", &image, "--key", k.pub_path.to_str().unwrap()],
            &[],
        )
        .await;
        assert!(out.status.success(), "{}", stderr(&out));
    }
}

#[tokio::test]
async fn appending_keeps_existing_layers_and_skips_an_identical_one() {
    let Some(reg) = anon_registry() else { return };
    let digest = reg.push_image("e2e/append", "v1").await;
    let client = reg.client();
    let img = ImageRef::parse(&format!("{}/e2e/append", reg.addr)).unwrap();
    let a = SignatureLayer {
        payload: b"{\"a\":1}".to_vec(),
        signature_b64: "AAAA".into(),
    };
    let b = SignatureLayer {
        payload: b"{\"b\":2}".to_vec(),
        signature_b64: "BBBB".into(),
    };
    assert!(append_signature(&client, &img, &digest, &a).await.unwrap());
    assert!(append_signature(&client, &img, &digest, &b).await.unwrap());
    assert!(
        !append_signature(&client, &img, &digest, &a).await.unwrap(),
        "identical layer written twice"
    );
    let layers = sig_layers(&reg, "e2e/append", &digest).await;
    let digests: Vec<&str> = layers
        .iter()
        .map(|l| l["digest"].as_str().unwrap())
        .collect();
    assert_eq!(
        digests,
        [sha256_digest(&a.payload), sha256_digest(&b.payload)]
    );
}

#[tokio::test]
async fn htpasswd_registry_needs_credentials() {
    let Some(reg) = auth_registry() else { return };
    let creds = reg.credentials.clone().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = write_key(dir.path(), "k");
    let broker = TestBroker::start(&config_for(&[("k", &key)], "")).await;
    let digest = reg.push_image("e2e/private", "v1").await;
    let image = format!("{}/e2e/private:v1", reg.addr);

    let empty_docker_config = dir.path().join("docker");
    std::fs::create_dir_all(&empty_docker_config).unwrap();
    let no_creds = [("DOCKER_CONFIG", empty_docker_config.to_str().unwrap())];
    let out = keybroker(&broker.socket, &["sign", &image, "--key", "k"], &no_creds).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("registry authentication failed"),
        "{}",
        stderr(&out)
    );

    let with_flags = [
        ("KEYBROKER_REGISTRY_USERNAME", creds.username.as_str()),
        ("KEYBROKER_REGISTRY_PASSWORD", creds.password.as_str()),
    ];
    let out = keybroker(
        &broker.socket,
        &["sign", &image, "--key", "k"],
        &[no_creds[0], with_flags[0], with_flags[1]],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));

    // docker's config.json works as well.
    let docker_dir = dir.path().join("docker-with-auth");
    std::fs::create_dir_all(&docker_dir).unwrap();
    use base64::Engine;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        creds.username,
        creds.password.as_str()
    ));
    std::fs::write(
        docker_dir.join("config.json"),
        format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, reg.addr),
    )
    .unwrap();
    let out = keybroker(
        &broker.socket,
        &[
            "verify",
            &image,
            "--key",
            key.pub_path.to_str().unwrap(),
            "--prefer",
            "classic",
        ],
        &[("DOCKER_CONFIG", docker_dir.to_str().unwrap())],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(&digest));
}

#[tokio::test]
async fn clear_errors_for_missing_image_policy_and_dead_broker() {
    let Some(reg) = anon_registry() else { return };
    let dir = tempfile::tempdir().unwrap();
    let key = write_key(dir.path(), "k");
    let outsider = write_key(dir.path(), "outsider");
    let config = format!(
        "{}[keys.outsider]\nref = \"{}\"\n",
        config_for(&[("k", &key)], ""),
        outsider.key_path.display()
    );
    let broker = TestBroker::start(&config).await;

    let out = keybroker(
        &broker.socket,
        &["sign", &format!("{}/e2e/absent:v1", reg.addr), "--key", "k"],
        &[],
    )
    .await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("image not found"), "{}", stderr(&out));

    reg.push_image("e2e/denied", "v1").await;
    let out = keybroker(
        &broker.socket,
        &[
            "sign",
            &format!("{}/e2e/denied:v1", reg.addr),
            "--key",
            "outsider",
        ],
        &[],
    )
    .await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("policy refused") && stderr(&out).contains("outsider"),
        "{}",
        stderr(&out)
    );

    let out = keybroker(
        &broker.socket,
        &[
            "sign",
            &format!("{}/e2e/denied:v1", reg.addr),
            "--key",
            "nope",
        ],
        &[],
    )
    .await;
    assert!(stderr(&out).contains("no key \"nope\""), "{}", stderr(&out));

    let out = keybroker(&broker.socket, &["keys"], &[]).await;
    assert!(out.status.success());
    assert!(
        stdout(&out).starts_with("k\tecdsa-p256-sha256"),
        "{}",
        stdout(&out)
    );
    assert!(
        !stdout(&out).contains("outsider"),
        "ListKeys shows a key the caller may not use"
    );

    // The health probe: SERVING from a live broker, a clear failure (bounded by
    // --timeout) from a dead socket.
    let out = keybroker(&broker.socket, &["health"], &[]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "SERVING");
    let out = keybroker(
        &broker.socket,
        &["health", "--service", "no.such.Service"],
        &[],
    )
    .await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no.such.Service"), "{}", stderr(&out));

    let dead = dir.path().join("no-broker.sock");
    let out = keybroker(&dead, &["health", "--timeout", "2"], &[]).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no-broker.sock"), "{}", stderr(&out));
    let out = keybroker(&dead, &["keys"], &[]).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not reachable") && stderr(&out).contains("no-broker.sock"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn batch_signing_signs_every_image() {
    let Some(reg) = anon_registry() else { return };
    let dir = tempfile::tempdir().unwrap();
    let key = write_key(dir.path(), "k");
    let broker = TestBroker::start(&config_for(&[("k", &key)], "")).await;
    let mut images = Vec::new();
    for i in 0..5 {
        let d = reg.push_image(&format!("e2e/batch{i}"), "v1").await;
        images.push((format!("{}/e2e/batch{i}:v1", reg.addr), d));
    }
    let mut args = vec!["--stats", "sign", "--key", "k", "--jobs", "3"];
    args.extend(images.iter().map(|(i, _)| i.as_str()));
    let out = keybroker(&broker.socket, &args, &[]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).lines().count(), 5);
    assert!(
        stderr(&out).contains("registry requests: "),
        "{}",
        stderr(&out)
    );
    for (i, (_, d)) in images.iter().enumerate() {
        assert_eq!(sig_layers(&reg, &format!("e2e/batch{i}"), d).await.len(), 1);
    }
}

/// A Vault whose TCP port accepts connections but never answers: the daemon
/// still starts, serves the file key at full speed, and answers UNAVAILABLE for
/// the dead backend's key within its bounded timeout and retries.
#[tokio::test]
async fn a_hung_backend_does_not_slow_other_keys() {
    use keybroker_proto::v1::SignRequest;
    let dir = tempfile::tempdir().unwrap();
    let key = write_key(dir.path(), "local");
    // Listening but never accepting: connects succeed, requests never get an answer.
    // (The "token" is just some variable that is always set; it is never checked.)
    let black_hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hole = black_hole.local_addr().unwrap();
    let broker = TestBroker::start(&format!(
        "[keys.local]\nref = \"{}\"\n[keys.hung]\nref = \"hashivault://k\"\n[keys.hung.vault]\naddress = \"http://{hole}\"\ntoken_env = \"HOME\"\ntimeout_ms = 1500\n[[policy]]\ncallers = [\"uid:{}\"]\nkeys = [\"*\"]\nallow_raw_digest = true\n",
        key.key_path.display(),
        uid()
    ))
    .await;
    let mut hung_client = keybroker_client::broker::connect(&broker.socket)
        .await
        .unwrap();
    let hung = tokio::spawn(async move {
        let started = std::time::Instant::now();
        let r = hung_client
            .sign(SignRequest {
                key: "hung".into(),
                digest: vec![1; 32],
            })
            .await;
        (started.elapsed(), r)
    });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let mut c = keybroker_client::broker::connect(&broker.socket)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    for _ in 0..50 {
        c.sign(SignRequest {
            key: "local".into(),
            digest: vec![2; 32],
        })
        .await
        .expect("file key signs while Vault hangs");
    }
    let local = started.elapsed();
    let (hung_for, r) = hung.await.unwrap();
    assert!(
        local < hung_for,
        "file key waited for the hung backend: {local:?} vs {hung_for:?}"
    );
    assert!(
        local < std::time::Duration::from_secs(1),
        "50 local signs took {local:?}"
    );
    let status = r.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
    assert!(
        hung_for < std::time::Duration::from_secs(8),
        "bounded timeout + retries, took {hung_for:?}"
    );
    drop(black_hole);
}

#[tokio::test]
async fn generate_key_pair_creates_a_transit_key_the_broker_signs_with() {
    let Some(reg) = anon_registry() else { return };
    let (addr, token) = match (
        std::env::var("KEYBROKER_TEST_VAULT_ADDR"),
        std::env::var("KEYBROKER_TEST_VAULT_TOKEN"),
    ) {
        (Ok(a), Ok(t)) if !a.is_empty() => (a, t),
        _ if std::env::var_os("CI").is_some() => {
            panic!("KEYBROKER_TEST_VAULT_ADDR not set: run through scripts/test.sh")
        }
        _ => return,
    };
    let dir = tempfile::tempdir().unwrap();
    let name = format!("gen-{}", std::process::id());
    let prefix = dir.path().join("release");
    let vault_env = [
        ("VAULT_ADDR", addr.as_str()),
        ("VAULT_TOKEN", token.as_str()),
    ];
    let args = [
        "generate-key-pair",
        &format!("openbao://{name}"),
        "--output-key-prefix",
        prefix.to_str().unwrap(),
    ];
    let out = keybroker(Path::new("/nonexistent.sock"), &args, &vault_env).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let pub_path = dir.path().join("release.pub");
    assert!(std::fs::read_to_string(&pub_path)
        .unwrap()
        .starts_with("-----BEGIN PUBLIC KEY-----"));
    assert!(
        !dir.path().join("release.key").exists(),
        "no private key leaves Vault"
    );
    // Running it again must not replace the key.
    let out = keybroker(
        Path::new("/nonexistent.sock"),
        &[&args[..], &["--force"]].concat(),
        &vault_env,
    )
    .await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));

    let broker = TestBroker::start(&format!(
        "[keys.gen]\nref = \"openbao://{name}\"\n[keys.gen.vault]\naddress = \"{addr}\"\ntoken_env = \"KEYBROKER_TEST_VAULT_TOKEN\"\n[[policy]]\ncallers = [\"uid:{}\"]\nkeys = [\"gen\"]\nimages = [\"**\"]\n",
        uid()
    ))
    .await;
    reg.push_image("e2e/generated", "v1").await;
    let image = format!("{}/e2e/generated:v1", reg.addr);
    let out = keybroker(&broker.socket, &["sign", &image, "--key", "gen"], &[]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let out = keybroker(
        &broker.socket,
        &["verify", &image, "--key", pub_path.to_str().unwrap()],
        &[],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
}

/// A loopback TCP forwarder in front of OpenBao that the test can take down
/// and bring back on the same port: a backend outage and its recovery.
struct Forwarder {
    port: u16,
    upstream: String,
    tasks: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Forwarder {
    async fn start(port: u16, upstream: &str) -> Forwarder {
        let f = Forwarder {
            port,
            upstream: upstream.to_string(),
            tasks: Default::default(),
        };
        f.up().await;
        f
    }

    async fn up(&self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .expect("bind forwarder");
        let upstream = self.upstream.clone();
        let tasks = self.tasks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let conn = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                tasks.lock().unwrap().push(conn);
            }
        });
        self.tasks.lock().unwrap().push(accept);
    }

    fn down(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

#[tokio::test]
async fn vault_outage_sign_only_tokens_and_recovery() {
    use keybroker_proto::v1::SignRequest;
    let Some(reg) = anon_registry() else { return };
    let (addr, root) = match (
        std::env::var("KEYBROKER_TEST_VAULT_ADDR"),
        std::env::var("KEYBROKER_TEST_VAULT_TOKEN"),
    ) {
        (Ok(a), Ok(t)) if !a.is_empty() => (a, t),
        _ if std::env::var_os("CI").is_some() => {
            panic!("KEYBROKER_TEST_VAULT_ADDR not set: run through scripts/test.sh")
        }
        _ => return,
    };
    let http = reqwest::Client::new();
    let vault = |method: reqwest::Method, path: &str, body: &str| {
        http.request(method, format!("{addr}/v1/{path}"))
            .header("X-Vault-Token", &root)
            .header("Content-Type", "application/json")
            .body(body.to_string())
            .send()
    };
    let name = format!("outage-{}", std::process::id());
    assert!(vault(
        reqwest::Method::POST,
        &format!("transit/keys/{name}"),
        r#"{"type":"ecdsa-p256"}"#
    )
    .await
    .unwrap()
    .status()
    .is_success());
    let policy =
        format!(r#"{{"policy":"path \"transit/sign/{name}\" {{ capabilities = [\"update\"] }}"}}"#);
    assert!(vault(
        reqwest::Method::PUT,
        &format!("sys/policies/acl/{name}"),
        &policy
    )
    .await
    .unwrap()
    .status()
    .is_success());
    let token_for = |policies: &str| {
        let body = format!(r#"{{"policies":[{policies}]}}"#);
        let fut = vault(reqwest::Method::POST, "auth/token/create", &body);
        async move {
            let v: Value =
                serde_json::from_slice(&fut.await.unwrap().bytes().await.unwrap()).unwrap();
            v["auth"]["client_token"]
                .as_str()
                .expect("token")
                .to_string()
        }
    };
    let sign_only = token_for(&format!("\"{name}\"")).await;
    // Only Vault's "default" policy (an empty list would inherit root's policies).
    let nothing = token_for("\"default\"").await;
    let key_json: Value = serde_json::from_slice(
        &vault(reqwest::Method::GET, &format!("transit/keys/{name}"), "")
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pub_path = dir.path().join("transit.pub");
    std::fs::write(
        &pub_path,
        key_json["data"]["keys"]["1"]["public_key"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    std::fs::write(dir.path().join("sign-only.token"), &sign_only).unwrap();
    std::fs::write(dir.path().join("nothing.token"), &nothing).unwrap();

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let forwarder = Forwarder::start(port, addr.trim_start_matches("http://")).await;
    let local = write_key(dir.path(), "local");
    let via = format!("http://127.0.0.1:{port}");
    let d = dir.path().display();
    let broker = TestBroker::start(&format!(
        "[keys.local]\nref = \"{}\"\n\
         [keys.signonly]\nref = \"openbao://{name}\"\npublic_key_file = \"{d}/transit.pub\"\n[keys.signonly.vault]\naddress = \"{via}\"\ntoken_file = \"{d}/sign-only.token\"\n\
         [keys.nosign]\nref = \"openbao://{name}\"\npublic_key_file = \"{d}/transit.pub\"\n[keys.nosign.vault]\naddress = \"{via}\"\ntoken_file = \"{d}/nothing.token\"\n\
         [[policy]]\ncallers = [\"uid:{}\"]\nkeys = [\"*\"]\nimages = [\"**\"]\nallow_raw_digest = true\n",
        local.key_path.display(),
        uid()
    ))
    .await;

    // A token that may only sign is enough, given the public key in the config.
    reg.push_image("e2e/signonly", "v1").await;
    let image = format!("{}/e2e/signonly:v1", reg.addr);
    let out = keybroker(&broker.socket, &["sign", &image, "--key", "signonly"], &[]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let out = keybroker(
        &broker.socket,
        &["verify", &image, "--key", pub_path.to_str().unwrap()],
        &[],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let mut c = keybroker_client::broker::connect(&broker.socket)
        .await
        .unwrap();
    let sign = |key: &str| SignRequest {
        key: key.into(),
        digest: vec![7; 32],
    };
    let e = c.sign(sign("nosign")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");

    // Outage: clear UNAVAILABLE for the Vault key, file key unaffected.
    forwarder.down();
    let e = c.sign(sign("signonly")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    let started = std::time::Instant::now();
    for _ in 0..20 {
        c.sign(sign("local"))
            .await
            .expect("file key during the outage");
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );

    // Recovery: the same daemon signs again once Vault is back.
    forwarder.up().await;
    c.sign(sign("signonly"))
        .await
        .expect("Vault key after recovery");
    forwarder.down();
}
