//! OCI 1.1 referrers: artifacts that point at an image through the manifest's
//! `subject` field (distribution-spec v1.1, "Listing Referrers" and the
//! "referrers tag schema").
//!
//! A registry with the referrers API indexes such manifests itself: it answers
//! `GET /v2/<name>/referrers/<digest>` with an image index and acknowledges a
//! manifest PUT that carries a subject with an `OCI-Subject` header. A registry
//! without it (Debian's docker-registry 2.8 answers that GET with 404 and sends
//! no header) needs the client to keep the index itself, under the tag
//! `sha256-<hex>` of the subject: read it, add our descriptor, write it, and
//! re-read after a settle delay, so concurrent writers lose nothing (the same
//! guarantee as the `.sig` append in `cosign/append.rs`).

use std::{collections::BTreeMap, time::Instant};

use reqwest::{header, StatusCode};
use serde::{Deserialize, Serialize};

use super::{
    client::{bytes_of, error_text, read_limited},
    sha256_digest, ImageRef, Registry, MANIFEST_ACCEPT, OCI_MANIFEST,
};
use crate::Error;

/// OCI image index media type (the referrers list and the tag-schema index).
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// The empty config descriptor's media type (image-spec v1.1 "Guidance for an
/// Empty Descriptor"), and its content: the two bytes `{}`.
pub const EMPTY_CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
const EMPTY_CONFIG: &[u8] = b"{}";
/// How many times the tag-schema index is re-read and re-written when a
/// concurrent writer replaced our entry.
const MAX_ATTEMPTS: usize = 8;

/// An OCI content descriptor, as referrer lists carry them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    /// Media type of the referenced content.
    #[serde(rename = "mediaType")]
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// The artifact's type (the manifest's `artifactType`), for filtering.
    #[serde(
        rename = "artifactType",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub artifact_type: Option<String>,
    /// The manifest's annotations, copied into the list.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Where a registry keeps referrers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discovery {
    /// The registry's referrers API.
    Api,
    /// The `sha256-<hex>` index tag this client maintains.
    TagSchema,
}

impl Discovery {
    /// Short name for reports: "referrers-api" or "tag-schema".
    pub fn as_str(self) -> &'static str {
        match self {
            Discovery::Api => "referrers-api",
            Discovery::TagSchema => "tag-schema",
        }
    }
}

/// A referrer manifest to store: one layer with `blob`, the empty config.
pub struct NewReferrer<'a> {
    /// The manifest's `artifactType`.
    pub artifact_type: &'a str,
    /// The layer's content.
    pub blob: &'a [u8],
    /// The layer's media type.
    pub blob_media_type: &'a str,
    /// The manifest's annotations.
    pub annotations: BTreeMap<String, String>,
}

/// The referrers tag of a subject digest: `sha256:<hex>` → `sha256-<hex>`.
pub fn referrers_tag(subject_digest: &str) -> String {
    subject_digest.replace(':', "-")
}

/// The referrer manifest's bytes, in the layout `cosign` v3 writes (its
/// `WriteReferrer`): OCI image manifest, `artifactType` at the top and on the
/// empty config, one layer, the subject, the annotations.
#[doc(hidden)]
pub fn referrer_manifest(subject: &Descriptor, new: &NewReferrer<'_>) -> Vec<u8> {
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": new.artifact_type,
        "config": {
            "mediaType": EMPTY_CONFIG_MEDIA_TYPE,
            "artifactType": new.artifact_type,
            "size": EMPTY_CONFIG.len(),
            "digest": sha256_digest(EMPTY_CONFIG),
        },
        "layers": [{
            "mediaType": new.blob_media_type,
            "size": new.blob.len(),
            "digest": sha256_digest(new.blob),
        }],
        "subject": {
            "mediaType": subject.media_type,
            "size": subject.size,
            "digest": subject.digest,
        },
        "annotations": new.annotations,
    });
    serde_json::to_vec(&manifest).unwrap_or_default()
}

/// The index stored under the referrers tag.
fn tag_index(manifests: &[Descriptor]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": manifests,
    }))
    .unwrap_or_default()
}

