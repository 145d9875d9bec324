//! The append machinery shared by `.sig` and `.att`: one OCI manifest per tag,
//! one layer per signature or attestation, the config blob cosign writes, and
//! a read → write → re-read loop that never clobbers another writer's layer.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use crate::{
    registry::{sha256_digest, ImageRef, Registry, OCI_MANIFEST},
    Error,
};

pub(crate) const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const MAX_ATTEMPTS: usize = 6;

/// One layer to store: its blob (uncompressed, as cosign stores it), media type
/// and annotations.
#[derive(Debug, Clone)]
pub struct Layer {
    /// Layer media type.
    pub media_type: String,
    /// The blob bytes.
    pub blob: Vec<u8>,
    /// Layer annotations (emitted sorted by key, as Go's encoding/json does).
    pub annotations: BTreeMap<String, String>,
}

impl Layer {
    pub(crate) fn descriptor(&self) -> Value {
        json!({
            "mediaType": self.media_type,
            "size": self.blob.len(),
            "digest": sha256_digest(&self.blob),
            "annotations": self.annotations,
        })
    }
}

/// How the new layer joins the existing ones.
pub enum Mode<'a> {
    /// Keep every existing layer; skip ours if an identical one is there.
    Append,
    /// Drop the existing layers `drop` selects (given each descriptor and its
    /// blob), put ours first: cosign's `attest --replace`.
    Replace(&'a (dyn Fn(&Value, Option<&[u8]>) -> bool + Sync)),
}

/// The config blob as cosign writes it: one history entry and diff_id per layer.
#[doc(hidden)]
pub fn config_blob(layers: &[Value]) -> Vec<u8> {
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

#[doc(hidden)]
pub fn manifest(config: &[u8], layers: &[Value]) -> Vec<u8> {
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"{CONFIG_MEDIA_TYPE}","size":{},"digest":"{}"}},"layers":{}}}"#,
        config.len(),
        sha256_digest(config),
        Value::from(layers.to_vec())
    )
    .into_bytes()
}

/// Same blob and media type, and every annotation of ours present with the
/// same value (cosign's duplicate rule: a layer that lacks one of ours is not
/// the same; extra annotations of theirs do not matter).
#[doc(hidden)]
pub fn same_layer(layer: &Value, ours: &Value) -> bool {
    layer.get("digest") == ours.get("digest")
        && layer.get("mediaType") == ours.get("mediaType")
        && match ours.get("annotations").and_then(Value::as_object) {
            None => true,
            Some(wanted) => wanted.iter().all(|(k, v)| {
                layer.pointer(&format!(
                    "/annotations/{}",
                    k.replace('~', "~0").replace('/', "~1")
                )) == Some(v)
            }),
        }
}

/// Reads the manifest under `tag`. Distribution 2.8's filesystem storage
/// writes a tag's link file in place, so a read racing a concurrent writer's
/// PUT can get a 500 ("invalid checksum digest format"); the registry client
/// retries 5xx answers with backoff (`RetryPolicy`), which covers that race.
async fn read_manifest(
    registry: &Registry,
    img: &ImageRef,
    tag: &str,
) -> Result<Option<Vec<u8>>, Error> {
    Ok(registry
        .get_manifest(img, tag, OCI_MANIFEST)
        .await?
        .map(|(body, _)| body))
}

