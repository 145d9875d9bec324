//! The cosign "simple signing" payload (DESIGN.md §5), built by the daemon so the
//! caller cannot choose what the key signs beyond image, digest and annotations.

use std::collections::BTreeMap;

use serde::Serialize;

/// Annotation key under which the daemon records the authenticated caller.
pub const CALLER_ANNOTATION: &str = "keybroker.dev/caller";
/// Annotation recording a verified OIDC ID token's issuer and subject.
pub const OIDC_ANNOTATION: &str = "keybroker.dev/oidc";
/// Annotation prefix reserved for the daemon; clients may not set these keys.
pub const RESERVED_PREFIX: &str = "keybroker.dev/";

#[derive(Serialize)]
struct Payload<'a> {
    critical: Critical<'a>,
    optional: Option<&'a BTreeMap<String, String>>,
}

#[derive(Serialize)]
struct Critical<'a> {
    identity: Identity<'a>,
    image: Image<'a>,
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct Identity<'a> {
    #[serde(rename = "docker-reference")]
    docker_reference: &'a str,
}

#[derive(Serialize)]
struct Image<'a> {
    #[serde(rename = "docker-manifest-digest")]
    docker_manifest_digest: &'a str,
}

/// Serializes the payload in cosign's key order; `optional` is `null` when empty.
/// Annotations are emitted sorted by key, as Go's encoding/json does for maps.
pub fn simple_signing(
    docker_reference: &str,
    manifest_digest: &str,
    annotations: &BTreeMap<String, String>,
) -> Vec<u8> {
    let payload = Payload {
        critical: Critical {
            identity: Identity { docker_reference },
            image: Image {
                docker_manifest_digest: manifest_digest,
            },
            kind: "cosign container image signature",
        },
        optional: (!annotations.is_empty()).then_some(annotations),
    };
    // Serializing plain strings and a string map cannot fail.
    serde_json::to_vec(&payload).unwrap_or_default()
}

/// Checks a docker-reference: `host[:port]/path`, lower-case path, no tag, no digest.
pub fn validate_docker_reference(r: &str) -> Result<(), String> {
    if r.is_empty() || r.len() > 512 {
        return Err("docker_reference must be 1..=512 bytes".into());
    }
    let (host, path) = r
        .split_once('/')
        .ok_or_else(|| format!("docker_reference {r:?} must be REGISTRY/REPOSITORY"))?;
    if r.contains('@') {
        return Err(format!("docker_reference {r:?} must not carry a digest"));
    }
    if path.contains(':') {
        return Err(format!("docker_reference {r:?} must not carry a tag"));
    }
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c));
    let path_ok = !path.is_empty()
        && path.split('/').all(|seg| {
            !seg.is_empty()
                && seg
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
        });
    if !host_ok || !path_ok {
        return Err(format!(
            "docker_reference {r:?} is not a valid REGISTRY/REPOSITORY"
        ));
    }
    Ok(())
}

/// Checks `sha256:<64 lower-case hex>`.
pub fn validate_manifest_digest(d: &str) -> Result<(), String> {
    match d.strip_prefix("sha256:") {
        Some(hex)
            if hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            Ok(())
        }
        _ => Err(format!(
            "manifest_digest {d:?} must be sha256:<64 lower-case hex>"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn matches_cosigns_bytes() {
        let got = simple_signing("index.docker.io/library/x", D, &BTreeMap::new());
        let want = format!(
            r#"{{"critical":{{"identity":{{"docker-reference":"index.docker.io/library/x"}},"image":{{"docker-manifest-digest":"{D}"}},"type":"cosign container image signature"}},"optional":null}}"#
        );
        assert_eq!(String::from_utf8(got).unwrap(), want);
        let ann = BTreeMap::from([
            ("z".to_string(), "1".to_string()),
            ("a".to_string(), "2".to_string()),
        ]);
        let got = String::from_utf8(simple_signing("r/x", D, &ann)).unwrap();
        assert!(got.ends_with(r#""optional":{"a":"2","z":"1"}}"#), "{got}");
    }

    #[test]
    fn validates_references_and_digests() {
        assert!(validate_docker_reference("127.0.0.1:5000/app/api").is_ok());
        for bad in [
            "app",
            "reg/app:tag",
            "reg/app@sha256:00",
            "reg/App",
            "reg//x",
            "",
        ] {
            assert!(validate_docker_reference(bad).is_err(), "{bad}");
        }
        assert!(validate_manifest_digest(D).is_ok());
        assert!(validate_manifest_digest("sha256:ABC").is_err());
        assert!(validate_manifest_digest(&D.replace("sha256", "sha512")).is_err());
    }
}
