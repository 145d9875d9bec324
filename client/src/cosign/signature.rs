//! Writing a signature: payload blob, config blob, and the `.sig` manifest,
//! appended to whatever signatures are already there.

use super::append::{append_layer, Layer, Mode};
use crate::{
    registry::{ImageRef, Registry},
    Error,
};

/// Layer media type of a cosign simple-signing payload.
pub const SIMPLESIGNING_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// Layer annotation carrying the base64 DER signature.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";

/// One signature to store.
#[derive(Debug, Clone)]
pub struct SignatureLayer {
    /// The payload bytes the signature covers.
    pub payload: Vec<u8>,
    /// Standard padded base64 of the ASN.1 DER signature.
    pub signature_b64: String,
}

impl SignatureLayer {
    fn layer(&self) -> Layer {
        Layer {
            media_type: SIMPLESIGNING_MEDIA_TYPE.into(),
            blob: self.payload.clone(),
            annotations: [(SIGNATURE_ANNOTATION.to_string(), self.signature_b64.clone())].into(),
        }
    }

    #[cfg(test)]
    fn descriptor(&self) -> serde_json::Value {
        self.layer().descriptor()
    }
}

/// `sha256-<hex>.sig`, the tag cosign stores signatures under.
pub fn signature_tag(manifest_digest: &str) -> String {
    format!("{}.sig", manifest_digest.replace(':', "-"))
}

/// Appends `sig` to the image's `.sig` manifest: keeps every existing layer, skips
/// an identical one, and re-reads after writing to retry if a concurrent signer's
/// write replaced ours (see [`append_layer`]). Returns whether a layer was written.
pub async fn append_signature(
    registry: &Registry,
    img: &ImageRef,
    manifest_digest: &str,
    sig: &SignatureLayer,
) -> Result<bool, Error> {
    append_layer(
        registry,
        img,
        &signature_tag(manifest_digest),
        &sig.layer(),
        Mode::Append,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::sha256_digest;

    #[test]
    fn signature_layer_is_cosigns() {
        let sig = SignatureLayer {
            payload: b"{}".to_vec(),
            signature_b64: "MEUC".into(),
        };
        let d = sig.descriptor();
        assert_eq!(d["mediaType"], SIMPLESIGNING_MEDIA_TYPE);
        assert_eq!(d["digest"], sha256_digest(b"{}"));
        assert_eq!(d["size"], 2);
        assert_eq!(
            d["annotations"],
            serde_json::json!({SIGNATURE_ANNOTATION: "MEUC"})
        );
        assert_eq!(signature_tag("sha256:ab"), "sha256-ab.sig");
    }
}
