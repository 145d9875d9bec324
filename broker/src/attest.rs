//! Attestations (AttestImage): the in-toto Statement the daemon builds around a
//! caller's predicate, the SLSA Provenance v1 builder id it sets from the
//! authenticated caller, DSSE's pre-authentication encoding (PAE), and the
//! envelope as cosign stores it in a `.att` layer.
//!
//! Formats, as read in sigstore/cosign (`pkg/cosign/attestation`) and the DSSE
//! spec:
//! - Statement: `_type` `https://in-toto.io/Statement/v0.1` (what `cosign
//!   attest` writes), then `subject`, `predicateType`, `predicate` — the order
//!   of cosign 3, which marshals in-toto's protobuf Statement (field numbers
//!   1..4); cosign 2 wrote `predicateType` before `subject`. No verifier depends
//!   on the order. Predicate object keys come out sorted (protojson's Struct
//!   and Go's maps do the same).
//! - PAE: `"DSSEv1" SP len(type) SP type SP len(body) SP body`, lengths in
//!   ASCII decimal without leading zeros; the key signs SHA-256(PAE).
//! - Envelope: `{"payloadType","payload","signatures":[{"keyid":"","sig"}]}`,
//!   standard padded base64, an empty `keyid` — go-securesystemslib's
//!   layout, which cosign 2 wrote. cosign 3 writes the same fields as
//!   `payload, payloadType, signatures:[{sig}]` (empty keyid omitted); every
//!   DSSE reader accepts both, and Python's securesystemslib needs `keyid`
//!   present, so it is kept.

use std::collections::BTreeMap;

use base64::{engine::general_purpose::STANDARD, Engine};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::{identity::Caller, oidc::Token, payload::RESERVED_PREFIX};

/// The Statement `_type` cosign writes.
pub const STATEMENT_V01: &str = "https://in-toto.io/Statement/v0.1";
/// The Statement v1 `_type` (cosign 3's `sign` statements, other producers).
pub const STATEMENT_V1: &str = "https://in-toto.io/Statement/v1";
/// DSSE payloadType of an in-toto statement.
pub const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
/// SLSA Provenance v1 predicate type.
pub const SLSA_PROVENANCE_V1: &str = "https://slsa.dev/provenance/v1";
/// Largest predicate accepted (the gRPC request limit, `server.max_request_bytes`,
/// 64 KiB by default, usually refuses a large one first).
pub const MAX_PREDICATE_BYTES: usize = 1 << 20;
/// Largest predicate type URI.
const MAX_PREDICATE_TYPE_LEN: usize = 512;

/// Keys the broker writes into `runDetails.builder.version` of SLSA v1 provenance.
pub const BUILDER_ID_SOURCE: &str = "keybroker.dev/builder-id-source";
/// The builder id the client claimed, kept when the broker set another.
pub const CLAIMED_BUILDER_ID: &str = "keybroker.dev/claimed-builder-id";
/// The transport identity of the caller (`unix:uid=…`, `x509:uri=…`).
pub const CALLER_KEY: &str = "keybroker.dev/caller";

/// DSSE v1 pre-authentication encoding.
pub fn pae(payload_type: &str, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + payload_type.len() + 32);
    out.extend_from_slice(b"DSSEv1 ");
    out.extend_from_slice(payload_type.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload_type.as_bytes());
    out.push(b' ');
    out.extend_from_slice(body.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(body);
    out
}

/// Checks a predicate type: an absolute URI (what the client resolved cosign's
/// short names to), printable, bounded.
pub fn validate_predicate_type(t: &str) -> Result<(), String> {
    let scheme_ok = t.split_once(':').is_some_and(|(s, rest)| {
        !s.is_empty()
            && !rest.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+.-".contains(&b))
    });
    if t.is_empty()
        || t.len() > MAX_PREDICATE_TYPE_LEN
        || !scheme_ok
        || t.chars().any(|c| c.is_control() || c == ' ')
    {
        return Err(format!(
            "predicate_type must be a URI of at most {MAX_PREDICATE_TYPE_LEN} bytes (cosign's short names are resolved by the client)"
        ));
    }
    Ok(())
}

