//! SignMessage: what a message the caller built is, so the same policy applies
//! as when the daemon builds it. Three kinds:
//! - a cosign simple-signing payload (`critical.type` = "cosign container image
//!   signature"): image = `critical.identity.docker-reference`, digest =
//!   `critical.image.docker-manifest-digest`, annotations = `optional`;
//! - DSSE PAE bytes (`DSSEv1 LEN TYPE LEN BODY`, parsed strictly) whose type is
//!   `application/vnd.in-toto+json` and whose body is an in-toto Statement v0.1
//!   or v1 (what `cosign attest` signs, and cosign 3's `sign` statements,
//!   predicate `https://sigstore.dev/cosign/sign/v1`, whose annotations sit in
//!   `subject[].annotations`): one image per subject, all must be allowed;
//! - anything else: raw.
//!
//! Verifiers read these documents with Go: `encoding/json` matches object
//! keys to fields case-insensitively (`CRITICAL`, and even `ſ` for `s`, `K`
//! (Kelvin) for `k`, `ı`/`İ` for `i`), keeps the last of duplicate keys, and
//! protojson also accepts a field's proto name (`predicate_type`). A message in
//! which a field this module reads could be read otherwise by a verifier (two
//! keys for one field) is refused as ambiguous, never guessed at.
//!
//! A subject name is a repository as cosign writes it (`registry/path`); a name
//! without a registry is read as Docker does (`app` → `index.docker.io/library/app`),
//! a tag or digest on it is dropped, and the result is matched against the
//! policy's image globs. A subject without a name (cosign 3's `sign`
//! statement carries only the digest) names no repository: only a rule whose
//! images glob matches everything (`**`) admits it. Subjects that are not
//! images (no sha256 digest, a name that is no repository) make the statement
//! raw signing.

use std::collections::BTreeMap;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::{attest, payload};

/// Largest message accepted (INVALID_ARGUMENT beyond; the gRPC request limit,
/// `server.max_request_bytes`, 64 KiB by default, usually refuses it first).
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// cosign 3's signature statement predicate type.
pub const COSIGN_SIGN_V1: &str = "https://sigstore.dev/cosign/sign/v1";

const SIMPLE_SIGNING_TYPE: &str = "cosign container image signature";

/// One image a message is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Normalized repository; `None` when the statement names none.
    pub repository: Option<String>,
    /// `sha256:HEX`.
    pub digest: String,
    /// Annotations (simple-signing `optional`, cosign 3 subject annotations);
    /// non-string values as their JSON text.
    pub annotations: BTreeMap<String, String>,
}

/// What a message is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A cosign simple-signing payload.
    SimpleSigning(Image),
    /// An in-toto statement in DSSE PAE framing.
    InToto {
        /// The statement's predicate type.
        predicate_type: String,
        /// One per subject.
        subjects: Vec<Image>,
    },
    /// Neither: the broker cannot tell what is signed. The reason, for errors.
    Raw(String),
}

impl Kind {
    /// The name SignMessageResponse.kind and the audit record use.
    pub fn name(&self) -> &'static str {
        match self {
            Kind::SimpleSigning(_) => "simple-signing",
            Kind::InToto { .. } => "in-toto",
            Kind::Raw(_) => "raw",
        }
    }
}

/// Classifies a message. `Err` is a message that declares itself one of the
/// recognized kinds but is malformed or ambiguous (INVALID_ARGUMENT).
pub fn classify(msg: &[u8]) -> Result<Kind, String> {
    if msg.len() > MAX_MESSAGE_BYTES {
        return Err(format!(
            "message is {} bytes, over the {MAX_MESSAGE_BYTES}-byte limit",
            msg.len()
        ));
    }
    if let Some((payload_type, body)) = parse_pae(msg) {
        if payload_type != attest::PAYLOAD_TYPE.as_bytes() {
            return Ok(Kind::Raw(format!(
                "a DSSE payload of type {:?}, not {}",
                String::from_utf8_lossy(payload_type),
                attest::PAYLOAD_TYPE
            )));
        }
        return in_toto(body).map_err(|e| format!("in-toto statement in DSSE PAE: {e}"));
    }
    if msg.starts_with(b"DSSEv1 ") {
        return Err("message starts like DSSE PAE but its framing is malformed".into());
    }
    let Ok(doc) = serde_json::from_slice::<Json>(msg) else {
        return Ok(Kind::Raw("neither JSON nor DSSE PAE".into()));
    };
    let critical = match &doc {
        Json::Object(top) => field(top, &["critical"])?,
        _ => None,
    };
    let is_simple = match critical {
        Some(Json::Object(c)) => {
            matches!(field(c, &["type"])?, Some(Json::String(t)) if t == SIMPLE_SIGNING_TYPE)
        }
        _ => false,
    };
    if !is_simple {
        return Ok(Kind::Raw(
            "JSON, but not a cosign simple-signing payload".into(),
        ));
    }
    simple_signing(&doc).map_err(|e| format!("cosign simple-signing payload: {e}"))
}

