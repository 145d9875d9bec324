//! Both storage formats side by side: writing in one or both (`Format`), and
//! reading them the way a verifier of a given generation does (`Prefer`).
//!
//! - **classic**: cosign ≤ v2's `.sig` / `.att` tags (`cosign/`).
//! - **bundle**: cosign v3's Sigstore bundles as OCI referrers (`bundle.rs`).
//!
//! cosign v3's `verify` reads bundles when the image has any, and falls back to
//! `.sig` only when it has none at all (`cmd/cosign/cli/verify/verify.go`: the
//! new-bundle-format path is taken as soon as `GetBundles` finds one). So one
//! bundle of any kind hides every classic signature from cosign v3; `both`
//! keeps an image verifiable by cosign v2, cosign v3, sigstore-rs (classic) and
//! sigstore-js / sigstore-go (bundles).

use std::fmt;

use serde_json::Value;

use crate::{
    bundle,
    cosign::{attestation::verify_attestations, verify_image},
    registry::{Discovery, ImageRef, Registry},
    Error,
};

/// Which format(s) to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// cosign ≤ v2's `.sig` / `.att` tags.
    Classic,
    /// cosign v3's Sigstore bundle as an OCI 1.1 referrer.
    Bundle,
    /// Both: what verifies in the most places (the default).
    Both,
}

impl Format {
    /// Writes the classic format.
    pub fn classic(self) -> bool {
        matches!(self, Format::Classic | Format::Both)
    }
    /// Writes the bundle format.
    pub fn bundle(self) -> bool {
        matches!(self, Format::Bundle | Format::Both)
    }
}

/// Which format a verification reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Prefer {
    /// As cosign v3: bundles when the image has any bundle, else classic.
    Bundle,
    /// As cosign v2, with a fallback: classic when the image has a classic
    /// signature (attestation), else bundles.
    Classic,
    /// Every signature in either format; any one that verifies is enough.
    Any,
}

/// Where a verified signature came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A layer of the `.sig` / `.att` manifest.
    Classic,
    /// A bundle referrer, found through the API or the tag schema.
    Bundle(Discovery),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Classic => f.write_str("classic"),
            Source::Bundle(d) => write!(f, "bundle ({})", d.as_str()),
        }
    }
}

/// One verified signature or attestation.
#[derive(Debug, Clone)]
pub struct Verified {
    /// Its format.
    pub source: Source,
    /// Classic signature: the simple-signing payload. Otherwise the in-toto statement.
    pub content: Value,
    /// RFC 3161 timestamps the bundle carries (0 for classic).
    pub timestamps: usize,
    /// The bundle's referrer manifest digest ("" for classic).
    pub referrer: String,
}

struct BundleOutcome {
    via: Discovery,
    /// Bundles present at all (any predicate type): what cosign v3 keys on.
    present: usize,
    verified: Vec<Verified>,
    failures: Vec<String>,
}

async fn check_bundles(
    registry: &Registry,
    img: &ImageRef,
    digest: &str,
    public_pem: &str,
    wanted: &dyn Fn(&str) -> bool,
) -> Result<BundleOutcome, Error> {
    let (via, found) = bundle::find(registry, img, digest).await?;
    let mut out = BundleOutcome {
        via,
        present: found.len(),
        verified: Vec::new(),
        failures: Vec::new(),
    };
    for (i, f) in found.iter().enumerate() {
        let label = format!("bundle {} ({})", i + 1, f.referrer.digest);
        let bytes = match &f.bundle {
            Ok(b) => b,
            Err(e) => {
                out.failures.push(format!("{label}: {e}"));
                continue;
            }
        };
        match bundle::verify(bytes, public_pem, digest) {
            Ok(v) => {
                let ty = v
                    .statement
                    .get("predicateType")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                if wanted(ty) {
                    out.verified.push(Verified {
                        source: Source::Bundle(via),
                        content: v.statement,
                        timestamps: v.timestamps,
                        referrer: f.referrer.digest.clone(),
                    });
                } else {
                    out.failures.push(format!(
                        "{label}: predicate type {ty} is not the one wanted"
                    ));
                }
            }
            Err(e) => out.failures.push(format!("{label}: {e}")),
        }
    }
    Ok(out)
}

fn classic(content: Value) -> Verified {
    Verified {
        source: Source::Classic,
        content,
        timestamps: 0,
        referrer: String::new(),
    }
}

