//! RFC 3161 timestamps from keybrokerd against a real TSA (tests/tsa/tsa_server.py:
//! `openssl ts -reply` with its own CA, started by scripts/tsa.sh): a
//! sigstore-bundle SignImage and an AttestImage with `timestamp` carry the
//! TSA's TimeStampResp over their signature, which `openssl ts -verify` accepts; every way the TSA
//! can fail (HTTP 500, garbage, a refusal, a token over another imprint or
//! nonce, another TSA's token, no answer in time) makes the call UNAVAILABLE
//! with no signature, and the audit line says why; without `[timestamp]` the
//! field stays empty.

mod common;

use common::{client, test_env, Daemon};

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use keybroker_proto::v1::{AttestImageRequest, SignImageRequest};
use tonic::{Code, Request};

/// The TSA's failure queue is shared, so the tests that use it take turns.
static TSA: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Env {
    url: String,
    chain: PathBuf,
}

fn tsa_env() -> Option<Env> {
    Some(Env {
        url: test_env("KEYBROKER_TEST_TSA_URL")?,
        chain: test_env("KEYBROKER_TEST_TSA_CHAIN")?.into(),
    })
}

/// A daemon with one file key, everything allowed to us, an audit log, and
/// `timestamp` as its `[timestamp]` section (if any).
struct Broker {
    daemon: Daemon,
    socket: PathBuf,
    audit: PathBuf,
    config: PathBuf,
    base: String,
}

impl Broker {
    /// Rewrites the config with `timestamp` as its `[timestamp]` section and
    /// sends SIGHUP.
    fn reload(&self, timestamp: Option<&str>) {
        std::fs::write(
            &self.config,
            format!("{}{}", self.base, timestamp.unwrap_or("")),
        )
        .unwrap();
        unsafe { libc::kill(self.daemon.0.id() as i32, libc::SIGHUP) };
    }
}

