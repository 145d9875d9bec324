//! Sigstore bundles (v0.1–v0.3, DSSE content) as cosign v3 stores them and the
//! client reads them (`client/src/bundle.rs`).
//!
//! Properties: a bundle this target did not sign never verifies; the parsed
//! envelope is DSSE JSON; re-signed with the target's key and rebuilt, a
//! bundle parses back to the same timestamps and predicate type with this
//! key's hint, and verifies for a subject digest exactly when its payload is
//! an in-toto statement naming that digest.
#![no_main]

use std::sync::OnceLock;

use base64::{
    engine::general_purpose::{STANDARD, URL_SAFE},
    Engine,
};
use keybroker_client::{
    bundle::{build, key_hint, parse, verify},
    cosign::attestation::{pae, IN_TOTO_PAYLOAD_TYPE, STATEMENT_V01, STATEMENT_V1},
};
use keybroker_providers::{ecdsa::P256Signer, Sha256Digest};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

fn signer() -> &'static P256Signer {
    static SIGNER: OnceLock<P256Signer> = OnceLock::new();
    SIGNER.get_or_init(|| P256Signer::generate().expect("key").0)
}

const ANY_DIGEST: &str = "sha256:948d31e853ab05325d6108c74d12d39a631c5b24a60386189acf8a4a1b4134ac";

fuzz_target!(|data: &[u8]| {
    let pem = signer().public_key_pem();
    assert!(
        verify(data, pem, ANY_DIGEST).is_err(),
        "a forged bundle verified"
    );
    let Ok(parsed) = parse(data) else {
        return;
    };
    let env: Value = serde_json::from_slice(&parsed.envelope).expect("parsed envelope is JSON");
    assert!(env.get("payloadType").is_some() && env.get("signatures").is_some());
    let (Some(payload_type), Some(payload)) = (
        env.get("payloadType").and_then(Value::as_str),
        env.get("payload")
            .and_then(Value::as_str)
            .and_then(|s| STANDARD.decode(s).or_else(|_| URL_SAFE.decode(s)).ok()),
    ) else {
        return;
    };
    // Re-sign the same payload with our key and rebuild the bundle.
    let sig = signer()
        .sign_digest(&Sha256Digest::of(&pae(payload_type, &payload)))
        .expect("sign");
    let ours = json!({
        "payloadType": payload_type,
        "payload": env["payload"],
        "signatures": [{ "sig": STANDARD.encode(&sig) }],
    });
    let ours = serde_json::to_vec(&ours).expect("JSON");
    let rebuilt = build(&ours, pem, &parsed.timestamps).expect("a bundle for our envelope");
    let again = parse(&rebuilt).expect("our bundle parses");
    assert_eq!(again.timestamps, parsed.timestamps);
    assert_eq!(again.predicate_type, parsed.predicate_type);
    assert_eq!(again.hint, key_hint(pem).expect("hint"));
    assert!(!again.has_certificate);
    assert_eq!(again.tlog_entries, 0);

    let statement = serde_json::from_slice::<Value>(&payload).ok();
    let is_statement = payload_type == IN_TOTO_PAYLOAD_TYPE
        && matches!(
            statement
                .as_ref()
                .and_then(|s| s.get("_type"))
                .and_then(Value::as_str),
            Some(STATEMENT_V01 | STATEMENT_V1)
        );
    let subjects: Vec<String> = statement
        .as_ref()
        .and_then(|s| s.get("subject"))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.pointer("/digest/sha256").and_then(Value::as_str))
                .map(|h| format!("sha256:{h}"))
                .collect()
        })
        .unwrap_or_default();
    for digest in subjects.iter().map(String::as_str).chain([ANY_DIGEST]) {
        let verdict = verify(&rebuilt, pem, digest);
        let expected = is_statement && subjects.iter().any(|s| s == digest);
        assert_eq!(verdict.is_ok(), expected, "{digest}: {verdict:?}");
    }
});
