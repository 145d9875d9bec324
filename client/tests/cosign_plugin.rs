//! `sigstore-kms-keybroker` driven exactly as sigstore's cliplugin client
//! (`pkg/signature/kms/cliplugin/signer.go`) drives it: argv `v1 ARGS-JSON`,
//! `PluginArgs` as Go's encoding/json writes them, the message on stdin, one
//! `PluginResp` read from stdout. Every method and every signMessage shape
//! (cosign 2: message only; cosign 3: message + digest; crypto signer: digest
//! only) against an in-process broker; signatures verified independently with
//! the key's PEM; policy refusals, a stopped and a hung broker, bad versions
//! and bad JSON all come back as `errorMessage`.

mod common;

use std::{
    path::Path,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use base64::{engine::general_purpose::STANDARD, Engine};
use common::*;
use keybroker_providers::{ecdsa::verify_digest, Sha256Digest};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

const PLUGIN: &str = env!("CARGO_BIN_EXE_sigstore-kms-keybroker");
const HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

struct Out {
    resp: Value,
    status: std::process::ExitStatus,
    took: Duration,
}

impl Out {
    fn error(&self) -> &str {
        self.resp["errorMessage"].as_str().unwrap_or_else(|| {
            panic!("expected an errorMessage, got {}", self.resp);
        })
    }
    fn ok(&self) -> &Value {
        assert!(
            self.resp.get("errorMessage").is_none(),
            "plugin failed: {}",
            self.resp
        );
        assert!(self.status.success());
        &self.resp
    }
    fn signature(&self) -> Vec<u8> {
        STANDARD
            .decode(self.ok()["signMessage"]["signature"].as_str().unwrap())
            .unwrap()
    }
}

/// Runs the plugin as cosign does: `sigstore-kms-keybroker v1 JSON`, stdin.
async fn plugin_argv(socket: &Path, argv: &[&str], stdin: &[u8]) -> Out {
    let started = Instant::now();
    let mut child = tokio::process::Command::new(PLUGIN)
        .args(argv)
        .env("KEYBROKER_SOCKET", socket)
        .env_remove("KEYBROKER_URL")
        .env_remove("KEYBROKER_ID_TOKEN")
        .env_remove("KEYBROKER_ID_TOKEN_FILE")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the plugin");
    let mut pipe = child.stdin.take().unwrap();
    // A plugin that refuses its arguments exits without reading stdin: a
    // broken pipe here is that, and its reply is checked below.
    match pipe.write_all(stdin).await {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => panic!("write stdin: {e}"),
        _ => {}
    }
    drop(pipe);
    let out = child.wait_with_output().await.unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    // Exactly one JSON document on stdout.
    assert_eq!(text.lines().count(), 1, "stdout: {text:?}");
    let resp: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    assert!(resp.is_object());
    Out {
        resp,
        status: out.status,
        took: started.elapsed(),
    }
}

async fn plugin(socket: &Path, args: &Value, stdin: &[u8]) -> Out {
    plugin_argv(socket, &["v1", &args.to_string()], stdin).await
}

/// `initOptions` as `cliplugin.LoadSignerVerifier` packs them: the key
/// resource id is the part after `keybroker://`; rpcOptions carry an empty
/// keyVersion and remoteVerification false; ctxDeadline only when there is one.
fn init(alias: &str, deadline: Option<&str>) -> Value {
    let mut v = json!({
        "protocolVersion": "v1",
        "keyResourceID": alias,
        "hashFunc": 5,
        "rpcOptions": {"keyVersion": "", "remoteVerification": false},
    });
    if let Some(d) = deadline {
        v["ctxDeadline"] = json!(d);
    }
    v
}

fn rpc() -> Value {
    json!({"keyVersion": "", "remoteVerification": false})
}

/// signMessage args. `digest`: None → `"digest":null` (PackMessageOptions
/// always sends the pointer), `hash` → `"hashFunc"`.
fn sign_args(alias: &str, digest: Option<&[u8]>, hash: Option<u64>) -> Value {
    let mut mo = json!({"digest": digest.map(|d| STANDARD.encode(d))});
    if let Some(h) = hash {
        mo["hashFunc"] = json!(h);
    }
    json!({
        "initOptions": init(alias, None),
        "methodName": "signMessage",
        "signMessage": {"signOptions": {"rpcOptions": rpc(), "messageOptions": mo}},
    })
}

fn verify_args(alias: &str, sig: &[u8], digest: Option<&[u8]>) -> Value {
    json!({
        "initOptions": init(alias, None),
        "methodName": "verifySignature",
        "verifySignature": {
            "signature": STANDARD.encode(sig),
            "verifyOptions": {"rpcOptions": rpc(), "messageOptions": {"digest": digest.map(|d| STANDARD.encode(d))}},
        },
    })
}

fn simple(image: &str) -> Vec<u8> {
    format!(
        r#"{{"critical":{{"identity":{{"docker-reference":"{image}"}},"image":{{"docker-manifest-digest":"sha256:{HEX}"}},"type":"cosign container image signature"}},"optional":null}}"#
    )
    .into_bytes()
}

fn in_toto_pae(image: &str) -> Vec<u8> {
    let body = format!(
        r#"{{"_type":"https://in-toto.io/Statement/v0.1","subject":[{{"name":"{image}","digest":{{"sha256":"{HEX}"}}}}],"predicateType":"https://cosign.sigstore.dev/attestation/v1","predicate":{{"Data":"x","Timestamp":"2025-01-01T00:00:00Z"}}}}"#
    );
    let t = "application/vnd.in-toto+json";
    format!("DSSEv1 {} {t} {} {body}", t.len(), body.len()).into_bytes()
}

fn rfc3339_in(d: Duration) -> String {
    // As Go marshals a time.Time with a zone offset and nanoseconds.
    let t = SystemTime::now() + d;
    let s = t.duration_since(UNIX_EPOCH).unwrap();
    let secs = s.as_secs() as i64 + 2 * 3600; // shown at +02:00
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // civil_from_days
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:09}+02:00",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        s.subsec_nanos()
    )
}

