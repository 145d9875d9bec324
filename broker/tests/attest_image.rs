//! AttestImage on the real keybrokerd: the broker builds the in-toto statement
//! around the caller's predicate, signs the DSSE PAE, and answers with the
//! envelope; image policy applies (annotation requirements do not: an
//! attestation has none), a predicate that is not a JSON object (or a string,
//! as cosign's `--type spdx` makes) is INVALID_ARGUMENT, and for SLSA Provenance v1 the builder id comes from an
//! authenticated identity (here a verified OIDC token), the client's claim
//! being kept beside it. Every decision lands in the audit log with the caller.

mod common;

use common::{client, Daemon};

use std::{
    process::{Command, Stdio},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{engine::general_purpose::STANDARD, Engine};
use jsonwebtoken::{jwk::JwkSet, Algorithm, EncodingKey, Header};
use keybroker_proto::v1::AttestImageRequest;
use keybroker_providers::{ecdsa::verify_digest, Sha256Digest};
use tonic::{transport::Endpoint, Code, Request};

const ISS: &str = "https://token.actions.test";
const SLSA1: &str = "https://slsa.dev/provenance/v1";

fn signing_key() -> (EncodingKey, jsonwebtoken::jwk::Jwk) {
    let (_, der) = keybroker_providers::P256Signer::generate().unwrap();
    let key = EncodingKey::from_ec_der(&der);
    let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&key, Algorithm::ES256).unwrap();
    jwk.common.key_id = Some("test-key".into());
    (key, jwk)
}

fn token(key: &EncodingKey) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some("test-key".into());
    let claims = serde_json::json!({
        "iss": ISS, "aud": "keybroker", "sub": "repo:acme/api:ref:refs/heads/main",
        "exp": now + 300, "iat": now - 10,
    });
    jsonwebtoken::encode(&h, &claims, key).unwrap()
}