fn simple_signing(doc: &Json) -> Result<Kind, String> {
    refuse_reserved(doc)?;
    let top = doc.object("payload")?;
    let critical = field(top, &["critical"])?
        .ok_or("no critical")?
        .object("critical")?;
    let identity = field(critical, &["identity"])?
        .ok_or("no critical.identity")?
        .object("critical.identity")?;
    let reference = field(identity, &["docker-reference"])?
        .ok_or("no critical.identity.docker-reference")?
        .string("critical.identity.docker-reference")?;
    let image = field(critical, &["image"])?
        .ok_or("no critical.image")?
        .object("critical.image")?;
    let digest = field(image, &["docker-manifest-digest"])?
        .ok_or("no critical.image.docker-manifest-digest")?
        .string("critical.image.docker-manifest-digest")?;
    payload::validate_manifest_digest(digest)?;
    let repository = normalize_repository(reference)
        .ok_or_else(|| format!("docker-reference {reference:?} is not a repository"))?;
    let annotations = match field(top, &["optional"])? {
        None | Some(Json::Null) => BTreeMap::new(),
        Some(Json::Object(m)) => annotations_of(m),
        Some(_) => return Err("optional must be an object or null".into()),
    };
    Ok(Kind::SimpleSigning(Image {
        repository: Some(repository),
        digest: digest.to_string(),
        annotations,
    }))
}

fn in_toto(body: &[u8]) -> Result<Kind, String> {
    let doc: Json = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    refuse_reserved(&doc)?;
    let top = doc.object("statement")?;
    let kind = field(top, &["_type", "type"])?
        .ok_or("no _type")?
        .string("_type")?;
    if kind != attest::STATEMENT_V01 && kind != attest::STATEMENT_V1 {
        return Err(format!(
            "_type {kind:?} is neither {} nor {}",
            attest::STATEMENT_V01,
            attest::STATEMENT_V1
        ));
    }
    let predicate_type = field(top, &["predicateType", "predicate_type"])?
        .ok_or("no predicateType")?
        .string("predicateType")?
        .to_string();
    let subjects = match field(top, &["subject"])?.ok_or("no subject")? {
        Json::Array(a) if !a.is_empty() => a,
        _ => return Err("subject must be a non-empty array".into()),
    };
    let mut images = Vec::with_capacity(subjects.len());
    for (i, s) in subjects.iter().enumerate() {
        let s = s.object("subject")?;
        let name = match field(s, &["name"])? {
            None | Some(Json::Null) => None,
            Some(n) => Some(n.string("subject name")?).filter(|n| !n.is_empty()),
        };
        let digests = field(s, &["digest"])?
            .ok_or_else(|| format!("subject {i} has no digest"))?
            .object("subject digest")?;
        // A digest set is a map (exact keys in Go and protojson), so only an
        // exact duplicate is ambiguous.
        let sha: Vec<&Json> = digests
            .iter()
            .filter(|(k, _)| k == "sha256")
            .map(|(_, v)| v)
            .collect();
        let hex = match sha.as_slice() {
            [] => {
                return Ok(Kind::Raw(format!(
                    "an in-toto statement whose subject {i} has no sha256 digest (not an image)"
                )))
            }
            [one] => one.string("subject digest sha256")?,
            _ => return Err(format!("subject {i}: duplicate sha256 digest")),
        };
        let digest = format!("sha256:{hex}");
        payload::validate_manifest_digest(&digest).map_err(|e| format!("subject {i}: {e}"))?;
        let repository = match name {
            None => None,
            Some(n) => match normalize_repository(n) {
                Some(r) => Some(r),
                None => {
                    return Ok(Kind::Raw(format!(
                        "an in-toto statement whose subject {n:?} is not an image repository"
                    )))
                }
            },
        };
        let annotations = match field(s, &["annotations"])? {
            None | Some(Json::Null) => BTreeMap::new(),
            Some(Json::Object(m)) => annotations_of(m),
            Some(_) => return Err(format!("subject {i}: annotations must be an object")),
        };
        images.push(Image {
            repository,
            digest,
            annotations,
        });
    }
    Ok(Kind::InToto {
        predicate_type,
        subjects: images,
    })
}