/// Parses the caller's predicate: a JSON object of bounded size.
pub fn parse_predicate(bytes: &[u8]) -> Result<Value, String> {
    if bytes.len() > MAX_PREDICATE_BYTES {
        return Err(format!(
            "predicate is {} bytes, over the {MAX_PREDICATE_BYTES}-byte limit",
            bytes.len()
        ));
    }
    match serde_json::from_slice::<Value>(bytes) {
        // A string is what cosign's `--type spdx` makes of a non-JSON SPDX document.
        Ok(v @ (Value::Object(_) | Value::String(_))) => Ok(v),
        Ok(other) => Err(format!(
            "predicate must be a JSON object (or a string), not {}",
            kind_of(&other)
        )),
        Err(e) => Err(format!("predicate is not JSON: {e}")),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Where the builder id of a SLSA provenance came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuilderSource {
    /// A verified OIDC ID token (issuer and subject).
    Oidc,
    /// The verified mTLS client certificate (URI SAN, e.g. a SPIFFE ID).
    X509,
    /// What the client wrote (a local unix caller: a uid means nothing to a
    /// verifier on another machine, so it is recorded, not made the builder).
    Claimed,
}

impl BuilderSource {
    /// The value written under [`BUILDER_ID_SOURCE`].
    pub fn as_str(self) -> &'static str {
        match self {
            BuilderSource::Oidc => "authenticated:oidc",
            BuilderSource::X509 => "authenticated:x509",
            BuilderSource::Claimed => "claimed",
        }
    }
}

/// The builder id the broker can vouch for, if any. A verified ID token wins
/// over the transport (it names the CI job; a certificate names the agent):
/// `ISSUER#SUBJECT`, e.g.
/// `https://token.actions.githubusercontent.com#repo:acme/api:ref:refs/heads/main`.
/// A client certificate gives its first URI SAN (a SPIFFE ID), else the
/// broker's `x509:dns=…` / `x509:subject=…` identity. A unix-socket peer gives
/// none.
pub fn authenticated_builder(
    caller: &Caller,
    token: Option<&Token>,
) -> Option<(String, BuilderSource)> {
    if let Some(t) = token {
        return Some((format!("{}#{}", t.issuer, t.subject), BuilderSource::Oidc));
    }
    match caller {
        Caller::Certificate(c) => Some((
            c.uris
                .first()
                .cloned()
                .unwrap_or_else(|| caller.payload_identity()),
            BuilderSource::X509,
        )),
        Caller::Unix { .. } => None,
    }
}

/// What [`apply_builder`] decided, for the audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuilderDecision {
    /// The builder id now in the predicate (None: neither set nor claimed).
    pub id: Option<String>,
    /// Where it came from.
    pub source: BuilderSource,
    /// The client's own value, if it sent one.
    pub claimed: Option<String>,
}

fn object_at<'a>(
    parent: &'a mut Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<&'a mut Map<String, Value>, String> {
    let v = parent
        .entry(key.to_string())
        .or_insert_with(|| Value::Object(Map::new()));
    match v {
        Value::Object(m) => Ok(m),
        other => Err(format!(
            "predicate {path} must be an object, not {}",
            kind_of(other)
        )),
    }
}