fn req(
    image: &str,
    predicate_type: &str,
    predicate: &str,
    token: Option<&str>,
) -> Request<AttestImageRequest> {
    let mut r = Request::new(AttestImageRequest {
        key: "k".into(),
        docker_reference: image.into(),
        manifest_digest: format!("sha256:{}", "ab".repeat(32)),
        predicate_type: predicate_type.into(),
        predicate: predicate.as_bytes().to_vec(),
        ..Default::default()
    });
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

fn pae(t: &str, body: &[u8]) -> Vec<u8> {
    let mut v = format!("DSSEv1 {} {} {} ", t.len(), t, body.len()).into_bytes();
    v.extend_from_slice(body);
    v
}

/// Checks an envelope the way a DSSE verifier does and returns its statement.
fn open_envelope(envelope: &[u8], pem: &str) -> serde_json::Value {
    let env: serde_json::Value = serde_json::from_slice(envelope).unwrap();
    assert_eq!(env["payloadType"], "application/vnd.in-toto+json");
    let sigs = env["signatures"].as_array().unwrap();
    assert_eq!(sigs.len(), 1);
    assert_eq!(sigs[0]["keyid"], "");
    let payload = STANDARD.decode(env["payload"].as_str().unwrap()).unwrap();
    let sig = STANDARD.decode(sigs[0]["sig"].as_str().unwrap()).unwrap();
    let digest = Sha256Digest::of(&pae("application/vnd.in-toto+json", &payload));
    verify_digest(pem, &digest, &sig).expect("signature over the PAE verifies");
    // …and not over the bare payload (it really is DSSE).
    assert!(verify_digest(pem, &Sha256Digest::of(&payload), &sig).is_err());
    serde_json::from_slice(&payload).unwrap()
}

#[tokio::test]
async fn attestations_are_built_signed_policed_and_audited() {
    let dir = tempfile::tempdir().unwrap();
    let (jwt_key, jwk) = signing_key();
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
    let socket = dir.path().join("a.sock");
    let audit = dir.path().join("audit.jsonl");
    let cfg = dir.path().join("a.toml");
    let uid = unsafe { libc::geteuid() };
    std::fs::write(
        &cfg,
        format!(
            "[server]\nsocket = \"{}\"\naudit_log = \"{}\"\n[[oidc]]\nissuer = \"{ISS}\"\naudience = \"keybroker\"\njwks_file = \"{}\"\n[keys.k]\nref = \"{}\"\n[[policy]]\ncallers = [\"uid:{uid}\"]\nkeys = [\"k\"]\nimages = [\"reg.test/acme/**\"]\nrequire_annotations = [\"commit\"]\n",
            socket.display(),
            audit.display(),
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
    let hex = "ab".repeat(32);

    // Allowed: a custom predicate, exactly as given, in cosign's statement.
    let r = c
        .attest_image(req(
            "reg.test/acme/api",
            "https://example.com/test/v1",
            r#"{"b":[1,"x"],"a":{"k":true}}"#,
            None,
        ))
        .await
        .expect("allowed")
        .into_inner();
    let key = r.key.unwrap();
    assert_eq!(key.alias, "k");
    let st = open_envelope(&r.envelope, &key.public_key_pem);
    assert_eq!(
        String::from_utf8(r.statement.clone()).unwrap(),
        format!(
            r#"{{"_type":"https://in-toto.io/Statement/v0.1","subject":[{{"name":"reg.test/acme/api","digest":{{"sha256":"{hex}"}}}}],"predicateType":"https://example.com/test/v1","predicate":{{"a":{{"k":true}},"b":[1,"x"]}}}}"#
        )
    );
    assert_eq!(
        st,
        serde_json::from_slice::<serde_json::Value>(&r.statement).unwrap()
    );

    // Denied: an image outside the rule.
    let e = c
        .attest_image(req(
            "reg.test/other/api",
            "https://example.com/test/v1",
            "{}",
            None,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    assert!(e.message().contains("reg.test/other/api"), "{e}");

    // Bad requests: not an object, not JSON, no URI, a bad digest, forged keys.
    for (pt, pred) in [
        ("https://example.com/test/v1", "[1,2]"),
        (SLSA1, "\"a SLSA predicate that is a string\""),
        ("https://example.com/test/v1", "{not json"),
        ("https://example.com/test/v1", ""),
        ("slsaprovenance1", "{}"),
        (
            SLSA1,
            r#"{"runDetails":{"builder":{"version":{"keybroker.dev/builder-id-source":"authenticated:oidc"}}}}"#,
        ),
        (SLSA1, r#"{"runDetails":{"builder":{"id":42}}}"#),
    ] {
        let e = c
            .attest_image(req("reg.test/acme/api", pt, pred, None))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{pt} {pred}: {e}");
    }
    let mut bad_digest = req(
        "reg.test/acme/api",
        "https://example.com/test/v1",
        "{}",
        None,
    );
    bad_digest.get_mut().manifest_digest = "sha256:1234".into();
    let e = c.attest_image(bad_digest).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");

    // SLSA v1 from a local (unix) caller: the claimed builder id stays, marked so.
    let provenance = r#"{"buildDefinition":{"buildType":"https://example.com/build/v1","externalParameters":{"ref":"main"}},"runDetails":{"builder":{"id":"https://ci.example/claimed"},"metadata":{"invocationId":"42"}}}"#;
    let r = c
        .attest_image(req("reg.test/acme/api", SLSA1, provenance, None))
        .await
        .unwrap()
        .into_inner();
    let st = open_envelope(&r.envelope, &r.key.unwrap().public_key_pem);
    let builder = &st["predicate"]["runDetails"]["builder"];
    assert_eq!(builder["id"], "https://ci.example/claimed");
    assert_eq!(
        builder["version"]["keybroker.dev/builder-id-source"],
        "claimed"
    );
    assert_eq!(
        builder["version"]["keybroker.dev/caller"],
        format!("unix:uid={uid},gid={}", unsafe { libc::getegid() }).as_str()
    );
    assert_eq!(
        st["predicate"]["runDetails"]["metadata"]["invocationId"],
        "42"
    );

    // With a verified ID token the builder is the token's identity; the claim is kept.
    let t = token(&jwt_key);
    let r = c
        .attest_image(req("reg.test/acme/api", SLSA1, provenance, Some(&t)))
        .await
        .unwrap()
        .into_inner();
    let st = open_envelope(&r.envelope, &r.key.unwrap().public_key_pem);
    let builder = &st["predicate"]["runDetails"]["builder"];
    assert_eq!(
        builder["id"],
        format!("{ISS}#repo:acme/api:ref:refs/heads/main").as_str()
    );
    assert_eq!(
        builder["version"]["keybroker.dev/builder-id-source"],
        "authenticated:oidc"
    );
    assert_eq!(
        builder["version"]["keybroker.dev/claimed-builder-id"],
        "https://ci.example/claimed"
    );
    assert_eq!(
        st["predicate"]["buildDefinition"]["externalParameters"]["ref"],
        "main"
    );

    // The audit log has every decision, with the caller and the builder decision.
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|r: &serde_json::Value| r["rpc"] == "AttestImage")
        .collect();
    let decisions: Vec<&str> = records
        .iter()
        .map(|r| r["decision"].as_str().unwrap())
        .collect();
    assert_eq!(
        decisions,
        [
            "allowed", "denied", "invalid", "invalid", "invalid", "invalid", "invalid", "invalid",
            "invalid", "invalid", "allowed", "allowed"
        ]
    );
    let last = records.last().unwrap();
    assert_eq!(last["caller"]["uid"], uid);
    assert_eq!(last["oidc"]["iss"], ISS);
    assert_eq!(last["builder_id_source"], "authenticated:oidc");
    assert_eq!(last["claimed_builder_id"], "https://ci.example/claimed");
    assert_eq!(last["predicate_type"], SLSA1);
    assert_eq!(last["image"], "reg.test/acme/api");
    assert_eq!(last["statement_sha256"], hex_sha256(&r.statement).as_str());
}

fn hex_sha256(b: &[u8]) -> String {
    Sha256Digest::of(b)
        .as_bytes()
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

const SPIFFE: &str = "spiffe://example.org/ns/ci/sa/builder";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A caller on the mTLS listener: the builder id is its certificate's URI SAN.
#[tokio::test]
async fn mtls_callers_attest_their_spiffe_id_as_the_builder() {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        SanType,
    };
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};

    let dir = tempfile::tempdir().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let leaf = |dns: &[&str], uri: Option<&str>, usage| {
        let mut p =
            CertificateParams::new(dns.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        if let Some(u) = uri {
            p.subject_alt_names
                .push(SanType::URI(u.try_into().unwrap()));
        }
        p.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        (
            p.signed_by(&key, &issuer).unwrap().pem(),
            key.serialize_pem(),
        )
    };
    let (server_cert, server_key) = leaf(
        &["localhost", "127.0.0.1"],
        None,
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_cert, client_key) = leaf(&[], Some(SPIFFE), ExtendedKeyUsagePurpose::ClientAuth);
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let (_, der) = keybroker_providers::P256Signer::generate().unwrap();
    let key = write(
        "k.pem",
        &keybroker_providers::pem::encode("PRIVATE KEY", &der),
    );
    let port = free_port();
    let cfg = format!(
        "[server]\nsocket = \"{}\"\n[server.tls]\nlisten = \"127.0.0.1:{port}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\nclient_ca_file = \"{}\"\n[keys.k]\nref = \"{key}\"\n[[policy]]\ncallers = [\"x509-uri:{SPIFFE}\"]\nkeys = [\"k\"]\nimages = [\"reg.test/acme/**\"]\n",
        dir.path().join("s.sock").display(),
        write("server.crt", &server_cert),
        write("server.key", &server_key),
        write("ca.crt", &ca_pem),
    );
    let cfg_path = write("d.toml", &cfg);
    let _d = Daemon(
        Command::new(env!("CARGO_BIN_EXE_keybrokerd"))
            .args(["--config", &cfg_path])
            .env_remove("KEYBROKER_SOCKET")
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca_pem))
        .domain_name("localhost")
        .identity(Identity::from_pem(client_cert, client_key));
    let ch = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let r = keybroker_proto::client(ch)
        .attest_image(req(
            "reg.test/acme/api",
            SLSA1,
            r#"{"runDetails":{"builder":{"id":"https://ci.example/claimed"}}}"#,
            None,
        ))
        .await
        .unwrap()
        .into_inner();
    let st = open_envelope(&r.envelope, &r.key.unwrap().public_key_pem);
    let builder = &st["predicate"]["runDetails"]["builder"];
    assert_eq!(builder["id"], SPIFFE);
    assert_eq!(
        builder["version"]["keybroker.dev/builder-id-source"],
        "authenticated:x509"
    );
    assert_eq!(
        builder["version"]["keybroker.dev/claimed-builder-id"],
        "https://ci.example/claimed"
    );
    assert_eq!(
        builder["version"]["keybroker.dev/caller"],
        format!("x509:uri={SPIFFE}").as_str()
    );
}
