//! `keybroker tree`: everything attached to an image — classic `.sig` / `.att`
//! layers, Sigstore bundle referrers, and other OCI referrers (SBOMs and the
//! like) — with format, predicate type, key hint and time, without verifying
//! anything. The inventory a security team asks for before a migration.

use serde::Serialize;
use serde_json::Value;

use crate::{
    bundle,
    cosign::{attestation::attestation_tag, signature_tag, SIGNATURE_ANNOTATION},
    registry::{ImageRef, Registry, OCI_MANIFEST},
    Error,
};

/// One thing attached to the image.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// "classic", "bundle" or "referrer".
    pub format: &'static str,
    /// "signature", "attestation" or the referrer's artifact type.
    pub kind: String,
    /// The statement's predicate type ("" for classic signatures and plain referrers).
    pub predicate_type: String,
    /// Bundle: its public-key hint (cosign's: base64 SHA-256 of the SPKI). "" when unknown.
    pub key_hint: String,
    /// When it was written, if recorded (the referrer's created annotation).
    pub created: String,
    /// Where it lives: the classic tag, or the referrer manifest's digest.
    pub location: String,
    /// The layer or bundle digest.
    pub digest: String,
    /// Bundle: RFC 3161 timestamps and transparency-log entries carried.
    pub timestamps: usize,
    /// Bundle: transparency-log entries carried.
    pub tlog_entries: usize,
    /// How referrers were found ("referrers-api" / "tag-schema"), "" for classic.
    pub discovery: &'static str,
    /// Why an entry could not be read, if it could not.
    pub error: String,
}

/// What `tree` found for one image.
#[derive(Debug, Clone, Serialize)]
pub struct Tree {
    /// `REGISTRY/REPO@sha256:…`.
    pub image: String,
    /// Everything attached, classic first.
    pub entries: Vec<Entry>,
}

fn empty(format: &'static str, kind: &str, location: String) -> Entry {
    Entry {
        format,
        kind: kind.to_string(),
        predicate_type: String::new(),
        key_hint: String::new(),
        created: String::new(),
        location,
        digest: String::new(),
        timestamps: 0,
        tlog_entries: 0,
        discovery: "",
        error: String::new(),
    }
}

async fn classic_layers(
    registry: &Registry,
    img: &ImageRef,
    tag: &str,
    kind: &str,
) -> Result<Vec<Entry>, Error> {
    let Some((body, _)) = registry.get_manifest(img, tag, OCI_MANIFEST).await? else {
        return Ok(Vec::new());
    };
    let m: Value = serde_json::from_slice(&body).map_err(|e| Error::Registry {
        registry: img.registry.clone(),
        reason: format!("{tag} is not JSON: {e}"),
    })?;
    let layers = m
        .get("layers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    Ok(layers
        .iter()
        .map(|l| {
            let mut e = empty("classic", kind, tag.to_string());
            e.digest = l
                .get("digest")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            if kind == "attestation" {
                e.predicate_type =
                    crate::cosign::attestation::stored_predicate_type(l, None).unwrap_or_default();
            } else if l
                .pointer(&format!(
                    "/annotations/{}",
                    SIGNATURE_ANNOTATION.replace('/', "~1")
                ))
                .is_none()
            {
                e.error = "layer without a signature annotation".into();
            }
            e
        })
        .collect())
}

/// Lists everything attached to `image`.
pub async fn tree(registry: &Registry, image: &str) -> Result<Tree, Error> {
    let (img, digest) = crate::sign::resolve(registry, image).await?;
    let img = img.with_digest(&digest);
    let mut entries = classic_layers(registry, &img, &signature_tag(&digest), "signature").await?;
    entries.extend(classic_layers(registry, &img, &attestation_tag(&digest), "attestation").await?);
    let (via, referrers) = registry.referrers(&img, &digest, None).await?;
    let (_, bundles) = bundle::find(registry, &img, &digest).await?;
    for r in referrers {
        let ann = |k: &str| r.annotations.get(k).cloned().unwrap_or_default();
        let is_bundle = r.artifact_type.as_deref() == Some(bundle::BUNDLE_MEDIA_TYPE);
        let mut e = empty(
            if is_bundle { "bundle" } else { "referrer" },
            r.artifact_type.as_deref().unwrap_or("(no artifactType)"),
            r.digest.clone(),
        );
        e.discovery = via.as_str();
        e.created = ann(bundle::CREATED_ANNOTATION);
        if is_bundle {
            let found = bundles.iter().find(|b| b.referrer.digest == r.digest);
            match found.map(|f| f.bundle.as_ref().map_err(String::clone)) {
                Some(Ok(bytes)) => match bundle::parse(bytes) {
                    Ok(p) => {
                        e.predicate_type = p.predicate_type.unwrap_or_default();
                        e.key_hint = p.hint;
                        e.timestamps = p.timestamps.len();
                        e.tlog_entries = p.tlog_entries;
                        e.digest = crate::registry::sha256_digest(bytes);
                    }
                    Err(err) => e.error = err,
                },
                Some(Err(err)) => e.error = err,
                None => e.error = "listed, but gone when read".into(),
            }
            if e.predicate_type.is_empty() {
                e.predicate_type = ann(bundle::PREDICATE_TYPE_ANNOTATION);
            }
            e.kind = if e.predicate_type == bundle::COSIGN_SIGN_V1 {
                "signature".into()
            } else {
                "attestation".into()
            };
        }
        entries.push(e);
    }
    Ok(Tree {
        image: format!("{}@{digest}", img.docker_reference()),
        entries,
    })
}

/// The human-readable listing.
pub fn render(t: &Tree) -> String {
    let mut out = format!("{}\n", t.image);
    if t.entries.is_empty() {
        out.push_str("└── nothing attached (no .sig, no .att, no referrers)\n");
        return out;
    }
    let n = t.entries.len();
    for (i, e) in t.entries.iter().enumerate() {
        let branch = if i + 1 == n { "└──" } else { "├──" };
        let mut line = format!("{branch} {} {}", e.format, e.kind);
        if !e.predicate_type.is_empty() && e.kind != "signature" {
            line.push_str(&format!(" [{}]", e.predicate_type));
        }
        line.push_str(&format!(" at {}", e.location));
        if !e.key_hint.is_empty() {
            line.push_str(&format!(" key {}", e.key_hint));
        }
        if !e.created.is_empty() {
            line.push_str(&format!(" created {}", e.created));
        }
        if e.format == "bundle" {
            line.push_str(&format!(
                " timestamps {} tlog {} via {}",
                e.timestamps, e.tlog_entries, e.discovery
            ));
        }
        if !e.error.is_empty() {
            line.push_str(&format!(" (unreadable: {})", e.error));
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}
