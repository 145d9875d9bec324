//! cosign's attestation format: in-toto statements in DSSE envelopes, stored
//! one envelope per layer in the image's `sha256-<hex>.att` manifest.
//!
//! Every constant and rule here was read in cosign's source:
//! `cmd/cosign/cli/options/predicate.go` (type names → URIs, URI validation),
//! `pkg/cosign/attestation/attestation.go` (how each type's predicate is
//! built), `cmd/cosign/cli/attest/attest.go` + `pkg/oci/static` (layer media
//! type and annotations), `pkg/cosign/remote/remote.go` (`--replace`).

use base64::{
    engine::general_purpose::{STANDARD as B64, URL_SAFE as B64URL},
    Engine,
};
use keybroker_providers::{ecdsa::verify_digest, Sha256Digest};
use serde_json::{json, Map, Value};

use super::append::{append_layer, Layer, Mode};
use super::SIGNATURE_ANNOTATION;
use crate::{
    registry::{ImageRef, Registry, OCI_MANIFEST},
    Error,
};

/// Layer media type of an attestation (`types.DssePayloadType`).
pub const DSSE_MEDIA_TYPE: &str = "application/vnd.dsse.envelope.v1+json";
/// The envelope's `payloadType` for in-toto statements (`types.IntotoPayloadType`).
pub const IN_TOTO_PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
/// Statement `_type` cosign writes (`in_toto.StatementInTotoV01`).
pub const STATEMENT_V01: &str = "https://in-toto.io/Statement/v0.1";
/// Statement `_type` of in-toto v1 statements (read, not written).
pub const STATEMENT_V1: &str = "https://in-toto.io/Statement/v1";
/// Layer annotation naming the predicate type.
pub const PREDICATE_TYPE_ANNOTATION: &str = "predicateType";

/// `--type custom` (`attestation.CosignCustomProvenanceV01`).
pub const CUSTOM_PREDICATE_TYPE: &str = "https://cosign.sigstore.dev/attestation/v1";
/// `--type vuln` (`attestation.CosignVulnProvenanceV01`).
pub const VULN_PREDICATE_TYPE: &str = "https://cosign.sigstore.dev/attestation/vuln/v1";
/// `--type openvex` (`attestation.OpenVexNamespace`).
pub const OPENVEX_PREDICATE_TYPE: &str = "https://openvex.dev/ns";
/// `--type slsaprovenance` / `slsaprovenance02`.
pub const SLSA02_PREDICATE_TYPE: &str = "https://slsa.dev/provenance/v0.2";
/// `--type slsaprovenance1`, and what `--provenance` generates.
pub const SLSA1_PREDICATE_TYPE: &str = "https://slsa.dev/provenance/v1";
/// `--type spdx` / `spdxjson` (`in_toto.PredicateSPDX`).
pub const SPDX_PREDICATE_TYPE: &str = "https://spdx.dev/Document";
/// `--type cyclonedx` (`in_toto.PredicateCycloneDX`).
pub const CYCLONEDX_PREDICATE_TYPE: &str = "https://cyclonedx.org/bom";
/// `--type link` (`in_toto.PredicateLinkV1`).
pub const LINK_PREDICATE_TYPE: &str = "https://in-toto.io/Link/v1";

/// cosign's `PredicateTypeMap`.
pub const PREDICATE_TYPES: &[(&str, &str)] = &[
    ("custom", CUSTOM_PREDICATE_TYPE),
    ("slsaprovenance", SLSA02_PREDICATE_TYPE),
    ("slsaprovenance02", SLSA02_PREDICATE_TYPE),
    ("slsaprovenance1", SLSA1_PREDICATE_TYPE),
    ("spdx", SPDX_PREDICATE_TYPE),
    ("spdxjson", SPDX_PREDICATE_TYPE),
    ("cyclonedx", CYCLONEDX_PREDICATE_TYPE),
    ("link", LINK_PREDICATE_TYPE),
    ("vuln", VULN_PREDICATE_TYPE),
    ("openvex", OPENVEX_PREDICATE_TYPE),
];