fn annotations_of(m: &[(String, Json)]) -> BTreeMap<String, String> {
    // Go decodes these into a map: the last of duplicate keys wins.
    m.iter()
        .map(|(k, v)| {
            let v = match v {
                Json::String(s) => s.clone(),
                other => other.to_json_text(),
            };
            (k.clone(), v)
        })
        .collect()
}

/// The first object key under the broker's reserved `keybroker.dev/` prefix
/// (any case), anywhere in a document: the broker writes those (caller,
/// builder-id source) into what it builds, so a message built by the caller
/// must not carry them under the broker's signature.
fn reserved_key(doc: &Json) -> Option<&str> {
    match doc {
        Json::Object(m) => m.iter().find_map(|(k, v)| {
            let reserved = k
                .get(..payload::RESERVED_PREFIX.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(payload::RESERVED_PREFIX));
            if reserved {
                Some(k.as_str())
            } else {
                reserved_key(v)
            }
        }),
        Json::Array(a) => a.iter().find_map(reserved_key),
        _ => None,
    }
}

fn refuse_reserved(doc: &Json) -> Result<(), String> {
    match reserved_key(doc) {
        Some(k) => Err(format!(
            "key {k:?}: keys under {} are written by the broker, not by callers",
            payload::RESERVED_PREFIX
        )),
        None => Ok(()),
    }
}

/// Parses DSSE v1 PAE exactly: `DSSEv1 SP LEN SP TYPE SP LEN SP BODY`, lengths
/// in decimal without leading zeros, nothing after the body.
pub fn parse_pae(msg: &[u8]) -> Option<(&[u8], &[u8])> {
    let rest = msg.strip_prefix(b"DSSEv1 ")?;
    let (type_len, rest) = decimal(rest)?;
    let rest = rest.strip_prefix(b" ")?;
    if rest.len() < type_len {
        return None;
    }
    let (payload_type, rest) = rest.split_at(type_len);
    let rest = rest.strip_prefix(b" ")?;
    let (body_len, rest) = decimal(rest)?;
    let body = rest.strip_prefix(b" ")?;
    (body.len() == body_len).then_some((payload_type, body))
}

/// A decimal length at the start of `s` (no sign, no leading zero but "0").
fn decimal(s: &[u8]) -> Option<(usize, &[u8])> {
    let n = s.iter().take_while(|b| b.is_ascii_digit()).count();
    if n == 0 || n > 19 || (n > 1 && s[0] == b'0') {
        return None;
    }
    let v = std::str::from_utf8(&s[..n]).ok()?.parse().ok()?;
    Some((v, &s[n..]))
}

/// A repository from a subject name or docker-reference: tag and digest
/// dropped, Docker Hub names completed as Docker and cosign do, then checked.
pub fn normalize_repository(name: &str) -> Option<String> {
    let name = name.split('@').next().unwrap_or(name);
    let name = match name.rsplit_once('/') {
        Some((head, last)) => match last.split_once(':') {
            Some((repo, _tag)) => format!("{head}/{repo}"),
            None => name.to_string(),
        },
        None => name.split(':').next().unwrap_or(name).to_string(),
    };
    let (first, rest) = match name.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (first.to_string(), rest.to_string())
        }
        _ => ("index.docker.io".to_string(), name.clone()),
    };
    let registry = if first == "docker.io" {
        "index.docker.io".to_string()
    } else {
        first
    };
    let path = if registry == "index.docker.io" && !rest.contains('/') {
        format!("library/{rest}")
    } else {
        rest
    };
    let r = format!("{registry}/{path}");
    payload::validate_docker_reference(&r).ok().map(|()| r)
}