/// Sets `runDetails.builder.id` of a SLSA Provenance v1 predicate from the
/// authenticated caller and records in `runDetails.builder.version` where the
/// id came from, the client's claimed id, and the caller's transport identity.
/// Keys under `keybroker.dev/` in `builder.version` are the broker's: a
/// predicate that carries one is refused.
pub fn apply_builder(
    predicate: &mut Map<String, Value>,
    authenticated: Option<(String, BuilderSource)>,
    caller_identity: &str,
) -> Result<BuilderDecision, String> {
    let run = object_at(predicate, "runDetails", "runDetails")?;
    let builder = object_at(run, "builder", "runDetails.builder")?;
    let claimed = match builder.get("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => {
            return Err(format!(
                "predicate runDetails.builder.id must be a string, not {}",
                kind_of(other)
            ))
        }
    };
    let version = object_at(builder, "version", "runDetails.builder.version")?;
    if let Some(k) = version.keys().find(|k| k.starts_with(RESERVED_PREFIX)) {
        return Err(format!(
            "predicate runDetails.builder.version key {k:?}: keys under {RESERVED_PREFIX} are set by the broker, not by callers"
        ));
    }
    let (id, source) = match authenticated {
        Some((id, source)) => {
            if let Some(c) = &claimed {
                version.insert(CLAIMED_BUILDER_ID.into(), Value::String(c.clone()));
            }
            (Some(id), source)
        }
        None => (claimed.clone(), BuilderSource::Claimed),
    };
    version.insert(BUILDER_ID_SOURCE.into(), source.as_str().into());
    version.insert(CALLER_KEY.into(), caller_identity.into());
    if let Some(id) = &id {
        builder.insert("id".into(), Value::String(id.clone()));
    }
    Ok(BuilderDecision {
        id,
        source,
        claimed,
    })
}

#[derive(Serialize)]
struct Statement<'a> {
    #[serde(rename = "_type")]
    kind: &'static str,
    subject: [Subject<'a>; 1],
    #[serde(rename = "predicateType")]
    predicate_type: &'a str,
    predicate: &'a Value,
}

#[derive(Serialize)]
struct Subject<'a> {
    name: &'a str,
    digest: Digest<'a>,
}

#[derive(Serialize)]
struct Digest<'a> {
    sha256: &'a str,
}

/// The statement bytes: one subject, the repository at `sha256:HEX`.
/// `manifest_digest` is `sha256:HEX` (validated by the caller).
pub fn statement(
    repository: &str,
    manifest_digest: &str,
    predicate_type: &str,
    predicate: &Value,
) -> Vec<u8> {
    let hex = manifest_digest
        .strip_prefix("sha256:")
        .unwrap_or(manifest_digest);
    let s = Statement {
        kind: STATEMENT_V01,
        subject: [Subject {
            name: repository,
            digest: Digest { sha256: hex },
        }],
        predicate_type,
        predicate,
    };
    // Strings and an already-parsed JSON object cannot fail to serialize.
    serde_json::to_vec(&s).unwrap_or_default()
}

#[derive(Serialize)]
struct SignStatement<'a> {
    #[serde(rename = "_type")]
    kind: &'static str,
    subject: [SignSubject<'a>; 1],
    #[serde(rename = "predicateType")]
    predicate_type: &'static str,
    predicate: Map<String, Value>,
}

#[derive(Serialize)]
struct SignSubject<'a> {
    digest: Digest<'a>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: &'a BTreeMap<String, String>,
}

/// cosign v3's image-signature statement (`cosign sign` in the bundle format):
/// in-toto Statement v1, one subject with the digest and the annotations and no
/// name, predicate type `https://sigstore.dev/cosign/sign/v1`, empty predicate.
pub fn sign_statement(manifest_digest: &str, annotations: &BTreeMap<String, String>) -> Vec<u8> {
    let hex = manifest_digest
        .strip_prefix("sha256:")
        .unwrap_or(manifest_digest);
    let s = SignStatement {
        kind: STATEMENT_V1,
        subject: [SignSubject {
            digest: Digest { sha256: hex },
            annotations,
        }],
        predicate_type: crate::message::COSIGN_SIGN_V1,
        predicate: Map::new(),
    };
    serde_json::to_vec(&s).unwrap_or_default()
}

#[derive(Serialize)]
struct Envelope {
    #[serde(rename = "payloadType")]
    payload_type: &'static str,
    payload: String,
    signatures: [EnvelopeSignature; 1],
}

#[derive(Serialize)]
struct EnvelopeSignature {
    keyid: &'static str,
    sig: String,
}

