//! cosign v3's storage format: a Sigstore bundle v0.3 holding a DSSE envelope,
//! stored as an OCI 1.1 referrer of the image (`registry/referrers.rs`).
//!
//! What cosign v3 writes for `cosign sign --key` (read in sigstore/cosign:
//! `cmd/cosign/cli/sign/sign.go` `signDigestBundle`, `pkg/oci/remote/write.go`
//! `WriteAttestationNewBundleFormat`, `internal/key/svkeypair.go` `GetHint`):
//! - the envelope's payload is an in-toto Statement v1 about the image digest
//!   (predicate `https://sigstore.dev/cosign/sign/v1` for signatures, the
//!   attestation's predicate type for attestations);
//! - the bundle's verification material is a public-key *hint*, base64 of the
//!   SHA-256 of the key's SPKI DER; no certificate;
//! - `tlogEntries` is empty when nothing went to a transparency log, and
//!   `timestampVerificationData` holds RFC 3161 tokens when a TSA was used;
//! - the referrer manifest's `artifactType` is the bundle media type and its
//!   annotations are `org.opencontainers.image.created`,
//!   `dev.sigstore.bundle.content: dsse-envelope` and
//!   `dev.sigstore.bundle.predicateType`.

use std::collections::BTreeMap;

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

use crate::{
    cosign::attestation::{check_subject, verify_envelope},
    registry::{Descriptor, Discovery, ImageRef, NewReferrer, Registry, OCI_MANIFEST},
    Error,
};

/// The bundle media type (and the referrer's artifactType).
pub const BUNDLE_MEDIA_TYPE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
/// cosign v3's image-signature predicate type.
pub const COSIGN_SIGN_V1: &str = "https://sigstore.dev/cosign/sign/v1";
/// Referrer annotation: what the bundle holds.
pub const CONTENT_ANNOTATION: &str = "dev.sigstore.bundle.content";
/// Referrer annotation: the statement's predicate type.
pub const PREDICATE_TYPE_ANNOTATION: &str = "dev.sigstore.bundle.predicateType";
/// Referrer annotation: when it was written (RFC 3339).
pub const CREATED_ANNOTATION: &str = "org.opencontainers.image.created";
/// Largest bundle we read (a DSSE envelope with a big SBOM predicate fits).
const MAX_BUNDLE: usize = 16 * 1024 * 1024;

/// The public-key hint cosign v3 and sigstore-go write: base64 (standard,
/// padded) of SHA-256 over the key's SPKI DER.
pub fn key_hint(public_pem: &str) -> Result<String, Error> {
    let (label, der) = keybroker_providers::pem::decode(public_pem)?;
    if label != "PUBLIC KEY" {
        return Err(Error::Other(format!(
            "expected a PUBLIC KEY PEM block, found {label:?}"
        )));
    }
    Ok(B64.encode(Sha256::digest(der.as_slice())))
}

/// The bundle JSON for a DSSE envelope (as the broker returns it: JSON with
/// `payloadType`, base64 `payload`, `signatures[].sig`) signed by the key
/// `public_pem`, with RFC 3161 timestamps when there are any: each the TSA's
/// whole TimeStampResp (DER), as sigstore-go stores it and sigstore-js requires.
pub fn build(envelope: &[u8], public_pem: &str, timestamps: &[Vec<u8>]) -> Result<Vec<u8>, Error> {
    let env: Value = serde_json::from_slice(envelope)
        .map_err(|e| Error::Other(format!("broker returned an envelope that is not JSON: {e}")))?;
    let field = |name: &str| {
        env.get(name)
            .cloned()
            .ok_or_else(|| Error::Other(format!("broker's envelope has no {name}")))
    };
    let signatures: Vec<Value> = field("signatures")?
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|s| json!({"sig": s.get("sig").cloned().unwrap_or(Value::Null)}))
        .collect();
    if signatures.len() != 1 {
        return Err(Error::Other(format!(
            "a bundle holds exactly one signature; the envelope has {}",
            signatures.len()
        )));
    }
    let mut material = json!({
        "publicKey": {"hint": key_hint(public_pem)?},
        "tlogEntries": [],
    });
    if !timestamps.is_empty() {
        let tokens: Vec<Value> = timestamps
            .iter()
            .map(|t| json!({"signedTimestamp": B64.encode(t)}))
            .collect();
        material["timestampVerificationData"] = json!({"rfc3161Timestamps": tokens});
    }
    let bundle = json!({
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": material,
        "dsseEnvelope": {
            "payload": field("payload")?,
            "payloadType": field("payloadType")?,
            "signatures": signatures,
        },
    });
    serde_json::to_vec(&bundle).map_err(|e| Error::Other(format!("bundle: {e}")))
}

