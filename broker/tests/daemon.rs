//! The real `keybrokerd` binary: embedded default, socket handling, signals,
//! config checking, and the gRPC status codes a caller sees.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use hyper_util::rt::TokioIo;
use keybroker_proto::v1::{ListKeysRequest, PublicKeyRequest, SignImageRequest, SignRequest};
use keybroker_providers::{ecdsa::verify_digest, Sha256Digest};
use tonic::{transport::Endpoint, Code};

struct Daemon {
    child: Child,
    socket: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(env_dir: &Path, args: &[&str]) -> Daemon {
    let data = env_dir.join("data");
    let run = env_dir.join("run");
    std::fs::create_dir_all(&run).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_keybrokerd"))
        .args(args)
        .env("XDG_DATA_HOME", &data)
        .env("XDG_RUNTIME_DIR", &run)
        .env_remove("KEYBROKER_SOCKET")
        .env_remove("KEYBROKERD_CONFIG")
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn keybrokerd");
    let socket = run.join("keybroker/keybroker.sock");
    Daemon { child, socket }
}

async fn wait_for_socket(socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::UnixStream::connect(socket).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "keybrokerd did not start serving on {}",
            socket.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn client(socket: &Path) -> keybroker_proto::Client {
    keybroker_proto::client(channel_of(socket).await)
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn embedded_default_serves_signs_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = start(dir.path(), &[]);
    wait_for_socket(&d.socket).await;
    let key_file = dir.path().join("data/keybroker/dev-signing.key");
    assert_eq!(mode(&key_file), 0o600, "dev key must be private");
    assert_eq!(mode(&dir.path().join("data/keybroker")), 0o700);
    assert_eq!(mode(&d.socket), 0o600);

    let mut c = client(&d.socket).await;
    let keys = c
        .list_keys(ListKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].alias, "dev");
    let digest = Sha256Digest::of(b"hello");
    let sig = c
        .sign(SignRequest {
            key: "dev".into(),
            digest: digest.as_bytes().to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    let pem = sig.key.unwrap().public_key_pem;
    verify_digest(&pem, &digest, &sig.signature).expect("daemon's signature verifies");

    // A second daemon on the same socket refuses and leaves the live one alone.
    let second = Command::new(env!("CARGO_BIN_EXE_keybrokerd"))
        .env("XDG_DATA_HOME", dir.path().join("data"))
        .env("XDG_RUNTIME_DIR", dir.path().join("run"))
        .env_remove("KEYBROKER_SOCKET")
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("already serving"));
    c.list_keys(ListKeysRequest {})
        .await
        .expect("first daemon still serves");

    // SIGTERM: exits 0 (even with our idle connection open) and removes its socket.
    // The dev key survives restarts.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) };
    let mut child = std::mem::replace(&mut d.child, Command::new("true").spawn().unwrap());
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!d.socket.exists(), "socket left behind");
    let mut again = start(dir.path(), &[]);
    wait_for_socket(&again.socket).await;
    let pem2 = client(&again.socket)
        .await
        .public_key(PublicKeyRequest { key: "dev".into() })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap()
        .public_key_pem;
    assert_eq!(pem, pem2, "dev key regenerated on restart");
    let _ = again.child.kill();
}

#[tokio::test]
async fn callers_mistakes_get_the_right_status_codes() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), &[]);
    wait_for_socket(&d.socket).await;
    let mut c = client(&d.socket).await;
    let e = c
        .sign(SignRequest {
            key: "dev".into(),
            digest: vec![1; 31],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("32 bytes"));
    let e = c
        .sign(SignRequest {
            key: "missing".into(),
            digest: vec![1; 32],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    let e = c
        .sign(SignRequest {
            key: String::new(),
            digest: vec![1; 32],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    let good_digest = format!("sha256:{}", "a".repeat(64));
    let req = |reference: &str, digest: &str| SignImageRequest {
        key: "dev".into(),
        docker_reference: reference.into(),
        manifest_digest: digest.into(),
        annotations: Default::default(),
        ..Default::default()
    };
    for (reference, digest) in [
        ("reg.io/app:tag", good_digest.as_str()),
        ("reg.io/app", "sha256:1234"),
        ("noslash", good_digest.as_str()),
    ] {
        let e = c.sign_image(req(reference, digest)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{reference} {digest}: {e}");
    }
    let mut forged = req("reg.io/app", &good_digest);
    forged
        .annotations
        .insert("keybroker.dev/caller".into(), "uid=0".into());
    let e = c.sign_image(forged).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    let ok = c
        .sign_image(req("reg.io/app", &good_digest))
        .await
        .unwrap()
        .into_inner();
    assert!(String::from_utf8(ok.payload)
        .unwrap()
        .contains("keybroker.dev/caller"));
    // Over the 64 KiB request limit: refused before decoding, never INTERNAL.
    let e = c
        .sign(SignRequest {
            key: "dev".into(),
            digest: vec![0; 100 * 1024],
        })
        .await
        .unwrap_err();
    assert!(
        matches!(e.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{e}"
    );
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), &[]);
    wait_for_socket(&d.socket).await;
    let mut health = HealthClient::new(channel_of(&d.socket).await);
    let status = health
        .check(HealthCheckRequest {
            service: "keybroker.v1.KeyBroker".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);
    let mut reflection = ServerReflectionClient::new(channel_of(&d.socket).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reply")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"keybroker.v1.KeyBroker".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
}

async fn channel_of(socket: &Path) -> tonic::transport::Channel {
    let socket = socket.to_path_buf();
    Endpoint::from_static("http://keybrokerd.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let s = socket.clone();
            async move { tokio::net::UnixStream::connect(s).await.map(TokioIo::new) }
        }))
        .await
        .expect("connect")
}

#[tokio::test]
async fn default_deny_without_a_rule() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.pem");
    let (_, der) = keybroker_providers::P256Signer::generate().unwrap();
    std::fs::write(&key, keybroker_providers::pem::encode("PRIVATE KEY", &der)).unwrap();
    let socket = dir.path().join("s.sock");
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nsocket = \"{}\"\n[keys.k]\nref = \"{}\"\n",
            socket.display(),
            key.display()
        ),
    )
    .unwrap();
    let mut d = start(dir.path(), &["--config", config.to_str().unwrap()]);
    d.socket = socket;
    wait_for_socket(&d.socket).await;
    assert_eq!(mode(&d.socket), 0o660, "configured default socket mode");
    let mut c = client(&d.socket).await;
    let e = c
        .sign(SignRequest {
            key: "k".into(),
            digest: vec![1; 32],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    assert!(c
        .list_keys(ListKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys
        .is_empty());
}

#[test]
fn check_config_validates_and_explains() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/keys");
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        format!(
            "[keys.release]\nref = \"{}\"\npassword_env = \"KB_TEST_PW\"\n[[policy]]\ncallers = [\"uid:1001\"]\nkeys = [\"release\"]\nimages = [\"reg.io/app/*\"]\n",
            fixtures.join("legacy_cosign_label_password_123.key").display()
        ),
    )
    .unwrap();
    let run = |path: &Path, pw: &str| {
        Command::new(env!("CARGO_BIN_EXE_keybrokerd"))
            .arg("--check-config")
            .arg(path)
            .env("KB_TEST_PW", pw)
            .output()
            .unwrap()
    };
    let out = run(&good, "123");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&good, "wrong");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("release") && err.contains("wrong password"),
        "{err}"
    );
    assert!(!err.contains("wrong\n") || !err.contains("KB_TEST_PW=wrong"));
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[keys.x]\nref = \"azurekms://v/k\"\n").unwrap();
    let out = run(&bad, "");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("known schemes are"));
}

