//! The mutual-TLS TCP listener of the real keybrokerd: a client certificate from
//! the configured CA is the caller's identity (its URI SAN, e.g. a SPIFFE ID,
//! matched by `x509-uri:` rules and recorded in payload and audit log); a
//! certificate from another CA, an expired one, or none at all never gets past
//! the handshake; the plaintext health-only port answers health and nothing else.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use keybroker_proto::v1::{SignImageRequest, SignRequest};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType,
};
use tonic::{
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
    Code,
};
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

const BUILDER: &str = "spiffe://example.org/ns/ci/sa/builder";
const OTHER: &str = "spiffe://example.org/ns/ci/sa/other";

struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> Ca {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name} test CA"));
    let key = KeyPair::generate().unwrap();
    let cert = p.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(p, key),
    }
}

/// (certificate PEM, key PEM)
fn leaf(ca: &Ca, dns: &[&str], uri: Option<&str>, client: bool, expired: bool) -> (String, String) {
    let mut p =
        CertificateParams::new(dns.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    if let Some(u) = uri {
        p.subject_alt_names
            .push(SanType::URI(u.try_into().unwrap()));
    }
    p.extended_key_usages = vec![if client {
        ExtendedKeyUsagePurpose::ClientAuth
    } else {
        ExtendedKeyUsagePurpose::ServerAuth
    }];
    if expired {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_tcp(port: u16) {
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("keybrokerd did not listen on {port}");
}

async fn tls_channel(
    port: u16,
    ca_pem: &str,
    client: Option<&(String, String)>,
) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some((cert, key)) = client {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

/// Whether a raw Sign over this connection gets past TLS (any gRPC answer) or
/// not (the handshake or the first request fails).
async fn sign(channel: Result<Channel, String>) -> Result<(), tonic::Status> {
    let ch = channel.map_err(tonic::Status::unavailable)?;
    keybroker_proto::client(ch)
        .sign(SignRequest {
            key: "k".into(),
            digest: vec![9; 32],
        })
        .await
        .map(|_| ())
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[tokio::test]
async fn mtls_identity_policy_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let ours = ca("ours");
    let foreign = ca("foreign");
    let (server_cert, server_key) = leaf(&ours, &["localhost", "127.0.0.1"], None, false, false);
    let builder = leaf(&ours, &[], Some(BUILDER), true, false);
    let other = leaf(&ours, &[], Some(OTHER), true, false);
    let expired = leaf(&ours, &[], Some(BUILDER), true, true);
    let impostor = leaf(&foreign, &[], Some(BUILDER), true, false);

    let key = dir.path().join("k.pem");
    let (_, der) = keybroker_providers::P256Signer::generate().unwrap();
    std::fs::write(&key, keybroker_providers::pem::encode("PRIVATE KEY", &der)).unwrap();
    let (port, health_port) = (free_port(), free_port());
    let audit = dir.path().join("audit.jsonl");
    let cfg = format!(
        "[server]\nsocket = \"{}\"\naudit_log = \"{}\"\n[server.tls]\nlisten = \"127.0.0.1:{port}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\nclient_ca_file = \"{}\"\nhealth_listen = \"127.0.0.1:{health_port}\"\n[keys.k]\nref = \"{}\"\n[[policy]]\ncallers = [\"x509-uri:{BUILDER}\"]\nkeys = [\"k\"]\nimages = [\"registry.test/app/**\"]\nallow_raw_digest = true\n",
        dir.path().join("s.sock").display(),
        audit.display(),
        write(dir.path(), "server.crt", &server_cert),
        write(dir.path(), "server.key", &server_key),
        write(dir.path(), "ca.crt", &ours.pem),
        key.display(),
    );
    let cfg_path = write(dir.path(), "d.toml", &cfg);
    let _d = Daemon(
        Command::new(env!("CARGO_BIN_EXE_keybrokerd"))
            .args(["--config", &cfg_path])
            .env_remove("KEYBROKER_SOCKET")
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_tcp(port).await;

    // The builder's certificate: signs, and is who the payload and audit name.
    let ch = tls_channel(port, &ours.pem, Some(&builder)).await.unwrap();
    sign(Ok(ch.clone())).await.expect("builder may sign");
    let r = keybroker_proto::client(ch)
        .sign_image(SignImageRequest {
            key: "k".into(),
            docker_reference: "registry.test/app/web".into(),
            manifest_digest: format!("sha256:{}", "ab".repeat(32)),
            annotations: Default::default(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let payload: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
    assert_eq!(
        payload["optional"]["keybroker.dev/caller"],
        format!("x509:uri={BUILDER}").as_str()
    );
    let last: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&audit)
            .unwrap()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(last["caller"]["x509_uris"][0], BUILDER);
    assert_eq!(last["decision"], "allowed");

    // Same CA, another identity: authenticated, but the policy says no.
    let e = sign(tls_channel(port, &ours.pem, Some(&other)).await)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");

    // Another CA, an expired certificate, no certificate: no request gets through.
    for (what, client) in [
        ("foreign CA", Some(&impostor)),
        ("expired", Some(&expired)),
        ("no certificate", None),
    ] {
        let e = sign(tls_channel(port, &ours.pem, client).await)
            .await
            .unwrap_err();
        assert!(
            matches!(
                e.code(),
                Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
            ),
            "{what}: got {e}"
        );
        assert_ne!(
            e.code(),
            Code::PermissionDenied,
            "{what} reached the policy"
        );
    }

    // The `keybroker` CLI over the same listener (--broker + client certificate).
    let cli =
        std::path::PathBuf::from(env!("CARGO_BIN_EXE_keybrokerd")).with_file_name("keybroker");
    if cli.exists() {
        let files = |c: &(String, String), n: &str| {
            (
                write(dir.path(), &format!("{n}.crt"), &c.0),
                write(dir.path(), &format!("{n}.key"), &c.1),
            )
        };
        let ca_file = dir.path().join("ca.crt").display().to_string();
        let url = format!("https://127.0.0.1:{port}");
        let run = |cert: &(String, String), args: &[&str]| {
            let (c, k) = files(cert, "cli");
            Command::new(&cli)
                .args([
                    "--broker",
                    &url,
                    "--tls-cert",
                    &c,
                    "--tls-key",
                    &k,
                    "--tls-ca",
                    &ca_file,
                ])
                .args(args)
                .env_remove("KEYBROKER_SOCKET")
                .output()
                .unwrap()
        };
        let out = run(&builder, &["keys"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("k\t"));
        let out = run(&builder, &["health"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = run(&impostor, &["keys"]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("not reachable at https://127.0.0.1"), "{err}");
        let out = Command::new(&cli)
            .args(["--broker", &url, "keys"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-cert"));
    } else if std::env::var_os("CI").is_some() {
        panic!("{} missing: cargo build --workspace first", cli.display());
    }

    // The plaintext health port: health SERVING, the signing API absent.
    let plain = Endpoint::from_shared(format!("http://127.0.0.1:{health_port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let status = HealthClient::new(plain.clone())
        .check(HealthCheckRequest {
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
    let e = sign(Ok(plain)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented, "{e}");
}

#[test]
fn a_tls_listener_without_its_files_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "[server]\nsocket = \"{}\"\n[server.tls]\nlisten = \"127.0.0.1:0\"\ncert_file = \"/nonexistent/tls.crt\"\nkey_file = \"/nonexistent/tls.key\"\nclient_ca_file = \"/nonexistent/ca.crt\"\n",
        dir.path().join("s.sock").display()
    );
    let path = dir.path().join("d.toml");
    std::fs::write(&path, cfg).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_keybrokerd"))
        .arg("--config")
        .arg(&path)
        .env_remove("KEYBROKER_SOCKET")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("server.tls.cert_file /nonexistent/tls.crt"),
        "{err}"
    );
}
