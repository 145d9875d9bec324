//! `keybroker migrate`: gives images signed in one format a signature in the
//! other, through the broker (same policy, same audit), idempotently.
//!
//! Only images that already carry a signature in the source format verified
//! by the key are re-signed: migrating is not a way to sign something for the
//! first time. The annotations of the verified source signature are carried
//! over (the broker's own `keybroker.dev/*` ones are set again by the broker).

use std::collections::HashMap;

use serde_json::Value;

use crate::{
    cosign::verify_image,
    formats::{verify_signatures, Format, Prefer, Source},
    registry::Registry,
    sign::{resolve, sign_image},
    Error,
};

/// The direction of a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// Classic `.sig` signatures gain a bundle (cosign v2 → v3).
    Bundle,
    /// Bundles gain a classic `.sig` signature (for cosign v2 verifiers).
    Classic,
}

/// What happened to one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Re-signed in the target format.
    Migrated,
    /// Already has a signature by this key in the target format.
    AlreadyThere,
    /// No signature by this key in the source format: left alone.
    NoSource(String),
}

fn carried_annotations(v: &Value, classic: bool) -> HashMap<String, String> {
    let map = if classic {
        v.get("optional").and_then(Value::as_object)
    } else {
        v.pointer("/subject/0/annotations")
            .and_then(Value::as_object)
    };
    map.into_iter()
        .flatten()
        .filter(|(k, _)| !k.starts_with("keybroker.dev/"))
        .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
        .collect()
}

/// Migrates one image; `public_pem` is the public half of the broker key `key`.
pub async fn migrate_image(
    broker: &mut crate::broker::Client,
    registry: &Registry,
    image: &str,
    key: &str,
    public_pem: &str,
    target: Target,
) -> Result<(String, Outcome), Error> {
    let (img, digest) = resolve(registry, image).await?;
    let pinned = img.with_digest(&digest);
    let name = format!("{}@{digest}", img.docker_reference());
    // Both formats, read independently: "any" reports each with its source.
    let all = match verify_signatures(registry, &pinned, public_pem, Prefer::Any).await {
        Ok(v) => v,
        Err(Error::Verification(_)) => Vec::new(),
        Err(e) => return Err(e),
    };
    let has = |bundle: bool| {
        all.iter()
            .find(|v| matches!(v.source, Source::Bundle(_)) == bundle)
            .cloned()
    };
    let (source, already) = match target {
        Target::Bundle => (has(false), has(true)),
        Target::Classic => (has(true), has(false)),
    };
    if already.is_some() {
        return Ok((name, Outcome::AlreadyThere));
    }
    let Some(source) = source else {
        let why = match target {
            Target::Bundle => verify_image(registry, &pinned, public_pem)
                .await
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default(),
            Target::Classic => "no bundle signature verifies with this key".to_string(),
        };
        return Ok((name, Outcome::NoSource(why)));
    };
    let annotations = carried_annotations(&source.content, target == Target::Bundle);
    let format = match target {
        Target::Bundle => Format::Bundle,
        Target::Classic => Format::Classic,
    };
    sign_image(broker, registry, &name, key, &annotations, format).await?;
    Ok((name, Outcome::Migrated))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn annotations_carry_over_without_the_brokers_own() {
        let classic = json!({"critical": {}, "optional": {"commit": "abc", "keybroker.dev/caller": "uid=0", "n": 5}});
        assert_eq!(
            carried_annotations(&classic, true),
            HashMap::from([("commit".to_string(), "abc".to_string())])
        );
        let statement = json!({"subject": [{"digest": {}, "annotations": {"repo": "x", "keybroker.dev/oidc": "i"}}]});
        assert_eq!(
            carried_annotations(&statement, false),
            HashMap::from([("repo".to_string(), "x".to_string())])
        );
        assert!(carried_annotations(&json!({}), true).is_empty());
    }
}