/// What a bundle says, before any signature check.
#[derive(Debug, Clone)]
pub struct Parsed {
    /// The public-key hint ("" when the bundle carries a certificate or none).
    pub hint: String,
    /// True when the verification material is a certificate (keyless).
    pub has_certificate: bool,
    /// Transparency-log entries.
    pub tlog_entries: usize,
    /// RFC 3161 timestamps: TimeStampResp DER (sigstore-rust also reads bare tokens).
    pub timestamps: Vec<Vec<u8>>,
    /// The DSSE envelope re-serialized in DSSE's JSON form.
    pub envelope: Vec<u8>,
    /// The statement's predicate type, read without verifying.
    pub predicate_type: Option<String>,
}

/// Parses a bundle v0.1–v0.3 with DSSE content. Message-signature bundles
/// (cosign's blob signing) are refused: images are signed with statements.
pub fn parse(bytes: &[u8]) -> Result<Parsed, String> {
    let b: Value = serde_json::from_slice(bytes).map_err(|e| format!("bundle is not JSON: {e}"))?;
    let media_type = b
        .get("mediaType")
        .and_then(Value::as_str)
        .ok_or("bundle has no mediaType")?;
    if !media_type.starts_with("application/vnd.dev.sigstore.bundle") {
        return Err(format!("not a Sigstore bundle (mediaType {media_type:?})"));
    }
    let vm = b
        .get("verificationMaterial")
        .and_then(Value::as_object)
        .ok_or("bundle has no verificationMaterial")?;
    let hint = vm
        .get("publicKey")
        .and_then(|k| k.get("hint"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let has_certificate = vm.contains_key("certificate") || vm.contains_key("x509CertificateChain");
    let tlog_entries = vm
        .get("tlogEntries")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let mut timestamps = Vec::new();
    if let Some(list) = vm
        .get("timestampVerificationData")
        .and_then(|t| t.get("rfc3161Timestamps"))
        .and_then(Value::as_array)
    {
        for t in list {
            let der = t
                .get("signedTimestamp")
                .and_then(Value::as_str)
                .and_then(|s| B64.decode(s).ok())
                .ok_or("an rfc3161Timestamps entry without base64 signedTimestamp")?;
            timestamps.push(der);
        }
    }
    let env = b
        .get("dsseEnvelope")
        .and_then(Value::as_object)
        .ok_or("bundle holds no dsseEnvelope (a message signature is not an image signature)")?;
    let envelope = serde_json::to_vec(&json!({
        "payloadType": env.get("payloadType"),
        "payload": env.get("payload"),
        "signatures": env.get("signatures"),
    }))
    .map_err(|e| format!("envelope: {e}"))?;
    let predicate_type = env
        .get("payload")
        .and_then(Value::as_str)
        .and_then(|p| B64.decode(p).ok())
        .and_then(|p| serde_json::from_slice::<Value>(&p).ok())
        .and_then(|s| {
            s.get("predicateType")
                .and_then(Value::as_str)
                .map(String::from)
        });
    Ok(Parsed {
        hint,
        has_certificate,
        tlog_entries,
        timestamps,
        envelope,
        predicate_type,
    })
}

/// A bundle that verified.
#[derive(Debug, Clone)]
pub struct VerifiedBundle {
    /// The in-toto statement.
    pub statement: Value,
    /// RFC 3161 timestamps carried (their TSA signatures are not checked here:
    /// trusting a TSA is the verifier's policy, e.g. sigstore-js's trusted root).
    pub timestamps: usize,
}

/// Verifies a bundle against `public_pem` for the image `manifest_digest`: the
/// hint (when present) names this key, the DSSE signature verifies over the
/// PAE, the payload is an in-toto statement with the image as a subject.
pub fn verify(
    bytes: &[u8],
    public_pem: &str,
    manifest_digest: &str,
) -> Result<VerifiedBundle, String> {
    let parsed = parse(bytes)?;
    if parsed.has_certificate {
        return Err("bundle is signed with a certificate (keyless), not a key".into());
    }
    if !parsed.hint.is_empty() {
        let ours = key_hint(public_pem).map_err(|e| e.to_string())?;
        if parsed.hint != ours {
            return Err(format!(
                "bundle names another key (hint {}; this key is {ours})",
                parsed.hint
            ));
        }
    }
    let statement = verify_envelope(&parsed.envelope, public_pem)?;
    check_subject(&statement, manifest_digest)?;
    Ok(VerifiedBundle {
        statement,
        timestamps: parsed.timestamps.len(),
    })
}

/// A bundle stored for an image.
#[derive(Debug, Clone)]
pub struct Found {
    /// The referrer manifest's descriptor (annotations included).
    pub referrer: Descriptor,
    /// The bundle bytes, or why they could not be read.
    pub bundle: Result<Vec<u8>, String>,
}

/// The bundles stored for `digest`, with where they were found. Bundles that
/// cannot be read are returned with their error, not skipped: verification
/// reports them, and `tree` lists them.
pub async fn find(
    registry: &Registry,
    img: &ImageRef,
    digest: &str,
) -> Result<(Discovery, Vec<Found>), Error> {
    let (via, referrers) = registry
        .referrers(img, digest, Some(BUNDLE_MEDIA_TYPE))
        .await?;
    let mut found = Vec::with_capacity(referrers.len());
    for r in referrers {
        let bundle = read_bundle(registry, img, &r).await;
        found.push(Found {
            referrer: r,
            bundle,
        });
    }
    Ok((via, found))
}

async fn read_bundle(
    registry: &Registry,
    img: &ImageRef,
    referrer: &Descriptor,
) -> Result<Vec<u8>, String> {
    let (body, _) = registry
        .get_manifest(img, &referrer.digest, OCI_MANIFEST)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("listed referrer manifest does not exist")?;
    if crate::registry::sha256_digest(&body) != referrer.digest {
        return Err("referrer manifest does not match its digest".into());
    }
    let m: Value = serde_json::from_slice(&body).map_err(|e| format!("referrer manifest: {e}"))?;
    let layer = m
        .get("layers")
        .and_then(Value::as_array)
        .and_then(|l| {
            l.iter()
                .find(|l| l.get("mediaType").and_then(Value::as_str) == Some(BUNDLE_MEDIA_TYPE))
        })
        .ok_or("referrer manifest has no bundle layer")?;
    if layer.get("size").and_then(Value::as_u64).unwrap_or(0) > MAX_BUNDLE as u64 {
        return Err(format!("bundle layer is larger than {MAX_BUNDLE} bytes"));
    }
    let d = layer
        .get("digest")
        .and_then(Value::as_str)
        .ok_or("bundle layer without digest")?;
    registry.get_blob(img, d).await.map_err(|e| e.to_string())
}

/// Stores `bundle` as a referrer of the image `digest`, with cosign v3's
/// annotations. Returns the referrer's descriptor and where it is listed.
pub async fn store(
    registry: &Registry,
    img: &ImageRef,
    digest: &str,
    bundle: &[u8],
    predicate_type: &str,
) -> Result<(Descriptor, Discovery), Error> {
    let subject = registry
        .manifest_descriptor(img, digest)
        .await?
        .ok_or_else(|| Error::ImageNotFound(format!("{}@{digest}", img.docker_reference())))?;
    let annotations = BTreeMap::from([
        (
            CREATED_ANNOTATION.to_string(),
            crate::provenance::now_rfc3339(),
        ),
        (CONTENT_ANNOTATION.to_string(), "dsse-envelope".to_string()),
        (
            PREDICATE_TYPE_ANNOTATION.to_string(),
            predicate_type.to_string(),
        ),
    ]);
    registry
        .put_referrer(
            img,
            &subject,
            NewReferrer {
                artifact_type: BUNDLE_MEDIA_TYPE,
                blob: bundle,
                blob_media_type: BUNDLE_MEDIA_TYPE,
                annotations,
            },
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use keybroker_providers::{P256Signer, Sha256Digest};

    const DIGEST: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn signed_envelope(signer: &P256Signer, statement: &Value) -> Vec<u8> {
        let payload = serde_json::to_vec(statement).unwrap();
        let pae = crate::cosign::attestation::pae("application/vnd.in-toto+json", &payload);
        let sig = signer.sign_digest(&Sha256Digest::of(&pae)).unwrap();
        serde_json::to_vec(&json!({
            "payloadType": "application/vnd.in-toto+json",
            "payload": B64.encode(&payload),
            "signatures": [{"keyid": "", "sig": B64.encode(sig)}],
        }))
        .unwrap()
    }

    fn statement(digest: &str) -> Value {
        json!({
            "_type": "https://in-toto.io/Statement/v1",
            "subject": [{"digest": {"sha256": &digest[7..]}}],
            "predicateType": COSIGN_SIGN_V1,
            "predicate": {},
        })
    }

    #[test]
    fn built_bundles_verify_and_wrong_key_digest_or_tampering_do_not() {
        let (signer, _) = P256Signer::generate().unwrap();
        let (other, _) = P256Signer::generate().unwrap();
        let pem = signer.public_key_pem();
        let b = build(&signed_envelope(&signer, &statement(DIGEST)), pem, &[]).unwrap();
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["mediaType"], BUNDLE_MEDIA_TYPE);
        assert_eq!(v["verificationMaterial"]["tlogEntries"], json!([]));
        assert!(v["verificationMaterial"]
            .get("timestampVerificationData")
            .is_none());
        assert_eq!(
            v["verificationMaterial"]["publicKey"]["hint"],
            key_hint(pem).unwrap()
        );
        let ok = verify(&b, pem, DIGEST).unwrap();
        assert_eq!(ok.statement["predicateType"], COSIGN_SIGN_V1);
        assert_eq!(
            parse(&b).unwrap().predicate_type.as_deref(),
            Some(COSIGN_SIGN_V1)
        );

        let e = verify(&b, other.public_key_pem(), DIGEST).unwrap_err();
        assert!(e.contains("another key"), "{e}");
        let other_digest = format!("sha256:{}", "0".repeat(64));
        assert!(verify(&b, pem, &other_digest).unwrap_err().contains("not"));

        // A payload swapped after signing, hint kept: the signature fails.
        let mut t = v.clone();
        t["dsseEnvelope"]["payload"] =
            json!(B64.encode(serde_json::to_vec(&statement(&other_digest)).unwrap()));
        let e = verify(&serde_json::to_vec(&t).unwrap(), pem, &other_digest).unwrap_err();
        assert!(e.contains("no envelope signature matches"), "{e}");
    }

    #[test]
    fn timestamps_are_carried_and_hint_is_cosigns() {
        let (signer, _) = P256Signer::generate().unwrap();
        let pem = signer.public_key_pem();
        let b = build(
            &signed_envelope(&signer, &statement(DIGEST)),
            pem,
            &[vec![0x30, 0x03, 1, 2, 3]],
        )
        .unwrap();
        let p = parse(&b).unwrap();
        assert_eq!(p.timestamps, vec![vec![0x30, 0x03, 1, 2, 3]]);
        // cosign's GetHint: base64(sha256(SPKI DER)), checked by hand here.
        let (_, der) = keybroker_providers::pem::decode(pem).unwrap();
        let expected = B64.encode(Sha256::digest(der.as_slice()));
        assert_eq!(p.hint, expected);
        assert_eq!(p.hint.len(), 44);
    }

    #[test]
    fn certificate_and_message_signature_bundles_are_refused() {
        let (signer, _) = P256Signer::generate().unwrap();
        let pem = signer.public_key_pem();
        let b = build(&signed_envelope(&signer, &statement(DIGEST)), pem, &[]).unwrap();
        let mut v: Value = serde_json::from_slice(&b).unwrap();
        v["verificationMaterial"]["certificate"] = json!({"rawBytes": "AAAA"});
        assert!(verify(&serde_json::to_vec(&v).unwrap(), pem, DIGEST)
            .unwrap_err()
            .contains("certificate"));
        let msg = json!({"mediaType": BUNDLE_MEDIA_TYPE, "verificationMaterial": {},
            "messageSignature": {"signature": "AAAA"}});
        assert!(parse(&serde_json::to_vec(&msg).unwrap())
            .unwrap_err()
            .contains("no dsseEnvelope"));
        assert!(parse(b"{\"mediaType\":\"x\"}")
            .unwrap_err()
            .contains("not a Sigstore bundle"));
    }
}
