//! Verifying classic cosign signatures with a public key, as `cosign verify
//! --key` does without a transparency log: every simple-signing layer of the
//! `.sig` manifest is checked; the image verifies if at least one layer does.

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use keybroker_providers::{ecdsa::verify_digest, Sha256Digest};
use serde_json::Value;

use super::{signature_tag, SIGNATURE_ANNOTATION, SIMPLESIGNING_MEDIA_TYPE};
use crate::{
    registry::{ImageRef, Registry, OCI_MANIFEST},
    Error,
};

/// A payload whose signature verified.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The payload as stored.
    pub payload: Value,
}

/// Verifies the image's signatures against `public_pem`; returns the verified
/// payloads, or an error that says why each candidate failed.
pub async fn verify_image(
    registry: &Registry,
    img: &ImageRef,
    public_pem: &str,
) -> Result<Vec<Verified>, Error> {
    let digest = registry.resolve_digest(img).await?;
    let tag = signature_tag(&digest);
    let Some((body, _)) = registry.get_manifest(img, &tag, OCI_MANIFEST).await? else {
        return Err(Error::Verification(format!(
            "no signatures found for {img} ({digest}): tag {tag} does not exist"
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
            Ok(v) => verified.push(v),
            Err(reason) => failures.push(format!("signature {}: {reason}", i + 1)),
        }
    }
    if verified.is_empty() {
        return Err(Error::Verification(format!(
            "no signature of {img} ({digest}) verified with the given key; checked {}: {}",
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
) -> Result<Verified, String> {
    if layer.get("mediaType").and_then(Value::as_str) != Some(SIMPLESIGNING_MEDIA_TYPE) {
        return Err("not a simple-signing layer".into());
    }
    let sig_b64 = layer
        .get("annotations")
        .and_then(|a| a.get(SIGNATURE_ANNOTATION))
        .and_then(Value::as_str)
        .ok_or("no signature annotation")?;
    let sig = B64
        .decode(sig_b64)
        .map_err(|_| "signature annotation is not base64")?;
    let blob_digest = layer
        .get("digest")
        .and_then(Value::as_str)
        .ok_or("layer without digest")?;
    let payload = registry
        .get_blob(img, blob_digest)
        .await
        .map_err(|e| e.to_string())?;
    verify_digest(public_pem, &Sha256Digest::of(&payload), &sig)
        .map_err(|_| "signature does not match the key")?;
    let value: Value =
        serde_json::from_slice(&payload).map_err(|e| format!("payload is not JSON: {e}"))?;
    let claimed = value
        .pointer("/critical/image/docker-manifest-digest")
        .and_then(Value::as_str);
    if claimed != Some(digest) {
        return Err(format!(
            "payload is for {} not {digest}",
            claimed.unwrap_or("no digest")
        ));
    }
    if value.pointer("/critical/type").and_then(Value::as_str)
        != Some("cosign container image signature")
    {
        return Err("payload type is not a cosign container image signature".into());
    }
    Ok(Verified { payload: value })
}