#[derive(Deserialize)]
struct Index {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

fn parse_index(img: &ImageRef, what: &str, body: &[u8]) -> Result<Vec<Descriptor>, Error> {
    serde_json::from_slice::<Index>(body)
        .map(|i| i.manifests)
        .map_err(|e| Registry::registry_err(img, format!("{what} is not an OCI index: {e}")))
}

impl Registry {
    /// The descriptor of a manifest (media type, digest, size) by tag or
    /// digest; `None` if it does not exist.
    pub async fn manifest_descriptor(
        &self,
        img: &ImageRef,
        reference: &str,
    ) -> Result<Option<Descriptor>, Error> {
        let url = format!("{}/manifests/{reference}", self.base(img));
        let resp = self
            .send(img, false, |h| {
                h.head(&url).header(header::ACCEPT, MANIFEST_ACCEPT)
            })
            .await?;
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(None),
            s => {
                return Err(Self::registry_err(
                    img,
                    format!("HEAD manifest {reference} answered {s}"),
                ))
            }
        }
        let h = resp.headers();
        let text = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
        let media_type = text("content-type").unwrap_or_default();
        let size = text("content-length").and_then(|s| s.parse().ok());
        let digest = text("docker-content-digest").filter(|d| d.starts_with("sha256:"));
        match (digest, size) {
            (Some(digest), Some(size)) if !media_type.is_empty() => Ok(Some(Descriptor {
                media_type,
                digest,
                size,
                artifact_type: None,
                annotations: BTreeMap::new(),
            })),
            // A registry that leaves headers out: read the manifest itself.
            _ => {
                let Some((body, media_type)) =
                    self.get_manifest(img, reference, MANIFEST_ACCEPT).await?
                else {
                    return Ok(None);
                };
                Ok(Some(Descriptor {
                    media_type,
                    digest: sha256_digest(&body),
                    size: body.len() as u64,
                    artifact_type: None,
                    annotations: BTreeMap::new(),
                }))
            }
        }
    }

    /// The referrers of `subject_digest`, through the API when the registry has
    /// it, else from the tag-schema index. `artifact_type` filters (on our side
    /// too: a registry may ignore the filter).
    pub async fn referrers(
        &self,
        img: &ImageRef,
        subject_digest: &str,
        artifact_type: Option<&str>,
    ) -> Result<(Discovery, Vec<Descriptor>), Error> {
        let mut url = format!("{}/referrers/{subject_digest}", self.base(img));
        if let Some(t) = artifact_type {
            url.push_str("?artifactType=");
            url.push_str(&t.replace('+', "%2B"));
        }
        let resp = self
            .send(img, false, |h| {
                h.get(&url).header(header::ACCEPT, OCI_INDEX)
            })
            .await?;
        let (via, mut list) = match resp.status() {
            StatusCode::OK => {
                let body = read_limited(img, resp).await?;
                (Discovery::Api, parse_index(img, "referrers list", &body)?)
            }
            // No referrers API (distribution 2.8 answers 404): the tag schema.
            StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => {
                let tag = referrers_tag(subject_digest);
                let list = match self.get_manifest(img, &tag, OCI_INDEX).await? {
                    Some((body, _)) => parse_index(img, &tag, &body)?,
                    None => Vec::new(),
                };
                (Discovery::TagSchema, list)
            }
            s => {
                return Err(Self::registry_err(
                    img,
                    format!(
                        "GET referrers of {subject_digest} answered {s}: {}",
                        error_text(resp).await
                    ),
                ))
            }
        };
        if let Some(t) = artifact_type {
            list.retain(|d| d.artifact_type.as_deref() == Some(t));
        }
        Ok((via, list))
    }

    /// Stores a referrer of `subject`: blobs first (the empty config and the
    /// layer), then the manifest by digest, then — when the registry did not
    /// acknowledge the subject — our entry in the tag-schema index. Returns the
    /// referrer manifest's descriptor and where it is listed.
    pub async fn put_referrer(
        &self,
        img: &ImageRef,
        subject: &Descriptor,
        new: NewReferrer<'_>,
    ) -> Result<(Descriptor, Discovery), Error> {
        let manifest = referrer_manifest(subject, &new);
        let digest = sha256_digest(&manifest);
        let url = format!("{}/manifests/{digest}", self.base(img));
        let body = bytes_of(&manifest);
        // Distribution 2.8 (filesystem storage) sometimes loses a blob that
        // concurrent uploads of the same content (the empty config every
        // referrer shares) just linked, and refuses the manifest with
        // MANIFEST_BLOB_UNKNOWN. Nothing was written: upload both blobs again,
        // a bounded number of times (as the `.sig` path does).
        const ATTEMPTS: u32 = 5;
        let mut attempt = 0;
        let resp = loop {
            attempt += 1;
            self.push_blob(img, EMPTY_CONFIG).await?;
            self.push_blob(img, new.blob).await?;
            let resp = self
                .send(img, true, |h| {
                    h.put(&url)
                        .header(header::CONTENT_TYPE, OCI_MANIFEST)
                        .body(body.clone())
                })
                .await?;
            if resp.status().is_success() {
                break resp;
            }
            let s = resp.status();
            let text = error_text(resp).await;
            if text.contains("MANIFEST_BLOB_UNKNOWN") && attempt < ATTEMPTS {
                crate::cosign::append::warn_blob_lost(&img.to_string());
                tokio::time::sleep(crate::cosign::append::settle_delay(
                    std::time::Duration::from_millis(50 * u64::from(attempt)),
                ))
                .await;
                continue;
            }
            return Err(Self::registry_err(
                img,
                format!("PUT referrer manifest answered {s}: {text}"),
            ));
        };
        let acknowledged = resp
            .headers()
            .get("oci-subject")
            .and_then(|v| v.to_str().ok())
            == Some(subject.digest.as_str());
        let ours = Descriptor {
            media_type: OCI_MANIFEST.to_string(),
            digest,
            size: manifest.len() as u64,
            artifact_type: Some(new.artifact_type.to_string()),
            annotations: new.annotations,
        };
        if acknowledged {
            return Ok((ours, Discovery::Api));
        }
        self.add_to_tag_index(img, &subject.digest, &ours).await?;
        Ok((ours, Discovery::TagSchema))
    }

