//! The audit log end to end: every decision recorded before the answer, the hash
//! chain intact under 16 concurrent signers, edits caught by `keybroker audit
//! verify`, a `kill -9` of the real daemon under load losing no record of a
//! signature a client received, and a failing audit log refusing to sign.

mod common;

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use common::*;
use hyper_util::rt::TokioIo;
use keybroker_proto::v1::{SignImageRequest, SignRequest};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tonic::{transport::Endpoint, Code};

const DIGEST: &str = "sha256:0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f";

fn config(key: &TestKey, audit: &Path, socket: Option<&Path>) -> String {
    let server = match socket {
        Some(s) => format!("socket = \"{}\"\n", s.display()),
        None => String::new(),
    };
    format!(
        "[server]\n{server}audit_log = \"{}\"\n[keys.k]\nref = \"{}\"\n[[policy]]\ncallers = [\"uid:{}\"]\nkeys = [\"k\"]\nimages = [\"registry.test/app/**\"]\n",
        audit.display(),
        key.key_path.display(),
        uid()
    )
}

async fn connect(socket: &Path) -> keybroker_proto::Client {
    let path = socket.to_path_buf();
    let ch = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?))
            }
        }))
        .await
        .expect("connect");
    keybroker_proto::client(ch)
}

fn sign_image(repo: &str, n: usize) -> SignImageRequest {
    SignImageRequest {
        key: "k".into(),
        docker_reference: format!("registry.test/{repo}"),
        manifest_digest: DIGEST.into(),
        annotations: [("n".to_string(), n.to_string())].into(),
        ..Default::default()
    }
}

fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn sha256_hex(b: &[u8]) -> String {
    hex_lower(&Sha256::digest(b))
}