#[tokio::test]
async fn stock_cosign_protocol_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let key = write_key(dir.path(), "release");
    let uid = unsafe { libc::geteuid() };
    let k = key.key_path.display();
    let broker = TestBroker::start(&format!(
        "[keys.release]\nref = \"{k}\"\n[keys.raw]\nref = \"{k}\"\n[keys.denied]\nref = \"{k}\"\n\
         [[policy]]\ncallers = [\"uid:{uid}\"]\nkeys = [\"release\"]\nimages = [\"reg.test/acme/**\"]\n\
         [[policy]]\ncallers = [\"uid:{uid}\"]\nkeys = [\"raw\"]\nimages = [\"**\"]\nallow_raw_digest = true\n"
    ))
    .await;
    let s = broker.socket.as_path();
    let pem = key.public_pem.as_str();

    // defaultAlgorithm / supportedAlgorithms.
    let out = plugin(
        s,
        &json!({"initOptions": init("release", None), "methodName": "defaultAlgorithm", "defaultAlgorithm": {}}),
        b"",
    )
    .await;
    assert_eq!(
        out.ok()["defaultAlgorithm"]["defaultAlgorithm"],
        "ecdsa-p256-sha256"
    );
    let out = plugin(
        s,
        &json!({"initOptions": init("release", None), "methodName": "supportedAlgorithms", "supportedAlgorithms": {}}),
        b"",
    )
    .await;
    assert_eq!(
        out.ok()["supportedAlgorithms"]["supportedAlgorithms"],
        json!(["ecdsa-p256-sha256"])
    );

    // publicKey: base64 of the PEM text.
    let out = plugin(
        s,
        &json!({"initOptions": init("release", None), "methodName": "publicKey",
                "publicKey": {"publicKeyOptions": {"rpcOptions": rpc()}}}),
        b"",
    )
    .await;
    let got = STANDARD
        .decode(out.ok()["publicKey"]["publicKeyPEM"].as_str().unwrap())
        .unwrap();
    assert_eq!(String::from_utf8(got).unwrap().trim(), pem.trim());

    // signMessage, cosign 2: the payload on stdin, digest null.
    let payload = simple("reg.test/acme/api");
    let out = plugin(s, &sign_args("release", None, None), &payload).await;
    let sig = out.signature();
    verify_digest(pem, &Sha256Digest::of(&payload), &sig).expect("cosign 2 shape verifies");

    // cosign 3: payload plus its SHA-256 in messageOptions.digest.
    let d = Sha256Digest::of(&payload);
    let out = plugin(
        s,
        &sign_args("release", Some(d.as_bytes()), Some(5)),
        &payload,
    )
    .await;
    verify_digest(pem, &d, &out.signature()).expect("cosign 3 shape verifies");
    let wrong = Sha256Digest::of(b"something else");
    let out = plugin(
        s,
        &sign_args("release", Some(wrong.as_bytes()), Some(5)),
        &payload,
    )
    .await;
    assert!(out.error().contains("not the SHA-256"), "{}", out.resp);

    // An attestation's PAE (what cosign attest signs) passes image policy.
    let pae = in_toto_pae("reg.test/acme/api");
    let out = plugin(s, &sign_args("release", None, None), &pae).await;
    verify_digest(pem, &Sha256Digest::of(&pae), &out.signature()).unwrap();

    // The crypto-signer path: empty stdin, digest + hashFunc. Raw signing:
    // refused for "release", allowed for "raw".
    let digest = Sha256Digest::of(b"blob");
    let out = plugin(
        s,
        &sign_args("release", Some(digest.as_bytes()), Some(5)),
        b"",
    )
    .await;
    assert!(out.error().contains("allow_raw_digest"), "{}", out.resp);
    let out = plugin(s, &sign_args("raw", Some(digest.as_bytes()), Some(5)), b"").await;
    verify_digest(pem, &digest, &out.signature()).expect("crypto-signer shape verifies");
    // Other hash functions are refused (crypto.SHA512 = 7), 0 means SHA-256.
    let out = plugin(s, &sign_args("raw", Some(&[0; 64]), Some(7)), b"").await;
    assert!(out.error().contains("SHA-256"), "{}", out.resp);
    let mut args = sign_args("raw", Some(digest.as_bytes()), Some(0));
    args["initOptions"]["hashFunc"] = json!(0);
    plugin(s, &args, b"").await.ok();
    let mut args = sign_args("raw", Some(digest.as_bytes()), None);
    args["initOptions"]["hashFunc"] = json!(3);
    assert!(plugin(s, &args, b"").await.error().contains("SHA-256"));

    // Policy still applies: another image, a key with no rule, an unknown key,
    // an unparseable message on a key without raw signing.
    let out = plugin(
        s,
        &sign_args("release", None, None),
        &simple("reg.test/evil/x"),
    )
    .await;
    assert!(out.error().contains("reg.test/evil/x"), "{}", out.resp);
    assert!(!out.status.success());
    let out = plugin(s, &sign_args("denied", None, None), &payload).await;
    assert!(out.error().contains("policy"), "{}", out.resp);
    let out = plugin(s, &sign_args("nope", None, None), &payload).await;
    assert!(out.error().contains("nope"), "{}", out.resp);
    let out = plugin(s, &sign_args("release", None, None), b"just some bytes").await;
    assert!(out.error().contains("raw signing"), "{}", out.resp);
    // A blob over 1 MiB is signed as its digest (raw).
    let blob = vec![7u8; (1 << 20) + 10];
    let out = plugin(s, &sign_args("raw", None, None), &blob).await;
    verify_digest(pem, &Sha256Digest::of(&blob), &out.signature()).unwrap();

    // verifySignature: really verifies.
    let sig = plugin(s, &sign_args("release", None, None), &payload)
        .await
        .signature();
    let out = plugin(s, &verify_args("release", &sig, None), &payload).await;
    assert_eq!(out.ok()["verifySignature"], json!({}));
    let out = plugin(
        s,
        &verify_args("release", &sig, Some(d.as_bytes())),
        &payload,
    )
    .await;
    out.ok();
    let out = plugin(s, &verify_args("release", &sig, Some(d.as_bytes())), b"").await;
    out.ok();
    let mut tampered = payload.clone();
    tampered[20] ^= 1;
    let out = plugin(s, &verify_args("release", &sig, None), &tampered).await;
    assert!(out.error().contains("does not verify"), "{}", out.resp);
    let out = plugin(s, &verify_args("release", b"\x30\x00", None), &payload).await;
    out.error();

    // createKey: refused, pointing to generate-key-pair.
    let out = plugin(
        s,
        &json!({"initOptions": init("new", None), "methodName": "createKey",
                "createKey": {"algorithm": "ecdsa-p256-sha256"}}),
        b"",
    )
    .await;
    assert!(out.error().contains("generate-key-pair"), "{}", out.resp);

    // Field names are matched as Go does, case-insensitively.
    let out = plugin(
        s,
        &json!({"InitOptions": {"ProtocolVersion": "v1", "KEYRESOURCEID": "release", "hashfunc": 5},
                "METHODNAME": "publicKey", "publickey": {}}),
        b"",
    )
    .await;
    out.ok();

    // Protocol version and JSON errors.
    let out = plugin_argv(s, &["v2", r#"{"methodName":"defaultAlgorithm"}"#], b"").await;
    assert!(out.error().contains("v2"), "{}", out.resp);
    let mut bad_init = json!({"initOptions": init("release", None), "methodName": "publicKey"});
    bad_init["initOptions"]["protocolVersion"] = json!("v9");
    assert!(plugin(s, &bad_init, b"").await.error().contains("v9"));
    let out = plugin_argv(s, &["v1", "{not json"], b"").await;
    assert!(out.error().contains("not JSON"), "{}", out.resp);
    let out = plugin_argv(s, &["v1"], b"").await;
    out.error();
    let out = plugin(
        s,
        &json!({"initOptions": init("release", None), "methodName": "bogus"}),
        b"",
    )
    .await;
    assert!(out.error().contains("bogus"));

    // A stopped broker: an errorMessage at once; the algorithm methods still answer.
    let gone = dir.path().join("no-broker.sock");
    let out = plugin(&gone, &sign_args("release", None, None), &payload).await;
    assert!(out.error().contains("not reachable"), "{}", out.resp);
    assert!(out.took < Duration::from_secs(5), "{:?}", out.took);
    let out = plugin(
        &gone,
        &json!({"initOptions": init("release", None), "methodName": "defaultAlgorithm", "defaultAlgorithm": {}}),
        b"",
    )
    .await;
    out.ok();

    // A hung broker (accepts, never answers): errorMessage within cosign's
    // deadline (given with an offset and nanoseconds, as Go writes it).
    let hung = dir.path().join("hung.sock");
    let listener = tokio::net::UnixListener::bind(&hung).unwrap();
    let hold = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = listener.accept().await {
            conns.push(c);
        }
    });
    let deadline = rfc3339_in(Duration::from_millis(1500));
    let mut args = sign_args("release", None, None);
    args["initOptions"]["ctxDeadline"] = json!(deadline);
    args["signMessage"]["signOptions"]["rpcOptions"]["ctxDeadline"] = json!(deadline);
    let out = plugin(&hung, &args, &payload).await;
    assert!(out.error().contains("deadline"), "{}", out.resp);
    assert!(
        out.took < Duration::from_millis(1500),
        "answered after the deadline: {:?}",
        out.took
    );
    assert!(out.took > Duration::from_millis(900), "{:?}", out.took);
    // A deadline already past.
    let mut args = sign_args("release", None, None);
    args["initOptions"]["ctxDeadline"] = json!("2020-01-01T00:00:00Z");
    assert!(plugin(&hung, &args, &payload)
        .await
        .error()
        .contains("passed"));
    hold.abort();
}