pub(crate) async fn existing_layers(
    registry: &Registry,
    img: &ImageRef,
    tag: &str,
) -> Result<Vec<Value>, Error> {
    let Some(body) = read_manifest(registry, img, tag).await? else {
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

/// Decides, once per layer, whether `Mode::Replace` drops it. Only layers seen
/// on the first read are candidates: a layer a concurrent writer adds while we
/// retry is theirs to keep. Blobs are read only here (cosign reads each
/// attestation's payload to find its predicate type).
async fn replace_verdicts(
    registry: &Registry,
    img: &ImageRef,
    candidates: &[Value],
    ours: &Value,
    drop: &(dyn Fn(&Value, Option<&[u8]>) -> bool + Sync),
) -> Vec<Value> {
    let mut dropped = Vec::new();
    for layer in candidates {
        if same_layer(layer, ours) {
            continue;
        }
        let blob = match layer.get("digest").and_then(Value::as_str) {
            Some(d) => registry.get_blob(img, d).await.ok(),
            None => None,
        };
        if drop(layer, blob.as_deref()) {
            dropped.push(layer.clone());
        }
    }
    dropped
}

/// Adds `layer` to the manifest under `tag`: keeps every other layer (or, with
/// `Mode::Replace`, those the selector does not drop), skips an identical one,
/// and re-reads after writing to retry if a concurrent writer's write replaced
/// ours.
///
/// Distribution 2.8 has no conditional manifest PUT, so two writers can still race;
/// the re-read happens after a settle delay of 1.25× our own read→write window, so
/// a writer that read before our PUT (and writes about as fast as we do) has
/// written before we check. Each writer checks its own layer, so whoever lost
/// re-appends. Returns whether a layer was written.
pub async fn append_layer(
    registry: &Registry,
    img: &ImageRef,
    tag: &str,
    layer: &Layer,
    mode: Mode<'_>,
) -> Result<bool, Error> {
    let ours = layer.descriptor();
    let mut blob_pushed = false;
    let mut read_at = Instant::now();
    let mut layers = existing_layers(registry, img, tag).await?;
    let dropped = match &mode {
        Mode::Append => Vec::new(),
        Mode::Replace(drop) => replace_verdicts(registry, img, &layers, &ours, *drop).await,
    };
    for _ in 0..MAX_ATTEMPTS {
        if layers.iter().any(|l| same_layer(l, &ours)) {
            return Ok(false);
        }
        let new_layers: Vec<Value> = match &mode {
            Mode::Append => layers.iter().chain([&ours]).cloned().collect(),
            // cosign's replace puts the new attestation first.
            Mode::Replace(_) => [&ours]
                .into_iter()
                .chain(layers.iter().filter(|l| !dropped.contains(l)))
                .cloned()
                .collect(),
        };
        let config = config_blob(&new_layers);
        if !blob_pushed {
            registry.push_blob(img, &layer.blob).await?;
            blob_pushed = true;
        }
        registry.push_blob(img, &config).await?;
        match registry
            .put_manifest(img, tag, &manifest(&config, &new_layers), OCI_MANIFEST)
            .await
        {
            Ok(_) => {}
            // Distribution 2.8 (filesystem storage) sometimes loses a blob that
            // concurrent uploads to the same repository just linked, and
            // refuses the manifest. Nothing was written: push both blobs again.
            Err(e) if e.to_string().contains("MANIFEST_BLOB_UNKNOWN") => {
                warn_blob_lost(tag);
                blob_pushed = false;
                tokio::time::sleep(settle_delay(read_at.elapsed())).await;
                read_at = Instant::now();
                layers = existing_layers(registry, img, tag).await?;
                continue;
            }
            Err(e) => return Err(e),
        }
        tokio::time::sleep(settle_delay(read_at.elapsed())).await;
        read_at = Instant::now();
        layers = existing_layers(registry, img, tag).await?;
        if layers.iter().any(|l| same_layer(l, &ours)) {
            return Ok(true);
        }
    }
    Err(Error::Registry {
        registry: img.registry.clone(),
        reason: format!("{tag}: concurrent writers replaced our layer {MAX_ATTEMPTS} times; giving up (nothing half-written)"),
    })
}

pub(crate) fn warn_blob_lost(tag: &str) {
    eprintln!("keybroker: {tag}: the registry lost a just-uploaded blob; uploading again");
}

pub(crate) fn settle_delay(window: Duration) -> Duration {
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
        let layer = Layer {
            media_type: "application/vnd.dev.cosign.simplesigning.v1+json".into(),
            blob: b"{}".to_vec(),
            annotations: [(
                "dev.cosignproject.cosign/signature".to_string(),
                "MEUC".to_string(),
            )]
            .into(),
        };
        let layers = vec![layer.descriptor()];
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
        assert_eq!(
            m["layers"][0]["mediaType"],
            "application/vnd.dev.cosign.simplesigning.v1+json"
        );
        assert_eq!(
            m["layers"][0]["annotations"]["dev.cosignproject.cosign/signature"],
            "MEUC"
        );
    }

    #[test]
    fn identical_means_blob_media_type_and_annotations() {
        let a = Layer {
            media_type: "m".into(),
            blob: b"x".to_vec(),
            annotations: [("k".to_string(), "v".to_string())].into(),
        };
        let mut b = a.clone();
        assert!(same_layer(&a.descriptor(), &b.descriptor()));
        b.annotations.insert("k".into(), "w".into());
        assert!(!same_layer(&a.descriptor(), &b.descriptor()));
        let mut c = a.clone();
        c.media_type = "n".into();
        assert!(!same_layer(&a.descriptor(), &c.descriptor()));
    }
}
