//! DSSE envelopes and in-toto statements, as the client verifies them
//! (`verify_envelope`, `check_subject`, the predicate type `--replace` reads)
//! and as the broker recognizes what SignMessage is asked to sign (PAE
//! framing, statements, cosign simple-signing payloads).
//!
//! Properties: an envelope this target did not sign never verifies; the same
//! envelope re-signed with the target's key verifies exactly when its payload
//! is an in-toto statement; the broker's and the client's PAE are the same
//! bytes, and the broker's PAE parser inverts them; whenever the broker reads
//! a signed statement as in-toto, every subject digest the client would
//! accept is among the broker's subjects (policy and verification read the
//! same subjects).
#![no_main]

use std::sync::OnceLock;

use base64::{
    engine::general_purpose::{STANDARD, URL_SAFE},
    Engine,
};
use keybroker_broker::{
    attest,
    message::{classify, parse_pae, Kind},
};
use keybroker_client::cosign::attestation::{
    check_subject, pae, stored_predicate_type, verify_envelope, IN_TOTO_PAYLOAD_TYPE,
    STATEMENT_V01, STATEMENT_V1,
};
use keybroker_providers::{ecdsa::P256Signer, Sha256Digest};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

fn signer() -> &'static P256Signer {
    static SIGNER: OnceLock<P256Signer> = OnceLock::new();
    SIGNER.get_or_init(|| P256Signer::generate().expect("key").0)
}

fn check_classified(kind: &Kind) {
    match kind {
        Kind::SimpleSigning(img) => {
            assert!(img.repository.is_some());
            assert!(img.digest.starts_with("sha256:") && img.digest.len() == 71);
        }
        Kind::InToto { subjects, .. } => {
            assert!(!subjects.is_empty());
            for s in subjects {
                assert!(s.digest.starts_with("sha256:") && s.digest.len() == 71);
            }
        }
        Kind::Raw(reason) => assert!(!reason.is_empty()),
    }
}

fn resigned(doc: &Value) {
    let Some(payload_type) = doc.get("payloadType").and_then(Value::as_str) else {
        return;
    };
    let Some(payload) = doc
        .get("payload")
        .and_then(Value::as_str)
        .and_then(|s| STANDARD.decode(s).or_else(|_| URL_SAFE.decode(s)).ok())
    else {
        return;
    };
    let framed = pae(payload_type, &payload);
    assert_eq!(
        framed,
        attest::pae(payload_type, &payload),
        "client and broker PAE differ"
    );
    assert_eq!(
        parse_pae(&framed),
        Some((payload_type.as_bytes(), payload.as_slice())),
        "the broker's PAE parser must invert PAE"
    );
    let pem = signer().public_key_pem();
    let sig = signer()
        .sign_digest(&Sha256Digest::of(&framed))
        .expect("sign");
    let mut env = doc.clone();
    env["signatures"] = json!([{ "keyid": "", "sig": STANDARD.encode(&sig) }]);
    let env = serde_json::to_vec(&env).expect("JSON");
    let statement = serde_json::from_slice::<Value>(&payload).ok();
    let is_statement = payload_type == IN_TOTO_PAYLOAD_TYPE
        && matches!(
            statement
                .as_ref()
                .and_then(|s| s.get("_type"))
                .and_then(Value::as_str),
            Some(STATEMENT_V01 | STATEMENT_V1)
        );
    let verified = verify_envelope(&env, pem);
    assert_eq!(verified.is_ok(), is_statement, "{verified:?}");
    let _ = stored_predicate_type(&Value::Null, Some(&env));
    let Ok(st) = verified else {
        return;
    };
    let broker = classify(&framed);
    if let Ok(k) = &broker {
        check_classified(k);
    }
    let Some(subjects) = st.get("subject").and_then(Value::as_array) else {
        return;
    };
    for s in subjects {
        let Some(hex) = s.pointer("/digest/sha256").and_then(Value::as_str) else {
            continue;
        };
        let digest = format!("sha256:{hex}");
        check_subject(&st, &digest).expect("a subject's own digest must match");
        if let Ok(Kind::InToto { subjects, .. }) = &broker {
            assert!(
                subjects.iter().any(|b| b.digest == digest),
                "the client accepts {digest} but the broker's policy saw {subjects:?}"
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // What SignMessage gets: PAE, a simple-signing payload, or anything.
    match classify(data) {
        Ok(kind) => check_classified(&kind),
        Err(e) => assert!(!e.is_empty()),
    }
    if let Some((t, body)) = parse_pae(data) {
        if let Ok(t) = std::str::from_utf8(t) {
            assert_eq!(attest::pae(t, body), data, "PAE framing must round-trip");
        }
    }
    // An envelope: never valid under our key unless we signed it.
    let pem = signer().public_key_pem();
    assert!(
        verify_envelope(data, pem).is_err(),
        "a forged envelope verified"
    );
    if let Ok(doc) = serde_json::from_slice::<Value>(data) {
        let _ = check_subject(
            &doc,
            "sha256:0000000000000000000000000000000000000000000000000000000000000000",
        );
        resigned(&doc);
        // A bare statement: wrap it as cosign does.
        if doc.get("_type").is_some() {
            let env = json!({
                "payloadType": IN_TOTO_PAYLOAD_TYPE,
                "payload": STANDARD.encode(data),
                "signatures": [],
            });
            resigned(&env);
        }
    }
});
