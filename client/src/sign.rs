//! Signing images through the broker: resolve, SignImage, append to `.sig`.

use std::collections::HashMap;

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use keybroker_proto::v1::SignImageRequest;

use crate::{
    cosign::{append_signature, SignatureLayer},
    registry::{ImageRef, Registry},
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
    /// False when an identical signature was already stored.
    pub written: bool,
}

/// Signs one image with the broker's key `key` and stores the signature.
pub async fn sign_image(
    broker: &mut crate::broker::Client,
    registry: &Registry,
    image: &str,
    key: &str,
    annotations: &HashMap<String, String>,
) -> Result<Signed, Error> {
    let (img, digest) = resolve(registry, image).await?;
    let resp = broker
        .sign_image(SignImageRequest {
            key: key.to_string(),
            docker_reference: img.docker_reference(),
            manifest_digest: digest.clone(),
            annotations: annotations.clone(),
        })
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
    let written = append_signature(registry, &img, &digest, &layer).await?;
    Ok(Signed {
        image: format!("{}@{digest}", img.docker_reference()),
        key_id: info.key_id,
        key_version: info.version,
        written,
    })
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