fn test_env(name: &str) -> Option<String> {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => Some(v),
        _ if std::env::var_os("CI").is_some() => {
            panic!("{name} not set: run through scripts/test.sh")
        }
        _ => None,
    }
}

#[test]
fn create_key_makes_kms_and_transit_keys_once() {
    let (Some(aws), Some(bao), Some(bao_token)) = (
        test_env("KEYBROKER_TEST_AWS_ENDPOINT"),
        test_env("KEYBROKER_TEST_VAULT_ADDR"),
        test_env("KEYBROKER_TEST_VAULT_TOKEN"),
    ) else {
        return;
    };
    let n = std::process::id();
    for reference in [
        format!("awskms://{aws}/alias/created-{n}"),
        format!("openbao://created-{n}"),
    ] {
        let run = || {
            Command::new(env!("CARGO_BIN_EXE_keybrokerd"))
                .args(["--create-key", &reference])
                .env("VAULT_ADDR", &bao)
                .env("VAULT_TOKEN", &bao_token)
                .output()
                .unwrap()
        };
        let first = run();
        assert!(
            first.status.success(),
            "{reference}: {}",
            String::from_utf8_lossy(&first.stderr)
        );
        let pem = String::from_utf8(first.stdout).unwrap();
        keybroker_providers::ecdsa::normalize_public_pem(&pem).expect("a P-256 public key");
        let again = run();
        assert!(!again.status.success(), "{reference} created twice");
        assert!(
            String::from_utf8_lossy(&again.stderr).contains("already exists"),
            "{}",
            String::from_utf8_lossy(&again.stderr)
        );
    }
}