fn start(dir: &Path, timestamp: Option<String>) -> Broker {
    let key = dir.join("k.pem");
    let (_, der) = keybroker_providers::P256Signer::generate().unwrap();
    std::fs::write(&key, keybroker_providers::pem::encode("PRIVATE KEY", &der)).unwrap();
    let socket = dir.join("b.sock");
    let audit = dir.join("audit.jsonl");
    let uid = unsafe { libc::geteuid() };
    let base = format!(
        "[server]\nsocket = \"{}\"\naudit_log = \"{}\"\n[keys.k]\nref = \"{}\"\n\
         [[policy]]\ncallers = [\"uid:{uid}\"]\nkeys = [\"k\"]\nimages = [\"**\"]\n",
        socket.display(),
        audit.display(),
        key.display()
    );
    let config = dir.join("b.toml");
    std::fs::write(&config, format!("{base}{}", timestamp.unwrap_or_default())).unwrap();
    let daemon = Daemon(
        Command::new(env!("CARGO_BIN_EXE_keybrokerd"))
            .arg("--config")
            .arg(&config)
            .env_remove("KEYBROKER_SOCKET")
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    Broker {
        daemon,
        socket,
        audit,
        config,
        base,
    }
}

fn tsa_section(env: &Env, timeout_secs: u64) -> String {
    format!(
        "[timestamp]\nurl = \"{}\"\nca_chain = \"{}\"\ntimeout_secs = {timeout_secs}\n",
        env.url,
        env.chain.display()
    )
}

fn sign_req(format: &str) -> Request<SignImageRequest> {
    Request::new(SignImageRequest {
        key: "k".into(),
        docker_reference: "reg.test/acme/api".into(),
        manifest_digest: format!("sha256:{}", "cd".repeat(32)),
        format: format.into(),
        ..Default::default()
    })
}

fn attest_req(timestamp: bool) -> Request<AttestImageRequest> {
    Request::new(AttestImageRequest {
        key: "k".into(),
        docker_reference: "reg.test/acme/api".into(),
        manifest_digest: format!("sha256:{}", "cd".repeat(32)),
        predicate_type: "https://example.com/test/v1".into(),
        predicate: br#"{"ok":true}"#.to_vec(),
        timestamp,
    })
}

/// `openssl ts -verify` of the TimeStampResp `response` over `signature`,
/// with the chain's root as the only trusted CA and its first certificate as
/// the TSA's.
fn openssl_verify(
    dir: &Path,
    chain: &Path,
    signature: &[u8],
    response: &[u8],
) -> Result<(), String> {
    let pem = std::fs::read_to_string(chain).unwrap();
    let blocks: Vec<&str> = pem
        .split_inclusive("-----END CERTIFICATE-----")
        .filter(|b| b.contains("BEGIN CERTIFICATE"))
        .collect();
    assert!(blocks.len() >= 2, "the test TSA's chain is leaf then root");
    std::fs::write(dir.join("leaf.pem"), blocks[0]).unwrap();
    std::fs::write(dir.join("root.pem"), blocks[blocks.len() - 1]).unwrap();
    std::fs::write(dir.join("sig.bin"), signature).unwrap();
    std::fs::write(dir.join("response.der"), response).unwrap();
    let out = Command::new("openssl")
        .args(["ts", "-verify", "-data", "sig.bin", "-in", "response.der"])
        .args(["-CAfile", "root.pem", "-untrusted", "leaf.pem"])
        .current_dir(dir)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn audit_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

async fn fail_next(env: &Env, mode: &str, delay: u64) {
    let r = reqwest::Client::new()
        .post(format!("{}control/fail-next", env.url))
        .body(serde_json::json!({"mode": mode, "count": 1, "delay": delay}).to_string())
        .send()
        .await
        .unwrap();
    assert!(
        r.status().is_success(),
        "control/fail-next {mode}: {}",
        r.status()
    );
}

#[tokio::test]
async fn bundle_signatures_and_attestations_carry_a_timestamp_openssl_verifies() {
    let Some(env) = tsa_env() else { return };
    let _turn = TSA.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let b = start(dir.path(), Some(tsa_section(&env, 10)));
    let mut c = client(&b.socket).await;

    let r = c
        .sign_image(sign_req("sigstore-bundle"))
        .await
        .unwrap()
        .into_inner();
    assert!(
        !r.timestamp.is_empty(),
        "a bundle signature gets a timestamp"
    );
    openssl_verify(dir.path(), &env.chain, &r.signature, &r.timestamp).unwrap();
    // The timestamp is over this signature and no other.
    let mut other = r.signature.clone();
    other[10] ^= 1;
    let err = openssl_verify(dir.path(), &env.chain, &other, &r.timestamp).unwrap_err();
    assert!(err.contains("message imprint mismatch"), "{err}");

    // cosign's classic .sig format has no place for one: none is asked for.
    let r = c.sign_image(sign_req("")).await.unwrap().into_inner();
    assert!(r.timestamp.is_empty());

    let a = c.attest_image(attest_req(true)).await.unwrap().into_inner();
    assert!(!a.timestamp.is_empty());
    let env_json: serde_json::Value = serde_json::from_slice(&a.envelope).unwrap();
    use base64::Engine;
    let sig = base64::engine::general_purpose::STANDARD
        .decode(env_json["signatures"][0]["sig"].as_str().unwrap())
        .unwrap();
    openssl_verify(dir.path(), &env.chain, &sig, &a.timestamp).unwrap();
    let a = c
        .attest_image(attest_req(false))
        .await
        .unwrap()
        .into_inner();
    assert!(a.timestamp.is_empty(), "not asked for, not obtained");

    let lines = audit_lines(&b.audit);
    assert_eq!(lines.len(), 4, "{lines:?}");
    for (i, stamped) in [(0, true), (1, false), (2, true), (3, false)] {
        assert_eq!(lines[i]["decision"], "allowed");
        let t = &lines[i]["timestamp"];
        if stamped {
            assert_eq!(t["tsa"], env.url.as_str(), "{t}");
            assert!(t["gen_time"].as_str().unwrap().ends_with('Z'), "{t}");
            assert!(!t["serial"].as_str().unwrap().is_empty(), "{t}");
        } else {
            assert!(t.is_null(), "{t}");
        }
    }
}

#[tokio::test]
async fn a_failing_tsa_means_no_signature() {
    let Some(env) = tsa_env() else { return };
    let _turn = TSA.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let b = start(dir.path(), Some(tsa_section(&env, 2)));
    let mut c = client(&b.socket).await;

    let cases: &[(&str, &str)] = &[
        ("http500", "HTTP 500"),
        ("garbage", "not a TimeStampResp"),
        ("rejection", "the TSA refused: rejection"),
        (
            "wrong-imprint",
            "message imprint is not the SHA-256 of this signature",
        ),
        ("wrong-nonce", "nonce is not the one we sent"),
        ("untrusted", "not signed by the TSA certificate in ca_chain"),
        ("slow", "no answer within 2 s"),
    ];
    for (i, (mode, why)) in cases.iter().enumerate() {
        fail_next(&env, mode, 4).await;
        let s = if i % 2 == 0 {
            c.sign_image(sign_req("sigstore-bundle")).await.unwrap_err()
        } else {
            c.attest_image(attest_req(true)).await.unwrap_err()
        };
        assert_eq!(s.code(), Code::Unavailable, "{mode}: {s:?}");
        let m = s.message();
        assert!(
            m.starts_with(&format!("timestamp authority {}: ", env.url)),
            "{mode}: {m}"
        );
        assert!(m.contains(why), "{mode}: {m}");
        assert!(m.ends_with("; no signature handed out"), "{mode}: {m}");
        let lines = audit_lines(&b.audit);
        let last = lines.last().unwrap();
        assert_eq!(last["decision"], "failed", "{mode}: {last}");
        assert!(
            last["reason"].as_str().unwrap().contains(why),
            "{mode}: {last}"
        );
        assert!(
            last["timestamp"]["error"].as_str().unwrap().contains(why),
            "{mode}: {last}"
        );
        assert_eq!(lines.len(), i + 1);
    }
    // The TSA answering again: signatures again.
    let r = c
        .sign_image(sign_req("sigstore-bundle"))
        .await
        .unwrap()
        .into_inner();
    openssl_verify(dir.path(), &env.chain, &r.signature, &r.timestamp).unwrap();
}

#[tokio::test]
async fn sighup_adds_and_removes_the_tsa() {
    let Some(env) = tsa_env() else { return };
    let _turn = TSA.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let b = start(dir.path(), None);
    let mut c = client(&b.socket).await;
    let stamped = |r: keybroker_proto::v1::SignImageResponse| !r.timestamp.is_empty();
    assert!(!stamped(
        c.sign_image(sign_req("sigstore-bundle"))
            .await
            .unwrap()
            .into_inner()
    ));
    for want in [true, false, true] {
        b.reload(want.then(|| tsa_section(&env, 10)).as_deref());
        let mut got = !want;
        for _ in 0..100 {
            got = stamped(
                c.sign_image(sign_req("sigstore-bundle"))
                    .await
                    .unwrap()
                    .into_inner(),
            );
            if got == want {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert_eq!(
            got,
            want,
            "after a reload with{} [timestamp]",
            if want { "" } else { "out" }
        );
    }
    // A reload whose ca_chain cannot be read is refused; the TSA stays.
    let bad = format!(
        "[timestamp]\nurl = \"{}\"\nca_chain = \"{}\"\n",
        env.url,
        dir.path().join("missing.pem").display()
    );
    b.reload(Some(&bad));
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(stamped(
        c.sign_image(sign_req("sigstore-bundle"))
            .await
            .unwrap()
            .into_inner()
    ));
}

#[tokio::test]
async fn without_a_tsa_the_field_stays_empty() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(dir.path(), None);
    let mut c = client(&b.socket).await;
    let r = c
        .sign_image(sign_req("sigstore-bundle"))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.signature.is_empty() && r.timestamp.is_empty());
    let a = c.attest_image(attest_req(true)).await.unwrap().into_inner();
    assert!(!a.envelope.is_empty() && a.timestamp.is_empty());
    for l in audit_lines(&b.audit) {
        assert!(l["timestamp"].is_null(), "{l}");
    }
}

#[test]
fn a_bad_timestamp_section_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let check = |section: &str| {
        let path = dir.path().join("c.toml");
        std::fs::write(&path, section).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_keybrokerd"))
            .arg("--check-config")
            .arg(&path)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{section}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let missing = dir.path().join("missing.pem");
    let err = check(&format!(
        "[timestamp]\nurl = \"http://127.0.0.1:9/\"\nca_chain = \"{}\"\n",
        missing.display()
    ));
    assert!(
        err.contains("ca_chain") && err.contains("missing.pem"),
        "{err}"
    );
    let err = check("[timestamp]\nurl = \"http://tsa.example.com/\"\nca_chain = \"/x.pem\"\n");
    assert!(err.contains("https://"), "{err}");
}
