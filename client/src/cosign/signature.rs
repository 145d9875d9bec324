//! Writing a signature: payload blob, config blob, and the `.sig` manifest,
//! appended to whatever signatures are already there.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{
    registry::{sha256_digest, ImageRef, Registry, OCI_MANIFEST},
    Error,
};

/// Layer media type of a cosign simple-signing payload.
pub const SIMPLESIGNING_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// Layer annotation carrying the base64 DER signature.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const MAX_ATTEMPTS: usize = 6;

/// One signature to store.
#[derive(Debug, Clone)]
pub struct SignatureLayer {
    /// The payload bytes the signature covers.
    pub payload: Vec<u8>,
    /// Standard padded base64 of the ASN.1 DER signature.
    pub signature_b64: String,
}

impl SignatureLayer {
    fn descriptor(&self) -> Value {
        json!({
            "mediaType": SIMPLESIGNING_MEDIA_TYPE,
            "size": self.payload.len(),
            "digest": sha256_digest(&self.payload),
            "annotations": { SIGNATURE_ANNOTATION: self.signature_b64 },
        })
    }
}

/// `sha256-<hex>.sig`, the tag cosign stores signatures under.
pub fn signature_tag(manifest_digest: &str) -> String {
    format!("{}.sig", manifest_digest.replace(':', "-"))
}

/// The config blob as cosign writes it: one history entry and diff_id per layer.
fn config_blob(layers: &[Value]) -> Vec<u8> {
    let diff_ids: Vec<&Value> = layers.iter().filter_map(|l| l.get("digest")).collect();
    let history: Vec<Value> = layers
        .iter()
        .map(|_| json!({"created": "0001-01-01T00:00:00Z"}))
        .collect();
    // Field order as cosign's Go structs emit it (serde_json keeps insertion order
    // only with preserve_order, so build the text explicitly).
    format!(
        r#"{{"architecture":"","created":"0001-01-01T00:00:00Z","history":{},"os":"","rootfs":{{"type":"layers","diff_ids":{}}},"config":{{}}}}"#,
        Value::from(history),
        serde_json::to_string(&diff_ids).unwrap_or_else(|_| "[]".into())
    )
    .into_bytes()
}

fn manifest(config: &[u8], layers: &[Value]) -> Vec<u8> {
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"{CONFIG_MEDIA_TYPE}","size":{},"digest":"{}"}},"layers":{}}}"#,
        config.len(),
        sha256_digest(config),
        Value::from(layers.to_vec())
    )
    .into_bytes()
}

fn same_signature(layer: &Value, ours: &Value) -> bool {
    layer.get("digest") == ours.get("digest")
        && layer.pointer(&format!(
            "/annotations/{}",
            SIGNATURE_ANNOTATION.replace('/', "~1")
        )) == ours.pointer(&format!(
            "/annotations/{}",
            SIGNATURE_ANNOTATION.replace('/', "~1")
        ))
}

async fn existing_layers(
    registry: &Registry,
    img: &ImageRef,
    tag: &str,
) -> Result<Vec<Value>, Error> {
    let Some((body, _)) = registry.get_manifest(img, tag, OCI_MANIFEST).await? else {
        return Ok(Vec::new());
    };
    let manifest: Value = serde_json::from_slice(&body).map_err(|e| Error::Registry {
        registry: img.registry.clone(),
        reason: format!("{tag} is not JSON: {e}"),
    })?;
    match manifest.get("layers") {
        Some(Value::Array(layers)) => Ok(layers.clone()),
        _ => Err(Error::Registry {
            registry: img.registry.clone(),
            reason: format!("{tag} has no layers array; not touching it"),
        }),
    }
}