/// The DSSE envelope JSON of a statement and its DER signature over SHA-256(PAE).
pub fn envelope(statement: &[u8], der: &[u8]) -> Vec<u8> {
    let e = Envelope {
        payload_type: PAYLOAD_TYPE,
        payload: STANDARD.encode(statement),
        signatures: [EnvelopeSignature {
            keyid: "",
            sig: STANDARD.encode(der),
        }],
    };
    serde_json::to_vec(&e).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn sign_statement_is_cosign_v3s_and_the_recognizer_reads_it_back() {
        let a = BTreeMap::from([("commit".to_string(), "abc".to_string())]);
        let s = sign_statement(D, &a);
        assert_eq!(
            String::from_utf8(s.clone()).unwrap(),
            format!(
                r#"{{"_type":"https://in-toto.io/Statement/v1","subject":[{{"digest":{{"sha256":"{}"}},"annotations":{{"commit":"abc"}}}}],"predicateType":"https://sigstore.dev/cosign/sign/v1","predicate":{{}}}}"#,
                &D[7..]
            )
        );
        // What SignImage signs in the bundle format is what SignMessage accepts.
        match crate::message::classify(&pae(PAYLOAD_TYPE, &s)).unwrap() {
            crate::message::Kind::InToto { subjects, .. } => {
                assert_eq!(subjects.len(), 1);
                assert_eq!(subjects[0].annotations, a);
            }
            k => panic!("recognized as {}", k.name()),
        }
        // No annotations: the key is left out (verifiers read absent and {} alike).
        assert!(!String::from_utf8(sign_statement(D, &BTreeMap::new()))
            .unwrap()
            .contains("annotations"));
    }

    #[test]
    fn pae_matches_the_dsse_spec() {
        // The DSSE spec's own test vector (protocol.md).
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
        );
        assert_eq!(pae("", b""), b"DSSEv1 0  0 ");
        let body = vec![b'x'; 1000];
        let p = pae(PAYLOAD_TYPE, &body);
        assert!(p.starts_with(b"DSSEv1 28 application/vnd.in-toto+json 1000 xxx"));
        assert_eq!(
            p.len(),
            "DSSEv1 28 application/vnd.in-toto+json 1000 ".len() + 1000
        );
    }

    #[test]
    fn statement_bytes() {
        let pred = parse_predicate(br#"{"z":1,"a":{"y":"2","b":[true,null]}}"#).unwrap();
        let got = statement("reg.example/app/api", D, "https://example.com/p/v1", &pred);
        assert_eq!(
            String::from_utf8(got).unwrap(),
            format!(
                r#"{{"_type":"https://in-toto.io/Statement/v0.1","subject":[{{"name":"reg.example/app/api","digest":{{"sha256":"{}"}}}}],"predicateType":"https://example.com/p/v1","predicate":{{"a":{{"b":[true,null],"y":"2"}},"z":1}}}}"#,
                &D[7..]
            )
        );
    }

    #[test]
    fn envelope_bytes() {
        let env = envelope(b"{}", &[0x30, 0x01, 0xff]);
        assert_eq!(
            String::from_utf8(env).unwrap(),
            r#"{"payloadType":"application/vnd.in-toto+json","payload":"e30=","signatures":[{"keyid":"","sig":"MAH/"}]}"#
        );
    }

    #[test]
    fn predicates_must_be_objects_or_strings() {
        assert!(parse_predicate(b"{}").is_ok());
        // cosign's `--type spdx` stores a non-JSON SPDX document as a string.
        assert_eq!(
            parse_predicate(b"\"SPDXVersion: SPDX-2.3\"").unwrap(),
            Value::String("SPDXVersion: SPDX-2.3".into())
        );
        for bad in [&b"[]"[..], b"1", b"null", b"{", b"{} {}", b""] {
            assert!(
                parse_predicate(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let big = format!(r#"{{"a":"{}"}}"#, "x".repeat(MAX_PREDICATE_BYTES));
        assert!(parse_predicate(big.as_bytes())
            .unwrap_err()
            .contains("limit"));
        assert!(validate_predicate_type(SLSA_PROVENANCE_V1).is_ok());
        assert!(validate_predicate_type("slsaprovenance1").is_err());
        assert!(validate_predicate_type("").is_err());
        assert!(validate_predicate_type("https://x/ y").is_err());
    }

    fn unix() -> Caller {
        Caller::Unix {
            uid: 1001,
            gid: 1001,
            pid: None,
            groups: vec![],
        }
    }

    #[test]
    fn builder_id_is_attested_when_the_caller_is_authenticated() {
        let token = Token {
            issuer: "https://token.actions.test".into(),
            subject: "repo:acme/api:ref:refs/heads/main".into(),
            claims: Default::default(),
        };
        let cert = Caller::Certificate(crate::identity::CertIdentity {
            uris: vec!["spiffe://example.org/ci/builder".into()],
            dns: vec![],
            subject: "CN=b".into(),
        });
        let claimed = || {
            parse_predicate(
                br#"{"buildDefinition":{"buildType":"t"},"runDetails":{"builder":{"id":"https://evil.example/me","version":{"runner":"2"}}}}"#,
            )
            .unwrap()
        };

        let mut p = claimed();
        let auth = authenticated_builder(&unix(), Some(&token));
        let d = apply_builder(p.as_object_mut().unwrap(), auth, "unix:uid=1001,gid=1001").unwrap();
        assert_eq!(d.source, BuilderSource::Oidc);
        let b = &p["runDetails"]["builder"];
        assert_eq!(
            b["id"],
            "https://token.actions.test#repo:acme/api:ref:refs/heads/main"
        );
        assert_eq!(b["version"][BUILDER_ID_SOURCE], "authenticated:oidc");
        assert_eq!(b["version"][CLAIMED_BUILDER_ID], "https://evil.example/me");
        assert_eq!(b["version"]["runner"], "2");
        assert_eq!(b["version"][CALLER_KEY], "unix:uid=1001,gid=1001");
        assert_eq!(p["buildDefinition"]["buildType"], "t");

        let mut p = claimed();
        let auth = authenticated_builder(&cert, None);
        apply_builder(p.as_object_mut().unwrap(), auth, &cert.payload_identity()).unwrap();
        let b = &p["runDetails"]["builder"];
        assert_eq!(b["id"], "spiffe://example.org/ci/builder");
        assert_eq!(b["version"][BUILDER_ID_SOURCE], "authenticated:x509");

        // A local uid is recorded but does not replace the claim.
        let mut p = claimed();
        let d = apply_builder(
            p.as_object_mut().unwrap(),
            authenticated_builder(&unix(), None),
            "unix:uid=1001,gid=1001",
        )
        .unwrap();
        assert_eq!(d.source, BuilderSource::Claimed);
        let b = &p["runDetails"]["builder"];
        assert_eq!(b["id"], "https://evil.example/me");
        assert_eq!(b["version"][BUILDER_ID_SOURCE], "claimed");
        assert!(b["version"].get(CLAIMED_BUILDER_ID).is_none());

        // An empty predicate gets the structure; an authenticated one its id.
        let mut p = Map::new();
        apply_builder(&mut p, authenticated_builder(&cert, None), "x").unwrap();
        assert_eq!(
            p["runDetails"]["builder"]["id"],
            "spiffe://example.org/ci/builder"
        );
    }

    #[test]
    fn builder_fields_of_the_wrong_shape_or_forged_are_refused() {
        for bad in [
            r#"{"runDetails":[]}"#,
            r#"{"runDetails":{"builder":"x"}}"#,
            r#"{"runDetails":{"builder":{"id":5}}}"#,
            r#"{"runDetails":{"builder":{"version":"1"}}}"#,
            r#"{"runDetails":{"builder":{"version":{"keybroker.dev/builder-id-source":"authenticated:oidc"}}}}"#,
        ] {
            let mut p = parse_predicate(bad.as_bytes()).unwrap();
            assert!(
                apply_builder(p.as_object_mut().unwrap(), None, "x").is_err(),
                "{bad}"
            );
        }
    }
}