    async fn read_tag_index(&self, img: &ImageRef, tag: &str) -> Result<Vec<Descriptor>, Error> {
        match self.get_manifest(img, tag, OCI_INDEX).await? {
            Some((body, _)) => parse_index(img, tag, &body),
            None => Ok(Vec::new()),
        }
    }

    /// Read → add → write → settle → re-read until our entry is there. Entries
    /// of other writers are never dropped: each write carries every entry the
    /// last read saw, and whoever finds theirs missing writes again.
    async fn add_to_tag_index(
        &self,
        img: &ImageRef,
        subject_digest: &str,
        ours: &Descriptor,
    ) -> Result<(), Error> {
        let tag = referrers_tag(subject_digest);
        let mut read_at = Instant::now();
        let mut list = self.read_tag_index(img, &tag).await?;
        for _ in 0..MAX_ATTEMPTS {
            if list.iter().any(|d| d.digest == ours.digest) {
                return Ok(());
            }
            list.push(ours.clone());
            self.put_manifest(img, &tag, &tag_index(&list), OCI_INDEX)
                .await?;
            tokio::time::sleep(crate::cosign::settle_delay(read_at.elapsed())).await;
            read_at = Instant::now();
            list = self.read_tag_index(img, &tag).await?;
        }
        if list.iter().any(|d| d.digest == ours.digest) {
            return Ok(());
        }
        Err(Self::registry_err(
            img,
            format!(
                "{tag}: concurrent writers replaced our referrer entry {MAX_ATTEMPTS} times; \
                 the referrer {} is stored but not listed — run the command again",
                ours.digest
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn referrer_manifest_has_cosigns_layout() {
        let subject = Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest: format!("sha256:{}", "a".repeat(64)),
            size: 123,
            artifact_type: None,
            annotations: BTreeMap::new(),
        };
        let new = NewReferrer {
            artifact_type: "application/vnd.dev.sigstore.bundle.v0.3+json",
            blob: b"bundle",
            blob_media_type: "application/vnd.dev.sigstore.bundle.v0.3+json",
            annotations: [("dev.sigstore.bundle.content".into(), "dsse-envelope".into())].into(),
        };
        let m: Value = serde_json::from_slice(&referrer_manifest(&subject, &new)).unwrap();
        assert_eq!(m["artifactType"], new.artifact_type);
        assert_eq!(m["config"]["mediaType"], EMPTY_CONFIG_MEDIA_TYPE);
        assert_eq!(
            m["config"]["digest"],
            "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
        assert_eq!(m["config"]["size"], 2);
        assert_eq!(m["layers"][0]["digest"], sha256_digest(b"bundle"));
        assert_eq!(m["subject"]["digest"], subject.digest);
        assert_eq!(m["subject"]["size"], 123);
        assert_eq!(
            m["annotations"]["dev.sigstore.bundle.content"],
            "dsse-envelope"
        );
    }

    #[test]
    fn tag_index_round_trips_and_tag_is_the_spec_one() {
        let d = Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest: "sha256:00".into(),
            size: 9,
            artifact_type: Some("t".into()),
            annotations: [("k".into(), "v".into())].into(),
        };
        let img = ImageRef::parse("127.0.0.1:5000/a/b:latest").unwrap();
        let back = parse_index(&img, "x", &tag_index(std::slice::from_ref(&d))).unwrap();
        assert_eq!(back, vec![d]);
        assert_eq!(
            referrers_tag(&format!("sha256:{}", "ab".repeat(32))),
            format!("sha256-{}", "ab".repeat(32))
        );
        assert!(parse_index(&img, "x", br#"{"manifests":5}"#).is_err());
        assert!(parse_index(&img, "x", b"<html>").is_err());
    }
}