/// A JSON value that keeps every key of an object, duplicates included, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    /// null
    Null,
    /// true / false
    Bool(bool),
    /// A number, as serde_json read it.
    Number(serde_json::Number),
    /// A string.
    String(String),
    /// An array.
    Array(Vec<Json>),
    /// An object: every (key, value), in document order.
    Object(Vec<(String, Json)>),
}

impl Json {
    fn object(&self, what: &str) -> Result<&[(String, Json)], String> {
        match self {
            Json::Object(m) => Ok(m),
            _ => Err(format!("{what} must be an object")),
        }
    }

    fn string(&self, what: &str) -> Result<&str, String> {
        match self {
            Json::String(s) => Ok(s),
            _ => Err(format!("{what} must be a string")),
        }
    }

    fn to_value(&self) -> serde_json::Value {
        use serde_json::Value;
        match self {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::Bool(*b),
            Json::Number(n) => Value::Number(n.clone()),
            Json::String(s) => Value::String(s.clone()),
            Json::Array(a) => Value::Array(a.iter().map(Json::to_value).collect()),
            Json::Object(m) => {
                Value::Object(m.iter().map(|(k, v)| (k.clone(), v.to_value())).collect())
            }
        }
    }

    fn to_json_text(&self) -> String {
        self.to_value().to_string()
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Json, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Json;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("JSON")
            }
            fn visit_unit<E>(self) -> Result<Json, E> {
                Ok(Json::Null)
            }
            fn visit_none<E>(self) -> Result<Json, E> {
                Ok(Json::Null)
            }
            fn visit_bool<E>(self, b: bool) -> Result<Json, E> {
                Ok(Json::Bool(b))
            }
            fn visit_i64<E>(self, n: i64) -> Result<Json, E> {
                Ok(Json::Number(n.into()))
            }
            fn visit_u64<E>(self, n: u64) -> Result<Json, E> {
                Ok(Json::Number(n.into()))
            }
            fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<Json, E> {
                serde_json::Number::from_f64(n)
                    .map(Json::Number)
                    .ok_or_else(|| E::custom("number out of range"))
            }
            fn visit_str<E>(self, s: &str) -> Result<Json, E> {
                Ok(Json::String(s.to_string()))
            }
            fn visit_string<E>(self, s: String) -> Result<Json, E> {
                Ok(Json::String(s))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Json, A::Error> {
                let mut v = Vec::new();
                while let Some(x) = a.next_element()? {
                    v.push(x);
                }
                Ok(Json::Array(v))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Json, A::Error> {
                let mut v = Vec::new();
                while let Some((k, x)) = a.next_entry::<String, Json>()? {
                    v.push((k, x));
                }
                Ok(Json::Object(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// Go's encoding/json key folding: ASCII case, and the non-ASCII letters
/// whose simple case mapping lands on ASCII ones (U+212A KELVIN SIGN → K,
/// U+017F LONG S → S, U+0130 / U+0131 dotted/dotless I → I). Other non-ASCII
/// characters never fold onto the ASCII field names read here.
fn fold(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '\u{212A}' => 'K',
            '\u{017F}' => 'S',
            '\u{0130}' | '\u{0131}' => 'I',
            c => c.to_ascii_uppercase(),
        })
        .collect()
}

/// The value of a field as a Go verifier would find it under any of `names`
/// (case-insensitively, and a field's alternative proto name); more than one
/// candidate key is ambiguous and refused.
fn field<'a>(obj: &'a [(String, Json)], names: &[&str]) -> Result<Option<&'a Json>, String> {
    let wanted: Vec<String> = names.iter().map(|n| fold(n)).collect();
    let mut found = obj.iter().filter(|(k, _)| wanted.contains(&fold(k)));
    let first = found.next();
    if let (Some((k1, _)), Some((k2, _))) = (first, found.next()) {
        return Err(format!(
            "ambiguous JSON: keys {k1:?} and {k2:?} both name field {:?} for a Go verifier",
            names[0]
        ));
    }
    Ok(first.map(|(_, v)| v))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn simple(reference: &str, optional: &str) -> Vec<u8> {
        format!(
            r#"{{"critical":{{"identity":{{"docker-reference":"{reference}"}},"image":{{"docker-manifest-digest":"sha256:{HEX}"}},"type":"cosign container image signature"}},"optional":{optional}}}"#
        )
        .into_bytes()
    }

    fn statement(subjects: &str, predicate_type: &str) -> Vec<u8> {
        let body = format!(
            r#"{{"_type":"https://in-toto.io/Statement/v1","subject":{subjects},"predicateType":"{predicate_type}","predicate":{{}}}}"#
        );
        attest::pae(attest::PAYLOAD_TYPE, body.as_bytes())
    }

    #[test]
    fn recognizes_cosign_simple_signing() {
        let k = classify(&simple("reg.io/app/api", r#"{"commit":"abc","n":5}"#)).unwrap();
        let Kind::SimpleSigning(img) = k else {
            panic!("{k:?}")
        };
        assert_eq!(img.repository.as_deref(), Some("reg.io/app/api"));
        assert_eq!(img.digest, format!("sha256:{HEX}"));
        assert_eq!(img.annotations["commit"], "abc");
        assert_eq!(img.annotations["n"], "5");
        // The daemon's own payload (null optional), and a Docker Hub name.
        let k = classify(&simple("nginx", "null")).unwrap();
        assert!(
            matches!(&k, Kind::SimpleSigning(i) if i.repository.as_deref() == Some("index.docker.io/library/nginx")),
            "{k:?}"
        );
    }

    #[test]
    fn ambiguous_keys_are_refused_as_go_would_read_them_otherwise() {
        // A second "critical" that Go's case-insensitive matching would pick.
        let mut evil = simple("reg.io/app/api", "null");
        evil.pop();
        evil.extend_from_slice(
            format!(r#","CRITICAL":{{"identity":{{"docker-reference":"reg.io/evil/x"}},"image":{{"docker-manifest-digest":"sha256:{HEX}"}},"type":"cosign container image signature"}}}}"#)
                .as_bytes(),
        );
        let e = classify(&evil).unwrap_err();
        assert!(e.contains("ambiguous"), "{e}");
        // Long s folds onto s in Go: "docker-manifeſt-digest" is the same field.
        let s = String::from_utf8(simple("reg.io/app/api", "null"))
            .unwrap()
            .replace(
                r#""docker-manifest-digest""#,
                &format!(
                    r#""docker-manifest-digest":"sha256:{HEX}","docker-manife\u017ft-digest""#
                ),
            );
        assert!(classify(s.as_bytes()).unwrap_err().contains("ambiguous"));
        // Case alone: accepted as Go accepts it.
        let s = String::from_utf8(simple("reg.io/app/api", "null"))
            .unwrap()
            .replace("docker-reference", "Docker-Reference");
        assert!(matches!(
            classify(s.as_bytes()).unwrap(),
            Kind::SimpleSigning(_)
        ));
        // protojson's proto name next to the JSON name.
        let body = format!(
            r#"{{"_type":"https://in-toto.io/Statement/v1","subject":[{{"name":"reg.io/a/b","digest":{{"sha256":"{HEX}"}}}}],"predicateType":"x:a","predicate_type":"x:b"}}"#
        );
        let e = classify(&attest::pae(attest::PAYLOAD_TYPE, body.as_bytes())).unwrap_err();
        assert!(e.contains("ambiguous"), "{e}");
    }

    #[test]
    fn broker_keys_cannot_be_forged_through_a_message() {
        let e = classify(&simple("reg.io/app", r#"{"keybroker.dev/caller":"uid=0"}"#)).unwrap_err();
        assert!(e.contains("keybroker.dev/caller"), "{e}");
        let subjects = format!(r#"[{{"name":"reg.io/a/b","digest":{{"sha256":"{HEX}"}}}}]"#);
        let body = format!(
            r#"{{"_type":"https://in-toto.io/Statement/v1","subject":{subjects},"predicateType":"https://slsa.dev/provenance/v1","predicate":{{"runDetails":{{"builder":{{"id":"x","version":{{"KeyBroker.dev/builder-id-source":"authenticated:oidc"}}}}}}}}}}"#
        );
        let e = classify(&attest::pae(attest::PAYLOAD_TYPE, body.as_bytes())).unwrap_err();
        assert!(e.contains("written by the broker"), "{e}");
    }

    #[test]
    fn malformed_simple_signing_is_invalid_not_raw() {
        for bad in [
            String::from_utf8(simple("reg.io/App:x", "null")).unwrap(),
            String::from_utf8(simple("reg.io/app", "[]")).unwrap(),
            String::from_utf8(simple("reg.io/app", "null"))
                .unwrap()
                .replace(HEX, "abc"),
        ] {
            assert!(classify(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn recognizes_in_toto_statements_in_pae() {
        let subjects = format!(
            r#"[{{"name":"reg.io/app/api","digest":{{"sha256":"{HEX}"}}}},{{"name":"ghcr.io/o/r:v1","digest":{{"sha256":"{HEX}","sha512":"00"}}}}]"#
        );
        let k = classify(&statement(&subjects, "https://slsa.dev/provenance/v1")).unwrap();
        let Kind::InToto {
            predicate_type,
            subjects,
        } = k
        else {
            panic!()
        };
        assert_eq!(predicate_type, "https://slsa.dev/provenance/v1");
        assert_eq!(subjects.len(), 2);
        assert_eq!(subjects[1].repository.as_deref(), Some("ghcr.io/o/r"));
        // cosign 3's sign statement: no name, annotations on the subject.
        let subjects =
            format!(r#"[{{"digest":{{"sha256":"{HEX}"}},"annotations":{{"commit":"abc"}}}}]"#);
        let k = classify(&statement(&subjects, COSIGN_SIGN_V1)).unwrap();
        let Kind::InToto { subjects, .. } = k else {
            panic!()
        };
        assert_eq!(subjects[0].repository, None);
        assert_eq!(subjects[0].annotations["commit"], "abc");
    }

    #[test]
    fn everything_else_is_raw() {
        for raw in [
            b"hello".to_vec(),
            b"{}".to_vec(),
            br#"{"critical":{"type":"something else"}}"#.to_vec(),
            attest::pae("application/json", b"{}"),
            statement(r#"[{"name":"file.txt","digest":{"sha512":"00"}}]"#, "x:y"),
            statement(
                &format!(r#"[{{"name":"Weird Name","digest":{{"sha256":"{HEX}"}}}}]"#),
                "x:y",
            ),
        ] {
            let k = classify(&raw).unwrap();
            assert!(
                matches!(k, Kind::Raw(_)),
                "{}: {k:?}",
                String::from_utf8_lossy(&raw)
            );
        }
        // Recognized framing, broken content: invalid.
        for bad in [
            attest::pae(attest::PAYLOAD_TYPE, b"not json"),
            attest::pae(attest::PAYLOAD_TYPE, br#"{"_type":"https://in-toto.io/Statement/v9","subject":[],"predicateType":"a:b"}"#),
            statement("[]", "x:y"),
            b"DSSEv1 28 application/vnd.in-toto+json 3 {}".to_vec(),
        ] {
            assert!(classify(&bad).is_err(), "{}", String::from_utf8_lossy(&bad));
        }
        assert!(classify(&vec![b' '; MAX_MESSAGE_BYTES + 1]).is_err());
    }

    #[test]
    fn pae_is_parsed_strictly() {
        let good = attest::pae("t", b"body");
        assert_eq!(parse_pae(&good), Some((&b"t"[..], &b"body"[..])));
        assert_eq!(parse_pae(b"DSSEv1 0  0 "), Some((&b""[..], &b""[..])));
        for bad in [
            &b"DSSEv1 01 t 4 body"[..],
            b"DSSEv1 1 t 04 body",
            b"DSSEv1 1 t 4 body!",
            b"DSSEv1 1 t 5 body",
            b"DSSEv1 1  t 4 body",
            b"DSSEv1 +1 t 4 body",
            b"DSSEv1 1 t 4body",
            b"DSSEv2 1 t 4 body",
            b"DSSEv1 99999999999999999999 t 4 body",
        ] {
            assert_eq!(parse_pae(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn repositories_are_normalized_like_docker() {
        for (name, want) in [
            ("reg.io/app/api", Some("reg.io/app/api")),
            ("reg.io:5000/app:v1", Some("reg.io:5000/app")),
            ("127.0.0.1:5000/app@sha256:00", Some("127.0.0.1:5000/app")),
            ("localhost/app", Some("localhost/app")),
            ("nginx", Some("index.docker.io/library/nginx")),
            ("nginx:1.25", Some("index.docker.io/library/nginx")),
            ("acme/api", Some("index.docker.io/acme/api")),
            ("docker.io/acme/api", Some("index.docker.io/acme/api")),
            ("Reg.io/App", None),
            ("", None),
            ("a b", None),
        ] {
            assert_eq!(normalize_repository(name).as_deref(), want, "{name}");
        }
    }
}
