//! Signing images through the broker: resolve, SignImage, then append to
//! `.sig` (classic) and/or store a Sigstore bundle referrer (cosign v3).

use std::collections::HashMap;

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use keybroker_proto::v1::SignImageRequest;

use crate::{
    bundle,
    cosign::{append_signature, SignatureLayer},
    formats::Format,
    registry::{Discovery, ImageRef, Registry},
    Error,
};

/// What signing one image did.
#[derive(Debug, Clone)]
pub struct Signed {
    /// The image, with its digest.
    pub image: String,
    /// Key id as the broker reports it.
    pub key_id: String,
    /// Key version ("" if none).
    pub key_version: String,
    /// Classic format: false when an identical signature was already stored
    /// (and when the classic format was not written).
    pub written: bool,
    /// Bundle format: the referrer manifest's digest and where it is listed.
    pub bundle: Option<(String, Discovery)>,
}

/// Signs one image with the broker's key `key` and stores the signature in
/// `format`: the classic `.sig` layer, a Sigstore bundle referrer, or both.
pub async fn sign_image(
    broker: &mut crate::broker::Client,
    registry: &Registry,
    image: &str,
    key: &str,
    annotations: &HashMap<String, String>,
    format: Format,
) -> Result<Signed, Error> {
    let (img, digest) = resolve(registry, image).await?;
    let request = |format: &str| SignImageRequest {
        key: key.to_string(),
        docker_reference: img.docker_reference(),
        manifest_digest: digest.clone(),
        annotations: annotations.clone(),
        format: format.to_string(),
    };
    let mut signed = Signed {
        image: format!("{}@{digest}", img.docker_reference()),
        key_id: String::new(),
        key_version: String::new(),
        written: false,
        bundle: None,
    };
    if format.classic() {
        let resp = broker
            .sign_image(request("simple-signing"))
            .await?
            .into_inner();
        let info = resp.key.unwrap_or_default();
        check_before_publishing(
            &resp.payload,
            &resp.signature,
            &info.public_key_pem,
            &digest,
        )?;
        let layer = SignatureLayer {
            payload: resp.payload,
            signature_b64: B64.encode(&resp.signature),
        };
        signed.written = append_signature(registry, &img, &digest, &layer).await?;
        signed.key_id = info.key_id;
        signed.key_version = info.version;
    }
    if format.bundle() {
        let resp = broker
            .sign_image(request("sigstore-bundle"))
            .await?
            .into_inner();
        let info = resp.key.unwrap_or_default();
        let timestamps: Vec<Vec<u8>> = [resp.timestamp]
            .into_iter()
            .filter(|t| !t.is_empty())
            .collect();
        let b = bundle::build(&resp.envelope, &info.public_key_pem, &timestamps)?;
        // The bundle we publish must verify, and be about this image.
        bundle::verify(&b, &info.public_key_pem, &digest).map_err(|e| {
            Error::Other(format!(
                "broker returned a bundle that does not verify ({e}); nothing written"
            ))
        })?;
        let (referrer, via) =
            bundle::store(registry, &img, &digest, &b, bundle::COSIGN_SIGN_V1).await?;
        signed.bundle = Some((referrer.digest, via));
        signed.key_id = info.key_id;
        signed.key_version = info.version;
    }
    Ok(signed)
}

/// Parses `image` and resolves its tag to the manifest digest (a digest in the
/// reference is used as is), so what is signed or attested is one fixed manifest.
pub async fn resolve(registry: &Registry, image: &str) -> Result<(ImageRef, String), Error> {
    let img = ImageRef::parse(image)?;
    let digest = registry.resolve_digest(&img).await?;
    Ok((img, digest))
}

/// Refuses to publish what would not verify: a payload for another digest, or a
/// signature that does not match the key the broker says it used.
fn check_before_publishing(
    payload: &[u8],
    signature: &[u8],
    public_pem: &str,
    digest: &str,
) -> Result<(), Error> {
    let value: serde_json::Value = serde_json::from_slice(payload)
        .map_err(|e| Error::Other(format!("broker returned a payload that is not JSON: {e}")))?;
    let claimed = value
        .pointer("/critical/image/docker-manifest-digest")
        .and_then(|v| v.as_str());
    if claimed != Some(digest) {
        return Err(Error::Other(format!(
            "broker signed a payload for {claimed:?}, not {digest}; nothing written"
        )));
    }
    keybroker_providers::ecdsa::verify_digest(
        public_pem,
        &keybroker_providers::Sha256Digest::of(payload),
        signature,
    )
    .map_err(|e| {
        Error::Other(format!(
            "broker's signature does not verify with its public key ({e}); nothing written"
        ))
    })
}