/// `sha256-<hex>.att`, the tag cosign stores attestations under.
pub fn attestation_tag(manifest_digest: &str) -> String {
    format!("{}.att", manifest_digest.replace(':', "-"))
}

/// A `--type` value as a predicate type URI: a cosign short name, or a URI
/// (cosign accepts what Go's `url.ParseRequestURI` accepts: an absolute URI
/// or an absolute path).
pub fn predicate_type_uri(t: &str) -> Result<String, Error> {
    if let Some((_, uri)) = PREDICATE_TYPES.iter().find(|(name, _)| *name == t) {
        return Ok((*uri).to_string());
    }
    if is_request_uri(t) {
        return Ok(t.to_string());
    }
    Err(Error::Other(format!(
        "invalid predicate type {t:?}: use one of {} or a URI",
        PREDICATE_TYPES
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

fn is_request_uri(t: &str) -> bool {
    if t.is_empty() || t.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return false;
    }
    if t.starts_with('/') {
        return true;
    }
    match t.split_once(':') {
        Some((scheme, rest)) => {
            !rest.is_empty()
                && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        }
        None => false,
    }
}

/// Builds the predicate for `--type TYPE` from the file's bytes, as cosign's
/// `GenerateStatement` does for that type. `now_rfc3339` is the custom
/// predicate's `Timestamp`. Returns the predicate as JSON (an object, or for
/// `spdx` cosign's legacy string predicate).
pub fn build_predicate(type_flag: &str, raw: &[u8], now_rfc3339: &str) -> Result<Value, Error> {
    let object = || -> Result<Map<String, Value>, Error> {
        match serde_json::from_slice::<Value>(raw) {
            Ok(Value::Object(m)) => Ok(m),
            Ok(_) => Err(Error::Other(format!(
                "the predicate for --type {type_flag} must be a JSON object"
            ))),
            Err(e) => Err(Error::Other(format!(
                "the predicate for --type {type_flag} is not JSON: {e}"
            ))),
        }
    };
    match type_flag {
        "slsaprovenance" | "slsaprovenance02" | "spdxjson" | "cyclonedx" | "openvex" => {
            Ok(Value::Object(object()?))
        }
        "slsaprovenance1" => {
            let mut m = object()?;
            // cosign renames a misspelt runDetails.metadata.invocationID.
            if let Some(meta) = m
                .get_mut("runDetails")
                .and_then(|r| r.get_mut("metadata"))
                .and_then(Value::as_object_mut)
            {
                if let Some(v) = meta.remove("invocationID") {
                    meta.insert("invocationId".into(), v);
                }
            }
            Ok(Value::Object(m))
        }
        // cosign keeps a non-JSON SPDX document as a string predicate.
        "spdx" => Ok(Value::String(String::from_utf8_lossy(raw).into_owned())),
        "link" => {
            let m = object()?;
            // cosign requires every field of in-toto's Link struct.
            for f in [
                "_type",
                "name",
                "materials",
                "products",
                "byproducts",
                "command",
                "environment",
            ] {
                if !m.contains_key(f) {
                    return Err(Error::Other(format!(
                        "link statement: required field {f} missing"
                    )));
                }
            }
            Ok(Value::Object(m))
        }
        "vuln" => Ok(vuln_predicate(&object()?)),
        _ => {
            let uri = predicate_type_uri(type_flag)?;
            if uri == CUSTOM_PREDICATE_TYPE {
                // CosignPredicate{Data: string(raw), Timestamp}: the file as text.
                Ok(json!({
                    "Data": String::from_utf8_lossy(raw),
                    "Timestamp": now_rfc3339,
                }))
            } else {
                Ok(Value::Object(object()?))
            }
        }
    }
}

/// cosign decodes `--type vuln` into its `CosignVulnPredicate` struct and
/// encodes it again: only these fields survive, missing ones take Go's zero
/// values.
fn vuln_predicate(m: &Map<String, Value>) -> Value {
    let get = |path: &str| m.get(path).cloned().unwrap_or(Value::Null);
    let obj = |v: &Value, k: &str| v.get(k).cloned().unwrap_or(Value::Null);
    let s = |v: &Value, k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .map_or(Value::from(""), Value::from)
    };
    let t = |v: &Value, k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .map_or(Value::from("0001-01-01T00:00:00Z"), Value::from)
    };
    let inv = get("invocation");
    let scanner = get("scanner");
    let db = obj(&scanner, "db");
    let meta = get("metadata");
    json!({
        "invocation": {
            "parameters": obj(&inv, "parameters"),
            "uri": s(&inv, "uri"),
            "event_id": s(&inv, "event_id"),
            "builder.id": s(&inv, "builder.id"),
        },
        "scanner": {
            "uri": s(&scanner, "uri"),
            "version": s(&scanner, "version"),
            "db": { "uri": s(&db, "uri"), "version": s(&db, "version") },
            "result": obj(&scanner, "result"),
        },
        "metadata": {
            "scanStartedOn": t(&meta, "scanStartedOn"),
            "scanFinishedOn": t(&meta, "scanFinishedOn"),
        },
    })
}

/// DSSE's pre-authentication encoding: what the signature covers.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {payload_type} {} ",
        payload_type.len(),
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

fn b64_decode(s: &str) -> Option<Vec<u8>> {
    // DSSE allows standard or URL-safe base64.
    B64.decode(s).or_else(|_| B64URL.decode(s)).ok()
}

/// Verifies a DSSE envelope with `public_pem`: the payload type is in-toto's,
/// at least one signature verifies over the PAE, and the payload is an in-toto
/// statement. Returns the statement.
pub fn verify_envelope(envelope: &[u8], public_pem: &str) -> Result<Value, String> {
    let env: Value =
        serde_json::from_slice(envelope).map_err(|e| format!("envelope is not JSON: {e}"))?;
    let payload_type = env
        .get("payloadType")
        .and_then(Value::as_str)
        .ok_or("envelope has no payloadType")?;
    if payload_type != IN_TOTO_PAYLOAD_TYPE {
        return Err(format!(
            "payloadType is {payload_type:?}, not {IN_TOTO_PAYLOAD_TYPE}"
        ));
    }
    let payload = env
        .get("payload")
        .and_then(Value::as_str)
        .and_then(b64_decode)
        .ok_or("envelope payload is missing or not base64")?;
    let sigs = env
        .get("signatures")
        .and_then(Value::as_array)
        .filter(|s| !s.is_empty())
        .ok_or("envelope has no signatures")?;
    let digest = Sha256Digest::of(&pae(payload_type, &payload));
    let verified = sigs.iter().any(|s| {
        s.get("sig")
            .and_then(Value::as_str)
            .and_then(b64_decode)
            .is_some_and(|sig| verify_digest(public_pem, &digest, &sig).is_ok())
    });
    if !verified {
        return Err("no envelope signature matches the key".into());
    }
    let statement: Value =
        serde_json::from_slice(&payload).map_err(|e| format!("payload is not JSON: {e}"))?;
    match statement.get("_type").and_then(Value::as_str) {
        Some(STATEMENT_V01) | Some(STATEMENT_V1) => Ok(statement),
        other => Err(format!(
            "payload is not an in-toto statement (_type {other:?})"
        )),
    }
}

/// Checks that one of the statement's subjects carries the image's digest.
pub fn check_subject(statement: &Value, manifest_digest: &str) -> Result<(), String> {
    let hex = manifest_digest
        .strip_prefix("sha256:")
        .ok_or_else(|| format!("{manifest_digest} is not a sha256 digest"))?;
    let subjects = statement
        .get("subject")
        .and_then(Value::as_array)
        .ok_or("statement has no subject")?;
    if subjects
        .iter()
        .any(|s| s.pointer("/digest/sha256").and_then(Value::as_str) == Some(hex))
    {
        return Ok(());
    }
    let claimed: Vec<&str> = subjects
        .iter()
        .filter_map(|s| s.pointer("/digest/sha256").and_then(Value::as_str))
        .collect();
    Err(format!(
        "statement is about sha256:{} not {manifest_digest}",
        if claimed.is_empty() {
            "nothing".to_string()
        } else {
            claimed.join(", sha256:")
        }
    ))
}

/// The predicate type of a stored attestation: from its statement (as cosign's
/// `--replace` reads it), else from the layer annotation.
#[doc(hidden)]
pub fn stored_predicate_type(layer: &Value, blob: Option<&[u8]>) -> Option<String> {
    let from_blob = blob
        .and_then(|b| serde_json::from_slice::<Value>(b).ok())
        .and_then(|env| {
            env.get("payload")
                .and_then(Value::as_str)
                .and_then(b64_decode)
        })
        .and_then(|p| serde_json::from_slice::<Value>(&p).ok())
        .and_then(|st| {
            st.get("predicateType")
                .and_then(Value::as_str)
                .map(String::from)
        });
    from_blob.or_else(|| {
        layer
            .get("annotations")
            .and_then(|a| a.get(PREDICATE_TYPE_ANNOTATION))
            .and_then(Value::as_str)
            .map(String::from)
    })
}

/// Stores `envelope` in the image's `.att` manifest. Appends (an identical
/// layer is skipped) or, with `replace`, drops the stored attestations of the
/// same predicate type and puts this one first, as `cosign attest --replace`
/// does. Returns whether a layer was written.
pub async fn append_attestation(
    registry: &Registry,
    img: &ImageRef,
    manifest_digest: &str,
    envelope: &[u8],
    predicate_type: &str,
    replace: bool,
) -> Result<bool, Error> {
    let layer = Layer {
        media_type: DSSE_MEDIA_TYPE.into(),
        blob: envelope.to_vec(),
        annotations: [
            (SIGNATURE_ANNOTATION.to_string(), String::new()),
            (
                PREDICATE_TYPE_ANNOTATION.to_string(),
                predicate_type.to_string(),
            ),
        ]
        .into(),
    };
    let same_type = |l: &Value, blob: Option<&[u8]>| {
        stored_predicate_type(l, blob).as_deref() == Some(predicate_type)
    };
    let mode = if replace {
        Mode::Replace(&same_type)
    } else {
        Mode::Append
    };
    append_layer(
        registry,
        img,
        &attestation_tag(manifest_digest),
        &layer,
        mode,
    )
    .await
}

/// Verifies the image's attestations against `public_pem`, as `cosign
/// verify-attestation --key` does without a transparency log: each DSSE layer's
/// signature over the PAE, and the subject digest against the image's. With
/// `predicate_type`, only statements of that type count. Returns the verified
/// statements, or an error saying why each candidate failed.
pub async fn verify_attestations(
    registry: &Registry,
    img: &ImageRef,
    public_pem: &str,
    predicate_type: Option<&str>,
) -> Result<Vec<Value>, Error> {
    let digest = registry.resolve_digest(img).await?;
    let tag = attestation_tag(&digest);
    let Some((body, _)) = registry.get_manifest(img, &tag, OCI_MANIFEST).await? else {
        return Err(Error::Verification(format!(
            "no attestations found for {img} ({digest}): tag {tag} does not exist"
        )));
    };
    let manifest: Value = serde_json::from_slice(&body)
        .map_err(|e| Error::Verification(format!("{tag} is not a JSON manifest: {e}")))?;
    let layers = manifest
        .get("layers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut verified = Vec::new();
    let mut failures = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        match check_layer(registry, img, &digest, public_pem, layer).await {
            Ok(st) => {
                let ty = st.get("predicateType").and_then(Value::as_str);
                match predicate_type {
                    Some(want) if ty != Some(want) => failures.push(format!(
                        "attestation {}: predicate type {} is not {want}",
                        i + 1,
                        ty.unwrap_or("(none)")
                    )),
                    _ => verified.push(st),
                }
            }
            Err(reason) => failures.push(format!("attestation {}: {reason}", i + 1)),
        }
    }
    if verified.is_empty() {
        return Err(Error::Verification(format!(
            "no attestation of {img} ({digest}) verified with the given key{}; checked {}: {}",
            predicate_type
                .map(|t| format!(" for predicate type {t}"))
                .unwrap_or_default(),
            layers.len(),
            if failures.is_empty() {
                "none present".to_string()
            } else {
                failures.join("; ")
            }
        )));
    }
    Ok(verified)
}

async fn check_layer(
    registry: &Registry,
    img: &ImageRef,
    digest: &str,
    public_pem: &str,
    layer: &Value,
) -> Result<Value, String> {
    if layer.get("mediaType").and_then(Value::as_str) != Some(DSSE_MEDIA_TYPE) {
        return Err("not a DSSE envelope layer".into());
    }
    let blob_digest = layer
        .get("digest")
        .and_then(Value::as_str)
        .ok_or("layer without digest")?;
    let envelope = registry
        .get_blob(img, blob_digest)
        .await
        .map_err(|e| e.to_string())?;
    let statement = verify_envelope(&envelope, public_pem)?;
    check_subject(&statement, digest)?;
    Ok(statement)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names_map_as_cosigns() {
        assert_eq!(predicate_type_uri("custom").unwrap(), CUSTOM_PREDICATE_TYPE);
        assert_eq!(
            predicate_type_uri("slsaprovenance").unwrap(),
            "https://slsa.dev/provenance/v0.2"
        );
        assert_eq!(
            predicate_type_uri("slsaprovenance1").unwrap(),
            "https://slsa.dev/provenance/v1"
        );
        assert_eq!(
            predicate_type_uri("spdxjson").unwrap(),
            "https://spdx.dev/Document"
        );
        assert_eq!(
            predicate_type_uri("vuln").unwrap(),
            "https://cosign.sigstore.dev/attestation/vuln/v1"
        );
        assert_eq!(
            predicate_type_uri("https://example.com/p/v1").unwrap(),
            "https://example.com/p/v1"
        );
        assert_eq!(predicate_type_uri("/abs/path").unwrap(), "/abs/path");
        assert!(predicate_type_uri("notatype").is_err());
        assert!(predicate_type_uri("has space:x").is_err());
        assert_eq!(attestation_tag("sha256:ab"), "sha256-ab.att");
    }

    #[test]
    fn predicates_are_built_as_cosign_builds_them() {
        let now = "2026-01-02T03:04:05Z";
        // custom wraps the file, JSON or not, as a string.
        let p = build_predicate("custom", b"{\"a\":1}", now).unwrap();
        assert_eq!(p, json!({"Data": "{\"a\":1}", "Timestamp": now}));
        let p = build_predicate("custom", b"plain text", now).unwrap();
        assert_eq!(p["Data"], "plain text");
        // A URI type takes the JSON object as is, and refuses non-objects.
        let p = build_predicate("https://example.com/t", b"{\"a\":1}", now).unwrap();
        assert_eq!(p, json!({"a": 1}));
        assert!(build_predicate("https://example.com/t", b"[1]", now).is_err());
        assert!(build_predicate("cyclonedx", b"<xml/>", now).is_err());
        // spdx keeps the document as a string predicate.
        assert_eq!(
            build_predicate("spdx", b"SPDXVersion: SPDX-2.3", now).unwrap(),
            json!("SPDXVersion: SPDX-2.3")
        );
        // slsaprovenance1 fixes invocationID.
        let p = build_predicate(
            "slsaprovenance1",
            br#"{"runDetails":{"metadata":{"invocationID":"x"}}}"#,
            now,
        )
        .unwrap();
        assert_eq!(p["runDetails"]["metadata"], json!({"invocationId": "x"}));
        // vuln keeps cosign's struct fields only, with Go zero values.
        let p = build_predicate(
            "vuln",
            br#"{"scanner":{"uri":"u","extra":1},"junk":true}"#,
            now,
        )
        .unwrap();
        assert_eq!(p["scanner"]["uri"], "u");
        assert!(p["scanner"].get("extra").is_none() && p.get("junk").is_none());
        assert_eq!(p["metadata"]["scanStartedOn"], "0001-01-01T00:00:00Z");
        assert_eq!(p["invocation"]["builder.id"], "");
        // link needs every field of in-toto's Link.
        assert!(build_predicate("link", br#"{"_type":"link"}"#, now).is_err());
    }

    #[test]
    fn pae_is_dsse_v1() {
        assert_eq!(
            pae("application/vnd.in-toto+json", b"{}"),
            b"DSSEv1 28 application/vnd.in-toto+json 2 {}".to_vec()
        );
    }

    #[test]
    fn envelope_verification_checks_signature_type_and_subject() {
        let (signer, _) = keybroker_providers::P256Signer::generate().unwrap();
        let pem = signer.public_key_pem().to_string();
        let hex = "ab".repeat(32);
        let statement = json!({
            "_type": STATEMENT_V01,
            "subject": [{"name": "r.example/app", "digest": {"sha256": hex}}],
            "predicateType": CUSTOM_PREDICATE_TYPE,
            "predicate": {},
        })
        .to_string();
        let sign = |payload: &[u8]| {
            let d = Sha256Digest::of(&pae(IN_TOTO_PAYLOAD_TYPE, payload));
            B64.encode(signer.sign_digest(&d).unwrap())
        };
        let env = |payload: &[u8], sig: &str| {
            json!({
                "payloadType": IN_TOTO_PAYLOAD_TYPE,
                "payload": B64.encode(payload),
                "signatures": [{"keyid": "", "sig": sig}],
            })
            .to_string()
        };
        let good = env(statement.as_bytes(), &sign(statement.as_bytes()));
        let st = verify_envelope(good.as_bytes(), &pem).unwrap();
        check_subject(&st, &format!("sha256:{hex}")).unwrap();
        let err = check_subject(&st, &format!("sha256:{}", "cd".repeat(32))).unwrap_err();
        assert!(err.contains("is about"), "{err}");
        // Tampered payload under the old signature.
        let tampered = statement.replace("r.example", "s.example");
        let bad = env(tampered.as_bytes(), &sign(statement.as_bytes()));
        assert!(verify_envelope(bad.as_bytes(), &pem)
            .unwrap_err()
            .contains("matches the key"));
        // Another key.
        let (other, _) = keybroker_providers::P256Signer::generate().unwrap();
        assert!(verify_envelope(good.as_bytes(), other.public_key_pem()).is_err());
    }

    #[test]
    fn replace_reads_the_statement_type_then_the_annotation() {
        let st = json!({"_type": STATEMENT_V01, "predicateType": "https://a"}).to_string();
        let env = json!({"payload": B64.encode(st)}).to_string();
        let layer = json!({"annotations": {"predicateType": "https://b"}});
        assert_eq!(
            stored_predicate_type(&layer, Some(env.as_bytes())).as_deref(),
            Some("https://a")
        );
        assert_eq!(
            stored_predicate_type(&layer, None).as_deref(),
            Some("https://b")
        );
        assert_eq!(stored_predicate_type(&json!({}), Some(b"junk")), None);
    }
}
