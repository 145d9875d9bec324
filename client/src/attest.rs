//! Attesting images through the broker: resolve, AttestImage (the daemon builds
//! the in-toto statement, checks image policy, audits and DSSE-signs it),
//! check, append to `.att`.

use keybroker_proto::v1::AttestImageRequest;
use serde_json::Value;

use crate::{
    bundle,
    cosign::attestation::{append_attestation, check_subject, verify_envelope},
    formats::Format,
    registry::{Discovery, Registry},
    sign::resolve,
    Error,
};

/// What attesting one image did.
#[derive(Debug, Clone)]
pub struct Attested {
    /// The image, with its digest.
    pub image: String,
    /// Key id as the broker reports it.
    pub key_id: String,
    /// The predicate type URI.
    pub predicate_type: String,
    /// Classic format: false when an identical envelope was already stored
    /// (and when the classic format was not written).
    pub written: bool,
    /// Bundle format: the referrer manifest's digest and where it is listed.
    pub bundle: Option<(String, Discovery)>,
    /// The signed statement.
    pub statement: Value,
}

/// Where an attestation goes.
#[derive(Debug, Clone, Copy)]
pub struct Storage {
    /// Classic `.att`, bundle referrer, or both.
    pub format: Format,
    /// Classic only: drop stored attestations of the same predicate type.
    pub replace: bool,
}

/// Attests one image with the broker's key `key` and stores the envelope in
/// `format`: a `.att` layer, a Sigstore bundle referrer, or both (one
/// signature serves both: the envelope is the same).
/// `predicate` is the predicate JSON (built from `--type` and the file by
/// `cosign::attestation::build_predicate`, or by `--provenance`).
pub async fn attest_image(
    broker: &mut crate::broker::Client,
    registry: &Registry,
    image: &str,
    key: &str,
    predicate_type: &str,
    predicate: &Value,
    store: Storage,
) -> Result<Attested, Error> {
    let Storage { format, replace } = store;
    let (img, digest) = resolve(registry, image).await?;
    let predicate_bytes = serde_json::to_vec(predicate)
        .map_err(|e| Error::Other(format!("predicate does not serialize: {e}")))?;
    let resp = broker
        .attest_image(AttestImageRequest {
            key: key.to_string(),
            docker_reference: img.docker_reference(),
            manifest_digest: digest.clone(),
            predicate_type: predicate_type.to_string(),
            predicate: predicate_bytes,
            timestamp: format.bundle(),
        })
        .await?
        .into_inner();
    let info = resp.key.unwrap_or_default();
    let statement = check_before_publishing(
        &resp.envelope,
        &info.public_key_pem,
        &img.docker_reference(),
        &digest,
        predicate_type,
    )?;
    let written = if format.classic() {
        append_attestation(
            registry,
            &img,
            &digest,
            &resp.envelope,
            predicate_type,
            replace,
        )
        .await?
    } else {
        false
    };
    let mut stored = None;
    if format.bundle() {
        let timestamps: Vec<Vec<u8>> = [resp.timestamp]
            .into_iter()
            .filter(|t| !t.is_empty())
            .collect();
        let b = bundle::build(&resp.envelope, &info.public_key_pem, &timestamps)?;
        bundle::verify(&b, &info.public_key_pem, &digest).map_err(|e| {
            Error::Other(format!("the bundle does not verify ({e}); nothing written"))
        })?;
        let (referrer, via) = bundle::store(registry, &img, &digest, &b, predicate_type).await?;
        stored = Some((referrer.digest, via));
    }
    Ok(Attested {
        image: format!("{}@{digest}", img.docker_reference()),
        key_id: info.key_id,
        predicate_type: predicate_type.to_string(),
        written,
        bundle: stored,
        statement,
    })
}

/// Refuses to publish an envelope that would not verify, or one whose
/// statement is about another image or of another predicate type.
fn check_before_publishing(
    envelope: &[u8],
    public_pem: &str,
    docker_reference: &str,
    digest: &str,
    predicate_type: &str,
) -> Result<Value, Error> {
    let refuse = |why: String| Error::Other(format!("broker returned {why}; nothing written"));
    let statement = verify_envelope(envelope, public_pem).map_err(|e| {
        refuse(format!(
            "an envelope that does not verify with its key ({e})"
        ))
    })?;
    check_subject(&statement, digest).map_err(|e| refuse(format!("a wrong statement: {e}")))?;
    let names_us = statement
        .get("subject")
        .and_then(Value::as_array)
        .is_some_and(|s| {
            s.iter()
                .any(|s| s.get("name").and_then(Value::as_str) == Some(docker_reference))
        });
    if !names_us {
        return Err(refuse(format!(
            "a statement whose subject is not {docker_reference}"
        )));
    }
    let ty = statement.get("predicateType").and_then(Value::as_str);
    if ty != Some(predicate_type) {
        return Err(refuse(format!(
            "a statement of predicate type {ty:?}, not {predicate_type}"
        )));
    }
    Ok(statement)
}