fn hex_lower(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test]
async fn every_decision_is_chained_and_edits_are_caught() {
    let dir = tempfile::tempdir().unwrap();
    let key = write_key(dir.path(), "k");
    let audit = dir.path().join("audit.jsonl");
    let broker = TestBroker::start(&config(&key, &audit, None)).await;

    // 16 concurrent signers, 10 signatures each, plus a denial each.
    let mut tasks = Vec::new();
    for t in 0..16 {
        let socket = broker.socket.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = connect(&socket).await;
            let mut payloads = Vec::new();
            for i in 0..10 {
                let r = c
                    .sign_image(sign_image("app/web", t * 100 + i))
                    .await
                    .expect("allowed")
                    .into_inner();
                payloads.push(sha256_hex(&r.payload));
            }
            let denied = c.sign_image(sign_image("other/db", t)).await.unwrap_err();
            assert_eq!(denied.code(), Code::PermissionDenied);
            payloads
        }));
    }
    let mut received = HashSet::new();
    for t in tasks {
        received.extend(t.await.unwrap());
    }
    // A raw Sign the policy does not allow, and an unknown key.
    let mut c = connect(&broker.socket).await;
    let e = c
        .sign(SignRequest {
            key: "k".into(),
            digest: vec![7; 32],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = c
        .sign_image(SignImageRequest {
            key: "nope".into(),
            ..sign_image("app/web", 0)
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    let recs = records(&audit);
    assert_eq!(recs.len(), 160 + 16 + 2);
    let allowed: HashSet<String> = recs
        .iter()
        .filter(|r| r["decision"] == "allowed")
        .map(|r| r["payload_sha256"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(allowed, received, "a received signature without its record");
    let first = recs.iter().find(|r| r["decision"] == "allowed").unwrap();
    assert_eq!(first["rpc"], "SignImage");
    assert_eq!(first["caller"]["uid"], uid());
    assert_eq!(first["key"], "k");
    assert!(
        first["key_id"].as_str().unwrap().ends_with("k.key"),
        "{first}"
    );
    assert_eq!(first["digest"], DIGEST);
    assert!(first["annotations"]["n"].is_string());
    assert!(first["time"].as_str().unwrap().ends_with('Z'));
    let denied = recs
        .iter()
        .filter(|r| r["decision"] == "denied")
        .collect::<Vec<_>>();
    assert_eq!(denied.len(), 18);
    assert!(denied.iter().any(|r| r["image"] == "registry.test/other/db"
        && r["reason"].as_str().unwrap().contains("policy")));
    assert!(denied.iter().any(|r| r["rpc"] == "Sign"));
    assert!(denied.iter().any(|r| r["key"] == "nope"));

    // keybroker audit verify: ok, then an edited line and a removed line are caught.
    let out = keybroker(
        &broker.socket,
        &["audit", "verify", audit.to_str().unwrap()],
        &[],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("ok: 178 records"),
        "{}",
        stdout(&out)
    );
    let text = std::fs::read_to_string(&audit).unwrap();
    let edited = dir.path().join("edited.jsonl");
    std::fs::write(&edited, text.replacen("\"denied\"", "\"allowed\"", 1)).unwrap();
    let out = keybroker(
        &broker.socket,
        &["audit", "verify", edited.to_str().unwrap()],
        &[],
    )
    .await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("chain broken"), "{}", stderr(&out));
    let mut lines: Vec<&str> = text.lines().collect();
    lines.remove(40);
    let cut = dir.path().join("cut.jsonl");
    std::fs::write(&cut, lines.join("\n") + "\n").unwrap();
    let out = keybroker(
        &broker.socket,
        &["audit", "verify", cut.to_str().unwrap()],
        &[],
    )
    .await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("cut.jsonl:41: chain broken"),
        "{}",
        stderr(&out)
    );
}

fn keybrokerd() -> PathBuf {
    // Built by `cargo build --workspace` next to this crate's binaries.
    let p = PathBuf::from(env!("CARGO_BIN_EXE_keybroker")).with_file_name("keybrokerd");
    assert!(
        p.exists(),
        "{} missing: cargo build --workspace first",
        p.display()
    );
    p
}

async fn wait_for(socket: &Path) {
    for _ in 0..500 {
        if tokio::net::UnixStream::connect(socket).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("keybrokerd did not serve on {}", socket.display());
}

#[tokio::test]
async fn kill_9_under_load_loses_no_record_and_the_chain_continues() {
    let dir = tempfile::tempdir().unwrap();
    let key = write_key(dir.path(), "k");
    let audit = dir.path().join("audit.jsonl");
    let socket = dir.path().join("d.sock");
    let cfg = dir.path().join("d.toml");
    std::fs::write(&cfg, config(&key, &audit, Some(&socket))).unwrap();
    let spawn = || {
        std::process::Command::new(keybrokerd())
            .arg("--config")
            .arg(&cfg)
            .env_remove("KEYBROKER_SOCKET")
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut daemon = spawn();
    wait_for(&socket).await;

    // 8 signers in a loop, bounded to 2,000 requests each; the daemon is killed
    // mid-stream, once 50 signatures have come back (at most 30 s: a slow CI
    // disk makes every fsync slow).
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for t in 0..8 {
        let socket = socket.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = connect(&socket).await;
            let mut got = Vec::new();
            for i in 0..2000 {
                match c.sign_image(sign_image("app/web", t * 10_000 + i)).await {
                    Ok(r) => {
                        got.push(sha256_hex(&r.into_inner().payload));
                        done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(_) => break,
                }
            }
            got
        }));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while done.load(std::sync::atomic::Ordering::Relaxed) < 50
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    daemon.kill().unwrap(); // SIGKILL, while the signers are still going
    daemon.wait().unwrap();
    let mut received = Vec::new();
    for t in tasks {
        received.extend(t.await.unwrap());
    }
    assert!(!received.is_empty(), "no signature before the kill");
    let allowed: HashSet<String> = records(&audit)
        .iter()
        .map(|r| r["payload_sha256"].as_str().unwrap_or_default().to_string())
        .collect();
    for p in &received {
        assert!(
            allowed.contains(p),
            "signature {p} was received but has no audit record"
        );
    }
    let summary = keybroker_client::audit::verify_files(&[&audit]).expect("chain after kill -9");
    assert!(summary.records >= received.len());

    // Restart on the stale socket and the same log: the chain continues.
    let mut daemon = spawn();
    wait_for(&socket).await;
    let mut c = connect(&socket).await;
    c.sign_image(sign_image("app/web", 1))
        .await
        .expect("sign after restart");
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    let after = keybroker_client::audit::verify_files(&[&audit]).expect("chain across the restart");
    assert_eq!(after.records, summary.records + 1);
}

#[tokio::test]
async fn an_unwritable_audit_log_means_no_signature() {
    // /dev/full fails every write with ENOSPC: a full disk.
    if !Path::new("/dev/full").exists() {
        eprintln!("SKIPPED: no /dev/full");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = write_key(dir.path(), "k");
    let broker = TestBroker::start(&config(&key, Path::new("/dev/full"), None)).await;
    let mut c = connect(&broker.socket).await;
    let e = c.sign_image(sign_image("app/web", 1)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    assert!(e.message().contains("audit log"), "{e}");
    assert!(e.message().contains("no signature"), "{e}");
    // A denial is still a denial.
    let e = c.sign_image(sign_image("other/x", 1)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn rate_limits_answer_resource_exhausted_and_are_audited() {
    let dir = tempfile::tempdir().unwrap();
    let key = write_key(dir.path(), "k");
    let audit = dir.path().join("audit.jsonl");
    // 3 at once, then one every 10 s: the fourth request in a row is refused.
    let cfg = format!(
        "{}[limits]\nper_caller = {{ per_second = 0.1, burst = 3 }}\n",
        config(&key, &audit, None)
    );
    let broker = TestBroker::start(&cfg).await;
    let mut c = connect(&broker.socket).await;
    for i in 0..3 {
        c.sign_image(sign_image("app/web", i))
            .await
            .expect("within the burst");
    }
    let e = c.sign_image(sign_image("app/web", 3)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert!(e.message().contains("retry in"), "{e}");
    let recs = records(&audit);
    assert_eq!(recs.len(), 4);
    assert_eq!(recs[3]["decision"], "rate_limited");
    // A denial by policy does not spend the caller's tokens, and is still a denial.
    let e = c.sign_image(sign_image("other/x", 4)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
}
