//! Shared set-up for the end-to-end tests: the registries started by
//! `scripts/registry.sh` (real Debian docker-registry on 127.0.0.1), an in-process
//! keybrokerd serving on a temporary unix socket, and test images pushed with the
//! client's own registry code.

#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    process::Output,
};

use keybroker_broker::{build_state, config::Config, keys::Startup};
use keybroker_client::registry::{Credentials, ImageRef, Registry, RegistryOptions};
use keybroker_providers::{pem, P256Signer};

/// A registry from `scripts/registry.sh` (address and optional credentials).
pub struct TestRegistry {
    pub addr: String,
    pub credentials: Option<Credentials>,
}

fn required_env(name: &str) -> Option<String> {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => Some(v),
        _ if std::env::var_os("CI").is_some() => {
            panic!("{name} is not set: run the tests through scripts/test.sh, which starts the registries")
        }
        _ => {
            eprintln!("SKIPPED: {name} not set (run scripts/test.sh to start the test registries)");
            None
        }
    }
}

/// The anonymous registry, or `None` (test skipped) outside scripts/test.sh.
pub fn anon_registry() -> Option<TestRegistry> {
    Some(TestRegistry {
        addr: required_env("KEYBROKER_TEST_REGISTRY")?,
        credentials: None,
    })
}

/// The htpasswd registry.
pub fn auth_registry() -> Option<TestRegistry> {
    let addr = required_env("KEYBROKER_TEST_AUTH_REGISTRY")?;
    let username = required_env("KEYBROKER_TEST_AUTH_USER")?;
    let password = required_env("KEYBROKER_TEST_AUTH_PASSWORD")?;
    Some(TestRegistry {
        addr,
        credentials: Some(Credentials {
            username,
            password: password.into(),
        }),
    })
}

impl TestRegistry {
    pub fn client(&self) -> Registry {
        Registry::new(RegistryOptions {
            credentials: self.credentials.clone(),
            plain_http: vec![],
        })
        .expect("registry client")
    }

    /// Pushes a small unique image to `repo:tag`; returns its manifest digest.
    pub async fn push_image(&self, repo: &str, tag: &str) -> String {
        let reg = self.client();
        let img = ImageRef::parse(&format!("{}/{repo}:{tag}", self.addr)).expect("ref");
        let nonce = format!("{repo}:{tag}:{:?}", std::time::SystemTime::now());
        let layer = format!("layer {nonce}").into_bytes();
        let layer_digest = reg.push_blob(&img, &layer).await.expect("push layer");
        let config = format!(
            r#"{{"architecture":"amd64","os":"linux","config":{{"Labels":{{"nonce":"{nonce}"}}}},"rootfs":{{"type":"layers","diff_ids":["{layer_digest}"]}}}}"#
        );
        let config_digest = reg
            .push_blob(&img, config.as_bytes())
            .await
            .expect("push config");
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","size":{},"digest":"{config_digest}"}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","size":{},"digest":"{layer_digest}"}}]}}"#,
            config.len(),
            layer.len()
        );
        reg.put_manifest(
            &img,
            tag,
            manifest.as_bytes(),
            "application/vnd.oci.image.manifest.v1+json",
        )
        .await
        .expect("push manifest")
    }
}

/// A key pair on disk: PKCS#8 PEM private key and its PEM public key.
pub struct TestKey {
    pub key_path: PathBuf,
    pub pub_path: PathBuf,
    pub public_pem: String,
}

pub fn write_key(dir: &Path, name: &str) -> TestKey {
    let (signer, der) = P256Signer::generate().expect("generate");
    let key_path = dir.join(format!("{name}.key"));
    let pub_path = dir.join(format!("{name}.pub"));
    std::fs::write(&key_path, pem::encode("PRIVATE KEY", &der)).expect("write key");
    std::fs::write(&pub_path, signer.public_key_pem()).expect("write pub");
    TestKey {
        key_path,
        pub_path,
        public_pem: signer.public_key_pem().to_string(),
    }
}

/// keybrokerd's service, in this process, on a fresh unix socket.
pub struct TestBroker {
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TestBroker {
    /// Starts the broker with this config text (`{dir}` is replaced by a temp dir).
    pub async fn start(config_text: &str) -> TestBroker {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("broker.sock");
        let config = Config::parse(config_text).expect("config parses");
        let mut state = build_state(&config, Startup::Lenient)
            .await
            .expect("keys open");
        // As keybrokerd does: the audit log from [server] audit_log.
        if let Some(path) = &config.server.audit_log {
            state.audit = Some(std::sync::Arc::new(
                keybroker_broker::audit::AuditLog::open(path).expect("audit log opens"),
            ));
        }
        let state = keybroker_broker::shared(state);
        let (listener, guard) =
            keybroker_broker::listen::bind_unix(&socket, 0o600, None).expect("bind");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _guard = guard;
            keybroker_broker::serve(listener, state, 64 * 1024, async {
                let _ = rx.await;
            })
            .await
            .expect("serve");
        });
        TestBroker {
            socket,
            _dir: dir,
            shutdown: Some(tx),
        }
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Runs the real `keybroker` CLI.
pub async fn keybroker(socket: &Path, args: &[&str], extra_env: &[(&str, &str)]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_keybroker"));
    cmd.arg("--socket").arg(socket).args(args);
    cmd.env_remove("KEYBROKER_REGISTRY_USERNAME")
        .env_remove("KEYBROKER_REGISTRY_PASSWORD");
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    cmd.output().await.expect("run keybroker")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Current uid, for policy rules.
pub fn uid() -> u32 {
    // SAFETY: getuid cannot fail.
    unsafe { libc::getuid() }
}

/// Current gid.
pub fn gid() -> u32 {
    // SAFETY: getgid cannot fail.
    unsafe { libc::getgid() }
}