#[tokio::test]
async fn metrics_count_decisions_and_backend_latency() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.pem");
    let (_, der) = keybroker_providers::P256Signer::generate().unwrap();
    std::fs::write(&key, keybroker_providers::pem::encode("PRIVATE KEY", &der)).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let socket = dir.path().join("m.sock");
    let config = dir.path().join("m.toml");
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    std::fs::write(
        &config,
        format!(
            "[server]\nsocket = \"{}\"\nmetrics_listen = \"127.0.0.1:{port}\"\n[keys.k]\nref = \"{}\"\n[[policy]]\ncallers = [\"uid:{uid}\"]\nkeys = [\"k\"]\nimages = [\"**\"]\nallow_raw_digest = true\n",
            socket.display(),
            key.display()
        ),
    )
    .unwrap();
    let mut d = start(dir.path(), &["--config", config.to_str().unwrap()]);
    d.socket = socket;
    wait_for_socket(&d.socket).await;
    let mut c = client(&d.socket).await;
    for _ in 0..2 {
        c.sign(SignRequest {
            key: "k".into(),
            digest: vec![3; 32],
        })
        .await
        .unwrap();
    }
    for alias in ["nope-1", "nope-2"] {
        let e = c
            .sign(SignRequest {
                key: alias.into(),
                digest: vec![3; 32],
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
    }
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).await.unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    assert!(
        text.contains("keybroker_requests_total{rpc=\"Sign\",key=\"k\",decision=\"allowed\"} 2"),
        "{text}"
    );
    // Unknown aliases share one label value: callers cannot mint series.
    assert!(
        text.contains(
            "keybroker_requests_total{rpc=\"Sign\",key=\"(unknown)\",decision=\"denied\"} 2"
        ),
        "{text}"
    );
    assert!(!text.contains("nope-1"), "{text}");
    assert!(
        text.contains("keybroker_backend_sign_seconds_count{key=\"k\",result=\"ok\"} 2"),
        "{text}"
    );
}