/// Why nothing verified, from both formats' reports.
fn nothing_verified(what: &str, img: &ImageRef, digest: &str, reasons: Vec<String>) -> Error {
    Error::Verification(format!(
        "no {what} of {img} ({digest}) verified with the given key: {}",
        reasons.join("; ")
    ))
}

/// Verifies an image's signatures (classic simple-signing payloads, and
/// bundles whose statement has predicate `cosign/sign/v1`) as `prefer` says.
pub async fn verify_signatures(
    registry: &Registry,
    img: &ImageRef,
    public_pem: &str,
    prefer: Prefer,
) -> Result<Vec<Verified>, Error> {
    let digest = registry.resolve_digest(img).await?;
    let pinned = img.with_digest(&digest);
    let sign_v1 = |t: &str| t == bundle::COSIGN_SIGN_V1;
    let classic_result = || async {
        verify_image(registry, &pinned, public_pem).await.map(|v| {
            v.into_iter()
                .map(|v| classic(v.payload))
                .collect::<Vec<_>>()
        })
    };
    run(
        prefer,
        "signature",
        &pinned,
        &digest,
        classic_result,
        || check_bundles(registry, &pinned, &digest, public_pem, &sign_v1),
    )
    .await
}

/// Verifies an image's attestations (classic `.att` envelopes, and bundles
/// whose predicate is not cosign's signature one) as `prefer` says. With
/// `predicate_type`, only statements of that type count.
pub async fn verify_image_attestations(
    registry: &Registry,
    img: &ImageRef,
    public_pem: &str,
    predicate_type: Option<&str>,
    prefer: Prefer,
) -> Result<Vec<Verified>, Error> {
    let digest = registry.resolve_digest(img).await?;
    let pinned = img.with_digest(&digest);
    let wanted = |t: &str| t != bundle::COSIGN_SIGN_V1 && predicate_type.is_none_or(|w| t == w);
    let classic_result = || async {
        verify_attestations(registry, &pinned, public_pem, predicate_type)
            .await
            .map(|v| v.into_iter().map(classic).collect::<Vec<_>>())
    };
    let what = match predicate_type {
        Some(t) => format!("attestation for predicate type {t}"),
        None => "attestation".to_string(),
    };
    run(prefer, &what, &pinned, &digest, classic_result, || {
        check_bundles(registry, &pinned, &digest, public_pem, &wanted)
    })
    .await
}

/// The `prefer` rule over the two formats' results; each format is read only
/// when the rule needs it. A classic "nothing stored" error says "no …s found
/// for"; that is what decides a fallback.
async fn run<C, F, B, G>(
    prefer: Prefer,
    what: &str,
    img: &ImageRef,
    digest: &str,
    classic_result: C,
    bundles: B,
) -> Result<Vec<Verified>, Error>
where
    C: FnOnce() -> F,
    F: std::future::Future<Output = Result<Vec<Verified>, Error>>,
    B: FnOnce() -> G,
    G: std::future::Future<Output = Result<BundleOutcome, Error>>,
{
    let none_stored = |e: &Error| {
        let e = e.to_string();
        e.starts_with("no ") && e.contains(" found for ")
    };
    let bundle_result = |b: BundleOutcome| -> Result<Vec<Verified>, Error> {
        if b.verified.is_empty() {
            let mut why = b.failures;
            if why.is_empty() {
                why.push(format!(
                    "nothing stored in either format (no classic tag, no bundle referrer via {})",
                    b.via.as_str()
                ));
            }
            Err(nothing_verified(what, img, digest, why))
        } else {
            Ok(b.verified)
        }
    };
    match prefer {
        Prefer::Bundle => {
            let bundles = bundles().await?;
            if bundles.present > 0 {
                bundle_result(bundles)
            } else {
                classic_result().await
            }
        }
        Prefer::Classic => match classic_result().await {
            Err(e) if none_stored(&e) => bundle_result(bundles().await?),
            other => other,
        },
        Prefer::Any => {
            let bundles = bundles().await?;
            let c = classic_result().await;
            let mut all = Vec::new();
            let mut why = Vec::new();
            match c {
                Ok(v) => all.extend(v),
                Err(e) => why.push(format!("classic: {e}")),
            }
            let present = bundles.present;
            match bundle_result(bundles) {
                Ok(v) => all.extend(v),
                Err(e) if present > 0 => why.push(format!("bundles: {e}")),
                Err(_) => why.push("bundles: none stored".into()),
            }
            if all.is_empty() {
                Err(nothing_verified(what, img, digest, why))
            } else {
                Ok(all)
            }
        }
    }
}
