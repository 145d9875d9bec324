//! What the client reads from a registry: image references, manifests (image,
//! index, cosign's `.sig`/`.att`), their layers and annotations, config
//! blobs, and `WWW-Authenticate` challenges.
//!
//! Properties: a parsed reference prints as text that parses to the same
//! reference, and where the broker also reads it as a repository both agree;
//! the manifest and config the client writes for a manifest's layers parse
//! back to those layers, with the config's digest and size and one diff_id per
//! layer; the duplicate-layer test is reflexive and notices a missing
//! annotation (whatever its key, `/` and `~` included); challenge parameters
//! round-trip through their quoted form.
#![no_main]

use keybroker_client::{
    cosign::{
        append::{config_blob, manifest, same_layer},
        attestation::stored_predicate_type,
    },
    registry::{client::parse_challenge_params, sha256_digest, Descriptor, ImageRef},
};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fn check_reference(text: &str) {
    let Ok(r) = ImageRef::parse(text) else {
        return;
    };
    let shown = r.to_string();
    let again = ImageRef::parse(&shown)
        .unwrap_or_else(|e| panic!("{text:?} printed as {shown:?}, which does not parse: {e}"));
    assert_eq!(r, again);
    assert!(!r.manifest_reference().is_empty());
    assert!(!r.api_host().is_empty());
    if let Some(repo) = keybroker_broker::message::normalize_repository(text) {
        assert_eq!(
            repo,
            r.docker_reference(),
            "client and broker read {text:?} as different repositories"
        );
    }
}

fn check_layers(layers: &[Value]) {
    let config = config_blob(layers);
    let written = manifest(&config, layers);
    let m: Value = serde_json::from_slice(&written).expect("our manifest is JSON");
    // Exactly, floats included (serde_json's float_roundtrip, on in the
    // workspace: without it a printed float could read back one ULP off).
    assert_eq!(m.get("layers"), Some(&Value::from(layers.to_vec())));
    assert_eq!(m["config"]["digest"], Value::from(sha256_digest(&config)));
    assert_eq!(m["config"]["size"], Value::from(config.len()));
    let c: Value = serde_json::from_slice(&config).expect("our config is JSON");
    let diff_ids = c["rootfs"]["diff_ids"].as_array().expect("diff_ids");
    let digests: Vec<&Value> = layers.iter().filter_map(|l| l.get("digest")).collect();
    assert_eq!(diff_ids.iter().collect::<Vec<_>>(), digests);
    assert_eq!(c["history"].as_array().map(Vec::len), Some(layers.len()));
    for layer in layers {
        let _ = stored_predicate_type(layer, None);
        if !layer.is_object() {
            continue;
        }
        assert!(
            same_layer(layer, layer),
            "a layer must equal itself: {layer}"
        );
        if let Some(ann) = layer.get("annotations").and_then(Value::as_object) {
            if let Some(k) = ann.keys().next() {
                let mut less = layer.clone();
                less["annotations"]
                    .as_object_mut()
                    .expect("object")
                    .remove(k);
                assert!(
                    !same_layer(&less, layer),
                    "a layer without annotation {k:?} must not count as ours"
                );
                assert!(same_layer(layer, &less));
            }
        }
    }
}

fn check_challenge(text: &str) {
    let params = parse_challenge_params(text);
    let plain = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-.".contains(&b))
    };
    if params.iter().all(|(k, v)| plain(k) && !v.contains('"')) {
        let rendered: Vec<String> = params.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        let again = parse_challenge_params(&rendered.join(","));
        assert_eq!(params, again, "{text:?} rendered as {rendered:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        check_reference(text.trim_end_matches('\n'));
        check_challenge(text);
    }
    let Ok(doc) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let _ = stored_predicate_type(&doc, Some(data));
    if let Some(layers) = doc.get("layers").and_then(Value::as_array) {
        check_layers(layers);
    }
    // An index lists manifests the same way (descriptors); a referrers list
    // is such an index, read into `Descriptor`s.
    if let Some(manifests) = doc.get("manifests").and_then(Value::as_array) {
        check_layers(manifests);
        if let Ok(list) = serde_json::from_value::<Vec<Descriptor>>(Value::from(manifests.clone()))
        {
            let text = serde_json::to_vec(&list).expect("descriptors serialize");
            let back: Vec<Descriptor> = serde_json::from_slice(&text).expect("and parse back");
            assert_eq!(back, list);
        }
    }
});