/// Appends `sig` to the image's `.sig` manifest: keeps every existing layer, skips
/// an identical one, and re-reads after writing to retry if a concurrent signer's
/// write replaced ours.
///
/// Distribution 2.8 has no conditional manifest PUT, so two writers can still race;
/// the re-read happens after a settle delay of 1.25× our own read→write window, so
/// a writer that read before our PUT (and writes about as fast as we do) has
/// written before we check. Each signer checks its own layer, so whoever lost
/// re-appends. Returns whether a layer was written.
pub async fn append_signature(
    registry: &Registry,
    img: &ImageRef,
    manifest_digest: &str,
    sig: &SignatureLayer,
) -> Result<bool, Error> {
    let tag = signature_tag(manifest_digest);
    let ours = sig.descriptor();
    let mut payload_pushed = false;
    let mut read_at = Instant::now();
    let mut layers = existing_layers(registry, img, &tag).await?;
    for _ in 0..MAX_ATTEMPTS {
        if layers.iter().any(|l| same_signature(l, &ours)) {
            return Ok(false);
        }
        let mut new_layers = layers.clone();
        new_layers.push(ours.clone());
        let config = config_blob(&new_layers);
        if !payload_pushed {
            registry.push_blob(img, &sig.payload).await?;
            payload_pushed = true;
        }
        registry.push_blob(img, &config).await?;
        match registry
            .put_manifest(img, &tag, &manifest(&config, &new_layers), OCI_MANIFEST)
            .await
        {
            Ok(_) => {}
            // Distribution 2.8 (filesystem storage) sometimes loses a blob that
            // concurrent uploads to the same repository just linked, and
            // refuses the manifest. Nothing was written: push both blobs again.
            Err(e) if e.to_string().contains("MANIFEST_BLOB_UNKNOWN") => {
                warn_blob_lost(&tag);
                payload_pushed = false;
                tokio::time::sleep(settle_delay(read_at.elapsed())).await;
                read_at = Instant::now();
                layers = existing_layers(registry, img, &tag).await?;
                continue;
            }
            Err(e) => return Err(e),
        }
        tokio::time::sleep(settle_delay(read_at.elapsed())).await;
        read_at = Instant::now();
        layers = existing_layers(registry, img, &tag).await?;
        if layers.iter().any(|l| same_signature(l, &ours)) {
            return Ok(true);
        }
    }
    Err(Error::Registry {
        registry: img.registry.clone(),
        reason: format!("{tag}: concurrent writers replaced our signature {MAX_ATTEMPTS} times; giving up (nothing half-written)"),
    })
}

fn warn_blob_lost(tag: &str) {
    eprintln!("keybroker: {tag}: the registry lost a just-uploaded blob; uploading again");
}

fn settle_delay(window: Duration) -> Duration {
    // Jitter from the clock's low bits keeps two racing writers from re-reading in lockstep.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    let jitter = Duration::from_micros(u64::from(nanos % 5000));
    (window * 5 / 4).clamp(Duration::from_millis(2), Duration::from_millis(500)) + jitter
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_and_manifest_match_cosigns_layout() {
        let sig = SignatureLayer {
            payload: b"{}".to_vec(),
            signature_b64: "MEUC".into(),
        };
        let layers = vec![sig.descriptor()];
        let config = String::from_utf8(config_blob(&layers)).unwrap();
        let d = sha256_digest(b"{}");
        assert_eq!(
            config,
            format!(
                r#"{{"architecture":"","created":"0001-01-01T00:00:00Z","history":[{{"created":"0001-01-01T00:00:00Z"}}],"os":"","rootfs":{{"type":"layers","diff_ids":["{d}"]}},"config":{{}}}}"#
            )
        );
        let m: Value = serde_json::from_slice(&manifest(config.as_bytes(), &layers)).unwrap();
        assert_eq!(m["mediaType"], OCI_MANIFEST);
        assert_eq!(m["config"]["mediaType"], CONFIG_MEDIA_TYPE);
        assert_eq!(m["layers"][0]["mediaType"], SIMPLESIGNING_MEDIA_TYPE);
        assert_eq!(m["layers"][0]["annotations"][SIGNATURE_ANNOTATION], "MEUC");
        assert_eq!(signature_tag("sha256:ab"), "sha256-ab.sig");
    }
}