#[tokio::test]
async fn calls_without_the_request_header_are_refused_but_health_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), &[]);
    wait_for_socket(&d.socket).await;
    // A plain gRPC client that does not send `keybroker-request: true`.
    let mut bare =
        keybroker_proto::v1::key_broker_client::KeyBrokerClient::new(channel_of(&d.socket).await);
    let e = bare
        .sign(SignRequest {
            key: "dev".into(),
            digest: vec![1; 32],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("keybroker-request"), "{e}");
    let e = bare
        .public_key(PublicKeyRequest { key: "dev".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    // The same call with the header goes through; health never needs it.
    client(&d.socket)
        .await
        .public_key(PublicKeyRequest { key: "dev".into() })
        .await
        .expect("with the header");
    let status = tonic_health::pb::health_client::HealthClient::new(channel_of(&d.socket).await)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status();
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
}

async fn scrape(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).await.unwrap();
    text
}

#[tokio::test]
async fn metrics_count_public_key_cache_hits_of_a_remote_key() {
    let (Some(bao), Some(bao_token)) = (
        test_env("KEYBROKER_TEST_VAULT_ADDR"),
        test_env("KEYBROKER_TEST_VAULT_TOKEN"),
    ) else {
        return;
    };
    let name = format!("cache-metric-{}", std::process::id());
    let created = Command::new(env!("CARGO_BIN_EXE_keybrokerd"))
        .args(["--create-key", &format!("openbao://{name}")])
        .env("VAULT_ADDR", &bao)
        .env("VAULT_TOKEN", &bao_token)
        .output()
        .unwrap();
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, &bao_token).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let socket = dir.path().join("c.sock");
    let config = dir.path().join("c.toml");
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    std::fs::write(
        &config,
        format!(
            "[server]\nsocket = \"{}\"\nmetrics_listen = \"127.0.0.1:{port}\"\n\
             [keys.v]\nref = \"openbao://{name}\"\n[keys.v.vault]\naddress = \"{bao}\"\ntoken_file = \"{}\"\n\
             [keys.f]\nref = \"env://KEYBROKER_UNUSED_KEY\"\n\
             [[policy]]\ncallers = [\"uid:{uid}\"]\nkeys = [\"v\"]\nimages = [\"**\"]\n",
            socket.display(),
            token_file.display()
        ),
    )
    .unwrap();
    let (_, der) = keybroker_providers::P256Signer::generate().unwrap();
    let pem = keybroker_providers::pem::encode("PRIVATE KEY", &der);
    let child = Command::new(env!("CARGO_BIN_EXE_keybrokerd"))
        .args(["--config", config.to_str().unwrap()])
        .env("KEYBROKER_UNUSED_KEY", pem.as_str())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let d = Daemon {
        child,
        socket: socket.clone(),
    };
    wait_for_socket(&d.socket).await;
    let mut c = client(&d.socket).await;
    for _ in 0..3 {
        c.public_key(PublicKeyRequest { key: "v".into() })
            .await
            .unwrap();
    }
    let text = scrape(port).await;
    // The start-up read is the one miss; the three PublicKey calls are hits.
    assert!(
        text.contains("keybroker_public_key_cache_total{key=\"v\",result=\"miss\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("keybroker_public_key_cache_total{key=\"v\",result=\"hit\"} 3"),
        "{text}"
    );
    // A local key has no cache in front of it, so no series.
    assert!(!text.contains("key=\"f\",result=\"hit\""), "{text}");
}

/// A key file is read when the daemon starts and at each reload, never in
/// between: replacing or removing it changes nothing until SIGHUP; a reload
/// that cannot read it is rejected and the key in memory keeps signing.
#[tokio::test]
async fn a_key_file_replaced_or_removed_while_running() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.pem");
    let write_key = |path: &Path| {
        let (signer, der) = keybroker_providers::P256Signer::generate().unwrap();
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, keybroker_providers::pem::encode("PRIVATE KEY", &der)).unwrap();
        std::fs::rename(&tmp, path).unwrap();
        signer.public_key_pem().to_string()
    };
    let first = write_key(&key);
    let socket = dir.path().join("r.sock");
    let config = dir.path().join("r.toml");
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    std::fs::write(
        &config,
        format!(
            "[server]\nsocket = \"{}\"\n[keys.k]\nref = \"{}\"\n[[policy]]\ncallers = [\"uid:{uid}\"]\nkeys = [\"k\"]\nimages = [\"**\"]\nallow_raw_digest = true\n",
            socket.display(),
            key.display()
        ),
    )
    .unwrap();
    let mut d = start(dir.path(), &["--config", config.to_str().unwrap()]);
    d.socket = socket;
    wait_for_socket(&d.socket).await;
    let mut c = client(&d.socket).await;
    let digest = Sha256Digest::of(b"rotation");
    let signed_by = async |c: &mut keybroker_proto::Client| {
        let r = c
            .sign(SignRequest {
                key: "k".into(),
                digest: digest.as_bytes().to_vec(),
            })
            .await
            .expect("sign")
            .into_inner();
        let pem = r.key.unwrap().public_key_pem;
        verify_digest(&pem, &digest, &r.signature).expect("verifies with the key it names");
        pem
    };
    let pid = d.child.id() as i32;
    let hup = || {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid, libc::SIGHUP) };
    };

    // Replaced on disk: the running daemon still signs with the key it read.
    let second = write_key(&key);
    assert_eq!(signed_by(&mut c).await, first);
    // SIGHUP: the new file is read and signs from then on.
    hup();
    let deadline = Instant::now() + Duration::from_secs(10);
    while signed_by(&mut c).await != second {
        assert!(
            Instant::now() < deadline,
            "reload did not pick up the new key"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Removed: nothing changes, and a reload that cannot read it is rejected,
    // so the key in memory keeps signing.
    std::fs::remove_file(&key).unwrap();
    assert_eq!(signed_by(&mut c).await, second);
    hup();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(signed_by(&mut c).await, second);
    assert!(d.child.try_wait().unwrap().is_none(), "keybrokerd exited");
}
